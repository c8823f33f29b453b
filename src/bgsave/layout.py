"""Layout: every name in a run directory, and how an epoch is read back from a file name.

::

    {run_dir}/.bgsave-writer.lock               the writer lock (bgsave.lock)
    {run_dir}/checkpoints/model_0010.pt         torch.save(agent) of epoch 10
    {run_dir}/checkpoints/model_0010.yaml       its sidecar, written last: its presence commits epoch 10
    {run_dir}/checkpoints/trainer_state.pt      the newest trainer state
    {run_dir}/checkpoints/.bgsave-catalog.json  what the last writer knew of the sidecars (bgsave.catalog_index)
    {run_dir}/checkpoints/.model_0010.pt.bgsave-tmp   a save in progress (local disk only)

The epoch is zero-padded to four digits and grows past them (``model_12345.pt``); a name that is
not exactly ``model_{epoch:04d}`` (``model_00005.pt``) is not a checkpoint. Temp files carry a
marker only bgsave writes (``.bgsave-tmp``), so cleaning up after a killed writer removes bgsave's
own leftovers and never a user's ``.notes.tmp``. Nothing here touches storage.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = (
    "CATALOG_INDEX",
    "CHECKPOINTS",
    "LOCK_NAME",
    "TEMP_MARKER",
    "TRAINER_STATE",
    "Name",
    "checkpoint_name",
    "epochs_in",
    "is_temp",
    "parse",
    "sidecar_of",
    "temp_name",
)

CHECKPOINTS = "checkpoints"
"""The folder of a run directory that holds its checkpoints."""
TRAINER_STATE = "trainer_state.pt"
CATALOG_INDEX = ".bgsave-catalog.json"
LOCK_NAME = ".bgsave-writer.lock"
TEMP_MARKER = ".bgsave-tmp"
"""Ends the name of every temp file bgsave writes: ``.{final name}.bgsave-tmp``."""

PT = "pt"
YAML = "yaml"


@dataclass(frozen=True, slots=True)
class Name:
    """What a checkpoint file's name says: its epoch and whether it is the ``.pt`` or the sidecar."""

    epoch: int
    suffix: str  # "pt" or "yaml"


def checkpoint_name(epoch: int, suffix: str) -> str:
    """``model_{epoch:04d}.{suffix}``: the ``.pt`` or ``.yaml`` of one epoch."""
    return f"model_{epoch:04d}.{suffix}"


def _epoch(digits: str) -> int | None:
    # Exactly what checkpoint_name writes: four digits, or more without a leading zero.
    if digits.isascii() and digits.isdigit() and (len(digits) == 4 or (len(digits) > 4 and digits[0] != "0")):
        return int(digits)
    return None


def parse(name: str) -> Name | None:
    """The epoch and suffix a file name stands for, or None when it is not a checkpoint file's name."""
    for suffix in (PT, YAML):
        if name.startswith("model_") and name.endswith("." + suffix):
            epoch = _epoch(name[6 : -len(suffix) - 1])
            return None if epoch is None else Name(epoch, suffix)
    return None


# Exactly the names checkpoint_name writes (4 digits, or more without a leading zero), matched in C
# over all names at once (a run of 10,000 checkpoints lists 20,000), joined by "/": the one
# character no file name in a listing holds (a newline could).
_PT_NAMES = re.compile(r"(?<![^/])model_(\d{4}|[1-9]\d{4,})\.pt(?![^/])", re.ASCII)
_YAML_NAMES = re.compile(r"(?<![^/])model_(\d{4}|[1-9]\d{4,})\.yaml(?![^/])", re.ASCII)


def epochs_in(names: Iterable[str]) -> tuple[set[int], set[int]]:
    """The epochs that have a ``.pt`` among ``names``, and those that have a sidecar."""
    text = "/".join(names)
    return set(map(int, _PT_NAMES.findall(text))), set(map(int, _YAML_NAMES.findall(text)))


def sidecar_of(pt_name: str) -> str | None:
    """The sidecar's name for a ``model_N.pt`` name (or the name itself for a sidecar), None otherwise."""
    parsed = parse(pt_name)
    return None if parsed is None else checkpoint_name(parsed.epoch, YAML)


def temp_name(name: str) -> str:
    """The temp file a write of ``name`` goes to before it is renamed into place."""
    return f".{name}{TEMP_MARKER}"


def is_temp(name: str) -> bool:
    """Whether ``name`` is a temp file bgsave wrote (and only bgsave: the marker is its own)."""
    return name.startswith(".") and name.endswith(TEMP_MARKER) and len(name) > len(TEMP_MARKER) + 1

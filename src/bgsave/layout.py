"""Layout: every name in a run directory, and how an epoch is read back from a file name.

::

    {run_dir}/.bgsave-writer.lock               the writer lock (bgsave.lock)
    {run_dir}/checkpoints/model_0010.pt         torch.save(agent) of epoch 10
    {run_dir}/checkpoints/trainer_0010.pt       the trainer state of epoch 10 (optimizer, extra, RNG), if saved
    {run_dir}/checkpoints/model_0010.yaml       its sidecar, written last: its presence commits epoch 10
    {run_dir}/checkpoints/model_0010.dcp/       instead of the .pt, a sharded agent's DCP directory (sharding="dcp")
    {run_dir}/checkpoints/trainer_state.pt      an older bgsave's one trainer state (read, never written)
    {run_dir}/checkpoints/.bgsave-catalog.json  what the last writer knew of the sidecars (bgsave.catalog_index)
    {run_dir}/checkpoints/.model_0010.pt.bgsave-tmp   a save in progress (local disk only)

The epoch is zero-padded to four digits and grows past them (``model_12345.pt``); a name that is
not exactly ``model_{epoch:04d}`` (``model_00005.pt``) is not a checkpoint, and the same for
``trainer_{epoch:04d}.pt``. Temp files carry a
marker only bgsave writes (``.bgsave-tmp``), so cleaning up after a killed writer removes bgsave's
own leftovers and never a user's ``.notes.tmp``. Nothing here touches storage.
"""

from __future__ import annotations

import re
from collections.abc import Container, Iterable
from dataclasses import dataclass

__all__ = (
    "CATALOG_INDEX",
    "CHECKPOINTS",
    "LOCK_NAME",
    "TEMP_MARKER",
    "TRAINER_STATE",
    "Name",
    "checkpoint_name",
    "data_name",
    "dcp_epochs_in",
    "epochs_in",
    "is_temp",
    "parse",
    "temp_name",
    "trainer_epochs_in",
    "trainer_name",
)

CHECKPOINTS = "checkpoints"
"""The folder of a run directory that holds its checkpoints."""
TRAINER_STATE = "trainer_state.pt"
"""Where bgsave before per-epoch trainer states kept the newest one; still read when a run has no other."""
CATALOG_INDEX = ".bgsave-catalog.json"
LOCK_NAME = ".bgsave-writer.lock"
TEMP_MARKER = ".bgsave-tmp"
"""Ends the name of every temp file bgsave writes: ``.{final name}.bgsave-tmp``."""

PT = "pt"
YAML = "yaml"
DCP = "dcp"


@dataclass(frozen=True, slots=True)
class Name:
    """What a checkpoint file's name says: its epoch and whether it is the ``.pt`` or the sidecar."""

    epoch: int
    suffix: str  # "pt" or "yaml"


def checkpoint_name(epoch: int, suffix: str) -> str:
    """``model_{epoch:04d}.{suffix}``: the ``.pt`` or ``.yaml`` of one epoch."""
    return f"model_{epoch:04d}.{suffix}"


# Exactly the names checkpoint_name writes: four digits, or more without a leading zero.
_EPOCH = r"(\d{4}|[1-9]\d{4,})"
_NAME = re.compile(rf"model_{_EPOCH}\.(pt|yaml)", re.ASCII)
# The same, found in C over all names at once (a run of 10,000 checkpoints lists 20,000), joined by
# "/": the one character no file name in a listing holds (a newline could).
_PT_NAMES = re.compile(rf"(?<![^/])model_{_EPOCH}\.(?:pt|dcp)(?![^/])", re.ASCII)
_DCP_NAMES = re.compile(rf"(?<![^/])model_{_EPOCH}\.dcp(?![^/])", re.ASCII)
_YAML_NAMES = re.compile(rf"(?<![^/])model_{_EPOCH}\.yaml(?![^/])", re.ASCII)
_TRAINER_NAMES = re.compile(rf"(?<![^/])trainer_{_EPOCH}\.pt(?![^/])", re.ASCII)


def trainer_name(epoch: int) -> str:
    """``trainer_{epoch:04d}.pt``: the trainer state saved with one epoch."""
    return f"trainer_{epoch:04d}.pt"


def parse(name: str) -> Name | None:
    """The epoch and suffix a file name stands for, or None when it is not a checkpoint file's name."""
    m = _NAME.fullmatch(name)
    return None if m is None else Name(int(m.group(1)), m.group(2))


def data_name(epoch: int, names: Container[str]) -> str:
    """The name of epoch's weights among ``names``: its ``.pt``, else its ``.dcp`` directory, else the ``.pt``'s."""
    pt = checkpoint_name(epoch, PT)
    if pt in names:
        return pt
    dcp = checkpoint_name(epoch, DCP)
    return dcp if dcp in names else pt


def dcp_epochs_in(names: Iterable[str]) -> set[int]:
    """The epochs that have a ``.dcp`` directory among ``names``."""
    return set(map(int, _DCP_NAMES.findall("/".join(names))))


def epochs_in(names: Iterable[str]) -> tuple[set[int], set[int]]:
    """The epochs that have a ``.pt`` (or ``.dcp`` directory) among ``names``, and those that have a sidecar."""
    text = "/".join(names)
    return set(map(int, _PT_NAMES.findall(text))), set(map(int, _YAML_NAMES.findall(text)))


def trainer_epochs_in(names: Iterable[str]) -> set[int]:
    """The epochs that have a trainer state among ``names``."""
    return set(map(int, _TRAINER_NAMES.findall("/".join(names))))


def temp_name(name: str) -> str:
    """The temp file a write of ``name`` goes to before it is renamed into place."""
    return f".{name}{TEMP_MARKER}"


def is_temp(name: str) -> bool:
    """Whether ``name`` is a temp file bgsave wrote (and only bgsave: the marker is its own)."""
    return name.startswith(".") and name.endswith(TEMP_MARKER) and len(name) > len(TEMP_MARKER) + 1

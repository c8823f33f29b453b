"""Index: what a checkpoint directory holds, which checkpoints are committed, and loading one.

A checkpoint of epoch N is *committed* when both ``model_N.pt`` and its sidecar ``model_N.yaml``
exist and the sidecar parses (the sidecar is written last, see :mod:`bgsave.storage`). Search
(latest, best, by score) reads sidecars only: one listing call, then the sidecars fetched together;
nothing is unpickled until a caller explicitly loads a checkpoint. Files that do not match
``model_<digits>.pt|yaml`` (temp files, foreign files) are ignored. Versions are ordered by numeric
epoch, so ``model_12345`` comes after ``model_9999``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from bgsave import sidecar as sidecar_schema
from bgsave.errors import CheckpointNotFoundError, CheckpointReadError
from bgsave.storage import Storage

__all__ = (
    "CheckpointInfo",
    "best",
    "by_min_score",
    "checkpoint_name",
    "find_latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_file",
)

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^model_(\d{4,})\.(pt|yaml)$")


def checkpoint_name(epoch: int, suffix: str) -> str:
    """``model_{epoch:04d}.{suffix}``."""
    return f"model_{epoch:04d}.{suffix}"


@dataclass(frozen=True, slots=True)
class CheckpointInfo:
    """One committed checkpoint, as its sidecar describes it.

    Attributes:
        epoch: The epoch (= version) number.
        path: The ``.pt`` file (local path or URL).
        size: Size of the ``.pt`` in bytes.
        sidecar: The parsed sidecar (epoch, agent_step, score, avg_reward, total_time, run, extras).
    """

    epoch: int
    path: str
    size: int
    sidecar: Mapping[str, Any]

    def metric(self, name: str) -> float | None:
        """The finite numeric value of ``name`` in the sidecar, or None."""
        return sidecar_schema.metric_value(self.sidecar, name)


def list_checkpoints(storage: Storage, directory: str) -> list[CheckpointInfo]:
    """Committed checkpoints in ``directory``, in epoch order; unreadable sidecars are skipped with a WARNING."""
    files = storage.list_sizes(directory)
    pts: dict[int, int] = {}
    yamls: dict[int, str] = {}
    for name, size in files.items():
        m = _NAME.match(name)
        if m is None:
            continue
        epoch = int(m.group(1))
        if name != checkpoint_name(epoch, m.group(2)):  # "model_00005.pt" is not epoch 5's name
            continue
        if m.group(2) == "pt":
            pts[epoch] = size
        else:
            yamls[epoch] = Storage.join_dir(directory, name)
    committed = sorted(set(pts) & set(yamls))
    contents = storage.read_many(yamls[e] for e in committed)
    infos = []
    for epoch in committed:
        source = storage.display(yamls[epoch])
        data = contents[yamls[epoch]]
        try:
            if isinstance(data, Exception):
                raise ValueError(f"{source}: {data}")
            parsed = sidecar_schema.loads(data, source=source)
            if parsed["epoch"] != epoch:
                raise ValueError(f"{source}: sidecar says epoch {parsed['epoch']}, file name says {epoch}")
        except ValueError as exc:
            logger.warning("skipping checkpoint with an unreadable sidecar: %s", exc)
            continue
        pt = Storage.join_dir(directory, checkpoint_name(epoch, "pt"))
        infos.append(CheckpointInfo(epoch=epoch, path=storage.display(pt), size=pts[epoch], sidecar=parsed))
    return infos


def best(infos: Iterable[CheckpointInfo], metric: str = "score", *, mode: str = "max") -> CheckpointInfo | None:
    """The checkpoint with the best finite ``metric`` (ties go to the later epoch), or None."""
    sign = 1.0 if mode == "max" else -1.0
    scored = [(sign * v, info.epoch, info) for info in infos if (v := info.metric(metric)) is not None]
    return max(scored, key=lambda t: (t[0], t[1]))[2] if scored else None


def by_min_score(infos: Iterable[CheckpointInfo], min_score: float, metric: str = "score") -> list[CheckpointInfo]:
    """Checkpoints whose finite ``metric`` is >= ``min_score``, in epoch order."""
    return [info for info in infos if (v := info.metric(metric)) is not None and v >= min_score]


def find_latest_checkpoint(checkpoint_dir: str, *, storage_options: Mapping[str, Any] | None = None) -> str | None:
    """Path of the newest committed checkpoint in ``checkpoint_dir``, or None if it has none.

    Example:
        >>> find_latest_checkpoint("runs/exp1/checkpoints")  # doctest: +SKIP
        'runs/exp1/checkpoints/model_0042.pt'
    """
    storage = Storage(checkpoint_dir, storage_options)
    infos = list_checkpoints(storage, storage.root)
    return infos[-1].path if infos else None


def load_file(storage: Storage, path: str, *, map_location: Any = None) -> Any:
    """``torch.load(weights_only=False)`` of one fsspec path, with errors that name the file."""
    shown = storage.display(path)
    try:
        # read_with retries transient storage faults, re-reading from the start.
        return storage.read_with(path, lambda f: torch.load(f, map_location=map_location, weights_only=False))
    except FileNotFoundError as exc:
        raise CheckpointNotFoundError(f"{shown} does not exist", path=shown) from exc
    except OSError as exc:  # the storage's own message already names the operation and the file
        raise CheckpointReadError(str(exc), path=shown) from exc
    except Exception as exc:
        raise CheckpointReadError(
            f"{shown} is truncated, corrupt or not a torch.save file: {type(exc).__name__}: {exc}", path=shown
        ) from exc


def load_checkpoint(path: str, *, map_location: Any = None, storage_options: Mapping[str, Any] | None = None) -> Any:
    """Load one ``.pt`` (a local path or URL) with ``torch.load(..., weights_only=False)``.

    This unpickles, which can run arbitrary code: only load files from run directories you trust.

    Example:
        >>> agent = load_checkpoint("runs/exp1/checkpoints/model_0042.pt", map_location="cpu")  # doctest: +SKIP

    Raises:
        CheckpointNotFoundError: the file does not exist.
        CheckpointReadError: the file is truncated, corrupt or not a ``torch.save`` file.
    """
    storage = Storage(path, storage_options)
    return load_file(storage, storage.root, map_location=map_location)

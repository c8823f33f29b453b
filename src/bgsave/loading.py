"""Loading: ``torch.load`` of a checkpoint file, the one reader that unpickles.

``torch.load(..., weights_only=False)`` runs code from the file, as the seed design's plain
``torch.save(agent)`` files require: only load run directories you trust. Everything that only
lists or searches (:mod:`bgsave.catalog`, the ``bgsave`` command) never comes here.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from bgsave import layout
from bgsave.catalog import Catalog, CheckpointInfo
from bgsave.errors import CheckpointNotFoundError, CheckpointReadError
from bgsave.storage import Storage, open_storage

__all__ = ("RunStart", "load_checkpoint", "load_file", "load_trainer_state", "resume")

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RunStart:
    """What :meth:`CheckpointManager.start_run` found or created.

    Attributes:
        agent: The resumed agent, or the new one (already saved as epoch 0).
        epoch: The epoch the agent was saved at.
        agent_step: The agent step of that checkpoint.
        trainer_state: ``{"optimizer_state", "epoch", "agent_step"}`` when resuming and one exists
            *for the same epoch*; None otherwise (a trainer state of another epoch is not mixed in:
            a WARNING names both epochs).
        resumed: Whether an existing checkpoint was loaded.
        info: The resumed checkpoint's :class:`~bgsave.catalog.CheckpointInfo` (its sidecar: score,
            total_time, ...), None for a new run.
    """

    agent: Any
    epoch: int
    agent_step: int
    trainer_state: dict[str, Any] | None
    resumed: bool
    info: CheckpointInfo | None = None


def load_file(storage: Storage, path: str, *, map_location: Any = None) -> Any:
    """``torch.load(weights_only=False)`` of one fsspec path, with errors that name the file.

    Raises:
        CheckpointNotFoundError: the file does not exist.
        CheckpointReadError: it cannot be read, or is truncated, corrupt or not a ``torch.save`` file.
    """
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
    storage = open_storage(path, storage_options)
    return load_file(storage, storage.root, map_location=map_location)


def load_trainer_state(catalog: Catalog, latest: int | None, map_location: Any = None) -> dict[str, Any] | None:
    """The run's ``trainer_state.pt``, or None; a WARNING names both epochs when it is not ``latest``'s."""
    path = catalog.storage.join_dir(catalog.directory, layout.TRAINER_STATE)
    try:
        state: dict[str, Any] = load_file(catalog.storage, path, map_location=map_location)
    except CheckpointNotFoundError:
        return None
    if state.get("epoch") != latest:
        logger.warning(
            "trainer state %s is from epoch %s but the latest committed agent is epoch %s; "
            "check which one you resume from",
            catalog.storage.display(path),
            state.get("epoch"),
            latest,
        )
    return state


def resume(catalog: Catalog, latest: CheckpointInfo, map_location: Any = None) -> RunStart:
    """Load ``latest``'s agent and the trainer state, which is handed back only if it is of the same epoch."""
    agent = load_file(catalog.storage, catalog.path(latest.epoch), map_location=map_location)
    state = load_trainer_state(catalog, latest.epoch, map_location)
    return RunStart(
        agent=agent,
        epoch=latest.epoch,
        agent_step=int(latest.sidecar.get("agent_step") or 0),
        trainer_state=state if state is not None and state.get("epoch") == latest.epoch else None,
        resumed=True,
        info=latest,
    )

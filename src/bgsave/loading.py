"""Loading: ``torch.load`` of a checkpoint file, the one reader that unpickles.

``torch.load(..., weights_only=False)`` runs code from the file, as the seed design's plain
``torch.save(agent)`` files require: only load run directories you trust. Everything that only
lists or searches (:mod:`bgsave.catalog`, the ``bgsave`` command) never comes here.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from bgsave import layout, sharding, trainer_state
from bgsave.catalog import Catalog, CheckpointInfo
from bgsave.errors import CheckpointNotFoundError, CheckpointReadError
from bgsave.shards import load_shards
from bgsave.storage import Storage, open_storage

__all__ = (
    "RunStart",
    "load_agent",
    "load_checkpoint",
    "load_file",
    "load_start",
    "resume",
    "resume_point",
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RunStart:
    """What :meth:`CheckpointManager.start_run` found or created.

    Attributes:
        agent: The resumed agent, or the new one (already saved as epoch 0).
        epoch: The epoch the agent was saved at.
        agent_step: The agent step of that checkpoint.
        trainer_state: The trainer state saved with that epoch (``optimizer_state``, ``epoch``,
            ``agent_step``, ``run``, and ``extra`` / ``rng`` when saved: :mod:`bgsave.trainer_state`),
            or None when the epoch has none (a new run, or a run that never saved one).
        resumed: Whether an existing checkpoint was loaded.
        info: The resumed checkpoint's :class:`~bgsave.catalog.CheckpointInfo` (its sidecar: score,
            total_time, ...), None for a new run.
        shards: The DCP directory of a sharded (``sharding="dcp"``) checkpoint, else None: ``agent``
            is then a new ``make_agent()``, loaded by :meth:`restore` once sharded (``model=``).
        gathered: The epoch was saved from a sharded agent (``sharding="full"``) and resumed under
            torch.distributed: rank 0's ``agent`` is the loaded one, the other ranks' a new
            ``make_agent()``; :meth:`restore` (``model=``) sends rank 0's state to each rank's shards.
        full_model: Rank 0's full state dict of the loaded agent, for that (None elsewhere).
    """

    agent: Any
    epoch: int
    agent_step: int
    trainer_state: dict[str, Any] | None
    resumed: bool
    info: CheckpointInfo | None = None
    shards: str | None = None
    gathered: bool = False
    full_model: dict[str, Any] | None = field(default=None, repr=False, compare=False)

    @property
    def extra(self) -> dict[str, Any]:
        """The ``extra`` saved with the trainer state (state dicts and plain values), ``{}`` if none."""
        return dict((self.trainer_state or {}).get("extra") or {})

    def restore(
        self, optimizer: Any = None, *, extra: Mapping[str, Any] | None = None, rng: bool = True, model: Any = None
    ) -> None:
        """Put the saved trainer state back into the trainer's live objects; nothing to do without one.

        Loads ``optimizer``'s state, each ``extra`` object's (``load_state_dict``, by the key it was
        saved under), and the RNG states when they were saved and ``rng`` is true. ``model``: the
        sharded model, for an optimizer of FSDP shards (:mod:`bgsave.sharding`).

        Example:
            >>> start = mgr.start_run(Policy, rng=True)  # doctest: +SKIP
            >>> optimizer = torch.optim.Adam(start.agent.parameters())  # doctest: +SKIP
            >>> start.restore(optimizer, extra={"scheduler": scheduler})  # doctest: +SKIP

        Raises:
            InvalidArgumentError: an ``extra`` key that was not saved, or an object that cannot
                load one; nothing is restored then.
        """
        if self.shards is not None:  # every rank loads its own shards (bgsave.shards)
            load_shards(self.shards, model, optimizer)
        if self.gathered:  # rank 0's full state, broadcast into every rank's shards (bgsave.sharding)
            saved = (self.trainer_state or {}).get("optimizer_state")
            with_optimizer = optimizer is not None and bool((self.trainer_state or {}).get("optimizer_from_rank0"))
            sharding.broadcast_full(model, optimizer if with_optimizer else None, self.full_model, saved)
            optimizer = None
        if self.trainer_state is not None:
            trainer_state.restore(self.trainer_state, optimizer, extra, rng=rng, model=model)

    def from_rank0(self) -> RunStart:
        """Rank 0's resume of an epoch saved from a sharded agent: what :meth:`restore` will broadcast."""
        state = self.trainer_state
        if state is not None:
            state = {**state, "optimizer_from_rank0": state.get("optimizer_state") is not None}
        full = self.agent.state_dict() if hasattr(self.agent, "state_dict") else None
        return dataclasses.replace(self, trainer_state=state, gathered=True, full_model=full)

    def for_other_ranks(self) -> RunStart:
        """What rank 0 sends the others: without the full states a gathered resume broadcasts later."""
        if not self.gathered:
            return self
        state = None if self.trainer_state is None else {**self.trainer_state, "optimizer_state": None}
        return dataclasses.replace(self, agent=None, trainer_state=state, full_model=None)


def load_file(storage: Storage, path: str, *, map_location: Any = None) -> Any:
    """``torch.load(weights_only=False)`` of one fsspec path, with errors that name the file.

    Raises:
        CheckpointNotFoundError: the file does not exist.
        CheckpointReadError: it cannot be read, or is truncated, corrupt or not a ``torch.save`` file.
    """
    shown = storage.display(path)
    if path.rstrip("/").endswith("." + layout.DCP):
        raise CheckpointReadError(
            f"{shown} is a sharded (DCP) checkpoint, not a torch.save file: resume it with start_run and "
            "RunStart.restore(model=), or make a state-dict .pt of it with `bgsave consolidate RUN_DIR --epoch N`",
            path=shown,
        )
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


def load_agent(catalog: Catalog, epoch: int | None, run: str, map_location: Any = None) -> Any:
    """Epoch's committed agent, or the latest (None if there is none) when ``epoch`` is None.

    Raises:
        CheckpointNotFoundError: ``epoch`` has no committed checkpoint.
    """
    info = catalog.latest() if epoch is None else catalog.get(epoch)
    if info is None and epoch is not None:
        path = catalog.storage.display(catalog.path(epoch))
        message = f"run {run!r} has no committed checkpoint for epoch {epoch} ({path})"
        raise CheckpointNotFoundError(message, epoch=epoch, path=path)
    if info is not None and info.sharded:
        raise CheckpointReadError(
            f"{info.path} is a sharded (DCP) checkpoint: resume it with start_run and RunStart.restore(model=), "
            f"or make a state-dict .pt of it with `bgsave consolidate RUN_DIR --epoch {info.epoch}`",
            epoch=info.epoch,
            path=info.path,
        )
    return None if info is None else load_file(catalog.storage, catalog.path(info.epoch), map_location=map_location)


def _trainer_state_of(
    catalog: Catalog, info: CheckpointInfo, run: str, map_location: Any = None
) -> tuple[dict[str, Any] | None, str]:
    """``info``'s trainer state, or None and why it is not used (it has none, or it is not this run's epoch)."""
    if not info.has_trainer_state:
        return None, "it has no trainer state"
    path = catalog.path_of(layout.trainer_name(info.epoch))
    try:
        state = load_file(catalog.storage, path, map_location=map_location)
    except CheckpointNotFoundError:
        return None, "its trainer state is gone"
    if not isinstance(state, dict) or state.get("epoch") != info.epoch:
        got = state.get("epoch") if isinstance(state, dict) else type(state).__name__
        return None, f"{catalog.storage.display(path)} holds epoch {got!r}"
    if state.get("run", run) != run:
        return None, f"{catalog.storage.display(path)} is run {state['run']!r}'s"
    return state, ""


def _legacy_trainer_state(catalog: Catalog, epoch: int, map_location: Any = None) -> dict[str, Any] | None:
    """An older bgsave's ``trainer_state.pt``, if it is of ``epoch`` (a WARNING names both epochs if not)."""
    path = catalog.path_of(layout.TRAINER_STATE)
    try:
        state: dict[str, Any] = load_file(catalog.storage, path, map_location=map_location)
    except CheckpointNotFoundError:
        return None
    if state.get("epoch") != epoch:
        shown = catalog.storage.display(path)
        logger.warning("%s is from epoch %s, not epoch %s: not used", shown, state.get("epoch"), epoch)
        return None
    return state


def resume_point(
    catalog: Catalog, run: str, map_location: Any = None
) -> tuple[CheckpointInfo, dict[str, Any] | None] | None:
    """The checkpoint a resume continues from (:meth:`Catalog.resumable`) and its trainer state; None if none.

    A trainer state that is not the epoch's own (another run's, another epoch's) is passed over
    for the next older consistent pair; what is passed over, and why, is logged at INFO.
    """
    passed: dict[int, str] = {}
    while True:
        info, newer = catalog.resumable(passed)
        if info is None:
            return None
        state, why = _trainer_state_of(catalog, info, run, map_location)
        if state is not None or not info.has_trainer_state or info.epoch in passed:
            break  # (the last: no consistent pair left, the newest epoch resumes without a trainer state)
        passed[info.epoch] = why
    for epoch, why in (newer | passed).items():
        logger.info("%s: resuming epoch %d, passing over epoch %d: %s", run, info.epoch, epoch, why)
    if state is None and not newer:  # a run of an older bgsave: its one trainer_state.pt, if of this epoch
        state = _legacy_trainer_state(catalog, info.epoch, map_location)
    return info, state


def _run_start(catalog: Catalog, info: CheckpointInfo, state: dict[str, Any] | None, map_location: Any) -> RunStart:
    shards = catalog.path(info.epoch, layout.DCP) if info.sharded else None
    agent = None if shards else load_file(catalog.storage, catalog.path(info.epoch), map_location=map_location)
    step = int(info.sidecar.get("agent_step") or 0)
    return RunStart(agent, info.epoch, step, trainer_state=state, resumed=True, info=info, shards=shards)


def resume(catalog: Catalog, run: str, map_location: Any = None) -> RunStart | None:
    """Load the checkpoint and trainer state :func:`resume_point` picks; None if nothing is committed."""
    point = resume_point(catalog, run, map_location)
    return None if point is None else _run_start(catalog, *point, map_location)


def load_start(catalog: Catalog, epoch: int, run: str, map_location: Any, with_trainer: bool) -> RunStart:
    """Epoch's agent (and trainer state, ``with_trainer``) as a resume of it: another rank picked ``epoch``.

    Raises:
        CheckpointNotFoundError: this run directory has no committed ``epoch``, or not its trainer state.
    """
    info = catalog.get(epoch)
    shown = catalog.storage.display(catalog.path(epoch))
    if info is None:
        raise CheckpointNotFoundError(
            f"run {run!r} has no committed checkpoint for epoch {epoch} ({shown})", epoch=epoch, path=shown
        )
    state: dict[str, Any] | None = None
    if with_trainer:
        state, why = _trainer_state_of(catalog, info, run, map_location)
        state = state if state is not None else _legacy_trainer_state(catalog, epoch, map_location)
        if state is None:
            raise CheckpointNotFoundError(f"epoch {epoch} ({shown}) cannot resume here: {why}", epoch=epoch, path=shown)
    return _run_start(catalog, info, state, map_location)

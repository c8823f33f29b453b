"""Writer: what one save does, from the snapshot on the caller's thread to the steps after its commit.

The path of one ``save_agent(agent, epoch=10)``::

    caller's thread     prepare   snapshot the agent (bgsave.snapshot); the caller may mutate it now
    worker's thread     execute   torch.save into model_0010.pt (bgsave.serialize, bgsave.storage),
                                  then model_0010.yaml, the commit marker
                        release   the snapshot's buffers go back to the pool
    after-commit lane   after     W&B upload (every n-th), the mirror told (bgsave.mirror), then retention prunes

Each ``save_*`` becomes one :class:`~bgsave.jobs.Job` built here, whole; the worker
(:mod:`bgsave.worker`) runs it. A re-save of an epoch removes the old sidecar only once the new
``.pt`` is complete, right before it replaces the old one, so a failed re-save leaves the earlier
checkpoint. A failed save leaves nothing of itself: its partial ``.pt`` is removed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from typing import Any

from bgsave import layout, trainer_state
from bgsave import sidecar as sidecar_schema
from bgsave import wandb as bgsave_wandb
from bgsave.catalog import Catalog
from bgsave.errors import CheckpointNotFoundError, CheckpointWriteError, InvalidArgumentError
from bgsave.jobs import Job
from bgsave.mirror import Mirror
from bgsave.policies import EveryNth, RetentionPolicy
from bgsave.serialize import torch_writer
from bgsave.snapshot import NotPicklableError, Snapshot, SnapshotPool
from bgsave.trainer_state import TrainerState

Payload = tuple[Snapshot, Snapshot | None]
"""What one job's prepare took: the agent's (or a lone trainer state's) snapshot, and a trainer state's."""

__all__ = ("Payload", "Writer")

logger = logging.getLogger(__name__)


class Writer:
    """Builds the jobs of one run directory's saves.

    Args:
        catalog: The run's checkpoint directory (and its storage); told what is written.
        run_name: For log lines.
        crc32: Whether ``.pt`` files carry torch's per-record CRC32s.
        retention: What to keep after each commit.
        wandb_run: A W&B run to log committed checkpoints to, or None.
        upload: Which committed checkpoints go to W&B.
        in_flight: Epochs still queued or being written (retention never prunes them).
        mirror: The mirror, told of each commit (:mod:`bgsave.mirror`), or None.
    """

    def __init__(
        self,
        catalog: Catalog,
        run_name: str,
        *,
        crc32: bool,
        retention: RetentionPolicy,
        wandb_run: Any,
        upload: EveryNth,
        in_flight: Callable[[], frozenset[int]],
        mirror: Mirror | None = None,
    ) -> None:
        self._catalog = catalog
        self._storage = catalog.storage
        self._run_name = run_name
        self._crc32 = crc32
        self._retention = retention
        self._wandb_run = wandb_run
        self._upload = upload
        self._in_flight = in_flight
        self._mirror = mirror
        self._committed = 0  # checkpoints committed by this writer; touched only by the after-lane
        # The epochs of the last agent and the last lone trainer state submitted (the caller's thread):
        # how a trainer state saved by its own call is paired with its agent's.
        self._agent_epoch: int | None = None
        self._trainer_epoch: int | None = None
        # What may exist to uncommit (bgsave.lock.HolderKnows): every job that writes a file tells it first.
        self._known = catalog.holder_knows
        self.pool = SnapshotPool()

    def display(self, epoch: int, suffix: str = layout.PT) -> str:
        """What users see for epoch's ``.pt`` (or ``.yaml``)."""
        return self._storage.display(self._catalog.path(epoch, suffix))

    # ---- the jobs -------------------------------------------------------------------------------
    def agent_job(
        self, agent: Any, epoch: int, sidecar: Mapping[str, Any], trainer: TrainerState | None = None
    ) -> Job[Payload]:
        """``model_{epoch}.pt`` from a snapshot of ``agent``, then ``trainer_{epoch}.pt`` if given, then the sidecar.

        The sidecar, written last, commits both files at once. After it: upload and prune.
        """
        data = sidecar_schema.dumps(sidecar)  # serialized now: a YAML failure is the caller's error
        shown = self.display(epoch)
        # A trainer state saved just before for this epoch pairs with this agent; any other one on
        # disk for this epoch is from an earlier save of it, and goes as the new .pt commits.
        keep_trainer = trainer is not None or self._trainer_epoch == epoch

        def prepare() -> Payload:
            agent_copy = self._snapshot("agent", epoch, shown, lambda: agent)
            try:
                payload = agent_copy, None if trainer is None else self._trainer_snapshot(trainer, shown)
            except BaseException:
                self.pool.release(agent_copy)
                raise
            self._agent_epoch, self._trainer_epoch = epoch, None  # only a save that is queued pairs
            return payload

        return Job(
            kind="agent",
            epoch=epoch,
            path=shown,
            prepare=prepare,
            execute=lambda payload: self._write_epoch(epoch, sidecar, data, payload, keep_trainer),
            release=self._release,
            after=lambda: self._after_commit(epoch, shown, sidecar),
        )

    def trainer_state_job(self, trainer: TrainerState) -> Job[Payload]:
        """``trainer_{epoch}.pt`` alone, for an epoch whose agent is saved before or after it."""
        epoch = trainer.epoch
        path = self._catalog.path_of(layout.trainer_name(epoch))
        shown = self._storage.display(path)

        def prepare() -> Payload:
            payload = self._trainer_snapshot(trainer, shown), None
            if self._agent_epoch != epoch:
                self._trainer_epoch = epoch  # the agent comes next: it keeps this file
            return payload

        def execute(payload: Payload) -> int:
            self._known.writing(epoch)
            return self._write_torch(path, payload[0])

        return Job(
            kind="trainer_state",
            epoch=epoch,
            path=shown,
            prepare=prepare,
            execute=execute,
            release=self._release,
            after=lambda: self._changed(epoch, layout.trainer_name(epoch)),
        )

    def shards_job(
        self, epoch: int, sidecar: Mapping[str, Any], saved: Future[Any], trainer: TrainerState | None
    ) -> Job[Payload | None]:
        """Rank 0, ``sharding="dcp"``: once every rank's shards are in (``saved``), the trainer state, then the sidecar.

        The caller uncommitted any earlier save of this epoch before the shards were started
        (:meth:`uncommit`); :mod:`bgsave.shards` tells the whole path.
        """
        data = sidecar_schema.dumps(sidecar)
        shown = self._storage.display(self._catalog.path(epoch, layout.DCP))
        trainer_path = self._catalog.path_of(layout.trainer_name(epoch))

        def prepare() -> Payload | None:
            self._agent_epoch, self._trainer_epoch = epoch, None
            return None if trainer is None else (self._trainer_snapshot(trainer, shown), None)

        def execute(payload: Payload | None) -> int:
            saved.result()  # every rank's shards and .metadata are written (DCP's last all_reduce)
            self._known.writing(epoch)
            size = 0
            if payload is not None:
                size += self._write_torch(trainer_path, payload[0])
            size += self._storage.write_bytes_atomic(self._catalog.path(epoch, layout.YAML), data)
            self._catalog.wrote(epoch, sidecar, len(data))
            logger.info("%s: committed epoch %d, sharded (DCP) agent (%s)", self._run_name, epoch, shown)
            return size

        return Job(
            kind="agent",
            epoch=epoch,
            path=shown,
            prepare=prepare,
            execute=execute,
            release=lambda payload: None if payload is None else self._release(payload),
            after=lambda: self._after_commit(epoch, shown, sidecar, upload=False),
        )

    def uncommit(self, epoch: int) -> None:
        """Rank 0, before a DCP save of ``epoch`` overwrites shards in place: remove its old commit."""
        self._catalog.forget(epoch)
        for name in (layout.checkpoint_name(epoch, layout.YAML), layout.checkpoint_name(epoch, layout.PT)):
            self._storage.delete(self._catalog.path_of(name))
        self._storage.delete(self._catalog.path_of(layout.trainer_name(epoch)))

    def metadata_job(self, epoch: int, values: Mapping[str, Any]) -> Job[None]:
        """Epoch's sidecar rewritten with ``values`` merged in (after any pending save of that epoch)."""
        shown = self.display(epoch, layout.YAML)

        def execute(_: None) -> int:
            info = self._catalog.get(epoch)
            if info is None:
                raise CheckpointNotFoundError(f"no committed checkpoint for epoch {epoch}", epoch=epoch, path=shown)
            sidecar = {**info.sidecar, **values}
            data = sidecar_schema.dumps(sidecar)
            self._known.writing(epoch)
            size = self._storage.write_bytes_atomic(self._catalog.path(epoch, layout.YAML), data)
            self._catalog.wrote(epoch, sidecar, len(data))
            return size

        return Job(
            kind="metadata",
            epoch=epoch,
            path=shown,
            prepare=lambda: None,
            execute=execute,
            after=lambda: self._changed(epoch, layout.checkpoint_name(epoch, layout.YAML)),
            needs_slot=False,
        )

    # ---- the steps ------------------------------------------------------------------------------
    def _snapshot(self, kind: str, epoch: int, shown: str, value: Callable[[], object]) -> Snapshot:
        try:
            return self.pool.take(kind, value())
        except InvalidArgumentError:
            raise  # something that must not be copied (an OS handle): the message names where it is
        except NotPicklableError as exc:  # torch.save would fail in the writer, a save later: fail now
            raise CheckpointWriteError(
                f"the {kind} of epoch {epoch} cannot be pickled, so torch.save cannot write {shown}: {exc}",
                epoch=epoch,
                path=shown,
            ) from exc.__cause__
        except Exception as exc:  # a state_dict() or __deepcopy__ that raised: nothing was queued
            raise CheckpointWriteError(
                f"could not copy the {kind} of epoch {epoch} for {shown}: {type(exc).__name__}: {exc}",
                epoch=epoch,
                path=shown,
            ) from exc

    def _trainer_snapshot(self, trainer: TrainerState, shown: str) -> Snapshot:
        try:
            return self._snapshot("trainer_state", trainer.epoch, shown, trainer.build)
        except CheckpointWriteError as exc:
            key = trainer_state.unpicklable_key(trainer.extra)
            if key is None:
                raise
            raise InvalidArgumentError(
                f"extra[{key!r}] has no state_dict() and cannot be pickled, so it cannot be saved "
                f"(epoch {trainer.epoch}): {exc.__cause__}"
            ) from exc.__cause__

    def _release(self, payload: Payload) -> None:
        for snapshot in payload:
            if snapshot is not None:
                self.pool.release(snapshot)

    def _write_epoch(
        self, epoch: int, sidecar: Mapping[str, Any], data: bytes, payload: Payload, keep_trainer: bool
    ) -> int:
        agent, trainer = payload
        pt = self._catalog.path(epoch)
        trainer_path = self._catalog.path_of(layout.trainer_name(epoch))
        yml = self._catalog.path(epoch, layout.YAML)

        stale = self._known.may_have_files(epoch)  # else there is nothing to uncommit: no request
        self._known.writing(epoch)

        def uncommit_old() -> None:
            self._catalog.forget(epoch)
            if stale:
                self._storage.delete(yml)
                if not keep_trainer:
                    self._storage.delete(trainer_path)

        size = self._write_torch(pt, agent, before_commit=uncommit_old)
        written = [pt]
        try:
            if trainer is not None:
                size += self._write_torch(trainer_path, trainer)
                written.append(trainer_path)
            size += self._storage.write_bytes_atomic(yml, data)
        except BaseException:
            # A failed save leaves nothing of itself; the cleanup's own failure must not hide the cause.
            for path in written:
                try:
                    self._storage.delete(path)
                except Exception as cleanup:
                    logger.warning("%s: could not remove %s after a failed save: %s", self._run_name, path, cleanup)
            raise
        self._catalog.wrote(epoch, sidecar, len(data))
        what = "agent and trainer state" if trainer is not None else "agent"
        shown = self.display(epoch)
        logger.info("%s: committed epoch %d, %s (%s, %.1f MB)", self._run_name, epoch, what, shown, size / 1e6)
        return size

    def _write_torch(self, path: str, snapshot: Snapshot, before_commit: Callable[[], None] | None = None) -> int:
        snapshot.wait_ready()
        self._storage.makedirs(self._catalog.directory)
        self._warn_if_low_space(snapshot)
        # A large checkpoint on local disk goes past the page cache: tensors laid out on disk blocks,
        # written straight from the snapshot's buffers (bgsave.storage.diskfile).
        alignment = self._storage.alignment_for(snapshot.nbytes)
        writer = torch_writer(snapshot.value, crc32=self._crc32, alignment=alignment)
        return self._storage.write_atomic(path, writer, before_commit=before_commit, direct=alignment is not None)

    def _warn_if_low_space(self, snapshot: Snapshot) -> None:
        # A full disk still fails the write cleanly, but the warning comes first.
        free = self._storage.free_bytes(self._catalog.directory)
        if free is not None and free < snapshot.nbytes:
            logger.warning(
                "%s: the %s needs about %.1f MB but only %.1f MB is free in %s",
                self._run_name,
                snapshot.kind,
                snapshot.nbytes / 1e6,
                free / 1e6,
                self._storage.display(self._catalog.directory),
            )

    def _changed(self, epoch: int, name: str) -> None:
        """After a lone trainer state or a sidecar edit (file ``name``): the mirror re-syncs it if it has the epoch."""
        if self._mirror is not None:
            self._mirror.changed(epoch, name)

    def _after_commit(self, epoch: int, shown: str, sidecar: Mapping[str, Any], *, upload: bool = True) -> None:
        """In the worker's second lane once epoch committed: the W&B upload (of a ``.pt``), then retention."""
        index, self._committed = self._committed, self._committed + 1
        prunes = not self._retention.keeps_everything
        if not upload and self._wandb_run is not None and self._upload.due(index):
            logger.warning(
                "%s: epoch %d is DCP shards, not logged to W&B (bgsave consolidate makes a .pt)", shown, epoch
            )
        elif self._wandb_run is not None and self._upload.due(index):
            # W&B reads a local file in place, later. With retention on, the file may go before that:
            # online, wait for the upload to finish; offline (read at `wandb sync`), let W&B copy it.
            offline = bool(getattr(self._wandb_run, "offline", False))
            bgsave_wandb.upload_to_wandb(
                self._wandb_run,
                shown,
                epoch,
                metadata=sidecar,
                run_name=self._run_name,
                wait=prunes and not offline,
                copy=prunes and offline,
            )
        if self._mirror is not None:
            self._mirror.committed(epoch)
        if prunes:  # never what the mirror still has to upload (bgsave.mirror)
            protect = {epoch, *self._in_flight(), *(self._mirror.unmirrored() if self._mirror else ())}
            doomed = self._retention.to_delete(self._catalog.committed(), protect=protect)
            if doomed:
                self._catalog.remove(doomed)
                logger.info(
                    "%s: pruned %d checkpoint(s): epochs %s",
                    self._run_name,
                    len(doomed),
                    ", ".join(str(info.epoch) for info in doomed),
                )

"""Writer: what one save does, from the snapshot on the caller's thread to the steps after its commit.

The path of one ``save_agent(agent, epoch=10)``::

    caller's thread     prepare   snapshot the agent (bgsave.snapshot); the caller may mutate it now
    worker's thread     execute   torch.save into model_0010.pt (bgsave.serialize, bgsave.storage),
                                  then model_0010.yaml, the commit marker
                        release   the snapshot's buffers go back to the pool
    after-commit lane   after     W&B upload (every n-th), then retention prunes

Each ``save_*`` becomes one :class:`~bgsave.jobs.Job` built here, whole; the worker
(:mod:`bgsave.worker`) runs it. A re-save of an epoch removes the old sidecar only once the new
``.pt`` is complete, right before it replaces the old one, so a failed re-save leaves the earlier
checkpoint. A failed save leaves nothing of itself: its partial ``.pt`` is removed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

from bgsave import layout
from bgsave import sidecar as sidecar_schema
from bgsave import wandb as bgsave_wandb
from bgsave.catalog import Catalog
from bgsave.errors import CheckpointNotFoundError, CheckpointWriteError, InvalidArgumentError
from bgsave.jobs import Job
from bgsave.policies import EveryNth, RetentionPolicy
from bgsave.serialize import torch_writer
from bgsave.snapshot import Snapshot, SnapshotPool

__all__ = ("Stateful", "Writer", "check_optimizer")

logger = logging.getLogger(__name__)


@runtime_checkable
class Stateful(Protocol):
    """Anything with ``state_dict()``, such as a ``torch.optim.Optimizer``."""

    def state_dict(self) -> dict[str, Any]:
        """The object's state as a dict of tensors and plain values."""
        ...


def check_optimizer(optimizer: object) -> None:
    """Raise InvalidArgumentError unless ``optimizer`` has a ``state_dict()`` method."""
    if not callable(getattr(optimizer, "state_dict", None)):
        raise InvalidArgumentError(
            f"optimizer must have a state_dict() method (a torch.optim.Optimizer), got {type(optimizer).__name__}"
        )


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
    ) -> None:
        self._catalog = catalog
        self._storage = catalog.storage
        self._run_name = run_name
        self._crc32 = crc32
        self._retention = retention
        self._wandb_run = wandb_run
        self._upload = upload
        self._in_flight = in_flight
        self._committed = 0  # checkpoints committed by this writer; touched only by the after-lane
        self.pool = SnapshotPool()

    def display(self, epoch: int, suffix: str = layout.PT) -> str:
        """What users see for epoch's ``.pt`` (or ``.yaml``)."""
        return self._storage.display(self._catalog.path(epoch, suffix))

    # ---- the jobs -------------------------------------------------------------------------------
    def agent_job(self, agent: Any, epoch: int, sidecar: Mapping[str, Any]) -> Job[Snapshot]:
        """``model_{epoch}.pt`` from a snapshot of ``agent``, then its sidecar; after it, upload and prune."""
        data = sidecar_schema.dumps(sidecar)  # serialized now: a YAML failure is the caller's error
        shown = self.display(epoch)
        return Job(
            kind="agent",
            epoch=epoch,
            path=shown,
            prepare=lambda: self._snapshot("agent", epoch, shown, lambda: agent),
            execute=lambda snapshot: self._write_agent(epoch, sidecar, data, snapshot),
            release=self.pool.release,
            after=lambda: self._after_commit(epoch, shown, sidecar),
        )

    def trainer_state_job(self, optimizer: Stateful, epoch: int, agent_step: int) -> Job[Snapshot]:
        """``trainer_state.pt`` from a snapshot of the optimizer's state, replaced atomically."""

        def state() -> dict[str, Any]:
            return {"optimizer_state": optimizer.state_dict(), "epoch": epoch, "agent_step": agent_step}

        path = self._storage.join_dir(self._catalog.directory, layout.TRAINER_STATE)
        shown = self._storage.display(path)
        return Job(
            kind="trainer_state",
            epoch=epoch,
            path=shown,
            prepare=lambda: self._snapshot("trainer_state", epoch, shown, state),
            execute=lambda snapshot: self._write_torch(path, snapshot),
            release=self.pool.release,
        )

    def metadata_job(self, epoch: int, values: Mapping[str, Any]) -> Job[None]:
        """Epoch's sidecar rewritten with ``values`` merged in (after any pending save of that epoch)."""
        shown = self.display(epoch, layout.YAML)

        def execute(_: None) -> int:
            info = self._catalog.get(epoch)
            if info is None:
                raise CheckpointNotFoundError(f"no committed checkpoint for epoch {epoch}", epoch=epoch, path=shown)
            sidecar = {**info.sidecar, **values}
            data = sidecar_schema.dumps(sidecar)
            size = self._storage.write_bytes_atomic(self._catalog.path(epoch, layout.YAML), data)
            self._catalog.wrote(epoch, sidecar, len(data))
            return size

        return Job(kind="metadata", epoch=epoch, path=shown, prepare=lambda: None, execute=execute, needs_slot=False)

    # ---- the steps ------------------------------------------------------------------------------
    def _snapshot(self, kind: str, epoch: int, shown: str, value: Callable[[], object]) -> Snapshot:
        try:
            return self.pool.take(kind, value())
        except InvalidArgumentError:
            raise  # something that must not be copied (an OS handle): the message names where it is
        except Exception as exc:  # neither picklable nor deep-copyable: nothing was queued
            raise CheckpointWriteError(
                f"could not copy the {kind} of epoch {epoch} for {shown}: {type(exc).__name__}: {exc}",
                epoch=epoch,
                path=shown,
            ) from exc

    def _write_agent(self, epoch: int, sidecar: Mapping[str, Any], data: bytes, snapshot: Snapshot) -> int:
        pt = self._catalog.path(epoch)
        yml = self._catalog.path(epoch, layout.YAML)

        def uncommit_old() -> None:
            self._catalog.forget(epoch)
            self._storage.delete(yml)

        size = self._write_torch(pt, snapshot, before_commit=uncommit_old)
        try:
            size += self._storage.write_bytes_atomic(yml, data)
        except BaseException:
            # A failed save leaves nothing of itself; the cleanup's own failure must not hide the cause.
            try:
                self._storage.delete(pt)
            except Exception as cleanup:
                logger.warning("%s: could not remove %s after a failed save: %s", self._run_name, pt, cleanup)
            raise
        self._catalog.wrote(epoch, sidecar, len(data))
        logger.info("%s: committed epoch %d (%s, %.1f MB)", self._run_name, epoch, self.display(epoch), size / 1e6)
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

    def _after_commit(self, epoch: int, shown: str, sidecar: Mapping[str, Any]) -> None:
        """In the worker's second lane once epoch committed: the W&B upload, then retention."""
        index, self._committed = self._committed, self._committed + 1
        prunes = not self._retention.keeps_everything
        if self._wandb_run is not None and self._upload.due(index):
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
        if prunes:
            protect = {epoch, *self._in_flight()}
            doomed = self._retention.to_delete(self._catalog.committed(), protect=protect)
            if doomed:
                self._catalog.remove(doomed)
                logger.info(
                    "%s: pruned %d checkpoint(s): epochs %s",
                    self._run_name,
                    len(doomed),
                    ", ".join(str(info.epoch) for info in doomed),
                )

"""Saving: where one ``save_*`` call goes — on which rank, in which form — before the worker writes it.

::

    every rank       the arguments, checked (done by the manager before it comes here)
                     unwrap DDP / torch.compile (bgsave.sharding.unwrap): the plain module is saved
                     a sharded (FSDP) agent: sharding="full" gathers it (bgsave.sharding), every rank
                     in the gather; sharding="dcp" starts every rank's DCP save (bgsave.shards)
    rank 0 only      the job (bgsave.writer), into the worker (bgsave.worker), once the lock is held
                     (the first lock taken while the snapshot is: bgsave.lifecycle)
    other ranks      nothing more: no I/O, no lock, no snapshot, no wait

One process is rank 0 of 1 (:mod:`bgsave.distributed`), so this is also the whole path of a save
without torch.distributed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from bgsave import layout
from bgsave import sidecar as sidecar_schema
from bgsave.catalog import Catalog
from bgsave.distributed import Ranks
from bgsave.errors import InvalidArgumentError
from bgsave.lifecycle import Lifecycle
from bgsave.sharding import Gather, is_sharded, optimizer_sharded, unwrap
from bgsave.shards import ShardedSaves
from bgsave.trainer_state import TrainerState
from bgsave.worker import Worker
from bgsave.writer import Writer

__all__ = ("Saving",)


class Saving:
    """The save path of one manager on one rank (see the module docstring)."""

    def __init__(
        self,
        *,
        ranks: Ranks,
        writer: Writer,
        worker: Worker,
        life: Lifecycle,
        catalog: Catalog,
        run_name: str,
        sharding: str,
        timeout_s: float,
    ) -> None:
        self._ranks = ranks
        self._writer = writer
        self._worker = worker
        self._life = life
        self._catalog = catalog
        self._run_name = run_name
        self._sharding = sharding
        self.gather = Gather(is_writer=ranks.is_writer)
        self.shards = ShardedSaves(ranks.rank, timeout_s)

    def sidecar(self, epoch: int, metadata: Mapping[str, Any] | None) -> dict[str, Any]:
        """The checked sidecar of one save (with ``world_size`` under torch.distributed)."""
        sidecar = sidecar_schema.build(self._run_name, epoch, metadata)
        if self._ranks.distributed:
            sidecar["world_size"] = self._ranks.world_size
        return sidecar

    def save(
        self,
        agent: Any,
        epoch: int,
        sidecar: dict[str, Any],
        trainer: TrainerState | None,
        requested: bool | None = None,
    ) -> str:
        """Every rank: the plain module saved (a sharded one gathered, or written as DCP shards)."""
        model = unwrap(agent)
        sharded = is_sharded(model)
        if sharded and self._sharding == "dcp":
            return self._save_shards(model, epoch, sidecar, trainer, requested)
        if not self._ranks.is_writer and not sharded:  # no gather to join: the path is all there is to it
            self._life.saved(self._life.preemption_requested if requested is None else requested)
            return self._writer.display(epoch)
        if sharded:  # a resume under torch.distributed broadcasts its state into the shards
            sidecar = {**sidecar, "sharded": True}
        whole, trainer = self.gather.whole(model, epoch), self.gather.trainer(trainer, model)
        job = self._writer.agent_job(whole, epoch, sidecar, trainer)
        self.submit(job, requested)
        return job.path

    def save_trainer_state(self, trainer: TrainerState) -> None:
        """Every rank: a trainer state alone (an optimizer of FSDP shards gathered first)."""
        if self._sharding == "dcp" and optimizer_sharded(trainer.optimizer):
            raise InvalidArgumentError(
                f"epoch {trainer.epoch}: with sharding='dcp' an optimizer of FSDP shards is saved in its "
                "model's DCP directory: pass it to save_at_interval(model, epoch, interval=..., optimizer=...)"
            )
        gathered = self.gather.trainer(trainer, None)
        assert gathered is not None
        self.submit(self._writer.trainer_state_job(gathered))

    def _save_shards(
        self, model: Any, epoch: int, sidecar: dict[str, Any], trainer: TrainerState | None, requested: bool | None
    ) -> str:
        path = self._catalog.path(epoch, layout.DCP)
        shown = self._catalog.storage.display(path)
        if self._ranks.is_writer:  # before any rank writes a shard (DCP plans with rank 0 first)
            self._worker.raise_errors()
            self._life.claim()
            self._worker.flush()
            self._worker.raise_errors()
            self._writer.uncommit(epoch)
        optimizer = None if trainer is None else trainer.optimizer
        saved = self.shards.start(model, optimizer, epoch, path, shown)
        rest = None if trainer is None else dataclasses.replace(trainer, optimizer=None)  # its state is in the shards
        self.submit(self._writer.shards_job(epoch, sidecar, saved, rest), requested)
        return shown

    def preemption_requested(self) -> bool:
        """Whether a SIGTERM asks for a save now (under torch.distributed: on any rank).

        Every rank must take the same branch: leave the loop at the same epoch, join the same gathers.
        """
        requested = self._life.preemption_requested
        if self._life.handles_sigterm and self._ranks.distributed:
            requested = self._ranks.any("save_at_interval", requested)
        return requested

    def submit(self, job: Any, requested: bool | None = None) -> None:
        """Rank 0: the job into the worker, after earlier failures are raised and the lock is ours.

        ``requested``: whether a SIGTERM came before it (:meth:`preemption_requested`; None: read now).
        """
        if requested is None:  # read before the snapshot: the save is the boundary's
            requested = self._life.preemption_requested
        if not self._ranks.is_writer:  # checked like rank 0's; rank 0 writes it
            if job.needs_slot:
                self._life.saved(requested)  # this rank's SIGTERM reached its loop's boundary too
            return
        self._life.run_final_save()
        self._worker.raise_errors()
        self._worker.submit(self._life.claiming(job))
        if job.needs_slot:  # a save, not a sidecar edit
            self._life.saved(requested)

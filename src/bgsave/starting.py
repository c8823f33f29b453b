"""Starting: ``start_run``, a manager's first step: resume the run from the newer tier, or start it at epoch 0.

::

    rank 0 (or the one process)   the writer lock (and the mirror's), the tier to resume
                                  (bgsave.tiers), its newest epoch with that epoch's trainer state
                                  loaded (bgsave.loading); none: make_agent() saved as epoch 0
    every rank                    the same agent and trainer state (resume="broadcast" or "each_rank",
                                  bgsave.distributed); a sharded agent gets a new make_agent(), which
                                  RunStart.restore(model=) fills
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

from bgsave import loading
from bgsave.catalog import Catalog
from bgsave.distributed import Ranks
from bgsave.errors import InvalidArgumentError, check_bool
from bgsave.lifecycle import Lifecycle
from bgsave.loading import RunStart
from bgsave.saving import Saving
from bgsave.sharding import unwrap
from bgsave.tiers import Tiers
from bgsave.trainer_state import TrainerState
from bgsave.worker import Worker
from bgsave.writer import Writer

__all__ = ("Starting",)

AgentT = TypeVar("AgentT")


class Starting:
    """The start of :class:`~bgsave.CheckpointManager`'s run (``_tiers``, ``_check_open``: the manager's)."""

    _run_name: str
    _resume: str
    _ranks: Ranks
    _saving: Saving
    _writer: Writer
    _worker: Worker
    _life: Lifecycle

    def _tiers(self) -> Tiers:
        raise NotImplementedError

    def _check_open(self) -> None:
        raise NotImplementedError

    def start_run(self, make_agent: Callable[[], AgentT], *, map_location: Any = None, rng: bool = False) -> RunStart:
        """Resume the run where it stopped, or start it with a new agent saved as epoch 0.

        Takes the writer lock first: a duplicate launch gets RunLockedError before it trains. Resumes
        the newest epoch committed with its trainer state (the newest, in a run that saves none);
        what it passes over is logged at INFO. ``rng=True``: a new run's epoch 0 records the RNG
        states right after ``make_agent()``, so a resume from epoch 0 continues the same streams.
        Under torch.distributed it is collective: rank 0 decides, and every rank gets the same
        agent and trainer state (``resume=``; a new run's agent is rank 0's ``make_agent()``).

        Example:
            >>> start = mgr.start_run(Policy, rng=True)  # doctest: +SKIP
            >>> optimizer = torch.optim.Adam(start.agent.parameters())  # doctest: +SKIP
            >>> start.restore(optimizer)  # optimizer state and RNG; nothing for a new run  # doctest: +SKIP
        """
        if not callable(make_agent):
            raise InvalidArgumentError(
                f"make_agent must be a callable returning a new agent, got {type(make_agent).__name__}"
            )
        check_bool("rng", rng)
        self._check_open()
        run = self._run_name
        self._saving.gather.use_factory(make_agent)  # a sharded agent's saves are poured into a new one

        def decide() -> tuple[int, bool] | None:  # resume="each_rank": rank 0 picks, every rank loads
            point = loading.resume_point(self._claimed(), run, map_location)
            return None if point is None else (point[0].epoch, point[1] is not None)

        with self._tiers().one_listing():  # the claim, the tier to resume and its checkpoint: one listing of each
            start = self._ranks.start(
                self._resume,
                start=lambda: self._start(make_agent, map_location, rng),
                decide=decide,
                load=lambda epoch, with_trainer: loading.load_start(
                    self._tiers().holder(epoch), epoch, run, map_location, with_trainer
                ),
                map_location=map_location,
            )
        if start.shards is not None or (start.gathered and not self._ranks.is_writer):
            # Restored once sharded (RunStart.restore(model=)): from DCP shards, or from rank 0's state.
            start = dataclasses.replace(start, agent=make_agent())
        return start

    def _claimed(self) -> Catalog:
        """Rank 0 at a start: the writer lock, then the tier to resume; a failed earlier save is raised (everywhere)."""
        self._life.claim()
        catalog = self._tiers().resume_catalog()
        self._worker.raise_errors()
        return catalog

    def _start(self, make_agent: Callable[[], Any], map_location: Any, rng: bool) -> RunStart:
        """Rank 0's (or the one process's) start: the lock, then a resume or a new epoch 0."""
        started = loading.resume(self._claimed(), self._run_name, map_location)
        if started is not None and self._ranks.distributed and started.info and started.info.sidecar.get("sharded"):
            return started.from_rank0()  # the others shard a new agent; restore sends them rank 0's state
        if started is not None:
            return started
        agent = make_agent()
        trainer = TrainerState(None, 0, 0, self._run_name, rng=True) if rng else None
        self._saving.submit(self._writer.agent_job(unwrap(agent), 0, self._saving.sidecar(0, None), trainer))
        return RunStart(agent=agent, epoch=0, agent_step=0, trainer_state=None, resumed=False)

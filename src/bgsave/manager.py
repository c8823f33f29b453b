"""CheckpointManager: the seed design's methods, their argument checks, and the manager's lifecycle.

Every ``save_*`` checks its arguments and hands a job built by :mod:`bgsave.writer` to the worker
(:mod:`bgsave.worker`), on rank 0 only under torch.distributed (:mod:`bgsave.distributed`); with a
mirror, each commit is then uploaded (:mod:`bgsave.mirror`). ``start_run`` is :mod:`bgsave.starting`'s,
the find/load calls :mod:`bgsave.finding`'s; the lock, exit hook and SIGTERM :mod:`bgsave.lifecycle`'s.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any

from bgsave import distributed as bgsave_distributed
from bgsave import layout
from bgsave import sidecar as sidecar_schema
from bgsave import wandb as bgsave_wandb
from bgsave.catalog import Catalog
from bgsave.distributed import Ranks
from bgsave.errors import BgsaveError, InvalidArgumentError, ManagerClosedError, check_bool, check_choice, check_int
from bgsave.finding import Finding
from bgsave.lifecycle import Lifecycle
from bgsave.lock import WriterLock
from bgsave.mirror import open_mirror
from bgsave.policies import EveryNth, RetentionPolicy
from bgsave.preemption import Preemption
from bgsave.saving import Saving
from bgsave.shards import SHARDING_MODES
from bgsave.starting import Starting
from bgsave.storage import RetryPolicy, open_storage
from bgsave.storage.local import LocalStorage
from bgsave.trainer_state import Stateful, TrainerState
from bgsave.worker import Worker
from bgsave.writer import Writer

__all__ = ("CheckpointManager", "Stateful")

logger = logging.getLogger(__name__)


class CheckpointManager(Finding, Starting):
    """Saves and finds a run's checkpoints, writing in the background.

    Args:
        run_dir: The run directory: a local path or an fsspec URL (``s3://bucket/runs/x``).
        run_name: The run's name, recorded in every sidecar. No path separators or ``..``.
        background: Write on a background worker (default). False writes in the calling thread
            with the same files and errors (for debugging, and the baseline in benchmarks).
        max_pending: How many saves may wait behind the one being written before ``save_*`` blocks.
            Memory for snapshots stays within ``max_pending + 1`` copies of the model.
        storage_options: Passed to fsspec (endpoint, credentials, ...).
        wandb_run: A W&B run: each committed checkpoint is logged to it as a ``model`` artifact,
            after the commit (:mod:`bgsave.wandb`). Close the manager before finishing the run.
        wandb_every_n: Upload only every N-th committed checkpoint (the first always goes).
        keep_last: Retention: keep the N newest committed checkpoints (None: all), pruning after
            each commit; never the newest, nor the one a resume would pick.
        keep_best: Retention: also keep the K best by ``metric`` (needs ``keep_last``).
        metric: The sidecar key ``keep_best`` ranks by, and ``find_best_checkpoint``'s default.
        mode: "max" or "min": whether a higher or lower ``metric`` is better.
        retry: How transient storage faults are retried (:class:`~bgsave.RetryPolicy`; default 3
            attempts with backoff and jitter).
        crc32: Whether the ``.pt`` files carry torch's per-record CRC32s (off: ``torch.load`` never
            checks them; on for zip tools; :mod:`bgsave.serialize`).
        distributed: "auto": under an initialized torch.distributed process group, every rank makes
            the same calls and rank 0 writes (:mod:`bgsave.distributed`); "off": this process alone.
        resume: How ``start_run`` reaches every rank: "broadcast" (rank 0 loads and sends) or
            "each_rank" (every rank loads the epoch rank 0 picked from its own run directory).
        sharding: How a sharded (FSDP) agent is saved: "full" (gathered to rank 0 into a whole agent
            built by ``start_run``'s ``make_agent``: :mod:`bgsave.sharding`) or "dcp" (each rank's
            shards with DCP, for agents too large to gather: :mod:`bgsave.shards`).
        collective_timeout_s: How long bgsave's collectives (``start_run``, ``wait``, ``close``)
            wait for the other ranks before raising DistributedError.
        mirror: A second tier (``s3://bucket/runs/exp1``) for a local ``run_dir``: each committed
            checkpoint is uploaded there in the background; finds and resumes take the newer tier
            (:mod:`bgsave.mirror`, :mod:`bgsave.tiers`). ``mirror_storage_options``: its fsspec options.
        mirror_every_n: Upload every N-th committed checkpoint (the first always goes).
        mirror_keep_last, mirror_keep_best: The mirror's own retention, as ``keep_last`` /
            ``keep_best`` are the local tier's (None: the mirror keeps everything).
        max_concurrency: Parts in flight per object-store upload or read (memory: that many 8 MiB parts).

    Example:
        >>> with CheckpointManager("runs/exp1", "exp1") as mgr:  # doctest: +SKIP
        ...     mgr.save_at_interval(agent, 10, interval=5, optimizer=opt, metadata={"score": 0.8})

    Raises:
        InvalidArgumentError: an argument is not allowed (nothing is created on disk).
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        run_name: str,
        *,
        background: bool = True,
        max_pending: int = 1,
        storage_options: Mapping[str, Any] | None = None,
        wandb_run: Any = None,
        wandb_every_n: int = 1,
        keep_last: int | None = None,
        keep_best: int = 0,
        metric: str = "score",
        mode: str = "max",
        retry: RetryPolicy | None = None,
        crc32: bool = False,
        distributed: str = "auto",
        resume: str = "broadcast",
        collective_timeout_s: float = 1800.0,
        sharding: str = "full",
        mirror: str | os.PathLike[str] | None = None,
        mirror_storage_options: Mapping[str, Any] | None = None,
        mirror_every_n: int = 1,
        mirror_keep_last: int | None = None,
        mirror_keep_best: int = 0,
        max_concurrency: int = 8,
    ) -> None:
        self._run_name = sidecar_schema.validate_run_name(run_name)
        check_bool("background", background)
        self._resume = check_choice("resume", resume, bgsave_distributed.RESUME_MODES)
        timeout_s = bgsave_distributed.check_timeout(collective_timeout_s)
        check_bool("crc32", crc32)
        check_int("max_pending", max_pending, 0)
        retention = RetentionPolicy(keep_last=keep_last, keep_best=keep_best, metric=metric, mode=mode)
        upload = EveryNth(wandb_every_n)
        if wandb_run is not None:
            bgsave_wandb.validate_run(wandb_run)
        check_choice("sharding", sharding, SHARDING_MODES)
        self._storage = storage = open_storage(run_dir, storage_options, retry=retry, max_concurrency=max_concurrency)
        if sharding == "dcp" and not isinstance(storage, LocalStorage):
            raise InvalidArgumentError(f"sharding='dcp' needs a local (or shared-filesystem) run_dir, got {run_dir!s}")
        self._catalog = Catalog(storage, storage.join(layout.CHECKPOINTS))
        self._mirror = open_mirror(
            mirror,
            mirror_storage_options,
            local=self._catalog,
            run_name=self._run_name,
            retry=retry,
            max_concurrency=max_concurrency,
            every_n=mirror_every_n,
            keep_last=mirror_keep_last,
            keep_best=mirror_keep_best,
            metric=metric,
            mode=mode,
            sharding=sharding,
            report=lambda error: self._worker.report(error),  # noqa: PLW0108 (the worker comes next)
        )
        self._ranks = Ranks.join(distributed, timeout_s)  # collective: every rank, same order
        storage.check_directory()
        if self._mirror is not None:
            self._ranks.everywhere("CheckpointManager(mirror=)", self._mirror.check)
        self._metric, self._mode = metric, mode
        self._closed = False
        lock = WriterLock(storage, storage.root, self._run_name)
        self._worker = worker = Worker(
            background=background,
            max_pending=max_pending,
            name=self._run_name,
            periodic=lock.heartbeats(lock, None if self._mirror is None else self._mirror.lock),
        )
        self._writer = Writer(
            self._catalog,
            self._run_name,
            crc32=crc32,
            retention=retention,
            wandb_run=wandb_run,
            upload=upload,
            in_flight=worker.in_flight,
            mirror=self._mirror,
        )
        self._life = Lifecycle(self, worker, self._writer.pool, lock, self._catalog, mirror=self._mirror)
        self._saving = Saving(
            ranks=self._ranks,
            writer=self._writer,
            worker=worker,
            life=self._life,
            catalog=self._catalog,
            run_name=self._run_name,
            sharding=sharding,
            timeout_s=timeout_s,
        )

    # ---- saving -------------------------------------------------------------------------------
    def save_agent(self, agent: Any, epoch: int, metadata: Mapping[str, Any] | None = None) -> str:
        """Save the whole agent as ``model_{epoch:04d}.pt`` plus its sidecar; returns the ``.pt`` path.

        Returns once a CPU copy is taken: mutate or train the agent freely. Saving an epoch again
        replaces it. ``metadata``: scalars for the sidecar (agent_step, score, avg_reward, ...).

        Raises:
            InvalidArgumentError: bad epoch or metadata, or the agent holds an OS resource (a pipe,
                a socket, an open file) that a copy would share; nothing queued.
            CheckpointWriteError: the agent cannot be pickled (at once), or an earlier background
                save failed (or, without a background worker, this one did).
            ManagerClosedError: after :meth:`close`.
        """
        self._check_open()
        epoch = sidecar_schema.validate_epoch(epoch)
        return self._saving.save(agent, epoch, self._saving.sidecar(epoch, metadata), None)

    def save_trainer_state(
        self,
        optimizer: Stateful,
        epoch: int,
        agent_step: int,
        *,
        extra: Mapping[str, Any] | None = None,
        rng: bool = False,
    ) -> None:
        """Save ``optimizer``'s state (and ``extra``, the RNG) as ``trainer_{epoch:04d}.pt``, for epoch's agent.

        Call it just before or after ``save_agent`` of the same epoch, or use ``save_at_interval(...,
        optimizer=)``, which commits both at once. ``extra``: objects with ``state_dict()``
        (schedulers, a ``GradScaler``, normalizers) and plain picklable values, by name; ``rng``:
        record the RNG states. All taken at the call (:mod:`bgsave.trainer_state`).

        Raises:
            InvalidArgumentError: no ``state_dict()``, a bad epoch / agent_step / extra (an extra
                value that neither has ``state_dict()`` nor pickles is named); nothing queued.
            CheckpointWriteError: an earlier background save failed.
        """
        self._check_open()
        trainer = TrainerState.checked(
            optimizer, epoch, agent_step, self._run_name, extra=extra, rng=rng, required=True
        )
        assert trainer is not None  # required=True: an optimizer or an error
        self._saving.save_trainer_state(trainer)

    def save_at_interval(
        self,
        agent: Any,
        epoch: int,
        *,
        interval: int,
        metadata: Mapping[str, Any] | None = None,
        optimizer: Stateful | None = None,
        extra: Mapping[str, Any] | None = None,
        rng: bool = False,
    ) -> str | None:
        """Save the agent (and its trainer state, with ``optimizer``) when ``epoch`` is a multiple of ``interval``.

        The seed's periodic save: pass eval results (score, avg_reward) in ``metadata``. With
        ``optimizer`` the agent and the trainer state (``optimizer``, ``extra``, ``rng``: see
        :meth:`save_trainer_state`) commit together, as one epoch. After a SIGTERM (see
        :meth:`handle_sigterm`) it saves whatever the interval: the loop's boundary is the place.

        Returns:
            The ``.pt`` path when a save was made, else None.
        """
        self._check_open()
        check_int("interval", interval, 1)
        epoch = sidecar_schema.validate_epoch(epoch)
        sidecar = self._saving.sidecar(epoch, metadata)  # checked even when not saving now
        step = sidecar["agent_step"] or 0
        trainer = TrainerState.checked(optimizer, epoch, step, self._run_name, extra=extra, rng=rng, required=False)
        requested = self._saving.preemption_requested()  # under torch.distributed: any rank's SIGTERM
        if epoch % interval and not requested:
            return None
        return self._saving.save(agent, epoch, sidecar, trainer, requested)

    def update_metadata(self, epoch: int, /, **metrics: Any) -> None:
        """Add or change sidecar values of a saved checkpoint, for eval scores that arrive after the save.

        Rewritten atomically on the worker, after any pending save of that epoch (not ``epoch``, ``run``).

        Example:
            >>> mgr.update_metadata(10, score=0.91, eval_episodes=64)  # doctest: +SKIP

        Raises:
            InvalidArgumentError: bad epoch or values (nothing queued).
            CheckpointWriteError: an earlier background write failed. If epoch has no committed
                checkpoint when the update runs, that failure is raised at the next call.
        """
        self._check_open()
        epoch = sidecar_schema.validate_epoch(epoch)
        if not metrics:
            raise InvalidArgumentError("update_metadata needs at least one key=value to set")
        self._saving.submit(self._writer.metadata_job(epoch, sidecar_schema.normalize(self._run_name, epoch, metrics)))

    def handle_sigterm(self, *, grace_s: float = 30.0, final_save: Callable[[], object] | None = None) -> None:
        """Opt in: a SIGTERM makes the next save a boundary's; then :attr:`preempted`; close hands the signal on.

        Nothing runs inside the signal handler but a flag (:mod:`bgsave.preemption`); not closed
        ``grace_s`` after the signal, queued writes are flushed and the signal handed on anyway.
        ``final_save`` is deprecated (run at the first save or close after the signal). Main thread.

        Example:
            >>> mgr.save_at_interval(agent, epoch, interval=10, optimizer=opt)  # doctest: +SKIP
            >>> if mgr.preempted:  # that save was made, whatever the interval: leave, close  # doctest: +SKIP
            ...     break
        """
        self._check_open()
        flush = self._worker.flush
        self._life.sigterm(Preemption(flush, grace_s=grace_s, final_save=final_save, name=self._run_name))

    @property
    def preempted(self) -> bool:
        """True once a save was made after a SIGTERM (see :meth:`handle_sigterm`): leave the loop and close."""
        return self._life.preempted

    def _read(self) -> Catalog:
        self._check_open()
        self._worker.flush()
        return self._catalog

    # ---- waiting and closing --------------------------------------------------------------
    def wait(self, timeout: float | None = None) -> None:
        """Block until every queued write is durable, and uploaded to the mirror (under torch.distributed: collective).

        ``timeout``: seconds at most for the writes, and again for the uploads (None: as long as they take).

        Raises:
            CheckpointWriteError: for a write that failed (the oldest not yet raised), on every rank.
            WorkerTimeoutError: the writes did not finish in time (they keep going).
            WorkerError: the background worker died.
            DistributedError: another rank did not join within ``collective_timeout_s``.
        """
        self._check_open()

        def flush() -> None:
            self._worker.flush(timeout)
            if self._mirror is not None:
                self._mirror.wait(timeout)
            self._worker.raise_errors()

        self._saving.shards.wait()  # every rank's DCP save in flight, if any
        self._ranks.everywhere("wait()", flush)

    def close(self, timeout: float | None = None) -> None:
        """Wait for queued writes, then stop the worker (under torch.distributed: collective). Idempotent.

        Args:
            timeout: Seconds to wait for queued writes at most; on expiry the worker is abandoned
                and WorkerTimeoutError raised.

        Raises:
            CheckpointWriteError: for a write that failed and was not raised yet, on every rank.
            WorkerTimeoutError: the writes did not finish in time.
            DistributedError: another rank did not join within ``collective_timeout_s``.
        """
        self._close(timeout, together=True)

    def _close(self, timeout: float | None, *, together: bool) -> None:
        if self._closed:
            return
        self._life.run_final_save()
        self._closed = True
        try:
            self._saving.shards.close()
        finally:
            self._life.end(timeout, self._ranks, together=together)

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None:
            self.close()
            return
        try:  # no collective: the other ranks may be gone (bgsave.distributed)
            self._close(None, together=False)
        except BgsaveError as close_error:  # must not replace the exception the block raises
            logger.error("%s: while handling %r, closing failed: %s", self._run_name, exc, close_error)
            if hasattr(exc, "add_note"):  # Python 3.11+
                exc.add_note(f"bgsave: closing the checkpoint manager also failed: {close_error!r}")

    def _check_open(self) -> None:
        if self._closed:
            raise ManagerClosedError(f"CheckpointManager for run {self._run_name!r} is closed")

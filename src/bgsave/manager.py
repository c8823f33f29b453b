"""CheckpointManager: the seed design's methods, their argument checks, and the manager's lifecycle.

Every ``save_*`` checks its arguments and hands a job built by :mod:`bgsave.writer` to the worker
(:mod:`bgsave.worker`); finding goes to :mod:`bgsave.catalog`, loading to :mod:`bgsave.loading`.
The manager's own find/load calls first wait for its pending writes, so it always reads what it
wrote. Its lifecycle (the writer lock, the exit hook, SIGTERM) is :mod:`bgsave.lifecycle`'s.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, TypeVar

from bgsave import layout, loading
from bgsave import sidecar as sidecar_schema
from bgsave import wandb as bgsave_wandb
from bgsave.catalog import Catalog, CheckpointInfo, check_mode
from bgsave.errors import (
    BgsaveError,
    CheckpointNotFoundError,
    InvalidArgumentError,
    ManagerClosedError,
    check_bool,
    check_int,
)
from bgsave.jobs import SaveRecord
from bgsave.lifecycle import Lifecycle
from bgsave.loading import RunStart
from bgsave.lock import WriterLock
from bgsave.policies import EveryNth, RetentionPolicy
from bgsave.preemption import install_sigterm_handler
from bgsave.storage import RetryPolicy, open_storage
from bgsave.worker import Worker
from bgsave.writer import Stateful, Writer, check_optimizer

__all__ = ("CheckpointManager", "Stateful")

logger = logging.getLogger(__name__)

AgentT = TypeVar("AgentT")


class CheckpointManager:
    """Saves and finds a run's checkpoints, writing in the background.

    Args:
        run_dir: The run directory: a local path or an fsspec URL (``s3://bucket/runs/x``).
        run_name: The run's name, recorded in every sidecar. No path separators or ``..``.
        background: Write on a background worker (default). False writes in the calling thread
            with the same files and errors (for debugging, and the baseline in benchmarks).
        max_pending: How many saves may wait behind the one being written before ``save_*`` blocks.
            Memory for snapshots stays within ``max_pending + 1`` copies of the model.
        storage_options: Passed to fsspec (endpoint, credentials, ...).
        wandb_run: A W&B run (``wandb.init()``): each committed checkpoint is logged to it as a
            ``model`` artifact, on the worker after the commit (:mod:`bgsave.wandb`). Close the
            manager before finishing the run.
        wandb_every_n: Upload only every N-th committed checkpoint (the first always goes).
        keep_last: Retention: keep the N newest committed checkpoints and delete older ones,
            on the worker after each commit (None keeps everything). The newest is never deleted.
        keep_best: Retention: also keep the K best by ``metric`` (needs ``keep_last``).
        metric: The sidecar key ``keep_best`` ranks by, and ``find_best_checkpoint``'s default.
        mode: "max" or "min": whether a higher or lower ``metric`` is better.
        retry: How transient storage faults (resets, 5xx, throttling) are retried; default 3
            attempts with exponential backoff and jitter (:class:`~bgsave.RetryPolicy`).
        crc32: Whether the ``.pt`` files carry torch's per-record CRC32s. Off by default: they
            cost the writer ~0.3 s of CPU per GB and ``torch.load`` never checks them; turn on
            for files that zip tools must verify (:mod:`bgsave.serialize`, torch >= 2.12).

    Example:
        >>> with CheckpointManager("runs/exp1", "exp1") as mgr:  # doctest: +SKIP
        ...     mgr.save_agent(agent, epoch=10, metadata={"agent_step": 40960, "score": 0.8})
        ...     mgr.save_trainer_state(optimizer, epoch=10, agent_step=40960)
        >>> agent = CheckpointManager("runs/exp1", "exp1").load_agent()  # doctest: +SKIP

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
    ) -> None:
        self._run_name = sidecar_schema.validate_run_name(run_name)
        check_bool("background", background)
        check_bool("crc32", crc32)
        check_int("max_pending", max_pending, 0)
        retention = RetentionPolicy(keep_last=keep_last, keep_best=keep_best, metric=metric, mode=mode)
        upload = EveryNth(wandb_every_n)
        if wandb_run is not None:
            bgsave_wandb.validate_run(wandb_run)
        self._storage = storage = open_storage(run_dir, storage_options, retry=retry)
        storage.check_directory()
        self._metric, self._mode = metric, mode
        self._catalog = Catalog(storage, storage.join(layout.CHECKPOINTS))
        self._closed = False
        lock = WriterLock(storage, storage.root, self._run_name)
        self._worker = worker = Worker(
            background=background, max_pending=max_pending, name=self._run_name, periodic=lock.heartbeat_every
        )
        self._writer = Writer(
            self._catalog,
            self._run_name,
            crc32=crc32,
            retention=retention,
            wandb_run=wandb_run,
            upload=upload,
            in_flight=worker.in_flight,
        )
        self._life = Lifecycle(self, worker, self._writer.pool, lock, self._catalog)

    # ---- properties ---------------------------------------------------------------------------
    @property
    def run_dir(self) -> str:
        """The run directory (a local path, or the URL for remote run directories)."""
        return self._storage.display(self._storage.root)

    @property
    def checkpoint_dir(self) -> str:
        """``{run_dir}/checkpoints`` (a local path, or the URL for remote run directories)."""
        return self._storage.display(self._catalog.directory)

    @property
    def run_name(self) -> str:
        """The run's name."""
        return self._run_name

    @property
    def records(self) -> tuple[SaveRecord, ...]:
        """Timings of finished saves, oldest first (the last 1024): stall, queue wait, write time, bytes."""
        return tuple(self._worker.records)

    # ---- saving -------------------------------------------------------------------------------
    def save_agent(self, agent: Any, epoch: int, metadata: Mapping[str, Any] | None = None) -> str:
        """Save the whole agent as ``model_{epoch:04d}.pt`` plus its sidecar; returns the ``.pt`` path.

        Returns as soon as a CPU copy is taken: the caller may then mutate or train the agent freely.
        Saving an epoch again replaces it.

        Args:
            agent: Usually an ``nn.Module``; anything ``torch.save`` can pickle.
            epoch: Non-negative int, the version number.
            metadata: Scalars for the sidecar: agent_step, score, avg_reward, total_time and extras.

        Raises:
            InvalidArgumentError: bad epoch or metadata, or the agent holds an OS resource (a pipe,
                a socket, an open file) that a copy would share; nothing queued.
            CheckpointWriteError: an earlier background save failed (or, without a background
                worker, this one did).
            ManagerClosedError: after :meth:`close`.
        """
        self._check_open()
        epoch = sidecar_schema.validate_epoch(epoch)
        job = self._writer.agent_job(agent, epoch, sidecar_schema.build(self._run_name, epoch, metadata))
        self._submit(job)
        return job.path

    def save_trainer_state(self, optimizer: Stateful, epoch: int, agent_step: int) -> None:
        """Save the optimizer state with its epoch and agent step to ``trainer_state.pt`` (replaced atomically).

        Raises:
            InvalidArgumentError: optimizer has no ``state_dict()``, or a bad epoch / agent_step.
            CheckpointWriteError: an earlier background save failed.
            ManagerClosedError: after :meth:`close`.
        """
        self._check_open()
        check_optimizer(optimizer)
        epoch = sidecar_schema.validate_epoch(epoch)
        agent_step = sidecar_schema.validate_epoch(agent_step, argument="agent_step")
        self._submit(self._writer.trainer_state_job(optimizer, epoch, agent_step))

    def save_at_interval(
        self,
        agent: Any,
        epoch: int,
        *,
        interval: int,
        metadata: Mapping[str, Any] | None = None,
        optimizer: Stateful | None = None,
    ) -> str | None:
        """Save the agent (and the optimizer, if given) when ``epoch`` is a multiple of ``interval``.

        The seed's periodic save: pass eval results (score, avg_reward) in ``metadata``. The trainer
        state records ``metadata["agent_step"]`` (0 if absent).

        Returns:
            The ``.pt`` path when a save was made, else None.
        """
        self._check_open()
        check_int("interval", interval, 1)
        epoch = sidecar_schema.validate_epoch(epoch)
        if epoch % interval:
            return None
        # Validate everything both saves need before the first one queues anything.
        agent_step = sidecar_schema.build(self._run_name, epoch, metadata)["agent_step"]
        if optimizer is not None:
            check_optimizer(optimizer)
        path = self.save_agent(agent, epoch, metadata)
        if optimizer is not None:
            self.save_trainer_state(optimizer, epoch, int(agent_step or 0))
        return path

    def update_metadata(self, epoch: int, /, **metrics: Any) -> None:
        """Add or change sidecar values of a saved checkpoint, for eval scores that arrive after the save.

        The sidecar is rewritten atomically on the worker, after any pending save of that epoch;
        search and retention see the new values. ``epoch`` and ``run`` cannot be changed.

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
        self._submit(self._writer.metadata_job(epoch, sidecar_schema.normalize(self._run_name, epoch, metrics)))

    def _submit(self, job: Any) -> None:
        self._worker.raise_errors()
        self._life.claim()
        self._worker.submit(job)

    def handle_sigterm(self, *, grace_s: float = 30.0, final_save: Callable[[], object] | None = None) -> None:
        """Opt in: on SIGTERM, run ``final_save`` (if given), flush queued writes, then exit as before.

        The handler that was installed before is kept and called afterwards (or the default action,
        death by SIGTERM, is taken); see :mod:`bgsave.preemption`. Call from the main thread.

        Example:
            >>> mgr.handle_sigterm(final_save=lambda: mgr.save_agent(agent, epoch))  # doctest: +SKIP
        """
        self._check_open()
        self._life.sigterm(lambda: install_sigterm_handler(self, grace_s=grace_s, final_save=final_save))

    # ---- waiting and closing --------------------------------------------------------------
    def wait(self, timeout: float | None = None) -> None:
        """Block until every queued write is durable.

        Args:
            timeout: Seconds to wait at most; None waits as long as the writes take.

        Raises:
            CheckpointWriteError: for a write that failed (the oldest not yet raised).
            WorkerTimeoutError: the writes did not finish in time (they keep going).
            WorkerError: the background worker died.
        """
        self._check_open()
        self._worker.flush(timeout)
        self._worker.raise_errors()

    def close(self, timeout: float | None = None) -> None:
        """Wait for queued writes, then stop the worker. Idempotent.

        Args:
            timeout: Seconds to wait for queued writes at most; on expiry the worker is abandoned
                and WorkerTimeoutError raised.

        Raises:
            CheckpointWriteError: for a write that failed and was not raised yet.
            WorkerTimeoutError: the writes did not finish in time.
        """
        if self._closed:
            return
        self._closed = True
        self._life.close(timeout)

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None:
            self.close()
            return
        # The block is already raising: a checkpoint failure must not replace that exception.
        try:
            self.close()
        except BgsaveError as close_error:
            logger.error("%s: while handling %r, closing failed: %s", self._run_name, exc, close_error)
            if hasattr(exc, "add_note"):
                exc.add_note(f"bgsave: closing the checkpoint manager also failed: {close_error!r}")

    def _check_open(self) -> None:
        if self._closed:
            raise ManagerClosedError(f"CheckpointManager for run {self._run_name!r} is closed")

    # ---- finding and loading --------------------------------------------------------------
    def _read(self) -> Catalog:
        """The catalog, once this manager's own pending writes are done (read-your-writes)."""
        self._check_open()
        self._worker.flush()
        return self._catalog

    def checkpoints(self) -> list[CheckpointInfo]:
        """Committed checkpoints of this run, in epoch order (after pending writes finish)."""
        return self._read().committed()

    def find_latest_checkpoint(self) -> str | None:
        """Path of the newest committed checkpoint, or None."""
        latest = self._read().latest()
        return latest.path if latest else None

    def find_best_checkpoint(self, metric: str = "score", mode: str | None = None) -> str | None:
        """Path of the checkpoint with the best finite ``metric``, or None (ties: the later epoch).

        Args:
            metric: The sidecar key to rank by.
            mode: "max" (higher is better) or "min"; None means the manager's ``mode`` for the
                manager's own ``metric``, and "max" for any other.
        """
        if mode is None:
            mode = self._mode if metric == self._metric else "max"
        found = self._read().best(metric, check_mode(mode))
        return found.path if found else None

    def find_checkpoints_by_score(self, min_score: float, metric: str = "score") -> list[str]:
        """Paths of checkpoints whose finite ``metric`` is >= ``min_score``, in epoch order."""
        if isinstance(min_score, bool) or not isinstance(min_score, (int, float)):
            raise InvalidArgumentError(f"min_score must be a number, got {min_score!r}")
        return [info.path for info in self._read().by_min_score(float(min_score), metric)]

    def load_agent(self, epoch: int | None = None, *, map_location: Any = None) -> Any:
        """Load an agent: the latest committed one when ``epoch`` is None.

        Unpickles (runs code): only point a manager at run directories you trust.

        Returns:
            The agent, or None when ``epoch`` is None and the run has no committed checkpoint.

        Raises:
            CheckpointNotFoundError: ``epoch`` was given and has no committed checkpoint.
            CheckpointReadError: the ``.pt`` is truncated or corrupt.
        """
        if epoch is None:
            latest = self._read().latest()
            return None if latest is None else self._load(latest.epoch, map_location)
        epoch = sidecar_schema.validate_epoch(epoch)
        if self._read().get(epoch) is None:
            path = self._writer.display(epoch)
            raise CheckpointNotFoundError(
                f"run {self._run_name!r} has no committed checkpoint for epoch {epoch} ({path})", epoch=epoch, path=path
            )
        return self._load(epoch, map_location)

    def _load(self, epoch: int, map_location: Any) -> Any:
        return loading.load_file(self._storage, self._catalog.path(epoch), map_location=map_location)

    def load_trainer_state(self, *, map_location: Any = None) -> dict[str, Any] | None:
        """The saved ``{"optimizer_state", "epoch", "agent_step"}``, or None if there is none.

        Logs a WARNING naming both epochs when it differs from the latest committed agent's epoch:
        the two are never silently mixed.
        """
        latest = self._read().latest()
        return loading.load_trainer_state(self._catalog, None if latest is None else latest.epoch, map_location)

    def start_run(self, make_agent: Callable[[], AgentT], *, map_location: Any = None) -> RunStart:
        """Resume the run from its latest checkpoint, or start it with a new agent saved as epoch 0.

        One listing of the run finds the checkpoint; its agent and the trainer state are loaded.
        To record the new agent's eval score, call ``update_metadata(0, score=...)`` afterwards.

        Example:
            >>> start = mgr.start_run(lambda: Policy())  # doctest: +SKIP
            >>> optimizer = torch.optim.Adam(start.agent.parameters())  # doctest: +SKIP
            >>> if start.trainer_state:  # doctest: +SKIP
            ...     optimizer.load_state_dict(start.trainer_state["optimizer_state"])
        """
        if not callable(make_agent):
            raise InvalidArgumentError(
                f"make_agent must be a callable returning a new agent, got {type(make_agent).__name__}"
            )
        latest = self._read().latest()
        if latest is None:
            agent = make_agent()
            self.save_agent(agent, 0, {"agent_step": 0})
            return RunStart(agent=agent, epoch=0, agent_step=0, trainer_state=None, resumed=False)
        return loading.resume(self._catalog, latest, map_location)

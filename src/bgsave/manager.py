"""CheckpointManager: the seed design's methods, a background worker behind them, and read-your-writes.

Layout of a run directory (local path or fsspec URL)::

    {run_dir}/checkpoints/model_0000.pt      torch.save(agent): the whole module, CPU tensors
    {run_dir}/checkpoints/model_0000.yaml    sidecar, written last: its presence commits the checkpoint
    {run_dir}/checkpoints/trainer_state.pt   {"optimizer_state", "epoch", "agent_step"}, replaced atomically

Every ``save_*`` validates its arguments, takes a CPU snapshot (:mod:`bgsave.snapshot`) and hands it
to the worker (:mod:`bgsave.worker`), which serializes it (:mod:`bgsave.serialize`) and writes
through :mod:`bgsave.storage`. The manager's own find/load calls first wait for its pending writes,
so it always reads what it wrote.
"""

from __future__ import annotations

import collections
import logging
import os
import shutil
import threading
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol, TypeVar, runtime_checkable

from bgsave import diskfile, index, retention
from bgsave import sidecar as sidecar_schema
from bgsave import wandb as bgsave_wandb
from bgsave.errors import (
    BgsaveError,
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointWriteError,
    InvalidArgumentError,
    ManagerClosedError,
    WorkerTimeoutError,
    check_int,
)
from bgsave.lock import STALE_AFTER, WriterLock
from bgsave.preemption import install_sigterm_handler
from bgsave.retention import RetentionPolicy
from bgsave.retry import RetryPolicy
from bgsave.serialize import torch_writer
from bgsave.snapshot import Snapshot, SnapshotPool
from bgsave.storage import Storage
from bgsave.worker import Job, SaveRecord, Worker

__all__ = ("CheckpointManager", "RunStart", "Stateful")

logger = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.pt"
# Snapshots with at least this many bytes of tensors are written past the page cache on local disk.
# Below it the page cache's CPU cost is small, and 4 KiB-aligned tensors would pad small files.
_DIRECT_MIN = 64 * 2**20

AgentT = TypeVar("AgentT")


@runtime_checkable
class Stateful(Protocol):
    """Anything with ``state_dict()``, such as a ``torch.optim.Optimizer``."""

    def state_dict(self) -> dict[str, Any]:
        """The object's state as a dict of tensors and plain values."""
        ...


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
        info: The resumed checkpoint's :class:`~bgsave.index.CheckpointInfo` (its sidecar: score,
            total_time, ...), None for a new run.
    """

    agent: Any
    epoch: int
    agent_step: int
    trainer_state: dict[str, Any] | None
    resumed: bool
    info: index.CheckpointInfo | None = None


def _validate_run_name(run_name: object) -> str:
    if not isinstance(run_name, str) or not run_name.strip():
        raise InvalidArgumentError(f"run_name must be a non-empty string, got {run_name!r}")
    if "/" in run_name or "\\" in run_name or os.sep in run_name or ".." in run_name or "\0" in run_name:
        raise InvalidArgumentError(
            f"run_name must not contain a path separator, '..' or NUL (it names a run, not a path), got {run_name!r}"
        )
    return run_name


def _validate_optimizer(optimizer: object) -> None:
    if not callable(getattr(optimizer, "state_dict", None)):
        raise InvalidArgumentError(
            f"optimizer must have a state_dict() method (a torch.optim.Optimizer), got {type(optimizer).__name__}"
        )


def _validate_agent_step(agent_step: object) -> int:
    return sidecar_schema.validate_epoch(agent_step, argument="agent_step")


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
        metric: The sidecar key ``keep_best`` ranks by.
        mode: "max" or "min": whether a higher or lower ``metric`` is better.
        retry: How transient storage faults (resets, 5xx, throttling) are retried; default 3
            attempts with exponential backoff and jitter (:class:`~bgsave.retry.RetryPolicy`).
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
        self._run_name = _validate_run_name(run_name)
        if not isinstance(background, bool):
            raise InvalidArgumentError(f"background must be True or False, got {background!r}")
        if not isinstance(crc32, bool):
            raise InvalidArgumentError(f"crc32 must be True or False, got {crc32!r}")
        self._crc32 = crc32
        check_int("max_pending", max_pending, 0)
        if storage_options is not None and not isinstance(storage_options, Mapping):
            raise InvalidArgumentError(
                f"storage_options must be a mapping or None, got {type(storage_options).__name__}"
            )
        path = os.fspath(run_dir) if isinstance(run_dir, os.PathLike) else run_dir
        self._storage = Storage(path, storage_options, retry=retry)
        try:
            is_file = self._storage.is_file(self._storage.root)
        except OSError as exc:
            if isinstance(exc.__cause__, TypeError):  # the filesystem refused an option
                raise InvalidArgumentError(f"storage_options not accepted by the filesystem: {exc.__cause__}") from exc
            raise
        if is_file:
            raise InvalidArgumentError(f"run_dir {run_dir!s} is an existing file; it must be a directory")
        self._wandb_run = None if wandb_run is None else bgsave_wandb.validate_run(wandb_run)
        self._wandb_every_n = bgsave_wandb.validate_every_n(wandb_every_n, argument="wandb_every_n")
        self._committed = 0  # checkpoints committed by this manager; touched only by the after-lane
        self._retention = RetentionPolicy(keep_last=keep_last, keep_best=keep_best, metric=metric, mode=mode)
        # Epochs queued or being written: retention never prunes them (a re-save of an old epoch).
        self._in_flight: collections.Counter[int] = collections.Counter()
        self._in_flight_lock = threading.Lock()
        self._dir = self._storage.join("checkpoints")
        self._lock = WriterLock(self._storage, self._storage.root, self._run_name)
        self._pool = SnapshotPool()
        self._closed = False
        self._restore_sigterm: Callable[[], None] | None = None
        self._worker = Worker(
            background=background,
            max_pending=max_pending,
            name=self._run_name,
            periodic=(STALE_AFTER / 4, self._lock.heartbeat),
        )
        # Flush pending writes when the manager is dropped unclosed, or at interpreter exit, before
        # non-daemon threads are joined (see the worker module). The callback holds no reference to self.
        self._finalizer = weakref.finalize(self, _close_quietly, self._worker, self._pool, self._lock, self._run_name)
        self._finalizer.atexit = False
        _register_exit_hook(self._finalizer)

    # ---- properties ---------------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> str:
        """``{run_dir}/checkpoints`` (a local path, or the URL for remote run directories)."""
        return self._storage.display(self._dir)

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
            InvalidArgumentError: bad epoch or metadata (nothing queued).
            CheckpointWriteError: an earlier background save failed (or, without a background
                worker, this one did).
            ManagerClosedError: after :meth:`close`.
        """
        self._check_open()
        epoch = sidecar_schema.validate_epoch(epoch)
        sidecar = sidecar_schema.build(self._run_name, epoch, metadata)
        sidecar_bytes = sidecar_schema.dumps(sidecar)  # serialized now: a YAML failure is the caller's error
        self._worker.raise_errors()
        self._claim()
        pt = self._storage.join_dir(self._dir, index.checkpoint_name(epoch, "pt"))
        yml = self._storage.join_dir(self._dir, index.checkpoint_name(epoch, "yaml"))
        shown = self._storage.display(pt)

        def write(snapshot: Snapshot) -> int:
            # The old sidecar of this epoch (a re-save) is removed only once the new .pt is complete,
            # right before it replaces the old one: a failed re-save leaves the earlier checkpoint.
            size = self._write_torch(pt, snapshot, before_commit=lambda: self._storage.delete(yml))
            try:
                size += self._storage.write_bytes_atomic(yml, sidecar_bytes)
            except BaseException:
                # A failed save leaves nothing of itself; the cleanup's own failure must not hide the cause.
                try:
                    self._storage.delete(pt)
                except Exception as cleanup:
                    logger.warning("%s: could not remove %s after a failed save: %s", self._run_name, shown, cleanup)
                raise
            logger.info("%s: committed epoch %d (%s, %.1f MB)", self._run_name, epoch, shown, size / 1e6)
            return size

        job = self._snapshot_job("agent", epoch, shown, lambda: agent, write)
        job.after = lambda: self._after_commit(epoch, shown, sidecar)
        release = job.cleanup

        def cleanup() -> None:
            release()
            self._track(epoch, -1)

        job.cleanup = cleanup
        self._track(epoch, +1)
        try:
            self._worker.submit(job)
        except BaseException:
            self._track(epoch, -1)
            raise
        return shown

    def _after_commit(self, epoch: int, shown: str, sidecar: Mapping[str, Any]) -> None:
        """Runs in the worker's second lane once epoch's checkpoint committed: W&B upload, then retention."""
        index_ = self._committed
        self._committed += 1
        prunes = not self._retention.keeps_everything
        if self._wandb_run is not None and bgsave_wandb.should_upload(index_, self._wandb_every_n):
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
            with self._in_flight_lock:
                protect = {epoch, *self._in_flight}
            infos = index.list_checkpoints(self._storage, self._dir)
            retention.prune(self._storage, self._dir, infos, self._retention, protect=protect)

    def _track(self, epoch: int, delta: int) -> None:
        with self._in_flight_lock:
            self._in_flight[epoch] += delta
            if self._in_flight[epoch] <= 0:
                del self._in_flight[epoch]

    def save_trainer_state(self, optimizer: Stateful, epoch: int, agent_step: int) -> None:
        """Save the optimizer state with its epoch and agent step to ``trainer_state.pt`` (replaced atomically).

        Raises:
            InvalidArgumentError: optimizer has no ``state_dict()``, or a bad epoch / agent_step.
            CheckpointWriteError: an earlier background save failed.
            ManagerClosedError: after :meth:`close`.
        """
        self._check_open()
        _validate_optimizer(optimizer)
        epoch = sidecar_schema.validate_epoch(epoch)
        agent_step = _validate_agent_step(agent_step)
        self._worker.raise_errors()
        self._claim()
        path = self._storage.join_dir(self._dir, TRAINER_STATE)

        def state() -> dict[str, Any]:
            return {"optimizer_state": optimizer.state_dict(), "epoch": epoch, "agent_step": agent_step}

        def write(snapshot: Snapshot) -> int:
            return self._write_torch(path, snapshot)

        self._worker.submit(self._snapshot_job("trainer_state", epoch, self._storage.display(path), state, write))

    def _snapshot_job(
        self, kind: str, epoch: int, shown: str, value: Callable[[], Any], write: Callable[[Snapshot], int]
    ) -> Job:
        """A job that snapshots ``value()`` on the caller's thread and ``write``s the copy on the worker's."""
        holder: list[Snapshot] = []

        def execute() -> int:
            snapshot = holder[0]
            snapshot.wait_ready()
            self._storage.makedirs(self._dir)
            self._warn_if_low_space(kind, epoch, snapshot.nbytes)
            return write(snapshot)

        def cleanup() -> None:
            if holder:
                self._pool.release(holder.pop())

        def prepare() -> None:
            try:
                holder.append(self._pool.take(kind, value()))
            except Exception as exc:  # neither picklable nor deep-copyable: nothing was queued
                raise CheckpointWriteError(
                    f"could not copy the {kind} of epoch {epoch} for {shown}: {type(exc).__name__}: {exc}",
                    epoch=epoch,
                    path=shown,
                ) from exc

        return Job(kind=kind, epoch=epoch, path=shown, prepare=prepare, execute=execute, cleanup=cleanup)

    def _write_torch(self, path: str, snapshot: Snapshot, before_commit: Callable[[], None] | None = None) -> int:
        # A large checkpoint on local disk goes past the page cache: tensors laid out on disk blocks,
        # written straight from the snapshot's buffers (bgsave.diskfile).
        direct = self._storage.is_local and snapshot.nbytes >= _DIRECT_MIN
        writer = torch_writer(snapshot.value, crc32=self._crc32, alignment=diskfile.BLOCK if direct else None)
        return self._storage.write_atomic(path, writer, before_commit=before_commit, direct=direct)

    def _warn_if_low_space(self, kind: str, epoch: int, nbytes: int) -> None:
        # Pre-flight on local disk: a full disk still fails the write cleanly, but the warning comes first.
        if self._storage.is_local:
            free = shutil.disk_usage(self._dir).free
            if free < nbytes:
                logger.warning(
                    "%s: %s of epoch %d needs about %.1f MB but only %.1f MB is free in %s",
                    self._run_name,
                    kind,
                    epoch,
                    nbytes / 1e6,
                    free / 1e6,
                    self.checkpoint_dir,
                )

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
            _validate_optimizer(optimizer)
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
        values = sidecar_schema.normalize(self._run_name, epoch, metrics)
        self._worker.raise_errors()
        self._claim()
        yml = self._storage.join_dir(self._dir, index.checkpoint_name(epoch, "yaml"))
        shown = self._storage.display(yml)

        def execute() -> int:
            try:
                current = sidecar_schema.loads(self._storage.read_bytes(yml), source=shown)
            except FileNotFoundError as exc:
                raise CheckpointNotFoundError(f"no committed checkpoint for epoch {epoch}", epoch=epoch) from exc
            return self._storage.write_bytes_atomic(yml, sidecar_schema.dumps({**current, **values}))

        self._worker.submit(
            Job(kind="metadata", epoch=epoch, path=shown, prepare=lambda: None, execute=execute, needs_slot=False)
        )

    def handle_sigterm(self, *, grace_s: float = 30.0, final_save: Callable[[], object] | None = None) -> None:
        """Opt in: on SIGTERM, run ``final_save`` (if given), flush queued writes, then exit as before.

        The handler that was installed before is kept and called afterwards (or the default action,
        death by SIGTERM, is taken); see :mod:`bgsave.preemption`. Call from the main thread.

        Example:
            >>> mgr.handle_sigterm(final_save=lambda: mgr.save_agent(agent, epoch))  # doctest: +SKIP
        """
        self._check_open()
        if self._restore_sigterm is not None:
            self._restore_sigterm()
        self._restore_sigterm = install_sigterm_handler(self, grace_s=grace_s, final_save=final_save)

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
        self._finalizer.detach()
        if self._restore_sigterm is not None:
            self._restore_sigterm()
        try:
            self._worker.close(timeout)
        except WorkerTimeoutError:
            # The abandoned write may still land: the run stays ours until the worker has stopped.
            self._worker.when_stopped(self._lock.release)
            raise
        except BaseException:
            self._lock.release()  # a dead worker writes nothing more
            raise
        else:
            self._lock.release()
        finally:
            self._pool.clear()
        self._worker.raise_errors()

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

    def _claim(self) -> None:
        """Before the first write: take the run's writer lock, then clear temp files a killed writer left."""
        if not self._lock.held:
            try:
                self._lock.acquire()
            except OSError as exc:  # no such bucket, access denied, read-only directory...
                raise CheckpointWriteError(
                    f"cannot write to run directory {self._storage.display(self._storage.root)}: {exc}",
                    path=self._storage.display(self._lock.path),
                ) from exc
            self._storage.remove_stale_temps(self._dir)
            if self._storage.is_local:  # the lock's own temp file, if a heartbeat was killed
                self._storage.remove_stale_temps(self._storage.root)
        elif not self._worker.background:
            self._lock.heartbeat()  # no worker to refresh it periodically

    # ---- finding and loading --------------------------------------------------------------
    def checkpoints(self) -> list[index.CheckpointInfo]:
        """Committed checkpoints of this run, in epoch order (after pending writes finish)."""
        self._check_open()
        self._worker.flush()
        return index.list_checkpoints(self._storage, self._dir)

    def find_latest_checkpoint(self) -> str | None:
        """Path of the newest committed checkpoint, or None."""
        infos = self.checkpoints()
        return infos[-1].path if infos else None

    def find_best_checkpoint(self, metric: str = "score") -> str | None:
        """Path of the checkpoint with the highest finite ``metric``, or None (ties: the later epoch)."""
        found = index.best(self.checkpoints(), metric)
        return found.path if found else None

    def find_checkpoints_by_score(self, min_score: float) -> list[str]:
        """Paths of checkpoints with a finite score >= ``min_score``, in epoch order."""
        if isinstance(min_score, bool) or not isinstance(min_score, (int, float)):
            raise InvalidArgumentError(f"min_score must be a number, got {min_score!r}")
        return [info.path for info in index.by_min_score(self.checkpoints(), float(min_score))]

    def load_agent(self, epoch: int | None = None, *, map_location: Any = None) -> Any:
        """Load an agent: the latest committed one when ``epoch`` is None.

        Unpickles (runs code): only point a manager at run directories you trust.

        Returns:
            The agent, or None when ``epoch`` is None and the run has no committed checkpoint.

        Raises:
            CheckpointNotFoundError: ``epoch`` was given and has no committed checkpoint.
            CheckpointReadError: the ``.pt`` is truncated or corrupt.
        """
        infos = self.checkpoints()
        if epoch is None:
            if not infos:
                return None
            epoch = infos[-1].epoch
        else:
            epoch = sidecar_schema.validate_epoch(epoch)
            if epoch not in {info.epoch for info in infos}:
                path = self._storage.display(self._storage.join_dir(self._dir, index.checkpoint_name(epoch, "pt")))
                raise CheckpointNotFoundError(
                    f"run {self._run_name!r} has no committed checkpoint for epoch {epoch} ({path})",
                    epoch=epoch,
                    path=path,
                )
        path = self._storage.join_dir(self._dir, index.checkpoint_name(epoch, "pt"))
        return index.load_file(self._storage, path, map_location=map_location)

    def load_trainer_state(self, *, map_location: Any = None) -> dict[str, Any] | None:
        """The saved ``{"optimizer_state", "epoch", "agent_step"}``, or None if there is none.

        Logs a WARNING naming both epochs when it differs from the latest committed agent's epoch:
        the two are never silently mixed.
        """
        infos = self.checkpoints()
        path = self._storage.join_dir(self._dir, TRAINER_STATE)
        if not self._storage.is_file(path):
            return None
        state: dict[str, Any] = index.load_file(self._storage, path, map_location=map_location)
        latest = infos[-1].epoch if infos else None
        if state.get("epoch") != latest:
            logger.warning(
                "%s: trainer state is from epoch %s but the latest committed agent is epoch %s; "
                "check which one you resume from",
                self._run_name,
                state.get("epoch"),
                latest,
            )
        return state

    def start_run(self, make_agent: Callable[[], AgentT], *, map_location: Any = None) -> RunStart:
        """Resume the run from its latest checkpoint, or start it with a new agent saved as epoch 0.

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
        infos = self.checkpoints()
        if not infos:
            agent = make_agent()
            self.save_agent(agent, 0, {"agent_step": 0})
            return RunStart(agent=agent, epoch=0, agent_step=0, trainer_state=None, resumed=False)
        latest = infos[-1]
        agent = self.load_agent(latest.epoch, map_location=map_location)
        state = self.load_trainer_state(map_location=map_location)  # warns when the epochs differ
        return RunStart(
            agent=agent,
            epoch=latest.epoch,
            agent_step=int(latest.sidecar.get("agent_step") or 0),
            trainer_state=state if state is not None and state.get("epoch") == latest.epoch else None,
            resumed=True,
            info=latest,
        )


def _close_quietly(
    worker: Worker, pool: SnapshotPool, lock: WriterLock, run_name: str, *, on_this_thread: bool = False
) -> None:
    """Close an abandoned manager's worker; its errors can reach no caller now, so they are logged."""
    if not on_this_thread and threading.current_thread() is not threading.main_thread():
        # The last reference may drop on the worker's own thread, which must not wait for itself.
        threading.Thread(
            target=_close_quietly,
            args=(worker, pool, lock, run_name),
            kwargs={"on_this_thread": True},
            name=f"bgsave-close-{run_name}",
        ).start()
        return
    try:
        worker.close()
    finally:
        pool.clear()
        lock.release()
    while worker.pending_errors():
        try:
            worker.raise_errors()
        except CheckpointError:
            logger.exception("%s: a checkpoint write failed after its manager was abandoned", run_name)


def _register_exit_hook(hook: Callable[[], object]) -> None:
    # threading._register_atexit runs before non-daemon threads are joined at shutdown (worker module
    # docstring); fall back to atexit where it is missing or shutdown has already begun.
    register = getattr(threading, "_register_atexit", None)
    if register is not None:
        try:
            register(hook)
            return
        except RuntimeError:
            pass
    import atexit

    atexit.register(hook)

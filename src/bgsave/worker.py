"""Worker: one long-lived background writer per manager, a bounded queue for backpressure, errors kept and re-raised.

The flow of one save::

    caller thread                         event loop thread (anyio, in a blocking portal)
    -------------                         ------------------------------------------------
    submit(job):
      take a slot (_Slots, max_pending + 1)   # blocks when full
      job.prepare()   (snapshot to CPU)
      hand job over   ──────────────────▶ memory object stream ──▶ _run():
      return                                                          to_thread.run_sync(job.execute)
                                                                      # blocking file I/O off the loop
                                                                      give the slot back

The slot is taken *before* the snapshot, so at most ``max_pending`` snapshots wait behind the one
being written and memory stays bounded by ``max_pending + 1`` snapshots. The stream itself never
blocks: the slots are the bound. The first time a caller has to wait for a slot, one WARNING advises
saving less often.

Nothing in ``submit`` waits for the event loop: the slots are a condition variable on the caller's
side, and the job is handed over with the loop's ``call_soon_threadsafe`` (FIFO, so jobs and flush
markers keep their order). Each round trip through the portal costs a thread wake-up, a few
milliseconds on busy cores, which is most of what a small model's save would otherwise stall for.

The event loop runs in anyio's portal thread; the blocking I/O runs in anyio worker threads, so the
loop stays free to overlap other stages (a remote upload of one checkpoint while the next is
written). A failure in a job is caught, kept in order, and raised once by :meth:`Worker.raise_errors`
at the caller's next call. ``flush()`` sends a marker through the same stream and waits for it, so it
returns when every job queued before it has finished.

Pending work is flushed at interpreter exit: the owner registers its ``close`` with
``threading._register_atexit`` (as ``concurrent.futures`` does), which runs *before* the interpreter
joins non-daemon threads; a plain ``atexit`` hook would run after, too late for anyio's worker threads.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import AbstractContextManager
from dataclasses import dataclass

import anyio
import anyio.to_thread
from anyio.from_thread import BlockingPortal, start_blocking_portal
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from bgsave.errors import CheckpointError, CheckpointWriteError, WorkerError, WorkerTimeoutError

__all__ = ("Job", "SaveRecord", "Worker")

logger = logging.getLogger(__name__)

# How many finished-save records a manager keeps (oldest dropped first).
RECORDS_KEPT = 1024


@dataclass(frozen=True, slots=True)
class SaveRecord:
    """Timings of one finished save.

    Attributes:
        kind: "agent" or "trainer_state".
        epoch: The epoch saved.
        path: The file written (local path or URL).
        stall_s: Seconds the caller was blocked in ``save_*`` (waiting for a slot plus the CPU copy).
        queue_wait_s: Seconds between the call returning and the write starting.
        write_s: Seconds from the write starting to the files being durable.
        bytes: Bytes written (all files of this save).
        ok: Whether the save committed.
        error: The error's message when it did not.
        after_s: Seconds spent in the after-step (upload, retention), 0.0 when there was none.
        after_error: The after-step's error message (the commit stands regardless).
    """

    kind: str
    epoch: int
    path: str
    stall_s: float
    queue_wait_s: float
    write_s: float
    bytes: int
    ok: bool
    error: str | None = None
    after_s: float = 0.0
    after_error: str | None = None


@dataclass(eq=False)
class Job:
    """One unit of background work: ``prepare`` runs on the caller's thread, ``execute`` on the worker's.

    ``execute`` returns the bytes written; ``cleanup`` always runs after it (success or not), on the
    worker's thread, to give buffers back. ``after`` runs only if ``execute`` succeeded, in the second
    lane (uploads, retention); its failure is logged and recorded, and undoes nothing.
    """

    kind: str
    epoch: int
    path: str
    prepare: Callable[[], None]
    execute: Callable[[], int]
    cleanup: Callable[[], None] = lambda: None
    after: Callable[[], None] | None = None
    # Jobs that hold no snapshot (sidecar edits) do not take a slot, so they never wait behind a big write.
    needs_slot: bool = True
    # Filled in as the job moves through the lanes.
    stall_s: float = 0.0
    queued_at: float = 0.0
    started_at: float = 0.0
    write_s: float = 0.0
    written: int = 0
    error: CheckpointError | None = None


# What the stream carries: jobs, and flush markers (a future set once everything before it is done).
_Item = Job | Future[None]


async def _running_loop() -> asyncio.AbstractEventLoop:
    return asyncio.get_running_loop()


class _Slots:
    """A counting semaphore taken on the caller's thread and given back from the event loop.

    Unlike ``threading.Semaphore`` it can be *closed*: a caller waiting for a slot of a worker that
    died wakes up instead of waiting forever.
    """

    def __init__(self, count: int) -> None:
        self._free = count
        self._closed = False
        self._cond = threading.Condition()

    def take(self, *, block: bool) -> bool:
        """Take a slot; False when none is free (``block=False``) or the worker has stopped."""
        with self._cond:
            while self._free == 0 and block and not self._closed:
                self._cond.wait()
            if self._free == 0 or self._closed:
                return False
            self._free -= 1
            return True

    def give(self) -> None:
        with self._cond:
            self._free += 1
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class Worker:
    """Runs jobs in order on one background event loop, or inline when ``background`` is False.

    Args:
        background: Write on the worker (True) or synchronously in ``submit`` (False).
        max_pending: How many prepared jobs may wait behind the one being executed.
        name: Used in thread names and log lines.
        periodic: ``(seconds, fn)``: run ``fn`` in a worker thread every ``seconds`` while the
            worker lives (the writer lock's heartbeat); its errors are logged.
    """

    def __init__(
        self,
        *,
        background: bool,
        max_pending: int,
        name: str,
        periodic: tuple[float, Callable[[], None]] | None = None,
    ) -> None:
        self.background = background
        self._periodic = periodic
        self.max_pending = max_pending
        self.name = name
        self.records: collections.deque[SaveRecord] = collections.deque(maxlen=RECORDS_KEPT)
        self._errors: collections.deque[CheckpointError] = collections.deque()
        self._warned_backpressure = False
        self._portal_cm: AbstractContextManager[BlockingPortal] | None = None
        self._portal: BlockingPortal | None = None
        self._run_future: Future[None] | None = None
        if background:
            self._start()

    # ---- lifecycle ------------------------------------------------------------------------
    def _start(self) -> None:
        self._portal_cm = start_blocking_portal(name=f"bgsave-{self.name}")
        portal = self._portal = self._portal_cm.__enter__()
        self._slots = _Slots(self.max_pending + 1)
        # Created on the loop: anyio primitives bind to the running backend (asyncio, the portal's default).
        send, receive = portal.call(self._make_stream)
        self._send: MemoryObjectSendStream[_Item] = send
        self._loop: asyncio.AbstractEventLoop = portal.call(_running_loop)
        self._run_future = portal.start_task_soon(self._run, receive)
        self._run_future.add_done_callback(lambda _: self._slots.close())

    async def _make_stream(
        self,
    ) -> tuple[MemoryObjectSendStream[_Item], MemoryObjectReceiveStream[_Item]]:
        return anyio.create_memory_object_stream[_Item](math.inf)

    def close(self, timeout: float | None = None) -> None:
        """Finish every queued job, then stop the event loop. Idempotent.

        Raises:
            WorkerTimeoutError: the jobs did not finish in ``timeout`` seconds; the worker is
                abandoned (a write stuck in the kernel cannot be interrupted).
            WorkerError: the worker had died.
        """
        if self._portal is None:
            return
        portal = self._portal
        try:
            self.flush(timeout)
        except WorkerError:
            self._portal = None
            self._send.close()
            # Don't join a thread that may never return: ask the loop to stop and leave it.
            with contextlib.suppress(Exception):
                portal.start_task_soon(portal.stop, True)
            raise
        self._portal = None
        try:
            portal.call(self._send.aclose)
            if self._run_future is not None:
                self._run_future.result()
        finally:
            assert self._portal_cm is not None
            self._portal_cm.__exit__(None, None, None)

    def when_stopped(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once the event loop's work has ended (at once if it has)."""
        if self._run_future is None:
            callback()
        else:
            self._run_future.add_done_callback(lambda _: callback())

    def _check_alive(self) -> None:
        if self._run_future is not None and self._run_future.done():
            raise self._died()

    def _died(self) -> WorkerError:
        future = self._run_future
        error = WorkerError(f"{self.name}: the background checkpoint worker stopped unexpectedly")
        if future is not None and future.done() and not future.cancelled():
            error.__cause__ = future.exception()
        return error

    # ---- submitting -----------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        """Prepare ``job`` on this thread and queue it (or run it now when not in background).

        Blocks while ``max_pending`` jobs already wait. If ``prepare`` raises, nothing is queued and
        the exception propagates.
        """
        start = time.perf_counter()
        if self._portal is None:
            job.prepare()
            job.queued_at = time.perf_counter()
            job.stall_s = job.queued_at - start
            self._execute([job])
            self._finish([job])
            self.raise_errors()
            return
        self._check_alive()
        if job.needs_slot and not self._slots.take(block=False):
            waited_from = time.perf_counter()
            if not self._slots.take(block=True):
                raise self._died()
            self._warn_backpressure(job, time.perf_counter() - waited_from)
        try:
            job.prepare()
            job.queued_at = time.perf_counter()
            job.stall_s = job.queued_at - start
            self._hand_over(job)
        except BaseException:
            if job.needs_slot:
                self._slots.give()
            raise

    def _hand_over(self, item: _Item) -> None:
        """Queue ``item`` on the loop without waiting for it (see the module docstring).

        Not ``portal.call``: that waits for the loop to wake up, and a portal call made while a dying
        worker takes the loop down could wait forever for a callback the loop never runs.

        Raises:
            WorkerError: the loop has closed (the worker died).
        """
        try:
            self._loop.call_soon_threadsafe(self._enqueue, item)
        except RuntimeError:  # "Event loop is closed"
            error = self._died()
            raise error from error.__cause__  # the worker's own failure, not the closed loop

    def _enqueue(self, job: _Item) -> None:
        """On the loop: put a handed-over job on the stream, or fail it if the stream has closed."""
        try:
            self._send.send_nowait(job)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
            if not isinstance(job, Job):
                return  # a flush marker: the flush sees the worker's end instead
            error = CheckpointWriteError(
                f"saving {job.kind} for epoch {job.epoch} to {job.path} failed: the background worker had stopped",
                epoch=job.epoch,
                path=job.path,
            )
            error.__cause__ = exc
            self._errors.append(error)
            job.cleanup()
            if job.needs_slot:
                self._slots.give()

    def _warn_backpressure(self, job: Job, waited: float) -> None:
        if self._warned_backpressure:
            logger.debug("%s: save of epoch %d waited %.2fs for a free slot", self.name, job.epoch, waited)
            return
        self._warned_backpressure = True
        logger.warning(
            "%s: save of epoch %d waited %.3fs for earlier checkpoints to be written (max_pending=%d); "
            "consider checkpointing less often or raising max_pending",
            self.name,
            job.epoch,
            waited,
            self.max_pending,
        )

    def flush(self, timeout: float | None = None) -> None:
        """Block until every job submitted so far has finished (successfully or not).

        Raises:
            WorkerTimeoutError: not finished within ``timeout`` seconds (the jobs keep running).
            WorkerError: the worker died.
        """
        if self._portal is None:
            return
        self._check_alive()
        assert self._run_future is not None
        marker: Future[None] = Future()
        self._hand_over(marker)
        done, _ = concurrent.futures.wait(
            [marker, self._run_future], timeout, return_when=concurrent.futures.FIRST_COMPLETED
        )
        if marker in done:
            return
        if done:
            raise self._died()
        raise WorkerTimeoutError(f"{self.name}: queued checkpoint writes did not finish within {timeout}s")

    # ---- the event loop side -------------------------------------------------------------
    async def _run(self, receive: MemoryObjectReceiveStream[_Item]) -> None:
        # Two lanes: writes, strictly in order; then each committed job's after-step (uploads,
        # retention) in a second lane, so a slow upload of epoch N overlaps the write of N+1.
        # Flush markers pass through both lanes, so a flush also waits for the after-steps.
        after_send, after_receive = anyio.create_memory_object_stream[_Item](math.inf)
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._run_after, after_receive)
            stop_periodic = anyio.Event()
            if self._periodic is not None:
                tg.start_soon(self._run_periodic, *self._periodic, stop_periodic)
            async with receive, after_send:
                async for item in receive:
                    if isinstance(item, Job):
                        try:
                            await anyio.to_thread.run_sync(self._execute, [item])
                        finally:
                            if item.needs_slot:
                                self._slots.give()
                    await after_send.send(item)
                    # A finished job's closures hold its manager: don't keep it alive while idle.
                    del item
            # The stream closed: the after-lane drains by itself; the periodic task must be told.
            stop_periodic.set()

    async def _run_periodic(self, seconds: float, fn: Callable[[], None], stop: anyio.Event) -> None:
        while True:
            with anyio.move_on_after(seconds):
                await stop.wait()
            if stop.is_set():
                return
            try:
                await anyio.to_thread.run_sync(fn)
            except Exception:
                logger.warning("%s: periodic task failed", self.name, exc_info=True)

    async def _run_after(self, receive: MemoryObjectReceiveStream[_Item]) -> None:
        async with receive:
            async for item in receive:
                if isinstance(item, Future):
                    item.set_result(None)
                else:
                    await anyio.to_thread.run_sync(self._finish, [item])
                del item

    def _execute(self, box: list[Job]) -> None:
        """Run the write; a failure is kept for the caller, never raised here.

        The job comes in a list that is emptied here: anyio's idle worker thread keeps its last
        arguments, and a job must not outlive its run (its closures hold the manager).
        """
        job = box.pop()
        job.started_at = time.perf_counter()
        try:
            job.written = job.execute()
        except Exception as exc:
            error = CheckpointWriteError(
                f"saving {job.kind} for epoch {job.epoch} to {job.path} failed: {type(exc).__name__}: {exc}",
                epoch=job.epoch,
                path=job.path,
            )
            error.__cause__ = exc
            job.error = error
            self._errors.append(error)
            logger.debug("%s: %s", self.name, error)
        finally:
            job.cleanup()
            job.write_s = time.perf_counter() - job.started_at

    def _finish(self, box: list[Job]) -> None:
        """Run the after-step of a committed job (its failure is logged and recorded, never raised), then record."""
        job = box.pop()
        after_s, after_error = 0.0, None
        if job.after is not None and job.error is None:
            started = time.perf_counter()
            try:
                job.after()
            except Exception as exc:
                after_error = f"{type(exc).__name__}: {exc}"
                logger.warning("%s: after saving epoch %d (%s): %s", self.name, job.epoch, job.path, after_error)
            after_s = time.perf_counter() - started
        self.records.append(
            SaveRecord(
                kind=job.kind,
                epoch=job.epoch,
                path=job.path,
                # Without a background worker the caller is blocked for the write too.
                stall_s=job.stall_s if self.background else job.stall_s + job.write_s,
                queue_wait_s=job.started_at - job.queued_at,
                write_s=job.write_s,
                bytes=job.written,
                ok=job.error is None,
                error=None if job.error is None else str(job.error),
                after_s=after_s,
                after_error=after_error,
            )
        )

    # ---- errors ---------------------------------------------------------------------------
    def raise_errors(self) -> None:
        """Raise the oldest background failure not yet raised, if any; later ones stay for the next call."""
        if not self._errors:
            return
        error = self._errors.popleft()
        if self._errors:
            more = ", ".join(str(e.epoch) for e in self._errors)
            error.args = (f"{error.args[0]} (further failed saves, raised at the next calls: epochs {more})",)
        raise error

    def pending_errors(self) -> int:
        """How many failures are kept, not yet raised."""
        return len(self._errors)

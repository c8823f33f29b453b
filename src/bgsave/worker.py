"""Worker: one long-lived background writer per manager, a bounded queue for backpressure, errors kept and re-raised.

The flow of one save::

    caller thread                         event loop thread (anyio, in a blocking portal)
    -------------                         ------------------------------------------------
    submit(job):
      take a slot (backpressure.Slots)   # blocks when max_pending + 1 are taken
      job.prepare()   (snapshot to CPU)
      hand job over   ──────────────────▶ memory object stream ──▶ _run():
      return                                                          to_thread.run_sync(job.execute)
                                                                      # blocking file I/O off the loop
                                                                      give the slot back

The slot is taken *before* the snapshot, so memory stays bounded by ``max_pending + 1`` snapshots
(:mod:`bgsave.backpressure`, which also decides when a wait is worth a WARNING). A worker is inline
(no loop), running, dead (its loop ended unexpectedly) or closed (:class:`State`).

Nothing in ``submit`` waits for the event loop: the slots are a condition variable on the caller's
side, and the job goes over with the loop's ``call_soon_threadsafe`` (FIFO: jobs and flush markers
keep their order). A portal round trip costs a thread wake-up, a few milliseconds on busy cores.

The loop runs in anyio's portal thread, the blocking I/O in anyio worker threads, so the loop stays
free to overlap stages (the after-commit step of one checkpoint while the next is written). A job's
failure is kept in order and raised once by :meth:`Worker.raise_errors` at the caller's next call
(so is what :meth:`Worker.report` is given: the mirror's). ``flush()`` sends a marker through the
same stream and waits for it: every job queued before it has finished (also at interpreter exit).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import enum
import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import AbstractContextManager
from typing import Any

import anyio
import anyio.to_thread
from anyio.from_thread import BlockingPortal, start_blocking_portal
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from bgsave import backpressure
from bgsave.errors import CheckpointError, CheckpointWriteError, WorkerError, WorkerTimeoutError
from bgsave.jobs import RECORDS_KEPT, Job, Run, SaveRecord

__all__ = ("State", "Worker")

logger = logging.getLogger(__name__)


class State(enum.Enum):
    """Where a worker is in its life."""

    INLINE = "inline"  # no background loop: jobs run in submit()
    RUNNING = "running"
    DEAD = "dead"  # the loop ended unexpectedly; close() tears down what is left
    CLOSED = "closed"


# What the stream carries: jobs, and flush markers (a future set once everything before it is done).
_Item = Run | Future[None]


async def _running_loop() -> asyncio.AbstractEventLoop:
    return asyncio.get_running_loop()


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
        self.report: Callable[[CheckpointError], None] = self._errors.append  # a failure from outside: raised alike
        self._in_flight: collections.Counter[int] = collections.Counter()
        self._in_flight_lock = threading.Lock()
        self._advisor = backpressure.Advisor(name, max_pending)
        self._portal_cm: AbstractContextManager[BlockingPortal] | None = None
        self._run_future: Future[None] | None = None
        self.state = State.INLINE
        if background:
            self._start()

    # ---- lifecycle ------------------------------------------------------------------------
    def _start(self) -> None:
        self._portal_cm = start_blocking_portal(name=f"bgsave-{self.name}")
        portal = self._portal = self._portal_cm.__enter__()
        self._slots = backpressure.Slots(self.max_pending + 1)
        # Created on the loop: anyio primitives bind to the running backend (asyncio, the portal's default).
        send, receive = portal.call(self._make_stream)
        self._send: MemoryObjectSendStream[_Item] = send
        self._loop: asyncio.AbstractEventLoop = portal.call(_running_loop)
        self._run_future = portal.start_task_soon(self._run, receive)
        self._run_future.add_done_callback(self._on_loop_end)
        self.state = State.RUNNING

    def _on_loop_end(self, _: object) -> None:
        self._slots.close()
        if self.state is State.RUNNING:
            self.state = State.DEAD

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
        if self.state is State.CLOSED:
            return
        if self.state is State.INLINE:
            self.state = State.CLOSED
            return
        portal = self._portal
        try:
            self.flush(timeout)
        except WorkerError:
            # Dead, or abandoned after a timeout: don't join a thread that may never return; ask the
            # loop to stop and leave it.
            self.state = State.CLOSED
            self._send.close()
            with contextlib.suppress(Exception):
                portal.start_task_soon(portal.stop, True)
            raise
        self.state = State.CLOSED
        try:
            portal.call(self._send.aclose)
            if self._run_future is not None:
                self._run_future.result()
        finally:
            assert self._portal_cm is not None
            self._portal_cm.__exit__(None, None, None)

    def when_stopped(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once the event loop's work has ended (at once if it has, or never ran)."""
        if self._run_future is None:
            callback()
        else:
            self._run_future.add_done_callback(lambda _: callback())

    def _check_alive(self) -> None:
        if self.state is State.DEAD:
            raise self._died()
        if self.state is State.CLOSED:
            raise WorkerError(f"{self.name}: the background checkpoint worker is closed")

    def _died(self) -> WorkerError:
        future = self._run_future
        error = WorkerError(f"{self.name}: the background checkpoint worker stopped unexpectedly")
        if future is not None and future.done() and not future.cancelled():
            error.__cause__ = future.exception()
        return error

    def in_flight(self) -> frozenset[int]:
        """Epochs of the jobs submitted and not yet written (retention must not prune them)."""
        with self._in_flight_lock:
            return frozenset(self._in_flight)

    def _track(self, epoch: int, delta: int) -> None:
        with self._in_flight_lock:
            self._in_flight[epoch] += delta
            if self._in_flight[epoch] <= 0:
                del self._in_flight[epoch]

    # ---- submitting -----------------------------------------------------------------------
    def submit(self, job: Job[Any]) -> None:
        """Prepare ``job`` on this thread and queue it (or run it now when not in background).

        Blocks while ``max_pending`` jobs already wait. If ``prepare`` raises, nothing is queued and
        the exception propagates.
        """
        start = time.perf_counter()
        run = Run(job)
        if self.state is State.INLINE:
            self._prepare(run, start)
            self._execute([run])
            self._finish([run])
            self.raise_errors()
            return
        self._check_alive()
        if job.needs_slot and not self._slots.take(block=False):
            if not self._slots.take(block=True):
                raise self._died()
            self._advisor.waited(job.epoch, time.perf_counter() - start, now=start)
        if job.needs_slot:
            self._advisor.saved(start)
        self._track(job.epoch, +1)
        try:
            self._prepare(run, start)
            self._hand_over(run)
            run.stall_s = time.perf_counter() - start  # waking the worker (the GIL) stalls the caller too
        except BaseException:
            self._track(job.epoch, -1)
            if job.needs_slot:
                self._slots.give()
            raise

    @staticmethod
    def _prepare(run: Run, start: float) -> None:
        run.payload = run.job.prepare()
        run.queued_at = time.perf_counter()
        run.stall_s = run.queued_at - start

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

    def _enqueue(self, item: _Item) -> None:
        """On the loop: put a handed-over job on the stream, or fail it if the stream has closed."""
        try:
            self._send.send_nowait(item)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
            if not isinstance(item, Run):
                return  # a flush marker: the flush sees the worker's end instead
            job = item.job
            error = CheckpointWriteError(
                f"saving {job.kind} for epoch {job.epoch} to {job.path} failed: the background worker had stopped",
                epoch=job.epoch,
                path=job.path,
            )
            error.__cause__ = exc
            self._errors.append(error)
            job.release(item.payload)
            self._track(job.epoch, -1)
            if job.needs_slot:
                self._slots.give()

    def flush(self, timeout: float | None = None) -> None:
        """Block until every job submitted so far has finished (successfully or not).

        Raises:
            WorkerTimeoutError: not finished within ``timeout`` seconds (the jobs keep running).
            WorkerError: the worker died.
        """
        if self.state in (State.INLINE, State.CLOSED):
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
                    if isinstance(item, Run):
                        try:
                            await anyio.to_thread.run_sync(self._execute, [item])
                        except BaseException:
                            # The loop is dying: a caller waiting for a slot must wake to that, not to a slot.
                            self._slots.close()
                            raise
                        finally:
                            if item.job.needs_slot:
                                self._slots.give()
                    await after_send.send(item)
                    # A finished job's closures hold its owner: don't keep it alive while idle.
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

    def _execute(self, box: list[Run]) -> None:
        """Run the write; a failure is kept for the caller, never raised here.

        The run comes in a list that is emptied here: anyio's idle worker thread keeps its last
        arguments, and a job must not outlive its run (its closures hold the manager).
        """
        run = box.pop()
        job = run.job
        run.started_at = time.perf_counter()
        try:
            run.written = job.execute(run.payload)
        except Exception as exc:
            error = CheckpointWriteError(
                f"saving {job.kind} for epoch {job.epoch} to {job.path} failed: {type(exc).__name__}: {exc}",
                epoch=job.epoch,
                path=job.path,
            )
            error.__cause__ = exc
            run.error = error
            self._errors.append(error)
            logger.debug("%s: %s", self.name, error)
        finally:
            payload, run.payload = run.payload, None
            job.release(payload)
            self._track(job.epoch, -1)
            run.write_s = time.perf_counter() - run.started_at

    def _finish(self, box: list[Run]) -> None:
        """Run the after-step of a committed job (its failure is logged and recorded, never raised), then record."""
        run = box.pop()
        job = run.job
        after_s, after_error = 0.0, None
        if job.after is not None and run.error is None:
            started = time.perf_counter()
            try:
                job.after()
            except Exception as exc:
                after_error = f"{type(exc).__name__}: {exc}"
                logger.warning("%s: after saving epoch %d (%s): %s", self.name, job.epoch, job.path, after_error)
            after_s = time.perf_counter() - started
        self.records.append(run.record(background=self.background, after_s=after_s, after_error=after_error))

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

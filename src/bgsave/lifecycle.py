"""Lifecycle: what a manager holds from its first write to its close, and what happens if it is never closed.

* **The first write** takes the run's writer lock (:mod:`bgsave.lock`) and then removes what a killed
  writer of this run left in ``checkpoints/``: bgsave's own temp files (``*.bgsave-tmp``), or
  unfinished multipart uploads on object stores, the ``.pt`` / ``trainer_N.pt`` files without a
  sidecar of epochs older than the newest committed one (a killed save or prune), and any
  ``model_N.dcp`` directory without its sidecar (a killed sharded save). Nothing else. The writer
  learns from that listing which epochs have a sidecar or trainer state, so that saving a new epoch
  needs no DELETE of an old one (:class:`bgsave.lock.HolderKnows`). With a mirror, then the
  mirror's lock and leftovers (:meth:`bgsave.mirror.Mirror.claim`). A save's first claim runs on a
  thread beside its snapshot (:meth:`Lifecycle.claiming`): on a bucket the claim is a few requests
  (0.03 s to moto) and the first snapshot fills fresh buffers (0.06 s at 128 MiB), so the first save
  stalls for the longer of the two, not their sum. The job is queued only once the claim succeeded.
* **close()** flushes the worker, stops it, waits for the mirror's uploads, writes the catalog's
  index (:mod:`bgsave.catalog_index`), releases the locks and drops the snapshot and part buffers; under
  torch.distributed a failure reaches every rank (:mod:`bgsave.distributed`). A close that times
  out leaves the lock held until the abandoned write has stopped: it may still land.
* **Dropped unclosed, or the interpreter exiting**: a finalizer closes the worker and logs (it can
  raise to no one) the errors nobody saw. It is registered with ``threading._register_atexit``, which
  runs *before* the interpreter joins non-daemon threads (as ``concurrent.futures`` does); a plain
  ``atexit`` hook would run after, too late for anyio's worker threads. The finalizer holds no
  reference to the manager.
* **SIGTERM**, on request: :mod:`bgsave.preemption`'s flag and deadline; close hands the signal on.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

from bgsave import layout
from bgsave.catalog import Catalog
from bgsave.distributed import Ranks
from bgsave.errors import CheckpointError, CheckpointWriteError, WorkerTimeoutError
from bgsave.jobs import Job
from bgsave.lock import WriterLock
from bgsave.mirror import Mirror
from bgsave.preemption import Preemption
from bgsave.snapshot import SnapshotPool
from bgsave.worker import Worker

__all__ = ("Lifecycle",)

logger = logging.getLogger(__name__)

P = TypeVar("P")


class Lifecycle:
    """The lock, the worker's end and the exit hook of one manager (see the module docstring)."""

    def __init__(
        self,
        owner: object,
        worker: Worker,
        pool: SnapshotPool,
        lock: WriterLock,
        catalog: Catalog,
        *,
        mirror: Mirror | None,
    ) -> None:
        self._worker = worker
        self._pool = pool
        self._lock = lock
        self._catalog = catalog
        self._mirror = mirror
        self._preemption: Preemption | None = None
        self._finalizer = weakref.finalize(owner, _close_quietly, worker, pool, lock, worker.name, mirror)
        self._finalizer.atexit = False
        _register_exit_hook(self._finalizer)

    def claim(self) -> None:
        """Before each write: take the writer lock the first time, then clear what a killed writer left."""
        if self._lock.held:
            if not self._worker.background:
                self._lock.heartbeat()  # no worker to refresh it periodically
            return
        storage = self._catalog.storage
        try:
            self._lock.acquire()
        except OSError as exc:  # no such bucket, access denied, read-only directory...
            raise CheckpointWriteError(
                f"cannot write to run directory {storage.display(storage.root)}: {exc}",
                path=storage.display(self._lock.path),
            ) from exc
        storage.remove_stale_temps(self._catalog.directory)
        self._remove_debris()
        if self._mirror is not None:
            self._mirror.claim()

    def claiming(self, job: Job[P]) -> Job[P]:
        """``job`` after :meth:`claim`; the first claim runs on a thread while ``job`` is prepared (its snapshot).

        The claim is joined before the payload is handed back, so nothing is queued, and nothing
        written, without the lock. If the claim fails the payload is released and its error raised;
        if the snapshot fails its error is raised, and a failed claim is tried again by the next write.
        """
        if self._lock.held:
            self.claim()
            return job
        prepare = job.prepare

        def prepare_beside_claim() -> P:
            claimed: Future[None] = Future()
            thread = threading.Thread(target=self._claim_into, args=(claimed,), name="bgsave-claim", daemon=True)
            thread.start()
            try:
                payload = prepare()
            except BaseException:
                thread.join()
                raise
            try:
                claimed.result()
            except BaseException:
                job.release(payload)
                raise
            return payload

        return dataclasses.replace(job, prepare=prepare_beside_claim)

    def _claim_into(self, claimed: Future[None]) -> None:
        try:
            self.claim()
        except BaseException as exc:
            claimed.set_exception(exc)
        else:
            claimed.set_result(None)

    def _remove_debris(self) -> None:
        """Remove a ``.pt`` or trainer state without its sidecar, of an epoch older than the newest committed.

        What a killed save or prune left, for good: a newer one was a save in flight when killed,
        replaced when the resumed run saves that epoch again.
        """
        catalog = self._catalog
        files = catalog.files()  # a start's: its resume asks the same listing (Catalog.one_listing)
        pts, sidecars = layout.epochs_in(files)
        catalog.holder_knows.listed(sidecars | layout.trainer_epochs_in(files))
        committed = pts & sidecars
        newest = max(committed, default=-1)
        shards = layout.dcp_epochs_in(files)
        names = [layout.checkpoint_name(e, layout.PT) for e in sorted(pts - sidecars - shards) if e < newest]
        names += [layout.trainer_name(e) for e in sorted(layout.trainer_epochs_in(files) - committed) if e < newest]
        # A DCP save overwrites its shards in place: an uncommitted one goes whatever its epoch.
        dirs = [layout.checkpoint_name(e, layout.DCP) for e in sorted(shards - sidecars)]
        names += dirs
        if names:
            catalog.delete(names)
            logger.info("removed %d file(s) a killed save or prune left: %s", len(names), ", ".join(names))

    def sigterm(self, preemption: Preemption) -> None:
        """Use ``preemption`` from now on, putting back the handler an earlier one replaced."""
        if self._preemption is not None:
            self._preemption.restore()
        self._preemption = preemption

    @property
    def handles_sigterm(self) -> bool:
        """Whether :meth:`sigterm` was called (``handle_sigterm``)."""
        return self._preemption is not None

    @property
    def preemption_requested(self) -> bool:
        """Whether a SIGTERM came since :meth:`sigterm` (see :mod:`bgsave.preemption`)."""
        return self._preemption is not None and self._preemption.requested

    @property
    def preempted(self) -> bool:
        """Whether a save was made after a SIGTERM: the loop's boundary is reached."""
        return self._preemption is not None and self._preemption.reached

    def saved(self, requested: bool) -> None:
        """A save was submitted; ``requested``: a SIGTERM had come before it."""
        if requested and self._preemption is not None:
            self._preemption.reached = True

    def run_final_save(self) -> None:
        """Run the deprecated ``final_save`` once, if a SIGTERM asked for it (on the caller's thread)."""
        final = self._preemption.take_final_save() if self._preemption is not None else None
        if final is not None:
            final()

    def close(self, timeout: float | None) -> None:
        """Flush and stop the worker, release the lock, drop the buffers; raise what failed and was not raised.

        After a SIGTERM what failed is logged too, as the process may end at :meth:`hand_on`.
        """
        self._finalizer.detach()
        self._close_worker(timeout)
        if self.preemption_requested:
            self._log_errors("a checkpoint write failed before the SIGTERM was handed on")
        self._worker.raise_errors()

    def end(self, timeout: float | None, ranks: Ranks, *, together: bool) -> None:
        """:meth:`close`, then drop bgsave's process group and hand a SIGTERM on (the process may end there).

        ``together``: under torch.distributed, a failure on rank 0 is raised on every rank
        (:meth:`Ranks.everywhere`); not while a ``with`` block is raising: the other ranks may be gone.
        """
        try:
            if together and ranks.distributed:
                if not ranks.is_writer:
                    self.close(timeout)  # holds nothing that could fail: rank 0 writes
                ranks.everywhere("close()", lambda: self.close(timeout))
            else:
                self.close(timeout)
        finally:
            ranks.close()
            if self._preemption is not None:
                self._preemption.finish()

    def _close_worker(self, timeout: float | None) -> None:
        try:
            self._worker.close(timeout)
            if self._mirror is not None:  # after the worker: its last commits are queued by then
                self._mirror.close(timeout)
        except WorkerTimeoutError:
            # The abandoned write may still land: the run stays ours until the worker has stopped.
            self._worker.when_stopped(self._lock.release)
            raise
        except BaseException:
            self._lock.release()  # a dead worker writes nothing more
            if self._mirror is not None:
                self._mirror.close(timeout)  # what it did commit still goes up
            raise
        else:
            self._save_index()
            self._lock.release()
        finally:
            self._pool.clear()
            self._catalog.storage.drop_buffers()
            if self._mirror is not None:
                self._mirror.storage.drop_buffers()

    def _log_errors(self, what: str) -> None:
        while self._worker.pending_errors():
            try:
                self._worker.raise_errors()
            except CheckpointError:
                logger.exception("%s: %s", self._worker.name, what)

    def _save_index(self) -> None:
        # Only the writer: the run is ours until the lock goes. A failure only costs the next reader reads.
        if not self._lock.held:
            return
        try:
            self._catalog.save_index()
        except Exception as exc:
            logger.warning("could not write the catalog index of %s: %s", self._catalog.directory, exc)


def _close_quietly(
    worker: Worker, pool: SnapshotPool, lock: WriterLock, name: str, mirror: Mirror | None, *, here: bool = False
) -> None:
    """Close an abandoned manager's worker (and mirror); their errors can reach no caller now, so they are logged."""
    if not here and threading.current_thread() is not threading.main_thread():
        # The last reference may drop on the worker's own thread, which must not wait for itself.
        args = (worker, pool, lock, name, mirror)
        threading.Thread(target=_close_quietly, args=args, kwargs={"here": True}, name=f"bgsave-close-{name}").start()
        return
    try:
        worker.close()
        if mirror is not None:
            mirror.close()
    finally:
        pool.clear()
        lock.release()
    while worker.pending_errors():
        try:
            worker.raise_errors()
        except CheckpointError:
            logger.exception("%s: a checkpoint write failed after its manager was abandoned", name)


def _register_exit_hook(hook: Callable[[], object]) -> None:
    # Fall back to atexit where threading._register_atexit is missing or shutdown has already begun.
    register = getattr(threading, "_register_atexit", None)
    if register is not None:
        try:
            register(hook)
            return
        except RuntimeError:
            pass
    import atexit

    atexit.register(hook)

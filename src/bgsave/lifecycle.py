"""Lifecycle: what a manager holds from its first write to its close, and what happens if it is never closed.

* **The first write** takes the run's writer lock (:mod:`bgsave.lock`) and then removes what a killed
  writer of this run left in ``checkpoints/``: bgsave's own temp files (``*.bgsave-tmp``), or
  unfinished multipart uploads on object stores. Nothing else is ever deleted.
* **close()** flushes the worker, stops it, writes the catalog's index (:mod:`bgsave.catalog_index`),
  releases the lock and drops the snapshot buffers. A
  close that times out leaves the lock held until the abandoned write has stopped: it may still land.
* **Dropped unclosed, or the interpreter exiting**: a finalizer closes the worker and logs (it can
  raise to no one) the errors nobody saw. It is registered with ``threading._register_atexit``, which
  runs *before* the interpreter joins non-daemon threads (as ``concurrent.futures`` does); a plain
  ``atexit`` hook would run after, too late for anyio's worker threads. The finalizer holds no
  reference to the manager.
* **SIGTERM**, on request: the handler :mod:`bgsave.preemption` installs, put back at close.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable

from bgsave.catalog import Catalog
from bgsave.errors import CheckpointError, CheckpointWriteError, WorkerTimeoutError
from bgsave.lock import WriterLock
from bgsave.snapshot import SnapshotPool
from bgsave.worker import Worker

__all__ = ("Lifecycle",)

logger = logging.getLogger(__name__)


class Lifecycle:
    """The lock, the worker's end and the exit hook of one manager (see the module docstring)."""

    def __init__(self, owner: object, worker: Worker, pool: SnapshotPool, lock: WriterLock, catalog: Catalog) -> None:
        self._worker = worker
        self._pool = pool
        self._lock = lock
        self._catalog = catalog
        self._restore_sigterm: Callable[[], None] | None = None
        self._finalizer = weakref.finalize(owner, _close_quietly, worker, pool, lock, worker.name)
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

    def sigterm(self, install: Callable[[], Callable[[], None]]) -> None:
        """Put back the handler installed before (if any), then ``install()`` a new one; its restore is kept."""
        self._put_back_sigterm()
        self._restore_sigterm = install()

    def _put_back_sigterm(self) -> None:
        if self._restore_sigterm is not None:
            self._restore_sigterm()
            self._restore_sigterm = None

    def close(self, timeout: float | None) -> None:
        """Flush and stop the worker, release the lock, drop the buffers; raise what failed and was not raised."""
        self._finalizer.detach()
        self._put_back_sigterm()
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
            self._save_index()
            self._lock.release()
        finally:
            self._pool.clear()
        self._worker.raise_errors()

    def _save_index(self) -> None:
        # Only the writer: the run is ours until the lock goes. A failure only costs the next reader reads.
        if not self._lock.held:
            return
        try:
            self._catalog.save_index()
        except Exception as exc:
            logger.warning("could not write the catalog index of %s: %s", self._catalog.directory, exc)


def _close_quietly(worker: Worker, pool: SnapshotPool, lock: WriterLock, name: str, *, here: bool = False) -> None:
    """Close an abandoned manager's worker; its errors can reach no caller now, so they are logged."""
    if not here and threading.current_thread() is not threading.main_thread():
        # The last reference may drop on the worker's own thread, which must not wait for itself.
        args = (worker, pool, lock, name)
        threading.Thread(target=_close_quietly, args=args, kwargs={"here": True}, name=f"bgsave-close-{name}").start()
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

"""Lock: one writer per run directory, so two jobs started on the same run by mistake cannot interleave saves.

A manager takes the lock on its *first write* (``save_*``, ``update_metadata``); a manager that only
reads, the CLI and the module-level functions never take it. The lock is a small JSON file beside
the checkpoints, ``{run_dir}/.bgsave-writer.lock``::

    {"pid": 4242, "host": "node17", "since": "2026-11-25T21:40:00+00:00", "heartbeat": 1764106800.0,
     "token": "9f3c…", "run": "exp1"}

* **Taking it** is one atomic create-if-absent: ``O_CREAT | O_EXCL`` on local disk, a conditional
  PUT (``If-None-Match: *``, s3fs's ``"xb"`` mode) on S3 and stores that support it. On a store
  without conditional writes (``memory://``) it is check-then-write: a race window remains.
* **Holding it**, the worker rewrites the heartbeat every ``STALE_AFTER / 4`` seconds.
* **A second writer** is refused with :class:`~bgsave.errors.RunLockedError` naming the holder's pid,
  host and start time.
* **A dead holder's lock is taken over**: on the same host when its pid no longer runs; on any host
  when its heartbeat is older than ``STALE_AFTER`` seconds (a killed node, a preempted job). A lock
  file that cannot be read yet (a writer between its create and its first write) is held until the
  file itself is older than ``STALE_AFTER``. The
  stale file is removed and the create retried, so of two writers taking over at once only one wins
  on local disk and on S3; the loser is refused.
* **Releasing** (``close()``, or the manager being dropped) deletes the file if it is still ours.
* **What the holder knows** (:class:`HolderKnows`): only it writes, so the listing taken with the lock
  and its own writes since say which epochs have files that a save would first have to uncommit.

Limits: clocks of different hosts are compared through the heartbeat, so hosts must agree on the
time to within ``STALE_AFTER``; on S3, removing a stale lock is not conditional, so two writers that
both judge the *same* lock stale at the same instant can, in a narrow window, both proceed.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from bgsave import layout
from bgsave.errors import RunLockedError
from bgsave.storage import Storage

__all__ = ("LOCK_NAME", "STALE_AFTER", "HolderKnows", "WriterLock")

logger = logging.getLogger(__name__)

LOCK_NAME = layout.LOCK_NAME
# Seconds without a heartbeat after which a holder on another host is presumed dead.
STALE_AFTER = 120.0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class WriterLock:
    """The writer's claim on one run directory.

    Args:
        storage: The run directory's storage.
        directory: The run directory (fsspec path) the lock file lives in.
        run_name: Recorded in the lock for the refusal message.
    """

    def __init__(self, storage: Storage, directory: str, run_name: str) -> None:
        self._storage = storage
        self.path = storage.join_dir(directory, LOCK_NAME)
        self._directory = directory
        self._token = uuid.uuid4().hex
        self._run_name = run_name
        self._since = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        self.held = False

    def _record(self) -> bytes:
        return json.dumps(
            {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "since": self._since,
                "heartbeat": time.time(),
                "token": self._token,
                "run": self._run_name,
            }
        ).encode()

    def acquire(self) -> None:
        """Take the lock, taking over a dead holder's; then remove the lock's own temp file a killed heartbeat left.

        Raises:
            RunLockedError: a live writer holds it (or is creating it).
        """
        if self.held:
            return
        self._storage.makedirs(self._directory)
        for _ in range(3):
            if self._create():
                self.held = True
                logger.debug("took writer lock %s", self.path)
                self._storage.remove_stale_temp(self.path)  # a heartbeat killed mid-write leaves one
                return
            holder = self._read()
            if holder is None:  # released between our create and our read: try again
                continue
            refusal = self._refusal(holder)
            if refusal is not None:
                raise RunLockedError(refusal, path=self._storage.display(self.path), holder=holder)
            logger.warning(
                "taking over the writer lock of a dead process (pid %s on %s, since %s)",
                holder.get("pid"),
                holder.get("host"),
                holder.get("since"),
            )
            self._storage.delete(self.path)
        raise RunLockedError(f"{self._storage.display(self.path)}: could not take the writer lock", path=self.path)

    def _create(self) -> bool:
        """Create the lock file if absent, atomically where the store allows; False if it exists."""
        return self._storage.create_exclusive(self.path, self._record())

    def _read(self) -> dict[str, Any] | None:
        try:
            parsed = json.loads(self._storage.read_bytes(self.path))
        except FileNotFoundError:
            return None
        except ValueError:
            return {}  # not (yet) readable: judged by its age, see _refusal
        return parsed if isinstance(parsed, dict) else {}

    def _refusal(self, holder: dict[str, Any]) -> str | None:
        """Why the lock described by ``holder`` is still held (the refusal's message), None when it is stale."""
        shown = self._storage.display(self.path)
        heartbeat = holder.get("heartbeat")
        if not isinstance(heartbeat, (int, float)) or isinstance(heartbeat, bool):
            # Empty or unreadable: a writer between its exclusive create and its first write (a slow
            # disk, a descheduled process), or one killed there. Held until older than the limit.
            facts = self._storage.facts(self.path)
            age = None if facts is None or facts.mtime is None else time.time() - facts.mtime
            if age is not None and age > STALE_AFTER:
                return None
            wait = "" if age is None else f" in {STALE_AFTER - age:.0f}s"
            return (
                f"{shown}: another writer is taking this run directory (its lock file is not written yet); "
                f"it is taken over once it is {STALE_AFTER:.0f}s old{wait}, or delete it if no writer runs"
            )
        who = (
            f"pid {holder.get('pid')} on host {holder.get('host')}, since {holder.get('since')}, "
            f"run {holder.get('run')!r}"
        )
        pid = holder.get("pid")
        if holder.get("host") == socket.gethostname() and isinstance(pid, int):
            if pid != os.getpid() and not _pid_alive(pid):
                return None
            return (
                f"{shown}: another writer holds this run directory ({who}); stop it, or write to another "
                "run_dir. The lock is taken over automatically once that process is gone"
            )
        if time.time() - heartbeat > STALE_AFTER:
            return None
        until = datetime.datetime.fromtimestamp(heartbeat + STALE_AFTER, datetime.timezone.utc)
        return (
            f"{shown}: another writer holds this run directory ({who}); stop it, or write to another run_dir. "
            f"It runs on another host, so the lock is taken over once its heartbeat has stopped for "
            f"{STALE_AFTER:.0f}s: not before {until.isoformat(timespec='seconds')} if it stops now"
        )

    @staticmethod
    def heartbeats(*locks: WriterLock | None) -> tuple[float, Callable[[], None]]:
        """The worker's periodic task: how often, and a call refreshing each lock's heartbeat (run, mirror)."""
        held = [lock for lock in locks if lock is not None]

        def beat() -> None:
            failed = []
            for lock in held:  # each one, whatever the others do
                try:
                    lock.heartbeat()
                except Exception as exc:
                    failed.append(exc)
            if failed:
                raise failed[0]

        return STALE_AFTER / 4, beat

    def heartbeat(self) -> None:
        """Refresh the heartbeat (called periodically by the worker while the lock is held)."""
        if self.held:
            self._storage.write_bytes_atomic(self.path, self._record())

    def release(self) -> None:
        """Delete the lock file if it is still ours. Idempotent."""
        if not self.held:
            return
        self.held = False
        holder = self._read()
        if holder is not None and holder.get("token") == self._token:
            self._storage.delete(self.path)
            logger.debug("released writer lock %s", self.path)


class HolderKnows:
    """Which epochs of a tier may have a sidecar or trainer state, as its writer lock's holder knows.

    Only the holder writes in a locked tier, so the epochs the listing taken with the lock found, and
    those the holder writes since, are all there can be: a save of any other epoch has nothing old to
    uncommit and sends no DELETE. Until the listing, any epoch may.
    """

    def __init__(self) -> None:
        self._listed: set[int] | None = None
        self._written: set[int] = set()

    def listed(self, epochs: Iterable[int]) -> None:
        """The epochs with a sidecar or trainer state when the lock was taken."""
        self._listed = set(epochs)

    def writing(self, epoch: int) -> None:
        """``epoch`` is about to get a file (before the write: one that fails half-way may still have landed)."""
        self._written.add(epoch)

    def may_have_files(self, epoch: int) -> bool:
        """Whether ``epoch`` may have a sidecar or trainer state in the tier."""
        return self._listed is None or epoch in self._listed or epoch in self._written

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
  when its heartbeat is older than ``STALE_AFTER`` seconds (a killed node, a preempted job). The
  stale file is removed and the create retried, so of two writers taking over at once only one wins
  on local disk and on S3; the loser is refused.
* **Releasing** (``close()``, or the manager being dropped) deletes the file if it is still ours.

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
from typing import Any

from bgsave.errors import RunLockedError
from bgsave.storage import Storage

__all__ = ("LOCK_NAME", "STALE_AFTER", "WriterLock")

logger = logging.getLogger(__name__)

LOCK_NAME = ".bgsave-writer.lock"
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
        """Take the lock, taking over a dead holder's.

        Raises:
            RunLockedError: a live writer holds it.
        """
        if self.held:
            return
        self._storage.makedirs(self._directory)
        for _ in range(3):
            if self._create():
                self.held = True
                logger.debug("took writer lock %s", self.path)
                return
            holder = self._read()
            if holder is None:  # released between our create and our read: try again
                continue
            if not self._is_stale(holder):
                raise RunLockedError(
                    f"{self._storage.display(self.path)}: another writer holds this run directory "
                    f"(pid {holder.get('pid')} on host {holder.get('host')}, since {holder.get('since')}, "
                    f"run {holder.get('run')!r}); stop it, or write to another run_dir. The lock is taken "
                    f"over automatically once that process is gone",
                    path=self._storage.display(self.path),
                    holder=holder,
                )
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
        data = self._record()
        fs = self._storage.fs
        if self._storage.is_local:
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            return True
        try:
            with fs.open(self.path, "xb") as f:
                f.write(data)
        except FileExistsError:
            return False
        except ValueError:  # the backend has no exclusive mode: check, then write
            if self._storage.is_file(self.path):
                return False
            self._storage.write_bytes_atomic(self.path, data)
        return True

    def _read(self) -> dict[str, Any] | None:
        try:
            parsed = json.loads(self._storage.read_bytes(self.path))
        except FileNotFoundError:
            return None
        except ValueError:
            return {}  # unreadable: a writer killed mid-create; treated as stale below
        return parsed if isinstance(parsed, dict) else {}

    @staticmethod
    def _is_stale(holder: dict[str, Any]) -> bool:
        heartbeat = holder.get("heartbeat")
        if not isinstance(heartbeat, (int, float)):
            return True
        pid = holder.get("pid")
        if holder.get("host") == socket.gethostname() and isinstance(pid, int):
            if pid == os.getpid():
                return False  # another manager in this very process
            if not _pid_alive(pid):
                return True
        return time.time() - heartbeat > STALE_AFTER

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

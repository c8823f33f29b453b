"""Jobs: what the writer hands the worker, and what is measured of each on its way.

A :class:`Job` is built whole by :mod:`bgsave.writer` (what to prepare on the caller's thread, what
to execute on the worker's, what to release afterwards, what to do after the commit); a :class:`Run`
is that job in flight with its payload and timings; a :class:`SaveRecord` is what is kept of it
once it finished, for ``CheckpointManager.records``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from bgsave.errors import CheckpointError

__all__ = ("RECORDS_KEPT", "Job", "Run", "SaveRecord")

P = TypeVar("P")

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


def _nothing(_: object) -> None:
    return None


@dataclass(frozen=True, eq=False)
class Job(Generic[P]):
    """One unit of background work, built whole by its owner (:mod:`bgsave.writer`).

    ``prepare`` runs on the caller's thread and returns the job's payload (a snapshot); ``execute``
    gets it on the worker's thread and returns the bytes written; ``release`` always gets it back
    afterwards (success or not) to return buffers. ``after`` runs only if ``execute`` succeeded, in
    the second lane (uploads, retention); its failure is logged and recorded, and undoes nothing.
    """

    kind: str
    epoch: int
    path: str
    prepare: Callable[[], P]
    execute: Callable[[P], int]
    release: Callable[[P], None] = _nothing
    after: Callable[[], None] | None = None
    # Jobs that hold no snapshot (sidecar edits) take no slot, so they never wait behind a big write.
    needs_slot: bool = True


@dataclass(eq=False)
class Run:
    """A job on its way through the worker: its payload and what is measured of it."""

    job: Job[Any]
    payload: Any = None
    stall_s: float = 0.0
    queued_at: float = 0.0
    started_at: float = 0.0
    write_s: float = 0.0
    written: int = 0
    error: CheckpointError | None = None

    def record(self, *, background: bool, after_s: float, after_error: str | None) -> SaveRecord:
        """What is kept of the finished run."""
        return SaveRecord(
            kind=self.job.kind,
            epoch=self.job.epoch,
            path=self.job.path,
            # Without a background worker the caller is blocked for the write too.
            stall_s=self.stall_s if background else self.stall_s + self.write_s,
            queue_wait_s=self.started_at - self.queued_at,
            write_s=self.write_s,
            bytes=self.written,
            ok=self.error is None,
            error=None if self.error is None else str(self.error),
            after_s=after_s,
            after_error=after_error,
        )

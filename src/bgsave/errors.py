"""One exception tree for everything bgsave raises.

::

    BgsaveError
    ├── InvalidArgumentError      bad input, raised at the call; nothing was written
    │                             (also a ValueError and a TypeError, so plain handlers catch it)
    ├── ManagerClosedError        a call after CheckpointManager.close() (also a RuntimeError)
    ├── RunLockedError            another live writer holds the run directory (also a RuntimeError)
    ├── WorkerError               the background worker died (also a RuntimeError)
    │   └── WorkerTimeoutError    wait(timeout=) / close(timeout=) ran out (also a TimeoutError)
    ├── DistributedError          a collective of bgsave's with the other ranks failed or timed out
    │                             (a rank died or did not make the same call; also a RuntimeError)
    └── CheckpointError           a checkpoint could not be written or read; carries .epoch and .path
        ├── CheckpointWriteError  a write failed (in the background or not); the cause is chained
        ├── CheckpointReadError   a checkpoint file is truncated, corrupt or unreadable
        ├── CheckpointNotFoundError  an explicitly requested checkpoint does not exist
        ├── WandbUploadError      logging a committed checkpoint to W&B failed (the commit stands)
        └── MirrorError           the mirror cannot be used, or an upload to it failed (a write error;
                                  the local commit stands); carries .url

Background failures are kept by the worker and raised once, in order, at the caller's next
``save_*``, ``wait()`` or ``close()``: never only logged, never as formatted traceback text.
"""

from __future__ import annotations

__all__ = (
    "BgsaveError",
    "CheckpointError",
    "CheckpointNotFoundError",
    "CheckpointReadError",
    "CheckpointWriteError",
    "DistributedError",
    "InvalidArgumentError",
    "ManagerClosedError",
    "MirrorError",
    "RunLockedError",
    "WandbUploadError",
    "WorkerError",
    "WorkerTimeoutError",
    "check_bool",
    "check_choice",
    "check_int",
)


def check_int(name: str, value: object, minimum: int) -> int:
    """Return ``value`` if it is an int (not a bool) >= ``minimum``, else raise InvalidArgumentError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidArgumentError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def check_choice(name: str, value: object, allowed: tuple[str, ...]) -> str:
    """Return ``value`` if it is one of ``allowed``, else raise InvalidArgumentError naming ``name``."""
    if not isinstance(value, str) or value not in allowed:
        raise InvalidArgumentError(f"{name} must be one of {allowed}, got {value!r}")
    return value


def check_bool(name: str, value: object) -> bool:
    """Return ``value`` if it is True or False, else raise InvalidArgumentError naming ``name``."""
    if not isinstance(value, bool):
        raise InvalidArgumentError(f"{name} must be True or False, got {value!r}")
    return value


class BgsaveError(Exception):
    """Base class of every error bgsave raises."""


class InvalidArgumentError(BgsaveError, ValueError, TypeError):
    """An argument is not allowed; the message names it and what is allowed.

    Raised before anything is queued or written.
    """


class ManagerClosedError(BgsaveError, RuntimeError):
    """The CheckpointManager was closed; open a new one to keep saving."""


class RunLockedError(BgsaveError, RuntimeError):
    """Another live writer holds the run directory's writer lock.

    Attributes:
        path: The lock file.
        holder: What the lock file says of its holder (pid, host, since, run), possibly empty.
    """

    def __init__(self, message: str, *, path: str, holder: dict[str, object] | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.holder = holder or {}


class WorkerError(BgsaveError, RuntimeError):
    """The background worker stopped unexpectedly; ``__cause__`` holds why. Open a new manager."""


class WorkerTimeoutError(WorkerError, TimeoutError):
    """Queued writes did not finish within the timeout given to ``wait()`` or ``close()``."""


class DistributedError(BgsaveError, RuntimeError):
    """A collective of bgsave's with the other ranks failed or ran past ``collective_timeout_s``.

    A rank died, or not every rank made the same call (``start_run``, ``wait()``, ``close()``);
    ``__cause__`` holds torch.distributed's error.
    """


class CheckpointError(BgsaveError):
    """A checkpoint could not be written or read.

    Attributes:
        epoch: The epoch of the checkpoint, or None where no epoch applies
            (for example the trainer state of an unknown epoch).
        path: The path or URL of the file concerned.
    """

    def __init__(self, message: str, *, epoch: int | None = None, path: str | None = None) -> None:
        super().__init__(message)
        self.epoch = epoch
        self.path = path


class CheckpointWriteError(CheckpointError):
    """Writing a checkpoint failed; ``__cause__`` holds the original error."""


class CheckpointReadError(CheckpointError):
    """A checkpoint file is truncated, corrupt or cannot be read."""


class CheckpointNotFoundError(CheckpointError, LookupError):
    """An explicitly requested checkpoint does not exist (or is not committed)."""


class WandbUploadError(CheckpointError):
    """Logging a checkpoint to W&B failed; ``__cause__`` holds W&B's error.

    The local (or bucket) checkpoint is unaffected: it committed before the upload started.
    """


class MirrorError(CheckpointWriteError):
    """The mirror (``mirror=``) cannot be used, or uploading a committed checkpoint to it failed.

    The local checkpoint is unaffected: it committed before the upload started, and loads as ever.

    Attributes:
        url: The mirror's URL.
    """

    def __init__(
        self, message: str, *, url: str | None = None, epoch: int | None = None, path: str | None = None
    ) -> None:
        super().__init__(message, epoch=epoch, path=path if path is not None else url)
        self.url = url if url is not None else (path or "")

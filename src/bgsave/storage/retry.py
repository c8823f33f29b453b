"""Retry: which storage errors are transient, and how often and how long to retry them.

:func:`is_transient` examines an exception and its causes: an HTTP answer decides by its status and
error code (408, 429, 5xx except 501, throttling codes such as ``SlowDown``); otherwise dropped
connections and timeouts are transient and everything else (403, 404, a full disk) is permanent.
:class:`RetryPolicy` bounds the attempts, with exponential backoff and jitter. :func:`run_with_retries`
is the loop every storage operation runs in (whole files, see :mod:`bgsave.storage.base`); the file
handed to caller code is guarded (:class:`Attempt`), so a storage error that ``torch.save`` turns into
a ``RuntimeError`` is still recognised. The error a failed operation ends with names the URL, keeps
the builtin ``OSError`` kind of the original, and never shows credential-like text.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import random
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import IO, Any, TypeVar, cast

from bgsave.errors import InvalidArgumentError, check_int

__all__ = (
    "DEFAULT_RETRY",
    "Attempt",
    "RetriesExhaustedError",
    "RetryPolicy",
    "abort_upload",
    "describe",
    "expired",
    "final_error",
    "is_transient",
    "run_with_retries",
)

logger = logging.getLogger(__name__)

T = TypeVar("T")


# ---- retry policy ----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often a storage operation that failed with a transient error is tried, and how long to wait.

    The wait before attempt ``n + 1`` is drawn uniformly from ``[d / 2, d]`` with
    ``d = min(max_delay, initial_delay * 2 ** (n - 1))``: exponential backoff, jittered so that many
    writers hitting the same throttled bucket do not retry in lockstep.

    Attributes:
        attempts: Attempts in all, including the first (1 disables retries).
        initial_delay: Seconds before the second attempt (before jitter).
        max_delay: Upper bound of any one wait, in seconds.

    Example:
        >>> CheckpointManager("s3://bucket/run", "exp", retry=RetryPolicy(attempts=5))  # doctest: +SKIP
    """

    attempts: int = 3
    initial_delay: float = 1.0
    max_delay: float = 30.0

    def __post_init__(self) -> None:
        check_int("attempts", self.attempts, 1)
        for name in ("initial_delay", "max_delay"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
                raise InvalidArgumentError(f"{name} must be a finite number of seconds >= 0, got {value!r}")

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        ceiling = min(self.max_delay, self.initial_delay * 2 ** (attempt - 1))
        return random.uniform(ceiling / 2, ceiling)


DEFAULT_RETRY = RetryPolicy()

# ---- transient or permanent ------------------------------------------------------------------
# Error codes of S3 (and look-alikes) worth another try; HTTP statuses likewise.
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestLimitExceeded",
        "TooManyRequestsException",
        "BandwidthLimitExceeded",
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "ServiceUnavailable",
        "OperationAborted",
        "PriorRequestNotComplete",
        "XAmzContentSHA256Mismatch",  # the body was damaged on the way (s3fs retries it too)
    }
)
_TRANSIENT_STATUS = frozenset({408, 429})
# Exception classes of the client libraries (botocore, aiohttp, fsspec, google-auth) that mean "the
# connection or the response broke", matched by name so that this module imports none of them.
_TRANSIENT_CLASS_NAMES = frozenset(
    {
        "HTTPClientError",  # botocore: ConnectionClosedError, EndpointConnectionError, Read/ConnectTimeoutError
        "IncompleteReadError",
        "ResponseStreamingError",
        "ResponseParserError",  # throttling responses with broken XML (s3fs issue 484)
        "ClientConnectionError",  # aiohttp: ServerDisconnectedError, ClientOSError, ...
        "ClientPayloadError",
        "ServerTimeoutError",
        "TransportError",  # google.auth
        "FileExpired",  # fsspec: the object was replaced while being read; a new attempt reads the new one
    }
)
_PERMANENT_TYPES = (PermissionError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError)
_TIMEOUT_TYPES = (TimeoutError, asyncio.TimeoutError, concurrent.futures.TimeoutError)


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is worth retrying: a dropped connection, a timeout, throttling or a 5xx answer.

    The exception and its causes are examined in order (s3fs raises an ``OSError`` whose cause is the
    botocore error carrying the HTTP status). An HTTP answer decides by its status and error code;
    otherwise connection and timeout errors are transient and everything else is permanent.
    """
    for error in _causes(exc):
        status, code = _http_status(error)
        if status is not None or code is not None:
            return (
                code in _TRANSIENT_CODES
                or status in _TRANSIENT_STATUS
                or (status is not None and status >= 500 and status != 501)
            )
        if isinstance(error, _PERMANENT_TYPES):
            return False
        if isinstance(error, (ConnectionError, *_TIMEOUT_TYPES)) or any(
            cls.__name__ in _TRANSIENT_CLASS_NAMES for cls in type(error).__mro__
        ):
            return True
    return False


def expired(exc: BaseException) -> bool:
    """Whether ``exc`` says the object changed since the HEAD (its ETag no longer matches)."""
    error: BaseException | None = exc
    while error is not None:
        response = getattr(error, "response", None)
        if isinstance(response, dict) and (
            response.get("Error", {}).get("Code") == "PreconditionFailed"
            or response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 412
        ):
            return True
        error = error.__cause__
    return False


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, then what it was raised from (its cause, else its unsuppressed context), and so on."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(seen) < 16:
        seen.add(id(current))
        yield current
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)


def _http_status(error: BaseException) -> tuple[int | None, str | None]:
    """The HTTP status and error code an exception carries (botocore, requests, aiohttp, gcsfs)."""
    response = getattr(error, "response", None)
    if isinstance(response, Mapping):  # botocore ClientError
        meta = response.get("ResponseMetadata") or {}
        err = response.get("Error") or {}
        status = meta.get("HTTPStatusCode")
        code = err.get("Code")
        return (status if isinstance(status, int) else None, code if isinstance(code, str) else None)
    for owner in (error, response):
        for attr in ("status_code", "status", "code"):
            value = getattr(owner, attr, None)
            if isinstance(value, int) and not isinstance(value, bool) and 100 <= value <= 599:
                return value, None
    return None, None


# Secrets that could appear in an error's text: user:password@ in a URL, presigned query parameters.
_SECRETS = re.compile(r"(?P<scheme>://)[^/\s@]+@|(?P<param>(?:X-Amz-Signature|X-Amz-Credential|Token)=)[^&\s\"']+")


def _mask(match: re.Match[str]) -> str:
    return f"{match['scheme']}***@" if match["scheme"] else f"{match['param']}***"


def describe(exc: BaseException) -> str:
    """``Type: message`` for logs and error messages, with anything credential-like masked."""
    return _SECRETS.sub(_mask, f"{type(exc).__name__}: {exc}")


def final_error(exc: BaseException, what: str, shown: str, attempts: int, transient: bool) -> OSError:
    """The error a storage operation ends with: names the URL, keeps the builtin OSError kind of ``exc``."""
    if transient:
        message = f"{what} {shown} failed after {attempts} attempt{'s' * (attempts != 1)}: {describe(exc)}"
    else:
        message = f"{what} {shown} failed: {describe(exc)}"
    kind: type[OSError] = OSError
    if isinstance(exc, OSError):
        kind = next(c for c in type(exc).__mro__ if c.__module__ == "builtins" and issubclass(c, OSError))
    return kind(message)


class RetriesExhaustedError(Exception):
    """A piece of an operation (one part of an upload) failed transiently on every attempt of its own.

    The piece was retried alone, with the same policy, so :func:`run_with_retries` ends with it at once
    instead of retrying the whole operation: otherwise the attempts would multiply (3 x 3 uploads of
    one part, and every other part sent again). The final error is built from :attr:`error`.

    Attributes:
        error: The last attempt's error.
        attempts: How many attempts the piece had.
    """

    def __init__(self, error: Exception, attempts: int) -> None:
        super().__init__(f"{describe(error)} (after {attempts} attempts)")
        self.error = error
        self.attempts = attempts


# ---- the retry loop --------------------------------------------------------------------------
# Writes are passed on in pieces of at most this size: torch.save writes each tensor in one call, and
# s3fs would otherwise buffer (and copy) a 1 GB tensor whole before sending it as one part.
WRITE_PIECE = 2**20


class _Guard:
    """Wraps the file a writer or reader gets: remembers the storage error that passed through it.

    ``torch.save`` turns an exception raised by ``write`` into a ``RuntimeError`` ("unexpected pos"),
    so the storage error is taken from here, not from what the writer raises. Large writes are passed
    on in pieces, so an upload buffer holds at most one part however large a single tensor is.
    """

    def __init__(self, f: IO[bytes], piece: int | None) -> None:
        self._f = f
        self._piece = piece
        self.error: Exception | None = None

    def _run(self, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except Exception as exc:
            if self.error is None:
                self.error = exc
            raise

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        if getattr(self._f, "closed", False):
            # torch's writer finishing its archive from its destructor, after the save was given up (a
            # Ctrl-C inside torch.save): raising there would abort the process. The file is discarded.
            return len(view)
        piece = self._piece or max(len(view), 1)

        def write_all() -> int:
            for start in range(0, len(view), piece):
                self._f.write(view[start : start + piece])
            return len(view)

        return self._run(write_all)

    def read(self, size: int = -1) -> bytes:
        return self._run(lambda: self._f.read(size))

    def readinto(self, buffer: Any) -> int:
        def readinto() -> int:
            method = getattr(self._f, "readinto", None)
            if method is not None:
                return int(method(buffer))
            view = memoryview(buffer).cast("B")
            data = self._f.read(len(view))
            view[: len(data)] = data
            return len(data)

        return self._run(readinto)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._run(lambda: self._f.seek(offset, whence))

    def flush(self) -> None:
        self._run(self._f.flush)

    def tell(self) -> int:
        return self._f.tell()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


@dataclass
class Attempt:
    """What the retry loop needs to know about the attempt in progress."""

    number: int
    guard: _Guard | None = None  # the file caller code is using, while it runs
    in_caller: bool = False  # True while (and if) caller code raised

    def call(self, f: IO[bytes], code: Callable[[IO[bytes]], T], *, piece: int | None = WRITE_PIECE) -> T:
        """Run caller code on ``f`` (guarded; writes passed on in ``piece``-sized parts), noting if it raised."""
        self.guard = _Guard(f, piece)
        self.in_caller = True
        result = code(cast(IO[bytes], self.guard))
        self.in_caller = False
        return result


def abort_upload(policy: RetryPolicy, shown: str, abort: Callable[[], object]) -> None:
    """Abort an unfinished multipart upload of ``shown``: retried (a leaked one is billed), never raising.

    An abort that still fails is logged with the URL; the bucket's lifecycle rule is the last resort.
    """
    try:
        run_with_retries(policy, "aborting the upload of", shown, lambda attempt: abort())
    except FileNotFoundError:  # NoSuchUpload: already gone
        pass
    except Exception as exc:
        logger.warning(
            "could not abort the unfinished upload of %s (%s); it may remain until the "
            "bucket's lifecycle rule (AbortIncompleteMultipartUpload) removes it",
            shown,
            describe(exc.__cause__ or exc),
        )


def run_with_retries(policy: RetryPolicy, what: str, shown: str, operation: Callable[[Attempt], T]) -> T:
    """Run ``operation`` until it succeeds, fails permanently, or runs out of ``policy``'s attempts.

    An error raised by caller code inside the operation (see :meth:`Attempt.call`) propagates as it
    is, unless a storage error passed through the guarded file first: that one is judged instead.
    :class:`RetriesExhaustedError` (a piece already retried to the end) is final.
    """
    attempt = Attempt(number=1)
    while True:
        try:
            return operation(attempt)
        except Exception as exc:
            error: Exception = exc
            if attempt.in_caller:
                storage_error = attempt.guard.error if attempt.guard is not None else None
                if storage_error is None:
                    raise  # the caller's own error: not ours to retry or rename
                error = storage_error
            if isinstance(error, RetriesExhaustedError):
                raise final_error(error.error, what, shown, error.attempts, True) from error.error
            transient = is_transient(error)
            if not transient or attempt.number >= policy.attempts:
                raise final_error(error, what, shown, attempt.number, transient) from error
            delay = policy.delay(attempt.number)
            logger.warning(
                "%s %s failed (attempt %d of %d), retrying in %.2fs: %s",
                what,
                shown,
                attempt.number,
                policy.attempts,
                delay,
                describe(error),
            )
            time.sleep(delay)
            attempt = Attempt(number=attempt.number + 1)

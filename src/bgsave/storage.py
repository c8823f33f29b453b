"""Storage: every file operation of a run directory, through fsspec, with one atomic-write strategy per backend.

A reader must never see a half-written file, whatever is killed when. How that is achieved depends on
what the backend can promise, so there are three strategies, picked from the filesystem's type:

* **Local disk** (``/path``, ``file://``): write a temp file *in the target's own directory*
  (``.{name}.tmp``: deterministic, starts with a dot, so it never matches ``model_*.pt``), flush,
  ``os.fsync``, ``os.replace`` onto the final name, then fsync the directory so the rename itself is
  durable. A rename within one directory is atomic, and the temp name is stable so a crashed save's
  leftover is found and removed by :meth:`Storage.remove_stale_temps`. fsspec's ``autocommit=False``
  and transactions are not used: they put the temp file in ``TMPDIR`` (maybe another filesystem, so
  the commit becomes a copy) and a transaction is shared by every thread using the cached instance.
  How the bytes reach the disk is :mod:`bgsave.diskfile`'s: through the page cache in 128 KiB
  writes with the disk started every 32 MiB, or, for a large checkpoint, past it with ``O_DIRECT``.
* **Object stores** (``s3://``, ``gs://``, ...): write the final key directly. A multipart upload
  becomes visible all-or-nothing when it is completed, so no temp key and no ``mv`` (a full
  server-side copy plus delete). The file is opened with ``autocommit=False``; the writer's bytes go
  out as parts of ``_WRITE_BLOCK_SIZE`` while it runs, and ``commit()`` completes the upload only
  after the writer returned and the last part was sent. On any error the file is ``discard()``-ed,
  which aborts the multipart upload (retried: real S3 bills unfinished uploads; an abort that still
  fails is logged with the URL), and marked closed. A plain ``with fs.open(url, "wb")`` would *commit
  a truncated object* when an exception passes through ``__exit__``, and so would a garbage-collected
  unclosed file. The file is opened with the filesystem's ``_open``, because ``fs.open`` also files
  every ``autocommit=False`` file in ``fs.transaction``, which is shared by every user of the cached
  instance and never emptied: a leak, and anyone's ``with fs.transaction:`` would commit or discard
  our upload. Memory: no second serialized copy of the model is made; large writes are cut into
  1 MiB pieces, so the upload buffer holds about one part (a 100 MB checkpoint to S3 peaks ~50 MiB
  above the model). Byte strings up to 5 MiB (the sidecar) are one PUT, atomic by itself.
  :meth:`Storage.makedirs` does nothing here: keys need no directories, and s3fs would create a
  missing *bucket*.
* **Anything else** (``memory://`` and other filesystems whose open files are visible while written):
  serialize into memory and store the bytes with one ``pipe_file`` call. This is as atomic as the
  backend's ``pipe_file``: for ``memory://`` it is one dict assignment.

Atomicity is per file. A checkpoint is two files, so the caller orders them: the ``.pt`` first, then
the YAML sidecar, which is the commit marker that every reader keys on.

Reading a bucket: a listing is one call (``ls`` with ``refresh=True``); a batch of sidecars is one
``cat_ranges`` call, one concurrent GET per file (``fs.cat`` would first HEAD each path); a ``.pt``
is read through a 32 MiB read-ahead cache, so ``torch.load`` of a 100 MB file takes 5 range GETs.

Retries. Each whole operation (write one file, read one file, list a directory, fetch a batch of
sidecars, delete, stat) is retried when it fails with a *transient* error, as decided by
:func:`is_transient`: dropped or refused connections, timeouts, HTTP 408/429/5xx (except 501),
throttling codes (``SlowDown``, ``Throttling``...), and an object replaced while being read. A write is
retried from the start: the writer is called again on a fresh file, and the failed attempt's partial
upload has been aborted first. Attempts are bounded (:class:`RetryPolicy`, default 3 in all) with
exponential backoff and jitter; each retry is logged at WARNING with the URL and attempt number.
Everything else is *permanent* and raised at once: access denied (403), missing bucket or file (404),
bad requests, a full disk. An exception raised by the caller's writer or reader itself (a pickling
error, say) is not a storage error: it propagates unchanged and is never retried. When a storage
operation finally fails, the error raised is an ``OSError`` of the original's builtin kind
(``PermissionError``, ``FileNotFoundError``...; plain ``OSError`` for client-library errors) whose
message names the operation, the URL and the attempts, with the original chained as ``__cause__``.

These attempts wrap whole files; the client libraries also retry single requests underneath (s3fs 5
times, botocore 5 times by default, stacking to ~40 s for a persistent 503). That inner layer is left
as configured: it saves a multi-gigabyte upload from restarting over one failed part. To fail faster,
pass ``storage_options={"config_kwargs": {"retries": {"total_max_attempts": 2}}}`` and lower
``s3fs.S3FileSystem.retries``.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import suppress
from dataclasses import dataclass
from typing import IO, Any, TypeVar, cast

import fsspec
from fsspec.implementations.local import LocalFileSystem

from bgsave import diskfile
from bgsave.errors import InvalidArgumentError
from bgsave.retry import DEFAULT_RETRY, RetryPolicy, is_transient
from bgsave.retry import describe as _describe
from bgsave.retry import final_error as _final_error

__all__ = ("DEFAULT_RETRY", "TEMP_SUFFIX", "Reader", "RetryPolicy", "Storage", "Writer", "is_transient")

logger = logging.getLogger(__name__)

T = TypeVar("T")

TEMP_SUFFIX = ".tmp"
_TEMP_NAME = re.compile(r"^\..+\.tmp$")
# Large sequential reads: one range request per 32 MiB instead of fsspec's default 5 MiB blocks.
# torch.load's opening seeks (magic at 0, zip directory at the end, back to the start) refetch about
# two blocks: a fixed ~64 MiB per load, 1.65x the bytes of a 100 MB file, noise for a 10 GB one.
_READ_BLOCK_SIZE = 32 * 2**20
# Multipart part size on object stores: the most a writer's bytes are buffered before they are sent.
# 16 MiB parts allow objects up to 160 GiB (S3's limit is 10,000 parts).
_WRITE_BLOCK_SIZE = 16 * 2**20
# Writes are passed on in pieces of at most this size: torch.save writes each tensor in one call, and
# s3fs would otherwise buffer (and copy) a 1 GB tensor whole before sending it as one part.
_WRITE_PIECE = 2**20
# Byte strings up to this size go to object stores as a single PUT.
_SINGLE_PUT_MAX = 5 * 2**20

_OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "abfs", "abfss", "az", "adl", "oss"})

Writer = Callable[[IO[bytes]], None]
Reader = Callable[[IO[bytes]], T]


# ---- the file handed to caller code ----------------------------------------------------------
class _Guard:
    """Wraps the file a writer or reader gets: remembers the storage error that passed through it.

    ``torch.save`` turns an exception raised by ``write`` into a ``RuntimeError`` ("unexpected pos"),
    so the storage error is taken from here, not from what the writer raises. Large writes are passed
    on in pieces, so an upload buffer holds at most one part however large a single tensor is.
    """

    def __init__(self, f: IO[bytes], piece: int | None = _WRITE_PIECE) -> None:
        self._f = f
        self._piece = piece
        self.error: Exception | None = None

    def _record(self, exc: Exception) -> None:
        if self.error is None:
            self.error = exc

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        piece = self._piece or max(len(view), 1)
        try:
            for start in range(0, len(view), piece):
                self._f.write(view[start : start + piece])
        except Exception as exc:
            self._record(exc)
            raise
        return len(view)

    def read(self, size: int = -1) -> bytes:
        try:
            return self._f.read(size)
        except Exception as exc:
            self._record(exc)
            raise

    def readinto(self, buffer: Any) -> int:
        try:
            readinto = getattr(self._f, "readinto", None)
            if readinto is not None:
                return int(readinto(buffer))
            view = memoryview(buffer).cast("B")
            data = self._f.read(len(view))
            view[: len(data)] = data
            return len(data)
        except Exception as exc:
            self._record(exc)
            raise

    def seek(self, offset: int, whence: int = 0) -> int:
        try:
            return self._f.seek(offset, whence)
        except Exception as exc:
            self._record(exc)
            raise

    def flush(self) -> None:
        try:
            self._f.flush()
        except Exception as exc:
            self._record(exc)
            raise

    def tell(self) -> int:
        return self._f.tell()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


@dataclass
class _Attempt:
    """What the retry loop needs to know about the attempt in progress."""

    number: int
    guard: _Guard | None = None  # the file caller code is using, while it runs
    in_caller: bool = False  # True while (and if) caller code raised


def _fsync_dir(directory: str) -> None:
    # Makes the rename durable. Some platforms (Windows) cannot open a directory, and some filesystems
    # refuse fsync on one (EINVAL); they lose nothing by skipping.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in {errno.EINVAL, errno.ENOTSUP, errno.EBADF}:
            raise
    finally:
        os.close(fd)


def _nothing() -> None:
    return None


def _temp_name(name: str) -> str:
    return f".{name}{TEMP_SUFFIX}"


class Storage:
    """The file operations of one directory tree, addressed by fsspec paths.

    Args:
        url: A local path, ``file://…``, or any fsspec URL (``s3://bucket/prefix``, ``memory://…``).
        storage_options: Passed to the fsspec filesystem (endpoint, credentials, ...).
        retry: How transient errors are retried (see the module docstring); None for
            :data:`DEFAULT_RETRY` (3 attempts in all, waiting 0.5 to 1 s, then 1 to 2 s).

    Raises:
        InvalidArgumentError: the URL's protocol is unknown to fsspec or its extra is not installed,
            or ``retry`` is not a :class:`RetryPolicy`.
    """

    def __init__(
        self, url: str, storage_options: Mapping[str, Any] | None = None, *, retry: RetryPolicy | None = None
    ) -> None:
        if not isinstance(url, (str, os.PathLike)):
            raise InvalidArgumentError(f"run_dir must be a path or URL string, got {type(url).__name__}")
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise InvalidArgumentError(f"retry must be a RetryPolicy or None, got {type(retry).__name__}")
        url = os.fspath(url)
        if not url:
            raise InvalidArgumentError("run_dir must be a non-empty path or URL")
        try:
            options = dict(storage_options or {})
            if not all(isinstance(key, str) for key in options):
                raise InvalidArgumentError(f"storage_options keys must be strings, got {sorted(map(repr, options))}")
            self.fs, root = fsspec.core.url_to_fs(url, **options)
        except ImportError as exc:
            raise InvalidArgumentError(
                f"run_dir {url!r} needs an fsspec backend that is not installed ({exc}); "
                "for s3:// install 'bgsave[s3]', for gs:// 'bgsave[gcs]'"
            ) from exc
        except ValueError as exc:
            raise InvalidArgumentError(f"run_dir {url!r} has a protocol fsspec does not know ({exc})") from exc
        self.root: str = root.rstrip("/") or root
        self.retry = retry if retry is not None else DEFAULT_RETRY
        self.is_local = isinstance(self.fs, LocalFileSystem)
        # Object stores give all-or-nothing uploads; everything else non-local is written with one pipe.
        self._is_object_store = not self.is_local and bool(_OBJECT_STORES & set(_protocols(self.fs)))

    # ---- naming -----------------------------------------------------------------------------
    def join(self, *parts: str) -> str:
        """The fsspec path of ``parts`` under the root."""
        return "/".join([self.root, *parts])

    def display(self, path: str) -> str:
        """What users see for ``path``: a plain local path, or the URL on remote filesystems."""
        return path if self.is_local else str(self.fs.unstrip_protocol(path))

    @staticmethod
    def join_dir(directory: str, name: str) -> str:
        """``directory/name`` as an fsspec path."""
        return f"{directory.rstrip('/')}/{name}"

    # ---- retrying ---------------------------------------------------------------------------
    def _retrying(self, what: str, path: str, operation: Callable[[_Attempt], T]) -> T:
        """Run ``operation`` until it succeeds, fails permanently, or runs out of attempts."""
        policy = self.retry
        attempt = _Attempt(number=1)
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
                transient = is_transient(error)
                shown = self.display(path)
                if not transient or attempt.number >= policy.attempts:
                    raise _final_error(error, what, shown, attempt.number, transient) from error
                delay = policy.delay(attempt.number)
                logger.warning(
                    "%s %s failed (attempt %d of %d), retrying in %.2fs: %s",
                    what,
                    shown,
                    attempt.number,
                    policy.attempts,
                    delay,
                    _describe(error),
                )
                time.sleep(delay)
                attempt = _Attempt(number=attempt.number + 1)

    @staticmethod
    def _call(
        attempt: _Attempt, f: IO[bytes], code: Callable[[IO[bytes]], T], *, piece: int | None = _WRITE_PIECE
    ) -> T:
        """Run caller code on ``f`` (guarded; writes passed on in ``piece``-sized parts), noting if it raised."""
        attempt.guard = _Guard(f, piece)
        attempt.in_caller = True
        result = code(cast(IO[bytes], attempt.guard))
        attempt.in_caller = False
        return result

    # ---- writing ----------------------------------------------------------------------------
    def makedirs(self, path: str) -> None:
        """Create ``path`` and its parents where the backend has directories.

        A no-op on object stores: keys need no directories, and s3fs would create a missing *bucket*.
        """
        if self._is_object_store:
            return
        self._retrying("creating", path, lambda _: self.fs.makedirs(path, exist_ok=True))

    def write_atomic(
        self, path: str, write: Writer, *, before_commit: Callable[[], None] | None = None, direct: bool = False
    ) -> int:
        """Write a file so that readers see either the old content or all of the new, never part.

        Transient storage errors are retried by calling ``write`` again on a fresh file, so it must
        write the same bytes each time it is called.

        Args:
            path: The final fsspec path.
            write: Called with a binary file object to write into; anything it raises itself
                propagates unchanged, after the partial write is removed.
            before_commit: Called once the new content is complete but not yet visible, right
                before the rename / upload completion (the manager un-commits the old sidecar
                there, so a failed re-save never costs the earlier checkpoint). May run again on
                a retry: it must be idempotent.
            direct: A large file: on local disk, write it past the page cache where the filesystem
                allows (``O_DIRECT``, :mod:`bgsave.diskfile`). Other backends ignore it.

        Returns:
            The number of bytes written.

        Raises:
            OSError: the storage failed permanently, or transiently on every attempt (the message
                names the URL; the original error is the ``__cause__``).
        """
        hook = before_commit or _nothing
        if self.is_local:
            return self._retrying(
                "writing", path, lambda attempt: self._write_local(attempt, path, write, hook, direct)
            )
        operation = self._write_object if self._is_object_store else self._write_piped
        return self._retrying("writing", path, lambda attempt: operation(attempt, path, write, hook))

    def write_bytes_atomic(self, path: str, data: bytes) -> int:
        """:meth:`write_atomic` for bytes already in memory (one PUT on object stores when small)."""
        if self._is_object_store and len(data) <= _SINGLE_PUT_MAX:

            def put(_: _Attempt) -> int:
                self.fs.pipe_file(path, data)
                return len(data)

            size = self._retrying("writing", path, put)
            logger.debug("uploaded %s (%d bytes)", path, size)
            return size

        def write(f: IO[bytes]) -> None:
            f.write(data)

        return self.write_atomic(path, write)

    def _write_local(
        self, attempt: _Attempt, path: str, write: Writer, before_commit: Callable[[], None], direct: bool
    ) -> int:
        directory, name = os.path.split(path)
        tmp = os.path.join(directory, _temp_name(name))
        try:
            # A fresh file ("x": O_CREAT | O_EXCL, which also refuses a symlink planted at the temp name).
            with suppress(FileNotFoundError):
                os.unlink(tmp)
            with diskfile.create(tmp, direct=direct) as f:
                # Whole writes: the file slices or stages them itself.
                self._call(attempt, cast(IO[bytes], f), write, piece=None)
                size = f.finish()
            before_commit()
            os.replace(tmp, path)
        except BaseException:
            with suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        _fsync_dir(directory)
        logger.debug("wrote %s (%d bytes)", path, size)
        return size

    def _write_object(self, attempt: _Attempt, path: str, write: Writer, before_commit: Callable[[], None]) -> int:
        # fs._open, not fs.open: fs.open files every autocommit=False file in fs.transaction, an object
        # shared by every thread using the cached instance, and never takes it out again (a leak, and
        # someone else's ``with fs.transaction:`` would commit or discard our upload).
        f = self.fs._open(self.fs._strip_protocol(path), "wb", block_size=_WRITE_BLOCK_SIZE, autocommit=False)
        try:
            self._call(attempt, f, write)
            size = int(f.tell())
            f.close()  # sends the last part; nothing is visible until commit()
            before_commit()
            f.commit()  # completes the multipart upload: the object appears whole
        except BaseException:
            self._discard(f, path)
            raise
        logger.debug("uploaded %s (%d bytes)", path, size)
        return size

    def _discard(self, f: Any, path: str) -> None:
        """Abort an unfinished upload (retried: a leaked multipart upload is billed), never raising."""
        try:
            for number in range(1, self.retry.attempts + 1):
                try:
                    f.discard()
                    return
                except FileNotFoundError:  # NoSuchUpload: already gone
                    return
                except Exception as exc:
                    if not is_transient(exc) or number == self.retry.attempts:
                        logger.warning(
                            "could not abort the unfinished upload of %s (%s); it may remain until the "
                            "bucket's lifecycle rule (AbortIncompleteMultipartUpload) removes it",
                            self.display(path),
                            _describe(exc),
                        )
                        return
                    time.sleep(self.retry.delay(number))
        finally:
            # discard() leaves the file unusable; marking it closed stops close() and __del__ from
            # flushing (and with autocommit, committing) anything of it later.
            f.closed = True

    def _write_piped(self, attempt: _Attempt, path: str, write: Writer, before_commit: Callable[[], None]) -> int:
        buffer = io.BytesIO()
        self._call(attempt, buffer, write)
        data = buffer.getvalue()
        buffer.close()
        before_commit()
        self.fs.pipe_file(path, data)
        logger.debug("wrote %s (%d bytes)", path, len(data))
        return len(data)

    def delete(self, path: str) -> None:
        """Remove one file; a missing file is not an error."""

        def remove(_: _Attempt) -> None:
            with suppress(FileNotFoundError):
                self.fs.rm_file(path)

        self._retrying("deleting", path, remove)

    def remove_stale_temps(self, directory: str) -> list[str]:
        """Remove what a killed writer left in ``directory``; returns the names.

        Temp files on local disk; unfinished multipart uploads on S3 (billed until aborted). Call only
        while holding the writer lock: a live writer's temp file or upload would go too.
        """
        if not self.is_local:
            return self._abort_stale_uploads(directory)
        removed = []
        for name in self.list_sizes(directory):
            if _TEMP_NAME.match(name):
                self.delete(self.join_dir(directory, name))
                removed.append(name)
        if removed:
            logger.info("removed %d temp file(s) left by an interrupted save in %s", len(removed), directory)
        return removed

    def _abort_stale_uploads(self, directory: str) -> list[str]:
        list_uploads = getattr(self.fs, "list_multipart_uploads", None)
        if list_uploads is None:  # only s3fs exposes unfinished multipart uploads
            return []
        bucket, _, prefix = self.fs._strip_protocol(directory).partition("/")
        prefix = prefix.rstrip("/") + "/"
        try:
            uploads = [u for u in list_uploads(bucket) if str(u.get("Key", "")).startswith(prefix)]
            for upload in uploads:
                self.fs.abort_mpu(bucket, upload["Key"], upload["UploadId"])
        except Exception as exc:  # housekeeping only: never fail a save over it
            logger.warning("could not abort unfinished uploads under %s: %s", self.display(directory), _describe(exc))
            return []
        names = [str(u["Key"]).rsplit("/", 1)[-1] for u in uploads]
        if names:
            logger.info("aborted %d unfinished upload(s) left by an interrupted save in %s", len(names), directory)
        return names

    # ---- reading ----------------------------------------------------------------------------
    def list_sizes(self, directory: str) -> dict[str, int]:
        """File names directly in ``directory`` with their sizes, in one listing call; {} if it is missing.

        Subdirectories (and, on object stores, common prefixes) are left out.
        """
        if self.is_local:  # os.scandir is one syscall batch and needs no fsspec cache
            try:
                with os.scandir(directory) as it:
                    return {e.name: e.stat().st_size for e in it if e.is_file()}
            except (FileNotFoundError, NotADirectoryError):
                return {}

        def listing(_: _Attempt) -> list[dict[str, Any]] | None:
            try:
                entries: list[dict[str, Any]] = self.fs.ls(directory, detail=True, refresh=True)
            except FileNotFoundError:
                return None
            return entries

        entries = self._retrying("listing", directory, listing)
        return {
            e["name"].rstrip("/").rsplit("/", 1)[-1]: int(e.get("size") or 0)
            for e in entries or ()
            if e.get("type") == "file"
        }

    def read_many(self, paths: Iterable[str]) -> dict[str, bytes | Exception]:
        """Read several small files together: one batched call on remote filesystems.

        Returns:
            Each path's content, or the exception reading it raised (FileNotFoundError when it is
            missing). Paths that failed transiently are fetched again, up to the retry policy's attempts.
        """
        paths = list(dict.fromkeys(paths))
        out: dict[str, bytes | Exception] = {}
        if self.is_local:
            for p in paths:
                try:
                    with open(p, "rb") as f:
                        out[p] = f.read()
                except OSError as exc:
                    out[p] = exc
            return out
        todo = paths
        for number in range(1, self.retry.attempts + 1):
            if not todo:
                break
            # cat_ranges fetches every path concurrently with one GET each; fs.cat would first stat each.
            results = self.fs.cat_ranges(todo, None, None, on_error="return")
            out.update(zip(todo, results, strict=True))
            todo = [p for p in todo if isinstance(out[p], Exception) and is_transient(cast(Exception, out[p]))]
            if todo and number < self.retry.attempts:
                delay = self.retry.delay(number)
                logger.warning(
                    "reading %d file(s) failed (attempt %d of %d), retrying in %.2fs: %s: %s",
                    len(todo),
                    number,
                    self.retry.attempts,
                    delay,
                    self.display(todo[0]),
                    _describe(cast(Exception, out[todo[0]])),
                )
                time.sleep(delay)
        return out

    def read_bytes(self, path: str) -> bytes:
        """The whole content of one file."""

        def cat(_: _Attempt) -> bytes:
            data: bytes = self.fs.cat_file(path)
            return data

        return self._retrying("reading", path, cat)

    def read_with(self, path: str, read: Reader[T]) -> T:
        """Open ``path`` for large sequential reads and return ``read(f)``, retrying transient failures.

        On a transient storage error (also one in the middle of ``read``) the file is opened again and
        ``read`` called again from the start. What ``read`` raises itself propagates unchanged.

        Example:
            >>> agent = storage.read_with(path, lambda f: torch.load(f, weights_only=False))  # doctest: +SKIP
        """

        def attempt_read(attempt: _Attempt) -> T:
            if attempt.number > 1 and not self.is_local:
                # The size and ETag may come from a cached listing; a retry must not reuse stale ones.
                self.fs.invalidate_cache(path)
            with self.open_read(path) as f:
                return self._call(attempt, f, read)

        return self._retrying("reading", path, attempt_read)

    def open_read(self, path: str) -> IO[bytes]:
        """A binary file object for reading ``path`` in large sequential pieces (not retried: see :meth:`read_with`)."""
        if self.is_local:
            return open(path, "rb")
        f: IO[bytes] = self.fs.open(path, "rb", block_size=_READ_BLOCK_SIZE, cache_type="readahead")
        return f

    def is_file(self, path: str) -> bool:
        """Whether ``path`` exists and is a file (fsspec's ``isfile`` would report a network error as False)."""
        if self.is_local:
            return os.path.isfile(path)

        def stat(_: _Attempt) -> bool:
            try:
                return bool(self.fs.info(path).get("type") == "file")
            except FileNotFoundError:
                return False

        return self._retrying("checking", path, stat)


def _protocols(fs: Any) -> tuple[str, ...]:
    proto = fs.protocol
    return (proto,) if isinstance(proto, str) else tuple(proto)

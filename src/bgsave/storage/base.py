"""The part every backend shares: naming, retries (:mod:`~bgsave.storage.retry`), listings and reads.

Retries. Each whole operation (write one file, read one file, list a directory, fetch a batch of
sidecars, delete, stat) is retried when it fails with a *transient* error, as decided by
:func:`~bgsave.storage.retry.is_transient`: dropped or refused connections, timeouts, HTTP
408/429/5xx (except 501), throttling codes (``SlowDown``...), an object replaced while being read. A
write is retried from the start: the writer is called again on a fresh file, after the failed
attempt's partial file or upload was removed. Attempts are bounded (:class:`RetryPolicy`, default 3
in all) with exponential backoff and jitter; each retry is logged at WARNING with the URL and attempt.
Everything else is *permanent* and raised at once: access denied (403), missing bucket or file (404),
bad requests, a full disk. An exception raised by the caller's writer or reader itself (a pickling
error, say) is not a storage error: it propagates unchanged and is never retried. When a storage
operation finally fails, the error is an ``OSError`` of the original's builtin kind
(``PermissionError``, ``FileNotFoundError``...) whose message names the operation, the URL and the
attempts, with the original chained as ``__cause__``.

These attempts wrap whole files; the client libraries also retry single requests underneath (s3fs
and botocore 5 times each by default, ~40 s for a persistent 503). That layer is left as configured:
it saves a multi-gigabyte upload from restarting over one failed part.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import suppress
from datetime import datetime, timezone
from typing import IO, Any, NamedTuple, TypeVar, cast

from bgsave.errors import InvalidArgumentError
from bgsave.storage.retry import Attempt, RetryPolicy, describe, is_transient, run_with_retries

__all__ = ("Attempt", "FileFacts", "Reader", "Storage", "Writer")

logger = logging.getLogger(__name__)

T = TypeVar("T")
Writer = Callable[[IO[bytes]], None]
Reader = Callable[[IO[bytes]], T]

_COPY_PIECE = 8 * 2**20
_MTIME_KEYS = ("mtime", "LastModified", "last_modified", "updated", "modified", "created", "timeCreated")


class FileFacts(NamedTuple):
    """What a listing says of one file (a named tuple: a catalog makes thousands).

    Attributes:
        size: Bytes.
        mtime: Modification time (POSIX seconds), None where the backend gives none.
        tag: Changes whenever the content does, as far as the backend can tell (local: mtime in ns
            with the inode; object stores: the ETag); None where nothing better than size is known.
    """

    size: int
    mtime: float | None = None
    tag: object = None


def mtime_of(entry: dict[str, Any]) -> float | None:
    """The modification time in a listing entry, whichever key the backend uses, as a POSIX timestamp."""
    for key in _MTIME_KEYS:
        value = entry.get(key)
        if isinstance(value, str):
            try:
                value = datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError:
                continue
        if isinstance(value, datetime):
            return (value if value.tzinfo else value.replace(tzinfo=timezone.utc)).timestamp()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def facts_of(entry: dict[str, Any]) -> FileFacts:
    """A listing or ``info`` entry's facts: size, modification time, and the ETag (or MD5) as the tag."""
    return FileFacts(
        int(entry.get("size") or 0), mtime_of(entry), entry.get("ETag") or entry.get("etag") or entry.get("md5Hash")
    )


class Storage:
    """The file operations of one directory tree, addressed by fsspec paths; one subclass per backend.

    Made by :func:`bgsave.storage.open_storage`. Subclasses provide the atomic write
    (:meth:`write_atomic`) and may replace any operation with a faster one for their backend.

    Attributes:
        fs: The fsspec filesystem (for the backends' own use; callers use the methods).
        root: The fsspec path the storage was opened at.
        retry: How transient errors are retried.
        max_concurrency: Requests in flight at once for one file, where the backend sends several
            (the parts of an object-store upload, the ranges of a read).
    """

    #: Whether a directory exists apart from the files in it (local disk), so a missing one is an error.
    has_directories = False

    def __init__(self, fs: Any, root: str, retry: RetryPolicy, max_concurrency: int = 8) -> None:
        self.fs = fs
        self.root: str = root.rstrip("/") or root
        self.retry = retry
        self.max_concurrency = max_concurrency

    # ---- naming -----------------------------------------------------------------------------
    def join(self, *parts: str) -> str:
        """The fsspec path of ``parts`` under the root."""
        return "/".join([self.root, *parts])

    def display(self, path: str) -> str:
        """What users see for ``path``: the URL (a plain path on local disk)."""
        return str(self.fs.unstrip_protocol(path))

    @staticmethod
    def join_dir(directory: str, name: str) -> str:
        """``directory/name`` as an fsspec path."""
        return f"{directory.rstrip('/')}/{name}"

    # ---- retrying ---------------------------------------------------------------------------
    def retrying(self, what: str, path: str, operation: Callable[[Attempt], T]) -> T:
        """Run ``operation`` until it succeeds, fails permanently, or runs out of attempts (module docstring)."""
        return run_with_retries(self.retry, what, self.display(path), operation)

    # ---- writing ----------------------------------------------------------------------------
    def drop_buffers(self) -> None:
        """Free the memory kept from one write for the next (an object store's part buffers); nothing here."""

    def makedirs(self, path: str) -> None:
        """Create ``path`` and its parents where the backend has directories."""
        self.retrying("creating", path, lambda _: self.fs.makedirs(path, exist_ok=True))

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
                before it replaces the old (a re-save un-commits the old sidecar there, so a
                failed re-save never costs the earlier checkpoint). May run again on a retry.
            direct: A large file laid out for :meth:`alignment_for`: the local backend writes it
                past the page cache where the filesystem allows; the others ignore it.

        Returns:
            The number of bytes written.

        Raises:
            OSError: the storage failed permanently, or transiently on every attempt (the message
                names the URL; the original error is the ``__cause__``).
        """
        raise NotImplementedError

    def write_bytes_atomic(self, path: str, data: bytes) -> int:
        """:meth:`write_atomic` for bytes already in memory."""

        def write(f: IO[bytes]) -> None:
            f.write(data)

        return self.write_atomic(path, write)

    def upload_file(self, local_path: str, path: str) -> int:
        """Copy the local file ``local_path`` to ``path``, atomically (:meth:`write_atomic`); returns its size.

        Read in 8 MiB pieces, never whole; used to mirror a committed local checkpoint to a bucket.
        The local file must not change meanwhile.
        """

        def copy(f: IO[bytes]) -> None:
            with open(local_path, "rb") as source:
                while piece := source.read(_COPY_PIECE):
                    f.write(piece)

        return self.write_atomic(path, copy)

    def create_exclusive(self, path: str, data: bytes) -> bool:
        """Create ``path`` holding ``data`` unless it exists; False if it does.

        Atomic where the backend offers a create-if-absent; elsewhere check-then-write (a race
        window remains, which the backend's docstring names).
        """
        if self.is_file(path):
            return False
        self.write_bytes_atomic(path, data)
        return True

    def delete(self, path: str) -> None:
        """Remove one file; a missing file is not an error."""

        def remove(_: Attempt) -> None:
            with suppress(FileNotFoundError):
                self.fs.rm_file(path)

        self.retrying("deleting", path, remove)

    def remove_tree(self, path: str) -> None:
        """Remove a directory and everything in it (a benchmark's scratch run); a missing one is fine."""

        def remove(_: Attempt) -> None:
            self.fs.invalidate_cache()
            if self.fs.exists(path):
                self.fs.rm(path, recursive=True)

        self.retrying("removing", path, remove)

    def remove_stale_temps(self, directory: str) -> list[str]:
        """Remove what a killed writer of this backend left in ``directory``; returns the names.

        Call only while holding the writer lock: a live writer's temp file or upload would go too.
        """
        return []

    def remove_stale_temp(self, path: str) -> None:
        """Remove the temp file a killed write of ``path`` left, where this backend writes temp files."""

    def alignment_for(self, nbytes: int) -> int | None:
        """Where tensor bytes should start in a file of ``nbytes`` so it can skip the page cache, or None."""
        return None

    def free_bytes(self, directory: str) -> int | None:
        """Free space where ``directory`` lives, where the backend can tell (local disk), else None."""
        return None

    # ---- reading ----------------------------------------------------------------------------
    def list_files(self, directory: str) -> Mapping[str, FileFacts]:
        """Files directly in ``directory`` (and ``*.dcp`` directories), in one listing call; {} if it is missing.

        A file gone since the listing may be missing from the mapping when its facts are looked up:
        use ``.get(name)``.
        """

        def listing(_: Attempt) -> list[dict[str, Any]]:
            try:
                entries: list[dict[str, Any]] = self.fs.ls(directory, detail=True, refresh=True)
            except (FileNotFoundError, NotADirectoryError):
                return []
            return entries

        return {
            e["name"].rstrip("/").rsplit("/", 1)[-1]: facts_of(e)
            for e in self.retrying("listing", directory, listing)
            if e.get("type") == "file" or e["name"].rstrip("/").endswith(".dcp")  # a DCP directory: one entry
        }

    def list_names(self, directory: str) -> set[str]:
        """The names of :meth:`list_files`, where a backend can list names alone for less."""
        return set(self.list_files(directory))

    def read_many(self, paths: Iterable[str]) -> dict[str, bytes | Exception]:
        """Read several small files together (one batched call where the backend has one).

        Returns:
            Each path's content, or the exception reading it raised (FileNotFoundError when it is
            missing). Paths that failed transiently are fetched again, up to the retry policy's attempts.
        """
        todo = list(dict.fromkeys(paths))
        out: dict[str, bytes | Exception] = {}
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
                    describe(cast(Exception, out[todo[0]])),
                )
                time.sleep(delay)
        return out

    def read_many_with_facts(self, paths: Iterable[str]) -> dict[str, tuple[bytes, FileFacts | None] | Exception]:
        """:meth:`read_many`, with the facts of the very file each content was read from where that is free.

        None where the backend cannot tell them without another request (the listing has them).
        """
        return {p: v if isinstance(v, Exception) else (v, None) for p, v in self.read_many(paths).items()}

    def read_bytes(self, path: str) -> bytes:
        """The whole content of one file."""
        return self.retrying("reading", path, lambda _: bytes(self.fs.cat_file(path)))

    def read_with(self, path: str, read: Reader[T]) -> T:
        """Open ``path`` for large sequential reads and return ``read(f)``, retrying transient failures.

        On a transient storage error (also one in the middle of ``read``) the file is opened again and
        ``read`` called again from the start. What ``read`` raises itself propagates unchanged.

        Example:
            >>> agent = storage.read_with(path, lambda f: torch.load(f, weights_only=False))  # doctest: +SKIP
        """

        def attempt_read(attempt: Attempt) -> T:
            if attempt.number > 1:
                # The size and ETag may come from a cached listing; a retry must not reuse stale ones.
                self.fs.invalidate_cache(path)
            with self.open_read(path) as f:
                return attempt.call(f, read)

        return self.retrying("reading", path, attempt_read)

    def open_read(self, path: str) -> IO[bytes]:
        """A binary file object for reading ``path`` (not retried: see :meth:`read_with`)."""
        f: IO[bytes] = self.fs.open(path, "rb")
        return f

    def facts(self, path: str) -> FileFacts | None:
        """What the storage says of one file, or None when ``path`` is not a file."""

        def stat(_: Attempt) -> FileFacts | None:
            try:
                entry = self.fs.info(path)
            except FileNotFoundError:
                return None
            if entry.get("type") != "file":
                return None
            return facts_of(entry)

        return self.retrying("checking", path, stat)

    def check_directory(self, argument: str = "run_dir") -> None:
        """Refuse a root that is an existing file, or options the filesystem rejects at its first call.

        Raises:
            InvalidArgumentError: naming ``argument`` (or ``storage_options``).
        """
        try:
            facts = self.facts(self.root)
        except OSError as exc:
            if isinstance(exc.__cause__, TypeError):  # s3fs takes any option, and refuses it here
                raise InvalidArgumentError(f"storage_options not accepted by the filesystem: {exc.__cause__}") from exc
            raise
        if facts is not None:
            shown = self.display(self.root)
            raise InvalidArgumentError(f"{argument} {shown} is an existing file; it must be a directory")

    def is_file(self, path: str) -> bool:
        """Whether ``path`` exists and is a file (fsspec's ``isfile`` would report a network error as False)."""
        return self.facts(path) is not None

    def exists(self, path: str) -> bool:
        """Whether anything (a file, a directory, a key prefix) exists at ``path``."""
        return bool(self.retrying("checking", path, lambda _: self.fs.exists(path)))

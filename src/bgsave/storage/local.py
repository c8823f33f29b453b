"""Local disk (``/path``, ``file://``): temp file, fsync, rename, fsync of the directory.

A write goes to a temp file *in the target's own directory* (``.{name}.bgsave-tmp``, see
:mod:`bgsave.layout`: deterministic, starts with a dot, so it never matches ``model_*.pt``), is
flushed and ``os.fsync``-ed, then ``os.replace``-d onto the final name, and the directory is fsynced
so that the rename itself is durable. A rename within one directory is atomic, and the temp name is
stable, so a killed save's leftover is found and removed by :meth:`LocalStorage.remove_stale_temps`.
fsspec's ``autocommit=False`` and transactions are not used: they put the temp file in ``TMPDIR``
(maybe another filesystem, so the commit becomes a copy), and a transaction is shared by every thread
using the cached instance. How the bytes reach the disk is :mod:`bgsave.storage.diskfile`'s: through
the page cache in 128 KiB writes with the disk started every 32 MiB, or, for a checkpoint of at least
:data:`DIRECT_MIN` bytes of tensors, past it with ``O_DIRECT``.

Reads and listings use ``os`` directly (``scandir``, ``open``): no fsspec cache to go stale, and
10,000 sidecars read in ~0.07 s.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from typing import IO, cast

from bgsave import layout
from bgsave.storage import diskfile
from bgsave.storage.base import Attempt, FileFacts, Storage, Writer

__all__ = ("DIRECT_MIN", "LocalStorage", "direct_writes_from")

logger = logging.getLogger(__name__)

DIRECT_MIN = 64 * 2**20
"""Checkpoints with at least this many bytes of tensors are written past the page cache. Below it the
page cache's CPU cost is small, and 4 KiB-aligned tensors would pad small files."""
_MAX_SMALL_READ = 2**20  # read_many reads sidecars: a few hundred bytes each


@contextmanager
def direct_writes_from(nbytes: int) -> Iterator[None]:
    """Within the block, write checkpoints of at least ``nbytes`` with ``O_DIRECT`` (tests, benchmarks).

    Example:
        >>> with direct_writes_from(2**20):  # doctest: +SKIP
        ...     mgr.save_agent(small_agent, 1)
    """
    before, LocalStorage.direct_min = LocalStorage.direct_min, nbytes
    try:
        yield
    finally:
        LocalStorage.direct_min = before


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


def _read_small(path: str, stat: bool = False) -> tuple[bytes, FileFacts | None]:
    # In 4 KiB reads: a read of the whole limit at once allocates that much for each small file. The
    # facts come from the open file (fstat): those of exactly what was read, for less than a stat.
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        facts = _facts(os.fstat(fd)) if stat else None
        data = os.read(fd, 4096)
        if len(data) == 4096:  # not a sidecar of bgsave's; read on, up to the limit
            chunks = [data]
            while len(chunks[-1]) == 4096 and len(chunks) * 4096 < _MAX_SMALL_READ:
                chunks.append(os.read(fd, 4096))
            data = b"".join(chunks)
        return data, facts
    finally:
        os.close(fd)


def _facts(st: os.stat_result) -> FileFacts:
    # The tag: inode and mtime in ns as one int (a rename onto the name changes the inode); an int,
    # not a tuple, because a catalog keeps one per sidecar and the garbage collector walks tuples.
    return FileFacts(st.st_size, st.st_mtime, st.st_ino << 64 | st.st_mtime_ns)


def _is_shards(entry: os.DirEntry[str]) -> bool:
    # A DCP checkpoint is a directory (model_N.dcp/): listed as one entry, like a file.
    return entry.name.endswith(".dcp") and entry.is_dir()


class _Listing(Mapping[str, FileFacts]):
    """The files of one ``scandir``: names at once, a file's facts (one ``stat``) when looked up.

    Finding the latest of 10,000 checkpoints needs the facts of two files, not 20,000 stats. The
    tag is (inode, mtime in ns), which a rename onto the name changes. A file gone since the
    listing is missing here too. Facts are not kept: each lookup stats afresh, and 10,000 kept
    named tuples would be 10,000 more objects for the garbage collector to walk.
    """

    def __init__(self, entries: dict[str, os.DirEntry[str]]) -> None:
        self._entries = entries

    def __getitem__(self, name: str) -> FileFacts:
        facts = self.get(name)
        if facts is None:
            raise KeyError(name)
        return facts

    def get(self, name: str, default: FileFacts | None = None) -> FileFacts | None:  # type: ignore[override]
        """The facts of ``name`` (one ``stat``), or ``default`` if it is not (or no longer) there."""
        entry = self._entries.get(name)
        if entry is None:
            return default
        try:
            facts = _facts(os.stat(entry.path))
            if entry.is_dir():  # a DCP directory: its size is its files'
                with os.scandir(entry.path) as it:
                    facts = facts._replace(size=sum(f.stat().st_size for f in it if f.is_file()))
            return facts
        except FileNotFoundError:
            return default

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


class LocalStorage(Storage):
    """A directory tree on local disk (see the module docstring)."""

    has_directories = True
    #: The O_DIRECT threshold (:data:`DIRECT_MIN`); :func:`direct_writes_from` changes it for a block.
    direct_min = DIRECT_MIN

    def display(self, path: str) -> str:
        """A plain local path."""
        return path

    def makedirs(self, path: str) -> None:
        """Create ``path`` and its parents."""
        self.retrying("creating", path, lambda _: os.makedirs(path, exist_ok=True))

    def write_atomic(
        self, path: str, write: Writer, *, before_commit: Callable[[], None] | None = None, direct: bool = False
    ) -> int:
        """Write ``path`` through a temp file in its directory (see :meth:`Storage.write_atomic`)."""
        return self.retrying("writing", path, lambda attempt: self._write(attempt, path, write, before_commit, direct))

    def _write(
        self, attempt: Attempt, path: str, write: Writer, before_commit: Callable[[], None] | None, direct: bool
    ) -> int:
        directory, name = os.path.split(path)
        tmp = os.path.join(directory, layout.temp_name(name))
        try:
            # A fresh file ("x": O_CREAT | O_EXCL, which also refuses a symlink planted at the temp name).
            with suppress(FileNotFoundError):
                os.unlink(tmp)
            with diskfile.create(tmp, direct=direct) as f:
                # Whole writes: the file slices or stages them itself.
                attempt.call(cast(IO[bytes], f), write, piece=None)
                size = f.finish()
            if before_commit is not None:
                before_commit()
            os.replace(tmp, path)
        except BaseException:
            with suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        _fsync_dir(directory)
        logger.debug("wrote %s (%d bytes)", path, size)
        return size

    def create_exclusive(self, path: str, data: bytes) -> bool:
        """``O_CREAT | O_EXCL``, then the bytes, fsynced: atomic against another creator."""
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return True

    def delete(self, path: str) -> None:
        """Remove one file; a missing file is not an error."""

        def remove(_: Attempt) -> None:
            with suppress(FileNotFoundError):
                os.unlink(path)

        self.retrying("deleting", path, remove)

    def remove_stale_temps(self, directory: str) -> list[str]:
        """Remove the temp files (bgsave's marker only) a killed writer left in ``directory``."""
        removed = sorted(name for name in self.list_names(directory) if layout.is_temp(name))
        for name in removed:
            self.delete(self.join_dir(directory, name))
        if removed:
            logger.info("removed %d temp file(s) left by an interrupted save in %s", len(removed), directory)
        return removed

    def remove_stale_temp(self, path: str) -> None:
        """Remove ``.{name}.bgsave-tmp`` beside ``path``."""
        directory, name = os.path.split(path)
        self.delete(os.path.join(directory, layout.temp_name(name)))

    def alignment_for(self, nbytes: int) -> int | None:
        """4 KiB for a checkpoint large enough to go past the page cache (:data:`DIRECT_MIN`)."""
        return diskfile.BLOCK if nbytes >= self.direct_min else None

    def free_bytes(self, directory: str) -> int | None:
        """Free bytes on the filesystem of ``directory`` (or of its nearest existing parent)."""
        while directory and not os.path.isdir(directory):
            parent = os.path.dirname(directory)
            if parent == directory:
                return None
            directory = parent
        try:
            return shutil.disk_usage(directory or ".").free
        except OSError:
            return None

    # ---- reading ----------------------------------------------------------------------------
    def list_files(self, directory: str) -> Mapping[str, FileFacts]:
        """One ``os.scandir``; each file is stat-ed only when its facts are asked for (see :class:`_Listing`)."""
        try:
            with os.scandir(directory) as it:
                return _Listing({entry.name: entry for entry in it if entry.is_file() or _is_shards(entry)})
        except (FileNotFoundError, NotADirectoryError):
            return {}

    def list_names(self, directory: str) -> set[str]:
        """Names only: no stat per file (the directory entry's type says what is a file)."""
        try:
            with os.scandir(directory) as it:
                return {entry.name for entry in it if entry.is_file() or _is_shards(entry)}
        except (FileNotFoundError, NotADirectoryError):
            return set()

    def read_many(self, paths: Iterable[str]) -> dict[str, bytes | Exception]:
        """Each small file read with one ``os.read`` (the io stack costs more than the read)."""
        return {path: read if isinstance(read, Exception) else read[0] for path, read in self._read_all(paths).items()}

    def read_many_with_facts(self, paths: Iterable[str]) -> dict[str, tuple[bytes, FileFacts | None] | Exception]:
        """Each file read and ``fstat``-ed through one open."""
        return self._read_all(paths, stat=True)

    @staticmethod
    def _read_all(paths: Iterable[str], stat: bool = False) -> dict[str, tuple[bytes, FileFacts | None] | Exception]:
        out: dict[str, tuple[bytes, FileFacts | None] | Exception] = {}
        for path in paths:
            try:
                out[path] = _read_small(path, stat)
            except OSError as exc:
                out[path] = exc
        return out

    def read_bytes(self, path: str) -> bytes:
        """The whole content of one file."""

        def read(_: Attempt) -> bytes:
            with open(path, "rb") as f:
                return f.read()

        return self.retrying("reading", path, read)

    def open_read(self, path: str) -> IO[bytes]:
        """A plain buffered file."""
        return open(path, "rb")

    def facts(self, path: str) -> FileFacts | None:
        """``os.stat`` of a regular file, None for anything else or nothing."""
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        if not os.path.isfile(path):
            return None
        return _facts(st)

    def exists(self, path: str) -> bool:
        """``os.path.exists``."""
        return os.path.exists(path)

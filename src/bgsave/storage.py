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
* **Object stores** (``s3://``, ``gs://``, ...): write the final key directly. A single PUT or a
  multipart upload becomes visible all-or-nothing when it completes, so no temp key and no ``mv``
  (which is a full server-side copy plus delete). The file is opened with ``autocommit=False`` and
  ``commit()``-ed only on success; on any error it is ``discard()``-ed, which aborts the multipart
  upload. A plain ``with fs.open(url, "wb")`` would commit a truncated object when an exception passes
  through ``__exit__``.
* **Anything else** (``memory://`` and other filesystems whose open files are visible while written):
  serialize into memory and store the bytes with one ``pipe_file`` call.

Atomicity is per file. A checkpoint is two files, so the caller (the worker) orders them: the ``.pt``
first, then the YAML sidecar, which is the commit marker that every reader keys on.
"""

from __future__ import annotations

import io
import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping
from contextlib import suppress
from typing import IO, Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from bgsave.errors import InvalidArgumentError

__all__ = ("TEMP_SUFFIX", "Storage", "Writer")

logger = logging.getLogger(__name__)

TEMP_SUFFIX = ".tmp"
_TEMP_NAME = re.compile(r"^\..+\.tmp$")
# Large sequential reads: one range request per 32 MiB instead of fsspec's default 5 MiB blocks.
_READ_BLOCK_SIZE = 32 * 2**20

Writer = Callable[[IO[bytes]], None]


def _temp_name(name: str) -> str:
    return f".{name}{TEMP_SUFFIX}"


def _fsync_dir(directory: str) -> None:
    # Makes the rename durable; some platforms (Windows) cannot open a directory, and lose nothing by skipping.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Storage:
    """The file operations of one directory tree, addressed by fsspec paths.

    Args:
        url: A local path, ``file://…``, or any fsspec URL (``s3://bucket/prefix``, ``memory://…``).
        storage_options: Passed to the fsspec filesystem (endpoint, credentials, ...).

    Raises:
        InvalidArgumentError: the URL's protocol is unknown to fsspec or its extra is not installed.
    """

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
        if not isinstance(url, (str, os.PathLike)):
            raise InvalidArgumentError(f"run_dir must be a path or URL string, got {type(url).__name__}")
        url = os.fspath(url)
        if not url:
            raise InvalidArgumentError("run_dir must be a non-empty path or URL")
        try:
            self.fs, root = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
        except ImportError as exc:
            raise InvalidArgumentError(
                f"run_dir {url!r} needs an fsspec backend that is not installed ({exc}); "
                "for s3:// install 'bgsave[s3]', for gs:// 'bgsave[gcs]'"
            ) from exc
        except ValueError as exc:
            raise InvalidArgumentError(f"run_dir {url!r} has a protocol fsspec does not know ({exc})") from exc
        self.root: str = root.rstrip("/") or root
        self.is_local = isinstance(self.fs, LocalFileSystem)
        # Object stores give all-or-nothing uploads; everything else non-local is written with one pipe.
        self._is_object_store = not self.is_local and bool(
            {"s3", "s3a", "gs", "gcs", "abfs", "az", "adl", "oss"} & set(_protocols(self.fs))
        )

    # ---- naming -----------------------------------------------------------------------------
    def join(self, *parts: str) -> str:
        """The fsspec path of ``parts`` under the root."""
        return "/".join([self.root, *parts])

    def display(self, path: str) -> str:
        """What users see for ``path``: a plain local path, or the URL on remote filesystems."""
        return path if self.is_local else str(self.fs.unstrip_protocol(path))

    # ---- writing ----------------------------------------------------------------------------
    def makedirs(self, path: str) -> None:
        """Create ``path`` and its parents where the backend has directories."""
        self.fs.makedirs(path, exist_ok=True)

    def write_atomic(self, path: str, write: Writer) -> int:
        """Write a file so that readers see either the old content or all of the new, never part.

        Args:
            path: The final fsspec path.
            write: Called with a binary file object to write into; anything it raises propagates
                after the partial write is removed.

        Returns:
            The number of bytes written.
        """
        if self.is_local:
            return self._write_local(path, write)
        if self._is_object_store:
            return self._write_object(path, write)
        buffer = io.BytesIO()
        write(buffer)
        data = buffer.getvalue()
        self.fs.pipe_file(path, data)
        return len(data)

    def write_bytes_atomic(self, path: str, data: bytes) -> int:
        """:meth:`write_atomic` for bytes already in memory."""

        def write(f: IO[bytes]) -> None:
            f.write(data)

        return self.write_atomic(path, write)

    def _write_local(self, path: str, write: Writer) -> int:
        directory, name = os.path.split(path)
        tmp = os.path.join(directory, _temp_name(name))
        try:
            with open(tmp, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
                size = f.tell()
            os.replace(tmp, path)
        except BaseException:
            with suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        _fsync_dir(directory)
        logger.debug("wrote %s (%d bytes)", path, size)
        return size

    def _write_object(self, path: str, write: Writer) -> int:
        f = self.fs.open(path, "wb", autocommit=False)
        try:
            write(f)
            size = int(f.tell())
            f.close()
            f.commit()
        except BaseException:
            # discard() aborts the multipart upload; marking the file closed stops __del__ from
            # flushing the partial buffer again.
            with suppress(Exception):
                f.discard()
            f.closed = True
            raise
        logger.debug("uploaded %s (%d bytes)", path, size)
        return size

    def delete(self, path: str) -> None:
        """Remove one file; a missing file is not an error."""
        with suppress(FileNotFoundError):
            self.fs.rm_file(path)

    def remove_stale_temps(self, directory: str) -> list[str]:
        """Remove temp files a killed writer left in ``directory`` (local disk only); returns their paths."""
        if not self.is_local:
            return []
        removed = []
        for name in self.list_sizes(directory):
            if _TEMP_NAME.match(name):
                self.delete(self.join_dir(directory, name))
                removed.append(name)
        if removed:
            logger.info("removed %d temp file(s) left by an interrupted save in %s", len(removed), directory)
        return removed

    # ---- reading ----------------------------------------------------------------------------
    @staticmethod
    def join_dir(directory: str, name: str) -> str:
        """``directory/name`` as an fsspec path."""
        return f"{directory.rstrip('/')}/{name}"

    def list_sizes(self, directory: str) -> dict[str, int]:
        """File names directly in ``directory`` with their sizes, in one listing call; {} if it is missing."""
        try:
            entries = self.fs.ls(directory, detail=True, refresh=True) if not self.is_local else None
        except FileNotFoundError:
            return {}
        if entries is None:  # local: os.scandir is one syscall batch and needs no fsspec cache
            try:
                with os.scandir(directory) as it:
                    return {e.name: e.stat().st_size for e in it if e.is_file()}
            except (FileNotFoundError, NotADirectoryError):
                return {}
        return {
            e["name"].rstrip("/").rsplit("/", 1)[-1]: int(e.get("size") or 0)
            for e in entries
            if e.get("type") == "file"
        }

    def read_many(self, paths: Iterable[str]) -> dict[str, bytes | Exception]:
        """Read several small files together (one batched call on remote filesystems)."""
        paths = list(paths)
        if not paths:
            return {}
        if self.is_local:
            out: dict[str, bytes | Exception] = {}
            for p in paths:
                try:
                    with open(p, "rb") as f:
                        out[p] = f.read()
                except OSError as exc:
                    out[p] = exc
            return out
        result = self.fs.cat(paths, on_error="return")
        return {p: result.get(p, FileNotFoundError(p)) for p in paths}

    def read_bytes(self, path: str) -> bytes:
        """The whole content of one file."""
        data: bytes = self.fs.cat_file(path)
        return data

    def open_read(self, path: str) -> IO[bytes]:
        """A binary file object for reading ``path`` in large sequential pieces."""
        if self.is_local:
            return open(path, "rb")
        f: IO[bytes] = self.fs.open(path, "rb", block_size=_READ_BLOCK_SIZE, cache_type="readahead")
        return f

    def is_file(self, path: str) -> bool:
        """Whether ``path`` exists and is a file."""
        return bool(self.fs.isfile(path))


def _protocols(fs: Any) -> tuple[str, ...]:
    proto = fs.protocol
    return (proto,) if isinstance(proto, str) else tuple(proto)

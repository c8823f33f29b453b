"""Object stores (``s3://``, ``gs://``, ...): the final key written directly, visible all-or-nothing.

A multipart upload becomes visible whole when it is completed, so there is no temp key and no ``mv``
(a full server-side copy plus delete). On S3 (s3fs) the upload is bgsave's own
(:mod:`~bgsave.storage.parts`): the writer's bytes go out as 8 MiB parts, up to ``max_concurrency``
at once, each retried alone; the upload is completed only after the writer returned and every part
was acknowledged, and aborted on any error; an object of one part is one PUT. Other stores (gcsfs...)
use the filesystem's file opened with ``autocommit=False``: parts of :data:`_WRITE_BLOCK_SIZE` are
sent while the writer runs, and ``commit()`` completes the upload after it returned. On any error the
file is ``discard()``-ed, which aborts the upload (retried: unfinished uploads are billed; an abort
that still fails is logged with the URL), and marked closed. A plain ``with fs.open(url, "wb")``
would *commit a truncated object* when an exception passes through ``__exit__``, and so would a
garbage-collected unclosed file. The file is opened with the filesystem's ``_open``, because
``fs.open`` also files every ``autocommit=False`` file in ``fs.transaction``, which is shared by every
user of the cached instance and never emptied: a leak, and anyone's ``with fs.transaction:`` would
commit or discard our upload. Memory: no second serialized copy of the model is made; large writes
are cut into 1 MiB pieces, so the upload buffers hold a few parts. Byte strings up to 5 MiB (the
sidecar) are one PUT, atomic by itself.

Creating a file only if it is absent (the writer lock) is a conditional PUT (``If-None-Match: *``,
s3fs's ``"xb"`` mode) where the store supports it. A killed writer's leftovers are unfinished
multipart uploads, aborted by :meth:`ObjectStorage.remove_stale_temps`. Reading: a listing is one
paginated call; a batch of sidecars one ``cat_ranges`` call (one concurrent GET per file); on S3 a
``.pt`` is read in 16 MiB ranged GETs, ``max_concurrency`` in flight ahead of the reader, all pinned
to one ETag; elsewhere through a 32 MiB read-ahead cache.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import IO, Any

from bgsave.storage import parts, ranges
from bgsave.storage.base import Attempt, Storage, Writer
from bgsave.storage.part_buffers import PartBuffers
from bgsave.storage.retry import RetryPolicy, abort_upload, describe

__all__ = ("OBJECT_STORES", "ObjectStorage")

logger = logging.getLogger(__name__)

OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "abfs", "abfss", "az", "adl", "oss"})
# Large sequential reads: one range request per 32 MiB instead of fsspec's default 5 MiB blocks.
# torch.load's opening seeks (magic at 0, zip directory at the end, back to the start) refetch about
# two blocks: a fixed ~64 MiB per load, noise for a 10 GB one.
_READ_BLOCK_SIZE = 32 * 2**20
# Multipart part size: the most a writer's bytes are buffered before they are sent. 16 MiB parts
# allow objects up to 160 GiB (S3's limit is 10,000 parts).
_WRITE_BLOCK_SIZE = 16 * 2**20
_SINGLE_PUT_MAX = 5 * 2**20


class ObjectStorage(Storage):
    """A key prefix in a bucket (see the module docstring)."""

    def __init__(self, fs: Any, root: str, retry: RetryPolicy, max_concurrency: int = 8) -> None:
        super().__init__(fs, root, retry, max_concurrency)
        self.part_buffers = PartBuffers(max_concurrency + 1)  # one upload's parts, kept for the next (S3)

    def drop_buffers(self) -> None:
        """Free the part buffers kept for the next upload."""
        self.part_buffers.clear()

    def makedirs(self, path: str) -> None:
        """Nothing: keys need no directories, and s3fs would create a missing *bucket*."""

    def write_atomic(
        self, path: str, write: Writer, *, before_commit: Callable[[], None] | None = None, direct: bool = False
    ) -> int:
        """One multipart upload, completed only after ``write`` returned (see :meth:`Storage.write_atomic`)."""
        if parts.supported(self.fs):
            target = self._target(path)
            size = self.retrying("writing", path, lambda a: parts.write_object(target, a, write, before_commit))
            logger.debug("uploaded %s (%d bytes)", path, size)
            return size
        return self.retrying("writing", path, lambda attempt: self._upload(attempt, path, write, before_commit))

    def upload_file(self, local_path: str, path: str) -> int:
        """On S3, parts read straight from the file (``os.pread``) and sent in parallel; else the generic copy."""
        if not parts.supported(self.fs):
            return super().upload_file(local_path, path)
        target = self._target(path)
        size = self.retrying("uploading", path, lambda _: parts.upload_local(target, local_path))
        logger.debug("uploaded %s to %s (%d bytes)", local_path, path, size)
        return size

    def _target(self, path: str) -> parts.Target:
        bucket, key, _ = self.fs.split_path(path)
        return parts.Target(
            self.fs, bucket, key, self.display(path), self.retry, self.max_concurrency, self.part_buffers
        )

    def _upload(self, attempt: Attempt, path: str, write: Writer, before_commit: Callable[[], None] | None) -> int:
        f = self.fs._open(self.fs._strip_protocol(path), "wb", block_size=_WRITE_BLOCK_SIZE, autocommit=False)
        try:
            attempt.call(f, write)
            size = int(f.tell())
            f.close()  # sends the last part; nothing is visible until commit()
            if before_commit is not None:
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
            abort_upload(self.retry, self.display(path), f.discard)
        finally:
            # discard() leaves the file unusable; marking it closed stops close() and __del__ from
            # flushing (and with autocommit, committing) anything of it later.
            f.closed = True

    def write_bytes_atomic(self, path: str, data: bytes) -> int:
        """One PUT for small byte strings (atomic by itself), else a multipart upload."""
        if len(data) > _SINGLE_PUT_MAX:
            return super().write_bytes_atomic(path, data)

        def put(_: Attempt) -> int:
            self.fs.pipe_file(path, data)
            return len(data)

        size = self.retrying("writing", path, put)
        logger.debug("uploaded %s (%d bytes)", path, size)
        return size

    def create_exclusive(self, path: str, data: bytes) -> bool:
        """A conditional PUT (``If-None-Match: *``) where the store has one; else check-then-write."""
        try:
            with self.fs.open(path, "xb") as f:
                f.write(data)
        except FileExistsError:
            return False
        except ValueError:  # no exclusive mode in this backend
            return super().create_exclusive(path, data)
        return True

    def remove_stale_temps(self, directory: str) -> list[str]:
        """Abort the unfinished multipart uploads under ``directory`` (billed until aborted)."""
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
            logger.warning("could not abort unfinished uploads under %s: %s", self.display(directory), describe(exc))
            return []
        names = [str(u["Key"]).rsplit("/", 1)[-1] for u in uploads]
        if names:
            logger.info("aborted %d unfinished upload(s) left by an interrupted save in %s", len(names), directory)
        return names

    def open_read(self, path: str) -> IO[bytes]:
        """On S3, parallel ranged GETs of one version (:class:`~bgsave.storage.ranges.ParallelReader`).

        Elsewhere large range reads through a read-ahead cache.
        """
        if parts.supported(self.fs) and not self.fs.split_path(path)[2]:  # not a pinned version
            return ranges.open_reader(self._target(path))
        f: IO[bytes] = self.fs.open(path, "rb", block_size=_READ_BLOCK_SIZE, cache_type="readahead")
        return f

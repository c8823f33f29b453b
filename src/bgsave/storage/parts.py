"""Parallel multipart uploads and ranged reads for S3 (s3fs), on s3fs's event loops.

Writing. The caller's writer (``torch.save``) writes into a :class:`PartWriter`, which buffers the
bytes into parts of :data:`PART_SIZE` (doubled every 1,000 parts: :func:`part_size`). The upload is
created, without waiting, when the first part is full (a local file of several parts: before its
first part is read); a full part is sent as one ``upload_part`` coroutine on an event loop (parts
take turns on the :mod:`~bgsave.storage.lanes`) while the writer goes on, and when
``max_concurrency`` parts are in flight it waits for any one. A part's ``BytesIO`` is sent as it is
(no copy) and refilled once acknowledged: memory stays at most ``max_concurrency + 1`` parts, kept
for the storage's next upload (:mod:`~bgsave.storage.part_buffers`). A local file (the mirror's) is
read straight into such buffers, the kernel reading ahead. Checksums are botocore's: where it puts a
CRC32 on every part (its default), the upload is created with that algorithm, each part's CRC32 is
computed in the caller's thread and the completion lists them, as s3transfer does. An object of at
most one part is one ``put_object``. The upload is completed only once the writer returned and
every part was acknowledged, right after ``before_commit``. On any error the parts in flight
finish their current request, without further attempts, and the upload is aborted
(:func:`~bgsave.storage.retry.abort_upload`): nothing visible or billed.

Retries. A part that fails transiently is retried alone, with the storage's :class:`RetryPolicy`
(logged with the URL, the part and the attempt); one that used up its attempts raises
:class:`RetriesExhaustedError`, which the whole-file loop (:func:`~bgsave.storage.retry.run_with_retries`)
treats as final, so attempts do not multiply. Creating and completing the upload are not retried
here: a failure there restarts the whole file in that loop (a completion whose answer was lost is
safe to redo; retried alone it would meet ``NoSuchUpload``).

Reading in parallel ranged GETs is :mod:`~bgsave.storage.ranges`, which shares :class:`Target` from here.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import io
import itertools
import logging
import operator
import os
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import IO, Any, TypeVar, cast

import fsspec.asyn

from bgsave.storage.lanes import lanes
from bgsave.storage.part_buffers import PartBuffers
from bgsave.storage.retry import (
    Attempt,
    RetriesExhaustedError,
    RetryPolicy,
    abort_upload,
    describe,
    expired,
    is_transient,
)

__all__ = (
    "PART_SIZE",
    "MultipartUpload",
    "PartWriter",
    "Target",
    "part_size",
    "supported",
    "upload_local",
    "write_object",
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Bytes per uploaded part, to begin with (boto3's default).
PART_SIZE = 8 * 2**20
_MAX_PARTS = 10_000  # S3's limit per upload


def part_size(sent: int) -> int:
    """The size of a streamed upload's next part, after ``sent`` parts: 8 MiB, doubled every 1,000 parts.

    A stream's length is unknown in advance, and S3 allows 10,000 parts: at a fixed 8 MiB that caps an
    object at 78 GiB; growing, 8 GB goes in 8 MiB parts and S3's 5 TB limit stays reachable.
    """
    return PART_SIZE << min(sent // 1000, 9)


def supported(fs: Any) -> bool:
    """Whether ``fs`` is an s3fs filesystem, whose requests this module sends itself."""
    return hasattr(fs, "_call_s3")


@dataclass(frozen=True, slots=True)
class Target:
    """One object, and how to reach it: the bucket and key, the URL for messages, retries, parallelism."""

    fs: Any
    bucket: str
    key: str
    shown: str
    policy: RetryPolicy
    concurrency: int
    buffers: PartBuffers  # the storage's, kept between its uploads

    def call(self, method: str, **kwargs: Any) -> Any:
        """One request on s3fs's loop, waited for."""
        return fsspec.asyn.sync(self.fs.loop, self.fs._call_s3, method, Bucket=self.bucket, Key=self.key, **kwargs)

    def submit(self, coroutine: Awaitable[T]) -> concurrent.futures.Future[T]:
        """Start ``coroutine`` on s3fs's loop without waiting."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.fs.loop)  # type: ignore[arg-type]

    async def retried(self, label: str, call: Callable[[], Awaitable[T]], stop: asyncio.Event | None = None) -> T:
        """``call()`` until it succeeds, fails permanently or used the policy's attempts (RetriesExhaustedError)."""
        for attempt in itertools.count(1):
            try:
                return await call()
            except Exception as exc:
                if (stop is not None and stop.is_set()) or not is_transient(exc) or expired(exc):
                    raise
                if attempt >= self.policy.attempts:
                    raise RetriesExhaustedError(exc, attempt) from exc
                delay = self.policy.delay(attempt)
                logger.warning(
                    "%s %s failed (attempt %d of %d), retrying in %.2fs: %s",
                    label,
                    self.shown,
                    attempt,
                    self.policy.attempts,
                    delay,
                    describe(exc),
                )
                if stop is None:
                    await asyncio.sleep(delay)
                else:  # a failed write stops waiting at once
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(stop.wait(), delay)
                    if stop.is_set():
                        raise
        raise AssertionError("unreachable")


# ---- writing ----------------------------------------------------------------------------------
def _checksum_args(fs: Any) -> dict[str, str]:
    """``{"ChecksumAlgorithm": "CRC32"}`` where botocore checksums every part by default, else ``{}``.

    Without it, the store computes a full-object checksum at completion: every byte hashed again.
    """
    client = fsspec.asyn.sync(fs.loop, fs.set_session)  # s3fs's client, made on first use
    if getattr(client.meta.config, "request_checksum_calculation", None) != "when_supported":
        return {}
    from botocore.httpchecksum import DEFAULT_CHECKSUM_ALGORITHM

    return {"ChecksumAlgorithm": str(DEFAULT_CHECKSUM_ALGORITHM)}


class MultipartUpload:
    """The parts of one object in flight; :meth:`finish` commits, :meth:`abort` leaves nothing."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self._created: concurrent.futures.Future[str] | None = None  # the upload's id, once the store answered
        self._done: list[dict[str, Any]] = []  # acknowledged parts, in the order they were
        self._pending: dict[concurrent.futures.Future[dict[str, Any]], io.BytesIO] = {}
        self._lanes = lanes(target.fs, target.concurrency)  # the filesystems (each on its loop) parts take turns on
        self._stops = [asyncio.Event() for _ in self._lanes]  # each set on its lane's loop when the write failed
        self._checksum: dict[str, str] = {}

    def buffer(self) -> io.BytesIO:
        """An empty buffer for a part: an acknowledged part's, of this upload or an earlier one."""
        return self.target.buffers.take()

    def start(self) -> concurrent.futures.Future[str]:
        """Create the upload, without waiting (the first part is read or serialized meanwhile); its id."""
        if self._created is None:
            self._checksum = _checksum_args(self.target.fs)
            self._created = self.target.submit(self._create())
        return self._created

    async def _create(self) -> str:
        t = self.target
        response = await t.fs._call_s3("create_multipart_upload", Bucket=t.bucket, Key=t.key, **self._checksum)
        return str(response["UploadId"])

    def send(self, data: io.BytesIO) -> None:
        """Send ``data`` up to its position as the next part (not the last); waits while too many are in flight."""
        self._raise_failed()
        created = self.start()
        while len(self._pending) >= self.target.concurrency:
            self._settle()
        number = len(self._done) + len(self._pending) + 1
        data.truncate(data.tell())
        lane = number % len(self._lanes)
        part = self._part(created, lane, number, data, self._checksums(data))
        self._pending[asyncio.run_coroutine_threadsafe(part, self._lanes[lane].loop)] = data

    def _checksums(self, data: io.BytesIO) -> dict[str, str]:
        # The CRC32 is computed here, beside the loops (zlib releases the GIL), not by botocore on them.
        if self._checksum.get("ChecksumAlgorithm") != "CRC32":
            return self._checksum
        with data.getbuffer() as view:
            crc = zlib.crc32(view)
        return {**self._checksum, "ChecksumCRC32": base64.b64encode(crc.to_bytes(4, "big")).decode()}

    async def _part(
        self,
        created: concurrent.futures.Future[str],
        lane: int,
        number: int,
        data: io.BytesIO,
        checksums: dict[str, str],
    ) -> dict[str, Any]:
        upload_id = await asyncio.wrap_future(created)  # a failed creation fails the write: not retried here

        async def upload() -> Any:
            data.seek(0)  # each attempt sends the part whole
            return await self._lanes[lane]._call_s3(
                "upload_part",
                Bucket=self.target.bucket,
                Key=self.target.key,
                UploadId=upload_id,
                PartNumber=number,
                Body=data,
                **checksums,
            )

        response = await self.target.retried(f"writing part {number} of", upload, self._stops[lane])
        part = {"PartNumber": number, "ETag": str(response["ETag"])}
        for name in self._checksum.values():  # the part's checksum goes into the object's (as s3transfer does)
            if f"Checksum{name}" in response:
                part[f"Checksum{name}"] = response[f"Checksum{name}"]
        return part

    def _raise_failed(self) -> None:
        """Raise the error of any part already failed (not only the oldest: fail fast)."""
        for future in self._pending:
            if future.done() and future.exception() is not None:
                future.result()

    def _settle(self) -> None:
        """Wait for any part in flight (not the oldest: one slow part does not hold the others' slots)."""
        done, _ = concurrent.futures.wait(self._pending, return_when=concurrent.futures.FIRST_COMPLETED)
        for future in done:
            part = future.result()
            self._done.append(part)
            self.target.buffers.give(self._pending.pop(future))

    def finish(self, last: io.BytesIO, before_commit: Callable[[], None] | None) -> None:
        """Send ``last`` (up to its position), wait for every part, run ``before_commit``, then commit."""
        if self._created is None:  # at most one part: one PUT
            if before_commit is not None:
                before_commit()
            last.truncate(last.tell())
            last.seek(0)
            self.target.call("put_object", Body=last)
            self.target.buffers.give(last)
        else:
            if last.tell():
                self.send(last)
            while self._pending:
                self._settle()
            if before_commit is not None:
                before_commit()
            self.target.call(
                "complete_multipart_upload",
                UploadId=self._created.result(),
                MultipartUpload={"Parts": sorted(self._done, key=operator.itemgetter("PartNumber"))},
            )
            self._created = None
        self.target.fs.invalidate_cache(f"{self.target.bucket}/{self.target.key}")

    def abort(self) -> None:
        """Stop retrying, let the requests in flight end, abort the upload; never raises (failures are logged)."""
        for fs, stop in zip(self._lanes, self._stops, strict=True):
            fs.loop.call_soon_threadsafe(stop.set)
        # Not cancelled: a part still being received when the upload is aborted could survive it.
        concurrent.futures.wait(self._pending)
        self._pending.clear()
        if self._created is None or self._created.exception() is not None:  # no upload was made
            return
        upload_id = self._created.result()
        abort_upload(
            self.target.policy,
            self.target.shown,
            lambda: self.target.call("abort_multipart_upload", UploadId=upload_id),
        )


class PartWriter(io.RawIOBase):
    """The write-only, non-seekable file a writer gets: its bytes go out as the parts of an upload."""

    def __init__(self, upload: MultipartUpload) -> None:
        super().__init__()
        self._upload = upload
        self._buffer = upload.buffer()
        self._written = 0
        self._parts = 0
        self._error: BaseException | None = None

    def writable(self) -> bool:
        """True."""
        return True

    def seekable(self) -> bool:
        """False: parts already sent cannot be rewritten (torch.save needs no seek)."""
        return False

    def tell(self) -> int:
        """Bytes written so far."""
        return self._written

    def write(self, data: Any) -> int:
        """Buffer ``data``, sending each part once it is full; raises a failed part's error."""
        if self._error is not None:  # torch writes its archive's end even after a failed write
            raise self._error
        view = memoryview(data).cast("B")
        start = 0
        try:
            while start < len(view):
                size = part_size(self._parts)
                if self._buffer.tell() == size:  # full, and more is coming: not the last part
                    self._upload.send(self._buffer)
                    self._buffer = self._upload.buffer()
                    self._parts += 1
                    size = part_size(self._parts)
                take = min(size - self._buffer.tell(), len(view) - start)
                self._buffer.write(view[start : start + take])
                start += take
        except BaseException as exc:
            self._error = exc
            raise
        self._written += len(view)
        return len(view)

    def flush(self) -> None:
        """Nothing: parts go out when they are full, the last at commit."""

    def take_last(self) -> io.BytesIO:
        """The buffered bytes (up to its position), which are the last part."""
        last, self._buffer = self._buffer, io.BytesIO()
        return last


def write_object(
    target: Target, attempt: Attempt, write: Callable[[IO[bytes]], None], before_commit: Callable[[], None] | None
) -> int:
    """One attempt of ``write_atomic``: ``write`` into a :class:`PartWriter`, then commit; returns the size."""
    upload = MultipartUpload(target)
    f = PartWriter(upload)
    try:
        attempt.call(cast(IO[bytes], f), write)
        upload.finish(f.take_last(), before_commit)
    except BaseException:
        upload.abort()
        raise
    finally:
        f.close()
    return f.tell()


def upload_local(target: Target, local_path: str) -> int:
    """Upload a local file as ``target``, read in parts (``os.pread``) of PART_SIZE or more; returns its size."""
    upload = MultipartUpload(target)
    fd = os.open(local_path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        piece = max(PART_SIZE, -(-size // _MAX_PARTS // 2**20) * 2**20)  # whole MiB, within 10,000 parts
        offsets = range(0, max(size, 1), piece)
        if len(offsets) > 1:
            upload.start()  # while the first part is read
        for offset in offsets:
            if hasattr(os, "posix_fadvise"):  # checkpoints are written past the page cache: read ahead
                os.posix_fadvise(fd, offset + piece, 2 * piece, os.POSIX_FADV_WILLNEED)
            data = _read_part(upload.buffer(), fd, min(piece, size - offset), offset, local_path)
            if offset == offsets[-1]:
                upload.finish(data, None)
            else:
                upload.send(data)
    except BaseException:
        upload.abort()
        raise
    finally:
        os.close(fd)
    return size


def _read_part(part: io.BytesIO, fd: int, length: int, offset: int, local_path: str) -> io.BytesIO:
    """``length`` bytes of the file at ``offset``, read straight into ``part``'s memory; its position after them."""
    if length > part.seek(0, io.SEEK_END):  # its size
        part.seek(length - 1)
        part.write(b"\0")  # grown in place; its bytes are the BytesIO's own, so aiohttp copies none
    with part.getbuffer() as view:
        done = 0
        while done < length:
            got = os.preadv(fd, [view[done:length]], offset + done)
            if not got:
                raise OSError(f"{local_path} shrank while being uploaded")
            done += got
    part.seek(length)
    return part

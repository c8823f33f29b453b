"""Reading a large S3 object in parallel ranged GETs, all of one version (s3fs's loop, as the writes).

:func:`open_reader` HEADs the object once (size, ETag). An object of at most one block is one GET,
into memory. A larger one is a :class:`ParallelReader`: up to ``max_concurrency`` ranged GETs of
:data:`READ_BLOCK` in flight from the read position on, each with ``IfMatch`` set to the HEAD's
ETag, so an object replaced mid-read fails (:class:`~s3fs.utils.FileExpired`, transient:
:meth:`~bgsave.storage.base.Storage.read_with` reads the new one from the start) instead of mixing
two versions. A block that fails transiently is fetched again alone (the storage's retry policy).
A seek outside the window restarts it there, except into the last block, which is fetched alone and
kept: ``torch.load`` reads the zip directory at the end, then the records from the start, and
neither pass refetches the other's blocks. Memory: at most ``max_concurrency`` blocks, plus the last.
"""

from __future__ import annotations

import concurrent.futures
import io
from collections.abc import Callable
from typing import IO, Any, cast

import fsspec.asyn

from bgsave.storage.parts import Target
from bgsave.storage.retry import expired

__all__ = ("READ_BLOCK", "ParallelReader", "open_reader")

#: Bytes per ranged GET of a :class:`ParallelReader`.
READ_BLOCK = 16 * 2**20


class ParallelReader(io.RawIOBase):
    """A read-only, seekable file of one object version, read ahead in parallel ranged GETs."""

    def __init__(self, target: Target, size: int, etag: str, block: int = READ_BLOCK) -> None:
        super().__init__()
        self._target = target
        self._size = size
        self._etag = etag
        self._block = block
        self._last = max(size - 1, 0) // block
        self._pos = 0
        self._window: dict[int, concurrent.futures.Future[bytes]] = {}  # block index -> its GET, ascending
        self._next = 0  # the next block to request
        self._tail: bytes | None = None  # the last block, kept once read

    def readable(self) -> bool:
        """True."""
        return True

    def seekable(self) -> bool:
        """True: a seek costs nothing until the next read."""
        return True

    def tell(self) -> int:
        """The read position."""
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        """Move the read position (no request is made here)."""
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset}")
        self._pos = base + offset
        return self._pos

    def readinto(self, buffer: Any) -> int:
        """Fill ``buffer`` from the read position; returns the bytes read (fewer only at the end)."""
        view = memoryview(buffer).cast("B")
        filled = 0
        while filled < len(view) and self._pos < self._size:
            index = self._pos // self._block
            data = self._data(index)
            start = self._pos - index * self._block
            count = min(len(view) - filled, len(data) - start)
            view[filled : filled + count] = data[start : start + count]
            filled += count
            self._pos += count
        return filled

    def read(self, size: int | None = -1) -> bytes:
        """Up to ``size`` bytes from the read position (all the rest for -1)."""
        left = max(self._size - self._pos, 0)
        out = bytearray(left if size is None or size < 0 else min(size, left))
        del out[self.readinto(out) :]
        return bytes(out)

    def readall(self) -> bytes:
        """The rest of the object."""
        return self.read(-1)

    def _data(self, index: int) -> bytes:
        """Block ``index``'s bytes, keeping the window of requests ahead of it full."""
        if index == self._last:  # the zip directory: kept once read, the window left as it is
            if self._tail is None:
                future = self._window.pop(index, None) or self._target.submit(self._get(index))
                self._tail = future.result()
            return self._tail
        if index not in self._window:  # a seek outside the window: start it again here
            self._drop(lambda _: True)
            self._next = index
        self._drop(lambda i: i < index)
        self._next = max(self._next, index)
        while self._next < min(index + self._target.concurrency, self._last + 1):
            if not (self._next == self._last and self._tail is not None):
                self._window[self._next] = self._target.submit(self._get(self._next))
            self._next += 1
        return self._window[index].result()

    async def _get(self, index: int) -> bytes:
        start = index * self._block
        end = min(start + self._block, self._size) - 1
        fs, bucket, key = self._target.fs, self._target.bucket, self._target.key

        async def get() -> bytes:
            response = await fs._call_s3(
                "get_object", Bucket=bucket, Key=key, Range=f"bytes={start}-{end}", IfMatch=self._etag
            )
            try:
                data: bytes = await response["Body"].read()
            finally:
                response["Body"].close()
            if len(data) != end + 1 - start:
                raise ConnectionError(f"short read: {len(data)} of {end + 1 - start} bytes at {start}")
            return data

        try:
            return await self._target.retried("reading", get)
        except Exception as exc:
            error = _expired_error(self._target, self._etag, exc)
            if error is exc:
                raise
            raise error from exc

    def _drop(self, which: Callable[[int], bool]) -> None:
        for index in [i for i in self._window if which(i)]:
            self._window.pop(index).cancel()  # a GET has no side effects: cancelling is safe

    def close(self) -> None:
        """Cancel the GETs in flight and free the blocks."""
        self._drop(lambda _: True)
        self._tail = None
        super().close()


def open_reader(target: Target) -> IO[bytes]:
    """A file of the object's current version: a :class:`ParallelReader`, or for one block its bytes."""
    head = target.call("head_object")
    size, etag = int(head["ContentLength"]), str(head["ETag"])
    if size <= READ_BLOCK:  # one GET of the whole object is consistent by itself
        return io.BytesIO(fsspec.asyn.sync(target.fs.loop, _get_all, target, etag))
    return cast(IO[bytes], ParallelReader(target, size, etag))


async def _get_all(target: Target, etag: str) -> bytes:
    try:
        response = await target.fs._call_s3("get_object", Bucket=target.bucket, Key=target.key, IfMatch=etag)
    except Exception as exc:
        error = _expired_error(target, etag, exc)
        if error is exc:
            raise
        raise error from exc
    try:
        data: bytes = await response["Body"].read()
    finally:
        response["Body"].close()
    return data


def _expired_error(target: Target, etag: str, exc: Exception) -> Exception:
    """s3fs's FileExpired for a failed If-Match (transient: ``read_with`` reads anew), else ``exc``."""
    if not expired(exc):
        return exc
    from s3fs.utils import FileExpired

    error: Exception = FileExpired(filename=f"{target.bucket}/{target.key}", e_tag=etag)
    return error

"""Disk: how a new local file's bytes reach the disk, taking as little CPU from training as can be.

:func:`create` opens a new file and hands back one of two writers; ``finish()`` makes it durable
(fsync) and returns its size. :mod:`bgsave.storage.local` does the rest of the atomic write (temp name,
rename, directory fsync).

* **Through the page cache** (:class:`_WriteBehind`): small files, and wherever ``O_DIRECT`` is
  missing or refused (macOS, Windows, tmpfs before Linux 6.6, some FUSE filesystems). Writes reach
  the kernel in 128 KiB slices and the disk starts on every 32 MiB written.
* **Past the page cache** (:class:`_Direct`, ``O_DIRECT``, Linux): large checkpoints. Copying 1 GB
  into the page cache costs the writer 0.30-0.35 s of system CPU on this project's 2-core VM, and a
  training loop using both cores lost 0.39 s per GB to it; ``O_DIRECT`` writes of the same bytes took
  0.02 s of CPU, cost the loop 0.09 s, and were as fast to durable (0.62 vs 0.67 s;
  ``benchmarks/bench_writer_cost.py``). The bytes
  go to the disk straight from the caller's memory when its address, the file offset and the length
  are all multiples of :data:`BLOCK`: snapshot buffers are page-aligned and bgsave lays tensors out
  on 4 KiB boundaries (:mod:`bgsave.serialize`), so a tensor's bytes are written where they lie.
  Everything else (zip headers, small tensors, the ends of large ones) is gathered in an aligned
  staging buffer and written a block at a time; memory the disk refuses (an ``EINVAL``) is copied
  through it too. The file's last partial block goes through the page cache, as ``O_DIRECT`` writes
  whole blocks only, and so does the rest of a file whose disk refuses even aligned writes. The
  page cache also stays free for what training reads.

:func:`page_buffer` is the memory such a write goes from: page-aligned, in huge pages where the
kernel has them (the snapshot's large buffers, :mod:`bgsave.snapshot`).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import IO, Any, cast

__all__ = ("BLOCK", "create", "page_buffer")

BLOCK = 4096
"""Alignment of ``O_DIRECT`` writes (memory, file offset, length): 4 KiB suits 512-byte and 4K disks."""

# Write-behind: start the disk on every this many bytes instead of leaving it all to the final fsync...
_WRITE_BEHIND = 32 * 2**20
# ...and pass writes to the kernel in pieces of at most this many bytes (see _WriteBehind).
_WRITE_SLICE = 128 * 2**10
_SYNC_FILE_RANGE_WRITE = 2  # <fcntl.h>: start writeback of the range's dirty pages, don't wait

_STAGING = 8 * 2**20  # O_DIRECT: the aligned buffer small writes are gathered in
_FROM_CALLER_MIN = 2**20  # O_DIRECT: smaller writes are staged rather than sent alone
_DIRECT_PIECE = 64 * 2**20  # O_DIRECT: bytes per write() call


def _linux_libc(name: str, *argtypes: Any) -> Any:
    """The C library's function ``name`` on Linux, taking ``argtypes`` and returning an int; None elsewhere.

    For the calls Python's ``os`` and ``mmap`` lack or make holding the GIL: ctypes releases it.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = list(argtypes), ctypes.c_int
    return fn


# Linux's sync_file_range(2), or None where there is none (Python's os lacks it).
_start_writeback = cast(
    "Callable[[int, int, int, int], int] | None",
    _linux_libc("sync_file_range", ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint),
)


def _huge_pages() -> bool:
    """Whether Linux hands out transparent huge pages to a mapping that asks (THP not ``never``)."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[never]" not in f.read()
    except OSError:
        return False


# Huge pages where the kernel has them: the first copy then faults 2 MiB at a time, which beat
# populating the range first (128 MiB: 52 vs 60 ms here). Without them, Linux's MADV_POPULATE_WRITE
# (23: faults the whole range in, writable, in one call; 5.14+, and Python's mmap module does not
# name it; elsewhere 23 means something else) spares the copy a fault per 4 KiB page (91 vs 114 ms).
_ADVICE = tuple(
    advice
    for advice in (
        getattr(mmap, "MADV_HUGEPAGE", None),
        23 if sys.platform.startswith("linux") and not _huge_pages() else None,
    )
    if advice is not None
)


# madvise(2) through ctypes, which lets go of the GIL, as ``mmap.madvise`` does not (see _advise).
_MADVISE = cast(
    "Callable[[int, int, int], int] | None", _linux_libc("madvise", ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
)


def page_buffer(size: int) -> mmap.mmap:
    """``size`` bytes of private anonymous memory, page-aligned: what an ``O_DIRECT`` write sends from where it lies.

    Asked for huge pages, or populated in one call where there are none (:data:`_ADVICE`): the first
    copy into fresh pages (a run's first snapshot) otherwise waits for a fault per 4 KiB page.
    """
    pages = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    _advise(pages, size)
    return pages


def _advise(pages: mmap.mmap, size: int) -> None:
    """Give the mapping :data:`_ADVICE`; a refusal only leaves the faults to the copy.

    Populating 32 MiB takes ~15 ms. Through ``mmap.madvise`` the GIL is held all that time, and a
    first save's snapshot held it for 50 ms of its 80 (128 MiB): the claim beside it
    (:mod:`bgsave.lifecycle`), the worker's event loop and the training's own threads all waited.
    """
    if _MADVISE is None:
        for advice in _ADVICE:
            with suppress(OSError):  # an older kernel, or no huge pages: faulted in as it is copied
                pages.madvise(advice)
        return
    anchor = ctypes.c_char.from_buffer(pages)  # the mapping's address; released before torch takes the buffer
    try:
        address = ctypes.addressof(anchor)
        for advice in _ADVICE:
            _MADVISE(address, size, advice)  # -1 on an older kernel or without huge pages: nothing to undo
    finally:
        del anchor


class _WriteBehind:
    """A local file being written that hands each finished 32 MiB to the disk at once (Linux).

    Dirty pages are otherwise written back only at the final ``fsync`` (the kernel's own flusher waits
    for 30 s or 10% of RAM), so serializing and disk writes would run one after the other: for 1 GB
    on this project's VM, 0.55 s of ``torch.save`` then 0.45-0.55 s of fsync. Starting writeback of
    each chunk as it is written (``sync_file_range(SYNC_FILE_RANGE_WRITE)``, which does not wait)
    overlaps the two and leaves the fsync ~0.1 s. The fsync still makes the file durable; this only
    changes when the disk starts. Where the call is missing or refused, it is simply not made.

    ``torch.save`` hands over each tensor in one call (hundreds of MB for a large layer); those are
    passed on in 128 KiB slices, zero-copy. On this project's VM (Linux 6.18, ext4) large writes are
    at times far costlier in the kernel: 1 GiB + fsync took 0.7-0.8 s in writes of 512 KiB or less in
    every sweep, but up to 1.6 s in 1 MiB, 2.8 s in 8 MiB and 3.0 s in 64 MiB writes, mostly system
    CPU, which a busy training loop loses (``benchmarks/bench_write_size.py``).
    """

    def __init__(self, f: IO[bytes]) -> None:
        self._f = f
        self._fd = f.fileno()
        self._on = _start_writeback is not None
        self._started = 0  # bytes handed to the disk so far
        self._written = 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        n = 0
        for start in range(0, len(view), _WRITE_SLICE):
            n += self._write(view[start : start + _WRITE_SLICE])
        return n

    def _write(self, data: memoryview) -> int:
        n = self._f.write(data)
        self._written += n
        if self._on and self._written - self._started >= _WRITE_BEHIND:
            assert _start_writeback is not None
            self._f.flush()
            # Nonzero: refused on this file (EINVAL, ESPIPE...); stop trying.
            self._on = not _start_writeback(
                self._fd, self._started, self._written - self._started, _SYNC_FILE_RANGE_WRITE
            )
            self._started = self._written
        return n

    def finish(self) -> int:
        """Flush and fsync; the file's size."""
        self._f.flush()
        os.fsync(self._fd)
        return self._f.tell()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        view = view[os.write(fd, view[:_DIRECT_PIECE]) :]


class _Direct:
    """A local file opened with ``O_DIRECT``: aligned bulk from the caller's memory, the rest staged.

    While direct, the bytes on disk so far end on a block boundary and :attr:`_staged` bytes wait
    after them; once not, nothing is staged. If the disk refuses even an aligned staging write
    (``EINVAL``: a device whose blocks are larger than :data:`BLOCK`), the file drops ``O_DIRECT``
    and the rest goes through the page cache.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._map = mmap.mmap(-1, _STAGING)  # page-aligned
        self._staging = memoryview(self._map)
        self._staged = 0
        self._size = 0
        self._direct = True
        self._from_caller = True  # until the disk refuses the caller's memory
        self.bytes_from_caller = 0  # written straight from the memory handed to write()

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        n = len(view)
        done = 0
        if self._direct and self._from_caller and self._staged % BLOCK == 0 and n >= _FROM_CALLER_MIN:
            self._drain()  # the file now ends on a block boundary, where this write starts
            done = self._write_direct(view[: n - n % BLOCK])
            self._from_caller = done > 0  # else this memory is not aligned as the disk needs: stage it
            self.bytes_from_caller += done
        rest = view[done:]
        while rest and self._direct:
            take = min(len(rest), _STAGING - self._staged)
            self._staging[self._staged : self._staged + take] = rest[:take]
            self._staged += take
            rest = rest[take:]
            if self._staged == _STAGING:
                self._drain()
        if rest:  # O_DIRECT given up on (nothing is staged then): through the page cache
            _write_all(self._fd, rest)
        self._size += n
        return n

    def _write_direct(self, view: memoryview) -> int:
        """Write whole blocks; how many bytes were written before the disk refused them (EINVAL)."""
        done = 0
        try:
            while done < len(view):
                done += os.write(self._fd, view[done : done + _DIRECT_PIECE])
        except OSError as exc:
            if exc.errno != errno.EINVAL or done % BLOCK:
                raise
        return done

    def _drain(self) -> None:
        """Write the staged whole blocks; a partial block stays, moved to the front."""
        whole = self._staged - self._staged % BLOCK
        if not whole:
            return
        done = self._write_direct(self._staging[:whole])
        if done < whole:  # refused even aligned: no O_DIRECT for this file after all
            self._stop_direct(done)
            return
        left = self._staged - whole  # < BLOCK <= whole: source and destination do not overlap
        self._staging[:left] = self._staging[whole : self._staged]
        self._staged = left

    def _stop_direct(self, written: int) -> None:
        """Drop O_DIRECT and write what is staged past ``written`` through the page cache."""
        import fcntl  # here, not at the top: Windows has no fcntl (and no O_DIRECT, so never gets here)

        fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        self._direct = False
        _write_all(self._fd, self._staging[written : self._staged])
        self._staged = 0

    def flush(self) -> None:
        """Nothing to do: staged bytes are written by :meth:`finish` (torch.save calls this at its end)."""

    def finish(self) -> int:
        """Write what is staged, fsync; the file's size."""
        self._drain()
        if self._staged:  # O_DIRECT writes whole blocks only: the last partial one goes through the page cache
            self._stop_direct(0)
        os.fsync(self._fd)
        return self._size

    def close(self) -> None:
        self._staging.release()
        self._map.close()
        os.close(self._fd)


def _open_direct(path: str) -> int | None:
    """Create ``path`` for ``O_DIRECT`` writing, or None where the platform or filesystem has none."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        # O_EXCL as open(path, "x"): refuses an existing file and a symlink planted at the name.
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | flag, 0o666)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
    # The filesystem refuses O_DIRECT (tmpfs); it may have created the file first.
    with suppress(FileNotFoundError):
        os.unlink(path)
    return None


@contextmanager
def create(path: str, *, direct: bool) -> Iterator[_WriteBehind | _Direct]:
    """A new file at ``path`` (refused if it exists), closed on exit; call ``finish()`` to make it durable.

    Args:
        path: Where; must not exist.
        direct: A large file: write it past the page cache where the filesystem allows.
    """
    fd = _open_direct(path) if direct else None
    if fd is not None:
        f = _Direct(fd)
        try:
            yield f
        finally:
            f.close()
        return
    with open(path, "xb") as raw:
        yield _WriteBehind(raw)

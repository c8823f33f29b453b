"""Large local checkpoints are written past the page cache (O_DIRECT), byte for byte what was handed over.

Real files on the test machine's disk; where its filesystem refuses O_DIRECT the direct tests skip
and the fallback test still runs on tmpfs.
"""

from __future__ import annotations

import errno
import io
import mmap
import os
import struct
import sys
import zipfile
from collections.abc import Iterator, Sequence

import pytest

from _models import Agent, assert_state_equal, state_of
from bgsave import CheckpointManager, CheckpointWriteError, load_checkpoint
from bgsave.serialize import SETTINGS_PER_THREAD
from bgsave.storage import diskfile
from bgsave.storage.local import direct_writes_from

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="O_DIRECT is Linux-only")

MiB = 2**20


def page_aligned(data: bytes) -> memoryview:
    """``data`` in page-aligned memory, as a snapshot's large buffers are."""
    buf = mmap.mmap(-1, len(data))
    buf[:] = data
    return memoryview(buf)


@pytest.fixture
def direct_dir(tmp_path: os.PathLike[str]) -> str:
    """A directory on a filesystem that takes O_DIRECT (skips where the test machine's does not)."""
    probe = os.path.join(os.fspath(tmp_path), "probe")
    with diskfile.create(probe, direct=True) as f:
        taken = isinstance(f, diskfile._Direct)
    os.unlink(probe)
    if not taken:
        pytest.skip("the filesystem under the test's tmp_path refuses O_DIRECT")
    return os.fspath(tmp_path)


def write_pieces(path: str, pieces: Sequence[bytes | memoryview]) -> diskfile._Direct:
    with diskfile.create(path, direct=True) as f:
        assert isinstance(f, diskfile._Direct)
        for piece in pieces:
            assert f.write(piece) == memoryview(piece).nbytes
        f.flush()
        assert f.finish() == sum(memoryview(p).nbytes for p in pieces)
    return f


def test_aligned_bulk_goes_from_the_callers_memory_and_the_rest_is_staged(direct_dir: str) -> None:
    """Headers, a page-aligned 3 MiB + 100 B, small pieces and a last partial block: the file is their concatenation."""
    raw = [os.urandom(30), os.urandom(4066)]
    bulk = page_aligned(os.urandom(3 * MiB + 100))
    tail = os.urandom(12_345)
    path = os.path.join(direct_dir, "f.bin")
    f = write_pieces(path, [raw[0], raw[1], bulk, tail, b"", b"z"])
    assert f.bytes_from_caller == 3 * MiB  # 30 + 4066 = one block staged first, then the bulk's whole blocks
    with open(path, "rb") as check:
        assert check.read() == raw[0] + raw[1] + bytes(bulk) + tail + b"z"


def test_memory_the_disk_refuses_is_copied_through_staging(direct_dir: str) -> None:
    """A large write from memory that is not block-aligned (EINVAL from the kernel) still lands whole."""
    base = page_aligned(os.urandom(5 * MiB))
    misaligned = base[64:]  # aligned file offset, memory 64 bytes past a page boundary
    path = os.path.join(direct_dir, "f.bin")
    f = write_pieces(path, [misaligned, b"end"])
    assert f.bytes_from_caller == 0
    with open(path, "rb") as check:
        assert check.read() == bytes(misaligned) + b"end"


def test_a_disk_that_refuses_even_aligned_writes_gets_the_rest_through_the_page_cache(
    direct_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every O_DIRECT write refused (EINVAL: blocks larger than 4 KiB): the file drops O_DIRECT, bytes whole.

    The real ``os.write`` is wrapped: it refuses while the file is open with O_DIRECT, as such a disk would.
    """
    import fcntl

    real_write = os.write

    def refusing(fd: int, data: bytes | memoryview) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", refusing)  # the os module diskfile writes through
    pieces: list[bytes | memoryview] = [
        os.urandom(5000),
        page_aligned(os.urandom(3 * MiB)),
        os.urandom(9 * MiB),
        b"end",
    ]
    path = os.path.join(direct_dir, "f.bin")
    f = write_pieces(path, pieces)
    assert f.bytes_from_caller == 0 and not f._direct
    with open(path, "rb") as check:
        assert check.read() == b"".join(bytes(p) for p in pieces)


def test_a_filesystem_that_refuses_o_direct_gets_the_page_cache_path(
    tmp_path: os.PathLike[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An open with O_DIRECT refused (EINVAL, after creating the file, as some filesystems do): page cache instead.

    The real ``os.open`` is wrapped: it creates the file, then refuses as such a filesystem would.
    """
    real_open = os.open
    refused: list[str] = []

    def refusing(path: str, flags: int, mode: int = 0o777) -> int:
        if flags & os.O_DIRECT:
            os.close(real_open(path, flags & ~os.O_DIRECT, mode))
            refused.append(path)
            raise OSError(errno.EINVAL, "Invalid argument", path)
        return real_open(path, flags, mode)

    monkeypatch.setattr(os, "open", refusing)  # the os module diskfile opens through
    path = os.path.join(os.fspath(tmp_path), "f.bin")
    with diskfile.create(path, direct=True) as f:
        assert isinstance(f, diskfile._WriteBehind)
        f.write(b"abc")
        assert f.finish() == 3
    assert refused == [path]
    with open(path, "rb") as check:
        assert check.read() == b"abc"


@pytest.fixture
def direct_above_1mib(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[int, int]]]:
    """Managers write snapshots of 1 MiB or more directly; yields (bytes from caller memory, size) per file."""
    finished: list[tuple[int, int]] = []
    real = diskfile._Direct.finish

    def finish(self: diskfile._Direct) -> int:
        size = real(self)
        finished.append((self.bytes_from_caller, size))
        return size

    monkeypatch.setattr(diskfile._Direct, "finish", finish)
    with direct_writes_from(MiB):
        yield finished


def data_offsets(path: str) -> list[int]:
    """Where each tensor record's bytes start in a torch.save file."""
    with open(path, "rb") as f:
        raw = f.read()
    offsets = []
    for info in zipfile.ZipFile(io.BytesIO(raw)).infolist():
        if "/data/" in info.filename:
            name_len, extra_len = struct.unpack_from("<HH", raw, info.header_offset + 26)
            offsets.append(info.header_offset + 30 + name_len + extra_len)
    return offsets


def test_a_large_checkpoint_is_written_directly_and_loads_equal(
    direct_dir: str, direct_above_1mib: list[tuple[int, int]]
) -> None:
    """A ~3 MiB agent: its .pt went mostly straight from the snapshot's buffers, tensors on 4 KiB; loads equal."""
    agent = Agent(width=800)  # two 800x800 float32 layers, tied weights, buffers, small tensors
    run_dir = os.path.join(direct_dir, "run")
    with CheckpointManager(run_dir, "direct") as mgr:
        path = mgr.save_agent(agent, 3, {"score": 1.0})
        mgr.wait()
        expected = state_of(agent)
    assert len(direct_above_1mib) == 1
    from_caller, size = direct_above_1mib[0]
    assert size == os.path.getsize(path) and from_caller > size // 2
    if SETTINGS_PER_THREAD:
        assert all(offset % diskfile.BLOCK == 0 for offset in data_offsets(path))
    assert_state_equal(expected, load_checkpoint(path))
    assert sorted(os.listdir(os.path.dirname(path))) == ["model_0003.pt", "model_0003.yaml"]


def test_a_failed_direct_write_leaves_no_file(direct_dir: str, direct_above_1mib: list[tuple[int, int]]) -> None:
    """The disk failing under an O_DIRECT write: CheckpointWriteError naming the epoch, cause chained, no debris."""
    real_write = diskfile._Direct.write

    def failing(self: diskfile._Direct, data: object) -> int:
        if memoryview(data).nbytes >= MiB:  # type: ignore[arg-type]
            raise OSError(28, "No space left on device")  # what os.write raises on a full disk
        return real_write(self, data)

    agent = Agent(width=800)
    run_dir = os.path.join(direct_dir, "run")
    mgr = CheckpointManager(run_dir, "direct")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(diskfile._Direct, "write", failing)
        mgr.save_agent(agent, 4)
        with pytest.raises(CheckpointWriteError) as info:
            mgr.wait()
    assert info.value.epoch == 4 and "model_0004.pt" in str(info.value)
    assert isinstance(info.value.__cause__, OSError)
    mgr.close()
    assert os.listdir(mgr.checkpoint_dir) == []

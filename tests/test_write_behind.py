"""Local writes start disk writeback as they go (sync_file_range), and never depend on it for correctness."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from typing import IO, cast

import pytest
import torch

from bgsave.storage import diskfile, open_storage

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range is Linux-only"),
]

MiB = 2**20


def tensors(total_mib: int) -> dict[str, torch.Tensor]:
    """Random float32 tensors of ``total_mib`` MiB in all, in 8 MiB pieces (torch.save writes each in one call)."""
    g = torch.Generator().manual_seed(total_mib)
    return {f"t{i}": torch.rand(2 * MiB, generator=g) for i in range(total_mib // 8)}


def writer(obj: object) -> Callable[[IO[bytes]], None]:
    def write(f: IO[bytes]) -> None:
        torch.save(obj, f)

    return write


@pytest.fixture
def writeback_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[int, int, int]]]:
    """Records every sync_file_range call, passing it on to the real one."""
    real = diskfile._start_writeback
    assert real is not None, "libc's sync_file_range was not found on Linux"
    calls: list[tuple[int, int, int]] = []

    def recording(fd: int, offset: int, nbytes: int, flags: int) -> int:
        calls.append((offset, nbytes, flags))
        return real(fd, offset, nbytes, flags)

    monkeypatch.setattr(diskfile, "_start_writeback", recording)
    yield calls


def test_a_large_write_hands_each_chunk_to_the_disk_in_order(
    tmp_path: os.PathLike[str], writeback_calls: list[tuple[int, int, int]]
) -> None:
    """A 96 MiB checkpoint starts writeback of consecutive 32 MiB-or-more ranges, and reads back equal."""
    st = open_storage(os.fspath(tmp_path))
    data = tensors(96)
    path = st.join("big.pt")
    size = st.write_atomic(path, writer(data))
    assert len(writeback_calls) >= 2
    offset = 0
    for start, nbytes, flags in writeback_calls:
        assert (start, flags) == (offset, 2)  # contiguous ranges, SYNC_FILE_RANGE_WRITE (2) only
        assert nbytes >= diskfile._WRITE_BEHIND
        offset += nbytes
    assert offset <= size
    loaded = torch.load(path, weights_only=True)
    assert loaded.keys() == data.keys() and all(torch.equal(loaded[k], data[k]) for k in data)


def test_a_small_write_starts_no_writeback(
    tmp_path: os.PathLike[str], writeback_calls: list[tuple[int, int, int]]
) -> None:
    """Below one chunk (a sidecar, a small model) the final fsync does everything."""
    st = open_storage(os.fspath(tmp_path))
    st.write_atomic(st.join("small.pt"), writer(tensors(16)))
    assert writeback_calls == []


def test_a_refused_writeback_is_not_retried_and_the_file_is_still_whole(
    tmp_path: os.PathLike[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where sync_file_range fails (some filesystems refuse it), it is tried once per file and the write goes on."""
    calls: list[int] = []

    def refusing(fd: int, offset: int, nbytes: int, flags: int) -> int:
        calls.append(offset)
        return -1

    monkeypatch.setattr(diskfile, "_start_writeback", refusing)
    st = open_storage(os.fspath(tmp_path))
    data = tensors(96)
    path = st.join("big.pt")
    st.write_atomic(path, writer(data))
    assert calls == [0]
    loaded = torch.load(path, weights_only=True)
    assert all(torch.equal(loaded[k], data[k]) for k in data)


def test_one_large_write_reaches_the_file_in_slices_and_whole(
    tmp_path: os.PathLike[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch.save's one write per tensor goes to the kernel in 128 KiB slices (cheaper there), bytes unchanged.

    The real file is wrapped to record the size of each write it receives. The data is a float32
    memoryview (format "f"), as a writer may pass, of a size that is no multiple of the slice.
    """
    sizes: list[int] = []

    class Recording:
        def __init__(self, f: IO[bytes]) -> None:
            self._f = f

        def write(self, data: memoryview) -> int:
            sizes.append(data.nbytes)
            return self._f.write(data)

        def __getattr__(self, name: str) -> object:
            return getattr(self._f, name)

    real_init = diskfile._WriteBehind.__init__
    monkeypatch.setattr(
        diskfile._WriteBehind, "__init__", lambda self, f: real_init(self, cast(IO[bytes], Recording(f)))
    )
    values = torch.rand(300_001, generator=torch.Generator().manual_seed(1))
    st = open_storage(os.fspath(tmp_path))
    path = st.join("raw.bin")

    def write(f: IO[bytes]) -> None:
        f.write(values.numpy().data)

    size = st.write_atomic(path, write)
    assert size == values.numel() * 4 == sum(sizes)
    assert len(sizes) > 1 and max(sizes) == diskfile._WRITE_SLICE
    with open(path, "rb") as f:
        assert f.read() == values.numpy().tobytes()

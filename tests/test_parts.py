"""Parallel S3 parts and ranged reads (bgsave.storage.parts / ranges), on moto behind tests/faulty_s3.py.

Each test checks what a user would: the object is byte-identical or absent, no multipart upload is
left, and the requests really overlapped (the endpoint records how many it handled at once).
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import threading
from typing import IO, Any

import pytest
import torch

from bgsave import CheckpointManager
from bgsave.errors import InvalidArgumentError
from bgsave.storage import RetryPolicy, Storage, is_transient, open_storage
from bgsave.storage.lanes import MAX_LANES, lanes
from bgsave.storage.parts import PART_SIZE
from bgsave.storage.ranges import READ_BLOCK
from faulty_s3 import FaultyS3

s3fs = pytest.importorskip("s3fs")

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("no_client_retries")]

MiB = 2**20
FAST = RetryPolicy(attempts=3, initial_delay=0.01, max_delay=0.05)
BIG = 5 * PART_SIZE  # 40 MiB: five parts, three read blocks


def storage_for(run_dir: str, faulty: FaultyS3, max_concurrency: int = 8, **config: Any) -> Storage:
    """A storage reaching ``run_dir`` through the faulty endpoint, one HTTP attempt per request."""
    options = {
        "client_kwargs": {"endpoint_url": faulty.endpoint},
        "config_kwargs": {"retries": {"total_max_attempts": 1, "mode": "standard"}, **config},
    }
    return open_storage(run_dir, options, retry=FAST, max_concurrency=max_concurrency)


@pytest.fixture
def storage(s3_run_dir: str, faulty: FaultyS3) -> Storage:
    """A fresh bucket's run directory; no faults armed, no requests recorded."""
    faulty.clear()
    return storage_for(s3_run_dir, faulty)


def uploads(clean: Any, storage: Storage) -> list[Any]:
    result: list[Any] = clean.list_multipart_uploads(storage.root.split("/", 1)[0])
    return result


def write_all(f: IO[bytes], data: bytes) -> None:
    f.write(data)


def data_of(size: int) -> bytes:
    return os.urandom(size)


# ---- writing --------------------------------------------------------------------------------
@pytest.mark.parametrize(("concurrency", "parallel"), [(4, True), (1, False)])
def test_parts_go_out_concurrently(
    s3_run_dir: str, faulty: FaultyS3, clean: Any, concurrency: int, parallel: bool
) -> None:
    """With max_concurrency=4 several parts are in flight at once; with 1, one at a time."""
    faulty.clear()
    storage = storage_for(s3_run_dir, faulty, concurrency)
    data = data_of(BIG)
    path = storage.join("big.bin")
    assert storage.write_bytes_atomic(path, data) == len(data)
    assert clean.cat_file(path) == data
    assert faulty.count("UploadPart") == 5
    assert faulty.count(["CreateMultipartUpload", "CompleteMultipartUpload"]) == 2
    assert (faulty.max_in_flight("UploadPart") > 1) is parallel
    assert faulty.max_in_flight("UploadPart") <= concurrency


def test_streamed_parts_refill_acknowledged_buffers(s3_run_dir: str, faulty: FaultyS3, clean: Any) -> None:
    """One part in flight: each part is written into the buffer of one acknowledged, the short last one too."""
    faulty.clear()
    storage = storage_for(s3_run_dir, faulty, 1)
    data = data_of(3 * PART_SIZE + 123)
    path = storage.join("refilled.bin")
    assert storage.write_bytes_atomic(path, data) == len(data)
    assert clean.cat_file(path) == data
    assert faulty.count("UploadPart") == 4


def test_a_transient_part_failure_is_retried_alone(
    storage: Storage, faulty: FaultyS3, clean: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """One 503 on one part: that part is sent again, nothing else; the object is byte-identical."""
    data = data_of(BIG)
    path = storage.join("big.bin")
    faulty.fail("UploadPart", "503", times=1)
    with caplog.at_level(logging.WARNING, logger="bgsave.storage"):
        storage.write_bytes_atomic(path, data)
    assert faulty.count("UploadPart") == 5 + 1
    assert faulty.count("CreateMultipartUpload") == 1  # the file was not restarted
    assert clean.cat_file(path) == data
    (message,) = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert storage.display(path) in message and "part" in message and "attempt 1 of 3" in message


@pytest.mark.parametrize("action", ["500", "reset"])
def test_a_persistent_part_failure_fails_the_write_and_leaves_nothing(
    storage: Storage, faulty: FaultyS3, clean: Any, action: str
) -> None:
    """Every part upload fails: an OSError naming the URL, no object, no unfinished upload, no restarts."""
    path = storage.join("big.bin")
    faulty.fail("UploadPart", action)
    with pytest.raises(OSError, match="after 3 attempts") as info:
        storage.write_bytes_atomic(path, data_of(BIG))
    assert storage.display(path) in str(info.value)
    assert faulty.count("CreateMultipartUpload") == 1  # a part's own retries are final
    # aiohttp itself resends a PUT once when a kept-alive connection drops: not an attempt of ours.
    assert faulty.count("UploadPart") <= 5 * FAST.attempts * (2 if action == "reset" else 1)
    assert faulty.count("AbortMultipartUpload") == 1
    faulty.clear()
    assert not clean.exists(path)
    assert uploads(clean, storage) == []


def test_a_writer_raising_midway_leaves_nothing(storage: Storage, faulty: FaultyS3, clean: Any) -> None:
    """Parts already sent, then the writer raises: its error propagates as is; no object, no upload."""
    path = storage.join("model.pt")
    calls = []

    def write(f: IO[bytes]) -> None:
        calls.append(1)
        f.write(b"\1" * (3 * PART_SIZE))
        raise RuntimeError("serializer broke")

    with pytest.raises(RuntimeError, match="serializer broke"):
        storage.write_atomic(path, write)
    assert calls == [1]
    assert faulty.count("UploadPart") >= 2 and faulty.count("AbortMultipartUpload") == 1
    assert faulty.count("CompleteMultipartUpload") == 0
    assert not clean.exists(path)
    assert uploads(clean, storage) == []


@pytest.mark.parametrize("size", [0, MiB, PART_SIZE])
def test_an_object_of_one_part_is_one_put(storage: Storage, faulty: FaultyS3, clean: Any, size: int) -> None:
    """Up to one part's size the object is one PutObject, no multipart upload at all."""
    data = data_of(size)
    path = storage.join("small.pt")
    assert storage.write_atomic(path, lambda f: write_all(f, data)) == size
    assert clean.cat_file(path) == data
    assert [s.op for s in faulty.seen if "small.pt" in s.key] == ["PutObject"]


def test_before_commit_runs_once_every_part_is_acknowledged(storage: Storage, faulty: FaultyS3) -> None:
    """before_commit runs after the last part and before the completion that makes the object visible."""
    seen_at_commit: list[tuple[int, int]] = []
    storage.write_atomic(
        storage.join("big.bin"),
        lambda f: write_all(f, b"\0" * (2 * PART_SIZE + 1)),
        before_commit=lambda: seen_at_commit.append(
            (faulty.count("UploadPart"), faulty.count("CompleteMultipartUpload"))
        ),
    )
    assert seen_at_commit == [(3, 0)]


@pytest.mark.parametrize(("size", "concurrency"), [(2 * PART_SIZE + 123, 8), (1000, 8), (2 * PART_SIZE + 123, 1)])
def test_upload_file_round_trip(
    s3_run_dir: str, faulty: FaultyS3, clean: Any, tmp_path: Any, size: int, concurrency: int
) -> None:
    """upload_file sends a local file (parts read with pread) and the object's sha256 is the file's.

    With one part in flight, every part after the first is read into the buffer of one already
    acknowledged, the last (123 bytes) into a full part's: the object still has exactly the file's bytes.
    """
    faulty.clear()
    storage = storage_for(s3_run_dir, faulty, concurrency)
    local = tmp_path / "model.pt"
    local.write_bytes(data_of(size))
    path = storage.join("mirrored.pt")
    assert storage.upload_file(str(local), path) == size
    assert hashlib.sha256(clean.cat_file(path)).digest() == hashlib.sha256(local.read_bytes()).digest()
    assert faulty.count("UploadPart") == (3 if size > PART_SIZE else 0)
    assert uploads(clean, storage) == []


def test_the_next_upload_fills_the_part_buffers_the_storage_kept(
    s3_run_dir: str, faulty: FaultyS3, clean: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A storage keeps one upload's buffers (at most max_concurrency + 1) and the next upload takes them.

    The next is shorter, then streamed: each object still holds exactly its own bytes.
    """
    faulty.clear()
    storage = storage_for(s3_run_dir, faulty, 2)
    pool = storage.part_buffers  # type: ignore[attr-defined]
    taken: list[Any] = []
    take = pool.take

    def recorded() -> Any:
        taken.append(take())
        return taken[-1]

    monkeypatch.setattr(pool, "take", recorded)
    longer, shorter = tmp_path / "longer.pt", tmp_path / "shorter.pt"
    longer.write_bytes(data_of(5 * PART_SIZE + 5))
    shorter.write_bytes(data_of(2 * PART_SIZE + 7))
    storage.upload_file(str(longer), storage.join("longer.pt"))
    assert len(pool) == 3
    first = {id(part) for part in taken}
    taken.clear()
    storage.upload_file(str(shorter), storage.join("shorter.pt"))
    streamed = data_of(3 * PART_SIZE + 1)
    storage.write_bytes_atomic(storage.join("streamed.bin"), streamed)
    assert {id(part) for part in taken} <= first  # no new buffer
    assert clean.cat_file(storage.join("longer.pt")) == longer.read_bytes()
    assert clean.cat_file(storage.join("shorter.pt")) == shorter.read_bytes()
    assert clean.cat_file(storage.join("streamed.bin")) == streamed
    assert len(pool) == 3
    storage.drop_buffers()
    assert len(pool) == 0


@pytest.mark.parametrize("tier", ["run directory", "mirror"])
def test_a_closed_manager_keeps_no_part_buffers(s3_run_dir: str, faulty: FaultyS3, tmp_path: Any, tier: str) -> None:
    """Between saves a manager keeps its last upload's part buffers (a bucket's, a mirror's); once closed, none."""
    options = {"client_kwargs": {"endpoint_url": faulty.endpoint}}
    if tier == "mirror":
        mgr = CheckpointManager(tmp_path / "run", "exp", mirror=s3_run_dir, mirror_storage_options=options)
    else:
        mgr = CheckpointManager(s3_run_dir, "exp", storage_options=options)
    with mgr:
        mgr.save_agent(torch.nn.Linear(1024, 4096), 1)  # 16 MiB of weights: three parts
        mgr.wait()
        storage = mgr._mirror.storage if mgr._mirror is not None else mgr._catalog.storage
        pool = storage.part_buffers  # type: ignore[attr-defined]
        assert len(pool) > 0
    assert len(pool) == 0


@pytest.mark.parametrize("source", ["streamed", "local file"])
@pytest.mark.parametrize(("action", "lands"), [("503", True), ("403", False)])
def test_a_failed_creation_restarts_the_file_or_fails_it_cleanly(
    storage: Storage, faulty: FaultyS3, clean: Any, tmp_path: Any, source: str, action: str, lands: bool
) -> None:
    """The upload is created while the first part is prepared: a 503 there restarts the file once and it
    lands byte-identical; a 403 fails the write naming the URL, with no object, no upload and no abort."""
    data = data_of(2 * PART_SIZE + 123)
    local = tmp_path / "model.pt"
    local.write_bytes(data)
    path = storage.join("created.bin")
    faulty.fail("CreateMultipartUpload", action, times=1)

    def write() -> int:
        if source == "local file":
            return storage.upload_file(str(local), path)
        return storage.write_bytes_atomic(path, data)

    if lands:
        assert write() == len(data)
        assert clean.cat_file(path) == data
        assert faulty.count("CreateMultipartUpload") == 2
    else:
        with pytest.raises(OSError) as info:
            write()
        assert storage.display(path) in str(info.value)
        assert faulty.count("CreateMultipartUpload") == 1
        assert faulty.count("AbortMultipartUpload") == 0  # no upload was made: nothing to abort
        assert not clean.exists(path)
    assert uploads(clean, storage) == []


def test_parts_take_turns_on_event_loops_of_their_own(s3_run_dir: str, faulty: FaultyS3, clean: Any) -> None:
    """Where there are CPUs for it, parts go out from several threads: s3fs's loop and copies of its filesystem.

    The copies have the filesystem's options (so its credentials and endpoint), each its own running
    loop; they are made once per filesystem. Which thread sent each part is recorded by wrapping
    each lane's real ``_call_s3``.
    """
    faulty.clear()
    storage = storage_for(s3_run_dir, faulty, 4)
    got = lanes(storage.fs, 4)
    count = min(4, MAX_LANES, os.cpu_count() or 1)
    assert got[0] is storage.fs and len(got) == count and lanes(storage.fs, 4) == got
    assert len({id(lane.loop) for lane in got}) == count and all(lane.loop.is_running() for lane in got)
    options = dict(storage.fs.storage_options)
    assert all({k: v for k, v in lane.storage_options.items() if k != "loop"} == options for lane in got[1:])
    assert lanes(storage.fs, 1) == [storage.fs]
    senders: set[str] = set()
    for lane in got:
        real = lane._call_s3

        async def recorded(method: str, *args: Any, _real: Any = real, **kwargs: Any) -> Any:
            if method == "upload_part":
                senders.add(threading.current_thread().name)
            return await _real(method, *args, **kwargs)

        lane._call_s3 = recorded
    data = data_of(BIG)
    path = storage.join("lanes.bin")
    try:
        storage.write_bytes_atomic(path, data)
    finally:
        for lane in got:
            del lane._call_s3
    assert clean.cat_file(path) == data and len(senders) == count
    assert uploads(clean, storage) == []


def _upload_in_child(run_dir: str, endpoint: str, path: str, data: bytes) -> None:
    options = {"client_kwargs": {"endpoint_url": endpoint}}
    open_storage(run_dir, options, retry=FAST, max_concurrency=4).write_bytes_atomic(path, data)


def test_a_forked_child_uploads_on_loops_of_its_own(s3_run_dir: str, faulty: FaultyS3, clean: Any) -> None:
    """The parent's lane threads are gone in a forked child: it makes its own, not waiting on dead loops."""
    faulty.clear()
    storage = storage_for(s3_run_dir, faulty, 4)
    storage.write_bytes_atomic(storage.join("parent.bin"), data_of(2 * PART_SIZE + 1))  # the parent's lanes exist
    data = data_of(3 * PART_SIZE)
    path = storage.join("child.bin")
    child = multiprocessing.get_context("fork").Process(
        target=_upload_in_child, args=(s3_run_dir, faulty.endpoint, path, data)
    )
    child.start()
    child.join(45)
    if child.is_alive():
        child.kill()
        child.join()
    assert child.exitcode == 0
    assert clean.cat_file(path) == data
    assert uploads(clean, storage) == []


@pytest.mark.parametrize("calculation", ["when_supported", "when_required"])
def test_the_part_checksums_make_the_objects(s3_run_dir: str, faulty: FaultyS3, clean: Any, calculation: str) -> None:
    """As s3transfer: the upload is created with the CRC32 botocore puts on each part, and completed with them.

    The store then checks every part and combines their checksums (COMPOSITE) instead of hashing the
    whole object again at completion; a client that checksums only when required sends none.
    """
    storage = storage_for(s3_run_dir, faulty, request_checksum_calculation=calculation)
    path = storage.join("big.bin")
    data = data_of(3 * PART_SIZE)
    storage.write_bytes_atomic(path, data)
    bucket, key = path.removeprefix("s3://").split("/", 1)
    got = clean.call_s3("get_object", Bucket=bucket, Key=key, ChecksumMode="ENABLED")  # moto's HEAD omits the type
    assert clean.cat_file(path) == data
    if calculation == "when_supported":
        assert (got.get("ChecksumType"), got.get("ChecksumCRC32", "").rpartition("-")[2]) == ("COMPOSITE", "3")
    else:
        assert "ChecksumCRC32" not in got and got.get("ChecksumType") != "COMPOSITE"


# ---- reading --------------------------------------------------------------------------------
def test_torch_load_reads_ranges_in_parallel(storage: Storage, faulty: FaultyS3) -> None:
    """torch.load of a ~40 MiB state dict: each block fetched once, several GETs in flight at once."""
    state = {"w": torch.randn(BIG // 4 - 1000), "b": torch.arange(1000)}
    path = storage.join("model.pt")
    size = storage.write_atomic(path, lambda f: torch.save(state, f))
    faulty.clear()
    loaded = storage.read_with(path, lambda f: torch.load(f, weights_only=True))
    assert torch.equal(loaded["w"], state["w"]) and torch.equal(loaded["b"], state["b"])
    gets = [s.range for s in faulty.seen if s.op == "GetObject"]
    assert len(gets) == len(set(gets)) == -(-size // READ_BLOCK), gets  # no block fetched twice
    assert faulty.max_in_flight("GetObject") > 1
    assert faulty.count("HeadObject") == 1


def test_seeks_and_reads_match_the_bytes(storage: Storage, faulty: FaultyS3) -> None:
    """Reads across blocks, from the end, and after seeks outside the window return the object's bytes."""
    data = data_of(3 * READ_BLOCK + 77)
    path = storage.join("blob.bin")
    storage.write_bytes_atomic(path, data)
    reader = storage_for("s3://" + storage.root, faulty, max_concurrency=1)
    with reader.open_read(path) as f:
        assert f.seekable() and f.readable()
        assert f.read(4) == data[:4]
        f.seek(-100, os.SEEK_END)
        assert f.read() == data[-100:]
        f.seek(READ_BLOCK - 10)
        assert f.read(20) == data[READ_BLOCK - 10 : READ_BLOCK + 10]
        f.seek(2 * READ_BLOCK + 5)
        buffer = bytearray(2 * READ_BLOCK)
        assert f.readinto(buffer) == READ_BLOCK + 72  # type: ignore[attr-defined]
        assert bytes(buffer[: READ_BLOCK + 72]) == data[-(READ_BLOCK + 72) :]
        f.seek(0)
        assert f.read() == data and f.tell() == len(data) and f.read(10) == b""


def test_an_object_replaced_mid_read_is_read_anew_whole(storage: Storage, faulty: FaultyS3, clean: Any) -> None:
    """The object is replaced after the first block was read: read_with reads the new one from the start."""
    old, new = data_of(2 * READ_BLOCK + 5), data_of(2 * READ_BLOCK + 9)
    path = storage.join("model.pt")
    storage.write_bytes_atomic(path, old)
    reader = storage_for("s3://" + storage.root, faulty, max_concurrency=1)
    firsts: list[bytes] = []

    def read(f: IO[bytes]) -> bytes:
        firsts.append(f.read(MiB))
        if len(firsts) == 1:
            clean.pipe_file(path, new)  # the later blocks' GETs now carry a stale If-Match
        return firsts[-1] + f.read()

    assert reader.read_with(path, read) == new
    assert firsts == [old[:MiB], new[:MiB]]


def test_an_object_replaced_mid_read_never_mixes(storage: Storage, faulty: FaultyS3, clean: Any) -> None:
    """Reading on after the replacement errors (transiently) instead of returning the new object's bytes."""
    old = data_of(2 * READ_BLOCK + 5)
    path = storage.join("model.pt")
    storage.write_bytes_atomic(path, old)
    reader = storage_for("s3://" + storage.root, faulty, max_concurrency=1)
    with reader.open_read(path) as f:
        assert f.read(MiB) == old[:MiB]
        clean.pipe_file(path, data_of(len(old)))
        with pytest.raises(OSError) as info:
            f.read()
    assert is_transient(info.value)


# ---- configuration and the test endpoint itself -----------------------------------------------
@pytest.mark.parametrize("value", [0, -1, "8", True, 2.0])
def test_max_concurrency_is_checked(value: object) -> None:
    """open_storage refuses a max_concurrency that is not an int >= 1, naming it."""
    with pytest.raises(InvalidArgumentError, match="max_concurrency"):
        open_storage("memory://bgsave-parts/run", max_concurrency=value)  # type: ignore[arg-type]


def test_held_requests_wait_for_release(storage: Storage, faulty: FaultyS3, clean: Any) -> None:
    """A "hold" rule keeps a part unserved until release(); wait_for sees it arrive (no polling)."""
    faulty.fail("UploadPart", "hold", times=1)
    path = storage.join("held.bin")
    data = data_of(2 * PART_SIZE)
    done = threading.Event()

    def write() -> None:
        storage.write_bytes_atomic(path, data)
        done.set()

    writer = threading.Thread(target=write)
    writer.start()
    assert faulty.wait_for("UploadPart")
    assert not done.is_set() and not clean.exists(path)
    faulty.release()
    writer.join(timeout=30)
    assert done.is_set() and clean.cat_file(path) == data
    assert not faulty.wait_for("UploadPart", n=99, timeout=0.01)


def test_a_slow_part_does_not_hold_the_others_slots(s3_run_dir: str, faulty: FaultyS3, clean: Any) -> None:
    """Two in flight, one held: the writer refills the other slot (waiting for the oldest, it sent only two)."""
    faulty.clear()
    storage = storage_for(s3_run_dir, faulty, 2)
    faulty.fail("UploadPart", "hold", times=1)
    path = storage.join("slow.bin")
    data = data_of(4 * PART_SIZE)
    writer = threading.Thread(target=storage.write_bytes_atomic, args=(path, data))
    writer.start()
    try:
        assert faulty.wait_for("UploadPart", n=4), "the parts after a held one waited for it"
        assert not clean.exists(path)
    finally:
        faulty.release()
        writer.join(timeout=30)
    assert clean.cat_file(path) == data
    assert uploads(clean, storage) == []


def test_streamed_parts_grow_so_s3s_5_tb_limit_fits_in_10000_parts() -> None:
    """8 MiB parts for the first 1,000 (8 GB), then doubling: 10,000 parts hold more than 5 TiB."""
    from bgsave.storage.parts import PART_SIZE, part_size

    assert part_size(0) == part_size(999) == PART_SIZE
    assert part_size(1000) == 2 * PART_SIZE
    assert sum(part_size(n) for n in range(10_000)) > 5 * 2**40

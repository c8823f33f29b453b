"""One storage contract, run on local disk, ``memory://`` and S3 (moto on loopback).

The same assertions on every backend, as fsspec's abstract tests are reused by s3fs: what a writer
sees, what a reader sees, and what is left behind after a failed write. The last tests run the
manager's contract (save, find, load, commit by sidecar) on each backend through the public API.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import IO

import pytest
import torch
from torch import nn

import bgsave
from bgsave.storage import RetryPolicy, Storage, open_storage
from bgsave.storage.local import LocalStorage

pytestmark = pytest.mark.timeout(60)

MiB = 2**20


class Policy(nn.Module):
    """A small agent: parameters, a buffer and a plain attribute, deterministic for a seed."""

    steps: torch.Tensor  # a registered buffer

    def __init__(self, width: int = 16, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.body = nn.Linear(width, width)
        self.head = nn.Linear(width, 2)
        self.register_buffer("steps", torch.zeros(()))
        self.label = f"policy-{seed}"
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
            self.steps.fill_(seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.head(torch.relu(self.body(x)))
        return y


def same_state(a: object, b: nn.Module) -> bool:
    """Whether ``a`` (as loaded) is a module with exactly ``b``'s state."""
    if not isinstance(a, nn.Module):
        return False
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def torch_writer(obj: object) -> Callable[[IO[bytes]], None]:
    def write(f: IO[bytes]) -> None:
        torch.save(obj, f)

    return write


def torch_load(f: IO[bytes]) -> object:
    return torch.load(f, weights_only=False)


@pytest.fixture
def storage(any_run_dir: str) -> Iterator[Storage]:
    """A Storage rooted at a fresh, existing directory on each backend."""
    st = open_storage(any_run_dir)
    st.makedirs(st.root)
    yield st


def names_in(storage: Storage, directory: str) -> set[str]:
    """Every entry in ``directory``, hidden temp files included, fresh from the backend."""
    if isinstance(storage, LocalStorage):
        return set(os.listdir(directory)) if os.path.isdir(directory) else set()
    try:
        entries = storage.fs.ls(directory, detail=False, refresh=True)
    except FileNotFoundError:
        return set()
    return {e.rstrip("/").rsplit("/", 1)[-1] for e in entries}


def pending_uploads(storage: Storage) -> list[object]:
    """Unfinished multipart uploads in the run's bucket (S3 only; [] elsewhere)."""
    if "s3" not in storage.fs.protocol:
        return []
    bucket = storage.root.split("/", 1)[0]
    uploads: list[object] = storage.fs.list_multipart_uploads(bucket)
    return uploads


def test_write_atomic_then_read_back(storage: Storage) -> None:
    """A torch.save'd module written atomically reads back equal, with the size reported and listed."""
    agent = Policy(seed=1)
    path = storage.join("model.pt")
    size = storage.write_atomic(path, torch_writer(agent))
    loaded = storage.read_with(path, torch_load)
    assert isinstance(loaded, Policy)
    assert same_state(loaded, agent)
    assert loaded.label == "policy-1"
    assert {n: f.size for n, f in storage.list_files(storage.root).items()} == {"model.pt": size}
    assert len(storage.read_bytes(path)) == size
    with storage.open_read(path) as f:
        assert same_state(torch.load(f, weights_only=False), agent)


def test_overwrite_replaces_the_whole_file(storage: Storage) -> None:
    """Writing a shorter file over a longer one leaves exactly the new bytes."""
    path = storage.join("state.bin")
    storage.write_bytes_atomic(path, b"old" * 100_000)
    storage.write_bytes_atomic(path, b"new")
    assert storage.read_bytes(path) == b"new"
    assert names_in(storage, storage.root) == {"state.bin"}


@pytest.mark.parametrize("written", [1000, 17 * MiB], ids=["small", "multipart"])
def test_a_failing_writer_leaves_nothing(storage: Storage, written: int) -> None:
    """A writer raising midway: its own error propagates, no file, no temp file, no pending upload."""
    path = storage.join("model.pt")
    calls = []

    def write(f: IO[bytes]) -> None:
        calls.append(1)
        torch.save(torch.zeros(written // 4, dtype=torch.float32), f)  # a 17 MiB write starts a multipart upload
        raise RuntimeError("serializer broke")

    with pytest.raises(RuntimeError, match="serializer broke"):
        storage.write_atomic(path, write)
    assert calls == [1]  # the caller's own error is never retried
    assert names_in(storage, storage.root) == set()
    assert not storage.is_file(path)
    assert pending_uploads(storage) == []


def test_a_failing_overwrite_keeps_the_old_file(storage: Storage) -> None:
    """When replacing a file fails, readers still get the previous content, whole."""
    path = storage.join("model.pt")
    agent = Policy(seed=2)
    storage.write_atomic(path, torch_writer(agent))

    def write(f: IO[bytes]) -> None:
        f.write(b"\0" * 6 * MiB)
        raise OSError("disk on fire")

    with pytest.raises(OSError, match="disk on fire"):
        storage.write_atomic(path, write)
    assert same_state(storage.read_with(path, torch_load), agent)
    assert names_in(storage, storage.root) == {"model.pt"}
    assert pending_uploads(storage) == []


def test_large_bytes_are_written_whole(storage: Storage) -> None:
    """write_bytes_atomic above the single-request size (a multipart upload on S3) round-trips."""
    data = os.urandom(6 * MiB)
    path = storage.join("blob.bin")
    assert storage.write_bytes_atomic(path, data) == len(data)
    assert storage.read_bytes(path) == data
    assert pending_uploads(storage) == []


def test_writes_leave_nothing_in_the_shared_filesystem(storage: Storage) -> None:
    """Uploads are not filed in ``fs.transaction`` (shared by every user of the cached instance)."""
    storage.write_atomic(storage.join("a.pt"), torch_writer(Policy()))

    def write(f: IO[bytes]) -> None:
        f.write(b"x")
        raise RuntimeError("no")

    with pytest.raises(RuntimeError):
        storage.write_atomic(storage.join("b.pt"), write)
    transaction = getattr(storage.fs, "_transaction", None)
    assert transaction is None or not transaction.files


def test_listing_ignores_directories(storage: Storage) -> None:
    """list_files gives the files directly in a directory, not subdirectories or their files."""
    storage.write_bytes_atomic(storage.join("a.yaml"), b"12345")
    sub = storage.join("sub")
    storage.makedirs(sub)
    storage.write_bytes_atomic(storage.join_dir(sub, "b.yaml"), b"x")
    assert {n: f.size for n, f in storage.list_files(storage.root).items()} == {"a.yaml": 5}
    assert storage.list_names(storage.root) == {"a.yaml"}
    assert storage.list_files(storage.join("missing")) == {}


def test_read_many_reads_a_batch(storage: Storage) -> None:
    """read_many returns every file's bytes, and FileNotFoundError for a missing one."""
    paths = [storage.join(f"s{i}.yaml") for i in range(3)]
    for i, p in enumerate(paths):
        storage.write_bytes_atomic(p, f"epoch: {i}\n".encode())
    missing = storage.join("gone.yaml")
    got = storage.read_many([*paths, missing])
    assert [got[p] for p in paths] == [b"epoch: 0\n", b"epoch: 1\n", b"epoch: 2\n"]
    assert isinstance(got[missing], FileNotFoundError)
    assert storage.read_many([]) == {}


def test_delete_and_is_file(storage: Storage) -> None:
    """delete removes a file, deleting a missing one is fine, is_file tells files from the rest."""
    path = storage.join("x.bin")
    storage.write_bytes_atomic(path, b"x")
    assert storage.is_file(path)
    storage.delete(path)
    assert not storage.is_file(path)
    storage.delete(path)
    storage.delete(storage.join("never-existed.bin"))
    assert not storage.is_file(storage.join("never-existed.bin"))


def test_read_of_a_missing_file_names_it(storage: Storage) -> None:
    """Reading a missing file raises FileNotFoundError whose message names the path or URL."""
    path = storage.join("absent.pt")
    with pytest.raises(FileNotFoundError) as info:
        storage.read_bytes(path)
    assert storage.display(path) in str(info.value)
    with pytest.raises(FileNotFoundError):
        storage.read_with(path, torch_load)


def test_stale_temps_are_local_only(storage: Storage) -> None:
    """A leftover ``.name.bgsave-tmp`` is removed on local disk; a user's ``.notes.tmp`` never is."""
    if isinstance(storage, LocalStorage):
        for name in (".model_0001.pt.bgsave-tmp", ".notes.txt.tmp", ".env.tmp", "x.bgsave-tmp"):
            with open(os.path.join(storage.root, name), "wb") as f:
                f.write(b"partial")
        assert storage.remove_stale_temps(storage.root) == [".model_0001.pt.bgsave-tmp"]
        assert names_in(storage, storage.root) == {".notes.txt.tmp", ".env.tmp", "x.bgsave-tmp"}
    else:
        assert storage.remove_stale_temps(storage.root) == []


def test_retry_policy_is_validated() -> None:
    """Bad retry settings are refused at construction, naming the argument."""
    with pytest.raises(bgsave.InvalidArgumentError, match="attempts"):
        RetryPolicy(attempts=0)
    with pytest.raises(bgsave.InvalidArgumentError, match="initial_delay"):
        RetryPolicy(initial_delay=-1)
    with pytest.raises(bgsave.InvalidArgumentError, match="max_delay"):
        RetryPolicy(max_delay=float("nan"))
    policy = RetryPolicy(attempts=4, initial_delay=1.0, max_delay=3.0)
    assert [0.5 <= policy.delay(1) <= 1.0, 1.0 <= policy.delay(2) <= 2.0, 1.5 <= policy.delay(5) <= 3.0] == [True] * 3


# ---- the manager's contract, on each backend ------------------------------------------------
def test_manager_contract(any_run_dir: str) -> None:
    """Save, find latest and best, load agent and trainer state, on each backend."""
    agents = {epoch: Policy(seed=epoch) for epoch in (1, 2, 3)}
    scores = {1: 0.5, 2: 0.9, 3: 0.7}
    optimizer = torch.optim.Adam(agents[3].parameters(), lr=0.01)
    agents[3](torch.randn(4, 16)).sum().backward()
    optimizer.step()
    with bgsave.CheckpointManager(any_run_dir, "contract") as mgr:
        for epoch, agent in agents.items():
            mgr.save_agent(agent, epoch, {"agent_step": 100 * epoch, "score": scores[epoch]})
        mgr.save_trainer_state(optimizer, 3, 300)
        mgr.wait()

        latest = mgr.find_latest_checkpoint()
        assert latest is not None and latest.endswith("model_0003.pt")
        assert latest.startswith(mgr.checkpoint_dir)
        best = mgr.find_best_checkpoint()
        assert best is not None and best.endswith("model_0002.pt")
        assert [p.rsplit("/", 1)[-1] for p in mgr.find_checkpoints_by_score(0.7)] == ["model_0002.pt", "model_0003.pt"]
        assert same_state(mgr.load_agent(), agents[3])
        assert same_state(mgr.load_agent(1), agents[1])
        state = mgr.load_trainer_state()
        assert state is not None and state["epoch"] == 3 and state["agent_step"] == 300
        fresh = torch.optim.Adam(Policy(seed=3).parameters(), lr=0.01)
        fresh.load_state_dict(state["optimizer_state"])

        assert bgsave.find_latest_checkpoint(mgr.checkpoint_dir) == latest
        assert same_state(bgsave.load_checkpoint(latest), agents[3])


def test_a_pt_without_its_sidecar_is_not_committed(any_run_dir: str) -> None:
    """A newer ``.pt`` with no sidecar (a crash between the two writes) is not a checkpoint."""
    with bgsave.CheckpointManager(any_run_dir, "orphan") as mgr:
        mgr.save_agent(Policy(seed=1), 1, {"agent_step": 10, "score": 1.0})
        mgr.wait()
        storage = open_storage(any_run_dir)
        orphan = storage.join("checkpoints", "model_0002.pt")
        storage.write_atomic(orphan, torch_writer(Policy(seed=2)))
        assert storage.is_file(orphan)

        latest = mgr.find_latest_checkpoint()
        assert latest is not None and latest.endswith("model_0001.pt")
        assert [info.epoch for info in mgr.checkpoints()] == [1]
        assert same_state(mgr.load_agent(), Policy(seed=1))
        with pytest.raises(bgsave.CheckpointNotFoundError):
            mgr.load_agent(2)
        assert bgsave.find_latest_checkpoint(mgr.checkpoint_dir) == latest


def test_transient_failures_are_retried_and_logged_without_secrets(
    memory_run_dir: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A write failing twice with a connection error is retried from the start; the log masks credentials."""
    storage = open_storage(memory_run_dir, retry=RetryPolicy(attempts=3, initial_delay=0.001))
    real_pipe = storage.fs.pipe_file
    failures = [ConnectionResetError("reset talking to http://user:hunter2@proxy:3128/")] * 2

    def flaky_pipe(path: str, data: bytes) -> None:
        if failures:
            raise failures.pop()
        real_pipe(path, data)

    monkeypatch.setattr(storage.fs, "pipe_file", flaky_pipe)
    calls = []

    def write(f: IO[bytes]) -> None:
        calls.append(1)
        torch.save(Policy(), f)

    path = storage.join("model.pt")
    with caplog.at_level("WARNING", logger="bgsave.storage"):
        storage.write_atomic(path, write)
    assert len(calls) == 3
    assert same_state(storage.read_with(path, torch_load), Policy())
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert all(storage.display(path) in m for m in messages)
    assert "attempt 1 of 3" in messages[0] and "attempt 2 of 3" in messages[1]
    assert "hunter2" not in caplog.text

"""Mirrored run directories: commit locally, upload to the mirror in the background, resume from the newer tier.

Most tests mirror to ``memory://`` (fast); those about buckets use the real moto server. A mirror
that lags is made by wrapping the real mirror storage's ``upload_file`` with a gate.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

import fsspec
import pytest
import torch

import bgsave
import bgsave.cli
from _models import Agent, assert_state_equal, make_optimizer, state_of, train
from bgsave import CheckpointManager, InvalidArgumentError, MirrorError, RunLockedError

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def mirror(memory_run_dir: str) -> str:
    """A fresh ``memory://`` mirror (spelled as the manager shows it), removed afterwards."""
    return memory_run_dir.replace("memory://", "memory:///")


def mirror_names(url: str) -> set[str]:
    fs, path = fsspec.core.url_to_fs(url)
    try:
        return {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path + "/checkpoints", detail=False)}
    except FileNotFoundError:
        return set()


def committed(names: set[str]) -> set[int]:
    return {int(n[6:-5]) for n in names if n.startswith("model_") and n.endswith(".yaml")}


def local_names(run_dir: str) -> set[str]:
    path = os.path.join(run_dir, "checkpoints")
    return set(os.listdir(path)) if os.path.isdir(path) else set()


def train_run(mgr: CheckpointManager, epochs: range, *, seed: int = 0) -> Agent:
    """Resume (or start) and train, saving agent and optimizer every epoch; returns the agent."""
    start = mgr.start_run(lambda: Agent(seed=seed))
    agent: Agent = start.agent
    optimizer = make_optimizer(agent)
    start.restore(optimizer)
    for epoch in epochs:
        train(agent, optimizer, steps=1, seed=epoch)
        mgr.save_at_interval(agent, epoch, interval=1, optimizer=optimizer, metadata={"score": float(epoch)})
    return agent


class Gate:
    """Wraps a real storage's ``upload_file``: each upload waits until the gate is opened."""

    def __init__(self, mgr: CheckpointManager) -> None:
        storage = mgr._mirror.storage  # type: ignore[union-attr]
        self._real: Callable[[str, str], int] = storage.upload_file
        self.opened = threading.Event()
        self.entered = threading.Semaphore(0)
        storage.upload_file = self  # type: ignore[method-assign]

    def __call__(self, local_path: str, path: str) -> int:
        self.entered.release()
        assert self.opened.wait(60)
        return self._real(local_path, path)


# ---- the contract -----------------------------------------------------------------------
def test_each_committed_checkpoint_is_mirrored_with_its_trainer_state_and_status_says_so(
    local_run_dir: str, mirror: str
) -> None:
    """Saves commit locally and land in the mirror, .pt, trainer state and sidecar, after wait()."""
    with CheckpointManager(local_run_dir, "exp", mirror=mirror) as mgr:
        train_run(mgr, range(1, 4))
        mgr.wait()
        status = mgr.mirror_status()
        assert mgr.mirror == mirror
    names = mirror_names(mirror)
    for epoch in range(4):
        assert {f"model_{epoch:04d}.pt", f"model_{epoch:04d}.yaml"} <= names
    assert {f"trainer_{e:04d}.pt" for e in range(1, 4)} <= names
    got = [(s.epoch, s.state, s.in_local, s.in_mirror) for s in status]
    assert got == [(e, "mirrored", True, True) for e in range(4)]
    assert all(s.upload_s is not None and s.upload_s >= 0 for s in status)
    assert local_names(local_run_dir) >= {"model_0003.pt", "trainer_0003.pt", "model_0003.yaml"}


def test_a_fresh_node_resumes_from_the_mirror_with_that_epochs_trainer_state(tmp_path: Any, mirror: str) -> None:
    """An empty local directory resumes the mirror's newest epoch, agent and trainer state of that epoch."""
    first = str(tmp_path / "node1")
    with CheckpointManager(first, "exp", mirror=mirror) as mgr:
        agent = train_run(mgr, range(1, 4))
        expected = state_of(agent)
    fresh = str(tmp_path / "node2")
    with CheckpointManager(fresh, "exp", mirror=mirror) as mgr:
        assert mgr.find_latest_checkpoint() == f"{mirror}/checkpoints/model_0003.pt"
        start = mgr.start_run(lambda: Agent(seed=9))
        assert start.resumed and start.epoch == 3
        assert start.trainer_state is not None and start.trainer_state["epoch"] == 3
        assert_state_equal(expected, start.agent)
        assert torch.equal(mgr.load_agent(3).encoder.weight, start.agent.encoder.weight)
    assert not os.path.exists(os.path.join(fresh, "checkpoints", "model_0003.pt"))  # no local copy (bgsave.tiers)


def stale_copy(tmp_path: Any, mirror: str) -> str:
    """A local run directory that stopped at epoch 2, while the run went on to epoch 4 in the mirror."""
    node = str(tmp_path / "node")
    with CheckpointManager(node, "exp", mirror=mirror) as mgr:
        train_run(mgr, range(1, 3))
    stale = str(tmp_path / "stale")
    shutil.copytree(node, stale)
    with CheckpointManager(node, "exp", mirror=mirror) as mgr:
        train_run(mgr, range(3, 5))
    return stale


def test_a_stale_local_copy_resumes_the_newer_mirrored_epoch(tmp_path: Any, mirror: str) -> None:
    """A node whose local directory stopped at epoch 2 resumes epoch 4 from the mirror."""
    with CheckpointManager(stale_copy(tmp_path, mirror), "exp", mirror=mirror) as mgr:
        start = mgr.start_run(Agent)
        assert start.epoch == 4 and start.trainer_state is not None and start.trainer_state["epoch"] == 4


def listings(mgr: CheckpointManager) -> Counter[str]:
    """How often each tier's directory is listed from now on (its real storage's ``list_files``, wrapped)."""
    counts: Counter[str] = Counter()
    assert mgr._mirror is not None
    for tier, storage in (("local", mgr._catalog.storage), ("mirror", mgr._mirror.catalog.storage)):

        def listing(directory: str, real: Any = storage.list_files, tier: str = tier) -> Any:
            counts[tier] += 1
            return real(directory)

        storage.list_files = listing  # type: ignore[method-assign]
    return counts


def test_a_start_and_a_load_list_each_tier_once(tmp_path: Any, mirror: str) -> None:
    """start_run (the claim of both tiers, the tier to resume, its checkpoint and trainer state) and load_agent
    list each tier once, on a fresh node and on a node with a stale local copy."""
    stale = stale_copy(tmp_path, mirror)
    for run_dir in (str(tmp_path / "fresh"), stale):
        with CheckpointManager(run_dir, "exp", mirror=mirror) as mgr:
            counts = listings(mgr)
            start = mgr.start_run(Agent)
            assert start.epoch == 4 and start.trainer_state is not None and start.trainer_state["epoch"] == 4
            assert counts == {"local": 1, "mirror": 1}
            counts.clear()
            assert torch.equal(mgr.load_agent().encoder.weight, start.agent.encoder.weight)
            assert counts == {"local": 1, "mirror": 1}


def test_a_start_that_clears_a_killed_writers_leftovers_lists_again(tmp_path: Any, mirror: str) -> None:
    """Leftovers in both tiers (a killed save's .pt, a killed upload's .pt): the claim deletes them, and the
    resume then lists each tier afresh rather than trust the listing they were in."""
    node = str(tmp_path / "node")
    with CheckpointManager(node, "exp", mirror=mirror) as mgr:
        train_run(mgr, range(1, 4))
    os.remove(os.path.join(node, "checkpoints", "model_0001.yaml"))  # epoch 1 killed before its sidecar
    fs, path = fsspec.core.url_to_fs(mirror)
    fs.pipe_file(path + "/checkpoints/model_0009.pt", b"a killed upload's weights")
    with CheckpointManager(node, "exp", mirror=mirror) as mgr:
        counts = listings(mgr)
        start = mgr.start_run(Agent)
        assert start.epoch == 3 and start.trainer_state is not None and start.trainer_state["epoch"] == 3
        assert counts == {"local": 2, "mirror": 2}
    assert "model_0001.pt" not in local_names(node) and "model_0009.pt" not in mirror_names(mirror)


def test_a_local_epoch_newer_than_the_mirror_wins_and_is_uploaded_by_the_next_writer(
    local_run_dir: str, mirror: str
) -> None:
    """Local epoch 3 (saved without the mirror) beats the mirror's 2, and the next writer uploads it."""
    with CheckpointManager(local_run_dir, "exp", mirror=mirror) as mgr:
        train_run(mgr, range(1, 3))
    with CheckpointManager(local_run_dir, "exp") as mgr:
        train_run(mgr, range(3, 4))
    assert committed(mirror_names(mirror)) == {0, 1, 2}
    with CheckpointManager(local_run_dir, "exp", mirror=mirror) as mgr:
        assert mgr.find_latest_checkpoint() == os.path.join(local_run_dir, "checkpoints", "model_0003.pt")
        start = mgr.start_run(Agent)
        assert start.epoch == 3
        mgr.wait()
        assert committed(mirror_names(mirror)) == {0, 1, 2, 3}


def test_a_lone_trainer_state_and_a_late_score_reach_the_mirror(local_run_dir: str, mirror: str) -> None:
    """save_trainer_state after save_agent, and update_metadata, re-sync the epoch in the mirror."""
    agent = Agent()
    optimizer = make_optimizer(agent)
    with CheckpointManager(local_run_dir, "exp", mirror=mirror) as mgr:
        mgr.save_agent(agent, 5, metadata={"agent_step": 50})
        mgr.save_trainer_state(optimizer, 5, 50)
        mgr.update_metadata(5, score=0.75)
        mgr.wait()
    fresh = os.path.join(os.path.dirname(local_run_dir), "fresh")
    with CheckpointManager(fresh, "exp", mirror=mirror) as mgr:
        start = mgr.start_run(Agent)
        assert start.epoch == 5 and start.trainer_state is not None and start.trainer_state["epoch"] == 5
        assert start.info is not None and start.info.sidecar["score"] == 0.75


def test_a_score_set_while_its_epoch_uploads_reaches_the_mirror(local_run_dir: str, mirror: str) -> None:
    """The sidecar is rewritten locally after the uploader read it: the upload goes again with the new one."""
    with CheckpointManager(local_run_dir, "exp", mirror=mirror) as mgr:
        gate = Gate(mgr)
        mgr.save_agent(Agent(), 5)
        assert gate.entered.acquire(timeout=30)  # epoch 5 is uploading: its sidecar (no score) is read
        mgr.update_metadata(5, score=0.75)
        mgr.find_latest_checkpoint()  # the local rewrite is done
        gate.opened.set()
        mgr.wait()
        assert mgr.mirror_status()[0].state == "mirrored"
    with fsspec.open(f"{mirror}/checkpoints/model_0005.yaml", "rt") as f:
        assert "score: 0.75" in f.read()


# ---- retention per tier, lag, backpressure ----------------------------------------------
def test_local_retention_keeps_what_the_mirror_has_not_got(local_run_dir: str, mirror: str) -> None:
    """keep_last=1 locally while uploads lag: every un-mirrored checkpoint stays until it is mirrored."""
    with CheckpointManager(local_run_dir, "exp", mirror=mirror, keep_last=1) as mgr:
        gate = Gate(mgr)
        mgr.save_agent(Agent(seed=0), 0)
        assert gate.entered.acquire(timeout=30)  # epoch 0 is uploading, held
        for epoch in (1, 2):
            mgr.save_agent(Agent(seed=epoch), epoch)
        mgr.find_latest_checkpoint()  # the local writes are done (and each commit's pruning)
        assert committed(local_names(local_run_dir)) == {0, 1, 2}
        assert {s.epoch for s in mgr.mirror_status() if s.state == "pending"} == {0, 1, 2}
        gate.opened.set()
        mgr.wait()
        assert committed(mirror_names(mirror)) == {0, 1, 2}
        mgr.save_agent(Agent(seed=3), 3)
        mgr.wait()
        assert committed(local_names(local_run_dir)) == {3}
    assert committed(mirror_names(mirror)) == {0, 1, 2, 3}  # the mirror keeps everything (its own retention)


def test_the_mirror_has_its_own_retention(local_run_dir: str, mirror: str) -> None:
    """mirror_keep_last=2, mirror_keep_best=1 prune the mirror; the local tier keeps all."""
    with CheckpointManager(local_run_dir, "exp", mirror=mirror, mirror_keep_last=2, mirror_keep_best=1) as mgr:
        for epoch, score in enumerate([0.1, 0.9, 0.2, 0.3, 0.4]):
            mgr.save_agent(Agent(seed=epoch), epoch, metadata={"score": score})
            mgr.wait()  # one at a time: no upload is superseded
    assert committed(mirror_names(mirror)) == {1, 3, 4}
    assert committed(local_names(local_run_dir)) == {0, 1, 2, 3, 4}


def test_lagging_uploads_let_the_newest_supersede_what_mirror_retention_would_drop(
    local_run_dir: str, mirror: str, caplog: pytest.LogCaptureFixture
) -> None:
    """With mirror_keep_last=1, queued older uploads are skipped for the newest, with one WARNING."""
    with (
        caplog.at_level(logging.WARNING, logger="bgsave.mirror"),
        CheckpointManager(local_run_dir, "exp", mirror=mirror, mirror_keep_last=1) as mgr,
    ):
        gate = Gate(mgr)
        mgr.save_agent(Agent(seed=0), 0)
        assert gate.entered.acquire(timeout=30)
        for epoch in (1, 2, 3, 4):
            mgr.save_agent(Agent(seed=epoch), epoch)
        mgr.find_latest_checkpoint()
        gate.opened.set()
        mgr.wait()
        states = {s.epoch: s.state for s in mgr.mirror_status()}
    assert committed(mirror_names(mirror)) == {4}
    assert states == {0: "local", 1: "local", 2: "local", 3: "local", 4: "mirrored"}
    assert len([r for r in caplog.records if "supersedes" in r.getMessage()]) == 1


def test_mirror_every_n_uploads_every_nth_committed_checkpoint(local_run_dir: str, mirror: str) -> None:
    """mirror_every_n=2: the 1st, 3rd, 5th committed checkpoints go; the others stay local."""
    with CheckpointManager(local_run_dir, "exp", mirror=mirror, mirror_every_n=2, keep_last=1) as mgr:
        for epoch in range(5):
            mgr.save_agent(Agent(seed=epoch), epoch)
            mgr.wait()
    assert committed(mirror_names(mirror)) == {0, 2, 4}
    assert committed(local_names(local_run_dir)) == {4}


# ---- failures ---------------------------------------------------------------------------
def test_a_failing_upload_is_raised_at_wait_naming_url_and_epoch_and_the_local_commit_stands(
    local_run_dir: str, mirror: str
) -> None:
    """An upload that fails for good is a MirrorError at the next call; the local checkpoint loads."""
    mgr = CheckpointManager(local_run_dir, "exp", mirror=mirror, retry=bgsave.RetryPolicy(attempts=1))
    storage = mgr._mirror.storage  # type: ignore[union-attr]

    def refuse(local_path: str, path: str) -> int:
        raise PermissionError(13, "Access Denied", path)

    storage.upload_file = refuse  # type: ignore[method-assign]
    mgr.save_agent(Agent(seed=1), 1)
    with pytest.raises(MirrorError) as caught:
        mgr.wait()
    assert caught.value.epoch == 1 and caught.value.url == mirror and mirror in str(caught.value)
    assert isinstance(caught.value.__cause__, PermissionError)
    assert [(s.epoch, s.state) for s in mgr.mirror_status()] == [(1, "failed")]
    assert torch.equal(mgr.load_agent(1).encoder.weight, Agent(seed=1).encoder.weight)
    mgr.close()
    assert committed(mirror_names(mirror)) == set()


def test_a_second_writer_on_the_same_mirror_is_refused(tmp_path: Any, mirror: str) -> None:
    """The mirror has its own writer lock: another run directory mirroring there is refused at its first write."""
    with CheckpointManager(str(tmp_path / "a"), "exp", mirror=mirror) as first:
        first.save_agent(Agent(), 1)
        with CheckpointManager(str(tmp_path / "b"), "exp", mirror=mirror) as second, pytest.raises(RunLockedError):
            second.save_agent(Agent(), 2)


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"mirror": 12}, "mirror"),
        ({"mirror": "nosuchproto://x/y"}, "mirror"),
        ({"mirror_storage_options": {"anon": True}}, "mirror_storage_options"),
        ({"mirror": "MIRROR", "mirror_every_n": 0}, "mirror_every_n"),
        ({"mirror": "MIRROR", "mirror_keep_last": 0}, "mirror_keep_last"),
        ({"mirror": "MIRROR", "mirror_keep_best": 2}, "mirror_keep_best"),
        ({"mirror": "MIRROR", "sharding": "dcp"}, "sharding"),
        ({"mirror": "MIRROR", "max_concurrency": 0}, "max_concurrency"),
        ({"mirror": "RUN_DIR"}, "mirror"),
    ],
)
def test_bad_mirror_arguments_are_refused_naming_them_and_nothing_is_created(
    local_run_dir: str, mirror: str, kwargs: dict[str, Any], named: str
) -> None:
    """Each bad mirror argument: InvalidArgumentError naming it; neither tier is touched."""
    swap = {"MIRROR": mirror, "RUN_DIR": local_run_dir}
    kwargs = {k: swap.get(v, v) if isinstance(v, str) else v for k, v in kwargs.items()}
    with pytest.raises(InvalidArgumentError, match=named):
        CheckpointManager(local_run_dir, "exp", **kwargs)
    assert not os.path.exists(local_run_dir)
    assert mirror_names(mirror) == set()


def test_a_mirror_needs_a_local_run_dir(memory_run_dir: str, local_run_dir: str) -> None:
    """A run directory that is itself remote cannot be the fast tier."""
    with pytest.raises(InvalidArgumentError, match="local disk"):
        CheckpointManager(memory_run_dir + "-run", "exp", mirror=local_run_dir)


def test_the_cli_lists_both_tiers(
    local_run_dir: str, mirror: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``bgsave ls RUN_DIR --mirror URL`` shows each epoch with the tiers that hold it."""
    monkeypatch.setenv("COLUMNS", "200")
    with CheckpointManager(local_run_dir, "exp", mirror=mirror, keep_last=1) as mgr:
        for epoch in range(3):
            mgr.save_agent(Agent(seed=epoch), epoch)
            mgr.wait()
    assert bgsave.cli.main(["ls", local_run_dir, "--mirror", mirror, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    tiers = [(r["epoch"], r["local"], r["mirrored"]) for r in rows]
    assert tiers == [(0, False, True), (1, False, True), (2, True, True)]
    assert bgsave.cli.main(["ls", local_run_dir, "--mirror", mirror]) == 0
    table = capsys.readouterr().out
    assert "tiers" in table and "local+mirror" in table


def test_a_late_score_for_an_epoch_an_earlier_manager_mirrored_sends_only_the_sidecar(
    local_run_dir: str, mirror: str
) -> None:
    """update_metadata in a new process: the mirror's sidecar gets the score; the .pt is not uploaded again."""
    with CheckpointManager(local_run_dir, "exp", mirror=mirror) as mgr:
        mgr.save_agent(Agent(), 3)
    with CheckpointManager(local_run_dir, "exp", mirror=mirror) as mgr:
        storage = mgr._mirror.storage  # type: ignore[union-attr]
        real, sent = storage.upload_file, []

        def recording(local_path: str, path: str) -> int:
            sent.append(path)
            return real(local_path, path)

        storage.upload_file = recording  # type: ignore[method-assign]
        mgr.update_metadata(3, score=0.5)
        mgr.wait()
    assert sent == []
    fs, path = fsspec.core.url_to_fs(mirror)
    assert b"score: 0.5" in fs.cat_file(path + "/checkpoints/model_0003.yaml")


def test_the_mirrors_old_sidecar_is_deleted_before_a_reupload_and_only_where_there_is_one(
    local_run_dir: str, mirror: str
) -> None:
    """A first upload sends no DELETE; a re-save (this manager's, or one an earlier manager mirrored) deletes the
    mirror's sidecar of that epoch before its new weights go up, so a reader never pairs them."""

    def recorded(mgr: CheckpointManager) -> list[tuple[str, str]]:
        storage = mgr._mirror.storage  # type: ignore[union-attr]
        real_delete, real_upload, calls = storage.delete, storage.upload_file, []

        def delete(path: str) -> None:
            calls.append(("delete", path.rsplit("/", 1)[-1]))
            real_delete(path)

        def upload(local_path: str, path: str) -> int:
            calls.append(("upload", path.rsplit("/", 1)[-1]))
            return real_upload(local_path, path)

        storage.delete, storage.upload_file = delete, upload  # type: ignore[method-assign]
        return calls

    with CheckpointManager(local_run_dir, "exp", mirror=mirror) as mgr:
        calls = recorded(mgr)
        mgr.save_agent(Agent(seed=1), 1)
        mgr.wait()
        assert calls == [("upload", "model_0001.pt")]
        mgr.save_agent(Agent(seed=2), 1)  # a re-save of the epoch this manager mirrored
        mgr.wait()
        assert calls[1:] == [("delete", "model_0001.yaml"), ("upload", "model_0001.pt")]
    with CheckpointManager(local_run_dir, "exp", mirror=mirror) as mgr:
        calls = recorded(mgr)
        mgr.save_agent(Agent(seed=3), 2)
        mgr.save_agent(Agent(seed=4), 1)  # an earlier manager mirrored it: its sidecar was listed at the claim
        mgr.wait()
    assert sorted(c for c in calls if c[1].startswith("model_")) == [
        ("delete", "model_0001.yaml"),
        ("upload", "model_0001.pt"),
        ("upload", "model_0002.pt"),
    ]
    assert calls.index(("delete", "model_0001.yaml")) < calls.index(("upload", "model_0001.pt"))
    assert committed(mirror_names(mirror)) == {1, 2}
    with CheckpointManager(mirror, "exp") as reader:
        assert_state_equal(state_of(Agent(seed=4)), reader.load_agent(1))


def test_a_failed_upload_leaves_nothing_of_its_epoch_in_the_mirror(local_run_dir: str, mirror: str) -> None:
    """The .pt went up, the trainer state failed: the .pt is removed again; the mirror shows nothing of epoch 2."""
    mgr = CheckpointManager(local_run_dir, "exp", mirror=mirror, retry=bgsave.RetryPolicy(attempts=1))
    storage = mgr._mirror.storage  # type: ignore[union-attr]
    real = storage.upload_file

    def fail_trainer(local_path: str, path: str) -> int:
        if "trainer_" in path:
            raise ConnectionResetError("connection reset by peer")
        return real(local_path, path)

    storage.upload_file = fail_trainer  # type: ignore[method-assign]
    agent = Agent()
    mgr.save_at_interval(agent, 2, interval=1, optimizer=make_optimizer(agent))
    with pytest.raises(MirrorError, match="epoch 2"):
        mgr.wait()
    mgr.close()
    assert mirror_names(mirror) <= {".bgsave-catalog.json"}
    assert committed(local_names(local_run_dir)) == {2}


def test_the_heartbeat_refreshes_both_writer_locks(local_run_dir: str, mirror: str) -> None:
    """The worker's periodic task rewrites the heartbeat of the run directory's lock and of the mirror's."""
    with CheckpointManager(local_run_dir, "exp", mirror=mirror) as mgr:
        mgr.save_agent(Agent(), 1)
        mgr.wait()
        locks = [mgr._life._lock, mgr._mirror.lock]  # type: ignore[union-attr]
        before = [json.loads(lock._storage.read_bytes(lock.path))["heartbeat"] for lock in locks]
        _, beat = locks[0].heartbeats(*locks)
        beat()
        after = [json.loads(lock._storage.read_bytes(lock.path))["heartbeat"] for lock in locks]
    assert all(a > b for a, b in zip(after, before, strict=True))


def test_find_best_by_score_and_the_trainer_state_cover_both_tiers(tmp_path: Any, mirror: str) -> None:
    """The best epoch, pruned locally but in the mirror, is found there; by-score lists both tiers; a fresh node's
    load_trainer_state is the mirror's newest epoch's."""
    node = str(tmp_path / "node")
    with CheckpointManager(node, "exp", mirror=mirror, keep_last=1) as mgr:
        agent = Agent()
        optimizer = make_optimizer(agent)
        for epoch, score in enumerate([0.2, 0.9, 0.1]):
            mgr.save_at_interval(agent, epoch, interval=1, optimizer=optimizer, metadata={"score": score})
            mgr.wait()
        assert committed(local_names(node)) == {2}
        assert mgr.find_best_checkpoint() == f"{mirror}/checkpoints/model_0001.pt"
        assert mgr.find_checkpoints_by_score(0.15) == [
            f"{mirror}/checkpoints/model_0000.pt",
            f"{mirror}/checkpoints/model_0001.pt",
        ]
        assert [info.epoch for info in mgr.checkpoints()] == [0, 1, 2]
    with CheckpointManager(str(tmp_path / "fresh"), "exp", mirror=mirror) as fresh:
        state = fresh.load_trainer_state()
        assert state is not None and state["epoch"] == 2


def test_a_backlog_the_mirror_must_keep_is_reported_once(
    local_run_dir: str, mirror: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The mirror keeps everything: lagging uploads are all kept (none skipped), with one WARNING."""
    with (
        caplog.at_level(logging.WARNING, logger="bgsave.mirror"),
        CheckpointManager(local_run_dir, "exp", mirror=mirror) as mgr,
    ):
        gate = Gate(mgr)
        mgr.save_agent(Agent(seed=0), 0)
        assert gate.entered.acquire(timeout=30)
        for epoch in range(1, 6):
            mgr.save_agent(Agent(seed=epoch), epoch)
        mgr.find_latest_checkpoint()
        gate.opened.set()
        mgr.wait()
    assert committed(mirror_names(mirror)) == set(range(6))
    assert len([r for r in caplog.records if "behind" in r.getMessage()]) == 1

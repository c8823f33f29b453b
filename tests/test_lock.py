"""One writer per run directory: a second writer is refused, a dead writer's lock is taken over, readers never lock."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any

import pytest
import torch

from bgsave import CheckpointManager, CheckpointWriteError, RunLockedError
from bgsave.lock import LOCK_NAME, STALE_AFTER


def _lock_path(run_dir: str) -> str:
    return os.path.join(run_dir, LOCK_NAME)


def _write_lock(run_dir: str, **fields: object) -> None:
    os.makedirs(run_dir, exist_ok=True)
    record = {"pid": os.getpid(), "host": socket.gethostname(), "since": "then", "heartbeat": time.time()}
    record.update(fields)
    with open(_lock_path(run_dir), "w") as f:
        json.dump(record, f)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_second_manager_in_same_process_is_refused_until_first_closes(any_run_dir: str) -> None:
    """The second writer's first save raises RunLockedError naming pid and host; after close it may write."""
    first = CheckpointManager(any_run_dir, "a")
    first.save_agent(torch.nn.Linear(2, 2), 0)
    second = CheckpointManager(any_run_dir, "b")
    with pytest.raises(RunLockedError) as info:
        second.save_agent(torch.nn.Linear(2, 2), 1)
    assert f"pid {os.getpid()}" in str(info.value)
    assert socket.gethostname() in str(info.value)
    assert info.value.holder["run"] == "a"
    first.close()
    second.save_agent(torch.nn.Linear(2, 2), 1)
    assert second.find_latest_checkpoint() is not None
    assert [i.epoch for i in second.checkpoints()] == [0, 1]
    second.close()


def test_readers_never_need_the_lock(local_run_dir: str) -> None:
    """While a writer holds the run, another manager can find and load, and bgsave ls works."""
    with CheckpointManager(local_run_dir, "w") as writer:
        writer.save_agent(torch.nn.Linear(2, 2), 3, {"score": 1.0})
        writer.wait()
        reader = CheckpointManager(local_run_dir, "w")
        assert reader.find_best_checkpoint() == writer.find_latest_checkpoint()
        assert isinstance(reader.load_agent(), torch.nn.Linear)
        reader.close()
        out = subprocess.run(
            [sys.executable, "-m", "bgsave", "latest", local_run_dir],
            check=False,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip().endswith("model_0003.pt")


def test_lock_held_by_another_live_process_is_refused(local_run_dir: str) -> None:
    """A writer in another process keeps this one out; once it exits cleanly the lock is gone."""
    script = textwrap.dedent(
        f"""
        import sys, torch
        from bgsave import CheckpointManager
        mgr = CheckpointManager({local_run_dir!r}, "other")
        mgr.save_agent(torch.nn.Linear(2, 2), 0)
        mgr.wait()
        print("holding", flush=True)
        sys.stdin.readline()
        mgr.close()
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "holding"
        mgr = CheckpointManager(local_run_dir, "me")
        with pytest.raises(RunLockedError, match=f"pid {proc.pid}"):
            mgr.save_agent(torch.nn.Linear(2, 2), 1)
        assert [i.epoch for i in mgr.checkpoints()] == [0]  # nothing of ours was written
    finally:
        proc.communicate("\n", timeout=60)
    assert not os.path.exists(_lock_path(local_run_dir))
    mgr.save_agent(torch.nn.Linear(2, 2), 1)
    mgr.close()


def test_dead_holder_on_this_host_is_taken_over(local_run_dir: str, caplog: pytest.LogCaptureFixture) -> None:
    """A lock left by a process that no longer runs is taken over, with a WARNING naming it."""
    pid = _dead_pid()
    _write_lock(local_run_dir, pid=pid, run="killed")
    with CheckpointManager(local_run_dir, "r") as mgr:
        mgr.save_agent(torch.nn.Linear(2, 2), 0)
        mgr.wait()
        with open(_lock_path(local_run_dir)) as f:
            assert json.load(f)["pid"] == os.getpid()
    assert any("taking over" in r.getMessage() and str(pid) in r.getMessage() for r in caplog.records)


def test_other_host_lock_is_refused_while_fresh_and_taken_once_stale(local_run_dir: str) -> None:
    """A lock from another host counts as live while its heartbeat is recent, stale after STALE_AFTER."""
    _write_lock(local_run_dir, pid=1, host="elsewhere", heartbeat=time.time())
    mgr = CheckpointManager(local_run_dir, "r")
    with pytest.raises(RunLockedError, match="host elsewhere"):
        mgr.save_agent(torch.nn.Linear(2, 2), 0)
    _write_lock(local_run_dir, pid=1, host="elsewhere", heartbeat=time.time() - STALE_AFTER - 1)
    mgr.save_agent(torch.nn.Linear(2, 2), 0)
    mgr.close()
    assert not os.path.exists(_lock_path(local_run_dir))


def test_killed_writer_leaves_a_lock_that_the_next_run_takes_over(local_run_dir: str) -> None:
    """SIGKILL leaves the lock file behind; the resumed run takes it over and can save."""
    script = textwrap.dedent(
        f"""
        import os, signal, torch
        from bgsave import CheckpointManager
        mgr = CheckpointManager({local_run_dir!r}, "r")
        mgr.save_agent(torch.nn.Linear(2, 2), 0)
        mgr.wait()
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], check=False, timeout=120)
    assert proc.returncode == -9
    assert os.path.exists(_lock_path(local_run_dir))
    with CheckpointManager(local_run_dir, "r") as mgr:
        mgr.save_agent(torch.nn.Linear(2, 2), 1)
        mgr.wait()
        assert [i.epoch for i in mgr.checkpoints()] == [0, 1]


def test_missing_bucket_fails_at_the_first_save_naming_the_url(s3_endpoint: str) -> None:
    """A run dir in a bucket that does not exist: the first save raises CheckpointWriteError naming the URL."""
    url = "s3://bgsave-no-such-bucket-x/runs/r"
    mgr = CheckpointManager(url, "r")
    with pytest.raises(CheckpointWriteError, match="bgsave-no-such-bucket-x") as info:
        mgr.save_agent(torch.nn.Linear(2, 2), 0)
    assert isinstance(info.value.__cause__, OSError)
    mgr.close()


def test_the_first_claim_runs_beside_the_snapshot(any_run_dir: str) -> None:
    """The first save's lock and listing go out while its snapshot is taken; its write waits for the lock.

    The listing and the snapshot meet at a barrier: run one after the other, they would never meet.
    """
    met = threading.Barrier(2, timeout=30)
    with CheckpointManager(any_run_dir, "beside") as mgr:
        storage, pool = mgr._catalog.storage, mgr._writer.pool
        list_files, take = storage.list_files, pool.take

        def listing(directory: str) -> Any:
            met.wait()
            return list_files(directory)

        def snapshot(kind: str, obj: object) -> Any:
            if kind == "agent":
                met.wait()
            return take(kind, obj)

        storage.list_files, pool.take = listing, snapshot  # type: ignore[method-assign]
        mgr.save_agent(torch.nn.Linear(2, 2), 0)
        storage.list_files, pool.take = list_files, take  # type: ignore[method-assign]
        mgr.save_agent(torch.nn.Linear(2, 2), 1)
        mgr.wait()
        assert [i.epoch for i in mgr.checkpoints()] == [0, 1]


def test_a_refused_first_claim_gives_its_snapshot_back(local_run_dir: str) -> None:
    """The claim refused beside the snapshot: RunLockedError, the snapshot's buffers given back, nothing written."""
    with CheckpointManager(local_run_dir, "holder") as holder:
        holder.save_agent(torch.nn.Linear(2, 2), 0)
        holder.wait()
        mgr = CheckpointManager(local_run_dir, "late")
        pool = mgr._writer.pool
        release, released = pool.release, []

        def give_back(snapshot: Any) -> None:
            released.append(snapshot.kind)
            release(snapshot)

        pool.release = give_back  # type: ignore[method-assign]
        with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
            mgr.save_agent(torch.nn.Linear(2, 2), 1)
        assert released == ["agent"]
        assert [i.epoch for i in mgr.checkpoints()] == [0]
    mgr.save_agent(torch.nn.Linear(2, 2), 1)  # the claim is tried again, and taken now
    mgr.wait()
    assert [i.epoch for i in mgr.checkpoints()] == [0, 1]
    mgr.close()

"""A manager and its run directory: the names it answers to, the files it leaves alone, the lock it respects."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

from bgsave import CheckpointManager, RunLockedError
from bgsave.layout import LOCK_NAME, temp_name
from bgsave.lock import STALE_AFTER
from bgsave.storage import open_storage

pytestmark = pytest.mark.timeout(60)


def test_run_dir_run_name_and_checkpoint_dir(local_run_dir: str, memory_run_dir: str) -> None:
    """mgr.run_dir, mgr.run_name and mgr.checkpoint_dir, as the seed codebase uses them."""
    mgr = CheckpointManager(local_run_dir, "exp1")
    assert mgr.run_dir == os.path.abspath(local_run_dir)
    assert mgr.checkpoint_dir == os.path.join(mgr.run_dir, "checkpoints")
    assert mgr.run_name == "exp1"
    mgr.close()
    remote = CheckpointManager(memory_run_dir, "exp1")
    assert remote.run_dir.startswith("memory://") and remote.run_dir.endswith(memory_run_dir[len("memory://") :])
    assert remote.checkpoint_dir == f"{remote.run_dir}/checkpoints"
    remote.close()


def test_a_users_temp_files_survive_saves(local_run_dir: str) -> None:
    """Files named like .*.tmp in the run root and in checkpoints/ are the user's: no save removes them."""
    checkpoints = os.path.join(local_run_dir, "checkpoints")
    os.makedirs(checkpoints)
    mine = [os.path.join(local_run_dir, ".notes.txt.tmp"), os.path.join(local_run_dir, ".env.tmp")]
    mine += [os.path.join(checkpoints, ".model_0001.pt.tmp"), os.path.join(checkpoints, ".scratch.tmp")]
    leftover = os.path.join(checkpoints, ".model_0001.pt.bgsave-tmp")  # what a killed bgsave writer leaves
    lock_leftover = os.path.join(local_run_dir, temp_name(LOCK_NAME))  # a heartbeat killed mid-write
    for path in [*mine, leftover, lock_leftover]:
        with open(path, "w") as f:
            f.write("keep me")
    with CheckpointManager(local_run_dir, "r") as mgr:
        mgr.save_agent(torch.nn.Linear(2, 2), 1)
    assert all(os.path.exists(path) for path in mine)
    assert not os.path.exists(leftover) and not os.path.exists(lock_leftover)
    assert sorted(os.listdir(checkpoints)) == sorted(
        [".model_0001.pt.tmp", ".scratch.tmp", "model_0001.pt", "model_0001.yaml"]
    )


def test_a_lock_file_not_written_yet_is_held(any_run_dir: str) -> None:
    """An empty lock file (a writer between its exclusive create and its first write) refuses a second writer."""
    storage = open_storage(any_run_dir)
    storage.makedirs(storage.root)
    lock = storage.join(LOCK_NAME)
    storage.write_bytes_atomic(lock, b"")
    mgr = CheckpointManager(any_run_dir, "second")
    with pytest.raises(RunLockedError, match=f"taken over once it is {STALE_AFTER:.0f}s old"):
        mgr.save_agent(torch.nn.Linear(2, 2), 1)
    assert storage.read_bytes(lock) == b""  # not deleted, not overwritten
    assert not storage.exists(storage.join("checkpoints", "model_0001.pt"))
    mgr.close()


def test_an_empty_lock_file_older_than_the_limit_is_taken_over(local_run_dir: str) -> None:
    """A writer killed between create and write leaves an empty lock: taken over once older than STALE_AFTER."""
    os.makedirs(local_run_dir)
    lock = os.path.join(local_run_dir, LOCK_NAME)
    with open(lock, "wb"):
        pass
    old = time.time() - STALE_AFTER - 5
    os.utime(lock, (old, old))
    with CheckpointManager(local_run_dir, "after") as mgr:
        mgr.save_agent(torch.nn.Linear(2, 2), 1)
        mgr.wait()
        assert os.path.getsize(lock) > 0
    assert not os.path.exists(lock)


def test_a_holder_on_another_host_is_named_with_its_takeover_time(local_run_dir: str) -> None:
    """The refusal for a live holder elsewhere says when its lock would be taken over."""
    os.makedirs(local_run_dir)
    record = json.dumps({"pid": 1, "host": "node-elsewhere", "since": "then", "heartbeat": time.time(), "run": "x"})
    with open(os.path.join(local_run_dir, LOCK_NAME), "w") as f:
        f.write(record)
    mgr = CheckpointManager(local_run_dir, "here")
    with pytest.raises(RunLockedError, match=r"node-elsewhere.*heartbeat has stopped for 120s: not before \d{4}-"):
        mgr.save_agent(torch.nn.Linear(2, 2), 1)
    mgr.close()

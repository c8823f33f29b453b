"""Bad input (issue section 4), what is not in the refusal table: on local disk and ``memory://``.

Every refused argument is a row of test_bad_input_table.py (error, message, nothing written, nothing
lost). Here: a run_dir that is a file on ``memory://`` (the table's row is on local disk), metadata that
agrees with the call, the not-found error's attributes, an empty run, damaged ``.pt`` files read back every
way on each backend, and calls on a closed manager.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import fsspec
import pytest

from _models import Agent, listing, make_optimizer
from bgsave import (
    CheckpointError,
    CheckpointManager,
    CheckpointNotFoundError,
    CheckpointReadError,
    InvalidArgumentError,
    ManagerClosedError,
    load_checkpoint,
)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def mgr(run_dir: str) -> Iterator[CheckpointManager]:
    """A manager whose run already holds one committed checkpoint (epoch 1) and a trainer state."""
    manager = CheckpointManager(run_dir, "bad")
    agent = Agent(width=4)
    manager.save_agent(agent, 1, {"score": 0.5})
    manager.save_trainer_state(make_optimizer(agent), 1, 0)
    manager.wait()
    yield manager
    with contextlib.suppress(CheckpointError):
        manager.close()


# ---- refused, accepted, not found --------------------------------------------------------------


def test_run_dir_that_is_an_existing_file_is_refused(memory_run_dir: str) -> None:
    """A memory:// run_dir that is a file: InvalidArgumentError naming run_dir; nothing else appears."""
    fs, root = fsspec.core.url_to_fs(memory_run_dir)
    fs.makedirs(root.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(root, b"not a directory")
    before = listing(memory_run_dir)
    with pytest.raises(InvalidArgumentError, match="run_dir"):
        CheckpointManager(memory_run_dir, "file")
    assert listing(memory_run_dir) == before
    assert fs.cat_file(root) == b"not a directory"


def test_metadata_agreeing_with_the_arguments_is_accepted(mgr: CheckpointManager) -> None:
    """metadata may repeat the epoch and run name as long as they agree."""
    mgr.save_agent(Agent(), 2, {"epoch": 2, "run": "bad"})
    mgr.wait()
    assert str(mgr.find_latest_checkpoint()).endswith("model_0002.pt")


def test_missing_epoch_raises_not_found(mgr: CheckpointManager) -> None:
    """load_agent(epoch=N) for an epoch never saved raises CheckpointNotFoundError naming the epoch."""
    with pytest.raises(CheckpointNotFoundError) as info:
        mgr.load_agent(42)
    assert isinstance(info.value, CheckpointError)
    assert isinstance(info.value, LookupError)
    assert info.value.epoch == 42
    assert "42" in str(info.value)


def test_empty_run_loads_none(run_dir: str) -> None:
    """load_agent() and load_trainer_state() on a run without checkpoints return None, and write nothing."""
    before = listing(run_dir)
    with CheckpointManager(run_dir, "empty") as mgr:
        assert mgr.load_agent() is None
        assert mgr.load_trainer_state() is None
        assert mgr.find_latest_checkpoint() is None
    assert listing(run_dir) == before


def damage(path: str, how: str) -> None:
    """Replace a checkpoint file's bytes: cut in half, emptied, or overwritten with garbage."""
    with fsspec.open(path, "rb") as f:
        data = f.read()
    damaged = {
        "truncated": data[: len(data) // 2],
        "empty": b"",
        "garbage": os.urandom(len(data)),
        "text": b"epoch: 1\nscore: 0.5\n",
    }[how]
    with fsspec.open(path, "wb") as f:
        f.write(damaged)


@pytest.mark.parametrize("how", ["truncated", "empty", "garbage", "text"])
def test_a_damaged_pt_raises_a_read_error_naming_the_file(mgr: CheckpointManager, how: str) -> None:
    """A truncated or corrupt .pt: every way to load it raises CheckpointReadError naming the file."""
    path = mgr.find_latest_checkpoint()
    assert path is not None
    damage(path, how)
    loads: list[Callable[[], object]] = [mgr.load_agent, lambda: mgr.load_agent(1), lambda: load_checkpoint(path)]
    for load in loads:
        with pytest.raises(CheckpointReadError) as info:
            load()
        assert "model_0001.pt" in str(info.value)
        assert info.value.path == path
        assert info.value.__cause__ is not None


# ---- after close() ------------------------------------------------------------------------------


def calls_after_close(agent: Agent) -> dict[str, Callable[[CheckpointManager], Any]]:
    """Every public method, called with valid arguments."""
    optimizer = make_optimizer(agent)
    return {
        "save_agent": lambda m: m.save_agent(agent, 5),
        "save_trainer_state": lambda m: m.save_trainer_state(optimizer, 5, 0),
        "save_at_interval-due": lambda m: m.save_at_interval(agent, 6, interval=2),
        "save_at_interval-not-due": lambda m: m.save_at_interval(agent, 7, interval=2),
        "wait": lambda m: m.wait(),
        "checkpoints": lambda m: m.checkpoints(),
        "find_latest_checkpoint": lambda m: m.find_latest_checkpoint(),
        "find_best_checkpoint": lambda m: m.find_best_checkpoint(),
        "find_checkpoints_by_score": lambda m: m.find_checkpoints_by_score(0.0),
        "load_agent": lambda m: m.load_agent(),
        "load_agent-epoch": lambda m: m.load_agent(1),
        "load_trainer_state": lambda m: m.load_trainer_state(),
        "start_run": lambda m: m.start_run(Agent),
    }


@pytest.mark.parametrize("method", list(calls_after_close(Agent())))
def test_any_call_after_close_raises_manager_closed(run_dir: str, mgr: CheckpointManager, method: str) -> None:
    """After close(), every method raises ManagerClosedError (a RuntimeError) and writes nothing."""
    call = calls_after_close(Agent())[method]
    mgr.close()
    before = listing(run_dir)
    with pytest.raises(ManagerClosedError) as info:
        call(mgr)
    assert isinstance(info.value, RuntimeError)
    assert listing(run_dir) == before
    mgr.close()  # still idempotent

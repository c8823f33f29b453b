"""Bad input (issue section 4): each a clear error naming the argument, and nothing written.

Every refusal is checked the way a user would: the exception type, the argument's name in the
message, and a listing of the run directory's parent (names and content digests) that is the same
before and after. Read-side damage (truncated or corrupt ``.pt``) must raise an error naming the file.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import fsspec
import numpy as np
import pytest
import torch

from _models import Agent, listing, make_optimizer
from bgsave import (
    BgsaveError,
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


def assert_refused(
    run_dir: str, call: Callable[[], Any], argument: str, mgr: CheckpointManager | None = None
) -> InvalidArgumentError:
    """``call`` raises InvalidArgumentError naming ``argument``, and the run directory is unchanged."""
    before = listing(run_dir)
    with pytest.raises(InvalidArgumentError) as info:
        call()
    assert argument in str(info.value), str(info.value)
    if mgr is not None:
        mgr.wait()  # anything wrongly queued would land now
    assert listing(run_dir) == before
    return info.value


def test_invalid_argument_error_is_a_value_and_type_error() -> None:
    """InvalidArgumentError is a BgsaveError, a ValueError and a TypeError, so plain handlers catch it."""
    assert issubclass(InvalidArgumentError, BgsaveError)
    assert issubclass(InvalidArgumentError, ValueError)
    assert issubclass(InvalidArgumentError, TypeError)
    with pytest.raises(ValueError):
        CheckpointManager("unused", "")
    with pytest.raises(TypeError):
        CheckpointManager("unused", "")


# ---- the constructor ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "run_name",
    ["", "   ", "a/b", "/abs", "../up", "..", "a..b", "a\\b", None, 7],
    ids=["empty", "blank", "slash", "abs", "dotdot-slash", "dotdot", "inner-dotdot", "backslash", "None", "int"],
)
def test_bad_run_name_is_refused(run_dir: str, run_name: object) -> None:
    """run_name empty, with a path separator or '..', or not a string: InvalidArgumentError naming run_name."""
    assert_refused(run_dir, lambda: CheckpointManager(run_dir, run_name), "run_name")  # type: ignore[arg-type]


def test_run_dir_that_is_an_existing_file_is_refused(run_dir: str) -> None:
    """A run_dir that is a file: InvalidArgumentError naming run_dir; the file is left as it was."""
    fs, root = fsspec.core.url_to_fs(run_dir)
    fs.makedirs(root.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(root, b"not a directory")
    assert_refused(run_dir, lambda: CheckpointManager(run_dir, "file"), "run_dir")
    assert fs.cat_file(root) == b"not a directory"


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"max_pending": -1}, "max_pending"),
        ({"max_pending": True}, "max_pending"),
        ({"max_pending": 1.5}, "max_pending"),
        ({"max_pending": "2"}, "max_pending"),
        ({"background": "yes"}, "background"),
        ({"background": 1}, "background"),
        ({"crc32": "no"}, "crc32"),
        ({"storage_options": [("anon", True)]}, "storage_options"),
    ],
    ids=["pending-neg", "pending-bool", "pending-float", "pending-str", "bg-str", "bg-int", "crc-str", "opts-list"],
)
def test_bad_constructor_options_are_refused(run_dir: str, kwargs: dict[str, Any], argument: str) -> None:
    """Keyword options with a wrong type or value: InvalidArgumentError naming the option, nothing created."""
    assert_refused(run_dir, lambda: CheckpointManager(run_dir, "opts", **kwargs), argument)


# ---- save_agent ----------------------------------------------------------------------------------


@pytest.mark.parametrize("epoch", [-1, 1.0, 2.5, True, False, "3", None, np.float64(2.0)], ids=repr)
def test_bad_epoch_is_refused(run_dir: str, mgr: CheckpointManager, epoch: object) -> None:
    """save_agent with an epoch that is negative, not an int, or a bool: InvalidArgumentError naming epoch."""
    assert_refused(run_dir, lambda: mgr.save_agent(Agent(), epoch), "epoch", mgr)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "metadata",
    [[("score", 1.0)], "score=1", 3, {1: 2}, {"": 1}],
    ids=["pairs", "str", "int", "int-key", "empty-key"],
)
def test_metadata_that_is_not_a_mapping_of_names_is_refused(
    run_dir: str, mgr: CheckpointManager, metadata: object
) -> None:
    """metadata that is not a mapping with string keys: InvalidArgumentError naming metadata."""
    assert_refused(run_dir, lambda: mgr.save_agent(Agent(), 2, metadata), "metadata", mgr)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("metadata", "argument"),
    [
        ({"epoch": 4}, "epoch"),
        ({"epoch": True}, "epoch"),
        ({"run": "another"}, "run"),
    ],
    ids=["epoch", "epoch-bool", "run"],
)
def test_metadata_contradicting_the_arguments_is_refused(
    run_dir: str, mgr: CheckpointManager, metadata: dict[str, Any], argument: str
) -> None:
    """metadata whose epoch or run contradicts the call: InvalidArgumentError naming that key."""
    error = assert_refused(run_dir, lambda: mgr.save_agent(Agent(), 2, metadata), argument, mgr)
    assert "metadata" in str(error)


def test_metadata_agreeing_with_the_arguments_is_accepted(mgr: CheckpointManager) -> None:
    """metadata may repeat the epoch and run name as long as they agree."""
    mgr.save_agent(Agent(), 2, {"epoch": 2, "run": "bad"})
    mgr.wait()
    assert mgr.find_latest_checkpoint().endswith("model_0002.pt")


@pytest.mark.parametrize(
    "value",
    [[1, 2], {"a": 1}, object(), {1, 2}, (1, 2), np.array([1.0, 2.0]), torch.ones(2), Agent],
    ids=["list", "dict", "object", "set", "tuple", "ndarray", "tensor-1d", "class"],
)
def test_metadata_values_yaml_cannot_hold_are_refused(run_dir: str, mgr: CheckpointManager, value: object) -> None:
    """A metadata value that is not a plain scalar: InvalidArgumentError naming the key, before anything is queued."""
    error = assert_refused(run_dir, lambda: mgr.save_agent(Agent(), 2, {"weird": value}), "weird", mgr)
    assert "metadata" in str(error)


@pytest.mark.parametrize(
    ("metadata", "argument"),
    [
        ({"score": "high"}, "score"),
        ({"avg_reward": [1.0]}, "avg_reward"),
        ({"total_time": "1h"}, "total_time"),
        ({"agent_step": -5}, "agent_step"),
        ({"agent_step": 1.5}, "agent_step"),
        ({"agent_step": "10"}, "agent_step"),
    ],
    ids=["score-str", "reward-list", "time-str", "step-neg", "step-float", "step-str"],
)
def test_seed_keys_with_wrong_types_are_refused(
    run_dir: str, mgr: CheckpointManager, metadata: dict[str, Any], argument: str
) -> None:
    """The seed's numeric keys must be numbers (agent_step a non-negative int): InvalidArgumentError naming the key."""
    assert_refused(run_dir, lambda: mgr.save_agent(Agent(), 2, metadata), argument, mgr)


# ---- save_trainer_state and save_at_interval ------------------------------------------------------


@pytest.mark.parametrize("optimizer", [object(), None, {"state": {}}, "adam"], ids=["object", "None", "dict", "str"])
def test_optimizer_without_state_dict_is_refused(run_dir: str, mgr: CheckpointManager, optimizer: object) -> None:
    """save_trainer_state with something that has no state_dict(): InvalidArgumentError naming optimizer."""
    assert_refused(run_dir, lambda: mgr.save_trainer_state(optimizer, 2, 0), "optimizer", mgr)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("epoch", "agent_step", "argument"),
    [(-1, 0, "epoch"), (1.0, 0, "epoch"), (True, 0, "epoch"), (2, -1, "agent_step"), (2, 1.5, "agent_step")],
    ids=["epoch-neg", "epoch-float", "epoch-bool", "step-neg", "step-float"],
)
def test_bad_trainer_state_numbers_are_refused(
    run_dir: str, mgr: CheckpointManager, epoch: object, agent_step: object, argument: str
) -> None:
    """save_trainer_state with a bad epoch or agent_step: InvalidArgumentError naming it."""
    optimizer = make_optimizer(Agent())
    assert_refused(
        run_dir,
        lambda: mgr.save_trainer_state(optimizer, epoch, agent_step),  # type: ignore[arg-type]
        argument,
        mgr,
    )


@pytest.mark.parametrize("interval", [0, -5, True, 2.0, "5"], ids=repr)
def test_bad_interval_is_refused(run_dir: str, mgr: CheckpointManager, interval: object) -> None:
    """save_at_interval with an interval that is not an int >= 1: InvalidArgumentError naming interval."""
    assert_refused(
        run_dir,
        lambda: mgr.save_at_interval(Agent(), 4, interval=interval),  # type: ignore[arg-type]
        "interval",
        mgr,
    )


def test_save_at_interval_with_a_bad_optimizer_writes_nothing(run_dir: str, mgr: CheckpointManager) -> None:
    """save_at_interval refuses an optimizer without state_dict() before saving the agent: nothing is written."""
    assert_refused(
        run_dir,
        lambda: mgr.save_at_interval(Agent(), 4, interval=2, optimizer=object()),  # type: ignore[arg-type]
        "optimizer",
        mgr,
    )


# ---- finding and loading --------------------------------------------------------------------------


@pytest.mark.parametrize("min_score", ["0.5", None, [0.5], True], ids=repr)
def test_bad_min_score_is_refused(run_dir: str, mgr: CheckpointManager, min_score: object) -> None:
    """find_checkpoints_by_score with a non-number: InvalidArgumentError naming min_score."""
    assert_refused(run_dir, lambda: mgr.find_checkpoints_by_score(min_score), "min_score")  # type: ignore[arg-type]


@pytest.mark.parametrize("epoch", [-1, "1", 1.0, True], ids=repr)
def test_bad_epoch_to_load_is_refused(run_dir: str, mgr: CheckpointManager, epoch: object) -> None:
    """load_agent with an epoch that is not a non-negative int: InvalidArgumentError naming epoch."""
    assert_refused(run_dir, lambda: mgr.load_agent(epoch), "epoch")  # type: ignore[arg-type]


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


def test_load_checkpoint_of_a_missing_file_raises_not_found(run_dir: str) -> None:
    """load_checkpoint(path) of a file that does not exist raises CheckpointNotFoundError naming it."""
    path = f"{run_dir}/checkpoints/model_0099.pt"
    with pytest.raises(CheckpointNotFoundError) as info:
        load_checkpoint(path)
    assert "model_0099.pt" in str(info.value)


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
    for load in (mgr.load_agent, lambda: mgr.load_agent(1), lambda: load_checkpoint(path)):
        with pytest.raises(CheckpointReadError) as info:
            load()
        assert "model_0001.pt" in str(info.value)
        assert info.value.path == path
        assert info.value.__cause__ is not None


def test_a_damaged_trainer_state_raises_a_read_error_naming_the_file(mgr: CheckpointManager) -> None:
    """A truncated trainer_state.pt makes load_trainer_state raise CheckpointReadError naming it."""
    damage(f"{mgr.checkpoint_dir}/trainer_state.pt", "truncated")
    with pytest.raises(CheckpointReadError) as info:
        mgr.load_trainer_state()
    assert "trainer_state.pt" in str(info.value)


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

"""start_run's resume rules, and a `with` block whose own exception is never replaced by a checkpoint failure."""

from __future__ import annotations

import logging
import sys
from typing import NoReturn

import pytest
import torch

from _models import UnwritableAgent
from bgsave import CheckpointManager


def test_start_run_resumes_the_newest_epoch_that_has_its_trainer_state(
    local_run_dir: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Epoch 6 committed but killed before its trainer state: start_run resumes epoch 5 with epoch 5's, at INFO."""
    caplog.set_level(logging.INFO, logger="bgsave")
    with CheckpointManager(local_run_dir, "r") as mgr:
        agent = torch.nn.Linear(3, 3)
        optimizer = torch.optim.Adam(agent.parameters())
        mgr.save_agent(agent, 5, {"agent_step": 50, "score": 0.5})
        mgr.save_trainer_state(optimizer, 5, 50)
        mgr.save_agent(agent, 6, {"agent_step": 60})  # killed before its trainer state, say
    with CheckpointManager(local_run_dir, "r") as mgr:
        start = mgr.start_run(lambda: torch.nn.Linear(3, 3))
    assert start.resumed and start.epoch == 5 and start.agent_step == 50
    assert start.trainer_state is not None and start.trainer_state["epoch"] == 5
    assert start.info is not None and start.info.sidecar["agent_step"] == 50
    assert any(
        r.levelno == logging.INFO and "resuming epoch 5, passing over epoch 6" in r.getMessage() for r in caplog.records
    )


def test_a_run_that_never_saved_a_trainer_state_resumes_its_newest_epoch(
    local_run_dir: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Agents only: the newest epoch, trainer_state None, and no warning about it."""
    with CheckpointManager(local_run_dir, "r") as mgr:
        for epoch in (1, 2):
            mgr.save_agent(torch.nn.Linear(3, 3), epoch)
    with caplog.at_level(logging.INFO, logger="bgsave"), CheckpointManager(local_run_dir, "r") as mgr:
        start = mgr.start_run(lambda: torch.nn.Linear(3, 3))
    assert (start.epoch, start.trainer_state) == (2, None)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING or "passing over" in r.getMessage()]


def test_start_run_returns_matching_trainer_state(local_run_dir: str) -> None:
    """A trainer state of the latest epoch comes back with the agent, and the optimizer state restores."""
    agent = torch.nn.Linear(3, 3)
    optimizer = torch.optim.Adam(agent.parameters())
    agent(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    with CheckpointManager(local_run_dir, "r") as mgr:
        mgr.save_agent(agent, 2, {"agent_step": 20})
        mgr.save_trainer_state(optimizer, 2, 20)
    with CheckpointManager(local_run_dir, "r") as mgr:
        start = mgr.start_run(lambda: torch.nn.Linear(3, 3))
    assert start.trainer_state is not None and start.trainer_state["agent_step"] == 20
    fresh = torch.optim.Adam(start.agent.parameters())
    fresh.load_state_dict(start.trainer_state["optimizer_state"])
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])


def test_with_block_exception_is_not_replaced_by_a_checkpoint_failure(
    local_run_dir: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The training error propagates; the failed save is logged, and noted on it where Python has add_note (3.11+)."""
    with pytest.raises(KeyError) as info, CheckpointManager(local_run_dir, "r") as mgr:
        mgr.save_agent(UnwritableAgent(), 1)  # copied at the call, then fails in the background
        raise KeyError("training failed")
    assert any("closing failed" in r.getMessage() and "epoch 1" in r.getMessage() for r in caplog.records)
    assert info.value.args == ("training failed",)
    if sys.version_info >= (3, 11):  # noted on the exception itself
        assert any("epoch 1" in note for note in info.value.__notes__)
    else:  # no add_note before 3.11: the log line is the record, the exception is left as raised
        assert not hasattr(info.value, "__notes__")


class _Uncopyable:
    """Refuses both pickling and deep copying, as some handles do."""

    def __reduce__(self) -> NoReturn:
        raise RuntimeError("no pickling")

    def __deepcopy__(self, memo: object) -> object:
        raise RuntimeError("no copying")


def test_an_agent_that_cannot_be_copied_fails_at_the_call_typed_and_at_once(local_run_dir: str) -> None:
    """A snapshot failure raises CheckpointWriteError at the call (no waiting), queues nothing, writes nothing."""
    import os
    import time

    from bgsave import CheckpointWriteError

    with CheckpointManager(local_run_dir, "r") as mgr:
        mgr.save_agent(torch.nn.Linear(2, 2), 1)
        started = time.monotonic()
        with pytest.raises(CheckpointWriteError, match="epoch 2") as info:
            mgr.save_agent({"handle": _Uncopyable()}, 2)
        assert time.monotonic() - started < 2.0
        assert isinstance(info.value.__cause__, RuntimeError)
        mgr.wait()
        assert [i.epoch for i in mgr.checkpoints()] == [1]
    assert sorted(os.listdir(os.path.join(local_run_dir, "checkpoints"))) == ["model_0001.pt", "model_0001.yaml"]

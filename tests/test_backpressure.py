"""Backpressure advice: a WARNING only when a save's wait for a slot costs the loop something, at most once a minute.

The writer is held by a real :class:`_models.Gate` (inside ``torch.save``), so a save provably waits
for a slot; the gate is opened by a timer, which makes the wait at least that long.
"""

from __future__ import annotations

import logging
import threading

import pytest
import torch

from _models import Agent, Gate, GatedAgent
from bgsave import CheckpointManager
from bgsave.backpressure import matters

pytestmark = pytest.mark.timeout(60)
ADVICE = "consider checkpointing less often"


def advice(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if ADVICE in r.getMessage() and r.levelno == logging.WARNING]


@pytest.mark.parametrize(
    ("waited", "since_previous", "expected"),
    [
        (0.003, 0.004, False),  # a loop saving every epoch, waiting for the previous write now and then
        (0.04, 0.05, False),  # under 50 ms: never worth advice
        (0.2, 1.0, True),  # 20% of the loop's time
        (0.2, 5.0, False),  # 4%: a long write, but a rare save
        (0.06, None, True),  # the first save of the manager
    ],
)
def test_when_a_wait_matters(waited: float, since_previous: float | None, expected: bool) -> None:
    """Over 50 ms and over a tenth of the time since the previous save: worth a WARNING."""
    assert matters(waited, since_previous) is expected


def test_a_loop_saving_every_epoch_gets_no_advice(memory_run_dir: str, caplog: pytest.LogCaptureFixture) -> None:
    """40 back-to-back saves of a small agent with max_pending=0 wait for each write, briefly: no WARNING."""
    caplog.set_level(logging.DEBUG, logger="bgsave")
    agent = Agent()
    # In memory: a write takes well under a millisecond, where a local fsync on a busy disk can take 0.5 s.
    with CheckpointManager(memory_run_dir, "quick", max_pending=0) as mgr:
        for epoch in range(40):
            with torch.no_grad():
                agent.running.add_(1.0)
            mgr.save_agent(agent, epoch)
    assert advice(caplog) == []


def test_long_waits_are_advised_on_once_a_minute(local_run_dir: str, caplog: pytest.LogCaptureFixture) -> None:
    """A save that waits 0.3 s behind a held write warns once; a second long wait within the minute does not."""
    caplog.set_level(logging.WARNING, logger="bgsave")
    with CheckpointManager(local_run_dir, "slow", max_pending=0) as mgr:
        for round_ in range(2):
            gate = Gate()
            try:
                mgr.save_agent(GatedAgent(gate), 2 * round_)
                assert gate.wait_entered()
                threading.Timer(0.3, gate.open).start()
                mgr.save_agent(Agent(), 2 * round_ + 1)  # blocks until the timer opens the gate
            finally:
                gate.open()
            if round_ == 0:
                [message] = advice(caplog)
                assert "epoch 1" in message and "max_pending=0" in message
        mgr.wait()
    assert len(advice(caplog)) == 1

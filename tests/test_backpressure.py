"""Backpressure advice: a WARNING only when a save's wait for a slot costs the loop something, at most once a minute.

Where a save must provably wait, the writer is held by a real :class:`_models.Gate` (inside
``torch.save``) that a timer opens, which makes the wait at least that long. Where the waits must be
*short*, the real :class:`Advisor` is given a loop's timeline: only the machine decides how short a
real wait is.
"""

from __future__ import annotations

import logging
import threading

import pytest

from _models import Agent, Gate, GatedAgent
from bgsave import CheckpointManager
from bgsave.backpressure import Advisor, matters

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


def test_a_loop_saving_every_epoch_gets_no_advice(caplog: pytest.LogCaptureFixture) -> None:
    """40 saves 20 ms apart, each waiting 1-3 ms for the previous write: DEBUG lines, no WARNING.

    The timeline is given to the real :class:`Advisor` the way the worker gives it (``waited`` then
    ``saved`` at the save's start): a real loop's waits depend on how busy the machine is, and a
    loaded CI machine can make one wait 50 ms, which then rightly *is* worth advice.
    """
    caplog.set_level(logging.DEBUG, logger="bgsave")
    advisor = Advisor("quick", max_pending=0)
    for epoch in range(40):
        start = 100.0 + 0.02 * epoch
        advisor.waited(epoch, 0.001 + 0.001 * (epoch % 3), now=start)
        advisor.saved(start)
    assert advice(caplog) == []
    assert sum("waited" in r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG) == 40


def test_advice_is_given_again_after_a_minute(caplog: pytest.LogCaptureFixture) -> None:
    """Waits that matter, 10 s apart for 2 minutes: one WARNING per minute, the rest at DEBUG."""
    caplog.set_level(logging.WARNING, logger="bgsave")
    advisor = Advisor("slow", max_pending=1)
    for epoch in range(13):
        start = 10.0 * epoch
        advisor.waited(epoch, 2.0, now=start)  # 20% of the loop's time
        advisor.saved(start)
    messages = advice(caplog)
    assert len(messages) == 3  # at 0 s, 60 s and 120 s
    assert ["epoch 0" in messages[0], "epoch 6" in messages[1], "epoch 12" in messages[2]] == [True] * 3
    assert "max_pending=1" in messages[0]


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

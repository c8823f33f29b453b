"""Backpressure: at most ``max_pending + 1`` snapshots exist, and a wait for one is advised on when it matters.

The worker's queue itself never blocks; these slots are the bound. A ``save_*`` takes a slot
*before* its snapshot, so at most ``max_pending`` snapshots wait behind the one being written and
memory stays within ``max_pending + 1`` copies of the model. When a caller has to wait for a slot,
:func:`matters` decides whether that is worth a WARNING (like Orbax's "consider checkpointing less
frequently"): not for the millisecond a loop saving every epoch waits now and then.
"""

from __future__ import annotations

import logging
import threading

__all__ = ("Advisor", "Slots", "matters")

logger = logging.getLogger(__name__)

# Only waits that cost the loop something are worth advice, and at most once a minute.
_MIN_WAIT_S = 0.05
_MIN_SHARE = 0.1
_WARN_EVERY_S = 60.0


def matters(waited: float, since_previous: float | None) -> bool:
    """Whether a save's wait for a slot is worth a WARNING.

    A wait matters when it is over 50 ms *and* over a tenth of the time since the previous save
    (the loop then spends a noticeable share of its time waiting for storage).

    Example:
        >>> matters(0.003, 0.02), matters(0.2, 1.0), matters(0.2, 5.0)
        (False, True, False)
    """
    if waited <= _MIN_WAIT_S:
        return False
    return since_previous is None or waited > _MIN_SHARE * since_previous


class Slots:
    """A counting semaphore taken on the caller's thread and given back from the event loop.

    Unlike ``threading.Semaphore`` it can be *closed*: a caller waiting for a slot of a worker that
    died wakes up instead of waiting forever.
    """

    def __init__(self, count: int) -> None:
        self._free = count
        self._closed = False
        self._cond = threading.Condition()

    def take(self, *, block: bool) -> bool:
        """Take a slot; False when none is free (``block=False``) or the worker has stopped."""
        with self._cond:
            while self._free == 0 and block and not self._closed:
                self._cond.wait()
            if self._free == 0 or self._closed:
                return False
            self._free -= 1
            return True

    def give(self) -> None:
        """Give a slot back."""
        with self._cond:
            self._free += 1
            self._cond.notify()

    def close(self) -> None:
        """Wake every waiter: no slot will be given back (the worker has stopped)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class Advisor:
    """Logs the advice to save less often when a wait for a slot matters, at most once a minute."""

    def __init__(self, name: str, max_pending: int) -> None:
        self._name = name
        self._max_pending = max_pending
        self._last_save: float | None = None
        self._last_warned: float | None = None

    def saved(self, now: float) -> None:
        """A save took its slot at ``now`` (``time.perf_counter()``)."""
        self._last_save = now

    def waited(self, epoch: int, waited: float, *, now: float) -> None:
        """The save of ``epoch``, started at ``now``, waited ``waited`` seconds for its slot."""
        since = None if self._last_save is None else now - self._last_save
        recently = self._last_warned is not None and now - self._last_warned < _WARN_EVERY_S
        if recently or not matters(waited, since):
            logger.debug("%s: save of epoch %d waited %.3fs for a free slot", self._name, epoch, waited)
            return
        self._last_warned = now
        logger.warning(
            "%s: save of epoch %d waited %.2fs for earlier checkpoints to be written (%.0f%% of the time "
            "since the previous save; max_pending=%d); consider checkpointing less often or raising max_pending",
            self._name,
            epoch,
            waited,
            100 * waited / since if since else 100,
            self._max_pending,
        )

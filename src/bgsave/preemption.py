"""Preemption: SIGTERM becomes a flag the training loop reads at its next boundary, and a deadline.

Schedulers send SIGTERM some seconds before they kill a job. A checkpoint taken inside the signal
handler is taken at an arbitrary point of an iteration (half an update applied, the epoch counter
not yet moved), and a handler that saves must take the manager's locks, which the interrupted main
thread may hold: it would wait forever. So with ``CheckpointManager.handle_sigterm(grace_s=...)``:

* **The handler only records.** It sets :attr:`Preemption.requested` and wakes a watchdog thread
  through a pipe: a plain assignment and one non-blocking ``os.write``. It takes no lock, waits for
  nothing and logs nothing (logging takes locks; the watchdog logs).
* **The loop saves at its boundary**, through the normal path: after the signal ``save_at_interval``
  saves whatever the interval, with the trainer state, and only then does ``mgr.preempted``
  (:attr:`Preemption.reached`) turn true: a signal landing between a loop's save and its check of
  the flag leaves the flag false until the next boundary's save, so no boundary is skipped. The loop
  then leaves, and closing the manager flushes the writes and **hands the signal on** as if bgsave
  were not there: to the handler installed before (called with the same arguments), or by the
  default action (the process dies by SIGTERM), or not at all if it was ignored.
* **The deadline.** If the loop has not closed the manager ``grace_s`` after the signal, the
  watchdog flushes what is queued (bounded by ``grace_s`` again) and raises SIGTERM once more; the
  handler then hands it on at once. A main thread stuck in C code for good cannot be made to run
  Python: the scheduler's SIGKILL ends it, and every committed checkpoint stays whole.

Python runs signal handlers on the main thread, so the handler is installed from there; closing the
manager puts the previous one back.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import warnings
from collections.abc import Callable
from contextlib import suppress
from types import FrameType
from typing import Any

from bgsave.errors import BgsaveError, InvalidArgumentError

__all__ = ("Preemption",)

logger = logging.getLogger(__name__)

Handler = Callable[[int, FrameType | None], Any] | int | None


class Preemption:
    """One manager's SIGTERM handler, its flag and its deadline (see the module docstring).

    Args:
        flush: Waits up to the given seconds for the manager's queued writes (the deadline's flush).
        grace_s: Seconds from the signal to the deadline.
        final_save: Deprecated: a callable run once on the main thread at the first save (or close)
            after the signal.
        name: The run's name, for log lines.

    Raises:
        InvalidArgumentError: not on the main thread, or a bad ``grace_s`` / ``final_save``.
    """

    def __init__(
        self, flush: Callable[[float], None], *, grace_s: float, final_save: Callable[[], object] | None, name: str
    ) -> None:
        if threading.current_thread() is not threading.main_thread():
            raise InvalidArgumentError(
                "handle_sigterm must be called from the main thread (Python delivers signals there)"
            )
        if isinstance(grace_s, bool) or not isinstance(grace_s, (int, float)) or not grace_s > 0:
            raise InvalidArgumentError(f"grace_s must be a number of seconds > 0, got {grace_s!r}")
        if final_save is not None:
            if not callable(final_save):
                raise InvalidArgumentError(f"final_save must be a callable or None, got {type(final_save).__name__}")
            warnings.warn(
                "handle_sigterm(final_save=...) is deprecated: it saves at an arbitrary point of an iteration. "
                "Check mgr.preempted at the loop's boundary instead (save_at_interval saves then, whatever the "
                "interval); final_save now runs at the first save or close after the signal",
                DeprecationWarning,
                stacklevel=3,
            )
        self.requested = False  # set by the handler
        self.reached = False  # set by the manager: a save was made after the signal
        self._flush, self._grace_s, self._final_save, self._name = flush, float(grace_s), final_save, name
        self._handing_on = False  # set before the signal is raised again: the handler then hands it on
        self._done = threading.Event()
        self._previous: Handler = signal.getsignal(signal.SIGTERM)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        threading.Thread(target=self._watch, name=f"bgsave-sigterm-{name}", daemon=True).start()
        signal.signal(signal.SIGTERM, self._on_sigterm)
        if callable(self._previous):
            logger.info("SIGTERM: bgsave flags it for the loop first, then calls the handler that was installed")

    # ---- the signal handler: no lock, no wait ----------------------------------------------------
    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        if self._handing_on:
            self._hand_on(signum, frame)
        elif not self.requested:
            self.requested = True
            self._wake(b"T")

    def _wake(self, byte: bytes) -> None:
        with suppress(OSError):  # a full or closed pipe: the watchdog is awake already, or gone
            os.write(self._wake_w, byte)

    def _hand_on(self, signum: int, frame: FrameType | None) -> None:
        self.restore()
        if callable(self._previous):
            self._previous(signum, frame)
        elif self._previous != signal.SIG_IGN:
            os.kill(os.getpid(), signal.SIGTERM)  # the default action now: die by SIGTERM, as without bgsave

    # ---- the watchdog thread ------------------------------------------------------------------------
    def _watch(self) -> None:
        try:
            if os.read(self._wake_r, 1) != b"T":
                return  # closed without a signal
        finally:
            os.close(self._wake_r)
        logger.warning(
            "%s: SIGTERM: the next save_at_interval saves whatever the interval; close the manager then "
            "(it hands the signal on). Deadline: %.0fs",
            self._name,
            self._grace_s,
        )
        if self._done.wait(self._grace_s):
            return
        logger.error(
            "%s: SIGTERM: the loop did not close the manager within %.0fs: flushing", self._name, self._grace_s
        )
        try:
            self._flush(self._grace_s)
        except BgsaveError:
            logger.exception("%s: SIGTERM: a checkpoint could not be flushed", self._name)
        self._handing_on = True
        os.kill(os.getpid(), signal.SIGTERM)  # the main thread's handler hands it on

    # ---- the manager's side ---------------------------------------------------------------------------
    def take_final_save(self) -> Callable[[], object] | None:
        """The deprecated ``final_save``, once, when a signal came (the manager runs it before its next write)."""
        if not self.requested:
            return None
        final, self._final_save = self._final_save, None
        return final

    def finish(self) -> None:
        """The manager closed: stop the watchdog, put the previous handler back, and hand on a signal that came."""
        if self._done.is_set():
            return
        self._done.set()
        if not self.requested:
            self._wake(b"C")
            self.restore()
        else:
            self._handing_on = True
            os.kill(os.getpid(), signal.SIGTERM)  # handled on the main thread: handed on there
        os.close(self._wake_w)

    def restore(self) -> None:
        """Put back the handler installed before this one (main thread only; elsewhere, nothing)."""
        if (
            threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGTERM) == self._on_sigterm
        ):
            signal.signal(signal.SIGTERM, self._previous if self._previous is not None else signal.SIG_DFL)

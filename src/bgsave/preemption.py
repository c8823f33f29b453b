"""Preemption: on SIGTERM, flush pending checkpoints (optionally after one final save), then die as before.

Schedulers send SIGTERM some seconds before they kill a job. :func:`install_sigterm_handler` is
opt-in (``CheckpointManager.handle_sigterm``) and never replaces the application's own handler
silently: it keeps the handler that was installed and, after flushing, hands the signal on to it:

* a Python handler installed before is called with the same arguments;
* the default action (``SIG_DFL``) is restored and the signal raised again, so the process exits
  "killed by SIGTERM" exactly as it would have without bgsave;
* an ignored signal (``SIG_IGN``) stays ignored.

The flush is bounded by ``grace_s``: a write still running then is abandoned (and logged), since
the scheduler's SIGKILL would end it anyway. Python runs signal handlers on the main thread, so the
handler must be installed from there. Closing the manager puts the previous handler back.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any, Protocol

from bgsave.errors import BgsaveError, InvalidArgumentError

__all__ = ("install_sigterm_handler",)

logger = logging.getLogger(__name__)

Handler = Callable[[int, FrameType | None], Any] | int | None


class _Closable(Protocol):
    def close(self, timeout: float | None = None) -> None: ...


def install_sigterm_handler(
    manager: _Closable, *, grace_s: float, final_save: Callable[[], object] | None
) -> Callable[[], None]:
    """Install the SIGTERM handler for ``manager``; returns a function that restores the previous one.

    Raises:
        InvalidArgumentError: not called from the main thread, or a bad ``grace_s`` / ``final_save``.
    """
    if threading.current_thread() is not threading.main_thread():
        raise InvalidArgumentError("handle_sigterm must be called from the main thread (Python delivers signals there)")
    if isinstance(grace_s, bool) or not isinstance(grace_s, (int, float)) or not grace_s > 0:
        raise InvalidArgumentError(f"grace_s must be a number of seconds > 0, got {grace_s!r}")
    if final_save is not None and not callable(final_save):
        raise InvalidArgumentError(f"final_save must be a callable or None, got {type(final_save).__name__}")
    previous: Handler = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        logger.warning("SIGTERM: flushing checkpoints (grace %.0fs) before exiting", grace_s)
        try:
            if final_save is not None:
                final_save()
            manager.close(timeout=grace_s)
        except BgsaveError:
            logger.exception("SIGTERM: a checkpoint could not be flushed")
        restore()
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            # The default action: die by SIGTERM, as the process would have without bgsave.
            os.kill(os.getpid(), signal.SIGTERM)

    def restore() -> None:
        if signal.getsignal(signal.SIGTERM) is on_sigterm:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)

    signal.signal(signal.SIGTERM, on_sigterm)
    if callable(previous):
        logger.info("SIGTERM: bgsave flushes checkpoints first, then calls the handler that was installed")
    return restore

"""SIGINT / SIGTERM → finish the current step, save a checkpoint, exit cleanly.

The handler only sets a flag; the training loop polls :attr:`GracefulStop.requested` after every optimizer
step, writes ``checkpoint.pth`` and returns. A second signal of the same kind restores the default handler's
behaviour (KeyboardInterrupt / termination) so a stuck run can still be killed.
"""
from __future__ import annotations

import signal
import threading
from typing import Optional


class GracefulStop:
    """Context manager installing SIGINT/SIGTERM handlers (main thread only; elsewhere it is inert)."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._previous = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handler(self, signum, frame):
        if self.signum is not None:  # second signal: give up gracefully-stopping
            previous = self._previous.get(signum, signal.SIG_DFL)
            signal.signal(signum, previous)
            signal.raise_signal(signum)
            return
        self.signum = signum

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def exit_code(self) -> int:
        """Shell convention 128 + signal number (130 for SIGINT, 143 for SIGTERM); 0 if no signal."""
        return 0 if self.signum is None else 128 + int(self.signum)

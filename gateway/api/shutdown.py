"""SIGTERM, as the served app sees it: the moment it arrives, not when the server has already stopped.

uvicorn handles SIGTERM itself (it stops accepting, waits for the open connections up to its graceful
timeout, cancels what is left, then runs the lifespan shutdown), and tells the application nothing
until that last step. The gateway needs to know at once: /readyz turns `draining`, and the grace period
after which every request still running is ended with an error starts (gateway.inflight). So at
start-up the app puts its own handler in front of the server's: it schedules the drain on the event
loop, then calls the server's handler as before. uvicorn installs its handlers before the lifespan
starts and restores the ones it found when it stops, so this handler lives exactly as long as serving.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType

log = logging.getLogger("strait.shutdown")


def before_sigterm(on_term: Callable[[], None]) -> bool:
    """Run `on_term` on the running event loop when SIGTERM arrives, then the handler already installed
    (the server's). Only from the main thread, and only in front of a Python handler: one that would
    otherwise kill the process (the default) or ignore the signal is left alone. Returns whether it was
    installed."""
    if threading.current_thread() is not threading.main_thread():
        return False
    previous = signal.getsignal(signal.SIGTERM)
    if not callable(previous):
        log.warning("SIGTERM is not handled by the server: no drain on shutdown")
        return False
    loop = asyncio.get_running_loop()

    def handler(signum: int, frame: FrameType | None) -> None:
        loop.call_soon_threadsafe(on_term)
        previous(signum, frame)

    signal.signal(signal.SIGTERM, handler)
    return True

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
from typing import Any

log = logging.getLogger("strait.shutdown")


def before_sigterm(on_term: Callable[[], None]) -> bool:
    """Run `on_term` on the running event loop when SIGTERM (or SIGINT, Ctrl-C) arrives, then the handler
    already installed (the server's). Only from the main thread, and only in front of a Python handler:
    one that would otherwise kill the process (the default) or ignore the signal is left alone. Returns
    whether it was installed for SIGTERM."""
    if threading.current_thread() is not threading.main_thread():
        return False
    loop = asyncio.get_running_loop()
    installed = False
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)
        if not callable(previous):
            if sig == signal.SIGTERM:
                log.warning("SIGTERM is not handled by the server: no drain on shutdown")
            continue
        signal.signal(sig, _chained(loop, on_term, previous))
        installed = installed or sig == signal.SIGTERM
    return installed


def _chained(
    loop: asyncio.AbstractEventLoop, on_term: Callable[[], None], previous: Callable[[int, FrameType | None], Any]
) -> Callable[[int, FrameType | None], None]:
    def handler(signum: int, frame: FrameType | None) -> None:
        loop.call_soon_threadsafe(on_term)  # safe from a signal handler, whatever the loop was doing
        previous(signum, frame)

    return handler

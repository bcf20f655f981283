"""SIGTERM, as the served app sees it: the moment it arrives, not when the server has already stopped.

uvicorn handles SIGTERM itself (it stops accepting, waits for the open connections up to its graceful
timeout, cancels what is left, then runs the lifespan shutdown), and tells the application nothing
until that last step. The gateway needs to know at once: /readyz turns `draining`, and the grace period
after which every request still running is ended with an error starts (gateway.inflight). So at
start-up the app puts its own handler in front of the server's: on the event loop, it starts the drain,
then calls the server's handler as before (with STRAIT_DRAIN_DELAY_S, after announcing and waiting). uvicorn installs its handlers before the lifespan
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


def before_sigterm(
    on_term: Callable[[], None], *, delay_s: float = 0.0, on_notice: Callable[[], None] | None = None
) -> bool:
    """Run `on_term` on the running event loop when SIGTERM (or SIGINT, Ctrl-C) arrives, then the handler
    already installed (the server's). Only from the main thread, and only in front of a Python handler:
    one that would otherwise kill the process (the default) or ignore the signal is left alone. Returns
    whether it was installed for SIGTERM.

    With `delay_s` > 0 (STRAIT_DRAIN_DELAY_S), a SIGTERM first runs `on_notice` (readiness turns
    `draining`) and only `delay_s` later `on_term` and the server's handler (the listener closes): load
    balancers stop routing here before connections are refused. A second SIGTERM (or a SIGINT) during the
    wait goes on at once; SIGINT alone never waits (an operator at a terminal)."""
    if threading.current_thread() is not threading.main_thread():
        return False
    loop = asyncio.get_running_loop()
    installed = False
    shutdown = _Shutdown(loop, on_term, on_notice, delay_s)
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)
        if not callable(previous):
            if sig == signal.SIGTERM:
                log.warning("SIGTERM is not handled by the server: no drain on shutdown")
            continue
        signal.signal(sig, shutdown.handler(previous))
        installed = installed or sig == signal.SIGTERM
    return installed


class _Shutdown:
    """A shutdown carried out at the first signal, or, with a delay, announced at the first SIGTERM and
    carried out `delay_s` later (or at the next signal)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        on_term: Callable[[], None],
        on_notice: Callable[[], None] | None,
        delay_s: float,
    ) -> None:
        self.loop = loop
        self.on_term = on_term
        self.on_notice = on_notice
        self.delay_s = delay_s
        self.timer: asyncio.TimerHandle | None = None
        self.carried_out = False

    def handler(self, previous: Callable[[int, FrameType | None], Any]) -> Callable[[int, FrameType | None], None]:
        def on_signal(signum: int, frame: FrameType | None) -> None:
            # Everything on the loop (safe from a signal handler): the server's handler included, which
            # only sets its exit flags.
            self.loop.call_soon_threadsafe(self.step, previous, signum)

        return on_signal

    def step(self, previous: Callable[[int, FrameType | None], Any], signum: int) -> None:
        if self.carried_out:
            previous(signum, None)  # the server's own second-signal handling (its forced exit)
            return
        if self.delay_s > 0 and self.timer is None and signum == signal.SIGTERM:
            if self.on_notice is not None:
                self.on_notice()
            self.timer = self.loop.call_later(self.delay_s, self.carry_out, previous, signum)
            return
        self.carry_out(previous, signum)  # no delay, a second signal while waiting, or a SIGINT: at once

    def carry_out(self, previous: Callable[[int, FrameType | None], Any], signum: int) -> None:
        if self.carried_out:
            return
        self.carried_out = True
        if self.timer is not None:
            self.timer.cancel()
        self.on_term()
        previous(signum, None)

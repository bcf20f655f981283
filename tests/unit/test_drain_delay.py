"""The SIGTERM drain delay (gateway.api.shutdown._Shutdown, STRAIT_DRAIN_DELAY_S): announced at once, carried
out after the delay or at the next signal, the server's handler called exactly once by it and again only for
a later signal (its own forced exit); SIGINT never waits."""

from __future__ import annotations

import asyncio
import signal
from types import FrameType

from gateway.api.shutdown import _Shutdown
from gateway.inflight import InFlight


class Recorder:
    def __init__(self) -> None:
        self.events: list[str] = []

    def server(self, signum: int, frame: FrameType | None) -> None:
        self.events.append(f"server:{signal.Signals(signum).name}")


def _delayed(rec: Recorder, delay_s: float) -> _Shutdown:
    loop = asyncio.get_running_loop()
    return _Shutdown(loop, lambda: rec.events.append("term"), lambda: rec.events.append("notice"), delay_s)


async def test_sigterm_is_announced_then_carried_out_after_the_delay() -> None:
    rec = Recorder()
    d = _delayed(rec, 0.05)
    d.step(rec.server, signal.SIGTERM)
    assert rec.events == ["notice"] and d.timer is not None
    await asyncio.wait_for(_carried_out(d), timeout=30)
    assert rec.events == ["notice", "term", "server:SIGTERM"]
    d.step(rec.server, signal.SIGTERM)  # a later signal: the server's own (forced exit), no second drain
    assert rec.events == ["notice", "term", "server:SIGTERM", "server:SIGTERM"]


async def test_a_second_signal_during_the_delay_goes_on_at_once_and_the_timer_does_nothing_more() -> None:
    rec = Recorder()
    d = _delayed(rec, 3600)
    d.step(rec.server, signal.SIGTERM)
    d.step(rec.server, signal.SIGTERM)
    assert rec.events == ["notice", "term", "server:SIGTERM"]
    assert d.timer is not None and d.timer.cancelled()


async def test_without_a_delay_the_first_signal_carries_it_out_at_once() -> None:
    rec = Recorder()
    d = _delayed(rec, 0.0)
    d.step(rec.server, signal.SIGTERM)
    assert rec.events == ["term", "server:SIGTERM"] and d.timer is None


async def test_sigint_never_waits() -> None:
    rec = Recorder()
    d = _delayed(rec, 3600)
    d.step(rec.server, signal.SIGINT)
    assert rec.events == ["term", "server:SIGINT"]


async def test_announcing_turns_readiness_draining_without_starting_the_grace_period() -> None:
    inflight = InFlight()
    inflight.announce(5)
    assert inflight.draining and inflight.grace_s is None
    inflight.drain(25)
    assert inflight.grace_s == 25
    inflight.drain(1)  # idempotent: a second signal does not move the deadline
    assert inflight.grace_s == 25
    inflight.close()


async def _carried_out(d: _Shutdown) -> None:
    while not d.carried_out:
        await asyncio.sleep(0.01)  # polling the state the timer changes, under wait_for's deadline

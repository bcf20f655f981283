"""A stream that breaks (or stalls) after its 200 head counts as a failure of its deployment in the live
signals: a backend that keeps cutting streams is ejected like one that refuses requests, and a client that
leaves does not count against it."""

from __future__ import annotations

from gateway.context import RequestContext
from gateway.contracts import End
from gateway.stages.upstream import SignalsTap
from gateway.upstream.signals import LiveSignals
from tests.unit.test_dispatch_attempts import target


def _ctx() -> RequestContext:
    ctx = RequestContext(request_id="r", operation="chat", started=0.0, headers={})
    ctx.target = target("b")
    return ctx


def test_streams_cut_mid_answer_eject_their_backend() -> None:
    signals = LiveSignals()
    tap = SignalsTap(signals)
    ctx = _ctx()
    for _ in range(5):
        signals.started("b")
        tap.on_end(ctx, End("upstream_failed", 502, stream=True, partial=True))
    assert "b" in signals.outliers.ejected
    assert signals.in_flight["b"] == 0


def test_clients_that_leave_do_not_count_against_the_backend() -> None:
    signals = LiveSignals()
    tap = SignalsTap(signals)
    ctx = _ctx()
    for _ in range(10):
        signals.started("b")
        tap.on_end(ctx, End("client_gone", 499, stream=True, partial=True))
    assert "b" not in signals.outliers.ejected

"""Brown-out through a real `strait serve`: a route's primary fails half of its attempts (503, 500, or a
TCP reset before the headers; the fake's `fault:<x>-ratio-0.5`), a healthy fallback stands by, 200
requests 20 at a time, outlier ejection on (the defaults), and once without it. The retry budget (20 % of
active requests, at least 3, in flight; 20 % of the window's requests + 3 in total) and ejection bound what the brown-out costs the upstreams: attempts
<= 1.2 x requests + 3 (issue 10), counted in the fake's ledger. The drive and the figures are
loadtest/brownout.py's (which also runs it without ejection); run with `-s` to see them:

    .venv/bin/python -m pytest -q -s -p no:cacheprovider tests/e2e/test_retry_brownout.py

And streams whose clients leave mid-answer, with retries in flight: every request leaves the route's
budget exactly once (its active and retry gauges go back to zero).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from loadtest.brownout import (
    FALLBACK_MODEL,
    FAULTS,
    HEADER,
    drive,
    gateway,
    measure,
    metric,
    route_of,
)
from tests.harness.fake_control import FakeControl, fake_upstream
from tests.harness.procs import ServerProcess
from tests.harness.waiting import wait_until

REQUESTS = 200
CONCURRENCY = 20
FAIL_RATIO = 0.5
# What a client sees when the budget refuses the fallback: the primary's failure, passed on.
REFUSED_STATUS = {"503": 503, "500": 500, "reset": 502}


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, FakeControl, Path]]:
    folder = tmp_path_factory.mktemp("brownout")
    with fake_upstream(folder) as (proc, control):
        yield proc, control, folder


def test_without_ejection_the_budget_alone_bounds_a_brown_out(fake: tuple[ServerProcess, FakeControl, Path]) -> None:
    """503s fail over at once and the fallback answers fast, so retries never pile up in flight: the
    budget's window (retries <= 0.2 x requests + 3) is what keeps the bound."""
    proc, control, folder = fake
    control.reset(counter=True)
    with gateway(folder / "503-no-ejection", proc.base_url, FAIL_RATIO, ejection=False) as gw:
        figures = measure(gw.base_url, control, "503", REQUESTS, CONCURRENCY)
    print(f"\n{HEADER}\n{figures.row('503, ejection off')}")
    assert figures.requests == REQUESTS
    assert figures.attempts <= 1.2 * REQUESTS + 3
    assert figures.answered + figures.budget_refusals == REQUESTS
    assert figures.budget_refusals > 0  # the primary fails half its attempts: the budget had to refuse


@pytest.mark.parametrize("fault", FAULTS)
def test_the_retry_budget_and_ejection_bound_a_brown_out(
    fake: tuple[ServerProcess, FakeControl, Path], fault: str
) -> None:
    proc, control, folder = fake
    control.reset(counter=True)
    # A gateway of its own: no ejection or budget state left by another fault's run.
    with gateway(folder / fault, proc.base_url, FAIL_RATIO, ejection=True) as gw:
        figures = measure(gw.base_url, control, fault, REQUESTS, CONCURRENCY)
        route = route_of(fault)
        active = metric(gw.base_url, f'strait_route_active_requests{{route="{route}"}}')
        retrying = metric(gw.base_url, f'strait_route_retries_in_flight{{route="{route}"}}')
    print(f"\n{HEADER}\n{figures.row(f'{fault}, ejection on')}")
    assert figures.requests == REQUESTS
    # The bound: the primary is ejected after its first failures, the budget caps the retries meanwhile.
    assert figures.attempts <= 1.2 * REQUESTS + 3
    # A client that got no answer is one whose fallback the budget refused (counted, nothing else failed).
    assert figures.answered + figures.budget_refusals == REQUESTS
    assert figures.answered >= 0.8 * REQUESTS
    # Whole answers end their requests before the client has them: nothing left counted.
    assert (active, retrying) == (0.0, 0.0)


def test_streams_whose_clients_leave_mid_answer_leave_the_budget_once(
    fake: tuple[ServerProcess, FakeControl, Path],
) -> None:
    """No ejection, so the primary keeps failing half its attempts and the fallback streams are retries;
    half the clients leave after the first event (the gateway ends those requests as `client_gone`)."""
    proc, control, folder = fake
    control.reset(counter=True)
    route = route_of("503")
    marker = uuid.uuid4().hex
    with gateway(folder / "streams", proc.base_url, FAIL_RATIO, ejection=False) as gw:

        async def both() -> None:
            await asyncio.gather(
                # 50 tokens 20 ms apart: a fallback stream lasts ~1 s, so a client that leaves after the
                # first event is gone long before its end, however busy the machine (5 tokens were not).
                drive(gw.base_url, route, 60, 10, marker, stream=True, leave_after_first_event=True, max_tokens=50),
                drive(gw.base_url, route, 60, 10, marker, stream=True),
            )

        asyncio.run(both())

        async def settled() -> bool:
            sample = f'{{route="{route}"}}'
            return (
                metric(gw.base_url, "strait_route_active_requests" + sample) == 0
                and metric(gw.base_url, "strait_route_retries_in_flight" + sample) == 0
            )

        asyncio.run(wait_until(settled))
    ledger = [r for r in control.ledger() if isinstance(r["body"], dict) and r["body"].get("user") == marker]
    fallback = [r for r in ledger if r["model"] == FALLBACK_MODEL]
    # Retries happened, and some of them were streams the client left before their end.
    assert fallback and any(r["client_disconnected"] for r in fallback)

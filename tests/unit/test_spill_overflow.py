"""Spillover sends only the overflow: between scrapes the engine's gauge is corrected with the requests this
gateway started or finished there since, a spilling backend still takes every request that fits under the
threshold, and the spill state (hysteresis) ends only once the scrape agrees. Driven in process through
LiveSignals as the dispatcher and the scraper drive it, with the clock given explicitly."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gateway.policy.engine import RoutePlan
from gateway.policy.index import PolicyIndex
from gateway.policy.live import LiveState, ScrapeBasis, estimated
from gateway.stages.explain import explain_header
from gateway.upstream.signals import EngineLoad, LiveSignals
from tests.policy.helpers import backend, dep, index, model, route, run

SLOTS = 4


def _world(**spillover: object) -> tuple[PolicyIndex, LiveSignals]:
    engine = backend("engine", tier="self-hosted", max_concurrency=SLOTS)
    prov = backend("prov", tier="provider")
    idx = index(
        [prov, engine],
        [model("m", dep("prov"), dep("engine"))],
        [route("r", "m", spillover={"threshold": 0.8, "resume_below": 0.5, **spillover})],
    )
    s = LiveSignals()
    s.configure([prov, engine], probed=())
    return idx, s


def _scrape(s: LiveSignals, at: float, running: float, waiting: float = 0.0, kv: float | None = None) -> None:
    """A scrape of the fake engine's page as gateway.upstream.health turns it into an EngineLoad."""
    parts = [running / SLOTS, kv or 0.0, 1.0 if waiting else 0.0]
    u = min(1.0, max(parts))
    s.engine_load("engine", EngineLoad(at=at, running=running, waiting=waiting, utilisation=u, format="vllm", kv=kv))


def _ask(idx: PolicyIndex, s: LiveSignals, now: float) -> RoutePlan:
    """One request as the route stage and the dispatcher see it: decided, the spill state remembered, and
    sent to the first backend of its plan (counted in flight there)."""
    plan = run(idx, live=s.snapshot(now))
    s.set_spilling(plan.spill_changes)
    s.started(plan.targets[0].backend.name)
    return plan


def _first(plan: RoutePlan) -> str:
    return plan.targets[0].backend.name


def _spilling(s: LiveSignals) -> bool:
    return ("r", "engine") in s.snapshot(0.0).spilling


def _engine_row(plan: RoutePlan) -> tuple[float | None, str | None]:
    row = next(r for r in plan.decision.rows if r.backend == "engine")
    return row.utilisation, row.load


def test_the_scraped_gauge_moves_with_requests_started_and_finished_since_the_scrape() -> None:
    idx, s = _world()
    for _ in range(3):
        s.started("engine")
    _scrape(s, 0.0, running=3)  # 0.75, with this gateway's 3 requests in it
    assert _engine_row(run(idx, live=s.snapshot(0.1))) == (0.75, "engine")
    s.finished("engine")
    s.finished("engine")
    # Two slots freed since: known now, a scrape interval before the engine's page says so.
    assert _engine_row(run(idx, live=s.snapshot(0.1))) == (0.25, "estimated")
    s.started("engine")
    assert _engine_row(run(idx, live=s.snapshot(0.1))) == (0.5, "estimated")
    # A KV gauge moves by the same ratio (each running request an equal share of the cache in use).
    _scrape(s, 1.0, running=2, kv=0.9)
    s.finished("engine")
    assert _engine_row(run(idx, live=s.snapshot(1.1))) == (0.45, "estimated")


def test_a_cache_in_use_with_nothing_running_is_not_corrected_downwards() -> None:
    idx, s = _world()
    s.started("engine")
    s.started("engine")
    # The engine says 0.7 of its cache is in use, none of it by a running request (a pinned gauge): the
    # requests this gateway had in flight are not in it, so their finishing frees nothing of it.
    _scrape(s, 0.0, running=0, kv=0.7)
    s.finished("engine")
    s.finished("engine")
    assert _engine_row(run(idx, live=s.snapshot(0.1)))[0] == 0.7
    s.started("engine")
    s.started("engine")
    s.started("engine")
    assert _engine_row(run(idx, live=s.snapshot(0.1)))[0] == 0.75  # 3 of 4 slots now: above the cache's 0.7


def test_under_overload_the_engine_stays_full_and_only_the_overflow_spills() -> None:
    idx, s = _world()
    _scrape(s, 0.0, running=0)
    assert [_first(_ask(idx, s, 0.0)) for _ in range(4)] == ["engine"] * 4
    # The 5th finds all 4 slots busy by this gateway's count: it spills, and says which signal decided.
    fifth = _ask(idx, s, 0.01)
    assert _first(fifth) == "prov"
    assert fifth.spilled == {
        "engine": "utilisation 1.00 (estimated from the scrape's 0.00, 4 started since) >= threshold 0.80"
    }
    assert _spilling(s)
    _scrape(s, 0.25, running=4)  # the engine agrees: full
    sixth = _ask(idx, s, 0.26)
    assert (_first(sixth), sixth.spilled) == ("prov", {"engine": "utilisation 1.00 >= threshold 0.80"})
    # One engine request finishes: the next request takes its slot at once, though the scrape still says
    # 1.00 and the engine is spilling; the spill state goes on (no flapping), and explain says why.
    s.finished("engine")
    refill = _ask(idx, s, 0.3)
    assert _first(refill) == "engine" and refill.spilled == {}
    note = "spilling the overflow only: this request fits, utilisation 0.75 (estimated from the scrape's 1.00, 1 finished since) < threshold 0.80"
    assert next(r.spilling for r in refill.decision.rows if r.backend == "engine") == note
    assert '"spilling":{"m@engine":"' + note + '"}' in explain_header(refill.decision)
    assert _spilling(s) and refill.spill_changes == []
    # Full again: the next one spills.
    assert _first(_ask(idx, s, 0.31)) == "prov"


def test_the_spill_state_ends_only_when_the_scrape_agrees_the_engine_drained() -> None:
    idx, s = _world()
    for _ in range(4):
        _ask(idx, s, 0.0)
    assert _first(_ask(idx, s, 0.0)) == "prov" and _spilling(s)
    _scrape(s, 0.25, running=4)
    for _ in range(4):
        s.finished("engine")  # all four finish together, as a batch does
    # By the estimate the engine is empty; the state stays on until a scrape says so too (the requests
    # that just finished are being replaced: ending it at every such dip is what flapping is).
    plan = _ask(idx, s, 0.3)
    assert _first(plan) == "engine" and _spilling(s)
    _scrape(s, 0.5, running=1)  # 0.25 <= 0.5: drained
    plan = _ask(idx, s, 0.55)
    assert _first(plan) == "engine" and not _spilling(s)
    assert plan.spill_changes == [("r", "engine", False)]
    assert all(r.spilling is None for r in plan.decision.rows)


def test_load_this_gateway_did_not_send_keeps_a_spilling_backend_behind_hysteresis() -> None:
    idx, s = _world()
    # Another client holds 3 of the 4 slots; this gateway sends one more, then one that does not fit.
    _scrape(s, 0.0, running=3)
    assert _first(_ask(idx, s, 0.0)) == "engine"
    assert _first(_ask(idx, s, 0.0)) == "prov" and _spilling(s)
    _scrape(s, 0.25, running=4)
    busy = _ask(idx, s, 0.26)
    assert busy.spilled == {
        "engine": "still spilling: utilisation 1.00, 0.75 of it not this gateway's requests, above the resume mark 0.50"
    }
    s.finished("prov")
    s.finished("engine")  # this gateway's one finished: 0.75 by the estimate, below the threshold...
    held = _ask(idx, s, 0.3)
    # ...but 0.75 of the engine is not this gateway's, above the resume mark: it stays behind.
    assert _first(held) == "prov"
    assert held.spilled == {"engine": "still spilling: utilisation 0.75 above the resume mark 0.50"}
    # The other client's load falls to the resume mark: this gateway's requests flow back.
    _scrape(s, 0.5, running=2)
    assert _first(_ask(idx, s, 0.55)) == "engine" and not _spilling(s)


def test_a_queue_still_holds_a_spilling_backend_behind() -> None:
    idx, s = _world(queue_threshold=2)

    def scrape(at: float, waiting: float) -> None:  # an engine whose utilisation gauge ignores its queue
        s.engine_load("engine", EngineLoad(at=at, running=1, waiting=waiting, utilisation=0.3, format="vllm"))

    scrape(0.0, waiting=2)
    plan = _ask(idx, s, 0.0)
    assert (_first(plan), plan.spilled) == ("prov", {"engine": "queue 2 >= threshold 2"})
    scrape(0.25, waiting=2)
    plan = _ask(idx, s, 0.3)  # utilisation below both marks, the queue above its resume mark (2 // 2 = 1)
    assert plan.spilled == {"engine": "still spilling: queue 2 above the resume mark 1"}
    scrape(0.5, waiting=1)
    assert _first(_ask(idx, s, 0.55)) == "engine" and not _spilling(s)


def test_a_route_without_spillover_ranks_as_before() -> None:
    engine = backend("engine", tier="self-hosted", max_concurrency=SLOTS)
    idx = index([backend("prov", tier="provider"), engine], [model("m", dep("prov"), dep("engine"))], [route("r", "m")])
    live = LiveState(
        utilisation={"engine": 1.0}, in_flight={"engine": 4}, scrape_basis={"engine": ScrapeBasis(4, 4.0, None)}
    )
    plan = run(idx, live=live)
    assert [t.backend.name for t in plan.targets] == ["prov", "engine"]  # declared order, not load
    assert plan.spilled == {} and plan.spill_changes == []


@given(
    scraped=st.floats(0, 1),
    then=st.integers(0, 16),
    in_engine=st.floats(0, 32),
    kv=st.none() | st.floats(0, 1),
    cap=st.none() | st.integers(1, 16),
    a=st.integers(0, 16),
    b=st.integers(0, 16),
)
def test_the_estimate_is_the_scrape_at_its_basis_bounded_and_grows_with_requests(
    scraped: float, then: int, in_engine: float, kv: float | None, cap: int | None, a: int, b: int
) -> None:
    basis = ScrapeBasis(then, in_engine, kv)
    assert estimated(scraped, basis, then, cap) == scraped
    low, high = sorted((a, b))
    lo, hi = estimated(scraped, basis, low, cap), estimated(scraped, basis, high, cap)
    if low != then and high != then:
        assert 0.0 <= lo <= hi <= 1.0
    if kv is None and cap is None:
        assert lo == hi == scraped  # nothing to correct with: the scrape as is

"""Live capacity in process: spillover with hysteresis driven by engine load, stale metrics falling back to
in-flight counting (flagged in explain), TTFT ranking, the simulated engine's queue, and the health monitor's
scrapers following policy reloads."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from gateway.canonical import Message, Request
from gateway.contracts import UpstreamCall
from gateway.policy.live import LiveState
from gateway.policy.model import Backend, Capacity, SimulatedOptions
from gateway.stages.explain import explain_header
from gateway.upstream.health import REPLAN_BATCH, HealthMonitor, probe_plan
from gateway.upstream.signals import EngineLoad, LiveSignals
from plugins.simulated import SimulatedAdapter
from tests.policy.helpers import backend, dep, index, model, route, run


def _spill_world() -> tuple[object, list[Backend]]:
    edge = backend("edge", tier="edge", max_concurrency=4)
    prov = backend("prov", tier="provider")
    idx = index(
        [prov, edge],
        [model("m", dep("prov"), dep("edge"))],
        [route("r", "m", spillover={"threshold": 0.8, "resume_below": 0.4, "queue_threshold": 3})],
    )
    return idx, [prov, edge]


def _decide(idx: object, s: LiveSignals, now: float) -> list[str]:
    """One decision as the route stage makes it: remembers the spill state it changed."""
    plan = run(idx, live=s.snapshot(now))  # type: ignore[arg-type]
    s.set_spilling(plan.spill_changes)
    return [t.backend.name for t in plan.targets]


def _load(s: LiveSignals, at: float, utilisation: float, waiting: float = 0.0) -> None:
    s.engine_load("edge", EngineLoad(at=at, running=0, waiting=waiting, utilisation=utilisation, format="vllm"))


def test_spillover_starts_at_the_threshold_and_stops_only_below_the_lower_mark() -> None:
    idx, backends = _spill_world()
    s = LiveSignals()
    s.configure(backends, probed=())
    trace = []
    for t, u in enumerate([0.2, 0.79, 0.85, 0.6, 0.41, 0.4, 0.6, 0.79, 0.8]):
        _load(s, float(t), u)
        trace.append((u, _decide(idx, s, float(t))[0]))
    assert trace == [
        (0.2, "edge"),
        (0.79, "edge"),
        (0.85, "prov"),  # crossed the threshold: spills
        (0.6, "prov"),  # between the marks: still spilling (hysteresis)
        (0.41, "prov"),
        (0.4, "edge"),  # at the lower mark: flows back
        (0.6, "edge"),  # between the marks again, from below: stays
        (0.79, "edge"),
        (0.8, "prov"),
    ]


def test_a_queue_spills_too_and_the_decision_says_why() -> None:
    idx, backends = _spill_world()
    s = LiveSignals()
    s.configure(backends, probed=())
    _load(s, 0.0, 0.1, waiting=3)
    plan = run(idx, live=s.snapshot(0.0))  # type: ignore[arg-type]
    assert [t.backend.name for t in plan.targets] == ["prov", "edge"]
    assert plan.spilled == {"edge": "queue 3 >= threshold 3"}
    row = {r.backend: r for r in plan.decision.rows}["edge"]
    assert (row.queue, row.load, row.spilled) == (3, "engine", "queue 3 >= threshold 3")
    assert '"spilled":{"m@edge":"queue 3 >= threshold 3"}' in explain_header(plan.decision)
    s.set_spilling(plan.spill_changes)
    _load(s, 1.0, 0.1, waiting=2)  # above the queue's lower mark (3 // 2 = 1)
    again = run(idx, live=s.snapshot(1.0))  # type: ignore[arg-type]
    assert again.spilled == {"edge": "still spilling: queue 2 above the resume mark 1"}


def test_stale_metrics_fall_back_to_in_flight_and_explain_says_so() -> None:
    idx, _ = _spill_world()
    edge = Backend(
        name="edge", adapter="simulated", tier="edge", capacity=Capacity(max_concurrency=4, scrape_interval_s=1)
    )
    s = LiveSignals()
    s.configure([edge, backend("prov")], probed=())
    _load(s, 0.0, 0.95)
    s.started("edge")  # one request in flight: 1/4 by counting
    assert s.snapshot(1.0).utilisation == {"edge": 0.95}
    s.scrape_failed("edge", 2.0)  # 2 s old: not yet stale (3 intervals)
    assert s.snapshot(2.0).utilisation == {"edge": 0.95}
    s.scrape_failed("edge", 3.5)
    live = s.snapshot(3.5)
    assert live.utilisation == {} and live.stale == {"edge"}
    plan = run(idx, live=live)  # type: ignore[arg-type]
    row = {r.backend: r for r in plan.decision.rows}["edge"]
    assert (row.load, row.utilisation) == ("stale", 0.25)
    assert '"stale_metrics":["m@edge"]' in explain_header(plan.decision)
    # A good scrape makes it fresh again.
    _load(s, 4.0, 0.5)
    assert s.snapshot(4.0).stale == frozenset() and s.snapshot(4.0).utilisation == {"edge": 0.5}
    # A scrape that never comes back (no failure reported either): the monitor's tick flags it all the same.
    s.refresh_all(6.0)
    assert s.snapshot(6.0).utilisation == {"edge": 0.5}
    s.refresh_all(7.5)
    assert s.snapshot(7.5).stale == {"edge"} and s.snapshot(7.5).utilisation == {}
    # A reload that stops scraping it forgets the gauge: plain in-flight counting, not "stale".
    s.forget_engine("edge")
    assert s.snapshot(8.0).stale == frozenset() and "edge" not in s.engine


def test_latency_objective_ranks_on_time_to_first_token() -> None:
    idx = index(
        [backend("a"), backend("b")],
        [model("m", dep("a"), dep("b"))],
        [route("r", "m", objective="latency")],
    )
    # a answers headers faster, but b's first token comes first: b leads.
    live = LiveState(latency_ms={"m@a": 50.0, "m@b": 80.0}, ttft_ms={"m@a": 900.0, "m@b": 120.0})
    plan = run(idx, live=live)
    assert [t.backend.name for t in plan.targets] == ["b", "a"]
    rows = {r.backend: r for r in plan.decision.rows}
    assert rows["b"].ttft_ms == 120.0 and rows["b"].latency_ms == 120.0
    # Without TTFT samples, header time decides.
    plan = run(idx, live=LiveState(latency_ms={"m@a": 50.0, "m@b": 80.0}))
    assert [t.backend.name for t in plan.targets] == ["a", "b"]


def test_ttft_and_throughput_ewmas() -> None:
    s = LiveSignals()
    s.first_token("m@a", 0.100)
    s.first_token("m@a", 0.200)
    assert s.ttft_ms["m@a"] == pytest.approx(120.0)  # 100 + 0.2 x (200 - 100)
    s.throughput("m@a", 50.0)
    s.throughput("m@a", 0.0)  # not a sample
    s.throughput("m@a", 100.0)
    assert s.tokens_per_s["m@a"] == pytest.approx(60.0)


def _call(stream: bool) -> UpstreamCall:
    request = Request(operation="chat", model="sim", messages=(Message(role="user"),))
    return UpstreamCall(operation="chat", request=request, model="sim-1", stream=stream, request_id="r")


def test_the_simulated_engine_queues_beyond_its_slots_and_says_so_in_vllm_names() -> None:
    from gateway.upstream.scrape import parse

    b = Backend(
        name="sim",
        adapter="simulated",
        capacity=Capacity(max_concurrency=2),
        simulated=SimulatedOptions(ttft_ms=1, tokens_per_second=10_000, output_tokens=4),
    )
    adapter = SimulatedAdapter(b)

    async def scenario() -> None:
        responses = [await adapter.send(_call(stream=True)) for _ in range(3)]
        g = parse(adapter.engine_metrics(), "vllm")
        assert (g.running, g.waiting, g.kv) == (2.0, 1.0, 1.0)
        assert g.utilisation(2) == 1.0
        for r in responses:
            assert r.events is not None
            async for _ in r.events:
                pass
            assert r.close is not None
            await r.close()  # type: ignore[misc]
        g = parse(adapter.engine_metrics(), "vllm")
        assert (g.running, g.waiting, g.kv) == (0.0, 0.0, 0.0)
        # A client that leaves before the first event still frees its place (close is always called).
        left = await adapter.send(_call(stream=True))
        assert adapter.in_flight == 1
        assert left.close is not None
        await left.close()  # type: ignore[misc]
        assert adapter.in_flight == 0
        # Whole answers queue for a slot too.
        await asyncio.gather(*(adapter.send(_call(stream=False)) for _ in range(5)))
        assert adapter.in_flight == 0

    asyncio.run(scenario())


def test_probe_plans_are_free_requests_only() -> None:
    def b(**kw: object) -> Backend:
        return msgspec.convert({"name": "x", "adapter": "openai", **kw}, Backend)

    assert probe_plan(b(base_url="http://h:8000/v1", tier="self-hosted")).url == "http://h:8000/health"  # type: ignore[union-attr]
    assert probe_plan(b(base_url="https://api.p/v1", tier="provider")).url == "https://api.p/v1/models"  # type: ignore[union-attr]
    m = probe_plan(b(base_url="http://h/v1", capacity={"metrics_url": "http://h/metrics"}))
    assert m is not None and (m.kind, m.url, m.authorised) == ("metrics", "http://h/metrics", False)
    assert probe_plan(b(base_url="http://h/v1", outlier={"probe": "none"})) is None
    # A base URL's query (Azure's api-version) stays with the API's probe, not with /health at the root.
    q = "https://a.azure/openai/v1?api-version=2024-10-21"
    assert probe_plan(b(base_url=q, tier="provider")).url == "https://a.azure/openai/v1/models?api-version=2024-10-21"  # type: ignore[union-attr]
    assert probe_plan(b(base_url=q, tier="self-hosted")).url == "https://a.azure/openai/health"  # type: ignore[union-attr]
    assert probe_plan(Backend(name="s", adapter="simulated")) is None


def test_monitor_scrapes_in_process_engines_and_follows_reloads() -> None:
    sim = Backend(name="sim", adapter="simulated", capacity=Capacity(max_concurrency=2, scrape_interval_s=0.05))
    other = Backend(name="other", adapter="simulated", capacity=Capacity(max_concurrency=2, scrape_interval_s=0.05))
    signals = LiveSignals()
    monitor = HealthMonitor(signals)
    adapters = {"sim": SimulatedAdapter(sim), "other": SimulatedAdapter(other)}

    async def until(cond: object, timeout: float = 5.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not cond():  # type: ignore[operator]
            assert loop.time() < deadline, "condition never held"
            await asyncio.sleep(0.01)

    async def scenario() -> None:
        monitor.apply([sim, other], adapters)
        await monitor.start()
        await until(lambda: monitor.scrapes_ok.get("sim", 0) >= 1 and monitor.scrapes_ok.get("other", 0) >= 1)
        assert signals.snapshot(0).utilisation == {"sim": 0.0, "other": 0.0}
        # Reload without `other`: its scraper stops, and its signals are forgotten.
        signals.configure([sim], probed=())
        monitor.apply([sim], {"sim": adapters["sim"]})
        seen = monitor.scrapes_ok.get("other", 0)
        before = monitor.scrapes_ok["sim"]
        await until(lambda: monitor.scrapes_ok["sim"] >= before + 3)
        assert monitor.scrapes_ok.get("other", 0) <= seen + 1  # at most one in flight when it was cancelled
        assert "other" not in signals.snapshot(0).utilisation
        await monitor.aclose()
        stopped = monitor.scrapes_ok["sim"]
        await asyncio.sleep(0.2)
        assert monitor.scrapes_ok["sim"] == stopped  # nothing runs after shutdown

    asyncio.run(scenario())


def test_a_replan_keeps_unchanged_scrapers_and_changes_the_others_a_batch_per_loop_turn() -> None:
    """A reload of a policy of a thousand changed backends must not cancel and start a thousand tasks in
    one loop turn (a stall of every request): `apply` changes no task itself, then at most REPLAN_BATCH
    starts and stops happen per turn; the scrapers of unchanged backends are never restarted."""
    n = 2 * REPLAN_BATCH + 10

    def sim(name: str) -> Backend:
        return Backend(name=name, adapter="simulated", capacity=Capacity(max_concurrency=2, scrape_interval_s=30))

    backends = [sim(f"b{i}") for i in range(n)]
    adapters: dict[str, object] = {b.name: SimulatedAdapter(b) for b in backends}
    changed, kept, removed = backends[: n // 2], backends[n // 2 : n - 5], backends[n - 5 :]
    added = [sim(f"new{i}") for i in range(5)]

    async def turns_until(cond: object, limit: int = 1000) -> list[int]:
        """Loop turns until `cond()`; per turn, how many scraper tasks were started or stopped."""
        ops: list[int] = []
        seen = dict(monitor._scrapers)
        while not cond():  # type: ignore[operator]
            assert len(ops) < limit, "never done"
            await asyncio.sleep(0)
            now = dict(monitor._scrapers)
            stopped = sum(1 for name, task in seen.items() if now.get(name) is not task)
            ops.append(stopped + sum(1 for name, task in now.items() if seen.get(name) is not task))
            seen = now
        return ops

    monitor = HealthMonitor(LiveSignals())

    async def scenario() -> None:
        monitor.apply(backends, adapters)
        await monitor.start()
        ops = await turns_until(lambda: len(monitor._scrapers) == n)
        assert len(ops) > 1 and max(ops) <= REPLAN_BATCH  # the start too is spread over loop turns
        before = dict(monitor._scrapers)
        new_adapters = {**adapters, **{b.name: SimulatedAdapter(b) for b in changed + added}}
        for b in removed:
            del new_adapters[b.name]
        monitor.apply(changed + kept + added, new_adapters)
        assert monitor._scrapers == before  # nothing changed within the call
        names = {b.name for b in changed + kept + added}

        def done() -> bool:
            return set(monitor._scrapers) == names and all(
                monitor._scrapers[b.name] is not before[b.name] for b in changed
            )

        ops = await turns_until(done)
        assert max(ops) <= REPLAN_BATCH and len(ops) > 1
        assert all(monitor._scrapers[b.name] is before[b.name] for b in kept)  # never restarted
        assert all(before[b.name].cancelled() or before[b.name].cancelling() for b in changed + removed)
        await monitor.aclose()

    asyncio.run(scenario())

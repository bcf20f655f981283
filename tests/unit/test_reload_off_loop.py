"""A policy reload keeps the event loop free: the check, the runtime's compilation and the unpriced
gauges run in worker threads; on the loop only the live signals' settings, the swap and the health
monitor's tasks (gateway.reload). The reloaded policy then serves, and the gauges follow it."""

from __future__ import annotations

import gc
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import TestClient

from gateway import reload as reload_module
from gateway.accounting.unpriced import report_unpriced
from gateway.app import create_app
from gateway.policy import load as load_module
from gateway.policy.load import load_policy
from gateway.registry import discover_adapters
from gateway.settings import Settings
from gateway.telemetry import Metrics

# `a` answers in process; `p` is a provider (never called here) whose deployments must carry a price.
POLICY = """\
version: 1
operators: [{name: o, headquarters: US}]
backends:
  - {name: a, adapter: simulated, hosting: {operator: o, jurisdiction: US},
     simulated: {ttft_ms: 0, tokens_per_second: 100000, output_tokens: 2}}
  - {name: p, adapter: openai, base_url: "http://127.0.0.1:9/v1", hosting: {operator: o, jurisdiction: US}}
models:
  - name: m
    deployments: [{backend: a, upstream_model: u}]
  - name: n
    deployments: [{backend: p, upstream_model: v, price: PRICE}]
routes:
  - {name: chat, models: [m]}
  - {name: other, models: [n]}
"""
PRICED = POLICY.replace("PRICE", "{input_per_mtok: 1.0, output_per_mtok: 1.0}")
UNPRICED = POLICY.replace(", price: PRICE", "")


def _unpriced(metrics: Metrics) -> dict[str, float]:
    return {s.labels["deployment"]: s.value for f in metrics.deployment_unpriced.collect() for s in f.samples}


def test_the_runtime_is_compiled_and_the_gauges_set_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(PRICED)
    threads: dict[str, int] = {}

    def spy(name: str, real: Any) -> Any:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            threads[name] = threading.get_ident()
            return real(*args, **kwargs)

        return wrapped

    for name, attr in (
        ("compile", "compile_runtime"),
        ("unpriced", "report_unpriced"),
        ("signals", "configure_signals"),
    ):
        monkeypatch.setattr(reload_module, attr, spy(name, getattr(reload_module, attr)))
    app = create_app(Settings(policy_path=str(path), spool_dir=str(tmp_path / "spool")))
    with TestClient(app) as client:
        gateway = client.app.state["gateway"]
        assert _unpriced(gateway.metrics) == {"m@a": 0.0, "n@p": 0.0}
        before = gateway.runtime
        path.write_text(UNPRICED.replace("output_tokens: 2}", "output_tokens: 3}"))

        async def reload() -> tuple[bool, int]:
            reloader = reload_module.PolicyReloader(gateway, str(path), discover_adapters())
            return await reloader.reload(), threading.get_ident()

        done, loop_thread = client.blocking_portal.call(reload)
        assert done
        assert set(threads) == {"compile", "unpriced", "signals"}
        assert threads["compile"] != loop_thread and threads["unpriced"] != loop_thread
        assert threads["signals"] == loop_thread  # requests read the live signals: set on the loop
        assert gateway.runtime is not before
        # The changed backend got a new adapter, the unchanged one kept its (warm) adapter.
        assert gateway.runtime.adapters["a"] is not before.adapters["a"]
        assert gateway.runtime.adapters["p"] is before.adapters["p"]
        assert _unpriced(gateway.metrics) == {"m@a": 0.0, "n@p": 1.0}
        r = client.post("/v1/chat/completions", json={"model": "chat", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200 and r.headers["x-strait-deployment"] == "m@a"


def test_unpriced_gauges_of_removed_deployments_go_and_the_others_are_set(tmp_path: Path) -> None:
    """Set without clearing first: a scrape during the worker thread's update never finds it empty."""
    metrics = Metrics()
    path = tmp_path / "p.yaml"
    path.write_text(UNPRICED)
    report_unpriced(load_policy(path), metrics)
    assert _unpriced(metrics) == {"m@a": 0.0, "n@p": 1.0}
    path.write_text(UNPRICED.replace("  - {name: other, models: [n]}\n", "").replace(
        "  - name: n\n    deployments: [{backend: p, upstream_model: v}]\n", ""
    ))  # fmt: skip
    report_unpriced(load_policy(path), metrics)
    assert _unpriced(metrics) == {"m@a": 0.0}


def test_the_reload_freezes_what_it_built_before_the_collector_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check and the compilation freeze what they built while the collector still only takes young
    batches (its first pass after the build would otherwise scan it all, the GIL held for tens of ms at
    enterprise size), and the threads run with the lowered switch interval (`gil_handoff`); both are
    restored once the reload is done."""
    path = tmp_path / "policy.yaml"
    path.write_text(PRICED)
    frozen: list[tuple[tuple[int, ...], float]] = []
    real = reload_module.freeze_loaded

    def spy() -> None:
        frozen.append((gc.get_threshold(), sys.getswitchinterval()))
        real()

    monkeypatch.setattr(reload_module, "freeze_loaded", spy)
    app = create_app(Settings(policy_path=str(path), spool_dir=str(tmp_path / "spool")))
    with TestClient(app) as client:
        gateway = client.app.state["gateway"]
        thresholds, interval = gc.get_threshold(), sys.getswitchinterval()
        path.write_text(PRICED.replace("output_tokens: 2}", "output_tokens: 3}"))

        async def reload() -> bool:
            return await reload_module.PolicyReloader(gateway, str(path), discover_adapters()).reload()

        assert client.blocking_portal.call(reload)
        young = (load_module.BUILD_YOUNG_THRESHOLD, load_module._NEVER, load_module._NEVER)
        assert frozen == [(young, reload_module.RELOAD_SWITCH_S)] * 2  # the check's, the compilation's
        assert (gc.get_threshold(), sys.getswitchinterval()) == (thresholds, interval)


def test_one_change_seen_by_sighup_and_the_watcher_is_one_reload(tmp_path: Path) -> None:
    """A SIGHUP's reload and the file watcher's next tick both see the same change: only one of them
    checks, compiles and swaps; a later change still reloads through the watcher."""
    path = tmp_path / "policy.yaml"
    path.write_text(PRICED)
    app = create_app(Settings(policy_path=str(path), spool_dir=str(tmp_path / "spool")))
    with TestClient(app) as client:
        gateway = client.app.state["gateway"]

        def applied() -> float:
            return gateway.metrics.policy_reloads.labels("applied")._value.get()  # type: ignore[no-any-return]

        reloader = reload_module.PolicyReloader(gateway, str(path), discover_adapters())
        path.write_text(PRICED.replace("output_tokens: 2}", "output_tokens: 3}"))
        before = applied()
        assert client.blocking_portal.call(reloader.reload)  # SIGHUP
        runtime = gateway.runtime

        async def watcher_tick() -> bool:
            return await reloader.reload(only_if_changed=True)

        assert not client.blocking_portal.call(watcher_tick)  # the watcher's tick: already read
        assert applied() == before + 1 and gateway.runtime is runtime
        path.write_text(PRICED.replace("output_tokens: 2}", "output_tokens: 40}"))
        assert client.blocking_portal.call(watcher_tick)
        assert applied() == before + 2 and gateway.runtime is not runtime


def test_the_serving_collector_raises_only_the_young_threshold_and_a_pause_keeps_it() -> None:
    before = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        load_module.serving_collector()
        assert gc.get_threshold() == (load_module.SERVING_YOUNG_THRESHOLD, 10, 10)
        with load_module.collector_paused():
            assert gc.get_threshold()[1:] == (load_module._NEVER, load_module._NEVER)
        assert gc.get_threshold() == (load_module.SERVING_YOUNG_THRESHOLD, 10, 10)
        gc.set_threshold(0, 10, 10)  # automatic collection off: left so
        load_module.serving_collector()
        assert gc.get_threshold() == (0, 10, 10)
    finally:
        gc.set_threshold(*before)

"""The load-test kit's report (loadtest/report.py) written from a real small run: the fast upstream and one
`strait serve` (minimal side) as real processes, the load generator's own measurement code in-process with a
dozen requests per window. Checks the Markdown tables carry the measured numbers and that every plot is a
real PNG. Every process is stopped by PID (loadtest.overhead's context managers)."""

from __future__ import annotations

import asyncio
import struct
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from loadtest import report
from loadtest.loadgen import run_load
from loadtest.overhead import HOST, ConfigResult, Pair, Plan, gateway, headline
from tests.harness.procs import ServerProcess, free_port

N = 12  # requests per measured window: enough for every percentile to exist, a second or two in all
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


async def _measure(
    direct: str, via: str, cpu: dict[str, int]
) -> tuple[dict[str, Pair], dict[str, list[report.LevelPoint]]]:
    phases: dict[str, Pair] = {}
    for name, conc, stream in (
        ("seq_json", 1, False),
        ("seq_stream", 1, True),
        ("thr_json", 4, False),
        ("thr_stream", 8, True),
    ):
        d = await run_load(direct, model="m", concurrency=conc, requests=N, duration=20, stream=stream, warmup=conc)
        g = await run_load(
            via, model="bench", concurrency=conc, requests=N, duration=20, stream=stream, warmup=conc, cpu_pids=cpu
        )
        phases[name] = Pair(asdict(d), asdict(g))
    sweep: dict[str, list[report.LevelPoint]] = {report.DIRECT: [], "Strait minimal": []}
    for level in (1, 2):
        d = await run_load(direct, model="m", concurrency=level, requests=N, duration=20)
        g = await run_load(via, model="bench", concurrency=level, requests=N, duration=20, cpu_pids=cpu)
        sweep[report.DIRECT].append(report.LevelPoint.of(level, asdict(d), "gateway"))
        sweep["Strait minimal"].append(report.LevelPoint.of(level, asdict(g), "gateway"))
    return phases, sweep


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> report.KitRun:
    tmp: Path = tmp_path_factory.mktemp("kit")
    # The upstream at normal priority (the kit nices it; on a saturated test machine that starves it).
    up_port = free_port()
    up_argv = [sys.executable, "-m", "loadtest.fast_upstream", "--host", HOST, "--port", str(up_port)]
    with ServerProcess(up_argv, up_port, log_path=tmp / "upstream.log"), gateway(tmp, "uvicorn", "off", up_port) as gw:
        phases, sweep = asyncio.run(
            _measure(
                f"http://{HOST}:{up_port}/v1/chat/completions",
                f"http://{HOST}:{gw.port}/v1/chat/completions",
                {"gateway": gw.child.pid},
            )
        )
    result = ConfigResult("uvicorn", "off", launch=gw.launch, phases=phases, title="Strait minimal")
    plan = Plan(N, N, N, 4, 8, 20.0)
    return report.KitRun(
        started="test",
        command="pytest",
        revision="test",
        machine="test",
        took_s=0.0,
        plan=plan,
        results=[result],
        sweep=sweep,
        skipped={"LiteLLM proxy": "not importable here"},
    )


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path.name} is not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_report_tables_and_plots(kit: report.KitRun, tmp_path: Path) -> None:
    # The run itself was real: every window answered all its requests.
    for pair in kit.results[0].phases.values():
        for side in (pair.direct, pair.gateway):
            assert (side["count"], side["errors"]) == (N, 0)
            assert len(side["latency_quantiles"]) == len(report.QUANTILES)
    paths = report.write(kit, tmp_path / "out")
    assert set(paths) == {*report.PLOTS, "report"}

    text = paths["report"].read_text()
    h = headline(kit.results[0])
    assert "| measure | direct | Strait minimal |" in text
    assert f"| (a) sequential JSON latency p50 (ms) | {h['seq_direct_p50']:.3f} | {h['seq_gw_p50']:.3f} " in text
    # The added-latency table: the gateway's quantile minus direct's at p99, as measured.
    seq = kit.results[0].phases["seq_json"]
    i = report.QUANTILES.index(99.0)
    added = seq.gateway["latency_quantiles"][i] - seq.direct["latency_quantiles"][i]
    direct_p99 = seq.direct["latency_quantiles"][i]
    sign = "+" if added >= 0 else ""
    assert f"| JSON latency, sequential | p99 | {direct_p99:.3f} | {sign}{added:.2f} |" in text
    # The sweep table: one row per concurrency, the measured req/s in each cell.
    for level, (d, g) in enumerate(zip(kit.sweep[report.DIRECT], kit.sweep["Strait minimal"], strict=True), start=1):
        assert f"| {level} | {d.rps:.0f} req/s" in text and f"{g.rps:.0f} req/s, p99 {g.p99_ms:.1f} ms" in text
    assert "**LiteLLM proxy: skipped**: not importable here" in text

    for name in report.PLOTS:
        png = paths[name]
        assert f"]({png.name})" in text  # the report shows it
        width, height = _png_size(png)
        assert width >= 500 and height >= 300
        assert png.stat().st_size > 15_000  # axes, curves and labels drawn, not an empty canvas

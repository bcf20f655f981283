"""The load-test kit's report: a Markdown file with the side-by-side table and five PNG plots.

`write(kit, folder)` draws from what the runs measured (loadtest/kit.py), nothing else:
  latency.png         JSON latency at each percentile of loadgen.QUANTILES, sequential and at C: direct,
                      the reference proxy, each Strait side (and LiteLLM when it ran);
  added_latency.png   each side minus direct at the same percentile (sequential JSON, JSON at C, TTFT);
  ttft.png            stream time to first token at each percentile, sequential and at 2C streams;
  throughput.png      req/s and p99 latency against concurrency (the sweep), direct included;
  cpu.png             CPU ms per request of each side's process tree (sequential, JSON at C, streams at
                      2C) and against concurrency.
matplotlib draws on its Agg backend (files only, no display); it is imported when a report is written.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loadtest.loadgen import QUANTILES
from loadtest.overhead import PHASES, ConfigResult, Plan, report_side_by_side

DIRECT = "direct"
# The percentiles the Markdown tables show (the plots show every one of QUANTILES).
TABLE_PERCENTILES = (50.0, 90.0, 99.0, 99.9)
PLOTS = ("latency", "added_latency", "ttft", "throughput", "cpu")


@dataclass
class LevelPoint:
    """One point of the throughput sweep: closed-loop JSON at `concurrency`."""

    concurrency: int
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_ms_per_request: float  # the side's own process tree; for direct, the upstream's
    count: int
    errors: int

    @classmethod
    def of(cls, concurrency: int, result: dict[str, Any], cpu_name: str) -> LevelPoint:
        """From one load generator result (its JSON), metering `cpu_name`'s process tree."""
        return cls(
            concurrency=concurrency,
            rps=float(result["rps"]),
            p50_ms=float(result["latency"]["p50"]),
            p99_ms=float(result["latency"]["p99"]),
            cpu_ms_per_request=float(result["cpu_ms_per_request"].get(cpu_name, 0.0)),
            count=int(result["count"]),
            errors=int(result["errors"]),
        )


@dataclass
class KitRun:
    """Everything one `make loadtest` measured, and how."""

    started: str
    command: str
    revision: str
    machine: str
    took_s: float
    plan: Plan
    results: list[ConfigResult]  # each side's phases against the one direct baseline
    sweep: dict[str, list[LevelPoint]]  # side column (DIRECT first) -> points by rising concurrency
    level_seconds: float = 2.0
    skipped: dict[str, str] = field(default_factory=dict)  # side -> why it was not measured
    notes: list[str] = field(default_factory=list)

    def measured(self) -> list[ConfigResult]:
        return [r for r in self.results if r.error is None and len(r.phases) == len(PHASES)]


def raw(kit: KitRun) -> dict[str, Any]:
    """The run as JSON-able data (raw.json next to the report)."""
    return asdict(kit)


def _q(values: list[float], p: float) -> float:
    return values[QUANTILES.index(p)] if values else float("nan")


def _fmt(v: float, digits: int = 2) -> str:
    return "n/a" if v != v else f"{v:.{digits}f}"  # NaN: no samples


def _quantiles(result: dict[str, Any], key: str) -> list[float]:
    values: list[float] = result.get(key) or []
    return values


def added_table(kit: KitRun) -> str:
    """Side minus direct at each of TABLE_PERCENTILES, for the latency-bearing phases (ms)."""
    rs = kit.measured()
    if not rs:
        return ""
    c, sc = kit.plan.concurrency, kit.plan.stream_concurrency
    rows = [
        "| phase | percentile | direct (ms) | " + " | ".join(f"{r.column}: added (ms)" for r in rs) + " |",
        "|---|---:|---:|" + "---:|" * len(rs),
    ]
    for phase, key, label in (
        ("seq_json", "latency_quantiles", "JSON latency, sequential"),
        ("thr_json", "latency_quantiles", f"JSON latency, c={c}"),
        ("seq_stream", "ttft_quantiles", "stream TTFT, sequential"),
        ("thr_stream", "ttft_quantiles", f"stream TTFT, {sc} streams"),
    ):
        direct = _quantiles(rs[0].phases[phase].direct, key)
        for p in TABLE_PERCENTILES:
            d = _q(direct, p)
            cells = [_fmt(_q(_quantiles(r.phases[phase].gateway, key), p) - d) for r in rs]
            rows.append(
                f"| {label} | p{p:g} | {_fmt(d, 3)} | "
                + " | ".join(f"+{x}" if x[0].isdigit() else x for x in cells)
                + " |"
            )
    return "\n".join(rows)


def sweep_table(kit: KitRun) -> str:
    sides = list(kit.sweep)
    levels = sorted({p.concurrency for points in kit.sweep.values() for p in points})
    if not levels:
        return ""
    rows = ["| concurrency | " + " | ".join(sides) + " |", "|---:|" + "---|" * len(sides)]
    for level in levels:
        cells = []
        for side in sides:
            point = next((p for p in kit.sweep[side] if p.concurrency == level), None)
            if point is None:
                cells.append("failed")
                continue
            cpu = "upstream" if side == DIRECT else "CPU"
            errors = f", {point.errors} errors" if point.errors else ""
            cells.append(
                f"{point.rps:.0f} req/s, p99 {point.p99_ms:.1f} ms, {cpu} {point.cpu_ms_per_request:.3f} ms/req{errors}"
            )
        rows.append(f"| {level} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def markdown(kit: KitRun, images: dict[str, str]) -> str:
    """The report's text; `images` maps each of PLOTS that was drawn to its file name (relative)."""
    plan = kit.plan
    lines = [
        f"# Strait load test, {kit.started}",
        "",
        f"`{kit.command}` | git {kit.revision} | {kit.machine} | took {kit.took_s:.0f} s",
        "",
        f"Plan: {plan.seq_requests} sequential JSON requests and {plan.ttft_requests} sequential streams per side, "
        f"JSON at c={plan.concurrency} and streams at c={plan.stream_concurrency} (each window at most "
        f"{plan.phase_seconds:g} s or {plan.throughput_requests} requests), {plan.rounds} round(s); throughput sweep "
        f"at c={', '.join(str(p.concurrency) for p in kit.sweep.get(DIRECT, []))} for {kit.level_seconds:g} s each. "
        "Fast fake upstream and load generator at nice 10; one uvicorn worker per gateway. Absolute numbers depend "
        "on the machine and on the other jobs on it (the `noise` row); compare sides within one run.",
        "",
        "Sides:",
        "",
    ]
    for r in kit.results:
        state = "failed: " + r.error if r.error else f"launched via {r.launch}"
        lines.append(f"- **{r.column}**: {_describe(r)} ({state})")
    for name, why in kit.skipped.items():
        lines.append(f"- **{name}: skipped**: {why}")
    lines += ["", "## Side by side", "", report_side_by_side(kit.results, plan) or "(no side measured)", ""]
    lines += ["## Added latency per percentile", "", "Side minus direct at the same percentile (ms).", ""]
    lines += [added_table(kit) or "(no side measured)", ""]
    lines += ["## Throughput against concurrency (JSON, closed loop)", "", sweep_table(kit) or "(no sweep)", ""]
    titles = {
        "latency": "Latency distributions: direct, reference and Strait",
        "added_latency": "Added latency per percentile",
        "ttft": "Time to first token",
        "throughput": "Throughput against concurrency",
        "cpu": "CPU per request",
    }
    if images:
        lines += ["## Plots", ""]
        for name in PLOTS:
            if name in images:
                lines += [f"### {titles[name]}", "", f"![{titles[name]}]({images[name]})", ""]
    if kit.notes:
        lines += ["## Notes", "", *[f"- {n}" for n in kit.notes], ""]
    return "\n".join(lines)


def _describe(r: ConfigResult) -> str:
    if r.server == "reference":
        return "the lean aiohttp + Redis proxy of loadtest/reference_proxy.py (auth, one admission script, batched accounting)"
    if r.server == "litellm":
        return "LiteLLM's proxy, one worker, no master key, the same upstream"
    return {
        "off": "open policy: no auth, no limits; routing and the in-process usage record",
        "redis": "auth, limits and budget on a private redis-server, routing, accounting (ledger in Redis); cache off",
        "cache": "as cache off, plus the tenant's exact cache in the same Redis (every measured answer a hit)",
    }.get(r.state, r.state)


# ---------------------------------------------------------------------------------------------- plots


def _colours(columns: list[str]) -> dict[str, str]:
    fixed = {DIRECT: "black", "reference proxy": "tab:gray", "LiteLLM proxy": "tab:purple"}
    palette = iter(["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:brown", "tab:pink", "tab:olive"])
    return {c: fixed.get(c) or next(palette, "tab:cyan") for c in columns}


def _figure(ncols: int, title: str) -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, whatever MPLBACKEND says
    from matplotlib.figure import Figure

    # Fixed margins rather than layout="constrained", which draws every figure twice (+0.5 s CPU each).
    fig = Figure(figsize=(6.0 * ncols, 4.6))
    fig.subplots_adjust(left=0.35 / ncols, right=0.98, bottom=0.13, top=0.84, wspace=0.28)
    fig.suptitle(title)
    return fig


def _percentile_axis(ax: Any) -> None:
    shown = [i for i, q in enumerate(QUANTILES) if q in (1.0, 10.0, 50.0, 90.0, 99.0, 99.9)]
    ax.set_xticks(shown, [f"p{QUANTILES[i]:g}" for i in shown])
    ax.set_xlabel("percentile")
    ax.grid(True, alpha=0.3)


def _curves(ax: Any, series: dict[str, list[float]], colours: dict[str, str], title: str, ylabel: str) -> None:
    xs = list(range(len(QUANTILES)))
    for name, values in series.items():
        if values:
            ax.plot(xs, values, marker=".", label=name, color=colours[name])
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    _percentile_axis(ax)
    ax.legend(fontsize="small")


def _distribution(kit: KitRun, key: str, phases: tuple[str, str], titles: tuple[str, str], name: str) -> Any:
    rs = kit.measured()
    colours = _colours([DIRECT, *(r.column for r in rs)])
    fig = _figure(2, name)
    for ax, phase, title in zip(fig.subplots(1, 2), phases, titles, strict=True):
        series = {DIRECT: _quantiles(rs[0].phases[phase].direct, key)}
        series.update({r.column: _quantiles(r.phases[phase].gateway, key) for r in rs})
        _curves(ax, series, colours, title, "ms (log scale)")
        ax.set_yscale("log")
    return fig


def _added(kit: KitRun) -> Any:
    rs = kit.measured()
    colours = _colours([DIRECT, *(r.column for r in rs)])
    c, sc = kit.plan.concurrency, kit.plan.stream_concurrency
    fig = _figure(3, "Added latency per percentile: side minus direct (ms)")
    panels = (
        ("seq_json", "latency_quantiles", "JSON, sequential"),
        ("thr_json", "latency_quantiles", f"JSON, c={c}"),
        ("thr_stream", "ttft_quantiles", f"stream TTFT, {sc} streams"),
    )
    for ax, (phase, key, title) in zip(fig.subplots(1, 3), panels, strict=True):
        direct = _quantiles(rs[0].phases[phase].direct, key)
        series = {
            r.column: [g - d for g, d in zip(_quantiles(r.phases[phase].gateway, key), direct, strict=False)]
            for r in rs
        }
        _curves(ax, series, colours, title, "added ms")
        ax.axhline(0, color="black", linewidth=0.8)
    return fig


def _throughput(kit: KitRun) -> Any:
    colours = _colours(list(kit.sweep))
    fig = _figure(2, "Closed-loop JSON against concurrency")
    ax_rps, ax_p99 = fig.subplots(1, 2)
    for name, points in kit.sweep.items():
        if not points:
            continue
        xs = [p.concurrency for p in points]
        ax_rps.plot(xs, [p.rps for p in points], marker="o", label=name, color=colours[name])
        ax_p99.plot(xs, [p.p99_ms for p in points], marker="o", label=name, color=colours[name])
    for ax, ylabel, title in ((ax_rps, "requests/s", "throughput"), (ax_p99, "p99 latency, ms (log)", "p99 latency")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    ax_p99.set_yscale("log")
    return fig


def _cpu(kit: KitRun) -> Any:
    rs = kit.measured()
    colours = _colours([DIRECT, *(r.column for r in rs)])
    c, sc = kit.plan.concurrency, kit.plan.stream_concurrency
    fig = _figure(2, "CPU per request of each side's process tree")
    ax_bar, ax_lvl = fig.subplots(1, 2)
    groups = (("seq_json", "JSON, sequential"), ("thr_json", f"JSON, c={c}"), ("thr_stream", f"stream, {sc} streams"))
    width = 0.8 / max(1, len(rs))
    for i, r in enumerate(rs):
        values = [r.phases[phase].gateway["cpu_ms_per_request"].get("gateway", 0.0) for phase, _ in groups]
        xs = [g + (i - (len(rs) - 1) / 2) * width for g in range(len(groups))]
        bars = ax_bar.bar(xs, values, width, label=r.column, color=colours[r.column])
        ax_bar.bar_label(bars, fmt="%.2f", fontsize="x-small")
    ax_bar.set_xticks(range(len(groups)), [label for _, label in groups])
    ax_bar.set_ylabel("CPU ms per request")
    ax_bar.set_title("by phase")
    ax_bar.legend(fontsize="small")
    ax_bar.grid(True, axis="y", alpha=0.3)
    for name, points in kit.sweep.items():
        if name == DIRECT or not points:
            continue
        xs = [p.concurrency for p in points]
        ax_lvl.plot(xs, [p.cpu_ms_per_request for p in points], marker="o", label=name, color=colours[name])
    ax_lvl.set_xscale("log", base=2)
    ax_lvl.set_xlabel("concurrent JSON requests")
    ax_lvl.set_ylabel("CPU ms per request")
    ax_lvl.set_title("against concurrency (the sweep)")
    ax_lvl.grid(True, alpha=0.3)
    ax_lvl.legend(fontsize="small")
    return fig


def write(kit: KitRun, folder: Path) -> dict[str, Path]:
    """Draw every plot the data allows and write report.md; returns {plot name or "report": path}."""
    folder.mkdir(parents=True, exist_ok=True)
    c, sc = kit.plan.concurrency, kit.plan.stream_concurrency
    figures: dict[str, Any] = {}
    if kit.measured():
        figures["latency"] = _distribution(
            kit,
            "latency_quantiles",
            ("seq_json", "thr_json"),
            ("JSON, sequential", f"JSON, c={c}"),
            "JSON latency at each percentile",
        )
        figures["added_latency"] = _added(kit)
        figures["ttft"] = _distribution(
            kit,
            "ttft_quantiles",
            ("seq_stream", "thr_stream"),
            ("streams, sequential", f"{sc} concurrent streams"),
            "Time to first token at each percentile",
        )
        figures["cpu"] = _cpu(kit)
    if any(kit.sweep.values()):
        figures["throughput"] = _throughput(kit)
    paths: dict[str, Path] = {}
    for name, fig in figures.items():
        paths[name] = folder / f"{name}.png"
        fig.savefig(paths[name], dpi=110)
    paths["report"] = folder / "report.md"
    paths["report"].write_text(markdown(kit, {k: p.name for k, p in paths.items() if k != "report"}))
    return paths

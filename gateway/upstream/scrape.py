"""Engine metrics: a backend's Prometheus page turned into utilisation and queue depth.

Names per engine (shared/real-backends.md §4, the mapping routers such as the Gateway API inference
extension use):

| engine   | running                        | waiting                       | KV-cache use                          |
|----------|--------------------------------|-------------------------------|---------------------------------------|
| vLLM     | vllm:num_requests_running      | vllm:num_requests_waiting     | vllm:kv_cache_usage_perc (or the older vllm:gpu_cache_usage_perc) |
| SGLang   | sglang:num_running_reqs        | sglang:num_queue_reqs         | sglang:token_usage                    |
| TGI      | tgi_batch_current_size         | tgi_queue_size                | none                                  |
| llama.cpp| llamacpp:requests_processing   | llamacpp:requests_deferred    | none                                  |

Samples of one name are summed over their label sets (several engines or models behind one page);
the KV gauge is the fullest one. Utilisation is the largest of: KV-cache use, running /
`max_concurrency` (when the policy gives it), and 1 while requests wait (an engine queues only when
it is full). The page is untrusted input: bounded in size, each line parsed defensively, values that
are not finite non-negative numbers ignored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final, Literal

Format = Literal["vllm", "sglang", "tgi", "llamacpp"]

# The most of a metrics page read (a vLLM page with histograms is ~50-200 KiB).
MAX_PAGE_BYTES: Final = 2 * 1024 * 1024
MAX_LINE: Final = 16 * 1024


@dataclass(frozen=True, slots=True)
class Names:
    running: tuple[str, ...]
    waiting: tuple[str, ...]
    kv: tuple[str, ...] = ()


FORMATS: Final[dict[Format, Names]] = {
    "vllm": Names(
        running=("vllm:num_requests_running",),
        waiting=("vllm:num_requests_waiting",),
        kv=("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
    ),
    "sglang": Names(
        running=("sglang:num_running_reqs",), waiting=("sglang:num_queue_reqs",), kv=("sglang:token_usage",)
    ),
    "tgi": Names(running=("tgi_batch_current_size",), waiting=("tgi_queue_size",)),
    "llamacpp": Names(running=("llamacpp:requests_processing",), waiting=("llamacpp:requests_deferred",)),
}
_WANTED: Final = frozenset(n for names in FORMATS.values() for n in (*names.running, *names.waiting, *names.kv))


class MetricsPageError(ValueError):
    """The page holds none of the gauges of the expected (or any known) engine."""


@dataclass(frozen=True, slots=True)
class EngineGauges:
    format: Format
    running: float
    waiting: float
    kv: float | None

    def utilisation(self, max_concurrency: int | None) -> float:
        parts = [0.0]
        if self.kv is not None:
            parts.append(self.kv)
        if max_concurrency:
            parts.append(self.running / max_concurrency)
        if self.waiting > 0:
            parts.append(1.0)
        return min(1.0, max(parts))


def samples(text: str) -> dict[str, list[float]]:
    """The samples of the gauges Strait reads, by metric name (other names skipped unparsed)."""
    out: dict[str, list[float]] = {}
    for raw in text[:MAX_PAGE_BYTES].splitlines():
        if not raw or raw[0] == "#" or len(raw) > MAX_LINE:
            continue
        line = raw.strip()
        cut = len(line)
        for i, ch in enumerate(line):
            if ch in "{ \t":
                cut = i
                break
        name = line[:cut]
        if name not in _WANTED:
            continue
        rest = line[cut:]
        if rest.startswith("{"):
            end = _labels_end(rest)
            if end < 0:
                continue
            rest = rest[end + 1 :]
        fields = rest.split()
        if not fields or len(fields) > 2:
            continue
        try:
            value = float(fields[0])
        except ValueError:
            continue
        if math.isfinite(value) and value >= 0:
            out.setdefault(name, []).append(value)
    return out


def _labels_end(rest: str) -> int:
    """Index of the `}` closing the label set at the start of `rest` (quotes and escapes honoured), or -1."""
    quoted = False
    escaped = False
    for i, ch in enumerate(rest):
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = quoted
        elif ch == '"':
            quoted = not quoted
        elif ch == "}" and not quoted:
            return i
    return -1


def detect(found: dict[str, list[float]]) -> Format | None:
    for fmt, names in FORMATS.items():
        if any(n in found for n in (*names.running, *names.waiting)):
            return fmt
    return None


def parse(text: str, fmt: Format | None = None) -> EngineGauges:
    """The load gauges of one metrics page; `fmt` None: recognised from the names on the page."""
    found = samples(text)
    fmt = fmt or detect(found)
    if fmt is None:
        raise MetricsPageError("no known engine gauges (vLLM, SGLang, TGI, llama.cpp) on the page")
    names = FORMATS[fmt]
    running = [v for n in names.running for v in found.get(n, ())]
    waiting = [v for n in names.waiting for v in found.get(n, ())]
    if not running and not waiting:
        raise MetricsPageError(f"no {fmt} load gauges on the page ({', '.join(names.running + names.waiting)})")
    kv = next((found[n] for n in names.kv if n in found), None)
    return EngineGauges(
        format=fmt,
        running=sum(running),
        waiting=sum(waiting),
        kv=min(1.0, max(kv)) if kv else None,
    )

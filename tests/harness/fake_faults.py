"""Fault selection for the fake upstream: model names that carry faults, per-key attempt gates, refusal bodies and
vLLM-style metrics.  Kept apart from ``fake_upstream`` so the HTTP handlers stay about the wire format.

Model names (``upstream_model`` in a policy) select faults, so one deployment can point at a faulty "model" of the
fake while another stays healthy::

    fault:<item>[+<item>...]        e.g. fault:429-retry-after-2   fault:500-once   fault:slow-first-token-3000+no-done

An item is a preset (``PRESETS``) or a raw ``name=value`` directive (``fault:status=503+retry_after=7``).  A preset may
end with a gate suffix: ``-once`` (= fail_first 1), ``-first-<n>`` (fail_first n) or ``-ratio-<p>`` (fail_ratio p), e.g.
``fault:reset-once``, ``fault:503-ratio-0.5``.  Unknown items are an error (400), never a silent healthy model.
"""

from __future__ import annotations

import email.utils
import hashlib
import math
import re
import time
from collections.abc import Callable
from typing import Any

FAULT_PREFIX = "fault:"

# Directives that make an attempt faulty.  `fail_first` / `fail_ratio` gate exactly these: an attempt the gate lets
# through is served as if none of them had been given (the shape directives such as `tokens` still apply).
FAULT_DIRECTIVES = frozenset(
    {
        "status",
        "hang",
        "ttft_ms",
        "first_token_ms",
        "reset",
        "fail_after_chunks",
        "midstream_error",
        "stall_after_chunks",
        "malformed_after_chunks",
        "no_done",
        "refusal",
    }
)
GATE_DIRECTIVES = frozenset({"fail_first", "fail_ratio"})

_N = r"(\d+)"
_F = r"(\d+(?:\.\d+)?)"

# (pattern, directives builder).  The first full match wins.
PRESETS: list[tuple[str, Callable[..., dict[str, Any]]]] = [
    (r"ok|healthy", lambda: {}),
    (r"429-retry-after-date-" + _N, lambda s: {"status": 429, "retry_after_date": int(s)}),
    (r"429-retry-after-" + _N, lambda s: {"status": 429, "retry_after": s}),
    (r"429-no-retry-after", lambda: {"status": 429, "retry_after": "none"}),
    (r"([45]\d\d)", lambda s: {"status": int(s)}),
    (r"reset", lambda: {"reset": True}),
    (r"fin", lambda: {"reset": True, "fail_mode": "fin"}),
    (r"hang", lambda: {"hang": True}),
    (r"slow-headers-" + _N, lambda ms: {"ttft_ms": float(ms)}),
    (r"slow-first-token-" + _N, lambda ms: {"first_token_ms": float(ms)}),
    (r"cut-after-" + _N, lambda n: {"fail_after_chunks": int(n)}),
    (r"cut-fin-after-" + _N, lambda n: {"fail_after_chunks": int(n), "fail_mode": "fin"}),
    (r"stall-after-" + _N, lambda n: {"stall_after_chunks": int(n)}),
    (r"malformed-after-" + _N, lambda n: {"malformed_after_chunks": int(n)}),
    (r"error-event-after-" + _N, lambda n: {"midstream_error": int(n)}),
    (r"no-done", lambda: {"no_done": True}),
    (r"context-length", lambda: {"status": 400}),
    (r"context-window-" + _N, lambda n: {"context_window": int(n)}),
    (r"content-filter", lambda: {"refusal": "azure"}),
    (r"invalid-prompt", lambda: {"refusal": "openai"}),
    (r"prefill", lambda: {"prefill": "auto"}),
    (r"no-prefill", lambda: {"prefill": "reject"}),
]
_COMPILED = [(re.compile(p), fn) for p, fn in PRESETS]
_GATES: list[tuple[re.Pattern[str], Callable[[str], dict[str, Any]]]] = [
    (re.compile(r"(.+)-once"), lambda _: {"fail_first": 1}),
    (re.compile(r"(.+)-first-" + _N), lambda n: {"fail_first": int(n)}),
    (re.compile(r"(.+)-ratio-" + _F), lambda p: {"fail_ratio": float(p)}),
]
MAX_MODEL_NAME = 512


class FaultNameError(ValueError):
    pass


def _preset(item: str) -> dict[str, Any] | None:
    for pattern, fn in _COMPILED:
        m = pattern.fullmatch(item)
        if m:
            return fn(*m.groups())
    return None


def _item(item: str) -> dict[str, Any]:
    if "=" in item:
        name, _, value = item.partition("=")
        if not name:
            raise FaultNameError(f"empty directive name in fault item {item!r}")
        return {name.replace("-", "_"): value}
    found = _preset(item)
    if found is not None:
        return found
    for pattern, gate in _GATES:
        m = pattern.fullmatch(item)
        if m:
            base = _preset(m.group(1))
            if base is not None:
                return {**base, **gate(m.group(m.lastindex or 1))}
    raise FaultNameError(f"unknown fault item {item!r} in model name; presets: {[p for p, _ in PRESETS]}")


def model_directives(model: Any) -> dict[str, Any]:
    """Raw (unconverted) directives a ``fault:...`` model name carries; {} for any other name."""
    if not isinstance(model, str) or not model.startswith(FAULT_PREFIX):
        return {}
    if len(model) > MAX_MODEL_NAME:
        raise FaultNameError(f"fault model name longer than {MAX_MODEL_NAME} characters")
    out: dict[str, Any] = {}
    for item in model[len(FAULT_PREFIX) :].split("+"):
        if item:
            out.update(_item(item))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Attempt gates: "fail the first N attempts carrying key K", "fail a share p of the attempts under key K".


class AttemptCounter:
    """Attempts seen per key, bounded (the oldest keys are forgotten first)."""

    def __init__(self, limit: int = 100_000) -> None:
        self.limit = limit
        self.counts: dict[str, int] = {}

    def next(self, key: str) -> int:
        n = self.counts.pop(key, 0) + 1
        self.counts[key] = n  # re-inserted: most recently used last
        while len(self.counts) > self.limit:
            self.counts.pop(next(iter(self.counts)))
        return n

    def clear(self) -> None:
        self.counts.clear()


def default_key(d: dict[str, Any], *, path: str, raw_body: bytes, model: str) -> str:
    """`key` when given; else fail_first counts attempts of the same request (path + exact body bytes, which a
    gateway's retries repeat) and fail_ratio counts attempts per model (a deployment's brown-out)."""
    if "key" in d:
        return "k:" + str(d["key"])
    if "fail_first" in d:
        return "r:" + hashlib.sha256(path.encode() + b"\0" + raw_body).hexdigest()
    return "m:" + model


def gate_says_fail(d: dict[str, Any], attempt: int) -> bool:
    """Whether attempt number `attempt` (1-based) under its key gets the fault directives."""
    if "fail_first" in d and attempt > d["fail_first"]:
        return False
    if "fail_ratio" in d:
        # Exactly floor(n * p) of the first n attempts fail, evenly spread: deterministic, no coin tosses.
        p = min(1.0, max(0.0, d["fail_ratio"]))
        return bool(math.floor(attempt * p) > math.floor((attempt - 1) * p))
    return True


def strip_faults(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in FAULT_DIRECTIVES}


# ---------------------------------------------------------------------------------------------------------------------
# Retry-After and refusal bodies.


def retry_after_http_date(seconds: int, now: float | None = None) -> str:
    """An HTTP-date at least `seconds` from now (HTTP-dates have whole seconds: rounded up, so never sooner)."""
    t = (time.time() if now is None else now) + seconds
    return email.utils.formatdate(math.ceil(t), usegmt=True)


def refusal_body(kind: str) -> dict[str, Any]:
    """A 400 content-policy refusal as the provider sends it (shapes from public error reports, see
    tests/fixtures/README.md): Azure OpenAI's `content_filter` and OpenAI's `invalid_prompt`."""
    if kind == "azure":
        safe = {"filtered": False, "severity": "safe"}
        return {
            "error": {
                "message": (
                    "The response was filtered due to the prompt triggering Azure OpenAI's content management policy. "
                    "Please modify your prompt and retry. To learn more about our content filtering policies please "
                    "read our documentation: https://go.microsoft.com/fwlink/?linkid=2198766"
                ),
                "type": None,
                "param": "prompt",
                "code": "content_filter",
                "status": 400,
                "innererror": {
                    "code": "ResponsibleAIPolicyViolation",
                    "content_filter_result": {
                        "hate": safe,
                        "jailbreak": {"filtered": False, "detected": False},
                        "self_harm": safe,
                        "sexual": safe,
                        "violence": {"filtered": True, "severity": "medium"},
                    },
                },
            }
        }
    return {
        "error": {
            "message": (
                "Invalid prompt: your prompt was flagged as potentially violating our usage policy. Please try again "
                "with a different prompt: https://platform.openai.com/docs/guides/reasoning#advice-on-prompting"
            ),
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_prompt",
        }
    }


# ---------------------------------------------------------------------------------------------------------------------
# Health and vLLM-style metrics.

KV_NAMES = ("kv_cache_usage_perc", "gpu_cache_usage_perc")


class Health:
    """What ``/health`` says, and whether the inference endpoints serve (a down engine answers 503)."""

    def __init__(self) -> None:
        self.ok = True
        self.serve = True
        self.probes = 0

    def set(self, spec: dict[str, Any]) -> None:
        if "ok" in spec:
            if not isinstance(spec["ok"], bool):
                raise ValueError("'ok' must be a boolean")
            self.ok = spec["ok"]
            self.serve = spec["ok"]  # a down engine does not serve either, unless told otherwise
        if "serve" in spec:
            if not isinstance(spec["serve"], bool):
                raise ValueError("'serve' must be a boolean")
            self.serve = spec["serve"]

    def view(self) -> dict[str, Any]:
        return {"ok": self.ok, "serve": self.serve, "probes": self.probes}


class Metrics:
    """vLLM's load gauges, following the fake's in-flight count unless overridden.

    running = min(in-flight, slots), waiting = in-flight - running, kv = running / slots; each can be pinned with an
    override (``POST /_metrics {"running": 3}``; null un-pins).  ``status`` makes the scrape fail with that status
    (stale-metrics tests); ``kv_names`` chooses which KV gauge names are exposed (old vLLM: gpu_cache_usage_perc)."""

    OVERRIDABLE = ("running", "waiting", "kv_cache_usage")

    def __init__(self, model_name: str, slots: int = 4) -> None:
        self.model_name = model_name
        self.slots = slots
        self.overrides: dict[str, float] = {}
        self.status = 200
        self.kv_names: tuple[str, ...] = KV_NAMES
        self.scrapes = 0

    def set(self, spec: dict[str, Any]) -> None:
        for name, value in spec.items():
            if name in self.OVERRIDABLE:
                if value is None:
                    self.overrides.pop(name, None)
                elif isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
                    self.overrides[name] = float(value)
                else:
                    raise ValueError(f"{name!r} must be a number >= 0 or null")
            elif name == "slots":
                if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 100_000:
                    raise ValueError("'slots' must be an integer in 1..100000")
                self.slots = value
            elif name == "status":
                if not isinstance(value, int) or isinstance(value, bool) or not 200 <= value <= 599:
                    raise ValueError("'status' must be an HTTP status")
                self.status = value
            elif name == "kv_names":
                if not isinstance(value, list) or not set(value) <= set(KV_NAMES):
                    raise ValueError(f"'kv_names' must be a list drawn from {KV_NAMES}")
                self.kv_names = tuple(value)
            elif name == "reset":
                if value:
                    self.overrides.clear()
                    self.status = 200
                    self.kv_names = KV_NAMES
            else:
                raise ValueError(f"unknown metrics setting {name!r}")

    def gauges(self, inflight: int) -> dict[str, float]:
        running = float(min(inflight, self.slots))
        live = {"running": running, "waiting": float(inflight) - running, "kv_cache_usage": running / self.slots}
        return {**live, **self.overrides}

    def view(self, inflight: int) -> dict[str, Any]:
        return {
            "inflight": inflight,
            "slots": self.slots,
            "overrides": dict(self.overrides),
            "status": self.status,
            "kv_names": list(self.kv_names),
            "scrapes": self.scrapes,
            **self.gauges(inflight),
        }

    def render(self, inflight: int, generation_tokens: int) -> str:
        g = self.gauges(inflight)
        labels = f'{{engine="0",model_name="{self.model_name}"}}'
        rows = [
            ("num_requests_running", "gauge", "Number of requests in model execution batches.", g["running"]),
            ("num_requests_waiting", "gauge", "Number of requests waiting to be processed.", g["waiting"]),
        ]
        for name in self.kv_names:
            rows.append((name, "gauge", "KV-cache usage. 1 means 100 percent usage.", g["kv_cache_usage"]))
        rows.append(
            ("generation_tokens_total", "counter", "Number of generation tokens processed.", float(generation_tokens))
        )
        out: list[str] = []
        for name, kind, help_text, value in rows:
            out.append(f"# HELP vllm:{name} {help_text}")
            out.append(f"# TYPE vllm:{name} {kind}")
            out.append(f"vllm:{name}{labels} {value!r}")
        return "\n".join(out) + "\n"

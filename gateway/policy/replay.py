"""Request features without content, and `strait policy diff` over a sample of real traffic.

The gateway can write one `FeatureLine` per decided request (`STRAIT_FEATURE_LOG`, gateway.stages.
feature_log): what the engine decided on (tenant, route, operation, prompt size, max_tokens, the
capabilities used, the client's narrowing, the headers the policy's rules read, the replica's ingress
region) and what it chose. No
prompt, no completion, no key. `diff` replays such a sample (or request bodies, `Replay`) against two
policies and reports how many requests would move, from where to where, and the estimated cost per day
before and after.

Costs are the engine's estimate for the first choice: the deployment's price times the prompt tokens
and the answer's tokens (the request's `completion_tokens` when the line has it, else `max_tokens`,
else the engine's default). A line stands for 1/`sample` requests; a day is extrapolated from the time
the sample spans (at least an hour, so a burst of lines does not become a huge day).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from gateway.canonical import Operation
from gateway.errors import GatewayError
from gateway.policy.engine import DEFAULT_OUTPUT_TOKENS, Preferences, RequestFeatures, decide
from gateway.policy.features import count_prompt_tokens, request_of
from gateway.policy.index import PolicyIndex, Target
from gateway.policy.live import LiveState
from gateway.policy.tools import principal_for, run

DAY_S = 86_400.0
# The shortest span a sample is taken to cover when extrapolating to a day.
MIN_SPAN_S = 3_600.0


class FeatureLine(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One decided request, as the feature log writes it (one JSON object per line)."""

    ts: float
    route: str
    tenant: str | None = None
    operation: Operation = "chat"
    prompt_tokens: int = 0
    max_tokens: int | None = None
    needs: tuple[str, ...] = ()
    # The per-request narrowing (x-strait-policy or the body's `strait`), when the client sent one.
    preferences: Preferences | None = None
    # Only the headers the policy's rules read (by lower-case name).
    headers: dict[str, str] = {}
    # What the policy in force chose (its first choice), or None when it refused.
    deployment: str | None = None
    # The share of requests the log keeps: this line stands for 1/sample requests.
    sample: float = 1.0
    completion_tokens: int | None = None
    # The region of the replica the request entered through (STRAIT_REGION), when it has one: a tenant's
    # `required_ingress_regions` and a route's `prefer: ingress_region` read it, so a replay does too.
    ingress_region: str | None = None


class Replay(msgspec.Struct, kw_only=True):
    """A request body to replay (the older format of `--requests`, hand-written samples)."""

    request: dict[str, Any]
    tenant: str | None = None
    headers: dict[str, str] = {}
    signals: dict[str, Any] = {}
    ingress_region: str | None = None


def features_of(line: FeatureLine) -> RequestFeatures:
    return RequestFeatures(
        route=line.route,
        operation=line.operation,
        prompt_tokens=line.prompt_tokens,
        max_tokens=line.max_tokens,
        needs=frozenset(line.needs),
        headers=line.headers,
        preferences=line.preferences,
        ingress_region=line.ingress_region,
    )


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one policy does with one request: its first choice (or the refusal) and its estimated cost."""

    choice: str
    cost_usd: float = 0.0
    # Why the new policy excludes (or ranks lower) the old choice; for the change lines.
    note: str = ""


def _cost(target: Target, prompt_tokens: int, out_tokens: int) -> float:
    price = target.deployment.price
    if price is None:
        return 0.0
    return (prompt_tokens * price.input_per_mtok + out_tokens * price.output_per_mtok) / 1e6


def outcome(index: PolicyIndex, sample: FeatureLine | Replay, previous: str | None = None) -> Outcome:
    try:
        if isinstance(sample, Replay):
            plan = run(
                index,
                sample.tenant,
                sample.request,
                headers=sample.headers,
                signals=sample.signals,
                ingress_region=sample.ingress_region,
            )
            canonical = request_of(sample.request)
            prompt, max_tokens, completion = count_prompt_tokens(canonical), canonical.max_output_tokens, None
        else:
            features = features_of(sample)
            plan = decide(index, principal_for(index, sample.tenant), features, LiveState(), decision_id="diff")
            prompt, max_tokens, completion = sample.prompt_tokens, sample.max_tokens, sample.completion_tokens
    except GatewayError as exc:
        return Outcome(f"refused {exc.status} {exc.code or ''}".rstrip())
    except ValueError as exc:  # an unknown tenant in this policy
        return Outcome(f"refused ({exc})")
    if not plan.targets:
        return Outcome("refused (empty plan)")
    first = plan.targets[0]
    out = completion if completion is not None else (max_tokens or DEFAULT_OUTPUT_TOKENS)
    note = ""
    if previous is not None and previous != first.label:
        row = next((r for r in plan.decision.rows if r.deployment == previous), None)
        if row is not None and row.excluded:
            note = f"excluded: {row.excluded}"
        elif row is not None and row.spilled:
            note = f"spilled: {row.spilled}"
        elif row is not None:
            note = f"ranked {row.rank} under objective {plan.decision.objective}"
    return Outcome(first.label, _cost(first, prompt, out), note)


@dataclass
class DiffReport:
    total: float = 0.0  # requests the sample stands for (weighted)
    lines: int = 0
    moved: float = 0.0
    moves: dict[tuple[str, str], float] = field(default_factory=dict)
    # A reason per (before, after), the first seen.
    notes: dict[tuple[str, str], str] = field(default_factory=dict)
    cost_before: float = 0.0
    cost_after: float = 0.0
    span_s: float = 0.0

    @property
    def per_day(self) -> float:
        """How many days' worth of traffic the sample is, inverted: multiply a total by this for a day."""
        return DAY_S / max(self.span_s, MIN_SPAN_S)

    def render(self, top: int = 20) -> list[str]:
        out = [
            f"{self.lines} sampled requests (standing for {self.total:g}, spanning {self.span_s / 3600:.2f} h; "
            f"a day is extrapolated from {max(self.span_s, MIN_SPAN_S) / 3600:.2f} h)",
            f"{self.moved:g} of {self.total:g} requests move ({100 * self.moved / self.total if self.total else 0:.1f} %)",
        ]
        for (before, after), n in sorted(self.moves.items(), key=lambda kv: -kv[1])[:top]:
            note = self.notes.get((before, after), "")
            out.append(f"  {n:g} x {before} -> {after}" + (f"  ({note})" if note else ""))
        if len(self.moves) > top:
            out.append(f"  ... and {len(self.moves) - top} more kinds of move")
        old_day, new_day = self.cost_before * self.per_day, self.cost_after * self.per_day
        change = (new_day - old_day) / old_day * 100 if old_day else 0.0
        out.append(
            f"estimated cost per day: {old_day:.2f} USD -> {new_day:.2f} USD ({new_day - old_day:+.2f} USD, "
            f"{change:+.1f} %)"
        )
        return out


def diff(old: PolicyIndex, new: PolicyIndex, samples: Iterable[FeatureLine | Replay]) -> DiffReport:
    report = DiffReport()
    first_ts: float | None = None
    last_ts: float | None = None
    for sample in samples:
        weight = 1.0 / sample.sample if isinstance(sample, FeatureLine) and sample.sample > 0 else 1.0
        if isinstance(sample, FeatureLine):
            first_ts = sample.ts if first_ts is None else min(first_ts, sample.ts)
            last_ts = sample.ts if last_ts is None else max(last_ts, sample.ts)
        before = outcome(old, sample)
        after = outcome(new, sample, previous=before.choice)
        report.lines += 1
        report.total += weight
        report.cost_before += before.cost_usd * weight
        report.cost_after += after.cost_usd * weight
        if before.choice != after.choice:
            key = (before.choice, after.choice)
            report.moved += weight
            report.moves[key] = report.moves.get(key, 0.0) + weight
            if after.note:
                report.notes.setdefault(key, after.note)
    if first_ts is not None and last_ts is not None:
        report.span_s = last_ts - first_ts
    return report


def read_samples(path: Path) -> list[FeatureLine | Replay]:
    """A JSONL file of feature lines (what the gateway logs) or request bodies (`{"request": ...}`)."""
    out: list[FeatureLine | Replay] = []
    for line_no, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
            if isinstance(raw, Mapping) and "request" in raw:
                out.append(msgspec.convert(raw, Replay))
            else:
                out.append(msgspec.convert(raw, FeatureLine))
        except (ValueError, msgspec.ValidationError) as exc:
            raise ValueError(f"{path}:{line_no}: {exc}") from None
    return out

"""`strait datasets compare`: a route's live answers against a candidate model's, from the capture store.

Two comparisons, each printed when it has records:

- shadow: each live record with the candidate's shadow copy of it (`shadow_of`, gateway.capture.shadow_sink).
  Both sides are the same requests, so latency, cost and length compare like for like, and agreement is
  measured: `exact` is the share of pairs whose answers are equal after normalisation (the text
  Unicode NFKC, case folded, punctuation as spaces, whitespace runs collapsed and trimmed; each tool call
  as `name(arguments)` with the arguments' JSON keys sorted), and `similarity` the mean Jaccard index of
  the two answers' sets of word tokens (`\\w+` of the normalised answers; 1.0 when both are empty).
  Feedback exists only on the live side (nobody saw the copy). Copies that failed or timed out are
  counted, not paired.
- canary: live records of the route answered by the candidate (its canary share) against those answered
  by any other model: different requests (sticky per conversation), so no agreement, but feedback.

Per side: records, completed, errors, latency p50/p95 (ms, the gateway's whole-answer latency for live
records, the copy's call for shadow ones), cost (USD at the deployment's input, output and per-request
price in the policy in force, exact rather than rounded per request as the ledger is; records of a
deployment no longer priced there counted `unpriced`), mean answer length (characters) and
completion tokens, and feedback: rated records, mean rating (weight-averaged `score`/`boolean`, as
export), share rated positive, corrections, regenerates, cache bad hits.

Memory: a page of the store, the latencies (8 bytes a record) and the live answers still waiting for
their copy (a copy's record sits next to its live one in time; at most MAX_WAITING are kept, the oldest
counted unpaired past it).
"""

from __future__ import annotations

import re
import unicodedata
from array import array
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec

from gateway.capture.export import correction, rating
from gateway.capture.records import Captured, CapturedAnswer
from gateway.capture.store import CaptureQuery, CaptureStore, scan
from gateway.policy.model import PolicySet, Price
from gateway.policy.rates import FEMTO_PER_USD, rate_card

MAX_WAITING = 100_000
_SPACE = re.compile(r"\s+")
_WORD = re.compile(r"\w+")


class _PunctuationAsSpace(dict[int, str]):
    """A str.translate table, filled as code points are met: punctuation (Unicode category P*) to a space,
    anything else to itself. Translating in C is ~15x faster than a per-character loop (the comparison of
    a day's answers spent 87 % of its time there); at most MAX_TABLE code points are kept."""

    def __missing__(self, code: int) -> str:
        ch = chr(code)
        out = " " if unicodedata.category(ch).startswith("P") else ch
        if len(self) < MAX_TABLE:
            self[code] = out
        return out


MAX_TABLE = 65_536
_PUNCTUATION = _PunctuationAsSpace()


def _text(text: str) -> str:
    folded = unicodedata.normalize("NFKC", text).casefold()
    return _SPACE.sub(" ", folded.translate(_PUNCTUATION)).strip()


def normalise(answer: CapturedAnswer | None) -> str:
    """The answer as compared for agreement (see the module's docstring)."""
    if answer is None:
        return ""
    parts = [_text(answer.content or "")]
    for call in answer.tool_calls:
        try:
            arguments = msgspec.json.encode(msgspec.json.decode(call.arguments or "{}"), order="sorted").decode()
        except msgspec.DecodeError:
            arguments = call.arguments
        parts.append(f"{call.name}({arguments})")
    return "\n".join(p for p in parts if p)


def similarity(a: str, b: str) -> float:
    """Jaccard index of the word-token sets of two normalised answers."""
    x, y = set(_WORD.findall(a)), set(_WORD.findall(b))
    if not x and not y:
        return 1.0
    return len(x & y) / len(x | y)


def percentile(values: array[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


@dataclass(slots=True)
class Side:
    records: int = 0
    completed: int = 0
    errors: int = 0
    latency_ms: array[float] = field(default_factory=lambda: array("d"))
    # Exact, in femto-USD (the ledger rounds each request to a micro-USD; cheap answers cost less than one).
    cost_femto_usd: int = 0
    unpriced: int = 0
    chars: int = 0
    completion_tokens: int = 0
    rated: int = 0
    rating_sum: float = 0.0
    positive: int = 0
    corrections: int = 0
    regenerates: int = 0
    cache_bad_hits: int = 0

    def add(self, item: Captured, prices: Mapping[str, Price]) -> None:
        r = item.record
        self.records += 1
        if r.outcome != "completed" or not 200 <= r.status < 300:
            self.errors += 1
            return
        self.completed += 1
        self.latency_ms.append(r.latency_ms)
        if r.answer is not None and r.answer.content:
            self.chars += len(r.answer.content)
        self.completion_tokens += r.completion_tokens or 0
        price = prices.get(r.deployment or "")
        if price is None:
            self.unpriced += 1
        elif r.cache is None:  # a cache hit cost no upstream tokens
            card = rate_card(price)
            prompt, completion = r.prompt_tokens or 0, r.completion_tokens or 0
            if prompt > 0 or completion > 0:
                self.cost_femto_usd += prompt * card.input + completion * card.output + card.per_request
        score = rating(item.feedback)
        if score is not None:
            self.rated += 1
            self.rating_sum += score
            self.positive += score > 0
        self.corrections += correction(item.feedback) is not None
        self.regenerates += any(f.kind == "regenerate" for f in item.feedback)
        self.cache_bad_hits += any(f.kind == "cache_bad_hit" for f in item.feedback)

    def summary(self) -> dict[str, Any]:
        n = self.completed
        return {
            "records": self.records,
            "completed": n,
            "errors": self.errors,
            "latency_p50_ms": percentile(self.latency_ms, 50),
            "latency_p95_ms": percentile(self.latency_ms, 95),
            "cost_usd": self.cost_femto_usd / FEMTO_PER_USD,
            "cost_per_1k_usd": self.cost_femto_usd * 1000 / FEMTO_PER_USD / n if n else None,
            "unpriced": self.unpriced,
            "mean_chars": round(self.chars / n, 1) if n else None,
            "mean_completion_tokens": round(self.completion_tokens / n, 1) if n else None,
            "rated": self.rated,
            "mean_rating": round(self.rating_sum / self.rated, 3) if self.rated else None,
            "positive_share": round(self.positive / self.rated, 3) if self.rated else None,
            "corrections": self.corrections,
            "regenerates": self.regenerates,
            "cache_bad_hits": self.cache_bad_hits,
        }


@dataclass(slots=True)
class Comparison:
    route: str
    candidate: str
    shadow_live: Side = field(default_factory=Side)
    shadow_candidate: Side = field(default_factory=Side)
    pairs: int = 0
    exact: int = 0
    similarity_sum: float = 0.0
    unpaired_live: int = 0
    unpaired_copies: int = 0
    canary_candidate: Side = field(default_factory=Side)
    canary_others: Side = field(default_factory=Side)

    def as_dict(self) -> dict[str, Any]:
        return {
            "route": self.route,
            "candidate": self.candidate,
            "shadow": {
                "pairs": self.pairs,
                "agreement_exact": round(self.exact / self.pairs, 4) if self.pairs else None,
                "agreement_similarity": round(self.similarity_sum / self.pairs, 4) if self.pairs else None,
                "agreement_method": "exact: normalised exact match; similarity: mean word-set Jaccard",
                "live_without_copy": self.unpaired_live,
                "copies_without_live": self.unpaired_copies,
                "live": self.shadow_live.summary(),
                "candidate": self.shadow_candidate.summary(),
            },
            "canary": {"candidate": self.canary_candidate.summary(), "others": self.canary_others.summary()},
        }


def prices_of(policy: PolicySet) -> dict[str, Price]:
    """Each deployment's price by its label (`model@backend`, as records name it)."""
    return {f"{m.name}@{d.backend}": d.price for m in policy.models for d in m.deployments}


async def compare(
    store: CaptureStore,
    route: str,
    candidate: str,
    prices: Mapping[str, Price],
    *,
    since_ms: int | None = None,
    until_ms: int | None = None,
    tenant: str | None = None,
) -> Comparison:
    out = Comparison(route, candidate)
    # Live records awaiting their copy, and copies awaiting their live record, by live request id.
    live_waiting: OrderedDict[str, Captured] = OrderedDict()
    copy_waiting: OrderedDict[str, Captured] = OrderedDict()
    query = CaptureQuery(route=route, since_ms=since_ms, until_ms=until_ms, tenant=tenant)
    async for item in scan(store, query):
        r = item.record
        if r.shadow_of is not None:
            if r.model != candidate:
                continue
            live = live_waiting.pop(r.shadow_of, None)
            if live is None:
                _bounded_put(copy_waiting, r.shadow_of, item)
            else:
                _pair(out, live, item, prices)
            continue
        if r.model == candidate:
            out.canary_candidate.add(item, prices)
        else:
            out.canary_others.add(item, prices)
        found = copy_waiting.pop(r.request_id, None)
        if found is not None:
            _pair(out, item, found, prices)
        elif _bounded_put(live_waiting, r.request_id, item):
            out.unpaired_live += 1
    out.unpaired_live += len(live_waiting)
    out.unpaired_copies += len(copy_waiting)
    return out


def _bounded_put(waiting: OrderedDict[str, Captured], key: str, item: Captured) -> bool:
    """Keep `item` waiting; True when the oldest had to go (counted unpaired)."""
    waiting[key] = item
    if len(waiting) > MAX_WAITING:
        waiting.popitem(last=False)
        return True
    return False


def _pair(out: Comparison, live: Captured, copy: Captured, prices: Mapping[str, Price]) -> None:
    out.shadow_live.add(live, prices)
    out.shadow_candidate.add(copy, prices)
    if copy.record.outcome != "completed" or live.record.outcome != "completed":
        return
    out.pairs += 1
    a, b = normalise(live.record.answer), normalise(copy.record.answer)
    out.exact += a == b
    out.similarity_sum += similarity(a, b)


# The per-side figures as the CLI and the console show them: (label, key of Side.summary, unit).
ROWS: tuple[tuple[str, str, str], ...] = (
    ("records", "records", ""),
    ("completed", "completed", ""),
    ("errors", "errors", ""),
    ("latency p50", "latency_p50_ms", " ms"),
    ("latency p95", "latency_p95_ms", " ms"),
    ("cost", "cost_usd", " USD"),
    ("cost / 1k answers", "cost_per_1k_usd", " USD"),
    ("mean length", "mean_chars", " chars"),
    ("mean completion", "mean_completion_tokens", " tok"),
    ("rated", "rated", ""),
    ("mean rating", "mean_rating", ""),
    ("rated positive", "positive_share", ""),
    ("corrections", "corrections", ""),
    ("regenerates", "regenerates", ""),
    ("cache bad hits", "cache_bad_hits", ""),
)


def fmt(value: object, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}{unit}"
    return f"{value}{unit}"


def render(c: Comparison) -> list[str]:
    d = c.as_dict()
    lines = [f"route {c.route}: live vs candidate {c.candidate}"]

    def table(title: str, left: str, a: dict[str, Any], right: str, b: dict[str, Any]) -> None:
        lines.append(f"\n{title}")
        lines.append(f"  {'':<20}{left:>16}{right:>16}")
        for label, key, unit in ROWS:
            lines.append(f"  {label:<20}{fmt(a[key], unit):>16}{fmt(b[key], unit):>16}")

    shadow = d["shadow"]
    if shadow["live"]["records"] or shadow["candidate"]["records"]:
        table("shadow (the same requests)", "live", shadow["live"], "candidate", shadow["candidate"])
        lines.append(f"  {'pairs':<20}{shadow['pairs']:>16}")
        lines.append(f"  {'agreement exact':<20}{fmt(shadow['agreement_exact']):>16}   (normalised exact match)")
        lines.append(f"  {'agreement similar':<20}{fmt(shadow['agreement_similarity']):>16}   (mean word-set Jaccard)")
        lines.append(
            f"  live answers without a copy: {shadow['live_without_copy']}, copies without their live record: "
            f"{shadow['copies_without_live']}"
        )
    else:
        lines.append("\nshadow: no copies of this route by the candidate in the window")
    canary = d["canary"]
    if canary["candidate"]["records"]:
        table("canary (live traffic)", "candidate", canary["candidate"], "others", canary["others"])
    else:
        lines.append("canary: no live answers from the candidate in the window")
    return lines

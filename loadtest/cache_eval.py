"""The cache's false-hit evaluation on data nobody here wrote: fow-cache's labelled pairs.

    python -m loadtest.cache_eval [--model minilm-l6-int8] [--no-docs] [--no-perf]

Runs the real cache code on fow-cache==0.1.0 (dev extra; data CC BY 4.0): for each pair, the cached side
`a` and the new side `b` become canonical chat requests, both go through `scope_of` (same tenant, route,
deployment and parameters; the conversations with all their prior turns), the exact tier serves when the
exact keys match, and the semantic tier, only inside one namespace, embeds both last user messages with
the chosen local embedder and calls `match.decide` (cosine threshold, then the veto). A served trap is a
false hit; a served should-hit pair is a hit.

Prints, and writes between the markers of docs/cache.md (unless --no-docs): per threshold, cosine only vs
cosine + veto, false-hit rate (FHR), recall and precision, per category; the best recall at FHR <= 1/2/5 %;
each veto rule alone; the exact tier's normalisation variants; the embedder's latency and RSS (--no-perf
skips those). Single-pair decisions (one cached question per namespace) as fow-cache's own harness does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gateway.cache.embedders import DEFAULT_LOCAL_MODEL, DEFAULT_THRESHOLD, EmbedderSpec, open_embedder, tag_of
from gateway.cache.match import decide
from gateway.cache.scope import Scope, normalise, scope_of
from gateway.cache.veto import DEFAULT_RULES, RULES
from gateway.canonical import Message, Request, Text

DOCS = Path(__file__).resolve().parents[1] / "docs" / "cache.md"
BEGIN, END = "<!-- cache_eval:begin -->", "<!-- cache_eval:end -->"
THRESHOLDS = tuple(round(0.80 + 0.01 * i, 2) for i in range(20))
FHR_BUDGETS = (0.01, 0.02, 0.05)
QUESTION_HITS = ("near_repeat", "paraphrase")
QUESTION_TRAPS = ("negation", "entity_swap", "number_date", "scope")
CONV_HITS = ("irrelevant_history", "same_context_reworded", "same_context_extra_chatter")
CONV_TRAPS = ("context_swap", "detail_swap", "intent_flip")


@dataclass(frozen=True)
class Pair:
    id: str
    dataset: str  # "questions" | "conversations"
    category: str
    same_answer: bool
    a: Scope  # the cached request's scope
    b: Scope  # the new request's


@dataclass(frozen=True)
class Variant:
    name: str
    rules: tuple[str, ...]


COSINE_ONLY = Variant("cosine only", ())
WITH_VETO = Variant("cosine + veto", DEFAULT_RULES)


def chat_request(messages: Iterable[dict[str, str]]) -> Request:
    return Request(
        operation="chat",
        model="chat",
        messages=tuple(Message(role=m["role"], content=(Text(text=m["content"]),)) for m in messages),  # type: ignore[arg-type]
        temperature=0.0,
    )


def load_pairs(embedder_tag: str) -> list[Pair]:
    from fow_cache.data import load_conversations, load_questions

    def scoped(messages: Iterable[dict[str, str]]) -> Scope:
        return scope_of(chat_request(messages), tenant="eval", route="chat", deployment="d", embedder_tag=embedder_tag)

    pairs = [
        Pair(
            q["id"],
            "questions",
            q["category"],
            q["same_answer"],
            scoped([{"role": "user", "content": q["a"]}]),
            scoped([{"role": "user", "content": q["b"]}]),
        )
        for q in load_questions()
    ]
    pairs += [
        Pair(c["id"], "conversations", c["subtype"], c["same_answer"], scoped(c["a"]), scoped(c["b"]))
        for c in load_conversations()
    ]
    return pairs


async def embed_all(embedder: Any, pairs: Sequence[Pair]) -> dict[str, np.ndarray]:
    """Vectors of every query the semantic tier would embed (pairs that share a namespace only)."""
    texts = sorted(
        {s.query for p in pairs if p.a.namespace == p.b.namespace for s in (p.a, p.b) if s.query is not None}
    )
    vectors = await embedder.embed(texts)
    return dict(zip(texts, vectors, strict=True))


def served(pair: Pair, vectors: dict[str, np.ndarray], threshold: float, rules: tuple[str, ...]) -> tuple[bool, str]:
    """Whether the cache serves `a`'s answer for `b`, and by which tier ("exact", "semantic", "" for no)."""
    a, b = pair.a, pair.b
    if a.namespace != b.namespace:
        return False, ""
    if a.exact_key == b.exact_key:
        return True, "exact"
    if a.query is None or b.query is None:
        return False, ""
    m = decide(b.query, vectors[b.query], [a.query], vectors[a.query][None, :], threshold, rules=rules)
    return (m is not None and m.index is not None), "semantic"


@dataclass(frozen=True)
class Rates:
    recall: float  # served share of should-hit pairs
    fhr: float  # served share of traps
    precision: float  # correct share of served
    by_category: dict[str, float]  # served share per category
    hits: int
    false_hits: int


def rates(pairs: Sequence[Pair], outcome: Sequence[bool]) -> Rates:
    should = [o for p, o in zip(pairs, outcome, strict=True) if p.same_answer]
    traps = [o for p, o in zip(pairs, outcome, strict=True) if not p.same_answer]
    hits, false_hits = sum(should), sum(traps)
    cats: dict[str, list[bool]] = {}
    for p, o in zip(pairs, outcome, strict=True):
        cats.setdefault(p.category, []).append(o)
    return Rates(
        recall=hits / len(should) if should else 0.0,
        fhr=false_hits / len(traps) if traps else 0.0,
        precision=hits / (hits + false_hits) if hits + false_hits else 1.0,
        by_category={c: sum(v) / len(v) for c, v in cats.items()},
        hits=hits,
        false_hits=false_hits,
    )


def evaluate(
    pairs: Sequence[Pair], vectors: dict[str, np.ndarray], threshold: float, rules: tuple[str, ...]
) -> dict[str, Rates]:
    """Rates per dataset ("questions", "conversations") at one threshold and rule set."""
    out: dict[str, Rates] = {}
    for dataset in ("questions", "conversations"):
        sel = [p for p in pairs if p.dataset == dataset]
        out[dataset] = rates(sel, [served(p, vectors, threshold, rules)[0] for p in sel])
    return out


def best_recall(sweep: dict[float, Rates], budget: float) -> tuple[float, Rates] | None:
    """(threshold, rates) with the highest recall at FHR <= budget (ties: the higher threshold)."""
    ok = [(t, r) for t, r in sweep.items() if r.fhr <= budget + 1e-12]
    return max(ok, key=lambda tr: (tr[1].recall, tr[0])) if ok else None


def fine_sweep(pairs: Sequence[Pair], vectors: dict[str, np.ndarray], rules: tuple[str, ...]) -> dict[float, Rates]:
    """Question rates at every 0.005 from 0.80 to 1.0 (for the best-recall-at-budget table)."""
    qs = [p for p in pairs if p.dataset == "questions"]
    grid = [round(0.80 + 0.005 * i, 3) for i in range(41)]
    return {t: rates(qs, [served(p, vectors, t, rules)[0] for p in qs]) for t in grid}


def crowded(
    pairs: Sequence[Pair], vectors: dict[str, np.ndarray], threshold: float, rules: tuple[str, ...]
) -> tuple[float, float, float]:
    """One namespace holding every cached question at once (the 600 `a` sides, deduplicated): each `b` is
    looked up against all of them. An entry asking exactly `b` (some traps' `b` is another pair's `a`) or the
    pair's own `a` of a should-hit pair is a right answer; any other served entry is a wrong one, even when
    it asks the same thing in other words (pessimistic). Returns (recall: should-hit `b` rightly served;
    wrong answers per should-hit `b`; wrong answers per trap `b`)."""
    qs = [p for p in pairs if p.dataset == "questions" and p.a.query is not None and p.b.query is not None]
    texts = sorted({p.a.query for p in qs if p.a.query is not None})
    matrix = np.stack([vectors[t] for t in texts]) if texts else np.zeros((0, 1), np.float32)
    right = wrong_should = wrong_trap = 0
    for p in qs:
        assert p.b.query is not None
        m = decide(p.b.query, vectors[p.b.query], texts, matrix, threshold, rules=rules)
        if m is None or m.index is None:
            continue
        entry = texts[m.index]
        if normalise(entry) == normalise(p.b.query) or (p.same_answer and entry == p.a.query):
            right += p.same_answer
        elif p.same_answer:
            wrong_should += 1
        else:
            wrong_trap += 1
    n_should = sum(p.same_answer for p in qs)
    n_trap = len(qs) - n_should
    return right / n_should, wrong_should / n_should, wrong_trap / n_trap


# -- the exact tier's normalisation, measured ----------------------------------------------------------

_PUNCT = re.compile(r"[^\w\s]")


def exact_variants(pairs: Sequence[Pair]) -> list[tuple[str, int, int]]:
    """(variant, exact hits on should-hit question pairs, exact hits on trap question pairs)."""
    variants: dict[str, Callable[[str], str]] = {
        "byte-identical": lambda s: s,
        "NFC + white space (chosen)": normalise,
        "+ case folded": lambda s: normalise(s).casefold(),
        "+ case folded, punctuation dropped": lambda s: " ".join(_PUNCT.sub(" ", normalise(s).casefold()).split()),
    }
    qs = [p for p in pairs if p.dataset == "questions" and p.a.query is not None and p.b.query is not None]
    out = []
    for name, f in variants.items():
        same = [f(p.a.query or "") == f(p.b.query or "") for p in qs]
        out.append(
            (
                name,
                sum(s for s, p in zip(same, qs, strict=True) if p.same_answer),
                sum(s for s, p in zip(same, qs, strict=True) if not p.same_answer),
            )
        )
    return out


# -- latency and memory of the embedder -----------------------------------------------------------------

SHORT_PROMPT = "How do I change the email address on my account?"


async def latency(embedder: Any, n: int = 300) -> tuple[float, float]:
    """p50 and p99 (ms) of embedding one short prompt at a time, through the executor (what a lookup pays)."""
    await embedder.embed([SHORT_PROMPT])
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        await embedder.embed([f"{SHORT_PROMPT} {i}"])
        times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    return statistics.median(times), times[min(len(times) - 1, int(len(times) * 0.99))]


_RSS_PROBE = """
import asyncio, json, resource
def rss():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS:'):
            return int(line.split()[1]) / 1024
import numpy
base = rss()
from gateway.cache.embedders import EmbedderSpec, open_embedder
async def main():
    e = open_embedder(EmbedderSpec(name='probe', model=%r))
    await e.embed(['warm up'] * 32)
    await e.aclose()
asyncio.run(main())
print(json.dumps({'base_mb': base, 'rss_mb': rss(), 'peak_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def rss(model: str) -> dict[str, float]:
    """RSS of a fresh interpreter with numpy, then with the model loaded and a batch of 32 embedded."""
    out = subprocess.run([sys.executable, "-c", _RSS_PROBE % model], capture_output=True, text=True, check=True)
    result: dict[str, float] = json.loads(out.stdout)
    return result


# -- report -------------------------------------------------------------------------------------------


def pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def report(
    pairs: Sequence[Pair],
    vectors: dict[str, np.ndarray],
    *,
    model: str,
    tag: str,
    threshold: float,
    perf: dict[str, float] | None,
) -> str:
    lines: list[str] = []
    w = lines.append
    n_q = sum(p.dataset == "questions" for p in pairs)
    n_c = len(pairs) - n_q
    w(f"Embedder `{model}` (`{tag}`), default threshold **{threshold}**, veto rules {', '.join(DEFAULT_RULES)}. ")
    w(
        f"{n_q} question pairs, {n_c} conversation pairs (fow-cache 0.1.0). Generated by `python -m loadtest.cache_eval`."
    )
    w("")
    default = {v.name: evaluate(pairs, vectors, threshold, v.rules) for v in (COSINE_ONLY, WITH_VETO)}
    w("### At the default threshold")
    w("")
    w("| data | variant | recall | false-hit rate | precision | hits | false hits |")
    w("|---|---|---|---|---|---|---|")
    for dataset in ("questions", "conversations"):
        for name, res in default.items():
            r = res[dataset]
            w(
                f"| {dataset} | {name} | {pct(r.recall)} | {pct(r.fhr)} | {pct(r.precision)} | {r.hits} | {r.false_hits} |"
            )
    w("")
    w("Served share per category at the default threshold (should-hit categories: recall; traps: false-hit rate):")
    w("")
    cats = QUESTION_HITS + QUESTION_TRAPS + CONV_HITS + CONV_TRAPS
    w("| variant | " + " | ".join(cats) + " |")
    w("|---|" + "---|" * len(cats))
    for name, res in default.items():
        merged = {**res["questions"].by_category, **res["conversations"].by_category}
        w(f"| {name} | " + " | ".join(f"{100 * merged.get(c, 0.0):.0f}" for c in cats) + " |")
    w("")
    w("### Questions, per threshold")
    w("")
    w("Each cell: recall / FHR / precision (%). Exact-tier hits count as served at every threshold.")
    w("")
    w("| cos ≥ | cosine only | cosine + veto | " + " | ".join(f"veto: {c}" for c in QUESTION_TRAPS) + " |")
    w("|---|---|---|" + "---|" * len(QUESTION_TRAPS))
    for t in THRESHOLDS:
        rows = {v.name: evaluate(pairs, vectors, t, v.rules)["questions"] for v in (COSINE_ONLY, WITH_VETO)}
        cells = [f"{100 * r.recall:.1f} / {100 * r.fhr:.1f} / {100 * r.precision:.1f}" for r in rows.values()]
        per_trap = [f"{100 * rows[WITH_VETO.name].by_category[c]:.0f}" for c in QUESTION_TRAPS]
        w(f"| {t:.2f} | " + " | ".join(cells) + " | " + " | ".join(per_trap) + " |")
    w("")
    w("### Best recall at a false-hit budget (questions; thresholds every 0.005)")
    w("")
    w("| variant | " + " | ".join(f"FHR ≤ {100 * b:.0f} %" for b in FHR_BUDGETS) + " |")
    w("|---|" + "---|" * len(FHR_BUDGETS))
    variants = [COSINE_ONLY, WITH_VETO] + [Variant(f"cosine + {r} only", (r,)) for r in RULES]
    for v in variants:
        sweep = fine_sweep(pairs, vectors, v.rules)
        cells = []
        for b in FHR_BUDGETS:
            best = best_recall(sweep, b)
            cells.append("—" if best is None else f"{best[0]:.3f}: {pct(best[1].recall)} (FHR {pct(best[1].fhr)})")
        w(f"| {v.name} | " + " | ".join(cells) + " |")
    w("")
    w("### One crowded namespace (all cached questions at once), questions")
    w("")
    w("Each `b` looked up against every cached `a` (semantic tier only). Right: its own `a` (should-hit pairs)")
    w("or an entry asking exactly `b`; wrong: any other entry, even a paraphrase of `b` (pessimistic).")
    w("")
    w("| cos ≥ | cosine only: recall / wrong on should-hits / wrong on traps (%) | cosine + veto: the same |")
    w("|---|---|---|")
    for t in (0.85, 0.88, 0.90, threshold, 0.94, 0.96):
        cells = []
        for v in (COSINE_ONLY, WITH_VETO):
            right, wrong_should, wrong_trap = crowded(pairs, vectors, t, v.rules)
            cells.append(f"{100 * right:.1f} / {100 * wrong_should:.1f} / {100 * wrong_trap:.1f}")
        w(f"| {t:.2f} | " + " | ".join(cells) + " |")
    w("")
    w("### Exact tier: normalisation of the last user message, measured")
    w("")
    w("| normalisation | exact hits, should-hit pairs (of 300) | exact hits, traps (of 300) |")
    w("|---|---|---|")
    for name, good, bad in exact_variants(pairs):
        w(f"| {name} | {good} | {bad} |")
    w("")
    conv = [p for p in pairs if p.dataset == "conversations"]
    shared = sum(p.a.namespace == p.b.namespace for p in conv)
    w(f"Conversation pairs sharing a namespace (identical prior turns and parameters): {shared} of {len(conv)}.")
    if perf is not None:
        w("")
        w("### Embedder cost (one intra-op thread, through the executor)")
        w("")
        w("| short prompt p50 | p99 | RSS: python + numpy | RSS with the model loaded | peak RSS |")
        w("|---|---|---|---|---|")
        w(
            f"| {perf['p50_ms']:.2f} ms | {perf['p99_ms']:.2f} ms | {perf['base_mb']:.0f} MB | "
            f"{perf['rss_mb']:.0f} MB | {perf['peak_mb']:.0f} MB |"
        )
    return "\n".join(lines)


def write_docs(body: str) -> None:
    DOCS.parent.mkdir(parents=True, exist_ok=True)
    text = DOCS.read_text() if DOCS.exists() else f"# Cache\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        text += f"\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    DOCS.write_text(f"{head}{BEGIN}\n{body}\n{END}{tail}")


async def run(model: str, threshold: float, *, docs: bool, perf: bool) -> str:
    embedder = open_embedder(EmbedderSpec(name="eval", model=model))
    try:
        tag = tag_of(embedder)
        pairs = load_pairs(tag)
        t0 = time.perf_counter()
        vectors = await embed_all(embedder, pairs)
        print(f"embedded {len(vectors)} texts in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        measured: dict[str, float] | None = None
        if perf:
            p50, p99 = await latency(embedder)
            measured = {"p50_ms": p50, "p99_ms": p99, **rss(model)}
    finally:
        await embedder.aclose()
    body = report(pairs, vectors, model=model, tag=tag, threshold=threshold, perf=measured)
    if docs:
        write_docs(body)
    return body


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_LOCAL_MODEL)
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD)
    parser.add_argument("--no-docs", action="store_true", help="print only; leave docs/cache.md alone")
    parser.add_argument("--no-perf", action="store_true", help="skip the latency and RSS measurements")
    args = parser.parse_args(argv)
    print(asyncio.run(run(args.model, args.threshold, docs=not args.no_docs, perf=not args.no_perf)))


if __name__ == "__main__":
    main()

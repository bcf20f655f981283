"""`strait datasets export`: captured records as a fine-tuning file and its manifest, consent- and
licence-aware (gateway.capture.eligibility), streamed (a page of the store and one line in memory; the
preference format also keeps, per prompt with ratings, its best and worst rated request ids).

Each record of the route in the window is checked in this order; the first reason that applies excludes
it and is counted: `shadow_copy` (a candidate's answer nobody saw), `no_training_consent` /
`training_consent_withdrawn`, `licence_unknown` / `licence_forbids_target`, `no_answer` (failed, or its
answer not captured), `truncated`, `no_prompt` (prompts not captured, or a completion), `cache_hit` (a
copy of an answer stored once already) / `cache_bad_hit` (reported wrong), `empty_answer`, then per format:

- chat formats: `corrected` (a person corrected the answer: with `--with-corrections` the correction is
  written instead), `no_feedback` / `below_min_feedback` (with `--min-feedback X`: a record's rating,
  the weight-averaged `score` and `boolean` feedback (a boolean counts 1 / -1), must be at least X; a
  correction written with `--with-corrections` needs none), and the format's own (`not_user_first`,
  `tool_arguments_not_object` for anthropic-jsonl).
- preference-jsonl: a pair per correction (chosen: the correction, rejected: the answer), and a pair per
  prompt (the same messages and tools, same tenant) with rated answers that differ: chosen the best
  rated, rejected the worst, when their ratings differ (and, with `--min-feedback X`, the chosen's is at
  least X). Records giving no pair: `no_pair`.

The manifest (manifest.json beside the data) holds the filters, counts (scanned, written, excluded by
reason, pairs by source), the policy versions and licences of what was written, the models and tenants,
and each file's name, lines, bytes and sha256. Files are written under a temporary name and renamed. One
export per directory (another export's manifest there is refused; the same route and format rewritten).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import msgspec

from gateway.capture.eligibility import PolicyView, consent_problem, licence_problem
from gateway.capture.formats import Answer, Format, Unencodable, anthropic, openai_chat, preference
from gateway.capture.records import Captured, CaptureRecord, Feedback
from gateway.capture.store import CaptureQuery, CaptureStore, scan


class ExportOptions(msgspec.Struct, frozen=True, kw_only=True):
    route: str
    format: Format
    target: str
    since_ms: int
    until_ms: int | None = None
    tenant: str | None = None
    min_feedback: float | None = None
    with_corrections: bool = False


@dataclass(slots=True)
class ExportReport:
    path: Path
    manifest_path: Path
    written: int = 0
    scanned: int = 0
    excluded: Counter[str] = field(default_factory=Counter)
    pairs: Counter[str] = field(default_factory=Counter)
    manifest: dict[str, Any] = field(default_factory=dict)

    def lines(self) -> list[str]:
        out = [f"scanned {self.scanned} records, wrote {self.written} lines to {self.path}"]
        if self.pairs:
            out.append("pairs: " + ", ".join(f"{k} {v}" for k, v in sorted(self.pairs.items())))
        total = sum(self.excluded.values())
        out.append(f"excluded {total}" + (":" if total else ""))
        out += [f"  {reason:<28} {n}" for reason, n in sorted(self.excluded.items(), key=lambda kv: (-kv[1], kv[0]))]
        out.append(f"manifest: {self.manifest_path}")
        return out


def rating(feedback: tuple[Feedback, ...]) -> float | None:
    """The weight-averaged explicit score (`score` as given, `boolean` as 1 / -1); None when unrated."""
    total = weights = 0.0
    for f in feedback:
        if f.kind in ("score", "boolean") and f.score is not None and f.weight > 0:
            total += f.score * f.weight
            weights += f.weight
    return total / weights if weights else None


def correction(feedback: tuple[Feedback, ...]) -> str | None:
    """The latest correction given, if any."""
    found = [f.correction for f in feedback if f.kind == "correction" and f.correction]
    return found[-1] if found else None


def _base_problem(item: Captured, target_family: str, view: PolicyView) -> str | None:
    r = item.record
    if r.shadow_of is not None:
        return "shadow_copy"
    problem = consent_problem(r, view) or licence_problem(r, target_family, view)
    if problem is not None:
        return problem
    if r.answer is None or r.outcome != "completed" or not 200 <= r.status < 300:
        return "no_answer"
    if r.answer.truncated:
        return "truncated"
    if r.request is None or not r.request.messages:
        return "no_prompt"
    if any(f.kind == "cache_bad_hit" for f in item.feedback):
        return "cache_bad_hit"
    if r.cache is not None:
        return "cache_hit"
    if not r.answer.content and not r.answer.tool_calls:
        return "empty_answer"
    return None


def _answer(record: CaptureRecord) -> Answer:
    assert record.answer is not None
    return Answer(content=record.answer.content, tool_calls=record.answer.tool_calls)


def _prompt_key(record: CaptureRecord) -> bytes:
    assert record.request is not None
    text = msgspec.json.encode([record.tenant, record.request.messages, record.request.tools])
    return hashlib.blake2b(text, digest_size=16).digest()


class _Sink:
    """The data file: lines written, counted and hashed as they go."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tmp = path.with_name(path.name + ".tmp")
        self.file: IO[bytes] = self.tmp.open("wb")
        self.hash = hashlib.sha256()
        self.lines = 0
        self.bytes = 0

    def write(self, line: dict[str, Any]) -> None:
        data = msgspec.json.encode(line) + b"\n"
        self.file.write(data)
        self.hash.update(data)
        self.lines += 1
        self.bytes += len(data)

    def close(self) -> dict[str, Any]:
        self.file.close()
        os.replace(self.tmp, self.path)
        return {"name": self.path.name, "lines": self.lines, "bytes": self.bytes, "sha256": self.hash.hexdigest()}


@dataclass(slots=True)
class _Side:
    rating: float
    tenant: str
    request_id: str
    # Not in a correction's pair: counted `no_pair` unless a rating pair takes it.
    pending: bool


@dataclass(slots=True)
class _Provenance:
    policy_versions: Counter[str] = field(default_factory=Counter)
    licences: dict[str, dict[str, Any]] = field(default_factory=dict)
    models: Counter[str] = field(default_factory=Counter)
    tenants: Counter[str] = field(default_factory=Counter)

    def add(self, r: CaptureRecord) -> None:
        self.policy_versions[r.policy_version] += 1
        self.models[r.model or "?"] += 1
        self.tenants[r.tenant] += 1
        name = r.licence or "(undeclared)"
        entry = self.licences.setdefault(name, {"outputs_train": r.licence_outputs_train, "records": 0})
        entry["records"] += 1


class ExportError(Exception):
    """An export that cannot start (its message says why)."""


def _check_out_dir(out_dir: Path, data_name: str) -> None:
    """One export per directory: a manifest of another export there would end up describing the wrong
    files (an export of the same route and format may be written again)."""
    manifest = out_dir / "manifest.json"
    if not manifest.exists():
        return
    try:
        names = [f["name"] for f in msgspec.json.decode(manifest.read_bytes())["files"]]
    except (OSError, msgspec.DecodeError, KeyError, TypeError):
        names = []
    if names != [data_name]:
        raise ExportError(f"{out_dir} holds another export (its manifest.json); write this one to another --out")


async def export(store: CaptureStore, options: ExportOptions, view: PolicyView, out_dir: Path) -> ExportReport:
    path = out_dir / f"{options.route}.{options.format}.jsonl"
    _check_out_dir(out_dir, path.name)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = ExportReport(path=path, manifest_path=out_dir / "manifest.json")
    target_family = view.family(options.target)
    sink = _Sink(path)
    seen = _Provenance()
    best: dict[bytes, _Side] = {}
    worst: dict[bytes, _Side] = {}
    rated: Counter[bytes] = Counter()
    query = CaptureQuery(
        route=options.route, tenant=options.tenant, since_ms=options.since_ms, until_ms=options.until_ms
    )
    try:
        async for item in scan(store, query):
            report.scanned += 1
            problem = _base_problem(item, target_family, view)
            if problem is None:
                if options.format == "preference-jsonl":
                    problem = _preference(item, options, sink, seen, report, best, worst, rated)
                else:
                    problem = _chat(item, options, sink, seen)
            if problem is not None:
                report.excluded[problem] += 1
        if options.format == "preference-jsonl":
            await _rating_pairs(store, options, sink, seen, report, best, worst, rated)
    except BaseException:
        sink.file.close()
        sink.tmp.unlink(missing_ok=True)
        raise
    files = [sink.close()]
    report.written = sink.lines
    report.manifest = {
        "format": options.format,
        "target": options.target,
        "target_family": target_family,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "store": store.kind,
        "filters": {
            "route": options.route,
            "since": _iso(options.since_ms),
            "until": _iso(options.until_ms) if options.until_ms is not None else None,
            "tenant": options.tenant,
            "min_feedback": options.min_feedback,
            "with_corrections": options.with_corrections,
        },
        "counts": {
            "scanned": report.scanned,
            "written": report.written,
            "excluded": dict(sorted(report.excluded.items())),
            "pairs": dict(sorted(report.pairs.items())),
        },
        "policy_in_force": view.version,
        "policy_versions": dict(sorted(seen.policy_versions.items())),
        "licences": dict(sorted(seen.licences.items())),
        "models": dict(sorted(seen.models.items())),
        "tenants": dict(sorted(seen.tenants.items())),
        "files": files,
    }
    tmp = report.manifest_path.with_name("manifest.json.tmp")
    tmp.write_bytes(msgspec.json.format(msgspec.json.encode(report.manifest), indent=2) + b"\n")
    os.replace(tmp, report.manifest_path)
    return report


def _iso(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))


def _chat(item: Captured, options: ExportOptions, sink: _Sink, seen: _Provenance) -> str | None:
    r = item.record
    assert r.request is not None
    fixed = correction(item.feedback)
    if fixed is not None and not options.with_corrections:
        return "corrected"
    if fixed is None and options.min_feedback is not None:
        score = rating(item.feedback)
        if score is None:
            return "no_feedback"
        if score < options.min_feedback:
            return "below_min_feedback"
    answer = Answer(content=fixed) if fixed is not None else _answer(r)
    try:
        if options.format == "anthropic-jsonl":
            line = anthropic(r.request.messages, r.request.tools, answer)
        else:
            line = openai_chat(r.request.messages, r.request.tools, answer)
    except Unencodable as exc:
        return str(exc)
    sink.write(line)
    seen.add(r)
    return None


def _preference(
    item: Captured,
    options: ExportOptions,
    sink: _Sink,
    seen: _Provenance,
    report: ExportReport,
    best: dict[bytes, _Side],
    worst: dict[bytes, _Side],
    rated: Counter[bytes],
) -> str | None:
    r = item.record
    assert r.request is not None
    fixed = correction(item.feedback)
    paired = False
    if fixed is not None and fixed != (r.answer.content if r.answer is not None else None):
        sink.write(preference(r.request.messages, r.request.tools, Answer(content=fixed), _answer(r)))
        seen.add(r)
        report.pairs["correction"] += 1
        paired = True
    score = rating(item.feedback)
    if score is not None:
        key = _prompt_key(r)
        if not paired:
            rated[key] += 1
        side = _Side(score, r.tenant, r.request_id, not paired)
        if key not in best or score > best[key].rating:
            best[key] = side
        if key not in worst or score < worst[key].rating:
            worst[key] = side
        # Whether it ends up in a pair is known after the scan; counted there.
        return None
    return None if paired else "no_pair"


async def _rating_pairs(
    store: CaptureStore,
    options: ExportOptions,
    sink: _Sink,
    seen: _Provenance,
    report: ExportReport,
    best: dict[bytes, _Side],
    worst: dict[bytes, _Side],
    rated: Counter[bytes],
) -> None:
    for key, high in best.items():
        low = worst[key]
        unpaired = rated[key]
        wanted = high.rating > low.rating and (options.min_feedback is None or high.rating >= options.min_feedback)
        if wanted and await _rating_pair(store, sink, seen, high, low):
            report.pairs["ratings"] += 1
            unpaired -= high.pending + low.pending
        if unpaired:
            report.excluded["no_pair"] += unpaired


async def _rating_pair(store: CaptureStore, sink: _Sink, seen: _Provenance, high: _Side, low: _Side) -> bool:
    chosen = await store.get(high.tenant, high.request_id)
    rejected = await store.get(low.tenant, low.request_id)
    if chosen is None or rejected is None or chosen.record.request is None:
        return False  # deleted by retention while the export ran
    a, b = _answer(chosen.record), _answer(rejected.record)
    if a == b:
        return False
    request = chosen.record.request
    sink.write(preference(request.messages, request.tools, a, b))
    seen.add(chosen.record)
    seen.add(rejected.record)
    return True

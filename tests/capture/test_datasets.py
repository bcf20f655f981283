"""`strait datasets export` and `compare` on constructed capture stores (SQLite and a real PostgreSQL, via
the store contract's fixture): consent and licence filters with their reasons, the manifest's counts and
hashes, min-feedback and corrections, preference pairs, and compare's numbers computed by hand."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import pytest

from gateway.capture.compare import compare, normalise, similarity
from gateway.capture.eligibility import PolicyView
from gateway.capture.export import ExportError, ExportOptions, export
from gateway.capture.records import (
    CapturedAnswer,
    CapturedMessage,
    CapturedRequest,
    CapturedToolCall,
    CaptureRecord,
    Feedback,
)
from gateway.capture.store import CaptureStore
from gateway.policy.model import Price

DAY = 86_400_000
T0 = 1_796_601_600_000  # 2026-12-07T00:00:00Z
VIEW = PolicyView(
    version="pol-now",
    families={"m": "m", "m-lora": "m", "closed": "closed", "mystery": "mystery"},
    training={"acme": True, "globex": True, "initech": False},
)


def rec(rid: str, ts: int = T0 + 1000, **kw: Any) -> CaptureRecord:
    fields: dict[str, Any] = {
        "request_id": rid,
        "ts_ms": ts,
        "tenant": "acme",
        "key_id": "k1",
        "route": "chat",
        "operation": "chat",
        "protocol": "openai",
        "status": 200,
        "outcome": "completed",
        "model": "m",
        "deployment": "m@b1",
        "licence": "apache-2.0",
        "licence_outputs_train": True,
        "policy_version": "pol-1",
        "consent_training": True,
        "request": CapturedRequest(messages=(CapturedMessage(role="user", content=f"question {rid}"),)),
        "answer": CapturedAnswer(content=f"answer {rid}", finish_reason="stop"),
        "latency_ms": 100.0,
    }
    fields.update(kw)
    return CaptureRecord(**fields)


def fb(rid: str, n: int, kind: str = "score", **kw: Any) -> Feedback:
    return Feedback(
        id=f"fb_{rid}_{n}", request_id=rid, tenant=kw.pop("tenant", "acme"), ts_ms=T0 + 5000 + n, kind=kind, **kw
    )  # type: ignore[arg-type]


def lines(path: Path) -> list[Any]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def options(**kw: Any) -> ExportOptions:
    base: dict[str, Any] = {"route": "chat", "format": "openai-chat-jsonl", "target": "m", "since_ms": T0}
    base.update(kw)
    return ExportOptions(**base)


async def test_export_leaves_out_what_consent_or_licence_forbid(capture_store: CaptureStore, tmp_path: Path) -> None:
    await capture_store.write(
        [
            rec("r01"),
            rec("r02", consent_training=False),
            rec("r03", tenant="initech"),  # captured with consent, withdrawn since
            rec("r04", model="closed", licence="closed-terms", licence_outputs_train=False),
            rec("r05", model="mystery", licence=None, licence_outputs_train=None),
            rec("r01:shadow", model="m-lora", shadow_of="r01", request=None),
            rec("r07", status=502, outcome="failed", answer=None),
            rec("r08", answer=CapturedAnswer(content="cut", truncated=True)),
            rec("r09", request=None),
            rec("r10", cache="hit"),
            rec("r11", tenant="globex", policy_version="pol-2"),
            rec("r12", route="other"),
            rec("r13", ts=T0 - 1),
            rec("r14", ts=T0 + DAY),  # past --until
        ]
    )
    out = tmp_path / "out"
    report = await export(capture_store, options(until_ms=T0 + DAY), VIEW, out)
    assert report.scanned == 11
    assert report.written == 2
    assert dict(report.excluded) == {
        "no_training_consent": 1,
        "training_consent_withdrawn": 1,
        "licence_forbids_target": 1,
        "licence_unknown": 1,
        "shadow_copy": 1,
        "no_answer": 1,
        "truncated": 1,
        "no_prompt": 1,
        "cache_hit": 1,
    }
    data = out / "chat.openai-chat-jsonl.jsonl"
    got = lines(data)
    assert [line["messages"][0]["content"] for line in got] == ["question r01", "question r11"]
    manifest = json.loads((out / "manifest.json").read_text())
    raw = data.read_bytes()
    assert manifest["files"] == [
        {"name": data.name, "lines": 2, "bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    ]
    assert manifest["counts"]["excluded"] == dict(sorted(report.excluded.items()))
    assert manifest["counts"]["scanned"] == 11 and manifest["counts"]["written"] == 2
    assert manifest["policy_versions"] == {"pol-1": 1, "pol-2": 1}
    assert manifest["policy_in_force"] == "pol-now"
    assert manifest["licences"] == {"apache-2.0": {"outputs_train": True, "records": 2}}
    assert manifest["tenants"] == {"acme": 1, "globex": 1}
    assert manifest["target_family"] == "m" and manifest["store"] == capture_store.kind
    assert manifest["filters"]["until"] == "2026-12-08T00:00:00Z"
    assert not list(out.glob("*.tmp"))

    # The closed model's own family may train on its outputs; nothing else changes.
    own = await export(capture_store, options(target="closed", until_ms=T0 + DAY), VIEW, tmp_path / "own")
    assert own.written == 3 and "licence_forbids_target" not in own.excluded
    # A fine-tune names its family through its base model: m-lora is of family m.
    lora = await export(capture_store, options(target="m-lora", until_ms=T0 + DAY), VIEW, tmp_path / "lora")
    assert lora.written == 2 and lora.excluded["licence_forbids_target"] == 1
    # An unknown licence reads as "not for other models": its own family only.
    mystery = await export(capture_store, options(target="mystery", until_ms=T0 + DAY), VIEW, tmp_path / "mys")
    assert mystery.written == 3 and mystery.excluded["licence_forbids_target"] == 1
    assert "licence_unknown" not in mystery.excluded
    # One export per directory: another format's export is refused there; the same one may be rewritten.
    with pytest.raises(ExportError):
        await export(capture_store, options(format="anthropic-jsonl"), VIEW, out)
    again = await export(capture_store, options(until_ms=T0 + DAY), VIEW, out)
    assert again.written == 2 and json.loads((out / "manifest.json").read_text())["files"] == manifest["files"]


async def test_min_feedback_and_corrections(capture_store: CaptureStore, tmp_path: Path) -> None:
    await capture_store.write(
        [rec("a"), rec("b"), rec("c"), rec("d"), rec("e")],
        [
            fb("a", 1, score=8.0),
            fb("a", 2, "boolean", score=1.0),  # weighted mean (8*1 + 1*3) / 4 = 2.75
            fb("a", 3, "boolean", score=1.0, weight=2.0),
            fb("b", 1, score=-3.0),
            fb("d", 1, "correction", correction="the right answer"),
            fb("e", 1, score=9.0),
            fb("e", 2, "cache_bad_hit", label="bad_cache_hit"),
        ],
    )
    plain = await export(capture_store, options(min_feedback=2.5), VIEW, tmp_path / "p")
    assert plain.written == 1
    assert dict(plain.excluded) == {"below_min_feedback": 1, "no_feedback": 1, "corrected": 1, "cache_bad_hit": 1}
    assert [line["messages"][-1]["content"] for line in lines(plain.path)] == ["answer a"]
    stricter = await export(capture_store, options(min_feedback=2.8), VIEW, tmp_path / "s")
    assert stricter.written == 0 and stricter.excluded["below_min_feedback"] == 2
    fixed = await export(capture_store, options(min_feedback=2.5, with_corrections=True), VIEW, tmp_path / "c")
    assert [line["messages"][-1]["content"] for line in lines(fixed.path)] == ["answer a", "the right answer"]


async def test_preference_pairs_from_corrections_and_ratings(capture_store: CaptureStore, tmp_path: Path) -> None:
    same = CapturedRequest(messages=(CapturedMessage(role="user", content="same prompt"),))
    await capture_store.write(
        [
            rec("p1", request=same, answer=CapturedAnswer(content="good")),
            rec("p2", request=same, answer=CapturedAnswer(content="bad")),
            rec("p3", request=same, answer=CapturedAnswer(content="middle")),
            rec("p4", request=same, answer=CapturedAnswer(content="unrated")),
            # The same prompt from another tenant is another group: never paired with acme's.
            rec("q1", tenant="globex", request=same, answer=CapturedAnswer(content="globex only")),
            rec("c1"),
            rec("t1", request=same, answer=CapturedAnswer(content="tie")),
        ],
        [
            fb("p1", 1, score=9.0),
            fb("p2", 1, score=-5.0),
            fb("p3", 1, score=2.0),
            fb("q1", 1, score=10.0, tenant="globex"),
            fb("c1", 1, "correction", correction="corrected answer"),
        ],
    )
    report = await export(capture_store, options(format="preference-jsonl"), VIEW, tmp_path / "pref")
    got = lines(report.path)
    assert dict(report.pairs) == {"correction": 1, "ratings": 1}
    assert report.written == 2
    # p3 (rated, neither best nor worst), q1 (alone in its group), p4 and t1 (unrated): no pair.
    assert dict(report.excluded) == {"no_pair": 4}
    by_chosen = {line["preferred_output"][0]["content"]: line for line in got}
    assert by_chosen["corrected answer"]["non_preferred_output"] == [{"role": "assistant", "content": "answer c1"}]
    assert by_chosen["corrected answer"]["input"] == {"messages": [{"role": "user", "content": "question c1"}]}
    assert by_chosen["good"]["non_preferred_output"] == [{"role": "assistant", "content": "bad"}]
    assert by_chosen["good"]["input"]["messages"] == [{"role": "user", "content": "same prompt"}]
    # A minimum the best rated answer does not reach leaves only the correction's pair.
    strict = await export(capture_store, options(format="preference-jsonl", min_feedback=9.5), VIEW, tmp_path / "x")
    assert dict(strict.pairs) == {"correction": 1}


async def test_compare_numbers(capture_store: CaptureStore) -> None:
    live_answers = ["Hello, World!", "The sky is blue", "alpha beta gamma delta", "no copy for me"]
    copy_answers = ["hello   world", "the sky is BLUE.", "alpha beta epsilon", None]
    records = []
    for i, (a, b) in enumerate(zip(live_answers, copy_answers, strict=True)):
        rid = f"L{i}"
        records.append(
            rec(
                rid,
                ts=T0 + i * 10,
                latency_ms=100.0 * (i + 1),
                prompt_tokens=1000,
                completion_tokens=100 * (i + 1),
                answer=CapturedAnswer(content=a),
            )
        )
        if i == 2:
            records.append(
                rec(f"{rid}:shadow", ts=T0 + i * 10 + 1, model="m-lora", deployment="m-lora@b2", shadow_of=rid,
                    status=0, outcome="timed_out", answer=None, latency_ms=9999.0)
            )  # fmt: skip
        elif b is not None:
            records.append(
                rec(f"{rid}:shadow", ts=T0 + i * 10 + 1, model="m-lora", deployment="m-lora@b2", shadow_of=rid,
                    latency_ms=10.0 * (i + 1), prompt_tokens=1000, completion_tokens=50, answer=CapturedAnswer(content=b))
            )  # fmt: skip
    # The canary share: live answers by the candidate (no copies of those).
    records.append(
        rec("K1", ts=T0 + 100, model="m-lora", deployment="m-lora@b2", latency_ms=40.0, completion_tokens=10)
    )
    records.append(rec("K2", ts=T0 + 101, model="m-lora", deployment="m-lora@gone", latency_ms=60.0))
    await capture_store.write(records, [fb("L0", 1, score=6.0), fb("K1", 1, "boolean", score=-1.0)])
    prices = {"m@b1": Price(input_per_mtok=1.0, output_per_mtok=2.0), "m-lora@b2": Price(input_per_mtok=0.5)}
    c = await compare(capture_store, "chat", "m-lora", prices)
    d = c.as_dict()
    shadow = d["shadow"]
    # Pairs: L0 and L1 (equal once normalised), L2's copy timed out (counted, not paired); L3 has no copy.
    assert shadow["pairs"] == 2 and shadow["agreement_exact"] == 1.0 and shadow["agreement_similarity"] == 1.0
    assert shadow["live_without_copy"] == 1 + 2  # L3, and the canary's K1 and K2 (no copies of them)
    assert shadow["candidate"]["records"] == 3 and shadow["candidate"]["errors"] == 1
    assert shadow["candidate"]["latency_p50_ms"] == 10.0 and shadow["candidate"]["latency_p95_ms"] == 20.0
    assert shadow["live"]["latency_p50_ms"] == 200.0 and shadow["live"]["latency_p95_ms"] == 300.0
    # Live: 3 x 1000 prompt tokens at 1 USD/M, (100+200+300) completion tokens at 2 USD/M.
    assert shadow["live"]["cost_usd"] == pytest.approx(0.003 + 0.0012)
    assert shadow["candidate"]["cost_usd"] == pytest.approx(2 * 1000 * 0.5 / 1e6)
    assert shadow["live"]["mean_rating"] == 6.0 and shadow["live"]["rated"] == 1
    canary = d["canary"]
    assert canary["candidate"]["records"] == 2 and canary["candidate"]["unpriced"] == 1
    assert canary["candidate"]["latency_p50_ms"] == 40.0 and canary["candidate"]["latency_p95_ms"] == 60.0
    assert canary["candidate"]["mean_rating"] == -1.0 and canary["candidate"]["positive_share"] == 0.0
    assert canary["others"]["records"] == 4 and canary["others"]["mean_chars"] == pytest.approx(
        sum(map(len, live_answers)) / 4
    )


def test_agreement_measures() -> None:
    assert normalise(CapturedAnswer(content="  Hello,\n\tWORLD!  ")) == "hello world"
    assert similarity("a b c", "a b d") == pytest.approx(2 / 4)
    assert similarity("", "") == 1.0
    calls = CapturedAnswer(tool_calls=(CapturedToolCall(id="x", name="f", arguments='{"b": 1, "a": 2}'),))
    assert normalise(calls) == 'f({"a":2,"b":1})'


def test_the_cli_reads_strait_capture_and_prints_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`strait datasets export/compare` read STRAIT_CAPTURE and STRAIT_POLICY as `strait serve` does (the demo
    policy: frontier-cloud's licence forbids training other models, the LoRA is of the edge model's family)."""
    import asyncio

    from gateway.__main__ import main
    from gateway.capture.store import open_capture_store

    url = f"sqlite:///{tmp_path / 'capture.db'}"

    async def fill() -> None:
        store = await open_capture_store(url)
        try:
            await store.write(
                [
                    rec("d1", tenant="demo", model="llama-3.1-8b-edge", deployment="llama-3.1-8b-edge@edge-box"),
                    rec(
                        "d1:shadow",
                        tenant="demo",
                        model="llama-3.1-8b-support-lora",
                        shadow_of="d1",
                        deployment="llama-3.1-8b-support-lora@lora-box",
                        request=None,
                    ),
                    rec(
                        "d2",
                        tenant="demo",
                        model="frontier-cloud",
                        licence="examplelab-terms",
                        licence_outputs_train=False,
                    ),
                ]
            )
        finally:
            await store.aclose()

    asyncio.run(fill())
    monkeypatch.setenv("STRAIT_CAPTURE", url)
    monkeypatch.setenv("STRAIT_POLICY", "policies/demo.yaml")
    out = tmp_path / "ds"
    argv = ["datasets", "export", "--route", "chat", "--since", "2026-12-07", "--until", "2026-12-07"]
    assert (
        main([*argv, "--format", "openai-chat-jsonl", "--target", "llama-3.1-8b-support-lora", "--out", str(out)]) == 0
    )
    printed = capsys.readouterr().out
    assert "scanned 3 records, wrote 1 lines" in printed
    assert re.search(r"^  licence_forbids_target +1$", printed, re.M) and re.search(
        r"^  shadow_copy +1$", printed, re.M
    )
    assert json.loads((out / "manifest.json").read_text())["target_family"] == "llama-3.1-8b-edge"
    assert main(["datasets", "compare", "--route", "chat", "--candidate", "llama-3.1-8b-support-lora", "--json"]) == 0
    shadow = json.loads(capsys.readouterr().out)["shadow"]
    assert shadow["pairs"] == 1 and shadow["agreement_exact"] == 0.0
    assert main(["datasets", "compare", "--route", "chat", "--candidate", "x", "--since", "soon"]) == 2
    monkeypatch.setenv("STRAIT_CAPTURE", f"sqlite:///{tmp_path / 'nowhere' / 'capture.db'}")
    with pytest.raises(SystemExit, match="no capture store"):
        main(["datasets", "compare", "--route", "chat", "--candidate", "x"])
    assert not (tmp_path / "nowhere").exists()


async def test_an_export_longer_than_a_page_streams_every_record(capture_store: CaptureStore, tmp_path: Path) -> None:
    """1,201 records, three pages of the store's 500: each one read once, in order, counted once."""
    records = [rec(f"s{i:05d}", ts=T0 + i, consent_training=i % 3 != 0) for i in range(1201)]
    await capture_store.write(records)
    report = await export(capture_store, options(), VIEW, tmp_path / "big")
    assert report.scanned == 1201
    assert dict(report.excluded) == {"no_training_consent": 401}
    got = [line["messages"][0]["content"] for line in lines(report.path)]
    assert got == [f"question s{i:05d}" for i in range(1201) if i % 3 != 0]

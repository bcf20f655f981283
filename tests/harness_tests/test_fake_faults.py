"""The fake upstream's faults (issue 10's table), each observed with a plain HTTP client against the real process.

Every fault is chosen by a ``fault:`` model name here (what a policy's deployment points at); a few are also driven by
header and body directive to show the three channels agree.  Timing checks are lower bounds only (a loaded machine
can only make things slower); waits are deadlines on a condition, never sleeps.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.harness import fake_faults as ff
from tests.harness.fake_control import FakeControl
from tests.harness.procs import ServerProcess, free_port
from tests.harness.sse import SSEParser, parse_sse

FIXTURES = Path(__file__).parents[1] / "fixtures" / "openai"
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
STREAM_USAGE = {"stream": True, "stream_options": {"include_usage": True}}


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = tmp_path_factory.mktemp("fake") / "fake_upstream.log"
    argv = [sys.executable, "-m", "tests.harness.fake_upstream", "--port", str(port), "--slots", "2"]
    with ServerProcess(argv, port, ready_path="/healthz", log_path=log) as proc:
        yield proc.base_url


@pytest.fixture()
def http(fake: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fake, timeout=10.0) as client:
        client.post("/_reset")
        yield client


def body(model: str = "gpt-4o-mini", **kw: Any) -> dict[str, Any]:
    return {"model": model, "messages": MESSAGES, **kw}


def tid() -> dict[str, str]:
    return {"x-test-id": uuid.uuid4().hex}


def records(http: httpx.Client, test_id: str) -> list[dict[str, Any]]:
    return [r for r in http.get("/_ledger").json() if r["headers"].get("x-test-id") == test_id]


def wait_record(http: httpx.Client, test_id: str, pred: Any, timeout: float = 5.0) -> dict[str, Any]:
    """Poll the ledger until the (single) record for `test_id` satisfies `pred`, within a deadline."""
    deadline = time.monotonic() + timeout
    recs: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        recs = records(http, test_id)
        if len(recs) == 1 and pred(recs[0]):
            return recs[0]
    raise AssertionError(f"ledger record for {test_id} never satisfied the condition: {recs}")


def stream_events(http: httpx.Client, payload: dict[str, Any], **kw: Any) -> tuple[list[tuple[float, str]], bytes]:
    """(arrival wall-clock time, data) of each SSE event, and the raw bytes; the request must complete."""
    parser = SSEParser()
    events: list[tuple[float, str]] = []
    raw = b""
    with http.stream("POST", "/v1/chat/completions", json=payload, **kw) as r:
        assert r.status_code == 200
        for chunk in r.iter_raw():
            raw += chunk
            now = time.time()  # wall clock: comparable with the fake's ledger times (same machine)
            events.extend((now, e.data) for e in parser.feed(chunk))
    return events, raw


def content_of(datas: list[str]) -> str:
    text = ""
    for d in datas:
        if d == "[DONE]":
            continue
        for choice in json.loads(d).get("choices", []):
            text += choice["delta"].get("content") or ""
    return text


# ---------------------------------------------------------------------------------------------------------------------
# The model-name mapping and the gates (pure functions).


def test_model_names_map_to_directives() -> None:
    assert ff.model_directives("gpt-4o-mini") == {}
    assert ff.model_directives("fault:429-retry-after-2") == {"status": 429, "retry_after": "2"}
    assert ff.model_directives("fault:429-retry-after-date-3") == {"status": 429, "retry_after_date": 3}
    assert ff.model_directives("fault:429-no-retry-after") == {"status": 429, "retry_after": "none"}
    assert ff.model_directives("fault:500-once") == {"status": 500, "fail_first": 1}
    assert ff.model_directives("fault:503-first-3") == {"status": 503, "fail_first": 3}
    assert ff.model_directives("fault:503-ratio-0.5") == {"status": 503, "fail_ratio": 0.5}
    assert ff.model_directives("fault:reset-once") == {"reset": True, "fail_first": 1}
    assert ff.model_directives("fault:slow-first-token-2000+no-done") == {"first_token_ms": 2000.0, "no_done": True}
    assert ff.model_directives("fault:status=502+retry-after=7") == {"status": "502", "retry_after": "7"}
    assert ff.model_directives("fault:ok") == {}
    for bad in ("fault:429-retry-after", "fault:nonsense", "fault:=3", "fault:" + "x" * 600):
        with pytest.raises(ff.FaultNameError):
            ff.model_directives(bad)


@given(st.floats(min_value=0.0, max_value=1.0), st.integers(min_value=1, max_value=400))
def test_fail_ratio_fails_exactly_its_share(p: float, n: int) -> None:
    failed = sum(ff.gate_says_fail({"fail_ratio": p}, k) for k in range(1, n + 1))
    assert failed == int(n * p // 1)


@given(st.integers(min_value=0, max_value=20), st.integers(min_value=1, max_value=40))
def test_fail_first_fails_exactly_the_first_attempts(first: int, attempt: int) -> None:
    assert ff.gate_says_fail({"fail_first": first}, attempt) is (attempt <= first)


def test_attempt_counter_is_bounded() -> None:
    c = ff.AttemptCounter(limit=3)
    assert [c.next("a"), c.next("a"), c.next("b")] == [1, 2, 1]
    for k in "cdef":
        c.next(k)
    assert len(c.counts) == 3 and "a" not in c.counts


# ---------------------------------------------------------------------------------------------------------------------
# 429 / 500 / 503.


def test_429_with_retry_after_seconds(http: httpx.Client) -> None:
    r = http.post("/v1/chat/completions", json=body("fault:429-retry-after-2"))
    assert r.status_code == 429 and r.headers["retry-after"] == "2"
    assert r.json()["error"]["code"] == "rate_limit_exceeded" and "try again in 2s" in r.json()["error"]["message"]
    assert r.headers["x-ratelimit-reset-requests"] == "2s"


def test_429_with_retry_after_http_date(http: httpx.Client) -> None:
    before = time.time()
    r = http.post("/v1/chat/completions", json=body("fault:429-retry-after-date-3"))
    after = time.time()
    assert r.status_code == 429
    when = email.utils.parsedate_to_datetime(r.headers["retry-after"]).timestamp()
    assert before + 3 <= when <= after + 4  # whole seconds, rounded up: never sooner than asked
    assert "try again in 3s" in r.json()["error"]["message"]


def test_429_without_retry_after(http: httpx.Client) -> None:
    for _ in range(3):
        r = http.post("/v1/chat/completions", json=body("fault:429-no-retry-after"))
        assert r.status_code == 429 and "retry-after" not in r.headers
        assert r.json()["error"]["code"] == "rate_limit_exceeded"


def test_500_once_then_ok_for_the_same_request(http: httpx.Client) -> None:
    payload = body("fault:500-once", seed=1)
    first = http.post("/v1/chat/completions", json=payload, headers=tid())
    retry = http.post("/v1/chat/completions", json=payload, headers=tid())
    other = http.post("/v1/chat/completions", json=body("fault:500-once", seed=2))
    assert (first.status_code, retry.status_code, other.status_code) == (500, 200, 500)
    assert first.json()["error"]["type"] == "server_error"
    recs = http.get("/_ledger").json()
    assert [(r["attempt"], r["faults"]) for r in recs] == [(1, ["status"]), (2, []), (1, ["status"])]
    assert recs[0]["key"] == recs[1]["key"] != recs[2]["key"]


def test_fail_first_keyed_by_a_client_token(http: httpx.Client) -> None:
    """Retries that differ in their body (a gateway may rewrite it) are still one request under an explicit key."""
    key = {"x-fake-key": uuid.uuid4().hex, "x-fake-fail-first": "2", "x-fake-status": "503"}
    codes = [http.post("/v1/chat/completions", json=body(seed=i), headers=key).status_code for i in range(4)]
    assert codes == [503, 503, 200, 200]


def test_503_persistent(http: httpx.Client) -> None:
    codes = {http.post("/v1/chat/completions", json=body("fault:503")).status_code for _ in range(4)}
    assert codes == {503}


def test_brown_out_ratio_is_exact_per_model(http: httpx.Client) -> None:
    codes = [http.post("/v1/chat/completions", json=body("fault:503-ratio-0.5", seed=i)).status_code for i in range(8)]
    assert codes == [200, 503] * 4
    assert http.post("/v1/chat/completions", json=body("fault:503-ratio-0.5")).status_code == 200  # 9th: healthy


# ---------------------------------------------------------------------------------------------------------------------
# Connection-level faults.


@pytest.mark.parametrize(
    ("model", "error", "says"),
    [
        ("fault:reset", httpx.ReadError, "Connection reset by peer"),  # RST: ECONNRESET
        ("fault:fin", httpx.RemoteProtocolError, "without sending a response"),  # FIN: an empty answer
    ],
)
def test_connection_ends_before_any_response_byte(
    http: httpx.Client, model: str, error: type[Exception], says: str
) -> None:
    headers = tid()
    with pytest.raises(error, match=says):
        http.post("/v1/chat/completions", json=body(model), headers=headers)
    rec = wait_record(http, headers["x-test-id"], lambda r: r["ended_at"] is not None)
    assert rec["aborted"] is True and rec["status"] is None and rec["first_byte_at"] is None


def test_reset_by_header_directive(http: httpx.Client) -> None:
    with pytest.raises(httpx.ReadError, match="reset"):
        http.post("/v1/chat/completions", json=body(), headers={"x-fake-reset": "1"})
    with pytest.raises(httpx.ReadError, match="reset"):
        http.post("/v1/chat/completions", json=body(fake={"reset": True}))


def test_no_response_at_all(fake: str, http: httpx.Client) -> None:
    headers = tid()
    with pytest.raises(httpx.ReadTimeout), httpx.Client(base_url=fake, timeout=httpx.Timeout(5.0, read=0.3)) as c:
        c.post("/v1/chat/completions", json=body("fault:hang"), headers=headers)
    rec = wait_record(http, headers["x-test-id"], lambda r: r["client_disconnected"])
    assert rec["status"] is None and rec["first_byte_at"] is None and rec["faults"] == ["hang"]


# ---------------------------------------------------------------------------------------------------------------------
# Stream faults.


def test_first_token_very_late_but_headers_at_once(http: httpx.Client) -> None:
    headers = tid()
    events, _ = stream_events(http, body("fault:slow-first-token-1000", stream=True), headers=headers)
    datas = [d for _, d in events]
    assert datas[-1] == "[DONE]" and '"role":"assistant"' in datas[0]
    rec = records(http, headers["x-test-id"])[0]
    # The 200 and the role chunk reached the client before the fake even produced the first token (1 s later).
    assert events[0][0] < rec["first_token_at"]
    assert rec["first_token_at"] - rec["first_byte_at"] >= 0.99
    assert rec["started_at"] <= rec["first_byte_at"] < rec["first_token_at"] <= rec["ended_at"]


def test_slow_headers(http: httpx.Client) -> None:
    t0 = time.monotonic()
    r = http.post("/v1/chat/completions", json=body("fault:slow-headers-300"))
    assert r.status_code == 200 and time.monotonic() - t0 >= 0.29


@pytest.mark.parametrize(
    ("model", "error"), [("fault:cut-after-2", httpx.ReadError), ("fault:cut-fin-after-2", httpx.RemoteProtocolError)]
)
def test_stream_cut_mid_answer(http: httpx.Client, model: str, error: type[Exception]) -> None:
    headers = tid()
    parser = SSEParser()
    datas: list[str] = []
    with (
        pytest.raises(error),
        http.stream("POST", "/v1/chat/completions", json=body(model, stream=True), headers=headers) as r,
    ):
        for chunk in r.iter_raw():
            datas.extend(e.data for e in parser.feed(chunk))
    assert "[DONE]" not in datas and len(datas) == 3  # role + 2 content chunks
    rec = wait_record(http, headers["x-test-id"], lambda r: r["ended_at"] is not None)
    assert rec["aborted"] is True and rec["completion_tokens_generated"] == 10


def test_stream_stall_with_the_connection_open(fake: str, http: httpx.Client) -> None:
    headers = tid()
    parser = SSEParser()
    datas: list[str] = []
    with (
        httpx.Client(base_url=fake, timeout=httpx.Timeout(5.0, read=0.4)) as c,
        pytest.raises(httpx.ReadTimeout),
        c.stream("POST", "/v1/chat/completions", json=body("fault:stall-after-2", stream=True), headers=headers) as r,
    ):
        for chunk in r.iter_raw():
            datas.extend(e.data for e in parser.feed(chunk))
    assert len(datas) == 3 and "[DONE]" not in datas
    rec = wait_record(http, headers["x-test-id"], lambda r: r["client_disconnected"])
    assert rec["stalled_at"] is not None and rec["completion_tokens_generated"] == 10 and not rec["finished"]


def test_bounded_stall_then_the_answer_goes_on(http: httpx.Client) -> None:
    headers = tid()
    payload = body(stream=True, fake={"stall_after_chunks": 1, "stall_ms": 300})
    events, _ = stream_events(http, payload, headers=headers)
    assert events[-1][1] == "[DONE]" and len(content_of([d for _, d in events]).split()) == 20
    rec = records(http, headers["x-test-id"])[0]
    assert rec["finished"] and rec["ended_at"] - rec["stalled_at"] >= 0.3


def test_non_stream_stall_sends_half_the_body(fake: str, http: httpx.Client) -> None:
    headers = tid()
    with (
        httpx.Client(base_url=fake, timeout=httpx.Timeout(5.0, read=0.4)) as c,
        pytest.raises(httpx.ReadTimeout),
        c.stream("POST", "/v1/chat/completions", json=body("fault:stall-after-0"), headers=headers) as r,
    ):
        assert r.status_code == 200
        r.read()
    rec = wait_record(http, headers["x-test-id"], lambda r: r["client_disconnected"])
    assert rec["first_byte_at"] is not None and rec["stalled_at"] is not None


@pytest.mark.parametrize("kind", ["json", "utf8"])
def test_malformed_chunk_mid_stream(http: httpx.Client, kind: str) -> None:
    headers = {**tid(), "x-fake-malformed-kind": kind}
    with http.stream(
        "POST", "/v1/chat/completions", json=body("fault:malformed-after-1", stream=True), headers=headers
    ) as r:
        raw = r.read()
    blocks = raw.split(b"\n\n")
    assert blocks[-1] == b"" and blocks[-2] == b"data: [DONE]"
    bad = []
    for block in blocks[:-2]:
        try:
            json.loads(block.removeprefix(b"data: ").decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            bad.append(block)
    assert len(bad) == 1 and blocks.index(bad[0]) == 2  # after the role chunk and one content chunk
    good = [b.removeprefix(b"data: ").decode() for b in blocks[:-1] if b not in bad]
    assert len(content_of(good).split()) == 20  # nothing else lost: all 20 tokens arrive
    assert records(http, headers["x-test-id"])[0]["malformed_events"] == 1


def test_stream_ends_cleanly_without_done(http: httpx.Client) -> None:
    events, raw = stream_events(http, body("fault:no-done", **STREAM_USAGE))
    datas = [d for _, d in events]
    assert "[DONE]" not in datas and raw.endswith(b"\n\n")
    chunks = [json.loads(d) for d in datas]
    assert any(c["choices"] and c["choices"][0]["finish_reason"] == "stop" for c in chunks)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 20


def test_midstream_error_event_by_model_name(http: httpx.Client) -> None:
    _, raw = stream_events(http, body("fault:error-event-after-1", stream=True))
    datas = parse_sse(raw)
    assert "[DONE]" not in datas and "error" in json.loads(datas[-1])


# ---------------------------------------------------------------------------------------------------------------------
# 400s: context length and content-policy refusals (checked against the recorded shapes).


def shape(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: shape(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [shape(v) for v in obj]
    return type(obj).__name__


def test_context_length_exceeded(http: httpx.Client) -> None:
    r = http.post("/v1/chat/completions", json=body("fault:context-length"))
    expected = json.loads((FIXTURES / "error_context_length.json").read_text())
    assert r.status_code == 400 and shape(r.json()) == shape(expected)
    assert r.json()["error"]["code"] == "context_length_exceeded"
    big = [{"role": "user", "content": "word " * 100}]
    assert http.post("/v1/chat/completions", json=body("fault:context-window-50", messages=big)).status_code == 400
    assert http.post("/v1/chat/completions", json=body("fault:context-window-50")).status_code == 200


@pytest.mark.parametrize(
    ("model", "fixture", "code"),
    [
        ("fault:content-filter", "error_content_filter.json", "content_filter"),
        ("fault:invalid-prompt", "error_invalid_prompt.json", "invalid_prompt"),
    ],
)
def test_content_policy_refusals(http: httpx.Client, model: str, fixture: str, code: str) -> None:
    r = http.post("/v1/chat/completions", json=body(model))
    expected = json.loads((FIXTURES / fixture).read_text())
    assert r.status_code == 400 and shape(r.json()) == shape(expected)
    assert r.json()["error"]["code"] == code
    assert r.json()["error"]["message"] == expected["error"]["message"]


def test_bad_fault_names_are_a_clear_400(http: httpx.Client) -> None:
    r = http.post("/v1/chat/completions", json=body("fault:explode"))
    assert r.status_code == 400 and "unknown fault item 'explode'" in r.json()["error"]["message"]
    r = http.post("/v1/chat/completions", json=body("fault:stall-after-x"))
    assert r.status_code == 400


# ---------------------------------------------------------------------------------------------------------------------
# Health switch and engine metrics.


def test_health_can_be_flipped_at_run_time(fake: str, http: httpx.Client) -> None:
    with FakeControl(fake) as ctl:
        assert http.get("/health").status_code == 200
        assert ctl.set_health(ok=False)["ok"] is False
        assert http.get("/health").status_code == 503
        down = http.post("/v1/chat/completions", json=body(), headers=(h := tid()))
        assert down.status_code == 503 and down.json()["error"]["type"] == "server_error"
        assert ctl.records(test_id=h["x-test-id"])[0]["faults"] == ["down"]
        assert http.get("/v1/models").status_code == 503
        assert http.get("/healthz").status_code == 200  # the harness's own readiness is not the engine's health
        ctl.set_health(ok=False, serve=True)
        assert http.get("/health").status_code == 503
        assert http.post("/v1/chat/completions", json=body()).status_code == 200
        ctl.set_health(ok=True)
        assert http.get("/health").status_code == 200
        assert http.post("/v1/chat/completions", json=body()).status_code == 200
        assert ctl.health_state()["probes"] == 4
        assert http.post("/_health", json={"ok": "yes"}).status_code == 400


def parse_metrics(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name_labels, value = line.rsplit(" ", 1)
            assert name_labels.endswith('{engine="0",model_name="fake-model"}'), line
            out[name_labels.split("{")[0]] = float(value)
    return out


async def test_metrics_follow_in_flight_requests(fake: str) -> None:
    async with httpx.AsyncClient(base_url=fake, timeout=10.0) as c:
        await c.post("/_reset")
        idle = parse_metrics((await c.get("/metrics")).text)
        assert idle["vllm:num_requests_running"] == 0 and idle["vllm:num_requests_waiting"] == 0
        assert {"vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"} <= idle.keys()
        hangs = [asyncio.create_task(c.post("/v1/chat/completions", json=body("fault:hang"))) for _ in range(3)]
        deadline = time.monotonic() + 5
        while (await c.get("/_metrics")).json()["inflight"] < 3:
            assert time.monotonic() < deadline, "the hanging requests never arrived"
        busy = parse_metrics((await c.get("/metrics")).text)  # --slots 2: two run, one waits
        assert busy["vllm:num_requests_running"] == 2 and busy["vllm:num_requests_waiting"] == 1
        assert busy["vllm:kv_cache_usage_perc"] == 1.0
        for t in hangs:
            t.cancel()
        await asyncio.gather(*hangs, return_exceptions=True)
        deadline = time.monotonic() + 5
        while (await c.get("/_metrics")).json()["inflight"] > 0:
            assert time.monotonic() < deadline, "the fake never saw the clients leave"
        assert parse_metrics((await c.get("/metrics")).text)["vllm:num_requests_running"] == 0


def test_metrics_overrides_and_failures(fake: str, http: httpx.Client) -> None:
    with FakeControl(fake) as ctl:
        ctl.set_metrics(waiting=12, kv_cache_usage=0.93)
        m = ctl.metrics()
        assert m["vllm:num_requests_waiting"] == 12 and m["vllm:gpu_cache_usage_perc"] == 0.93
        ctl.set_metrics(waiting=None, kv_names=["gpu_cache_usage_perc"])
        m = ctl.metrics()
        assert m["vllm:num_requests_waiting"] == 0 and "vllm:kv_cache_usage_perc" not in m
        ctl.set_metrics(status=503)
        assert http.get("/metrics").status_code == 503
        assert http.post("/_metrics", json={"bogus": 1}).status_code == 400
        assert http.post("/_metrics", json={"running": -1}).status_code == 400
        assert ctl.metrics_state()["scrapes"] == 3
        ctl.reset()
        assert http.get("/metrics").status_code == 200


def test_generation_tokens_counter_and_scrapes_stay_off_the_ledger(http: httpx.Client) -> None:
    before = parse_metrics(http.get("/metrics").text)["vllm:generation_tokens_total"]
    http.post("/v1/chat/completions", json=body(fake={"tokens": 7}))
    after = parse_metrics(http.get("/metrics").text)["vllm:generation_tokens_total"]
    assert after - before == 7
    assert [r["path"] for r in http.get("/_ledger").json()] == ["/v1/chat/completions"]


# ---------------------------------------------------------------------------------------------------------------------
# Assistant prefill (what mid-stream rescue re-issues to the next deployment).


def test_prefill_continues_a_cut_stream_into_the_whole_answer(http: httpx.Client) -> None:
    quiet = {"marker": False}
    whole = http.post("/v1/chat/completions", json=body(fake=quiet)).json()["choices"][0]["message"]["content"]
    parser = SSEParser()
    datas: list[str] = []
    with (
        pytest.raises(httpx.ReadError),
        http.stream("POST", "/v1/chat/completions", json=body("fault:cut-after-2", stream=True, fake=quiet)) as r,
    ):
        for chunk in r.iter_raw():
            datas.extend(e.data for e in parser.feed(chunk))
    sent = content_of(datas)
    assert 0 < len(sent) < len(whole)
    resumed = [*MESSAGES, {"role": "assistant", "content": sent}]
    headers = tid()
    events, _ = stream_events(
        http,
        body(messages=resumed, continue_final_message=True, add_generation_prompt=False, fake=quiet, **STREAM_USAGE),
        headers=headers,
    )
    rest = content_of([d for _, d in events])
    assert sent + rest == whole
    usage = json.loads(events[-2][1])["usage"]
    assert usage["completion_tokens"] == 10 and records(http, headers["x-test-id"])[0]["prefill_words"] == 10


def test_prefill_by_model_name_and_rejection(http: httpx.Client) -> None:
    resumed = [*MESSAGES, {"role": "assistant", "content": "alpha bravo"}]
    quiet5 = {"tokens": 5, "marker": False}
    r = http.post("/v1/chat/completions", json=body("fault:prefill", messages=resumed, fake=quiet5))
    assert r.json()["choices"][0]["message"]["content"] == " charlie delta echo"  # 2 of the 5 words were given
    assert r.json()["usage"]["completion_tokens"] == 3
    plain = http.post("/v1/chat/completions", json=body(messages=resumed, fake={"marker": False, "tokens": 3}))
    assert plain.json()["choices"][0]["message"]["content"] == "alpha bravo charlie"  # no prefill: a new answer
    refused = http.post("/v1/chat/completions", json=body("fault:no-prefill", messages=resumed))
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "unsupported_prefill"
    assert http.post("/v1/chat/completions", json=body("fault:no-prefill")).status_code == 200


def test_model_lookups_and_listing_take_faults_too(http: httpx.Client) -> None:
    """A free health probe (GET /v1/models...) can be made to fail as well, by name or by header gate."""
    assert http.get("/v1/models/fault:503").status_code == 503
    gate = {"x-fake-status": "500", "x-fake-fail-first": "1", "x-fake-key": uuid.uuid4().hex}
    assert [http.get("/v1/models", headers=gate).status_code for _ in range(2)] == [500, 200]

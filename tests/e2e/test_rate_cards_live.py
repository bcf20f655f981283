"""Rate cards end to end: a gateway process in front of the fake upstream, whose usage reports prompt-cache
reads and writes and reasoning tokens. Each usage record carries every kind at its own rate (read back
from /v1/usage, the access log, `strait usage` and /metrics); a stream cut after a few events is charged
what was produced before the cut, never a whole-answer estimate; an unpriced deployment is logged and
gauged at start-up, and the gauge follows a reload."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from gateway.policy.index import key_digest
from gateway.tokens import count_text
from tests.harness.gateway import gateway_process
from tests.harness.procs import ServerProcess
from tests.harness.waiting import poll

KEYS = {name: f"sk-rates-{name}-3e9a1c" for name in ("json", "stream", "cut")}
# USD per million tokens (= micro-USD per token), and per request.
RATES = {"input": "2", "cached": "0.5", "cache_write": "2.5", "output": "8", "reasoning": "12", "per_request": "0.001"}
PARTS = {"cached_tokens": 5, "cache_write_tokens": 3, "reasoning_tokens": 4}
MESSAGES = [{"role": "user", "content": "Tell me about rate cards, prompt caches and reasoning tokens, please."}]


def _policy(fake_url: str, bare_price: str = "") -> str:
    keys = ", ".join(f'{{id: {name}, digest: "{key_digest(key)}"}}' for name, key in KEYS.items())
    return f"""
version: 1
backends:
  - {{name: fake, adapter: openai, base_url: "{fake_url}/v1", tier: self-hosted}}
models:
  - name: metered
    tokenizer: cl100k_base
    deployments:
      - backend: fake
        upstream_model: fake-model
        price:
          input_per_mtok: {RATES["input"]}
          cached_input_per_mtok: {RATES["cached"]}
          cache_write_per_mtok: {RATES["cache_write"]}
          output_per_mtok: {RATES["output"]}
          reasoning_per_mtok: {RATES["reasoning"]}
          per_request: {RATES["per_request"]}
  - name: bare
    deployments: [{{backend: fake, upstream_model: fake-model{bare_price}}}]
routes:
  - {{name: metered, models: [metered]}}
  - {{name: bare, models: [bare]}}
tenants:
  - name: rates
    keys: [{keys}]
"""


@pytest.fixture(scope="module")
def rated(fake_upstream: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("rates")
    policy = folder / "policy.yaml"
    policy.write_text(_policy(fake_upstream.base_url))
    with gateway_process(policy, log_path=folder / "gateway.log") as proc:
        yield proc


def _expected_micro_usd(prompt: int, completion: int, cached: int, cache_write: int, reasoning: int) -> int:
    r = {k: Fraction(v) for k, v in RATES.items()}
    total = (
        (prompt - cached - cache_write) * r["input"]
        + cached * r["cached"]
        + cache_write * r["cache_write"]
        + (completion - reasoning) * r["output"]
        + reasoning * r["reasoning"]
        + r["per_request"] * 1_000_000
    )
    return round(total)


def _row(gw: ServerProcess, key: str) -> dict[str, Any] | None:
    """The key's /v1/usage row once its request is counted (each test sends one request per key)."""
    r = httpx.get(gw.base_url + "/v1/usage", params={"by": "key"}, headers={"authorization": f"Bearer {KEYS[key]}"})
    assert r.status_code == 200, r.text
    rows = [row for row in r.json()["data"] if row["value"] == key]
    return rows[0] if rows and rows[0]["requests"] == 1 else None


def _access_line(gw: ServerProcess, request_id: str) -> dict[str, Any] | None:
    assert gw.log_path is not None
    for line in Path(gw.log_path).read_text(errors="replace").splitlines():
        if line.startswith("{") and f'"request_id":"{request_id}"' in line:
            found: dict[str, Any] = json.loads(line)
            return found
    return None


def _assert_charged(gw: ServerProcess, key: str, request_id: str, usage: dict[str, Any]) -> None:
    prompt, completion = usage["prompt_tokens"], usage["completion_tokens"]
    cached = usage["prompt_tokens_details"]["cached_tokens"]
    cache_write = usage["prompt_tokens_details"]["cache_write_tokens"]
    reasoning = usage["completion_tokens_details"]["reasoning_tokens"]
    assert (cached, cache_write, reasoning) == (5, 3, 4)  # the fake reported them; the client sees them
    micro = _expected_micro_usd(prompt, completion, cached, cache_write, reasoning)
    row = poll(lambda: _row(gw, key))
    assert row is not None, "the request never reached the ledger"
    got = {k: row[k] for k in ("prompt_tokens", "cached_tokens", "cache_write_tokens", "completion_tokens")}
    assert got == {
        "prompt_tokens": prompt,
        "cached_tokens": 5,
        "cache_write_tokens": 3,
        "completion_tokens": completion,
    }
    assert row["reasoning_tokens"] == 4
    assert row["cost_usd"] == micro / 1e6
    line = poll(lambda: _access_line(gw, request_id))
    assert line is not None
    assert (line["cached_tokens"], line["cache_write_tokens"], line["reasoning_tokens"]) == (5, 3, 4)
    assert line["cost_usd"] == micro / 1e6 and not line.get("partial")


def test_a_json_answer_is_charged_every_kind_at_its_rate(rated: ServerProcess) -> None:
    client = openai.OpenAI(base_url=rated.base_url + "/v1", api_key=KEYS["json"], max_retries=0, timeout=30)
    raw = client.chat.completions.with_raw_response.create(
        model="metered", messages=MESSAGES, max_tokens=16, extra_body={"fake": {**PARTS, "tokens": 12}}
    )
    answer = raw.parse()
    assert answer.usage is not None and answer.usage.prompt_tokens >= 8
    _assert_charged(rated, "json", raw.headers["x-strait-request-id"], answer.usage.model_dump())


def test_a_stream_is_charged_every_kind_at_its_rate(rated: ServerProcess) -> None:
    body = {
        "model": "metered",
        "messages": MESSAGES,
        "stream": True,
        "stream_options": {"include_usage": True},
        "fake": {**PARTS, "tokens": 12},
    }
    r = httpx.post(
        rated.base_url + "/v1/chat/completions",
        json=body,
        headers={"authorization": f"Bearer {KEYS['stream']}"},
        timeout=30,
    )
    assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
    usages = [
        json.loads(line[6:])["usage"]
        for line in r.text.splitlines()
        if line.startswith("data: {") and json.loads(line[6:]).get("usage")
    ]
    assert len(usages) == 1
    _assert_charged(rated, "stream", r.headers["x-strait-request-id"], usages[0])


def test_a_stream_cut_after_three_events_is_charged_what_it_produced(
    rated: ServerProcess, fake_upstream: ServerProcess
) -> None:
    body = {
        "model": "metered",
        "messages": MESSAGES,
        "stream": True,
        "stream_options": {"include_usage": True},
        # One cl100k token per word, 5 per event; the connection is reset after the third content event.
        "fake": {**PARTS, "tokens": 40, "chunk_tokens": 5, "fail_after_chunks": 3, "vocab": "cl100k"},
    }
    r = httpx.post(
        rated.base_url + "/v1/chat/completions",
        json=body,
        headers={"authorization": f"Bearer {KEYS['cut']}"},
        timeout=30,
    )
    assert r.status_code == 200 and "[DONE]" not in r.text
    text = "".join(
        (choice.get("delta") or {}).get("content") or ""
        for line in r.text.splitlines()
        if line.startswith("data: {")
        for choice in json.loads(line[6:]).get("choices") or ()
    )
    received = count_text(text, "cl100k_base")
    assert received == 15
    row = poll(lambda: _row(rated, "cut"))
    assert row is not None, "the cut request never reached the ledger"
    # The upstream never sent its usage: what it produced before the cut is counted (no cache or
    # reasoning parts are invented), never the 40 tokens the whole answer would have had.
    assert row["completion_tokens"] == received
    assert (row["cached_tokens"], row["cache_write_tokens"], row["reasoning_tokens"]) == (0, 0, 0)
    line = poll(lambda: _access_line(rated, r.headers["x-strait-request-id"]))
    assert line is not None and line["partial"] is True and line["status"] == 502
    assert line["completion_tokens"] == received
    micro = _expected_micro_usd(line["prompt_tokens"], received, 0, 0, 0)
    assert row["cost_usd"] == line["cost_usd"] == micro / 1e6
    generated = [
        rec["completion_tokens_generated"]
        for rec in httpx.get(fake_upstream.base_url + "/_ledger", timeout=5).json()
        if rec["headers"].get("x-request-id") == r.headers["x-strait-request-id"]
    ]
    assert generated == [15]


def test_strait_usage_shows_every_kind(rated: ServerProcess) -> None:
    assert poll(lambda: _row(rated, "json")) is not None
    out = subprocess.run(
        [sys.executable, "-m", "gateway", "usage", "--url", rated.base_url, "--key", KEYS["json"], "--by", "key"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    header, *rows = out.stdout.splitlines()[1:]
    assert header.split() == [
        "tenant",
        "key",
        "requests",
        "prompt",
        "cached",
        "cache_write",
        "completion",
        "reasoning",
        "USD",
    ]
    json_row = next(row.split() for row in rows if row.split()[1] == "json")
    assert json_row[4:6] == ["5", "3"] and json_row[7] == "4"


def test_token_kinds_are_bounded_metric_labels(rated: ServerProcess) -> None:
    assert poll(lambda: _row(rated, "json")) is not None
    text = httpx.get(rated.base_url + "/metrics", timeout=10).text
    kinds = {
        line.split('kind="')[1].split('"')[0]
        for line in text.splitlines()
        if line.startswith("strait_usage_tokens_total{") and 'deployment="metered@fake"' in line
    }
    assert kinds == {"prompt", "completion", "cached", "cache_write", "reasoning"}


def _unpriced_gauge(gw: ServerProcess) -> dict[str, float]:
    out = {}
    for line in httpx.get(gw.base_url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("strait_deployment_unpriced{"):
            label, value = line.rsplit(" ", 1)
            out[label.split('"')[1]] = float(value)
    return out


def test_an_unpriced_deployment_is_logged_and_gauged_and_a_reload_clears_it(
    rated: ServerProcess, fake_upstream: ServerProcess
) -> None:
    assert rated.log_path is not None
    log = Path(rated.log_path).read_text(errors="replace")
    warnings = [line for line in log.splitlines() if "without a price" in line]
    assert len(warnings) == 1 and "WARNING" in warnings[0]
    assert "model 'bare' on backend 'fake'" in warnings[0] and "'metered'" not in warnings[0]
    assert _unpriced_gauge(rated) == {"metered@fake": 0.0, "bare@fake": 1.0}
    # Declared free on purpose: the reload (the gateway watches its policy file) clears the alert.
    policy = Path(rated.log_path).parent / "policy.yaml"
    policy.write_text(_policy(fake_upstream.base_url, ", price: {free: true}"))
    cleared = poll(lambda: _unpriced_gauge(rated).get("bare@fake") == 0.0, timeout=30)
    assert cleared, _unpriced_gauge(rated)
    assert len([line for line in Path(rated.log_path).read_text().splitlines() if "without a price" in line]) == 1

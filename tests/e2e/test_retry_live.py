"""Issue 10's retry and failover rows, through a real `strait serve` in front of the fake upstream's faults
(tests/harness/README.md). Each deployment points at a `fault:` model of one fake; each scenario has its
own backend, so the live signals of one never steer another. Orderings and counts come from the fake's
ledger; waits are checked as lower bounds on the fake's own clock (never as upper bounds on ours)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.policy.index import key_digest
from tests.harness.fake_control import FakeControl, Record, fake_upstream
from tests.harness.gateway import gateway_process
from tests.harness.procs import ServerProcess
from tests.harness.waiting import poll

KEY = "sk-retry-tenant-93b1d0"
ADMIN = "sk-retry-admin-1c55e2"
# (scenario, upstream model of its primary deployment, extra model fields)
PRIMARIES = {
    "ra": "fault:429-retry-after-1-once",
    "radate": "fault:429-retry-after-date-1-once",
    "ralong": "fault:429-retry-after-30",
    "nora": "fault:429-no-retry-after",
    "nora2": "fault:429-no-retry-after",
    "e500once": "fault:500-once",
    "e500": "fault:500",
    "e503": "fault:503",
    "reset": "fault:reset",
    "resetstream": "fault:reset",
    "fin": "fault:fin-once",
    "hang": "fault:hang",
    "hangjson": "fault:hang",
    "filter": "fault:content-filter",
    "billing": "fault:503",
    "cut": "fault:cut-after-3",
}
HANG_TIMEOUT_S = 2


def _policy(fake: str) -> str:
    backends = [f'  - {{name: {name}, adapter: openai, base_url: "{fake}/v1"}}' for name in PRIMARIES]
    backends += [
        f'  - {{name: good, adapter: openai, base_url: "{fake}/v1"}}',
        f'  - {{name: ctx, adapter: openai, base_url: "{fake}/v1"}}',
    ]
    models = [
        f"  - {{name: m-{n}, deployments: [{{backend: {n}, upstream_model: '{u}'}}]}}" for n, u in PRIMARIES.items()
    ]
    models += [
        "  - name: m-good",
        "    deployments: [{backend: good, upstream_model: fake-model,"
        " price: {input_per_mtok: 1000, output_per_mtok: 2000}}]",
        "  - {name: m-ctx-small, context_window: 4096,"
        " deployments: [{backend: ctx, upstream_model: 'fault:context-length'}]}",
        "  - {name: m-ctx-same, context_window: 4096, deployments: [{backend: good, upstream_model: same-4k}]}",
        "  - {name: m-ctx-large, context_window: 32768, deployments: [{backend: good, upstream_model: large-32k}]}",
    ]
    routes = [
        f"  - {{name: r-{n}, models: [m-{n}, m-good]}}" for n in PRIMARIES if n not in ("nora2", "hang", "hangjson")
    ]
    routes += [
        "  - {name: r-nora2, models: [m-nora, m-nora2], retry: {backoff_base_ms: 200, backoff_max_ms: 400}}",
        f"  - {{name: r-hang, models: [m-hang, m-good], timeouts: {{stream_headers_s: {HANG_TIMEOUT_S}}}}}",
        f"  - {{name: r-hangjson, models: [m-hangjson, m-good], timeouts: {{response_s: {HANG_TIMEOUT_S}}}}}",
        "  - {name: r-ctx, models: [m-ctx-small, m-ctx-same, m-ctx-large]}",
        "  - {name: r-ctx-none, models: [m-ctx-small, m-ctx-same]}",
    ]
    # The 429-without-Retry-After route backs off from 200 ms (so its retry is at least 100 ms later).
    routes = [
        r.replace(
            "{name: r-nora, models: [m-nora, m-good]}",
            "{name: r-nora, models: [m-nora, m-good], retry: {backoff_base_ms: 200}}",
        )
        for r in routes
    ]
    return "\n".join(
        [
            "version: 1",
            f'server: {{admin_keys: ["{key_digest(ADMIN)}"]}}',
            "backends:",
            *backends,
            "models:",
            *models,
            "routes:",
            *routes,
            "tenants:",
            f'  - {{name: t, keys: [{{id: t-1, digest: "{key_digest(KEY)}"}}]}}',
            "",
        ]
    )


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeControl]:
    with fake_upstream(tmp_path_factory.mktemp("retry-fake")) as (_, control):
        yield control


@pytest.fixture(scope="module")
def gw(fake: FakeControl, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Path]]:
    folder = tmp_path_factory.mktemp("retry-gw")
    policy = folder / "policy.yaml"
    policy.write_text(_policy(str(fake.client.base_url).rstrip("/")))
    log = folder / "gateway.log"
    with gateway_process(policy, log_path=log, env={"STRAIT_SPOOL_DIR": str(folder / "spool")}) as proc:
        yield proc, log


@pytest.fixture()
def client(gw: tuple[ServerProcess, Path]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gw[0].base_url, headers={"authorization": f"Bearer {KEY}"}, timeout=60) as c:
        yield c


def _chat(client: httpx.Client, route: str, *, stream: bool = False, max_tokens: int = 5) -> tuple[httpx.Response, str]:
    """One request with a marker of its own (the fake's ledger is filtered on it)."""
    marker = uuid.uuid4().hex
    body: dict[str, Any] = {
        "model": route,
        "messages": [{"role": "user", "content": "Say hello"}],
        "max_tokens": max_tokens,
        "user": marker,
        "stream": stream,
    }
    return client.post("/v1/chat/completions", json=body), marker


def _models(records: list[Record]) -> list[str]:
    return [r["model"] for r in records]


def test_429_with_retry_after_retries_the_same_deployment_no_sooner_than_asked(
    client: httpx.Client, fake: FakeControl
) -> None:
    for route, model in (("r-ra", PRIMARIES["ra"]), ("r-radate", PRIMARIES["radate"])):
        r, marker = _chat(client, route)
        assert r.status_code == 200, r.text
        assert r.headers["x-strait-deployment"] == f"m-{route[2:]}@{route[2:]}"
        first, second = fake.by_user(marker)
        assert _models([first, second]) == [model, model]
        assert (first["status"], second["status"]) == (429, 200)
        # Retry-After: 1 (seconds, or an HTTP-date at least 1 s away): the retry arrived no sooner.
        assert second["started_at"] - first["started_at"] >= 1.0


def test_429_with_a_retry_after_beyond_the_bound_moves_on_at_once(client: httpx.Client, fake: FakeControl) -> None:
    r, marker = _chat(client, "r-ralong")
    assert r.status_code == 200
    assert r.headers["x-strait-deployment"] == "m-good@good"
    first, second = fake.by_user(marker)
    assert _models([first, second]) == [PRIMARIES["ralong"], "fake-model"]
    # It did not wait out the 30 s the primary asked for (and never went back to it).
    assert second["started_at"] - first["started_at"] < 30


def test_429_without_retry_after_backs_off_then_fails_over(client: httpx.Client, fake: FakeControl) -> None:
    r, marker = _chat(client, "r-nora")
    assert r.status_code == 200
    a1, a2, b = fake.by_user(marker)
    assert _models([a1, a2, b]) == [PRIMARIES["nora"], PRIMARIES["nora"], "fake-model"]
    # The jittered backoff from 200 ms is never shorter than half a step.
    assert a2["started_at"] - a1["started_at"] >= 0.1  # from before the 429 was sent: a true lower bound
    assert b["status"] == 200


def test_persistent_429_everywhere_is_bounded_by_max_attempts(client: httpx.Client, fake: FakeControl) -> None:
    r, marker = _chat(client, "r-nora2")
    assert r.status_code == 429
    assert r.json()["error"]["code"] == "rate_limit_exceeded"
    assert "retry-after" in r.headers
    records = fake.by_user(marker)
    # max_attempts 3: the first deployment twice (one backed-off retry), then the second once.
    assert [(x["model"], x["status"]) for x in records] == [(PRIMARIES["nora"], 429)] * 2 + [(PRIMARIES["nora2"], 429)]
    assert records[1]["started_at"] - records[0]["started_at"] >= 0.1  # backoff_base_ms 200: at least 100 ms


def test_500_once_is_retried_on_the_same_deployment(client: httpx.Client, fake: FakeControl) -> None:
    r, marker = _chat(client, "r-e500once")
    assert r.status_code == 200
    assert r.headers["x-strait-deployment"] == "m-e500once@e500once"
    assert [(x["model"], x["status"]) for x in fake.by_user(marker)] == [
        (PRIMARIES["e500once"], 500),
        (PRIMARIES["e500once"], 200),
    ]


def test_500_again_then_the_fallback(client: httpx.Client, fake: FakeControl) -> None:
    r, marker = _chat(client, "r-e500")
    assert r.status_code == 200
    assert r.headers["x-strait-deployment"] == "m-good@good"
    assert [(x["model"], x["status"]) for x in fake.by_user(marker)] == [
        (PRIMARIES["e500"], 500),
        (PRIMARIES["e500"], 500),
        ("fake-model", 200),
    ]


def test_503_fails_over_without_hammering_the_unavailable_deployment(client: httpx.Client, fake: FakeControl) -> None:
    r, marker = _chat(client, "r-e503")
    assert r.status_code == 200
    assert [(x["model"], x["status"]) for x in fake.by_user(marker)] == [
        (PRIMARIES["e503"], 503),
        ("fake-model", 200),
    ]


@pytest.mark.parametrize("stream", [False, True])
def test_a_reset_before_headers_is_retried_then_failed_over(
    client: httpx.Client, fake: FakeControl, stream: bool
) -> None:
    r, marker = _chat(client, "r-resetstream" if stream else "r-reset", stream=stream)
    assert r.status_code == 200
    if stream:
        assert r.text.rstrip().endswith("data: [DONE]")
    records = fake.by_user(marker)
    assert _models(records) == ["fault:reset", "fault:reset", "fake-model"]
    assert records[0]["aborted"] and records[1]["aborted"]
    # A FIN before headers, once: the same deployment's retry answers.
    r, marker = _chat(client, "r-fin", stream=stream)
    assert r.status_code == 200
    assert r.headers["x-strait-deployment"] == "m-fin@fin"
    assert _models(fake.by_user(marker)) == [PRIMARIES["fin"]] * 2


@pytest.mark.parametrize(("route", "stream"), [("r-hang", True), ("r-hangjson", False)])
def test_no_response_at_all_times_out_per_try_and_fails_over(
    client: httpx.Client, fake: FakeControl, route: str, stream: bool
) -> None:
    sent_at = time.time()
    r, marker = _chat(client, route, stream=stream)
    assert r.status_code == 200
    assert r.headers["x-strait-deployment"] == "m-good@good"
    # The fake notices the gateway leaving on its own time: wait for it (a deadline, not a sleep).
    hung, served = fake.wait_by_user(marker, lambda rs: len(rs) == 2 and rs[0]["client_disconnected"])
    assert hung["model"] == "fault:hang" and served["model"] == "fake-model"
    # The gateway gave up on the silent upstream (the fake saw it leave) after the route's timeout.
    assert hung["client_disconnected"] and hung["status"] is None
    # The per-try timeout started after the client sent the request (the gateway's event loop times it
    # with millisecond timers: 50 ms of slack), and the fallback was tried only once it had expired.
    assert served["started_at"] - sent_at >= HANG_TIMEOUT_S - 0.05
    assert served["started_at"] >= hung["started_at"]


def test_context_length_exceeded_moves_to_a_larger_context_window(client: httpx.Client, fake: FakeControl) -> None:
    r, marker = _chat(client, "r-ctx")
    assert r.status_code == 200, r.text
    assert r.headers["x-strait-deployment"] == "m-ctx-large@good"
    # Not retried on that model, and the next candidate with the same window was skipped.
    assert [(x["model"], x["status"]) for x in fake.by_user(marker)] == [
        ("fault:context-length", 400),
        ("large-32k", 200),
    ]


def test_context_length_exceeded_without_a_larger_candidate_is_the_clients_400(
    client: httpx.Client, fake: FakeControl
) -> None:
    r, marker = _chat(client, "r-ctx-none")
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "context_length_exceeded"
    assert _models(fake.by_user(marker)) == ["fault:context-length"]


def test_a_content_filter_refusal_is_not_retried_and_its_reason_is_passed_on_redacted(
    client: httpx.Client, fake: FakeControl
) -> None:
    r, marker = _chat(client, "r-filter")
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["code"] == "content_filter" and error["param"] == "prompt"
    assert "content management policy" in error["message"]
    assert "microsoft.com" not in r.text  # the upstream's URL is redacted
    assert _models(fake.by_user(marker)) == [PRIMARIES["filter"]]


def test_nothing_is_retried_after_the_first_byte_reached_the_client(client: httpx.Client, fake: FakeControl) -> None:
    r, marker = _chat(client, "r-cut", stream=True, max_tokens=60)  # long enough to be cut after 3 chunks
    assert r.status_code == 200  # committed at the upstream's 200
    assert r.headers["x-strait-deployment"] == "m-cut@cut", r.headers
    assert "data: [DONE]" not in r.text and '"error"' in r.text  # an in-band error, never a false end
    records = fake.by_user(marker)
    assert _models(records) == [PRIMARIES["cut"]]  # the fallback was never asked
    assert records[0]["aborted"]


def test_primary_503_fallback_answers_named_and_billed_the_failed_attempt_recorded_free(
    client: httpx.Client, fake: FakeControl, gw: tuple[ServerProcess, Path]
) -> None:
    r, marker = _chat(client, "r-billing")
    assert r.status_code == 200
    body = r.json()
    assert r.headers["x-strait-deployment"] == "m-good@good"
    assert body["model"] == "fake-model"  # the fallback's model, as the fallback named it
    failed, served = fake.by_user(marker)
    assert (failed["model"], failed["status"], served["model"]) == (PRIMARIES["billing"], 503, "fake-model")
    assert body["usage"]["completion_tokens"] == served["completion_tokens_generated"]

    def rows() -> dict[str, dict[str, Any]] | None:
        got = httpx.get(
            gw[0].base_url + "/admin/usage",
            params={"tenant": "t", "by": "deployment"},
            headers={"authorization": f"Bearer {ADMIN}"},
        )
        assert got.status_code == 200, got.text
        data = {row["value"]: row for row in got.json()["data"]}
        return data if "m-billing@billing" in data and "m-good@good" in data else None

    data = poll(rows)
    assert data is not None, "the usage records never arrived"
    primary = data["m-billing@billing"]
    # Recorded (the row exists), never billed: no request, no token, no cost.
    assert (primary["requests"], primary["prompt_tokens"], primary["completion_tokens"]) == (0, 0, 0)
    assert primary["cost_usd"] == 0
    good = data["m-good@good"]
    assert good["completion_tokens"] >= body["usage"]["completion_tokens"] > 0
    assert good["cost_usd"] > 0
    # The access log line tells how many attempts the answer took.
    lines = [json.loads(x) for x in gw[1].read_text().splitlines() if x.startswith("{") and '"request_id"' in x]
    line = next(x for x in lines if x.get("route") == "r-billing")
    assert line["attempts"] == 2 and line["deployment"] == "m-good@good"

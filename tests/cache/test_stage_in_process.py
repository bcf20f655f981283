"""The cache stage through the whole request path, in process (create_app, memory state, the memory cache
store, the real packaged embedder, an echo adapter whose every answer is unique): hits short-circuit
before any adapter, have the shape of a fresh answer (JSON or replayed SSE), are accounted as hits, never
cross tenants, and every answer-changing parameter is a miss."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from litestar.testing import TestClient

from gateway.app import create_app
from gateway.cache.embedders import DEFAULT_THRESHOLD
from gateway.policy.index import key_digest
from gateway.settings import Settings
from tests.cache.echo_adapter import EchoFactory

KEYS = {"acme": "sk-cache-acme-0001", "globex": "sk-cache-globex-0001", "plain": "sk-cache-plain-0001"}
POLICY = f"""
version: 1
cache:
  embedders:
    - {{name: minilm, kind: local}}
backends:
  - {{name: b1, adapter: echo, base_url: "http://127.0.0.1:9/v1"}}
models:
  - name: m
    capabilities: [chat, tools, json]
    deployments: [{{backend: b1, upstream_model: m-up, price: {{input_per_mtok: 1000, output_per_mtok: 2000}}}}]
routes:
  - {{name: chat, models: [m]}}
  - {{name: chat-priced, models: [m], cache: {{hit_price: 0.5}}}}
  - {{name: nocache, models: [m], cache: {{allowed: false}}}}
tenants:
  - name: acme
    keys: [{{id: a1, digest: "{key_digest(KEYS["acme"])}"}}]
    cache: {{exact: true, semantic: true}}
  - name: globex
    keys: [{{id: g1, digest: "{key_digest(KEYS["globex"])}"}}]
    cache: {{exact: true, semantic: true}}
  - name: plain
    keys: [{{id: p1, digest: "{key_digest(KEYS["plain"])}"}}]
"""


@contextlib.contextmanager
def gateway(tmp_path: Path, policy: str = POLICY) -> Iterator[tuple[TestClient[Any], EchoFactory]]:
    path = tmp_path / "policy.yaml"
    path.write_text(policy)
    factory = EchoFactory()
    app = create_app(
        Settings(policy_path=str(path), spool_dir=str(tmp_path / "spool"), access_log="off"),
        factories={"echo": factory},
    )
    with TestClient(app) as client:
        yield client, factory


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient[Any], EchoFactory]]:
    with gateway(tmp_path_factory.mktemp("cache")) as found:
        yield found


def ask(
    client: TestClient[Any], tenant: str, question: str, *, headers: dict[str, str] | None = None, **body: Any
) -> Any:
    payload = {"model": "chat", "temperature": 0, "messages": [{"role": "user", "content": question}], **body}
    response = client.post(
        "/v1/chat/completions",
        json=payload,
        headers={"authorization": f"Bearer {KEYS[tenant]}", **(headers or {})},
    )
    settle(client)
    return response


def settle(client: TestClient[Any]) -> None:
    """Wait for the cache's background writes (a miss is stored after its answer went out)."""
    cache = client.app.state["gateway"].runtime.cache
    client.blocking_portal.call(cache.drain)


def content(response: Any) -> str:
    text: str = response.json()["choices"][0]["message"]["content"]
    return text


def sse_payloads(response: Any) -> list[dict[str, Any]]:
    out = []
    for line in response.text.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            out.append(json.loads(line[6:]))
    return out


def streamed_content(response: Any) -> str:
    return "".join((c["choices"][0]["delta"].get("content") or "") for c in sse_payloads(response) if c.get("choices"))


_n = iter(range(10**9))


def fresh(prefix: str = "question") -> str:
    """A question no earlier test asked (the module's gateway keeps its cache between tests)."""
    return f"{prefix} number {next(_n)} about zebras"


def test_a_repeated_question_is_an_exact_hit_with_a_fresh_id(env: tuple[TestClient[Any], EchoFactory]) -> None:
    client, upstream = env
    q = fresh()
    first = ask(client, "acme", q)
    assert first.status_code == 200 and first.headers["x-strait-cache"] == "miss"
    calls = upstream.calls
    second = ask(client, "acme", q)
    assert second.status_code == 200
    assert second.headers["x-strait-cache"] == "hit"
    assert upstream.calls == calls  # no adapter reached
    assert content(second) == content(first)
    assert second.json()["id"] != first.json()["id"]
    assert second.json()["usage"] == first.json()["usage"]
    assert second.headers["x-strait-deployment"] == "m@b1"


def test_tenants_never_share_an_entry(env: tuple[TestClient[Any], EchoFactory]) -> None:
    client, _ = env
    q = fresh()
    a = ask(client, "acme", q)
    b = ask(client, "globex", q)
    assert b.headers["x-strait-cache"] == "miss"
    assert content(a) != content(b)
    assert ask(client, "globex", q).headers["x-strait-cache"] == "hit"


def test_a_tenant_that_did_not_opt_in_and_a_route_that_forbids_get_no_cache(
    env: tuple[TestClient[Any], EchoFactory],
) -> None:
    client, _ = env
    q = fresh()
    for _ in range(2):
        r = ask(client, "plain", q)
        assert r.status_code == 200 and "x-strait-cache" not in r.headers
        r = ask(client, "acme", q, model="nocache")
        assert r.status_code == 200 and "x-strait-cache" not in r.headers


ANSWER_CHANGING: list[dict[str, Any]] = [
    {"seed": 7},
    {"max_tokens": 50},
    {"top_p": 0.5},
    {"stop": ["zzz"]},
    {"response_format": {"type": "json_object"}},
    {"presence_penalty": 0.5},
    {"messages_system": "You are terse."},
    {"messages_prior": "Earlier question"},
    {"some_unknown_field": {"a": 1}},
]


@pytest.mark.parametrize("change", ANSWER_CHANGING, ids=lambda c: next(iter(c)))
def test_every_answer_changing_parameter_is_a_miss(
    env: tuple[TestClient[Any], EchoFactory], change: dict[str, Any]
) -> None:
    client, _ = env
    q = fresh()
    assert ask(client, "acme", q).headers["x-strait-cache"] == "miss"
    assert ask(client, "acme", q).headers["x-strait-cache"] == "hit"
    body = dict(change)
    if "messages_system" in body:
        body = {
            "messages": [{"role": "system", "content": body.pop("messages_system")}, {"role": "user", "content": q}]
        }
    elif "messages_prior" in body:
        prior = body.pop("messages_prior")
        body = {
            "messages": [
                {"role": "user", "content": prior},
                {"role": "assistant", "content": "Earlier answer"},
                {"role": "user", "content": q},
            ]
        }
    r = ask(client, "acme", q, **body)
    assert r.status_code == 200
    assert r.headers["x-strait-cache"] == "miss"


def test_stream_and_include_usage_do_not_change_the_namespace(env: tuple[TestClient[Any], EchoFactory]) -> None:
    client, _ = env
    q = fresh()
    first = ask(client, "acme", q)
    r = ask(client, "acme", q, stream=True, stream_options={"include_usage": True}, user="someone")
    assert r.status_code == 200 and r.headers["x-strait-cache"] == "hit"
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.text.rstrip().endswith("data: [DONE]")
    assert streamed_content(r) == content(first)
    chunks = sse_payloads(r)
    usage = [c for c in chunks if not c.get("choices")]
    assert len(usage) == 1 and usage[0]["usage"] == first.json()["usage"]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)


def test_a_streamed_answer_is_stored_and_replayed_equal(env: tuple[TestClient[Any], EchoFactory]) -> None:
    client, _ = env
    q = fresh()
    first = ask(client, "acme", q, stream=True)
    assert first.headers["x-strait-cache"] == "miss"
    original = streamed_content(first)
    assert original.startswith("answer ")
    again = ask(client, "acme", q, stream=True)
    assert again.headers["x-strait-cache"] == "hit"
    assert streamed_content(again) == original
    # The client did not ask for usage: none is replayed.
    assert all(c.get("choices") for c in sse_payloads(again))
    whole = ask(client, "acme", q)
    assert whole.headers["x-strait-cache"] == "hit" and content(whole) == original
    assert whole.json()["usage"]["completion_tokens"] == len(original.split(" "))


def test_cache_control_no_cache_skips_the_lookup_and_no_store_skips_the_write(
    env: tuple[TestClient[Any], EchoFactory],
) -> None:
    client, _ = env
    q = fresh()
    ask(client, "acme", q)
    r = ask(client, "acme", q, headers={"cache-control": "no-cache"})
    assert r.headers["x-strait-cache"] == "bypass"
    # The fresh answer replaced the entry.
    assert content(ask(client, "acme", q)) == content(r)
    q2 = fresh()
    assert ask(client, "acme", q2, headers={"cache-control": "no-store"}).headers["x-strait-cache"] == "miss"
    assert ask(client, "acme", q2).headers["x-strait-cache"] == "miss"


def test_only_deterministic_requests_are_cached_by_default(env: tuple[TestClient[Any], EchoFactory]) -> None:
    client, _ = env
    q = fresh()
    for _ in range(2):
        r = ask(client, "acme", q, temperature=0.7)
        assert r.headers["x-strait-cache"] == "bypass"
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    assert ask(client, "acme", q, tools=tools).headers["x-strait-cache"] == "bypass"


def test_an_answer_cut_by_max_tokens_is_not_stored(env: tuple[TestClient[Any], EchoFactory]) -> None:
    client, _ = env
    q = fresh()
    first = ask(client, "acme", q, max_tokens=2)
    assert first.json()["choices"][0]["finish_reason"] == "length"
    assert ask(client, "acme", q, max_tokens=2).headers["x-strait-cache"] == "miss"


def _metric(client: TestClient[Any], prefix: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.rsplit(" ", 1)[0] == prefix:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_hit_is_accounted_as_a_hit(env: tuple[TestClient[Any], EchoFactory]) -> None:
    client, _ = env
    q = fresh()
    first = ask(client, "globex", q)
    saved_before = _metric(client, 'strait_cache_tokens_saved_total{route="chat",tenant="globex"}')
    completion_before = _metric(
        client, 'strait_usage_tokens_total{deployment="m@b1",kind="completion",route="chat",tenant="globex"}'
    )
    assert ask(client, "globex", q).headers["x-strait-cache"] == "hit"
    usage = first.json()["usage"]
    saved = _metric(client, 'strait_cache_tokens_saved_total{route="chat",tenant="globex"}')
    assert saved - saved_before == usage["prompt_tokens"] + usage["completion_tokens"]
    # No tokens charged for the hit.
    completion = _metric(
        client, 'strait_usage_tokens_total{deployment="m@b1",kind="completion",route="chat",tenant="globex"}'
    )
    assert completion == completion_before
    assert _metric(client, 'strait_cache_lookups_total{result="hit",route="chat"}') >= 1


def test_hits_count_in_the_routes_latency_and_requests_not_the_deployments(
    env: tuple[TestClient[Any], EchoFactory],
) -> None:
    client, _ = env
    q = fresh()
    assert ask(client, "acme", q).headers["x-strait-cache"] == "miss"
    route = 'strait_request_duration_seconds_count{route="chat"}'
    deployment = 'strait_deployment_request_duration_seconds_count{deployment="m@b1",route="chat"}'
    requests = 'strait_requests_total{route="chat",status="200"}'
    before = {name: _metric(client, name) for name in (route, deployment, requests)}
    for stream in (False, True, False):
        assert ask(client, "acme", q, stream=stream).headers["x-strait-cache"] == "hit"
    after = {name: _metric(client, name) for name in (route, deployment, requests)}
    assert after[route] - before[route] == 3
    assert after[requests] - before[requests] == 3
    assert after[deployment] == before[deployment]  # no deployment answered a hit


def test_usage_shows_hits_and_tokens_saved(tmp_path: Path) -> None:
    with gateway(tmp_path) as (client, _):
        q = fresh()
        first = ask(client, "acme", q)
        ask(client, "acme", q)
        ask(client, "acme", q, model="chat-priced")
        ask(client, "acme", q, model="chat-priced")
        client.blocking_portal.call(client.app.state["gateway"].writer.flush)
        r = client.get("/v1/usage?by=route", headers={"authorization": f"Bearer {KEYS['acme']}"})
        assert r.status_code == 200, r.text
        rows = {row["value"]: row for row in r.json()["data"]}
        usage = first.json()["usage"]
        assert rows["chat"]["requests"] == 2
        assert rows["chat"]["cache_hits"] == 1
        assert rows["chat"]["tokens_saved"] == usage["prompt_tokens"] + usage["completion_tokens"]
        # chat-priced charges half of what the answer cost when it was made.
        made = (usage["prompt_tokens"] * 1000 + usage["completion_tokens"] * 2000) / 1e6
        assert rows["chat-priced"]["cost_usd"] == pytest.approx(made * 1.5, rel=1e-6)


def test_a_paraphrase_is_a_semantic_hit_and_a_changed_number_is_not(
    env: tuple[TestClient[Any], EchoFactory],
) -> None:
    client, _ = env
    first = ask(client, "acme", "What is the capital city of France?")
    assert first.headers["x-strait-cache"] in ("miss", "hit")
    r = ask(client, "acme", "What's the capital city of France?")
    assert r.headers["x-strait-cache"] == "semantic-hit"
    assert float(r.headers["x-strait-cache-similarity"]) >= 0.9
    assert content(r) == content(first)
    ask(client, "acme", "How many moons does Jupiter have in 2023?")
    r = ask(client, "acme", "How many moons does Jupiter have in 2024?")
    assert r.headers["x-strait-cache"] == "miss"


def test_feedback_removes_the_hit_and_only_its_tenant_can_send_it(
    env: tuple[TestClient[Any], EchoFactory],
) -> None:
    client, _ = env
    ask(client, "acme", "Which river flows through the city of Vienna?")
    hit = ask(client, "acme", "Which river runs through the city of Vienna?")
    assert hit.headers["x-strait-cache"] == "semantic-hit"
    rid = hit.json()["id"]
    other = client.post("/v1/cache/feedback", json={"id": rid}, headers={"authorization": f"Bearer {KEYS['globex']}"})
    assert other.status_code == 404 and other.json()["error"]["type"] == "invalid_request_error"
    ok = client.post("/v1/cache/feedback", json={"id": rid}, headers={"authorization": f"Bearer {KEYS['acme']}"})
    assert ok.status_code == 200 and ok.json()["recorded"] is True
    assert ask(client, "acme", "Which river runs through the city of Vienna?").headers["x-strait-cache"] == "miss"
    bad = client.post("/v1/cache/feedback", content=b"{", headers={"authorization": f"Bearer {KEYS['acme']}"})
    assert bad.status_code == 400
    big = client.post(
        "/v1/cache/feedback", json={"id": "x" * 10_000}, headers={"authorization": f"Bearer {KEYS['acme']}"}
    )
    assert big.status_code == 413
    assert client.post("/v1/cache/feedback", json={"id": rid}).status_code == 401


def test_regenerating_right_after_a_semantic_hit_reports_it(env: tuple[TestClient[Any], EchoFactory]) -> None:
    client, _ = env
    ask(client, "globex", "What is the boiling point of water at sea level?")
    hit = ask(client, "globex", "What's the boiling point of water at sea level?")
    assert hit.headers["x-strait-cache"] == "semantic-hit"
    before = _metric(client, 'strait_cache_bad_hits_total{source="regenerate"}')
    regen = ask(
        client, "globex", "What's the boiling point of water at sea level?", headers={"cache-control": "no-cache"}
    )
    assert regen.headers["x-strait-cache"] == "bypass"
    assert _metric(client, 'strait_cache_bad_hits_total{source="regenerate"}') == before + 1


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(
        st.tuples(st.sampled_from(["acme", "globex"]), st.sampled_from(["alpha", "beta", "gamma"]), st.booleans()),
        min_size=1,
        max_size=10,
    )
)
def test_no_sequence_of_requests_serves_one_tenant_anothers_answer(
    env: tuple[TestClient[Any], EchoFactory], steps: list[tuple[str, str, bool]]
) -> None:
    client, _ = env
    made_for: dict[str, str] = getattr(test_no_sequence_of_requests_serves_one_tenant_anothers_answer, "made", {})
    test_no_sequence_of_requests_serves_one_tenant_anothers_answer.made = made_for  # type: ignore[attr-defined]
    for tenant, word, stream in steps:
        r = ask(client, tenant, f"tell me about {word} please", stream=stream)
        assert r.status_code == 200
        text = streamed_content(r) if stream else content(r)
        number = text.split(" ")[1]
        if r.headers["x-strait-cache"] == "miss":
            assert number not in made_for
            made_for[number] = tenant
        else:
            assert r.headers["x-strait-cache"] in ("hit", "semantic-hit")
            assert made_for.get(number) == tenant, f"{tenant} was served an answer made for {made_for.get(number)}"


def test_bad_hit_reports_raise_the_namespace_threshold(tmp_path: Path) -> None:
    policy = POLICY.replace(
        "cache:\n  embedders:", "cache:\n  feedback_step: 0.04\n  feedback_max_raise: 0.04\n  embedders:"
    )
    with gateway(tmp_path, policy) as (client, _):
        original, reworded = "What is the capital city of France?", "Tell me the capital city of France."
        ask(client, "acme", original)
        hit = ask(client, "acme", reworded)
        assert hit.headers["x-strait-cache"] == "semantic-hit"
        similarity = float(hit.headers["x-strait-cache-similarity"])
        assert similarity < DEFAULT_THRESHOLD + 0.04  # the pair sits inside the band one report takes away
        r = client.post(
            "/v1/cache/feedback", json={"id": hit.json()["id"]}, headers={"authorization": f"Bearer {KEYS['acme']}"}
        )
        assert r.status_code == 200 and r.json()["namespace_reports"] == 1
        ask(client, "acme", original)  # the entry comes back...
        assert ask(client, "acme", original).headers["x-strait-cache"] == "hit"
        # ...but the rewording no longer reaches the namespace's raised threshold.
        assert ask(client, "acme", reworded).headers["x-strait-cache"] == "miss"
        assert _metric(client, 'strait_cache_lookups_total{result="raised_threshold",route="chat"}') == 1
        # Another tenant's namespace is as strict as before.
        ask(client, "globex", original)
        assert ask(client, "globex", reworded).headers["x-strait-cache"] == "semantic-hit"


def test_entries_get_the_route_ttl_and_bounds_and_a_tenant_may_only_shorten(tmp_path: Path) -> None:
    policy = POLICY.replace(
        "  - {name: chat, models: [m]}",
        "  - {name: chat, models: [m], cache: {ttl_s: 600, max_entries: 7, max_bytes: 100000}}",
    ).replace(
        f'{key_digest(KEYS["globex"])}"}}]\n    cache: {{exact: true, semantic: true}}',
        f'{key_digest(KEYS["globex"])}"}}]\n    cache: {{exact: true, ttl_s: 60}}',
    )
    assert "ttl_s: 60" in policy
    with gateway(tmp_path, policy) as (client, _):
        store = client.app.state["gateway"].services.cache_store
        puts: list[tuple[Any, dict[str, Any]]] = []
        real_put = store.put

        async def spy(namespace: str, key: str, entry: Any, **bounds: Any) -> None:
            puts.append((entry, bounds))
            await real_put(namespace, key, entry, **bounds)

        store.put = spy
        ask(client, "acme", fresh())
        ask(client, "globex", fresh())
        (acme, bounds), (globex, _) = puts
        assert acme.expires_ms - acme.created_ms == 600_000
        assert bounds == {"max_entries": 7, "max_bytes": 100000}
        assert globex.expires_ms - globex.created_ms == 60_000
        assert acme.vector is not None and globex.vector is None  # globex is on the exact tier only
        assert acme.prompt_tokens == 11 and acme.completion_tokens > 0


def test_a_damaged_entry_is_a_miss_never_an_error(env: tuple[TestClient[Any], EchoFactory]) -> None:
    client, _ = env
    store = client.app.state["gateway"].services.cache_store
    seen: list[tuple[str, str, Any]] = []
    real_put = store.put

    async def spy(namespace: str, key: str, entry: Any, **bounds: Any) -> None:
        seen.append((namespace, key, entry))
        await real_put(namespace, key, entry, **bounds)

    store.put = spy
    try:
        q = fresh()
        ask(client, "acme", q)
        namespace, key, entry = seen[-1]
        damaged = msgspec.structs.replace(entry, body=b'{"choices": "not a list"}')
        for stream in (False, True):
            client.blocking_portal.call(lambda: real_put(namespace, key, damaged, max_entries=10, max_bytes=10**6))
            r = ask(client, "acme", q, stream=stream)
            assert r.status_code == 200
            assert r.headers["x-strait-cache"] == "miss"
        # The fresh answer replaced the damaged entry.
        assert ask(client, "acme", q).headers["x-strait-cache"] == "hit"
    finally:
        store.put = real_put


def test_hits_count_against_request_rates_not_token_rates(tmp_path: Path) -> None:
    policy = POLICY.replace(
        "    cache: {exact: true, semantic: true}\n  - name: globex",
        "    cache: {exact: true, semantic: true}\n"
        "    limits: {tenant: {requests_per_minute: 8, tokens_per_minute: 100}}\n"
        "  - name: globex",
    )
    assert "tokens_per_minute: 100" in policy
    with gateway(tmp_path, policy) as (client, _):
        q = fresh()
        first = ask(client, "acme", q, max_tokens=40)
        assert first.status_code == 200 and first.headers["x-strait-cache"] == "miss"
        charged = first.json()["usage"]["total_tokens"]
        # Were the seven hits charged `charged` tokens each, the minute's 100 tokens would not cover the eight
        # requests (each also reserves its prompt + 40 output tokens before it is answered); they are not
        # charged, so only the request rate binds.
        assert 8 * charged > 100
        for _ in range(7):
            r = ask(client, "acme", q, max_tokens=40)
            assert r.status_code == 200 and r.headers["x-strait-cache"] == "hit"
        refused = ask(client, "acme", q, max_tokens=40)
        assert refused.status_code == 429
        assert refused.json()["error"]["type"] in ("rate_limit_error", "requests")


class _StuckEmbedder:
    """An embedder that never answers (a wedged model thread), with the real one's tag."""

    def __init__(self, like: Any) -> None:
        self.id, self.version, self.dims = like.id, like.version, like.dims
        self.calls = 0

    async def embed(self, texts: Any) -> Any:
        self.calls += 1
        await asyncio.Event().wait()  # never set: only the lookup's timeout ends this

    async def warm(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


def test_a_stuck_embedder_costs_a_bounded_wait_then_a_miss(tmp_path: Path) -> None:
    policy = POLICY.replace("cache:\n  embedders:", "cache:\n  semantic_timeout_ms: 50\n  embedders:")
    with gateway(tmp_path, policy) as (client, upstream):
        stage = client.app.state["gateway"].runtime.cache
        stuck = _StuckEmbedder(stage.embedders["minilm"])
        stage.embedders = {**stage.embedders, "minilm": stuck}
        q = fresh()
        r = ask(client, "acme", q)
        assert r.status_code == 200 and r.headers["x-strait-cache"] == "miss"
        assert stuck.calls == 1
        assert _metric(client, 'strait_cache_lookups_total{result="timeout",route="chat"}') == 1
        # The exact tier does not need the embedder: the answer was kept and is served.
        assert ask(client, "acme", q).headers["x-strait-cache"] == "hit"
        # With the embedder's backlog full, a lookup skips the semantic tier at once.
        from gateway.stages.cache import MAX_EMBEDDING_BACKLOG

        stage._embedding = MAX_EMBEDDING_BACKLOG
        r = ask(client, "acme", fresh())
        assert r.status_code == 200 and r.headers["x-strait-cache"] == "miss"
        assert stuck.calls == 1
        assert _metric(client, 'strait_cache_lookups_total{result="busy",route="chat"}') == 1
        assert upstream.calls == 2


def test_partitions_by_key_or_end_user_and_a_generation_bump_retires_entries(tmp_path: Path) -> None:
    k2 = "sk-cache-acme-0002"
    policy = POLICY.replace(
        f'    keys: [{{id: a1, digest: "{key_digest(KEYS["acme"])}"}}]\n    cache: {{exact: true, semantic: true}}',
        f'    keys: [{{id: a1, digest: "{key_digest(KEYS["acme"])}"}}, {{id: a2, digest: "{key_digest(k2)}"}}]\n'
        "    cache: {exact: true, partition: key}",
    ).replace(
        f'{key_digest(KEYS["globex"])}"}}]\n    cache: {{exact: true, semantic: true}}',
        f'{key_digest(KEYS["globex"])}"}}]\n    cache: {{exact: true, partition: user}}',
    )
    assert "partition: key" in policy and "partition: user" in policy
    with gateway(tmp_path, policy) as (client, _):
        q = fresh()
        ask(client, "acme", q)
        assert ask(client, "acme", q).headers["x-strait-cache"] == "hit"
        other_key = client.post(
            "/v1/chat/completions",
            json={"model": "chat", "temperature": 0, "messages": [{"role": "user", "content": q}]},
            headers={"authorization": f"Bearer {k2}"},
        )
        assert other_key.headers["x-strait-cache"] == "miss"
        ask(client, "globex", q, user="alice")
        assert ask(client, "globex", q, user="alice").headers["x-strait-cache"] == "hit"
        assert ask(client, "globex", q, user="bob").headers["x-strait-cache"] == "miss"
        assert ask(client, "globex", q).headers["x-strait-cache"] == "bypass"  # no user: never cached
    bumped = policy.replace("  - {name: chat, models: [m]}", "  - {name: chat, models: [m], cache: {generation: 1}}")
    assert bumped != policy
    with gateway(tmp_path, policy) as (client, _):
        q = fresh()
        ask(client, "acme", q)
        assert ask(client, "acme", q).headers["x-strait-cache"] == "hit"
        path = tmp_path / "policy.yaml"
        path.write_text(bumped)
        reloaded = client.blocking_portal.call(_reload, client, path)
        assert reloaded
        assert ask(client, "acme", q).headers["x-strait-cache"] == "miss"


async def _reload(client: TestClient[Any], path: Path) -> bool:
    from gateway.registry import discover_adapters  # noqa: F401  (the echo factory is the app's own)
    from gateway.reload import PolicyReloader

    gw = client.app.state["gateway"]
    factories = {"echo": EchoFactory()}
    return await PolicyReloader(gw, str(path), factories).reload()

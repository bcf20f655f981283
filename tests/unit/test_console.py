"""The console in-process (create_app, simulated backends, memory state): who is let in, sessions and CSRF,
escaping of every policy- or client-chosen text, the JSON documents the pages are rendered from, bounded
inputs and stores, and the histogram quantile the percentiles come from (tests/ui drives it in a browser)."""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from litestar.testing import TestClient

from gateway.api.console.access import COOKIE, Sessions, Verdict, csrf_ok, identify
from gateway.api.console.candidate import MAX_CANDIDATE_BYTES
from gateway.api.console.history import MetricHistory
from gateway.api.console.metrics_view import quantile
from gateway.app import create_app
from gateway.context import RequestContext
from gateway.errors import GatewayError
from gateway.policy.engine import RequestFeatures, RoutePlan, decide
from gateway.policy.index import PolicyIndex, Principal, key_digest
from gateway.policy.live import LiveState
from gateway.policy.load import load_policy
from gateway.policy.model import PolicySet
from gateway.policy.replay import FeatureLine
from gateway.settings import Settings
from gateway.stages.recent import RecentDecision, RecentDecisions, RecentLog
from gateway.telemetry import Metrics
from tests.harness.waiting import poll

ADMIN = "sk-console-admin-0001"
TENANT = "sk-console-tenant-0001"
HOSTILE = "<script>alert(1)</script>"
POLICY = f"""
version: 1
server: {{admin_keys: ["{key_digest(ADMIN)}"]}}
backends:
  - {{name: sim, adapter: simulated, simulated: {{ttft_ms: 0, tokens_per_second: 1000000, output_tokens: 5}}}}
  - name: broken
    adapter: simulated
    outlier: {{consecutive_failures: 2}}
    simulated: {{ttft_ms: 0, failure_rate: 1.0, failure_status: 503}}
  - {{name: gone, adapter: openai, base_url: "http://127.0.0.1:9/v1"}}  # nothing listens: connect refused
models:
  - name: m
    deployments: [{{backend: sim, upstream_model: sim-1, price: {{input_per_mtok: 1000, output_per_mtok: 2000}}}}]
  - {{name: m-broken, deployments: [{{backend: broken, upstream_model: b}}]}}
  - {{name: m-gone, deployments: [{{backend: gone, upstream_model: g}}]}}
routes:
  - {{name: chat, models: [m]}}
  - {{name: flaky, models: [m-broken]}}
  - {{name: unreachable, models: [m-gone]}}
tenants:
  - name: acme
    keys: [{{id: "key-{HOSTILE}", digest: "{key_digest(TENANT)}"}}]
"""
CHAT = {"model": "chat", "messages": [{"role": "user", "content": "secret prompt text 7731"}]}


@contextlib.contextmanager
def _client(tmp_path: Path) -> Iterator[TestClient[object]]:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    app = create_app(Settings(policy_path=str(policy), spool_dir=str(tmp_path / "spool")))
    # https: the session cookie is Secure, and the test client (like a browser) sends it only over TLS.
    with TestClient(app, base_url="https://testserver.local") as client:
        yield client


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient[object]]:
    with _client(tmp_path) as c:
        yield c


def _admin() -> dict[str, str]:
    return {"authorization": f"Bearer {ADMIN}"}


def _login(client: TestClient[object]) -> str:
    """Through the form; returns the session's CSRF token (read from a page)."""
    page = client.get("/ui/login")
    token = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert token is not None
    r = client.post(
        "/ui/login",
        data={"csrf": token.group(1), "key": ADMIN},
        headers={"origin": "https://testserver.local"},
        follow_redirects=False,
    )
    assert r.status_code == 303 and r.headers["location"] == "/ui", r.text
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "Secure" in cookie and "SameSite=Strict" in cookie
    assert ADMIN not in cookie and key_digest(ADMIN) not in cookie
    found = re.search(r'name="csrf" value="([^"]+)"', client.get("/ui").text)
    assert found is not None
    return found.group(1)


def test_only_admin_keys_get_in(client: TestClient[object]) -> None:
    tenant = {"authorization": f"Bearer {TENANT}"}
    for path in ("/ui", "/ui/decisions", "/ui/tenants", "/ui/backends", "/ui/policy"):
        assert client.get(path, headers=tenant).status_code == 403
        assert client.get(path, follow_redirects=False).headers["location"] == "/ui/login"
        assert client.get(path, headers=_admin()).status_code == 200
    for path in (
        "/admin/api/overview",
        "/admin/api/decisions",
        "/admin/api/tenants",
        "/admin/api/backends",
        "/admin/api/policy",
    ):
        assert client.get(path, headers=tenant).json()["error"]["type"] == "permission_denied"
        assert client.get(path).status_code == 401
        assert client.get(path, headers={"authorization": "Bearer sk-unknown"}).status_code == 401
        assert client.get(path, headers=_admin()).status_code == 200


def test_login_needs_its_form_token_and_an_admin_key(client: TestClient[object]) -> None:
    page = client.get("/ui/login")
    token = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert token is not None
    # A cross-site post (another Origin), or one without the login cookie's token, opens no session.
    r = client.post(
        "/ui/login", data={"csrf": token.group(1), "key": ADMIN}, headers={"origin": "https://evil.example"}
    )
    assert (r.status_code == 403 and "set-cookie" not in r.headers) or COOKIE + "=" not in r.headers["set-cookie"]
    r = client.post("/ui/login", data={"csrf": "forged", "key": ADMIN})
    assert r.status_code == 403
    r = client.post("/ui/login", data={"csrf": "fälschung-✓", "key": ADMIN})  # not ASCII: refused, not a 500
    assert r.status_code == 403
    # A tenant key is not let in, and an unknown key is told so without echoing it.
    fresh = re.search(r'name="csrf" value="([^"]+)"', client.get("/ui/login").text)
    assert fresh is not None
    r = client.post("/ui/login", data={"csrf": fresh.group(1), "key": TENANT})
    assert r.status_code == 403 and TENANT not in r.text
    fresh = re.search(r'name="csrf" value="([^"]+)"', client.get("/ui/login").text)
    assert fresh is not None
    r = client.post("/ui/login", data={"csrf": fresh.group(1), "key": "sk-wrong-key"})
    assert r.status_code == 401 and "sk-wrong-key" not in r.text


def test_session_forms_need_the_csrf_token_and_logout_ends_the_session(client: TestClient[object]) -> None:
    csrf = _login(client)
    assert client.get("/ui/tenants").status_code == 200  # by cookie alone
    r = client.post("/ui/policy", data={"csrf": "wrong", "policy": "version: 1\n"})
    assert r.status_code == 403
    r = client.post("/ui/policy", data={"csrf": csrf, "policy": "version: 1\nroutes: 7\n"})
    assert r.status_code == 200 and "candidate.yaml:2:" in r.text
    # The JSON check by session needs the token in a header; by Authorization header it needs none.
    assert client.post("/admin/api/policy/check", json={"policy": "version: 1\n"}).status_code == 403
    ok = client.post("/admin/api/policy/check", json={"policy": "version: 1\n"}, headers={"x-csrf-token": csrf})
    assert ok.status_code == 200 and ok.json()["ok"] is True
    client.post("/ui/logout", data={"csrf": csrf})
    assert client.get("/ui", follow_redirects=False).status_code == 303


def test_pages_escape_policy_and_client_text_and_show_no_secret(client: TestClient[object]) -> None:
    r = client.post(
        "/v1/chat/completions",
        json=CHAT,
        headers={"authorization": f"Bearer {TENANT}", "x-request-id": "client-id-1"},
    )
    assert r.status_code == 200
    request_id = r.headers["x-strait-request-id"]
    pages = [
        client.get(p, headers=_admin()).text
        for p in ("/ui", "/ui/tenants", "/ui/backends", "/ui/decisions", "/ui/policy")
    ]
    pages.append(client.get(f"/ui/decisions/{request_id}", headers=_admin()).text)
    for text in pages:
        assert HOSTILE not in text
        assert "sha256:" not in text and ADMIN not in text and TENANT not in text
        assert "secret prompt text" not in text
    assert "key-&lt;script&gt;alert(1)&lt;/script&gt;" in pages[1]
    # A pasted policy comes back escaped too.
    found = client.post(
        "/admin/api/policy/check", json={"policy": f"version: 1\nroutes: [{{name: '{HOSTILE}'}}]\n"}, headers=_admin()
    )
    assert found.status_code == 200


def test_decisions_are_found_by_request_id_and_client_id(client: TestClient[object]) -> None:
    ids = []
    for i in range(3):
        r = client.post(
            "/v1/chat/completions",
            json=CHAT,
            headers={"authorization": f"Bearer {TENANT}", "x-request-id": f"mine-{i}"},
        )
        ids.append(r.headers["x-strait-request-id"])
    listed = client.get("/admin/api/decisions", headers=_admin()).json()
    assert [d["request_id"] for d in listed["data"]] == ids[::-1]
    one = client.get(f"/admin/api/decisions?q={ids[1]}", headers=_admin()).json()["data"]
    assert [d["request_id"] for d in one] == [ids[1]]
    by_client = client.get("/admin/api/decisions?q=mine-2", headers=_admin()).json()["data"]
    assert [d["request_id"] for d in by_client] == [ids[2]]
    assert client.get("/admin/api/decisions?tenant=nobody", headers=_admin()).json()["data"] == []
    detail = client.get(f"/admin/api/decisions/{ids[0]}", headers=_admin()).json()
    assert detail["decision"]["plan"] == ["m@sim"] and detail["decision"]["rows"][0]["rank"] == 1
    assert client.get("/admin/api/decisions/req_unknown", headers=_admin()).status_code == 404


def test_overview_and_tenants_agree_with_metrics_and_usage(client: TestClient[object]) -> None:
    tenant = {"authorization": f"Bearer {TENANT}"}
    for _ in range(2):
        assert client.post("/v1/chat/completions", json=CHAT, headers=tenant).status_code == 200
    assert client.post("/v1/chat/completions", json={**CHAT, "model": "nope"}, headers=tenant).status_code == 404
    # The usage writer hands records to the ledger in the background: wait until /admin/usage counts both.
    assert poll(lambda: sum(r["requests"] for r in client.get("/admin/usage", headers=_admin()).json()["data"]) == 2)
    overview = client.get("/admin/api/overview", headers=_admin()).json()
    metrics = client.get("/metrics").text
    chat = next(r for r in overview["routes"] if r["route"] == "chat")
    assert chat["requests"] == 2 and 'strait_requests_total{route="chat",status="200"} 2.0' in metrics
    assert chat["latency"]["count"] == 2 and chat["latency"]["p50_ms"] is not None
    usage = client.get("/admin/usage", headers=_admin()).json()["data"]
    spent = sum(row["cost_usd"] for row in usage)
    assert overview["spend_today"] == [{"tenant": "acme", "requests": 2, "cost_usd": spent, "budget_usd_per_day": None}]
    tenants = client.get("/admin/api/tenants", headers=_admin()).json()["data"]
    assert tenants[0]["refusals"] == {"model_not_found": 1}
    assert 'strait_refusals_total{code="model_not_found",tenant="acme"} 1.0' in metrics
    # Refused before a route was chosen: among the requests, under `-`, never under the client's model string.
    assert 'strait_requests_total{route="-",status="404"} 1.0' in metrics and 'route="nope"' not in metrics
    assert tenants[0]["key_ids"] == [f"key-{HOSTILE}"]


def test_the_gateways_own_errors_are_counted_with_the_requests(client: TestClient[object]) -> None:
    """What error-rate alerts read (`strait_requests_total{status=~"5.."}`, docs/runbooks.md) includes the
    gateway's own failures, not only upstream answers: a route whose upstream refuses connections (the
    gateway's 502: no upstream answered), one whose upstream answers 503, and a bad key before any route."""
    tenant = {"authorization": f"Bearer {TENANT}"}
    gone = client.post("/v1/chat/completions", json={**CHAT, "model": "unreachable"}, headers=tenant)
    assert gone.status_code == 502 and gone.json()["error"]["code"] == "upstream_unavailable", gone.text
    flaky = client.post("/v1/chat/completions", json={**CHAT, "model": "flaky"}, headers=tenant)
    assert flaky.status_code == 503
    wrong = client.post("/v1/chat/completions", json=CHAT, headers={"authorization": "Bearer sk-wrong"})
    assert wrong.status_code == 401
    metrics = client.get("/metrics").text
    assert 'strait_requests_total{route="unreachable",status="502"} 1.0' in metrics
    assert 'strait_requests_total{route="flaky",status="503"} 1.0' in metrics
    assert 'strait_requests_total{route="-",status="401"} 1.0' in metrics


def test_security_headers_on_pages_documents_and_static_files(client: TestClient[object]) -> None:
    for path in ("/ui", "/admin/api/overview", "/ui/static/console.js", "/ui/static/console.css", "/ui/login"):
        r = client.get(path, headers=_admin())
        assert r.status_code == 200
        assert "script-src 'self'" in r.headers["content-security-policy"]
        assert r.headers["x-frame-options"] == "DENY" and r.headers["x-content-type-options"] == "nosniff"
    assert client.get("/ui/static/../app.py").status_code == 404
    assert client.get("/ui/static/other.js").status_code == 404


def test_oversized_and_malformed_inputs_are_refused_cleanly(client: TestClient[object]) -> None:
    big = "x" * (MAX_CANDIDATE_BYTES + 1)
    r = client.post("/admin/api/policy/check", json={"policy": big}, headers=_admin())
    assert r.status_code == 413 and r.json()["error"]["type"]
    r = client.post("/admin/api/policy/check", content=b"{not json", headers=_admin())
    assert r.status_code == 400
    r = client.post("/ui/policy", content=b"policy=x", headers={**_admin(), "content-type": "text/plain"})
    assert r.status_code == 400
    assert client.get("/ui/decisions?q=" + "a" * 5000, headers=_admin()).status_code == 200


def test_sessions_are_bounded_expire_and_die_with_their_key() -> None:
    now = [0.0]
    sessions = Sessions(lambda: now[0], size=3)
    opened = [sessions.open("sha256:a") for _ in range(5)]
    assert len(sessions) == 3 and sessions.get(opened[0].id) is None and sessions.get(opened[4].id) is not None
    assert len({s.id for s in opened}) == 5 and all(s.id != s.csrf for s in opened)
    now[0] = 10 * 3600
    assert sessions.get(opened[4].id) is None
    index = PolicyIndex(load_policy_text(POLICY))
    kept = sessions.open(key_digest(ADMIN))
    assert identify(index, sessions, {"cookie": f"{COOKIE}={kept.id}"}).kind == "admin"
    stale = sessions.open("sha256:" + "0" * 64)  # a key a reload removed from server.admin_keys
    assert identify(index, sessions, {"cookie": f"{COOKIE}={stale.id}"}).kind == "none"
    assert identify(index, sessions, {"authorization": f"Bearer {TENANT}"}).kind == "tenant"
    assert csrf_ok(Verdict("admin", kept), kept.csrf) and not csrf_ok(Verdict("admin", kept), stale.csrf)
    assert not csrf_ok(Verdict("admin", kept), None) and csrf_ok(Verdict("admin"), None)


def load_policy_text(text: str) -> object:
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "p.yaml"
        path.write_text(text)
        return load_policy(path)


def test_the_recent_decisions_ring_is_bounded() -> None:
    ring = RecentDecisions(size=4)
    assert ring.find("x") is None and len(ring) == 0
    for i in range(6):
        line = FeatureLine(ts=float(i), route="chat")
        ring.add(RecentDecision(float(i), f"req_{i}", None, f"d{i}", "acme", "chat", line, None, "refused 429"))
    assert len(ring) == 4 and ring.find("req_1") is None
    assert [e.request_id for e in ring.newest_first()] == ["req_5", "req_4", "req_3", "req_2"]
    found = ring.find("d3")
    assert found is not None and found.choice == "refused 429" and found.decision is None


RING_POLICY = """version: 1
backends:
  - {name: b, adapter: simulated}
models:
  - {name: m, capabilities: [chat, tools], deployments: [{backend: b, upstream_model: x}]}
routes:
  - {name: chat, models: [m]}
tenants:
  - {name: acme}
rules:
  - {name: team, when: {header: {name: X-Team, equals: a}}, then: {objective: cost}}
"""


@settings(max_examples=100, deadline=None)
@given(
    route=st.sampled_from(["chat", "nope", "x" * 300]),
    tokens=st.integers(0, 10**6),
    max_tokens=st.none() | st.integers(1, 10**5),
    needs=st.frozensets(st.sampled_from(["tools", "vision", "json"])),
    headers=st.dictionaries(st.sampled_from(["x-team", "authorization", "x-other"]), st.text(max_size=5)),
    client_id=st.none() | st.just("") | st.text(min_size=1, max_size=300),
    rule_headers=st.booleans(),
)
def test_a_recent_entry_reads_back_the_feature_line_the_request_had(
    route: str,
    tokens: int,
    max_tokens: int | None,
    needs: frozenset[str],
    headers: dict[str, str],
    client_id: str | None,
    rule_headers: bool,
) -> None:
    """The ring keeps what the route stage had and builds the feature line when read: the same line,
    field for field, as one built at decision time (only the headers the rules read; no other header)."""
    text = RING_POLICY if rule_headers else RING_POLICY.split("rules:")[0]
    index = PolicyIndex(msgspec.convert(yaml.safe_load(text), PolicySet))
    ring = RecentDecisions()
    log = RecentLog(ring, index)
    ctx = RequestContext(request_id="req_1", operation="chat", started=0.0, headers=headers)
    ctx.principal = Principal(tenant="acme", key_id="k", allowed_routes=None)
    ctx.client_request_id = client_id
    ctx.decision_id = "d1"
    features = RequestFeatures(
        route=route, prompt_tokens=tokens, max_tokens=max_tokens, needs=needs, headers=headers, ingress_region="eu-west"
    )
    plan: RoutePlan | GatewayError
    try:
        plan = decide(index, ctx.principal, features, LiveState(), decision_id="d1")
    except GatewayError as exc:
        plan = exc
    log.observe(ctx, features, LiveState(), plan)
    (entry,) = ring.newest_first()
    expected = FeatureLine(
        ts=entry.ts,
        route=route[:200],
        tenant="acme",
        operation="chat",
        prompt_tokens=tokens,
        max_tokens=max_tokens,
        needs=tuple(sorted(needs)),
        headers={"x-team": headers["x-team"]} if rule_headers and "x-team" in headers else {},
        deployment=None if isinstance(plan, GatewayError) else plan.targets[0].label,
        ingress_region="eu-west",  # what `policy diff` replays for tenants that require one
    )
    assert msgspec.json.encode(entry.features) == msgspec.json.encode(expected)
    assert entry.route == route[:200] and entry.client_request_id == ((client_id or None) and client_id[:200])
    assert entry.choice == ("m@b" if isinstance(plan, RoutePlan) else f"refused {plan.status} {plan.code}")


@given(
    st.lists(st.floats(min_value=0.001, max_value=100, allow_nan=False), min_size=1, max_size=200),
    st.sampled_from([0.5, 0.95, 0.99]),
)
def test_quantile_lies_in_the_bucket_that_holds_the_rank(values: list[float], q: float) -> None:
    bounds = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, math.inf]
    buckets = [(b, float(sum(v <= b for v in values))) for b in bounds]
    got = quantile(q, buckets)
    assert got is not None
    rank = q * len(values)
    upper = next(b for b, c in buckets if c >= rank)
    lower = max([0.0] + [b for b, c in buckets if c < rank])
    if math.isinf(upper):
        assert got == lower
    else:
        assert lower <= got <= upper


def test_quantile_of_nothing_is_none() -> None:
    assert quantile(0.5, []) is None
    assert quantile(0.5, [(1.0, 0.0), (math.inf, 0.0)]) is None


def test_spill_history_is_per_minute_differences_of_the_served_counters() -> None:
    metrics = Metrics()
    now = [1000.0]
    history = MetricHistory(metrics, clock=lambda: now[0])
    assert history.points() == []
    history.sample()
    metrics.child(metrics.served_requests, "chat", "edge", "false").inc(3)
    metrics.child(metrics.served_requests, "chat", "provider", "true").inc(2)
    now[0] = 1060.0
    history.sample()
    metrics.child(metrics.served_requests, "chat", "provider", "true").inc(1)
    now[0] = 1090.0
    points = history.points()
    assert [(p.ts, p.by_tier, p.spilled) for p in points] == [
        (1060.0, {"edge": 3, "provider": 2}, 2),
        (1090.0, {"provider": 1}, 1),  # the minute under way
    ]


def test_backends_show_ejections_and_no_backend_secrets(client: TestClient[object]) -> None:
    tenant = {"authorization": f"Bearer {TENANT}"}
    for _ in range(2):
        assert client.post("/v1/chat/completions", json={**CHAT, "model": "flaky"}, headers=tenant).status_code >= 500
    doc = client.get("/admin/api/backends", headers=_admin()).json()
    broken = next(b for b in doc["data"] if b["name"] == "broken")
    assert (
        broken["healthy"] is False
        and broken["ejected_for_s"] > 0
        and "2 consecutive failures" in broken["ejection_reason"]
    )
    assert sorted(e["key"] for e in doc["ejections"]) == ["broken", "m-broken@broken"]  # the backend and its deployment
    page = client.get("/ui/backends", headers=_admin()).text
    assert "Ejection history" in page and "2 consecutive failures" in page


def test_the_login_page_warns_when_the_session_cookie_cannot_be_kept(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    app = create_app(Settings(policy_path=str(policy), spool_dir=str(tmp_path / "spool")))
    warning = "plain HTTP from another machine"
    with TestClient(app, base_url="http://console.example.org") as plain:
        assert warning in plain.get("/ui/login").text
        assert warning not in plain.get("/ui/login", headers={"x-forwarded-proto": "https"}).text
    with TestClient(app, base_url="http://127.0.0.1:8080") as local:
        assert warning not in local.get("/ui/login").text


def test_any_pasted_text_is_checked_never_a_server_error(tmp_path: Path) -> None:
    with _client(tmp_path) as client:

        @settings(max_examples=30, deadline=None)
        @given(st.text(max_size=400))
        def paste(text: str) -> None:
            r = client.post("/admin/api/policy/check", json={"policy": text}, headers=_admin())
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["ok"] is (body["errors"] == 0)
            assert all(p.startswith("candidate.yaml:") for p in body["problems"])

        paste()

"""The console (issue 15) in a real browser: Debian's chromium driven by Playwright, against a real `strait serve`
of the demo policy (simulated backends) that has served some traffic. One gateway and one browser for the module.

Screenshots of every page go to `test-artifacts/ui/` at the repository root (gitignored; STRAIT_UI_ARTIFACTS
moves them). Skipped, saying so, only when no chromium is installed (`make test` installs it where apt can).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from gateway.policy.index import key_digest
from tests.harness.gateway import gateway_process
from tests.harness.procs import ServerProcess
from tests.harness.waiting import poll

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "policies" / "demo.yaml"
ADMIN_KEY = "sk-strait-admin-demo"
DEMO_KEY = "sk-strait-demo"
BETA_KEY = "sk-ui-beta-canary-5c1d"
CHROMIUM = os.environ.get("STRAIT_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("STRAIT_UI_ARTIFACTS", ROOT / "test-artifacts" / "ui"))
CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}

if not Path(CHROMIUM).exists():
    pytest.skip(
        f"no chromium at {CHROMIUM}: install Debian's `chromium` (make deploy-tools does, as root with apt-get) "
        "or point STRAIT_CHROMIUM at one",
        allow_module_level=True,
    )
playwright_sync = pytest.importorskip("playwright.sync_api")


def _policy_text() -> str:
    """The demo policy without its semantic cache (no embedding model to load) and with a second tenant,
    allowed only `chat-edge`, so that refusals by tenant have something to show."""
    doc: dict[str, Any] = yaml.safe_load(DEMO.read_text())
    doc.pop("cache", None)
    for tenant in doc["tenants"]:
        tenant.pop("cache", None)
    doc["tenants"].append(
        {
            "name": "beta",
            "keys": [{"id": "beta-key-1", "digest": key_digest(BETA_KEY)}],
            "allowed_routes": ["chat-edge"],
            "budgets": {"tenant": {"usd_per_day": 1.0}},
        }
    )
    return yaml.safe_dump(doc, sort_keys=False)


class Traffic:
    def __init__(self) -> None:
        self.request_ids: list[str] = []
        self.client_id = "ui-test-client-id-1"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Path, Traffic]]:
    folder = tmp_path_factory.mktemp("ui")
    policy = folder / "policy.yaml"
    policy.write_text(_policy_text())
    env = {"STRAIT_SPOOL_DIR": str(folder / "spool")}
    with gateway_process(policy, log_path=folder / "gateway.log", env=env) as proc:
        traffic = Traffic()
        with httpx.Client(base_url=proc.base_url, timeout=30) as c:
            demo = {"authorization": f"Bearer {DEMO_KEY}"}
            for i in range(4):
                headers = {**demo, "x-request-id": traffic.client_id} if i == 0 else demo
                r = c.post("/v1/chat/completions", json=CHAT, headers=headers)
                assert r.status_code == 200, r.text
                traffic.request_ids.append(r.headers["x-strait-request-id"])
            r = c.post("/v1/chat/completions", json={**CHAT, "model": "chat-cloud"}, headers=demo)
            assert r.status_code == 200, r.text
            beta = {"authorization": f"Bearer {BETA_KEY}"}
            assert c.post("/v1/chat/completions", json={**CHAT, "model": "chat-edge"}, headers=beta).status_code == 200
            # Refusals: beta on a route it may not use (twice), and a key nobody has.
            for _ in range(2):
                assert c.post("/v1/chat/completions", json=CHAT, headers=beta).status_code in (403, 404)
            bad = {"authorization": "Bearer sk-nobody"}
            assert c.post("/v1/chat/completions", json=CHAT, headers=bad).status_code == 401
            # The usage writer hands records to the ledger in the background: wait until all six are counted.
            admin = {"authorization": f"Bearer {ADMIN_KEY}"}
            assert poll(lambda: sum(r["requests"] for r in c.get("/admin/usage", headers=admin).json()["data"]) == 6)
        yield proc, policy, traffic


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with playwright_sync.sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def session(browser: Any, served: tuple[ServerProcess, Path, Traffic]) -> Iterator[tuple[Any, list[str]]]:
    """A logged-in page (through the login form) and the CSP violations the browser reported."""
    proc = served[0]
    context = browser.new_context(base_url=proc.base_url, viewport={"width": 1280, "height": 900})
    page = context.new_page()
    violations: list[str] = []
    page.on("console", lambda msg: violations.append(msg.text) if "Content Security Policy" in msg.text else None)
    page.goto("/ui")
    assert page.url.endswith("/ui/login")
    page.screenshot(path=str(ARTIFACTS / "login.png"))
    page.fill("#key", ADMIN_KEY)
    page.click("button[type=submit]")
    page.wait_for_url(re.compile(r"/ui$"))
    yield page, violations
    context.close()


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', line[len(name) : line.index("}") + 1]))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _admin_get(proc: ServerProcess, path: str) -> httpx.Response:
    return httpx.get(proc.base_url + path, headers={"authorization": f"Bearer {ADMIN_KEY}"}, timeout=30)


def test_session_cookie_is_opaque_and_locked_down(session: tuple[Any, list[str]]) -> None:
    page, _ = session
    cookies = {c["name"]: c for c in page.context.cookies()}
    cookie = cookies["strait_console"]
    assert cookie["httpOnly"] and cookie["secure"] and cookie["sameSite"] == "Strict"
    assert ADMIN_KEY not in cookie["value"] and key_digest(ADMIN_KEY).split(":")[1] not in cookie["value"]
    assert ADMIN_KEY not in page.url


def test_overview_figures_match_metrics_and_usage(
    session: tuple[Any, list[str]], served: tuple[ServerProcess, Path, Traffic]
) -> None:
    page, violations = session
    proc = served[0]
    page.goto("/ui")
    metrics = httpx.get(proc.base_url + "/metrics", timeout=30).text
    for route in ("chat", "chat-cloud", "chat-edge"):
        shown = page.inner_text(f'[data-figure="requests:{route}"]')
        assert int(shown.replace(",", "")) == int(_metric(metrics, "strait_requests_total", route=route))
    assert page.inner_text('[data-figure="requests:chat"]') == "4"
    assert int(page.inner_text('[data-figure="refused"]')) == int(_metric(metrics, "strait_refusals_total")) == 3
    usage = _admin_get(proc, "/admin/usage").json()["data"]
    for tenant in ("demo", "beta"):
        spent = sum(row["cost_usd"] for row in usage if row["tenant"] == tenant)
        assert spent > 0
        assert page.inner_text(f'[data-figure="spend:{tenant}"]') == f"${spent:,.6f}"
    assert page.locator("svg.chart").count() >= 3  # latency, tiers, answers by tier per minute
    assert "Answers by serving tier per minute" in page.inner_text("main")
    page.screenshot(path=str(ARTIFACTS / "overview.png"), full_page=True)
    assert not violations, violations


def test_pages_refresh_themselves(session: tuple[Any, list[str]], served: tuple[ServerProcess, Path, Traffic]) -> None:
    """The script fetches the page again every 10 s (the browser's clock is driven here, not waited for)."""
    page = session[0].context.new_page()
    try:
        page.clock.install()
        page.goto("/ui")
        shown = int(page.inner_text('[data-figure="requests:chat"]'))
        r = httpx.post(
            served[0].base_url + "/v1/chat/completions", json=CHAT, headers={"authorization": f"Bearer {DEMO_KEY}"}
        )
        assert r.status_code == 200
        page.clock.run_for(11_000)
        # Polled from here: wait_for_function evaluates a string, which the page's CSP (no unsafe-eval) may refuse.
        assert poll(lambda: page.inner_text('[data-figure="requests:chat"]') == str(shown + 1))
        assert page.inner_text("#refreshed").startswith("Updated")
    finally:
        page.close()


def test_a_request_id_leads_to_its_decision_table(
    session: tuple[Any, list[str]], served: tuple[ServerProcess, Path, Traffic]
) -> None:
    page, _ = session
    traffic = served[2]
    request_id = traffic.request_ids[0]
    page.goto("/ui/decisions")
    page.screenshot(path=str(ARTIFACTS / "decisions.png"), full_page=True)
    page.fill("input[name=q]", request_id)
    page.press("input[name=q]", "Enter")
    page.wait_for_url(re.compile(r"q=" + request_id))
    page.click(f"text={request_id}")
    page.wait_for_url(re.compile(f"/ui/decisions/{request_id}$"))
    table = page.locator("table.decision")
    rows = table.locator("tbody tr")
    assert rows.count() == 2  # the chat route's two candidates: the edge box and the cloud
    text = table.inner_text()
    assert "llama-3.1-8b-edge@edge-box" in text and "frontier-cloud@cloud-api" in text
    assert rows.first.locator("td").nth(2).inner_text() == "1"  # ranked first
    assert page.inner_text("main").count(traffic.client_id) == 1  # the client's x-request-id, recorded
    page.screenshot(path=str(ARTIFACTS / "decision.png"), full_page=True)
    # The client's own x-request-id finds the same request.
    page.goto(f"/ui/decisions?q={traffic.client_id}")
    assert page.locator(f"a:has-text('{request_id}')").count() == 1


def test_tenants_show_key_ids_refusals_and_never_digests(
    session: tuple[Any, list[str]], served: tuple[ServerProcess, Path, Traffic]
) -> None:
    page, _ = session
    proc = served[0]
    page.goto("/ui/tenants")
    metrics = httpx.get(proc.base_url + "/metrics", timeout=30).text
    html = page.content()
    assert "beta-key-1" in html and "sha256:" not in html and BETA_KEY not in html
    refused = page.locator('[data-figure^="refusal:beta:"]')
    assert refused.count() >= 1
    for i in range(refused.count()):
        code = refused.nth(i).get_attribute("data-figure").split(":", 2)[2]  # type: ignore[union-attr]
        assert int(refused.nth(i).inner_text()) == int(
            _metric(metrics, "strait_refusals_total", tenant="beta", code=code)
        )
    assert int(_metric(metrics, "strait_refusals_total", tenant="beta")) == 2
    usage = _admin_get(proc, "/admin/usage?tenant=beta").json()["data"]
    assert page.inner_text('[data-figure="tenant-requests:beta"]') == str(sum(r["requests"] for r in usage))
    page.screenshot(path=str(ARTIFACTS / "tenants.png"), full_page=True)


def test_backends_page(session: tuple[Any, list[str]]) -> None:
    page, _ = session
    page.goto("/ui/backends")
    text = page.inner_text("main")
    for fact in ("edge-box", "cloud-api", "office-rack", "eu-west", "example-cloud", "llama-3.1-8b-edge@edge-box"):
        assert fact in text
    assert "sk-" not in page.content()
    page.screenshot(path=str(ARTIFACTS / "backends.png"), full_page=True)


def test_pasting_a_bad_policy_shows_file_line_errors_and_a_good_one_a_diff(session: tuple[Any, list[str]]) -> None:
    page, violations = session
    page.goto("/ui/policy")
    page.fill("#policy-text", "version: 1\nroutes:\n  - name: x\n    modles: [a]\n")
    page.click("form.candidate button[type=submit]")
    page.wait_for_selector("#check-verdict")
    assert "refused" in page.inner_text("#check-verdict")
    problems = page.inner_text("#check-problems")
    assert re.search(r"candidate\.yaml:4:\d+: .*modles", problems), problems
    page.screenshot(path=str(ARTIFACTS / "policy-bad.png"), full_page=True)
    page.fill("#policy-text", _policy_text().replace("threshold: 1.0", "threshold: 0.9"))
    page.click("form.candidate button[type=submit]")
    page.wait_for_load_state()
    assert "loads" in page.inner_text("#check-verdict"), page.inner_text("main")
    assert "sampled requests" in page.inner_text("#check-diff")
    page.screenshot(path=str(ARTIFACTS / "policy-diff.png"), full_page=True)
    assert not violations, violations


def test_tenant_keys_get_403_and_every_answer_carries_the_security_headers(
    served: tuple[ServerProcess, Path, Traffic],
) -> None:
    proc = served[0]
    tenant = {"authorization": f"Bearer {DEMO_KEY}"}
    with httpx.Client(base_url=proc.base_url, timeout=30) as c:
        for path in ("/ui", "/ui/policy", "/admin/api/overview", "/admin/api/decisions"):
            assert c.get(path, headers=tenant).status_code == 403
        assert c.get("/ui", follow_redirects=False).status_code == 303
        assert c.get("/admin/api/tenants").status_code == 401
        # A form post without its session's CSRF token changes nothing (here: bearer-less, cookie-less).
        assert c.post("/ui/policy", data={"policy": "x"}, follow_redirects=False).status_code == 303
        for path in ("/ui", "/ui/tenants", "/ui/login"):
            r = c.get(path, headers={"authorization": f"Bearer {ADMIN_KEY}"})
            assert r.status_code == 200
            csp = r.headers["content-security-policy"]
            assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
            assert r.headers["x-frame-options"] == "DENY"
            assert "<script>" not in r.text and " style=" not in r.text


def test_phone_layout_dark_scheme_and_keyboard(browser: Any, served: tuple[ServerProcess, Path, Traffic]) -> None:
    proc = served[0]
    context = browser.new_context(
        base_url=proc.base_url,
        viewport={"width": 390, "height": 844},
        color_scheme="dark",
        extra_http_headers={"authorization": f"Bearer {ADMIN_KEY}"},
    )
    try:
        page = context.new_page()
        page.goto("/ui")
        # The page itself never scrolls sideways on a phone: wide tables scroll in their own box.
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")
        background = page.evaluate("getComputedStyle(document.body).backgroundColor")
        channels = [int(x) for x in re.findall(r"\d+", background)[:3]]
        assert sum(channels) < 3 * 80, background  # dark
        page.keyboard.press("Tab")
        assert page.evaluate("document.activeElement.className") == "skip"
        page.keyboard.press("Enter")
        assert page.evaluate("document.activeElement.id") == "main"
        page.screenshot(path=str(ARTIFACTS / "overview-phone-dark.png"), full_page=True)
    finally:
        context.close()


def test_a_refused_reload_shows_its_file_line_errors(
    session: tuple[Any, list[str]], served: tuple[ServerProcess, Path, Traffic]
) -> None:
    """Last: it breaks the served policy file (the gateway keeps serving the old one)."""
    page, _ = session
    proc, policy, _ = served
    policy.write_text(_policy_text() + "\nbogus_section: true\n")
    assert poll(lambda: _admin_get(proc, "/admin/api/policy").json()["last_rejected_errors"] or None, timeout=30)
    page.goto("/ui/policy")
    text = page.inner_text("main")
    assert re.search(re.escape(str(policy)) + r":\d+:\d+: .*bogus_section", text), text
    page.screenshot(path=str(ARTIFACTS / "policy-rejected.png"), full_page=True)


def test_learning_loop_page_shows_the_captures_the_store_holds(
    session: tuple[Any, list[str]], served: tuple[ServerProcess, Path, Traffic]
) -> None:
    page, violations = session
    proc = served[0]

    def written() -> float:
        # The capture writer stores off the request path: settled once every queued record is written.
        text = httpx.get(proc.base_url + "/metrics", timeout=30).text
        queued = _metric(text, "strait_capture_records_total", result="queued")
        done = _metric(text, "strait_capture_records_total", result="written")
        return done if queued > 0 and done == queued else -1.0

    assert poll(lambda: written() > 0)
    stored = int(written())
    doc = _admin_get(proc, "/admin/api/loop").json()
    assert doc["capture"] == "on" and doc["store"] == "sqlite"
    captured = {(v["tenant"], v["route"]): v["records"] for v in doc["volume"]}
    # The demo tenant consents (every answered request on chat, which only it may use, and 1 on chat-cloud); beta
    # does not.
    metrics = httpx.get(proc.base_url + "/metrics", timeout=30).text
    answered_chat = int(_metric(metrics, "strait_requests_total", route="chat", status="200"))
    assert answered_chat >= 4
    assert captured == {("demo", "chat"): answered_chat, ("demo", "chat-cloud"): 1}
    # The writer also stored the demo's shadow copies of chat (beside their live records; not requests).
    assert sum(captured.values()) + doc["shadow_captured"] == stored
    page.goto("/ui/loop")
    for (tenant, route), n in captured.items():
        assert page.inner_text(f'[data-figure="captured:{tenant}:{route}"]') == str(n)
    assert page.inner_text('[data-figure="writer:written"]') == str(stored)
    text = page.inner_text("main")
    assert "Feedback per route and model" in text and "Shadow copies by route and outcome" in text
    assert "Capture is off" not in text and "hi" not in page.inner_text("table")
    # Live vs candidate for the demo's shadow (chat) and canary (chat-edge), as `strait datasets compare`.
    assert doc["trials_state"] == "ok"
    trials = {(t["route"], t["kind"]): t for t in doc["trials"]}
    assert set(trials) == {("chat", "shadow"), ("chat-edge", "canary")}, set(trials)
    for (route, kind), t in trials.items():
        assert f"Route {route}: live vs candidate {t['candidate']} ({kind})" in text
    shadow = trials[("chat", "shadow")]["comparison"]["shadow"]
    if shadow["live"]["records"] or shadow["candidate"]["records"]:
        pairs = page.inner_text(f'[data-figure="pairs:chat:{trials[("chat", "shadow")]["candidate"]}"]')
        assert pairs == f"{shadow['pairs']:,}"
    page.screenshot(path=str(ARTIFACTS / "loop.png"), full_page=True)
    assert not violations, violations

"""The console's routes: the HTML pages under /ui, their JSON under /admin/api (docs/console.md), the login
and logout forms, and the two static files. Every page and document goes through one gate (`_admit`): admin
keys only, by session cookie or Authorization header; forms carry their session's CSRF token."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import msgspec
from litestar import Request, Response, get, post
from litestar.handlers import HTTPRouteHandler

from gateway.api.console import data, pages
from gateway.api.console.access import (
    Sessions,
    Verdict,
    cleared_cookie,
    csrf_ok,
    identify,
    session_cookie,
)
from gateway.api.console.candidate import MAX_CANDIDATE_BYTES, CheckResult, check_candidate
from gateway.api.console.history import SpillHistory
from gateway.api.console.html import page
from gateway.errors import AuthenticationFailed, InvalidRequest, NotFound, PayloadTooLarge, PermissionDenied
from gateway.policy.index import key_digest
from gateway.reload import PolicyReloader
from gateway.reply import JSON
from gateway.runtime import Gateway

# Litestar adds `; charset=utf-8` to text types itself.
HTML = "text/html"
# No inline script or style, nothing from elsewhere, no framing; forms post only here.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "content-security-policy": CSP,
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    # same-origin, not no-referrer: with no-referrer a browser sends `Origin: null` on its own form posts.
    "referrer-policy": "same-origin",
    "cache-control": "no-store",
}
# The login form's own CSRF token (no session yet): a double-submit cookie.
LOGIN_COOKIE = "strait_console_login"
# A form body: the policy text URL-encoded (up to 3 bytes per byte) and a few short fields.
MAX_FORM_BYTES = 3 * MAX_CANDIDATE_BYTES + 4096
MAX_QUERY_TEXT = 200
STATIC = Path(__file__).parent / "static"
_STATIC_TYPES = {"console.js": "text/javascript", "console.css": "text/css"}
# Candidate checks at once (each a policy load in a worker thread).
CHECKS_AT_ONCE = 2


class CheckBody(msgspec.Struct, forbid_unknown_fields=True):
    policy: str


def _headers(request: Request[Any, Any, Any]) -> dict[str, str]:
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in request.scope["headers"]}


def _html(body: str, status: int = 200, headers: dict[str, str] | None = None) -> Response[bytes]:
    return Response(body.encode(), status_code=status, media_type=HTML, headers={**SECURITY_HEADERS, **(headers or {})})


def _json(doc: object) -> Response[bytes]:
    return Response(msgspec.json.encode(doc), media_type=JSON, headers=SECURITY_HEADERS)


def _see_other(location: str, headers: dict[str, str] | None = None) -> Response[bytes]:
    return Response(b"", status_code=303, headers={**SECURITY_HEADERS, "location": location, **(headers or {})})


async def _body(request: Request[Any, Any, Any], limit: int) -> bytes:
    out = bytearray()
    async for chunk in request.stream():
        out += chunk
        if len(out) > limit:
            raise PayloadTooLarge(f"A console form is at most {limit} bytes.")
    return bytes(out)


async def _form(request: Request[Any, Any, Any]) -> dict[str, str]:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/x-www-form-urlencoded":
        raise InvalidRequest("A console form is sent as application/x-www-form-urlencoded.")
    raw = await _body(request, MAX_FORM_BYTES)
    try:
        fields = parse_qs(raw.decode("utf-8"), keep_blank_values=True, max_num_fields=8, strict_parsing=False)
    except (UnicodeDecodeError, ValueError):
        raise InvalidRequest("The form could not be read.") from None
    return {k: v[0] for k, v in fields.items() if v}


def _same_origin(request: Request[Any, Any, Any]) -> bool:
    """A browser's POST says where it comes from; one from another site is refused whatever it carries."""
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        return origin is None
    return urlsplit(origin).netloc == request.headers.get("host", "")


def _plain_http(request: Request[Any, Any, Any]) -> bool:
    """Reached over plain HTTP from elsewhere than this machine: a browser will not keep the Secure session cookie
    (loopback names are secure contexts; a TLS proxy in front says so in X-Forwarded-Proto)."""
    if request.scope.get("scheme") == "https" or request.headers.get("x-forwarded-proto", "").lower() == "https":
        return False
    host = urlsplit("//" + request.headers.get("host", "")).hostname or ""
    return host not in ("127.0.0.1", "localhost", "::1") and not host.endswith(".localhost")


def _query(request: Request[Any, Any, Any], name: str) -> str:
    return str(request.query_params.get(name) or "")[:MAX_QUERY_TEXT].strip()


def build_console_handlers(
    gateway: Gateway, reloader: PolicyReloader, adapters: Iterable[str], history: SpillHistory | None = None
) -> list[HTTPRouteHandler]:
    sessions = Sessions()
    adapter_names = list(adapters)
    checks = asyncio.Semaphore(CHECKS_AT_ONCE)
    static = {name: (STATIC / name).read_bytes() for name in _STATIC_TYPES}

    def verdict_of(request: Request[Any, Any, Any]) -> Verdict:
        return identify(gateway.runtime.index, sessions, _headers(request))

    def api_gate(request: Request[Any, Any, Any]) -> Verdict:
        verdict = verdict_of(request)
        if verdict.kind == "tenant":
            raise PermissionDenied("The console's API is for admin keys only (server.admin_keys in the policy).")
        if verdict.kind != "admin":
            raise AuthenticationFailed("An admin key is required (server.admin_keys in the policy).")
        return verdict

    def page_gate(request: Request[Any, Any, Any]) -> Verdict | Response[bytes]:
        """The verdict, or the answer instead of the page: the login page's address, or 403 for a tenant key."""
        verdict = verdict_of(request)
        if verdict.kind == "tenant":
            return _html(pages.forbidden(), 403)
        if verdict.kind != "admin":
            return _see_other("/ui/login")
        return verdict

    def csrf_of(verdict: Verdict) -> str | None:
        return None if verdict.session is None else verdict.session.csrf

    # ---- static files and the session ----

    @get("/ui/static/{name:str}")
    async def static_file(request: Request[Any, Any, Any]) -> Response[bytes]:
        name = str(request.path_params["name"])
        if name not in static:
            raise NotFound(f"Unknown path {request.url.path}.")
        return Response(
            static[name], media_type=_STATIC_TYPES[name], headers={**SECURITY_HEADERS, "cache-control": "no-cache"}
        )

    def login_page(request: Request[Any, Any, Any], error: str | None = None, status: int = 200) -> Response[bytes]:
        token = secrets.token_urlsafe(32)
        cookie = f"{LOGIN_COOKIE}={token}; Path=/ui/login; Max-Age=3600; HttpOnly; Secure; SameSite=Strict"
        return _html(pages.login(token, error, plain_http=_plain_http(request)), status, {"set-cookie": cookie})

    @get("/ui/login")
    async def login_form(request: Request[Any, Any, Any]) -> Response[bytes]:
        return login_page(request)

    @post("/ui/login", status_code=200)
    async def login(request: Request[Any, Any, Any]) -> Response[bytes]:
        form = await _form(request)
        expected = request.cookies.get(LOGIN_COOKIE)
        presented = form.get("csrf")
        if (
            not _same_origin(request)
            or not expected
            or not presented
            or not secrets.compare_digest(expected.encode(), presented.encode())
        ):
            return login_page(request, "The form expired; try again.", 403)
        key = form.get("key", "").strip()
        if not key or len(key) > 512:
            return login_page(request, "Enter an admin key.", 401)
        digest = key_digest(key)
        index = gateway.runtime.index
        if digest not in index.admin_digests:
            if digest in index.principals:
                return _html(pages.forbidden(), 403)
            return login_page(request, "That key is not an admin key of this gateway.", 401)
        session = sessions.open(digest)
        return _see_other("/ui", {"set-cookie": session_cookie(session)})

    @post("/ui/logout", status_code=200)
    async def logout(request: Request[Any, Any, Any]) -> Response[bytes]:
        verdict = verdict_of(request)
        form = await _form(request)
        if verdict.session is not None and _same_origin(request) and csrf_ok(verdict, form.get("csrf")):
            sessions.close(verdict.session.id)
        return _see_other("/ui/login", {"set-cookie": cleared_cookie()})

    # ---- the pages ----

    @get("/ui")
    async def overview_page(request: Request[Any, Any, Any]) -> Response[bytes]:
        gate = page_gate(request)
        if isinstance(gate, Response):
            return gate
        return _html(pages.overview(await data.overview(gateway, reloader, history), csrf_of(gate)))

    @get("/ui/decisions")
    async def decisions_page(request: Request[Any, Any, Any]) -> Response[bytes]:
        gate = page_gate(request)
        if isinstance(gate, Response):
            return gate
        doc = data.search_decisions(gateway, _query(request, "q"), _query(request, "tenant"), _query(request, "route"))
        return _html(pages.decisions(doc, csrf_of(gate)))

    @get("/ui/decisions/{request_id:str}")
    async def decision_page(request: Request[Any, Any, Any]) -> Response[bytes]:
        gate = page_gate(request)
        if isinstance(gate, Response):
            return gate
        found = data.decision_detail(gateway, str(request.path_params["request_id"])[:MAX_QUERY_TEXT])
        if found is None:
            body = "<p>No decision with this id is kept on this replica (it keeps the most recent ones).</p>"
            return _html(page("Decision not found", "/ui/decisions", body, csrf=csrf_of(gate), refresh=False), 404)
        return _html(pages.decision(found, csrf_of(gate)))

    @get("/ui/tenants")
    async def tenants_page(request: Request[Any, Any, Any]) -> Response[bytes]:
        gate = page_gate(request)
        if isinstance(gate, Response):
            return gate
        return _html(pages.tenants(await data.tenants(gateway), csrf_of(gate)))

    @get("/ui/backends")
    async def backends_page(request: Request[Any, Any, Any]) -> Response[bytes]:
        gate = page_gate(request)
        if isinstance(gate, Response):
            return gate
        return _html(pages.backends(data.backends(gateway), csrf_of(gate)))

    @get("/ui/policy")
    async def policy_page(request: Request[Any, Any, Any]) -> Response[bytes]:
        gate = page_gate(request)
        if isinstance(gate, Response):
            return gate
        return _html(pages.policy(data.policy_status(gateway, reloader), csrf_of(gate)))

    async def run_check(text: str) -> CheckResult:
        if len(text.encode()) > MAX_CANDIDATE_BYTES:
            raise PayloadTooLarge(f"A candidate policy is at most {MAX_CANDIDATE_BYTES} bytes.")
        ring = gateway.services.recent
        samples = [] if ring is None else [entry.features for entry in ring.newest_first()]
        async with checks:
            return await asyncio.to_thread(check_candidate, text, adapter_names, gateway.runtime.index, samples)

    @post("/ui/policy", status_code=200)
    async def policy_check_page(request: Request[Any, Any, Any]) -> Response[bytes]:
        gate = page_gate(request)
        if isinstance(gate, Response):
            return gate
        form = await _form(request)
        if not _same_origin(request) or not csrf_ok(gate, form.get("csrf")):
            return _html(
                page(
                    "Forbidden",
                    "/ui/policy",
                    "<p>The form expired; reload the page.</p>",
                    csrf=csrf_of(gate),
                    refresh=False,
                ),
                403,
            )
        text = form.get("policy", "")
        result = await run_check(text)
        return _html(pages.policy(data.policy_status(gateway, reloader), csrf_of(gate), candidate=text, result=result))

    # ---- the JSON documents (docs/console.md) ----

    @get("/admin/api/overview")
    async def overview_api(request: Request[Any, Any, Any]) -> Response[bytes]:
        api_gate(request)
        return _json(await data.overview(gateway, reloader, history))

    @get("/admin/api/decisions")
    async def decisions_api(request: Request[Any, Any, Any]) -> Response[bytes]:
        api_gate(request)
        return _json(
            data.search_decisions(gateway, _query(request, "q"), _query(request, "tenant"), _query(request, "route"))
        )

    @get("/admin/api/decisions/{request_id:str}")
    async def decision_api(request: Request[Any, Any, Any]) -> Response[bytes]:
        api_gate(request)
        found = data.decision_detail(gateway, str(request.path_params["request_id"])[:MAX_QUERY_TEXT])
        if found is None:
            raise NotFound("No decision with this id is kept on this replica.")
        return _json(found)

    @get("/admin/api/tenants")
    async def tenants_api(request: Request[Any, Any, Any]) -> Response[bytes]:
        api_gate(request)
        return _json(await data.tenants(gateway))

    @get("/admin/api/backends")
    async def backends_api(request: Request[Any, Any, Any]) -> Response[bytes]:
        api_gate(request)
        return _json(data.backends(gateway))

    @get("/admin/api/policy")
    async def policy_api(request: Request[Any, Any, Any]) -> Response[bytes]:
        api_gate(request)
        return _json(data.policy_status(gateway, reloader))

    @post("/admin/api/policy/check", status_code=200)
    async def policy_check_api(request: Request[Any, Any, Any]) -> Response[bytes]:
        verdict = api_gate(request)
        # By session cookie (a page's script): the session's token in a header, as a form would carry it.
        if not csrf_ok(verdict, request.headers.get("x-csrf-token")):
            raise PermissionDenied("A session needs its CSRF token in x-csrf-token.")
        raw = await _body(request, MAX_CANDIDATE_BYTES + 4096)
        try:
            body = msgspec.json.decode(raw, type=CheckBody)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise InvalidRequest(f'Invalid body: {exc}; send {{"policy": "<YAML text>"}}.', param="policy") from None
        return _json(await run_check(body.policy))

    return [
        static_file,
        login_form,
        login,
        logout,
        overview_page,
        decisions_page,
        decision_page,
        tenants_page,
        backends_page,
        policy_page,
        policy_check_page,
        overview_api,
        decisions_api,
        decision_api,
        tenants_api,
        backends_api,
        policy_api,
        policy_check_api,
    ]

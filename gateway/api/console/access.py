"""Who may see the console: admin keys only (`server.admin_keys` in the policy), by a session cookie or by
`Authorization: Bearer <admin key>`; tenant keys get 403.

A session is an opaque id minted here (never the key, never derived from it), kept in a bounded in-memory
store with an absolute expiry, and remembers which admin digest opened it: a session dies with its key when
a reload drops that key from the policy. Each session has its own CSRF token, which every form carries; a
request let in by its Authorization header needs none (browsers never add that header on their own).
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

from gateway.policy.index import PolicyIndex, key_digest
from gateway.stages.auth import bearer_key

COOKIE = "strait_console"
# Sessions kept at once (the oldest goes first) and how long one lives.
MAX_SESSIONS = 1000
SESSION_TTL_S = 8 * 3600.0


@dataclass(frozen=True, slots=True)
class Session:
    id: str
    csrf: str
    digest: str
    expires: float


@dataclass(frozen=True, slots=True)
class Verdict:
    """`admin`: let in (`session` set when by cookie); `tenant`: a valid tenant key (403); `none`: no or
    unknown credentials (401, or the login page)."""

    kind: Literal["admin", "tenant", "none"]
    session: Session | None = None


class Sessions:
    def __init__(self, clock: Callable[[], float] = time.monotonic, *, size: int = MAX_SESSIONS) -> None:
        self._clock = clock
        self._size = size
        self._items: OrderedDict[str, Session] = OrderedDict()

    def open(self, digest: str) -> Session:
        now = self._clock()
        self._expire(now)
        session = Session(secrets.token_urlsafe(32), secrets.token_urlsafe(32), digest, now + SESSION_TTL_S)
        self._items[session.id] = session
        while len(self._items) > self._size:
            self._items.popitem(last=False)
        return session

    def get(self, session_id: str) -> Session | None:
        session = self._items.get(session_id)
        if session is None:
            return None
        if session.expires <= self._clock():
            del self._items[session_id]
            return None
        return session

    def close(self, session_id: str) -> None:
        self._items.pop(session_id, None)

    def _expire(self, now: float) -> None:
        # Sessions are in opening order and all live as long: the expired ones are at the front.
        while self._items:
            first = next(iter(self._items.values()))
            if first.expires > now:
                break
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


def cookie_value(headers: Mapping[str, str]) -> str | None:
    for part in headers.get("cookie", "").split(";"):
        name, sep, value = part.strip().partition("=")
        if sep and name == COOKIE and value:
            return value[:128]
    return None


def identify(index: PolicyIndex, sessions: Sessions, headers: Mapping[str, str]) -> Verdict:
    """The Authorization header first (scripts, tests), then the session cookie (the browser)."""
    key = bearer_key(dict(headers))
    if key is not None:
        digest = key_digest(key)
        if digest in index.admin_digests:
            return Verdict("admin")
        return Verdict("tenant" if digest in index.principals else "none")
    session_id = cookie_value(headers)
    if session_id is not None:
        session = sessions.get(session_id)
        if session is not None and session.digest in index.admin_digests:
            return Verdict("admin", session)
    return Verdict("none")


def csrf_ok(verdict: Verdict, presented: str | None) -> bool:
    """A form's token matches its session's; a request let in by its Authorization header needs none."""
    if verdict.session is None:
        return verdict.kind == "admin"
    return presented is not None and hmac.compare_digest(presented.encode(), verdict.session.csrf.encode())


def session_cookie(session: Session) -> str:
    # Secure: browsers treat http://127.0.0.1 and localhost as secure contexts, so the demo works; anywhere
    # else the console is served over TLS (a proxy in front), as the keys it guards deserve.
    return f"{COOKIE}={session.id}; Path=/; Max-Age={int(SESSION_TTL_S)}; HttpOnly; Secure; SameSite=Strict"


def cleared_cookie() -> str:
    return f"{COOKIE}=; Path=/; Max-Age=0; HttpOnly; Secure; SameSite=Strict"

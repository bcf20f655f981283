"""Where a request's cached answer may come from: its namespace (nothing outside it is ever compared), the
exact tier's key, and the text the semantic tier embeds.

Fail closed: the answer-changing parameters are everything in the canonical Request EXCEPT the fields
listed in `NOT_ANSWER_CHANGING` (and the conversation, which is hashed separately), so a field added to
`Request` later lands in the namespace without anyone remembering to add it. Unknown top-level fields the
client sent (`extra`) are kept too. Every JSON value is re-encoded with sorted keys first, so the same
request in another key order is the same namespace.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from typing import Any, Final

import msgspec

from gateway.canonical import Message, Request, Text

# Bumped when the derivation changes: old entries then sit in other namespaces and simply expire.
SCOPE_VERSION: Final = 1
# Request fields that do not change the answer: how it is delivered (stream, include_usage), who it is
# for in the client's own records (user, metadata), the client's bytes (original); `messages` is hashed
# on its own (the context into the namespace, the last user message into the key).
NOT_ANSWER_CHANGING: Final = frozenset({"messages", "stream", "include_usage", "user", "metadata", "original"})
_BLANK: Final[dict[str, Any]] = {
    "messages": (),
    "stream": False,
    "include_usage": False,
    "user": None,
    "metadata": None,
    "original": None,
}
_SPACES = re.compile(r"\s+")


class Scope(msgspec.Struct, frozen=True):
    namespace: str
    exact_key: str
    query: str | None


def normalise(text: str) -> str:
    """The exact tier's view of a question: Unicode NFC, runs of white space as one space, no white space
    at the ends. Case and punctuation are kept (docs/cache.md: folding them added exact hits on fow-cache
    but changes meaning in general, and the semantic tier catches those pairs anyway)."""
    return _SPACES.sub(" ", unicodedata.normalize("NFC", text)).strip()


def _canonical(value: Any) -> bytes:
    """JSON with every object's keys sorted, opaque (`msgspec.Raw`) values re-encoded the same way."""
    return msgspec.json.encode(msgspec.json.decode(msgspec.json.encode(value)), order="sorted")


def _digest(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        # Length-prefixed, so no two different part lists hash alike.
        h.update(len(data).to_bytes(8, "big"))
        h.update(data)
    return h.hexdigest()


def _plain_text(message: Message) -> str | None:
    if message.content and all(type(p) is Text for p in message.content):
        return "\n".join(p.text for p in message.content if isinstance(p, Text))
    return None


def answer_parameters(request: Request) -> bytes:
    """The canonical encoding of every field that may change the answer (conversation aside)."""
    return _canonical(msgspec.structs.replace(request, **_BLANK))


def scope_of(request: Request, *, tenant: str, route: str, deployment: str, embedder_tag: str = "") -> Scope:
    """The request's namespace, exact key and query. Raises ValueError without a tenant (no tenant, no cache).

    The namespace holds the tenant, route, deployment, the embedder's tag, every answer-changing parameter,
    and every message except a final user message (system prompt, prior turns, and anything after the last
    user turn); the exact key adds that final message (its text normalised); `query` is its text when it is
    plain text, None otherwise (the semantic tier is then skipped).
    """
    if not tenant:
        raise ValueError("no tenant, no cache")
    messages = request.messages
    last = messages[-1] if messages and messages[-1].role == "user" else None
    context = messages[:-1] if last is not None else messages
    namespace = _digest(
        f"strait-cache/{SCOPE_VERSION}",
        tenant,
        route,
        deployment,
        embedder_tag,
        answer_parameters(request),
        _canonical(context),
    )
    text = _plain_text(last) if last is not None else None
    if last is None:
        exact_key = _digest(namespace, "no-final-user-message")
    elif text is not None:
        exact_key = _digest(namespace, "text", _canonical(last.name), normalise(text))
    else:
        exact_key = _digest(namespace, "parts", _canonical(last))
    # Nothing to embed in white space alone: the semantic tier is skipped (the exact tier still applies).
    query = text if text is not None and text.strip() else None
    return Scope(namespace=namespace, exact_key=exact_key, query=query)

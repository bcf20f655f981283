"""Session affinity: which replica keeps a conversation, so its engine's prompt cache stays warm. Pure.

The key. Per tenant (two tenants' "session 1" are different conversations, and no tenant can steer its
requests onto another's warm replica on purpose), one of:
- `prefix`: a hash of the conversation's stable start. Every turn of a chat resends the conversation
  from its beginning, so the leading messages through the first user message (the system or developer
  prompt and the opening question) are the same in turn 1 and turn 7. `prefix_messages: N` hashes the
  first N messages instead (N = 1: conversations sharing a long system prompt share a replica). Chat
  only: a completion's prompt has no turns to find its start by.
- `header`: the value of the header the route names (`x-session-id`), hashed; never logged or shown.

The placement. Rendezvous (highest random weight) hashing: every replica scores hash(key, replica) and
the highest wins. Every gateway replica computes the same winner without sharing any state, and when a
replica leaves (ejected, or gone from the policy) only the conversations it held move, each to its own
next-highest replica; they come back when it returns. A saturated preferred replica is passed over the
same way (its conversations go to their second choice, spread evenly over the others) until it drains.

Computed once per request and only for a route with `affinity`: one hash of the key material and one
small keyed hash per replica.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from typing import Final

import msgspec

from gateway.canonical import Message
from gateway.errors import InvalidRequest
from gateway.policy.index import Target
from gateway.policy.model import AFFINITY_HEADER_MAX, Affinity

KEY_BYTES: Final = 16
_encode = msgspec.json.encode


def stable_prefix(messages: Sequence[Message], count: int | None) -> Sequence[Message]:
    """The messages that stay the same in every turn of a conversation: the first `count`, or (None) the
    leading ones through the first user message."""
    if count is not None:
        return messages[:count]
    for i, m in enumerate(messages):
        if m.role == "user":
            return messages[: i + 1]
    return messages


def conversation_key(
    affinity: Affinity, tenant: str, messages: Sequence[Message], headers: Mapping[str, str]
) -> bytes | str:
    """The conversation's key, or why this request has none (said in explain). Raises InvalidRequest
    (400) for a session header longer than AFFINITY_HEADER_MAX characters."""
    if affinity.key == "header":
        name = (affinity.header or "").lower()
        value = headers.get(name)
        if not value:
            return f"the request has no {name} header"
        if len(value) > AFFINITY_HEADER_MAX:
            raise InvalidRequest(
                f"The session header {name} is longer than {AFFINITY_HEADER_MAX} characters.", param=name
            )
        material = value.encode("utf-8", "surrogateescape")
    else:
        if not messages:
            return "prefix affinity keys chat requests only (this one has no messages)"
        material = _encode(stable_prefix(messages, affinity.prefix_messages))
    h = hashlib.blake2b(digest_size=KEY_BYTES)
    for part in (tenant.encode("utf-8", "surrogateescape"), affinity.key.encode(), material):
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.digest()


def replica_weight(key: bytes, label: str) -> int:
    """The rendezvous weight of one replica (`model@backend`) for one key: a keyed hash, the same everywhere."""
    return int.from_bytes(hashlib.blake2b(label.encode(), digest_size=8, key=key).digest(), "big")


def rendezvous_order(key: bytes, replicas: Sequence[Target]) -> list[Target]:
    """The replicas in the key's preference order, most preferred first."""
    return sorted(replicas, key=lambda t: (replica_weight(key, t.label), t.label), reverse=True)


def choose(
    key: bytes, replicas: Sequence[Target], unavailable: Callable[[Target], str | None]
) -> tuple[Target | None, str]:
    """The key's replica: the first in its rendezvous order that is available (`unavailable` says why
    one is not: "ejected", "saturated (...)"), with what explain says about it; None when none is."""
    order = rendezvous_order(key, replicas)
    passed: list[tuple[Target, str]] = []
    for t in order:
        why = unavailable(t)
        if why is None:
            if not passed:
                return t, f"{t.label} is the conversation's replica"
            first, reason = passed[0]
            return t, f"{t.label}: the conversation's replica {first.label} is {reason}"
        passed.append((t, why))
    return None, "not applied: no replica can take it (" + "; ".join(f"{t.label}: {w}" for t, w in passed) + ")"

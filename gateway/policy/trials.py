"""Which conversations a route's canary serves: a share that is sticky per conversation. Pure.

The key. Per tenant and route, one of:
- chat: the conversation's stable start, the leading messages through the first user message (the
  system or developer prompt and the opening question; gateway.policy.affinity.stable_prefix). Every
  turn resends them, so turn 1 and turn 7 of a conversation land on the same side; a Responses client
  continuing with `previous_response_id` is expanded to its stored conversation before routing, so its
  turns keep the same start too.
- completions and embeddings (no turns): the inputs themselves.
The `user` field and headers are not read: the share is of conversations, not of end users.

The share. blake2b(tenant, route, key) read as a number u in [0, 1); the canary serves the
conversation when u < weight. The candidate model is not hashed, so raising the weight only adds
conversations (those served at 0.05 are still served at 0.10) and replacing the candidate keeps the
same conversations on the canary side.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Final

import msgspec

from gateway.canonical import Message
from gateway.policy.affinity import stable_prefix

_encode = msgspec.json.encode
_SCALE: Final = float(1 << 64)


def conversation_material(messages: Sequence[Message], inputs: Sequence[str | tuple[int, ...]]) -> bytes | None:
    """What identifies the request's conversation (see the module's docstring), or None: nothing to key on."""
    if messages:
        return _encode(stable_prefix(messages, None))
    if inputs:
        return _encode(inputs)
    return None


def share_of(tenant: str, route: str, material: bytes) -> float:
    """The conversation's place in [0, 1): the same on every replica and every turn."""
    h = hashlib.blake2b(digest_size=8, person=b"strait-canary")
    for part in (tenant.encode("utf-8", "surrogateescape"), route.encode("utf-8", "surrogateescape"), material):
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return int.from_bytes(h.digest(), "big") / _SCALE


def in_canary(tenant: str, route: str, material: bytes, weight: float) -> tuple[bool, float]:
    """Whether the canary serves this conversation, and its share (said in explain)."""
    u = share_of(tenant, route, material)
    return u < weight, u

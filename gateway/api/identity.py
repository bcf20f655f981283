"""Request identity: the gateway mints every request id; a client's id is only echoed and recorded.

The minted id keys everything Strait records or holds for a request (ledger records, concurrency
slots, budget reservations, tickets, decisions), so no client can make two requests share a key: a
client-chosen `x-request-id` once did, which let parallel requests share one concurrency slot and one
ledger record. A client's well-formed `x-request-id` is still echoed back (as `x-request-id`) and
stored on the usage record as `client_request_id`, so people can correlate; it never keys anything.
"""

from __future__ import annotations

import re
from typing import Any

from gateway.randomness import random_hex
from gateway.reply import id_headers

_CLIENT_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
_MINTED = "strait.request_id"
_CLIENT = "strait.client_request_id"
# Marks "looked at the headers already, the client sent no usable id" (None is a valid answer).
_NONE = ""


def mint_request_id() -> str:
    # 96 random bits: unguessable, so no client can predict (and pre-empt) another request's keys.
    return "req_" + random_hex(12)


def request_id_of(scope: Any) -> str:
    """The gateway's id for this request, minted once and fixed for its lifetime."""
    rid: str | None = scope.get(_MINTED)
    if rid is None:
        rid = scope[_MINTED] = mint_request_id()
    return rid


def client_request_id_of(scope: Any) -> str | None:
    """The client's `x-request-id` if well-formed (printable, at most 128 characters), else None."""
    cid: str | None = scope.get(_CLIENT)
    if cid is None:
        cid = _NONE
        for name, value in scope.get("headers", ()):
            if name == b"x-request-id":
                candidate = value.decode("latin-1")
                if _CLIENT_ID.fullmatch(candidate):
                    cid = candidate
                break
        scope[_CLIENT] = cid
    return cid or None


def scope_id_headers(scope: Any) -> dict[str, str]:
    return id_headers(request_id_of(scope), client_request_id_of(scope))

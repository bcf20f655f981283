"""The stored responses as the Responses edge uses them: one record per response (the response object and
every input item that led to it, resolved), under the tenant's name, bounded by the policy's
`server.responses` (TTL, size, count per tenant). The store itself is gateway.responses_store.

An unknown id, an expired one, a deleted one and another tenant's are the same 404 (no existence leak);
a store that cannot answer is a 503.
"""

from __future__ import annotations

import logging
import re

import msgspec

from gateway.errors import NotFound, StoreUnavailable
from gateway.policy.model import StoredResponses
from gateway.responses_store import ResponseStore, ResponseStoreUnavailable

log = logging.getLogger("strait")
# Our own ids ("resp_" + the request id); anything else cannot be stored here, so it is not looked up.
_ID = re.compile(r"resp_[A-Za-z0-9_-]{1,200}")


class Record(msgspec.Struct):
    response: msgspec.Raw
    input: list[msgspec.Raw] = []


class _Output(msgspec.Struct):
    output: list[msgspec.Raw] = []


_decode_record = msgspec.json.Decoder(Record).decode
_decode_output = msgspec.json.Decoder(_Output).decode


def storable(response_id: str) -> bool:
    """An id this store can find again (an upstream's own `resp_...` ids included)."""
    return _ID.fullmatch(response_id) is not None


def not_found(response_id: str, param: str | None = None) -> NotFound:
    shown = response_id if len(response_id) <= 64 else response_id[:64] + "..."
    return NotFound(f"Response with id '{shown}' not found.", param=param)


class Conversations:
    def __init__(self, store: ResponseStore, settings: StoredResponses) -> None:
        self.store = store
        self.settings = settings

    async def save(self, tenant: str, response_id: str, record: bytes) -> bool:
        if len(record) > self.settings.max_bytes:
            log.warning(
                "stored responses: %s is %d bytes, over server.responses.max_bytes (%d): not stored",
                response_id,
                len(record),
                self.settings.max_bytes,
            )
            return False
        s = self.settings
        return await self.store.put(tenant, response_id, record, ttl_s=s.ttl_s, max_per_tenant=s.max_per_tenant)

    async def record(self, tenant: str, response_id: str, param: str | None = None) -> Record:
        if not _ID.fullmatch(response_id):
            raise not_found(response_id, param)
        try:
            blob = await self.store.get(tenant, response_id)
        except ResponseStoreUnavailable:
            raise StoreUnavailable("Stored responses cannot be read right now; retry.") from None
        if blob is None:
            raise not_found(response_id, param)
        try:
            return _decode_record(blob)
        except (msgspec.DecodeError, msgspec.ValidationError):
            log.warning("stored responses: %s is not a record; treated as missing", response_id)
            raise not_found(response_id, param) from None

    async def conversation(self, tenant: str, response_id: str) -> list[msgspec.Raw]:
        """The items a `previous_response_id` continues: the stored response's input, then its output."""
        record = await self.record(tenant, response_id, "previous_response_id")
        return [*record.input, *_decode_output(record.response).output]

    async def delete(self, tenant: str, response_id: str) -> None:
        if not _ID.fullmatch(response_id):
            raise not_found(response_id)
        try:
            deleted = await self.store.delete(tenant, response_id)
        except ResponseStoreUnavailable:
            raise StoreUnavailable("Stored responses cannot be changed right now; retry.") from None
        if not deleted:
            raise not_found(response_id)

"""The Responses edge's view of stored responses (gateway.api.responses.stored): the policy's size bound, the
conversation a `previous_response_id` continues, and what a client is told when a response is missing (404,
the same for every reason) or the store cannot answer (503, never a misleading 404)."""

from __future__ import annotations

import msgspec
import pytest

from gateway.api.responses.stored import Conversations
from gateway.errors import NotFound, StoreUnavailable
from gateway.policy.model import StoredResponses
from gateway.responses_store import ResponseStoreUnavailable
from gateway.responses_store.memory import MemoryResponseStore

RECORD = msgspec.json.encode(
    {
        "response": {"id": "resp_1", "output": [{"type": "message", "role": "assistant", "content": []}]},
        "input": [{"role": "user", "content": "hi"}],
    }
)


class _Down:
    async def put(self, tenant: str, response_id: str, blob: bytes, *, ttl_s: int, max_per_tenant: int) -> bool:
        return False

    async def get(self, tenant: str, response_id: str) -> bytes | None:
        raise ResponseStoreUnavailable("down")

    async def delete(self, tenant: str, response_id: str) -> bool:
        raise ResponseStoreUnavailable("down")

    async def aclose(self) -> None:
        return None


async def test_a_conversation_is_the_stored_input_then_the_output() -> None:
    conversations = Conversations(MemoryResponseStore(), StoredResponses())
    assert await conversations.save("alpha", "resp_1", RECORD)
    items = await conversations.conversation("alpha", "resp_1")
    assert [msgspec.json.decode(i)["role"] for i in items] == ["user", "assistant"]


async def test_a_record_over_max_bytes_is_not_stored() -> None:
    conversations = Conversations(MemoryResponseStore(), StoredResponses(max_bytes=1024))
    assert not await conversations.save("alpha", "resp_big", b'{"response":{},"input":["' + b"x" * 1024 + b'"]}')
    with pytest.raises(NotFound):
        await conversations.record("alpha", "resp_big")


@pytest.mark.parametrize("rid", ["resp_unknown", "chatcmpl-1", "resp_../../x", "resp_" + "a" * 300])
async def test_a_missing_response_is_a_404_whatever_the_reason(rid: str) -> None:
    conversations = Conversations(MemoryResponseStore(), StoredResponses())
    await conversations.save("alpha", "resp_1", RECORD)
    with pytest.raises(NotFound) as caught:
        await conversations.conversation("alpha", rid)
    assert caught.value.status == 404 and caught.value.param == "previous_response_id"
    assert len(caught.value.message) < 120  # a long id is not echoed whole
    with pytest.raises(NotFound):
        await conversations.record("beta", "resp_1")  # another tenant's: the same 404
    with pytest.raises(NotFound):
        await conversations.delete("beta", "resp_1")


async def test_a_store_that_cannot_answer_is_a_503() -> None:
    conversations = Conversations(_Down(), StoredResponses())
    for call in (conversations.record("alpha", "resp_1"), conversations.delete("alpha", "resp_1")):
        with pytest.raises(StoreUnavailable) as caught:
            await call
        assert caught.value.status == 503 and caught.value.code == "store_unavailable"
    assert not await conversations.save("alpha", "resp_1", RECORD)


async def test_a_garbled_record_reads_as_missing() -> None:
    store = MemoryResponseStore()
    await store.put("alpha", "resp_1", b"not json", ttl_s=60, max_per_tenant=10)
    with pytest.raises(NotFound):
        await Conversations(store, StoredResponses()).record("alpha", "resp_1")

"""One contract for every capture store (SQLite, PostgreSQL): what `strait serve` writes and the feedback
endpoint and `strait datasets` read."""

from __future__ import annotations

import msgspec

from gateway.capture.records import CapturedAnswer, CapturedMessage, CapturedRequest, CaptureRecord, Feedback
from gateway.capture.store import CaptureQuery, CaptureStore, scan


def record(
    rid: str, ts: int, *, tenant: str = "acme", route: str = "chat", model: str = "m1", client: str | None = None
) -> CaptureRecord:
    return CaptureRecord(
        request_id=rid,
        ts_ms=ts,
        tenant=tenant,
        key_id="k1",
        route=route,
        operation="chat",
        protocol="openai",
        status=200,
        outcome="completed",
        client_request_id=client,
        response_id=f"chatcmpl-{rid}",
        model=model,
        deployment=f"{model}@b",
        licence="apache-2.0",
        licence_outputs_train=True,
        request=CapturedRequest(messages=(CapturedMessage(role="user", content=f"hello {rid}"),)),
        answer=CapturedAnswer(content="hi", finish_reason="stop"),
        metadata={"app": "x"},
    )


def feedback(fid: str, rid: str, ts: int, *, tenant: str = "acme", score: float | None = 1.0) -> Feedback:
    return Feedback(id=fid, request_id=rid, tenant=tenant, ts_ms=ts, kind="score", score=score, key_id="k1")


async def test_a_record_round_trips_with_its_feedback(capture_store: CaptureStore) -> None:
    r = record("req_1", 1000)
    await capture_store.write([r], [feedback("fb_1", "req_1", 1001), feedback("fb_2", "req_1", 1002, score=-3)])
    got = await capture_store.get("acme", "req_1")
    assert got is not None
    assert got.record == r
    assert [f.id for f in got.feedback] == ["fb_1", "fb_2"]
    assert got.feedback[1].score == -3
    assert await capture_store.counts() == (1, 2)


async def test_reads_are_scoped_to_the_tenant(capture_store: CaptureStore) -> None:
    await capture_store.write(
        [record("req_a", 1, tenant="acme", client="c-1"), record("req_b", 2, tenant="other", client="c-1")]
    )
    assert await capture_store.get("other", "req_a") is None
    assert await capture_store.get("nobody", "req_b") is None
    assert await capture_store.resolve("other", request_id="req_a") is None
    assert await capture_store.resolve("acme", request_id="req_a") == "req_a"
    # A client's own id resolves only within its tenant.
    assert await capture_store.resolve("acme", client_id="c-1") == "req_a"
    assert await capture_store.resolve("other", client_id="c-1") == "req_b"
    assert await capture_store.resolve("third", client_id="c-1") is None
    assert await capture_store.resolve("acme", request_id="req_missing") is None
    # By the answer's id (what a cache hit was served with), within the tenant.
    assert await capture_store.resolve("acme", response_id="chatcmpl-req_a") == "req_a"
    assert await capture_store.resolve("other", response_id="chatcmpl-req_a") is None


async def test_the_latest_capture_wins_for_a_reused_client_id(capture_store: CaptureStore) -> None:
    await capture_store.write([record("req_old", 10, client="dup"), record("req_new", 20, client="dup")])
    assert await capture_store.resolve("acme", client_id="dup") == "req_new"


async def test_writing_a_batch_again_changes_nothing(capture_store: CaptureStore) -> None:
    r = record("req_1", 5)
    f = feedback("fb_1", "req_1", 6)
    await capture_store.write([r], [f])
    changed = msgspec.structs.replace(r, status=500)
    await capture_store.write([changed], [f])
    got = await capture_store.get("acme", "req_1")
    assert got is not None and got.record.status == 200 and len(got.feedback) == 1
    assert await capture_store.counts() == (1, 1)


async def test_query_filters_by_tenant_route_model_and_time(capture_store: CaptureStore) -> None:
    await capture_store.write(
        [
            record("r1", 100, route="chat", model="m1"),
            record("r2", 200, route="code", model="m1"),
            record("r3", 300, route="chat", model="m2"),
            record("r4", 400, route="chat", model="m1", tenant="other"),
        ],
        [feedback("f1", "r3", 301)],
    )

    async def ids(**filters: object) -> list[str]:
        page = await capture_store.query(msgspec.convert(filters, CaptureQuery))
        return [c.record.request_id for c in page]

    assert await ids() == ["r1", "r2", "r3", "r4"]
    assert await ids(tenant="acme") == ["r1", "r2", "r3"]
    assert await ids(route="chat") == ["r1", "r3", "r4"]
    assert await ids(model="m1", tenant="acme") == ["r1", "r2"]
    assert await ids(since_ms=200, until_ms=400) == ["r2", "r3"]
    page = await capture_store.query(CaptureQuery(model="m2"))
    assert [f.id for f in page[0].feedback] == ["f1"]


async def test_scan_pages_through_everything_in_order(capture_store: CaptureStore) -> None:
    # Equal timestamps: the request id breaks the tie, so no page repeats or skips a record.
    records = [record(f"r{i:03d}", 1000 + i // 3) for i in range(23)]
    await capture_store.write(list(reversed(records)))
    seen = [c.record.request_id async for c in scan(capture_store, CaptureQuery(limit=5))]
    assert seen == [r.request_id for r in records]


async def test_retention_deletes_one_tenants_old_records_and_their_feedback(capture_store: CaptureStore) -> None:
    await capture_store.write(
        [record("old", 100), record("new", 300), record("other_old", 100, tenant="other")],
        [feedback("f_old", "old", 101), feedback("f_new", "new", 301)],
    )
    assert sorted(await capture_store.tenants()) == ["acme", "other"]
    assert await capture_store.delete_before("acme", 200) == 1
    assert await capture_store.get("acme", "old") is None
    kept = await capture_store.get("acme", "new")
    assert kept is not None and [f.id for f in kept.feedback] == ["f_new"]
    assert await capture_store.get("other", "other_old") is not None
    assert await capture_store.counts() == (2, 1)

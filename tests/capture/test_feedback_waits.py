"""How long `/v1/feedback` looks for a capture another replica may not have landed yet
(gateway.api.feedback): once after its own queue is written, then once after each wait; never more than
MAX_WAITING_LOOKUPS lookups wait at once in a process (past it, a capture not found is a 404 at once)."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.api import feedback


class Store:
    def __init__(self, found_at: int | None = None) -> None:
        self.lookups = 0
        self.found_at = found_at

    async def resolve(self, tenant: str, **named: Any) -> str | None:
        self.lookups += 1
        return "req_x" if self.found_at is not None and self.lookups >= self.found_at else None


class Writer:
    enabled = True

    def __init__(self, store: Store) -> None:
        self._store = store
        self.flushes = 0

    async def existing_store(self) -> Store:
        return self._store

    async def flush(self) -> None:
        self.flushes += 1


async def test_a_capture_never_found_is_looked_up_once_per_wait() -> None:
    store = Store()
    writer = Writer(store)
    assert await feedback._resolve(writer, "t", request_id="r", waits=(0.0, 0.0, 0.0)) is None  # type: ignore[arg-type]
    assert store.lookups == 2 + 3 and writer.flushes == 1


async def test_one_landing_during_the_waits_is_found() -> None:
    store = Store(found_at=4)
    assert await feedback._resolve(Writer(store), "t", request_id="r", waits=(0.0,) * 5) == "req_x"  # type: ignore[arg-type]
    assert store.lookups == 4


async def test_past_the_cap_of_waiting_lookups_a_miss_is_answered_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(feedback, "_waiting", feedback.MAX_WAITING_LOOKUPS)
    store = Store()
    assert await feedback._resolve(Writer(store), "t", request_id="r", waits=(3600.0,)) is None  # type: ignore[arg-type]
    assert store.lookups == 2  # before and after its own queue was written, no wait
    assert feedback._waiting == feedback.MAX_WAITING_LOOKUPS  # nothing taken, nothing given back

"""The capture writer: what the capture tap hands over on a request's end gets to the store off the
request path, and what is older than a tenant's retention leaves it.

- `submit(pending)` is a deque append (O(1), never awaits): past `max_queued` the record is dropped and
  counted (`strait_capture_records{result="dropped"}`), the request never waits for the store.
- A background task takes up to `batch` at a time, turns them into records a few per turn of the event
  loop (the redaction, the stream's assembly: gateway.capture.assemble), detects regenerates, and
  writes the batch in one transaction (SQLite: in the store's own thread).
- The store is opened on first use (STRAIT_CAPTURE; nothing is created while nobody is captured).
- Retention: every `retention_every_s`, each tenant's records older than its `capture.retention_days`
  (a tenant no longer capturing: DEFAULT_RETENTION_DAYS) are deleted.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from gateway.canonical import Request
from gateway.capture.assemble import answer_of_body, answer_of_stream, captured_request, conversation_key
from gateway.capture.records import CaptureRecord, Feedback
from gateway.capture.redact import NoRedaction, PatternRedactor
from gateway.capture.store import CaptureStore, open_capture_store, sqlite_path
from gateway.contracts import TextRedactor
from gateway.telemetry import Metrics

log = logging.getLogger("strait.capture")

DEFAULT_RETENTION_DAYS = 30
# Regenerate detection remembers this many recent conversations (per replica).
RECENT_CONVERSATIONS = 50_000
# Records turned from references into redacted records per turn of the event loop.
PREPARE_SLICE = 8
MAX_PREPARE_SLICE = 64
# Redactors known to cost microseconds per text: their records are prepared on the event loop.
_ON_LOOP: frozenset[type] = frozenset({PatternRedactor, NoRedaction})
MAX_TAGS = 16
MAX_TAG_CHARS = 64
MAX_METADATA = 16
MAX_METADATA_CHARS = 512


@dataclass(slots=True)
class PendingCapture:
    """What the capture tap collected for one request: cheap references, turned into a CaptureRecord in
    the writer's thread. `build` makes the record's fields known at the end of the request (without the
    texts, which are redacted and added here): called in the thread, so the request path pays for a
    function object, not for a 40-field Struct."""

    build: Callable[[], CaptureRecord]
    request: Request | None
    redactor: TextRedactor
    body: bytes | None = None
    events: list[bytes] | None = None
    truncated: bool = False
    tags: str | None = None
    regenerate_window_s: int = 0


@dataclass(slots=True)
class _Recent:
    request_id: str
    ts_ms: int


def _tags(header: str | None) -> tuple[str, ...]:
    if not header:
        return ()
    tags = (t.strip() for t in header.split(",", MAX_TAGS)[:MAX_TAGS])
    return tuple(t[:MAX_TAG_CHARS] for t in tags if t)


def _metadata(values: dict[str, str] | None, redact: TextRedactor) -> dict[str, str]:
    if not values:
        return {}
    items = list(values.items())[:MAX_METADATA]
    return {str(k)[:MAX_METADATA_CHARS]: redact.redact(str(v)[:MAX_METADATA_CHARS]) for k, v in items}


def feedback_id() -> str:
    return "fb_" + secrets.token_hex(12)


@dataclass(slots=True)
class _Recents:
    """The latest captured request per (tenant, route, conversation), for regenerate detection (bounded,
    LRU). The route is part of it: the same prompt sent to two routes is a comparison, not a regenerate."""

    entries: OrderedDict[tuple[str, str, bytes], _Recent] = field(default_factory=OrderedDict)

    def seen(self, tenant: str, route: str, key: bytes, request_id: str, ts_ms: int, window_s: int) -> str | None:
        """Remember this request; the earlier request it regenerates, if any."""
        digest = hashlib.blake2b(key, digest_size=16).digest()
        slot = (tenant, route, digest)
        earlier = self.entries.pop(slot, None)
        self.entries[slot] = _Recent(request_id, ts_ms)
        if len(self.entries) > RECENT_CONVERSATIONS:
            self.entries.popitem(last=False)
        if earlier is not None and earlier.request_id != request_id and 0 <= ts_ms - earlier.ts_ms <= window_s * 1000:
            return earlier.request_id
        return None


class CaptureWriter:
    def __init__(
        self,
        url: str,
        metrics: Metrics,
        *,
        max_queued: int = 10_000,
        batch: int = 256,
        flush_every_s: float = 0.05,
        retention_every_s: float = 3600.0,
        retention_days: Callable[[str], int | None] = lambda tenant: None,
    ) -> None:
        self.url = url
        self.metrics = metrics
        self.max_queued = max_queued
        self.batch = batch
        self.flush_every_s = flush_every_s
        self.retention_every_s = retention_every_s
        # The tenant's `capture.retention_days` under the policy in force (None: not capturing now).
        self.retention_days = retention_days
        self._queue: deque[PendingCapture] = deque()
        self._store: CaptureStore | None = None
        self._opening = asyncio.Lock()
        self._writing = asyncio.Lock()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._recents = _Recents()
        self._queued = metrics.child(metrics.capture_records, "queued")
        self._dropped = metrics.child(metrics.capture_records, "dropped")
        self._written = metrics.child(metrics.capture_records, "written")
        self._failed = metrics.child(metrics.capture_records, "failed")

    @property
    def enabled(self) -> bool:
        return self.url != "off"

    def queued(self) -> int:
        return len(self._queue)

    def submit(self, pending: PendingCapture) -> bool:
        """Queue a capture (never waits); False when the queue is full and it was dropped."""
        if len(self._queue) >= self.max_queued:
            self._dropped.inc()
            return False
        self._queue.append(pending)
        self._queued.inc()
        if not self._wake.is_set():
            self._wake.set()
        return True

    async def store(self) -> CaptureStore:
        """The store, opened on first use."""
        if self._store is None:
            async with self._opening:
                if self._store is None:
                    self._store = await open_capture_store(self.url)
        return self._store

    async def existing_store(self) -> CaptureStore | None:
        """The store if anything may be in it (a SQLite file that exists; a server), without creating one."""
        if self._store is not None or not self.enabled:
            return self._store
        if self.url.startswith("sqlite:") and not Path(sqlite_path(self.url)).exists():
            return None
        return await self.store()

    async def start(self) -> None:
        if self.enabled:
            self._tasks = [asyncio.ensure_future(self._run()), asyncio.ensure_future(self._retain())]

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            # Let a burst gather into one transaction.
            await asyncio.sleep(self.flush_every_s)
            self._wake.clear()
            # Shielded: a shutdown cancelling this task lets the batch in hand land (aclose flushes the rest).
            await asyncio.shield(self.flush())

    async def flush(self) -> None:
        """Write everything queued (tests and shutdown call it; the background task does, batch by batch)."""
        async with self._writing:
            while self._queue:
                n = min(self.batch, len(self._queue))
                batch = [self._queue.popleft() for _ in range(n)]
                try:
                    records, feedback = await self._prepare_sliced(batch)
                    await (await self.store()).write(records, feedback)
                except Exception:  # a store that is down loses this batch, never the writer
                    log.exception("capture: a batch of %d records could not be written", n)
                    self._failed.inc(n)
                    continue
                self._written.inc(len(records))
                for f in feedback:
                    self.metrics.child(self.metrics.feedback, f.kind).inc()

    async def _prepare_sliced(self, batch: list[PendingCapture]) -> tuple[list[CaptureRecord], list[Feedback]]:
        """`_prepare` on the event loop, PREPARE_SLICE records per turn (more while a backlog builds): no
        request waits longer than one slice for it. (A worker thread would hold the GIL for up to the interpreter's switch interval,
        5 ms, at a time: measured, it added more latency and CPU per request than this.)"""
        if any(type(p.redactor) not in _ON_LOOP for p in batch):
            # A plugin redactor may take milliseconds per text (a model): its batch goes to a thread.
            return await asyncio.to_thread(self._prepare, batch)
        records: list[CaptureRecord] = []
        feedback: list[Feedback] = []
        i = 0
        while i < len(batch):
            # Bigger slices while a backlog builds (a saturated replica would otherwise starve the writer
            # until its queue drops records): up to MAX_PREPARE_SLICE per turn.
            size = min(MAX_PREPARE_SLICE, PREPARE_SLICE + len(self._queue) // 32)
            r, f = self._prepare(batch[i : i + size])
            records += r
            feedback += f
            i += size
            await asyncio.sleep(0)
        return records, feedback

    def _prepare(self, batch: list[PendingCapture]) -> tuple[list[CaptureRecord], list[Feedback]]:
        """Redaction, assembly, regenerate detection (in submission order)."""
        records: list[CaptureRecord] = []
        feedback: list[Feedback] = []
        for p in batch:
            base = p.build()
            include = base.include
            request = captured_request(p.request, p.redactor, include) if p.request is not None else None
            answer, response_id = None, None
            if p.events is not None:
                answer, response_id = answer_of_stream(p.events, p.redactor, include, p.truncated)
            elif p.body is not None:
                answer, response_id = answer_of_body(p.body, p.redactor, include)
            metadata = _metadata(p.request.metadata if p.request is not None else None, p.redactor)
            records.append(
                msgspec.structs.replace(
                    base,
                    request=request,
                    answer=answer,
                    metadata=metadata,
                    tags=_tags(p.tags),
                    response_id=response_id,
                )
            )
            key = conversation_key(p.request) if p.regenerate_window_s and p.request is not None else None
            if key is not None:
                earlier = self._recents.seen(
                    base.tenant, base.route, key, base.request_id, base.ts_ms, p.regenerate_window_s
                )
                if earlier is not None:
                    feedback.append(
                        Feedback(
                            id=feedback_id(),
                            request_id=earlier,
                            tenant=base.tenant,
                            ts_ms=base.ts_ms,
                            kind="regenerate",
                            by_request_id=base.request_id,
                        )
                    )
        return records, feedback

    async def add_feedback(self, feedback: Feedback) -> None:
        """Explicit feedback, written at once (it is rare, and the client is told it was recorded)."""
        await (await self.store()).write([], [feedback])
        self.metrics.child(self.metrics.feedback, feedback.kind).inc()

    async def enforce_retention(self, now_ms: int | None = None) -> int:
        """Delete what every tenant's retention no longer allows; how many records went."""
        store = await self.existing_store()
        if store is None:
            return 0
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        deleted = 0
        for tenant in await store.tenants():
            days = self.retention_days(tenant) or DEFAULT_RETENTION_DAYS
            deleted += await store.delete_before(tenant, now_ms - days * 86_400_000)
        return deleted

    async def _retain(self) -> None:
        while True:
            try:
                n = await self.enforce_retention()
                if n:
                    log.info("capture retention: %d records deleted", n)
            except Exception:  # the next round tries again
                log.exception("capture retention failed")
            await asyncio.sleep(self.retention_every_s)

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.flush()
        if self._store is not None:
            await self._store.aclose()
            self._store = None

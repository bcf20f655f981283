"""One JSON line per request on stderr (issue 8 "logs"): what an operator greps for when a tenant asks
about a request. On by default (`STRAIT_ACCESS_LOG=off` to stop it), sampled with
`STRAIT_ACCESS_LOG_SAMPLE` (0..1; refusals and errors are always written). Each line is one msgspec
encode, never through `logging` (several times the cost per line); the lines of one turn of the event
loop (the requests that ended together) leave in one write and flush at that turn's end, not one per
line (a write system call per request was about 1 % of the gateway's CPU per request). Outside a
running loop a line is written at once. No prompt, completion, key or upstream text is ever in a line:
ids, names from the policy, numbers.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from typing import BinaryIO

import msgspec

from gateway.context import RequestContext


class AccessLine(msgspec.Struct, omit_defaults=True, kw_only=True):
    ts: float
    request_id: str
    status: int
    latency_ms: float
    client_request_id: str | None = None
    tenant: str | None = None
    key_id: str | None = None
    route: str | None = None
    deployment: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # Parts of prompt_tokens (cache reads, cache writes) and of completion_tokens (reasoning); absent when 0.
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    cost_usd: float = 0.0
    ttft_ms: float | None = None
    partial: bool = False
    attempts: int = 0
    error: str | None = None
    trace_id: str | None = None
    # "hit" or "semantic-hit" when the cache answered (tokens_saved: what that answer did not cost).
    cache: str | None = None
    tokens_saved: int = 0


_encode = msgspec.json.Encoder().encode


class AccessLog:
    def __init__(self, *, sample: float = 1.0, out: BinaryIO | None = None) -> None:
        self.sample = sample
        self._out = out
        # Lines of this loop turn, written together by `flush` (scheduled when the first one comes).
        self._lines: list[bytes] = []

    def _stream(self) -> BinaryIO:
        return self._out if self._out is not None else sys.stderr.buffer

    def flush(self) -> None:
        """Write the lines held so far (at the end of the loop turn that produced them; at shutdown)."""
        lines, self._lines = self._lines, []
        if lines:
            stream = self._stream()
            stream.write(lines[0] if len(lines) == 1 else b"".join(lines))
            stream.flush()

    def _add(self, line: bytes) -> None:
        if not self._lines:
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:  # no running loop: written now
                self._lines.append(line)
                self.flush()
                return
        self._lines.append(line)

    def write(
        self,
        ctx: RequestContext,
        status: int,
        *,
        prompt: int = 0,
        completion: int = 0,
        cached: int = 0,
        cache_write: int = 0,
        reasoning: int = 0,
        cost_micro_usd: int = 0,
        ttft_s: float | None = None,
        partial: bool = False,
        error: str | None = None,
        cache: str | None = None,
        tokens_saved: int = 0,
    ) -> None:
        if status < 400 and self.sample < 1.0 and random.random() >= self.sample:
            return
        principal = ctx.principal
        span = ctx.span
        trace_id = f"{span.get_span_context().trace_id:032x}" if span is not None else None
        line = AccessLine(
            ts=round(time.time(), 3),
            request_id=ctx.request_id,
            status=status,
            latency_ms=round((time.perf_counter() - ctx.started) * 1000, 3),
            client_request_id=ctx.client_request_id,
            tenant=principal.tenant if principal is not None else None,
            key_id=principal.key_id if principal is not None else None,
            # The policy's route only: a refused request's `model` is the client's string (unbounded).
            route=ctx.route.name if ctx.route is not None else None,
            deployment=ctx.target.label if ctx.target is not None else None,
            prompt_tokens=prompt,
            completion_tokens=completion,
            cached_tokens=cached,
            cache_write_tokens=cache_write,
            reasoning_tokens=reasoning,
            cost_usd=cost_micro_usd / 1e6,
            ttft_ms=None if ttft_s is None else round(ttft_s * 1000, 3),
            partial=partial,
            attempts=0
            if cache is not None
            else len(ctx.failed_attempts) + len(ctx.continued) + (1 if ctx.target is not None else 0),
            error=error,
            trace_id=trace_id,
            cache=cache,
            tokens_saved=tokens_saved,
        )
        self._add(_encode(line) + b"\n")

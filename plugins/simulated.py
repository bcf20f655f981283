"""`simulated`: a backend that lives inside the gateway, for demos, tests and load tests.

It answers chat, legacy completions and embeddings in OpenAI's wire format, reading the canonical request
(it does not speak any client's protocol, so it never gets the client's bytes), with configurable time to
first token, tokens per second, output length and failure rate, and counts usage with tiktoken so the
numbers look like a real engine's. Like a model it honours `response_format` (json_object: a JSON object;
json_schema: a minimal instance of the schema, plugins.schema_instance) and plays its part in an agent's
tool loop: given tools it calls one, and after a tool's result it answers in text.

Like an engine, it has slots: `capacity.max_concurrency` requests run at once, the rest wait (FIFO), and
it serves vLLM's load gauges in process (`engine_metrics`, read by the gateway's scraper without HTTP):
`vllm:num_requests_running`, `vllm:num_requests_waiting` (growing with the requests in flight beyond
the slots) and `vllm:kv_cache_usage_perc` (running / slots). So the demo shows spillover happening.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import itertools
import random
import struct
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

import msgspec

from gateway.canonical import Request
from gateway.contracts import UpstreamCall, UpstreamResponse
from gateway.policy.features import count_prompt_tokens
from gateway.policy.model import Backend, SimulatedOptions
from gateway.tokens import count_text, encoding
from plugins.schema_instance import instance

_WORDS = [
    "the",
    "edge",
    "server",
    "answered",
    "this",
    "request",
    "while",
    "the",
    "cloud",
    "stayed",
    "idle",
    "and",
    "every",
    "token",
    "was",
    "counted",
    "by",
    "a",
    "policy",
    "that",
    "knows",
    "where",
    "each",
    "model",
    "may",
    "run",
    "who",
    "built",
    "it",
    "and",
    "what",
    "it",
    "costs",
    "per",
    "million",
    "tokens",
]
_encode = msgspec.json.encode
# The tool types the simulated model can call; any other is refused, never silently ignored.
_TOOL_KINDS = frozenset({"function", "custom"})


class _Schema(msgspec.Struct):
    """The part of a tool's JSON schema the simulated answer fills in."""

    properties: dict[str, msgspec.Raw] = {}


def _decode_schema(raw: msgspec.Raw) -> _Schema:
    try:
        return msgspec.json.decode(raw, type=_Schema)
    except msgspec.ValidationError:
        return _Schema()


@functools.cache
def _single_token_words() -> tuple[str, ...]:
    # Once per process: a policy of a thousand simulated backends would otherwise tokenise the list a
    # thousand times (2.5 s) on every load and reload.
    enc = encoding("cl100k_base")
    return tuple(" " + w for w in _WORDS if len(enc.encode_ordinary(" " + w)) == 1)


def _error(status: int, message: str, type_: str, code: str) -> UpstreamResponse:
    body = _encode({"error": {"message": message, "type": type_, "param": None, "code": code}})
    headers = {"retry-after": "1"} if status in (429, 503) else {}
    return UpstreamResponse(status=status, body=body, headers=headers)


class SimulatedAdapter:
    def __init__(self, backend: Backend, *, rng: random.Random | None = None) -> None:
        self.name = backend.name
        self.options = backend.simulated or SimulatedOptions()
        self._rng = rng or random.Random()
        self._words = _single_token_words()
        self._ids = itertools.count(1)
        # Engine slots (None: unlimited) and the requests in flight: running, or waiting for a slot.
        self.slots = backend.capacity.max_concurrency
        self.in_flight = 0
        self._free = asyncio.Semaphore(self.slots) if self.slots else None

    async def aclose(self) -> None:
        return None

    def engine_metrics(self) -> str:
        """vLLM's load gauges for this simulated engine (Prometheus text, as vLLM's /metrics)."""
        slots = self.slots
        running = min(self.in_flight, slots) if slots else self.in_flight
        waiting = self.in_flight - running
        kv = running / slots if slots else 0.0
        labels = f'{{engine="0",model_name="{self.name}"}}'
        return (
            "# TYPE vllm:num_requests_running gauge\n"
            f"vllm:num_requests_running{labels} {float(running)}\n"
            "# TYPE vllm:num_requests_waiting gauge\n"
            f"vllm:num_requests_waiting{labels} {float(waiting)}\n"
            "# TYPE vllm:kv_cache_usage_perc gauge\n"
            f"vllm:kv_cache_usage_perc{labels} {kv}\n"
        )

    @contextlib.asynccontextmanager
    async def _slot(self) -> AsyncIterator[None]:
        if self._free is None:
            yield
            return
        async with self._free:
            yield

    def _admit(self) -> Callable[[], None]:
        """Count a request in flight; the returned function counts it out (once, whatever calls it)."""
        self.in_flight += 1
        done = False

        def leave() -> None:
            nonlocal done
            if not done:
                done = True
                self.in_flight -= 1

        return leave

    async def send(self, call: UpstreamCall) -> UpstreamResponse:
        o = self.options
        if o.failure_rate > 0 and self._rng.random() < o.failure_rate:
            return _error(o.failure_status, "simulated backend failure", "server_error", "simulated_failure")
        r = call.request
        foreign = r.tool_outside(_TOOL_KINDS)
        if foreign is not None:
            return _error(
                400,
                f"The simulated backend cannot run tools of type '{foreign.kind}' (it runs "
                f"{' and '.join(sorted(_TOOL_KINDS))} tools); route this request to an upstream that has them.",
                "invalid_request_error",
                "unsupported_tool_type",
            )
        if call.operation == "embeddings":
            return self._embeddings(r, call.model)
        limit = r.max_output_tokens
        n_tokens = min(o.output_tokens, limit) if limit else o.output_tokens
        finish = "length" if limit and limit < o.output_tokens else "stop"
        prompt_tokens = count_prompt_tokens(r)
        words = [self._words[i % len(self._words)] for i in range(n_tokens)]
        tool = self._tool_call(r) if call.operation == "chat" else None
        structured = _structured_text(r) if call.operation == "chat" and tool is None else None
        if structured is not None:
            # The JSON the response_format asks for, whole unless max_tokens cuts it (as a model's would be).
            tokens = encoding("cl100k_base").encode_ordinary(structured)
            finish = "length" if limit and limit < len(tokens) else "stop"
            if finish == "length":
                structured = encoding("cl100k_base").decode(tokens[:limit])
            n_tokens = min(len(tokens), limit) if limit else len(tokens)
            words = [structured[k : k + 4] for k in range(0, len(structured), 4)]
        choices = max(1, r.n or 1)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": n_tokens * choices,
            "total_tokens": prompt_tokens + n_tokens * choices,
        }
        ident = f"{'chatcmpl' if call.operation == 'chat' else 'cmpl'}-sim{next(self._ids):08d}"
        model = call.model
        leave = self._admit()
        if call.stream:
            events = self._stream(call.operation, ident, model, words, choices, finish, tool, usage, leave)

            async def close() -> None:
                leave()

            return UpstreamResponse(status=200, events=events, close=close)
        try:
            async with self._slot():
                await asyncio.sleep(o.ttft_ms / 1000 + n_tokens / max(o.tokens_per_second, 1e-6))
        finally:
            leave()
        return UpstreamResponse(
            status=200, body=self._whole(call.operation, ident, model, words, choices, finish, tool, usage)
        )

    def _tool_call(self, r: Request) -> dict[str, Any] | None:
        """A call of the first tool (or the one tool_choice names), unless the conversation's last message
        is a tool's result: then the model answers in text, which ends an agent's tool loop. A client that
        forces a tool (`required`, or a named one) gets a call every time, as from a real model."""
        tools, choice = r.tools, r.tool_choice
        if not tools or (choice is not None and choice.mode == "none"):
            return None
        forced = choice is not None and choice.mode in ("required", "tool")
        if not forced and r.messages and r.messages[-1].role == "tool":
            return None
        fn = tools[0]
        if choice is not None and choice.mode == "tool" and choice.name:
            fn = next((t for t in tools if t.name == choice.name), fn)
        ident = f"call_sim{next(self._ids):08d}"
        if fn.kind == "custom":  # freeform: text in, not JSON arguments
            return {"id": ident, "type": "custom", "custom": {"name": fn.name, "input": "simulated"}}
        props = _decode_schema(fn.parameters).properties if fn.parameters is not None else {}
        args = {k: "simulated" for k in props}
        return {
            "id": ident,
            "type": "function",
            "function": {"name": fn.name or "tool", "arguments": _encode(args).decode()},
        }

    def _whole(
        self,
        op: str,
        ident: str,
        model: str,
        words: list[str],
        n: int,
        finish: str,
        tool: dict[str, Any] | None,
        usage: dict[str, int],
    ) -> bytes:
        text = "".join(words).lstrip()
        created = int(time.time())
        if op == "completions":
            return _encode(
                {
                    "id": ident,
                    "object": "text_completion",
                    "created": created,
                    "model": model,
                    "choices": [
                        {"text": text, "index": i, "logprobs": None, "finish_reason": finish} for i in range(n)
                    ],
                    "usage": usage,
                }
            )
        message: dict[str, Any] = {"role": "assistant", "content": None if tool else text, "refusal": None}
        if tool:
            message["tool_calls"] = [tool]
        choices = [
            {"index": i, "message": message, "logprobs": None, "finish_reason": "tool_calls" if tool else finish}
            for i in range(n)
        ]
        return _encode(
            {
                "id": ident,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": choices,
                "usage": usage,
                "system_fingerprint": "strait-simulated",
            }
        )

    async def _stream(
        self,
        op: str,
        ident: str,
        model: str,
        words: list[str],
        n: int,
        finish: str,
        tool: dict[str, Any] | None,
        usage: dict[str, int],
        leave: Callable[[], None],
    ) -> AsyncIterator[bytes]:
        try:
            async with self._slot():
                events = self._events(op, ident, model, words, n, finish, tool, usage)
                async with contextlib.aclosing(events):
                    async for event in events:
                        yield event
        finally:
            leave()

    async def _events(
        self,
        op: str,
        ident: str,
        model: str,
        words: list[str],
        n: int,
        finish: str,
        tool: dict[str, Any] | None,
        usage: dict[str, int],
    ) -> AsyncGenerator[bytes, None]:
        o = self.options
        created = int(time.time())
        step = max(1, o.chunk_tokens)
        pause = step / max(o.tokens_per_second, 1e-6)
        obj = "text_completion" if op == "completions" else "chat.completion.chunk"
        head = {"id": ident, "object": obj, "created": created, "model": model}

        def chunk(choices: list[dict[str, Any]]) -> bytes:
            return _encode({**head, "choices": choices})

        def delta(i: int, d: dict[str, Any], fin: str | None = None) -> dict[str, Any]:
            if op == "completions":
                return {"text": d.get("content", ""), "index": i, "logprobs": None, "finish_reason": fin}
            return {"index": i, "delta": d, "logprobs": None, "finish_reason": fin}

        await asyncio.sleep(o.ttft_ms / 1000)
        if op == "chat":
            yield chunk(
                [
                    delta(i, {"role": "assistant", "content": "" if not tool else None, "refusal": None})
                    for i in range(n)
                ]
            )
        if tool and tool["type"] == "custom":
            yield chunk([delta(i, {"tool_calls": [{"index": 0, **tool}]}) for i in range(n)])
            fin = "tool_calls"
        elif tool:
            fn = tool["function"]
            first = {
                "index": 0,
                "id": tool["id"],
                "type": "function",
                "function": {"name": fn["name"], "arguments": ""},
            }
            yield chunk([delta(i, {"tool_calls": [first]}) for i in range(n)])
            args = fn["arguments"]
            for k in range(0, len(args), 8):
                await asyncio.sleep(pause)
                yield chunk(
                    [
                        delta(i, {"tool_calls": [{"index": 0, "function": {"arguments": args[k : k + 8]}}]})
                        for i in range(n)
                    ]
                )
            fin = "tool_calls"
        else:
            for k in range(0, len(words), step):
                text = "".join(words[k : k + step])
                if k == 0:
                    text = text.lstrip()
                yield chunk([delta(i, {"content": text}) for i in range(n)])
                await asyncio.sleep(pause)
            fin = finish
        yield chunk([delta(i, {}, fin) for i in range(n)])
        yield _encode({**head, "choices": [], "usage": usage})

    def _embeddings(self, r: Request, model: str) -> UpstreamResponse:
        dims = r.dimensions or self.options.embedding_dims
        b64 = r.encoding_format == "base64"
        data = []
        tokens = 0
        for i, item in enumerate(r.inputs):
            text = item if isinstance(item, str) else " ".join(map(str, item))
            tokens += count_text(text) if isinstance(item, str) else len(item)
            vec = _vector(text, dims)
            emb: Any = base64.b64encode(struct.pack(f"<{dims}f", *vec)).decode() if b64 else vec
            data.append({"object": "embedding", "index": i, "embedding": emb})
        body = _encode(
            {
                "object": "list",
                "data": data,
                "model": model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )
        return UpstreamResponse(status=200, body=body)


def _structured_text(r: Request) -> str | None:
    """The answer's JSON text when `response_format` asks for JSON: an instance of the json_schema's
    `schema` (plugins.schema_instance), or for json_object an object holding the simulated text."""
    fmt = r.response_format
    if fmt is None or fmt.type not in ("json_object", "json_schema"):
        return None
    if fmt.type == "json_schema" and fmt.json_schema is not None:
        try:
            spec = msgspec.json.decode(fmt.json_schema)
        except msgspec.DecodeError:
            spec = None
        if isinstance(spec, dict) and "schema" in spec:
            return _encode(instance(spec["schema"])).decode()
    return _encode({"answer": " ".join(_WORDS[:8])}).decode()


def _vector(text: str, dims: int) -> list[float]:
    """A deterministic unit vector from the text's hash: equal texts embed equally."""
    seed = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
    rng = random.Random(seed)
    vec = [rng.gauss(0.0, 1.0) for _ in range(dims)]
    norm = sum(v * v for v in vec) ** 0.5 or 1.0
    return [v / norm for v in vec]


def factory(backend: Backend) -> SimulatedAdapter:
    return SimulatedAdapter(backend)

"""A fake Anthropic Messages upstream (aiohttp.web, one process, loopback only), speaking the documented
wire format that tests/fixtures/anthropic/ records: for the native `anthropic` adapter's tests.

Run: ``python -m tests.harness.fake_anthropic --port P [--key K]``.

``POST /v1/messages`` checks what the real API checks and what the adapter must get right:
- ``x-api-key`` or a bearer token (401 ``authentication_error`` when missing, or not ``--key`` when one is set) and
  ``anthropic-version`` (400 when missing);
- a body with ``model``, ``max_tokens`` and ``messages``, and no top-level field the API does not know
  (400 ``invalid_request_error`` "<name>: Extra inputs are not permitted", as the real API answers);
- every ``thinking`` block sent back must carry a signature this process issued for exactly that text
  (400 "Invalid `signature` in `thinking` block" otherwise): a signature that was re-encoded, cut or lost
  on the way fails the request, as it does at Anthropic.

The answer, deterministic: with ``thinking`` enabled, a thinking block (its text, a signature) first, and
a ``redacted_thinking`` block too when the model name contains ``redacted``; then a ``tool_use`` block
(the first tool, or the one ``tool_choice`` names; ``input`` built from its schema) when tools are offered
and the last user turn holds no ``tool_result``, else a text block (``max_tokens`` cuts it:
``stop_reason: max_tokens``; a ``stop_sequences`` entry in it cuts it: ``stop_sequence``). Usage counts
words; a request with ``cache_control`` anywhere reports the prompt up to its last marker as
``cache_creation_input_tokens`` the first time that prefix is seen, ``cache_read_input_tokens`` after.
Streams send Anthropic's named events in its order (message_start, content_block_start, ping after the
first, deltas, content_block_stop, message_delta, message_stop).

Faults by model name: ``fault:429`` (``retry-after: 1``), ``fault:529`` (``overloaded_error``),
``fault:400``, ``fault:404`` (``not_found_error``, as for an unknown model), ``fault:500``, ``fault:error-event`` (a stream that sends a text delta, then ``event:
error`` overloaded_error), ``fault:error-before-content`` (message_start, ping, then the error), ``fault:no-stop`` (a stream that ends after message_delta, without
message_stop). Control: ``GET /healthz``, ``GET /_ledger`` (every request: path, query, headers lower-cased,
``body_b64`` its exact bytes, ``status``, ``response_b64`` the exact bytes of the answer's body), ``POST /_reset``. ``GET /v1/models`` lists the models.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
from typing import Any

from aiohttp import web

KNOWN_FIELDS = frozenset(
    {
        "model",
        "messages",
        "max_tokens",
        "system",
        "stop_sequences",
        "temperature",
        "top_p",
        "top_k",
        "metadata",
        "stream",
        "tools",
        "tool_choice",
        "thinking",
        "service_tier",
        "container",
        "mcp_servers",
        "context_management",
        "output_config",
        "inference_geo",
    }
)
TEXT = "Hello from the fake Anthropic upstream, answering in plain words"


class State:
    def __init__(self, key: str | None) -> None:
        self.key = key
        self.ledger: list[dict[str, Any]] = []
        self.signatures: dict[str, str] = {}  # signature -> the thinking text it was issued for
        self.prefixes: set[str] = set()  # cached prompt prefixes (digests)
        self.counter = 0


STATE = web.AppKey("state", State)


def _error(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    body = {"type": "error", "error": {"type": kind, "message": message}, "request_id": "req_fake0001"}
    return web.Response(status=status, body=json.dumps(body).encode(), content_type="application/json", headers=headers)


def _words(value: Any) -> int:
    """Word count of every string in a JSON value (the fake's token count)."""
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        return sum(_words(v) for v in value)
    if isinstance(value, dict):
        return sum(_words(v) for k, v in value.items() if k not in ("type", "cache_control", "signature"))
    return 0


def _has_cache_control(value: Any) -> bool:
    if isinstance(value, dict):
        return "cache_control" in value or any(_has_cache_control(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_cache_control(v) for v in value)
    return False


def _signature(state: State, text: str) -> str:
    digest = hashlib.sha256(f"{state.counter}:{text}".encode()).digest() * 3
    sig = "Eq" + base64.b64encode(digest).decode()
    state.signatures[sig] = text
    return sig


def _check_thinking(state: State, messages: list[Any]) -> str | None:
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if not isinstance(content, list):
            continue
        for j, block in enumerate(content):
            if isinstance(block, dict) and block.get("type") == "thinking":
                sig = block.get("signature")
                if not isinstance(sig, str) or state.signatures.get(sig) != block.get("thinking"):
                    return f"messages.{i}.content.{j}: Invalid `signature` in `thinking` block"
    return None


def _last_user(messages: list[Any]) -> tuple[str, list[str]]:
    """The last user turn's text and the texts of its tool results."""
    for m in reversed(messages):
        if m.get("role") != "user":
            continue
        content = m.get("content")
        if isinstance(content, str):
            return content, []
        texts, results = [], []
        for b in content or []:
            if b.get("type") == "text":
                texts.append(b.get("text", ""))
            elif b.get("type") == "tool_result":
                c = b.get("content")
                results.append(c if isinstance(c, str) else " ".join(x.get("text", "") for x in c or []))
        return " ".join(texts), results
    return "", []


def _example(schema: Any) -> Any:
    kind = schema.get("type") if isinstance(schema, dict) else None
    if kind == "object":
        props = schema.get("properties") or {}
        return {k: _example(v) for k, v in props.items()}
    return {"string": "Paris", "number": 1.5, "integer": 1, "boolean": True, "array": []}.get(kind or "")


def _plan(state: State, body: dict[str, Any]) -> tuple[list[dict[str, Any]], str, str | None]:
    """The content blocks, stop_reason and stop_sequence of the answer."""
    blocks: list[dict[str, Any]] = []
    messages = body["messages"]
    user_text, results = _last_user(messages)
    thinking = body.get("thinking") or {}
    if thinking.get("type") == "enabled":
        text = f"The user wrote {len(user_text.split())} words; I will answer briefly."
        blocks.append({"type": "thinking", "thinking": text, "signature": _signature(state, text)})
        if "redacted" in body["model"]:
            blocks.append(
                {"type": "redacted_thinking", "data": "EmwKAhgBEgy" + hashlib.sha256(text.encode()).hexdigest()}
            )
    tools = body.get("tools") or []
    choice = body.get("tool_choice") or {}
    if tools and not results and choice.get("type") != "none":
        tool = next((t for t in tools if t.get("name") == choice.get("name")), tools[0])
        call_id = "toolu_01" + hashlib.sha256(f"{state.counter}".encode()).hexdigest()[:22]
        blocks.append(
            {"type": "tool_use", "id": call_id, "name": tool["name"], "input": _example(tool.get("input_schema"))}
        )
        return blocks, "tool_use", None
    text = f"The tool said: {results[0]}" if results else TEXT
    words = text.split(" ")
    reason, sequence = "end_turn", None
    for stop in body.get("stop_sequences") or []:
        if stop in text:
            text, reason, sequence = text[: text.index(stop)], "stop_sequence", stop
            break
    words = text.split(" ")
    if len(words) > body["max_tokens"]:
        words, reason, sequence = words[: body["max_tokens"]], "max_tokens", None
    blocks.append({"type": "text", "text": " ".join(words)})
    return blocks, reason, sequence


def _usage(state: State, body: dict[str, Any], output: int) -> dict[str, Any]:
    prompt = _words(body.get("system")) + _words(body["messages"]) + _words(body.get("tools"))
    usage = {
        "input_tokens": prompt,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": output,
    }
    if _has_cache_control(body):
        cached_part = {"system": body.get("system"), "tools": body.get("tools"), "messages": body["messages"][:-1]}
        size = _words(cached_part["system"]) + _words(cached_part["tools"]) + _words(cached_part["messages"])
        digest = hashlib.sha256(json.dumps(cached_part, sort_keys=True).encode()).hexdigest()
        if digest in state.prefixes:
            usage["cache_read_input_tokens"] = size
        else:
            state.prefixes.add(digest)
            usage["cache_creation_input_tokens"] = size
        usage["input_tokens"] = prompt - size
    if isinstance(body.get("inference_geo"), str):
        # Anthropic reports where inference ran; the fake ran it where it was asked to.
        usage["inference_geo"] = body["inference_geo"]
    return usage


def _sse(name: str, data: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def _pieces(text: str, n: int = 3) -> list[str]:
    step = max(1, len(text) // n)
    return [text[i : i + step] for i in range(0, len(text), step)] or [""]


async def messages(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    raw = await request.read()
    record: dict[str, Any] = {
        "path": request.path,
        "query": request.query_string,
        "headers": {k.lower(): v for k, v in request.headers.items()},
        "body_b64": base64.b64encode(raw).decode(),
        "status": None,
        "response_b64": None,  # set once the answer is written whole
    }
    state.ledger.append(record)
    sent: list[bytes] = []
    response = await _answer(state, request, raw, sent)
    record["status"] = response.status
    if isinstance(response, web.Response) and response.body is not None:
        sent.append(bytes(response.body))  # type: ignore[arg-type]
    record["response_b64"] = base64.b64encode(b"".join(sent)).decode()
    return response


async def _answer(state: State, request: web.Request, raw: bytes, sent: list[bytes]) -> web.StreamResponse:
    # The API's key header; the anthropic SDK 2.x sends its api_key as a bearer token, which the API takes too.
    key = request.headers.get("x-api-key") or request.headers.get("authorization", "").removeprefix("Bearer ") or None
    if not key or (state.key is not None and key != state.key):
        return _error(401, "authentication_error", "invalid x-api-key")
    if "anthropic-version" not in request.headers:
        return _error(400, "invalid_request_error", "anthropic-version: header is required")
    try:
        body = json.loads(raw)
    except ValueError:
        return _error(400, "invalid_request_error", "The request body is not valid JSON.")
    if not isinstance(body, dict):
        return _error(400, "invalid_request_error", "The request body must be an object.")
    for name in body:
        if name not in KNOWN_FIELDS:
            return _error(400, "invalid_request_error", f"{name}: Extra inputs are not permitted")
    for name in ("model", "max_tokens", "messages"):
        if name not in body:
            return _error(400, "invalid_request_error", f"{name}: Field required")
    model = body["model"]
    if model == "fault:429":
        return _error(
            429, "rate_limit_error", "Number of request tokens has exceeded your rate limit.", {"retry-after": "1"}
        )
    if model == "fault:529":
        return _error(529, "overloaded_error", "Overloaded")
    if model == "fault:500":
        return _error(500, "api_error", "Internal server error")
    if model == "fault:404":
        return _error(404, "not_found_error", f"model: {model}")
    if model == "fault:400":
        return _error(400, "invalid_request_error", "prompt is invalid for this fake model")
    problem = _check_thinking(state, body["messages"])
    if problem is not None:
        return _error(400, "invalid_request_error", problem)
    state.counter += 1
    blocks, reason, sequence = _plan(state, body)
    output = sum(_words(b) for b in blocks) or 1
    usage = _usage(state, body, output)
    message_id = f"msg_01fake{state.counter:016d}"
    if not body.get("stream"):
        message = {
            "id": message_id,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": blocks,
            "stop_reason": reason,
            "stop_sequence": sequence,
            "usage": usage,
        }
        return web.Response(body=json.dumps(message).encode(), content_type="application/json")
    stream = web.StreamResponse(
        headers={"content-type": "text/event-stream; charset=utf-8", "cache-control": "no-cache"}
    )
    await stream.prepare(request)

    async def write(data: bytes) -> None:
        sent.append(data)
        await stream.write(data)

    start_usage = {**usage, "output_tokens": 1}
    head = {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": start_usage,
    }
    await write(_sse("message_start", {"type": "message_start", "message": head}))
    if model == "fault:error-before-content":
        await write(_sse("ping", {"type": "ping"}))
        await write(_sse("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}))
        return stream
    for index, block in enumerate(blocks):
        events = _block_events(index, block)
        if index == 0:
            events.insert(1, _sse("ping", {"type": "ping"}))  # where the API sends it: after the first start
        await write(b"".join(events))
        if model == "fault:error-event":
            error = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
            await write(_sse("error", error))
            return stream
    delta = {
        "type": "message_delta",
        "delta": {"stop_reason": reason, "stop_sequence": sequence},
        "usage": {"output_tokens": output},
    }
    await write(_sse("message_delta", delta))
    if model != "fault:no-stop":
        await write(_sse("message_stop", {"type": "message_stop"}))
    await stream.write_eof()
    return stream


def _block_events(index: int, block: dict[str, Any]) -> list[bytes]:
    kind = block["type"]
    out: list[bytes] = []
    if kind == "text":
        out.append(
            _sse(
                "content_block_start",
                {"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}},
            )
        )
        for piece in _pieces(block["text"]):
            out.append(
                _sse(
                    "content_block_delta",
                    {"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": piece}},
                )
            )
    elif kind == "thinking":
        start = {"type": "thinking", "thinking": "", "signature": ""}
        out.append(_sse("content_block_start", {"type": "content_block_start", "index": index, "content_block": start}))
        for piece in _pieces(block["thinking"]):
            delta = {"type": "thinking_delta", "thinking": piece}
            out.append(_sse("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}))
        delta = {"type": "signature_delta", "signature": block["signature"]}
        out.append(_sse("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}))
    elif kind == "redacted_thinking":
        out.append(_sse("content_block_start", {"type": "content_block_start", "index": index, "content_block": block}))
    elif kind == "tool_use":
        start = {**block, "input": {}}
        out.append(_sse("content_block_start", {"type": "content_block_start", "index": index, "content_block": start}))
        args = json.dumps(block["input"])
        for piece in ["", *_pieces(args, 2)]:
            delta = {"type": "input_json_delta", "partial_json": piece}
            out.append(_sse("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}))
    out.append(_sse("content_block_stop", {"type": "content_block_stop", "index": index}))
    return out


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def ledger(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATE].ledger)


async def reset(request: web.Request) -> web.Response:
    request.app[STATE].ledger.clear()
    return web.json_response({"status": "ok"})


async def models(request: web.Request) -> web.Response:
    data = [{"type": "model", "id": "claude-fake", "display_name": "Claude Fake", "created_at": "2025-01-01T00:00:00Z"}]
    return web.json_response({"data": data, "has_more": False, "first_id": "claude-fake", "last_id": "claude-fake"})


def make_app(key: str | None = None) -> web.Application:
    app = web.Application(client_max_size=16 * 1024 * 1024)
    app[STATE] = State(key)
    app.router.add_post("/v1/messages", messages)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/_ledger", ledger)
    app.router.add_post("/_reset", reset)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--key", default=None)
    args = parser.parse_args()
    web.run_app(make_app(args.key), host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()

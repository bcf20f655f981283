"""The fake OpenAI upstream's `POST /v1/responses` (OpenAI's Responses API, minimal): what a backend with
the `responses` capability is sent by Strait's passthrough. Shapes follow tests/fixtures/openai/
responses_*.{json,sse} (checked by tests/test_fake_responses_conformance.py).

Every answer starts with a reasoning item whose `encrypted_content` is a token the fake minted from its
own secret; a reasoning item sent back in `input` must carry one it minted (else 400, as OpenAI refuses
encrypted content it cannot verify), so a client's second turn proves the blob survived byte for byte.
With `tools` and no `function_call_output` in the input, the answer is a call of the first function tool;
otherwise the text `Echo: <the last user text>`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

_SECRET = secrets.token_hex(8)
REASONING_TOKENS = 3


_MINTED: set[str] = set()  # every blob this process issued (a test's worth: unbounded is fine)


def _mint(seed: str) -> str:
    blob = "gAAAA" + hashlib.sha256((_SECRET + seed).encode()).hexdigest()
    _MINTED.add(blob)
    return blob


def _valid(blob: Any) -> bool:
    return isinstance(blob, str) and blob in _MINTED


def _last_user_text(items: list[Any]) -> str:
    for item in reversed(items):
        if isinstance(item, dict) and item.get("role") == "user":
            content = item.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def _output(body: dict[str, Any], rid: str) -> tuple[list[dict[str, Any]], int]:
    raw = body.get("input")
    items: list[Any] = [{"role": "user", "content": raw}] if isinstance(raw, str) else list(raw or [])
    reasoning = {
        "id": "rs_" + rid[5:],
        "type": "reasoning",
        "summary": [{"type": "summary_text", "text": "Thinking."}],
        "encrypted_content": _mint(rid),
    }
    tools = [t for t in body.get("tools") or () if isinstance(t, dict) and t.get("type") == "function"]
    answered = any(isinstance(i, dict) and i.get("type") == "function_call_output" for i in items)
    if tools and not answered:
        call = {
            "id": "fc_" + rid[5:],
            "type": "function_call",
            "status": "completed",
            "arguments": '{"city":"Paris"}',
            "call_id": "call_" + rid[5:17],
            "name": tools[0].get("name", ""),
        }
        return [reasoning, call], REASONING_TOKENS + 5
    text = "Echo: " + _last_user_text(items)
    message = {
        "id": "msg_" + rid[5:],
        "type": "message",
        "status": "completed",
        "content": [{"type": "output_text", "annotations": [], "logprobs": [], "text": text}],
        "role": "assistant",
    }
    return [reasoning, message], REASONING_TOKENS + len(text.split())


def _response(body: dict[str, Any], rid: str, status: str, output: list[Any], usage: Any) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "response",
        "created_at": int(time.time()),
        "status": status,
        "background": False,
        "error": None,
        "incomplete_details": None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "model": body.get("model"),
        "output": output,
        "parallel_tool_calls": True,
        "previous_response_id": None,
        "reasoning": {"effort": "low", "summary": "auto"},
        "store": body.get("store", True),
        "temperature": 1.0,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": body.get("tools") or [],
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": usage,
        "metadata": {},
    }


def _usage(prompt: int, output: int) -> dict[str, Any]:
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": REASONING_TOKENS},
        "total_tokens": prompt + output,
    }


def handler(fu: Any) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """The route's handler on the fake's own helpers: `fu` is the running fake_upstream module (run as
    `__main__`, a second import of it would hold another app key)."""

    async def responses(request: web.Request) -> web.StreamResponse:
        return await _responses(fu, request)

    return responses


async def _responses(fu: Any, request: web.Request) -> web.StreamResponse:
    ctx = request[fu.CTX]
    body, sent = await fu.read_json(ctx)
    if sent is not None:
        return sent
    model = body.get("model") if isinstance(body.get("model"), str) else ""
    raw = body.get("input")
    if raw is None:
        return await fu._missing(ctx, "input")
    items = raw if isinstance(raw, list) else []
    for i, item in enumerate(items):
        if isinstance(item, dict) and item.get("type") == "reasoning" and not _valid(item.get("encrypted_content")):
            return await fu.send_error(
                ctx,
                400,
                message=f"The encrypted content for item input[{i}] could not be verified.",
                etype="invalid_request_error",
                param=f"input[{i}]",
                code="invalid_encrypted_content",
            )
    prompt_tokens = max(1, len(json.dumps(raw)) // 4)
    sent = await fu.before_answer(ctx, model=model, prompt_tokens=prompt_tokens)
    if sent is not None:
        return sent
    rid = "resp_" + hashlib.sha256(fu._digest(body, str(ctx.n)).encode()).hexdigest()[:48]
    output, tokens = _output(body, rid)
    usage = _usage(prompt_tokens, tokens)
    if body.get("stream"):
        try:
            return await _stream(fu, ctx, body, rid, output, usage, tokens)
        except _Failed:
            ctx.record["finished"] = True
            return ctx.response
    answer = fu._dumps(_response(body, rid, "completed", output, usage)).encode()
    ctx.record["response_b64"] = base64.b64encode(answer).decode()  # what was sent (passthrough tests)
    return await fu.send_json(ctx, 200, answer, tokens=tokens)


class _Failed(Exception):
    """The stream ended with response.failed (its answer is written)."""


async def _stream(
    fu: Any, ctx: Any, body: dict[str, Any], rid: str, output: list[dict[str, Any]], usage: Any, tokens: int
) -> web.StreamResponse:
    resp = await fu._start_stream(ctx)
    seq = 0
    sent: list[bytes] = []

    async def emit(kind: str, **fields: Any) -> None:
        nonlocal seq
        data = fu._dumps({"type": kind, "sequence_number": seq, **fields})
        seq += 1
        frame = b"event: " + kind.encode() + b"\ndata: " + data.encode() + b"\n\n"
        sent.append(frame)
        await resp.write(frame)
        ctx.mark_first_byte()
        if seq == ctx.d.get("fail_after_chunks"):  # fault:cut-after-N: the connection drops after N events
            ctx.record["response_b64"] = base64.b64encode(b"".join(sent)).decode()
            fu.abort_connection(ctx)
            raise fu._Aborted
        if seq == ctx.d.get("midstream_error"):  # fault:error-event-after-N: the upstream fails the response
            failed = _response(body, rid, "failed", [], None)
            failed["error"] = {"code": "server_error", "message": "internal-host-7 failed"}
            data = fu._dumps({"type": "response.failed", "sequence_number": seq, "response": failed})
            sent.append(b"event: response.failed\ndata: " + data.encode() + b"\n\n")
            await resp.write(sent[-1])
            ctx.record["response_b64"] = base64.b64encode(b"".join(sent)).decode()
            await resp.write_eof()
            raise _Failed

    await emit("response.created", response=_response(body, rid, "in_progress", [], None))
    await emit("response.in_progress", response=_response(body, rid, "in_progress", [], None))
    for index, item in enumerate(output):
        kind = item["type"]
        if kind == "reasoning":
            await emit("response.output_item.added", output_index=index, item={**item, "summary": []})
            text = item["summary"][0]["text"]
            ids = {"item_id": item["id"], "output_index": index, "summary_index": 0}
            await emit("response.reasoning_summary_part.added", **ids, part={"type": "summary_text", "text": ""})
            await emit("response.reasoning_summary_text.delta", **ids, delta=text)
            await emit("response.reasoning_summary_text.done", **ids, text=text)
            await emit("response.reasoning_summary_part.done", **ids, part={"type": "summary_text", "text": text})
        elif kind == "function_call":
            await emit("response.output_item.added", output_index=index, item={**item, "arguments": ""})
            args = item["arguments"]
            ids = {"item_id": item["id"], "output_index": index}
            for piece in (args[: len(args) // 2], args[len(args) // 2 :]):
                await emit("response.function_call_arguments.delta", **ids, delta=piece)
            await emit("response.function_call_arguments.done", **ids, arguments=args)
        else:
            added = {**item, "status": "in_progress", "content": []}
            await emit("response.output_item.added", output_index=index, item=added)
            text = item["content"][0]["text"]
            ids = {"item_id": item["id"], "output_index": index, "content_index": 0}
            empty = {"type": "output_text", "annotations": [], "logprobs": [], "text": ""}
            await emit("response.content_part.added", **ids, part=empty)
            words = text.split(" ")
            for i, word in enumerate(words):
                await emit("response.output_text.delta", **ids, delta=word if i == 0 else " " + word, logprobs=[])
            await emit("response.output_text.done", **ids, text=text, logprobs=[])
            await emit("response.content_part.done", **ids, part=item["content"][0])
        await emit("response.output_item.done", output_index=index, item=item)
    await emit("response.completed", response=_response(body, rid, "completed", output, usage))
    ctx.record["response_b64"] = base64.b64encode(b"".join(sent)).decode()
    await resp.write_eof()
    ctx.add_tokens(tokens)
    ctx.record["finished"] = True
    return resp

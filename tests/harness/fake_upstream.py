"""An OpenAI-compatible fake upstream for the gateway's tests (aiohttp.web, one process, loopback only).

Run: ``python -m tests.harness.fake_upstream --port P`` (binds 127.0.0.1; ``--models a,b`` sets the model list,
``--slots N`` the engine slots its metrics assume).  The full reference, with examples: ``tests/harness/README.md``.

Endpoints: ``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /v1/chat/completions``, ``POST /v1/completions``,
``POST /v1/embeddings``; engine-style ``GET /health`` (200, or 503 when switched off) and ``GET /metrics`` (vLLM
gauge names, see below).  Control (never in the ledger): ``GET /healthz`` (the harness's own readiness, always 200),
``GET /_ledger`` (``?since=N``), ``POST /_reset`` (ledger, attempt counters, health and metrics back to defaults;
``?counter=1`` also resets the request counter), ``GET /_info``, ``GET|POST /_health`` (``{"ok": false}`` makes
/health 503 and the inference endpoints 503; ``"serve": true|false`` sets the latter apart), ``GET|POST /_metrics``
(pin ``running`` / ``waiting`` / ``kv_cache_usage``, null un-pins; ``slots``; ``status`` makes the scrape fail;
``kv_names``; ``reset``).

Directives steer the behaviour per request, given as request headers ``x-fake-<name>`` (dashes or underscores:
``x-fake-fail-after-chunks: 2``) or as a JSON body field ``"fake": {"<name>": value}`` (the body wins when both are
given; the gateway forwards unknown body fields), or by the model name: ``"model": "fault:<item>[+<item>...]"``
(lowest precedence) so a policy can point one deployment at a faulty "model" and another at a healthy one.  Items are
presets such as ``429-retry-after-2``, ``429-retry-after-date-2``, ``429-no-retry-after``, ``500-once``, ``503``,
``503-ratio-0.5``, ``reset``, ``fin``, ``hang``, ``slow-first-token-3000``, ``cut-after-3``, ``stall-after-3``,
``malformed-after-2``, ``no-done``, ``context-length``, ``context-window-N``, ``content-filter``, ``invalid-prompt``,
``prefill`` / ``no-prefill`` (continue / refuse a final assistant message; ``continue_final_message`` also continues)
and the plain model ``tools-in-turn`` (given tools, each is called once in turn, then it answers in text: an agent loop)
(any preset takes ``-once`` / ``-first-N`` / ``-ratio-P``), or raw ``name=value`` directives; see
``tests/harness/fake_faults.py``.  Unknown names or bad values get a 400, so a typo cannot pass silently.  See
``DIRECTIVES`` for names and meanings.

Gates: ``fail_first: N`` serves the fault directives (``fake_faults.FAULT_DIRECTIVES``) only to the first N attempts
under a key, and ``fail_ratio: p`` to exactly floor(n*p) of the first n; the key is ``key`` (``x-fake-key``) when
given, else the request itself (path + exact body bytes, which a gateway's retries repeat) for fail_first and the
model name for fail_ratio.

Text is deterministic: NATO-alphabet words, one per completion token, the first token being the per-request marker
``<<req:N>>`` (N = this process's request counter, never reused) unless ``marker`` is false.  With a ``seed`` in the
body, ids and ``created`` derive from a hash of the body and the marker defaults to off, so identical requests produce
byte-identical bodies.  Usage: ``completion_tokens`` = words (tool calls: argument fragments); ``prompt_tokens`` =
``count_prompt_tokens(messages)`` (tiktoken o200k_base when its BPE file is cached locally, else a pre-token
approximation; ``TOKENIZER`` says which).

Ledger record (one per non-control request, appended when the request arrives and updated in place)::

    {"n", "path", "query", "method", "headers" (lower-case names), "body" (parsed JSON or null), "body_b64" (its exact
     bytes), "stream", "model", "status" (null until answered), "completion_tokens_generated" (tokens written so
     far), "client_disconnected" (the client - e.g. the gateway - went away before the end), "finished" (the whole
     response was written), "aborted" (the fake cut the connection on purpose), "faults" (fault directives in force
     for this attempt, "down" when health was off), "key" / "attempt" (gate key and 1-based attempt number, null
     without a gate), "stalled_at", "malformed_events", "prefill_words" (words of a continued assistant prefix),
     and epoch-second times "started_at" (arrival),
     "first_byte_at", "first_token_at", "ended_at" (null while in progress)}

Metrics (``GET /metrics``, Prometheus text, labels ``engine="0",model_name=<first model>``):
``vllm:num_requests_running`` = min(in-flight, slots), ``vllm:num_requests_waiting`` = the rest,
``vllm:kv_cache_usage_perc`` and ``vllm:gpu_cache_usage_perc`` = running / slots, ``vllm:generation_tokens_total``.
In-flight counts the inference requests in progress.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import math
import os
import re
import secrets
import socket
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from tests.harness import fake_faults as ff
from tests.harness import fake_responses

# ---------------------------------------------------------------------------------------------------------------------
# Token counting: tiktoken o200k_base when its BPE file is available offline, else a regex approximation.


def _tiktoken_cache_path(url: str) -> str | None:
    """Where tiktoken caches `url` (mirrors tiktoken.load.read_file_cached); None when caching is disabled."""
    cache_dir = os.environ.get("TIKTOKEN_CACHE_DIR", os.environ.get("DATA_GYM_CACHE_DIR"))
    if cache_dir is None:
        cache_dir = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    if cache_dir == "":
        return None
    return os.path.join(cache_dir, hashlib.sha1(url.encode()).hexdigest())


def _approx_counter() -> Callable[[str], int]:
    """Count GPT-style pre-tokens (words with their leading space, 1-3 digit groups, punctuation runs, whitespace runs).

    For plain English this matches o200k_base on most words; it is the fallback when the BPE file is not available.
    """
    pat = re.compile(r" ?[^\W\d_]+| ?\d{1,3}| ?[^\s\w]+|\s+(?!\S)|\s+")
    return lambda text: len(pat.findall(text))


def _load_encoding() -> tuple[Callable[[str], int], str]:
    """Use tiktoken's o200k_base only when it will not try to download (no network here); else approximate."""
    url = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"
    path = _tiktoken_cache_path(url)
    allow_download = os.environ.get("FAKE_UPSTREAM_TIKTOKEN_DOWNLOAD") == "1"
    if not ((path and os.path.exists(path)) or allow_download):
        return _approx_counter(), "approx:pretokens"
    try:
        import tiktoken

        enc = tiktoken.get_encoding("o200k_base")
    except Exception:  # noqa: BLE001 - any failure (bad file, no network) falls back to the approximation
        return _approx_counter(), "approx:pretokens"
    return (lambda text: len(enc.encode(text, disallowed_special=()))), "tiktoken:o200k_base"


count_tokens, TOKENIZER = _load_encoding()


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                parts.append(part["text"])
            elif isinstance(part, str):
                parts.append(part)
        return "".join(parts)
    return ""


def count_prompt_tokens(messages: Any) -> int:
    """Prompt tokens of a chat request: the sum of the token counts of each message's text content."""
    if not isinstance(messages, list):
        return 0
    return sum(count_tokens(_content_text(m.get("content"))) for m in messages if isinstance(m, dict))


# ---------------------------------------------------------------------------------------------------------------------
# Precomputed material.

WORDS = [
    "alpha",
    "bravo",
    "charlie",
    "delta",
    "echo",
    "foxtrot",
    "golf",
    "hotel",
    "india",
    "juliet",
    "kilo",
    "lima",
    "mike",
    "november",
    "oscar",
    "papa",
    "quebec",
    "romeo",
    "sierra",
    "tango",
    "uniform",
    "victor",
    "whiskey",
    "xray",
    "yankee",
    "zulu",
]
_SPACED = [" " + w for w in WORDS]
# With `vocab: cl100k`: words that are exactly one cl100k_base token each (with their leading space), so a
# gateway that estimates with tiktoken must arrive at the fake's own count (accounting tests).
CL100K_SPACED = [" alpha", " delta", " echo", " golf", " hotel", " india", " mike", " november", " uniform", " whiskey"]
SYSTEM_FINGERPRINT = "fp_fake0001"
SERVICE_TIER = "default"
DEFAULT_MODELS = ("fake-model", "gpt-4o-mini", "text-embedding-3-small")
MODELS_CREATED = 1_700_000_000
SSE_DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
_ARG_FRAGMENT = re.compile(r"[A-Za-z0-9_ ]+|[^A-Za-z0-9_ ]+")


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def usage_object(
    prompt_tokens: int, completion_tokens: int, *, details: bool = True, d: dict[str, Any] | None = None
) -> dict[str, Any]:
    """OpenAI's usage block; the directives `d` may report prompt-cache reads and writes and reasoning
    tokens (parts of the prompt and completion tokens, each clamped to its total)."""
    d = d or {}
    cached = min(max(0, d.get("cached_tokens", 0)), prompt_tokens)
    cache_write = min(max(0, d.get("cache_write_tokens", 0)), prompt_tokens - cached)
    reasoning = min(max(0, d.get("reasoning_tokens", 0)), completion_tokens)
    usage: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if details:
        usage["prompt_tokens_details"] = {"cached_tokens": cached, "audio_tokens": 0}
        if "cache_write_tokens" in d:  # Strait's name for Anthropic's cache_creation_input_tokens
            usage["prompt_tokens_details"]["cache_write_tokens"] = cache_write
        usage["completion_tokens_details"] = {
            "reasoning_tokens": reasoning,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        }
    return usage


# ---------------------------------------------------------------------------------------------------------------------
# Directives.


def _as_bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)):
        return bool(v)
    s = str(v).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {v!r}")


def _as_int(v: Any) -> int:
    if isinstance(v, bool):
        raise TypeError("boolean is not an integer")
    return int(v)


def _as_float(v: Any) -> float:
    if isinstance(v, bool):
        raise TypeError("boolean is not a number")
    return float(v)


def _as_str(v: Any) -> str:
    return str(v)


def _one_of(*choices: str) -> Callable[[Any], str]:
    def conv(v: Any) -> str:
        s = str(v)
        if s not in choices:
            raise ValueError(f"expected one of {choices}, got {s!r}")
        return s

    return conv


DIRECTIVES: dict[str, Callable[[Any], Any]] = {
    "status": _as_int,  # answer with this HTTP error status and an error envelope
    "retry_after": _as_str,  # retry-after header value on 429 (default "1"), and on 503 when given
    "error_style": _one_of("openai", "llamacpp", "vllm"),
    "error_code": _as_str,  # override error.code; "insufficient_quota" switches a 429 to the quota variant
    "tokens": _as_int,  # completion length in tokens (default 20), before max_tokens / stop
    "chunk_tokens": _as_int,  # tokens per streamed content delta (default 5)
    "ttft_ms": _as_float,  # delay before the first byte (headers included)
    "chunk_delay_ms": _as_float,  # delay between streamed content chunks
    "fail_after_chunks": _as_int,  # abort the TCP connection after N content chunks (non-stream: before any byte)
    "fail_mode": _one_of("rst", "fin"),  # how fail_after_chunks ends the connection (default rst)
    "midstream_error": _as_int,  # after N content chunks send data: {"error":...} and end without [DONE]
    "usage": _one_of("final-empty-choices", "final-with-choices", "none"),
    "hang": _as_bool,  # accept the request and never answer, until the client disconnects
    "marker": _as_bool,  # start the text with <<req:N>> (default true; false when the body has a seed)
    "vocab": _one_of("nato", "cl100k"),  # cl100k: one cl100k_base token per word, no marker
    "context_window": _as_int,  # reject prompts larger than this with the context-overflow 400 (default: no check)
    "deny_key_prefix": _as_str,  # 401 when the bearer key starts with this, its message echoing the whole key
    "error_message": _as_str,  # the message of the error envelope sent for `status` or `midstream_error`
    "ratelimit_headers": _as_bool,  # send the provider-account x-ratelimit-* headers on every answer
    # chat: add a "pad" field of this many bytes to the answer (non-stream: a huge JSON body) or to the first
    # content chunk (stream: one huge SSE line); it carries no tokens
    "pad_bytes": _as_int,
    # chat: the usage block reports this many prompt tokens read from / written to the provider's prompt
    # cache and this many reasoning tokens (parts of prompt_tokens and completion_tokens, clamped to them)
    "cached_tokens": _as_int,
    "cache_write_tokens": _as_int,
    "reasoning_tokens": _as_int,
    # --- faults for resilience tests (issue 10); see the module docstring for the model-name mapping ---
    "retry_after_date": _as_int,  # 429/503: Retry-After as an HTTP-date this many seconds ahead (rounded up)
    "reset": _as_bool,  # end the connection before any response byte (RST; FIN with fail_mode=fin)
    "first_token_ms": _as_float,  # stream: 200 + role chunk at once, first content chunk this late (non-stream: = ttft)
    "stall_after_chunks": _as_int,  # after N content chunks stop writing, connection open (non-stream: half the body)
    "stall_ms": _as_float,  # how long a stall lasts, then the answer goes on (default: until the client leaves)
    "malformed_after_chunks": _as_int,  # after N content chunks send one malformed event, then go on normally
    "malformed_kind": _one_of("json", "utf8"),  # truncated JSON (default) or invalid UTF-8 bytes in the data line
    "no_done": _as_bool,  # stream ends cleanly (FIN) after the finish_reason (and usage) chunk, without [DONE]
    "refusal": _one_of("azure", "openai"),  # 400 content-policy refusal: Azure content_filter / OpenAI invalid_prompt
    "fail_first": _as_int,  # gate: only the first N attempts under `key` get the fault directives, later ones are OK
    "fail_ratio": _as_float,  # gate: exactly floor(n*p) of the first n attempts under `key` are faulty, evenly spread
    "key": _as_str,  # the attempt-counter key for the gates (default: see fake_faults.default_key)
    # assistant prefill (mid-stream rescue): a final assistant message is continued when the body says
    # continue_final_message (vLLM) or with prefill=auto (llama.cpp, Anthropic); prefill=reject answers such a
    # request with a 400 (a deployment without the capability)
    "prefill": _one_of("auto", "reject"),
}


class DirectiveError(ValueError):
    pass


def parse_directives(headers: Any, body: Any, model_raw: dict[str, Any] | None = None) -> dict[str, Any]:
    """Directives from a ``fault:`` model name (lowest precedence), then headers, then the body's "fake" object."""
    raw: dict[str, Any] = dict(model_raw or {})
    for name, value in headers.items():
        lname = name.lower()
        if lname.startswith("x-fake-"):
            raw[lname[7:].replace("-", "_")] = value
    if isinstance(body, dict) and "fake" in body:
        fake = body["fake"]
        if not isinstance(fake, dict):
            raise DirectiveError("'fake' must be an object of directives")
        for name, value in fake.items():
            raw[str(name).replace("-", "_")] = value
    out: dict[str, Any] = {}
    for name, value in raw.items():
        conv = DIRECTIVES.get(name)
        if conv is None:
            raise DirectiveError(f"unknown fake directive {name!r}; known: {sorted(DIRECTIVES)}")
        try:
            out[name] = conv(value)
        except (TypeError, ValueError) as exc:
            raise DirectiveError(f"bad value for fake directive {name!r}: {exc}") from exc
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Error envelopes.

_LLAMACPP_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    501: "not_supported_error",
    503: "unavailable_error",
}
_VLLM_TYPES = {400: "BadRequestError", 401: "UnauthorizedError", 404: "NotFoundError", 429: "TooManyRequestsError"}


def _mask_key(auth: str | None) -> str:
    key = (auth or "").removeprefix("Bearer ").strip()
    if len(key) < 8:
        return "***"
    return key[:3] + "*" * (len(key) - 7) + key[-4:]


def error_response(
    status: int,
    d: dict[str, Any],
    *,
    model: str = "",
    prompt_tokens: int = 0,
    completion_tokens: int = 0,
    auth: str | None = None,
    message: str | None = None,
    etype: str | None = None,
    param: str | None = None,
    code: str | None = None,
) -> tuple[dict[str, Any], dict[str, str]]:
    """(body, extra headers) for an error `status`, in the style the directives ask for."""
    style = d.get("error_style", "openai")
    window = d.get("context_window", 8192)
    headers: dict[str, str] = {}
    retry_after = str(d.get("retry_after", "1"))
    if "retry_after_date" in d:
        retry_after = ff.retry_after_http_date(d["retry_after_date"])
    wait_s = str(d["retry_after_date"]) if "retry_after_date" in d else retry_after
    if not wait_s.isdigit():
        wait_s = "1"
    extra: dict[str, Any] = {}
    if message is None and "error_message" in d:
        message = d["error_message"]
    if message is None:
        if status == 400:
            n = prompt_tokens if prompt_tokens > window else window + prompt_tokens
            if style == "llamacpp":
                message = (
                    f"request ({n} tokens) exceeds the available context size ({window} tokens), try increasing it"
                )
                etype = "exceed_context_size_error"
                extra = {"n_prompt_tokens": n, "n_ctx": window}
            elif style == "vllm":
                message = (
                    f"This model's maximum context length is {window} tokens. However, you requested "
                    f"{n + completion_tokens} tokens ({n} in the messages, {completion_tokens} in the completion). "
                    "Please reduce the length of the messages or completion."
                )
            else:
                message = (
                    f"This model's maximum context length is {window} tokens. However, your messages resulted in "
                    f"{n} tokens. Please reduce the length of the messages."
                )
            etype, param, code = etype or "invalid_request_error", "messages", "context_length_exceeded"
        elif status == 401:
            if style == "llamacpp":
                message = "Invalid API Key"
            else:
                message = (
                    f"Incorrect API key provided: {_mask_key(auth)}. You can find your API key at "
                    "https://platform.openai.com/account/api-keys."
                )
            etype, code = "invalid_request_error", "invalid_api_key"
        elif status == 404:
            message = f"The model `{model}` does not exist or you do not have access to it."
            etype, code = "invalid_request_error", "model_not_found"
        elif status == 429 and d.get("error_code") == "insufficient_quota":
            message = (
                "You exceeded your current quota, please check your plan and billing details. For more information "
                "on this error, read the docs: https://platform.openai.com/docs/guides/error-codes/api-errors."
            )
            etype, code = "insufficient_quota", "insufficient_quota"
        elif status == 429:
            message = (
                f"Rate limit reached for {model or 'default'} in organization org-fake on requests per min (RPM): "
                f"Limit 60, Used 60, Requested 1. Please try again in {wait_s}s. "
                "Visit https://platform.openai.com/account/rate-limits to learn more."
            )
            etype, code = "requests", "rate_limit_exceeded"
        elif status == 500:
            message = "The server had an error while processing your request. Sorry about that!"
            etype = "server_error"
        elif status == 502:
            message = "Bad gateway."
            etype = "server_error"
        elif status == 503:
            message = "The engine is currently overloaded, please try again later."
            etype = "server_error"
        elif status == 504:
            message = "Gateway timeout."
            etype = "server_error"
        elif status >= 500:
            message = "The server had an error while processing your request."
            etype = "server_error"
        else:
            message = f"Request failed with status {status}."
            etype = "invalid_request_error"
    if "error_code" in d and d["error_code"] != "insufficient_quota":
        code = d["error_code"]
    etype = etype or ("server_error" if status >= 500 else "invalid_request_error")

    if style == "llamacpp":
        err: dict[str, Any] = {"code": status, "message": message, "type": _LLAMACPP_TYPES.get(status, etype)}
        if status == 400 and etype == "exceed_context_size_error":
            err["type"] = etype
        err.update(extra)
    elif style == "vllm":
        vtype = _VLLM_TYPES.get(status, "InternalServerError" if status >= 500 else "BadRequestError")
        err = {"message": message, "type": vtype, "param": param, "code": status}
    else:
        err = {"message": message, "type": etype, "param": param, "code": code}

    no_header = retry_after.strip().lower() in ("", "none")
    if status == 429:
        headers.update(ratelimit_headers(wait_s))
        if not no_header:
            headers["retry-after"] = retry_after
    elif status == 503 and ("retry_after" in d or "retry_after_date" in d) and not no_header:
        headers["retry-after"] = retry_after
    return {"error": err}, headers


def ratelimit_headers(reset: str = "1") -> dict[str, str]:
    """The provider-account rate-limit headers OpenAI sends (on 429s, and with `ratelimit_headers` on every answer)."""
    return {
        "x-ratelimit-limit-requests": "60",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": f"{reset}s",
        "x-ratelimit-limit-tokens": "150000",
        "x-ratelimit-remaining-tokens": "149980",
        "x-ratelimit-reset-tokens": "8ms",
    }


# ---------------------------------------------------------------------------------------------------------------------
# Server state and the ledger.

CONTROL_PATHS = frozenset({"/healthz", "/_ledger", "/_reset", "/_info", "/health", "/metrics", "/_health", "/_metrics"})
INFERENCE_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses"})


class State:
    def __init__(self, models: list[str], slots: int = 4) -> None:
        self.models = models
        self.counter = 0
        self.ledger: list[dict[str, Any]] = []
        self.attempts = ff.AttemptCounter()
        self.health = ff.Health()
        self.metrics = ff.Metrics(models[0] if models else "fake-model", slots)
        self.inflight = 0  # inference requests in progress (what the metrics gauges follow)
        self.generation_tokens = 0
        self.models_body = _dumps(
            {
                "object": "list",
                "data": [
                    {"id": m, "object": "model", "created": MODELS_CREATED, "owned_by": "strait-fake"} for m in models
                ],
            }
        ).encode()


STATE = web.AppKey("state", State)


class Ctx:
    """Per-request context: ledger record, directives, ids."""

    def __init__(self, request: web.Request, record: dict[str, Any]) -> None:
        self.request = request
        self.record = record
        self.d: dict[str, Any] = {}
        self.body: Any = None
        self.aborted = False
        self.response: web.StreamResponse | None = None

    @property
    def n(self) -> int:
        return int(self.record["n"])

    def add_tokens(self, k: int) -> None:
        if k > 0 and self.record["first_token_at"] is None:
            self.record["first_token_at"] = time.time()
        self.record["completion_tokens_generated"] += k
        self.request.app[STATE].generation_tokens += k

    def mark_first_byte(self) -> None:
        if self.record["first_byte_at"] is None:
            self.record["first_byte_at"] = time.time()


CTX = "fake_ctx"


@web.middleware
async def ledger_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    if request.path in CONTROL_PATHS:
        return await handler(request)
    state = request.app[STATE]
    state.counter += 1
    record: dict[str, Any] = {
        "n": state.counter,
        "path": request.path,
        "query": request.query_string,
        "method": request.method,
        "headers": _header_dict(request),
        "body": None,
        "stream": False,
        "status": None,
        "completion_tokens_generated": 0,
        "client_disconnected": False,
        "finished": False,
        "aborted": False,
        "started_at": time.time(),
        "first_byte_at": None,
        "first_token_at": None,
        "ended_at": None,
        "model": None,
        "key": None,
        "attempt": None,
        "faults": [],
        "stalled_at": None,
        "malformed_events": 0,
        "prefill_words": None,
    }
    state.ledger.append(record)
    ctx = Ctx(request, record)
    request[CTX] = ctx
    counted = request.path in INFERENCE_PATHS
    if counted:
        state.inflight += 1
    try:
        return await handler(request)
    except asyncio.CancelledError:
        if not ctx.aborted:
            record["client_disconnected"] = True
        raise
    except ConnectionError:
        if not ctx.aborted:
            record["client_disconnected"] = True
        return ctx.response or web.Response(status=499)
    finally:
        record["ended_at"] = time.time()
        if counted:
            state.inflight -= 1


def _header_dict(request: web.Request) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in request.headers.items():
        lk = k.lower()
        out[lk] = f"{out[lk]}, {v}" if lk in out else v
    return out


def _request_id() -> str:
    return "req_" + secrets.token_hex(16)


async def send_json(
    ctx: Ctx, status: int, obj: Any, headers: dict[str, str] | None = None, *, tokens: int = 0
) -> web.StreamResponse:
    """Write a whole JSON response now (so write errors surface here) and mark the ledger record finished."""
    body = obj if isinstance(obj, bytes) else _dumps(obj).encode()
    limits = ratelimit_headers() if ctx.d.get("ratelimit_headers") else {}
    all_headers = {"x-request-id": _request_id(), **limits, **(headers or {})}
    resp: web.StreamResponse
    if ctx.d.get("stall_after_chunks") is not None:
        # Headers and half the body, then the stall (a read timeout test for non-streamed answers).
        resp = web.StreamResponse(status=status, headers=all_headers)
        resp.content_type = "application/json"
        resp.content_length = len(body)
        ctx.response = resp
        ctx.record["status"] = status
        await resp.prepare(ctx.request)
        await resp.write(body[: len(body) // 2])
        ctx.mark_first_byte()
        await _stall(ctx)
        await resp.write(body[len(body) // 2 :])
    else:
        resp = web.Response(status=status, body=body, content_type="application/json", headers=all_headers)
        ctx.response = resp
        ctx.record["status"] = status
        await resp.prepare(ctx.request)
        ctx.mark_first_byte()
    await resp.write_eof()
    ctx.add_tokens(tokens)
    ctx.record["finished"] = True
    return resp


async def _stall(ctx: Ctx) -> None:
    """Keep the connection open and write nothing: for `stall_ms`, or until the client disconnects."""
    ctx.record["stalled_at"] = time.time()
    ms = ctx.d.get("stall_ms")
    if ms is None:
        await asyncio.Event().wait()  # ended by aiohttp cancelling the handler when the client goes
    else:
        await asyncio.sleep(ms / 1000.0)


async def send_error(ctx: Ctx, status: int, **kw: Any) -> web.StreamResponse:
    auth = ctx.request.headers.get("authorization")
    body, headers = error_response(status, ctx.d, auth=auth, **kw)
    return await send_json(ctx, status, body, headers)


def abort_connection(ctx: Ctx) -> None:
    """End the TCP connection abruptly: RST (SO_LINGER 0 + abort) or, with fail_mode=fin, a bare FIN."""
    ctx.aborted = True
    ctx.record["aborted"] = True
    transport = ctx.request.transport
    if transport is None:
        return
    if ctx.d.get("fail_mode", "rst") == "fin":
        transport.close()
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


class _Aborted(Exception):
    """Raised after abort_connection so the handler stops writing."""


async def read_json(ctx: Ctx) -> tuple[Any, web.StreamResponse | None]:
    """Parse the body and directives; returns (body, error response or None)."""
    raw = await ctx.request.read()
    ctx.record["body_b64"] = base64.b64encode(raw).decode()  # the exact bytes (passthrough tests)
    try:
        body = json.loads(raw) if raw else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        ctx.record["body"] = None
        return None, await send_error(
            ctx,
            400,
            message=(
                "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your "
                "HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was not valid JSON. "
                "If you have trouble figuring out how to fix this, please contact us through our help center at "
                "help.openai.com.)"
            ),
            etype="invalid_request_error",
        )
    ctx.record["body"] = body
    model = body.get("model") if isinstance(body, dict) else None
    if isinstance(body, dict):
        ctx.record["stream"] = bool(body.get("stream"))
        ctx.record["model"] = model if isinstance(model, str) else None
    try:
        ctx.d = resolve_directives(ctx, body, raw, model if isinstance(model, str) else "")
    except (DirectiveError, ff.FaultNameError) as exc:
        return body, await send_error(ctx, 400, message=str(exc), etype="invalid_request_error")
    if not isinstance(body, dict):
        return body, await send_error(
            ctx, 400, message="The request body must be a JSON object.", etype="invalid_request_error"
        )
    return body, None


def resolve_directives(ctx: Ctx, body: Any, raw_body: bytes, model: str) -> dict[str, Any]:
    """Parse the directives (model name, headers, body) and apply the attempt gates; records key, attempt, faults."""
    d = parse_directives(ctx.request.headers, body, ff.model_directives(model))
    if ff.GATE_DIRECTIVES & d.keys():
        key = ff.default_key(d, path=ctx.request.path, raw_body=raw_body, model=model)
        attempt = ctx.request.app[STATE].attempts.next(key)
        ctx.record["key"], ctx.record["attempt"] = key, attempt
        if not ff.gate_says_fail(d, attempt):
            d = ff.strip_faults(d)
    ctx.record["faults"] = sorted(ff.FAULT_DIRECTIVES & d.keys())
    return d


async def before_answer(ctx: Ctx, *, model: str, prompt_tokens: int) -> web.StreamResponse | None:
    """down / hang / ttft / reset / deny_key_prefix / refusal / status, in that order.  Returns a response when one
    was sent (or raises _Aborted after a reset)."""
    d = ctx.d
    if not ctx.request.app[STATE].health.serve:
        ctx.record["faults"] = [*ctx.record["faults"], "down"]
        return await send_error(ctx, 503, message="The engine is down (the fake's health is switched off).")
    if d.get("hang"):
        await asyncio.Event().wait()  # until the client disconnects and aiohttp cancels us
    ttft = d.get("ttft_ms", 0.0)
    if not ctx.record["stream"]:
        ttft += d.get("first_token_ms", 0.0)  # without a stream the first token comes with the headers
    if ttft > 0:
        await asyncio.sleep(ttft / 1000.0)
    if d.get("reset"):
        abort_connection(ctx)
        raise _Aborted
    key = (ctx.request.headers.get("authorization") or "").removeprefix("Bearer ").strip()
    if "deny_key_prefix" in d and key.startswith(d["deny_key_prefix"]):
        # Some providers echo the key they were sent: the gateway must not pass that on.
        return await send_error(
            ctx,
            401,
            message=f"Incorrect API key provided: {key}. You can find your API key at https://platform.openai.com/account/api-keys.",
            etype="invalid_request_error",
            code="invalid_api_key",
        )
    if "refusal" in d:
        return await send_json(ctx, 400, ff.refusal_body(d["refusal"]))
    if "status" in d and d["status"] >= 400:
        return await send_error(ctx, d["status"], model=model, prompt_tokens=prompt_tokens)
    return None


def _missing(ctx: Ctx, name: str) -> Any:
    return send_error(
        ctx,
        400,
        message=f"Missing required parameter: '{name}'.",
        etype="invalid_request_error",
        param=name,
        code="missing_required_parameter",
    )


def _invalid(ctx: Ctx, message: str, param: str | None = None) -> Any:
    return send_error(ctx, 400, message=message, etype="invalid_request_error", param=param, code="invalid_value")


# ---------------------------------------------------------------------------------------------------------------------
# Generation plans.


def _digest(body: Any, salt: str = "") -> str:
    return hashlib.sha256((salt + json.dumps(body, sort_keys=True, separators=(",", ":"))).encode()).hexdigest()


def make_ids(body: dict[str, Any], prefix: str) -> tuple[str, int]:
    """(id, created): derived from seed+body when the body has a seed, else random/now."""
    if body.get("seed") is not None:
        h = _digest(body, "id")
        return prefix + h[:29], MODELS_CREATED + int(h[29:37], 16) % 10_000_000
    return prefix + secrets.token_hex(15)[:29], int(time.time())


def _call_id(body: dict[str, Any], index: int) -> str:
    if body.get("seed") is not None:
        return "call_" + _digest(body, f"call{index}")[:24]
    return "call_" + secrets.token_hex(12)


def _word_offset(body: dict[str, Any], choice: int) -> int:
    seed = body.get("seed")
    base = seed if isinstance(seed, int) and not isinstance(seed, bool) else 0
    return (base + 7 * choice) % len(WORDS)


class TextPlan:
    """The pieces (one per completion token) of one choice's text, after max_tokens and stop."""

    def __init__(self, pieces: list[str], finish_reason: str) -> None:
        self.pieces = pieces
        self.finish_reason = finish_reason
        self.text = "".join(pieces)
        self.tokens = len(pieces)


def plan_text(ctx: Ctx, body: dict[str, Any], choice: int, cap: int | None) -> TextPlan:
    d = ctx.d
    wanted = max(0, d.get("tokens", 20))
    cl100k = d.get("vocab") == "cl100k"
    marker = d.get("marker", body.get("seed") is None) and not cl100k
    n_tok = wanted if cap is None else min(wanted, cap)
    finish = "length" if cap is not None and cap < wanted else "stop"
    pieces: list[str] = []
    if marker and n_tok > 0:
        pieces.append(f"<<req:{ctx.n}>>")
    off = _word_offset(body, choice)
    k = 0
    while len(pieces) < n_tok:
        w = (off + k) % len(WORDS)
        if cl100k:
            pieces.append(CL100K_SPACED[(off + k) % len(CL100K_SPACED)])
        else:
            pieces.append(_SPACED[w] if pieces else WORDS[w])
        k += 1
    stops = body.get("stop")
    if isinstance(stops, str):
        stops = [stops]
    if isinstance(stops, list):
        text = "".join(pieces)
        hits = [text.find(s) for s in stops if isinstance(s, str) and s]
        hits = [h for h in hits if h >= 0]
        if hits:
            cut = min(hits)
            kept: list[str] = []
            pos = 0
            for p in pieces:
                if pos >= cut:
                    break
                kept.append(p[: cut - pos] if pos + len(p) > cut else p)
                pos += len(p)
            pieces = kept
            finish = "stop"
    return TextPlan(pieces, finish)


def plan_continuation(ctx: Ctx, body: dict[str, Any], choice: int, cap: int | None, prefix: str) -> TextPlan:
    """Continue an assistant prefix: the answer this request would have had, minus as many words as the prefix
    holds (each planned piece is one word), so prefix + continuation is the whole deterministic answer even when
    the prefix came from another attempt (its marker counts as one word).  max_tokens bounds the new part."""
    full = plan_text(ctx, body, choice, None)
    skip = len(prefix.split())
    ctx.record["prefill_words"] = skip
    rest = full.pieces[skip:]
    if rest and skip > 0 and not rest[0].startswith(" "):
        rest[0] = " " + rest[0]
    finish = "stop"
    if cap is not None and cap < len(rest):
        rest, finish = rest[:cap], "length"
    return TextPlan(rest, finish)


def _example_value(schema: Any) -> Any:
    if not isinstance(schema, dict):
        return "Paris"
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    t = schema.get("type")
    if isinstance(t, list):
        t = next((x for x in t if x != "null"), "string")
    return {"integer": 1, "number": 1.5, "boolean": True, "array": [], "object": {}, "null": None}.get(t, "Paris")


# The model name of an agent-like model: given tools, it calls each one once, in order (one per turn), and
# answers in text once every one was called (other models call the first tool, or the chosen one, every time).
TOOLS_IN_TURN = "tools-in-turn"


class ToolPlan:
    def __init__(self, call_id: str, name: str, arguments: str) -> None:
        self.call_id = call_id
        self.name = name
        self.arguments = arguments
        self.fragments = _ARG_FRAGMENT.findall(arguments)
        self.tokens = len(self.fragments)
        self.finish_reason = "tool_calls"


def plan_tool(body: dict[str, Any], choice: int) -> ToolPlan | None:
    tools = body.get("tools")
    tool_choice = body.get("tool_choice")
    if not isinstance(tools, list) or not tools or tool_choice == "none":
        return None
    fns = [t.get("function") for t in tools if isinstance(t, dict) and isinstance(t.get("function"), dict)]
    if not fns:
        return None
    fn = fns[0]
    if body.get("model") == TOOLS_IN_TURN:
        # An agent's model: each offered function once, in order, then an answer in text.
        called = {
            (c.get("function") or {}).get("name")
            for m in body.get("messages") or ()
            if isinstance(m, dict)
            for c in m.get("tool_calls") or ()
            if isinstance(c, dict)
        }
        left = [f for f in fns if f.get("name") not in called]
        if not left:
            return None
        fn = left[0]
    if isinstance(tool_choice, dict):
        wanted = (tool_choice.get("function") or {}).get("name")
        fn = next((f for f in fns if f.get("name") == wanted), fn)
    params = fn.get("parameters") if isinstance(fn.get("parameters"), dict) else {}
    props = params.get("properties") if isinstance(params.get("properties"), dict) else {}
    args = {k: _example_value(v) for k, v in props.items()}
    return ToolPlan(_call_id(body, choice), str(fn.get("name", "tool")), _dumps(args))


# ---------------------------------------------------------------------------------------------------------------------
# Handlers.


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def info(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return web.json_response(
        {"tokenizer": TOKENIZER, "counter": state.counter, "models": state.models, "directives": sorted(DIRECTIVES)}
    )


async def get_ledger(request: web.Request) -> web.Response:
    """The records as a JSON list; ``?since=N`` keeps only records with n > N."""
    records = request.app[STATE].ledger
    since = request.query.get("since")
    if since is not None and since.lstrip("-").isdigit():
        records = [r for r in records if r["n"] > int(since)]
    return web.Response(body=_dumps(records).encode(), content_type="application/json")


async def reset(request: web.Request) -> web.Response:
    """Clear the ledger and the attempt counters, and bring health and metrics back to their defaults."""
    state = request.app[STATE]
    state.ledger.clear()
    state.attempts.clear()
    state.health = ff.Health()
    state.metrics = ff.Metrics(state.metrics.model_name, state.metrics.slots)
    if request.query.get("counter") in ("1", "true"):
        state.counter = 0
    return web.json_response({"status": "ok"})


async def health(request: web.Request) -> web.Response:
    """vLLM-style liveness: 200 with an empty body when healthy, 503 when switched off by ``POST /_health``."""
    h = request.app[STATE].health
    h.probes += 1
    return web.Response(status=200 if h.ok else 503)


async def _json_spec(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    if len(raw) > 64 * 1024:
        raise ValueError("control body too large")
    spec = json.loads(raw) if raw else {}
    if not isinstance(spec, dict):
        raise ValueError("expected a JSON object")
    return spec


async def control_health(request: web.Request) -> web.Response:
    """``GET /_health``: the state; ``POST /_health {"ok": false}``: /health answers 503 and the inference endpoints
    answer 503 (``"serve": true`` keeps them serving while /health says down, or the reverse)."""
    state = request.app[STATE]
    if request.method == "POST":
        try:
            state.health.set(await _json_spec(request))
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)
    return web.json_response(state.health.view())


async def control_metrics(request: web.Request) -> web.Response:
    """``GET /_metrics``: gauges and settings; ``POST /_metrics {...}``: see ``fake_faults.Metrics``."""
    state = request.app[STATE]
    if request.method == "POST":
        try:
            state.metrics.set(await _json_spec(request))
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)
    return web.json_response(state.metrics.view(state.inflight))


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text in vLLM's names (real-backends.md §4), following the in-flight count."""
    state = request.app[STATE]
    m = state.metrics
    m.scrapes += 1
    if m.status != 200:
        return web.Response(status=m.status, text="metrics unavailable\n")
    text = m.render(state.inflight, state.generation_tokens)
    return web.Response(text=text, content_type="text/plain", charset="utf-8")


async def list_models(request: web.Request) -> web.StreamResponse:
    ctx: Ctx = request[CTX]
    try:
        ctx.d = resolve_directives(ctx, None, b"", "")
    except DirectiveError as exc:
        return await send_error(ctx, 400, message=str(exc))
    sent = await before_answer(ctx, model="", prompt_tokens=0)
    if sent is not None:
        return sent
    return await send_json(ctx, 200, request.app[STATE].models_body)


async def get_model(request: web.Request) -> web.StreamResponse:
    ctx: Ctx = request[CTX]
    model = request.match_info["model"]
    try:
        ctx.d = resolve_directives(ctx, None, b"", model)  # GET /v1/models/fault:... carries faults too
    except (DirectiveError, ff.FaultNameError) as exc:
        return await send_error(ctx, 400, message=str(exc))
    sent = await before_answer(ctx, model=model, prompt_tokens=0)
    if sent is not None:
        return sent
    if model not in request.app[STATE].models:
        return await send_error(ctx, 404, model=model)
    return await send_json(
        ctx, 200, {"id": model, "object": "model", "created": MODELS_CREATED, "owned_by": "strait-fake"}
    )


def _cap(body: dict[str, Any]) -> int | None:
    for key in ("max_completion_tokens", "max_tokens"):
        v = body.get(key)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def _validate_common(ctx: Ctx, body: dict[str, Any]) -> Any:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        return send_error(
            ctx,
            400,
            message="you must provide a model parameter",
            etype="invalid_request_error",
            param="model",
            code="missing_required_parameter",
        )
    for key in ("max_completion_tokens", "max_tokens"):
        v = body.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            return _invalid(ctx, f"Invalid '{key}': integer below minimum value. Expected a value >= 1.", key)
    n = body.get("n", 1)
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 128):
        return _invalid(ctx, "Invalid 'n': expected an integer between 1 and 128.", "n")
    stream_options = body.get("stream_options")
    if stream_options is not None and not isinstance(stream_options, dict):
        return _invalid(ctx, "Invalid 'stream_options': expected an object.", "stream_options")
    return None


async def chat_completions(request: web.Request) -> web.StreamResponse:
    ctx: Ctx = request[CTX]
    body, sent = await read_json(ctx)
    if sent is not None:
        return sent
    model = body.get("model") if isinstance(body.get("model"), str) else ""
    messages = body.get("messages")
    prompt_tokens = count_prompt_tokens(messages)
    sent = await before_answer(ctx, model=model, prompt_tokens=prompt_tokens)
    if sent is not None:
        return sent
    err = _validate_common(ctx, body)
    if err is not None:
        return await err
    if "messages" not in body:
        return await _missing(ctx, "messages")
    if not isinstance(messages, list) or not messages:
        return await _invalid(ctx, "Invalid 'messages': expected a non-empty array of message objects.", "messages")
    if "context_window" in ctx.d and prompt_tokens > ctx.d["context_window"]:
        return await send_error(ctx, 400, model=model, prompt_tokens=prompt_tokens)

    trailing = messages[-1] if isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant" else None
    if trailing is not None and ctx.d.get("prefill") == "reject":
        return await send_error(
            ctx,
            400,
            message="This deployment does not support continuing a final assistant message (assistant prefill).",
            etype="invalid_request_error",
            param="messages",
            code="unsupported_prefill",
        )
    prefix: str | None = None
    if trailing is not None and (body.get("continue_final_message") is True or ctx.d.get("prefill") == "auto"):
        prefix = _content_text(trailing.get("content"))

    n = body.get("n") or 1
    cap = _cap(body)
    plans: list[TextPlan | ToolPlan] = []
    for i in range(n):
        tool = plan_tool(body, i) if prefix is None else None
        if tool is not None:
            plans.append(tool)
        elif prefix is not None:
            plans.append(plan_continuation(ctx, body, i, cap, prefix))
        else:
            plans.append(plan_text(ctx, body, i, cap))
    cid, created = make_ids(body, "chatcmpl-")

    if body.get("stream"):
        return await _stream_chat(ctx, body, plans, cid, created, model, prompt_tokens)

    if "fail_after_chunks" in ctx.d:
        abort_connection(ctx)
        raise _Aborted
    if "midstream_error" in ctx.d:
        return await send_error(ctx, 500)
    choices = []
    for i, p in enumerate(plans):
        if isinstance(p, ToolPlan):
            message: dict[str, Any] = {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": p.call_id, "type": "function", "function": {"name": p.name, "arguments": p.arguments}}
                ],
                "refusal": None,
            }
        else:
            message = {"role": "assistant", "content": p.text, "refusal": None}
        choices.append({"index": i, "message": message, "logprobs": None, "finish_reason": p.finish_reason})
    completion_tokens = sum(p.tokens for p in plans)
    resp = {
        "id": cid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage_object(prompt_tokens, completion_tokens, d=ctx.d),
        "service_tier": SERVICE_TIER,
        "system_fingerprint": SYSTEM_FINGERPRINT,
    }
    if "pad_bytes" in ctx.d:
        resp["pad"] = "x" * max(0, ctx.d["pad_bytes"])
    return await send_json(ctx, 200, resp, tokens=completion_tokens)


class _Streamer:
    """Writes SSE events for one streamed response, honouring delays, failure directives and the ledger."""

    def __init__(self, ctx: Ctx, resp: web.StreamResponse) -> None:
        self.ctx = ctx
        self.resp = resp
        self.d = ctx.d
        self.content_chunks = 0
        self.delay = self.d.get("chunk_delay_ms", 0.0) / 1000.0
        self.fail_after = self.d.get("fail_after_chunks")
        self.error_after = self.d.get("midstream_error")
        self.stall_after = self.d.get("stall_after_chunks")
        self.malformed_after = self.d.get("malformed_after_chunks")
        self.first_token_delay = self.d.get("first_token_ms", 0.0) / 1000.0

    async def write(self, payload: str) -> None:
        await self.resp.write(b"data: " + payload.encode() + b"\n\n")
        self.ctx.mark_first_byte()

    async def before_content(self) -> bool:
        """Called before each content chunk; returns False when the stream must end now (error or abort)."""
        if self.content_chunks == 0 and self.first_token_delay > 0:
            await asyncio.sleep(self.first_token_delay)
        if self.stall_after is not None and self.content_chunks == self.stall_after:
            self.stall_after = None
            await _stall(self.ctx)
        if self.malformed_after is not None and self.content_chunks == self.malformed_after:
            self.malformed_after = None
            await self.resp.write(_malformed_event(self.ctx))
            self.ctx.record["malformed_events"] += 1
        if self.error_after is not None and self.content_chunks >= self.error_after:
            body, _ = error_response(500, self.d)
            await self.write(_dumps(body))
            await self.resp.write_eof()
            self.ctx.record["status"] = 200
            return False
        if self.fail_after is not None and self.content_chunks >= self.fail_after:
            abort_connection(self.ctx)
            raise _Aborted
        if self.delay > 0 and self.content_chunks > 0:
            await asyncio.sleep(self.delay)
        return True

    async def content(self, payload: str, tokens: int) -> None:
        await self.write(payload)
        self.content_chunks += 1
        self.ctx.add_tokens(tokens)

    async def finish(self) -> None:
        if not self.d.get("no_done"):
            await self.resp.write(SSE_DONE)
        self.ctx.record["finished"] = True
        await self.resp.write_eof()


def _malformed_event(ctx: Ctx) -> bytes:
    """One event a strict parser cannot use: a chunk cut off mid-JSON, or a data line that is not UTF-8."""
    if ctx.d.get("malformed_kind") == "utf8":
        return b'data: {"choices":[{"index":0,"delta":{"content":"\xff\xfe"}}]}\n\n'
    return b'data: {"id":"chatcmpl-malformed","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"con\n\n'


async def _start_stream(ctx: Ctx) -> web.StreamResponse:
    limits = ratelimit_headers() if ctx.d.get("ratelimit_headers") else {}
    resp = web.StreamResponse(status=200, headers={**SSE_HEADERS, "x-request-id": _request_id(), **limits})
    ctx.response = resp
    ctx.record["status"] = 200
    await resp.prepare(ctx.request)
    return resp


def _usage_mode(ctx: Ctx, body: dict[str, Any]) -> str:
    so = body.get("stream_options") or {}
    if not so.get("include_usage"):
        return "off"
    return ctx.d.get("usage", "final-empty-choices")


async def _stream_chat(
    ctx: Ctx,
    body: dict[str, Any],
    plans: list[TextPlan | ToolPlan],
    cid: str,
    created: int,
    model: str,
    prompt_tokens: int,
) -> web.StreamResponse:
    mode = _usage_mode(ctx, body)
    tail = ',"usage":null}' if mode != "off" else "}"
    head = (
        f'{{"id":{_dumps(cid)},"object":"chat.completion.chunk","created":{created},"model":{_dumps(model)},'
        f'"service_tier":"{SERVICE_TIER}","system_fingerprint":"{SYSTEM_FINGERPRINT}","choices":'
    )

    pad = ["x" * max(0, ctx.d["pad_bytes"])] if "pad_bytes" in ctx.d else []

    def chunk(index: int, delta: str, finish: str | None = None, tail: str = tail) -> str:
        fr = "null" if finish is None else f'"{finish}"'
        extra = f',"pad":"{pad.pop()}"' if pad and finish is None and delta.startswith('{"content"') else ""
        return f'{head}[{{"index":{index},"delta":{delta},"logprobs":null,"finish_reason":{fr}}}]{extra}{tail}'

    chunk_tokens = max(1, ctx.d.get("chunk_tokens", 5))
    resp = await _start_stream(ctx)
    s = _Streamer(ctx, resp)
    # Role deltas (for tool calls the first call delta rides along, as the real API does).
    for i, p in enumerate(plans):
        if isinstance(p, ToolPlan):
            call = {"index": 0, "id": p.call_id, "type": "function", "function": {"name": p.name, "arguments": ""}}
            delta = _dumps({"role": "assistant", "content": None, "tool_calls": [call], "refusal": None})
        else:
            delta = '{"role":"assistant","content":"","refusal":null}'
        await s.write(chunk(i, delta))
    # Content deltas, interleaved across choices.
    steps: list[list[tuple[str, int]]] = []
    for p in plans:
        if isinstance(p, ToolPlan):
            steps.append(
                [('{"tool_calls":[{"index":0,"function":{"arguments":' + _dumps(f) + "}}]}", 1) for f in p.fragments]
            )
        else:
            groups = [p.pieces[j : j + chunk_tokens] for j in range(0, len(p.pieces), chunk_tokens)]
            steps.append([('{"content":' + _dumps("".join(g)) + "}", len(g)) for g in groups])
    for k in range(max((len(x) for x in steps), default=0)):
        for i, seq in enumerate(steps):
            if k < len(seq):
                if not await s.before_content():
                    return resp
                delta, toks = seq[k]
                await s.content(chunk(i, delta), toks)
    if s.error_after is not None and not await s.before_content():
        return resp
    completion_tokens = sum(p.tokens for p in plans)
    usage = _dumps(usage_object(prompt_tokens, completion_tokens, d=ctx.d))
    for i, p in enumerate(plans):
        last = i == len(plans) - 1
        if mode == "final-with-choices" and last:
            await s.write(chunk(i, "{}", p.finish_reason, tail=',"usage":' + usage + "}"))
        else:
            await s.write(chunk(i, "{}", p.finish_reason))
    if mode == "final-empty-choices":
        await s.write(head + '[],"usage":' + usage + "}")
    await s.finish()
    return resp


async def completions(request: web.Request) -> web.StreamResponse:
    ctx: Ctx = request[CTX]
    body, sent = await read_json(ctx)
    if sent is not None:
        return sent
    model = body.get("model") if isinstance(body.get("model"), str) else ""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompts: list[Any] = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(x, int) for x in prompt):
        prompts = [prompt]
    elif isinstance(prompt, list):
        prompts = prompt
    else:
        prompts = []
    prompt_tokens = sum(
        count_tokens(p) if isinstance(p, str) else len(p) if isinstance(p, list) else 0 for p in prompts
    )
    sent = await before_answer(ctx, model=model, prompt_tokens=prompt_tokens)
    if sent is not None:
        return sent
    err = _validate_common(ctx, body)
    if err is not None:
        return await err
    if "prompt" not in body:
        return await _missing(ctx, "prompt")
    if not prompts:
        return await _invalid(ctx, "Invalid 'prompt': expected a string or an array.", "prompt")
    n = body.get("n") or 1
    cap = _cap(body)
    plans = [plan_text(ctx, body, i, cap) for i in range(n * len(prompts))]
    cid, created = make_ids(body, "cmpl-")
    completion_tokens = sum(p.tokens for p in plans)
    if body.get("stream"):
        mode = _usage_mode(ctx, body)
        tail = ',"usage":null}' if mode != "off" else "}"
        head = f'{{"id":{_dumps(cid)},"object":"text_completion","created":{created},"model":{_dumps(model)},"choices":'
        chunk_tokens = max(1, ctx.d.get("chunk_tokens", 5))
        resp = await _start_stream(ctx)
        s = _Streamer(ctx, resp)

        def chunk(index: int, text: str, finish: str | None = None, tail: str = tail) -> str:
            fr = "null" if finish is None else f'"{finish}"'
            return f'{head}[{{"text":{_dumps(text)},"index":{index},"logprobs":null,"finish_reason":{fr}}}]{tail}'

        steps = [[p.pieces[j : j + chunk_tokens] for j in range(0, len(p.pieces), chunk_tokens)] for p in plans]
        for k in range(max((len(x) for x in steps), default=0)):
            for i, seq in enumerate(steps):
                if k < len(seq):
                    if not await s.before_content():
                        return resp
                    await s.content(chunk(i, "".join(seq[k])), len(seq[k]))
        if s.error_after is not None and not await s.before_content():
            return resp
        usage = _dumps(usage_object(prompt_tokens, completion_tokens, details=False))
        for i, p in enumerate(plans):
            if mode == "final-with-choices" and i == len(plans) - 1:
                await s.write(chunk(i, "", p.finish_reason, tail=',"usage":' + usage + "}"))
            else:
                await s.write(chunk(i, "", p.finish_reason))
        if mode == "final-empty-choices":
            await s.write(head + '[],"usage":' + usage + "}")
        await s.finish()
        return resp
    if "fail_after_chunks" in ctx.d:
        abort_connection(ctx)
        raise _Aborted
    if "midstream_error" in ctx.d:
        return await send_error(ctx, 500)
    resp_obj = {
        "id": cid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [
            {"text": p.text, "index": i, "logprobs": None, "finish_reason": p.finish_reason}
            for i, p in enumerate(plans)
        ],
        "usage": usage_object(prompt_tokens, completion_tokens, details=False),
    }
    return await send_json(ctx, 200, resp_obj, tokens=completion_tokens)


def embedding_vector(item: str | list[int], dims: int = 16) -> tuple[list[float], str]:
    """A deterministic unit vector (float32 values) for `item`, and its base64 little-endian float32 form."""
    key = ("s:" + item).encode() if isinstance(item, str) else ("t:" + _dumps(item)).encode()
    raw = b""
    i = 0
    while len(raw) < 4 * dims:
        raw += hashlib.sha256(key + i.to_bytes(4, "little")).digest()
        i += 1
    ints = struct.unpack(f"<{dims}i", raw[: 4 * dims])
    vals = [x / 2147483648.0 for x in ints]
    norm = math.sqrt(sum(v * v for v in vals)) or 1.0
    packed = struct.pack(f"<{dims}f", *(v / norm for v in vals))
    return list(struct.unpack(f"<{dims}f", packed)), base64.b64encode(packed).decode()


async def embeddings(request: web.Request) -> web.StreamResponse:
    ctx: Ctx = request[CTX]
    body, sent = await read_json(ctx)
    if sent is not None:
        return sent
    model = body.get("model") if isinstance(body.get("model"), str) else ""
    inp = body.get("input")
    items: list[Any]
    if isinstance(inp, str) or (
        isinstance(inp, list) and inp and all(isinstance(x, int) and not isinstance(x, bool) for x in inp)
    ):
        items = [inp]
    elif isinstance(inp, list):
        items = inp
    else:
        items = []
    valid = bool(items) and all(
        (isinstance(x, str) and x != "")
        or (isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool) for t in x))
        for x in items
    )
    prompt_tokens = sum(count_tokens(x) if isinstance(x, str) else len(x) for x in items) if valid else 0
    sent = await before_answer(ctx, model=model, prompt_tokens=prompt_tokens)
    if sent is not None:
        return sent
    err = _validate_common(ctx, body)
    if err is not None:
        return await err
    if "input" not in body:
        return await _missing(ctx, "input")
    if not valid:
        return await _invalid(
            ctx,
            "'$.input' is invalid. Please check the API reference: https://platform.openai.com/docs/api-reference.",
            "input",
        )
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        return await _invalid(ctx, f"Invalid value for 'encoding_format': {fmt!r}.", "encoding_format")
    dims = body.get("dimensions") or 16
    if not isinstance(dims, int) or isinstance(dims, bool) or not 1 <= dims <= 4096:
        return await _invalid(ctx, "Invalid 'dimensions'.", "dimensions")
    if "fail_after_chunks" in ctx.d:
        abort_connection(ctx)
        raise _Aborted
    data = []
    for i, x in enumerate(items):
        floats, b64 = embedding_vector(x, dims)
        data.append({"object": "embedding", "index": i, "embedding": b64 if fmt == "base64" else floats})
    return await send_json(
        ctx,
        200,
        {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
        },
    )


async def not_found(request: web.Request) -> web.StreamResponse:
    ctx: Ctx = request[CTX]
    return await send_error(
        ctx, 404, message=f"Invalid URL ({request.method} {request.path})", etype="invalid_request_error"
    )


@web.middleware
async def aborted_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except _Aborted:
        ctx: Ctx | None = request.get(CTX)
        return (ctx.response if ctx else None) or web.Response(status=499)


def make_app(models: list[str] | None = None, *, slots: int = 4) -> web.Application:
    app = web.Application(middlewares=[ledger_middleware, aborted_middleware], client_max_size=64 * 1024 * 1024)
    app[STATE] = State(list(models or DEFAULT_MODELS), slots)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_route("*", "/_health", control_health)
    app.router.add_route("*", "/_metrics", control_metrics)
    app.router.add_get("/_info", info)
    app.router.add_get("/_ledger", get_ledger)
    app.router.add_post("/_reset", reset)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model}", get_model)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_post("/v1/responses", fake_responses.handler(sys.modules[__name__]))
    app.router.add_route("*", "/{tail:.*}", not_found)
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="OpenAI-compatible fake upstream for tests")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1", help="loopback only (default 127.0.0.1)")
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated ids for /v1/models")
    parser.add_argument("--slots", type=int, default=4, help="engine slots the metrics gauges assume (default 4)")
    args = parser.parse_args(argv)
    app = make_app([m for m in args.models.split(",") if m], slots=args.slots)
    web.run_app(
        app,
        host=args.host,
        port=args.port,
        access_log=None,
        print=None,
        handler_cancellation=True,
        shutdown_timeout=1.0,
    )


if __name__ == "__main__":
    main()

"""A fake Google Gemini API for the `gemini` adapter's tests (aiohttp.web, one process, loopback only).

Run: ``python -m tests.harness.fake_gemini --port P [--key K]``. It speaks the documented wire format
(the shapes in tests/fixtures/gemini, checked by tests/test_fake_gemini_conformance.py):

- ``POST /v1beta/models/{model}:generateContent`` (JSON) and ``:streamGenerateContent?alt=sse`` (SSE:
  ``data: <GenerateContentResponse>`` events, CRLF framed, the stream ends by closing);
- the key only in the ``x-goog-api-key`` header: a wrong or missing one is Google's 400
  ``INVALID_ARGUMENT`` / ``API_KEY_INVALID``;
- the request is validated like Gemini does: unknown fields, roles other than user/model, a part that is
  not exactly one of text / inlineData / functionCall / functionResponse, a schema keyword Gemini's
  ``Schema`` lacks (``additionalProperties``, ``$ref``...) or a lower-case type are a 400 naming it;
- every ``functionCall`` it answers carries a fresh ``thoughtSignature`` (base64 with ``+``, ``/`` and
  ``=`` in it); a request whose history holds a ``functionCall`` without the exact signature it issued is
  the 400 Gemini 3 answers ("Function call is missing a thought_signature");
- ``usageMetadata`` with ``promptTokenCount`` (words of the request's texts), ``candidatesTokenCount``,
  ``thoughtsTokenCount`` (when thinking is asked for) and ``cachedContentTokenCount`` (model flag
  ``cached``).

Behaviour is chosen by flags in the model name, joined with ``+`` (``gemini-2.5-flash+cached+safety``):
``safety`` (a candidate blocked with finishReason SAFETY before any text), ``safety-mid`` (streamed text,
then SAFETY), ``blocked`` (``promptFeedback.blockReason: SAFETY``, no candidates), ``503`` (UNAVAILABLE),
``429`` (RESOURCE_EXHAUSTED with RetryInfo ``retryDelay: "2s"``), ``400`` (INVALID_ARGUMENT), ``cut``
(the stream closes after two events without a finishReason), ``error-event`` (an error envelope as the
second stream event), ``cached``, ``thinking`` (thought parts even without includeThoughts), ``big`` (an
answer of 200 kB).

Control: ``GET /healthz``; ``GET /_ledger`` (every request: path, query, headers, body); ``POST /_reset``.
"""

from __future__ import annotations

import argparse
import base64
import json
import secrets
from typing import Any

from aiohttp import web

ANSWER = "Paris is the capital of France"
THOUGHT = "The user asks a question; I will answer it plainly."
_TOP_FIELDS = {
    "contents",
    "systemInstruction",
    "tools",
    "toolConfig",
    "generationConfig",
    "safetySettings",
    "cachedContent",
}
_GENERATION_FIELDS = {
    "temperature",
    "topP",
    "topK",
    "maxOutputTokens",
    "stopSequences",
    "candidateCount",
    "seed",
    "presencePenalty",
    "frequencyPenalty",
    "responseMimeType",
    "responseSchema",
    "thinkingConfig",
}
_SCHEMA_FIELDS = {
    "type",
    "format",
    "title",
    "description",
    "nullable",
    "enum",
    "maxItems",
    "minItems",
    "properties",
    "required",
    "minProperties",
    "maxProperties",
    "minLength",
    "maxLength",
    "pattern",
    "example",
    "anyOf",
    "propertyOrdering",
    "default",
    "items",
    "minimum",
    "maximum",
}
_TYPES = {"STRING", "NUMBER", "INTEGER", "BOOLEAN", "ARRAY", "OBJECT", "NULL"}


class BadRequest(Exception):
    pass


def google_error(code: int, status: str, message: str, details: list[Any] | None = None) -> web.Response:
    error: dict[str, Any] = {"code": code, "message": message, "status": status}
    if details:
        error["details"] = details
    return web.json_response({"error": error}, status=code)


def _check_schema(schema: Any, path: str) -> None:
    if not isinstance(schema, dict):
        raise BadRequest(f"Invalid JSON payload received. {path}: a schema must be an object.")
    for key, value in schema.items():
        if key not in _SCHEMA_FIELDS:
            raise BadRequest(f"Invalid JSON payload received. Unknown name \"{key}\" at '{path}': Cannot find field.")
        if key == "type" and value not in _TYPES:
            raise BadRequest(f"Invalid value at '{path}.type' ({value!r}), expected a Type enum name.")
        if key == "properties":
            for name, sub in value.items():
                _check_schema(sub, f"{path}.properties[{name}]")
        if key == "items":
            _check_schema(value, f"{path}.items")
        if key == "anyOf":
            for i, sub in enumerate(value):
                _check_schema(sub, f"{path}.anyOf[{i}]")


def _check_part(part: Any, where: str) -> None:
    kinds = [k for k in ("text", "inlineData", "functionCall", "functionResponse") if k in part]
    extra = set(part) - {"text", "inlineData", "functionCall", "functionResponse", "thought", "thoughtSignature"}
    if len(kinds) != 1 or extra:
        raise BadRequest(f"Invalid part at {where}: exactly one of text, inlineData, functionCall, functionResponse.")
    if "inlineData" in part:
        data = part["inlineData"]
        if set(data) != {"mimeType", "data"}:
            raise BadRequest(f"{where}.inlineData needs mimeType and data.")
        base64.b64decode(data["data"], validate=True)
    if "functionResponse" in part:
        fr = part["functionResponse"]
        if not isinstance(fr.get("name"), str) or not isinstance(fr.get("response"), dict):
            raise BadRequest(f"{where}.functionResponse needs a name and a response object.")


class Fake:
    def __init__(self, key: str | None) -> None:
        self.key = key
        self.ledger: list[dict[str, Any]] = []
        self.signatures: dict[str, str] = {}  # signature issued -> function name

    def validate(self, body: Any) -> None:
        if not isinstance(body, dict):
            raise BadRequest("Invalid JSON payload received.")
        for key in body:
            if key not in _TOP_FIELDS:
                raise BadRequest(f'Invalid JSON payload received. Unknown name "{key}": Cannot find field.')
        contents = body.get("contents")
        if not isinstance(contents, list) or not contents:
            raise BadRequest("* GenerateContentRequest.contents: contents is not specified")
        for i, content in enumerate(contents):
            if content.get("role") not in ("user", "model"):
                raise BadRequest(f"Please use a valid role: user, model. (contents[{i}])")
            for j, part in enumerate(content.get("parts") or []):
                _check_part(part, f"contents[{i}].parts[{j}]")
                if "functionCall" in part:
                    sig = part.get("thoughtSignature")
                    if sig is None or self.signatures.get(sig) != part["functionCall"].get("name"):
                        raise BadRequest(
                            "Function call is missing a thought_signature in functionCall parts. This is required "
                            f"for tools to work correctly. Additional data, function call `{part['functionCall'].get('name')}`"
                            f", position {i + 1}."
                        )
        for k in body.get("generationConfig") or {}:
            if k not in _GENERATION_FIELDS:
                raise BadRequest(f"Invalid JSON payload received. Unknown name \"{k}\" at 'generation_config'.")
        schema = (body.get("generationConfig") or {}).get("responseSchema")
        if schema is not None:
            _check_schema(schema, "generation_config.response_schema")
        for tool in body.get("tools") or []:
            for d in tool.get("functionDeclarations") or []:
                if "parameters" in d:
                    _check_schema(d["parameters"], f"tools.function_declarations[{d.get('name')}].parameters")

    def answer(self, body: dict[str, Any], flags: set[str], model: str) -> list[dict[str, Any]]:
        """The candidates' parts and finish reasons, as a list of candidate dicts (whole, not streamed)."""
        config = body.get("generationConfig") or {}
        n = int(config.get("candidateCount") or 1)
        thinking = config.get("thinkingConfig") or {}
        show_thoughts = bool(thinking.get("includeThoughts")) or "thinking" in flags
        last = body["contents"][-1]
        answered_tool = any("functionResponse" in p for p in last["parts"])
        tools = [d for t in body.get("tools") or [] for d in t.get("functionDeclarations") or []]
        mode = ((body.get("toolConfig") or {}).get("functionCallingConfig") or {}).get("mode", "AUTO")
        candidates = []
        for index in range(n):
            parts: list[dict[str, Any]] = []
            if show_thoughts:
                parts.append({"text": THOUGHT, "thought": True})
            finish = "STOP"
            if tools and not answered_tool and mode != "NONE":
                allowed = ((body.get("toolConfig") or {}).get("functionCallingConfig") or {}).get(
                    "allowedFunctionNames"
                )
                decl = next((d for d in tools if not allowed or d["name"] in allowed), tools[0])
                signature = base64.b64encode(b"\xfb\xff\xfe" + secrets.token_bytes(31)).decode()
                self.signatures[signature] = decl["name"]
                parts.append(
                    {"functionCall": {"name": decl["name"], "args": _args(decl)}, "thoughtSignature": signature}
                )
            else:
                if answered_tool:
                    result = next(p["functionResponse"] for p in last["parts"] if "functionResponse" in p)
                    text = f"The tool {result['name']} said {json.dumps(result['response'], sort_keys=True)}"
                elif "big" in flags:
                    text = ANSWER + " " + "x" * 200_000
                else:
                    text = ANSWER if index == 0 else f"{ANSWER} ({index})"
                words = text.split(" ")
                limit = config.get("maxOutputTokens")
                if limit is not None and len(words) > limit:
                    words, finish = words[:limit], "MAX_TOKENS"
                text_part: dict[str, Any] = {"text": " ".join(words)}
                if show_thoughts:  # Gemini signs the answer's last part after visible thinking
                    text_part["thoughtSignature"] = base64.b64encode(secrets.token_bytes(24)).decode()
                parts.append(text_part)
            candidates.append({"content": {"parts": parts, "role": "model"}, "finishReason": finish, "index": index})
        return candidates

    def usage(self, body: dict[str, Any], candidates: list[dict[str, Any]], flags: set[str]) -> dict[str, Any]:
        prompt = sum(
            len(p["text"].split())
            for c in [*body["contents"], body.get("systemInstruction") or {"parts": []}]
            for p in c["parts"]
            if "text" in p
        )
        out_words = sum(
            len(p["text"].split()) if "text" in p and not p.get("thought") else 3 if "functionCall" in p else 0
            for c in candidates
            for p in c.get("content", {}).get("parts", [])
        )
        thinking = (body.get("generationConfig") or {}).get("thinkingConfig") or {}
        thoughts = 11 if thinking.get("includeThoughts") or thinking.get("thinkingBudget") or "thinking" in flags else 0
        usage: dict[str, Any] = {"promptTokenCount": prompt, "candidatesTokenCount": out_words}
        total = prompt + out_words + thoughts
        if "cached" in flags:
            usage["cachedContentTokenCount"] = prompt // 2
        if thoughts:
            usage["thoughtsTokenCount"] = thoughts
        usage["totalTokenCount"] = total
        usage["promptTokensDetails"] = [{"modality": "TEXT", "tokenCount": prompt}]
        return usage


def _args(decl: dict[str, Any]) -> dict[str, Any]:
    props = (decl.get("parameters") or {}).get("properties") or {}
    out: dict[str, Any] = {}
    for name, schema in props.items():
        kind = schema.get("type")
        if schema.get("enum"):
            out[name] = schema["enum"][0]
        elif kind == "STRING":
            out[name] = "Paris"
        elif kind == "INTEGER":
            out[name] = 3
        elif kind == "NUMBER":
            out[name] = 1.5
        elif kind == "BOOLEAN":
            out[name] = True
    return out


_SAFETY_RATINGS = [
    {"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH", "blocked": True},
    {"category": "HARM_CATEGORY_HARASSMENT", "probability": "NEGLIGIBLE"},
]


def build_app(fake: Fake) -> web.Application:
    async def generate(request: web.Request) -> web.StreamResponse:
        tail = request.match_info["tail"]
        model, _, method = tail.partition(":")
        raw = await request.read()
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        record = {
            "path": request.path,
            "query": request.query_string,
            "headers": {k.lower(): v for k, v in request.headers.items()},
            "body": body,
            "model": model,
        }
        fake.ledger.append(record)
        if fake.key is not None and (request.headers.get("x-goog-api-key") != fake.key or "key" in request.query):
            return google_error(
                400,
                "INVALID_ARGUMENT",
                "API key not valid. Please pass a valid API key.",
                [
                    {
                        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                        "reason": "API_KEY_INVALID",
                        "domain": "googleapis.com",
                    }
                ],
            )
        if method not in ("generateContent", "streamGenerateContent"):
            return google_error(404, "NOT_FOUND", f"Method {method} not found.")
        stream = method == "streamGenerateContent"
        if stream and request.query.get("alt") != "sse":
            return google_error(400, "INVALID_ARGUMENT", "This fake serves streams as SSE only (alt=sse).")
        flags = set(model.split("+")[1:])
        if "503" in flags:
            return google_error(503, "UNAVAILABLE", "The model is overloaded. Please try again later.")
        if "429" in flags:
            return google_error(
                429,
                "RESOURCE_EXHAUSTED",
                "You exceeded your current quota, please check your plan and billing details.",
                [
                    {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [{"quotaMetric": "q"}]},
                    {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "2s"},
                ],
            )
        if "400" in flags:
            return google_error(400, "INVALID_ARGUMENT", "Request contains an invalid argument.")
        try:
            fake.validate(body)
        except (BadRequest, ValueError, AttributeError, KeyError, TypeError) as exc:
            return google_error(400, "INVALID_ARGUMENT", str(exc) or "Request contains an invalid argument.")
        assert isinstance(body, dict)
        base_model = model.split("+")[0]
        response_id = secrets.token_urlsafe(12)
        if "blocked" in flags:
            blocked = {
                "promptFeedback": {"blockReason": "SAFETY", "safetyRatings": _SAFETY_RATINGS},
                "usageMetadata": {"promptTokenCount": 5, "totalTokenCount": 5},
                "modelVersion": base_model,
                "responseId": response_id,
            }
            return await _send(request, stream, [blocked])
        if "safety" in flags:
            candidate = {"finishReason": "SAFETY", "index": 0, "safetyRatings": _SAFETY_RATINGS}
            safety = {
                "candidates": [candidate],
                "usageMetadata": {"promptTokenCount": 5, "totalTokenCount": 5},
                "modelVersion": base_model,
                "responseId": response_id,
            }
            return await _send(request, stream, [safety])
        candidates = fake.answer(body, flags, model)
        usage = fake.usage(body, candidates, flags)
        if "safety-mid" in flags:
            candidates[0]["finishReason"] = "SAFETY"
        if not stream:
            return web.json_response(
                {
                    "candidates": candidates,
                    "usageMetadata": usage,
                    "modelVersion": base_model,
                    "responseId": response_id,
                }
            )
        return await _send(request, True, _events(candidates, usage, base_model, response_id, flags))

    async def ledger(request: web.Request) -> web.Response:
        return web.json_response(fake.ledger)

    async def reset(request: web.Request) -> web.Response:
        fake.ledger.clear()
        return web.json_response({"ok": True})

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app = web.Application(client_max_size=8 * 1024 * 1024)
    app.router.add_post("/v1beta/models/{tail}", generate)
    app.router.add_get("/_ledger", ledger)
    app.router.add_post("/_reset", reset)
    app.router.add_get("/healthz", healthz)
    return app


def _events(
    candidates: list[dict[str, Any]], usage: dict[str, Any], model: str, response_id: str, flags: set[str]
) -> list[dict[str, Any]]:
    """The stream of a whole answer: each part its own event (a text part in two halves), the finish
    reason and full usage on the last; `usageMetadata` on every event, as Gemini sends it."""
    events: list[dict[str, Any]] = []
    for cand in candidates:
        pieces: list[dict[str, Any]] = []
        for part in cand["content"]["parts"]:
            if "text" in part and not part.get("thought"):
                words = part["text"].split(" ")
                half = max(1, len(words) // 2)
                head = {k: v for k, v in part.items() if k != "thoughtSignature" or len(words) <= half}
                pieces.append({**head, "text": " ".join(words[:half]) + (" " if len(words) > half else "")})
                if len(words) > half:
                    pieces.append({**part, "text": " ".join(words[half:])})
            else:
                pieces.append(part)
        for i, piece in enumerate(pieces):
            last = i == len(pieces) - 1
            candidate: dict[str, Any] = {"content": {"parts": [piece], "role": "model"}, "index": cand["index"]}
            if last and "cut" not in flags:
                candidate["finishReason"] = "SAFETY" if "safety-mid" in flags else cand["finishReason"]
            events.append(
                {
                    "candidates": [candidate],
                    "usageMetadata": {**usage, "candidatesTokenCount": usage["candidatesTokenCount"] if last else 1},
                    "modelVersion": model,
                    "responseId": response_id,
                }
            )
    if "cut" in flags:
        return events[:2]
    if "error-event" in flags:
        return [events[0], {"error": {"code": 500, "message": "Internal error encountered.", "status": "INTERNAL"}}]
    return events


async def _send(request: web.Request, stream: bool, events: list[dict[str, Any]]) -> web.StreamResponse:
    if not stream:
        return web.json_response(events[0])
    response = web.StreamResponse(status=200, headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    for event in events:
        await response.write(b"data: " + json.dumps(event).encode() + b"\r\n\r\n")
    await response.write_eof()
    return response


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--key", default=None)
    args = parser.parse_args()
    web.run_app(build_app(Fake(args.key)), host="127.0.0.1", port=args.port, print=None)


if __name__ == "__main__":
    main()

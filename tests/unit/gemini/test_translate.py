"""The gemini adapter's translators on the documented shapes (tests/fixtures/gemini): answers to the
pipeline's OpenAI chat format, streams to chunks, Google's errors to OpenAI's envelope, and the
canonical request to a GenerateContentRequest."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import pytest

from gateway.api.openai.decode import decode
from gateway.canonical import (
    Image,
    Message,
    RedactedThinking,
    Request,
    ResponseFormat,
    Text,
    Thinking,
    ThinkingConfig,
    Tool,
    ToolCall,
    ToolChoice,
    ToolResult,
)
from gateway.contracts import UpstreamStreamBroken
from gateway.upstream.chat_body import Untranslatable
from gateway.upstream.normalize import upstream_error
from gateway.upstream.sse import DONE, SSEDecoder
from plugins.gemini.request import generate_content_body
from plugins.gemini.response import GeminiRefusal, completion, error_answer
from plugins.gemini.stream import StreamTranslator
from plugins.gemini.wire import decode_response

FIXTURES = Path(__file__).parents[2] / "fixtures" / "gemini"
WEATHER = Tool(
    name="get_weather",
    description="Current weather",
    parameters=msgspec.Raw(
        b'{"type":"object","properties":{"location":{"type":"string"}},"required":["location"],'
        b'"additionalProperties":false}'
    ),
)


def answer(name: str) -> dict[str, Any]:
    body = completion(decode_response((FIXTURES / name).read_bytes()), "route-model", "req-1")
    return json.loads(body)  # type: ignore[no-any-return]


def body_of(request: Request) -> dict[str, Any]:
    return json.loads(generate_content_body(request))  # type: ignore[no-any-return]


def chat(*messages: Message, **fields: Any) -> Request:
    return Request(operation="chat", model="r", messages=messages, **fields)


def user(text: str) -> Message:
    return Message(role="user", content=(Text(text=text),))


# ---- answers ----


def test_text_answer() -> None:
    out = answer("generate_content_text.json")
    assert out["object"] == "chat.completion" and out["id"] == "chatcmpl-mdyHaOPkM8-JmNAP5bS0iA4"
    assert out["model"] == "gemini-2.5-flash"
    assert out["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Paris is the capital of France."},
            "finish_reason": "stop",
        }
    ]
    assert out["usage"] == {"prompt_tokens": 8, "completion_tokens": 7, "total_tokens": 15}


def test_function_call_keeps_its_signature_and_usage_has_cached_and_thinking_tokens() -> None:
    out = answer("generate_content_function_call.json")
    choice = out["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    (call,) = choice["message"]["tool_calls"]
    assert call["id"].startswith("call_") and call["type"] == "function"
    assert call["function"] == {"name": "get_weather", "arguments": '{"location":"Paris"}'}
    assert call["extra_content"] == {
        "google": {"thought_signature": "CiIBVKhc7oDbtsGw3dBpBuD5Xu+rGCL4p3xH8J9NmeQvZWzA"}
    }
    assert out["usage"] == {
        "prompt_tokens": 52,
        "completion_tokens": 5 + 64,
        "total_tokens": 52 + 69,
        "prompt_tokens_details": {"cached_tokens": 26},
        "completion_tokens_details": {"reasoning_tokens": 64},
    }


def test_thought_parts_are_reasoning_content() -> None:
    message = answer("generate_content_thinking.json")["choices"][0]["message"]
    assert message["reasoning_content"].startswith("**Answering the question**")
    assert message["content"] == "Paris is the capital of France."


@pytest.mark.parametrize(
    ("name", "param"), [("candidate_blocked_safety.json", None), ("prompt_blocked.json", "messages")]
)
def test_blocks_are_a_content_filter_error(name: str, param: str | None) -> None:
    with pytest.raises(GeminiRefusal) as caught:
        answer(name)
    assert caught.value.status == 400
    error = json.loads(caught.value.body)["error"]
    assert error["code"] == "content_filter" and error["param"] == param and "SAFETY" in error["message"]


def test_tool_use_prompt_tokens_count_as_prompt() -> None:
    raw = json.loads((FIXTURES / "generate_content_text.json").read_text())
    raw["usageMetadata"]["toolUsePromptTokenCount"] = 30
    out = json.loads(completion(decode_response(json.dumps(raw).encode()), "m", "r"))
    assert out["usage"]["prompt_tokens"] == 38 and out["usage"]["total_tokens"] == 45


# ---- errors ----


def google(name: str, status: int) -> tuple[int, dict[str, Any], dict[str, str]]:
    code, body, headers = error_answer(status, (FIXTURES / name).read_bytes(), {"content-type": "application/json"})
    return code, json.loads(body), headers


def test_429_carries_its_retry_delay_and_is_retryable() -> None:
    status, body, headers = google("error_429.json", 429)
    assert status == 429 and headers["retry-after"] == "2"
    assert body["error"]["type"] == "rate_limit_error" and body["error"]["code"] == "resource_exhausted"
    assert "details" not in body["error"] and "QuotaFailure" not in json.dumps(body)
    err = upstream_error(status, json.dumps(body).encode(), headers)
    assert err.status == 429 and err.headers["retry-after"] == "2"


def test_503_and_400() -> None:
    status, body, _ = google("error_503.json", 503)
    assert (status, body["error"]["type"], body["error"]["code"]) == (503, "server_error", "unavailable")
    status, body, _ = google("error_400.json", 400)
    assert (status, body["error"]["type"], body["error"]["code"]) == (400, "invalid_request_error", "invalid_argument")


def test_a_bad_key_is_the_gateways_own_auth_failure() -> None:
    status, body, headers = google("error_api_key.json", 400)
    assert status == 401
    err = upstream_error(status, json.dumps(body).encode(), headers)
    assert err.status == 502 and err.code == "upstream_auth_failed" and "API key" not in err.message


def test_context_overflow_is_context_length_exceeded() -> None:
    raw = b'{"error":{"code":400,"message":"The input token count (1048580) exceeds the maximum number of tokens allowed (1048576).","status":"INVALID_ARGUMENT"}}'
    status, body, _ = error_answer(400, raw, {})
    assert status == 400 and json.loads(body)["error"]["code"] == "context_length_exceeded"


def test_a_body_that_is_not_googles_is_left_to_normalize() -> None:
    assert error_answer(502, b"<html>bad gateway at internal-lb-7</html>", {}) == (
        502,
        b"<html>bad gateway at internal-lb-7</html>",
        {},
    )


# ---- streams ----


def stream_chunks(raw: bytes, split: int = 7) -> list[bytes]:
    decoder = SSEDecoder()
    translator = StreamTranslator("m", "req-1")
    out: list[bytes] = []
    for i in range(0, len(raw), split):
        for event in decoder.feed(raw[i : i + split]):
            out.extend(translator.feed(event))
    for event in decoder.close():
        out.extend(translator.feed(event))
    out.extend(translator.end())
    return out


def test_stream_fixture_to_chunks() -> None:
    chunks = stream_chunks((FIXTURES / "stream_text.sse").read_bytes())
    assert chunks[-1] == DONE
    decoded = [json.loads(c) for c in chunks[:-1]]
    assert {c["id"] for c in decoded} == {"chatcmpl-mdyHaOPkM8-JmNAP5bS0iA4"}
    assert all(c["object"] == "chat.completion.chunk" for c in decoded)
    deltas = [c["choices"][0]["delta"] for c in decoded if c["choices"]]
    assert deltas[0]["role"] == "assistant"
    assert "".join(d.get("content", "") for d in deltas) == "Paris is the capital of France."
    assert [c["choices"][0]["finish_reason"] for c in decoded if c["choices"]] == [None, "stop"]
    assert decoded[-1]["choices"] == [] and decoded[-1]["usage"]["completion_tokens"] == 7


def test_a_stream_cut_before_its_finish_reason_is_broken() -> None:
    first_event = (FIXTURES / "stream_text.sse").read_bytes().split(b"\r\n\r\n")[0] + b"\r\n\r\n"
    with pytest.raises(UpstreamStreamBroken):
        stream_chunks(first_event)


def test_a_block_before_content_is_a_refusal_and_after_content_a_content_filter_finish() -> None:
    blocked = b"data: " + (FIXTURES / "candidate_blocked_safety.json").read_bytes().replace(b"\n", b"") + b"\n\n"
    with pytest.raises(GeminiRefusal):
        stream_chunks(blocked)
    translator = StreamTranslator("m", "r")
    translator.feed(b'{"candidates":[{"content":{"parts":[{"text":"Once"}],"role":"model"},"index":0}]}')
    (chunk,) = translator.feed(b'{"candidates":[{"finishReason":"SAFETY","index":0}]}')
    assert json.loads(chunk)["choices"][0]["finish_reason"] == "content_filter"


def test_an_error_event_mid_stream_is_broken_without_googles_text() -> None:
    translator = StreamTranslator("m", "r")
    with pytest.raises(UpstreamStreamBroken) as caught:
        translator.feed(b'{"error":{"code":500,"message":"backend 10.2.3.4 failed","status":"INTERNAL"}}')
    assert "10.2.3.4" not in caught.value.client_message and "INTERNAL" in caught.value.client_message


# ---- requests ----


def test_roles_system_instruction_and_generation_config() -> None:
    request = chat(
        Message(role="system", content=(Text(text="Be brief."),)),
        user("Hi"),
        Message(role="assistant", content=(Text(text="Hello"),)),
        user("Capital of France?"),
        max_output_tokens=50,
        temperature=0.2,
        top_p=0.9,
        top_k=40,
        stop=("END",),
        n=2,
        seed=7,
    )
    body = body_of(request)
    assert body["systemInstruction"] == {"parts": [{"text": "Be brief."}]}
    assert [c["role"] for c in body["contents"]] == ["user", "model", "user"]
    assert body["generationConfig"] == {
        "temperature": 0.2,
        "topP": 0.9,
        "topK": 40,
        "maxOutputTokens": 50,
        "seed": 7,
        "candidateCount": 2,
        "stopSequences": ["END"],
    }


def test_tools_choice_and_a_two_turn_loop_keep_the_signature() -> None:
    sig = "CiIBVKhc7oDbtsGw3dBpBuD5Xu+rGCL4p3xH8J9NmeQvZWzA"
    request = chat(
        user("Weather in Paris?"),
        Message(
            role="assistant",
            content=(ToolCall(id="call_1", name="get_weather", arguments='{"location":"Paris"}', signature=sig),),
        ),
        Message(role="tool", content=(ToolResult(call_id="call_1", content=(Text(text='{"celsius": 21}'),)),)),
        Message(role="tool", content=(ToolResult(call_id="call_1", content=(Text(text="and sunny"),)),)),
        tools=(WEATHER,),
        tool_choice=ToolChoice(mode="tool", name="get_weather"),
    )
    body = body_of(request)
    assert body["tools"] == [
        {
            "functionDeclarations": [
                {
                    "name": "get_weather",
                    "description": "Current weather",
                    "parameters": {
                        "type": "OBJECT",
                        "properties": {"location": {"type": "STRING"}},
                        "required": ["location"],
                    },
                }
            ]
        }
    ]
    assert body["toolConfig"] == {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_weather"]}}
    model_turn, results = body["contents"][1:]
    assert model_turn == {
        "role": "model",
        "parts": [{"functionCall": {"name": "get_weather", "args": {"location": "Paris"}}, "thoughtSignature": sig}],
    }
    # Both results in one user turn, each named by its call.
    assert results == {
        "role": "user",
        "parts": [
            {"functionResponse": {"name": "get_weather", "response": {"celsius": 21}}},
            {"functionResponse": {"name": "get_weather", "response": {"result": "and sunny"}}},
        ],
    }


def test_openai_client_extra_content_reaches_gemini_byte_for_byte() -> None:
    sig = "+//+AAAA/w==\u00e9"  # whatever the client holds, unchanged
    client = {
        "model": "r",
        "messages": [
            {"role": "user", "content": "Weather?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_9",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": "{}"},
                        "extra_content": {"google": {"thought_signature": sig}},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_9", "content": "sunny"},
        ],
    }
    body = body_of(decode(json.dumps(client).encode(), "chat"))
    assert body["contents"][1]["parts"][0]["thoughtSignature"] == sig


def test_images_thinking_and_response_format() -> None:
    request = chat(
        Message(
            role="user",
            content=(
                Text(text="What is it?"),
                Image(url="data:image/jpeg;base64,/9j/4AAQ"),
                Image(data="iVBORw==", media_type="image/png"),
            ),
        ),
        Message(role="assistant", content=(Thinking(text="unsigned reasoning"), Text(text="A cat"))),
        user("Sure?"),
        response_format=ResponseFormat(
            type="json_schema",
            json_schema=msgspec.Raw(
                b'{"name":"x","schema":{"type":"object","properties":{"ok":{"type":["boolean","null"]}}}}'
            ),
        ),
        thinking=ThinkingConfig(budget_tokens=2048),
    )
    body = body_of(request)
    assert body["contents"][0]["parts"][1:] == [
        {"inlineData": {"mimeType": "image/jpeg", "data": "/9j/4AAQ"}},
        {"inlineData": {"mimeType": "image/png", "data": "iVBORw=="}},
    ]
    assert body["contents"][1]["parts"] == [{"text": "A cat"}]  # unsigned reasoning holds no provider state
    config = body["generationConfig"]
    assert config["responseMimeType"] == "application/json"
    assert config["responseSchema"] == {"type": "OBJECT", "properties": {"ok": {"type": "BOOLEAN", "nullable": True}}}
    assert config["thinkingConfig"] == {"includeThoughts": True, "thinkingBudget": 2048}


@pytest.mark.parametrize(("effort", "budget"), [("low", 1024), ("high", 24576), ("none", 0)])
def test_reasoning_effort_of_an_openai_client(effort: str, budget: int) -> None:
    client = {"model": "r", "messages": [{"role": "user", "content": "x"}], "reasoning_effort": effort}
    config = body_of(decode(json.dumps(client).encode(), "chat"))["generationConfig"]["thinkingConfig"]
    assert config["thinkingBudget"] == budget and config.get("includeThoughts", False) == (budget > 0)


@pytest.mark.parametrize(
    ("request_", "says"),
    [
        (chat(Message(role="user", content=(Image(url="https://example.com/cat.png"),))), "data: URL"),
        (chat(Message(role="assistant", content=(RedactedThinking(data="x"),))), "redacted_thinking"),
        (chat(Message(role="tool", content=(ToolResult(call_id="ghost", content=(Text(text="x"),)),))), "ghost"),
        (chat(user("x"), tools=(Tool(name="web_search", kind="web_search_preview"),)), "web_search"),
        (chat(user("x"), logprobs=True), "logprobs"),
        (
            chat(
                user("x"),
                tools=(Tool(name="t", parameters=msgspec.Raw(b'{"type":"object","properties":{"a":{"allOf":[]}}}')),),
            ),
            "allOf",
        ),
        (
            chat(user("x"), extra={"reasoning_effort": msgspec.Raw(b'"extreme"')}),
            "reasoning_effort",
        ),
    ],
)
def test_what_gemini_cannot_be_given_is_refused_by_name(request_: Request, says: str) -> None:
    with pytest.raises(Untranslatable, match=says):
        generate_content_body(request_)


def test_an_anthropic_clients_signed_empty_thinking_goes_back_on_the_next_part() -> None:
    request = chat(
        user("Weather?"),
        Message(
            role="assistant",
            content=(
                Thinking(text="", signature="sig/1+"),
                ToolCall(id="t1", name="get_weather", arguments="{}"),
                Thinking(text="", signature="sig-end="),
            ),
        ),
        Message(role="tool", content=(ToolResult(call_id="t1", content=(Text(text="sunny"),)),)),
    )
    parts = body_of(request)["contents"][1]["parts"]
    assert parts == [
        {"functionCall": {"name": "get_weather", "args": {}}, "thoughtSignature": "sig/1+"},
        {"text": "", "thought": True, "thoughtSignature": "sig-end="},  # nothing after it: kept, not dropped
    ]

"""What the capture store holds: one `CaptureRecord` per captured request, any number of `Feedback` on it.

Both are msgspec Structs, stored as their JSON beside a few indexed columns (gateway.capture.sql), so a
reader (`strait datasets`) gets them back typed. Every text in them was redacted before it was written
(gateway.capture.redact); what the tenant's `capture.include` left out is absent (None / empty).
"""

from __future__ import annotations

from typing import Literal

import msgspec

FeedbackKind = Literal["score", "boolean", "label", "correction", "regenerate", "cache_bad_hit"]


class CapturedToolCall(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    id: str = ""
    name: str = ""
    # JSON text, as OpenAI sends it (redacted as text).
    arguments: str = ""


class CapturedMessage(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One message in OpenAI chat shape: text parts joined; a part that is not text is a `[image]`-style
    marker (its bytes are never captured)."""

    role: str
    content: str | None = None
    name: str | None = None
    tool_calls: tuple[CapturedToolCall, ...] = ()
    # A tool message: the call it answers.
    tool_call_id: str | None = None


class CapturedTool(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    name: str
    description: str | None = None
    # The JSON schema of its arguments, as the client sent it (JSON text).
    parameters: str | None = None


class CapturedRequest(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """The canonical request as captured: messages (chat) or prompts (completions), tools, sampling."""

    messages: tuple[CapturedMessage, ...] = ()
    prompts: tuple[str, ...] = ()
    tools: tuple[CapturedTool, ...] = ()
    temperature: float | None = None
    top_p: float | None = None
    max_output_tokens: int | None = None
    stream: bool = False


class CapturedAnswer(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """The answer's first choice (a stream assembled from its chunks)."""

    content: str | None = None
    tool_calls: tuple[CapturedToolCall, ...] = ()
    finish_reason: str | None = None
    # The stream was longer than the capture keeps (it stops collecting past a bound).
    truncated: bool = False


class CaptureRecord(msgspec.Struct, frozen=True, kw_only=True):
    # The gateway's request id: `x-strait-request-id` on every answer, and `x-request-id` too unless the
    # client sent its own (which is `client_request_id`, echoed, never a key).
    request_id: str
    ts_ms: int
    tenant: str
    key_id: str
    route: str
    operation: str
    protocol: str
    status: int
    outcome: str
    client_request_id: str | None = None
    # The answer's own id as the OpenAI translation carries it (`chatcmpl-...`): what a cache hit was
    # served with, so a bad-hit report (POST /v1/cache/feedback) finds its capture.
    response_id: str | None = None
    # The policy model and deployment (`model@backend`) that answered; None when none did.
    model: str | None = None
    deployment: str | None = None
    backend: str | None = None
    # The model's licence (name, and whether its outputs may train other models) and origin.
    licence: str | None = None
    licence_outputs_train: bool | None = None
    origin_developer: str | None = None
    origin_country: str | None = None
    policy_version: str = ""
    decision_id: str = ""
    partial: bool = False
    cache: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    latency_ms: float = 0.0
    ttft_ms: float | None = None
    # The client's request `metadata` and `x-strait-tags` (bounded).
    metadata: dict[str, str] = {}
    tags: tuple[str, ...] = ()
    # Whether the tenant's consent covered training when this was captured (`capture.training`).
    consent_training: bool = False
    # What the tenant's `capture.include` let in, and the redactors that ran over it.
    include: tuple[str, ...] = ()
    redacted_with: tuple[str, ...] = ()
    request: CapturedRequest | None = None
    answer: CapturedAnswer | None = None
    # A shadow copy's answer (gateway.capture.shadow_sink): the live request id it copied. Such a record
    # is the candidate's, stored under `<live id>:shadow`, without the request (it is the live record's).
    shadow_of: str | None = None


class Feedback(msgspec.Struct, frozen=True, kw_only=True):
    """A signal on one captured request: explicit (POST /v1/feedback) or implicit (a regenerate)."""

    id: str
    request_id: str
    tenant: str
    ts_ms: int
    kind: FeedbackKind
    # score: the value given (-10..10); boolean: 1.0 (true) or -1.0 (false); label, correction,
    # regenerate and cache_bad_hit (a cached answer reported wrong: its reason is the label): None.
    score: float | None = None
    label: str | None = None
    # An edited answer (redacted like every captured text).
    correction: str | None = None
    weight: float = 1.0
    metadata: dict[str, str] = {}
    # The key that gave it (None for an implicit signal).
    key_id: str | None = None
    # Implicit: the request whose arrival was the signal (the regenerate).
    by_request_id: str | None = None


class Captured(msgspec.Struct, frozen=True, kw_only=True):
    """A record with its feedback (oldest first): what a query returns."""

    record: CaptureRecord
    feedback: tuple[Feedback, ...] = ()

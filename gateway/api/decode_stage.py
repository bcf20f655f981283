"""Stage `decode` (the OpenAI codec's): the body is read and decoded here, after `auth`, so that an
unauthenticated client costs no parsing.

The edge puts only a body source on the context (`ctx.body`, `ctx.content_length`); this stage reads
it (size-limited), decodes it for `ctx.operation` and fills the fields only the body knows: payload,
route_name, stream, include_usage. It lives in api/ (it knows the wire types) and is injected into the
pipeline by the wiring point, so pipeline.py and the stages never import api/.
"""

from __future__ import annotations

from typing import Any, Final

from gateway.api.decode import decode_request, read_body
from gateway.api.inbound import InboundLimits
from gateway.api.wire import ChatRequest, CompletionRequest, EmbeddingsRequest
from gateway.context import RequestContext
from gateway.contracts import Operation
from gateway.pipeline import RequestOnly

KINDS: Final[dict[Operation, Any]] = {
    "chat": ChatRequest,
    "completions": CompletionRequest,
    "embeddings": EmbeddingsRequest,
}


class DecodeStage(RequestOnly):
    name = "decode"

    def __init__(self, limits: InboundLimits, max_body_bytes: int) -> None:
        self.limits = limits
        self.max_body_bytes = max_body_bytes

    async def on_request(self, ctx: RequestContext) -> None:
        assert ctx.body is not None
        body = await read_body(ctx.body, ctx.content_length, self.max_body_bytes)
        ctx.body = None  # read and closed: nothing else may read it
        typed, raw = decode_request(body, KINDS[ctx.operation], self.limits)
        ctx.payload = raw
        ctx.route_name = typed.model
        ctx.stream = bool(getattr(typed, "stream", False))
        options = getattr(typed, "stream_options", None)
        ctx.include_usage = bool(options is not None and options.include_usage)

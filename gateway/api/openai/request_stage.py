"""Stage `decode` (the OpenAI codec's): the body is read and decoded here, after `auth`, so that an
unauthenticated client costs no parsing.

The edge puts only a body source on the context (`ctx.body`, `ctx.content_length`); this stage reads
it (size-limited), decodes it once into the canonical request for `ctx.operation` (the client's bytes
kept in it for passthrough; a /v1/messages body, `ctx.protocol` "anthropic", by the Anthropic codec) and fills the fields only the body knows: request, route_name, stream,
include_usage, and the lazy prompt-token count. It lives in api/ (it knows the wire types) and is
injected into the pipeline by the wiring point, so pipeline.py and the stages never import api/.
"""

from __future__ import annotations

from gateway.api.anthropic.decode import decode_messages
from gateway.api.decode import read_body
from gateway.api.inbound import InboundLimits
from gateway.api.openai.decode import decode
from gateway.context import RequestContext
from gateway.pipeline import RequestOnly
from gateway.tokens import PromptTokens


class DecodeStage(RequestOnly):
    name = "decode"

    def __init__(self, limits: InboundLimits, max_body_bytes: int) -> None:
        self.limits = limits
        self.max_body_bytes = max_body_bytes

    async def on_request(self, ctx: RequestContext) -> None:
        assert ctx.body is not None
        body = await read_body(ctx.body, ctx.content_length, self.max_body_bytes)
        ctx.body = None  # read and closed: nothing else may read it
        if ctx.protocol == "openai":
            request = decode(body, ctx.operation, self.limits)
        else:  # Anthropic Messages (/v1/messages): the same canonical request, the same bounds
            request = decode_messages(body, self.limits, headers=ctx.headers)
        ctx.request = request
        ctx.route_name = request.model
        ctx.stream = request.stream
        ctx.include_usage = request.include_usage
        ctx.prompt_tokens = PromptTokens(request.prompt_texts, chat=request.operation == "chat")

"""Stage `decode` (the OpenAI codec's): the body is read and decoded here, after `auth`, so that an
unauthenticated client costs no parsing.

The edge puts only a body source on the context (`ctx.body`, `ctx.content_length`); this stage reads
it (size-limited), decodes it once into the canonical request for `ctx.operation` (the client's bytes
kept in it for passthrough; a /v1/messages body, `ctx.protocol` "anthropic", by the Anthropic codec; a
/v1/responses body by the Responses codec, after its `previous_response_id` is read from the tenant's stored
responses) and fills the fields only the body knows: request, route_name, stream,
include_usage, and the lazy prompt-token count. It lives in api/ (it knows the wire types) and is
injected into the pipeline by the wiring point, so pipeline.py and the stages never import api/.
"""

from __future__ import annotations

from gateway.api.anthropic.decode import decode_messages
from gateway.api.decode import read_body
from gateway.api.inbound import InboundLimits
from gateway.api.openai.decode import decode
from gateway.api.responses import decode as responses
from gateway.api.responses.stored import Conversations
from gateway.api.responses.stored import not_found as responses_not_found
from gateway.canonical import Request
from gateway.context import RequestContext
from gateway.pipeline import RequestOnly
from gateway.tokens import PromptTokens


class DecodeStage(RequestOnly):
    name = "decode"

    def __init__(self, limits: InboundLimits, max_body_bytes: int, conversations: Conversations | None = None) -> None:
        self.limits = limits
        self.max_body_bytes = max_body_bytes
        # Stored responses, for a Responses request's `previous_response_id` (read as its tenant).
        self.conversations = conversations

    async def on_request(self, ctx: RequestContext) -> None:
        assert ctx.body is not None
        body = await read_body(ctx.body, ctx.content_length, self.max_body_bytes)
        ctx.body = None  # read and closed: nothing else may read it
        if ctx.protocol == "openai":
            request = decode(body, ctx.operation, self.limits)
        elif ctx.protocol == "responses":
            request = await self._responses(body, ctx)
        else:  # Anthropic Messages (/v1/messages): the same canonical request, the same bounds
            request = decode_messages(body, self.limits, headers=ctx.headers)
        ctx.request = request
        ctx.route_name = request.model
        ctx.stream = request.stream
        ctx.include_usage = request.include_usage
        ctx.prompt_tokens = PromptTokens(request.prompt_texts, chat=request.operation == "chat")

    async def _responses(self, body: bytes, ctx: RequestContext) -> Request:
        """A Responses body (/v1/responses): checked first, then its `previous_response_id` resolved from
        the tenant's stored responses, then the canonical request; its Exchange kept for the encoder."""
        wire, top = responses.parse(body, self.limits)
        previous = None
        if wire.previous_response_id is not None:
            if self.conversations is None or ctx.principal is None:
                raise responses_not_found(wire.previous_response_id, "previous_response_id")
            previous = await self.conversations.conversation(ctx.principal.tenant, wire.previous_response_id)
        request, exchange = responses.build(wire, top, previous, body)
        ctx.protocol_state = exchange
        return request

"""The app's front door: the model endpoints' requests go straight to their handlers, everything else
(and every lifespan event) through Litestar.

A Litestar request passes the app's entry, its exception middleware, the router and the route's own
exception middleware before the handler, and each of those frames is walked again every time the
request's task resumes (the admission's reply, the upstream's head, the slot release): measured at
about 5 us of CPU per request for a trivial handler, more for ours. Here the three model paths are a
dict lookup away, and an error raised before the response started is rendered by the same exception
handlers, the way Litestar's own middleware renders it (a Request on the scope, the handler chosen by
the exception's class, its Response sent), so clients see the same answers.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from litestar import Litestar, Request, Response
from litestar.exceptions import LitestarException

from gateway.api.asgi_send import Message
from gateway.api.cors import CorsGate
from gateway.api.routes import ASGIEndpoint

ErrorHandler = Callable[[Request[Any, Any, Any], Any], Response[Any]]


class _Tracked:
    """`send`, noting whether the response started; a plain call returning `send`'s awaitable (no
    coroutine of its own per message: a stream sends one per batch of events)."""

    __slots__ = ("send", "started")

    def __init__(self, send: Any) -> None:
        self.send = send
        self.started = False

    def __call__(self, message: Message) -> Awaitable[None]:
        if not self.started and message["type"] == "http.response.start":
            self.started = True
        result: Awaitable[None] = self.send(message)
        return result


class FrontedLitestar(Litestar):
    """Litestar with the hot POST paths dispatched before it (see the module docstring)."""

    def __init__(
        self,
        *,
        endpoints: Mapping[str, ASGIEndpoint],
        exception_handlers: Mapping[type[Exception], ErrorHandler],
        cors: CorsGate | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(exception_handlers=dict(exception_handlers), **kwargs)  # type: ignore[arg-type]
        self._endpoints = dict(endpoints)
        self._error_handlers = dict(exception_handlers)
        self._cors = cors

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if self._cors is not None and scope["type"] == "http":
            # Browser clients (gateway.api.cors): a preflight is answered here; any other answer gets its headers.
            cors_send = self._cors.sender(scope, send)
            if cors_send is None:
                await self._cors.preflight(scope, send)
                return
            send = cors_send
        endpoint = self._endpoints.get(scope["path"]) if scope["type"] == "http" else None
        if endpoint is None:
            await super().__call__(scope, receive, send)
            return
        scope["app"] = scope["litestar_app"] = self
        scope.setdefault("state", {})
        tracked = _Tracked(send)
        try:
            await endpoint(scope, receive, tracked)
        except Exception as exc:
            if tracked.started:
                raise LitestarException("Exception caught after response started") from exc
            await self._render(scope, receive, send, exc)

    async def _render(self, scope: Any, receive: Any, send: Any, exc: Exception) -> None:
        handler = next((self._error_handlers[c] for c in type(exc).__mro__ if c in self._error_handlers), None)
        if handler is None:  # pragma: no cover - the app's handlers include Exception
            raise exc
        request: Request[Any, Any, Any] = self.request_class(scope=scope, receive=receive, send=send)
        response = handler(request, exc)
        await response.to_asgi_response(app=None, request=request, type_encoders=self.type_encoders)(
            scope, receive, send
        )

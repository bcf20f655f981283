"""Runs the request stages in order; a stage refuses by raising a GatewayError."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from gateway.context import RequestContext


class Stage(Protocol):
    name: str

    async def on_request(self, ctx: RequestContext) -> None: ...


class Pipeline:
    def __init__(self, stages: Sequence[Stage]) -> None:
        self.stages = tuple(stages)

    async def run(self, ctx: RequestContext) -> None:
        for stage in self.stages:
            await stage.on_request(ctx)

"""gateway.api.server_limits._HeadHoldingTransport: a response's head leaves with its body in one write,
or alone at the end of the loop turn; nothing is lost, reordered or held past a close."""

from __future__ import annotations

import asyncio
from typing import Any

from gateway.api.server_limits import _HeadHoldingTransport


class _Transport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str) -> Any:
        return ("127.0.0.1", 1) if name == "peername" else None


async def test_head_and_body_of_one_turn_go_in_one_write() -> None:
    raw = _Transport()
    t = _HeadHoldingTransport(raw, asyncio.get_running_loop())  # type: ignore[arg-type]
    t.next_response()
    t.write(b"HTTP/1.1 200 OK\r\n\r\n")
    assert raw.writes == []
    t.write(b"{}")
    assert raw.writes == [b"HTTP/1.1 200 OK\r\n\r\n{}"]
    t.write(b"more")  # later writes of the response go straight through
    assert raw.writes[-1] == b"more"
    assert t.get_extra_info("peername") == ("127.0.0.1", 1)  # everything else is the transport's


async def test_a_head_alone_leaves_at_the_end_of_the_turn_and_before_a_close() -> None:
    raw = _Transport()
    t = _HeadHoldingTransport(raw, asyncio.get_running_loop())  # type: ignore[arg-type]
    t.next_response()
    t.write(b"HEAD1")
    await asyncio.sleep(0)  # one loop turn: a stream's head does not wait for its first event
    assert raw.writes == [b"HEAD1"]
    t.write(b"event")
    assert raw.writes == [b"HEAD1", b"event"]
    t.next_response()
    t.write(b"HEAD2")
    t.close()
    assert raw.writes[-1] == b"HEAD2" and raw.closed


async def test_a_large_body_is_not_copied_behind_the_head() -> None:
    raw = _Transport()
    t = _HeadHoldingTransport(raw, asyncio.get_running_loop())  # type: ignore[arg-type]
    t.next_response()
    big = b"x" * (_HeadHoldingTransport._COALESCE_LIMIT + 1)
    t.write(b"HEAD")
    t.write(big)
    assert raw.writes == [b"HEAD", big]

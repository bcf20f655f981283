"""loadtest.fast_upstream paces a stream on an absolute schedule (the end in one write): event i is due at ttft + i * gap after
the request arrived, whenever the previous timer actually fired (an engine on its own machine does not
slow down because the proxy in front of it is busy)."""

from __future__ import annotations

from typing import Any

from loadtest.fast_upstream import Answers, FastUpstream, Timing, build_answers


class _Transport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str) -> Any:
        return None


class _Loop:
    """Records each timer's deadline; runs the callbacks by hand, each one `late` seconds after its due time."""

    def __init__(self) -> None:
        self.now = 100.0
        self.due: list[float] = []
        self.pending: list[tuple[float, Any, tuple[Any, ...]]] = []

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Any, *args: Any) -> None:
        self.due.append(when)
        self.pending.append((when, callback, args))

    def call_later(self, delay: float, callback: Any, *args: Any) -> None:
        self.call_at(self.now + delay, callback, *args)


def _stream(body: bytes, late_s: float) -> tuple[Answers, _Loop, _Transport]:
    """One paced stream for `body`, every timer run by hand `late_s` after its due time."""
    answers = build_answers(10)
    proto = FastUpstream(answers, Timing(ttft_s=0.02, chunk_delay_s=0.02))
    loop = _Loop()
    proto._loop = loop  # type: ignore[assignment]
    transport = _Transport()
    proto.connection_made(transport)  # type: ignore[arg-type]
    proto.data_received(b"POST /v1/chat/completions HTTP/1.1\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
    while loop.pending:
        when, callback, args = loop.pending.pop(0)
        loop.now = when + late_s
        callback(*args)
    return answers, loop, transport


async def test_a_late_timer_does_not_push_the_later_events_back() -> None:
    # Every timer fires 15 ms late (a busy machine).
    answers, loop, transport = _stream(b'{"model":"m","messages":[],"stream":true}', 0.015)
    frames = len(answers.stream_events)  # the finish chunk, the usage chunk and [DONE] go together
    assert loop.due == [100.0 + 0.02 + i * 0.02 for i in range(frames)]
    last = answers.stream_events[-1] + answers.stream_tail
    assert transport.writes[1:] == [*answers.stream_events[:-1], last]


async def test_the_usage_chunk_costs_a_proxy_no_extra_gap() -> None:
    """A proxy asks for the usage chunk (to account); it arrives with the finish chunk, as from an engine."""
    body = b'{"model":"m","messages":[],"stream":true,"stream_options":{"include_usage":true}}'
    answers, loop, transport = _stream(body, 0.0)
    assert len(loop.due) == len(answers.stream_events)
    assert transport.writes[-1] == answers.stream_events[-1] + answers.stream_usage_event + answers.stream_tail

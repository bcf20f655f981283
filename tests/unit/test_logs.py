"""The process log: rate-limited per call site, text or JSON (gateway.logs)."""

from __future__ import annotations

import io
import logging
import sys

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.logs import JsonFormatter, RateLimitFilter, configure_logging


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def record(
    msg: str = "upstream %s unreachable", level: int = logging.WARNING, name: str = "strait.x"
) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, ("b1",), None)


def test_a_site_writes_its_burst_then_is_suppressed_until_the_window_ends() -> None:
    clock = Clock()
    limiter = RateLimitFilter(burst=3, window_s=10, clock=clock)
    passed = [limiter.filter(record()) for _ in range(100)]
    assert passed == [True] * 3 + [False] * 97
    assert limiter.suppressed() == 97
    clock.now += 9.9
    assert not limiter.filter(record())
    clock.now += 0.1
    first = record()
    assert limiter.filter(first)
    # The first line after the window says how many were dropped, once.
    assert "[98 similar suppressed in the last 10 s]" in first.getMessage()
    second = record()
    assert limiter.filter(second)
    assert "suppressed" not in second.getMessage()
    assert limiter.suppressed() == 0


def test_sites_are_independent_and_keyed_by_template_not_text() -> None:
    limiter = RateLimitFilter(burst=1, window_s=10, clock=Clock())
    # Same template, different arguments: one site.
    a = logging.LogRecord("strait.x", logging.WARNING, __file__, 1, "request %s failed", ("r1",), None)
    b = logging.LogRecord("strait.x", logging.WARNING, __file__, 1, "request %s failed", ("r2",), None)
    assert limiter.filter(a)
    assert not limiter.filter(b)
    # Another template, another logger, another level: their own budgets.
    assert limiter.filter(record("other %s"))
    assert limiter.filter(record(name="strait.y"))
    assert limiter.filter(record(level=logging.ERROR))


def test_info_and_debug_are_never_limited() -> None:
    limiter = RateLimitFilter(burst=1, window_s=10, clock=Clock())
    assert all(limiter.filter(record(level=logging.INFO)) for _ in range(50))
    assert all(limiter.filter(record(level=logging.DEBUG)) for _ in range(50))


def test_the_site_map_is_bounded() -> None:
    limiter = RateLimitFilter(burst=1, window_s=10, max_sites=8, clock=Clock())
    for i in range(1000):
        # An f-string message: every call is a new "template".
        assert limiter.filter(record(f"dynamic {i}"))
    assert len(limiter._sites) == 8


@given(st.lists(st.tuples(st.integers(0, 3), st.floats(0, 5)), max_size=200), st.integers(1, 5))
@settings(max_examples=100, deadline=None)
def test_never_more_than_burst_per_site_per_window(events: list[tuple[int, float]], burst: int) -> None:
    clock = Clock()
    limiter = RateLimitFilter(burst=burst, window_s=10, clock=clock)
    starts: dict[int, float] = {}
    written: dict[int, int] = {}
    for site, step in events:
        clock.now += step
        if site not in starts or clock.now - starts[site] >= 10:
            starts[site], written[site] = clock.now, 0
        if limiter.filter(record(f"site {site}")):
            written[site] += 1
        assert written[site] <= burst


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        RateLimitFilter(burst=0)
    with pytest.raises(ValueError):
        RateLimitFilter(window_s=0)


def test_json_lines_carry_level_logger_message_and_traceback() -> None:
    fmt = JsonFormatter()
    line = msgspec.json.decode(fmt.format(record()))
    assert line["level"] == "WARNING" and line["logger"] == "strait.x"
    assert line["message"] == "upstream b1 unreachable" and "exc" not in line
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        rec = logging.LogRecord("strait.x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    line = msgspec.json.decode(fmt.format(rec))
    assert "RuntimeError: boom" in line["exc"]


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_configure_logging_limits_every_strait_logger_once(fmt: str) -> None:
    out = io.StringIO()
    root = logging.getLogger()
    before = list(root.handlers), root.level
    try:
        configure_logging("WARNING", fmt, stream=out, extra_loggers=())  # type: ignore[arg-type]
        # Called again (a reloaded factory): still one handler, not two copies of every line.
        configure_logging("WARNING", fmt, stream=out, extra_loggers=())  # type: ignore[arg-type]
        log = logging.getLogger("strait.test_logs")
        for i in range(50):
            log.warning("upstream %s unreachable", i)
        lines = out.getvalue().splitlines()
        assert len(lines) == 10
        if fmt == "json":
            assert msgspec.json.decode(lines[0])["message"] == "upstream 0 unreachable"
        else:
            assert lines[0].endswith("WARNING strait.test_logs upstream 0 unreachable")
    finally:
        for h in list(root.handlers):
            if getattr(h, "strait_handler", False):
                root.removeHandler(h)
        for h in before[0]:
            if h not in root.handlers:
                root.addHandler(h)
        root.setLevel(before[1])

"""The process's error log: rate-limited per call site, as text or one JSON object per line.

Why rate-limited: a request-path failure repeats at the request rate. An upstream that drops every
connection, a Redis that went away or a client that sends garbage in a loop would otherwise write
thousands of identical lines a second, costing the CPU the gateway needs to serve and burying the
one line that says what changed. So every WARNING and above goes through `RateLimitFilter`: each
call site (logger, level, message template; not the formatted text, which holds ids) may write
`burst` lines per `window_s`; the rest are counted and dropped, and the site's next line after the
window says how many were suppressed. INFO and DEBUG are not limited (off by default anyway).

The per-request access log (gateway.access_log) is not written through `logging` and is not limited
here: it has its own sampling setting.

`STRAIT_LOG_FORMAT=json` writes each record as one JSON object (ts, level, logger, message, and the
traceback as `exc` when there is one), the same shape of line as the access log, for collectors
that parse JSON; `text` (the default) is the classic `time level logger message` line.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable
from typing import Literal

import msgspec

LogFormat = Literal["text", "json"]
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
# Loggers that uvicorn configures with handlers of its own (they do not propagate to the root).
SERVER_LOGGERS = ("uvicorn", "uvicorn.error", "granian", "_granian")


class _Site:
    __slots__ = ("suppressed", "window_start", "written")

    def __init__(self, now: float) -> None:
        self.window_start = now
        self.written = 0
        self.suppressed = 0


class RateLimitFilter(logging.Filter):
    """At most `burst` records per call site per `window_s` for WARNING and above.

    A call site is (logger name, level, message template). At most `max_sites` sites are tracked: past
    that, the oldest is forgotten (a template built with an f-string would otherwise grow the map
    without bound); a forgotten site simply starts a fresh window."""

    def __init__(
        self,
        burst: int = 10,
        window_s: float = 10.0,
        *,
        max_sites: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        if burst < 1 or window_s <= 0 or max_sites < 1:
            raise ValueError("burst and max_sites must be at least 1, window_s positive")
        self.burst = burst
        self.window_s = window_s
        self.max_sites = max_sites
        self._clock = clock
        self._sites: dict[tuple[str, int, object], _Site] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        now = self._clock()
        key = (record.name, record.levelno, record.msg)
        site = self._sites.get(key)
        if site is None:
            if len(self._sites) >= self.max_sites:
                # dicts keep insertion order: the first key is the site tracked longest.
                del self._sites[next(iter(self._sites))]
            site = self._sites[key] = _Site(now)
        elif now - site.window_start >= self.window_s:
            if site.suppressed:
                # Said once, on the first line the site writes after the window: how much was dropped.
                record.msg = f"{record.msg} [{site.suppressed} similar suppressed in the last {self.window_s:g} s]"
            site.window_start, site.written, site.suppressed = now, 0, 0
        if site.written < self.burst:
            site.written += 1
            return True
        site.suppressed += 1
        return False

    def suppressed(self) -> int:
        """Records dropped in the current windows (for tests and diagnostics)."""
        return sum(s.suppressed for s in self._sites.values())


class _JsonLine(msgspec.Struct, omit_defaults=True):
    ts: float
    level: str
    logger: str
    message: str
    exc: str | None = None


_encode = msgspec.json.Encoder().encode


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts (Unix seconds), level, logger, message, exc (a traceback)."""

    def format(self, record: logging.LogRecord) -> str:
        exc = None
        if record.exc_info:
            exc = self.formatException(record.exc_info)
        elif record.exc_text:
            exc = record.exc_text
        line = _JsonLine(
            ts=round(record.created, 6),
            level=record.levelname,
            logger=record.name,
            message=record.getMessage(),
            exc=exc,
        )
        return _encode(line).decode()


def formatter(fmt: LogFormat) -> logging.Formatter:
    return JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT)


def configure_logging(
    level: str,
    fmt: LogFormat = "text",
    *,
    stream: object = None,
    extra_loggers: Iterable[str] = SERVER_LOGGERS,
    limiter: RateLimitFilter | None = None,
) -> RateLimitFilter:
    """The process's logging: a stderr handler on the root logger at `level`, formatted as `fmt`, and one
    rate limiter shared by that handler and those of the server's own loggers (uvicorn's error log),
    so every WARNING-and-above line of the process is limited per call site. Returns the limiter."""
    limiter = limiter or RateLimitFilter()
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)  # type: ignore[arg-type]
    handler.setFormatter(formatter(fmt))
    handler.addFilter(limiter)
    # Replaces what an earlier call installed (a factory called twice must not double every line).
    for old in [h for h in root.handlers if getattr(h, "strait_handler", False)]:
        root.removeHandler(old)
    handler.strait_handler = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in extra_loggers:
        for h in logging.getLogger(name).handlers:
            if limiter not in h.filters:
                h.addFilter(limiter)
            if fmt == "json":
                h.setFormatter(formatter(fmt))
    return limiter

"""A minimal blocking RESP client for the load test's own throwaway Redis: PING, INFO and DBSIZE, nothing else.

The runner and the load generator read `INFO stats` and `INFO commandstats` before and after a measured
window to count what the gateway sent to Redis per request. A raw socket keeps this independent of the
gateway's redis-py client (and adds nothing to the gateway process).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from typing import BinaryIO

# The lines of `INFO stats` worth diffing (everything else there is a gauge or irrelevant).
STATS_COUNTERS = ("total_commands_processed", "total_connections_received", "total_net_input_bytes")


def _command(*parts: str) -> bytes:
    out = [f"*{len(parts)}\r\n".encode()]
    for p in parts:
        raw = p.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(out)


def _reply(f: BinaryIO) -> bytes:
    """One simple-string, integer or bulk-string reply (all that PING, SELECT, INFO and DBSIZE return), from a
    buffered reader; an integer comes back as its digits."""
    head = f.readline()
    if not head.endswith(b"\r\n"):
        raise OSError("redis closed the connection")
    kind, body = head[:1], head[1:-2]
    if kind in (b"+", b":"):
        return body
    if kind == b"-":
        raise OSError(f"redis error: {body.decode(errors='replace')}")
    if kind != b"$":
        raise OSError(f"unexpected redis reply {head[:40]!r}")
    data = f.read(int(body) + 2)
    if len(data) != int(body) + 2:
        raise OSError("redis closed the connection")
    return data[:-2]


def call(host: str, port: int, *parts: str, timeout: float = 2.0) -> bytes:
    with socket.create_connection((host, port), timeout=timeout) as sock, sock.makefile("rb") as f:
        sock.sendall(_command(*parts))
        return _reply(f)


def ping(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        return call(host, port, "PING", timeout=timeout) == b"PONG"
    except OSError:
        return False


def dbsize(host: str, port: int, db: int = 0, timeout: float = 2.0) -> int:
    """Keys in logical database `db` (what a soak watches: a key leak shows as a rising count)."""
    with socket.create_connection((host, port), timeout=timeout) as sock, sock.makefile("rb") as f:
        sock.sendall(_command("SELECT", str(db)) + _command("DBSIZE"))
        _reply(f)
        return int(_reply(f))


@dataclass
class Snapshot:
    """Counters of one Redis at one moment: `INFO stats` counters and `calls` per command."""

    stats: dict[str, int] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)

    def minus(self, before: Snapshot) -> Snapshot:
        return Snapshot(
            stats={k: v - before.stats.get(k, 0) for k, v in self.stats.items()},
            calls={k: n for k, v in self.calls.items() if (n := v - before.calls.get(k, 0))},
        )


def snapshot(host: str, port: int) -> Snapshot:
    """`INFO stats` + `INFO commandstats` in one connection (each INFO itself counts as one command)."""
    with socket.create_connection((host, port), timeout=2.0) as sock, sock.makefile("rb") as f:
        sock.sendall(_command("INFO", "stats") + _command("INFO", "commandstats"))
        stats_text = _reply(f).decode()
        cmd_text = _reply(f).decode()
    snap = Snapshot()
    for line in stats_text.splitlines():
        name, _, value = line.partition(":")
        if name in STATS_COUNTERS:
            snap.stats[name] = int(value)
    for line in cmd_text.splitlines():
        # cmdstat_evalsha:calls=12,usec=345,usec_per_call=28.75,rejected_calls=0,failed_calls=0
        if not line.startswith("cmdstat_"):
            continue
        name, _, rest = line.partition(":")
        fields = dict(kv.split("=", 1) for kv in rest.split(","))
        snap.calls[name.removeprefix("cmdstat_")] = int(fields["calls"])
    return snap

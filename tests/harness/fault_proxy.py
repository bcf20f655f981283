"""A small TCP fault proxy (toxiproxy-like) for tests and load runs: client -> FaultProxy -> target (an upstream, Redis).

It listens on a free 127.0.0.1 port and runs its own asyncio loop in a daemon thread, so sync tests, async tests and
load scripts drive it the same way, and it never shares (or blocks) the caller's loop::

    with FaultProxy(redis.port) as p:          # p.port is where the client connects
        p.set(mode="latency", latency_ms=200)  # applied to every chunk, per direction, from now on
        p.set(mode="reset")                    # RST every open connection and every new one
        p.set(mode="pass")

Modes (``set`` returns once the change is in effect):

- ``pass``: forward both ways.  ``latency_ms`` (+ uniform ``jitter_ms``) delays each chunk, ``bandwidth_bps`` caps
  bytes per second; both apply in every forwarding mode, to ``direction`` "both" (default), "upstream"
  (client -> target) or "downstream" (target -> client).  ``mode="latency"`` / ``"bandwidth"`` are spellings of pass.
- ``reset``: RST (SO_LINGER 0 + abort) the open connections (unless ``reset_existing=False``) and each new one.
- ``blackhole``: accept and read, never answer: new connections get no target connection, open ones stop
  forwarding both ways.  A connection that was blackholed stays so until it closes (bytes were dropped, the
  stream it carries is broken); new connections after ``pass`` forward normally.
- ``reset_after_bytes=N`` (any forwarding mode, counted per connection in the chosen ``direction``): forward
  exactly N bytes, then RST both ends (toxiproxy's limit_data; a stream cut at a byte offset, e.g. mid-event).
- ``refuse``: close the listening socket (connects get ECONNREFUSED); open connections keep working.  Any other
  mode re-opens the listener on the same port.

A target that refuses makes the proxy RST the client; a target's RST is passed on as an RST, its FIN as a FIN.
``stats()`` counts connections and bytes; ``wait_for(pred)`` waits (with a deadline) on them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

MODES = ("pass", "latency", "bandwidth", "reset", "blackhole", "refuse")
DIRECTIONS = ("both", "upstream", "downstream")
_READ = 64 * 1024


@dataclass(frozen=True)
class Settings:
    mode: str = "pass"
    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    bandwidth_bps: float | None = None  # bytes per second; None = unlimited
    reset_after_bytes: int | None = None  # RST a connection once it forwarded this many bytes (toxiproxy limit_data)
    direction: str = "both"

    def applies(self, direction: str) -> bool:
        return self.direction in ("both", direction)


@dataclass
class Stats:
    accepted: int = 0  # connections accepted by the listener
    active: int = 0  # client connections open now
    reset: int = 0  # connections the proxy ended with an RST (by mode or passing a target's RST on)
    blackholed: int = 0  # connections that saw blackhole mode
    target_failures: int = 0  # connects to the target that failed
    bytes_up: int = 0  # forwarded client -> target
    bytes_down: int = 0  # forwarded target -> client
    bytes_dropped: int = 0  # read and thrown away (blackhole)


@dataclass(eq=False)
class _Conn:
    client: asyncio.StreamWriter
    target: asyncio.StreamWriter | None = None
    blackholed: bool = False
    forwarded: int = 0  # bytes forwarded in the directions `reset_after_bytes` watches
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


def _rst(writer: asyncio.StreamWriter | None) -> None:
    """Abort with SO_LINGER 0, so the peer gets an RST (ECONNRESET), not a FIN."""
    if writer is None or writer.transport.is_closing():
        return
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class FaultProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1", *, listen_port: int = 0) -> None:
        self.target = (target_host, target_port)
        self.host = "127.0.0.1"
        self.port = listen_port
        self._settings = Settings()
        self._stats = Stats()
        self._cond = threading.Condition()
        self._conns: set[_Conn] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._rng = random.Random(0)

    # -- lifecycle -----------------------------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> FaultProxy:
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._listen())
            except BaseException as exc:  # noqa: BLE001 - handed to the starting thread
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name=f"fault-proxy->{self.target[1]}", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            raise RuntimeError("fault proxy did not start")
        if failure:
            raise RuntimeError(f"fault proxy could not listen: {failure[0]!r}")
        return self

    def close(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return
        with contextlib.suppress(RuntimeError, TimeoutError):
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        self._thread = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def url(self, scheme: str = "http") -> str:
        return f"{scheme}://{self.host}:{self.port}"

    # -- control -------------------------------------------------------------------------------------------------

    def set(self, mode: str | None = None, *, reset_existing: bool = True, **knobs: Any) -> None:
        """Change mode and/or knobs (latency_ms, jitter_ms, bandwidth_bps, direction); unspecified knobs are kept."""
        changes: dict[str, Any] = dict(knobs)
        if mode is not None:
            changes["mode"] = mode
        unknown = set(changes) - {"mode", "latency_ms", "jitter_ms", "bandwidth_bps", "direction", "reset_after_bytes"}
        if unknown:
            raise ValueError(f"unknown fault proxy settings {sorted(unknown)}")
        new = replace(self._settings, **changes)
        if new.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {new.mode!r}")
        if new.direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {new.direction!r}")
        if new.latency_ms < 0 or new.jitter_ms < 0 or (new.bandwidth_bps is not None and new.bandwidth_bps <= 0):
            raise ValueError("latency_ms and jitter_ms must be >= 0, bandwidth_bps > 0 or None")
        if new.reset_after_bytes is not None and new.reset_after_bytes < 0:
            raise ValueError("reset_after_bytes must be >= 0 or None")
        self._call(self._apply(new, reset_existing))

    def clear(self) -> None:
        """Back to plain pass-through with no latency or bandwidth cap."""
        self.set(
            mode="pass", latency_ms=0.0, jitter_ms=0.0, bandwidth_bps=None, direction="both", reset_after_bytes=None
        )

    @property
    def settings(self) -> Settings:
        return self._settings

    def stats(self) -> dict[str, int]:
        with self._cond:
            return asdict(self._stats)

    def wait_for(self, pred: Callable[[dict[str, int]], bool], timeout: float = 5.0) -> dict[str, int]:
        """Block until pred(stats) holds (woken on every change), or raise TimeoutError at the deadline."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not pred(asdict(self._stats)):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"fault proxy stats never matched: {asdict(self._stats)}")
                self._cond.wait(left)
            return asdict(self._stats)

    # -- internals (run on the proxy's loop) ---------------------------------------------------------------------

    def _call(self, coro: Any) -> Any:
        assert self._loop is not None, "start() the proxy first"
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    def _count(self, **deltas: int) -> None:
        with self._cond:
            for name, d in deltas.items():
                setattr(self._stats, name, getattr(self._stats, name) + d)
            self._cond.notify_all()

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._on_client, self.host, self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _apply(self, new: Settings, reset_existing: bool) -> None:
        self._settings = new
        if new.mode == "refuse":
            if self._server is not None:
                self._server.close()
                self._server = None
        elif self._server is None:
            await self._listen()
        if new.mode == "reset" and reset_existing:
            for conn in list(self._conns):
                self._reset_conn(conn)
        elif new.mode == "blackhole":
            for conn in self._conns:
                if not conn.blackholed:
                    conn.blackholed = True
                    self._count(blackholed=1)

    def _reset_conn(self, conn: _Conn) -> None:
        if not conn.client.transport.is_closing():
            self._count(reset=1)
        _rst(conn.client)
        _rst(conn.target)

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for conn in list(self._conns):
            conn.client.transport.abort()
            if conn.target is not None:
                conn.target.transport.abort()
        # Every connection handler and pump ends here, so the loop stops with no task left pending.
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Conn(writer)
        self._conns.add(conn)
        self._count(accepted=1, active=1)
        try:
            await self._serve(conn, reader)
        except (ConnectionError, OSError, asyncio.CancelledError):
            pass
        finally:
            self._conns.discard(conn)
            self._count(active=-1)
            for w in (conn.client, conn.target):
                if w is not None and not w.transport.is_closing():
                    w.transport.close()

    async def _serve(self, conn: _Conn, reader: asyncio.StreamReader) -> None:
        mode = self._settings.mode
        if mode == "reset":
            self._reset_conn(conn)
            return
        if mode == "blackhole":
            conn.blackholed = True
            self._count(blackholed=1)
            await self._drain_forever(reader)
            return
        try:
            t_reader, t_writer = await asyncio.open_connection(*self.target)
        except OSError:
            self._count(target_failures=1)
            self._reset_conn(conn)
            return
        conn.target = t_writer
        if conn.blackholed:  # blackhole switched on while we were connecting
            await self._drain_forever(reader)
            return
        up = asyncio.ensure_future(self._pump(conn, reader, t_writer, "upstream"))
        down = asyncio.ensure_future(self._pump(conn, t_reader, conn.client, "downstream"))
        conn.tasks = [up, down]
        await asyncio.gather(up, down, return_exceptions=True)

    async def _drain_forever(self, reader: asyncio.StreamReader) -> None:
        while data := await reader.read(_READ):
            self._count(bytes_dropped=len(data))

    async def _pump(self, conn: _Conn, src: asyncio.StreamReader, dst: asyncio.StreamWriter, direction: str) -> None:
        """Copy src -> dst through a queue: the reader stamps each chunk with its release time (latency), the
        writer waits for it and paces the bytes (bandwidth), so latency never throttles throughput."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue(maxsize=256)
        counter = "bytes_up" if direction == "upstream" else "bytes_down"

        async def read_side() -> None:
            try:
                while data := await src.read(_READ):
                    if conn.blackholed:
                        self._count(bytes_dropped=len(data))
                        continue
                    s = self._settings
                    delay = 0.0
                    if s.applies(direction):
                        delay = (s.latency_ms + self._rng.uniform(0.0, s.jitter_ms)) / 1000.0
                    await queue.put((loop.time() + delay, data))
            except ConnectionResetError:
                self._reset_conn(conn)  # the peer reset: pass it on as a reset, not as a clean close
            await queue.put(None)

        async def write_side() -> None:
            while (item := await queue.get()) is not None:
                release, data = item
                wait = release - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if conn.blackholed:
                    self._count(bytes_dropped=len(data))
                    continue
                limit = self._settings.reset_after_bytes if self._settings.applies(direction) else None
                if limit is not None and conn.forwarded + len(data) >= limit:
                    # Forward exactly up to the limit, then cut the connection (both ends) with an RST.
                    head = data[: max(0, limit - conn.forwarded)]
                    if head:
                        await self._write_paced(dst, head, direction, counter)
                    conn.forwarded += len(head)
                    self._reset_conn(conn)
                    return
                if limit is not None:
                    conn.forwarded += len(data)
                await self._write_paced(dst, data, direction, counter)
            if not conn.blackholed and dst.can_write_eof() and not dst.transport.is_closing():
                with contextlib.suppress(OSError):
                    dst.write_eof()  # half-close: the other direction may still be talking

        reader_task = asyncio.ensure_future(read_side())
        try:
            await write_side()
        finally:
            reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError, OSError):
                await reader_task

    async def _write_paced(self, dst: asyncio.StreamWriter, data: bytes, direction: str, counter: str) -> None:
        s = self._settings
        rate = s.bandwidth_bps if s.applies(direction) else None
        if rate is None:
            dst.write(data)
            await dst.drain()
            self._count(**{counter: len(data)})
            return
        step = max(64, int(rate / 20))  # ~20 slices a second keeps the pace smooth
        for i in range(0, len(data), step):
            piece = data[i : i + step]
            dst.write(piece)
            await dst.drain()
            self._count(**{counter: len(piece)})
            await asyncio.sleep(len(piece) / rate)


# ---------------------------------------------------------------------------------------------------------------------
# Process mode, for load runs driven from another process:
#   python -m tests.harness.fault_proxy --target-port T --port P --control-port C
# GET  http://127.0.0.1:C/_proxy           -> {"settings": {...}, "stats": {...}}
# POST http://127.0.0.1:C/_proxy {"mode": "latency", "latency_ms": 200}   (the arguments of FaultProxy.set)
# GET  http://127.0.0.1:C/healthz          -> 200 once listening (ServerProcess's readiness check)


def _control_app(proxy: FaultProxy) -> Any:
    from aiohttp import web

    async def view(request: web.Request) -> web.Response:
        if request.method == "POST":
            raw = await request.read()
            try:
                spec = json.loads(raw) if raw else {}
                if not isinstance(spec, dict) or len(raw) > 4096:
                    raise ValueError("expected a small JSON object")
                await asyncio.to_thread(proxy.set, **spec)
            except (ValueError, TypeError) as exc:
                return web.json_response({"error": str(exc)}, status=400)
        return web.json_response({"settings": asdict(proxy.settings), "stats": proxy.stats()})

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "port": proxy.port})

    app = web.Application()
    app.router.add_route("*", "/_proxy", view)
    app.router.add_get("/healthz", healthz)
    return app


def main(argv: list[str] | None = None) -> None:
    import argparse

    from aiohttp import web

    parser = argparse.ArgumentParser(description="TCP fault proxy (loopback)")
    parser.add_argument("--target-port", type=int, required=True)
    parser.add_argument("--target-host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True, help="where clients connect")
    parser.add_argument("--control-port", type=int, required=True, help="HTTP control: GET/POST /_proxy")
    args = parser.parse_args(argv)
    with FaultProxy(args.target_port, args.target_host, listen_port=args.port) as proxy:
        web.run_app(_control_app(proxy), host="127.0.0.1", port=args.control_port, print=None, access_log=None)


if __name__ == "__main__":
    main()

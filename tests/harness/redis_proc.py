"""Real `redis-server` processes for tests: one server or a 3-node cluster on free loopback ports.

Chaos helpers act on the PID this module started (never by name): `kill()` is a crash (SIGKILL),
`freeze()`/`thaw()` are SIGSTOP/SIGCONT (TCP still accepts, nothing answers: the `docker pause` case),
`restart()` brings an empty server back on the same port. Readiness is polled with a deadline.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from tests.harness.procs import free_port
from tests.harness.reaper import track

REDIS_SERVER = shutil.which("redis-server") or "redis-server"
REDIS_CLI = shutil.which("redis-cli") or "redis-cli"


def _command(port: int, *args: str, timeout: float = 1.0) -> bytes:
    """Send one inline command over a fresh socket and return the raw reply (enough for PING/INFO)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall((" ".join(args) + "\r\n").encode())
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
            if data.startswith((b"+", b"-", b":")) and data.endswith(b"\r\n"):
                break
            if data.startswith(b"$"):
                header, _, rest = data.partition(b"\r\n")
                if len(rest) >= int(header[1:]) + 2:
                    break
        return data


class RedisProc:
    """One `redis-server` on 127.0.0.1:port, no persistence, started and stopped by PID."""

    def __init__(self, port: int | None = None, *, extra_args: Sequence[str] = (), workdir: Path | None = None) -> None:
        self.port = port or free_port()
        self.extra_args = list(extra_args)
        self._own_dir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix=f"strait-redis-{self.port}-"))
        self.proc: subprocess.Popen[bytes] | None = None
        self.frozen = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"redis-{self.port}.log"

    def argv(self) -> list[str]:
        return [
            REDIS_SERVER,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--protected-mode",
            "yes",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.workdir),
            "--logfile",
            str(self.log_path),
            *self.extra_args,
        ]

    def start(self, timeout: float = 10.0) -> RedisProc:
        self.proc = track(
            subprocess.Popen(self.argv(), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
        )
        self.frozen = False
        self.wait_ready(timeout)
        return self

    def ping(self, timeout: float = 0.5) -> bool:
        try:
            return _command(self.port, "PING", timeout=timeout).startswith(b"+PONG")
        except OSError:
            return False

    def wait_ready(self, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server on {self.port} exited with {self.proc.returncode}: {self.read_log()}")
            if self.ping():
                return
            time.sleep(0.01)
        self.stop()
        raise RuntimeError(f"redis-server on {self.port} not ready after {timeout}s: {self.read_log()}")

    def read_log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill(self) -> None:
        """Crash: SIGKILL, and reap, so the port is free for `restart()`."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self.frozen = False

    def freeze(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)
        self.frozen = True

    def thaw(self) -> None:
        os.kill(self.pid, signal.SIGCONT)
        self.frozen = False

    def restart(self, timeout: float = 10.0) -> RedisProc:
        """Kill (if running) and start an empty server on the same port."""
        self.kill()
        return self.start(timeout)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        if self.frozen:
            self.thaw()
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def cleanup(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> RedisProc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


class RedisClusterProcs:
    """Three `redis-server --cluster-enabled yes` primaries (no replicas) joined by `redis-cli --cluster create`."""

    def __init__(self, size: int = 3) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="strait-redis-cluster-"))
        self.nodes: list[RedisProc] = []
        for _ in range(size):
            port, bus = free_port(), free_port()
            node_dir = self.workdir / str(port)
            node_dir.mkdir()
            extra = [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                str(node_dir / "nodes.conf"),
                "--cluster-port",
                str(bus),
                "--cluster-node-timeout",
                "2000",
            ]
            self.nodes.append(RedisProc(port, extra_args=extra, workdir=node_dir))

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    def start(self, timeout: float = 30.0) -> RedisClusterProcs:
        try:
            for node in self.nodes:
                node.start()
            subprocess.run(
                [
                    REDIS_CLI,
                    "--cluster",
                    "create",
                    *(f"127.0.0.1:{n.port}" for n in self.nodes),
                    "--cluster-replicas",
                    "0",
                    "--cluster-yes",
                ],
                check=True,
                capture_output=True,
                timeout=timeout,
            )
            self.wait_ok(timeout)
        except BaseException:
            self.cleanup()
            raise
        return self

    def wait_ok(self, timeout: float) -> None:
        """Every node reports `cluster_state:ok` and knows all nodes (polled with a deadline)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            infos = []
            for node in self.nodes:
                try:
                    infos.append(_command(node.port, "CLUSTER", "INFO").decode())
                except OSError:
                    infos.append("")
            if all("cluster_state:ok" in i and f"cluster_known_nodes:{len(self.nodes)}" in i for i in infos):
                return
            time.sleep(0.05)
        raise RuntimeError(f"cluster not ok after {timeout}s: {infos}")

    def cleanup(self) -> None:
        for node in self.nodes:
            node.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> RedisClusterProcs:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

"""Start Strait as a real server process (the same `strait serve` a user runs)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path

from tests.harness.procs import PYTHON, ServerProcess, free_port


def gateway_process(
    policy: Path,
    *,
    log_path: Path | None = None,
    env: Mapping[str, str] | None = None,
    port: int | None = None,
) -> ServerProcess:
    """A not-yet-started gateway serving `policy` on a free loopback port; call .start() or use `with`."""
    port = port or free_port()
    argv = [PYTHON, "-m", "gateway", "serve", "--policy", str(policy), "--host", "127.0.0.1", "--port", str(port)]
    return ServerProcess(argv, port, env=env, ready_path="/readyz", log_path=log_path)


@contextlib.contextmanager
def replica_processes(
    policy: Path, state_url: str, n: int, folder: Path, *, state_timeout_ms: int = 2000
) -> Iterator[list[ServerProcess]]:
    """`n` started gateways sharing one state store (each its own spool and log), stopped by PID.
    The default state timeout is generous: event-loop lag on 2 shared cores counts against it."""
    procs: list[ServerProcess] = []
    try:
        for i in range(n):
            env = {
                "STRAIT_STATE": state_url,
                "STRAIT_REPLICAS": str(n),
                "STRAIT_SPOOL_DIR": str(folder / f"spool-{i}"),
                "STRAIT_STATE_TIMEOUT_MS": str(state_timeout_ms),
            }
            procs.append(gateway_process(policy, log_path=folder / f"gw{i}.log", env=env).start())
        yield procs
    finally:
        for p in procs:
            p.stop()

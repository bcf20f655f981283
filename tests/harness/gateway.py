"""Start Strait as a real server process (the same `strait serve` a user runs)."""

from __future__ import annotations

from collections.abc import Mapping
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

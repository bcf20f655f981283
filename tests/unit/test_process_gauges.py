"""The gauges a soak watches for leaks (gateway/gauges.py): open file descriptors and event-loop tasks, read
at scrape time from a real app in-process (create_app, the simulated adapter, memory state)."""

from __future__ import annotations

import os
from pathlib import Path

from litestar.testing import TestClient

from gateway.app import create_app
from gateway.settings import Settings

POLICY = """
version: 1
backends:
  - {name: sim, adapter: simulated, simulated: {ttft_ms: 0, tokens_per_second: 1000000, output_tokens: 3}}
models:
  - {name: m, deployments: [{backend: sim, upstream_model: sim-1}]}
routes:
  - {name: chat, models: [m]}
"""


def _gauge(text: str, name: str) -> float:
    values = [float(line.split(" ")[1]) for line in text.splitlines() if line.startswith(name + " ")]
    assert len(values) == 1, f"{name} not exported once: {values}"
    return values[0]


def test_open_fds_and_tasks_are_exported(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    app = create_app(Settings(policy_path=str(policy), spool_dir=str(tmp_path / "spool")))
    with TestClient(app) as client:
        body = {"model": "chat", "messages": [{"role": "user", "content": "hello"}]}
        assert client.post("/v1/chat/completions", json=body).status_code == 200
        before = _gauge(client.get("/metrics").text, "strait_process_open_fds")
        # The same process (TestClient serves in it): the gauge must follow the descriptors it holds.
        held = [os.open(os.devnull, os.O_RDONLY) for _ in range(5)]
        try:
            text = client.get("/metrics").text
        finally:
            for fd in held:
                os.close(fd)
        assert _gauge(text, "strait_process_open_fds") == before + 5
        assert _gauge(text, "strait_event_loop_tasks") >= 1  # at least the scrape's own handler

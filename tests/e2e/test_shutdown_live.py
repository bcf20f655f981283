"""SIGTERM: `strait serve` finishes the streams in flight, then exits 0 (not 143, death by the signal)."""

from __future__ import annotations

import signal
from pathlib import Path

import httpx
import openai

from gateway.policy.index import key_digest
from tests.harness.gateway import gateway_process
from tests.harness.procs import ServerProcess

KEY = "sk-tenant-shutdown-0b7e"
TOKENS = 30


def _refuses_connections(base_url: str) -> bool:
    try:
        httpx.get(base_url + "/healthz", timeout=2)
    except httpx.ConnectError:
        return True
    except httpx.HTTPError:
        return False
    return False


def _policy(fake_url: str) -> str:
    return f"""
version: 1
backends:
  - {{name: fake, adapter: openai, base_url: "{fake_url}/v1", api_key: "env:SHUTDOWN_BACKEND_KEY"}}
models:
  - {{name: m, deployments: [{{backend: fake, upstream_model: fake-model}}]}}
routes:
  - {{name: chat, models: [m]}}
tenants:
  - name: t
    keys: [{{id: t-1, digest: "{key_digest(KEY)}"}}]
"""


def test_sigterm_drains_a_stream_then_exits_0(fake_upstream: ServerProcess, tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(_policy(fake_upstream.base_url))
    proc = gateway_process(policy, log_path=tmp_path / "gateway.log", env={"SHUTDOWN_BACKEND_KEY": "sk-x-0000"})
    with proc:
        client = openai.OpenAI(base_url=proc.base_url + "/v1", api_key=KEY, max_retries=0, timeout=30)
        # One token per event, 60 ms apart: the stream lasts about 1.8 s after its first event, far longer
        # than the signal takes to arrive, and well inside uvicorn's 10 s graceful-shutdown bound.
        fake = {"tokens": TOKENS, "chunk_tokens": 1, "chunk_delay_ms": 60, "marker": False}
        stream = client.chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "hi"}], stream=True, extra_body={"fake": fake}
        )
        words: list[str] = []
        closed_at: int | None = None  # how many words had arrived when new connections were first refused
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                words.append(chunk.choices[0].delta.content)
                if len(words) == 1:
                    proc.signal(signal.SIGTERM)  # the synchronisation: the first event has arrived
                elif closed_at is None and _refuses_connections(proc.base_url):
                    closed_at = len(words)
        assert proc.proc is not None
        returncode = proc.proc.wait(timeout=30)
        log = proc.read_log()
    # Shutdown was under way (the listener closed) while the stream was still in flight...
    assert closed_at is not None and closed_at < TOKENS
    # ...and the stream still ended normally ([DONE]: the SDK raised nothing), whole.
    assert len("".join(words).split()) == TOKENS
    assert returncode == 0, f"exit status {returncode}; log: {log}"


def test_sigterm_on_an_idle_gateway_exits_0(fake_upstream: ServerProcess, tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(_policy(fake_upstream.base_url))
    proc = gateway_process(policy, log_path=tmp_path / "gateway.log", env={"SHUTDOWN_BACKEND_KEY": "sk-x-0000"})
    with proc:
        proc.signal(signal.SIGTERM)
        assert proc.proc is not None
        assert proc.proc.wait(timeout=30) == 0, proc.read_log()

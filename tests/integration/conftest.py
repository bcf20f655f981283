"""Integration tests: real servers on loopback.

`llama_chat` is one llama.cpp chat server (alias `smollm2`, two slots, one thread) for the whole session:
every module that only asks it questions (live, messages, native messages, the SDK modules, through
Strait) shares it, each with its own gateway in front, instead of loading the model again per module.
Modules that need a server of their own shape (one slot, two replicas, one to kill) start their own."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.harness.llamacpp import llamacpp_server
from tests.harness.procs import ServerProcess


def pytest_configure(config: pytest.Config) -> None:
    # Registered here until pyproject.toml declares it; a duplicate registration is harmless.
    config.addinivalue_line("markers", "llamacpp: starts a real llama.cpp server (xllamacpp + SmolLM2-135M GGUF)")


@pytest.fixture(scope="session")
def llama_chat(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with llamacpp_server("smollm2", log_path=tmp_path_factory.mktemp("llama-chat") / "llama.log") as llama:
        yield llama

"""Integration tests: real servers on loopback."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    # Registered here until pyproject.toml declares it; a duplicate registration is harmless.
    config.addinivalue_line("markers", "llamacpp: starts a real llama.cpp server (xllamacpp + SmolLM2-135M GGUF)")

"""Suite-wide settings. In CI, hypothesis runs derandomized: the same examples every run, so a red
build is reproducible and never a coin toss; locally it keeps exploring new examples."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from hypothesis import settings

from tests.harness.redis_proc import RedisProc

settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture
def fresh_redis() -> Iterator[RedisProc]:
    """A redis-server of the test's own on a free loopback port, for chaos (kill, freeze, restart)."""
    server = RedisProc().start()
    try:
        yield server
    finally:
        server.cleanup()

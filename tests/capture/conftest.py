"""Capture stores for the contract suite: SQLite in the test's temp dir, and PostgreSQL on one real server
per session (a database of its own per test)."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psycopg
import pytest

from gateway.capture.store import CaptureStore, open_capture_store
from tests.harness.postgres_proc import PostgresProc


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresProc]:
    server = PostgresProc().start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def postgres_url(postgres_server: PostgresProc) -> str:
    name = "t_" + secrets.token_hex(6)
    with psycopg.connect(postgres_server.url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return f"postgresql://strait@127.0.0.1:{postgres_server.port}/{name}"


@pytest.fixture(params=["sqlite", "postgresql"])
async def capture_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[CaptureStore]:
    sqlite = f"sqlite:///{tmp_path}/capture.db"
    url = sqlite if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    store = await open_capture_store(url)
    try:
        yield store
    finally:
        await store.aclose()

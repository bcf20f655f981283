"""The app's front (gateway.api.front): the model paths skip Litestar's router, and their errors come out
exactly as when Litestar routes the same request (the trailing-slash spelling still goes through it)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import TestClient

from gateway.api.front import FrontedLitestar
from gateway.app import create_app
from gateway.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def client(tmp_path: Path) -> Iterator[TestClient[Any]]:
    app = create_app(Settings(policy_path=str(ROOT / "policies" / "demo.yaml"), spool_dir=str(tmp_path)))
    assert isinstance(app, FrontedLitestar)
    with TestClient(app) as c:
        yield c


def _same(a: Any, b: Any) -> None:
    assert a.status_code == b.status_code
    assert a.json()["error"]["type"] == b.json()["error"]["type"]
    assert a.json()["error"]["code"] == b.json()["error"]["code"]
    ignore = {"x-request-id", "content-length", "date"}
    assert {k for k in a.headers if k not in ignore} == {k for k in b.headers if k not in ignore}
    assert a.headers["x-request-id"] and b.headers["x-request-id"]


def test_a_wrong_method_is_refused_in_the_openai_envelope_on_both_paths(client: TestClient[Any]) -> None:
    front = client.get("/v1/chat/completions")
    routed = client.get("/v1/chat/completions/")
    assert front.status_code == 405
    _same(front, routed)


def test_a_bad_body_is_refused_the_same_on_both_paths(client: TestClient[Any]) -> None:
    for body in (b"{not json", b"[]", b'{"model": 3}'):
        front = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
        routed = client.post("/v1/chat/completions/", content=body, headers={"content-type": "application/json"})
        assert 400 <= front.status_code < 500, front.text
        _same(front, routed)


def test_an_unexpected_failure_is_a_500_without_internals(
    client: TestClient[Any], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def boom(*_: Any) -> None:
        raise RuntimeError("secret internals")

    app = client.app
    assert isinstance(app, FrontedLitestar)
    monkeypatch.setitem(app._endpoints, "/v1/chat/completions", boom)
    r = client.post("/v1/chat/completions", json={"model": "x", "messages": []})
    assert r.status_code == 500 and "secret" not in r.text
    assert r.json()["error"]["type"] == "server_error" and r.json()["error"]["code"] == "internal_error"
    assert any("failed" in rec.getMessage() for rec in caplog.records)

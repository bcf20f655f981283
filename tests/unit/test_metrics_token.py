"""GET /metrics can be protected with STRAIT_METRICS_TOKEN (open by default)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from litestar.testing import TestClient

from gateway.app import create_app
from gateway.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "metrics-Tok3n_s3cret"


def _client(tmp_path: Path, environ: dict[str, str]) -> TestClient[object]:
    settings = Settings.from_env(environ, policy_path=str(ROOT / "policies" / "demo.yaml"), spool_dir=str(tmp_path))
    return TestClient(create_app(settings))


@pytest.fixture()
def protected(tmp_path: Path) -> Iterator[TestClient[object]]:
    with _client(tmp_path, {"STRAIT_METRICS_TOKEN": TOKEN}) as client:
        yield client


def test_metrics_are_open_by_default(tmp_path: Path) -> None:
    for environ in ({}, {"STRAIT_METRICS_TOKEN": ""}):
        with _client(tmp_path, environ) as client:
            r = client.get("/metrics")
            assert r.status_code == 200 and "strait_requests_total" in r.text


def test_with_a_token_metrics_need_it(protected: TestClient[object]) -> None:
    for headers in (
        {},
        {"authorization": "Bearer wrong"},
        {"authorization": TOKEN},
        {"authorization": f"Basic {TOKEN}"},
    ):
        r = protected.get("/metrics", headers=headers)
        assert r.status_code == 401, headers
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and TOKEN not in r.text
        assert r.headers["www-authenticate"] == "Bearer"
    r = protected.get("/metrics", headers={"authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200 and "strait_requests_total" in r.text
    # Other operational endpoints stay as they were.
    assert protected.get("/healthz").status_code == 200


def test_a_token_that_no_client_could_send_is_refused_at_start() -> None:
    with pytest.raises(ValueError, match="STRAIT_METRICS_TOKEN"):
        Settings.from_env({"STRAIT_METRICS_TOKEN": "with space"})

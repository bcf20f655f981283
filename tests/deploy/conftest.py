"""A real gateway on the Compose stack's default policy, scraped once: the metric names rules and panels may use."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.deploy.stack import exported_names
from tests.harness.gateway import gateway_process
from tests.harness.procs import REPO_ROOT


@pytest.fixture(scope="session")
def exported_metrics(metrics_page: str) -> set[str]:
    return exported_names(metrics_page)


@pytest.fixture(scope="session")
def metrics_page(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder: Path = tmp_path_factory.mktemp("scrape")
    env = {"STRAIT_SPOOL_DIR": str(folder / "spool"), "STRAIT_STATE": "memory"}
    with gateway_process(REPO_ROOT / "policies" / "compose.yaml", log_path=folder / "gw.log", env=env) as gw:
        # One answered request, so the labelled families have samples too.
        r = httpx.post(
            gw.base_url + "/v1/chat/completions",
            headers={"authorization": "Bearer sk-strait-demo"},
            json={"model": "chat", "messages": [{"role": "user", "content": "hi"}], "stream": True},
            timeout=30,
        )
        assert r.status_code == 200, r.text
        yield httpx.get(gw.base_url + "/metrics", timeout=10).text

"""The `make run` demo shows spillover: under sustained concurrent load on `chat`, the simulated edge box (4 slots,
vLLM gauges read in process) fills up and the overflow is answered by the cloud, each such answer saying why in
`x-strait-spill`; once the load stops and the box drains, traffic flows back to the edge. A real `strait serve`
with demo.yaml itself (minus its cache section, so no embedding model loads)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.harness.gateway import gateway_process
from tests.harness.procs import ServerProcess

DEMO = Path(__file__).resolve().parents[2] / "policies" / "demo.yaml"
DEMO_KEY = "sk-strait-demo"
EDGE = "llama-3.1-8b-edge@edge-box"
CLOUD = "frontier-cloud@cloud-api"
BODY = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("demo")
    doc: dict[str, Any] = yaml.safe_load(DEMO.read_text())
    doc.pop("cache", None)
    for tenant in doc["tenants"]:
        tenant.pop("cache", None)
    policy = folder / "demo.yaml"
    policy.write_text(yaml.safe_dump(doc))
    with gateway_process(policy, log_path=folder / "gateway.log") as proc:
        yield proc


def test_demo_spills_to_the_cloud_under_load_and_flows_back(demo: ServerProcess) -> None:
    served: list[tuple[str, str | None]] = []
    failures: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def worker() -> None:
        with httpx.Client(base_url=demo.base_url, headers={"authorization": f"Bearer {DEMO_KEY}"}, timeout=30) as c:
            while not stop.is_set():
                r = c.post("/v1/chat/completions", json=BODY)
                with lock:
                    if r.status_code != 200:
                        failures.append(r.text)
                    else:
                        served.append((r.headers["x-strait-deployment"], r.headers.get("x-strait-spill")))

    # 8 clients for the box's 4 slots, until the cloud has answered a few (at most 30 s on a slow machine).
    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            with lock:
                if sum(d == CLOUD for d, _ in served) >= 5:
                    break
            time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not failures, failures[:3]
    spilled = [why for d, why in served if d == CLOUD]
    assert len(spilled) >= 5 and any(d == EDGE for d, _ in served)
    assert all(why is not None and why.startswith("edge-box: ") for why in spilled), spilled
    # Load gone: the box drains and traffic flows back to the edge, without a spill header.
    with httpx.Client(base_url=demo.base_url, headers={"authorization": f"Bearer {DEMO_KEY}"}, timeout=30) as c:
        deadline = time.monotonic() + 15
        while True:
            r = c.post("/v1/chat/completions", json=BODY)
            if r.headers["x-strait-deployment"] == EDGE:
                assert "x-strait-spill" not in r.headers
                break
            assert time.monotonic() < deadline, "traffic never flowed back to the edge"
            time.sleep(0.05)


def test_structured_output_and_a_tool_loop_work_on_the_demo(demo: ServerProcess) -> None:
    """What people try first on `make run`: parse() with a pydantic model, and a two-step tool loop."""
    import openai
    import pydantic

    class City(pydantic.BaseModel):
        name: str
        population: int = pydantic.Field(ge=1)

    client = openai.OpenAI(base_url=demo.base_url + "/v1", api_key=DEMO_KEY, max_retries=0, timeout=30)
    parsed = client.chat.completions.parse(model="chat", messages=BODY["messages"], response_format=City)
    assert isinstance(parsed.choices[0].message.parsed, City)
    tool: Any = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}
    messages: list[Any] = [{"role": "user", "content": "Look it up"}]
    first = client.chat.completions.create(model="chat", messages=messages, tools=[tool])
    call = (first.choices[0].message.tool_calls or [])[0]
    messages += [
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "42"},
    ]
    second = client.chat.completions.create(model="chat", messages=messages, tools=[tool])
    assert second.choices[0].finish_reason == "stop" and second.choices[0].message.content

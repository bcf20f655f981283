"""The fake upstream's `/v1/responses` (tests/harness/fake_responses.py) against the documented shapes in
tests/fixtures/openai/responses_*: the same keys and value types at every level (an output item or a
part compared with the fixture's of the same `type`), the same event order and framing, and the
`openai` SDK reads both answers."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.harness.procs import ServerProcess, free_port
from tests.harness.sse import parse_events

FIXTURES = Path(__file__).parent / "fixtures" / "openai"


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = tmp_path_factory.mktemp("fake") / "fake_upstream.log"
    argv = [sys.executable, "-m", "tests.harness.fake_upstream", "--port", str(port)]
    with ServerProcess(argv, port, ready_path="/healthz", log_path=log) as proc:
        yield proc.base_url


def same_shape(actual: Any, expected: Any, path: str = "$") -> None:
    """Same keys at every level, same value types. In a list, each element is compared with the expected
    element of its own `type` (output items, parts), else with the first."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict), f"{path}: expected object, got {type(actual).__name__}"
        assert set(actual) == set(expected), f"{path}: keys {sorted(actual)} != {sorted(expected)}"
        for k in expected:
            same_shape(actual[k], expected[k], f"{path}.{k}")
    elif isinstance(expected, list):
        assert isinstance(actual, list), f"{path}: expected array, got {type(actual).__name__}"
        by_type = {e.get("type"): e for e in expected if isinstance(e, dict)}
        for i, item in enumerate(actual):
            model = by_type.get(item.get("type")) if isinstance(item, dict) and by_type else None
            if model is None:
                assert expected, f"{path}: expected an empty array"
                model = expected[0]
            same_shape(item, model, f"{path}[{i}]")
    elif expected is None:
        assert actual is None, f"{path}: expected null, got {actual!r}"
    elif isinstance(expected, float):
        assert isinstance(actual, int | float), f"{path}: {type(actual).__name__} is not a number"
    else:
        assert type(actual) is type(expected), f"{path}: {type(actual).__name__} != {type(expected).__name__}"


def test_json_answer_has_the_documented_shape(fake: str) -> None:
    r = httpx.post(fake + "/v1/responses", json={"model": "m", "input": "Hello there"}, timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    answer = r.json()
    same_shape(answer, json.loads((FIXTURES / "responses_response.json").read_text()))
    assert [i["type"] for i in answer["output"]] == ["reasoning", "message"]
    assert answer["output"][0]["encrypted_content"].startswith("gAAAA")
    assert answer["output"][1]["content"][0]["text"] == "Echo: Hello there"


def test_stream_has_the_documented_events_in_order(fake: str) -> None:
    expected = parse_events((FIXTURES / "responses_stream.sse").read_bytes())
    r = httpx.post(fake + "/v1/responses", json={"model": "m", "input": "a b c", "stream": True}, timeout=10)
    assert r.headers["content-type"].startswith("text/event-stream")
    events = parse_events(r.content)

    # Text deltas repeat: compare the order with runs collapsed.
    def order(names: list[str]) -> list[str]:
        return [n for i, n in enumerate(names) if i == 0 or n != names[i - 1]]

    assert order([e.event or "" for e in events]) == order([e.event or "" for e in expected])

    def key(data: dict[str, Any]) -> tuple[str, str]:  # an item event by its item's type
        return data["type"], (data.get("item") or {}).get("type", "")

    model = {key(d): d for d in (json.loads(e.data) for e in expected)}
    for i, e in enumerate(events):
        data = json.loads(e.data)
        assert data["type"] == e.event and data["sequence_number"] == i
        same_shape(data, model[key(data)], e.event or "")


def test_encrypted_reasoning_is_verified_on_the_next_turn(fake: str) -> None:
    sdk = openai.OpenAI(base_url=fake + "/v1", api_key="sk-test", max_retries=0, timeout=10)
    first = sdk.responses.create(model="m", input="Hi")
    items: list[Any] = [{"role": "user", "content": "Hi"}, *[i.model_dump(exclude_none=True) for i in first.output]]
    second = sdk.responses.create(model="m", input=[*items, {"role": "user", "content": "More"}])
    assert second.output_text == "Echo: More"
    for blob in ("gAAAA" + "0" * 64, items[1]["encrypted_content"][:-1]):  # well formed, not minted
        forged = {**items[1], "encrypted_content": blob}
        with pytest.raises(openai.BadRequestError, match="could not be verified"):
            sdk.responses.create(model="m", input=[items[0], forged])
    with sdk.responses.stream(model="m", input="Streamed words") as stream:
        final = stream.get_final_response()
    assert final.output_text == "Echo: Streamed words" and final.usage is not None

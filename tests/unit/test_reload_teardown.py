"""A replaced runtime is freed in bounded steps on the event loop (gateway.teardown), and only once no
request started on it is running (gateway.reload, `Runtime.held`)."""

from __future__ import annotations

import asyncio
import time
import weakref
from pathlib import Path

import pytest
from litestar.testing import TestClient

from gateway import reload as reload_module
from gateway.app import create_app
from gateway.registry import discover_adapters
from gateway.settings import Settings
from gateway.teardown import dismantle
from tests.unit.test_reload_off_loop import PRICED


class Node:
    """A weak-referenceable object with children, like a policy's structs and the index's tables."""

    def __init__(self, children: list[object]) -> None:
        self.children = children


def _tree(leaves: list[weakref.ref[Node]]) -> dict[str, Node]:
    table: dict[str, Node] = {}
    for i in range(400):
        kids: list[object] = []
        for _ in range(40):
            leaf = Node([])
            leaves.append(weakref.ref(leaf))
            kids.append(leaf)
        table[f"t{i}"] = Node(kids)
    return table


def test_dismantle_frees_everything_in_steps_of_at_most_the_chunk() -> None:
    leaves: list[weakref.ref[Node]] = []
    box: list[object] = [{"tables": _tree(leaves), "more": [_tree(leaves) for _ in range(2)]}]
    freed_per_step: list[int] = []
    dead = 0

    def on_step(n: int) -> None:
        nonlocal dead
        now = sum(1 for ref in leaves if ref() is None)
        freed_per_step.append(now - dead)
        dead = now
        assert n <= 50

    total = asyncio.run(dismantle(box, chunk=50, on_step=on_step))
    assert box == []
    assert all(ref() is None for ref in leaves)
    assert total >= len(leaves)
    assert max(freed_per_step) <= 50
    assert len(freed_per_step) >= len(leaves) // 50


def test_dismantle_never_mutates_what_someone_else_still_holds() -> None:
    leaves: list[weakref.ref[Node]] = []
    shared = _tree(leaves)
    box: list[object] = [{"shared": shared, "own": _tree([])}]
    asyncio.run(dismantle(box, chunk=20))
    assert len(shared) == 400 and all(len(node.children) == 40 for node in shared.values())
    assert all(ref() is not None for ref in leaves)


async def _until(condition: object, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0)


def test_a_replaced_runtime_is_taken_apart_only_after_its_last_request_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(PRICED)
    # The retire task looks at the count on every loop turn, so turns without teardown mean something.
    monkeypatch.setattr(reload_module, "RETIRE_POLL_S", 0)
    steps: list[int] = []
    real = reload_module.dismantle

    async def counted(box: list[object]) -> int:
        return await real(box, chunk=5, on_step=steps.append)

    monkeypatch.setattr(reload_module, "dismantle", counted)
    app = create_app(Settings(policy_path=str(path), spool_dir=str(tmp_path / "spool")))
    with TestClient(app) as client:
        gateway = client.app.state["gateway"]
        reloader = reload_module.PolicyReloader(gateway, str(path), discover_adapters())

        async def held_then_released() -> None:
            # A request in flight on the runtime in force: what the edge (gateway.api.routes) counts.
            held = gateway.runtime.held
            old_index = weakref.ref(gateway.runtime.index)
            held.count += 1
            path.write_text(PRICED.replace("output_tokens: 2}", "output_tokens: 3}"))
            assert await reloader.reload()
            for _ in range(200):
                await asyncio.sleep(0)
            assert steps == [] and old_index() is not None
            held.count -= 1
            await _until(lambda: old_index() is None)
            assert steps and max(steps) <= 5 and len(steps) > 1

        async def nobody_holds_it() -> None:
            steps.clear()
            old_index = weakref.ref(gateway.runtime.index)
            path.write_text(PRICED)
            assert await reloader.reload()
            # Taken apart within the reload itself.
            assert old_index() is None and steps and max(steps) <= 5

        client.blocking_portal.call(held_then_released)
        client.blocking_portal.call(nobody_holds_it)
        r = client.post("/v1/chat/completions", json={"model": "chat", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200


def test_the_edge_holds_the_runtime_to_the_last_byte(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`Runtime.held` counts a model request from its arrival until its answer is sent, also on errors."""
    from gateway.api import routes

    path = tmp_path / "policy.yaml"
    path.write_text(PRICED)
    seen: list[int] = []
    real_send = routes.send_reply
    app = create_app(Settings(policy_path=str(path), spool_dir=str(tmp_path / "spool")))
    with TestClient(app) as client:
        gateway = client.app.state["gateway"]

        async def spying(*args: object, **kwargs: object) -> None:
            seen.append(gateway.runtime.held.count)
            await real_send(*args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(routes, "send_reply", spying)
        body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200 and seen == [1]
        assert gateway.runtime.held.count == 0
        r = client.post("/v1/chat/completions", json={**body, "model": "nope"})
        assert r.status_code == 404 and gateway.runtime.held.count == 0

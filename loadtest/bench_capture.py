"""What capture costs per request: `python -m loadtest.bench_capture [--requests 5000] [--rounds 5]`.

Two parts, each the least over the rounds (the machine is shared: other processes only add):
  on the request path  the capture tap's `on_start`, one `on_event` per chunk (12 for a stream) and
                       `on_end` (the record's fields, the queue append): µs per request, JSON and stream;
  off the request path the writer's worker-thread work (redaction with every built-in kind, the stream's
                       assembly, regenerate detection, the record's JSON) and the SQLite transaction (WAL,
                       256 records per batch): CPU µs per request, JSON and stream.
The request is a short chat turn with an email in it (the redactor has work to do). `loadtest.bench_app
--capture` measures the same end to end (the whole app's CPU per request, capture on vs off).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import msgspec

from gateway.canonical import Message, Request, Text
from gateway.capture.writer import CaptureWriter, PendingCapture
from gateway.context import RequestContext
from gateway.contracts import End
from gateway.policy.index import PolicyIndex, Principal
from gateway.policy.load import load_policy
from gateway.stages.capture import CaptureTap
from gateway.telemetry import Metrics

POLICY = """version: 1
backends: [{name: b, adapter: simulated}]
models:
  - {name: m, licence: {name: apache-2.0, outputs_train: true}, deployments: [{backend: b, upstream_model: m}]}
routes: [{name: chat, models: [m]}]
tenants:
  - name: t
    capture: {enabled: true, sample_rate: 1.0}
"""
PROMPT = "Write one short sentence about rivers, and send it to jane.doe@example.com please."
ANSWER = "Rivers carve valleys over thousands of years as water flows downhill toward the sea."
BODY = msgspec.json.encode(
    {"choices": [{"index": 0, "message": {"role": "assistant", "content": ANSWER}, "finish_reason": "stop"}]}
)
WORDS = ANSWER.split(" ")
CHUNKS = [
    msgspec.json.encode({"choices": [{"index": 0, "delta": {"content": " ".join(WORDS[i : i + 2]) + " "}}]})
    for i in range(0, 20, 2)
] + [msgspec.json.encode({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}), b"[DONE]"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", "-n", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    n: int = args.requests
    with tempfile.TemporaryDirectory(prefix="strait-bench-capture-") as tmp:
        path = Path(tmp) / "policy.yaml"
        path.write_text(POLICY)
        index = PolicyIndex(load_policy(path))
        target = index.targets[("chat", "chat")][0]
        request = Request(
            operation="chat", model="chat", messages=(Message(role="user", content=(Text(text=PROMPT),)),)
        )
        principal = Principal(tenant="t", key_id="k", allowed_routes=None)

        async def run() -> None:
            writer = CaptureWriter(f"sqlite:///{tmp}/capture.db", Metrics(), max_queued=10 * n)
            tap = CaptureTap(index, writer)

            def ctx(i: int) -> RequestContext:
                c = RequestContext(
                    request_id=f"req_{i}", operation="chat", started=time.perf_counter(), headers={}, request=request
                )
                c.principal, c.target, c.route_name, c.answer_body = principal, target, "chat", BODY
                c.usage_in, c.usage_out = 20, 17
                return c

            def on_path(stream: bool) -> float:
                contexts = [ctx(i) for i in range(n)]
                end = End("completed", 200, stream=stream)
                t0 = time.perf_counter()
                for c in contexts:
                    if stream:
                        tap.on_start(c)
                        for chunk in CHUNKS:
                            tap.on_event(c, chunk)
                    tap.on_end(c, end)
                return (time.perf_counter() - t0) / n * 1e6

            async def off_path(stream: bool) -> float:
                writer._queue.clear()
                on_path(stream)
                batch: list[PendingCapture] = list(writer._queue)
                writer._queue.clear()
                store = await writer.store()
                t0 = time.process_time()
                for i in range(0, len(batch), writer.batch):
                    records, feedback = writer._prepare(batch[i : i + writer.batch])
                    await store.write(
                        [msgspec.structs.replace(r, request_id=f"{r.request_id}-{t0}") for r in records], feedback
                    )
                return (time.process_time() - t0) / n * 1e6

            for stream in (False, True):
                kind = "stream (12 chunks)" if stream else "JSON"
                path_us = min(on_path(stream) for _ in range(args.rounds))
                writer._queue.clear()
                offs = [await off_path(stream) for _ in range(args.rounds)]
                print(
                    f"{kind:>19}: on the request path {path_us:6.1f} us, off it (thread + SQLite) {min(offs):6.1f} us"
                )
            await writer.aclose()

        asyncio.run(run())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

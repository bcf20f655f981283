"""A small client for the fake upstream's control endpoints, for resilience tests and load runs.

    fake = FakeControl(proc.base_url)
    fake.reset()
    fake.set_health(ok=False)                       # /health 503, inference 503
    rec = fake.wait_record(lambda r: r["client_disconnected"], test_id=tid)
    fake.metrics()["vllm:num_requests_waiting"]

Waiting is polling with a deadline on a condition (never a fixed sleep).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from tests.harness.procs import PYTHON, ServerProcess, free_port

Record = dict[str, Any]


def parse_prometheus(text: str) -> dict[str, float]:
    """{metric name: value} of a Prometheus text page (labels dropped; the last sample of a name wins)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name_labels, value = line.rsplit(" ", 1)
            out[name_labels.split("{")[0]] = float(value)
    return out


class FakeControl:
    def __init__(self, base_url: str, *, timeout: float = 5.0) -> None:
        self.client = httpx.Client(base_url=base_url, timeout=timeout)

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> FakeControl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def reset(self, *, counter: bool = False) -> None:
        self.client.post("/_reset", params={"counter": "1"} if counter else None).raise_for_status()

    def ledger(self, since: int | None = None) -> list[Record]:
        r = self.client.get("/_ledger", params={"since": since} if since is not None else None)
        r.raise_for_status()
        records: list[Record] = r.json()
        return records

    def records(self, *, test_id: str | None = None, model: str | None = None) -> list[Record]:
        """Records carrying header x-test-id == test_id and/or the given model."""
        return [
            r
            for r in self.ledger()
            if (test_id is None or r["headers"].get("x-test-id") == test_id) and (model is None or r["model"] == model)
        ]

    def wait_records(
        self,
        pred: Callable[[list[Record]], bool],
        *,
        test_id: str | None = None,
        model: str | None = None,
        timeout: float = 5.0,
    ) -> list[Record]:
        """Poll until pred(matching records) holds; AssertionError with the last view at the deadline."""
        deadline = time.monotonic() + timeout
        while True:
            recs = self.records(test_id=test_id, model=model)
            if pred(recs):
                return recs
            if time.monotonic() >= deadline:
                raise AssertionError(f"fake ledger never satisfied the condition: {recs}")

    def by_user(self, user: str) -> list[Record]:
        """The records of the requests whose body's `user` is `user` (a test's marker), in order."""
        return [r for r in self.ledger() if isinstance(r["body"], dict) and r["body"].get("user") == user]

    def wait_by_user(self, user: str, pred: Callable[[list[Record]], bool], timeout: float = 10.0) -> list[Record]:
        """`by_user(user)` once pred holds, or as it is at the deadline (the caller's assertions say why)."""
        deadline = time.monotonic() + timeout
        while True:
            records = self.by_user(user)
            if pred(records) or time.monotonic() >= deadline:
                return records
            time.sleep(0.05)  # polling the fake's ledger for an observable condition, with a deadline

    def wait_record(self, pred: Callable[[Record], bool], *, test_id: str, timeout: float = 5.0) -> Record:
        """The single record of `test_id`, once pred holds for it."""
        recs = self.wait_records(lambda rs: len(rs) == 1 and pred(rs[0]), test_id=test_id, timeout=timeout)
        return recs[0]

    def set_health(self, *, ok: bool | None = None, serve: bool | None = None) -> dict[str, Any]:
        spec = {k: v for k, v in (("ok", ok), ("serve", serve)) if v is not None}
        r = self.client.post("/_health", json=spec)
        r.raise_for_status()
        state: dict[str, Any] = r.json()
        return state

    def health_state(self) -> dict[str, Any]:
        state: dict[str, Any] = self.client.get("/_health").json()
        return state

    def set_metrics(self, **spec: Any) -> dict[str, Any]:
        """Pin gauges (running, waiting, kv_cache_usage; None un-pins), slots, status, kv_names, reset."""
        r = self.client.post("/_metrics", json=spec)
        r.raise_for_status()
        view: dict[str, Any] = r.json()
        return view

    def metrics_state(self) -> dict[str, Any]:
        view: dict[str, Any] = self.client.get("/_metrics").json()
        return view

    def metrics(self) -> dict[str, float]:
        r = self.client.get("/metrics")
        r.raise_for_status()
        return parse_prometheus(r.text)

    def wait_inflight(self, pred: Callable[[int], bool], timeout: float = 5.0) -> int:
        deadline = time.monotonic() + timeout
        while True:
            n = int(self.metrics_state()["inflight"])
            if pred(n):
                return n
            if time.monotonic() >= deadline:
                raise AssertionError(f"in-flight count stuck at {n}")


@contextlib.contextmanager
def fake_upstream(folder: Path, *args: str, timeout: float = 30) -> Iterator[tuple[ServerProcess, FakeControl]]:
    """The fake upstream (tests/harness/fake_upstream.py) as a process on a free loopback port, its log in
    `folder`, with its control client; stopped by its PID on exit. `args`: more command-line options."""
    port = free_port()
    argv = [PYTHON, "-m", "tests.harness.fake_upstream", "--port", str(port), *args]
    fake = ServerProcess(argv, port, ready_path="/healthz", log_path=folder / "fake.log")
    with fake as proc, FakeControl(proc.base_url, timeout=timeout) as control:
        yield proc, control

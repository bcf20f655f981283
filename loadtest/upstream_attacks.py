"""What a hostile or broken upstream costs the gateway: peak RSS growth and CPU of one `strait serve` process.

Attacks (each on a fresh gateway, so the process's peak RSS, VmHWM, is the attack's):
  streams  6 concurrent streams of 150,000 events each
  body     one non-streaming answer of 64 MiB
  line     one stream whose first event is a single 48 MiB SSE line

    .venv/bin/python -m loadtest.upstream_attacks                      # this tree
    .venv/bin/python -m loadtest.upstream_attacks --tree /path/to/old  # another checkout (same venv)

The fake upstream always comes from this tree (tests/harness/fake_upstream.py, directive pad_bytes).
Loopback only; no Redis (state memory).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx

from gateway.policy.index import key_digest
from tests.harness.procs import PYTHON, ServerProcess, free_port

KEY = "sk-attack-0001"
POLICY = """
version: 1
backends:
  - {{name: fake, adapter: openai, base_url: "{fake}/v1", tier: self-hosted, timeouts: {{read_s: 120}}}}
models:
  - name: fake-model
    tokenizer: cl100k_base
    deployments: [{{backend: fake, upstream_model: fake-model}}]
routes:
  - {{name: chat, models: [fake-model]}}
tenants:
  - name: t
    keys: [{{id: k1, digest: "{digest}"}}]
"""


def _status(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            out[name] = int(value.split()[0]) // 1024  # MiB
    return out


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _stream(client: httpx.AsyncClient, url: str, fake: dict[str, object]) -> tuple[int, bool]:
    body = {"model": "chat", "messages": [{"role": "user", "content": "x"}], "stream": True, "fake": fake}
    size = 0
    tail = b""
    async with client.stream("POST", url, json=body) as r:
        async for chunk in r.aiter_raw():
            size += len(chunk)
            tail = (tail + chunk)[-64:]
    return size, b"[DONE]" in tail


async def attack(name: str, url: str) -> str:
    limits = httpx.Limits(max_connections=16)
    headers = {"authorization": f"Bearer {KEY}"}
    async with httpx.AsyncClient(timeout=600, limits=limits, headers=headers) as client:
        if name == "streams":
            fake = {"tokens": 150_000, "chunk_tokens": 1, "marker": False}
            results = await asyncio.gather(*(_stream(client, url, fake) for _ in range(6)))
            return f"6 streams: {sum(s for s, _ in results) / 2**20:.0f} MiB relayed, all [DONE]: {all(d for _, d in results)}"
        if name == "body":
            body = {"model": "chat", "messages": [{"role": "user", "content": "x"}], "fake": {"pad_bytes": 64 << 20}}
            r = await client.post(url, json=body)
            return f"status {r.status_code}, {len(r.content) / 2**20:.1f} MiB to the client"
        size, done = await _stream(client, url, {"pad_bytes": 48 << 20})
        return f"{size / 2**20:.1f} MiB to the client, [DONE]: {done}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", type=Path, default=Path(__file__).resolve().parent.parent)
    parser.add_argument("--attack", choices=["streams", "body", "line", "all"], default="all")
    args = parser.parse_args(argv)
    tree: Path = args.tree.resolve()
    names = ["streams", "body", "line"] if args.attack == "all" else [args.attack]
    folder = Path(tempfile.mkdtemp(prefix="strait-attacks-"))
    fake_port = free_port()
    fake_argv = [PYTHON, "-m", "tests.harness.fake_upstream", "--port", str(fake_port)]
    with ServerProcess(fake_argv, fake_port, ready_path="/healthz", log_path=folder / "fake.log") as fake:
        policy = folder / "policy.yaml"
        policy.write_text(POLICY.format(fake=fake.base_url, digest=key_digest(KEY)))
        print(f"gateway tree: {tree}")
        print("| attack | baseline RSS (MiB) | peak RSS (MiB) | growth (MiB) | gateway CPU (s) | wall (s) | outcome |")
        print("|---|---:|---:|---:|---:|---:|---|")
        for name in names:
            port = free_port()
            argv = [
                PYTHON,
                "-m",
                "gateway",
                "serve",
                "--policy",
                str(policy),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ]
            env = {"PYTHONPATH": str(tree), "STRAIT_SPOOL_DIR": str(folder / f"spool-{name}")}
            gw = ServerProcess(argv, port, env=env, cwd=tree, ready_path="/readyz", log_path=folder / f"gw-{name}.log")
            with gw:
                assert gw.proc is not None
                pid = gw.proc.pid
                # Warm up (tiktoken's encoding, pools, first-request allocations) before the baseline.
                warm = {"model": "chat", "messages": [{"role": "user", "content": "x"}]}
                for stream in (False, True):
                    r = httpx.post(
                        gw.base_url + "/v1/chat/completions",
                        json={**warm, "stream": stream},
                        headers={"authorization": f"Bearer {KEY}"},
                    )
                    assert r.status_code == 200, r.text
                before, cpu0, t0 = _status(pid), _cpu_s(pid), time.perf_counter()
                outcome = asyncio.run(attack(name, gw.base_url + "/v1/chat/completions"))
                wall, cpu, after = time.perf_counter() - t0, _cpu_s(pid) - cpu0, _status(pid)
                growth = after["VmHWM"] - before["VmRSS"]
                print(
                    f"| {name} | {before['VmRSS']} | {after['VmHWM']} | {growth:+d} | {cpu:.2f} | {wall:.1f} | {outcome} |"
                )
                sys.stdout.flush()


if __name__ == "__main__":
    main()

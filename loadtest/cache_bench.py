"""Cache lookup latency, side by side in one run: what the exact and the semantic tier add to a request.

    python -m loadtest.cache_bench [--requests N] [--loop-requests M] [--rounds R] [--state memory,redis]
                                   [--quiet-wait S] [--json-out FILE]

Starts the fast fake upstream (`nice -n 10`), a throwaway `redis-server` for the redis case (a free port,
never 6379) and one gateway process per state (`strait serve`, 1 worker, normal priority), all on free
127.0.0.1 ports and stopped by PID in a `finally`. Each gateway runs one policy: the tenant `bench` opts
into both tiers (exact + semantic, the packaged local embedder at its default threshold) on the route
`cached`; the route `plain` forbids the cache (`cache: {allowed: false}`). Both routes go to the fast
upstream through the `openai` adapter. Every request is `temperature: 0` (the cache stage's default bound).

Sequential requests (concurrency 1, one keep-alive connection), latency from send to the last byte:

  (a) cache off: the `plain` route, the baseline;
  (b) exact hit: a question cached during the warm-up, asked again word for word;
  (c) semantic hit: a paraphrase of a cached question (an exact miss, an embedding, the nearest neighbour
      above the threshold and past the veto, one more store read);
  (d) semantic miss: a question never asked before (an exact miss, an embedding, a search with nothing
      above the threshold, then the upstream call; the answer is stored in the background).

The gateways run side by side and everything alternates: each of R rounds runs a block of every kind on
each gateway in turn, so that outside load hits all of them alike. For each kind: p50/p99 and the
added latency against (a) at the same percentile, and the gateway's own account of the lookup (mean of
`strait_cache_lookup_seconds`, both tiers, per request, diffed from /metrics around each block). A request
whose `x-strait-cache` header is not the expected one is counted and left out of the percentiles.

  (e) event loop: p50/p99 of sequential `plain` requests, in five conditions alternating in R rounds:
      alone; while a second connection sends a closed-loop stream of `plain` requests (control: what any
      concurrent request costs); while a child process spins on one core (control: what losing a core
      costs on a small machine, as an embedding's thread takes one); while the second connection sends
      a closed-loop stream of semantic misses (short questions, as in (d)); and of semantic misses with
      long questions (about 180 tokens: an embedding ~15x as long). If an embedding stood the event loop
      still, a plain request would wait out the one in flight: with the long questions, about half a
      long miss at the median. The table prints that estimate and whether the p50 rose by half of it.

Warm-up: each cached question is asked once (a miss, stored in the background), then asked again until
it comes back `x-strait-cache: hit` (bounded by a deadline), and each paraphrase must come back
`semantic-hit` once before anything is measured. The paraphrase pairs and the miss questions were checked
with gateway/cache/embedders + gateway/cache/match: every pair scores 0.945-0.996 at the default threshold
0.92 with no veto, and no two of the miss questions reach the threshold.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import re
import secrets
import signal
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from gateway.policy.index import key_digest
from loadtest.loadgen import Summary
from loadtest.overhead import (
    HOST,
    PY,
    Child,
    RedisServer,
    _gateway_env,
    free_port,
    git_revision,
    redis_server,
    upstream,
    wait_quiet,
    wait_ready,
)
from loadtest.procstat import CLK_TCK, machine_busy, tree_cpu_seconds, tree_rss_mb

STATES = ("memory", "redis")
KINDS = ("off", "exact", "semantic_hit", "semantic_miss")
LOOP_CONDITIONS = ("alone", "with_plain", "with_busy_core", "with_misses", "with_long_misses")
BACKGROUND = ("with_plain", "with_misses", "with_long_misses")  # conditions with a concurrent request stream
# What `x-strait-cache` must say for each kind (the `plain` route's plan is None: no header at all).
EXPECTED: dict[str, str | None] = {"off": None, "exact": "hit", "semantic_hit": "semantic-hit", "semantic_miss": "miss"}
LABELS = {
    "off": "(a) cache off (baseline)",
    "exact": "(b) exact hit",
    "semantic_hit": "(c) semantic hit",
    "semantic_miss": "(d) semantic miss",
    "alone": "plain requests alone",
    "with_plain": "+ a concurrent stream of plain requests (control: concurrent requests)",
    "with_busy_core": "+ a process spinning on one core (control: a core taken, as an embedding does)",
    "with_misses": "+ a concurrent stream of semantic misses",
    "with_long_misses": "+ a concurrent stream of semantic misses with long questions (embedding ~15x longer)",
}
MAX_TOKENS = 64
KEEPALIVE_S = 2.0

POLICY = """version: 1
cache:
  embedders:
    - {{name: minilm, kind: local}}
backends:
  - {{name: fake, adapter: openai, base_url: "http://{host}:{port}/v1", tier: self-hosted, max_connections: 64}}
models:
  - {{name: m, capabilities: [chat], deployments: [{{backend: fake, upstream_model: m}}]}}
routes:
  - {{name: cached, models: [m]}}
  - {{name: plain, models: [m], cache: {{allowed: false}}}}
tenants:
  - name: bench
    keys: [{{id: k1, digest: "{digest}"}}]
    cache: {{exact: true, semantic: true, embedder: minilm}}
"""

# (cached question, paraphrase): each paraphrase scores above the default threshold (0.92) against its own
# question, its best neighbour among the cached ones is that question, and the veto does not object.
PAIRS: tuple[tuple[str, str], ...] = (
    ("How do I reset my password?", "How can I reset my password?"),
    ("What is the capital of France?", "What's the capital of France?"),
    ("How do I cancel my subscription?", "How can I cancel my subscription?"),
    ("How do I change my email address?", "How can I change my email address?"),
    ("Where can I download my invoice?", "Where do I download my invoice?"),
    ("How do I delete my account?", "How can I delete my account?"),
    ("What payment methods do you accept?", "Which payment methods do you accept?"),
    ("How do I update my billing address?", "How can I update my billing address?"),
    ("How long does shipping take?", "How long does shipping usually take?"),
    ("How do I upgrade my plan?", "How can I upgrade my plan?"),
    ("How do I enable two-factor authentication?", "How can I turn on two-factor authentication?"),
    ("What is your refund policy?", "What's your refund policy?"),
    ("How do I contact customer support?", "How can I contact customer support?"),
    ("How do I export my data?", "How can I export my data?"),
    ("Why was my card declined?", "Why did my card get declined?"),
    ("How do I add a new user to my team?", "How can I add a new user to my team?"),
    ("How do I track my order?", "How can I track my order?"),
    ("What is the boiling point of water?", "What's the boiling point of water?"),
    ("Explain how photosynthesis works.", "Explain how photosynthesis works, please."),
    ("Summarise the plot of Hamlet.", "Summarize the plot of Hamlet."),
)

# New questions for the misses: every (frame, topic) pair once. None of them is a paraphrase of a cached
# question, and no two reach the threshold against each other (checked with the packaged embedder).
_TOPICS = (
    "beekeeping; the Roman Empire; quantum computing; sourdough baking; jazz piano; marathon training; "
    "volcanoes; the French Revolution; machine learning; origami; chess openings; coral reefs; black holes; "
    "medieval castles; the stock market; watercolour painting; Antarctic exploration; the immune system; "
    "vegetable gardening; Greek mythology; cryptography; knitting; plate tectonics; the Renaissance; rock "
    "climbing; photosynthesis in algae; the Silk Road; electric cars; bird migration; Shakespeare's sonnets; "
    "wine making; the printing press; deep sea fish; solar panels; the Cold War; ballet; ancient Egypt; "
    "compilers; coffee roasting; the Apollo missions; honeybee colonies; Byzantine art; tidal energy; the "
    "Ottoman Empire; sign language; bonsai trees; game theory; Viking ships; kombucha; the Great Barrier Reef; "
    "typography; Norse sagas; glaciers; urban planning; the Beatles; Mayan astronomy; fermentation; "
    "hurricanes; the Industrial Revolution; calligraphy; submarines; the human microbiome; Baroque music; "
    "wolves in Yellowstone; 3D printing; the Dead Sea Scrolls; desert ecosystems; supply chains; "
    "Impressionism; the Hubble telescope; mushroom foraging; relational databases; the Mongol Empire; "
    "woodworking; Arctic foxes; jet engines; the Olympic Games; poetry slams; rainforest frogs; public "
    "speaking; the Inca road system; microprocessors; salsa dancing; tea ceremonies; the Amazon river; "
    "stained glass; bicycle repair; the Aztec calendar; nuclear fusion; haiku; sailing knots; the "
    "Enlightenment; penguins; blockchain; Gothic cathedrals; cheese making; the Hanseatic League; "
    "skateboarding; origins of writing"
)
TOPICS: tuple[str, ...] = tuple(t.strip() for t in _TOPICS.split(";"))
FRAMES: tuple[str, ...] = (
    "What is the history of {}?",
    "How do I get started with {}?",
    "What are common mistakes beginners make with {}?",
    "Which books explain {} well?",
    "Why do people find {} fascinating?",
    "What are the key ideas behind {}?",
    "Give me a fun fact about {}.",
    "How has {} changed in recent decades?",
    "What vocabulary should I know about {}?",
    "Who are the most famous experts on {}?",
)


def miss_questions() -> list[str]:
    """Every new question, topic-major so that consecutive misses differ in topic and in frame."""
    return [frame.format(topic) for topic in TOPICS for frame in FRAMES]


def long_question(i: int, pool: list[str]) -> str:
    """The i-th long question (16 of the new questions, about 180 tokens): an embedding several times as long
    as a short question's, so that a blocked event loop could not hide in the noise. Neighbours share most
    of their words and reach the threshold, but each carries its own case number, so the veto refuses them:
    every one is a miss (exact miss, embedding, search, veto)."""
    return f"Case {100_000 + i}: " + " ".join(pool[(i * 7 + j * 13) % len(pool)] for j in range(16))


class OutOfQuestions(RuntimeError):
    pass


class Questions:
    """The unasked questions of one gateway: each is handed out once (a second ask would be an exact hit)."""

    def __init__(self, questions: list[str]) -> None:
        self.pool = questions
        self._left = list(reversed(questions))
        self.used = 0
        self.long_used = 0  # long questions handed out (numbered: never exhausted)

    def next(self) -> str:
        if not self._left:
            raise OutOfQuestions(f"all {self.used} new questions are used: lower --requests or --loop-requests")
        self.used += 1
        return self._left.pop()


@dataclass
class Plan:
    requests: int = 400  # measured sequential requests per kind (a)-(d) and state
    loop_requests: int = 400  # measured sequential plain requests per condition of (e) and state
    rounds: int = 4  # the kinds (and the conditions) alternate this many times
    states: tuple[str, ...] = STATES
    quiet_wait: float = 2.0  # max seconds to wait for an idle machine before each state's measurement
    warm_deadline_s: float = 60.0  # bound on the warm-up (stored entries, loaded model)
    timeout_s: float = 30.0  # per request
    nice_client: bool = False  # lower this process's priority once the children run (as overhead's loadgen)


@dataclass
class Samples:
    """One kind or condition: latencies (s) of requests that came back as expected, and what did not."""

    latencies: list[float] = field(default_factory=list)
    unexpected: dict[str, int] = field(default_factory=dict)  # x-strait-cache value -> count
    errors: dict[str, int] = field(default_factory=dict)
    lookup_s: float = 0.0  # the gateway's strait_cache_lookup_seconds (both tiers) over the kind's blocks
    lookups_requests: int = 0  # requests in those blocks (lookup_s / this = mean per request)


@dataclass
class StateResult:
    state: str
    kinds: dict[str, dict[str, Any]] = field(default_factory=dict)  # kind -> summary
    loop: dict[str, dict[str, Any]] = field(default_factory=dict)  # condition -> summary
    background: dict[str, dict[str, Any]] = field(default_factory=dict)  # condition -> the concurrent stream
    rss_idle_mb: float = 0.0
    rss_end_mb: float = 0.0
    noise_cores: float = 0.0  # CPU of processes outside this run, over the measurement
    questions_used: int = 0
    error: str | None = None


def _summary(s: Samples) -> dict[str, Any]:
    out: dict[str, Any] = asdict(Summary.of(s.latencies))
    out.update(count=len(s.latencies), unexpected=dict(s.unexpected), errors=dict(s.errors))
    if s.lookups_requests:
        out["lookup_mean_ms"] = 1000 * s.lookup_s / s.lookups_requests
    return out


# ---- the gateway under test ----


@dataclass
class CacheGateway:
    child: Child
    port: int
    key: str
    redis_pid: int | None  # the redis-server it keeps its state and cache in (state=redis)
    rss_idle_mb: float

    @property
    def base(self) -> str:
        return f"http://{HOST}:{self.port}"


@contextlib.contextmanager
def cache_gateway(workdir: Path, state: str, upstream_port: int, redis: Redis | None = None) -> Iterator[CacheGateway]:
    """One `strait serve` process with the bench policy; cache in process (memory) or in `redis`."""
    key = "sk-cache-bench-" + secrets.token_hex(16)
    policy = workdir / f"policy-cache-{state}.yaml"
    policy.write_text(POLICY.format(host=HOST, port=upstream_port, digest=key_digest(key)))
    if state == "memory":
        state_url = "memory"
    elif state == "redis" and redis is not None:
        state_url = redis.url
    else:
        raise ValueError(f"state {state!r}: memory, or redis with a Redis server")
    spool = workdir / f"spool-cache-{state}"
    spool.mkdir(exist_ok=True)
    env = _gateway_env("uvicorn", policy, state_url, spool)
    env["STRAIT_CACHE"] = state_url  # the cache's store: the same as the state's (explicit)
    env["STRAIT_ACCESS_LOG"] = "off"
    port = free_port()
    argv = [PY, "-m", "gateway", "serve", "--policy", str(policy), "--host", HOST, "--port", str(port)]
    child = Child(f"gateway[cache,{state}]", argv, env, workdir / f"gateway-cache-{state}.log")
    try:
        wait_ready(child, f"http://{HOST}:{port}/readyz")
        pid = redis.pid if state == "redis" and redis is not None else None
        yield CacheGateway(child, port, key, pid, tree_rss_mb(child.pid))
    finally:
        child.stop()


class Burner:
    """A child spinning on one core at the gateway's priority, paused (SIGSTOP) except while resumed: the
    control for "an embedding takes a core" on a small machine. Started before the client lowers its own
    priority (a child inherits it); stopped by its PID."""

    def __init__(self, workdir: Path) -> None:
        self.child = Child("burner", [PY, "-c", "while True: pass"], dict(os.environ), workdir / "burner.log")
        self.pause()

    def resume(self) -> None:
        os.kill(self.child.pid, signal.SIGCONT)

    def pause(self) -> None:
        os.kill(self.child.pid, signal.SIGSTOP)

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.child.pid, signal.SIGCONT)  # a stopped process would hold SIGTERM pending
        self.child.stop()


@contextlib.contextmanager
def burner(workdir: Path) -> Iterator[Burner]:
    b = Burner(workdir)
    try:
        yield b
    finally:
        b.stop()


_LOOKUP = re.compile(r'^strait_cache_lookup_seconds_sum\{tier="(exact|semantic)"\}\s+(\S+)', re.MULTILINE)


def lookup_seconds(gw: CacheGateway) -> float:
    """The gateway's total time spent in cache lookups so far (both tiers), from /metrics."""
    with urllib.request.urlopen(f"{gw.base}/metrics", timeout=10) as resp:  # loopback URL built here
        text = resp.read().decode()
    return sum(float(v) for _, v in _LOOKUP.findall(text))


# ---- the client ----


class Client:
    """Sequential chat requests on one keep-alive connection; times each to the last byte."""

    def __init__(self, session: aiohttp.ClientSession, gw: CacheGateway) -> None:
        self.session = session
        self.url = f"{gw.base}/v1/chat/completions"
        self.headers = {"authorization": f"Bearer {gw.key}", "content-type": "application/json"}

    async def ask(self, route: str, question: str) -> tuple[float, str | None, str | None]:
        """(seconds, x-strait-cache or None, error kind or None)."""
        body = json.dumps(
            {
                "model": route,
                "temperature": 0,
                "max_tokens": MAX_TOKENS,
                "messages": [{"role": "user", "content": question}],
            },
            separators=(",", ":"),
        ).encode()
        started = time.perf_counter()
        try:
            async with self.session.post(self.url, data=body, headers=self.headers) as resp:
                data = await resp.read()
                status, cache = resp.status, resp.headers.get("x-strait-cache")
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            return time.perf_counter() - started, None, type(exc).__name__
        elapsed = time.perf_counter() - started
        if status != 200:
            return elapsed, cache, f"http_{status}"
        if b'"choices"' not in data:
            return elapsed, cache, "bad_body"
        return elapsed, cache, None


def _record(samples: Samples, expected: str | None, result: tuple[float, str | None, str | None]) -> None:
    elapsed, cache, error = result
    if error is not None:
        samples.errors[error] = samples.errors.get(error, 0) + 1
    elif cache != expected:
        name = cache or "none"
        samples.unexpected[name] = samples.unexpected.get(name, 0) + 1
    else:
        samples.latencies.append(elapsed)


async def warm_up(client: Client, questions: Questions, deadline_s: float) -> None:
    """Store every cached question and check every paraphrase is a semantic hit, before measuring."""
    deadline = time.monotonic() + deadline_s
    for _ in range(3):  # the upstream connection pool, the plain route, the model load (first embedding)
        await client.ask("plain", PAIRS[0][0])
        await client.ask("cached", questions.next())
    for question, _ in PAIRS:
        await client.ask("cached", question)  # a miss: stored in the background after the answer went out
    waiting = [q for q, _ in PAIRS]
    while waiting:  # the background writes must have landed: poll until each comes back a hit (bounded)
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(waiting)} cached questions never came back a hit, e.g. {waiting[0]!r}")
        still = []
        for question in waiting:
            _, cache, error = await client.ask("cached", question)
            if error is not None or cache != "hit":
                still.append(question)
        waiting = still
        if waiting:
            await asyncio.sleep(0.05)
    for question, paraphrase in PAIRS:
        _, cache, error = await client.ask("cached", paraphrase)
        if error is not None or cache != "semantic-hit":
            raise RuntimeError(f"{paraphrase!r} (of {question!r}) came back {cache or error!r}, not a semantic hit")


@dataclass
class Side:
    """One gateway under measurement: its two connections, its unasked questions, its samples so far."""

    gw: CacheGateway
    result: StateResult
    fg: Client  # the timed requests
    bg: Client  # the concurrent stream of (e)
    questions: Questions = field(default_factory=lambda: Questions(miss_questions()))
    kinds: dict[str, Samples] = field(default_factory=lambda: {kind: Samples() for kind in KINDS})
    cycle: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    fore: dict[str, Samples] = field(default_factory=lambda: {c: Samples() for c in LOOP_CONDITIONS})
    back: dict[str, Samples] = field(default_factory=lambda: {c: Samples() for c in BACKGROUND})


async def kinds_block(side: Side, kind: str, n: int) -> None:
    """(a)-(d): n sequential requests of one kind, and the gateway's lookup time over them."""
    s, client = side.kinds[kind], side.fg
    before = lookup_seconds(side.gw)
    for _ in range(n):
        i = side.cycle[kind]
        side.cycle[kind] += 1
        if kind == "off":
            result = await client.ask("plain", PAIRS[i % len(PAIRS)][0])
        elif kind == "exact":
            result = await client.ask("cached", PAIRS[i % len(PAIRS)][0])
        elif kind == "semantic_hit":
            result = await client.ask("cached", PAIRS[i % len(PAIRS)][1])
        else:
            result = await client.ask("cached", side.questions.next())
        _record(s, EXPECTED[kind], result)
    s.lookup_s += lookup_seconds(side.gw) - before
    s.lookups_requests += n


async def loop_block(side: Side, condition: str, n: int, spinner: Burner) -> None:
    """(e): n sequential plain requests alone, or with a concurrent stream / a busy core (`condition`)."""
    stop = asyncio.Event()
    running = asyncio.Event()
    task: asyncio.Task[None] | None = None
    if condition in side.back:
        task = asyncio.create_task(_stream(side.bg, condition, side.questions, side.back[condition], stop, running))
        await running.wait()  # the concurrent stream is under way before the first timed request
    elif condition == "with_busy_core":
        spinner.resume()
    try:
        for i in range(n):
            _record(side.fore[condition], None, await side.fg.ask("plain", PAIRS[i % len(PAIRS)][0]))
    finally:
        stop.set()
        if task is not None:
            await task
        if condition == "with_busy_core":
            spinner.pause()


async def _stream(
    client: Client, condition: str, questions: Questions, samples: Samples, stop: asyncio.Event, running: asyncio.Event
) -> None:
    """Back-to-back requests on their own connection until `stop` (misses: each a new question)."""
    i = 0
    try:
        while not stop.is_set():
            if condition == "with_long_misses":
                question = long_question(questions.long_used, questions.pool)
                questions.long_used += 1
                _record(samples, "miss", await client.ask("cached", question))
            elif condition == "with_misses":
                try:
                    question = questions.next()
                except OutOfQuestions:
                    break
                _record(samples, "miss", await client.ask("cached", question))
            else:
                _record(samples, None, await client.ask("plain", PAIRS[i % len(PAIRS)][0]))
            i += 1
            running.set()
    finally:
        running.set()  # never leave the foreground waiting


def _blocks(total: int, rounds: int) -> list[int]:
    base, extra = divmod(total, rounds)
    return [base + (1 if r < extra else 0) for r in range(rounds) if base + (1 if r < extra else 0) > 0]


def _session(plan: Plan) -> aiohttp.ClientSession:
    # One connection; idle ones close on our side after KEEPALIVE_S, before uvicorn's (5 s) could close one
    # under a request we are about to send (a ServerDisconnectedError, not the gateway's fault).
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=1, keepalive_timeout=KEEPALIVE_S),
        timeout=aiohttp.ClientTimeout(total=plan.timeout_s),
        auto_decompress=False,
        skip_auto_headers=("User-Agent",),
    )


async def measure_all(gateways: list[CacheGateway], results: list[StateResult], plan: Plan, spinner: Burner) -> None:
    """Warm every gateway up, then measure them all in alternation: each round runs a block of every kind
    (then of every condition of (e)) on each gateway in turn, so outside load falls on all alike."""
    async with contextlib.AsyncExitStack() as stack:
        sides: list[Side] = []
        for gw, result in zip(gateways, results, strict=True):
            fg = Client(await stack.enter_async_context(_session(plan)), gw)
            bg = Client(await stack.enter_async_context(_session(plan)), gw)
            side = Side(gw, result, fg, bg)
            try:
                await warm_up(fg, side.questions, plan.warm_deadline_s)
            except (RuntimeError, OSError, aiohttp.ClientError) as exc:
                result.error = f"warm-up: {str(exc).splitlines()[0][:300]}"
                print(f"  {result.state} failed: {exc}\n{gw.child.tail()}", file=sys.stderr)
                continue
            sides.append(side)
        if not sides:
            return
        busy = wait_quiet(plan.quiet_wait)
        print(f"  warmed up; machine busy {busy:.0f}% before measuring", file=sys.stderr)
        for side in sides:
            await side.fg.ask("plain", PAIRS[0][0])  # untimed: the connection again after the quiet wait
        ours = {spinner.child.pid} | {p for side in sides for p in (side.gw.child.pid, side.gw.redis_pid) if p}
        cpu_before = sum(tree_cpu_seconds(p) for p in ours) + _self_cpu()
        busy_before = machine_busy()
        started = time.monotonic()
        try:
            for n in _blocks(plan.requests, plan.rounds):
                for side in sides:
                    for kind in KINDS:
                        await kinds_block(side, kind, n)
            for n in _blocks(plan.loop_requests, plan.rounds):
                for side in sides:
                    for condition in LOOP_CONDITIONS:
                        await loop_block(side, condition, n, spinner)
        except (RuntimeError, OSError, aiohttp.ClientError) as exc:
            for side in sides:
                side.result.error = f"measuring: {str(exc).splitlines()[0][:300]}"
            print(f"  measuring failed: {exc}", file=sys.stderr)
            return
        window = time.monotonic() - started
        busy_after = machine_busy()
        cpu_after = sum(tree_cpu_seconds(p) for p in ours) + _self_cpu()
    machine_s = (busy_after[0] - busy_before[0]) / CLK_TCK
    # The upstream's CPU is outside `ours`: it is light (about 0.02 ms per request), so noise includes it.
    noise = max(0.0, (machine_s - (cpu_after - cpu_before)) / window) if window > 0 else 0.0
    for side in sides:
        r = side.result
        r.kinds = {k: _summary(s) for k, s in side.kinds.items()}
        r.loop = {c: _summary(s) for c, s in side.fore.items()}
        r.background = {c: _summary(s) for c, s in side.back.items()}
        r.questions_used = side.questions.used
        r.noise_cores = noise


def _self_cpu() -> float:
    times = os.times()
    return times.user + times.system


@dataclass(frozen=True)
class Redis:
    """The redis-server of the redis case: its URL (a loopback port, never 6379) and its PID (CPU metering)."""

    url: str
    pid: int


def run_bench(plan: Plan, workdir: Path, redis: Redis | None = None) -> list[StateResult]:
    """Start everything, measure the states side by side, stop everything (by PID, in `finally`). The redis
    case runs on `redis` when given (the caller's own throwaway server), else on one this starts and stops."""
    results = [StateResult(state) for state in plan.states]
    with contextlib.ExitStack() as stack:
        _, up_port = stack.enter_context(upstream(workdir, 0.0, 0.0))
        if redis is None and "redis" in plan.states:
            server: RedisServer = stack.enter_context(redis_server(workdir, "redis-cache"))
            redis = Redis(server.url(), server.child.pid)
        gateways = [stack.enter_context(cache_gateway(workdir, state, up_port, redis)) for state in plan.states]
        spinner = stack.enter_context(burner(workdir))
        if plan.nice_client:
            os.nice(10)  # after the gateways started: they keep normal priority, the client yields to them
        for result, gw in zip(results, gateways, strict=True):
            result.rss_idle_mb = gw.rss_idle_mb
        asyncio.run(measure_all(gateways, results, plan, spinner))
        for result, gw in zip(results, gateways, strict=True):
            result.rss_end_mb = tree_rss_mb(gw.child.pid)
    return results


# ---- report ----


def _cell(s: dict[str, Any], base: dict[str, Any] | None, p: str) -> str:
    if not s.get("count"):
        return "n/a"
    value = f"{s[p]:.2f}"
    if base is not None and base.get("count"):
        value += f" ({s[p] - base[p]:+.2f})"
    return value


def report(results: list[StateResult], plan: Plan) -> str:
    ok = [r for r in results if r.error is None]
    rows: list[str] = []
    for r in results:
        if r.error is not None:
            rows.append(f"{r.state}: failed: {r.error}")
    if not ok:
        return "\n".join(rows)
    head = " | ".join(f"{r.state} p50 | {r.state} p99" for r in ok)
    align = "---:|---:|" * len(ok)
    rows += [
        f"Sequential requests (c=1), {plan.requests} per kind in {plan.rounds} alternating rounds; ms, "
        "(added vs (a) at the same percentile):",
        "",
        f"| request | {head} |",
        f"|---|{align}",
    ]
    for kind in KINDS:
        cells = []
        for r in ok:
            s, base = r.kinds[kind], r.kinds["off"] if kind != "off" else None
            cells += [_cell(s, base, "p50"), _cell(s, base, "p99")]
        rows.append(f"| {LABELS[kind]} | " + " | ".join(cells) + " |")
    for kind in KINDS[1:]:
        cells = []
        for r in ok:
            mean = r.kinds[kind].get("lookup_mean_ms")
            cells += [f"{mean:.3f}" if mean is not None else "n/a", ""]
        rows.append(f"| {LABELS[kind]}: lookup inside the gateway, mean | " + " | ".join(cells) + " |")
    rows += [
        "",
        f"(e) Event loop: sequential plain (cache-off) requests, {plan.loop_requests} per condition in "
        f"{plan.rounds} alternating rounds; ms (change vs alone):",
        "",
        f"| plain requests | {head} |",
        f"|---|{align}",
    ]
    for condition in LOOP_CONDITIONS:
        cells = []
        for r in ok:
            s, base = r.loop[condition], r.loop["alone"] if condition != "alone" else None
            cells += [_cell(s, base, "p50"), _cell(s, base, "p99")]
        rows.append(f"| {LABELS[condition]} | " + " | ".join(cells) + " |")
    cells = []
    for r in ok:
        bg = r.background
        plain, misses, long = bg["with_plain"], bg["with_misses"], bg["with_long_misses"]
        cells += [
            f"{plain['count']} plain / {misses['count']} misses / {long['count']} long misses",
            f"p50 {plain['p50']:.2f} / {misses['p50']:.2f} / {long['p50']:.2f}",
        ]
    rows.append("| concurrent requests answered during the windows; their p50 | " + " | ".join(cells) + " |")
    cells = []
    for r in ok:
        blocked, moved = blocked_loop_estimate(r), loop_moved(r)
        cells += [f"+{blocked:.2f}", "yes" if moved >= blocked / 2 else f"no ({moved:+.2f} < {blocked / 2:.2f})"]
    rows.append(
        "| if each embedding blocked the loop: p50 with long misses would rise by about "
        "(half a long miss); blocked? (rise ≥ half that) | " + " | ".join(cells) + " |"
    )
    rows += ["", "| run | " + " | ".join(r.state for r in ok) + " |", "|---|" + "---:|" * len(ok)]
    rows.append(
        "| unexpected x-strait-cache / errors (all kinds) | "
        + " | ".join(f"{_tally(r, 'unexpected')} / {_tally(r, 'errors')}" for r in ok)
        + " |"
    )
    rows.append("| new questions used | " + " | ".join(str(r.questions_used) for r in ok) + " |")
    rows.append(
        "| gateway RSS idle → end (MiB) | " + " | ".join(f"{r.rss_idle_mb:.0f} → {r.rss_end_mb:.0f}" for r in ok) + " |"
    )
    rows.append("| other processes' CPU (cores) | " + " | ".join(f"{r.noise_cores:.2f}" for r in ok) + " |")
    return "\n".join(rows)


def blocked_loop_estimate(r: StateResult) -> float:
    """What a plain request's p50 would gain (ms) if the event loop stood still during each embedding: the
    long-question misses run back to back, so a plain request nearly always lands during one and would
    wait out the rest of it, half of one at the median. A miss's latency stands in for its embedding (the
    embedding is nearly all of it), an overestimate by the small rest of the request."""
    return float(r.background["with_long_misses"]["p50"]) / 2


def loop_moved(r: StateResult) -> float:
    """How much the plain requests' p50 did rise (ms) with the long-question misses running."""
    return float(r.loop["with_long_misses"]["p50"] - r.loop["alone"]["p50"])


def _all(r: StateResult) -> list[dict[str, Any]]:
    return [*r.kinds.values(), *r.loop.values(), *r.background.values()]


def _tally(r: StateResult, what: str) -> str:
    """Every unexpected `x-strait-cache` value (or error kind) of a state, over all kinds and conditions."""
    total: dict[str, int] = {}
    for s in _all(r):
        for name, n in s[what].items():
            total[name] = total.get(name, 0) + n
    if not total:
        return "0"
    return f"{sum(total.values())} (" + ", ".join(f"{k}: {n}" for k, n in sorted(total.items())) + ")"


def _states(spec: str) -> tuple[str, ...]:
    states = tuple(dict.fromkeys(s.strip() for s in spec.split(",") if s.strip()))
    bad = [s for s in states if s not in STATES]
    if bad or not states:
        raise ValueError(f"--state takes a comma-separated subset of {', '.join(STATES)}, got {spec!r}")
    return states


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Cache lookup latency (exact, semantic hit, semantic miss).")
    parser.add_argument("--requests", "-n", type=int, default=400, help="sequential requests per kind and state")
    parser.add_argument("--loop-requests", type=int, default=400, help="plain requests per event-loop condition")
    parser.add_argument("--rounds", type=int, default=4, help="alternating blocks of each kind / condition")
    parser.add_argument("--state", default="memory,redis", help="comma-separated subset of memory,redis")
    parser.add_argument("--quiet-wait", type=float, default=5.0, help="max seconds to wait for an idle machine")
    parser.add_argument("--json-out", type=Path, help="write the raw results to this file")
    args = parser.parse_args(argv)
    supply = len(miss_questions())
    if not 1 <= args.rounds <= args.requests or args.loop_requests < args.rounds:
        parser.error("--requests and --loop-requests >= --rounds >= 1")
    if args.requests > supply // 2:
        parser.error(f"--requests <= {supply // 2}: there are {supply} new questions for the misses")
    try:
        states = _states(args.state)
    except ValueError as exc:
        parser.error(str(exc))
    plan = Plan(
        requests=args.requests,
        loop_requests=args.loop_requests,
        rounds=args.rounds,
        states=states,
        quiet_wait=args.quiet_wait,
        nice_client=True,
    )
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="strait-cache-bench-") as tmp:
        results = run_bench(plan, Path(tmp))
    took = time.monotonic() - started
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    command = "python -m loadtest.cache_bench " + " ".join(sys.argv[1:] if argv is None else argv)
    print(
        f"\n{stamp} | {command.strip()} | git {git_revision()} | Python {platform.python_version()} | "
        f"{os.cpu_count()} cores | {took:.0f}s\n"
    )
    print(report(results, plan))
    if args.json_out:
        args.json_out.write_text(json.dumps([asdict(r) for r in results], indent=1))
    return 0 if all(r.error is None for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

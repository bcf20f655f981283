"""`strait` command line: serve, keys hash, policy, usage, datasets."""

from __future__ import annotations

import argparse
import getpass
import math
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from gateway.capture.datasets_cli import add_datasets_commands
from gateway.policy.index import key_digest, key_problem
from gateway.policy.load import check_policy
from gateway.registry import discover_adapters
from gateway.settings import Settings

# How long uvicorn waits for connections past the app's grace period before cancelling what is left:
# time for the error events the app sends at the end of its grace period to go out.
SHUTDOWN_BACKSTOP_S = 5.0


def app_from_env() -> object:
    """ASGI factory used by the server workers: settings come from STRAIT_* variables."""
    from gateway.app import create_app
    from gateway.logs import configure_logging

    settings = Settings.from_env()
    # Every WARNING-and-above line of the process is rate-limited per call site (gateway.logs).
    configure_logging(settings.log_level, settings.log_format)
    # Served by uvicorn: SIGTERM starts the drain (readiness, grace period) the moment it arrives.
    return create_app(settings, drain_on_sigterm=settings.server == "uvicorn")


# A SIGTERM'd replica should be done (drain delay + grace) within this: Kubernetes' default
# terminationGracePeriodSeconds (docker/compose.yaml's stop_grace_period is 30 s too).
KILL_TIMEOUT_HINT_S = 30.0


def _serve(args: argparse.Namespace) -> int:
    settings = Settings.from_env(
        policy_path=args.policy,
        host=args.host,
        port=args.port,
        workers=args.workers,
        shadow_policy=args.shadow_policy,
    )
    # Validate the policy (and a shadow policy) before binding a port: a bad file is refused with its reasons.
    policy, problems = check_policy(Path(settings.policy_path), adapters=discover_adapters().keys())
    for p in problems:
        if p.severity != "silenced":
            print(p, file=sys.stderr)
    if policy is None:
        return 1
    if settings.shadow_policy is not None:
        shadow, shadow_problems = check_policy(Path(settings.shadow_policy), adapters=discover_adapters().keys())
        if shadow is None:
            for p in shadow_problems:
                if p.severity == "error":
                    print(f"shadow policy: {p}", file=sys.stderr)
            return 1
        os.environ["STRAIT_SHADOW_POLICY"] = settings.shadow_policy
    from gateway.cache.pool import embedder_specs, missing_dependency
    from gateway.policy.index import PolicyIndex

    missing = missing_dependency(embedder_specs(PolicyIndex.of(policy)).values())
    if missing is not None:
        print(f"strait: {missing}", file=sys.stderr)
        return 2
    if settings.state == "memory" and settings.workers > 1:
        print(
            f"strait: --workers {settings.workers} with STRAIT_STATE=memory would give each worker its own copy of "
            "every rate limit and budget (limits x workers). Use one worker, or a redis:// state URL.",
            file=sys.stderr,
        )
        return 2
    os.environ["STRAIT_POLICY"] = settings.policy_path
    # Every worker is a replica: with `memory` state the store refuses to start rather than let each
    # worker enforce its own copy of the limits.
    os.environ["STRAIT_REPLICAS"] = str(max(settings.replicas, settings.workers))
    os.environ["STRAIT_STATE"] = settings.state
    os.environ["STRAIT_LOG_LEVEL"] = settings.log_level
    os.environ["STRAIT_LOG_FORMAT"] = settings.log_format
    print(
        f"strait: serving {settings.policy_path} on http://{settings.host}:{settings.port} ({settings.server})",
        file=sys.stderr,
        flush=True,
    )
    stopping_s = settings.drain_delay_s + settings.shutdown_grace_s
    if stopping_s > KILL_TIMEOUT_HINT_S:
        # Past the orchestrator's kill timeout the process dies mid-drain: streams cut without their error
        # event, usage records of the last moments spooled instead of written.
        print(
            f"strait: STRAIT_DRAIN_DELAY_S + STRAIT_SHUTDOWN_GRACE_S = {stopping_s:g} s: keep the orchestrator's "
            f"kill timeout above it (Kubernetes' terminationGracePeriodSeconds defaults to {KILL_TIMEOUT_HINT_S:g}, "
            "Docker's stop timeout to 10)",
            file=sys.stderr,
            flush=True,
        )
    if settings.server == "granian":
        try:
            from granian import Granian
            from granian.constants import Interfaces, Loops
        except ImportError:
            print("strait: STRAIT_SERVER=granian needs: pip install 'strait-gateway[granian]'", file=sys.stderr)
            return 2

        Granian(
            "gateway.__main__:app_from_env",
            address=settings.host,
            port=settings.port,
            interface=Interfaces.ASGI,
            workers=settings.workers,
            loop=Loops.uvloop,
            factory=True,
            log_access=False,
        ).serve()
        return 0
    import uvicorn

    # On SIGTERM uvicorn stops accepting and waits for the open connections (the app starts its grace
    # period at the same moment: gateway.api.shutdown), then restores the handler it found and
    # re-raises the signal "so the process exits with the right code". With Python's default handler that
    # is death by SIGTERM (exit status 143), which systemd, Kubernetes and compose report as a failure
    # after a clean, requested shutdown. This handler makes the re-raised signal a normal exit 0 (and a
    # SIGTERM before uvicorn takes over, when nothing is being served yet, an immediate exit 0).
    signal.signal(signal.SIGTERM, _exit_cleanly)
    from gateway.api.server_limits import LimitedHttpToolsProtocol

    uvicorn.run(
        "gateway.__main__:app_from_env",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        loop="uvloop",
        # httptools with header size/count limits and a header deadline (README "Inbound limits").
        http=LimitedHttpToolsProtocol,
        limit_concurrency=settings.max_connections or None,
        lifespan="on",
        access_log=False,
        # Nothing in the gateway reads the client's address or scheme (its log lines carry ids, not
        # addresses), so uvicorn's X-Forwarded-* middleware is pure cost: about 0.8 us per request to
        # read the headers, and one more frame that every resumption of the request's task walks through.
        proxy_headers=False,
        log_level=settings.log_level.lower(),
        # A backstop only: the app ends every request still running with an error at its own grace period
        # (gateway.inflight), so this bound is reached only if that failed.
        timeout_graceful_shutdown=math.ceil(settings.shutdown_grace_s + SHUTDOWN_BACKSTOP_S),
    )
    return 0


def _exit_cleanly(signum: int, frame: object) -> None:
    raise SystemExit(0)


def _keys_hash(args: argparse.Namespace) -> int:
    key = (
        args.key
        if args.key is not None
        else (sys.stdin.readline().strip() if not sys.stdin.isatty() else getpass.getpass("API key: "))
    )
    if not key:
        print("no key given", file=sys.stderr)
        return 1
    problem = key_problem(key)
    if problem is not None:
        print(f"strait keys hash: refused: {problem}", file=sys.stderr)
        return 1
    print(key_digest(key))
    return 0


def _policy_check(args: argparse.Namespace) -> int:
    adapters = discover_adapters().keys()
    failed = False
    for path in args.paths:
        _, problems = check_policy(Path(path), adapters=adapters)
        silenced = [p for p in problems if p.severity == "silenced"]
        for p in problems:
            if p.severity != "silenced" or args.show_silenced:
                print(p)
        errors = [p for p in problems if p.severity == "error"]
        failed = failed or bool(errors)
        if not errors:
            quiet = f" ({len(silenced)} warnings silenced)" if silenced and not args.show_silenced else ""
            print(f"{path}: ok{quiet}")
    return 1 if failed else 0


def _policy_explain(args: argparse.Namespace) -> int:
    """Exit 0: the plan is printed; 2: the policy refuses the request (status, code, message printed);
    1: the explain could not run (a policy that does not load, an unknown tenant, an unreadable file)."""
    import json

    from gateway.errors import GatewayError
    from gateway.policy.index import PolicyIndex
    from gateway.policy.load import PolicyError, load_policy
    from gateway.policy.tools import live_state, render, run

    try:
        index = PolicyIndex.of(load_policy(args.policy, adapters=discover_adapters().keys()))
    except PolicyError as exc:
        print(exc, file=sys.stderr)
        return 1
    try:
        request = json.loads(Path(args.request).read_text())
        signals = json.loads(Path(args.signals).read_text()) if args.signals else None
        live = live_state(signals) if signals is not None else None
    except (OSError, ValueError) as exc:  # msgspec.ValidationError is a ValueError
        print(f"strait policy explain: {exc}", file=sys.stderr)
        return 1
    headers = {}
    for h in args.header or ():
        name, sep, value = h.partition(":")
        if not sep:
            print(f"strait policy explain: --header {h!r} is not 'name: value'", file=sys.stderr)
            return 1
        headers[name.strip()] = value.strip()
    try:
        plan = run(index, args.tenant, request, headers=headers, signals=signals, ingress_region=args.region)
    except GatewayError as exc:
        print(f"refused: {exc.status} {exc.code}: {exc.message}")
        return 2
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(render(plan.decision, live))
    return 0


def _policy_test(args: argparse.Namespace) -> int:
    from gateway.policy.suite import run_suites, summary

    outcomes = [o for path in args.paths for o in run_suites(Path(path))]
    lines, failed = summary(outcomes)
    print("\n".join(lines))
    return 1 if failed or not outcomes else 0


def _policy_diff(args: argparse.Namespace) -> int:
    from gateway.policy.index import PolicyIndex
    from gateway.policy.load import PolicyError, load_policy
    from gateway.policy.replay import diff, read_samples

    adapters = discover_adapters().keys()
    try:
        old = PolicyIndex(load_policy(args.old, adapters=adapters))
        new = PolicyIndex(load_policy(args.new, adapters=adapters))
        samples = read_samples(Path(args.requests))
    except (PolicyError, OSError, ValueError) as exc:
        print(exc, file=sys.stderr)
        return 1
    print("\n".join(diff(old, new, samples).render(top=args.top)))
    return 0


def _policy_schema(args: argparse.Namespace) -> int:
    import json

    from gateway.policy.tools import schema

    print(json.dumps(schema(), indent=2, sort_keys=True))
    return 0


def _usage(args: argparse.Namespace) -> int:
    """Reads usage from a running gateway: /admin/usage with an admin key, else /v1/usage with a tenant key."""
    import csv
    import json
    import urllib.error
    import urllib.parse
    import urllib.request

    key = args.key or os.environ.get("STRAIT_ADMIN_KEY") or os.environ.get("STRAIT_API_KEY")
    if not key:
        print("give --key or set STRAIT_ADMIN_KEY (admin) or STRAIT_API_KEY (a tenant's key)", file=sys.stderr)
        return 1
    query = {"by": args.by}
    if args.since:
        query["since"] = args.since
    if args.until:
        query["until"] = args.until
    path = "/v1/usage"
    if args.tenant or args.admin:
        path = "/admin/usage"
        if args.tenant:
            query["tenant"] = args.tenant
    url = args.url.rstrip("/") + path + "?" + urllib.parse.urlencode(query)
    request = urllib.request.Request(url, headers={"authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            doc = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        print(f"{exc.code}: {exc.read().decode(errors='replace')}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1
    rows = doc["data"]
    # cached (cache reads) and cache_write are parts of prompt, reasoning a part of completion.
    fields = [
        "tenant",
        "value",
        "requests",
        "prompt_tokens",
        "cached_tokens",
        "cache_write_tokens",
        "completion_tokens",
        "reasoning_tokens",
        "cost_usd",
    ]
    if args.format == "json":
        print(json.dumps(doc, indent=2))
    elif args.format == "csv":
        writer = csv.writer(sys.stdout)
        writer.writerow(["tenant", args.by, *fields[2:]])
        for r in rows:
            # A gateway of an older version reports no token kinds: 0.
            writer.writerow([r.get(f, 0) for f in fields])
    else:
        print(f"usage {doc['since']}..{doc['until']} by {args.by}")
        print(
            f"{'tenant':<20} {args.by:<32} {'requests':>9} {'prompt':>10} {'cached':>10} {'cache_write':>11} "
            f"{'completion':>10} {'reasoning':>10} {'USD':>12}"
        )
        for r in rows:
            print(
                f"{r['tenant']:<20} {r['value']:<32} {r['requests']:>9} {r['prompt_tokens']:>10} "
                f"{r.get('cached_tokens', 0):>10} {r.get('cache_write_tokens', 0):>11} "
                f"{r['completion_tokens']:>10} {r.get('reasoning_tokens', 0):>10} {r['cost_usd']:>12.6f}"
            )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="strait", description="Strait: an OpenAI-compatible inference router.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--policy", help="policy file or directory (env STRAIT_POLICY; default policies/demo.yaml)")
    serve.add_argument("--host", help="bind address (env STRAIT_HOST; default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (env STRAIT_PORT; default 8080)")
    serve.add_argument("--workers", type=int, help="worker processes (env STRAIT_WORKERS; default 1)")
    serve.add_argument(
        "--shadow-policy",
        help="a candidate policy decided next to the live one on every request, never acted on: disagreements "
        "counted in strait_shadow_decisions_total and logged (env STRAIT_SHADOW_POLICY)",
    )
    serve.set_defaults(func=_serve)

    keys = sub.add_parser("keys", help="API key tools")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    hash_ = keys_sub.add_parser("hash", help="print the digest to store in a policy file for a key")
    hash_.add_argument("key", nargs="?", help="the key (read from stdin or a prompt when omitted)")
    hash_.set_defaults(func=_keys_hash)

    usage = sub.add_parser("usage", help="tokens and cost from a running gateway's ledger")
    usage.add_argument("--url", default=os.environ.get("STRAIT_URL", "http://127.0.0.1:8080"))
    usage.add_argument(
        "--key", help="admin key (all tenants) or a tenant's key (env STRAIT_ADMIN_KEY / STRAIT_API_KEY)"
    )
    usage.add_argument("--tenant", help="one tenant (needs an admin key)")
    usage.add_argument("--admin", action="store_true", help="every tenant (needs an admin key)")
    usage.add_argument("--since", help="YYYY-MM-DD (default today, UTC)")
    usage.add_argument("--until", help="YYYY-MM-DD (default today, UTC)")
    usage.add_argument("--by", choices=["route", "model", "deployment", "key"], default="route")
    usage.add_argument("--format", choices=["table", "csv", "json"], default="table")
    usage.set_defaults(func=_usage)

    policy = sub.add_parser("policy", help="policy tools")
    policy_sub = policy.add_subparsers(dest="policy_command", required=True)
    check = policy_sub.add_parser("check", help="validate policy files; print file:line:col: reason")
    check.add_argument("paths", nargs="+")
    check.add_argument(
        "--show-silenced", action="store_true", help="also print the warnings the policy's silenced_warnings accept"
    )
    check.set_defaults(func=_policy_check)
    explain = policy_sub.add_parser(
        "explain",
        help="print the filter/rank table the server would use",
        epilog="exit status: 0 the plan is printed; 2 the policy refuses the request (status, code and message "
        "printed); 1 the explain could not run (the policy does not load, unknown tenant, unreadable file)",
    )
    explain.add_argument("--policy", required=True)
    explain.add_argument("--tenant")
    explain.add_argument("--request", required=True, help="request body as JSON")
    explain.add_argument(
        "--signals",
        help="live signals as JSON: unhealthy, latency_ms, ttft_ms, tokens_per_s, in_flight, utilisation, queue, "
        "scrape_basis, stale, spilling",
    )
    explain.add_argument("--header", action="append", help="'name: value', repeatable")
    explain.add_argument("--region", help="the STRAIT_REGION of the replica the request enters through")
    explain.set_defaults(func=_policy_explain)
    test = policy_sub.add_parser("test", help="run YAML policy test cases; exit 1 on any failure")
    test.add_argument("paths", nargs="+")
    test.set_defaults(func=_policy_test)
    diff = policy_sub.add_parser(
        "diff", help="replay a traffic sample against two policies: requests that move, where, cost per day"
    )
    diff.add_argument("old")
    diff.add_argument("new")
    diff.add_argument(
        "--requests",
        required=True,
        help="JSON lines: the gateway's feature log (STRAIT_FEATURE_LOG), or {tenant, request, headers?, signals?}",
    )
    diff.add_argument("--top", type=int, default=20, help="kinds of move listed (most frequent first)")
    diff.set_defaults(func=_policy_diff)
    schema = policy_sub.add_parser("schema", help="print the policy JSON Schema")
    schema.set_defaults(func=_policy_schema)

    add_datasets_commands(sub)

    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())

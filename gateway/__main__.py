"""`strait` command line: serve, keys hash, policy check."""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from gateway.policy.index import key_digest
from gateway.policy.load import check_policy
from gateway.registry import discover_adapters
from gateway.settings import Settings


def app_from_env() -> object:
    """ASGI factory used by the server workers: settings come from STRAIT_* variables."""
    import logging

    from gateway.app import create_app

    settings = Settings.from_env()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    return create_app(settings)


def _serve(args: argparse.Namespace) -> int:
    settings = Settings.from_env(policy_path=args.policy, host=args.host, port=args.port, workers=args.workers)
    # Validate the policy before binding a port: a bad file is refused with its reasons.
    _, problems = check_policy(Path(settings.policy_path), adapters=discover_adapters().keys())
    if problems:
        for p in problems:
            print(p, file=sys.stderr)
        return 1
    os.environ["STRAIT_POLICY"] = settings.policy_path
    os.environ["STRAIT_STATE"] = settings.state
    os.environ["STRAIT_LOG_LEVEL"] = settings.log_level
    import uvicorn

    print(
        f"strait: serving {settings.policy_path} on http://{settings.host}:{settings.port}", file=sys.stderr, flush=True
    )
    uvicorn.run(
        "gateway.__main__:app_from_env",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,
        log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=10,
    )
    return 0


def _keys_hash(args: argparse.Namespace) -> int:
    key = (
        args.key
        if args.key is not None
        else (sys.stdin.readline().strip() if not sys.stdin.isatty() else getpass.getpass("API key: "))
    )
    if not key:
        print("no key given", file=sys.stderr)
        return 1
    print(key_digest(key))
    return 0


def _policy_check(args: argparse.Namespace) -> int:
    adapters = discover_adapters().keys()
    failed = False
    for path in args.paths:
        _, problems = check_policy(Path(path), adapters=adapters)
        for p in problems:
            print(p)
        failed = failed or bool(problems)
        if not problems:
            print(f"{path}: ok")
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="strait", description="Strait: an OpenAI-compatible inference router.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--policy", help="policy file or directory (env STRAIT_POLICY; default policies/demo.yaml)")
    serve.add_argument("--host", help="bind address (env STRAIT_HOST; default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (env STRAIT_PORT; default 8080)")
    serve.add_argument("--workers", type=int, help="worker processes (env STRAIT_WORKERS; default 1)")
    serve.set_defaults(func=_serve)

    keys = sub.add_parser("keys", help="API key tools")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    hash_ = keys_sub.add_parser("hash", help="print the digest to store in a policy file for a key")
    hash_.add_argument("key", nargs="?", help="the key (read from stdin or a prompt when omitted)")
    hash_.set_defaults(func=_keys_hash)

    policy = sub.add_parser("policy", help="policy tools")
    policy_sub = policy.add_subparsers(dest="policy_command", required=True)
    check = policy_sub.add_parser("check", help="validate policy files; print file:line:col: reason")
    check.add_argument("paths", nargs="+")
    check.set_defaults(func=_policy_check)

    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())

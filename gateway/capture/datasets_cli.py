"""`strait datasets export | compare`: the capture store (STRAIT_CAPTURE, as `strait serve` reads it) read
against the policy in force (STRAIT_POLICY or `--policy`). gateway.capture.export and .compare do the work.

Dates: `YYYY-MM-DD` (UTC midnight; as `--until`, the end of that day) or an ISO 8601 time (naive = UTC).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import sys
from pathlib import Path
from typing import Any

from gateway.capture.formats import FORMATS


def parse_date(text: str, *, end: bool = False) -> int:
    """Epoch milliseconds of a date (`end`: the day after it, for an inclusive `--until`) or a time."""
    try:
        if len(text) == 10:
            day = dt.datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=dt.UTC)
            return int((day + dt.timedelta(days=1 if end else 0)).timestamp() * 1000)
        moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD) or ISO time: {text!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return int(moment.timestamp() * 1000)


def _policy(path: str | None) -> tuple[Any, str]:
    from gateway.policy.index import PolicyIndex
    from gateway.policy.load import load_policy
    from gateway.registry import discover_adapters
    from gateway.settings import Settings

    index = PolicyIndex.of(load_policy(path or Settings.from_env().policy_path, adapters=discover_adapters().keys()))
    return index.policy, index.version


def _capture_url(args: argparse.Namespace) -> str:
    from gateway.capture.store import sqlite_path
    from gateway.settings import Settings

    url = str(args.capture or Settings.from_env().capture_url)
    if url == "off":
        raise SystemExit("strait datasets: STRAIT_CAPTURE=off: there is no capture store to read")
    # A read creates nothing: a SQLite file that is not there is a mistake (a wrong path or directory).
    if url.startswith("sqlite:") and not Path(sqlite_path(url)).exists():
        raise SystemExit(f"strait datasets: no capture store at {sqlite_path(url)} (STRAIT_CAPTURE or --capture)")
    return url


def _export(args: argparse.Namespace) -> int:
    from gateway.capture.eligibility import policy_view
    from gateway.capture.export import ExportError, ExportOptions, export
    from gateway.capture.store import open_capture_store

    read = _inputs(args, "export")
    if isinstance(read, int):
        return read
    policy, version, since_ms, until_ms = read
    assert since_ms is not None  # --since is required
    options = ExportOptions(
        route=args.route,
        format=args.format,
        target=args.target,
        since_ms=since_ms,
        until_ms=until_ms,
        tenant=args.tenant,
        min_feedback=args.min_feedback,
        with_corrections=args.with_corrections,
    )

    async def run() -> list[str]:
        store = await open_capture_store(_capture_url(args))
        try:
            report = await export(store, options, policy_view(policy, version), Path(args.out))
        finally:
            await store.aclose()
        return report.lines()

    try:
        print("\n".join(asyncio.run(run())))
    except ExportError as exc:
        print(f"strait datasets export: {exc}", file=sys.stderr)
        return 1
    return 0


def _compare(args: argparse.Namespace) -> int:
    from gateway.capture.compare import compare, prices_of, render
    from gateway.capture.store import open_capture_store

    read = _inputs(args, "compare")
    if isinstance(read, int):
        return read
    policy, _, since_ms, until_ms = read

    async def run() -> Any:
        store = await open_capture_store(_capture_url(args))
        try:
            return await compare(
                store,
                args.route,
                args.candidate,
                prices_of(policy),
                since_ms=since_ms,
                until_ms=until_ms,
                tenant=args.tenant,
            )
        finally:
            await store.aclose()

    result = asyncio.run(run())
    print(json.dumps(result.as_dict(), indent=2) if args.json else "\n".join(render(result)))
    return 0


def _inputs(args: argparse.Namespace, verb: str) -> tuple[Any, str, int | None, int | None] | int:
    """The policy, its version and the date range, or the exit code after saying what is wrong (1: the
    policy, 2: a date)."""
    from gateway.policy.load import PolicyError

    try:
        policy, version = _policy(args.policy)
    except PolicyError as exc:
        print(exc, file=sys.stderr)
        return 1
    try:
        since_ms, until_ms = _dates(args)
    except argparse.ArgumentTypeError as exc:
        print(f"strait datasets {verb}: {exc}", file=sys.stderr)
        return 2
    return policy, version, since_ms, until_ms


def _dates(args: argparse.Namespace) -> tuple[int | None, int | None]:
    since = parse_date(args.since) if args.since else None
    return since, parse_date(args.until, end=True) if args.until else None


def add_datasets_commands(sub: Any) -> None:
    datasets = sub.add_parser("datasets", help="fine-tuning exports and candidate comparisons from the capture store")
    datasets_sub = datasets.add_subparsers(dest="datasets_command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--route", required=True, help="the route clients named")
    common.add_argument("--until", help="YYYY-MM-DD (inclusive) or an ISO time (exclusive)")
    common.add_argument("--tenant", help="one tenant only")
    common.add_argument("--policy", help="the policy in force (env STRAIT_POLICY; default policies/demo.yaml)")
    common.add_argument("--capture", help="the capture store URL (env STRAIT_CAPTURE; default .strait/capture.db)")

    ex = datasets_sub.add_parser(
        "export",
        parents=[common],
        help="a fine-tuning file and manifest.json, leaving out what consent or licence forbid",
    )
    ex.add_argument("--since", required=True, help="YYYY-MM-DD or an ISO time (inclusive)")
    ex.add_argument("--format", required=True, choices=FORMATS)
    ex.add_argument(
        "--target", required=True, help="the model (or model family) to be trained: licences are checked against it"
    )
    ex.add_argument("--out", required=True, help="directory for the data file and manifest.json")
    ex.add_argument("--min-feedback", type=float, help="only answers rated at least this (-10..10)")
    ex.add_argument(
        "--with-corrections", action="store_true", help="write a correction instead of the answer it corrects"
    )
    ex.set_defaults(func=_export)

    cmp = datasets_sub.add_parser(
        "compare", parents=[common], help="live answers vs a candidate's (shadow copies and canary share)"
    )
    cmp.add_argument("--candidate", required=True, help="the candidate model (a policy model name)")
    cmp.add_argument("--since", help="YYYY-MM-DD or an ISO time (inclusive)")
    cmp.add_argument("--json", action="store_true", help="JSON instead of text")
    cmp.set_defaults(func=_compare)

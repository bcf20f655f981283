"""A candidate policy pasted into the console: `strait policy check` on it (the CLI's own check_policy, so the
same file:line:col reasons) and, when it loads, `strait policy diff` of the running policy against it over this
replica's recent decisions (gateway.stages.recent; the CLI's own replay.diff). Runs in a worker thread."""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from pathlib import Path

import msgspec

from gateway.policy.index import PolicyIndex
from gateway.policy.load import check_policy
from gateway.policy.replay import FeatureLine, diff

# The largest policy text accepted from the form (a policy directory's worth fits; bounded input).
MAX_CANDIDATE_BYTES = 512 * 1024
# The name the pasted text is checked under: the problems say `candidate.yaml:LINE:COL: reason`.
CANDIDATE_NAME = "candidate.yaml"


class CheckResult(msgspec.Struct, kw_only=True):
    ok: bool
    # Every problem as the CLI prints it (`candidate.yaml:3:5: reason`), errors and warnings.
    problems: list[str]
    errors: int
    warnings: int
    version: str | None = None
    # `strait policy diff` against the running policy over recent traffic, as the CLI prints it.
    diff: list[str] = []
    diff_samples: int = 0


def check_candidate(text: str, adapters: Iterable[str], live: PolicyIndex, samples: list[FeatureLine]) -> CheckResult:
    with tempfile.TemporaryDirectory(prefix="strait-candidate-") as folder:
        path = Path(folder) / CANDIDATE_NAME
        path.write_text(text, encoding="utf-8")
        policy, problems = check_policy(path, adapters=adapters, fresh=True)
    # The temporary folder is an implementation detail: the reasons name the file as the user knows it.
    shown = [str(p).replace(str(path), CANDIDATE_NAME) for p in problems if p.severity != "silenced"]
    errors = sum(p.severity == "error" for p in problems)
    warnings = sum(p.severity == "warning" for p in problems)
    if policy is None:
        return CheckResult(ok=False, problems=shown, errors=errors, warnings=warnings)
    candidate = PolicyIndex.of(policy)
    report = diff(live, candidate, samples)
    lines = report.render() if samples else ["no recent decisions on this replica to replay yet"]
    return CheckResult(
        ok=True,
        problems=shown,
        errors=errors,
        warnings=warnings,
        version=candidate.version,
        diff=lines,
        diff_samples=len(samples),
    )

"""`strait policy test`: every case gets its own verdict (malformed, unknown tenant or route, refused
policy), and `expect` checks code, status, any_of, plan and plan_any_order. Run through the CLI's main
with captured output."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from gateway.__main__ import main

ROOT = Path(__file__).resolve().parents[2]
POLICY = ROOT / "policies" / "eu-sovereignty.yaml"
CHAT = "{model: chat, messages: [{role: user, content: x}]}"


def _run(tmp_path: Path, cases: str, capsys: pytest.CaptureFixture[str], policy: Path = POLICY) -> tuple[int, str]:
    (tmp_path / "suite.yaml").write_text(f"policy: {policy}\ncases:\n" + textwrap.dedent(cases))
    code = main(["policy", "test", str(tmp_path)])
    return code, capsys.readouterr().out


def _verdicts(out: str) -> list[str]:
    return [line.split(" ", 1)[0] for line in out.splitlines() if line.startswith(("PASS", "FAIL"))]


def test_an_unknown_tenant_fails_its_case_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = _run(
        tmp_path,
        f"""\
        - name: typo in the tenant
          tenant: health-ue
          request: {CHAT}
          expect: {{deployment: mistral-small@gpu-frankfurt}}
        - name: the right tenant
          tenant: health-eu
          request: {CHAT}
          expect: {{deployment: mistral-small@gpu-frankfurt}}
        """,
        capsys,
    )
    assert code == 1
    assert _verdicts(out) == ["FAIL", "PASS"]
    assert "suite.yaml:3: typo in the tenant: unknown tenant 'health-ue' (the policy's tenants: health-eu, " in out
    assert "Traceback" not in out
    assert out.splitlines()[-1] == "1 passed, 1 failed"


def test_an_unknown_route_fails_its_case_unless_the_refusal_is_expected(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = _run(
        tmp_path,
        """\
        - name: typo in the route
          tenant: health-eu
          request: {model: caht, messages: [{role: user, content: x}]}
          expect: {deployment: mistral-small@gpu-frankfurt}
        - name: unknown routes are refused with 404
          tenant: health-eu
          request: {model: nope, messages: [{role: user, content: x}]}
          expect: {status: 404, code: model_not_found}
        """,
        capsys,
    )
    assert code == 1
    assert _verdicts(out) == ["FAIL", "PASS"]
    assert "unknown route 'caht' (the policy's routes: chat)" in out


def test_a_malformed_case_fails_only_itself_and_numeric_names_are_text(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = _run(
        tmp_path,
        f"""\
        - name: 404
          tenant: health-eu
          request: {CHAT}
          expect: {{deployment: mistral-small@gpu-frankfurt}}
        - name: no request
          tenant: health-eu
          expect: {{deployment: mistral-small@gpu-frankfurt}}
        - name: a typo in expect
          request: {CHAT}
          expect: {{deploymnet: x}}
        - just a string
        - name: signals of the wrong shape
          request: {CHAT}
          signals: {{unhealthy: 3}}
          expect: {{deployment: x}}
        """,
        capsys,
    )
    assert code == 1
    assert _verdicts(out) == ["PASS", "FAIL", "FAIL", "FAIL", "FAIL"]
    lines = out.splitlines()
    assert lines[0].startswith("PASS ") and ":3: 404: ->" in lines[0]
    assert ":7: no request: invalid case: Object missing required field `request`" in lines[1]
    assert ":10: a typo in expect: invalid case: Object contains unknown field `deploymnet`" in lines[2]
    assert ":13: case 4: invalid case:" in lines[3]
    assert ":14: signals of the wrong shape: cannot run this case:" in lines[4]


def test_a_policy_that_does_not_load_fails_its_file_and_other_files_still_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "broken-policy.yaml"
    broken.write_text("version: 1\nbackends: [{name: a, adapter: simulated, tier: orbit}]\n")
    (tmp_path / "a.yaml").write_text(f"policy: {broken}\ncases: []\n")
    (tmp_path / "b.yaml").write_text(
        f"policy: {POLICY}\ncases:\n  - name: ok\n    tenant: health-eu\n    request: {CHAT}\n"
        "    expect: {deployment: mistral-small@gpu-frankfurt}\n"
    )
    code = main(["policy", "test", str(tmp_path / "a.yaml"), str(tmp_path / "b.yaml")])
    out = capsys.readouterr().out
    assert code == 1
    assert f"FAIL {tmp_path / 'a.yaml'}: (policy): policy {broken} does not load:" in out
    assert "broken-policy.yaml:2:" in out  # the policy's own problem, with its place
    assert "PASS" in out and out.splitlines()[-1] == "1 passed, 1 failed"


def test_expect_any_of_plan_any_order_code_and_status(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = _run(
        tmp_path,
        f"""\
        - name: any_of holds
          tenant: marketing-us
          request: {CHAT}
          expect: {{any_of: [mistral-small@gpu-frankfurt, gpt-4o@openai-us]}}
        - name: any_of fails
          tenant: marketing-us
          request: {CHAT}
          expect: {{any_of: [mistral-small@gpu-frankfurt]}}
        - name: plan in any order
          tenant: marketing-us
          request: {CHAT}
          expect: {{plan_any_order: [mistral-small@mistral-api, gpt-4o@openai-us, mistral-small@gpu-frankfurt]}}
        - name: plan in any order, one missing
          tenant: marketing-us
          request: {CHAT}
          expect: {{plan_any_order: [gpt-4o@openai-us, mistral-small@gpu-frankfurt]}}
        - name: refusal with status and code
          tenant: health-eu
          request: {{model: chat, messages: [{{role: user, content: x}}], strait: {{jurisdictions: [US]}}}}
          expect: {{status: 403}}
        - name: wrong code
          tenant: health-eu
          request: {{model: chat, messages: [{{role: user, content: x}}], strait: {{jurisdictions: [US]}}}}
          expect: {{status: 403, code: not_this_code}}
        - name: a code expected, a plan given
          tenant: health-eu
          request: {CHAT}
          expect: {{code: model_not_found}}
        - name: headers narrow like the body does
          tenant: health-eu
          request: {CHAT}
          headers: {{x-strait-policy: '{{"jurisdictions": ["US"]}}'}}
          expect: {{status: 403, message_contains: outside what your tenant allows}}
        """,
        capsys,
    )
    assert code == 1
    assert _verdicts(out) == ["PASS", "FAIL", "PASS", "FAIL", "PASS", "FAIL", "FAIL", "PASS"]
    assert "expected one of ['mistral-small@gpu-frankfurt'], got gpt-4o@openai-us" in out
    assert "expected plan (any order) ['gpt-4o@openai-us', 'mistral-small@gpu-frankfurt'], got [" in out
    assert "expected code not_this_code, got " in out
    assert "expected a refusal (model_not_found), got plan ['mistral-small@gpu-frankfurt']" in out


def test_an_unreadable_test_file_is_one_failure(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "x.yaml").write_text("cases: [\n")
    (tmp_path / "y.yaml").write_text("policy: p.yaml\ncases: []\nextra: 1\n")
    assert main(["policy", "test", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "x.yaml: (file): cannot read test file:" in out
    assert "y.yaml: (file): unknown keys ['extra']" in out

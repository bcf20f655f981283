"""`strait policy explain`: costs in significant digits, the spill decision and the live signals read,
and its exit codes (0 plan, 2 refused by the policy, 1 could not run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.__main__ import main
from gateway.policy.tools import usd

DEMO = Path(__file__).resolve().parents[2] / "policies" / "demo.yaml"


def _explain(tmp_path: Path, capsys: pytest.CaptureFixture[str], *extra: str, model: str = "chat") -> tuple[int, str]:
    req = tmp_path / "req.json"
    req.write_text(json.dumps({"model": model, "messages": [{"role": "user", "content": "hello there"}]}))
    code = main(["policy", "explain", "--policy", str(DEMO), "--tenant", "demo", "--request", str(req), *extra])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_costs_keep_three_significant_digits() -> None:
    assert usd(0.0000104) == "0.0000104"
    assert usd(0.002583) == "0.00258"
    assert usd(1.2345) == "1.23"
    assert usd(123.4) == "123"
    assert usd(0) == "0"


@given(st.floats(min_value=1e-12, max_value=1e6, allow_nan=False))
def test_a_printed_cost_is_within_one_percent_and_never_zero_or_exponent(value: float) -> None:
    text = usd(value)
    assert "e" not in text
    assert float(text) > 0
    assert abs(float(text) - value) <= value * 0.01


def test_explain_shows_the_spill_decision_and_the_signals_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    signals = tmp_path / "signals.json"
    signals.write_text(
        json.dumps({"utilisation": {"edge-box": 1.0}, "latency_ms": {"edge-box": 120, "cloud-api": 300}})
    )
    code, out = _explain(tmp_path, capsys, "--signals", str(signals))
    assert code == 0
    assert "0.0000104" in out and "0.000000" not in out
    assert "spill: edge-box moved behind the others: utilisation 1.00 >= threshold 1.00" in out
    assert "live signals: latency_ms, utilisation" in out
    assert out.splitlines()[-1] == "plan: frontier-cloud@cloud-api -> llama-3.1-8b-edge@edge-box"


def test_explain_without_signals_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = _explain(tmp_path, capsys)
    assert code == 0
    assert "spill: none (no candidate over its route's spillover threshold)" in out
    assert "live signals: none given (every backend idle, nothing measured yet)" in out


def test_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = _explain(tmp_path, capsys, model="nope")
    assert (code, out.splitlines()[0]) == (
        2,
        "refused: 404 model_not_found: The model 'nope' does not exist or you do not have access to it.",
    )
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    code, out = _explain(tmp_path, capsys, "--signals", str(bad))
    assert code == 1 and "strait policy explain:" in out
    code, out = _explain(tmp_path, capsys, "--header", "no-colon")
    assert code == 1 and "is not 'name: value'" in out
    req = tmp_path / "req.json"
    assert main(["policy", "explain", "--policy", str(DEMO), "--tenant", "nobody", "--request", str(req)]) == 1
    assert "unknown tenant 'nobody'" in capsys.readouterr().err

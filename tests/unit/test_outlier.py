"""Outlier ejection, in process with a controlled clock: consecutive failures, error ratio, growing periods,
the cap on the share ejected, half-open probing and readmission."""

from __future__ import annotations

import pytest

from gateway.policy.model import Backend, OutlierPolicy
from gateway.upstream.outlier import OutlierTracker
from gateway.upstream.signals import LiveSignals


def backend(name: str, **outlier: object) -> Backend:
    return Backend(name=name, adapter="openai", base_url="http://x/v1", outlier=OutlierPolicy(**outlier))  # type: ignore[arg-type]


def signals(*backends: Backend, probed: tuple[str, ...] = ()) -> LiveSignals:
    s = LiveSignals()
    s.configure(backends, probed=probed)
    return s


def test_consecutive_failures_eject_and_a_success_resets_the_count() -> None:
    s = signals(backend("a", consecutive_failures=3, base_ejection_s=10), backend("b"))
    for t in (1.0, 2.0):
        assert s.failed("a", t) is None
    s.answered("a", "m@a", 0.1, now=2.5)  # resets the run
    assert s.failed("a", 3.0) is None and s.failed("a", 4.0) is None
    ejection = s.failed("a", 5.0)
    assert ejection is not None and ejection.until == 15.0 and "3 consecutive" in ejection.reason
    assert s.snapshot(5.0).unhealthy == {"a"}
    # Not probed: back when the period is over.
    assert s.snapshot(14.99).unhealthy == {"a"}
    assert s.snapshot(15.0).unhealthy == frozenset()


def test_error_ratio_over_the_window_ejects_without_a_long_run() -> None:
    s = signals(backend("a", consecutive_failures=0, error_ratio=0.5, min_requests=10, window_s=5), backend("b"))
    # Alternate success/failure: never 2 in a row, but half of them fail.
    t = 0.0
    for i in range(9):
        t += 0.1
        if i % 2:
            assert s.failed("a", t) is None
        else:
            s.answered("a", "m@a", 0.1, now=t)
    assert s.snapshot(t).unhealthy == frozenset()  # 9 attempts: below min_requests
    ejection = s.failed("a", t + 0.1)  # the 10th: 5 failures in 10
    assert ejection is not None and "5 failures in 10 attempts" in ejection.reason


def test_old_outcomes_leave_the_window() -> None:
    s = signals(backend("a", consecutive_failures=0, error_ratio=0.5, min_requests=4, window_s=5), backend("b"))
    for t in (0.0, 0.1, 0.2):
        s.failed("a", t)
    # 10 s later the three failures are out of the window: 1 failure in 4 is below the ratio.
    for t in (10.0, 10.1, 10.2):
        s.answered("a", "m@a", 0.1, now=t)
    assert s.failed("a", 10.3) is None


def test_ejection_periods_grow_and_are_capped() -> None:
    s = signals(backend("a", consecutive_failures=1, base_ejection_s=10, max_ejection_s=25), backend("b"))
    periods = []
    now = 0.0
    for _ in range(4):
        e = s.failed("a", now)
        assert e is not None
        periods.append(e.until - now)
        now = e.until
        assert s.snapshot(now).unhealthy == frozenset()  # back (no probe configured)
        now += 1.0  # fails again soon after coming back
    assert periods == [10.0, 20.0, 25.0, 25.0]


def test_the_multiplier_resets_after_a_healthy_stretch() -> None:
    s = signals(backend("a", consecutive_failures=1, base_ejection_s=10, max_ejection_s=30), backend("b"))
    e1 = s.failed("a", 0.0)
    assert e1 is not None
    s.snapshot(10.0)  # readmitted at 10
    s.answered("a", "m@a", 0.1, now=45.0)  # healthy for longer than max_ejection_s
    e2 = s.failed("a", 46.0)
    assert e2 is not None and e2.until - 46.0 == 10.0


@pytest.mark.parametrize(
    ("share", "backends", "ejectable"),
    [(0.5, 4, 2), (0.5, 2, 1), (0.1, 3, 1), (1.0, 3, 3), (0.0, 5, 1)],
)
def test_at_most_the_max_share_is_ejected_but_always_one(share: float, backends: int, ejectable: int) -> None:
    names = [f"b{i}" for i in range(backends)]
    s = signals(*(backend(n, consecutive_failures=1, max_ejected_share=share) for n in names))
    results = [s.failed(n, 1.0) for n in names]
    assert sum(r is not None for r in results) == ejectable
    assert len(s.snapshot(1.0).unhealthy) == ejectable
    assert s.outliers.refused_ejections == backends - ejectable


def test_half_open_a_probed_backend_stays_out_until_a_probe_succeeds() -> None:
    s = signals(backend("a", consecutive_failures=1, base_ejection_s=5, max_ejection_s=60), backend("b"), probed=("a",))
    assert s.failed("a", 0.0) is not None
    assert s.outliers.due_probes(4.0) == []
    # The period is over, but no traffic before a probe says so.
    assert s.snapshot(6.0).unhealthy == {"a"}
    assert s.outliers.due_probes(6.0) == ["a"]
    # A failed probe ejects it again, for longer (the second ejection in a row: 10 s).
    again = s.probe_result("a", False, 6.0)
    assert again is not None and again.until == 16.0
    assert s.outliers.due_probes(10.0) == []
    assert s.probe_result("a", True, 10.0) is None and s.snapshot(10.0).unhealthy == {"a"}  # too early: ignored
    s.probe_result("a", True, 16.5)
    assert s.snapshot(16.5).unhealthy == frozenset()


def test_active_probe_failures_count_as_failures_of_a_healthy_backend() -> None:
    s = signals(backend("a", consecutive_failures=2), backend("b"), probed=("a",))
    assert s.probe_result("a", False, 1.0) is None
    assert s.probe_result("a", False, 2.0) is not None
    assert s.snapshot(2.0).unhealthy == {"a"}


def test_a_deployment_is_ejected_alone_when_named() -> None:
    s = signals(backend("a", consecutive_failures=2), backend("b"))
    # The model m on backend a fails; n on the same backend answers in between (the backend's run restarts).
    s.failed("a", 1.0, label="m@a")
    s.answered("a", "n@a", 0.1, now=1.5)
    e = s.failed("a", 2.0, label="m@a")
    assert e is not None and e.key == "m@a"
    assert s.snapshot(2.0).unhealthy == {"m@a"}


def test_reload_forgets_removed_backends() -> None:
    s = signals(backend("a", consecutive_failures=1), backend("b"))
    s.failed("a", 0.0)
    assert s.snapshot(0.0).unhealthy == {"a"}
    s.configure([backend("b")], probed=())
    assert s.snapshot(0.0).unhealthy == frozenset()


def test_tracker_defaults_apply_to_a_backend_the_policy_does_not_name() -> None:
    t = OutlierTracker()
    for i in range(4):
        assert t.failure("x", float(i)) is None
    assert t.failure("x", 4.0) is not None  # Envoy's default: 5 in a row


def test_a_backend_and_its_deployments_take_one_place_in_the_ejected_share() -> None:
    """Found by loadtest/brownout.py: a backend ejected with its `model@backend` key took two places of
    the share, so with 4 backends (share 0.75) the third failing backend was never ejected."""
    names = ["p1", "p2", "p3", "fallback"]
    s = signals(*(backend(n, consecutive_failures=1, max_ejected_share=0.75) for n in names))
    for n in ("p1", "p2", "p3"):
        assert s.failed(n, 1.0, f"m-{n}@{n}") is not None
    assert s.snapshot(1.0).unhealthy == {"p1", "m-p1@p1", "p2", "m-p2@p2", "p3", "m-p3@p3"}
    assert s.outliers.refused_ejections == 0
    # The share is full: a fourth backend stays in, and so does a deployment of it.
    assert s.failed("fallback", 1.0, "m@fallback") is None
    assert s.outliers.refused_ejections == 2

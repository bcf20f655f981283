"""The soak's least-squares slope (loadtest/soak.py): what makes a leak read as a rate per hour."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loadtest.soak import SERIES, Sample, slope, trend, write


@given(
    xs=st.lists(st.integers(0, 100_000), min_size=2, max_size=60, unique=True),
    a=st.floats(-1e6, 1e6),
    b=st.floats(-1e3, 1e3),
)
def test_a_linear_series_gives_its_slope(xs: list[int], a: float, b: float) -> None:
    x = [v / 10 for v in xs]
    assert slope(x, [a + b * v for v in x]) == pytest.approx(b, rel=1e-7, abs=1e-6)


@settings(max_examples=50)
@given(
    xs=st.lists(st.integers(0, 10_000), min_size=3, max_size=40, unique=True),
    b=st.floats(-100, 100),
    noise=st.lists(st.sampled_from([-1.0, 1.0]), min_size=40, max_size=40),
)
def test_symmetric_noise_around_a_line_does_not_move_the_slope_much(
    xs: list[int], b: float, noise: list[float]
) -> None:
    x = sorted(v / 10 for v in xs)
    ys = [b * v + n for v, n in zip(x, noise, strict=False)]
    mx = sum(x) / len(x)
    # Noise of +-1 tilts the fit by sum((x - mx) * n) / sum((x - mx)^2), at most this (Cauchy's bound):
    bound = sum(abs(v - mx) for v in x) / sum((v - mx) ** 2 for v in x)
    assert abs(slope(x, ys) - b) <= bound + 1e-9 * (1 + abs(b))


def test_slope_needs_two_distinct_points() -> None:
    with pytest.raises(ValueError):
        slope([1.0], [2.0])
    with pytest.raises(ValueError):
        slope([3.0, 3.0], [1.0, 2.0])


def _samples(minutes: int, rss_per_minute: float) -> list[Sample]:
    return [
        Sample(
            t_s=60.0 * m,
            rss_mb=100 + rss_per_minute * m,
            open_fds=40,
            tasks=12,
            redis_keys=6,
            requests=100.0 * m,
            rps=100.0 if m else math.nan,
        )
        for m in range(minutes + 1)
    ]


def test_trend_reports_per_hour_and_the_second_half() -> None:
    samples = _samples(10, 0.5)  # 0.5 MiB a minute: 30 MiB an hour
    t = trend(samples, "rss_mb")
    assert (t.start, t.end, t.low, t.high) == (100, 105, 100, 105)
    assert t.per_hour == pytest.approx(30) and t.per_hour_second_half == pytest.approx(30)
    assert trend(samples, "open_fds").per_hour == 0


def test_soak_report_table_and_plot(tmp_path: Path) -> None:
    args = argparse.Namespace(soak_seconds=600.0, soak_concurrency=8, soak_interval=60.0)
    results = {"loadgen-json": {"count": 6000, "errors": 0, "rps": 10.0}}
    paths = write(_samples(10, 0.5), results, args, tmp_path, "header")
    text = paths["soak"].read_text()
    assert "| gateway RSS (MiB) | 100.0 | 105.0 | 100.0 | 105.0 | +30.0 | +30.0 |" in text
    assert "| open file descriptors (fds) | 40.0 | 40.0 | 40.0 | 40.0 | +0.0 | +0.0 |" in text
    assert "| loadgen-json | 6000 | 0 | 10 |" in text
    assert len([line for line in text.splitlines() if line.startswith("| ") and "per hour" not in line]) >= len(SERIES)
    data = paths["plot"].read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000

"""Engine metrics pages -> utilisation and queue depth: a recorded llama.cpp page, SGLang and TGI pages in their
documented format, vLLM's (old and new KV names) as the fake upstream renders it; malformed pages never crash."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.upstream.scrape import MetricsPageError, parse, samples
from tests.harness.fake_faults import Metrics

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def test_llamacpp_recorded_busy_page() -> None:
    g = parse((FIXTURES / "llamacpp" / "metrics_busy.txt").read_text())
    assert (g.format, g.running, g.waiting, g.kv) == ("llamacpp", 1.0, 1.0, None)
    # A request deferred: the engine is full, whatever the slots.
    assert g.utilisation(None) == 1.0


def test_llamacpp_recorded_idle_page() -> None:
    g = parse((FIXTURES / "llamacpp" / "metrics_idle.txt").read_text(), "llamacpp")
    assert (g.running, g.waiting) == (0.0, 0.0)
    assert g.utilisation(4) == 0.0


def test_sglang_page() -> None:
    g = parse((FIXTURES / "metrics" / "sglang.txt").read_text())
    assert (g.format, g.running, g.waiting, g.kv) == ("sglang", 162.0, 2826.0, 0.28)
    assert g.utilisation(None) == 1.0  # a queue of 2826: full


def test_tgi_page_has_no_kv_gauge() -> None:
    g = parse((FIXTURES / "metrics" / "tgi.txt").read_text(), "tgi")
    assert (g.format, g.running, g.waiting, g.kv) == ("tgi", 8.0, 3.0, None)


@pytest.mark.parametrize("kv_names", [["kv_cache_usage_perc", "gpu_cache_usage_perc"], ["gpu_cache_usage_perc"]])
def test_vllm_page_as_the_fake_serves_it(kv_names: list[str]) -> None:
    m = Metrics("fake-model", slots=4)
    m.set({"kv_names": kv_names})
    g = parse(m.render(inflight=3, generation_tokens=10))
    assert (g.format, g.running, g.waiting, g.kv) == ("vllm", 3.0, 0.0, 0.75)
    assert g.utilisation(None) == 0.75
    busy = parse(m.render(inflight=6, generation_tokens=10), "vllm")
    assert (busy.running, busy.waiting, busy.kv) == (4.0, 2.0, 1.0)


def test_running_over_max_concurrency_without_a_kv_gauge() -> None:
    g = parse("tgi_batch_current_size 3\ntgi_queue_size 0\n")
    assert g.utilisation(4) == 0.75
    assert g.utilisation(None) == 0.0  # nothing says how full it is


def test_samples_are_summed_over_label_sets() -> None:
    page = (
        'vllm:num_requests_running{engine="0",model_name="m"} 2\n'
        'vllm:num_requests_running{engine="1",model_name="m"} 3\n'
        'vllm:num_requests_waiting{engine="0",model_name="m {odd} \\"q\\""} 1 1700000000000\n'
        'vllm:kv_cache_usage_perc{engine="0"} 0.4\nvllm:kv_cache_usage_perc{engine="1"} 0.9\n'
    )
    g = parse(page)
    assert (g.running, g.waiting, g.kv) == (5.0, 1.0, 0.9)


@pytest.mark.parametrize(
    "page",
    ["", "# only comments\n", "some_other_metric 1\n", "vllm:num_requests_running NaN\n", "<html>502</html>"],
)
def test_a_page_without_known_gauges_is_an_error(page: str) -> None:
    with pytest.raises(MetricsPageError):
        parse(page)


def test_the_wrong_format_is_an_error_not_zero_load() -> None:
    with pytest.raises(MetricsPageError, match="no sglang load gauges"):
        parse((FIXTURES / "metrics" / "tgi.txt").read_text(), "sglang")


def test_bad_values_are_ignored() -> None:
    page = "vllm:num_requests_running -3\nvllm:num_requests_running +Inf\nvllm:num_requests_running 2\n"
    assert samples(page) == {"vllm:num_requests_running": [2.0]}


NAMES = st.sampled_from(
    ["vllm:num_requests_running", "vllm:num_requests_waiting", "sglang:num_queue_reqs", "tgi_queue_size", "x", "#"]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(NAMES, st.text(max_size=30), st.text(max_size=12)), max_size=20), st.text(max_size=200))
def test_parse_never_crashes_on_untrusted_pages(lines: list[tuple[str, str, str]], noise: str) -> None:
    page = "\n".join(f"{n}{{{labels}}} {value}" for n, labels, value in lines) + "\n" + noise
    try:
        g = parse(page)
    except MetricsPageError:
        return
    assert g.running >= 0 and g.waiting >= 0
    assert 0.0 <= g.utilisation(8) <= 1.0


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 10_000), st.integers(0, 10_000), st.floats(0, 1))
def test_rendered_gauges_round_trip(running: int, waiting: int, kv: float) -> None:
    page = (
        f'# TYPE sglang:num_running_reqs gauge\nsglang:num_running_reqs{{model_name="a"}} {running}\n'
        f'sglang:num_queue_reqs{{model_name="a"}} {float(waiting)!r}\nsglang:token_usage{{model_name="a"}} {kv!r}\n'
    )
    g = parse(page)
    assert (g.running, g.waiting, g.kv) == (running, waiting, kv)

"""parse_in_flight on /metrics pages written the way vLLM writes them."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from types import ModuleType

import pytest

from spotguard.observability import SCRAPE_ERRORS
from spotguard.vllm import (
    follow_engine,
    settled_in_flight,
    InFlight,
    MetricsFormatError,
    ScrapeConnectionError,
    ScrapeError,
    ScrapeHTTPError,
    ScrapeTimeoutError,
    parse_in_flight,
)

PRESTOP = Path(__file__).resolve().parents[2] / "daemonset" / "files" / "vllm-drain-prestop.py"

# A V1 engine with two data-parallel engines, as `vllm serve --data-parallel-size 2` exports it:
# HELP/TYPE lines, one series per engine, the by-reason split of the waiting queue, counters with
# their _created companions, and histograms.
TWO_ENGINES = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 7.0
vllm:num_requests_running{engine="1",model_name="meta-llama/Llama-3.1-8B-Instruct"} 5.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 3.0
vllm:num_requests_waiting{engine="1",model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.0
# HELP vllm:num_requests_waiting_by_reason Number of requests waiting, by reason.
# TYPE vllm:num_requests_waiting_by_reason gauge
vllm:num_requests_waiting_by_reason{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct",reason="capacity"} 2.0
vllm:num_requests_waiting_by_reason{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct",reason="deferred"} 1.0
vllm:num_requests_waiting_by_reason{engine="1",model_name="meta-llama/Llama-3.1-8B-Instruct",reason="capacity"} 0.0
vllm:num_requests_waiting_by_reason{engine="1",model_name="meta-llama/Llama-3.1-8B-Instruct",reason="deferred"} 0.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.42
vllm:kv_cache_usage_perc{engine="1",model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.61
# HELP vllm:request_success_total Count of successfully processed requests.
# TYPE vllm:request_success_total counter
vllm:request_success_total{engine="0",finished_reason="stop",model_name="meta-llama/Llama-3.1-8B-Instruct"} 120.0
vllm:request_success_total{engine="0",finished_reason="abort",model_name="meta-llama/Llama-3.1-8B-Instruct"} 2.0
# HELP vllm:request_success_created Count of successfully processed requests.
# TYPE vllm:request_success_created gauge
vllm:request_success_created{engine="0",finished_reason="stop",model_name="meta-llama/Llama-3.1-8B-Instruct"} 1.7e+09
# HELP vllm:e2e_request_latency_seconds Histogram of e2e request latency in seconds.
# TYPE vllm:e2e_request_latency_seconds histogram
vllm:e2e_request_latency_seconds_bucket{engine="0",le="0.3",model_name="meta-llama/Llama-3.1-8B-Instruct"} 4.0
vllm:e2e_request_latency_seconds_bucket{engine="0",le="+Inf",model_name="meta-llama/Llama-3.1-8B-Instruct"} 122.0
vllm:e2e_request_latency_seconds_count{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 122.0
vllm:e2e_request_latency_seconds_sum{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 301.5
"""

# An older server (V0 engine): no engine label, the cache gauge under its old name, and a
# swapped-requests gauge that is not part of in-flight.
OLD_SERVER = """\
# HELP vllm:num_requests_running Number of requests currently running on GPU.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="facebook/opt-125m"} 4.0
# HELP vllm:num_requests_swapped Number of requests swapped to CPU.
# TYPE vllm:num_requests_swapped gauge
vllm:num_requests_swapped{model_name="facebook/opt-125m"} 9.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="facebook/opt-125m"} 1.0
# HELP vllm:gpu_cache_usage_perc GPU KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{model_name="facebook/opt-125m"} 0.25
"""

IDLE_ONE_ENGINE = """\
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 0.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 0.0
# TYPE vllm:num_requests_waiting_by_reason gauge
vllm:num_requests_waiting_by_reason{engine="0",model_name="m",reason="capacity"} 0.0
"""


def _load_prestop() -> ModuleType:
    spec = importlib.util.spec_from_file_location("vllm_drain_prestop", PRESTOP)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_running_and_waiting_are_summed_over_engines() -> None:
    got = parse_in_flight(TWO_ENGINES)
    assert (got.running, got.waiting, got.total, got.engines) == (12.0, 3.0, 15.0, 2)


def test_waiting_by_reason_is_not_counted() -> None:
    # 3 waiting, not 3 + 2 + 1 from the by-reason split of the same queue.
    assert parse_in_flight(TWO_ENGINES).waiting == 3.0


def test_kv_cache_usage_reports_the_fullest_engine() -> None:
    assert parse_in_flight(TWO_ENGINES).kv_cache_usage == pytest.approx(0.61)


def test_server_without_engine_label_counts_as_one_engine() -> None:
    got = parse_in_flight(OLD_SERVER)
    assert got == InFlight(running=4.0, waiting=1.0, engines=1, kv_cache_usage=0.25)


def test_swapped_requests_are_not_in_flight() -> None:
    assert parse_in_flight(OLD_SERVER).total == 5.0


def test_new_kv_cache_name_wins_over_the_old_one() -> None:
    text = IDLE_ONE_ENGINE + 'vllm:gpu_cache_usage_perc{engine="0"} 0.9\nvllm:kv_cache_usage_perc{engine="0"} 0.3\n'
    assert parse_in_flight(text).kv_cache_usage == pytest.approx(0.3)


def test_kv_cache_usage_is_none_when_not_exported() -> None:
    assert parse_in_flight(IDLE_ONE_ENGINE).kv_cache_usage is None


def test_unusable_kv_cache_usage_is_dropped_not_fatal() -> None:
    assert parse_in_flight(IDLE_ONE_ENGINE + 'vllm:kv_cache_usage_perc{engine="0"} NaN\n').kv_cache_usage is None


def test_idle_server_has_nothing_in_flight() -> None:
    got = parse_in_flight(IDLE_ONE_ENGINE)
    assert (got.total, got.engines) == (0.0, 1)


def test_several_models_on_one_server_are_summed() -> None:
    text = ('vllm:num_requests_running{model_name="a"} 1\nvllm:num_requests_running{model_name="b"} 2\n'
            'vllm:num_requests_waiting{model_name="a"} 3\nvllm:num_requests_waiting{model_name="b"} 4\n')
    assert parse_in_flight(text).total == 10.0


def test_samples_without_type_lines_and_with_timestamps_are_read() -> None:
    text = "vllm:num_requests_running 2 1700000000000\nvllm:num_requests_waiting 1 1700000000000\n"
    assert parse_in_flight(text).total == 3.0


def test_label_values_with_quotes_and_braces_do_not_confuse_the_parser() -> None:
    text = ('vllm:num_requests_running{model_name="we\\"ird} name",engine="0"} 2\n'
            'vllm:num_requests_waiting{model_name="we\\"ird} name",engine="0"} 1\n')
    assert parse_in_flight(text).total == 3.0


@pytest.mark.parametrize("text", [
    "",
    "# HELP only comments\n# TYPE vllm:num_requests_running gauge\n",
    'vllm:num_requests_running{engine="0"} 1\n',  # waiting missing: a half count could end a drain early
    'vllm:num_requests_waiting{engine="0"} 1\n',
    'vllm:num_requests_waiting_by_reason{reason="capacity"} 1\nvllm:num_requests_running 0\n',
    "vllm_num_requests_running 1\nvllm_num_requests_waiting 1\n",  # underscores: not vLLM's names
])
def test_missing_gauges_are_a_format_error(text: str) -> None:
    with pytest.raises(MetricsFormatError):
        parse_in_flight(text)


@pytest.mark.parametrize("value", ["NaN", "-1", "+Inf", "-Inf"])
def test_impossible_counts_are_a_format_error(value: str) -> None:
    text = f"vllm:num_requests_running {value}\nvllm:num_requests_waiting 0\n"
    with pytest.raises(MetricsFormatError, match="not a count"):
        parse_in_flight(text)


@pytest.mark.parametrize("text", [
    "<html><body>502 Bad Gateway</body></html>",
    'vllm:num_requests_running{engine="0" 1\nvllm:num_requests_waiting 0\n',
    "vllm:num_requests_running one\nvllm:num_requests_waiting 0\n",
    '{"running": 1}',
    "\x00\x01\x02",
])
def test_garbage_is_a_format_error(text: str) -> None:
    with pytest.raises(MetricsFormatError) as caught:
        parse_in_flight(text)
    assert caught.value.reason == "bad_body"


def test_every_scrape_error_reason_is_one_the_metrics_know() -> None:
    errors = [ScrapeConnectionError("x"), ScrapeTimeoutError("x"), ScrapeHTTPError(503, "x"),
              MetricsFormatError("x")]
    assert sorted(e.reason for e in errors) == sorted(SCRAPE_ERRORS)
    assert all(isinstance(e, ScrapeError) for e in errors)


def test_in_flight_is_immutable() -> None:
    got = parse_in_flight(IDLE_ONE_ENGINE)
    with pytest.raises(AttributeError):
        got.running = 1.0  # type: ignore[misc]


# --- the preStop hook's stdlib parser follows the same rules ------------------------------------

def test_prestop_parser_agrees_on_vllm_pages() -> None:
    prestop = _load_prestop()
    for text in (TWO_ENGINES, OLD_SERVER, IDLE_ONE_ENGINE):
        assert prestop.in_flight(text) == parse_in_flight(text).total


def test_prestop_parser_ignores_waiting_by_reason_and_lookalikes() -> None:
    prestop = _load_prestop()
    text = ('vllm:num_requests_running_total 50\nvllm:num_requests_running{engine="0"} 1\n'
            'vllm:num_requests_waiting{engine="0"} 2\n'
            'vllm:num_requests_waiting_by_reason{engine="0",reason="capacity"} 2\n')
    assert prestop.in_flight(text) == 3.0


@pytest.mark.parametrize("text", ["", "garbage", "vllm:num_requests_running 1\n",
                                  "vllm:num_requests_running NaN\nvllm:num_requests_waiting 0\n"])
def test_prestop_parser_returns_none_when_it_cannot_tell(text: str) -> None:
    assert _load_prestop().in_flight(text) is None


def test_prestop_parser_handles_quoted_braces_in_labels() -> None:
    text = ('vllm:num_requests_running{model_name="a} b",engine="0"} 2\n'
            'vllm:num_requests_waiting{model_name="a\\" }",engine="0"} 1 1700000000\n')
    got = _load_prestop().in_flight(text)
    assert got is not None and math.isclose(got, 3.0)


def test_without_any_vllm_series_the_error_names_disable_log_stats() -> None:
    with pytest.raises(MetricsFormatError, match="--disable-log-stats"):
        parse_in_flight('python_info{implementation="CPython"} 1.0\n')


STEPS = ('# TYPE vllm:iteration_tokens_total histogram\n'
         'vllm:iteration_tokens_total_count{engine="0",model_name="m"} %d\n'
         'vllm:iteration_tokens_total_count{engine="1",model_name="m"} 5\n')


def reading(running: int, steps: int | None) -> InFlight:
    text = (f'vllm:num_requests_running{{engine="0",model_name="m"}} {running}\n'
            'vllm:num_requests_waiting{engine="0",model_name="m"} 0\n')
    return parse_in_flight(text + (STEPS % steps if steps is not None else ""))


def test_engine_steps_are_summed_over_engines() -> None:
    assert reading(1, 10).engine_steps == 15.0
    assert reading(1, None).engine_steps is None


def test_gauges_are_trusted_while_the_engine_steps() -> None:
    activity = None
    for t, steps in ((0.0, 10), (0.5, 11), (1.0, 12), (1.5, 13)):
        activity = follow_engine(activity, reading(2, steps), now=t)
        assert settled_in_flight(reading(2, steps), activity, now=t) == 2


def test_gauges_that_stand_still_without_engine_steps_are_stale() -> None:
    activity = follow_engine(None, reading(3, 40), now=0.0)
    assert settled_in_flight(reading(3, 40), activity, now=0.9) == 3
    activity = follow_engine(activity, reading(3, 40), now=1.0)
    assert activity is not None and activity.since == 0.0
    assert settled_in_flight(reading(3, 40), activity, now=1.0) == 0


def test_without_a_step_counter_the_gauges_are_all_there_is() -> None:
    assert settled_in_flight(reading(3, None), follow_engine(None, reading(3, None), now=0.0), now=60.0) == 3

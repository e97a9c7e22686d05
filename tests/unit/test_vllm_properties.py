"""Properties of the /metrics parsers: outside input never crashes them, and vLLM pages add up."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from types import ModuleType

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spotguard.vllm import InFlight, ScrapeError, parse_in_flight

PRESTOP = Path(__file__).resolve().parents[2] / "daemonset" / "files" / "vllm-drain-prestop.py"

# deadline=None: the machine is shared with a large build, and timing is not the property here.
FUZZ = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])

SEED_PAGE = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 1.0
vllm:num_requests_waiting_by_reason{engine="0",model_name="m",reason="capacity"} 1.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.5
# TYPE vllm:e2e_request_latency_seconds histogram
vllm:e2e_request_latency_seconds_bucket{engine="0",le="+Inf",model_name="m"} 2.0
vllm:e2e_request_latency_seconds_count{engine="0",model_name="m"} 2.0
vllm:e2e_request_latency_seconds_sum{engine="0",model_name="m"} 1.5
"""


def _load_prestop() -> ModuleType:
    spec = importlib.util.spec_from_file_location("vllm_drain_prestop", PRESTOP)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_prestop = _load_prestop()


def _parse_or_scrape_error(text: str) -> InFlight | None:
    """parse_in_flight's whole contract on any input: an InFlight, or a ScrapeError (nothing else)."""
    try:
        got = parse_in_flight(text)
    except ScrapeError as exc:
        assert exc.reason == "bad_body"
        return None
    assert got.running >= 0 and got.waiting >= 0 and got.engines >= 1
    assert math.isfinite(got.total)
    return got


@st.composite
def mutated_pages(draw: st.DrawFn) -> str:
    """A real page with random edits: reaches far deeper into the parser than random text does."""
    page = SEED_PAGE
    for _ in range(draw(st.integers(min_value=1, max_value=6))):
        at = draw(st.integers(min_value=0, max_value=len(page)))
        kind = draw(st.sampled_from(["insert", "delete", "replace"]))
        piece = draw(st.text(alphabet=st.sampled_from('{}"=,\\ \n#:_.-+eEaINf0123456789'), max_size=4))
        if kind == "insert":
            page = page[:at] + piece + page[at:]
        elif kind == "delete":
            page = page[:at] + page[at + len(piece) + 1:]
        else:
            page = page[:at] + piece + page[at + len(piece):]
    return page


@FUZZ
@given(st.text())
def test_arbitrary_text_gives_in_flight_or_scrape_error(text: str) -> None:
    _parse_or_scrape_error(text)
    _prestop.in_flight(text)  # the hook's parser must not raise either


@FUZZ
@given(mutated_pages())
def test_damaged_vllm_pages_give_in_flight_or_scrape_error(text: str) -> None:
    _parse_or_scrape_error(text)
    _prestop.in_flight(text)


_counts = st.one_of(st.integers(min_value=0, max_value=100_000).map(float),
                    st.floats(min_value=0, max_value=1e6, allow_nan=False, allow_infinity=False))


@st.composite
def vllm_pages(draw: st.DrawFn) -> tuple[str, float, int]:
    """A well-formed page for 1..8 engines (and 1..3 models), lines in any order; with the expected sum."""
    engines = draw(st.integers(min_value=1, max_value=8))
    models = draw(st.lists(st.text(alphabet="abcdefghij/-._ 0123456789", min_size=1, max_size=12),
                           min_size=1, max_size=3, unique=True))
    lines: list[str] = []
    expected = 0.0
    for model in models:
        for engine in range(engines):
            labels = f'engine="{engine}",model_name="{model}"'
            running, waiting, by_reason = draw(_counts), draw(_counts), draw(_counts)
            expected += running + waiting
            lines += [f"vllm:num_requests_running{{{labels}}} {running!r}",
                      f"vllm:num_requests_waiting{{{labels}}} {waiting!r}",
                      f'vllm:num_requests_waiting_by_reason{{{labels},reason="capacity"}} {by_reason!r}',
                      f"vllm:num_requests_swapped{{{labels}}} {draw(_counts)!r}"]
    order = draw(st.permutations(lines))
    if draw(st.booleans()):
        order = ["# HELP vllm:num_requests_running Requests running.",
                 "# TYPE vllm:num_requests_running gauge"] + list(order)
    return "\n".join(order) + "\n", expected, engines


@FUZZ
@given(vllm_pages())
def test_in_flight_is_the_sum_over_every_engine_and_model(page: tuple[str, float, int]) -> None:
    text, expected, engines = page
    got = parse_in_flight(text)
    assert math.isclose(got.total, expected, rel_tol=1e-9, abs_tol=1e-6)
    assert got.engines == engines
    hook = _prestop.in_flight(text)
    assert hook is not None and math.isclose(hook, expected, rel_tol=1e-9, abs_tol=1e-6)

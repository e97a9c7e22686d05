"""Whatever the metadata server (or something pretending to be it) sends, the GCE parsers either
return a value or raise MetadataBodyError: nothing else may escape into the watch loop."""

from __future__ import annotations

import json
from typing import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spotguard.providers.gce import (
    MAINTENANCE_EVENTS,
    MetadataBodyError,
    parse_maintenance_event,
    parse_preempted,
    parse_upcoming_maintenance,
)

PARSERS: list[Callable[[bytes | str], object]] = [parse_preempted, parse_maintenance_event,
                                                   parse_upcoming_maintenance]

# JSON shaped like the upcoming-maintenance answer, with arbitrary values in its fields, to reach
# the timestamp parsing that random bytes almost never get to.
_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=8,
)
_upcoming_like = st.fixed_dictionaries(
    {}, optional={"window_start_time": _json_values | st.datetimes().map(lambda d: d.isoformat()),
                  "windowStartTime": _json_values, "maintenance_status": _json_values},
).map(json.dumps)


def _only_body_errors(parse: Callable[[bytes | str], object], body: bytes | str) -> None:
    try:
        parse(body)
    except MetadataBodyError:
        pass


@pytest.mark.parametrize("parse", PARSERS, ids=lambda p: p.__name__)
@settings(max_examples=1000, deadline=None)
@given(body=st.binary(max_size=512))
def test_parsers_raise_only_body_errors_on_arbitrary_bytes(parse: Callable[[bytes | str], object],
                                                           body: bytes) -> None:
    _only_body_errors(parse, body)


@pytest.mark.parametrize("parse", PARSERS, ids=lambda p: p.__name__)
@settings(max_examples=1000, deadline=None)
@given(body=st.text(max_size=512))
def test_parsers_raise_only_body_errors_on_arbitrary_text(parse: Callable[[bytes | str], object],
                                                          body: str) -> None:
    _only_body_errors(parse, body)


@settings(max_examples=1000, deadline=None)
@given(body=_upcoming_like)
def test_upcoming_maintenance_returns_a_finite_time_or_body_error(body: str) -> None:
    try:
        result = parse_upcoming_maintenance(body)
    except MetadataBodyError:
        return
    assert result is None or isinstance(result, float)


@settings(max_examples=1000, deadline=None)
@given(event=st.sampled_from(sorted(MAINTENANCE_EVENTS)), padding=st.sampled_from(["", "\n", " \r\n"]))
def test_maintenance_event_round_trips_known_values(event: str, padding: str) -> None:
    assert parse_maintenance_event((event + padding).encode()) == event

"""The AWS provider's pure parts: the instance-action and rebalance parsers and the deadline rule."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spotguard.notice import NoticeKind
from spotguard.providers.aws import (
    ACTIONS,
    DEFAULT_SPOT_NOTICE_SECONDS,
    InstanceAction,
    notice_for,
    parse_instance_action,
    parse_rebalance,
)
from spotguard.providers.http import MAX_BODY_BYTES, MetadataBodyError

T0 = 1_700_000_000.0


@pytest.mark.parametrize("action", ["terminate", "stop", "hibernate"])
def test_instance_action_as_documented(action):
    body = json.dumps({"action": action, "time": "2017-09-18T08:22:00Z"}).encode()
    assert parse_instance_action(body) == InstanceAction(action=action, at=1505722920.0)


@pytest.mark.parametrize("time_field", [None, 1505722920, "", "tomorrow", "2017-09-18T08:22:00"])
def test_an_unreadable_time_keeps_the_action_and_drops_the_time(time_field):
    data: dict[str, object] = {"action": "terminate"}
    if time_field is not None:
        data["time"] = time_field
    assert parse_instance_action(json.dumps(data)) == InstanceAction(action="terminate", at=None)


@pytest.mark.parametrize("body, message", [
    (b"<html>502</html>", "not JSON"),
    (b'["terminate"]', "expected a JSON object"),
    (b'{"action": "reboot", "time": "2017-09-18T08:22:00Z"}', "action is not one of"),
    (b'{"time": "2017-09-18T08:22:00Z"}', "action is not one of"),
    (b"\xff\xfe", "not UTF-8"),
    (b" " * (MAX_BODY_BYTES + 1), "larger than"),
])
def test_garbage_instance_action_is_a_body_error_naming_the_key(body, message):
    with pytest.raises(MetadataBodyError, match=message) as raised:
        parse_instance_action(body)
    assert str(raised.value).startswith("spot/instance-action")


def test_rebalance_gives_its_notice_time_and_rejects_anything_else():
    assert parse_rebalance(b'{"noticeTime": "2020-10-27T08:22:00Z"}') == "2020-10-27T08:22:00Z"
    for body in (b"{}", b'{"noticeTime": 5}', b"garbage", b"[]"):
        with pytest.raises(MetadataBodyError, match="events/recommendations/rebalance"):
            parse_rebalance(body)


def test_the_deadline_is_ec2s_time_whenever_it_is_readable():
    notice = notice_for(InstanceAction("stop", at=T0 + 118), first_seen=T0, notice_seconds=30)
    assert notice is not None
    assert (notice.kind, notice.deadline, notice.detail, notice.source) == \
        (NoticeKind.PREEMPTION, T0 + 118, "stop", "aws:spot/instance-action")


def test_without_a_time_the_deadline_counts_from_the_first_sighting():
    action = InstanceAction("terminate", at=None)
    assert notice_for(action, first_seen=T0, notice_seconds=None).deadline == T0 + DEFAULT_SPOT_NOTICE_SECONDS
    assert notice_for(action, first_seen=T0, notice_seconds=90).deadline == T0 + 90


def test_no_action_is_no_notice():
    assert notice_for(None, first_seen=None, notice_seconds=None) is None


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=300), st.text(max_size=300).map(str.encode),
                 st.dictionaries(st.sampled_from(["action", "time", "noticeTime"]),
                                 st.one_of(st.text(max_size=30), st.integers(), st.none(),
                                           st.sampled_from(["terminate", "stop", "2017-09-18T08:22:00Z"])))
                 .map(lambda d: json.dumps(d).encode())))
def test_any_body_parses_or_is_a_body_error(body):
    # Anything else raised (TypeError, KeyError, ...) fails the test; what parses is well formed.
    try:
        action = parse_instance_action(body)
    except MetadataBodyError:
        pass
    else:
        assert action.action in ACTIONS and (action.at is None or math.isfinite(action.at))
    try:
        notice_time = parse_rebalance(body)
    except MetadataBodyError:
        pass
    else:
        assert isinstance(notice_time, str)

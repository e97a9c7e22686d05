"""The AWS provider's pure parts: the instance-action, rebalance and scheduled-event parsers and the
deadline rules."""

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
    ScheduledEvent,
    asg_notice,
    earliest,
    notice_for,
    parse_instance_action,
    parse_lifecycle_state,
    parse_rebalance,
    parse_scheduled_events,
    rebalance_notice,
    scheduled_notice,
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


# What IMDS serves, as AWS's documentation shows it (times in its own format, day possibly padded).
SCHEDULED = [{"NotBefore": "21 Jan 2019 09:00:43 GMT", "Code": "system-reboot", "Description": "scheduled reboot",
              "EventId": "instance-event-0d59937288b749b32", "NotAfter": "21 Jan 2019 09:17:23 GMT",
              "State": "active"}]
NOT_BEFORE = 1548061243.0   # 2019-01-21T09:00:43Z


def test_a_scheduled_event_as_documented():
    assert parse_scheduled_events(json.dumps(SCHEDULED)) == (
        ScheduledEvent(code="system-reboot", event_id="instance-event-0d59937288b749b32", not_before=NOT_BEFORE,
                       ended=False),)
    padded = [{**SCHEDULED[0], "NotBefore": " 1 Feb 2019 09:00:43 GMT"}]
    assert parse_scheduled_events(json.dumps(padded))[0].not_before == 1549011643.0
    assert parse_scheduled_events(b"[]") == ()


@pytest.mark.parametrize("change", [{"Description": "[Canceled] scheduled reboot"},
                                    {"Description": "[Completed] scheduled reboot"},
                                    {"State": "completed"}, {"State": "canceled"}])
def test_a_cancelled_or_completed_event_is_listed_but_ended(change):
    [event] = parse_scheduled_events(json.dumps([{**SCHEDULED[0], **change}]))
    assert event.ended


@pytest.mark.parametrize("body, message", [
    (b'{"Code": "system-reboot"}', "expected a JSON list"),
    (b'[{"Code": "system-reboot"}]', "without Code and NotBefore"),
    (b'["system-reboot"]', "without Code and NotBefore"),
    (json.dumps([{**SCHEDULED[0], "NotBefore": "2019-01-21T09:00:43Z"}]).encode(), "NotBefore is not like"),
    (b"<html>", "not JSON"),
])
def test_garbage_scheduled_events_are_a_body_error_naming_the_key(body, message):
    with pytest.raises(MetadataBodyError, match=message) as raised:
        parse_scheduled_events(body)
    assert str(raised.value).startswith("events/maintenance/scheduled")


def event(not_before: float, *, ended: bool = False, code: str = "system-reboot") -> ScheduledEvent:
    return ScheduledEvent(code=code, event_id=f"instance-event-{int(not_before)}", not_before=not_before, ended=ended)


def test_a_scheduled_event_is_a_notice_only_from_the_lead_time_before_it():
    events = (event(T0 + 7200),)
    assert scheduled_notice(events, now=T0, lead_seconds=3600) is None
    assert scheduled_notice(events, now=T0 + 3599, lead_seconds=3600) is None
    notice = scheduled_notice(events, now=T0 + 3600, lead_seconds=3600)
    assert notice is not None
    assert (notice.kind, notice.deadline, notice.source) == \
        (NoticeKind.HOST_MAINTENANCE, T0 + 7200, "aws:events/maintenance/scheduled")
    assert notice.detail == f"system-reboot instance-event-{int(T0 + 7200)}"
    # Already due (or past): a notice at once, its deadline as EC2 gives it.
    assert scheduled_notice((event(T0 - 10),), now=T0, lead_seconds=3600).deadline == T0 - 10


def test_the_earliest_live_event_counts_and_ended_or_ignored_ones_never_do():
    events = (event(T0 + 600, ended=True), event(T0 + 1800, code="instance-stop"), event(T0 + 900, code="instance-retirement"))
    assert scheduled_notice(events, now=T0, lead_seconds=3600).detail.startswith("instance-retirement")
    assert scheduled_notice((event(T0 + 600, ended=True),), now=T0, lead_seconds=3600) is None
    assert scheduled_notice(events, now=T0, lead_seconds=0) is None


def test_a_spot_interruption_and_a_scheduled_event_give_the_earlier_deadline():
    spot = notice_for(InstanceAction("terminate", at=T0 + 120), first_seen=T0, notice_seconds=None)
    maintenance = scheduled_notice((event(T0 + 600),), now=T0, lead_seconds=3600)
    assert earliest(spot, maintenance) is spot and earliest(maintenance, spot) is spot
    assert earliest(None, maintenance) is maintenance and earliest(None, None) is None
    same_time = notice_for(InstanceAction("terminate", at=T0 + 600), first_seen=T0, notice_seconds=None)
    assert earliest(maintenance, same_time) is same_time


REBALANCED_AT = "2023-11-14T22:13:20Z"   # T0


@pytest.mark.parametrize("action", ["log", "cordon", "cordon-and-drain", "surge"])
def test_a_rebalance_recommendation_is_what_the_action_says_until_it_is_released(action):
    def judged(now: float, **options: object):
        given: dict[str, object] = dict(first_seen=T0, now=now, action=action, release_seconds=1800,
                                        notice_seconds=None)
        given.update(options)
        return rebalance_notice(REBALANCED_AT, **given)  # type: ignore[arg-type]

    assert rebalance_notice(None, first_seen=None, now=T0, action=action, release_seconds=1800,
                            notice_seconds=None) is None
    if action == "log":
        assert judged(T0) is None
        return
    notice = judged(T0 + 5)
    assert notice is not None and notice.kind is NoticeKind.REBALANCE and notice.detail == REBALANCED_AT
    if action in ("cordon", "surge"):   # held until released: no VM end behind them
        assert (notice.cordon_only, notice.surge_only) == (action == "cordon", action == "surge")
        assert notice.deadline == T0 + 1800 and not notice.full
    else:
        assert notice.full and notice.deadline == T0 + DEFAULT_SPOT_NOTICE_SECONDS
        assert judged(T0 + 5, notice_seconds=60).deadline == T0 + 60
    # Released from the recommendation's own time on, whenever the daemon (re)started.
    assert judged(T0 + 1799.9, first_seen=T0 + 1700) is not None
    assert judged(T0 + 1800, first_seen=T0 + 1700) is None
    # An unreadable noticeTime counts from the first sighting.
    unreadable = rebalance_notice("yesterday", first_seen=T0 + 100, now=T0 + 1850, action=action,
                                  release_seconds=1800, notice_seconds=None)
    assert unreadable is not None and unreadable.detail == "yesterday"


def test_a_notice_that_asks_for_more_than_a_cordon_wins_over_an_earlier_cordon():
    cordon = rebalance_notice(REBALANCED_AT, first_seen=T0, now=T0, action="cordon", release_seconds=600,
                              notice_seconds=None)
    maintenance = scheduled_notice((event(T0 + 3000),), now=T0, lead_seconds=3600)
    assert cordon.deadline < maintenance.deadline
    assert earliest(cordon, maintenance) is maintenance and earliest(cordon, None) is cordon


def test_an_interruption_wins_over_a_rebalance_surge_that_ends_sooner():
    surge = rebalance_notice(REBALANCED_AT, first_seen=T0, now=T0, action="surge", release_seconds=60,
                             notice_seconds=None)
    spot = notice_for(InstanceAction("terminate", at=T0 + 120), first_seen=T0, notice_seconds=None)
    assert surge.deadline < spot.deadline
    assert earliest(surge, spot) is spot and earliest(surge, None) is surge


def test_the_lifecycle_state_is_one_word_and_anything_else_is_a_body_error():
    assert parse_lifecycle_state(b"InService") == "InService"
    assert parse_lifecycle_state(b"Warmed:Terminated\n") == "Warmed:Terminated"
    for body in (b"<html>", b"", b"Terminated; rm -rf", b"In Service"):
        with pytest.raises(MetadataBodyError, match="autoscaling/target-lifecycle-state"):
            parse_lifecycle_state(body)


@pytest.mark.parametrize("action, cordon_only", [("cordon", True), ("cordon-and-drain", False)])
def test_an_auto_scaling_termination_is_a_notice_from_its_first_sighting(action, cordon_only):
    notice = asg_notice("Terminated", first_seen=T0, action=action, notice_seconds=None)
    assert notice is not None and notice.kind is NoticeKind.ASG_TERMINATION and notice.cordon_only is cordon_only
    assert notice.deadline == T0 + DEFAULT_SPOT_NOTICE_SECONDS and notice.source == "aws:autoscaling/target-lifecycle-state"
    assert asg_notice("Terminated", first_seen=T0, action=action, notice_seconds=300).deadline == T0 + 300


@pytest.mark.parametrize("state", [None, "InService", "Standby", "Detached", "Warmed:Terminated"])
def test_other_lifecycle_states_and_the_log_action_are_no_notice(state):
    assert asg_notice(state, first_seen=T0, action="cordon-and-drain", notice_seconds=None) is None
    assert asg_notice("Terminated", first_seen=T0, action="log", notice_seconds=None) is None


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
    try:
        events = parse_scheduled_events(body)
    except MetadataBodyError:
        pass
    else:
        assert all(math.isfinite(e.not_before) for e in events)

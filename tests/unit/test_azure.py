"""The Azure provider's pure parts: Scheduled Events and compute parsers, and which events are this
VM's notice."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spotguard.notice import NoticeKind
from spotguard.providers.azure import (
    ScheduledEvent,
    notice_for,
    parse_compute,
    parse_not_before,
    parse_scheduled_events,
)
from spotguard.providers.http import MetadataBodyError

T0 = 1_700_000_000.0
SEEN = {("e1", "Scheduled"): T0, ("e1", "Started"): T0 + 600}
VM = "aks-gpuspot-12345678-vmss_3"

# The document as Microsoft's Scheduled Events page shows it.
DOCUMENTED = {
    "DocumentIncarnation": 2,
    "Events": [{"EventId": "602d9444-d2cd-49c7-8624-8643e7171297", "EventType": "Preempt",
                "ResourceType": "VirtualMachine", "Resources": [VM], "EventStatus": "Scheduled",
                "NotBefore": "Mon, 19 Sep 2016 18:29:47 GMT", "Description": "", "EventSource": "Platform",
                "DurationInSeconds": -1}],
}


def event(event_type: str = "Preempt", *, resources: tuple[str, ...] = (VM,), status: str = "Scheduled",
          not_before: float | None = T0 + 30, event_id: str = "e1") -> ScheduledEvent:
    return ScheduledEvent(event_id=event_id, event_type=event_type, resources=resources, status=status,
                          not_before=not_before)


def test_the_documented_document_parses():
    (parsed,) = parse_scheduled_events(json.dumps(DOCUMENTED))
    assert parsed == ScheduledEvent(event_id="602d9444-d2cd-49c7-8624-8643e7171297", event_type="Preempt",
                                    resources=(VM,), status="Scheduled", not_before=1474309787.0)


def test_no_events_is_an_empty_list():
    assert parse_scheduled_events(b'{"DocumentIncarnation": 7, "Events": []}') == []


@pytest.mark.parametrize("body", [b"<html/>", b"[]", b'{"Events": {}}', b'{"Events": [5]}',
                                  b'{"Events": [{"EventId": "x", "EventType": "Preempt"}]}',
                                  b'{"Events": [{"EventId": "x", "EventType": "Preempt", "EventStatus": "Scheduled", '
                                  b'"Resources": [1], "NotBefore": ""}]}'])
def test_an_unreadable_document_is_a_body_error(body):
    with pytest.raises(MetadataBodyError, match="^scheduledevents"):
        parse_scheduled_events(body)


@pytest.mark.parametrize("text, expected", [("Mon, 19 Sep 2016 18:29:47 GMT", 1474309787.0), ("", None),
                                            ("next week", None), ("Mon, 19 Sep 2016 18:29:47", None)])
def test_not_before(text, expected):
    assert parse_not_before(text) == expected


def test_compute_gives_the_name_and_needs_a_vm_id():
    assert parse_compute(json.dumps({"name": VM, "vmId": "0c0d"})) == VM
    for body in (b"{}", json.dumps({"name": VM}).encode(), b'{"name": "", "vmId": "x"}', b"garbage"):
        with pytest.raises(MetadataBodyError, match="instance/compute"):
            parse_compute(body)


def test_a_preempt_for_this_vm_is_a_preemption_due_at_not_before():
    notice = notice_for([event()], vm_name=VM, first_seen=SEEN, notice_seconds=None)
    assert notice is not None
    assert (notice.kind, notice.deadline, notice.detail, notice.source) == \
        (NoticeKind.PREEMPTION, T0 + 30, "Preempt", "azure:scheduledevents/e1")


@pytest.mark.parametrize("event_type", ["Terminate", "Redeploy", "Reboot"])
def test_events_that_take_the_vm_away_are_host_maintenance(event_type):
    notice = notice_for([event(event_type)], vm_name=VM, first_seen=SEEN, notice_seconds=None)
    assert notice is not None and notice.kind is NoticeKind.HOST_MAINTENANCE and notice.detail == event_type


def test_freeze_and_other_vms_events_are_no_notice():
    others = [event("Freeze"), event(resources=("aks-gpuspot-12345678-vmss_4",)), event(resources=())]
    assert notice_for(others, vm_name=VM, first_seen=SEEN, notice_seconds=None) is None


def test_without_not_before_a_started_event_is_due_from_when_it_was_seen_started():
    started = event("Reboot", status="Started", not_before=None)
    # Seen scheduled at T0, started 10 min later: due then, not 10 min in the past.
    assert notice_for([started], vm_name=VM, first_seen=SEEN, notice_seconds=None).deadline == T0 + 600


def test_an_unreadable_not_before_gets_the_least_notice_and_notice_seconds_only_for_a_preempt():
    preempt, reboot = event("Preempt", not_before=None), event("Reboot", not_before=None)
    assert notice_for([preempt], vm_name=VM, first_seen=SEEN, notice_seconds=None).deadline == T0 + 30
    assert notice_for([preempt], vm_name=VM, first_seen=SEEN, notice_seconds=50).deadline == T0 + 50
    assert notice_for([reboot], vm_name=VM, first_seen=SEEN, notice_seconds=50).deadline == T0 + 900


def test_the_event_due_first_wins():
    events = [event("Reboot", not_before=T0 + 900, event_id="late"), event("Preempt", not_before=T0 + 30,
                                                                            event_id="soon")]
    notice = notice_for(events, vm_name=VM, first_seen={("late", "Scheduled"): T0, ("soon", "Scheduled"): T0},
                        notice_seconds=None)
    assert notice is not None and notice.detail == "Preempt" and notice.deadline == T0 + 30


@settings(max_examples=300, deadline=None)
@given(st.one_of(
    st.binary(max_size=200),
    st.fixed_dictionaries({"Events": st.lists(st.dictionaries(
        st.sampled_from(["EventId", "EventType", "Resources", "EventStatus", "NotBefore"]),
        st.one_of(st.text(max_size=40), st.integers(), st.none(), st.lists(st.text(max_size=10), max_size=2))),
        max_size=3)}).map(lambda d: json.dumps(d).encode())))
def test_any_body_parses_or_is_a_body_error(body):
    # Anything else raised (TypeError, KeyError, ...) fails the test; what parses can be judged.
    try:
        events = parse_scheduled_events(body)
    except MetadataBodyError:
        return
    assert all(isinstance(e, ScheduledEvent) and isinstance(e.resources, tuple) for e in events)
    notice = notice_for(events, vm_name=VM, first_seen={(e.event_id, e.status): T0 for e in events},
                        notice_seconds=None)
    ours = [e for e in events if VM in e.resources and e.event_type in ("Preempt", "Terminate", "Redeploy", "Reboot")]
    assert (notice is None) == (not ours)

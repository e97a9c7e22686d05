"""Azure notices: Scheduled Events from the Instance Metadata Service, polled once a second by default
(`--poll-seconds`; see `providers.polled`).

Three layers, like the other providers:
- parsers (`parse_compute`, `parse_scheduled_events`): bytes in, value out, `MetadataBodyError`
  for anything else;
- the rule (`notice_for`): pure, which of the events concern this VM and what they amount to;
- `AzureProvider`: the I/O (IMDS allows 5 requests/s). The very first call switches Scheduled
  Events on for the VM and may take up to two minutes.

Which events are notices:
- `Preempt` (spot eviction, at least 30 s): a preemption;
- `Terminate`, `Redeploy`, `Reboot`: the VM (and every pod on it) goes away for a while or for good;
  spotguard treats them like GCE's TERMINATE_ON_HOST_MAINTENANCE;
- `Freeze` (the VM paused for seconds, memory kept): no notice, like GCE's live migration.
An event is this VM's only when its `Resources` name this VM: Azure sends the events of a whole
availability set or scale-set placement group to every VM in it.

spotguard never acknowledges an event (POST StartRequests): that approves it for every VM it
names, and would only shorten the time the drain has.
"""

from __future__ import annotations

import asyncio
import email.utils
from dataclasses import dataclass
from typing import Any, Callable

import aiohttp

from spotguard.config import Config
from spotguard.notice import Notice, NoticeKind
from spotguard.providers.http import (
    MetadataBodyError,
    body_json,
    read_limited,
    session,
    shown,
    status_failure,
    transport_failure,
    unreachable_if_failing,
)
from spotguard.providers.polled import PolledProvider

# The link-local address of Azure's Instance Metadata Service.
DEFAULT_ROOT_URL = "http://169.254.169.254"
METADATA_HEADER = {"Metadata": "true"}
SCHEDULED_EVENTS_PATH = "/metadata/scheduledevents"
SCHEDULED_EVENTS_API = "2020-07-01"
COMPUTE_PATH = "/metadata/instance/compute"
COMPUTE_API = "2021-02-01"

PREEMPTING = frozenset({"Preempt"})
TERMINATING = frozenset({"Terminate", "Redeploy", "Reboot"})
EVENT_TYPES = PREEMPTING | TERMINATING | {"Freeze"}
# The least notice Azure documents for each event type; the deadline when NotBefore is unreadable.
MINIMUM_NOTICE_SECONDS = {"Preempt": 30.0, "Terminate": 300.0, "Redeploy": 600.0, "Reboot": 900.0}
# The first request turns Scheduled Events on for the VM; Microsoft says it may take two minutes.
FIRST_REQUEST_TIMEOUT_SECONDS = 130.0


@dataclass(frozen=True)
class ScheduledEvent:
    event_id: str
    event_type: str
    resources: tuple[str, ...]
    status: str
    # Unix seconds; None when NotBefore is empty (the event has started) or unreadable.
    not_before: float | None


def parse_compute(body: bytes | str) -> str:
    """/metadata/instance/compute: the VM's name, as Scheduled Events' `Resources` spell it
    (`<scale set>_<instance id>` for a scale-set VM). Its `vmId` must be there too: only Azure's
    IMDS answers with both."""
    key = "instance/compute"
    data = body_json(body, key=key)
    if not isinstance(data, dict) or not isinstance(data.get("name"), str) or not data["name"] \
            or not isinstance(data.get("vmId"), str):
        raise MetadataBodyError(f"{key}: expected an object with name and vmId, got {shown(str(data))}")
    return data["name"]


def parse_not_before(text: str) -> float | None:
    """NotBefore as Unix seconds: Azure writes `Mon, 19 Sep 2016 18:29:47 GMT`; None when empty
    (the event has started) or unreadable."""
    if not text.strip():
        return None
    try:
        moment = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if moment.tzinfo is None:
        return None
    try:
        return moment.timestamp()
    except (ValueError, OverflowError):
        return None


def parse_scheduled_events(body: bytes | str) -> list[ScheduledEvent]:
    """/metadata/scheduledevents: `{"DocumentIncarnation": n, "Events": [...]}`. An event whose
    fields are missing or of the wrong type makes the whole document an error (it is retried):
    guessing which VM an unreadable event is for could drain the wrong one or miss this one."""
    key = "scheduledevents"
    data = body_json(body, key=key)
    if not isinstance(data, dict) or not isinstance(data.get("Events"), list):
        raise MetadataBodyError(f"{key}: expected an object with an Events list, got {shown(str(data))}")
    events = []
    for raw in data["Events"]:
        if not isinstance(raw, dict):
            raise MetadataBodyError(f"{key}: an event is not an object: {shown(str(raw))}")
        event_id, event_type = raw.get("EventId"), raw.get("EventType")
        resources, status, not_before = raw.get("Resources"), raw.get("EventStatus"), raw.get("NotBefore", "")
        if not (isinstance(event_id, str) and isinstance(event_type, str) and isinstance(status, str)
                and isinstance(not_before, str) and isinstance(resources, list)
                and all(isinstance(r, str) for r in resources)):
            raise MetadataBodyError(f"{key}: event fields missing or of the wrong type: {shown(str(raw))}")
        events.append(ScheduledEvent(event_id=event_id, event_type=event_type, resources=tuple(resources),
                                     status=status, not_before=parse_not_before(not_before)))
    return events


def notice_for(events: list[ScheduledEvent], *, vm_name: str, first_seen: dict[tuple[str, str], float],
               notice_seconds: float | None) -> Notice | None:
    """The notice this VM's events amount to: the one due first.

    `first_seen` maps (event id, status) to when the event was first observed in that status, for
    events without a readable NotBefore: a started event is due from when it was seen started; a
    scheduled one with an unreadable NotBefore gets the least notice Azure documents for its type
    (a Preempt: --notice-seconds when given, like a GCE preemption).
    """
    notices = []
    for event in events:
        if vm_name not in event.resources or event.event_type not in PREEMPTING | TERMINATING:
            continue
        seen = first_seen[(event.event_id, event.status)]
        if event.not_before is not None:
            deadline = event.not_before
        elif event.status == "Started":
            deadline = seen
        elif event.event_type in PREEMPTING and notice_seconds:
            deadline = seen + notice_seconds
        else:
            deadline = seen + MINIMUM_NOTICE_SECONDS[event.event_type]
        kind = NoticeKind.PREEMPTION if event.event_type in PREEMPTING else NoticeKind.HOST_MAINTENANCE
        notices.append(Notice(kind=kind, deadline=deadline, source=f"azure:scheduledevents/{event.event_id}",
                              detail=event.event_type))
    return min(notices, key=lambda n: (n.deadline, n.kind is not NoticeKind.PREEMPTION), default=None)


class AzureProvider(PolledProvider[tuple[str, list[ScheduledEvent]]]):
    """Polls Azure's Scheduled Events and yields `Notice | None` (see `providers.Provider`)."""

    name = "azure"
    headers = METADATA_HEADER
    # Once a second, as Microsoft suggests for Scheduled Events: IMDS is throttled per VM (HTTP 429)
    # and every pod on the VM that asks it for tokens shares that budget.
    default_poll_seconds = 1.0

    def __init__(self, *, root_url: str = DEFAULT_ROOT_URL,
                 first_request_timeout_seconds: float = FIRST_REQUEST_TIMEOUT_SECONDS, **options: Any) -> None:
        super().__init__(root_url=root_url, **options)
        # Until the first answer: the call that switches Scheduled Events on may take minutes.
        self._events_timeout = first_request_timeout_seconds
        self._vm_name: str | None = None
        # When each event was first seen in its current status (for those without a readable NotBefore).
        self._first_seen: dict[tuple[str, str], float] = {}

    async def probe(self) -> None:
        """Read this VM's compute metadata once (never Scheduled Events: its first call is slow)."""
        async with session(self.headers) as http:
            with unreachable_if_failing(f"Azure IMDS at {self.root_url}"):
                await self._read_vm_name(http)

    async def read(self, http: aiohttp.ClientSession) -> tuple[str, list[ScheduledEvent]]:
        vm_name = await self._read_vm_name(http)
        body = await self._get(http, SCHEDULED_EVENTS_PATH, {"api-version": SCHEDULED_EVENTS_API},
                               timeout=self._events_timeout)
        self._events_timeout = self._request_timeout   # Scheduled Events are on for this VM now
        return vm_name, parse_scheduled_events(body)

    def judge(self, value: tuple[str, list[ScheduledEvent]]) -> Notice | None:
        vm_name, events = value
        now = self._clock()
        self._first_seen = {(e.event_id, e.status): self._first_seen.get((e.event_id, e.status), now) for e in events}
        return notice_for(events, vm_name=vm_name, first_seen=self._first_seen, notice_seconds=self._notice_seconds)

    async def _read_vm_name(self, http: aiohttp.ClientSession) -> str:
        if self._vm_name is None:
            self._vm_name = parse_compute(await self._get(http, COMPUTE_PATH, {"api-version": COMPUTE_API},
                                                          timeout=self._request_timeout))
        return self._vm_name

    async def _get(self, http: aiohttp.ClientSession, path: str, params: dict[str, str], *,
                   timeout: float) -> bytes:
        try:
            async with http.get(self.root_url + path, params=params, allow_redirects=False,
                                timeout=aiohttp.ClientTimeout(total=timeout)) as response:
                if response.status != 200:
                    raise status_failure(response.status)
                return await read_limited(response)
        except (asyncio.TimeoutError, aiohttp.ClientError, OSError) as error:
            raise transport_failure(error, timeout=timeout) from None


def from_config(config: Config, *, on_error: Callable[[str], None], on_ok: Callable[[], None],
                clock: Callable[[], float]) -> AzureProvider:
    """The registry's factory (`providers.REGISTRY["azure"]`)."""
    return AzureProvider(root_url=config.metadata_url or DEFAULT_ROOT_URL, notice_seconds=config.notice_seconds,
                         poll_seconds=config.poll_seconds, on_error=on_error, on_ok=on_ok, clock=clock)

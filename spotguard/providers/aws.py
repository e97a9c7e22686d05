"""AWS notices, read through IMDSv2: the EC2 spot instance-action, EC2 scheduled events, the
rebalance recommendation and the Auto Scaling target lifecycle state.

EC2 has no hanging GET, so this polls the spot instance-action every 0.25 s by default
(`--poll-seconds`) with a cheap `AnswerWatch` thread, and reads and judges
everything when its answer changes, or every 5 s (`providers.polled`).

Three layers, like the GCE provider:
- parsers (`parse_instance_action`, `parse_rebalance`, `parse_scheduled_events`,
  `parse_lifecycle_state`): bytes in, value out, `MetadataBodyError` for anything else;
- the deadline rules (`notice_for`, `scheduled_notice`, `rebalance_notice`, `asg_notice`): pure,
  the times passed in, and `earliest`, which of them to act on;
- `AwsProvider`: the I/O. A session token (PUT /latest/api/token) is fetched once and renewed
  before it expires or when the server answers 401.

A rebalance recommendation (events/recommendations/rebalance) says the risk of an interruption
went up, not that one is coming, and draining a GPU server on every recommendation would cost the
capacity spot is bought for: by default it is only logged. --rebalance-action cordon makes it a
cordon-only notice (no new pods come, the pods keep serving), cordon-and-drain a notice of
--notice-seconds (default 120), surge a surge-only notice (the surge's placeholders bring up capacity
for the opted-in pods, nothing is cordoned); each is released --rebalance-release-seconds after the
recommendation's noticeTime if no interruption came, because EC2 keeps the recommendation listed
and the node would otherwise stay cordoned for good (a complaint NTH's users know).

An EC2 scheduled event (events/maintenance/scheduled: a reboot, a stop, a retirement, host
maintenance) is a long notice, announced hours to weeks ahead: spotguard acts on it
--scheduled-event-lead-seconds before its NotBefore (default an hour, like GCE's GPU maintenance,
enough for a surge), not at first sight, because draining a GPU server for days ahead of a reboot
costs more than the reboot. A cancelled or completed event is no notice: what spotguard did is
undone (after a reboot, the restarted daemon uncordons the node it cordoned). Those keys, and the
rebalance recommendation, are read every few seconds rather than every poll: they announce things
minutes to days ahead, and the spot instance-action (two minutes) keeps the fast polls to itself.

An Auto Scaling group that is terminating the instance (scale-in, instance refresh, a failed
health check) sets autoscaling/target-lifecycle-state to `Terminated`: by default
(--asg-termination-action cordon-and-drain) a notice of --notice-seconds (default 120; a
termination lifecycle hook usually holds the instance longer, spotguard does not complete it). It
is a slow key too, so it is seen up to 5 s late.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, TypeVar

import aiohttp

from spotguard.config import Config
from spotguard.notice import Notice, NoticeKind
from spotguard.providers.answer_watch import AnswerWatch
from spotguard.providers.base import MetadataFailure, ProviderUnreachable
from spotguard.providers.http import (
    MetadataBodyError,
    RequestFailed,
    body_json,
    body_text,
    parse_rfc3339,
    read_limited,
    session,
    shown,
    status_failure,
    transport_failure,
    unreachable_if_failing,
)
from spotguard.providers.polled import PolledProvider

T = TypeVar("T")

# The link-local address of EC2's instance metadata service.
DEFAULT_ROOT_URL = "http://169.254.169.254"
TOKEN_PATH = "/latest/api/token"
TOKEN_TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aws-ec2-metadata-token"
META = "/latest/meta-data/"
INSTANCE_ACTION_KEY = "spot/instance-action"
REBALANCE_KEY = "events/recommendations/rebalance"
SCHEDULED_KEY = "events/maintenance/scheduled"
ASG_STATE_KEY = "autoscaling/target-lifecycle-state"
# The target lifecycle state of an instance the Auto Scaling group is taking away.
ASG_TERMINATED = "Terminated"
INSTANCE_ID_KEY = "instance-id"
# How often the slow keys (rebalance recommendation, scheduled events, Auto Scaling state) are read.
SLOW_KEYS_SECONDS = 5.0
# EC2 keeps a finished event listed for a while, its description starting with one of these.
_ENDED_PREFIXES = ("[completed]", "[canceled]", "[cancelled]")
# NotBefore as IMDS writes it: "21 Jan 2019 09:00:43 GMT" (the day may be space-padded).
_EVENT_TIME_FORMAT = "%d %b %Y %H:%M:%S GMT"

# Every action takes the VM, and with it the pods, away.
ACTIONS = frozenset({"terminate", "stop", "hibernate"})
# EC2 gives a spot instance two minutes; used only when instance-action's time is unreadable.
DEFAULT_SPOT_NOTICE_SECONDS = 120.0
# Six hours, the most IMDSv2 grants.
TOKEN_TTL_SECONDS = 21600
_TOKEN_RENEW_EARLY_SECONDS = 60.0
# EC2's tokens are base64-like text of a few dozen characters.
_TOKEN = re.compile(r"[A-Za-z0-9_=+/.-]{1,1024}")
# What a timed-out token request most often means in a pod, said where the operator reads it.
_HOP_LIMIT_HINT = ("a pod without hostNetwork needs the instance's IMDSv2 HttpPutResponseHopLimit >= 2 "
                   "(the chart's default hostNetwork: true avoids it)")


@dataclass(frozen=True)
class InstanceAction:
    action: str
    # When EC2 stops or terminates the VM (Unix seconds); None when the time field is unreadable.
    at: float | None


def parse_instance_action(body: bytes | str) -> InstanceAction:
    """spot/instance-action: `{"action": "terminate|stop|hibernate", "time": "RFC 3339"}`.

    An unknown action is an error; a missing or unreadable time is not (the action alone says the
    VM goes away): the caller then assumes EC2's two minutes from when it first saw the notice.
    """
    data = body_json(body, key=INSTANCE_ACTION_KEY)
    if not isinstance(data, dict):
        raise MetadataBodyError(f"{INSTANCE_ACTION_KEY}: expected a JSON object, got {shown(str(data))}")
    action = data.get("action")
    if action not in ACTIONS:
        raise MetadataBodyError(f"{INSTANCE_ACTION_KEY}: action is not one of {', '.join(sorted(ACTIONS))}: "
                                f"{shown(str(action))}")
    try:
        at = parse_rfc3339(data["time"]) if isinstance(data.get("time"), str) else None
    except ValueError:
        at = None
    return InstanceAction(action=action, at=at)


def parse_rebalance(body: bytes | str) -> str:
    """events/recommendations/rebalance: `{"noticeTime": "RFC 3339"}`; the notice time as given."""
    data = body_json(body, key=REBALANCE_KEY)
    if not isinstance(data, dict) or not isinstance(data.get("noticeTime"), str):
        raise MetadataBodyError(f"{REBALANCE_KEY}: expected {{\"noticeTime\": ...}}, got {shown(str(data))}")
    return data["noticeTime"]


@dataclass(frozen=True)
class ScheduledEvent:
    code: str  # instance-reboot, system-reboot, system-maintenance, instance-retirement, instance-stop
    event_id: str
    not_before: float  # Unix seconds: the earliest the event starts
    ended: bool  # completed or cancelled: still listed, nothing will happen


def parse_scheduled_events(body: bytes | str) -> tuple[ScheduledEvent, ...]:
    """events/maintenance/scheduled: a JSON list of `{"Code", "Description", "EventId",
    "NotBefore", "NotAfter", "State"}`. Any event without a readable Code and NotBefore makes the
    whole body an error: half a list could hide the one event that matters."""
    data = body_json(body, key=SCHEDULED_KEY)
    if not isinstance(data, list):
        raise MetadataBodyError(f"{SCHEDULED_KEY}: expected a JSON list, got {shown(str(data))}")
    events = []
    for item in data:
        code = item.get("Code") if isinstance(item, dict) else None
        not_before = item.get("NotBefore") if isinstance(item, dict) else None
        if not isinstance(code, str) or not isinstance(not_before, str):
            raise MetadataBodyError(f"{SCHEDULED_KEY}: an event without Code and NotBefore: {shown(str(item))}")
        try:
            moment = datetime.strptime(" ".join(not_before.split()), _EVENT_TIME_FORMAT)
        except ValueError:
            raise MetadataBodyError(f"{SCHEDULED_KEY}: NotBefore is not like '21 Jan 2019 09:00:43 GMT': "
                                    f"{shown(not_before)}") from None
        description = str(item.get("Description", "")).strip().lower()
        state = str(item.get("State", "active")).strip().lower()
        events.append(ScheduledEvent(code=code, event_id=str(item.get("EventId", "")),
                                     not_before=moment.replace(tzinfo=timezone.utc).timestamp(),
                                     ended=state != "active" or description.startswith(_ENDED_PREFIXES)))
    return tuple(events)


def parse_lifecycle_state(body: bytes | str) -> str:
    """autoscaling/target-lifecycle-state: one word such as InService, Terminated or
    Warmed:Stopped."""
    state = body_text(body, key=ASG_STATE_KEY).strip()
    if not re.fullmatch(r"[A-Za-z]{1,32}(:[A-Za-z]{1,32})?", state):
        raise MetadataBodyError(f"{ASG_STATE_KEY}: not a lifecycle state: {shown(state)}")
    return state


def asg_notice(state: str | None, *, first_seen: float | None, action: str,
               notice_seconds: float | None) -> Notice | None:
    """An Auto Scaling group terminating this instance, under --asg-termination-action (log:
    nothing). EC2 gives no time: the deadline is the first sighting plus --notice-seconds (120)."""
    if state != ASG_TERMINATED or action == "log":
        return None
    assert first_seen is not None, "a state is always seen before it is judged"
    cordon_only = action == "cordon"
    return Notice(kind=NoticeKind.ASG_TERMINATION, deadline=first_seen + (notice_seconds or DEFAULT_SPOT_NOTICE_SECONDS),
                  source=f"aws:{ASG_STATE_KEY}", detail=state, cordon_only=cordon_only)


def scheduled_notice(events: tuple[ScheduledEvent, ...], *, now: float, lead_seconds: float) -> Notice | None:
    """The earliest live scheduled event, as a notice from `lead_seconds` before its NotBefore on
    (0: never). Its deadline is NotBefore: the event may start then."""
    live = [event for event in events if not event.ended]
    if lead_seconds <= 0 or not live:
        return None
    first = min(live, key=lambda event: event.not_before)
    if first.not_before - now > lead_seconds:
        return None
    return Notice(kind=NoticeKind.HOST_MAINTENANCE, deadline=first.not_before, source=f"aws:{SCHEDULED_KEY}",
                  detail=f"{first.code} {first.event_id}".strip())


def rebalance_notice(notice_time: str | None, *, first_seen: float | None, now: float, action: str,
                     release_seconds: float, notice_seconds: float | None) -> Notice | None:
    """What a rebalance recommendation amounts to under --rebalance-action (log: nothing). It
    counts from its noticeTime (from the first sighting when that is unreadable), so a restarted
    daemon releases it on time, and is released `release_seconds` later."""
    if notice_time is None or action == "log":
        return None
    try:
        at = parse_rfc3339(notice_time)
    except ValueError:
        assert first_seen is not None, "a recommendation is always seen before it is judged"
        at = first_seen
    if now >= at + release_seconds:
        return None
    cordon_only, surge_only = action == "cordon", action == "surge"
    held = cordon_only or surge_only  # no VM end behind it: it lasts until it is released
    deadline = at + release_seconds if held else at + (notice_seconds or DEFAULT_SPOT_NOTICE_SECONDS)
    return Notice(kind=NoticeKind.REBALANCE, deadline=deadline, source=f"aws:{REBALANCE_KEY}", detail=notice_time,
                  cordon_only=cordon_only, surge_only=surge_only)


def earliest(*notices: Notice | None) -> Notice | None:
    """The notice to act on: one that says the VM goes (more than a cordon or a surge) first, then
    the one that comes first, a preemption before a maintenance due at the same time."""
    return min((n for n in notices if n is not None),
               key=lambda n: (not n.full, n.deadline, n.kind is not NoticeKind.PREEMPTION), default=None)


def notice_for(action: InstanceAction | None, *, first_seen: float | None,
               notice_seconds: float | None) -> Notice | None:
    """The notice an instance-action amounts to. The deadline is EC2's time when readable, else
    the first sighting plus --notice-seconds (default 120 s), so re-reads never move it."""
    if action is None:
        return None
    if action.at is not None:
        deadline = action.at
    else:
        assert first_seen is not None, "an action is always seen before it is judged"
        deadline = first_seen + (notice_seconds or DEFAULT_SPOT_NOTICE_SECONDS)
    return Notice(kind=NoticeKind.PREEMPTION, deadline=deadline, source=f"aws:{INSTANCE_ACTION_KEY}",
                  detail=action.action)


@dataclass(frozen=True)
class AwsReading:
    action: InstanceAction | None
    rebalance: str | None  # the recommendation's notice time
    scheduled: tuple[ScheduledEvent, ...]
    lifecycle_state: str | None  # None: not in an Auto Scaling group (404)


class AwsProvider(PolledProvider[AwsReading]):
    """Polls EC2's instance metadata and yields `Notice | None` (see `providers.Provider`)."""

    name = "aws"
    # Four reads a second: the notice is seen within 250 ms (NTH polls every 2 s). IMDS answers on
    # the VM in about a millisecond; EC2 throttles it per instance without a published number and
    # caps link-local traffic at 1024 packets/s per network interface, far above this.
    default_poll_seconds = 0.25

    def __init__(self, *, root_url: str = DEFAULT_ROOT_URL, token_ttl_seconds: int = TOKEN_TTL_SECONDS,
                 scheduled_lead_seconds: float = 3600.0, slow_keys_seconds: float = SLOW_KEYS_SECONDS,
                 rebalance_action: str = "log", rebalance_release_seconds: float = 1800.0,
                 asg_termination_action: str = "cordon-and-drain", **options: Any) -> None:
        super().__init__(root_url=root_url, **options)
        self._asg_action = asg_termination_action
        self._lifecycle_state: str | None = None
        self._terminating_since: float | None = None
        self._rebalance_action = rebalance_action
        self._rebalance_release = rebalance_release_seconds
        self._rebalance_first_seen: float | None = None
        self._token_ttl = token_ttl_seconds
        self._scheduled_lead = scheduled_lead_seconds
        self._slow_keys_seconds = slow_keys_seconds
        # The full read, every slow key included, runs that often (and whenever the instance-action changes).
        self.watched_read_seconds = slow_keys_seconds
        # When (monotonic clock) the slow keys are read next, and what they said last.
        self._slow_due = 0.0
        self._scheduled: tuple[ScheduledEvent, ...] = ()
        # The IMDSv2 session token, and when (monotonic clock) to ask for a new one.
        self._token: str | None = None
        self._token_renew_at = 0.0
        # When the current instance-action was first seen, and the last rebalance recommendation.
        self._first_seen: float | None = None
        self._rebalance: str | None = None

    async def probe(self) -> None:
        """A token, then instance-id (which must look like one): only EC2 answers both."""
        where = f"EC2 instance metadata at {self.root_url}"
        async with session() as http:
            with unreachable_if_failing(where):
                instance_id = body_text(await self._get(http, INSTANCE_ID_KEY), key=INSTANCE_ID_KEY)
        if not instance_id.startswith("i-"):
            raise ProviderUnreachable(f"{where}: bad_body: instance-id {shown(instance_id)} is not an EC2 instance id",
                                      reason=MetadataFailure.BAD_BODY)

    def change_watch(self, wake: Callable[[], None]) -> AnswerWatch | None:
        """The instance-action, polled every --poll-seconds by a thread with the session token the
        full reads keep fresh (before the first, nothing: the first full read comes at once). Not
        worth a thread when the full reads are that frequent anyway."""
        if self._poll_seconds >= self.watched_read_seconds or not self.root_url.startswith("http://"):
            return None   # (IMDS speaks plain HTTP; this reader speaks nothing else)
        return AnswerWatch(self.root_url + META + INSTANCE_ACTION_KEY, every=self._poll_seconds, wake=wake,
                           headers=lambda: None if self._token is None else {TOKEN_HEADER: self._token},
                           timeout=self._request_timeout)

    async def read(self, http: aiohttp.ClientSession) -> AwsReading:
        action = await self._instance_action(http)
        rebalance, scheduled, lifecycle_state = self._rebalance, self._scheduled, self._lifecycle_state
        if time.monotonic() >= self._slow_due:
            self._slow_due = time.monotonic() + self._slow_keys_seconds
            rebalance = await self._best_effort(http, REBALANCE_KEY, parse_rebalance, rebalance)
            if self._scheduled_lead > 0:
                scheduled = await self._best_effort(http, SCHEDULED_KEY, parse_scheduled_events, scheduled) or ()
            lifecycle_state = await self._best_effort(http, ASG_STATE_KEY, parse_lifecycle_state, lifecycle_state)
        return AwsReading(action, rebalance, scheduled, lifecycle_state)

    def judge(self, value: AwsReading) -> Notice | None:
        if value.rebalance != self._rebalance:
            self._rebalance = value.rebalance
            self._rebalance_first_seen = None if value.rebalance is None else self._clock()
            self._log.info("aws_rebalance_recommendation", notice_time=value.rebalance,
                           action=self._rebalance_action,
                           note="a higher risk of interruption, not a notice")
        if value.scheduled != self._scheduled:
            self._scheduled = value.scheduled
            for event in value.scheduled:
                self._log.info("aws_scheduled_event", code=event.code, event_id=event.event_id,
                               not_before=event.not_before, ended=event.ended,
                               acted_on_from=None if event.ended else event.not_before - self._scheduled_lead)
        if value.lifecycle_state != self._lifecycle_state:
            self._lifecycle_state = value.lifecycle_state
            terminating = value.lifecycle_state == ASG_TERMINATED
            self._terminating_since = self._clock() if terminating else None
            self._log.info("aws_asg_lifecycle_state", state=value.lifecycle_state,
                           action=self._asg_action if terminating else None)
        if value.action is None:
            self._first_seen = None
        elif self._first_seen is None:
            self._first_seen = self._clock()
        spot = notice_for(value.action, first_seen=self._first_seen, notice_seconds=self._notice_seconds)
        now = self._clock()
        rebalance = rebalance_notice(self._rebalance, first_seen=self._rebalance_first_seen, now=now,
                                     action=self._rebalance_action, release_seconds=self._rebalance_release,
                                     notice_seconds=self._notice_seconds)
        asg = asg_notice(self._lifecycle_state, first_seen=self._terminating_since, action=self._asg_action,
                         notice_seconds=self._notice_seconds)
        return earliest(spot, scheduled_notice(self._scheduled, now=now, lead_seconds=self._scheduled_lead),
                        rebalance, asg)

    async def _instance_action(self, http: aiohttp.ClientSession) -> InstanceAction | None:
        body = await self._get(http, INSTANCE_ACTION_KEY, absent_ok=True)
        return None if body is None else parse_instance_action(body)

    async def _best_effort(self, http: aiohttp.ClientSession, key: str, parse: Callable[[bytes], T],
                           last: T | None) -> T | None:
        """A slow key, parsed; None when absent (404). Best effort: a failed or garbled read keeps
        the last good value (logged) and never holds back the instance-action read with it."""
        try:
            body = await self._get(http, key, absent_ok=True)
            return None if body is None else parse(body)
        except (RequestFailed, MetadataBodyError) as error:
            self._log.warning("aws_key_unreadable", key=key, error=str(error))
            return last

    async def _get(self, http: aiohttp.ClientSession, key: str, *, absent_ok: bool = False) -> bytes | None:
        """GET one meta-data key with the session token: its body, or None for a 404 when
        `absent_ok` (EC2's "no such notice"). A 401 (token expired or revoked) renews the token
        and asks once more."""
        for attempt in (1, 2):
            token = await self._session_token(http)
            try:
                async with http.get(self.root_url + META + key, headers={TOKEN_HEADER: token},
                                    allow_redirects=False,
                                    timeout=aiohttp.ClientTimeout(total=self._request_timeout)) as response:
                    if response.status == 401 and attempt == 1:
                        self._token = None
                        continue
                    if response.status == 404 and absent_ok:
                        return None
                    if response.status != 200:
                        raise status_failure(response.status)
                    return await read_limited(response)
            except (asyncio.TimeoutError, aiohttp.ClientError, OSError) as error:
                raise transport_failure(error, timeout=self._request_timeout) from None
        raise AssertionError("unreachable: the second attempt returns or raises")

    async def _session_token(self, http: aiohttp.ClientSession) -> str:
        now = time.monotonic()
        if self._token is not None and now < self._token_renew_at:
            return self._token
        try:
            async with http.put(self.root_url + TOKEN_PATH, headers={TOKEN_TTL_HEADER: str(self._token_ttl)},
                                allow_redirects=False,
                                timeout=aiohttp.ClientTimeout(total=self._request_timeout)) as response:
                if response.status != 200:
                    raise status_failure(response.status, what="token request")
                token = body_text(await read_limited(response), key="api/token")
        except asyncio.TimeoutError as error:
            failure = transport_failure(error, timeout=self._request_timeout)
            raise RequestFailed(failure.reason, f"token request: {failure}; {_HOP_LIMIT_HINT}") from None
        except (aiohttp.ClientError, OSError) as error:
            raise transport_failure(error, timeout=self._request_timeout) from None
        # It goes into a header: anything but a token (a proxy's HTML page) is refused here, not by
        # aiohttp as a bad header value on the next request.
        if not _TOKEN.fullmatch(token):
            raise MetadataBodyError(f"api/token: not an IMDSv2 token: {shown(token)}")
        self._token = token
        # Renewed a minute early (half the TTL for short ones), so no request carries an expired token.
        self._token_renew_at = now + self._token_ttl - min(_TOKEN_RENEW_EARLY_SECONDS, self._token_ttl / 2)
        return token


def from_config(config: Config, *, on_error: Callable[[str], None], on_ok: Callable[[], None],
                clock: Callable[[], float]) -> AwsProvider:
    """The registry's factory (`providers.REGISTRY["aws"]`)."""
    return AwsProvider(root_url=config.metadata_url or DEFAULT_ROOT_URL, notice_seconds=config.notice_seconds,
                       poll_seconds=config.poll_seconds, scheduled_lead_seconds=config.scheduled_event_lead_seconds,
                       rebalance_action=config.rebalance_action, asg_termination_action=config.asg_termination_action,
                       rebalance_release_seconds=config.rebalance_release_seconds,
                       on_error=on_error, on_ok=on_ok, clock=clock)

"""GCE notices: instance/preempted and instance/maintenance-event, followed with hanging GETs.

Three layers, each testable on its own:
- parsers (`parse_preempted`, `parse_maintenance_event`, `parse_upcoming_maintenance`): bytes in,
  value out, `MetadataBodyError` for anything else;
- deadline rules (`GceState`, `observe_preempted`, `observe_maintenance`, `notice_for`): pure, the
  time of observation passed in, so they are unit-tested with explicit times;
- `GceProvider`: the I/O. Two tasks follow the two keys at the same time with
  `?wait_for_change=true&last_etag=...`, each with its own ETag, so a spot preemption is seen within
  milliseconds even while the maintenance key is quiet (and the other way round).
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, replace
from typing import AsyncIterator, Awaitable, Callable, Generic, NoReturn, TypeVar

import aiohttp
import structlog

from spotguard.backoff import backoff_delay
from spotguard.config import Config
from spotguard.notice import Notice, NoticeKind
from spotguard.providers.base import MetadataFailure, unheard
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

# Where GCE's metadata server is, from inside the VM.
DEFAULT_ROOT_URL = "http://metadata.google.internal"
FLAVOR_HEADER = "Metadata-Flavor"
FLAVOR = "Google"
PREEMPTED_KEY = "instance/preempted"
MAINTENANCE_KEY = "instance/maintenance-event"
UPCOMING_MAINTENANCE_KEY = "instance/upcoming-maintenance"

MAINTENANCE_NONE = "NONE"
MAINTENANCE_MIGRATE = "MIGRATE_ON_HOST_MAINTENANCE"
MAINTENANCE_TERMINATE = "TERMINATE_ON_HOST_MAINTENANCE"
# Older name for TERMINATE, still accepted: it means the same thing for us.
MAINTENANCE_SHUTDOWN = "SHUTDOWN_ON_HOST_MAINTENANCE"
MAINTENANCE_EVENTS = frozenset({MAINTENANCE_NONE, MAINTENANCE_MIGRATE, MAINTENANCE_TERMINATE,
                                MAINTENANCE_SHUTDOWN})
TERMINATING_EVENTS = frozenset({MAINTENANCE_TERMINATE, MAINTENANCE_SHUTDOWN})

# Spot VMs get 30 s unless the instance sets preemptionNoticeDuration (then --notice-seconds).
DEFAULT_PREEMPTION_NOTICE_SECONDS = 30.0
# GPU VMs get 60 min between TERMINATE_ON_HOST_MAINTENANCE and the maintenance itself.
DEFAULT_MAINTENANCE_NOTICE_SECONDS = 3600.0
# An upcoming-maintenance window further ahead of the terminating event than this is not used.
MAX_WINDOW_AHEAD_SECONDS = 24 * 3600.0
# A hanging GET answered faster than this with nothing changed means the server does not honour
# wait_for_change (some proxies don't): the loop then paces itself instead of spinning.
_MIN_HANG_SECONDS = 0.1

T = TypeVar("T")


# ---------------------------------------------------------------------------------------------
# Parsers: pure, bytes (or text) in, value out.


def parse_preempted(body: bytes | str) -> bool:
    """instance/preempted: `TRUE` or `FALSE` (surrounding whitespace tolerated)."""
    text = body_text(body, key=PREEMPTED_KEY)
    if text == "TRUE":
        return True
    if text == "FALSE":
        return False
    raise MetadataBodyError(f"{PREEMPTED_KEY}: expected TRUE or FALSE, got {shown(text)}")


def parse_maintenance_event(body: bytes | str) -> str:
    """instance/maintenance-event: one of `MAINTENANCE_EVENTS`, returned as GCE spelled it."""
    text = body_text(body, key=MAINTENANCE_KEY)
    if text in MAINTENANCE_EVENTS:
        return text
    raise MetadataBodyError(
        f"{MAINTENANCE_KEY}: expected one of {', '.join(sorted(MAINTENANCE_EVENTS))}, got {shown(text)}")


def parse_upcoming_maintenance(body: bytes | str) -> float | None:
    """instance/upcoming-maintenance?alt=json: the window start (Unix seconds), or None.

    `{}` (or an empty body) means no maintenance is scheduled. The metadata server spells the
    field `window_start_time`; the Compute API's `windowStartTime`, and either inside a wrapping
    `upcomingMaintenance` object, are accepted too. A window start
    that is present but not a timestamp is an error: the caller then falls back to the default
    notice length instead of trusting a value it cannot read.
    """
    if not body_text(body, key=UPCOMING_MAINTENANCE_KEY):
        return None
    data = body_json(body, key=UPCOMING_MAINTENANCE_KEY)
    if not isinstance(data, dict):
        raise MetadataBodyError(f"{UPCOMING_MAINTENANCE_KEY}: expected a JSON object, got {shown(str(data))}")
    # The Compute API nests the same fields in an `upcomingMaintenance` object (of the instance's
    # resourceStatus): a proxy or a newer server handing that shape over is read the same way.
    for wrapper in ("upcomingMaintenance", "upcoming_maintenance"):
        if isinstance(data.get(wrapper), dict):
            data = data[wrapper]
            break
    raw = data.get("window_start_time", data.get("windowStartTime"))
    if raw is None:
        return None
    if not isinstance(raw, str):
        raise MetadataBodyError(f"{UPCOMING_MAINTENANCE_KEY}: window_start_time is not a string")
    try:
        return parse_rfc3339(raw)
    except ValueError as error:
        raise MetadataBodyError(f"{UPCOMING_MAINTENANCE_KEY}: window_start_time: {error}") from None


# ---------------------------------------------------------------------------------------------
# Deadline rules: pure, the observation time passed in.


@dataclass(frozen=True)
class GceState:
    """What the metadata server said last, and since when (wall clock) each notice has been seen."""

    preempted: bool | None = None
    # First time preempted=TRUE was seen; kept while it stays TRUE so re-reads don't move it.
    preempted_since: float | None = None
    maintenance_event: str | None = None
    # First time a terminating maintenance event was seen; kept while it stays terminating.
    maintenance_since: float | None = None
    # Start of the upcoming maintenance window (Unix seconds), if the server gave a readable one.
    window_start: float | None = None


def observe_preempted(state: GceState, *, preempted: bool, now: float) -> GceState:
    """Record a read of instance/preempted made at `now`."""
    if not preempted:
        return replace(state, preempted=False, preempted_since=None)
    since = state.preempted_since if state.preempted_since is not None else now
    return replace(state, preempted=True, preempted_since=since)


def observe_maintenance(state: GceState, *, event: str, window_start: float | None,
                        now: float) -> GceState:
    """Record a read of instance/maintenance-event (and the window, if one was read) at `now`."""
    if event not in TERMINATING_EVENTS:
        return replace(state, maintenance_event=event, maintenance_since=None, window_start=None)
    was_terminating = state.maintenance_event in TERMINATING_EVENTS and state.maintenance_since is not None
    since = state.maintenance_since if was_terminating else now
    # A re-read whose window could not be fetched keeps the window already known.
    window = window_start if window_start is not None else (state.window_start if was_terminating else None)
    return replace(state, maintenance_event=event, maintenance_since=since, window_start=window)


def notice_for(state: GceState, *, notice_seconds: float | None) -> Notice | None:
    """The notice the state amounts to; a preemption wins over host maintenance.

    Deadlines count from when the notice was first observed, never from when it is acted on, so a
    slow reaction cannot stretch them. MIGRATE_ON_HOST_MAINTENANCE is no notice: live migration
    keeps the VM and its pods.
    """
    if state.preempted and state.preempted_since is not None:
        length = notice_seconds or DEFAULT_PREEMPTION_NOTICE_SECONDS
        return Notice(kind=NoticeKind.PREEMPTION, deadline=state.preempted_since + length,
                      source=f"gce:{PREEMPTED_KEY}", detail="TRUE")
    if state.maintenance_event in TERMINATING_EVENTS and state.maintenance_since is not None:
        deadline = state.maintenance_since + DEFAULT_MAINTENANCE_NOTICE_SECONDS
        # The window is trusted only when it lies ahead of the event and within a day of it: one
        # that has already started (a stale or skewed answer) would turn a 60-minute notice into
        # evictions with 1 s of grace, and one weeks away is not the event at hand.
        window = state.window_start
        if window is not None and state.maintenance_since < window <= state.maintenance_since + MAX_WINDOW_AHEAD_SECONDS:
            deadline = window
        return Notice(kind=NoticeKind.HOST_MAINTENANCE, deadline=deadline,
                      source=f"gce:{MAINTENANCE_KEY}", detail=state.maintenance_event)
    return None


# ---------------------------------------------------------------------------------------------
# I/O.


@dataclass(frozen=True)
class _Observation(Generic[T]):
    key: str
    value: T
    # Wall clock when the value was received (before any follow-up request).
    at: float
    window_start: float | None = None


class GceProvider:
    """Follows the GCE metadata server and yields `Notice | None` (see `providers.Provider`)."""

    name = "gce"

    def __init__(self, *, root_url: str = DEFAULT_ROOT_URL,
                 notice_seconds: float | None = None,
                 on_error: Callable[[str], None] = unheard,
                 on_ok: Callable[[], None] = unheard,
                 clock: Callable[[], float] = time.time,
                 hanging_timeout_seconds: float = 60.0,
                 request_timeout_seconds: float = 5.0,
                 backoff_base_seconds: float = 0.5,
                 backoff_cap_seconds: float = 2.0) -> None:
        self.root_url = root_url.rstrip("/")
        self._base = f"{self.root_url}/computeMetadata/v1/"
        self._notice_seconds = notice_seconds
        self._on_error = on_error
        self._on_ok = on_ok
        self._clock = clock
        # GCE takes whole seconds for timeout_sec.
        self._timeout_sec = max(1, math.ceil(hanging_timeout_seconds))
        self._request_timeout = request_timeout_seconds
        self._backoff_base = backoff_base_seconds
        # Short on purpose: the retry delay after an outage is how late a notice arriving just
        # after it is seen, and a spot notice lasts 30 s. The server is on the VM itself, so a
        # retry every 1-2 s per key costs nothing.
        self._backoff_cap = backoff_cap_seconds
        # A lazy logger: resolved at first use, so logging may be configured after construction.
        self._log = structlog.get_logger(provider=self.name)

    def _session(self) -> aiohttp.ClientSession:
        return session({FLAVOR_HEADER: FLAVOR})

    async def probe(self) -> None:
        """Read instance/preempted once; `ProviderUnreachable` says why if that fails."""
        async with self._session() as session:
            with unreachable_if_failing(f"GCE metadata server at {self.root_url}"):
                body, _ = await self._get(session, PREEMPTED_KEY, params=None, timeout=self._request_timeout)
                parse_preempted(body)

    async def watch(self) -> AsyncIterator[Notice | None]:
        """The state at start-up (once both keys were read, or at once if either is a notice),
        then every change: a `Notice`, or `None` when it is withdrawn. Never raises for
        metadata errors; those go to `on_error` and are retried."""
        observations: asyncio.Queue[_Observation[object]] = asyncio.Queue()
        async with self._session() as session:
            followers = [
                asyncio.create_task(self._follow(session, key=PREEMPTED_KEY, parse=parse_preempted,
                                                 emit=lambda value: self._emit_preempted(observations, value)),
                                    name="gce-follow-preempted"),
                asyncio.create_task(self._follow(session, key=MAINTENANCE_KEY, parse=parse_maintenance_event,
                                                 emit=lambda value: self._emit_maintenance(session, observations, value)),
                                    name="gce-follow-maintenance-event"),
            ]
            try:
                state = GceState()
                keys_read: set[str] = set()
                started = False
                last: Notice | None = None
                while True:
                    observation = await self._next(observations, followers)
                    keys_read.add(observation.key)
                    if observation.key == PREEMPTED_KEY:
                        state = observe_preempted(state, preempted=bool(observation.value),
                                                  now=observation.at)
                    else:
                        state = observe_maintenance(state, event=str(observation.value),
                                                    window_start=observation.window_start,
                                                    now=observation.at)
                    notice = notice_for(state, notice_seconds=self._notice_seconds)
                    if not started:
                        # The first answer waits for both keys, so "no notice" is really known; a
                        # notice from either key is acted on at once rather than held back by the
                        # other key's errors.
                        if len(keys_read) < 2 and notice is None:
                            continue
                        started = True
                    elif notice == last:
                        continue
                    last = notice
                    self._log.info("gce_notice_state", notice_kind=notice.kind.value if notice else None,
                                   deadline=notice.deadline if notice else None,
                                   detail=notice.detail if notice else None)
                    yield notice
            finally:
                for task in followers:
                    task.cancel()
                await asyncio.gather(*followers, return_exceptions=True)

    @staticmethod
    async def _next(observations: asyncio.Queue[_Observation[object]],
                    followers: list[asyncio.Task[NoReturn]]) -> _Observation[object]:
        """The next observation; re-raises if a follower died (a bug: followers never return)."""
        getter = asyncio.ensure_future(observations.get())
        try:
            done, _ = await asyncio.wait([getter, *followers], return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not getter.done():
                getter.cancel()
        if getter in done:
            return getter.result()
        for task in followers:
            if task.done():
                task.result()
        raise RuntimeError("a GCE metadata follower stopped")

    async def _emit_preempted(self, observations: asyncio.Queue[_Observation[object]],
                              value: bool) -> None:
        observations.put_nowait(_Observation(key=PREEMPTED_KEY, value=value, at=self._clock()))

    async def _emit_maintenance(self, session: aiohttp.ClientSession,
                                observations: asyncio.Queue[_Observation[object]], value: str) -> None:
        at = self._clock()
        window_start = None
        if value in TERMINATING_EVENTS:
            window_start = await self._read_window(session)
        elif value == MAINTENANCE_MIGRATE:
            self._log.info("gce_live_migration_pending", maintenance_event=value,
                           note="live migration keeps the VM: no notice")
        observations.put_nowait(_Observation(key=MAINTENANCE_KEY, value=value, at=at,
                                             window_start=window_start))

    async def _read_window(self, session: aiohttp.ClientSession) -> float | None:
        """The upcoming maintenance window start, or None (unknown: the caller uses 60 min)."""
        try:
            body, _ = await self._get(session, UPCOMING_MAINTENANCE_KEY, params={"alt": "json"},
                                      timeout=self._request_timeout)
            window_start = parse_upcoming_maintenance(body)
        except RequestFailed as failure:
            if failure.status == 404:
                # No such key on this VM (no scheduled-maintenance information): not an error.
                self._on_ok()
                return None
            reason, message = failure.reason, str(failure)
        except MetadataBodyError as error:
            reason, message = MetadataFailure.BAD_BODY, str(error)
        else:
            self._on_ok()
            return window_start
        self._on_error(reason)
        self._log.warning("metadata_error", key=UPCOMING_MAINTENANCE_KEY, reason=reason, error=message,
                          fallback=f"deadline = observed + {DEFAULT_MAINTENANCE_NOTICE_SECONDS:g} s")
        return None

    async def _follow(self, session: aiohttp.ClientSession, *, key: str,
                      parse: Callable[[bytes], T], emit: Callable[[T], Awaitable[None]]) -> NoReturn:
        """Read `key` now, then hang on it for changes; emit each new value. Never returns.

        Every error is reported, logged and retried after `backoff_delay` (at most a couple of
        seconds apart); the first request after an error reads the value without waiting, then
        hanging GETs resume.
        """
        log = self._log.bind(key=key)
        loop = asyncio.get_running_loop()
        etag: str | None = None
        # A hanging GET only once the value is known and the server answered the last request:
        # after a failure the value is read at once, so a recovery shows now (metadata_up,
        # /readyz) rather than when a hanging GET ends, up to timeout_sec later, and a server that
        # hangs is caught by the short request timeout.
        may_hang = False
        failures = 0
        unhonoured_waits = 0
        last: object = _UNSET
        while True:
            if not may_hang:
                # The current value, without waiting: a notice present at start (or that came
                # during an outage) must be seen now.
                params: dict[str, str] | None = None
                timeout = self._request_timeout
            else:
                params = {"wait_for_change": "true", "timeout_sec": str(self._timeout_sec)}
                if etag:
                    params["last_etag"] = etag
                timeout = self._timeout_sec + self._request_timeout
            sent_at = loop.time()
            try:
                body, new_etag = await self._get(session, key, params=params, timeout=timeout)
                value = parse(body)
            except RequestFailed as failure:
                reason, message = failure.reason, str(failure)
            except MetadataBodyError as error:
                reason, message = MetadataFailure.BAD_BODY, str(error)
            else:
                self._on_ok()
                if failures:
                    log.info("metadata_recovered", failed_requests=failures)
                failures = 0
                etag = new_etag
                waited = may_hang
                may_hang = True
                if value != last:
                    log.info("gce_metadata_value", value=value, changed_from=None if last is _UNSET else last)
                    last = value
                    unhonoured_waits = 0
                    await emit(value)
                elif waited and loop.time() - sent_at < _MIN_HANG_SECONDS:
                    delay = backoff_delay(unhonoured_waits, base=self._backoff_base, cap=self._backoff_cap)
                    if unhonoured_waits == 0:
                        log.warning("metadata_wait_not_honoured", retry_in_seconds=round(delay, 3),
                                    note="hanging GET answered at once without a change; pacing requests")
                    unhonoured_waits += 1
                    await asyncio.sleep(delay)
                else:
                    unhonoured_waits = 0
                continue
            self._on_error(reason)
            may_hang = False
            delay = backoff_delay(failures, base=self._backoff_base, cap=self._backoff_cap)
            failures += 1
            log.warning("metadata_error", reason=reason, error=message,
                        failed_requests=failures, retry_in_seconds=round(delay, 3))
            await asyncio.sleep(delay)

    async def _get(self, session: aiohttp.ClientSession, key: str, *,
                   params: dict[str, str] | None, timeout: float) -> tuple[bytes, str | None]:
        """GET one key: (body, ETag) or `RequestFailed` with the reason."""
        url = self._base + key
        try:
            async with session.get(url, params=params, allow_redirects=False,
                                   timeout=aiohttp.ClientTimeout(total=timeout)) as response:
                # Checked first: without it the answer is from something else (a proxy, a captive
                # portal, a web server on the wrong port), whatever its status says.
                if response.headers.get(FLAVOR_HEADER) != FLAVOR:
                    raise RequestFailed(MetadataFailure.BAD_FLAVOR,
                                        f"HTTP {response.status} without {FLAVOR_HEADER}: {FLAVOR}: "
                                        "not the GCE metadata server", status=response.status)
                if response.status != 200:
                    raise status_failure(response.status)
                body = await read_limited(response)
                return body, response.headers.get("ETag")
        except RequestFailed:
            raise
        except (asyncio.TimeoutError, aiohttp.ClientError, OSError) as error:
            raise transport_failure(error, timeout=timeout) from None


_UNSET = object()


def from_config(config: Config, *, on_error: Callable[[str], None], on_ok: Callable[[], None],
                clock: Callable[[], float]) -> GceProvider:
    """The registry's factory (`providers.REGISTRY["gce"]`)."""
    return GceProvider(root_url=config.metadata_url or config.gce_metadata_host_url or DEFAULT_ROOT_URL,
                 notice_seconds=config.notice_seconds, on_error=on_error, on_ok=on_ok, clock=clock)

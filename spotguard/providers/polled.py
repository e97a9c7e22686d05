"""What the clouds without hanging GETs (AWS, Azure) share: read the metadata every
`--poll-seconds`, judge what it amounts to, and yield the notice only when it changes.

A provider subclasses `PolledProvider`, reads its cloud in `read(http)` and turns that into
`Notice | None` in `judge(value)` (pure, or keeping the little state it needs).

A provider may also name one URL whose answer changes when a notice comes (`change_watch`): an
`AnswerWatch` thread then polls just that, cheaply, every --poll-seconds, and the full read runs
when it sees a change, or every `watched_read_seconds` otherwise (AWS: the spot instance-action
four times a second, everything else every 5 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from abc import ABC, abstractmethod
from contextlib import aclosing
from typing import Any, AsyncIterator, Awaitable, Callable, Generic, TypeVar

import aiohttp
import structlog

from spotguard.backoff import backoff_delay
from spotguard.notice import Notice
from spotguard.providers.answer_watch import AnswerWatch
from spotguard.providers.base import MetadataFailure, unheard
from spotguard.providers.http import MetadataBodyError, RequestFailed, session

T = TypeVar("T")

# The default when a provider names none: a spot notice lasts 30 s (Azure) to 2 min (AWS), and
# every second not knowing is a second routers keep sending work to a VM that is going away.
# Either server is on the VM and answers in a millisecond. AwsProvider and AzureProvider set their
# own defaults from their clouds' limits.
POLL_SECONDS = 1.0


async def poll(read: Callable[[], Awaitable[T]], *, every: float, on_error: Callable[[str], None],
               on_ok: Callable[[], None], log: Any, backoff_base: float, backoff_cap: float,
               woken: asyncio.Event | None = None) -> AsyncIterator[T]:
    """`read()` every `every` seconds (and, given `woken`, as soon as it is set), yielding each value.

    A failed read (RequestFailed, MetadataBodyError) goes to `on_error(reason)` and the log, and is
    retried after a short backoff (capped at `backoff_cap`: the retry delay after an outage is how
    late a notice that came during it is seen); the next good read goes to `on_ok()`. Never raises
    for those.
    """
    failures = 0
    while True:
        try:
            value = await read()
        except (RequestFailed, MetadataBodyError) as error:
            reason = error.reason if isinstance(error, RequestFailed) else MetadataFailure.BAD_BODY
            on_error(reason)
            delay = backoff_delay(failures, base=backoff_base, cap=backoff_cap)
            failures += 1
            log.warning("metadata_error", reason=reason, error=str(error), failed_requests=failures,
                        retry_in_seconds=round(delay, 3))
            await asyncio.sleep(delay)
            continue
        on_ok()
        if failures:
            log.info("metadata_recovered", failed_requests=failures)
        failures = 0
        yield value
        if woken is None:
            await asyncio.sleep(every)
            continue
        with contextlib.suppress(asyncio.TimeoutError):   # the interval is up: read anyway
            await asyncio.wait_for(woken.wait(), timeout=every)
        woken.clear()


class PolledProvider(ABC, Generic[T]):
    """A provider (see `providers.Provider`) that polls: subclasses give `name`, `headers`,
    `probe()`, `read(http)` and `judge(value)`."""

    name = "polled"
    # Sent with every request (Azure's `Metadata: true`).
    headers: dict[str, str] = {}
    # Seconds between reads when --poll-seconds does not say.
    default_poll_seconds = POLL_SECONDS

    def __init__(self, *, root_url: str, notice_seconds: float | None = None,
                 on_error: Callable[[str], None] = unheard,
                 on_ok: Callable[[], None] = unheard,
                 clock: Callable[[], float] = time.time,
                 poll_seconds: float | None = None,
                 request_timeout_seconds: float = 2.0,
                 backoff_base_seconds: float = 0.5,
                 backoff_cap_seconds: float = 2.0) -> None:
        self.root_url = root_url.rstrip("/")
        self._notice_seconds = notice_seconds
        self._on_error = on_error
        self._on_ok = on_ok
        self._clock = clock
        self._poll_seconds = self.default_poll_seconds if poll_seconds is None else poll_seconds
        self._request_timeout = request_timeout_seconds
        self._backoff_base = backoff_base_seconds
        self._backoff_cap = backoff_cap_seconds
        # A lazy logger: resolved at first use, so logging may be configured after construction.
        self._log = structlog.get_logger(provider=self.name)

    @abstractmethod
    async def probe(self) -> None:
        """One quick request; raises `ProviderUnreachable` with a readable reason if it fails."""

    @abstractmethod
    async def read(self, http: aiohttp.ClientSession) -> T:
        """Read the cloud's metadata once; RequestFailed or MetadataBodyError when that fails."""

    @abstractmethod
    def judge(self, value: T) -> Notice | None:
        """What one read amounts to (the little state a cloud needs is kept on the provider)."""

    def change_watch(self, wake: Callable[[], None]) -> AnswerWatch | None:
        """An AnswerWatch that calls `wake` when a notice may have come, or None (the default):
        then `read` runs every --poll-seconds."""
        return None

    # With a change watch: how often the full read runs anyway.
    watched_read_seconds = 5.0

    async def watch(self) -> AsyncIterator[Notice | None]:
        """The state at start-up, then every change. Never raises for metadata errors; those go
        to `on_error` and are retried after a short backoff."""
        woken = asyncio.Event()
        loop = asyncio.get_running_loop()
        watch = self.change_watch(lambda: loop.call_soon_threadsafe(woken.set))
        every = self._poll_seconds if watch is None else max(self._poll_seconds, self.watched_read_seconds)
        async with session(self.headers) as http:
            polls = poll(lambda: self.read(http), every=every, on_error=self._on_error,
                         on_ok=self._on_ok, log=self._log, backoff_base=self._backoff_base,
                         backoff_cap=self._backoff_cap, woken=None if watch is None else woken)
            if watch is not None:
                watch.start()
            try:
                async with aclosing(self._changes(polls)) as changes:
                    async for notice in changes:
                        yield notice
            finally:
                if watch is not None:
                    watch.stop()

    async def _changes(self, polls: AsyncIterator[T]) -> AsyncIterator[Notice | None]:
        """The notice each read amounts to, when it differs from the last one."""
        started = False
        last: Notice | None = None
        async with aclosing(polls):  # type: ignore[type-var]
            async for value in polls:
                notice = self.judge(value)
                if started and (notice == last or _only_later(notice, last)):
                    continue
                started, last = True, notice
                self._log.info(f"{self.name}_notice_state", notice_kind=notice.kind.value if notice else None,
                               deadline=notice.deadline if notice else None,
                               detail=notice.detail if notice else None)
                yield notice


def _only_later(notice: Notice | None, last: Notice | None) -> bool:
    """The same notice with a later deadline: nothing to act on (a deadline only ever moves
    closer for spotguard), and nothing to log. Some metadata servers (AWS's metadata mock with its
    defaults) move the time forward on every read; without this, one log line per poll."""
    return (notice is not None and last is not None and notice.kind == last.kind
            and notice.cordon_only == last.cordon_only and notice.surge_only == last.surge_only
            and notice.deadline >= last.deadline)

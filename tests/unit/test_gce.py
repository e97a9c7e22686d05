"""GCE provider, the pure parts: body parsers, deadline rules (explicit times), backoff bounds."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timezone
from typing import Any

import pytest

from spotguard.backoff import backoff_delay
from spotguard.notice import NoticeKind
from spotguard.providers.gce import (
    MAINTENANCE_KEY,
    PREEMPTED_KEY,
    GceProvider,
    GceState,
    MetadataBodyError,
    notice_for,
    observe_maintenance,
    observe_preempted,
    parse_maintenance_event,
    parse_preempted,
    parse_upcoming_maintenance,
)
from spotguard.providers.http import MAX_BODY_BYTES, RequestFailed

T0 = 1_700_000_000.0


# -- parsers ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("body", "expected"), [(b"TRUE", True), (b"FALSE", False), (b"TRUE\n", True),
                                                 ("FALSE", False)])
def test_preempted_reads_true_and_false(body: bytes | str, expected: bool) -> None:
    assert parse_preempted(body) is expected


@pytest.mark.parametrize("body", [b"", b"true", b"yes", b"1", b"TRUE FALSE", b"\xff\xfe", b"<html>",
                                  b"T" * (MAX_BODY_BYTES + 1)])
def test_preempted_rejects_anything_else(body: bytes) -> None:
    with pytest.raises(MetadataBodyError):
        parse_preempted(body)


@pytest.mark.parametrize("event", ["NONE", "MIGRATE_ON_HOST_MAINTENANCE", "TERMINATE_ON_HOST_MAINTENANCE",
                                   "SHUTDOWN_ON_HOST_MAINTENANCE"])
def test_maintenance_event_reads_every_documented_value(event: str) -> None:
    assert parse_maintenance_event(event.encode() + b"\n") == event


@pytest.mark.parametrize("body", [b"", b"none", b"TERMINATE", b"REBOOT_ON_HOST_MAINTENANCE", b"\x80"])
def test_maintenance_event_rejects_unknown_values(body: bytes) -> None:
    with pytest.raises(MetadataBodyError):
        parse_maintenance_event(body)


def test_upcoming_maintenance_empty_object_means_no_window() -> None:
    assert parse_upcoming_maintenance(b"{}") is None
    assert parse_upcoming_maintenance(b"") is None


def test_upcoming_maintenance_reads_window_start_as_unix_seconds() -> None:
    body = json.dumps({"maintenance_status": "PENDING", "type": "SCHEDULED",
                       "window_start_time": "2024-05-01T12:00:00Z",
                       "window_end_time": "2024-05-01T13:00:00Z"}).encode()
    expected = datetime(2024, 5, 1, 12, tzinfo=timezone.utc).timestamp()
    assert parse_upcoming_maintenance(body) == expected


def test_upcoming_maintenance_accepts_the_compute_api_spelling_and_offsets() -> None:
    body = b'{"windowStartTime": "2024-05-01T14:00:00.123456789+02:00"}'
    expected = datetime(2024, 5, 1, 12, tzinfo=timezone.utc).timestamp() + 0.123456
    assert parse_upcoming_maintenance(body) == pytest.approx(expected)


@pytest.mark.parametrize("body", [b"[]", b"null", b"not json", b'{"window_start_time": 17}',
                                  b'{"window_start_time": "tomorrow"}',
                                  b'{"window_start_time": "2024-05-01T12:00:00"}',  # no zone
                                  b"[" * 50_000])
def test_upcoming_maintenance_rejects_unusable_bodies(body: bytes) -> None:
    with pytest.raises(MetadataBodyError):
        parse_upcoming_maintenance(body)


# -- deadline rules --------------------------------------------------------------------------


def test_preemption_deadline_is_first_observation_plus_30_seconds() -> None:
    state = observe_preempted(GceState(), preempted=True, now=T0)
    notice = notice_for(state, notice_seconds=None)
    assert notice is not None
    assert notice.kind is NoticeKind.PREEMPTION
    assert notice.deadline == T0 + 30
    assert notice.source == "gce:instance/preempted"


def test_preemption_deadline_uses_notice_seconds_override() -> None:
    state = observe_preempted(GceState(), preempted=True, now=T0)
    notice = notice_for(state, notice_seconds=120)
    assert notice is not None and notice.deadline == T0 + 120


def test_rereading_preempted_true_does_not_move_the_deadline() -> None:
    state = observe_preempted(GceState(), preempted=True, now=T0)
    state = observe_preempted(state, preempted=True, now=T0 + 25)
    notice = notice_for(state, notice_seconds=None)
    assert notice is not None and notice.deadline == T0 + 30


def test_preempted_false_gives_no_notice() -> None:
    state = observe_preempted(GceState(), preempted=False, now=T0)
    assert notice_for(state, notice_seconds=None) is None


@pytest.mark.parametrize("event", ["TERMINATE_ON_HOST_MAINTENANCE", "SHUTDOWN_ON_HOST_MAINTENANCE"])
def test_terminating_maintenance_without_window_gives_one_hour(event: str) -> None:
    state = observe_maintenance(GceState(), event=event, window_start=None, now=T0)
    notice = notice_for(state, notice_seconds=None)
    assert notice is not None
    assert notice.kind is NoticeKind.HOST_MAINTENANCE
    assert notice.deadline == T0 + 3600
    assert notice.detail == event


def test_terminating_maintenance_deadline_is_the_window_start() -> None:
    state = observe_maintenance(GceState(), event="TERMINATE_ON_HOST_MAINTENANCE",
                                window_start=T0 + 1800, now=T0)
    notice = notice_for(state, notice_seconds=None)
    assert notice is not None and notice.deadline == T0 + 1800


def test_rereading_terminate_keeps_first_observation_and_known_window() -> None:
    state = observe_maintenance(GceState(), event="TERMINATE_ON_HOST_MAINTENANCE", window_start=None, now=T0)
    state = observe_maintenance(state, event="TERMINATE_ON_HOST_MAINTENANCE", window_start=None, now=T0 + 600)
    notice = notice_for(state, notice_seconds=None)
    assert notice is not None and notice.deadline == T0 + 3600

    with_window = observe_maintenance(GceState(), event="TERMINATE_ON_HOST_MAINTENANCE",
                                      window_start=T0 + 900, now=T0)
    with_window = observe_maintenance(with_window, event="TERMINATE_ON_HOST_MAINTENANCE",
                                      window_start=None, now=T0 + 60)
    notice = notice_for(with_window, notice_seconds=None)
    assert notice is not None and notice.deadline == T0 + 900


def test_migrate_on_host_maintenance_gives_no_notice() -> None:
    state = observe_maintenance(GceState(), event="MIGRATE_ON_HOST_MAINTENANCE", window_start=T0 + 60, now=T0)
    assert notice_for(state, notice_seconds=None) is None


def test_maintenance_back_to_none_withdraws_the_notice_and_a_new_one_starts_fresh() -> None:
    state = observe_maintenance(GceState(), event="TERMINATE_ON_HOST_MAINTENANCE", window_start=None, now=T0)
    state = observe_maintenance(state, event="NONE", window_start=None, now=T0 + 10)
    assert notice_for(state, notice_seconds=None) is None
    state = observe_maintenance(state, event="TERMINATE_ON_HOST_MAINTENANCE", window_start=None, now=T0 + 20)
    notice = notice_for(state, notice_seconds=None)
    assert notice is not None and notice.deadline == T0 + 20 + 3600


def test_preemption_wins_over_host_maintenance() -> None:
    state = observe_maintenance(GceState(), event="TERMINATE_ON_HOST_MAINTENANCE",
                                window_start=T0 + 3000, now=T0)
    state = observe_preempted(state, preempted=True, now=T0 + 5)
    notice = notice_for(state, notice_seconds=None)
    assert notice is not None
    assert notice.kind is NoticeKind.PREEMPTION
    assert notice.deadline == T0 + 5 + 30


# -- backoff ---------------------------------------------------------------------------------


@pytest.mark.parametrize("attempt", [0, 1, 2, 5, 10, 100, 10_000])
@pytest.mark.parametrize("fraction", [0.0, 0.5, 0.999999, 1.0])
def test_backoff_is_never_zero_and_never_above_cap(attempt: int, fraction: float) -> None:
    delay = backoff_delay(attempt, base=0.5, cap=30.0, rand=lambda: fraction)
    assert 0 < delay <= 30.0


def test_backoff_grows_exponentially_until_the_cap() -> None:
    upper = [backoff_delay(n, base=0.5, cap=30.0, rand=lambda: 1.0) for n in range(8)]
    assert upper == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    lower = [backoff_delay(n, base=0.5, cap=30.0, rand=lambda: 0.0) for n in range(8)]
    assert lower == [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 15.0]


def test_backoff_rejects_nonsense_parameters() -> None:
    with pytest.raises(ValueError):
        backoff_delay(0, base=0, cap=1)
    with pytest.raises(ValueError):
        backoff_delay(0, base=2, cap=1)


# -- retrying the metadata server (the provider's loop, with scripted answers and no network) ---


class ScriptedMetadata(GceProvider):
    """A GceProvider whose requests are answered from a script per key; with nothing left to say
    for a key, its request hangs like a hanging GET on a value that does not change."""

    def __init__(self, script: dict[str, list[Any]], **kwargs: Any) -> None:
        super().__init__(root_url="http://metadata.test", **kwargs)
        self.script = {key: list(steps) for key, steps in script.items()}
        self.requests: list[tuple[str, dict[str, str] | None, float]] = []

    async def _get(self, session: Any, key: str, *, params: dict[str, str] | None,
                   timeout: float) -> tuple[bytes, str | None]:
        self.requests.append((key, params, timeout))
        steps = self.script.get(key) or []
        if not steps:
            await asyncio.Event().wait()
        step = steps.pop(0)
        if isinstance(step, Exception):
            raise step
        return step, f"etag-{len(self.requests)}"

    def of(self, key: str) -> list[tuple[dict[str, str] | None, float]]:
        return [(params, timeout) for k, params, timeout in self.requests if k == key]


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Every asyncio.sleep delay asked for, without waiting for it."""
    asked: list[float] = []
    real_sleep = asyncio.sleep

    async def instant(delay: float, result: Any = None) -> Any:
        asked.append(delay)
        return await real_sleep(0, result)

    monkeypatch.setattr(asyncio, "sleep", instant)
    return asked


async def test_retries_after_a_long_outage_stay_a_couple_of_seconds_apart(sleeps: list[float]) -> None:
    # A spot notice lasts 30 s: a retry delay growing to 30 s would let one arrive unseen.
    outage = [RequestFailed("http_5xx", "HTTP 503", status=503)] * 40
    provider = ScriptedMetadata({PREEMPTED_KEY: [b"FALSE", *outage, b"TRUE"], MAINTENANCE_KEY: [b"NONE"]})
    notices = provider.watch()
    assert await asyncio.wait_for(anext(notices), 5) is None
    notice = await asyncio.wait_for(anext(notices), 5)
    await notices.aclose()
    assert notice is not None and notice.kind is NoticeKind.PREEMPTION
    assert len(sleeps) >= 40 and max(sleeps) <= 2.0


async def test_after_a_failure_the_value_is_read_at_once_then_hanging_gets_resume(sleeps: list[float]) -> None:
    calls: list[str] = []
    provider = ScriptedMetadata(
        {PREEMPTED_KEY: [b"FALSE", b"FALSE", RequestFailed("connection", "refused"), b"FALSE"],
         MAINTENANCE_KEY: [b"NONE"]},
        on_error=lambda reason: calls.append(reason), on_ok=lambda: calls.append("ok"),
        request_timeout_seconds=5.0, hanging_timeout_seconds=60.0)
    notices = provider.watch()
    assert await asyncio.wait_for(anext(notices), 5) is None
    for _ in range(100):
        if len(provider.of(PREEMPTED_KEY)) >= 5:
            break
        await asyncio.sleep(0)
    await notices.aclose()
    kinds = [("hang" if params and params.get("wait_for_change") == "true" else "read", timeout)
             for params, timeout in provider.of(PREEMPTED_KEY)[:5]]
    # read, hang, hang (fails), read at once with the short timeout (so the recovery counts as
    # soon as the server answers), then hanging again.
    assert kinds == [("read", 5.0), ("hang", 65.0), ("hang", 65.0), ("read", 5.0), ("hang", 65.0)]
    assert calls[-2:] == ["connection", "ok"]


@pytest.mark.parametrize("wrapper", ["upcomingMaintenance", "upcoming_maintenance"])
def test_upcoming_maintenance_inside_a_wrapping_object_is_read(wrapper: str) -> None:
    body = json.dumps({wrapper: {"windowStartTime": "2024-05-01T12:00:00Z", "type": "SCHEDULED"}}).encode()
    assert parse_upcoming_maintenance(body) == datetime(2024, 5, 1, 12, tzinfo=timezone.utc).timestamp()


@pytest.mark.parametrize("window", [T0 - 60, T0, T0 + 2 * 86400], ids=["started", "now", "two-days-off"])
def test_a_window_that_has_started_or_lies_absurdly_far_off_falls_back_to_one_hour(window: float) -> None:
    state = observe_maintenance(GceState(), event="TERMINATE_ON_HOST_MAINTENANCE", window_start=window, now=T0)
    notice = notice_for(state, notice_seconds=None)
    assert notice is not None and notice.deadline == T0 + 3600


def test_a_window_within_a_day_is_the_deadline() -> None:
    state = observe_maintenance(GceState(), event="TERMINATE_ON_HOST_MAINTENANCE", window_start=T0 + 7200, now=T0)
    assert notice_for(state, notice_seconds=None).deadline == T0 + 7200  # type: ignore[union-attr]

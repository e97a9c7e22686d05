"""The real GCE provider against the real emulator, over loopback HTTP.

Small timeouts (1 s hanging GETs, 0.5 s requests, backoff capped at 0.2 s) keep the whole file to
seconds; every emulator and watch task is stopped by its fixture, even when a test fails.
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timezone
from typing import AsyncIterator

import aiohttp
import pytest
from providerlib import FAULTS as COMMON_FAULTS
from providerlib import (
    Calls,
    Watcher,
    assert_fault_is_retried_and_the_notice_arrives_after,
    config,
    eventually,
    free_port,
)
from spotguard_sim.gce_metadata import MAINTENANCE_EVENT, PREEMPTED, GceMetadataEmulator

from spotguard.notice import NoticeKind
from spotguard.providers import REGISTRY, AutoProvider, ProviderUnreachable, detect, make_provider
from spotguard.providers.gce import GceProvider

pytestmark = pytest.mark.timeout(60)

CLOCK = 1_000.0  # fixed wall clock: deadlines are then exact
FLAVOR = {"Metadata-Flavor": "Google"}


@pytest.fixture
async def emulator() -> AsyncIterator[GceMetadataEmulator]:
    emulator = GceMetadataEmulator()
    await emulator.start()
    try:
        yield emulator
    finally:
        await emulator.stop()


def fast_provider(url: str, calls: Calls, **overrides: object) -> GceProvider:
    options: dict[str, object] = dict(root_url=url, notice_seconds=None, on_error=calls.on_error,
                                      on_ok=calls.on_ok, clock=lambda: CLOCK, hanging_timeout_seconds=1,
                                      request_timeout_seconds=0.5, backoff_base_seconds=0.05,
                                      backoff_cap_seconds=0.2)
    options.update(overrides)
    return GceProvider(**options)  # type: ignore[arg-type]


@pytest.fixture
async def watcher(emulator: GceMetadataEmulator, calls: Calls) -> AsyncIterator[Watcher]:
    """Not started: a test sets the emulator up first, then calls watcher.start()."""
    watcher = Watcher(fast_provider(emulator.url, calls))
    try:
        yield watcher
    finally:
        await watcher.stop()


# -- the provider --------------------------------------------------------------------------------


async def test_no_notice_at_startup_yields_none_first(emulator: GceMetadataEmulator, watcher: Watcher) -> None:
    watcher.start()
    assert await watcher.next() is None


async def test_preemption_present_at_startup_is_yielded_first(emulator: GceMetadataEmulator,
                                                              watcher: Watcher) -> None:
    emulator.preempt()
    watcher.start()
    notice = await watcher.next()
    assert notice is not None
    assert notice.kind is NoticeKind.PREEMPTION
    assert notice.deadline == CLOCK + 30


async def test_preemption_is_seen_through_the_hanging_get_within_milliseconds(
        emulator: GceMetadataEmulator, watcher: Watcher) -> None:
    watcher.start()
    assert await watcher.next() is None
    # Both keys are held by the server at the same time, each on its own hanging GET.
    await eventually(lambda: emulator.waiting[PREEMPTED] >= 1 and emulator.waiting[MAINTENANCE_EVENT] >= 1,
                     what="both hanging GETs")
    started = time.monotonic()
    emulator.preempt()
    notice = await watcher.next(timeout=1.0)
    elapsed = time.monotonic() - started
    assert notice is not None and notice.kind is NoticeKind.PREEMPTION
    assert elapsed < 0.5, f"preemption took {elapsed:.3f} s to arrive"


async def test_terminate_maintenance_deadline_is_the_announced_window_start(
        emulator: GceMetadataEmulator, watcher: Watcher) -> None:
    watcher.start()
    assert await watcher.next() is None
    # The provider's clock says 1970-01-01T00:16:40Z here; the window is 45 min after it.
    emulator.set_maintenance("TERMINATE_ON_HOST_MAINTENANCE", window_start="1970-01-01T01:01:40Z")
    notice = await watcher.next()
    assert notice is not None
    assert notice.kind is NoticeKind.HOST_MAINTENANCE
    assert notice.detail == "TERMINATE_ON_HOST_MAINTENANCE"
    assert notice.deadline == datetime(1970, 1, 1, 1, 1, 40, tzinfo=timezone.utc).timestamp()


async def test_maintenance_back_to_none_withdraws_the_notice(emulator: GceMetadataEmulator,
                                                             watcher: Watcher) -> None:
    emulator.set_maintenance("TERMINATE_ON_HOST_MAINTENANCE")
    watcher.start()
    notice = await watcher.next()
    assert notice is not None and notice.deadline == CLOCK + 3600
    emulator.set_maintenance("NONE")
    assert await watcher.next() is None


async def test_live_migration_yields_nothing_and_a_later_preemption_still_arrives(
        emulator: GceMetadataEmulator, watcher: Watcher) -> None:
    watcher.start()
    assert await watcher.next() is None
    emulator.set_maintenance("MIGRATE_ON_HOST_MAINTENANCE")
    await asyncio.sleep(0.2)
    assert watcher.items.empty()
    emulator.preempt()
    notice = await watcher.next()
    assert notice is not None and notice.kind is NoticeKind.PREEMPTION


FAULTS = [*COMMON_FAULTS, ("no_flavor", "bad_flavor")]


@pytest.mark.parametrize(("mode", "reason"), FAULTS, ids=[mode for mode, _ in FAULTS])
async def test_fault_is_reported_retried_and_the_notice_still_arrives_after_recovery(
        emulator: GceMetadataEmulator, watcher: Watcher, calls: Calls, mode: str, reason: str) -> None:
    await assert_fault_is_retried_and_the_notice_arrives_after(emulator, watcher, calls, mode, reason)


async def test_responses_without_metadata_flavor_are_rejected(emulator: GceMetadataEmulator, watcher: Watcher,
                                                              calls: Calls) -> None:
    # A server that says TRUE but is not the metadata server (no Metadata-Flavor: Google).
    emulator.preempt()
    emulator.set_fault("no_flavor")
    watcher.start()
    await eventually(lambda: calls.errors.count("bad_flavor") >= 2, what="bad_flavor errors")
    assert watcher.items.empty()
    emulator.set_fault("none")
    notice = await watcher.next()
    assert notice is not None and notice.kind is NoticeKind.PREEMPTION


async def test_undocumented_value_is_a_body_error_and_is_retried(emulator: GceMetadataEmulator,
                                                                 watcher: Watcher, calls: Calls) -> None:
    emulator.set_raw(MAINTENANCE_EVENT, "REBOOT_ON_HOST_MAINTENANCE")
    watcher.start()
    await eventually(lambda: "bad_body" in calls.errors, what="a bad_body error")
    assert watcher.items.empty()
    emulator.set_maintenance("TERMINATE_ON_HOST_MAINTENANCE")
    notice = await watcher.next()
    assert notice is not None and notice.kind is NoticeKind.HOST_MAINTENANCE


async def test_server_ignoring_wait_for_change_is_paced_not_hammered(emulator: GceMetadataEmulator,
                                                                       watcher: Watcher) -> None:
    watcher.start()
    assert await watcher.next() is None
    emulator.set_fault("ignore_wait")
    await eventually(lambda: emulator.waiting[PREEMPTED] == 0, what="held request to finish")
    before = emulator.requests[PREEMPTED]
    await asyncio.sleep(1.0)
    # Unpaced, a loopback client makes hundreds of requests a second; backoff (cap 0.2 s) allows ~10.
    assert emulator.requests[PREEMPTED] - before < 30
    emulator.preempt()
    notice = await watcher.next()
    assert notice is not None and notice.kind is NoticeKind.PREEMPTION


async def test_metadata_server_down_at_start_is_retried_until_it_answers(calls: Calls) -> None:
    port = free_port()
    watcher = Watcher(fast_provider(f"http://127.0.0.1:{port}", calls))
    emulator = GceMetadataEmulator(port=port)
    try:
        watcher.start()
        await eventually(lambda: calls.errors.count("connection") >= 2, what="connection errors")
        emulator.preempt()
        await emulator.start()
        notice = await watcher.next()
        assert notice is not None and notice.kind is NoticeKind.PREEMPTION
    finally:
        await watcher.stop()
        await emulator.stop()


# -- probe and detection -------------------------------------------------------------------------


async def test_probe_succeeds_against_the_metadata_server(emulator: GceMetadataEmulator, calls: Calls) -> None:
    provider = fast_provider(emulator.url, calls)
    assert await provider.probe() is None
    emulator.preempt()   # a notice is an answer from the server, not a failure to reach it
    assert await provider.probe() is None
    assert calls.errors == []


async def test_probe_names_the_reason_when_nothing_listens(calls: Calls) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ProviderUnreachable, match="connection") as raised:
        await fast_provider(url, calls).probe()
    assert url in str(raised.value)


async def test_probe_rejects_a_server_without_metadata_flavor(emulator: GceMetadataEmulator,
                                                              calls: Calls) -> None:
    emulator.set_fault("no_flavor")
    with pytest.raises(ProviderUnreachable, match="bad_flavor"):
        await fast_provider(emulator.url, calls).probe()


async def test_auto_detects_gce_at_the_configured_metadata_url(emulator: GceMetadataEmulator) -> None:
    provider = await detect(config("--provider", "auto", "--metadata-url", emulator.url))
    assert provider.name == "gce"
    assert isinstance(provider, GceProvider) and provider.root_url == emulator.url


async def test_auto_fails_clearly_when_no_metadata_server_answers() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ProviderUnreachable, match="--provider auto: no cloud metadata server answered"):
        await detect(config("--provider", "auto", "--metadata-url", url))


async def test_auto_keeps_probing_until_a_metadata_server_answers_then_follows_it(calls: Calls) -> None:
    """A metadata server that comes up after spotguard (a new node's gke-metadata-server) is found
    in-process: failed probes are counted, nothing is yielded until it answers, then it is followed."""
    late = GceMetadataEmulator(port=free_port())
    detected: list[str] = []
    provider = AutoProvider(config("--provider", "auto", "--metadata-url", late.url), REGISTRY,
                            on_error=calls.on_error, on_ok=calls.on_ok, on_detected=detected.append,
                            backoff_base=0.02, backoff_cap=0.05)
    assert make_provider(config("--provider", "auto")).name == "auto"   # built without the network
    watcher = Watcher(provider)   # type: ignore[arg-type]
    watcher.start()
    try:
        deadline = time.monotonic() + 5
        while len(calls.errors) < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert calls.errors[:3] == ["connection"] * 3
        assert watcher.items.empty() and provider.name == "auto" and detected == []
        await late.start()
        assert await watcher.next() is None          # the state at start-up: no notice
        assert provider.name == "gce" and detected == ["gce"]
        late.preempt()
        notice = await watcher.next()
        assert notice is not None and notice.kind is NoticeKind.PREEMPTION
    finally:
        await watcher.stop()
        await late.stop()


def test_explicit_gce_is_built_without_asking_the_network() -> None:
    provider = make_provider(config("--provider", "gce", "--metadata-url", "http://127.0.0.1:1",
                                    "--notice-seconds", "90"))
    assert isinstance(provider, GceProvider) and provider.root_url == "http://127.0.0.1:1"


# -- the emulator's own semantics (what the provider relies on) ----------------------------------


async def test_emulator_requires_flavor_and_refuses_forwarded_requests(emulator: GceMetadataEmulator) -> None:
    url = f"{emulator.url}/computeMetadata/v1/instance/preempted"
    async with aiohttp.ClientSession() as session:
        async with session.get(url) as response:
            assert response.status == 403
            assert response.headers["Metadata-Flavor"] == "Google"
        async with session.get(url, headers={**FLAVOR, "X-Forwarded-For": "10.0.0.1"}) as response:
            assert response.status == 403
        async with session.get(url, headers=FLAVOR) as response:
            assert response.status == 200
            assert await response.text() == "FALSE"
            assert response.headers["Metadata-Flavor"] == "Google"
        async with session.get(f"{emulator.url}/computeMetadata/v1/instance/zone", headers=FLAVOR) as response:
            assert (await response.text()).endswith("/zones/us-central1-a")


async def test_emulator_hanging_get_semantics(emulator: GceMetadataEmulator) -> None:
    url = f"{emulator.url}/computeMetadata/v1/instance/preempted"
    async with aiohttp.ClientSession(headers=FLAVOR) as session:
        async with session.get(url) as response:
            etag = response.headers["ETag"]

        # Current ETag: held until timeout_sec, then the unchanged value and ETag.
        started = time.monotonic()
        async with session.get(url, params={"wait_for_change": "true", "last_etag": etag,
                                            "timeout_sec": "0.3"}) as response:
            assert await response.text() == "FALSE" and response.headers["ETag"] == etag
        assert time.monotonic() - started >= 0.25

        # Stale ETag: answered at once.
        started = time.monotonic()
        async with session.get(url, params={"wait_for_change": "true", "last_etag": "stale",
                                            "timeout_sec": "5"}) as response:
            assert await response.text() == "FALSE"
        assert time.monotonic() - started < 1

        # No last_etag: waits for the next change, which then carries a new ETag.
        async def flip_soon() -> None:
            await asyncio.sleep(0.1)
            async with session.post(f"{emulator.url}/sim/preempt") as response:
                assert response.status == 200

        flip = asyncio.create_task(flip_soon())
        try:
            async with session.get(url, params={"wait_for_change": "true", "timeout_sec": "5"}) as response:
                assert await response.text() == "TRUE"
                assert response.headers["ETag"] != etag
        finally:
            await flip


async def test_emulator_http_triggers_fill_upcoming_maintenance(emulator: GceMetadataEmulator) -> None:
    async with aiohttp.ClientSession(headers=FLAVOR) as session:
        async with session.post(f"{emulator.url}/sim/maintenance",
                                params={"event": "TERMINATE_ON_HOST_MAINTENANCE",
                                        "window_start": "2030-01-01T00:00:00Z"}) as response:
            assert response.status == 200
        async with session.get(f"{emulator.url}/computeMetadata/v1/instance/upcoming-maintenance",
                               params={"alt": "json"}) as response:
            assert (await response.json())["window_start_time"] == "2030-01-01T00:00:00Z"
        async with session.post(f"{emulator.url}/sim/maintenance", params={"event": "SOON"}) as response:
            assert response.status == 400
        async with session.post(f"{emulator.url}/sim/reset") as response:
            assert response.status == 200
        async with session.get(f"{emulator.url}/computeMetadata/v1/instance/maintenance-event") as response:
            assert await response.text() == "NONE"

"""The real Azure provider against the IMDS emulator (Scheduled Events), over loopback HTTP.

Polling every 0.05 s, 0.5 s requests and backoff capped at 0.2 s keep the file to seconds; every
emulator and watch task is stopped by its fixture, even when a test fails.
"""

from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator

import aiohttp
import pytest
from providerlib import (
    FAULTS,
    Calls,
    Watcher,
    assert_fault_is_retried_and_the_notice_arrives_after,
    config,
    eventually,
    free_port,
)
from spotguard_sim.aws_metadata import AwsMetadataEmulator
from spotguard_sim.azure_metadata import AzureMetadataEmulator

from spotguard.notice import NoticeKind
from spotguard.providers import REGISTRY, AutoProvider, ProviderUnreachable, detect
from spotguard.providers.azure import AzureProvider

pytestmark = pytest.mark.timeout(60)

CLOCK = 1_000.0


@pytest.fixture
async def emulator() -> AsyncIterator[AzureMetadataEmulator]:
    async with AzureMetadataEmulator() as emulator:
        yield emulator


def fast_provider(url: str, calls: Calls, **overrides: object) -> AzureProvider:
    options: dict[str, object] = dict(root_url=url, notice_seconds=None, on_error=calls.on_error, on_ok=calls.on_ok,
                                      clock=lambda: CLOCK, poll_seconds=0.05, request_timeout_seconds=0.5,
                                      first_request_timeout_seconds=3.0, backoff_base_seconds=0.05,
                                      backoff_cap_seconds=0.2)
    options.update(overrides)
    return AzureProvider(**options)  # type: ignore[arg-type]


@pytest.fixture
async def watcher(emulator: AzureMetadataEmulator, calls: Calls) -> AsyncIterator[Watcher]:
    watcher = Watcher(fast_provider(emulator.url, calls))
    try:
        yield watcher
    finally:
        await watcher.stop()


async def test_no_events_then_a_spot_eviction_then_its_cancellation(emulator, watcher, calls):
    watcher.start()
    assert await watcher.next() is None
    before = time.time()
    emulator.preempt(seconds=30)
    notice = await watcher.next(timeout=1.0)
    assert notice is not None and notice.kind is NoticeKind.PREEMPTION and notice.detail == "Preempt"
    # Azure's NotBefore, to the second it writes.
    assert before + 29 <= notice.deadline <= time.time() + 30
    emulator.reset()      # a cancelled event simply disappears
    assert await watcher.next() is None
    assert calls.errors == [] and emulator.acknowledged == []


async def test_other_vms_events_and_freezes_are_no_notice_but_a_reboot_of_this_vm_is(emulator, watcher):
    watcher.start()
    assert await watcher.next() is None
    emulator.add_event("Preempt", resources=["aks-gpuspot-12345678-vmss_1"])
    emulator.add_event("Freeze")
    await asyncio.sleep(0.3)
    assert watcher.items.empty()
    emulator.add_event("Reboot", seconds=900)
    notice = await watcher.next(timeout=1.0)
    assert notice is not None and notice.kind is NoticeKind.HOST_MAINTENANCE and notice.detail == "Reboot"


async def test_the_slow_first_call_that_turns_scheduled_events_on_is_waited_for(calls):
    async with AzureMetadataEmulator(first_call_delay=1.0) as emulator:
        emulator.preempt()
        watcher = Watcher(fast_provider(emulator.url, calls))   # 0.5 s requests, 3 s for the first
        watcher.start()
        try:
            notice = await watcher.next(timeout=4.0)
            assert notice is not None and notice.kind is NoticeKind.PREEMPTION
            assert calls.errors == []
        finally:
            await watcher.stop()


@pytest.mark.parametrize(("mode", "reason"), FAULTS, ids=[mode for mode, _ in FAULTS])
async def test_fault_is_reported_retried_and_the_notice_still_arrives_after_recovery(
        emulator, watcher, calls, mode, reason):
    await assert_fault_is_retried_and_the_notice_arrives_after(emulator, watcher, calls, mode, reason)


async def test_an_undocumented_document_is_a_body_error_and_is_retried(emulator, watcher, calls):
    emulator.set_raw('{"DocumentIncarnation": 3, "Events": [{"EventType": "Preempt"}]}')
    watcher.start()
    await eventually(lambda: calls.errors.count("bad_body") >= 2, what="bad_body errors")
    assert watcher.items.empty()
    emulator.reset()
    assert await watcher.next() is None


# -- probe and detection -------------------------------------------------------------------------


async def test_probe_accepts_azure_and_refuses_ec2(emulator, calls):
    assert await fast_provider(emulator.url, calls).probe() is None
    async with AwsMetadataEmulator() as aws:
        with pytest.raises(ProviderUnreachable, match="Azure IMDS at .*: http_other: HTTP 404"):
            await fast_provider(aws.url, calls).probe()


async def test_auto_detects_azure_after_gce_and_aws_refuse(emulator):
    provider = await detect(config("--provider", "auto", "--metadata-url", emulator.url))
    assert isinstance(provider, AzureProvider) and provider.root_url == emulator.url


async def test_auto_follows_azure_once_it_answers(calls):
    late = AzureMetadataEmulator(port=free_port())
    detected: list[str] = []
    provider = AutoProvider(config("--provider", "auto", "--metadata-url", late.url), REGISTRY, on_error=calls.on_error,
                            on_ok=calls.on_ok, on_detected=detected.append, backoff_base=0.02, backoff_cap=0.05)
    watcher = Watcher(provider)
    watcher.start()
    try:
        await eventually(lambda: len(calls.errors) >= 2, what="failed probes")
        await late.start()
        assert await watcher.next(timeout=5.0) is None
        assert detected == ["azure"]
        late.preempt()
        notice = await watcher.next(timeout=5.0)
        assert notice is not None and notice.source.startswith("azure:scheduledevents/")
    finally:
        await watcher.stop()
        await late.stop()


# -- the emulator's own semantics (what the provider relies on) ----------------------------------


async def test_emulator_speaks_imds(emulator):
    base = f"{emulator.url}/metadata/scheduledevents"
    async with aiohttp.ClientSession() as http:
        async with http.get(base, params={"api-version": "2020-07-01"}) as response:
            assert response.status == 400          # no Metadata: true
        async with http.get(base, headers={"Metadata": "true"}) as response:
            assert response.status == 400          # no api-version
        async with http.get(base, params={"api-version": "2020-07-01"},
                            headers={"Metadata": "true", "X-Forwarded-For": "10.0.0.9"}) as response:
            assert response.status == 400
        async with http.post(f"{emulator.url}/sim/event?type=Redeploy&seconds=600") as response:
            assert response.status == 200
        async with http.get(base, params={"api-version": "2020-07-01"}, headers={"Metadata": "true"}) as response:
            document = await response.json()
        (event,) = document["Events"]
        assert event["EventType"] == "Redeploy" and event["Resources"] == [emulator.vm_name]
        assert event["NotBefore"].endswith(" GMT") and document["DocumentIncarnation"] == 2
        async with http.post(base, params={"api-version": "2020-07-01"}, headers={"Metadata": "true"},
                             json={"StartRequests": [{"EventId": event["EventId"]}]}) as response:
            assert response.status == 200
        assert emulator.acknowledged == [event["EventId"]]
        async with http.post(f"{emulator.url}/sim/event?type=Explode") as response:
            assert response.status == 400

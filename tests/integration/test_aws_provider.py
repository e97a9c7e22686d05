"""The real AWS provider against the EC2 metadata emulator (IMDSv2), over loopback HTTP.

Polling every 0.05 s, 0.5 s requests and backoff capped at 0.2 s keep the file to seconds; every
emulator and watch task is stopped by its fixture, even when a test fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
import time
import urllib.request
from typing import AsyncIterator

import aiohttp
import pytest
import structlog
from aiohttp import web
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
from spotguard_sim.gce_metadata import GceMetadataEmulator

from spotguard.config import add_arguments, load
from spotguard.notice import NoticeKind
from spotguard.providers import REGISTRY, AutoProvider, ProviderUnreachable, detect, make_provider
from spotguard.providers.aws import (
    INSTANCE_ACTION_KEY,
    REBALANCE_KEY,
    SCHEDULED_KEY,
    TOKEN_HEADER,
    TOKEN_TTL_HEADER,
    AwsProvider,
)

pytestmark = pytest.mark.timeout(60)

CLOCK = 1_000.0


@pytest.fixture
async def emulator() -> AsyncIterator[AwsMetadataEmulator]:
    async with AwsMetadataEmulator() as emulator:
        yield emulator


def fast_provider(url: str, calls: Calls, **overrides: object) -> AwsProvider:
    options: dict[str, object] = dict(root_url=url, notice_seconds=None, on_error=calls.on_error, on_ok=calls.on_ok,
                                      clock=lambda: CLOCK, poll_seconds=0.05, slow_keys_seconds=0.1,
                                      request_timeout_seconds=0.5,
                                      backoff_base_seconds=0.05, backoff_cap_seconds=0.2)
    options.update(overrides)
    return AwsProvider(**options)  # type: ignore[arg-type]


@pytest.fixture
async def watcher(emulator: AwsMetadataEmulator, calls: Calls) -> AsyncIterator[Watcher]:
    watcher = Watcher(fast_provider(emulator.url, calls))
    try:
        yield watcher
    finally:
        await watcher.stop()


async def test_no_notice_then_a_spot_interruption_then_its_withdrawal(emulator, watcher, calls):
    watcher.start()
    assert await watcher.next() is None
    before = time.time()
    emulator.preempt(action="stop", seconds=120)
    notice = await watcher.next(timeout=1.0)
    assert notice is not None and notice.kind is NoticeKind.PREEMPTION and notice.detail == "stop"
    # EC2's own time, to the second it writes: not the provider's clock.
    assert before + 119 <= notice.deadline <= time.time() + 120
    emulator.reset()
    assert await watcher.next() is None
    assert calls.errors == [] and calls.oks > 0
    # One token for the whole watch: not a PUT per poll.
    assert emulator.requests["api/token"] == 1


async def test_the_cheap_watch_brings_the_notice_between_full_reads(emulator, calls):
    """Full reads every 30 s: a notice seen within a second can only have come through the
    AnswerWatch thread polling the instance-action every 0.05 s."""
    watcher = Watcher(fast_provider(emulator.url, calls, slow_keys_seconds=30.0))
    try:
        watcher.start()
        assert await watcher.next() is None
        reads = emulator.requests[INSTANCE_ACTION_KEY]
        await asyncio.sleep(0.5)
        assert emulator.requests[INSTANCE_ACTION_KEY] >= reads + 5   # the watch's own reads
        emulator.preempt(action="terminate", seconds=120)
        notice = await watcher.next(timeout=1.0)
        assert notice is not None and notice.detail == "terminate"
        emulator.reset()
        assert await watcher.next(timeout=1.0) is None
        assert calls.errors == []
    finally:
        await watcher.stop()


async def test_interruption_present_at_startup_is_yielded_first(emulator, watcher):
    emulator.preempt(seconds=60)
    watcher.start()
    notice = await watcher.next()
    assert notice is not None and notice.detail == "terminate"
    assert abs(notice.deadline - (time.time() + 60)) < 2


async def test_an_unreadable_time_falls_back_to_two_minutes_from_the_first_sighting(emulator, watcher):
    emulator.set_raw(INSTANCE_ACTION_KEY, '{"action": "terminate", "time": "soon"}')
    watcher.start()
    notice = await watcher.next()
    assert notice is not None and notice.deadline == CLOCK + 120
    await asyncio.sleep(0.3)   # several polls later the deadline has not moved: nothing new yielded
    assert watcher.items.empty()


async def test_an_expired_token_is_renewed_without_an_error(emulator, watcher, calls):
    watcher.start()
    assert await watcher.next() is None
    emulator.set_fault("expire_tokens")
    await eventually(lambda: emulator.requests["api/token"] == 2, what="a second token")
    emulator.preempt()
    assert (await watcher.next()) is not None
    assert calls.errors == []


@pytest.fixture
def logs():
    """Every log event while the test runs, whatever logging an earlier test in this process set
    up (the bench configures a warning-level filter); that configuration is restored afterwards."""
    saved = structlog.get_config()
    structlog.reset_defaults()
    try:
        with structlog.testing.capture_logs() as captured:
            yield captured
    finally:
        structlog.configure(**saved)


async def test_a_rebalance_recommendation_is_logged_and_is_no_notice(emulator, watcher, logs):
    watcher.start()
    assert await watcher.next() is None
    emulator.rebalance()
    await eventually(lambda: any(e["event"] == "aws_rebalance_recommendation" for e in logs), what="the log line")
    assert watcher.items.empty()
    assert [e["notice_time"] for e in logs if e["event"] == "aws_rebalance_recommendation"][0].endswith("Z")


@pytest.mark.parametrize(("mode", "reason"), FAULTS, ids=[mode for mode, _ in FAULTS])
async def test_fault_is_reported_retried_and_the_notice_still_arrives_after_recovery(
        emulator, watcher, calls, mode, reason):
    await assert_fault_is_retried_and_the_notice_arrives_after(emulator, watcher, calls, mode, reason)


async def test_a_token_request_that_never_answers_names_the_hop_limit(emulator, calls):
    emulator.set_fault("token_hangs")
    with pytest.raises(ProviderUnreachable, match="timeout: .*HttpPutResponseHopLimit >= 2"):
        await fast_provider(emulator.url, calls).probe()


# -- probe and detection -------------------------------------------------------------------------


async def test_probe_accepts_ec2_and_refuses_other_servers(emulator, calls):
    assert await fast_provider(emulator.url, calls).probe() is None
    async with GceMetadataEmulator() as gce:
        with pytest.raises(ProviderUnreachable, match="http_other: token request: HTTP 404"):
            await fast_provider(gce.url, calls).probe()
    impostor = AwsMetadataEmulator(instance_id="not-an-instance")
    async with impostor:
        with pytest.raises(ProviderUnreachable, match="is not an EC2 instance id"):
            await fast_provider(impostor.url, calls).probe()


async def test_auto_detects_aws_after_gce_refuses(emulator):
    provider = await detect(config("--provider", "auto", "--metadata-url", emulator.url))
    assert isinstance(provider, AwsProvider) and provider.root_url == emulator.url


async def test_auto_follows_ec2_once_it_answers(calls):
    late = AwsMetadataEmulator(port=free_port())
    detected: list[str] = []
    provider = AutoProvider(config("--provider", "auto", "--metadata-url", late.url), REGISTRY, on_error=calls.on_error,
                            on_ok=calls.on_ok, on_detected=detected.append, backoff_base=0.02, backoff_cap=0.05)
    watcher = Watcher(provider)
    watcher.start()
    try:
        await eventually(lambda: len(calls.errors) >= 2, what="failed probes")
        await late.start()
        assert await watcher.next() is None
        assert detected == ["aws"]
        late.preempt()
        notice = await watcher.next(timeout=5.0)
        assert notice is not None and notice.source == "aws:spot/instance-action"
    finally:
        await watcher.stop()
        await late.stop()


def test_explicit_aws_is_built_without_asking_the_network_and_ignores_gce_metadata_host():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    loaded = load(parser.parse_args(["--node-name", "n", "--provider", "aws"]),
                  environ={"GCE_METADATA_HOST": "10.0.0.1:8080"})
    provider = make_provider(loaded)
    assert isinstance(provider, AwsProvider) and provider.root_url == "http://169.254.169.254"


# -- the emulator's own semantics (what the provider relies on) ----------------------------------


async def test_emulator_speaks_imdsv2(emulator):
    async with aiohttp.ClientSession() as http:
        base = emulator.url
        async with http.get(f"{base}/latest/meta-data/instance-id") as response:
            assert response.status == 401          # IMDSv1 refused: tokens required
        async with http.put(f"{base}/latest/api/token") as response:
            assert response.status == 400          # no TTL
        async with http.put(f"{base}/latest/api/token", headers={TOKEN_TTL_HEADER: "21601"}) as response:
            assert response.status == 400          # TTL above six hours
        async with http.put(f"{base}/latest/api/token",
                            headers={TOKEN_TTL_HEADER: "60", "X-Forwarded-For": "10.0.0.9"}) as response:
            assert response.status == 403
        async with http.put(f"{base}/latest/api/token", headers={TOKEN_TTL_HEADER: "60"}) as response:
            assert response.status == 200 and response.headers[TOKEN_TTL_HEADER] == "60"
            token = await response.text()
        headers = {TOKEN_HEADER: token}
        async with http.get(f"{base}/latest/meta-data/spot/instance-action", headers=headers) as response:
            assert response.status == 404
        async with http.post(f"{base}/sim/preempt?action=hibernate&seconds=30") as response:
            assert response.status == 200
        async with http.get(f"{base}/latest/meta-data/spot/instance-action", headers=headers) as response:
            assert response.status == 200 and (await response.json(content_type=None))["action"] == "hibernate"
        async with http.post(f"{base}/sim/preempt?action=explode") as response:
            assert response.status == 400


def test_the_command_serves_until_sigterm_and_refuses_a_bad_listen_address():
    bad = subprocess.run([sys.executable, "-m", "spotguard_sim", "aws-metadata", "--listen", "nowhere"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--listen must be HOST:PORT" in bad.stderr
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "spotguard_sim", "aws-metadata", "--listen",
                               f"127.0.0.1:{port}"], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        assert "listening on http://127.0.0.1:" in server.stdout.readline()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/sim/preempt?seconds=30", method="POST")
        with urllib.request.urlopen(request, timeout=5) as response:
            state = json.load(response)
        assert json.loads(state["values"][INSTANCE_ACTION_KEY])["action"] == "terminate"
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=10) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(timeout=10)


async def test_an_unreadable_rebalance_never_holds_back_the_interruption(emulator, watcher, calls):
    emulator.set_raw(REBALANCE_KEY, '{"noticeTime": null}')
    watcher.start()
    assert await watcher.next() is None
    emulator.preempt()
    notice = await watcher.next(timeout=1.0)
    assert notice is not None and notice.detail == "terminate"
    assert calls.errors == []


async def test_a_token_that_is_not_one_is_a_body_error_not_a_crash(emulator, calls):
    emulator.set_fault("garbage")    # not UTF-8
    with pytest.raises(ProviderUnreachable, match="bad_body"):
        await fast_provider(emulator.url, calls).probe()
    # A captive portal's page: text, but it would be a forbidden header value if used as a token.
    async def sign_in_page(_: web.Request) -> web.Response:
        return web.Response(text="<html>\n<body>Sign in</body></html>")

    portal = web.Application()
    portal.router.add_route("*", "/{tail:.*}", sign_in_page)
    runner = web.AppRunner(portal)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        with pytest.raises(ProviderUnreachable, match="bad_body: api/token: not an IMDSv2 token"):
            await fast_provider(f"http://127.0.0.1:{port}", calls).probe()
    finally:
        await runner.cleanup()


async def test_the_token_is_renewed_before_it_expires(emulator, calls):
    watcher = Watcher(fast_provider(emulator.url, calls, token_ttl_seconds=1))
    watcher.start()
    try:
        assert await watcher.next() is None
        # Renewed every half second (half the TTL), so no request ever meets a 401.
        await eventually(lambda: emulator.requests["api/token"] >= 4, timeout=5.0, what="renewed tokens")
        emulator.preempt()
        assert await watcher.next() is not None
        assert calls.errors == []
    finally:
        await watcher.stop()


async def test_a_scheduled_event_within_the_lead_is_a_long_notice_until_it_is_cancelled(emulator, calls, logs):
    watcher = Watcher(fast_provider(emulator.url, calls, clock=time.time, scheduled_lead_seconds=600))
    watcher.start()
    try:
        assert await watcher.next() is None
        emulator.schedule(code="instance-stop", seconds=7200)      # two hours away: logged only
        await eventually(lambda: any(e["event"] == "aws_scheduled_event" for e in logs), what="the log line")
        with pytest.raises(TimeoutError):
            await watcher.next(timeout=0.5)
        before = time.time()
        near = emulator.schedule(code="system-reboot", seconds=300)
        notice = await watcher.next(timeout=2.0)
        assert notice is not None and notice.kind is NoticeKind.HOST_MAINTENANCE
        assert notice.detail == f"system-reboot {near}" and notice.source == "aws:events/maintenance/scheduled"
        assert before + 298 <= notice.deadline <= time.time() + 301   # NotBefore, to the second
        emulator.end_scheduled(near, how="cancel")
        assert await watcher.next(timeout=2.0) is None
        # A spot interruption still comes through, and first.
        emulator.preempt(seconds=120)
        assert (await watcher.next(timeout=2.0)).kind is NoticeKind.PREEMPTION
        assert calls.errors == []
    finally:
        await watcher.stop()


async def test_garbage_scheduled_events_are_logged_and_never_hold_back_the_interruption(emulator, calls, logs):
    emulator.set_raw(SCHEDULED_KEY, '[{"Code": "system-reboot", "NotBefore": "soon"}]')
    watcher = Watcher(fast_provider(emulator.url, calls, clock=time.time))
    watcher.start()
    try:
        assert await watcher.next() is None
        emulator.preempt()
        notice = await watcher.next(timeout=1.0)
        assert notice is not None and notice.detail == "terminate"
        assert calls.errors == []
        assert any(e["event"] == "aws_key_unreadable" and e["key"] == SCHEDULED_KEY and "NotBefore" in e["error"] for e in logs)
    finally:
        await watcher.stop()


async def test_with_a_lead_of_zero_scheduled_events_are_never_read(emulator, calls):
    emulator.schedule(code="system-reboot", seconds=60)
    watcher = Watcher(fast_provider(emulator.url, calls, clock=time.time, scheduled_lead_seconds=0))
    watcher.start()
    try:
        assert await watcher.next() is None
        await asyncio.sleep(0.5)
        assert emulator.requests[SCHEDULED_KEY] == 0 and emulator.requests[INSTANCE_ACTION_KEY] > 3
    finally:
        await watcher.stop()


async def test_with_rebalance_action_cordon_a_recommendation_is_a_cordon_only_notice(emulator, calls):
    watcher = Watcher(fast_provider(emulator.url, calls, clock=time.time, rebalance_action="cordon",
                                    rebalance_release_seconds=1800))
    watcher.start()
    try:
        assert await watcher.next() is None
        emulator.rebalance()
        notice = await watcher.next(timeout=2.0)
        assert notice is not None and notice.kind is NoticeKind.REBALANCE and notice.cordon_only
        # The interruption that follows is acted on in full.
        emulator.preempt(seconds=120)
        notice = await watcher.next(timeout=2.0)
        assert notice is not None and notice.kind is NoticeKind.PREEMPTION and not notice.cordon_only
    finally:
        await watcher.stop()


async def test_an_auto_scaling_termination_is_a_notice_and_log_leaves_it_alone(emulator, calls, logs):
    watcher = Watcher(fast_provider(emulator.url, calls, clock=time.time))   # default: cordon-and-drain
    watcher.start()
    try:
        assert await watcher.next() is None
        emulator.set_lifecycle_state("Terminated")
        notice = await watcher.next(timeout=2.0)
        assert notice is not None and notice.kind is NoticeKind.ASG_TERMINATION and not notice.cordon_only
        assert notice.detail == "Terminated"
    finally:
        await watcher.stop()
    logged = Watcher(fast_provider(emulator.url, calls, clock=time.time, asg_termination_action="log"))
    logged.start()
    try:
        assert await logged.next() is None
        await asyncio.sleep(0.5)
        assert logged.items.empty()
        assert any(e["event"] == "aws_asg_lifecycle_state" and e["state"] == "Terminated" for e in logs)
    finally:
        await logged.stop()

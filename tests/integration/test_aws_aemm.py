"""spotguard's AWS provider against AWS's own EC2 metadata mock (amazon-ec2-metadata-mock v1.13.0,
built from the Go module proxy by scripts/install-aemm.sh): a mock this project did not write, so
the IMDSv2 token flow and the bodies are read as AWS's own tooling serves them, not as our
emulator (spotguard_sim.aws_metadata) thinks they look.

Each test starts AEMM with one command (`spot`, `events`, `asglifecycle`), IMDSv2 only, on a free
loopback port, and stops it, even when the test fails.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
import urllib.error
import uuid
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import AsyncIterator, Callable, Iterator

import pytest
from providerlib import Calls, Watcher, free_port
from spotguard_sim import paths
from spotguard_sim.support import wait_until

from spotguard.notice import NoticeKind
from spotguard.providers.aws import AwsProvider

pytestmark = [pytest.mark.awstools, pytest.mark.timeout(120)]



def rfc3339(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


class Aemm:
    """One AEMM process on loopback, IMDSv2 only."""

    def __init__(self, binary: Path, tmp_path: Path) -> None:
        self.binary = binary
        self.port = free_port("127.0.0.1")
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp_path / "aemm.log"
        self.home = tmp_path  # AEMM reads (and may write) its config under $HOME
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, *args: str) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [str(self.binary), *args, "--hostname", "127.0.0.1", "--port", str(self.port), "--imdsv2"],
                stdout=log, stderr=subprocess.STDOUT, env={"HOME": str(self.home), "PATH": os.environ["PATH"]})
        deadline = time.monotonic() + 15
        while True:
            assert self.process.poll() is None, f"AEMM exited: {self.log.read_text()[-2000:]}"
            try:
                urllib.request.urlopen(urllib.request.Request(
                    self.url + "/latest/api/token", method="PUT",
                    headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"}), timeout=1).read()
                return
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline, f"AEMM did not answer: {self.log.read_text()[-2000:]}"
                time.sleep(0.1)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


@pytest.fixture
def aemm(tmp_path: Path) -> Iterator[Aemm]:
    binary = paths.installed("install-aemm.sh")
    if binary is None:
        pytest.skip("AEMM is not built (scripts/install-aemm.sh; ./dev setup builds it)")
    running = Aemm(binary, tmp_path)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
async def watch(aemm: Aemm) -> AsyncIterator[Callable[..., Watcher]]:
    """watch(**options): the real AwsProvider polling AEMM (fast), as a Watcher."""
    watchers: list[Watcher] = []

    def make(**options: object) -> Watcher:
        provider = AwsProvider(root_url=aemm.url, on_error=calls.on_error, on_ok=calls.on_ok, poll_seconds=0.05,
                               slow_keys_seconds=0.1, request_timeout_seconds=2.0, backoff_base_seconds=0.05,
                               backoff_cap_seconds=0.2, **options)  # type: ignore[arg-type]
        watcher = Watcher(provider)
        watchers.append(watcher)
        watcher.start()
        return watcher

    calls = Calls()
    try:
        yield make
    finally:
        for watcher in watchers:
            await watcher.stop()
    assert calls.errors == [], f"AEMM's answers counted as metadata errors: {calls.errors}"


async def test_aemm_is_detected_as_ec2_and_its_spot_notice_comes_after_its_delay(aemm, watch):
    aemm.start("spot", "--mock-delay-sec", "2", "--action", "stop")
    await AwsProvider(root_url=aemm.url).probe()   # the token flow and an instance id "i-..."
    watcher = watch()
    assert await watcher.next() is None, "nothing before AEMM's delay"
    notice = await watcher.next(timeout=10)
    assert notice is not None and notice.kind is NoticeKind.PREEMPTION and notice.detail == "stop"
    # AEMM's time: "request time + 2 minutes" (moving later on every read; spotguard keeps the first).
    assert 100 < notice.deadline - time.time() <= 121, notice
    with pytest.raises(TimeoutError):
        await watcher.next(timeout=1.0)   # a later time on every read is no new notice


async def test_a_rebalance_recommendation_from_aemm_cordons_when_asked(aemm, watch):
    aemm.start("spot", "--mock-delay-sec", "600", "--rebalance-delay-sec", "0")
    watcher = watch(rebalance_action="cordon", rebalance_release_seconds=1800)
    notice = await watcher.next(timeout=10)
    if notice is None:   # the first read can come before the slow keys are read
        notice = await watcher.next(timeout=10)
    assert notice is not None and notice.kind is NoticeKind.REBALANCE and notice.cordon_only, notice


@pytest.mark.parametrize("state, acted_on", [("active", True), ("canceled", False), ("completed", False)])
async def test_a_scheduled_event_from_aemm_is_a_notice_until_it_is_canceled_or_completed(aemm, watch, state, acted_on):
    now = datetime.now(timezone.utc)
    not_before = now + timedelta(minutes=10)
    aemm.start("events", "--code", "system-reboot", "--state", state, "--not-before", rfc3339(not_before),
               "--not-after", rfc3339(now + timedelta(days=1)), "--not-before-deadline", rfc3339(now + timedelta(days=2)))
    watcher = watch(scheduled_lead_seconds=3600)
    notice = await watcher.next(timeout=10)
    if acted_on:
        if notice is None:
            notice = await watcher.next(timeout=10)
        assert notice is not None and notice.kind is NoticeKind.HOST_MAINTENANCE, notice
        assert notice.detail.startswith("system-reboot")
        assert abs(notice.deadline - not_before.timestamp()) <= 1, (notice.deadline, not_before)
    else:
        assert notice is None
        with pytest.raises(TimeoutError):
            await watcher.next(timeout=1.0)


async def test_aemm_asg_termination_drains_by_default(aemm, watch):
    aemm.start("asglifecycle", "--asg-termination-delay-sec", "0")
    watcher = watch()
    notice = await watcher.next(timeout=10)
    if notice is None:
        notice = await watcher.next(timeout=10)
    assert notice is not None and notice.kind is NoticeKind.ASG_TERMINATION and not notice.cordon_only, notice


@pytest.mark.cluster
@pytest.mark.timeout(180)
async def test_a_daemon_killed_mid_drain_resumes_the_aemm_notice_it_was_following(aemm, world, tmp_path):
    """The whole daemon against AEMM on the real control plane. AEMM restarts with a spot notice
    (the daemon's token is then refused once and renewed), a PDB holds the eviction, the daemon is
    SIGKILLed and restarted: it resumes from the node's annotations with the first deadline, although
    AEMM moves the notice's time forward on every read, and drains once the PDB lets it."""
    from spotguard_sim.world import DaemonProcess

    world.cloud = "aws"
    node = f"gpu-{uuid.uuid4().hex[:8]}"
    await world.add_vm(node, spotguard=False)   # the emulator it gets stays unused: AEMM is this VM's IMDS
    aemm.start("spot", "--mock-delay-sec", "3600")   # no notice yet
    daemon = DaemonProcess(node=node, kubeconfig=world.kubeconfig, metadata_url=aemm.url, provider="aws",
                           log_path=tmp_path / "spotguard.log")
    daemons = [daemon]
    try:
        daemon.start()
        await asyncio.to_thread(daemon.wait_ready)
        # IfHealthyBudget (the default) with one replica: the only pod, once not-ready, may not be evicted.
        world.deploy_vllm(replicas=1)
        world.api.call("POST", f"/apis/policy/v1/namespaces/{world.namespace}/poddisruptionbudgets", body={
            "apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": {"name": "vllm-pdb"},
            "spec": {"minAvailable": 1, "selector": {"matchLabels": {"app": "vllm"}}}})
        [pod] = await asyncio.to_thread(world.wait_ready_pods, 1)

        aemm.stop()
        aemm.start("spot", "--mock-delay-sec", "0")   # a new AEMM: the old token is unknown to it
        annotations = lambda: world.node(node)["metadata"].get("annotations") or {}   # noqa: E731
        await asyncio.to_thread(wait_until, lambda: annotations().get("spotguard.io/phase") == "evicting",
                                timeout=30, what="the drain held by the PDB")
        deadline = annotations()["spotguard.io/deadline"]
        await asyncio.to_thread(wait_until, lambda: world.events(reason="EvictionBlocked"), timeout=20,
                                what="the eviction refused by the PDB")

        daemon.kill()
        daemon = DaemonProcess(node=node, kubeconfig=world.kubeconfig, metadata_url=aemm.url, provider="aws",
                               log_path=tmp_path / "spotguard-2.log")
        daemons.append(daemon)
        daemon.start()
        await asyncio.to_thread(daemon.wait_ready)
        await asyncio.to_thread(wait_until, lambda: '"resuming"' in daemon.log_path.read_text(), timeout=20,
                                what="the restarted daemon resuming")
        await asyncio.sleep(3)   # several polls, each with a later time from AEMM
        assert annotations()["spotguard.io/deadline"] == deadline
        assert annotations()["spotguard.io/phase"] == "evicting"

        world.api.call("DELETE", f"/apis/policy/v1/namespaces/{world.namespace}/poddisruptionbudgets/vllm-pdb")
        await asyncio.to_thread(wait_until, lambda: annotations().get("spotguard.io/phase") == "drained",
                                timeout=30, what="the drain finished by the restarted daemon")
        evicted = [e for e in world.events(reason="Evicted") if e["involvedObject"]["name"] == pod["metadata"]["name"]]
        assert len(evicted) == 1
        assert world.node(node)["spec"].get("unschedulable") is True
    finally:
        for running in daemons:
            running.stop()

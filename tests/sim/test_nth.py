"""The benchmark's real-NTH peer (spotguard_sim.bench.nth): AWS's Node Termination Handler v1.25.0,
built from the Go module proxy (scripts/install-nth.sh), runs against the EC2 metadata emulator and
the real local control plane from a private mount namespace, and does what NTH does on a spot
notice: cordon the node and evict its pods. Its process is stopped when its task is cancelled."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from pathlib import Path

import pytest
from spotguard_sim.bench import nth
from spotguard_sim.support import wait_until
from spotguard_sim.world import World

pytestmark = [pytest.mark.cluster, pytest.mark.awstools, pytest.mark.timeout(180)]


def _pids_running(executable: Path) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.readlink(entry / "exe") == str(executable):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


async def test_the_real_nth_cordons_and_evicts_on_a_spot_notice_and_stops_with_its_task(world: World):
    executable = nth.binary()
    if executable is None:
        pytest.skip("NTH is not built (scripts/install-nth.sh; ./dev setup builds it)")
    if os.geteuid() != 0:
        pytest.skip("NTH runs in a private mount namespace, which needs root")
    host_secrets = Path("/var/run/secrets/kubernetes.io/serviceaccount")
    existed = host_secrets.exists()
    world.cloud = "aws"
    node = f"gpu-{uuid.uuid4().hex[:8]}"
    vm = await world.add_vm(node, spotguard=False)
    world.deploy_vllm(replicas=1, readiness_gate=False)   # no spotguard here to open the gate
    [pod] = await asyncio.to_thread(world.wait_ready_pods, 1)
    peer = nth.Nth(world, node=node, metadata_url=vm.metadata.url, executable=executable)
    task = asyncio.create_task(peer.run())
    started = time.monotonic()
    try:
        await asyncio.sleep(3)   # NTH reads the node and the instance's metadata at start
        assert not task.done(), peer.log_path.read_text()[-3000:]
        assert not world.node(node)["spec"].get("unschedulable"), "nothing happens before a notice"
        noticed = world.preempt(node, vm_lifetime_seconds=None)

        def evicted() -> bool:
            current = world.api.call("GET", f"/api/v1/namespaces/{world.namespace}/pods",
                                     query={"fieldSelector": f"spec.nodeName={node}"})["items"]
            mine = [p for p in current if p["metadata"]["name"] == pod["metadata"]["name"]]
            return not mine or mine[0]["metadata"].get("deletionTimestamp") is not None

        await asyncio.to_thread(wait_until, evicted, timeout=30, what="NTH to evict the pod")
        assert world.node(node)["spec"].get("unschedulable") is True
        # NTH polls IMDS every 2 s; cordoning and evicting follow at once.
        assert time.time() - noticed < 15, peer.log_path.read_text()[-3000:]
        log = peer.log_path.read_text()
        assert "instance-action" in log or "Spot Interruption" in log or "spot" in log.lower(), log[-3000:]
        # NTH stops itself after a few failed metadata reads in a row (it did on our emulator's old
        # 404 for "no scheduled events"): still running 12 s on, it read everything it polls.
        await asyncio.sleep(max(0.0, started + 12 - time.monotonic()))
        assert not task.done(), peer.log_path.read_text()[-3000:]
        assert _pids_running(executable), "NTH runs while its task does"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert await asyncio.to_thread(wait_until, lambda: not _pids_running(executable), timeout=15,
                                   what="NTH to stop with its task")
    assert host_secrets.exists() == existed, "NTH's token and CA stay in its own mount namespace"

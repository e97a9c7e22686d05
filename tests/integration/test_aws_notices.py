"""AWS's other signals, end to end: `spotguard run` processes with the AWS provider against the EC2
metadata emulator and the real local control plane.

EC2 scheduled events: one far away is only logged; one within --scheduled-event-lead-seconds is a
long notice (the node cordoned and tainted host-maintenance, its deadline the event's NotBefore);
a cancelled event undoes what spotguard did; after a completed reboot the restarted daemon
uncordons the node. Rebalance recommendations: with --rebalance-action cordon the node is
cordoned while its pods keep serving, an interruption that follows drains them, and with none
the cordon is released after --rebalance-release-seconds; --cordon-only does the same for every
notice.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import pytest
from spotguard_sim.support import metric_value as metric
from spotguard_sim.support import wait_until
from spotguard_sim.world import World

from spotguard.providers.http import parse_rfc3339

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(120)]

LEAD_SECONDS = 600


async def aws_node(world: World, **env: str):
    world.cloud = "aws"
    world.daemon_env.update({"SPOTGUARD_SCHEDULED_EVENT_LEAD_SECONDS": str(LEAD_SECONDS), **env})
    name = f"gpu-{uuid.uuid4().hex[:8]}"
    return name, await world.add_vm(name)


def spotguard_cordoned(world: World, node: str, kind: str = "host-maintenance") -> bool:
    held = world.node(node)
    taints = {t["key"]: t.get("value") for t in held["spec"].get("taints") or []}
    return bool(held["spec"].get("unschedulable")) and taints.get("spotguard.io/impending-termination") == kind


def serving(world: World, pod_name: str) -> str | None:
    pod = world.api.call("GET", f"/api/v1/namespaces/{world.namespace}/pods/{pod_name}")
    return next((c["status"] for c in pod.get("status", {}).get("conditions", [])
                 if c["type"] == "spotguard.io/serving"), None)


def undone(world: World, node: str) -> bool:
    held = world.node(node)
    taints = [t["key"] for t in held["spec"].get("taints") or []]
    return not held["spec"].get("unschedulable") and "spotguard.io/impending-termination" not in taints \
        and "spotguard.io/phase" not in (held["metadata"].get("annotations") or {})


def logged(vm, event: str) -> list[dict]:
    lines = vm.daemon.log_path.read_text().splitlines()
    return [entry for entry in map(_json_or_none, lines) if entry and entry.get("event") == event]


def _json_or_none(line: str) -> dict | None:
    try:
        return json.loads(line)
    except ValueError:
        return None


async def test_a_far_event_is_logged_a_near_one_is_a_notice_and_a_cancelled_one_is_undone(world):
    node, vm = await aws_node(world)
    far = vm.metadata.schedule(code="instance-retirement", seconds=3 * 3600)
    await asyncio.to_thread(wait_until, lambda: logged(vm, "aws_scheduled_event"), timeout=20,
                            what="the far event logged")
    await asyncio.sleep(2)   # several polls: still nothing done
    assert not world.node(node)["spec"].get("unschedulable")
    assert logged(vm, "aws_scheduled_event")[0]["event_id"] == far

    near = vm.metadata.schedule(code="system-reboot", seconds=300)
    not_before = time.time() + 300
    await asyncio.to_thread(wait_until, lambda: spotguard_cordoned(world, node), timeout=20,
                            what="cordoned and tainted for the near event")
    annotations = world.node(node)["metadata"]["annotations"]
    assert annotations["spotguard.io/notice-kind"] == "host-maintenance"
    # IMDS gives NotBefore to the second.
    assert abs(parse_rfc3339(annotations["spotguard.io/deadline"]) - not_before) < 2

    vm.metadata.end_scheduled(near, how="cancel")
    await asyncio.to_thread(wait_until, lambda: undone(world, node), timeout=20, what="the cordon and taint undone")
    assert [e for e in world.events(reason="NoticeCancelled") if e["involvedObject"]["name"] == node]


async def test_after_a_completed_reboot_the_restarted_daemon_uncordons_the_node(world):
    node, vm = await aws_node(world)
    reboot = vm.metadata.schedule(code="system-reboot", seconds=120)
    await asyncio.to_thread(wait_until, lambda: spotguard_cordoned(world, node), timeout=20, what="cordoned")
    # The reboot: the daemon goes down with the VM; when it is back the event reads [Completed].
    vm.daemon.kill()
    vm.metadata.end_scheduled(reboot, how="complete")
    world.start_daemon(vm)
    await asyncio.to_thread(vm.daemon.wait_ready)
    await asyncio.to_thread(wait_until, lambda: undone(world, node), timeout=20, what="uncordoned after the reboot")
    assert [e for e in world.events(reason="NoticeCancelled") if e["involvedObject"]["name"] == node]


async def test_a_rebalance_cordon_keeps_the_pod_serving_until_an_interruption_drains_it(world):
    node, vm = await aws_node(world, SPOTGUARD_REBALANCE_ACTION="cordon")
    world.deploy_vllm(replicas=1)
    name = (await asyncio.to_thread(world.wait_ready_pods, 1))[0]["metadata"]["name"]
    vm.metadata.rebalance()
    await asyncio.to_thread(wait_until, lambda: spotguard_cordoned(world, node, "rebalance-recommendation"),
                            timeout=20, what="cordoned for the rebalance recommendation")
    assert world.node(node)["metadata"]["annotations"]["spotguard.io/phase"] == "cordoned"
    await asyncio.sleep(2)   # several decision steps: still serving, nothing evicted
    assert serving(world, name) == "True"
    assert not world.events(reason="Evicted") and world.events(reason="Cordoned")

    vm.metadata.preempt(seconds=120)
    await asyncio.to_thread(wait_until, lambda: serving(world, name) == "False", timeout=20,
                            what="the pod out of rotation at the interruption")
    assert spotguard_cordoned(world, node, "preemption")
    # Two reactions: the cordon, then taking the pod out of rotation at the interruption.
    text = await asyncio.to_thread(vm.daemon.metrics)
    assert metric(text, "spotguard_reaction_duration_seconds_count") == 2
    await asyncio.to_thread(wait_until, lambda: [e for e in world.events(reason="Evicted")
                                                 if e["involvedObject"]["name"] == name],
                            timeout=60, what="the pod evicted")


async def test_a_rebalance_cordon_with_no_interruption_is_released(world):
    node, vm = await aws_node(world, SPOTGUARD_REBALANCE_ACTION="cordon", SPOTGUARD_REBALANCE_RELEASE_SECONDS="8")
    vm.metadata.rebalance()
    await asyncio.to_thread(wait_until, lambda: spotguard_cordoned(world, node, "rebalance-recommendation"),
                            timeout=20, what="cordoned for the rebalance recommendation")
    # Released 8 s after the recommendation's noticeTime (to the second), though EC2 still lists it.
    await asyncio.to_thread(wait_until, lambda: undone(world, node), timeout=30, what="the cordon released")
    assert vm.metadata.state()["values"]["events/recommendations/rebalance"] is not None


async def test_cordon_only_cordons_on_an_interruption_and_evicts_nothing(world):
    node, vm = await aws_node(world, SPOTGUARD_CORDON_ONLY="true")
    world.deploy_vllm(replicas=1)
    name = (await asyncio.to_thread(world.wait_ready_pods, 1))[0]["metadata"]["name"]
    vm.metadata.preempt(seconds=120)
    await asyncio.to_thread(wait_until, lambda: spotguard_cordoned(world, node, "preemption"), timeout=20,
                            what="cordoned")
    await asyncio.sleep(3)
    assert serving(world, name) == "True" and not world.events(reason="Evicted")
    assert world.node(node)["metadata"]["annotations"]["spotguard.io/phase"] == "cordoned"


async def test_an_auto_scaling_termination_drains_the_node(world):
    node, vm = await aws_node(world)
    world.deploy_vllm(replicas=1)
    name = (await asyncio.to_thread(world.wait_ready_pods, 1))[0]["metadata"]["name"]
    vm.metadata.set_lifecycle_state("Terminated")
    await asyncio.to_thread(wait_until, lambda: spotguard_cordoned(world, node, "asg-termination"), timeout=20,
                            what="cordoned for the Auto Scaling termination")
    await asyncio.to_thread(wait_until, lambda: [e for e in world.events(reason="Evicted")
                                                 if e["involvedObject"]["name"] == name],
                            timeout=60, what="the pod evicted")
    assert world.node(node)["metadata"]["annotations"]["spotguard.io/notice-kind"] == "asg-termination"

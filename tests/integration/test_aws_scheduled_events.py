"""EC2 scheduled events, end to end: `spotguard run` processes with the AWS provider against the
EC2 metadata emulator and the real local control plane.

An event far away is only logged; one within --scheduled-event-lead-seconds is a long notice (the
node cordoned and tainted host-maintenance, its deadline the event's NotBefore); a cancelled event
undoes what spotguard did; after a completed reboot the restarted daemon uncordons the node.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import pytest
from spotguard_sim.support import wait_until
from spotguard_sim.world import World

from spotguard.providers.http import parse_rfc3339

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(120)]

LEAD_SECONDS = 600


async def aws_node(world: World):
    world.cloud = "aws"
    world.daemon_env["SPOTGUARD_SCHEDULED_EVENT_LEAD_SECONDS"] = str(LEAD_SECONDS)
    name = f"gpu-{uuid.uuid4().hex[:8]}"
    return name, await world.add_vm(name)


def spotguard_cordoned(world: World, node: str) -> bool:
    held = world.node(node)
    taints = {t["key"]: t.get("value") for t in held["spec"].get("taints") or []}
    return bool(held["spec"].get("unschedulable")) and taints.get("spotguard.io/impending-termination") == \
        "host-maintenance"


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

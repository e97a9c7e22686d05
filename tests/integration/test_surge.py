"""Surge before the drain, on the real control plane: the real scheduler (preemption included), the
real garbage collector, the autoscaler emulator and real `spotguard run` processes.

A pool of GPU nodes (one nvidia.com/gpu each, as `sim.spotguard.io/gpus` makes the simulated kubelet
report), a vLLM Deployment (handed over: spotguard.handover) or StatefulSet (placeholders) of one pod
per node asking for that GPU and annotated spotguard.io/surge, and a GCE host-maintenance notice
whose window starts 90 s later. With --surge-min-notice-seconds 60 and
--surge-drain-reserve-seconds 30, the surge may last until 55 s after the notice.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest
from spotguard_sim.support import wait_until
from spotguard_sim.world import World

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(240)]

GPU_NODE = {"sim.spotguard.io/gpus": "1"}
SURGE_ENV = {"SPOTGUARD_SURGE_MIN_NOTICE_SECONDS": "60", "SPOTGUARD_SURGE_DRAIN_RESERVE_SECONDS": "30"}
WINDOW_S = 90.0
PLACEHOLDER = "spotguard.io/placeholder-node"


async def surge_pool(world: World, *, nodes: int = 2, autoscaler_max: int | None = 3,
                     statefulset: bool = False) -> list[str]:
    """`nodes` GPU nodes with spotguard, a vLLM pod on each (1 GPU, surge; a Deployment's, or a
    StatefulSet's), and (unless `autoscaler_max` is None) the autoscaler, allowed that many nodes."""
    world.daemon_env.update(SURGE_ENV)
    world.ensure_placeholder_priority_class()
    names = [f"gpu-{uuid.uuid4().hex[:8]}" for _ in range(nodes)]
    await asyncio.gather(*(world.add_vm(name, labels=GPU_NODE) for name in names))
    world.deploy_vllm(replicas=nodes, shutdown_timeout=10, drains_on_sigterm=True, surge=True, gpus=1,
                      statefulset=statefulset)
    await asyncio.to_thread(world.wait_ready_pods, nodes)
    if autoscaler_max is not None:
        await world.start_autoscaler(provisioning_delay=3.0, max_nodes=autoscaler_max)
    return names


def placeholders(world: World, node: str) -> list[dict[str, Any]]:
    return world.pods(f"{PLACEHOLDER}={node}")


def victim_on(world: World, node: str) -> dict[str, Any]:
    return next(p for p in world.pods("app=vllm") if p["spec"].get("nodeName") == node)


def serving(pod: dict[str, Any]) -> str | None:
    return next((c["status"] for c in pod.get("status", {}).get("conditions", [])
                 if c["type"] == "spotguard.io/serving"), None)


def replacement(world: World, victim: dict[str, Any]) -> dict[str, Any] | None:
    """A vLLM pod other than `victim` (a StatefulSet's has its name), serving, on a node the
    autoscaler added."""
    found = [p for p in world.pods("app=vllm") if p["metadata"]["uid"] != victim["metadata"]["uid"]
             and p["spec"].get("nodeName") in world.autoscaler.nodes_added and serving(p) == "True"]
    return found[0] if found else None


def current(world: World, pod: dict[str, Any]) -> dict[str, Any] | None:
    return next((p for p in world.pods("app=vllm") if p["metadata"]["uid"] == pod["metadata"]["uid"]), None)


def released_from(pod: dict[str, Any] | None) -> str | None:
    return ((pod or {}).get("metadata", {}).get("annotations") or {}).get("spotguard.io/released-from")


def event_time(world: World, reason: str, name: str) -> float:
    from spotguard.providers.http import parse_rfc3339

    found = [e for e in world.events(reason=reason) if e["involvedObject"]["name"] == name]
    assert found, f"no {reason} Event about {name}"
    return min(parse_rfc3339(e.get("firstTimestamp") or e["eventTime"]) for e in found)


async def test_the_replacement_lands_on_capacity_the_placeholder_brought_while_the_pod_served(world):
    victim_node, _ = await surge_pool(world, statefulset=True)
    victim = victim_on(world, victim_node)
    world.maintenance(victim_node, in_seconds=WINDOW_S)

    # The placeholder: pending for a GPU at a negative priority, owned by the pod it stands for.
    created = await asyncio.to_thread(wait_until, lambda: placeholders(world, victim_node), timeout=30,
                                      what="the placeholder created")
    placeholder = created[0]
    assert placeholder["spec"]["priority"] == -1
    assert placeholder["metadata"]["ownerReferences"][0]["uid"] == victim["metadata"]["uid"]

    # Once it runs on the node the autoscaler added, the pod leaves rotation (and, draining itself,
    # is evicted at once); its replacement preempts the placeholder there. All of that can take
    # well under a second, so the placeholder's Running moment is read from the scheduler's
    # Event, not caught by polling.
    new_node = (await asyncio.to_thread(wait_until, lambda: replacement(world, victim), timeout=90,
                                        what="the replacement serving on the new node"))["spec"]["nodeName"]
    scheduled = [e for e in world.events(reason="Scheduled")
                 if e["involvedObject"]["name"] == placeholder["metadata"]["name"]]
    assert scheduled and new_node in scheduled[0]["message"], scheduled
    assert event_time(world, "SurgeStarted", victim_node) <= event_time(world, "SurgeReady", victim_node) <= \
        event_time(world, "NotServing", victim["metadata"]["name"])
    await asyncio.to_thread(wait_until, lambda: not placeholders(world, victim_node), timeout=30,
                            what="the placeholder gone (preempted)")
    # One node for the surge and no second one for the replacement (it was nominated, not pending).
    assert world.autoscaler.nodes_added == [new_node]
    assert not world.events(reason="SurgeGivenUp")


async def test_a_withdrawn_notice_deletes_the_placeholder_and_the_pods_never_stopped_serving(world):
    # no capacity comes: it stays pending
    victim_node, _ = await surge_pool(world, autoscaler_max=None, statefulset=True)
    vm = world.vms[victim_node]
    world.maintenance(victim_node, in_seconds=WINDOW_S)
    await asyncio.to_thread(wait_until, lambda: placeholders(world, victim_node), timeout=30,
                            what="the placeholder created")
    vm.metadata.set_maintenance("NONE")
    await asyncio.to_thread(wait_until, lambda: not placeholders(world, victim_node), timeout=30,
                            what="the placeholder deleted")
    # The uncordon is a PATCH against the node's resourceVersion: a kubelet heartbeat in between
    # makes it conflict, and the daemon asks again at its next step.
    def undone() -> bool:
        node = world.node(victim_node)
        return not node["spec"].get("unschedulable") and not node["spec"].get("taints")

    await asyncio.to_thread(wait_until, undone, timeout=30, what="the cordon and taint undone")
    assert serving(victim_on(world, victim_node)) == "True"
    assert not world.events(reason="NotServing")


async def test_a_daemon_killed_mid_surge_resumes_it_without_a_second_placeholder(world):
    victim_node, _ = await surge_pool(world, autoscaler_max=None, statefulset=True)
    vm = world.vms[victim_node]
    world.maintenance(victim_node, in_seconds=WINDOW_S)
    await asyncio.to_thread(wait_until, lambda: placeholders(world, victim_node), timeout=30,
                            what="the placeholder created")
    first = placeholders(world, victim_node)[0]["metadata"]["uid"]
    vm.daemon.kill()
    world.start_daemon(vm)
    await asyncio.to_thread(vm.daemon.wait_ready)
    await asyncio.sleep(3)   # a few decision steps of the new daemon
    assert [p["metadata"]["uid"] for p in placeholders(world, victim_node)] == [first]
    assert world.node(victim_node)["metadata"]["annotations"]["spotguard.io/phase"] == "surging"
    assert serving(victim_on(world, victim_node)) == "True"


async def test_a_placeholder_with_no_capacity_in_time_is_given_up_and_the_drain_goes_on(world):
    # The pool may not grow: the placeholder stays Pending until the surge's time is up.
    victim_node, _ = await surge_pool(world, autoscaler_max=2, statefulset=True)
    victim = victim_on(world, victim_node)
    noticed = world.maintenance(victim_node, in_seconds=WINDOW_S)

    def given_up() -> list[dict[str, Any]]:
        return [e for e in world.events(reason="SurgeGivenUp") if e["involvedObject"]["name"] == victim["metadata"]["name"]]

    await asyncio.to_thread(wait_until, given_up, timeout=WINDOW_S, what="the surge given up")
    # 90 s window - 5 s safety margin - 30 s reserve: not before 55 s after the notice.
    assert event_time(world, "SurgeGivenUp", victim["metadata"]["name"]) >= noticed + 54
    await asyncio.to_thread(wait_until, lambda: not placeholders(world, victim_node), timeout=30,
                            what="the pending placeholder deleted")
    await asyncio.to_thread(wait_until, lambda: world.events(reason="Evicted"), timeout=20,
                            what="the pod evicted without the surge")
    assert world.vms[victim_node].daemon.metric("spotguard_surge_given_up_total") == 1


async def test_a_placeholder_refused_by_a_resource_quota_is_given_up_at_once(world):
    victim_node, _ = await surge_pool(world, statefulset=True)
    victim = victim_on(world, victim_node)
    quota = {"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "gpus", "namespace": world.namespace},
             "spec": {"hard": {"requests.nvidia.com/gpu": "2"}}}
    world.api.call("POST", f"/api/v1/namespaces/{world.namespace}/resourcequotas", body=quota)

    def quota_counted() -> bool:
        used = world.api.call("GET", f"/api/v1/namespaces/{world.namespace}/resourcequotas/gpus")
        return used.get("status", {}).get("used", {}).get("requests.nvidia.com/gpu") == "2"

    await asyncio.to_thread(wait_until, quota_counted, timeout=30, what="the quota counting both GPUs")
    noticed = world.maintenance(victim_node, in_seconds=WINDOW_S)
    await asyncio.to_thread(wait_until, lambda: world.events(reason="SurgeGivenUp"), timeout=30,
                            what="the surge given up")
    event = world.events(reason="SurgeGivenUp")[0]
    assert event["involvedObject"]["name"] == victim["metadata"]["name"] and "exceeded quota" in event["message"]
    # Given up at once, not at the end of the surge's time: the pod is out of rotation and evicted.
    await asyncio.to_thread(wait_until, lambda: world.events(reason="Evicted"), timeout=20,
                            what="the pod evicted")
    assert time.time() - noticed < 30 and not placeholders(world, victim_node)


# -- a Deployment's pod, handed over to its replacement ----------------------------------------

async def test_a_deployments_pod_is_handed_over_and_the_pool_never_serves_with_one_fewer(world):
    victim_node, _ = await surge_pool(world)
    victim = victim_on(world, victim_node)
    fewest: list[int] = []
    stop = asyncio.Event()

    async def count_serving() -> None:
        """Ready pods serving (the gate True, not terminating), sampled from the notice on."""
        while not stop.is_set():
            pods = await asyncio.to_thread(world.pods, "app=vllm")
            fewest.append(sum(1 for p in pods if serving(p) == "True" and not p["metadata"].get("deletionTimestamp")
                              and any(c["type"] == "Ready" and c["status"] == "True"
                                      for c in p.get("status", {}).get("conditions", []))))
            await asyncio.sleep(0.1)

    sampler = asyncio.create_task(count_serving())
    try:
        world.maintenance(victim_node, in_seconds=WINDOW_S)
        # Released: the hash label off, the annotation naming its ReplicaSet, let go by it; serving.
        let_go = await asyncio.to_thread(
            wait_until, lambda: (p := current(world, victim)) is not None and released_from(p)
            and not p["metadata"].get("ownerReferences") and p, timeout=30, what="the pod released")
        assert "pod-template-hash" not in let_go["metadata"]["labels"]
        assert released_from(let_go) == (f"{victim['metadata']['ownerReferences'][0]['name']}/"
                                         f"{victim['metadata']['labels']['pod-template-hash']}")
        assert serving(let_go) == "True"
        new_node = (await asyncio.to_thread(wait_until, lambda: replacement(world, victim), timeout=90,
                                            what="the replacement serving on the new node"))["spec"]["nodeName"]
        await asyncio.to_thread(wait_until, lambda: [e for e in world.events(reason="Evicted")
                                                     if e["involvedObject"]["uid"] == victim["metadata"]["uid"]],
                                timeout=60, what="the released pod evicted")
        await asyncio.sleep(1)
    finally:
        stop.set()
        await sampler
    assert fewest and min(fewest) >= 2, f"fewest pods serving: {min(fewest)}"
    assert world.autoscaler.nodes_added == [new_node]
    assert not placeholders(world, victim_node) and not world.events(reason="SurgeGivenUp")
    assert event_time(world, "Released", victim["metadata"]["name"]) <= \
        event_time(world, "SurgeReady", victim_node) <= event_time(world, "NotServing", victim["metadata"]["name"])
    # The ReplicaSet is whole, and nothing replaces the released pod a second time.
    await asyncio.to_thread(wait_until, lambda: len([p for p in world.pods("app=vllm")
                                                     if not p["metadata"].get("deletionTimestamp")]) == 2,
                            timeout=60, what="two pods again")


async def test_a_withdrawn_notice_gives_the_released_pod_back_and_the_replicaset_drops_the_surplus(world):
    victim_node, _ = await surge_pool(world, autoscaler_max=None)   # the replacement stays Pending
    victim = victim_on(world, victim_node)
    world.maintenance(victim_node, in_seconds=WINDOW_S)
    await asyncio.to_thread(wait_until, lambda: released_from(current(world, victim)), timeout=30,
                            what="the pod released")
    await asyncio.to_thread(wait_until, lambda: len(world.pods("app=vllm")) == 3, timeout=30,
                            what="the replacement created (Pending)")
    world.vms[victim_node].metadata.set_maintenance("NONE")

    def given_back() -> bool:
        pod = current(world, victim)
        return (pod is not None and released_from(pod) is None and "pod-template-hash" in pod["metadata"]["labels"]
                and bool(pod["metadata"].get("ownerReferences")))

    await asyncio.to_thread(wait_until, given_back, timeout=30, what="the pod given back to its ReplicaSet")
    await asyncio.to_thread(wait_until, lambda: len([p for p in world.pods("app=vllm")
                                                     if not p["metadata"].get("deletionTimestamp")]) == 2,
                            timeout=30, what="the surplus replica removed by the ReplicaSet")
    assert current(world, victim) is not None and serving(current(world, victim)) == "True"
    assert [e["involvedObject"]["name"] for e in world.events(reason="Readopted")] == [victim["metadata"]["name"]]
    assert not world.events(reason="NotServing") and not world.events(reason="Evicted")


async def test_a_daemon_killed_mid_hand_over_resumes_it_without_a_second_release(world):
    victim_node, _ = await surge_pool(world, autoscaler_max=None)
    vm = world.vms[victim_node]
    victim = victim_on(world, victim_node)
    world.maintenance(victim_node, in_seconds=WINDOW_S)
    await asyncio.to_thread(wait_until, lambda: len(world.pods("app=vllm")) == 3, timeout=30,
                            what="the pod released and its replacement created")
    vm.daemon.kill()
    world.start_daemon(vm)
    await asyncio.to_thread(vm.daemon.wait_ready)
    await asyncio.sleep(3)   # a few decision steps of the new daemon
    assert len(world.pods("app=vllm")) == 3 and len(world.events(reason="Released")) == 1
    assert world.node(victim_node)["metadata"]["annotations"]["spotguard.io/phase"] == "surging"
    assert serving(current(world, victim)) == "True"


# -- an AWS rebalance recommendation with --rebalance-action surge -------------------------------

async def rebalance_surge_pool(world: World, *, release_seconds: int = 1800, autoscaler_max: int | None = 3) -> str:
    world.cloud = "aws"
    world.daemon_env.update({"SPOTGUARD_REBALANCE_ACTION": "surge",
                             "SPOTGUARD_REBALANCE_RELEASE_SECONDS": str(release_seconds)})
    victim_node, _ = await surge_pool(world, autoscaler_max=autoscaler_max)
    return victim_node


def untouched(world: World, node: str) -> bool:
    held = world.node(node)
    return not held["spec"].get("unschedulable") and not held["spec"].get("taints")


async def test_a_rebalance_surge_brings_capacity_first_and_the_interruption_then_lands_on_it(world):
    victim_node = await rebalance_surge_pool(world)
    victim = victim_on(world, victim_node)
    world.vms[victim_node].metadata.rebalance()

    # The placeholder runs on a node the autoscaler added, while the old node is not even cordoned.
    running = await asyncio.to_thread(
        wait_until, lambda: [p for p in placeholders(world, victim_node) if p["status"].get("phase") == "Running"],
        timeout=60, what="the placeholder running on new capacity")
    assert running[0]["spec"]["nodeName"] in world.autoscaler.nodes_added
    assert untouched(world, victim_node) and serving(victim_on(world, victim_node)) == "True"
    assert world.node(victim_node)["metadata"]["annotations"]["spotguard.io/phase"] == "standby"
    daemon = world.vms[victim_node].daemon
    assert daemon.metric("spotguard_phase", phase="standby") == 1
    assert daemon.metric("spotguard_reaction_duration_seconds_count") == 0   # nothing cordoned: no reaction yet
    assert not world.events(reason="NotServing")

    # The two-minute interruption: drained as any notice, onto the node that is already there.
    world.preempt(victim_node, vm_lifetime_seconds=60)

    new_node = (await asyncio.to_thread(wait_until, lambda: replacement(world, victim), timeout=60,
                                        what="the replacement serving on the surged node"))["spec"]["nodeName"]
    assert world.autoscaler.nodes_added == [new_node]   # no second node for the replacement
    assert world.node(victim_node)["spec"].get("unschedulable") is True
    assert daemon.metric("spotguard_reaction_duration_seconds_count") == 1   # the interruption's
    assert event_time(world, "SurgeStarted", victim_node) < event_time(world, "TerminationNotice", victim_node)
    await asyncio.to_thread(wait_until, lambda: not placeholders(world, victim_node), timeout=30,
                            what="the placeholder gone (preempted)")


async def test_a_rebalance_surge_survives_a_restart_and_is_released_when_no_interruption_comes(world):
    victim_node = await rebalance_surge_pool(world, release_seconds=25, autoscaler_max=None)   # stays Pending
    vm = world.vms[victim_node]
    vm.metadata.rebalance()
    created = await asyncio.to_thread(wait_until, lambda: placeholders(world, victim_node), timeout=20,
                                      what="the placeholder created")
    vm.daemon.kill()
    world.start_daemon(vm)
    await asyncio.to_thread(vm.daemon.wait_ready)
    await asyncio.sleep(2)   # a few decision steps of the new daemon
    assert [p["metadata"]["uid"] for p in placeholders(world, victim_node)] == [created[0]["metadata"]["uid"]]

    await asyncio.to_thread(wait_until, lambda: not placeholders(world, victim_node), timeout=40,
                            what="the placeholder released")
    await asyncio.to_thread(wait_until, lambda: "spotguard.io/phase" not in
                            (world.node(victim_node)["metadata"].get("annotations") or {}),
                            timeout=20, what="the stand-by cleared from the node")
    assert untouched(world, victim_node) and serving(victim_on(world, victim_node)) == "True"
    [cancelled] = [e for e in world.events(reason="NoticeCancelled") if e["involvedObject"]["name"] == victim_node]
    assert "released 1 placeholder(s)" in cancelled["message"]
    assert not world.events(reason="NotServing") and not world.events(reason="Evicted")

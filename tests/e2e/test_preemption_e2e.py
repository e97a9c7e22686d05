"""Whole preemptions on the local cluster: spotguard daemons, GKE's graceful node shutdown of the
reclaimed VM, steady load through a Service-following router. Each test asserts what the API
server holds and what the router recorded."""

from __future__ import annotations

import asyncio
import time
import uuid
from types import SimpleNamespace

import pytest
from spotguard_sim.router import EndpointTracker, LoadGenerator, Outcome
from spotguard_sim.support import wait_until
from spotguard_sim.world import World

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
FAR_PAST = SimpleNamespace(at=0.0)


@pytest.fixture
async def tracker(world, api_client):
    endpoints = EndpointTracker(api_client, namespace=world.namespace, service="vllm", port_name="http")
    endpoints.start()
    try:
        yield endpoints
    finally:
        await endpoints.stop()


def names(prefix: str, count: int) -> list[str]:
    suffix = uuid.uuid4().hex[:6]
    return [f"{prefix}-{suffix}-{i}" for i in range(1, count + 1)]


def events_for(world: World, reason: str, name: str) -> list[dict]:
    return [e for e in world.events(reason=reason) if e["involvedObject"]["name"] == name]


async def test_long_notice_preemption_loses_no_request_even_with_vllms_default_sigterm(world, tracker):
    """GCE spot with preemptionNoticeDuration=120 s: GKE's node shutdown starts 30 s before the end,
    so spotguard has time to deregister and drain first. vLLM keeps its default abort-on-SIGTERM:
    any request still running at SIGTERM would be lost, so zero losses means the drain did it."""
    world.daemon_env = {"SPOTGUARD_NOTICE_SECONDS": "120"}
    victim, survivor = names("gpu", 2)
    await world.add_vm(victim)
    await world.add_vm(survivor)
    world.deploy_vllm(replicas=2, pdb_min_available=1, grace_seconds=30)
    await asyncio.to_thread(world.wait_ready_pods, 2)
    await tracker.wait_synced()
    await world.wait_routable(tracker, 2)
    load = LoadGenerator(tracker, rate=2.0, duration=30, seed=11)
    load.start()
    await asyncio.sleep(8)
    victim_pod = next(p["metadata"]["name"] for p in world.pods("app=vllm") if p["spec"]["nodeName"] == victim)
    noticed = world.preempt(victim, vm_lifetime_seconds=120)
    in_flight_on_victim = sum(1 for r in load.records if r.pod == victim_pod and r.start <= noticed
                              and (r.end is None or r.end > noticed))
    await load.wait()

    summary = load.summary()
    assert summary["requests"] >= 55
    assert summary["aborted"] == 0 and summary["refused"] == 0, summary
    assert summary["completed"] == summary["requests"]
    assert in_flight_on_victim >= 1, "the preemption should have caught requests in flight"
    not_ready = tracker.last_change(victim_pod, ready=False)
    assert not_ready is not None and not_ready.at - noticed < 5
    assert not [r for r in load.records if r.pod == victim_pod and r.start > not_ready.at + 0.5], \
        "the router kept sending new work to the deregistered pod"
    assert events_for(world, "Evicted", victim_pod)
    evicted_at = world.node(victim)["metadata"]["annotations"].get("spotguard.io/phase")
    assert evicted_at in ("evicting", "drained")


async def test_pdb_that_never_allows_is_reported_retried_and_never_forced(world):
    """One replica and a PDB that needs it (IfHealthyBudget): spotguard must not force the pod out.
    It names the blocking PDB, keeps retrying, and reports the missed deadline. (No node shutdown
    here, so the pod outlives the deadline; with one, the kubelet stops it and spotguard forgets it.)"""
    world.daemon_env = {"SPOTGUARD_NOTICE_SECONDS": "12", "SPOTGUARD_SAFETY_MARGIN_SECONDS": "3"}
    (victim,) = names("gpu", 1)
    vm = await world.add_vm(victim)
    world.deploy_vllm(replicas=1)
    world.api.call("POST", f"/apis/policy/v1/namespaces/{world.namespace}/poddisruptionbudgets", body={
        "apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": {"name": "only-one"},
        "spec": {"minAvailable": 1, "selector": {"matchLabels": {"app": "vllm"}}}})
    pod = (await asyncio.to_thread(world.wait_ready_pods, 1))[0]
    name = pod["metadata"]["name"]
    world.preempt(victim, vm_lifetime_seconds=None)

    blocked = await asyncio.to_thread(wait_until, lambda: events_for(world, "EvictionBlocked", name), timeout=20,
                                      what="EvictionBlocked")
    assert "only-one" in blocked[0]["message"]
    missed = await asyncio.to_thread(wait_until, lambda: events_for(world, "DeadlineMissed", victim), timeout=30,
                                     what="DeadlineMissed")
    assert name in missed[0]["message"]
    assert vm.daemon.metric("spotguard_drain_missed_deadline_total") == 1
    assert vm.daemon.metric("spotguard_eviction_blocked", namespace=world.namespace, pod=name, pdb="only-one") == 1
    held = world.api.call("GET", f"/api/v1/namespaces/{world.namespace}/pods/{name}")
    assert held["metadata"].get("deletionTimestamp") is None  # never force-deleted
    assert not events_for(world, "Evicted", name)


async def test_withdrawn_maintenance_puts_the_pod_back_into_rotation(world, tracker):
    """GPU host maintenance announced, then withdrawn: the router stops and then resumes sending to
    the pod, nothing is evicted, and every request completes."""
    (node,) = names("gpu", 1)
    vm = await world.add_vm(node)
    world.deploy_vllm(replicas=1)
    pod = (await asyncio.to_thread(world.wait_ready_pods, 1))[0]
    name = pod["metadata"]["name"]
    await tracker.wait_synced()
    await world.wait_routable(tracker, 1)
    # Long requests keep the drain going, so the withdrawal comes before any eviction.
    load = LoadGenerator(tracker, rate=1.0, duration=20, seed=3)
    load.start()
    await asyncio.sleep(4)
    announced = time.time()
    vm.metadata.set_maintenance("TERMINATE_ON_HOST_MAINTENANCE")
    await tracker.wait_for(lambda t: (t.last_change(name, ready=False) or FAR_PAST).at > announced, timeout=15)
    removed = tracker.last_change(name, ready=False)
    await asyncio.sleep(3)
    vm.metadata.set_maintenance("NONE")
    await tracker.wait_for(lambda t: t.last_change(name, ready=True).at > removed.at, timeout=15)
    restored = tracker.last_change(name, ready=True)
    await load.wait()

    summary = load.summary()
    refused = [r for r in load.records if r.outcome is Outcome.REFUSED]
    # While the only replica was out of rotation the router had nowhere to send: those are refused,
    # and nothing else is lost.
    assert all(removed.at <= r.start <= restored.at + 0.5 for r in refused)
    assert summary["aborted"] == 0
    assert [r for r in load.records if r.start > restored.at + 0.5 and r.outcome is Outcome.COMPLETED]
    assert not events_for(world, "Evicted", name)
    held = world.node(node)
    assert not held["spec"].get("unschedulable")
    assert "spotguard.io/phase" not in (held["metadata"].get("annotations") or {})

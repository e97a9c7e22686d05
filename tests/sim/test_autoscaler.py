"""The autoscaler emulator against the real local control plane: the real scheduler marks pods
Unschedulable, the emulator adds Nodes, the simulated kubelet makes them Ready, the scheduler binds.

Each test uses a pool of its own (named after its namespace); the emulator is stopped and every
node of that pool deleted in `finally`, even when the test fails.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any, AsyncIterator

import pytest
from spotguard_sim.autoscaler import (
    POOL_LABEL,
    AutoscalerEmulator,
    AutoscalerEvent,
    PoolTemplate,
)
from spotguard_sim.support import USER_AGENT, eventually

from spotguard.kubeapi import Api, KubeError

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(120)]

GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
SPOT = {"cloud.google.com/gke-spot": "true"}


async def call(kube: Api, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
    return await asyncio.to_thread(kube.call, method, path, **kwargs)


@pytest.fixture
def kube(api_client) -> Api:
    return Api(api_client, user_agent=USER_AGENT)


@pytest.fixture
async def pool(kube: Api, namespace: str) -> AsyncIterator[str]:
    """A pool name of this test's own; its pods, then every node in it, are deleted afterwards."""
    name = f"as{namespace[1:]}"
    try:
        yield name
    finally:
        try:
            await call(kube, "DELETE", f"/api/v1/namespaces/{namespace}/pods", query={"gracePeriodSeconds": "0"})
        except KubeError:
            pass
        nodes = await call(kube, "GET", "/api/v1/nodes", query={"labelSelector": f"{POOL_LABEL}={name}"})
        for node in nodes["items"]:
            try:
                await call(kube, "DELETE", f"/api/v1/nodes/{node['metadata']['name']}")
            except KubeError:
                pass


async def add_cordoned_pool_node(kube: Api, pool: str) -> str:
    """The pool's only node, preempted: cordoned and tainted by spotguard (as after a notice)."""
    name = f"{pool}-1"
    body = {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {POOL_LABEL: pool, **SPOT, "kubernetes.io/hostname": name}},
            "spec": {"unschedulable": True, "taints": [
                GPU_TAINT, {"key": "spotguard.io/impending-termination", "value": "preempted",
                            "effect": "NoSchedule"}]}}
    await call(kube, "POST", "/api/v1/nodes", body=body)

    async def reported() -> bool:
        node = await call(kube, "GET", f"/api/v1/nodes/{name}")
        return bool(node.get("status", {}).get("allocatable"))

    await eventually(reported, timeout=30, what=f"node {name} status from the kubelet")
    return name


async def create_pod(kube: Api, namespace: str, name: str, *, selector: dict[str, str],
                     labels: dict[str, str] | None = None, affinity: dict[str, Any] | None = None) -> None:
    spec: dict[str, Any] = {"nodeSelector": selector, "terminationGracePeriodSeconds": 0,
                            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                            "containers": [{"name": "vllm", "image": "vllm/vllm-openai:v0.11.0",
                                            "resources": {"requests": {"cpu": "2", "memory": "8Gi"}}}]}
    if affinity:
        spec["affinity"] = affinity
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": namespace, "labels": labels or {"app": "vllm"}}, "spec": spec}
    # A new namespace's "default" ServiceAccount comes from a controller, a moment after the namespace.
    for _ in range(100):
        try:
            await call(kube, "POST", f"/api/v1/namespaces/{namespace}/pods", body=pod)
            return
        except KubeError as error:
            if error.status != 403 or "serviceaccount" not in str(error):
                raise
            await asyncio.sleep(0.1)
    raise AssertionError(f"no default ServiceAccount in {namespace}")


async def pods_by_name(kube: Api, namespace: str) -> dict[str, dict[str, Any]]:
    listed = await call(kube, "GET", f"/api/v1/namespaces/{namespace}/pods")
    return {p["metadata"]["name"]: p for p in listed["items"]}


async def pool_nodes(kube: Api, pool: str) -> dict[str, dict[str, Any]]:
    listed = await call(kube, "GET", "/api/v1/nodes", query={"labelSelector": f"{POOL_LABEL}={pool}"})
    return {n["metadata"]["name"]: n for n in listed["items"]}


async def pod_event_reasons(kube: Api, namespace: str) -> dict[str, set[str]]:
    listed = await call(kube, "GET", f"/api/v1/namespaces/{namespace}/events")
    reasons: dict[str, set[str]] = {}
    for event in listed["items"]:
        reasons.setdefault(event["involvedObject"]["name"], set()).add(event["reason"])
    return reasons


def unschedulable(pod: dict[str, Any]) -> bool:
    return any(c["type"] == "PodScheduled" and c["status"] == "False" and c.get("reason") == "Unschedulable"
               for c in pod.get("status", {}).get("conditions", []))


def _created(node: dict[str, Any]) -> float:
    return datetime.fromisoformat(node["metadata"]["creationTimestamp"].replace("Z", "+00:00")).timestamp()


async def test_pending_pods_that_need_the_pool_get_exactly_one_node_after_the_delay(
        api_client, kube, namespace, pool):
    old = await add_cordoned_pool_node(kube, pool)
    seen: list[AutoscalerEvent] = []
    delay = 2.0
    async with AutoscalerEmulator(api_client, provisioning_delay=delay, namespace=namespace,
                                  on_event=seen.append) as autoscaler:
        await autoscaler.wait_synced()
        for index in range(3):
            await create_pod(kube, namespace, f"vllm-{index}", selector={POOL_LABEL: pool})
        await create_pod(kube, namespace, "nowhere", selector={POOL_LABEL: "no-such-pool"})
        new = f"{pool}-2"

        async def all_bound_to_new() -> bool:
            pods = await pods_by_name(kube, namespace)
            return all(pods[f"vllm-{i}"]["spec"].get("nodeName") == new for i in range(3))

        await eventually(all_bound_to_new, timeout=45, what=f"the 3 pods scheduled onto {new}")
        # Longer than another delay + settle: a second scale-up would have shown by now.
        await asyncio.sleep(delay + autoscaler.settle_seconds + 1)

    nodes = await pool_nodes(kube, pool)
    assert sorted(nodes) == [old, new]
    added = nodes[new]
    # The pool's labels (the kubelet adds kubernetes.io/os and /arch, as a real one does).
    assert {POOL_LABEL: pool, **SPOT, "kubernetes.io/hostname": new}.items() <= added["metadata"]["labels"].items()
    assert "unschedulable" not in added["spec"]
    # The pool's taint is kept; the preempted node's own state (spotguard's taint, cordon) is not.
    assert [t["key"] for t in added["spec"]["taints"] if not t["key"].startswith("node.kubernetes.io/")] == \
        ["nvidia.com/gpu"]

    scale_ups = [e for e in seen if e.kind == "scale_up"]
    node_added = [e for e in seen if e.kind == "node_added"]
    assert len(scale_ups) == 1 and scale_ups[0].pool == pool and scale_ups[0].node == new
    assert sorted(scale_ups[0].pods) == [f"{namespace}/vllm-{i}" for i in range(3)]
    assert [e.node for e in node_added] == [new] and autoscaler.nodes_added == [new]
    assert node_added[0].at - scale_ups[0].at >= delay
    assert _created(added) >= int(scale_ups[0].at + delay)  # creationTimestamp has whole seconds
    assert [(e.kind, e.pods) for e in seen if e.kind == "no_pool"] == [("no_pool", (f"{namespace}/nowhere",))]

    pods = await pods_by_name(kube, namespace)
    assert "nodeName" not in pods["nowhere"]["spec"] and unschedulable(pods["nowhere"])
    reasons = await pod_event_reasons(kube, namespace)
    assert all("TriggeredScaleUp" in reasons[f"vllm-{i}"] for i in range(3))
    assert "NotTriggerScaleUp" in reasons["nowhere"] and "TriggeredScaleUp" not in reasons["nowhere"]


async def test_anti_affine_pods_need_a_node_each_and_the_pool_maximum_holds(api_client, kube, namespace, pool):
    await add_cordoned_pool_node(kube, pool)
    labels = {"app": "vllm-aa"}
    one_per_node = {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
        {"labelSelector": {"matchLabels": labels}, "topologyKey": "kubernetes.io/hostname"}]}}
    async with AutoscalerEmulator(api_client, provisioning_delay=0.5, max_nodes_per_pool=2,
                                  namespace=namespace) as autoscaler:
        await autoscaler.wait_synced()
        for name in ("aa-0", "aa-1"):
            await create_pod(kube, namespace, name, selector={POOL_LABEL: pool}, labels=labels,
                             affinity=one_per_node)
        await autoscaler.wait_for(lambda a: any(e.kind == "pool_at_max" for e in a.events), timeout=30)

        async def one_bound() -> bool:
            pods = await pods_by_name(kube, namespace)
            return sum(bool(p["spec"].get("nodeName")) for p in pods.values()) == 1

        await eventually(one_bound, timeout=30, what="one of the two pods scheduled")
        await asyncio.sleep(autoscaler.settle_seconds + 1.5)

    # Max 2 nodes: the cordoned one counts, so exactly one was added; the other pod still waits.
    assert sorted(await pool_nodes(kube, pool)) == [f"{pool}-1", f"{pool}-2"]
    assert autoscaler.nodes_added == [f"{pool}-2"]
    scale_ups = [e for e in autoscaler.events if e.kind == "scale_up"]
    assert len(scale_ups) == 1 and len(scale_ups[0].pods) == 1  # anti-affinity: one pod per node
    pods = await pods_by_name(kube, namespace)
    waiting = [p for p in pods.values() if not p["spec"].get("nodeName")]
    assert len(waiting) == 1 and unschedulable(waiting[0])
    # The scheduler may bind either pod to the new node, so either (or both, one after the other)
    # may have been reported; the one still waiting surely was, and nothing else.
    at_max = [e for e in autoscaler.events if e.kind == "pool_at_max"]
    assert {e.pool for e in at_max} == {pool}
    assert f"{namespace}/{waiting[0]['metadata']['name']}" in {name for e in at_max for name in e.pods}
    assert {name for e in at_max for name in e.pods} <= {f"{namespace}/aa-0", f"{namespace}/aa-1"}


async def test_a_registered_pool_without_nodes_gets_its_first_node_from_the_template(
        api_client, kube, namespace, pool):
    template = PoolTemplate(name=pool, labels={**SPOT, "sim.spotguard.io/gpus": "1"}, taints=(GPU_TAINT,))
    async with AutoscalerEmulator(api_client, provisioning_delay=0.5, namespace=namespace,
                                  pools=[template], learn_pools=False) as autoscaler:
        await autoscaler.wait_synced()
        await create_pod(kube, namespace, "first", selector={POOL_LABEL: pool, "sim.spotguard.io/gpus": "1"})

        async def bound() -> str | None:
            return (await pods_by_name(kube, namespace))["first"]["spec"].get("nodeName")

        node = await eventually(bound, timeout=30, what="pod scheduled onto a new node")
    assert node == f"{pool}-1" and autoscaler.nodes_added == [node]
    created = (await pool_nodes(kube, pool))[node]
    assert created["metadata"]["labels"]["sim.spotguard.io/gpus"] == "1"
    assert created["status"]["allocatable"]["nvidia.com/gpu"] == "1"  # the kubelet read the template's label

"""The real daemon (`spotguard run` processes) against the real local control plane.

Each test builds a small GPU spot pool (nodes kept alive by the simulated kubelet, one emulated GCE
metadata server and one spotguard per node), triggers a notice, and asserts what the API server
then holds. VMs are not reclaimed here (`vm_lifetime_seconds=None`): these tests watch spotguard
alone; tests/e2e runs the whole preemption with GKE's node shutdown.
"""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request
import time
import uuid

import aiohttp
import pytest
from spotguard_sim.support import metric_value as metric
from spotguard_sim.support import wait_until
from spotguard_sim.router import _StreamEnd
from spotguard_sim.world import World

from spotguard.kube import EXCLUDE_LB_LABEL
from spotguard.providers.http import parse_rfc3339

pytestmark = pytest.mark.cluster


def node_name() -> str:
    return f"gpu-{uuid.uuid4().hex[:8]}"


def condition(pod, kind):
    return next((c["status"] for c in pod.get("status", {}).get("conditions", []) if c["type"] == kind), None)


def endpoint_ready(world: World, pod_uid: str) -> bool | None:
    slices = world.api.call("GET", f"/apis/discovery.k8s.io/v1/namespaces/{world.namespace}/endpointslices")
    for endpoint_slice in slices["items"]:
        for endpoint in endpoint_slice.get("endpoints") or []:
            if (endpoint.get("targetRef") or {}).get("uid") == pod_uid:
                return endpoint.get("conditions", {}).get("ready") is not False
    return None


async def stream_completion(ip: str, *, tokens: int, interval: float) -> bool:
    """Stream one completion from a pod's fake vLLM; True when the answer came whole (a normal
    finish_reason, then [DONE])."""
    end = _StreamEnd()
    async with aiohttp.ClientSession() as session:
        async with session.post(f"http://{ip}:8000/v1/completions",
                                json={"prompt": "hi", "max_tokens": tokens, "stream": True,
                                      "sim_token_interval": interval}) as response:
            async for chunk in response.content.iter_any():
                end.feed(chunk)
    return end.done and end.finish_reason == "length" and end.error is None


async def test_new_serving_pods_are_set_serving_and_become_ready(world):
    node = node_name()
    await world.add_vm(node)
    world.deploy_vllm(replicas=1)
    pod = (await asyncio.to_thread(world.wait_ready_pods, 1, timeout=60))[0]
    assert condition(pod, "spotguard.io/serving") == "True"
    assert pod["spec"]["nodeName"] == node


@pytest.mark.parametrize("cloud", ["gce", "aws", "azure"])
async def test_notice_cordons_taints_deregisters_and_records_progress(world, cloud):
    world.cloud = cloud
    node = node_name()
    vm = await world.add_vm(node)
    world.deploy_vllm(replicas=1)
    pod = (await asyncio.to_thread(world.wait_ready_pods, 1))[0]
    uid = pod["metadata"]["uid"]
    await asyncio.to_thread(wait_until, lambda: endpoint_ready(world, uid), timeout=30, what="endpoint ready")

    world.preempt(node, vm_lifetime_seconds=None)

    def deregistered():
        current = world.api.call("GET", f"/api/v1/namespaces/{world.namespace}/pods/{pod['metadata']['name']}")
        return condition(current, "spotguard.io/serving") == "False" and condition(current, "Ready") == "False" \
            and endpoint_ready(world, uid) is False

    await asyncio.to_thread(wait_until, deregistered, timeout=15, what="pod deregistered")
    held = world.node(node)
    assert held["spec"]["unschedulable"] is True
    assert {"key": "spotguard.io/impending-termination", "value": "preemption", "effect": "NoSchedule"} in \
        [{k: t.get(k) for k in ("key", "value", "effect")} for t in held["spec"]["taints"]]
    annotations = held["metadata"]["annotations"]
    assert annotations["spotguard.io/cordoned-by-spotguard"] == "true"
    assert annotations["spotguard.io/notice-kind"] == "preemption"
    notices = [e for e in world.events(reason="TerminationNotice") if e["involvedObject"]["name"] == node]
    assert len(notices) == 1 and notices[0]["type"] == "Warning"
    text = await asyncio.to_thread(vm.daemon.metrics)
    assert metric(text, "spotguard_notices_total", kind="preemption", provider=cloud) == 1
    assert metric(text, "spotguard_reaction_duration_seconds_count") == 1
    # The deadline each cloud gives: GCE 30 s counted from the notice; EC2 (120 s) and Azure
    # (Preempt: 30 s) the time they announce.
    left = parse_rfc3339(annotations["spotguard.io/deadline"]) - time.time()
    assert 100 < left <= 120 if cloud == "aws" else 0 < left <= 30, left


async def test_drain_waits_for_in_flight_requests_then_evicts(world):
    node = node_name()
    vm = await world.add_vm(node)
    world.deploy_vllm(replicas=1)
    pod = (await asyncio.to_thread(world.wait_ready_pods, 1))[0]
    name, ip = pod["metadata"]["name"], pod["status"]["podIP"]
    request = asyncio.create_task(stream_completion(ip, tokens=40, interval=0.1))  # ~4 s
    await asyncio.sleep(0.5)
    world.preempt(node, vm_lifetime_seconds=None)
    await asyncio.sleep(2)
    current = world.api.call("GET", f"/api/v1/namespaces/{world.namespace}/pods/{name}")
    assert current["metadata"].get("deletionTimestamp") is None, "evicted while a request was in flight"
    assert await request is True

    def evicted():
        return any(e["involvedObject"]["name"] == name for e in world.events(reason="Evicted"))

    await asyncio.to_thread(wait_until, evicted, timeout=15, what="eviction after the drain")
    text = await asyncio.to_thread(vm.daemon.metrics)
    assert metric(text, "spotguard_evictions_total", result="evicted") == 1
    assert metric(text, "spotguard_drain_duration_seconds_count") == 1
    await asyncio.to_thread(wait_until, lambda: [e for e in world.events(reason="Drained")
                                                 if e["involvedObject"]["name"] == node],
                            timeout=10, what="Drained event")


async def test_a_pod_that_drains_itself_is_evicted_at_the_notice_and_finishes_its_request(world):
    node = node_name()
    await world.add_vm(node)
    world.deploy_vllm(replicas=1, shutdown_timeout=15, drains_on_sigterm=True)
    pod = (await asyncio.to_thread(world.wait_ready_pods, 1))[0]
    name, ip = pod["metadata"]["name"], pod["status"]["podIP"]
    request = asyncio.create_task(stream_completion(ip, tokens=50, interval=0.1))  # ~5 s
    await asyncio.sleep(0.5)
    noticed = world.preempt(node, vm_lifetime_seconds=None)

    def evicted():
        current = world.api.call("GET", f"/api/v1/namespaces/{world.namespace}/pods/{name}")
        return current["metadata"].get("deletionTimestamp") is not None

    await asyncio.to_thread(wait_until, evicted, timeout=10, what="the pod evicted at the notice")
    assert time.time() - noticed < 4.0 and not request.done(), "evicted while its request still ran"
    # The replacement is created now, not after the drain.
    def replacement():
        return [p for p in world.pods("app=vllm") if p["metadata"]["name"] != name]

    await asyncio.to_thread(wait_until, replacement, timeout=10, what="the replacement pod")
    assert await request is True, "vLLM's own drain finished the request"
    event = [e for e in world.events(reason="Evicted") if e["involvedObject"]["name"] == name][0]
    assert "drains its own in-flight requests" in event["message"]


async def test_stale_gauges_do_not_hold_the_drain(world):
    # vLLM #22545: after every request was aborted by its client, the gauges keep counting them.
    node = node_name()
    vm = await world.add_vm(node)
    world.deploy_vllm(replicas=1, fake_args="--stale-gauges-after-abort")
    pod = (await asyncio.to_thread(world.wait_ready_pods, 1))[0]
    ip = pod["metadata"]["name"], pod["status"]["podIP"]
    async with aiohttp.ClientSession() as session:
        async with session.post(f"http://{ip[1]}:8000/v1/completions",
                                json={"prompt": "hi", "max_tokens": 100, "stream": True}) as response:
            await response.content.readline()   # then the client goes away
    await asyncio.sleep(1.0)
    world.preempt(node, vm_lifetime_seconds=None)
    noticed = time.time()

    def drained():
        return [e for e in world.events(reason="Drained") if e["involvedObject"]["name"] == node]

    await asyncio.to_thread(wait_until, drained, timeout=15, what="Drained (not the budget)")
    assert time.time() - noticed < 6.0
    assert not [e for e in world.events(reason="DrainBudgetSpent") if e["involvedObject"]["name"] == node]
    assert "vllm gauges stale" in vm.daemon.log_path.read_text()


async def test_pdb_block_is_reported_with_pod_and_pdb_and_retried_until_capacity_returns(world):
    first = node_name()
    vm = await world.add_vm(first)
    # IfHealthyBudget (the default) with one replica: the only pod, once not-ready, may not be evicted.
    world.deploy_vllm(replicas=1, pdb_min_available=None)
    world.api.call("POST", f"/apis/policy/v1/namespaces/{world.namespace}/poddisruptionbudgets", body={
        "apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": {"name": "vllm-pdb"},
        "spec": {"minAvailable": 1, "selector": {"matchLabels": {"app": "vllm"}}}})
    pod = (await asyncio.to_thread(world.wait_ready_pods, 1))[0]
    name = pod["metadata"]["name"]
    world.preempt(first, vm_lifetime_seconds=None)

    def blocked():
        return [e for e in world.events(reason="EvictionBlocked") if e["involvedObject"]["name"] == name]

    events = await asyncio.to_thread(wait_until, blocked, timeout=20, what="EvictionBlocked event")
    assert "vllm-pdb" in events[0]["message"]
    text = await asyncio.to_thread(vm.daemon.metrics)
    assert metric(text, "spotguard_eviction_blocked", pod=name, pdb="vllm-pdb") == 1
    assert metric(text, "spotguard_evictions_total", result="blocked_by_pdb") >= 1
    held = world.api.call("GET", f"/api/v1/namespaces/{world.namespace}/pods/{name}")
    assert held["metadata"].get("deletionTimestamp") is None

    # Replacement capacity: a second node and a second replica there; the budget then allows it.
    await world.add_vm(node_name())
    world.api.call("PATCH", f"/apis/apps/v1/namespaces/{world.namespace}/deployments/vllm/scale",
                   body={"spec": {"replicas": 2}}, content_type="application/merge-patch+json")

    def evicted():
        return any(e["involvedObject"]["name"] == name for e in world.events(reason="Evicted"))

    await asyncio.to_thread(wait_until, evicted, timeout=40, what="eviction once the budget allows")
    text = await asyncio.to_thread(vm.daemon.metrics)
    assert metric(text, "spotguard_eviction_blocked", pod=name) == 0


async def test_daemon_killed_mid_drain_resumes_without_repeating_anything(world):
    node = node_name()
    vm = await world.add_vm(node)
    world.deploy_vllm(replicas=1)
    pod = (await asyncio.to_thread(world.wait_ready_pods, 1))[0]
    name, ip = pod["metadata"]["name"], pod["status"]["podIP"]
    request = asyncio.create_task(stream_completion(ip, tokens=60, interval=0.1))  # ~6 s
    await asyncio.sleep(0.3)
    world.preempt(node, vm_lifetime_seconds=None)
    await asyncio.to_thread(wait_until, lambda: world.node(node)["metadata"].get("annotations", {}).get(
        "spotguard.io/phase") == "draining", timeout=15, what="draining")
    vm.daemon.kill()
    world.start_daemon(vm)
    await asyncio.to_thread(vm.daemon.wait_ready)
    assert await request is True

    def evicted():
        return any(e["involvedObject"]["name"] == name for e in world.events(reason="Evicted"))

    await asyncio.to_thread(wait_until, evicted, timeout=20, what="eviction by the restarted daemon")
    text = await asyncio.to_thread(vm.daemon.metrics)
    assert metric(text, "spotguard_actions_total", action="cordon") == 0
    assert metric(text, "spotguard_actions_total", action="set_not_serving") == 0
    assert len([e for e in world.events(reason="TerminationNotice") if e["involvedObject"]["name"] == node]) == 1
    assert len([e for e in world.events(reason="Evicted") if e["involvedObject"]["name"] == name]) == 1
    assert world.node(node)["spec"]["unschedulable"] is True


@pytest.mark.parametrize("cordoned_before", [False, True])
async def test_cancelled_maintenance_undoes_only_what_spotguard_did(world, cordoned_before):
    node = node_name()
    world.daemon_env = {"SPOTGUARD_EXCLUDE_FROM_LOAD_BALANCERS": "true"}
    vm = await world.add_vm(node)
    world.deploy_vllm(replicas=1)
    pod = (await asyncio.to_thread(world.wait_ready_pods, 1))[0]
    name = pod["metadata"]["name"]
    # A long request keeps the drain going, so the cancellation arrives before any eviction.
    request = asyncio.create_task(stream_completion(pod["status"]["podIP"], tokens=100, interval=0.1))
    if cordoned_before:   # an admin's cordon, and an admin's load-balancer exclusion
        world.api.call("PATCH", f"/api/v1/nodes/{node}", body={"spec": {"unschedulable": True}, "metadata": {
            "labels": {EXCLUDE_LB_LABEL: "true"}}}, content_type="application/merge-patch+json")
    vm.metadata.set_maintenance("TERMINATE_ON_HOST_MAINTENANCE")

    def pod_serving(value: str):
        current = world.api.call("GET", f"/api/v1/namespaces/{world.namespace}/pods/{name}")
        return condition(current, "spotguard.io/serving") == value

    await asyncio.to_thread(wait_until, lambda: pod_serving("False"), timeout=15, what="not serving")
    assert world.node(node)["spec"].get("taints")
    assert world.node(node)["metadata"]["labels"].get(EXCLUDE_LB_LABEL) == "true"
    vm.metadata.set_maintenance("NONE")
    await asyncio.to_thread(wait_until, lambda: pod_serving("True"), timeout=15, what="serving again")

    def undone():
        held = world.node(node)
        annotations = held["metadata"].get("annotations") or {}
        taints = [t["key"] for t in held["spec"].get("taints") or []]
        return "spotguard.io/impending-termination" not in taints and "spotguard.io/phase" not in annotations

    await asyncio.to_thread(wait_until, undone, timeout=15, what="spotguard's changes undone")
    assert bool(world.node(node)["spec"].get("unschedulable")) is cordoned_before
    assert (EXCLUDE_LB_LABEL in world.node(node)["metadata"]["labels"]) is cordoned_before
    await asyncio.to_thread(world.wait_ready_pods, 1)
    await asyncio.to_thread(wait_until, lambda: [e for e in world.events(reason="NoticeCancelled")
                                                 if e["involvedObject"]["name"] == node],
                            timeout=10, what="NoticeCancelled event")
    assert not [e for e in world.events(reason="Evicted") if e["involvedObject"]["name"] == name]
    assert await request is True


async def test_opted_out_and_daemonset_pods_are_not_evicted_and_a_node_without_serving_pods_drains(world):
    node = node_name()
    vm = await world.add_vm(node)
    ns = world.namespace
    plain = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "batch"},
             "spec": {"nodeName": node, "containers": [{"name": "c", "image": "busybox"}]}}
    kept = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "kept", "annotations": {"spotguard.io/evict": "false"}},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "busybox"}]}}
    daemonset = {"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "agent"},
                 "spec": {"selector": {"matchLabels": {"app": "agent"}},
                          "template": {"metadata": {"labels": {"app": "agent"}},
                                       "spec": {"nodeSelector": {"kubernetes.io/hostname": node},
                                                "tolerations": [{"operator": "Exists"}],
                                                "containers": [{"name": "c", "image": "busybox"}]}}}}
    world.api.call("POST", f"/api/v1/namespaces/{ns}/pods", body=plain)
    world.api.call("POST", f"/api/v1/namespaces/{ns}/pods", body=kept)
    world.api.call("POST", f"/apis/apps/v1/namespaces/{ns}/daemonsets", body=daemonset)
    await asyncio.to_thread(wait_until, lambda: len([p for p in world.pods() if p["status"].get("phase") == "Running"]) == 3,
                            timeout=30, what="3 running pods")
    world.preempt(node, vm_lifetime_seconds=None)

    def drained():
        return world.node(node)["metadata"].get("annotations", {}).get("spotguard.io/phase") == "drained"

    await asyncio.to_thread(wait_until, drained, timeout=20, what="node drained")
    remaining = {p["metadata"]["name"].split("-")[0]: p for p in world.pods()}
    assert remaining["kept"]["metadata"].get("deletionTimestamp") is None
    assert remaining["agent"]["metadata"].get("deletionTimestamp") is None
    assert "batch" not in remaining or remaining["batch"]["metadata"].get("deletionTimestamp")
    text = await asyncio.to_thread(vm.daemon.metrics)
    assert metric(text, "spotguard_evictions_total", result="evicted") == 1


async def test_dry_run_asks_the_api_server_and_changes_nothing(world):
    world.daemon_env = {"SPOTGUARD_DRY_RUN": "true"}
    node = node_name()
    vm = await world.add_vm(node)
    world.deploy_vllm(replicas=1)
    # serving=True is still written: without it a gated pod could never become Ready.
    pod = (await asyncio.to_thread(world.wait_ready_pods, 1))[0]
    name = pod["metadata"]["name"]
    world.preempt(node, vm_lifetime_seconds=None)
    # Every write went to the API server with dryRun=All; the eviction was answered for real.
    await asyncio.to_thread(wait_until, lambda: vm.daemon.metric("spotguard_evictions_total", result="evicted") == 1,
                            timeout=20, what="dry-run eviction answered")
    text = vm.daemon.metrics()
    assert metric(text, "spotguard_actions_total", action="cordon", result="dry_run") == 1
    assert metric(text, "spotguard_actions_total", action="set_not_serving", result="dry_run") == 1
    assert metric(text, "spotguard_actions_total", action="evict", result="dry_run") == 1
    assert metric(text, "spotguard_actions_total", result="ok") == \
        metric(text, "spotguard_actions_total", action="set_serving", result="ok") == 1
    held = world.node(node)
    assert not held["spec"].get("unschedulable")
    assert not [t for t in held["spec"].get("taints") or [] if t["key"].startswith("spotguard.io/")]
    assert not [k for k in (held["metadata"].get("annotations") or {}) if k.startswith("spotguard.io/")]
    current = world.api.call("GET", f"/api/v1/namespaces/{world.namespace}/pods/{name}")
    assert current["metadata"].get("deletionTimestamp") is None
    assert condition(current, "spotguard.io/serving") == "True"
    assert not [e for e in world.events(reason="TerminationNotice") if e["involvedObject"]["name"] == node]


async def test_auto_provider_waits_for_a_metadata_server_that_starts_late(world):
    """`--provider auto` with no metadata server yet: the daemon stays up (alive, not ready,
    spotguard_metadata_up 0) instead of exiting into CrashLoopBackOff, then finds the server when
    it comes and handles a preemption."""
    world.daemon_env = {"SPOTGUARD_PROVIDER": "auto"}
    node = node_name()
    vm = await world.add_vm(node, spotguard=False)
    await vm.metadata.stop()
    daemon = world.start_daemon(vm)

    async def get(path: str) -> tuple[int, str]:
        async with aiohttp.ClientSession() as session:
            async with session.get(daemon.url + path) as response:
                return response.status, await response.text()

    async def listening() -> bool:
        try:
            await get("/healthz")
            return True
        except aiohttp.ClientError:
            return False

    for _ in range(150):
        if await listening():
            break
        await asyncio.sleep(0.1)
    text = await asyncio.to_thread(wait_until, lambda: (
        (t := daemon.metrics()) and metric(t, "spotguard_metadata_errors_total", provider="auto") >= 2 and t),
        timeout=20, what="failed probes counted")
    assert daemon.process is not None and daemon.process.poll() is None, "the daemon exited"
    assert (await get("/healthz"))[0] == 200
    # Its watches' first lists may still be under way (then it names those); it must come to this:
    for _ in range(100):
        status, body = await get("/readyz")
        if "metadata" in body:
            break
        await asyncio.sleep(0.1)
    assert status == 503 and "metadata server not reachable" in body
    assert metric(text, "spotguard_metadata_up") == 0
    assert metric(text, "spotguard_build_info", provider="auto") == 1

    await vm.metadata.start()          # same port: the metadata server comes up
    await asyncio.to_thread(daemon.wait_ready)
    text = await asyncio.to_thread(daemon.metrics)
    assert metric(text, "spotguard_build_info", provider="gce") == 1
    assert metric(text, "spotguard_build_info", provider="auto") == 0   # the series is gone
    assert metric(text, "spotguard_metadata_up") == 1

    world.preempt(node, vm_lifetime_seconds=None)
    await asyncio.to_thread(wait_until, lambda: world.node(node)["spec"].get("unschedulable"), timeout=15,
                            what="node cordoned")
    text = await asyncio.to_thread(daemon.metrics)
    assert metric(text, "spotguard_notices_total", provider="gce", kind="preemption") == 1


async def test_a_node_that_does_not_exist_is_said_so_not_blamed_on_the_api(world, tmp_path):
    from spotguard_sim.gce_metadata import GceMetadataEmulator
    from spotguard_sim.world import DaemonProcess

    metadata = GceMetadataEmulator(instance_name="ghost")
    await metadata.start()
    daemon = DaemonProcess(node="no-such-node-here", kubeconfig=world.kubeconfig, metadata_url=metadata.url,
                           log_path=tmp_path / "ghost.log")
    daemon.start()
    try:
        answers: list[str] = []  # every 503 body, in order: none may blame the API

        def readyz() -> str | None:
            try:
                with urllib.request.urlopen(f"{daemon.url}/readyz", timeout=1):
                    answers.append("200")
                    return None
            except urllib.error.HTTPError as error:
                answers.append(error.read().decode().strip())
                return answers[-1] if "not found" in answers[-1] else None
            except OSError:
                return None

        said = await asyncio.to_thread(wait_until, readyz, timeout=30, what="/readyz naming the missing node")
        assert said == "node no-such-node-here not found (NODE_NAME)"
        # Before the first read answers it says so; never "API not reachable", never ready.
        assert set(answers) <= {"reading node no-such-node-here", said}, answers
        assert metric(await asyncio.to_thread(daemon.metrics), "spotguard_node_found") == 0
        assert '"event": "node not found"' in daemon.log_path.read_text()
    finally:
        await asyncio.to_thread(daemon.stop)
        await metadata.stop()

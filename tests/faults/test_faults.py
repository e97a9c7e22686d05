"""Fault injection: break what spotguard depends on, on purpose, and check that it survives and still
does its job. The real daemon (`spotguard run` processes) runs against the real local control plane;
each test asserts what the API server holds afterwards and, where users' traffic is involved, what
the router recorded for every request.

Timings are kept short (a 1 minute metadata outage, a 10 s API server outage, drain budgets of a
few seconds) so the module runs in a few minutes; the outage lengths are the issue's.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
from faultlib import (
    BadMetricsServer,
    HealthProbe,
    Traffic,
    annotations,
    apiserver_metric,
    condition,
    deregistered,
    events,
    get_pod,
    in_thread,
    logged,
    metric,
    node_name,
    phase,
    serving_pod,
    spotguard_taints,
    wait_for,
)
from spotguard_sim import controlplane
from spotguard_sim.router import Outcome
from spotguard_sim.world import World

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

MERGE_PATCH = "application/merge-patch+json"


@pytest.fixture
def apiserver_guard(cluster):
    """Whatever happens in the test, every control-plane component runs again afterwards (the API
    server first; a controller that gave up while it was away too): every later test of the session
    needs them. Request this fixture after `world`, so it is torn down first."""
    yield
    directory = Path(cluster.dir)
    controlplane.start_component(directory, "kube-apiserver", say=lambda _: None)
    for record in controlplane.read_info(directory).processes:
        controlplane.start_component(directory, record.name, say=lambda _: None)


def control_plane_alive(cluster) -> dict[str, bool]:
    info = controlplane.read_info(Path(cluster.dir))
    return {record.name: controlplane._alive(record) for record in info.processes}


async def _one_vllm(world: World, node: str) -> dict:
    world.deploy_vllm(replicas=1)
    pods = await in_thread(world.wait_ready_pods, 1)
    assert pods[0]["spec"]["nodeName"] == node
    return pods[0]


# ---------------------------------------------------------------------------------------------
# 1. The metadata server misbehaves for a minute, then sends a real notice.

OUTAGE_SECONDS = 60.0
METADATA_FAULTS = ("refuse", "http_500", "http_503", "http_429", "hang", "garbage", "no_flavor")
# What each fault is counted as in spotguard_metadata_errors_total{reason}.
METADATA_REASONS = {"refuse": "connection", "http_500": "http_5xx", "http_503": "http_5xx", "http_429": "http_429",
                    "hang": "timeout", "garbage": "bad_body", "no_flavor": "bad_flavor"}


async def test_metadata_server_misbehaving_for_a_minute_then_a_real_notice(world):
    node = node_name()
    vm = await world.add_vm(node)
    pod = await _one_vllm(world, node)
    name = pod["metadata"]["name"]
    daemon = vm.daemon
    pid = daemon.process.pid

    with HealthProbe(daemon) as probe:
        began = time.monotonic()
        for fault in METADATA_FAULTS:
            vm.metadata.set_fault(fault)
            await asyncio.sleep(OUTAGE_SECONDS / len(METADATA_FAULTS))
        vm.metadata.set_fault("none")
        ended = time.monotonic()
        # Readiness follows the metadata server back on its own, before any notice.
        await wait_for(lambda: any(s.readyz == 200 for s in probe.between(ended, time.monotonic())),
                       timeout=10, what="/readyz 200 once the metadata server answers again")
        recovered = time.monotonic()
        held = await in_thread(world.node, node)
        assert not held["spec"].get("unschedulable") and not spotguard_taints(held), "acted without a notice"

        vm.metadata.preempt()
        await wait_for(lambda: deregistered(world, node, name), timeout=10, what="cordoned and pod not-ready")
        await asyncio.sleep(1)

    # Alive the whole time: /healthz 200 at every probe, the same process throughout.
    assert len(probe.samples) > OUTAGE_SECONDS / probe.interval / 2
    assert [s for s in probe.samples if s.healthz != 200 or not s.running] == []
    assert daemon.process.poll() is None and daemon.process.pid == pid
    # Not ready while the metadata server was unusable (after the first failed request), ready after.
    during = probe.between(began + 2, ended)
    assert during and all(s.readyz == 503 for s in during), sorted({s.readyz for s in during}, key=str)
    assert probe.samples[-1].readyz == 200

    text = await in_thread(daemon.metrics)
    counted = {reason: metric(text, "spotguard_metadata_errors_total", reason=reason)
               for reason in sorted(set(METADATA_REASONS.values()))}
    print(f"metadata errors counted: {counted}; reaction "
          f"{metric(text, 'spotguard_reaction_duration_seconds_sum') * 1000:.1f} ms; "
          f"{len(probe.samples)} probes, /readyz 200 again {recovered - ended:.2f} s after the outage")
    assert all(counted[reason] >= 1 for reason in METADATA_REASONS.values()), counted
    assert metric(text, "spotguard_metadata_up") == 1
    logged_reasons = {line["reason"] for line in logged(daemon, "metadata_error")}
    assert set(METADATA_REASONS.values()) <= logged_reasons
    assert logged(daemon, "metadata_recovered")

    # Then the notice is handled as usual: once, and at the daemon's usual speed.
    assert metric(text, "spotguard_notices_total", kind="preemption") == 1
    assert metric(text, "spotguard_reaction_duration_seconds_count") == 1
    assert metric(text, "spotguard_reaction_duration_seconds_sum") < 1.0
    assert len(events(world, "TerminationNotice", node)) == 1
    assert not logged(daemon, "decision step failed")


# ---------------------------------------------------------------------------------------------
# 2. The API server stops in the middle of a drain and comes back 10 s later.

API_OUTAGE_SECONDS = 10.0


async def test_api_server_stopped_mid_drain_and_started_again(world, apiserver_guard, cluster):
    # A long notice, so the outage (and the API server's start-up) cannot eat the deadline.
    world.daemon_env = {"SPOTGUARD_NOTICE_SECONDS": "120"}
    node = node_name()
    vm = await world.add_vm(node)
    pod = await _one_vllm(world, node)
    name = pod["metadata"]["name"]
    directory = Path(cluster.dir)

    async with Traffic(world) as traffic:
        await traffic.wait_ready(1)
        # Keeps the pod draining across the whole outage.
        long_request = asyncio.ensure_future(traffic.generator.request(15.0))
        await asyncio.sleep(0.5)
        world.preempt(node, vm_lifetime_seconds=None)
        await wait_for(lambda: phase(world, node) == "draining", timeout=15, what="draining")
        with HealthProbe(vm.daemon) as probe:
            try:
                # It stops listening at SIGTERM, but serves the connections it has (the watches)
                # until it exits, which may take its whole 10 s grace: the outage counts from then.
                await in_thread(controlplane.stop_component, directory, "kube-apiserver")
                down_at, down_wall = time.monotonic(), time.time()
                await asyncio.sleep(API_OUTAGE_SECONDS)
            finally:
                await in_thread(controlplane.start_component, directory, "kube-apiserver", say=lambda _: None)
            up_at, up_wall = time.monotonic(), time.time()
            record = await long_request
            await wait_for(lambda: phase(world, node) == "drained", timeout=30, what="drain completed")
            # Ready again once its watches reconnect (their backoff reaches 5 s during an outage).
            await wait_for(lambda: any(s.readyz == 200 for s in probe.between(up_at, time.monotonic())),
                           timeout=15, what="/readyz 200 once the API server is back")
            # Time for a duplicate eviction to show up, if one were coming.
            await asyncio.sleep(2)

    print(f"API server fully down {up_at - down_at:.1f} s (start-up included); request ended "
          f"{record.end - down_wall:+.1f} s after it went down; router: {traffic.outcomes()}")
    assert record.outcome is Outcome.COMPLETED, record
    assert traffic.outcomes() == {"completed": 1}
    assert all(control_plane_alive(cluster).values()), control_plane_alive(cluster)
    # The API server holds: drained, still cordoned and tainted by spotguard, the pod evicted once.
    held = await in_thread(world.node, node)
    assert held["spec"].get("unschedulable") is True
    assert len(spotguard_taints(held)) == 1
    assert annotations(held)["spotguard.io/cordoned-by-spotguard"] == "true"
    assert await in_thread(lambda: len(events(world, "Evicted", name))) == 1
    assert await in_thread(lambda: pod_evictions(world)) == 1
    text = await in_thread(vm.daemon.metrics)
    assert metric(text, "spotguard_evictions_total", result="evicted") == 1
    assert metric(text, "spotguard_actions_total", action="uncordon") == 0
    assert metric(text, "spotguard_kube_api_errors_total") >= 1
    if down_wall < record.end < up_wall - 1:
        # The drain ended while the API server was away: the eviction was asked for, failed, and
        # was asked for again once it was back - and still happened once.
        assert metric(text, "spotguard_actions_total", action="evict", result="error") >= 1
    # The daemon lived through it: alive, not ready while it could not reach the API server.
    assert [s for s in probe.samples if s.healthz != 200 or not s.running] == []
    assert any(s.readyz == 503 for s in probe.between(down_at, up_at))
    assert logged(vm.daemon, "watch failed")
    assert not logged(vm.daemon, "decision step failed")


def pod_evictions(world: World) -> float:
    """Eviction requests the (restarted) API server accepted, by its own count."""
    accepted = 0.0
    for code in ("200", "201"):
        accepted += apiserver_metric(world, "apiserver_request_total", resource="pods", subresource="eviction",
                                     code=code)
    return accepted


# ---------------------------------------------------------------------------------------------
# 3. kill -9 of the daemon mid-drain: the restarted daemon resumes and no request is lost.

NOTICE_BUDGET_SECONDS = 25.0  # 30 s spot notice minus the 5 s safety margin


async def test_daemon_killed_mid_drain_resumes_and_users_lose_nothing(world):
    doomed_node, other_node = node_name(), node_name()
    vm = await world.add_vm(doomed_node)
    await world.add_vm(other_node)
    world.deploy_vllm(replicas=2)
    pods = await in_thread(world.wait_ready_pods, 2)
    doomed = next(p for p in pods if p["spec"]["nodeName"] == doomed_node)
    name = doomed["metadata"]["name"]

    async with Traffic(world, rate=2.0, duration=12.0) as traffic:
        await traffic.wait_ready(2)
        traffic.generator.start()
        await asyncio.sleep(1.0)
        # A request held on the doomed pod, in flight across the kill and the restart.
        held = asyncio.ensure_future(traffic.pinned(doomed).request(8.0))
        await asyncio.sleep(0.5)
        noticed = world.preempt(doomed_node, vm_lifetime_seconds=None)
        await wait_for(lambda: phase(world, doomed_node) == "draining", timeout=15, what="draining")
        vm.daemon.kill()
        world.start_daemon(vm)
        await in_thread(vm.daemon.wait_ready)
        record = await held
        await wait_for(lambda: events(world, "Evicted", name), timeout=20, what="eviction by the restarted daemon")
        await traffic.generator.wait()

    print(f"router: {traffic.outcomes()} over {len(traffic.records)} requests; "
          f"{sum(r.pod == name for r in traffic.records)} on the drained pod")
    assert record.outcome is Outcome.COMPLETED, record
    assert traffic.lost(NOTICE_BUDGET_SECONDS) == [], traffic.outcomes()
    assert set(traffic.outcomes()) == {"completed"}, traffic.outcomes()
    after_notice = [r for r in traffic.generator.records if r.start > noticed + 2]
    assert after_notice and all(r.pod != name for r in after_notice), "routed to a deregistered pod"

    held_node = await in_thread(world.node, doomed_node)
    assert held_node["spec"].get("unschedulable") is True and len(spotguard_taints(held_node)) == 1
    assert await in_thread(lambda: len(events(world, "Evicted", name))) == 1
    assert await in_thread(lambda: len(events(world, "TerminationNotice", doomed_node))) == 1
    text = await in_thread(vm.daemon.metrics)
    assert metric(text, "spotguard_actions_total", action="cordon") == 0
    assert metric(text, "spotguard_actions_total", action="set_not_serving") == 0
    assert metric(text, "spotguard_evictions_total", result="evicted") == 1
    assert [line["phase"] for line in logged(vm.daemon, "resuming")] == ["draining"]


# ---------------------------------------------------------------------------------------------
# 4. vLLM's /metrics unreachable, slow, or garbage: the drain falls back to the time budget.

DRAIN_BUDGET_SECONDS = 4.0
BROKEN_METRICS_PORT = 8001


@pytest.mark.parametrize("fault, reason", [("unreachable", "connection"), ("slow", "timeout"),
                                           ("garbage", "bad_body")])
async def test_unreadable_vllm_metrics_fall_back_to_the_time_budget(world, fault, reason):
    world.daemon_env = {"SPOTGUARD_MAX_DRAIN_SECONDS": str(DRAIN_BUDGET_SECONDS)}
    node = node_name()
    vm = await world.add_vm(node)
    pod = await _one_vllm(world, node)
    name, ip = pod["metadata"]["name"], pod["status"]["podIP"]
    # vLLM keeps serving on 8000; spotguard is told to read its /metrics where nothing good answers.
    await in_thread(world.api.call, "PATCH", f"/api/v1/namespaces/{world.namespace}/pods/{name}",
                    body={"metadata": {"annotations": {"spotguard.io/metrics-port": str(BROKEN_METRICS_PORT)}}},
                    content_type=MERGE_PATCH)
    server = None if fault == "unreachable" else BadMetricsServer(ip, BROKEN_METRICS_PORT, mode=fault)
    try:
        with HealthProbe(vm.daemon) as probe:
            async with Traffic(world) as traffic:
                await traffic.wait_ready(1)
                request = asyncio.ensure_future(traffic.generator.request(2.0))
                await asyncio.sleep(0.5)
                world.preempt(node, vm_lifetime_seconds=None)
                record = await request
                await wait_for(lambda: events(world, "Evicted", name), timeout=20, what="eviction")
                await wait_for(lambda: phase(world, node) == "drained", timeout=10, what="drained")
    finally:
        if server is not None:
            server.close()

    assert record.outcome is Outcome.COMPLETED, record
    assert traffic.outcomes() == {"completed": 1}
    if server is not None:
        assert server.requests >= 1
    # No crash: alive and the same process throughout.
    assert [s for s in probe.samples if s.healthz != 200 or not s.running] == []
    # It fell back to the time budget: neither evicted at once nor stuck.
    text = await in_thread(vm.daemon.metrics)
    assert metric(text, "spotguard_vllm_scrape_errors_total", reason=reason) >= 1
    assert metric(text, "spotguard_drain_duration_seconds_count") == 1
    errors = metric(text, "spotguard_vllm_scrape_errors_total", reason=reason)
    drained_after = metric(text, "spotguard_drain_duration_seconds_sum")
    print(f"{fault}: {errors:.0f} scrape errors ({reason}), drain {drained_after:.2f} s, router {traffic.outcomes()}")
    assert metric(text, "spotguard_drain_duration_seconds_sum") >= DRAIN_BUDGET_SECONDS - 0.5
    assert metric(text, "spotguard_evictions_total", result="evicted") == 1
    # It says so: a log line, a Warning Event on the pod, and the budget Event on the node.
    assert logged(vm.daemon, "vllm metrics unreadable", reason=reason)
    unavailable = await in_thread(events, world, "MetricsUnavailable", name)
    assert len(unavailable) == 1 and unavailable[0]["type"] == "Warning"
    assert "time budget" in unavailable[0]["message"]
    spent = await in_thread(events, world, "DrainBudgetSpent", node)
    assert len(spent) == 1 and "unknown" in spent[0]["message"]
    assert await in_thread(lambda: len(events(world, "Evicted", name))) == 1
    assert not logged(vm.daemon, "decision step failed")


# ---------------------------------------------------------------------------------------------
# 5. Duplicate and flapping notices; the node deleted under the daemon; a pod ignoring SIGTERM.

TERMINATE = "TERMINATE_ON_HOST_MAINTENANCE"


async def test_flapping_maintenance_notice_leaves_the_node_as_it_was(world):
    node = node_name()
    vm = await world.add_vm(node)
    pod = await _one_vllm(world, node)
    name = pod["metadata"]["name"]

    async with Traffic(world) as traffic:
        await traffic.wait_ready(1)
        # In flight on the pod, so the drain is still waiting when the notices flap.
        request = asyncio.ensure_future(traffic.generator.request(12.0))
        await asyncio.sleep(0.5)
        with HealthProbe(vm.daemon) as probe:
            for event in (TERMINATE, "NONE", TERMINATE, "NONE", TERMINATE):
                vm.metadata.set_maintenance(event)
                await asyncio.sleep(0.15)
            await wait_for(lambda: deregistered(world, node, name), timeout=10, what="deregistered")
            await asyncio.sleep(1)
            held = await in_thread(world.node, node)
            assert len(spotguard_taints(held)) == 1, held["spec"].get("taints")
            assert annotations(held).get("spotguard.io/cordoned-by-spotguard") == "true"
            assert annotations(held).get("spotguard.io/notice-kind") == "host-maintenance"

            vm.metadata.set_maintenance("NONE")

            def as_before() -> bool:
                current, now_pod = world.node(node), get_pod(world, name)
                return not current["spec"].get("unschedulable") and not spotguard_taints(current) \
                    and not [k for k in annotations(current) if k.startswith("spotguard.io/")] \
                    and condition(now_pod, "spotguard.io/serving") == "True" and condition(now_pod, "Ready") == "True"

            await wait_for(as_before, timeout=15, what="node and pod as before the notices")
        record = await request

    assert record.outcome is Outcome.COMPLETED, record
    assert traffic.outcomes() == {"completed": 1}
    assert await in_thread(events, world, "Evicted", name) == []
    assert await in_thread(events, world, "NoticeCancelled", node)
    assert [s for s in probe.samples if s.healthz != 200 or not s.running] == []
    text = await in_thread(vm.daemon.metrics)
    assert metric(text, "spotguard_evictions_total") == 0
    assert not logged(vm.daemon, "decision step failed")


async def test_repeated_preemption_notices_are_acted_on_once(world):
    node = node_name()
    vm = await world.add_vm(node)
    pod = await _one_vllm(world, node)
    name = pod["metadata"]["name"]
    # Every hanging GET is answered at once with the current value: the daemon hears "preempted"
    # again and again, as from a proxy that ignores wait_for_change.
    vm.metadata.set_fault("ignore_wait")
    vm.metadata.preempt()
    seen_at = vm.metadata.requests["instance/preempted"]
    vm.metadata.preempt()
    await wait_for(lambda: events(world, "Evicted", name), timeout=15, what="eviction")
    await asyncio.sleep(3)
    repeats = vm.metadata.requests["instance/preempted"] - seen_at
    assert repeats >= 3, f"the notice was only read {repeats} more times"

    held = await in_thread(world.node, node)
    assert held["spec"].get("unschedulable") is True and len(spotguard_taints(held)) == 1
    assert await in_thread(lambda: len(events(world, "TerminationNotice", node))) == 1
    assert await in_thread(lambda: len(events(world, "Evicted", name))) == 1
    text = await in_thread(vm.daemon.metrics)
    assert metric(text, "spotguard_notices_total", kind="preemption") == 1
    assert metric(text, "spotguard_actions_total", action="cordon", result="ok") == 1
    assert metric(text, "spotguard_actions_total", action="taint", result="ok") == 1
    assert metric(text, "spotguard_evictions_total", result="evicted") == 1


async def test_node_deleted_under_the_daemon_is_survived(world):
    node = node_name()
    vm = await world.add_vm(node)
    daemon = vm.daemon
    held = await in_thread(world.node, node)
    with HealthProbe(daemon) as probe:
        world.preempt(node, vm_lifetime_seconds=None)
        await wait_for(lambda: world.node(node)["spec"].get("unschedulable"), timeout=10, what="cordoned")
        await in_thread(world.api.call, "DELETE", f"/api/v1/nodes/{node}")
        await wait_for(lambda: logged(daemon, "node object is gone"), timeout=10, what="the daemon saw it")
        # Long enough for a crash loop or a stuck loop to show.
        await asyncio.sleep(5)
        listed = await in_thread(world.api.call, "GET", "/api/v1/nodes",
                                 query={"fieldSelector": f"metadata.name={node}"})
        assert listed["items"] == [], "the daemon must never create its node"

        # The node registers again (same VM, same name) while the notice is still up: guarded again.
        again = {"apiVersion": "v1", "kind": "Node",
                 "metadata": {"name": node, "labels": held["metadata"]["labels"]}}
        await in_thread(world.api.call, "POST", "/api/v1/nodes", body=again)
        await wait_for(lambda: world.node(node)["spec"].get("unschedulable") and spotguard_taints(world.node(node)),
                       timeout=15, what="the re-registered node cordoned again")

    assert [s for s in probe.samples if s.healthz != 200 or not s.running] == []
    assert daemon.process.poll() is None
    assert not logged(daemon, "decision step failed")
    assert not [line for line in logged(daemon, "(not json)") if "Traceback" in line["text"]]
    text = await in_thread(daemon.metrics)
    assert metric(text, "spotguard_notices_total", kind="preemption") == 1


async def test_pod_ignoring_sigterm_is_killed_after_its_grace_and_the_eviction_completes(world, cluster):
    node = node_name()
    vm = await world.add_vm(node)
    grace = 3
    name = "stubborn"
    await in_thread(serving_pod, world, name, node=node, vllm_args="--ignore-sigterm", grace_seconds=grace)
    await in_thread(world.wait_ready_pods, 1, selector=f"app={name}")

    async with Traffic(world, service=name) as traffic:
        await traffic.wait_ready(1)
        record = await traffic.generator.request(1.0)
        world.preempt(node, vm_lifetime_seconds=None)
        await wait_for(lambda: events(world, "Evicted", name), timeout=15, what="eviction")
        evicted_at = time.monotonic()
        await wait_for(lambda: get_pod(world, name) is None, timeout=grace + 15, what="pod object gone")
        gone_at = time.monotonic()

    assert record.outcome is Outcome.COMPLETED, record
    assert traffic.outcomes() == {"completed": 1}
    # It outlived SIGTERM: only the kubelet's SIGKILL after the grace period ended it.
    print(f"pod gone {gone_at - evicted_at:.1f} s after its eviction (grace {grace} s); router {traffic.outcomes()}")
    assert gone_at - evicted_at >= grace - 1
    kubelet_log = Path(cluster.dir) / "logs" / "sim-kubelet.log"
    kills = [json.loads(line) for line in kubelet_log.read_text(errors="replace").splitlines()
             if '"container_sigkill"' in line and f'"{world.namespace}/{name}"' in line]
    assert len(kills) == 1 and kills[0]["after"] >= grace - 0.5, kills
    # spotguard's side is complete.
    await wait_for(lambda: phase(world, node) == "drained", timeout=10, what="drained")
    assert await in_thread(lambda: len(events(world, "Evicted", name))) == 1
    text = await in_thread(vm.daemon.metrics)
    assert metric(text, "spotguard_evictions_total", result="evicted") == 1
    assert vm.daemon.process.poll() is None

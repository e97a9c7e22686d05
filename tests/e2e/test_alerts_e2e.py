"""Alerting via Prometheus, end to end: a real Prometheus (Debian's 2.42) scrapes the real
`spotguard run` daemons and the fake vLLM pods of a simulated GPU spot pool, evaluates the chart's
own alert rules (rendered by the Helm engine), and the alerts are read back through Prometheus'
HTTP API, the way Alertmanager and an operator see them.

The rules are the product's; only their `for:` durations are shortened through the chart's values
(spotguard_sim.prometheus.FAST_ALERTS), so pending -> firing happens within the test.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest
from spotguard_sim.prometheus import (
    FAST_ALERTS,
    PROMETHEUS,
    SPOTGUARD_JOB,
    VLLM_JOB,
    SimPrometheus,
    render_rule_file,
    targets_for,
)
from spotguard_sim.support import wait_until
from spotguard_sim.world import World

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.slow,
    pytest.mark.skipif(not os.access(PROMETHEUS, os.X_OK),
                       reason=f"{PROMETHEUS} not installed: run scripts/install-prometheus.sh"),
]

PDB = "vllm-pdb"


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[SimPrometheus]:
    rules = render_rule_file(tmp_path / "rules.yaml", values=FAST_ALERTS)
    server = SimPrometheus(rule_file=rules, work_dir=tmp_path / "prometheus")
    try:
        server.start()
        yield server
    finally:
        server.stop()


def node_name() -> str:
    return f"gpu-{uuid.uuid4().hex[:8]}"


def current_phase(prometheus: SimPrometheus, node: str) -> str | None:
    """The phase spotguard on `node` reports, as Prometheus last scraped it."""
    result = prometheus.query(f'spotguard_phase{{node="{node}"}} == 1')
    return result[0]["metric"]["phase"] if len(result) == 1 else None


async def scrape_world(prometheus: SimPrometheus, world: World, *, leaving_pod: str | None = None) -> None:
    """Scrape what the world runs now and wait until it is up; `leaving_pod` (being evicted right
    now, its vLLM about to exit) is scraped too but not waited for."""
    targets = await asyncio.to_thread(targets_for, world)
    prometheus.set_targets(targets)
    staying = [t for t in targets if leaving_pod is None or t.labels.get("pod") != leaving_pod]
    await asyncio.to_thread(prometheus.wait_for_targets, staying, 30)


def is_ready(pod: dict[str, Any]) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in pod.get("status", {}).get("conditions", []))


async def test_pdb_blocked_preemption_fires_alerts_naming_node_pod_and_pdb_and_they_resolve(world, prometheus):
    first = node_name()
    await world.add_vm(first)
    # One replica and minAvailable 1 with the default IfHealthyBudget: once spotguard has made the
    # pod not-ready, the Eviction API refuses it (429) until a ready replica exists elsewhere.
    world.deploy_vllm(replicas=1)
    world.api.call("POST", f"/apis/policy/v1/namespaces/{world.namespace}/poddisruptionbudgets", body={
        "apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": {"name": PDB},
        "spec": {"minAvailable": 1, "selector": {"matchLabels": {"app": "vllm"}}}})
    pod = (await asyncio.to_thread(world.wait_ready_pods, 1))[0]
    name = pod["metadata"]["name"]
    await scrape_world(prometheus, world)

    # Before the notice: guarding, nothing active; vLLM is scraped with its pod's labels.
    assert await asyncio.to_thread(current_phase, prometheus, first) == "guarding"
    assert not await asyncio.to_thread(prometheus.matching_alerts, "SpotguardPreemptionInProgress", {"node": first})
    running = await asyncio.to_thread(prometheus.query, f'vllm:num_requests_running{{job="{VLLM_JOB}",pod="{name}"}}')
    assert running and running[0]["metric"]["node"] == first
    assert running[0]["metric"]["namespace"] == world.namespace

    world.preempt(first, vm_lifetime_seconds=None)

    in_progress = await asyncio.to_thread(prometheus.wait_for_alert, "SpotguardPreemptionInProgress", "firing",
                                          {"node": first, "job": SPOTGUARD_JOB}, 30)
    assert in_progress["labels"]["severity"] == "info"
    assert in_progress["labels"]["phase"] != "guarding"

    # honor_labels: namespace/pod are the BLOCKED pod's, not spotguard's own pod's target labels.
    blocked = {"node": first, "namespace": world.namespace, "pod": name, "pdb": PDB}
    pending = await asyncio.to_thread(prometheus.wait_for_alert, "SpotguardEvictionBlockedByPDB", "pending",
                                      blocked, 40)
    assert pending["state"] == "pending", "the alert skipped its for: (FAST_ALERTS evictionBlockedFor)"
    firing = await asyncio.to_thread(prometheus.wait_for_alert, "SpotguardEvictionBlockedByPDB", "firing",
                                     blocked, 30)
    assert firing["labels"]["severity"] == "warning"
    assert firing["annotations"]["summary"] == (
        f"PodDisruptionBudget {world.namespace}/{PDB} blocks the eviction of {name} from node {first}.")
    assert "kubectl" in firing["annotations"]["runbook"]
    assert await asyncio.to_thread(current_phase, prometheus, first) == "evicting"
    evictions = await asyncio.to_thread(
        prometheus.query, f'spotguard_evictions_total{{node="{first}",result="blocked_by_pdb"}}')
    assert float(evictions[0]["value"][1]) >= 1

    # Capacity returns: a second node and a second replica there; once it is Ready the budget
    # allows the eviction, spotguard's retry succeeds and the alert resolves.
    second = node_name()
    await world.add_vm(second)
    world.api.call("PATCH", f"/apis/apps/v1/namespaces/{world.namespace}/deployments/vllm/scale",
                   body={"spec": {"replicas": 2}}, content_type="application/merge-patch+json")
    await asyncio.to_thread(wait_until, lambda: [p for p in world.pods("app=vllm") if is_ready(p)
                                                 and p["spec"].get("nodeName") == second],
                            timeout=60, what=f"a ready replica on {second}")
    await scrape_world(prometheus, world, leaving_pod=name)

    await asyncio.to_thread(prometheus.wait_for_no_alert, "SpotguardEvictionBlockedByPDB", {"node": first}, 60)
    assert any(e["involvedObject"]["name"] == name for e in world.events(reason="Evicted"))
    assert not await asyncio.to_thread(prometheus.query, f'spotguard_eviction_blocked{{node="{first}"}} == 1')
    # The node is still going away: the preemption alert stays; the new node is quiet.
    assert await asyncio.to_thread(prometheus.matching_alerts, "SpotguardPreemptionInProgress", {"node": first})
    assert await asyncio.to_thread(current_phase, prometheus, second) == "guarding"
    assert not await asyncio.to_thread(prometheus.matching_alerts, "SpotguardPreemptionInProgress", {"node": second})

"""The real daemon, with nothing but the chart's RBAC and admission policies, through a preemption.

test_chart_install.py checks the permissions request by request, with pod-bound tokens. This test runs
`spotguard run` itself with a real pod-bound ServiceAccount token (TokenRequest bound to the
spotguard pod the DaemonSet controller created, so the API server adds the node-name claim), so
any call the daemon makes that the chart forgot would show up as a failed preemption here. And
`spotguard check` is run with a bound and an unbound token: only its dry-run writes can tell them apart.
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import uuid
from pathlib import Path
from typing import Any, AsyncIterator

import chartlib
import helm_python as helm
import pytest
import yaml
from kubernetes import config as kube_config
from spotguard_sim.support import wait_until
from spotguard_sim.world import DaemonProcess, World

from spotguard.kube import EVICTION_LABEL, Kube, KubeError

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


@pytest.fixture
async def release(world: World, cluster: Any, api_client: Any) -> AsyncIterator[dict[str, str]]:
    """The chart installed with its defaults (policies on) in a namespace of its own, and the
    daemon allowed to label its node out of load balancers."""
    suffix = uuid.uuid4().hex[:6]
    namespace, name = f"sg-secured-{suffix}", f"sg-{suffix}"
    world.api.call("POST", "/api/v1/namespaces", body={"metadata": {"name": namespace}})
    helm_config = helm.Config(kubeconfig_path=cluster.kubeconfig, namespace=namespace)
    try:
        await asyncio.to_thread(helm_config.install, chartlib.CHART_DIR, name, {"excludeFromLoadBalancers": True},
                                namespace=namespace, timeout=120)
        yield {"namespace": namespace, "name": name, "service_account": f"{name}-spotguard"}
    finally:
        try:
            await asyncio.to_thread(helm_config.uninstall, name, ignore_not_found=True, timeout=60)
        finally:
            helm_config.close()
            world.api.call("DELETE", f"/api/v1/namespaces/{namespace}")


def spotguard_pod(world: World, release: dict[str, str], node: str) -> dict[str, Any]:
    """The pod the DaemonSet controller created for `node`."""
    def find() -> dict[str, Any] | None:
        pods = world.api.call("GET", f"/api/v1/namespaces/{release['namespace']}/pods",
                              query={"fieldSelector": f"spec.nodeName={node}"})["items"]
        return pods[0] if pods else None

    return wait_until(find, timeout=30, what=f"the DaemonSet's spotguard pod on {node}")


def token_kubeconfig(cluster: Any, token: str, path: Path) -> Path:
    admin = yaml.safe_load(Path(cluster.kubeconfig).read_text())
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "spotguard",
        "clusters": [{"name": "sim", "cluster": admin["clusters"][0]["cluster"]}],
        "users": [{"name": "spotguard", "user": {"token": token}}],
        "contexts": [{"name": "spotguard", "context": {"cluster": "sim", "user": "spotguard"}}]}))
    return path


def pod_bound_kubeconfig(world: World, cluster: Any, release: dict[str, str], pod: dict[str, Any],
                         path: Path) -> Path:
    """A kubeconfig with a token bound to `pod`, as the kubelet mounts into the spotguard container."""
    token = world.api.call(
        "POST", f"/api/v1/namespaces/{release['namespace']}/serviceaccounts/{release['service_account']}/token",
        body={"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
              "spec": {"expirationSeconds": 3600,
                       "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": pod["metadata"]["name"],
                                          "uid": pod["metadata"]["uid"]}}})["status"]["token"]
    # The claim the admission policies rely on is in the token itself.
    claims = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
    assert claims["kubernetes.io"]["node"]["name"] == pod["spec"]["nodeName"], claims
    return token_kubeconfig(cluster, token, path)


async def test_spotguard_check_sees_what_the_policies_refuse(world: World, release: dict[str, str], cluster: Any,
                                                           tmp_path: Path) -> None:
    """RBAC allows everything either way; only the dry-run writes show that a token without the
    node-name claim (requested without a pod) is refused by the chart's policies."""
    node = f"gpu-{uuid.uuid4().hex[:6]}"
    vm = await world.add_vm(node, spotguard=False)
    # A serving pod on the node, so the check also tries its pods/status write and its pod Event.
    world.deploy_vllm(replicas=1)
    vllm = await asyncio.to_thread(wait_until, lambda: next(
        (p for p in world.pods("app=vllm") if p["spec"].get("nodeName") == node), None), timeout=30,
        what="the vLLM pod bound to the node")
    key = f"{world.namespace}/{vllm['metadata']['name']}"
    bound = pod_bound_kubeconfig(world, cluster, release, spotguard_pod(world, release, node),
                                 tmp_path / "bound.kubeconfig")
    unbound_token = world.api.call(
        "POST", f"/api/v1/namespaces/{release['namespace']}/serviceaccounts/{release['service_account']}/token",
        body={"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
              "spec": {"expirationSeconds": 3600}})["status"]["token"]
    unbound = token_kubeconfig(cluster, unbound_token, tmp_path / "unbound.kubeconfig")

    def as_spotguard(kubeconfig: Path) -> DaemonProcess:
        return DaemonProcess(node=node, kubeconfig=kubeconfig, metadata_url=vm.metadata.url,
                             log_path=tmp_path / "unused.log")

    def refused() -> subprocess.CompletedProcess[str] | None:
        result = as_spotguard(unbound).check()
        return result if "FAIL admission" in result.stdout else None

    result = await asyncio.to_thread(wait_until, refused, timeout=30, what="the policies to refuse the check")
    assert result.returncode == 1, result.stdout
    assert f"FAIL admission: may not cordon, taint and annotate node {node}" in result.stdout
    assert "pod-bound token" in result.stdout
    assert f"FAIL admission: may not set spotguard.io/serving=False on {key}" in result.stdout
    assert "OK   RBAC patch nodes" in result.stdout      # what RBAC alone would have said

    result = await asyncio.to_thread(as_spotguard(bound).check)
    assert f"OK   admission: may cordon, taint and annotate node {node} (dry run)" in result.stdout.splitlines(), \
        result.stdout
    lines = result.stdout.splitlines()
    assert f"OK   admission: may set spotguard.io/serving=False on {key} (dry run)" in lines, result.stdout
    assert f"OK   admission: may record an Event about {key} (dry run)" in lines, result.stdout
    assert "FAIL admission" not in result.stdout

    # On a node an admin cordoned, a notice would not claim that cordon, and the check says so.
    world.api.call("PATCH", f"/api/v1/nodes/{node}", body={"spec": {"unschedulable": True}},
                   content_type="application/merge-patch+json")
    result = await asyncio.to_thread(as_spotguard(bound).check)
    assert f"OK   admission: may taint and annotate node {node} (dry run)" in result.stdout.splitlines(), result.stdout


async def test_daemon_with_a_pod_bound_token_handles_a_preemption_under_the_charts_policies(
        world: World, release: dict[str, str], cluster: Any, tmp_path: Path) -> None:
    world.daemon_env = {"SPOTGUARD_NOTICE_SECONDS": "30", "SPOTGUARD_EXCLUDE_FROM_LOAD_BALANCERS": "true"}
    suffix = uuid.uuid4().hex[:6]
    victim, neighbour = f"gpu-{suffix}-1", f"gpu-{suffix}-2"
    kubeconfigs = {}
    for name in (victim, neighbour):   # the neighbour's spotguard lets its vLLM pod become Ready
        vm = await world.add_vm(name, spotguard=False)
        kubeconfigs[name] = pod_bound_kubeconfig(world, cluster, release, spotguard_pod(world, release, name),
                                                 tmp_path / f"spotguard-{name}.kubeconfig")
        await asyncio.to_thread(world.start_daemon(vm, kubeconfig=kubeconfigs[name]).wait_ready)
    daemon, kubeconfig = world.vms[victim].daemon, kubeconfigs[victim]
    assert daemon is not None

    world.deploy_vllm(replicas=2)
    pods = await asyncio.to_thread(world.wait_ready_pods, 2)
    on = {p["spec"]["nodeName"]: p["metadata"]["name"] for p in pods}
    uids = {p["spec"]["nodeName"]: p["metadata"]["uid"] for p in pods}
    client = kube_config.new_client_from_config(config_file=str(kubeconfig))
    as_spotguard = Kube(client, node_name=victim)

    def evict_neighbours_pod(dry_run: bool) -> None:
        """An eviction exactly as spotguard sends one, of the pod on the neighbour's node."""
        as_spotguard.call("POST", f"/api/v1/namespaces/{world.namespace}/pods/{on[neighbour]}/eviction",
                          query={"dryRun": "All"} if dry_run else None,
                          body={"apiVersion": "policy/v1", "kind": "Eviction",
                                "metadata": {"name": on[neighbour], "namespace": world.namespace,
                                             "labels": {EVICTION_LABEL: "spotguard"}},
                                "deleteOptions": {"preconditions": {"uid": uids[neighbour]}}})

    def policies_active() -> bool:
        try:
            evict_neighbours_pod(dry_run=True)
        except KubeError as error:
            return error.status == 403 and "may only evict pods on its own node" in str(error)
        return False

    # The daemon must do its work with the policies enforcing, not before they are active.
    await asyncio.to_thread(wait_until, policies_active, timeout=30, what="the chart's eviction policy active")
    world.preempt(victim, vm_lifetime_seconds=None)   # no kubelet shutdown: spotguard alone evicts

    def evicted() -> bool:
        return on[victim] not in {p["metadata"]["name"] for p in world.pods("app=vllm")}

    await asyncio.to_thread(wait_until, evicted, timeout=60, what=f"spotguard to evict {on[victim]}")
    node = world.node(victim)
    assert node["spec"].get("unschedulable") is True
    assert "spotguard.io/impending-termination" in [t["key"] for t in node["spec"].get("taints") or []]
    assert node["metadata"]["labels"]["node.kubernetes.io/exclude-from-external-load-balancers"] == "true"
    assert node["metadata"]["annotations"]["spotguard.io/phase"] in ("evicting", "drained")
    assert [e for e in world.events(reason="Evicted") if e["involvedObject"]["name"] == on[victim]]
    # Every call the daemon made was allowed: no API error at all, every action succeeded.
    assert daemon.metric("spotguard_kube_api_errors_total") == 0, daemon.log_path.read_text()[-3000:]
    assert daemon.metric("spotguard_evictions_total", result="evicted") == 1
    assert daemon.metric("spotguard_actions_total", result="error") == 0

    # The same token may not touch the neighbour's node or evict the pod serving there.
    try:
        with pytest.raises(KubeError) as refused:
            evict_neighbours_pod(dry_run=False)
        assert refused.value.status == 403 and "may only evict pods on its own node" in str(refused.value)
        with pytest.raises(KubeError) as refused:
            as_spotguard.call("PATCH", f"/api/v1/nodes/{neighbour}", body={"spec": {"unschedulable": True}},
                              content_type="application/merge-patch+json")
        assert refused.value.status == 403 and "may only modify its own Node" in str(refused.value)
    finally:
        client.close()
    assert not world.node(neighbour)["spec"].get("unschedulable")
    assert on[neighbour] in {p["metadata"]["name"] for p in world.pods("app=vllm")}

"""`spotguard check` against the real local control plane: a protected node, and the reasons when not."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from spotguard_sim.world import DaemonProcess

pytestmark = pytest.mark.cluster


async def test_check_says_a_guarded_node_with_a_wired_vllm_pod_is_protected(world, cluster):
    node = f"gpu-{uuid.uuid4().hex[:8]}"
    vm = await world.add_vm(node)
    world.deploy_vllm(replicas=1)
    pod = (await asyncio.to_thread(world.wait_ready_pods, 1))[0]
    assert vm.daemon is not None
    result = await asyncio.to_thread(vm.daemon.check)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[-1].startswith("PROTECTED: 0 failed")
    assert any(line.startswith("OK") and "RBAC create pods/eviction" in line for line in lines)
    # Dry-run writes: admission was asked, nothing changed.
    key = f"{world.namespace}/{pod['metadata']['name']}"
    assert f"OK   admission: may cordon, taint and annotate node {node} (dry run)" in lines
    assert f"OK   admission: may set spotguard.io/serving=False on {key} (dry run)" in lines
    assert f"OK   admission: may record an Event about {key} (dry run)" in lines
    assert any(line.startswith("OK") and f"may evict {key} (dry run)" in line for line in lines)
    # Dry runs: the node is neither cordoned nor annotated, the pod still serving, no Event stored.
    held = world.node(node)
    assert not held["spec"].get("unschedulable") and "spotguard.io/phase" not in (held["metadata"].get("annotations") or {})
    assert not [e for e in world.events(reason="NotServing") if e["involvedObject"]["name"] == pod["metadata"]["name"]]
    assert pod["metadata"]["name"] in {p["metadata"]["name"] for p in world.pods("app=vllm")
                                       if not p["metadata"].get("deletionTimestamp")}
    assert any(line.startswith("OK") and pod["metadata"]["name"] in line and "vLLM metrics" in line for line in lines)


async def test_check_fails_with_reasons_for_a_missing_node_and_unreachable_metadata(world, cluster, tmp_path):
    nowhere = DaemonProcess(node="no-such-node", kubeconfig=cluster.kubeconfig, metadata_url="http://127.0.0.1:9",
                            log_path=tmp_path / "unused.log")
    result = await asyncio.to_thread(nowhere.check)
    assert result.returncode == 1
    failures = [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
    assert any("metadata" in line for line in failures)
    assert any("node no-such-node" in line and "404" in line for line in failures)
    assert result.stdout.splitlines()[-1].startswith("NOT PROTECTED")


async def test_check_tries_the_surge_hand_over_and_placeholder_of_opted_in_pods_as_dry_runs(world, cluster):
    world.ensure_placeholder_priority_class()
    node = f"gpu-{uuid.uuid4().hex[:8]}"
    vm = await world.add_vm(node)
    world.deploy_vllm(replicas=1, surge=True)                         # a Deployment's pod: handed over
    world.deploy_vllm("db", replicas=1, surge=True, statefulset=True)   # a StatefulSet's: a placeholder
    web = (await asyncio.to_thread(world.wait_ready_pods, 1))[0]
    db = (await asyncio.to_thread(world.wait_ready_pods, 1, "app=db"))[0]
    replicaset = web["metadata"]["ownerReferences"][0]["name"]
    result = await asyncio.to_thread(vm.daemon.check)
    lines = result.stdout.splitlines()
    assert f"OK   admission: may hand {world.namespace}/{web['metadata']['name']} over to a replacement (release " \
           f"it from ReplicaSet {replicaset}) (dry run)" in lines, result.stdout
    assert f"OK   admission: may create the surge placeholder of {world.namespace}/{db['metadata']['name']} at " \
           "PriorityClass spotguard-placeholder (dry run)" in lines, result.stdout
    for access in ("create pods", "patch pods", "get replicasets"):
        assert any(line.startswith("OK") and f"RBAC {access}" == line[5:] for line in lines), access
    assert not world.pods("spotguard.io/placeholder-node"), "a dry run stores nothing"
    assert "pod-template-hash" in world.pods("app=vllm")[0]["metadata"]["labels"], "a dry run releases nothing"
    # A rebalance recommendation that surges stands by with placeholders, the Deployment's pod's too.
    plain_env = vm.daemon.extra_env
    vm.daemon.extra_env = {**plain_env, "SPOTGUARD_REBALANCE_ACTION": "surge"}
    standing_by = await asyncio.to_thread(vm.daemon.check)
    assert f"OK   admission: may create the surge placeholder of {world.namespace}/{web['metadata']['name']} at " \
           "PriorityClass spotguard-placeholder (dry run)" in standing_by.stdout.splitlines(), standing_by.stdout
    vm.daemon.extra_env = plain_env
    # A PriorityClass that does not exist (the chart's not installed) is what the API server says.
    vm.daemon.extra_env = {**vm.daemon.extra_env, "SPOTGUARD_SURGE_PRIORITY_CLASS": "no-such-class"}
    result = await asyncio.to_thread(vm.daemon.check)
    failed = [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
    assert result.returncode == 1 and len(failed) == 1 and "no-such-class" in failed[0], result.stdout
    # Surge off: said so, nothing tried.
    vm.daemon.extra_env = {**vm.daemon.extra_env, "SPOTGUARD_SURGE_MIN_NOTICE_SECONDS": "0"}
    result = await asyncio.to_thread(vm.daemon.check)
    assert result.returncode == 0 and any(line.startswith("OK   surge: off") for line in result.stdout.splitlines())

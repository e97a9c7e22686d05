"""The node side of the simulated kubelet: what it tells the API server about each Node it manages.

The kubelet's Lease in kube-node-lease (renewed every 10 s), the Node's well-known labels, and its
status (Ready and the pressure conditions, capacity with `nvidia.com/gpu` from
`sim.spotguard.io/gpus`, addresses, nodeInfo), posted on change or every 60 s. One `Node` record per
managed Node holds what the pod side needs too (its pods, the reclaim schedule, shutting down).
"""

from __future__ import annotations

import asyncio
import functools
import json
import platform
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Awaitable, Callable

import structlog

from spotguard.backoff import backoff_delay
from spotguard.kubeapi import KubeError
from spotguard_sim.kubelet.containers import HOST_IP
from spotguard_sim.kubelet.status import (
    NODE_SHUTTING_DOWN,
    annotations_of,
    condition_patch,
    matches,
    micro_time,
    now_rfc3339,
    resource_version,
    utcnow,
)

log = structlog.get_logger("spotguard_sim.kubelet")

GPUS_KEY = "sim.spotguard.io/gpus"  # node label or annotation: how many nvidia.com/gpu to report
KUBELET_VERSION = "v1.36.3"
LEASE_NAMESPACE = "kube-node-lease"
LEASE_DURATION_SECONDS = 40  # kubelet's nodeLeaseDurationSeconds
LEASE_RENEW_SECONDS = 10.0  # 0.25 x the lease duration, as the kubelet renews
NODE_STATUS_REPORT_SECONDS = 60.0  # re-post unchanged node status this often
_STRATEGIC_MERGE = "application/strategic-merge-patch+json"

Call = Callable[..., Awaitable[Any]]


@dataclass(eq=False)
class Node:
    name: str
    uid: str
    obj: dict[str, Any]
    pods: set[str] = field(default_factory=set)
    lease: dict[str, Any] | None = None
    last_post: float = float("-inf")
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    loop_task: asyncio.Task[None] | None = None
    reclaim_at: datetime | None = None
    reclaim_task: asyncio.Task[None] | None = None
    shutting_down: bool = False
    gone: bool = False
    labels_checked: bool = False


class NodeHeartbeat:
    """Keeps one managed Node's Lease, labels and status current, through `call` (the kubelet's
    async API request)."""

    def __init__(self, call: Call) -> None:
        self._call = call

    async def run(self, node: Node) -> None:
        """Heartbeats and status of one node until it is gone."""
        loop = asyncio.get_running_loop()
        next_lease, attempt = loop.time(), 0
        while not node.gone:
            node.wake.clear()
            try:
                if not node.labels_checked:
                    await self._ensure_node_labels(node)
                if loop.time() >= next_lease:
                    await self._renew_lease(node)
                    next_lease = loop.time() + LEASE_RENEW_SECONDS
                await self._sync_node_status(node)
                attempt = 0
            except KubeError as exc:
                delay = backoff_delay(attempt, base=0.2, cap=7.0)  # the kubelet's lease retry range
                attempt += 1
                log.warning("node_sync_failed", node=node.name, error=str(exc), retry_in=round(delay, 2))
                next_lease = min(next_lease, loop.time() + delay)
                await asyncio.sleep(delay)
                continue
            due = min(next_lease, node.last_post + NODE_STATUS_REPORT_SECONDS)
            try:
                await asyncio.wait_for(node.wake.wait(), timeout=max(0.0, due - loop.time()))
            except asyncio.TimeoutError:
                pass

    async def _ensure_node_labels(self, node: Node) -> None:
        """The well-known labels the kubelet puts on its Node (DaemonSets select on them)."""
        labels = (node.obj.get("metadata") or {}).get("labels") or {}
        wanted = {"kubernetes.io/hostname": node.name, "kubernetes.io/os": "linux",
                  "kubernetes.io/arch": _arch(), "beta.kubernetes.io/os": "linux",
                  "beta.kubernetes.io/arch": _arch()}
        missing = {k: v for k, v in wanted.items() if k not in labels}
        if missing:
            try:
                await self._call("PATCH", f"/api/v1/nodes/{node.name}",
                                     body={"metadata": {"labels": missing}}, content_type=_STRATEGIC_MERGE)
            except KubeError as exc:
                if exc.status != 404:
                    raise
        node.labels_checked = True

    async def _renew_lease(self, node: Node) -> None:
        collection = f"/apis/coordination.k8s.io/v1/namespaces/{LEASE_NAMESPACE}/leases"
        path = f"{collection}/{node.name}"
        owner = {"apiVersion": "v1", "kind": "Node", "name": node.name, "uid": node.uid}
        spec = {"holderIdentity": node.name, "leaseDurationSeconds": LEASE_DURATION_SECONDS,
                "renewTime": micro_time(utcnow())}
        if node.lease is None:
            try:
                node.lease = await self._call("GET", path)
            except KubeError as exc:
                if exc.status != 404:
                    raise
                # Owned by the Node, so the garbage collector removes it with the Node.
                node.lease = await self._call("POST", collection, body={
                    "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": node.name, "namespace": LEASE_NAMESPACE, "ownerReferences": [owner]},
                    "spec": spec})
                return
        lease = json.loads(json.dumps(node.lease))
        lease["spec"] = {**(lease.get("spec") or {}), **spec}
        lease["metadata"]["ownerReferences"] = [owner]
        try:
            node.lease = await self._call("PUT", path, body=lease)
        except KubeError:
            node.lease = None  # conflict or gone: read it again next time
            raise

    def _desired_node_status(self, node: Node) -> dict[str, Any]:
        capacity = {"cpu": "16", "memory": "64Gi", "pods": "110", "ephemeral-storage": "100Gi"}
        gpus = (node.obj["metadata"].get("labels") or {}).get(GPUS_KEY) or annotations_of(node.obj).get(GPUS_KEY)
        if gpus:
            try:
                capacity["nvidia.com/gpu"] = str(int(gpus))
            except ValueError:
                log.warning("gpus_value_invalid", node=node.name, value=gpus)
        ready = ({"type": "Ready", "status": "False", "reason": "KubeletNotReady", "message": NODE_SHUTTING_DOWN}
                 if node.shutting_down else
                 {"type": "Ready", "status": "True", "reason": "KubeletReady",
                  "message": "kubelet is posting ready status"})
        ident = str(uuid.uuid5(uuid.NAMESPACE_URL, f"spotguard-sim-node:{node.name}:{node.uid}"))
        return {
            "capacity": capacity, "allocatable": dict(capacity),
            "conditions": [
                {"type": "MemoryPressure", "status": "False", "reason": "KubeletHasSufficientMemory",
                 "message": "kubelet has sufficient memory available"},
                {"type": "DiskPressure", "status": "False", "reason": "KubeletHasNoDiskPressure",
                 "message": "kubelet has no disk pressure"},
                {"type": "PIDPressure", "status": "False", "reason": "KubeletHasSufficientPID",
                 "message": "kubelet has sufficient PID available"},
                ready,  # Ready last, as the kubelet keeps it
            ],
            "addresses": [{"type": "InternalIP", "address": HOST_IP}, {"type": "Hostname", "address": node.name}],
            "nodeInfo": {
                "machineID": ident.replace("-", ""), "systemUUID": ident, "bootID": ident,
                "kernelVersion": platform.release(), "osImage": "spotguard simulated node",
                "containerRuntimeVersion": "spotguard-sim://0.1.0", "kubeletVersion": KUBELET_VERSION,
                "kubeProxyVersion": "", "operatingSystem": "linux", "architecture": _arch(),
            },
        }

    async def _sync_node_status(self, node: Node) -> None:
        loop = asyncio.get_running_loop()
        status = node.obj.get("status") or {}
        desired = self._desired_node_status(node)
        heartbeat = loop.time() - node.last_post >= NODE_STATUS_REPORT_SECONDS
        now = now_rfc3339()
        patch: dict[str, Any] = {}
        for key in ("capacity", "allocatable"):
            have = status.get(key) or {}
            delta: dict[str, Any] = {k: v for k, v in desired[key].items() if have.get(k) != v}
            if "nvidia.com/gpu" in have and "nvidia.com/gpu" not in desired[key]:
                delta["nvidia.com/gpu"] = None
            if delta:
                patch[key] = delta
        changed = condition_patch(status.get("conditions") or [], desired["conditions"], now)
        if changed or heartbeat:
            # Any condition change re-posts them all with a fresh heartbeat, as the kubelet does.
            patch["conditions"] = condition_patch(status.get("conditions") or [], desired["conditions"], now,
                                                   heartbeat=True)
        if not matches(desired["addresses"], status.get("addresses")):
            patch["addresses"] = desired["addresses"]
        if not matches(desired["nodeInfo"], status.get("nodeInfo")):
            patch["nodeInfo"] = desired["nodeInfo"]
        if not patch:
            return
        try:
            obj = await self._call("PATCH", f"/api/v1/nodes/{node.name}/status", body={"status": patch},
                                       content_type=_STRATEGIC_MERGE)
        except KubeError as exc:
            if exc.status == 404:
                return  # deleted: the watch says so next
            raise
        node.last_post = loop.time()
        if changed or set(patch) - {"conditions"}:
            log.info("node_status_posted", node=node.name, fields=sorted(patch),
                     ready=desired["conditions"][-1]["status"])
        if not node.gone and resource_version(obj) > resource_version(node.obj):
            node.obj = obj


@functools.cache
def _arch() -> str:
    machine = platform.machine().lower()
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm"}.get(machine, machine)



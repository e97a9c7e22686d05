"""Watching the cluster from outside, as any client would: when did a node get cordoned, a pod
become not-ready, the VM disappear."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, Callable

from spotguard.kubeapi import ListWatch, Obj
from spotguard_sim.bench.measure import condition_status
from spotguard_sim.support import USER_AGENT
from spotguard_sim.world import POOL_LABEL, SERVING_GATE


@dataclass
class _Change:
    at: float
    key: str  # node name or pod uid
    field: str
    value: Any


def _node_facts(node: Obj | None) -> dict[str, Any]:
    if node is None:
        return {"exists": False}
    annotations = node["metadata"].get("annotations") or {}
    return {"exists": True, "unschedulable": bool((node.get("spec") or {}).get("unschedulable")),
            "ready": condition_status(node, "Ready"), "phase": annotations.get("spotguard.io/phase")}


def _pod_facts(pod: Obj | None) -> dict[str, Any]:
    if pod is None:
        return {"exists": False}
    return {"exists": True, "node": (pod.get("spec") or {}).get("nodeName"),
            "ready": condition_status(pod, "Ready"), "serving": condition_status(pod, SERVING_GATE),
            "terminating": pod["metadata"].get("deletionTimestamp") is not None,
            "phase": (pod.get("status") or {}).get("phase")}


class Observer:
    """Watches a pool's Nodes (and a namespace's Pods) like any outside client, and records when it
    saw every change of the facts that matter (cordon, Ready, spotguard's phase, deletion)."""

    def __init__(self, api_client: Any, *, pool: str, namespace: str | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.nodes: dict[str, dict[str, Any]] = {}
        self.pods: dict[str, dict[str, Any]] = {}
        self.pod_names: dict[str, str] = {}
        self.changes: list[_Change] = []
        self._changed = asyncio.Event()
        self._watches = [ListWatch(api_client, "/api/v1/nodes", query={"labelSelector": f"{POOL_LABEL}={pool}"},
                                   on_sync=lambda items: self._sync(items, pods=False),
                                   on_event=lambda kind, obj: self._event(kind, obj, pods=False),
                                   name=f"bench-nodes/{pool}", user_agent=USER_AGENT)]
        if namespace is not None:
            self._watches.append(ListWatch(api_client, f"/api/v1/namespaces/{namespace}/pods", query={},
                                           on_sync=lambda items: self._sync(items, pods=True),
                                           on_event=lambda kind, obj: self._event(kind, obj, pods=True),
                                           name=f"bench-pods/{namespace}", user_agent=USER_AGENT))

    async def start(self, timeout: float = 30.0) -> None:
        for watch in self._watches:
            watch.start()
        async with asyncio.timeout(timeout):
            for watch in self._watches:
                await watch.synced.wait()

    async def stop(self) -> None:
        for watch in self._watches:
            await watch.stop()

    def _sync(self, items: list[Obj], *, pods: bool) -> None:
        table = self.pods if pods else self.nodes
        seen = set()
        for obj in items:
            key = obj["metadata"]["uid"] if pods else obj["metadata"]["name"]
            seen.add(key)
            self._apply(key, obj, pods=pods)
        for key in [k for k in table if k not in seen and table[k].get("exists")]:
            self._apply(key, None, pods=pods)

    def _event(self, kind: str, obj: Obj, *, pods: bool) -> None:
        key = obj["metadata"]["uid"] if pods else obj["metadata"]["name"]
        self._apply(key, None if kind == "DELETED" else obj, pods=pods)

    def _apply(self, key: str, obj: Obj | None, *, pods: bool) -> None:
        now = self.clock()
        facts = _pod_facts(obj) if pods else _node_facts(obj)
        table = self.pods if pods else self.nodes
        if pods and obj is not None:
            self.pod_names[key] = obj["metadata"]["name"]
        before = table.get(key, {})
        merged = {**before, **facts}
        for name, value in facts.items():
            if before.get(name, object()) != value:
                self.changes.append(_Change(now, key, name, value))
        table[key] = merged
        self._changed.set()
        self._changed = asyncio.Event()

    def first(self, key: str, field_name: str, value: Any, *, after: float = 0.0) -> float | None:
        """When `key`'s `field_name` was first seen to become `value` at or after `after`."""
        for change in self.changes:
            if change.key == key and change.field == field_name and change.value == value and change.at >= after:
                return change.at
        return None

    async def wait_for(self, predicate: Callable[[Observer], bool], *, timeout: float) -> None:
        async with asyncio.timeout(timeout):
            while not predicate(self):
                await self._changed.wait()

    def pod_uid(self, name: str) -> str | None:
        return next((uid for uid, pod_name in self.pod_names.items() if pod_name == name), None)



"""An emulated node-pool autoscaler: Pending pods that need a pool get a new node in it.

What the cluster autoscaler (or GKE's node auto-provisioning) does after a spot VM is reclaimed:
the evicted pods' replacements cannot be scheduled (the pool's other nodes are full, cordoned or
gone), the scheduler marks them `PodScheduled=False, reason Unschedulable`, and after a provisioning
delay a new VM joins the pool. Here:

- Pools are the values of the node label `sim.spotguard.io/pool`. A pool's template (labels, taints,
  annotations, allocatable) is learned from the first node seen in it, or registered explicitly
  (`PoolTemplate`); a learned pool is remembered after its last node is gone.
- A Pending, unscheduled pod with condition PodScheduled=False/Unschedulable "needs" a pool when an
  empty node made from the template would take it: its nodeSelector and required node affinity
  match the template's labels, it tolerates the template's NoSchedule/NoExecute taints, and its
  requests fit the template's allocatable.
- Pending pods are packed first-fit onto the nodes already on their way (being provisioned, or
  created but not yet Ready and settled) and then onto as few new nodes as they need: one scale-up
  per pending batch, never one node per pod when one node fits several. Required pod anti-affinity
  on `kubernetes.io/hostname` is honoured while packing (one vLLM replica per GPU node).
- After `provisioning_delay` the Node `<pool>-<n>` is created with the pool's labels, taints and
  annotations and no `spec.unschedulable`; the simulated kubelet then makes it Ready.
- As the cluster autoscaler (`--expendable-pods-priority-cutoff`, default -10): a pod whose
  priority is below -10 is expendable and never triggers a scale-up, and neither does a pod the
  scheduler has nominated to a node (it is waiting for lower-priority pods to be preempted
  there). So spotguard's surge placeholders (priority -1) bring a node, and the replacement that
  preempts one does not bring another.
- A pool never grows beyond `max_nodes_per_pool` nodes (provisioning ones included). Pods that fit
  no pool are logged once and ignored, as the real autoscaler's NotTriggerScaleUp.

Each decision is a structlog line, an `AutoscalerEvent` (kept in `events` and passed to the
`on_event` hook, so the demo can print "node added") and, like the real autoscaler, a Kubernetes
Event on the pod (TriggeredScaleUp / NotTriggerScaleUp). Differences from the real autoscaler are
in docs/simulation.md ("Autoscaler emulator").
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import structlog

from spotguard.kube import selector_matches
from spotguard.kubeapi import Api, KubeError, ListWatch, Obj
from spotguard_sim.support import USER_AGENT

log = structlog.get_logger("spotguard_sim.autoscaler")

POOL_LABEL = "sim.spotguard.io/pool"
HOSTNAME_LABEL = "kubernetes.io/hostname"
DEFAULT_PROVISIONING_DELAY = 10.0
DEFAULT_MAX_NODES_PER_POOL = 10
EXPENDABLE_PODS_PRIORITY_CUTOFF = -10  # the cluster autoscaler's default
# Taints that belong to one node's life, not to its pool: never copied into a learned template.
_NODE_STATE_TAINT_PREFIXES = ("node.kubernetes.io/", "node.cloudprovider.kubernetes.io/", "spotguard.io/",
                              "ToBeDeletedByClusterAutoscaler", "DeletionCandidateOfClusterAutoscaler",
                              "cloud.google.com/impending-node-termination", "aws-node-termination-handler/")
# Node annotations copied into a learned template: the simulation's per-pool settings (GPU count),
# not a node's own state (unmanaged by the sim kubelet, reclaim time, spotguard's progress).
_TEMPLATE_ANNOTATION_PREFIX = "sim.spotguard.io/"
_NODE_STATE_ANNOTATIONS = ("sim.spotguard.io/unmanaged", "sim.spotguard.io/reclaim-at")
Clock = Callable[[], float]


# ---------------------------------------------------------------------------------------------
# Pools and what fits where (pure functions over plain API dicts)


@dataclass(frozen=True)
class PoolTemplate:
    """What a new node of the pool looks like. `allocatable` None: resources are not checked."""

    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    taints: tuple[Mapping[str, Any], ...] = ()
    annotations: Mapping[str, str] = field(default_factory=dict)
    allocatable: Mapping[str, str] | None = None
    max_nodes: int | None = None

    def node_labels(self, node_name: str) -> dict[str, str]:
        return {**self.labels, POOL_LABEL: self.name, HOSTNAME_LABEL: node_name}

    def node_object(self, node_name: str) -> Obj:
        metadata: Obj = {"name": node_name, "labels": self.node_labels(node_name)}
        if self.annotations:
            metadata["annotations"] = dict(self.annotations)
        spec: Obj = {}
        if self.taints:
            spec["taints"] = [dict(t) for t in self.taints]
        return {"apiVersion": "v1", "kind": "Node", "metadata": metadata, "spec": spec}

    @classmethod
    def from_node(cls, node: Obj) -> PoolTemplate | None:
        """The template of the node's pool, learned from the node; None if it is in no pool."""
        metadata = node.get("metadata") or {}
        labels = dict(metadata.get("labels") or {})
        pool = labels.get(POOL_LABEL)
        if not pool:
            return None
        labels.pop(HOSTNAME_LABEL, None)
        taints = tuple({k: v for k, v in taint.items() if k != "timeAdded"}
                       for taint in (node.get("spec") or {}).get("taints") or []
                       if not str(taint.get("key", "")).startswith(_NODE_STATE_TAINT_PREFIXES))
        annotations = {k: v for k, v in (metadata.get("annotations") or {}).items()
                       if k.startswith(_TEMPLATE_ANNOTATION_PREFIX) and k not in _NODE_STATE_ANNOTATIONS}
        allocatable = (node.get("status") or {}).get("allocatable") or None
        return cls(name=pool, labels=labels, taints=taints, annotations=annotations, allocatable=allocatable)


def is_unschedulable(pod: Obj) -> bool:
    """Pending, not bound, not being deleted, and the scheduler said Unschedulable; neither
    expendable (priority below the cutoff) nor nominated to a node where it preempts others."""
    metadata, spec, status = pod.get("metadata") or {}, pod.get("spec") or {}, pod.get("status") or {}
    if metadata.get("deletionTimestamp") or spec.get("nodeName") or status.get("phase", "Pending") != "Pending":
        return False
    if int(spec.get("priority") or 0) < EXPENDABLE_PODS_PRIORITY_CUTOFF or status.get("nominatedNodeName"):
        return False
    return any(c.get("type") == "PodScheduled" and c.get("status") == "False" and c.get("reason") == "Unschedulable"
               for c in status.get("conditions") or [])


def node_selector_term_matches(term: Obj, labels: Mapping[str, str], node_name: str) -> bool:
    """One NodeSelectorTerm (its expressions ANDed); an empty term matches nothing, as upstream."""
    expressions = term.get("matchExpressions") or []
    fields = term.get("matchFields") or []
    if not expressions and not fields:
        return False
    for expression in expressions:
        if not _requirement_matches(expression, labels.get(expression.get("key", "")),
                                    expression.get("key", "") in labels):
            return False
    for expression in fields:
        if expression.get("key") != "metadata.name":
            return False
        if not _requirement_matches(expression, node_name, True):
            return False
    return True


def _requirement_matches(expression: Obj, value: str | None, present: bool) -> bool:
    operator, values = expression.get("operator"), expression.get("values") or []
    if operator == "In":
        return present and value in values
    if operator == "NotIn":
        return not present or value not in values
    if operator == "Exists":
        return present
    if operator == "DoesNotExist":
        return not present
    if operator in ("Gt", "Lt") and present and len(values) == 1:
        try:
            have, want = int(str(value)), int(values[0])
        except ValueError:
            return False
        return have > want if operator == "Gt" else have < want
    return False


def node_affinity_matches(pod: Obj, labels: Mapping[str, str], node_name: str) -> bool:
    """nodeSelector AND requiredDuringSchedulingIgnoredDuringExecution (its terms ORed)."""
    spec = pod.get("spec") or {}
    for key, value in (spec.get("nodeSelector") or {}).items():
        if labels.get(key) != value:
            return False
    required = (((spec.get("affinity") or {}).get("nodeAffinity") or {})
                .get("requiredDuringSchedulingIgnoredDuringExecution"))
    if required is None:
        return True
    return any(node_selector_term_matches(term, labels, node_name)
               for term in required.get("nodeSelectorTerms") or [])


def tolerates(tolerations: Iterable[Obj], taint: Mapping[str, Any]) -> bool:
    """v1 toleration semantics for one taint."""
    for toleration in tolerations:
        effect = toleration.get("effect") or ""
        if effect and effect != taint.get("effect"):
            continue
        key = toleration.get("key") or ""
        operator = toleration.get("operator") or "Equal"
        if not key:
            if operator == "Exists":
                return True
            continue
        if key != taint.get("key"):
            continue
        if operator == "Exists" or (toleration.get("value") or "") == (taint.get("value") or ""):
            return True
    return False


def pod_requests(pod: Obj) -> dict[str, float]:
    """Resource requests of the pod (containers summed, init containers as a max; limits stand in
    for missing requests), in base units; plus 1 "pods"."""
    from kubernetes.utils import parse_quantity

    def of(container: Obj) -> dict[str, float]:
        resources = container.get("resources") or {}
        merged = {**(resources.get("limits") or {}), **(resources.get("requests") or {})}
        return {name: float(parse_quantity(str(quantity))) for name, quantity in merged.items()}

    spec = pod.get("spec") or {}
    total: dict[str, float] = {}
    for container in spec.get("containers") or []:
        for name, amount in of(container).items():
            total[name] = total.get(name, 0.0) + amount
    for container in spec.get("initContainers") or []:
        for name, amount in of(container).items():
            total[name] = max(total.get(name, 0.0), amount)
    total["pods"] = 1.0
    return total


def _allocatable(template: PoolTemplate) -> dict[str, float] | None:
    from kubernetes.utils import parse_quantity

    if template.allocatable is None:
        return None
    return {name: float(parse_quantity(str(quantity))) for name, quantity in template.allocatable.items()}


def fits_pool(pod: Obj, template: PoolTemplate) -> bool:
    """Would an empty node made from the template take this pod?"""
    probe_name = f"{template.name}-new"
    if not node_affinity_matches(pod, template.node_labels(probe_name), probe_name):
        return False
    tolerations = (pod.get("spec") or {}).get("tolerations") or []
    if any(t.get("effect") in ("NoSchedule", "NoExecute") and not tolerates(tolerations, t)
           for t in template.taints):
        return False
    allocatable = _allocatable(template)
    if allocatable is None:
        return True
    return all(amount <= allocatable.get(name, 0.0) for name, amount in pod_requests(pod).items()
               if amount > 0 and (name in allocatable or name != "pods"))


def _anti_affinity_terms(pod: Obj) -> list[Obj]:
    affinity = (pod.get("spec") or {}).get("affinity") or {}
    terms = (affinity.get("podAntiAffinity") or {}).get("requiredDuringSchedulingIgnoredDuringExecution") or []
    return [t for t in terms if t.get("topologyKey") == HOSTNAME_LABEL]


def _term_selects(term: Obj, owner: Obj, other: Obj) -> bool:
    owner_namespace = (owner.get("metadata") or {}).get("namespace")
    other_metadata = other.get("metadata") or {}
    namespaces = term.get("namespaces") or ([] if term.get("namespaceSelector") is not None else [owner_namespace])
    if namespaces and other_metadata.get("namespace") not in namespaces:
        return False
    return selector_matches(term.get("labelSelector"), other_metadata.get("labels") or {})


def anti_affinity_conflict(pod: Obj, others: Iterable[Obj]) -> bool:
    """Would `pod` and any of `others` violate a required hostname anti-affinity on one node?"""
    for other in others:
        if any(_term_selects(term, pod, other) for term in _anti_affinity_terms(pod)):
            return True
        if any(_term_selects(term, other, pod) for term in _anti_affinity_terms(other)):
            return True
    return False


@dataclass
class _Bin:
    """A node on its way (or planned in this round) and the pending pods packed onto it."""

    pool: str
    free: dict[str, float] | None
    pods: list[Obj] = field(default_factory=list)

    def take(self, pod: Obj) -> bool:
        requests = pod_requests(pod)
        if self.free is not None and any(amount > self.free.get(name, 0.0)
                                         for name, amount in requests.items() if amount > 0):
            return False
        if anti_affinity_conflict(pod, self.pods):
            return False
        if self.free is not None:
            for name, amount in requests.items():
                if name in self.free:
                    self.free[name] -= amount
        self.pods.append(pod)
        return True


def _pod_key(pod: Obj) -> str:
    metadata = pod.get("metadata") or {}
    return f"{metadata.get('namespace')}/{metadata.get('name')}"


# ---------------------------------------------------------------------------------------------
# The emulator


@dataclass(frozen=True)
class AutoscalerEvent:
    """One decision. kind: scale_up (a node is being provisioned), node_added, scale_up_failed,
    pool_at_max (pods need a pool already at its maximum), no_pool (a pod fits no pool)."""

    at: float
    kind: str
    pool: str | None
    node: str | None
    pods: tuple[str, ...]
    message: str


@dataclass
class _Provisioning:
    pool: str
    node: str
    pods: tuple[str, ...]
    ready_at: float
    task: asyncio.Task[None] | None = None


class AutoscalerEmulator:
    """Watches pods and nodes; adds a node to a pool after `provisioning_delay` when pods need it.

    `start()` (or `async with`) begins; `stop()` ends the watches and cancels scale-ups still
    waiting out their delay (no node is created after stop).
    """

    def __init__(self, api_client: Any, *, provisioning_delay: float = DEFAULT_PROVISIONING_DELAY,
                 max_nodes_per_pool: int = DEFAULT_MAX_NODES_PER_POOL, pools: Iterable[PoolTemplate] = (),
                 learn_pools: bool = True, namespace: str | None = None, batch_window: float = 0.2,
                 settle_seconds: float = 5.0, pod_events: bool = True, clock: Clock = time.time,
                 on_event: Callable[[AutoscalerEvent], None] | None = None) -> None:
        if provisioning_delay < 0 or max_nodes_per_pool < 0 or batch_window < 0 or settle_seconds < 0:
            raise ValueError("delays, windows and the node maximum must not be negative")
        self.provisioning_delay = provisioning_delay
        self.max_nodes_per_pool = max_nodes_per_pool
        self.learn_pools = learn_pools
        self.namespace = namespace
        self.batch_window = batch_window
        self.settle_seconds = settle_seconds
        self.pod_events = pod_events
        self.clock = clock
        self.on_event = on_event
        self.events: list[AutoscalerEvent] = []
        self.nodes_added: list[str] = []
        self._kube = Api(api_client, user_agent=USER_AGENT)
        self._pools: dict[str, PoolTemplate] = {}
        self._explicit: set[str] = set()
        for template in pools:
            self.register_pool(template)
        self._nodes: dict[str, Obj] = {}
        self._pods: dict[str, Obj] = {}
        self._provisioning: dict[str, _Provisioning] = {}
        self._created_at: dict[str, float] = {}  # node name -> when we created it (monotonic)
        self._used_numbers: dict[str, set[int]] = {}
        self._reported: set[tuple[str, str]] = set()  # (pod uid, kind) already logged
        self._wake = asyncio.Event()
        self._changed = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        pods_path = f"/api/v1/namespaces/{namespace}/pods" if namespace else "/api/v1/pods"
        self._watches = [
            ListWatch(api_client, "/api/v1/nodes", query={"labelSelector": POOL_LABEL},
                      on_sync=self._nodes_synced, on_event=self._node_event, name="autoscaler-nodes", user_agent=USER_AGENT),
            # Only pods not bound to a node: what the scheduler could not place.
            ListWatch(api_client, pods_path, query={"fieldSelector": "spec.nodeName="},
                      on_sync=self._pods_synced, on_event=self._pod_event, name="autoscaler-pods", user_agent=USER_AGENT),
        ]

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> AutoscalerEmulator:
        self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.stop()

    def start(self) -> None:
        for watch in self._watches:
            watch.start()
        self._loop_task = asyncio.create_task(self._run(), name="autoscaler")
        log.info("autoscaler_started", provisioning_delay_s=self.provisioning_delay,
                 max_nodes_per_pool=self.max_nodes_per_pool, pools=sorted(self._pools))

    async def stop(self) -> None:
        tasks = [t for t in [self._loop_task, *self._background,
                             *(p.task for p in self._provisioning.values())] if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for watch in self._watches:
            await watch.stop()
        log.info("autoscaler_stopped", nodes_added=self.nodes_added)

    async def wait_synced(self, timeout: float = 30.0) -> None:
        async with asyncio.timeout(timeout):
            for watch in self._watches:
                await watch.synced.wait()

    async def wait_for(self, predicate: Callable[[AutoscalerEmulator], bool], *, timeout: float) -> None:
        """Until `predicate(emulator)` holds (checked now and after every decision)."""
        async with asyncio.timeout(timeout):
            while not predicate(self):
                changed = self._changed
                await changed.wait()

    def register_pool(self, template: PoolTemplate) -> None:
        """Make a pool known (even with no node yet); explicit templates win over learned ones."""
        self._pools[template.name] = template
        self._explicit.add(template.name)

    @property
    def pools(self) -> dict[str, PoolTemplate]:
        return dict(self._pools)

    @property
    def provisioning(self) -> list[tuple[str, str]]:
        """(pool, node) of the scale-ups waiting out their provisioning delay."""
        return [(p.pool, p.node) for p in self._provisioning.values()]

    # -- what the watches saw ----------------------------------------------------------------

    def _nodes_synced(self, items: list[Obj]) -> None:
        self._nodes = {}
        for node in items:
            self._node_event("ADDED", node)

    def _node_event(self, kind: str, node: Obj) -> None:
        name = node["metadata"]["name"]
        if kind == "DELETED":
            self._nodes.pop(name, None)
        else:
            self._nodes[name] = node
            template = PoolTemplate.from_node(node)
            if template is not None:
                self._note_number(template.name, name)
                known = self._pools.get(template.name)
                if known is not None and template.name not in self._explicit and known.allocatable is None \
                        and template.allocatable is not None:
                    # Learned before the kubelet reported the node's allocatable: learn it now.
                    self._pools[template.name] = template
                elif self.learn_pools and known is None:
                    self._pools[template.name] = template
                    log.info("pool_learned", pool=template.name, from_node=name, labels=dict(template.labels),
                             taints=[t.get("key") for t in template.taints])
        self._wake.set()

    def _pods_synced(self, items: list[Obj]) -> None:
        self._pods = {pod["metadata"]["uid"]: pod for pod in items}
        self._wake.set()

    def _pod_event(self, kind: str, pod: Obj) -> None:
        uid = pod["metadata"]["uid"]
        if kind == "DELETED":
            self._pods.pop(uid, None)
        else:
            self._pods[uid] = pod
        self._wake.set()

    # -- deciding ----------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            try:
                # A periodic look as well: a node we added may settle without any event.
                async with asyncio.timeout(1.0):
                    await self._wake.wait()
            except TimeoutError:
                pass
            else:
                # Pods evicted together arrive over a few hundred ms: decide on the whole batch.
                await asyncio.sleep(self.batch_window)
            self._wake.clear()
            try:
                self._reconcile()
            except Exception:  # noqa: BLE001 - one bad object must not end the emulator
                log.exception("autoscaler_reconcile_failed")

    def _reconcile(self) -> None:
        pending = sorted((p for p in self._pods.values() if is_unschedulable(p)),
                         key=lambda p: (p["metadata"].get("creationTimestamp", ""), _pod_key(p)))
        if not pending:
            return
        # Capacity already on its way: nodes being provisioned, and nodes we created that are not
        # yet Ready (or Ready for less than settle_seconds: the scheduler has not retried yet).
        bins: dict[str, list[_Bin]] = {}
        for provisioning in self._provisioning.values():
            bins.setdefault(provisioning.pool, []).append(self._bin(provisioning.pool))
        for name in self._upcoming_nodes():
            pool = (self._nodes[name]["metadata"].get("labels") or {}).get(POOL_LABEL)
            if pool in self._pools:
                bins.setdefault(pool, []).append(self._bin(pool))
        upcoming = {pool: len(found) for pool, found in bins.items()}
        new_bins: dict[str, list[_Bin]] = {}
        at_max: dict[str, list[Obj]] = {}
        for pod in pending:
            candidates = [name for name in sorted(self._pools) if fits_pool(pod, self._pools[name])]
            if not candidates:
                self._report_once(pod, "no_pool", None, "fits no node pool (node selector, affinity, "
                                  "taints or resources)")
                continue
            if any(b.take(pod) for name in candidates for b in bins.get(name, [])):
                continue  # a node on its way will take it
            if any(b.take(pod) for name in candidates for b in new_bins.get(name, [])):
                continue  # packed with another pod of this batch
            for name in candidates:
                if self._node_count(name) + len(new_bins.get(name, [])) < self._max_nodes(name):
                    fresh = self._bin(name)
                    if fresh.take(pod):
                        new_bins.setdefault(name, []).append(fresh)
                        break
            else:
                at_max.setdefault(candidates[0], []).append(pod)
        for pool, pods in at_max.items():
            for pod in pods:
                self._report_once(pod, "pool_at_max", pool,
                                  f"pool {pool} is at its maximum of {self._max_nodes(pool)} nodes")
        for pool, planned in new_bins.items():
            for one in planned:
                self._scale_up(pool, one.pods, before=self._node_count(pool), upcoming=upcoming.get(pool, 0))

    def _bin(self, pool: str) -> _Bin:
        return _Bin(pool=pool, free=_allocatable(self._pools[pool]))

    def _upcoming_nodes(self) -> list[str]:
        now = time.monotonic()
        found = []
        for name, created in self._created_at.items():
            node = self._nodes.get(name)
            if node is None or node["metadata"].get("deletionTimestamp"):
                continue
            ready_since = _ready_since(node)
            # Not Ready yet, or Ready too recently for the scheduler to have placed its pods.
            if ready_since is None or now - created < self.settle_seconds or \
                    time.time() - ready_since < self.settle_seconds:
                found.append(name)
        return found

    def _node_count(self, pool: str) -> int:
        existing = sum(1 for node in self._nodes.values()
                       if (node["metadata"].get("labels") or {}).get(POOL_LABEL) == pool
                       and not node["metadata"].get("deletionTimestamp"))
        return existing + sum(1 for p in self._provisioning.values() if p.pool == pool)

    def _max_nodes(self, pool: str) -> int:
        template = self._pools[pool]
        return template.max_nodes if template.max_nodes is not None else self.max_nodes_per_pool

    def _note_number(self, pool: str, node_name: str) -> None:
        match = re.fullmatch(re.escape(pool) + r"-(\d+)", node_name)
        if match:
            self._used_numbers.setdefault(pool, set()).add(int(match.group(1)))

    def _next_name(self, pool: str) -> str:
        used = self._used_numbers.setdefault(pool, set())
        number = max(used, default=0) + 1
        used.add(number)
        return f"{pool}-{number}"

    # -- acting ------------------------------------------------------------------------------

    def _scale_up(self, pool: str, pods: list[Obj], *, before: int, upcoming: int) -> None:
        node = self._next_name(pool)
        names = tuple(_pod_key(p) for p in pods)
        provisioning = _Provisioning(pool=pool, node=node, pods=names,
                                     ready_at=self.clock() + self.provisioning_delay)
        self._provisioning[node] = provisioning
        message = (f"pool {pool}: {before} -> {before + 1} nodes (max {self._max_nodes(pool)}), node {node} "
                   f"in {self.provisioning_delay:g} s for {len(pods)} pending pod(s)")
        log.info("scale_up", pool=pool, node=node, pods=list(names), nodes_before=before,
                 already_upcoming=upcoming, provisioning_delay_s=self.provisioning_delay)
        self._emit("scale_up", pool, node, names, message)
        for pod in pods:
            self._pod_event_later(pod, "TriggeredScaleUp", "Normal",
                                  f"pod triggered scale-up: [{{{pool} {before}->{before + 1} "
                                  f"(max: {self._max_nodes(pool)})}}]")
        provisioning.task = asyncio.create_task(self._provision(provisioning), name=f"provision-{node}")

    async def _provision(self, provisioning: _Provisioning) -> None:
        try:
            await asyncio.sleep(self.provisioning_delay)
            template = self._pools[provisioning.pool]
            node = provisioning.node
            for _ in range(5):
                try:
                    await asyncio.to_thread(self._kube.call, "POST", "/api/v1/nodes",
                                            body=template.node_object(node))
                    break
                except KubeError as error:
                    if error.status != 409:
                        raise
                    taken = node
                    node = self._next_name(provisioning.pool)
                    log.info("node_name_taken", taken=taken, trying=node)
            else:
                raise KubeError(409, f"no free node name in pool {provisioning.pool}")
            self._created_at[node] = time.monotonic()
            self.nodes_added.append(node)
            log.info("node_added", pool=provisioning.pool, node=node, pods=list(provisioning.pods))
            self._emit("node_added", provisioning.pool, node, provisioning.pods,
                       f"node {node} added to pool {provisioning.pool}")
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001 - report it; the next round may try again
            log.warning("scale_up_failed", pool=provisioning.pool, node=provisioning.node, error=str(error))
            self._emit("scale_up_failed", provisioning.pool, provisioning.node, provisioning.pods, str(error))
        finally:
            self._provisioning.pop(provisioning.node, None)
            self._wake.set()

    def _report_once(self, pod: Obj, kind: str, pool: str | None, why: str) -> None:
        uid = pod["metadata"]["uid"]
        if (uid, kind) in self._reported:
            return
        self._reported.add((uid, kind))
        key = _pod_key(pod)
        log.info("pod_not_scaled_for", pod=key, kind=kind, pool=pool, why=why)
        self._emit(kind, pool, None, (key,), f"{key}: {why}")
        self._pod_event_later(pod, "NotTriggerScaleUp", "Normal", f"pod didn't trigger scale-up: {why}")

    def _emit(self, kind: str, pool: str | None, node: str | None, pods: tuple[str, ...], message: str) -> None:
        event = AutoscalerEvent(at=self.clock(), kind=kind, pool=pool, node=node, pods=pods, message=message)
        self.events.append(event)
        if self.on_event is not None:
            try:
                self.on_event(event)
            except Exception:  # noqa: BLE001 - a display hook must not stop the autoscaler
                log.exception("autoscaler_hook_failed", kind=kind)
        self._changed.set()
        self._changed = asyncio.Event()

    def _pod_event_later(self, pod: Obj, reason: str, kind: str, message: str) -> None:
        if not self.pod_events:
            return
        task = asyncio.create_task(asyncio.to_thread(self._post_pod_event, pod, reason, kind, message))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _post_pod_event(self, pod: Obj, reason: str, kind: str, message: str) -> None:
        metadata = pod["metadata"]
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        event = {"metadata": {"generateName": f"{metadata['name']}.", "namespace": metadata["namespace"]},
                 "involvedObject": {"kind": "Pod", "apiVersion": "v1", "namespace": metadata["namespace"],
                                    "name": metadata["name"], "uid": metadata["uid"]},
                 "reason": reason, "message": message[:1024], "type": kind,
                 "source": {"component": "cluster-autoscaler"}, "reportingComponent": "cluster-autoscaler",
                 "reportingInstance": "spotguard-sim", "firstTimestamp": now, "lastTimestamp": now, "count": 1}
        try:
            self._kube.call("POST", f"/api/v1/namespaces/{metadata['namespace']}/events", body=event)
        except (KubeError, OSError) as error:
            log.debug("pod_event_failed", pod=_pod_key(pod), error=str(error))


def _ready_since(node: Obj) -> float | None:
    """Wall-clock time the node became Ready, None when not Ready (or not yet reported)."""
    for condition in (node.get("status") or {}).get("conditions") or []:
        if condition.get("type") == "Ready":
            if condition.get("status") != "True":
                return None
            from datetime import datetime

            stamp = condition.get("lastTransitionTime")
            try:
                return datetime.fromisoformat(str(stamp).replace("Z", "+00:00")).timestamp()
            except ValueError:
                return 0.0
    return None


# ---------------------------------------------------------------------------------------------
# `spotguard-sim autoscaler`


def add_autoscaler_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `spotguard-sim autoscaler`."""
    parser.add_argument("--kubeconfig", type=Path, default=None,
                        help="kubeconfig of the cluster (default: $KUBECONFIG)")
    parser.add_argument("--provisioning-delay", type=float, default=DEFAULT_PROVISIONING_DELAY,
                        help=f"seconds from scale-up decision to the new Node (default {DEFAULT_PROVISIONING_DELAY:g})")
    parser.add_argument("--max-nodes", type=int, default=DEFAULT_MAX_NODES_PER_POOL,
                        help=f"most nodes per pool, provisioning ones included (default {DEFAULT_MAX_NODES_PER_POOL})")
    parser.add_argument("--namespace", default=None, help="only pods of this namespace (default: all)")
    parser.add_argument("--pool", action="append", default=[], metavar="NAME[:KEY=VALUE,...]",
                        help="a pool known before any of its nodes exists, with the labels its nodes get "
                             "(repeatable); pools are also learned from nodes labelled " + POOL_LABEL)
    parser.add_argument("--pool-taint", action="append", default=[], metavar="NAME:KEY[=VALUE]:EFFECT",
                        help="a taint the nodes of an explicit pool get (repeatable)")
    parser.add_argument("--duration", type=float, default=None,
                        help="stop after this many seconds (default: run until SIGINT/SIGTERM)")


def parse_pool_specs(pools: Iterable[str], taints: Iterable[str]) -> list[PoolTemplate]:
    """--pool and --pool-taint values -> templates; ValueError with the bad value."""
    labels: dict[str, dict[str, str]] = {}
    for spec in pools:
        name, _, rest = spec.partition(":")
        if not name:
            raise ValueError(f"--pool needs a NAME, got {spec!r}")
        found = labels.setdefault(name, {})
        for pair in filter(None, rest.split(",")):
            key, sep, value = pair.partition("=")
            if not sep or not key:
                raise ValueError(f"--pool labels are KEY=VALUE, got {pair!r} in {spec!r}")
            found[key] = value
    taint_lists: dict[str, list[dict[str, str]]] = {}
    for spec in taints:
        parts = spec.split(":")
        if len(parts) != 3 or parts[0] not in labels or parts[2] not in ("NoSchedule", "PreferNoSchedule",
                                                                          "NoExecute"):
            raise ValueError(f"--pool-taint is NAME:KEY[=VALUE]:EFFECT for a --pool NAME, got {spec!r}")
        key, _, value = parts[1].partition("=")
        taint = {"key": key, "effect": parts[2], **({"value": value} if value else {})}
        taint_lists.setdefault(parts[0], []).append(taint)
    return [PoolTemplate(name=name, labels=found, taints=tuple(taint_lists.get(name, [])))
            for name, found in labels.items()]


def run_autoscaler_from_args(args: argparse.Namespace) -> int:
    """0 after a clean stop, 2 on bad flags, 1 on errors."""
    from spotguard.observability import configure_logging

    configure_logging(level="info")
    kubeconfig = args.kubeconfig or (Path(os.environ["KUBECONFIG"]) if os.environ.get("KUBECONFIG") else None)
    if kubeconfig is None:
        print("spotguard-sim autoscaler: give --kubeconfig or set KUBECONFIG", file=sys.stderr)
        return 2
    try:
        pools = parse_pool_specs(args.pool, args.pool_taint)
        run_autoscaler(kubeconfig=kubeconfig, provisioning_delay=args.provisioning_delay,
                       max_nodes_per_pool=args.max_nodes, namespace=args.namespace, pools=pools,
                       duration=args.duration)
    except ValueError as error:
        print(f"spotguard-sim autoscaler: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"spotguard-sim autoscaler: error: {error}", file=sys.stderr)
        return 1
    return 0


def run_autoscaler(*, kubeconfig: Path, provisioning_delay: float = DEFAULT_PROVISIONING_DELAY,
                   max_nodes_per_pool: int = DEFAULT_MAX_NODES_PER_POOL, namespace: str | None = None,
                   pools: Iterable[PoolTemplate] = (), duration: float | None = None) -> list[AutoscalerEvent]:
    """Run the emulator until SIGINT/SIGTERM (or `duration`); returns its decisions."""
    from kubernetes import config

    if not Path(kubeconfig).exists():
        raise OSError(f"kubeconfig {kubeconfig} does not exist (is the cluster up?)")
    api_client = config.new_client_from_config(config_file=str(kubeconfig))
    try:
        return asyncio.run(_run_autoscaler(api_client, provisioning_delay=provisioning_delay,
                                           max_nodes_per_pool=max_nodes_per_pool, namespace=namespace,
                                           pools=list(pools), duration=duration))
    finally:
        api_client.close()


async def _run_autoscaler(api_client: Any, *, provisioning_delay: float, max_nodes_per_pool: int,
                          namespace: str | None, pools: list[PoolTemplate],
                          duration: float | None) -> list[AutoscalerEvent]:
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    emulator = AutoscalerEmulator(api_client, provisioning_delay=provisioning_delay,
                                  max_nodes_per_pool=max_nodes_per_pool, namespace=namespace, pools=pools)
    try:
        async with emulator:
            try:
                async with asyncio.timeout(duration):
                    await stopping.wait()
            except TimeoutError:
                pass
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
    return emulator.events

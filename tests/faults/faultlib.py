"""Helpers for the fault-injection tests: probes that watch a daemon from outside, a /metrics server
that misbehaves on purpose, a router that records what users' requests saw, and small readers of
what the API server and the daemon hold.

Everything that polls runs in a thread of its own (or in the test's event loop without blocking
it): the GCE metadata emulators live in the test's loop, so a test that blocked the loop would
stall the very server it is faulting.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

from spotguard_sim.router import (
    DurationDistribution,
    Endpoint,
    EndpointTracker,
    LoadGenerator,
    Outcome,
    RequestRecord,
    StaticEndpoints,
)
from spotguard_sim.support import metric_value, wait_until
from spotguard_sim.world import DaemonProcess, World

from spotguard.kube import Obj

SERVING = "spotguard.io/serving"
TAINT = "spotguard.io/impending-termination"


def node_name() -> str:
    return f"gpu-{uuid.uuid4().hex[:8]}"


async def in_thread(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run a blocking call (API reads, wait_until) off the loop the emulators serve from."""
    return await asyncio.to_thread(function, *args, **kwargs)


async def wait_for(check: Callable[[], Any], *, timeout: float, what: str, interval: float = 0.1) -> Any:
    return await in_thread(wait_until, check, timeout=timeout, interval=interval, what=what)


# ---------------------------------------------------------------------------------------------
# What the API server holds


def condition(obj: Obj, kind: str) -> str | None:
    return next((c["status"] for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == kind), None)


def get_pod(world: World, name: str) -> Obj | None:
    """The pod, or None once the API server no longer has it."""
    pods = world.api.call("GET", f"/api/v1/namespaces/{world.namespace}/pods",
                          query={"fieldSelector": f"metadata.name={name}"})["items"]
    return pods[0] if pods else None


def pod_gone_or_terminating(world: World, name: str) -> bool:
    pod = get_pod(world, name)
    return pod is None or bool(pod["metadata"].get("deletionTimestamp"))


def events(world: World, reason: str, involved: str) -> list[Obj]:
    return [e for e in world.events(reason=reason) if e["involvedObject"]["name"] == involved]


def spotguard_taints(node: Obj) -> list[Obj]:
    return [t for t in (node.get("spec") or {}).get("taints") or [] if t.get("key") == TAINT]


def annotations(obj: Obj) -> dict[str, str]:
    return (obj.get("metadata") or {}).get("annotations") or {}


def phase(world: World, node: str) -> str | None:
    return annotations(world.node(node)).get("spotguard.io/phase")


def deregistered(world: World, node: str, pod: str) -> bool:
    """The reaction spotguard promises: node cordoned and tainted, the serving pod not-ready."""
    held, current = world.node(node), get_pod(world, pod)
    return bool(held["spec"].get("unschedulable")) and bool(spotguard_taints(held)) and current is not None \
        and condition(current, SERVING) == "False" and condition(current, "Ready") == "False"


def serving_pod(world: World, name: str, *, node: str, vllm_args: str = "", grace_seconds: int = 30) -> Obj:
    """A bare serving Pod (readiness gate, fake vLLM) bound to `node`, and a Service for it."""
    labels = {"app": name}
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "labels": labels,
                        "annotations": {"sim.spotguard.io/fake-vllm": "true",
                                        "sim.spotguard.io/fake-vllm-args": vllm_args,
                                        "spotguard.io/metrics-port": "8000"}},
           "spec": {"nodeName": node, "terminationGracePeriodSeconds": grace_seconds,
                    "readinessGates": [{"conditionType": SERVING}],
                    "containers": [{"name": "vllm", "image": "vllm/vllm-openai:v0.11.0",
                                    "ports": [{"name": "http", "containerPort": 8000}],
                                    # Ready when the server answers, not when its process starts.
                                    "readinessProbe": {"httpGet": {"path": "/health", "port": 8000},
                                                       "periodSeconds": 1}}]}}
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
               "spec": {"selector": labels, "ports": [{"name": "http", "port": 8000, "targetPort": 8000}]}}
    world.api.call("POST", f"/api/v1/namespaces/{world.namespace}/services", body=service)
    return world.api.call("POST", f"/api/v1/namespaces/{world.namespace}/pods", body=pod)


def apiserver_metric(world: World, name: str, **labels: str) -> float:
    """A series from the API server's own /metrics (the admin kubeconfig may read it)."""
    response = world.api._open("GET", "/metrics")  # not JSON, so not Kube.call
    return metric(response.read().decode(), name, **labels)


# ---------------------------------------------------------------------------------------------
# What the daemon says


metric = metric_value  # the one reader of Prometheus text (spotguard_sim.world)


def log_lines(daemon: DaemonProcess) -> list[dict[str, Any]]:
    """The daemon's JSON log lines (lines that are not JSON, like a traceback, are kept as text)."""
    lines = []
    for raw in Path(daemon.log_path).read_text(errors="replace").splitlines():
        try:
            lines.append(json.loads(raw))
        except ValueError:
            lines.append({"event": "(not json)", "text": raw})
    return lines


def logged(daemon: DaemonProcess, event: str, **fields: Any) -> list[dict[str, Any]]:
    return [line for line in log_lines(daemon)
            if line.get("event") == event and all(line.get(k) == v for k, v in fields.items())]


@dataclass
class Sample:
    at: float  # monotonic
    healthz: int | None  # HTTP status, None when nothing answered
    readyz: int | None
    running: bool  # the daemon process had not exited


@dataclass
class HealthProbe:
    """Polls a daemon's /healthz and /readyz from a thread, as the kubelet's probes would, and notes
    whether the process is still the one that was started. Use as a context manager."""

    daemon: DaemonProcess
    interval: float = 0.25
    samples: list[Sample] = field(default_factory=list)

    def __post_init__(self) -> None:
        assert self.daemon.process is not None
        self.pid = self.daemon.process.pid
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="health-probe", daemon=True)

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _status(self, path: str) -> int | None:
        try:
            with urllib.request.urlopen(f"{self.daemon.url}{path}", timeout=2) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code
        except OSError:
            return None

    def _run(self) -> None:
        while not self._stop.is_set():
            process = self.daemon.process
            running = process is not None and process.pid == self.pid and process.poll() is None
            self.samples.append(Sample(at=time.monotonic(), healthz=self._status("/healthz"),
                                       readyz=self._status("/readyz"), running=running))
            self._stop.wait(self.interval)

    def between(self, start: float, end: float) -> list[Sample]:
        return [s for s in self.samples if start <= s.at <= end]


# ---------------------------------------------------------------------------------------------
# A vLLM /metrics that misbehaves


class BadMetricsServer:
    """Serves on a pod's IP where spotguard looks for vLLM's /metrics, and answers badly:
    `slow` holds every request (longer than any scrape timeout) before answering, `garbage`
    answers 200 with bytes that are not Prometheus text. Threads of its own; `close()` stops it."""

    GARBAGE = b"\x00\xff\xfe<html>\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4

    def __init__(self, host: str, port: int, *, mode: str, hold_seconds: float = 30.0) -> None:
        if mode not in ("slow", "garbage"):
            raise ValueError(mode)
        stop = threading.Event()
        self._stop = stop
        self.requests = 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                owner.requests += 1
                if mode == "slow":
                    stop.wait(hold_seconds)
                    body = b"# too late\n"
                else:
                    body = BadMetricsServer.GARBAGE
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "text/plain; version=0.0.4")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:
                    pass  # the scraper gave up first

            def log_message(self, *_: Any) -> None:
                pass

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="bad-metrics", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


# ---------------------------------------------------------------------------------------------
# Users' traffic


class Traffic:
    """A Service-following router (EndpointTracker) and a load generator sending through it; every
    request's outcome is recorded. `pinned(endpoint)` gives a second generator sending to one pod
    whatever its readiness (to hold a request in flight on the pod being drained).
    Use `async with Traffic(world, service) as traffic:`."""

    def __init__(self, world: World, service: str = "vllm", *, rate: float = 2.0, duration: float = 0.0,
                 durations: DurationDistribution = DurationDistribution(median_s=1.5, sigma=0.5, min_s=0.5,
                                                                        max_s=6.0)) -> None:
        self.world = world
        self.service = service
        self.tracker = EndpointTracker(world.api_client, namespace=world.namespace, service=service)
        self.generator = LoadGenerator(self.tracker, rate=rate, duration=duration, durations=durations,
                                       token_interval=0.1, seed=5)
        self._pinned: list[LoadGenerator] = []

    async def __aenter__(self) -> Traffic:
        self.tracker.start()
        await self.tracker.wait_synced()
        return self

    async def __aexit__(self, *_: object) -> None:
        try:
            for generator in (self.generator, *self._pinned):
                await generator.stop(drain=True, timeout=15)
        finally:
            await self.tracker.stop()

    async def wait_ready(self, count: int, timeout: float = 60) -> None:
        await self.world.wait_routable(self.tracker, count, service=self.service, timeout=timeout)

    def pinned(self, pod: Obj) -> LoadGenerator:
        endpoint = Endpoint(address=pod["status"]["podIP"], port=8000, pod=pod["metadata"]["name"])
        generator = LoadGenerator(StaticEndpoints([endpoint]), rate=1.0, duration=0.0, token_interval=0.1)
        self._pinned.append(generator)
        return generator

    @property
    def records(self) -> list[RequestRecord]:
        return [r for g in (self.generator, *self._pinned) for r in g.records]

    def outcomes(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for record in self.records:
            key = record.outcome.value if record.outcome else "unfinished"
            counts[key] = counts.get(key, 0) + 1
        return counts

    def lost(self, budget_s: float) -> list[RequestRecord]:
        """Aborted or refused requests that were short enough for a correct drain to save."""
        return [r for r in self.records if r.outcome in (Outcome.ABORTED, Outcome.REFUSED)
                and r.intended_s <= budget_s]

"""The simulated kubelet: one process that plays the kubelet of every Node in the local cluster.

There is no container runtime here (no Docker, no containerd), so this process does what a kubelet
shows the API server, and nothing a container would need:
- Nodes (all of them, except those annotated `sim.spotguard.io/unmanaged: "true"`): Ready and the
  pressure conditions, capacity (plus `nvidia.com/gpu` from `sim.spotguard.io/gpus`), nodeInfo,
  addresses, a Lease in kube-node-lease renewed every 10 s, status re-posted on change or every 60 s.
- Pods bound to those nodes: Running with a unique pod IP in 127.0.0.0/8 (Linux routes all of it to
  loopback, so a process here can serve on it), the kubelet's conditions and containerStatuses, and
  Ready computed as the kubelet's status manager does: every container ready AND every readiness
  gate condition True, re-evaluated whenever somebody changes a condition.
- Pods annotated `sim.spotguard.io/fake-vllm: "true"` get a real process, the fake vLLM
  (`python -m spotguard.sim.fake_vllm --listen <podIP>:<port>`); its container is ready while
  `GET /health` answers 200. Other pods only get status, as kwok would.
- Deletion runs the kubelet's termination sequence (preStop, SIGTERM, grace period, SIGKILL, terminal
  status, then the object is deleted with grace 0 and a UID precondition).
- GKE graceful node shutdown when a simulated VM is reclaimed (`reclaim()` or `python -m
  spotguard.sim.kubelet reclaim NODE --in SECONDS`): from 30 s before the VM goes the node is
  NotReady, non-critical pods get 15 s, critical pods 15 s more; when the VM goes its processes are
  killed, its Lease stops and its Node object is deleted (as GKE's cloud node lifecycle does).

Every difference from a real kubelet is listed in docs/simulation.md ("The simulated kubelet").

The synchronous `kubernetes` client does the HTTP (its kubeconfig handling and TLS), in one thread
per watch and a small pool for writes; all state lives in one asyncio loop. Nothing polls the API:
two watches (nodes, pods) plus the lease timer.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import hashlib
import ipaddress
import json
import os
import platform
import shlex
import signal
import socket
import sys
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Coroutine

import aiohttp
import structlog
import urllib3
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines

from spotguard.backoff import backoff_delay
from spotguard.observability import configure_logging

log = structlog.get_logger("spotguard.sim.kubelet")

# --- contracts (DESIGN.md section 3) ---------------------------------------------------------------
UNMANAGED_ANNOTATION = "sim.spotguard.io/unmanaged"
GPUS_KEY = "sim.spotguard.io/gpus"  # node label or annotation: how many nvidia.com/gpu to report
FAKE_VLLM_ANNOTATION = "sim.spotguard.io/fake-vllm"
FAKE_VLLM_ARGS_ANNOTATION = "sim.spotguard.io/fake-vllm-args"
METRICS_PORT_ANNOTATION = "spotguard.io/metrics-port"
RECLAIM_ANNOTATION = "sim.spotguard.io/reclaim-at"
DEFAULT_VLLM_PORT = 8000

# --- what the real components do (kubelet v1.36, GKE) ------------------------------------------------
KUBELET_VERSION = "v1.36.3"
HOST_IP = "127.0.0.1"
LEASE_NAMESPACE = "kube-node-lease"
LEASE_DURATION_SECONDS = 40  # kubelet's nodeLeaseDurationSeconds
LEASE_RENEW_SECONDS = 10.0  # 0.25 x the lease duration, as the kubelet renews
NODE_STATUS_REPORT_SECONDS = 60.0  # re-post unchanged node status this often
MIN_KILL_GRACE_SECONDS = 2.0  # kuberuntime's minimumGracePeriodInSeconds: SIGTERM always gets >= 2 s
SHUTDOWN_GRACE_SECONDS = 30.0  # GKE: shutdownGracePeriod
SHUTDOWN_GRACE_CRITICAL_SECONDS = 15.0  # GKE: shutdownGracePeriodCriticalPods
CRITICAL_PRIORITY = 2_000_000_000  # system-cluster-critical; system-node-critical is above it
PROBE_PERIOD_SECONDS = 0.5
PROBE_TIMEOUT_SECONDS = 1.0
CRASH_BACKOFF_INITIAL_SECONDS = 10.0  # kubelet's container restart back-off: 10 s doubling ...
CRASH_BACKOFF_MAX_SECONDS = 300.0  # ... up to 5 min, reset after 10 min of running
CRASH_BACKOFF_RESET_SECONDS = 600.0
# A container with no process behind it "stops" the way a process without a SIGTERM handler does.
STATUS_ONLY_EXIT_CODE = 128 + int(signal.SIGTERM)

NODE_SHUTDOWN_REASON = "Terminated"
NODE_SHUTDOWN_MESSAGE = "Pod was terminated in response to imminent node shutdown."
NODE_SHUTDOWN_REJECT_REASON = "NodeShutdown"
NODE_SHUTDOWN_REJECT_MESSAGE = "Pod was rejected: Pod was rejected as the node is shutting down."
NODE_SHUTTING_DOWN = "node is shutting down"

# Pod IPs: one /16 of 127.0.0.0/8 per cluster, 127.<n>.0.1 upward, n in 1..254 derived from the API
# server's URL (stable across kubelet restarts; several clusters on one machine rarely share it).
# 127.0.0.0/16 is left to the host: 127.0.0.1 is every node's address.

_STRATEGIC_MERGE = "application/strategic-merge-patch+json"
_TERMINAL_PHASES = ("Succeeded", "Failed")


class ApiError(Exception):
    """A Kubernetes API call failed; `status` is the HTTP status (0: no answer at all)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}" if status else message)
        self.status = status
        self.message = message


# =================================================================================================
# Time


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def format_time(moment: datetime) -> str:
    """metav1.Time: RFC 3339, whole seconds, UTC."""
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _micro_time(moment: datetime) -> str:
    """metav1.MicroTime (Lease renewTime)."""
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str) -> datetime:
    """RFC 3339 -> aware datetime (a value without offset is taken as UTC)."""
    moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def _now() -> str:
    return format_time(_utcnow())


# =================================================================================================
# Pod status, as the kubelet computes it (pkg/kubelet/status/generate.go, kubelet_pods.go getPhase).
# Pure functions over plain dicts, so they can be reasoned about (and tested) without a cluster.


@dataclass
class _Container:
    """What the kubelet would report about one container."""

    name: str
    image: str
    kind: str  # "regular" | "init" (runs to completion first) | "sidecar" (restartable init container)
    state: str = "waiting"  # waiting | running | terminated
    waiting_reason: str = "ContainerCreating"
    ready: bool = False
    restart_count: int = 0
    started_at: str | None = None
    finished_at: str | None = None
    exit_code: int = 0
    reason: str = ""
    last: dict[str, Any] | None = None  # lastState.terminated

    def run(self) -> None:
        self.state, self.started_at, self.ready = "running", _now(), False
        self.finished_at, self.exit_code, self.reason = None, 0, ""

    def terminate(self, exit_code: int, *, reason: str | None = None) -> None:
        if self.state == "terminated":
            return
        if self.state == "waiting" and self.started_at is None:
            # Never ran (the pod went away before it started): what the kubelet reports then.
            reason = reason or "ContainerStatusUnknown"
        self.state, self.ready, self.exit_code = "terminated", False, exit_code
        self.reason = reason or ("Completed" if exit_code == 0 else "Error")
        self.finished_at = _now()

    def crashed(self) -> None:
        """Terminated -> waiting to be restarted (CrashLoopBackOff); the exit moves to lastState."""
        self.last = self._terminated_state()
        self.state, self.waiting_reason, self.ready = "waiting", "CrashLoopBackOff", False

    def _terminated_state(self) -> dict[str, Any]:
        return {"exitCode": self.exit_code, "reason": self.reason, "startedAt": self.started_at,
                "finishedAt": self.finished_at, "containerID": self.container_id}

    @property
    def container_id(self) -> str:
        return f"sim://{self.name}-{self.restart_count}"

    def api_status(self) -> dict[str, Any]:
        if self.state == "running":
            state: dict[str, Any] = {"running": {"startedAt": self.started_at}}
        elif self.state == "terminated":
            state = {"terminated": self._terminated_state()}
        else:
            state = {"waiting": {"reason": self.waiting_reason}}
        status: dict[str, Any] = {
            "name": self.name, "image": self.image, "imageID": f"sim://{self.image}",
            "ready": self.ready, "started": self.state == "running", "restartCount": self.restart_count,
            "state": state, "lastState": {"terminated": self.last} if self.last else {},
        }
        if self.started_at is not None:
            status["containerID"] = self.container_id
        return status


def _go_list(names: list[str]) -> str:
    """How Go's %s prints a []string (the kubelet's messages use it)."""
    return "[" + " ".join(names) + "]"


def containers_ready_condition(spec: dict[str, Any], containers: list[_Container], phase: str) -> dict[str, Any]:
    """ContainersReady: True when every regular container (and sidecar) is ready."""
    if phase in _TERMINAL_PHASES:
        return {"type": "ContainersReady", "status": "False",
                "reason": "PodCompleted" if phase == "Succeeded" else "PodFailed"}
    by_name = {c.name: c for c in containers}
    wanted = [c["name"] for c in spec.get("initContainers") or [] if c.get("restartPolicy") == "Always"]
    wanted += [c["name"] for c in spec.get("containers") or []]
    unknown = [name for name in wanted if name not in by_name]
    unready = [name for name in wanted if name in by_name and not by_name[name].ready]
    messages = []
    if unknown:
        messages.append(f"containers with unknown status: {_go_list(unknown)}")
    if unready:
        messages.append(f"containers with unready status: {_go_list(unready)}")
    if messages:
        return {"type": "ContainersReady", "status": "False", "reason": "ContainersNotReady",
                "message": ", ".join(messages)}
    return {"type": "ContainersReady", "status": "True"}


def pod_ready_condition(spec: dict[str, Any], conditions: list[dict[str, Any]],
                        containers_ready: dict[str, Any]) -> dict[str, Any]:
    """Ready: ContainersReady AND every readiness gate's condition True (GeneratePodReadyCondition)."""
    if containers_ready["status"] != "True":
        return {**containers_ready, "type": "Ready"}
    by_type = {c.get("type"): c for c in conditions}
    messages = []
    for gate in spec.get("readinessGates") or []:
        kind = gate.get("conditionType")
        condition = by_type.get(kind)
        if condition is None:
            messages.append(f"corresponding condition of pod readiness gate {json.dumps(kind)} does not exist.")
        elif condition.get("status") != "True":
            messages.append(f"the status of pod readiness gate {json.dumps(kind)} is not \"True\", "
                            f"but {condition.get('status')}")
    if messages:
        return {"type": "Ready", "status": "False", "reason": "ReadinessGatesNotReady",
                "message": ", ".join(messages)}
    return {"type": "Ready", "status": "True"}


def pod_phase(spec: dict[str, Any], containers: list[_Container], *, terminal: bool) -> str:
    """The kubelet's getPhase, for the container kinds simulated here."""
    if any(c.kind == "init" and not (c.state == "terminated" and c.exit_code == 0) for c in containers):
        return "Pending"
    running = waiting = stopped = succeeded = 0
    for c in containers:
        if c.kind != "regular":
            continue
        if c.state == "running":
            running += 1
        elif c.state == "terminated":
            stopped += 1
            succeeded += c.exit_code == 0
        elif c.last is not None:  # waiting for a restart after an exit counts as stopped
            stopped += 1
        else:
            waiting += 1
    if waiting:
        return "Pending"
    if running:
        return "Running"
    if terminal:
        return "Succeeded" if stopped == succeeded else "Failed"
    policy = spec.get("restartPolicy") or "Always"
    if policy == "Always":
        return "Running"
    if stopped == succeeded:
        return "Succeeded"
    return "Failed" if policy == "Never" else "Running"


def _condition_patch(current: list[dict[str, Any]], desired: list[dict[str, Any]], now: str, *,
                     heartbeat: bool = False) -> list[dict[str, Any]]:
    """Conditions that differ (status, reason, message), ready for a strategic merge by type.

    lastTransitionTime moves only when the status changes; a reason or message that is no longer
    wanted is sent as null so the merge removes it. `heartbeat` (nodes) sends every condition with a
    fresh lastHeartbeatTime.
    """
    by_type = {c.get("type"): c for c in current}
    out = []
    for want in desired:
        have = by_type.get(want["type"])
        same = (have is not None and have.get("status") == want["status"]
                and (have.get("reason") or "") == (want.get("reason") or "")
                and (have.get("message") or "") == (want.get("message") or ""))
        if same and not heartbeat:
            continue
        keep_time = have is not None and have.get("status") == want["status"] and have.get("lastTransitionTime")
        item = {"type": want["type"], "status": want["status"], "reason": want.get("reason"),
                "message": want.get("message"), "lastTransitionTime": keep_time or now}
        if heartbeat:
            item["lastHeartbeatTime"] = now
        else:
            item["lastProbeTime"] = None
        out.append(item)
    return out


def _matches(desired: Any, current: Any) -> bool:
    """True when `current` holds everything `desired` says (extra fields in `current` are ignored)."""
    if isinstance(desired, dict):
        if not isinstance(current, dict):
            return not desired and not current
        for key, value in desired.items():
            if value in (None, {}, []):
                if current.get(key) not in (None, {}, []):
                    return False
            elif not _matches(value, current.get(key)):
                return False
        return True
    if isinstance(desired, list):
        return (isinstance(current, list) and len(current) == len(desired)
                and all(_matches(d, c) for d, c in zip(desired, current)))
    return desired == current


def _pod_status_patch(current: dict[str, Any], desired: dict[str, Any], now: str) -> dict[str, Any] | None:
    patch: dict[str, Any] = {}
    for key in ("phase", "reason", "message", "hostIP", "hostIPs", "podIP", "podIPs", "startTime"):
        if key in desired and current.get(key) != desired[key]:
            patch[key] = desired[key]
    for key in ("containerStatuses", "initContainerStatuses"):
        # Lists without a merge key: sent whole when anything in them changed.
        if key in desired and not _matches(desired[key], current.get(key)):
            patch[key] = desired[key]
    conditions = _condition_patch(current.get("conditions") or [], desired["conditions"], now)
    if conditions:
        patch["conditions"] = conditions
    return patch or None


def _rv(obj: dict[str, Any] | None) -> int:
    try:
        return int(((obj or {}).get("metadata") or {}).get("resourceVersion") or -1)
    except ValueError:  # opaque by contract; etcd-backed servers give integers
        return -1


def _priority(pod: dict[str, Any]) -> int:
    return int((pod.get("spec") or {}).get("priority") or 0)


def _annotations(obj: dict[str, Any]) -> dict[str, str]:
    return (obj.get("metadata") or {}).get("annotations") or {}


def _terminal(pod: dict[str, Any]) -> bool:
    return ((pod.get("status") or {}).get("phase")) in _TERMINAL_PHASES


# =================================================================================================
# Pod IPs


class IpPool:
    """Unique pod IPs in 127.0.0.0/8, handed out round-robin (like host-local IPAM) so an address
    just freed is not reused at once. Every non-terminal pod that holds an address in the pool
    reserves it (also pods found at start: a restarted kubelet keeps their IPs)."""

    def __init__(self, first: str = "127.1.0.1", last: str = "127.1.255.254") -> None:
        self._first = int(ipaddress.IPv4Address(first))
        self._last = int(ipaddress.IPv4Address(last))
        self._cursor = self._first
        self._by_ip: dict[int, str] = {}
        self._by_uid: dict[str, int] = {}

    @classmethod
    def for_cluster(cls, server: str) -> IpPool:
        """The /16 of the cluster at `server` (its API server URL)."""
        octet = 1 + int.from_bytes(hashlib.sha256(server.encode()).digest()[:4], "big") % 254
        return cls(f"127.{octet}.0.1", f"127.{octet}.255.254")

    @property
    def network(self) -> str:
        return str(ipaddress.IPv4Network((self._first & 0xFFFF0000, 16)))

    def __contains__(self, ip: object) -> bool:
        try:
            return self._first <= int(ipaddress.IPv4Address(str(ip))) <= self._last
        except ValueError:
            return False

    def holder(self, ip: str) -> str | None:
        return self._by_ip.get(int(ipaddress.IPv4Address(ip)))

    def ip_of(self, uid: str) -> str | None:
        value = self._by_uid.get(uid)
        return None if value is None else str(ipaddress.IPv4Address(value))

    def reserve(self, ip: str, uid: str) -> bool:
        """Mark `ip` as `uid`'s; False when another pod holds it."""
        value = int(ipaddress.IPv4Address(ip))
        owner = self._by_ip.get(value)
        if owner is not None:
            return owner == uid
        self.release(uid)
        self._by_ip[value], self._by_uid[uid] = uid, value
        if value >= self._cursor:
            self._cursor = value + 1 if value < self._last else self._first
        return True

    def allocate(self, uid: str) -> str:
        if uid in self._by_uid:
            return str(ipaddress.IPv4Address(self._by_uid[uid]))
        size = self._last - self._first + 1
        for _ in range(size):
            value = self._cursor
            self._cursor = value + 1 if value < self._last else self._first
            if value & 0xFF in (0, 255) or value in self._by_ip:
                continue  # .0 and .255 look like network/broadcast addresses to people reading them
            self._by_ip[value], self._by_uid[uid] = uid, value
            return str(ipaddress.IPv4Address(value))
        raise RuntimeError("pod IP pool exhausted")

    def release(self, uid: str) -> None:
        value = self._by_uid.pop(uid, None)
        if value is not None:
            self._by_ip.pop(value, None)


# =================================================================================================
# The API server, through the synchronous kubernetes client


class _Api:
    """Raw JSON calls (no model classes: dicts in, dicts out) run in a small thread pool."""

    def __init__(self, api_client: Any, *, workers: int = 8) -> None:
        self._client = api_client
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sim-kubelet-api")

    def _open(self, method: str, path: str, *, query: dict[str, str] | None, body: Any,
              content_type: str | None, timeout: Any) -> Any:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type or "application/json"
        try:
            method, url, headers, body, post = self._client.param_serialize(
                method=method, resource_path=path, query_params=list((query or {}).items()) or None,
                header_params=headers, body=body, auth_settings=["BearerToken"])
            return self._client.call_api(method, url, header_params=headers, body=body, post_params=post,
                                         _request_timeout=timeout)
        except ApiException as exc:
            raise ApiError(exc.status or 0, str(exc.reason)) from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise ApiError(0, f"{type(exc).__name__}: {exc}") from exc

    def call_sync(self, method: str, path: str, *, query: dict[str, str] | None = None, body: Any = None,
                  content_type: str | None = None, timeout: float = 15.0) -> Any:
        response = self._open(method, path, query=query, body=body, content_type=content_type, timeout=timeout)
        try:
            data = response.read()
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise ApiError(0, f"{type(exc).__name__}: {exc}") from exc
        finally:
            response.response.release_conn()
        try:
            payload = json.loads(data) if data else None
        except ValueError:
            payload = None
        if not 200 <= response.status < 300:
            message = payload.get("message") if isinstance(payload, dict) else data[:200].decode(errors="replace")
            raise ApiError(response.status, str(message))
        return payload

    async def call(self, method: str, path: str, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(self.call_sync, method, path, **kwargs))

    def open_watch(self, path: str, query: dict[str, str]) -> Any:
        # Read timeout above the server's timeoutSeconds: a silent dead connection is noticed.
        return self._open("GET", path, query=query, body=None, content_type=None, timeout=(10.0, 330.0))

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class _Watcher(threading.Thread):
    """List, then watch from that resourceVersion, forever: a 410 Gone (or any break) relists.

    Runs in its own thread (the client's reads block); hands every list and event to the asyncio
    loop in order, so the loop sees exactly what a client-go informer would.
    """

    def __init__(self, api: _Api, *, path: str, query: dict[str, str], loop: asyncio.AbstractEventLoop,
                 on_list: Callable[[list[dict[str, Any]]], None],
                 on_event: Callable[[str, dict[str, Any]], None], name: str) -> None:
        super().__init__(name=f"sim-kubelet-watch-{name}", daemon=True)
        self._api, self._path, self._query = api, path, query
        self._loop, self._on_list, self._on_event = loop, on_list, on_event
        self._what = name
        self._stopped = threading.Event()
        self._response: Any = None

    def stop(self) -> None:
        self._stopped.set()
        response = self._response
        if response is not None:
            try:
                response.response.shutdown()  # unblocks the read (urllib3 >= 2.3)
            except Exception:  # noqa: BLE001 - best effort; the thread is a daemon anyway
                pass

    def _post(self, callback: Callable[..., None], *args: Any) -> None:
        if not self._stopped.is_set():
            try:
                self._loop.call_soon_threadsafe(callback, *args)
            except RuntimeError:  # loop closed: we are shutting down
                self._stopped.set()

    def _list(self) -> str:
        items: list[dict[str, Any]] = []
        query = {**self._query, "limit": "500"}
        while True:
            page = self._api.call_sync("GET", self._path, query=query, timeout=60.0)
            items.extend(page.get("items") or [])
            token = (page.get("metadata") or {}).get("continue")
            if not token:
                break
            query = {**self._query, "limit": "500", "continue": token}
        self._post(self._on_list, items)
        return str(page["metadata"]["resourceVersion"])

    def run(self) -> None:
        version: str | None = None
        attempt = 0
        while not self._stopped.is_set():
            try:
                if version is None:
                    version = self._list()
                    log.debug("watch_listed", what=self._what, resource_version=version)
                self._response = self._api.open_watch(self._path, {
                    **self._query, "watch": "true", "resourceVersion": version,
                    "allowWatchBookmarks": "true", "timeoutSeconds": "300"})
                try:
                    if self._response.status == 410:
                        version = None
                        continue
                    if self._response.status != 200:
                        raise ApiError(self._response.status, self._response.read()[:200].decode(errors="replace"))
                    for line in iter_resp_lines(self._response.response):
                        event = json.loads(line)
                        kind, obj = event.get("type"), event.get("object") or {}
                        if kind == "ERROR":
                            if obj.get("code") == 410:  # too old: relist
                                log.info("watch_expired", what=self._what)
                                version = None
                                break
                            raise ApiError(int(obj.get("code") or 0), str(obj.get("message")))
                        version = str(obj["metadata"]["resourceVersion"])
                        if kind != "BOOKMARK":
                            self._post(self._on_event, kind, obj)
                    attempt = 0
                finally:
                    response, self._response = self._response, None
                    response.response.release_conn()
            except Exception as exc:  # noqa: BLE001 - a watch never gives up; the error is logged
                if self._stopped.is_set():
                    break
                delay = backoff_delay(attempt, base=0.5, cap=10.0)
                attempt += 1
                log.warning("watch_failed", what=self._what, error=str(exc), retry_in=round(delay, 2))
                self._stopped.wait(delay)


# =================================================================================================
# The kubelet


@dataclass(eq=False)
class _Termination:
    deadline: float  # loop time; SIGKILL when reached (but never sooner than 2 s after SIGTERM)
    shutdown: bool  # node shutdown: the pod ends Failed/"Terminated" with a DisruptionTarget
    force: bool  # the API object is already gone: nothing to write back
    done: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


@dataclass(eq=False)
class _Pod:
    uid: str
    namespace: str
    name: str
    node: str
    pod: dict[str, Any]
    ip: str | None
    start_time: str
    containers: list[_Container]
    fake_vllm: bool
    port: int
    process: asyncio.subprocess.Process | None = None
    spawning: bool = False
    hooks: set[asyncio.Task[None]] = field(default_factory=set)
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    termination: _Termination | None = None
    sandbox: bool = True
    terminal: bool = False
    gone: bool = False  # the API object is deleted
    dirty: bool = False
    writer: asyncio.Task[None] | None = None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def vllm_container(self) -> _Container | None:
        if not self.fake_vllm:
            return None
        return next((c for c in self.containers if c.kind == "regular"), None)

    @property
    def spec(self) -> dict[str, Any]:
        return self.pod.get("spec") or {}


@dataclass(eq=False)
class _Node:
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


class SimKubelet:
    """The kubelet of every managed Node; `await run(stop)` until `stop` is set, then every process
    it started is stopped (SIGTERM, SIGKILL after 5 s). API objects are left as they are, as a real
    kubelet that stops leaves them."""

    def __init__(self, api_client: Any, *, state_dir: Path, python: str = sys.executable) -> None:
        self._api = _Api(api_client)
        self._state_dir = Path(state_dir).resolve()
        self._python = python
        self._ips = IpPool.for_cluster(str(api_client.configuration.host))
        self._nodes: dict[str, _Node] = {}
        self._pods: dict[str, dict[str, Any]] = {}  # every pod bound to a node, by uid
        self._runtimes: dict[str, _Pod] = {}  # pods this kubelet runs, by uid
        self._finished: set[str] = set()  # uids whose run is over (never start them again)
        self._deleting: set[str] = set()  # terminal pods whose object we are deleting
        self._rejected: set[str] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._watchers: list[_Watcher] = []
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._http: aiohttp.ClientSession | None = None

    # --- running -----------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        self._loop = asyncio.get_running_loop()
        (self._state_dir / "logs" / "pods").mkdir(parents=True, exist_ok=True)
        self._http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True))
        self._watchers = [
            _Watcher(self._api, path="/api/v1/nodes", query={}, loop=self._loop,
                     on_list=self._nodes_listed, on_event=self._node_event, name="nodes"),
            # Only pods bound to some node; the IP reservation looks at all of them.
            _Watcher(self._api, path="/api/v1/pods", query={"fieldSelector": "spec.nodeName!="},
                     loop=self._loop, on_list=self._pods_listed, on_event=self._pod_event, name="pods"),
        ]
        for watcher in self._watchers:
            watcher.start()
        log.info("kubelet_started", version=KUBELET_VERSION, state_dir=str(self._state_dir), pid=os.getpid(),
                 pod_network=self._ips.network)
        try:
            await stop.wait()
        finally:
            await self._shutdown()

    async def _shutdown(self) -> None:
        self._stopping = True
        log.info("kubelet_stopping", pods=len(self._runtimes))
        for watcher in self._watchers:
            watcher.stop()
        current = asyncio.current_task()
        for task in list(self._tasks):
            if task is not current:
                task.cancel()
        await asyncio.gather(*(t for t in list(self._tasks) if t is not current), return_exceptions=True)
        processes = [rt.process for rt in self._runtimes.values()
                     if rt.process is not None and rt.process.returncode is None]
        for process in processes:
            _signal(process, signal.SIGTERM)
        if processes:
            await asyncio.wait([asyncio.ensure_future(p.wait()) for p in processes], timeout=5.0)
            for process in processes:
                if process.returncode is None:
                    _signal(process, signal.SIGKILL)
            await asyncio.gather(*(p.wait() for p in processes), return_exceptions=True)
        if self._http is not None:
            await self._http.close()
        self._api.close()
        log.info("kubelet_stopped", processes_stopped=len(processes))

    def _spawn(self, coro: Coroutine[Any, Any, Any], *, name: str, owner: set[asyncio.Task[Any]] | None = None
               ) -> asyncio.Task[Any]:
        """A background task that is tracked (cancelled at shutdown) and whose crash is logged."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        if owner is not None:
            owner.add(task)

        def finished(t: asyncio.Task[Any]) -> None:
            self._tasks.discard(t)
            if owner is not None:
                owner.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.error("task_crashed", task=t.get_name(), error=repr(t.exception()),
                          exc_info=t.exception())

        task.add_done_callback(finished)
        return task

    # --- nodes: events -----------------------------------------------------------------------------

    def _nodes_listed(self, items: list[dict[str, Any]]) -> None:
        seen = set()
        for obj in items:
            seen.add(obj["metadata"]["name"])
            self._node_event("MODIFIED", obj)
        for name in list(self._nodes):
            if name not in seen:
                self._node_gone(name, why="node deleted")

    def _node_event(self, kind: str, obj: dict[str, Any]) -> None:
        if self._stopping:
            return
        name, uid = obj["metadata"]["name"], obj["metadata"]["uid"]
        if kind == "DELETED":
            node = self._nodes.get(name)
            if node is not None and node.uid == uid:
                self._node_gone(name, why="node deleted")
            return
        node = self._nodes.get(name)
        if node is not None and node.uid != uid:
            self._node_gone(name, why="node replaced")  # same name, new object: a new VM
            node = None
        if _annotations(obj).get(UNMANAGED_ANNOTATION) == "true":
            if node is not None:
                self._node_gone(name, why="node marked unmanaged")
            return
        if node is None:
            if obj["metadata"].get("deletionTimestamp"):
                return
            node = _Node(name=name, uid=uid, obj=obj)
            self._nodes[name] = node
            node.loop_task = self._spawn(self._node_loop(node), name=f"node {name}")
            log.info("node_managed", node=name)
            for pod in list(self._pods.values()):
                if (pod.get("spec") or {}).get("nodeName") == name:
                    self._pod_changed(pod)
        elif _rv(obj) < _rv(node.obj):
            return  # older than what a write of ours already returned
        node.obj = obj
        node.wake.set()
        self._schedule_reclaim(node)

    def _node_gone(self, name: str, *, why: str) -> None:
        """The VM behind the node is gone (or no longer ours): its processes die with it."""
        node = self._nodes.pop(name, None)
        if node is None:
            return
        node.gone = True
        log.info("node_forgotten", node=name, reason=why, pods=len(node.pods))
        current = asyncio.current_task()
        for task in (node.loop_task, node.reclaim_task):
            if task is not None and task is not current:
                task.cancel()
        for uid in list(node.pods):
            rt = self._runtimes.get(uid)
            if rt is not None:
                self._kill_now(rt)

    def _schedule_reclaim(self, node: _Node) -> None:
        text = _annotations(node.obj).get(RECLAIM_ANNOTATION)
        try:
            at = parse_time(text) if text else None
        except ValueError:
            log.warning("reclaim_annotation_invalid", node=node.name, value=text)
            at = None
        if at == node.reclaim_at:
            return
        if node.shutting_down:
            # Like a real VM: once the OS is shutting down there is no way back.
            log.warning("reclaim_change_ignored", node=node.name, value=text, reason="shutdown already began")
            return
        if node.reclaim_task is not None:
            node.reclaim_task.cancel()
            node.reclaim_task = None
        node.reclaim_at = at
        if at is not None:
            log.info("reclaim_scheduled", node=node.name, at=format_time(at),
                     in_seconds=round((at - _utcnow()).total_seconds(), 1))
            node.reclaim_task = self._spawn(self._reclaim(node, at), name=f"reclaim {node.name}")
        else:
            log.info("reclaim_cancelled", node=node.name)

    # --- nodes: heartbeats and status ------------------------------------------------------------

    async def _node_loop(self, node: _Node) -> None:
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
            except ApiError as exc:
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

    async def _ensure_node_labels(self, node: _Node) -> None:
        """The well-known labels the kubelet puts on its Node (DaemonSets select on them)."""
        labels = (node.obj.get("metadata") or {}).get("labels") or {}
        wanted = {"kubernetes.io/hostname": node.name, "kubernetes.io/os": "linux",
                  "kubernetes.io/arch": _arch(), "beta.kubernetes.io/os": "linux",
                  "beta.kubernetes.io/arch": _arch()}
        missing = {k: v for k, v in wanted.items() if k not in labels}
        if missing:
            try:
                await self._api.call("PATCH", f"/api/v1/nodes/{node.name}",
                                     body={"metadata": {"labels": missing}}, content_type=_STRATEGIC_MERGE)
            except ApiError as exc:
                if exc.status != 404:
                    raise
        node.labels_checked = True

    async def _renew_lease(self, node: _Node) -> None:
        collection = f"/apis/coordination.k8s.io/v1/namespaces/{LEASE_NAMESPACE}/leases"
        path = f"{collection}/{node.name}"
        owner = {"apiVersion": "v1", "kind": "Node", "name": node.name, "uid": node.uid}
        spec = {"holderIdentity": node.name, "leaseDurationSeconds": LEASE_DURATION_SECONDS,
                "renewTime": _micro_time(_utcnow())}
        if node.lease is None:
            try:
                node.lease = await self._api.call("GET", path)
            except ApiError as exc:
                if exc.status != 404:
                    raise
                # Owned by the Node, so the garbage collector removes it with the Node.
                node.lease = await self._api.call("POST", collection, body={
                    "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": node.name, "namespace": LEASE_NAMESPACE, "ownerReferences": [owner]},
                    "spec": spec})
                return
        lease = json.loads(json.dumps(node.lease))
        lease["spec"] = {**(lease.get("spec") or {}), **spec}
        lease["metadata"]["ownerReferences"] = [owner]
        try:
            node.lease = await self._api.call("PUT", path, body=lease)
        except ApiError:
            node.lease = None  # conflict or gone: read it again next time
            raise

    def _desired_node_status(self, node: _Node) -> dict[str, Any]:
        capacity = {"cpu": "16", "memory": "64Gi", "pods": "110", "ephemeral-storage": "100Gi"}
        gpus = (node.obj["metadata"].get("labels") or {}).get(GPUS_KEY) or _annotations(node.obj).get(GPUS_KEY)
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

    async def _sync_node_status(self, node: _Node) -> None:
        loop = asyncio.get_running_loop()
        status = node.obj.get("status") or {}
        desired = self._desired_node_status(node)
        heartbeat = loop.time() - node.last_post >= NODE_STATUS_REPORT_SECONDS
        now = _now()
        patch: dict[str, Any] = {}
        for key in ("capacity", "allocatable"):
            have = status.get(key) or {}
            delta: dict[str, Any] = {k: v for k, v in desired[key].items() if have.get(k) != v}
            if "nvidia.com/gpu" in have and "nvidia.com/gpu" not in desired[key]:
                delta["nvidia.com/gpu"] = None
            if delta:
                patch[key] = delta
        changed = _condition_patch(status.get("conditions") or [], desired["conditions"], now)
        if changed or heartbeat:
            # Any condition change re-posts them all with a fresh heartbeat, as the kubelet does.
            patch["conditions"] = _condition_patch(status.get("conditions") or [], desired["conditions"], now,
                                                   heartbeat=True)
        if not _matches(desired["addresses"], status.get("addresses")):
            patch["addresses"] = desired["addresses"]
        if not _matches(desired["nodeInfo"], status.get("nodeInfo")):
            patch["nodeInfo"] = desired["nodeInfo"]
        if not patch:
            return
        try:
            obj = await self._api.call("PATCH", f"/api/v1/nodes/{node.name}/status", body={"status": patch},
                                       content_type=_STRATEGIC_MERGE)
        except ApiError as exc:
            if exc.status == 404:
                return  # deleted: the watch says so next
            raise
        node.last_post = loop.time()
        if changed or set(patch) - {"conditions"}:
            log.info("node_status_posted", node=node.name, fields=sorted(patch),
                     ready=desired["conditions"][-1]["status"])
        if not node.gone and _rv(obj) > _rv(node.obj):
            node.obj = obj

    # --- node shutdown (GKE) ---------------------------------------------------------------------

    async def _reclaim(self, node: _Node, at: datetime) -> None:
        loop = asyncio.get_running_loop()
        gone_at = loop.time() + (at - _utcnow()).total_seconds()
        begin = gone_at - SHUTDOWN_GRACE_SECONDS
        if begin > loop.time():
            await asyncio.sleep(begin - loop.time())
        shutdown = None
        if gone_at > loop.time():
            shutdown = self._spawn(self._graceful_shutdown(node), name=f"shutdown {node.name}")
            await asyncio.sleep(gone_at - loop.time())
        if shutdown is not None and not shutdown.done():
            shutdown.cancel()
        await self._vm_gone(node)

    async def _graceful_shutdown(self, node: _Node) -> None:
        """What the kubelet's shutdown manager does with GKE's settings (shutdownGracePeriod 30 s,
        shutdownGracePeriodCriticalPods 15 s): pods by priority group, each group given its share."""
        node.shutting_down = True
        node.wake.set()
        log.info("node_shutdown_begin", node=node.name)
        groups = (("non-critical", lambda p: p < CRITICAL_PRIORITY,
                   SHUTDOWN_GRACE_SECONDS - SHUTDOWN_GRACE_CRITICAL_SECONDS),
                  ("critical", lambda p: p >= CRITICAL_PRIORITY, SHUTDOWN_GRACE_CRITICAL_SECONDS))
        for label, member, group_grace in groups:
            pods = [self._runtimes[uid] for uid in node.pods
                    if uid in self._runtimes and not self._runtimes[uid].terminal
                    and member(_priority(self._runtimes[uid].pod))]
            if not pods:
                continue
            terminations = []
            for rt in pods:
                grace = group_grace
                # The pod's own grace period when shorter (nodeshutdown_manager.go killPods).
                own = rt.spec.get("terminationGracePeriodSeconds")
                if own is not None and own <= grace:
                    grace = float(own)
                terminations.append(self._begin_termination(rt, grace=grace, shutdown=True))
            log.info("node_shutdown_group", node=node.name, group=label, pods=[rt.key for rt in pods],
                     grace=group_grace)
            waiters = [asyncio.ensure_future(t.done.wait()) for t in terminations]
            _, pending = await asyncio.wait(waiters, timeout=group_grace)
            for waiter in pending:
                waiter.cancel()
        log.info("node_shutdown_pods_done", node=node.name)

    async def _vm_gone(self, node: _Node) -> None:
        log.info("node_vm_gone", node=node.name, pods=len(node.pods))
        self._node_gone(node.name, why="VM reclaimed")
        # GKE's cloud node lifecycle controller deletes the Node of a VM that no longer exists;
        # the pod GC controller then deletes its pods and their controllers replace them.
        body = {"kind": "DeleteOptions", "apiVersion": "v1", "preconditions": {"uid": node.uid}}
        attempt = 0
        while not self._stopping:
            try:
                await self._api.call("DELETE", f"/api/v1/nodes/{node.name}", body=body)
                log.info("node_deleted", node=node.name)
                return
            except ApiError as exc:
                if exc.status in (404, 409):
                    return
                delay = backoff_delay(attempt, base=0.5, cap=10.0)
                attempt += 1
                log.warning("node_delete_failed", node=node.name, error=str(exc), retry_in=round(delay, 2))
                await asyncio.sleep(delay)

    # --- pods: events ------------------------------------------------------------------------------

    def _pods_listed(self, items: list[dict[str, Any]]) -> None:
        # IPs first: a restarted kubelet must know every address in use before it hands out one.
        for obj in items:
            self._reserve_ip(obj)
        seen = set()
        for obj in items:
            seen.add(obj["metadata"]["uid"])
            self._pod_event("MODIFIED", obj)
        for uid in list(self._pods):
            if uid not in seen:
                self._pod_event("DELETED", self._pods[uid])

    def _reserve_ip(self, obj: dict[str, Any]) -> None:
        uid = obj["metadata"]["uid"]
        ip = (obj.get("status") or {}).get("podIP")
        if not ip or ip not in self._ips:
            return
        if _terminal(obj):
            if uid not in self._runtimes:
                self._ips.release(uid)
            return
        if not self._ips.reserve(ip, uid):
            log.warning("pod_ip_conflict", pod=_key(obj), ip=ip, held_by=self._ips.holder(ip))

    def _pod_event(self, kind: str, obj: dict[str, Any]) -> None:
        if self._stopping:
            return
        uid = obj["metadata"]["uid"]
        if kind == "DELETED":
            self._pods.pop(uid, None)
            self._finished.discard(uid)
            self._deleting.discard(uid)
            self._rejected.discard(uid)
            rt = self._runtimes.get(uid)
            if rt is None:
                self._ips.release(uid)
                return
            rt.gone = True
            if not rt.terminal:
                # Deleted without us (force delete, or pod GC): the kubelet still stops it, with
                # the shortest grace it has (1 s, and SIGTERM still gets its 2 s).
                log.info("pod_deleted_while_running", pod=rt.key)
                self._begin_termination(rt, grace=1.0, force=True)
            return
        cached = self._pods.get(uid)
        if cached is not None and _rv(obj) <= _rv(cached):
            return  # a write of ours already told us this (or newer)
        self._pods[uid] = obj
        self._reserve_ip(obj)
        self._pod_changed(obj)

    def _pod_changed(self, obj: dict[str, Any]) -> None:
        uid = obj["metadata"]["uid"]
        node = self._nodes.get((obj.get("spec") or {}).get("nodeName") or "")
        if node is None or node.gone:
            return
        rt = self._runtimes.get(uid)
        if rt is None:
            if _terminal(obj):
                if obj["metadata"].get("deletionTimestamp") and uid not in self._deleting:
                    # A finished pod being deleted: the kubelet removes the object.
                    self._deleting.add(uid)
                    self._spawn(self._delete_pod_object(obj), name=f"delete {_key(obj)}")
                return
            if uid in self._finished:
                return
            self._admit(obj, node)
            return
        rt.pod = obj
        if obj["metadata"].get("deletionTimestamp") and not rt.terminal:
            grace = float(obj["metadata"].get("deletionGracePeriodSeconds") or 0)
            self._begin_termination(rt, grace=max(grace, 1.0))
        self._mark_dirty(rt)

    def _admit(self, obj: dict[str, Any], node: _Node) -> None:
        meta, spec, status = obj["metadata"], obj.get("spec") or {}, obj.get("status") or {}
        uid = meta["uid"]
        if node.shutting_down:
            if uid not in self._rejected:
                self._rejected.add(uid)
                log.info("pod_rejected", pod=_key(obj), node=node.name, reason=NODE_SHUTDOWN_REJECT_REASON)
                self._spawn(self._reject(obj), name=f"reject {_key(obj)}")
            return
        never_started = bool(meta.get("deletionTimestamp")) and not status.get("podIP")
        ip: str | None
        if spec.get("hostNetwork"):
            ip = HOST_IP
        elif never_started:
            ip = None
        else:
            have = status.get("podIP")
            if have and have in self._ips and self._ips.reserve(have, uid):
                ip = have  # recovered after a kubelet restart
            else:
                ip = self._allocate_ip(uid, obj)
        previous = {s.get("name"): s for s in (status.get("containerStatuses") or [])
                    + (status.get("initContainerStatuses") or [])}
        containers = []
        for c in spec.get("initContainers") or []:
            containers.append(_Container(name=c["name"], image=c.get("image", ""),
                                         kind="sidecar" if c.get("restartPolicy") == "Always" else "init"))
        for c in spec.get("containers") or []:
            containers.append(_Container(name=c["name"], image=c.get("image", ""), kind="regular"))
        annotations = _annotations(obj)
        fake = annotations.get(FAKE_VLLM_ANNOTATION) == "true"
        try:
            port = int(annotations.get(METRICS_PORT_ANNOTATION) or DEFAULT_VLLM_PORT)
        except ValueError:
            log.warning("metrics_port_invalid", pod=_key(obj), value=annotations.get(METRICS_PORT_ANNOTATION))
            port = DEFAULT_VLLM_PORT
        rt = _Pod(uid=uid, namespace=meta["namespace"], name=meta["name"], node=node.name, pod=obj, ip=ip,
                  start_time=status.get("startTime") or _now(), containers=containers, fake_vllm=fake, port=port)
        self._runtimes[uid] = rt
        node.pods.add(uid)
        vllm = rt.vllm_container
        for c in containers:
            before = previous.get(c.name) or {}
            c.restart_count = int(before.get("restartCount") or 0)
            if never_started:
                continue
            if c.kind == "init":
                c.run()
                c.terminate(0)
                c.ready = True  # a completed init container reports ready (prober_manager.go)
            elif c is vllm:
                if (before.get("state") or {}).get("running") or (before.get("state") or {}).get("terminated"):
                    c.restart_count += 1  # it ran under a previous kubelet; that process is gone
            else:
                c.run()
                c.ready = True
                if (before.get("state") or {}).get("running"):
                    c.started_at = before["state"]["running"].get("startedAt") or c.started_at
        log.info("pod_admitted", pod=rt.key, node=node.name, ip=ip, fake_vllm=fake,
                 recovered=bool(status.get("podIP")))
        if never_started:
            rt.sandbox = False
            self._begin_termination(rt, grace=1.0)
            return
        if fake and vllm is not None and not meta.get("deletionTimestamp"):
            self._spawn(self._supervise(rt), name=f"vllm {rt.key}", owner=rt.tasks)
            self._spawn(self._probe(rt), name=f"probe {rt.key}", owner=rt.tasks)
        elif vllm is not None:
            vllm.run()  # a recovered pod that is already terminating: nothing left to start
            vllm.ready = True
        self._mark_dirty(rt)
        if meta.get("deletionTimestamp"):
            grace = float(meta.get("deletionGracePeriodSeconds") or 0)
            self._begin_termination(rt, grace=max(grace, 1.0))

    def _allocate_ip(self, uid: str, obj: dict[str, Any]) -> str:
        ip = self._ips.allocate(uid)
        if _annotations(obj).get(FAKE_VLLM_ANNOTATION) != "true":
            return ip
        try:
            port = int(_annotations(obj).get(METRICS_PORT_ANNOTATION) or DEFAULT_VLLM_PORT)
        except ValueError:
            return ip
        # Another cluster on this machine may serve on the same address: skip what is taken.
        for _ in range(64):
            if _port_free(ip, port):
                return ip
            log.warning("pod_ip_port_taken", pod=_key(obj), ip=ip, port=port)
            self._ips.release(uid)
            ip = self._ips.allocate(uid)
        return ip

    async def _reject(self, obj: dict[str, Any]) -> None:
        body = {"status": {"phase": "Failed", "reason": NODE_SHUTDOWN_REJECT_REASON,
                           "message": NODE_SHUTDOWN_REJECT_MESSAGE}}
        await self._retry(f"reject {_key(obj)}", lambda: self._api.call(
            "PATCH", f"/api/v1/namespaces/{obj['metadata']['namespace']}/pods/{obj['metadata']['name']}/status",
            body=body, content_type=_STRATEGIC_MERGE))

    # --- pods: status ------------------------------------------------------------------------------

    def _desired_pod_status(self, rt: _Pod) -> dict[str, Any]:
        spec = rt.spec
        current = (rt.pod.get("status") or {})
        termination = rt.termination
        phase = pod_phase(spec, rt.containers, terminal=rt.terminal)
        # Node shutdown: DisruptionTarget always; reason/message only when the pod ends Failed.
        # A pod whose containers all exited 0 ends Succeeded, as upstream's kubelet reports it
        # since 1.27 (the phase comes from the exit codes: kubernetes#118310).
        shutdown = termination is not None and termination.shutdown and rt.terminal
        containers_ready = containers_ready_condition(spec, [c for c in rt.containers if c.kind != "init"], phase)
        init_done = all(c.state == "terminated" and c.exit_code == 0 for c in rt.containers if c.kind == "init")
        initialized: dict[str, Any] = {"type": "Initialized", "status": "True" if init_done else "False"}
        if phase == "Succeeded":
            initialized["reason"] = "PodCompleted"
        elif not init_done:
            initialized["reason"] = "ContainersNotInitialized"
        conditions = [
            {"type": "PodReadyToStartContainers", "status": "True" if rt.sandbox else "False"},
            initialized,
            pod_ready_condition(spec, current.get("conditions") or [], containers_ready),
            containers_ready,
            {"type": "PodScheduled", "status": "True"},
        ]
        if shutdown:
            conditions.append({"type": "DisruptionTarget", "status": "True", "reason": "TerminationByKubelet",
                               "message": NODE_SHUTDOWN_MESSAGE})
        status: dict[str, Any] = {
            "phase": phase, "conditions": conditions, "hostIP": HOST_IP, "hostIPs": [{"ip": HOST_IP}],
            "startTime": rt.start_time,
            "containerStatuses": [c.api_status() for c in rt.containers if c.kind == "regular"],
        }
        inits = [c.api_status() for c in rt.containers if c.kind != "regular"]
        if inits:
            status["initContainerStatuses"] = inits
        if rt.ip:
            status["podIP"], status["podIPs"] = rt.ip, [{"ip": rt.ip}]
        if shutdown and phase == "Failed":
            status["reason"], status["message"] = NODE_SHUTDOWN_REASON, NODE_SHUTDOWN_MESSAGE
        return status

    def _mark_dirty(self, rt: _Pod) -> None:
        """Status may have changed: write it (once; coalesced with other changes in flight)."""
        rt.dirty = True
        if (rt.writer is None or rt.writer.done()) and not rt.gone and not self._stopping:
            rt.writer = self._spawn(self._write_status(rt), name=f"status {rt.key}")

    async def _write_status(self, rt: _Pod) -> None:
        attempt = 0
        while rt.dirty and not rt.gone and not self._stopping:
            rt.dirty = False
            patch = _pod_status_patch(rt.pod.get("status") or {}, self._desired_pod_status(rt), _now())
            if patch is None:
                continue
            try:
                obj = await self._api.call(
                    "PATCH", f"/api/v1/namespaces/{rt.namespace}/pods/{rt.name}/status",
                    body={"metadata": {"uid": rt.uid}, "status": patch}, content_type=_STRATEGIC_MERGE)
            except ApiError as exc:
                if exc.status in (404, 409):
                    return  # gone (or replaced by a pod of the same name): the watch tells the rest
                rt.dirty = True
                delay = backoff_delay(attempt, base=0.5, cap=10.0)
                attempt += 1
                log.warning("pod_status_write_failed", pod=rt.key, error=str(exc), retry_in=round(delay, 2))
                await asyncio.sleep(delay)
                continue
            attempt = 0
            log.debug("pod_status_written", pod=rt.key, fields=sorted(patch))
            if _rv(obj) > _rv(self._pods.get(rt.uid)) and not rt.gone:
                self._pods[rt.uid] = obj
                rt.pod = obj

    async def _status_synced(self, rt: _Pod) -> None:
        """Return once what `rt` says now is on the API server (or the pod is gone)."""
        self._mark_dirty(rt)
        while rt.writer is not None and not rt.writer.done():
            writer = rt.writer
            try:
                await asyncio.shield(writer)
            except Exception:  # noqa: BLE001 - already logged by _spawn; never block the kill on it
                return
            if rt.dirty and not rt.gone and not self._stopping:
                self._mark_dirty(rt)

    # --- fake vLLM processes -------------------------------------------------------------------

    def _pod_log(self, rt: _Pod) -> Path:
        return self._state_dir / "logs" / "pods" / f"{rt.namespace}_{rt.name}.log"

    async def _supervise(self, rt: _Pod) -> None:
        """Run the fake vLLM; restart it per restartPolicy (with the kubelet's back-off)."""
        container = rt.vllm_container
        assert container is not None and rt.ip is not None
        loop = asyncio.get_running_loop()
        crashes = 0
        while rt.termination is None and not self._stopping:
            extra_text = _annotations(rt.pod).get(FAKE_VLLM_ARGS_ANNOTATION) or ""
            try:
                extra = shlex.split(extra_text)
            except ValueError:
                log.warning("fake_vllm_args_invalid", pod=rt.key, value=extra_text)
                extra = []
            command = [self._python, "-m", "spotguard.sim.fake_vllm", "--listen", f"{rt.ip}:{rt.port}", *extra]
            if not _port_free(rt.ip, rt.port):
                await self._kill_orphans(rt)
            rt.spawning = True
            try:
                with open(self._pod_log(rt), "ab") as output:
                    output.write(f"--- {_now()} sim-kubelet: starting {shlex.join(command)}\n".encode())
                    output.flush()
                    rt.process = await asyncio.create_subprocess_exec(
                        *command, stdin=asyncio.subprocess.DEVNULL, stdout=output, stderr=asyncio.subprocess.STDOUT,
                        cwd=self._state_dir, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            except OSError as exc:
                log.error("fake_vllm_start_failed", pod=rt.key, error=str(exc))
                rt.process = None
            finally:
                rt.spawning = False
            ran_from = loop.time()
            if rt.process is not None:
                container.run()
                self._mark_dirty(rt)
                log.info("fake_vllm_started", pod=rt.key, pid=rt.process.pid, listen=f"{rt.ip}:{rt.port}",
                         restart_count=container.restart_count)
                code = await rt.process.wait()
                exit_code = 128 - code if code < 0 else code
            else:
                exit_code = 128
            container.terminate(exit_code)
            self._mark_dirty(rt)
            if rt.termination is not None or self._stopping:
                return
            log.info("fake_vllm_exited", pod=rt.key, exit_code=exit_code)
            policy = rt.spec.get("restartPolicy") or "Always"
            if policy == "Never" or (policy == "OnFailure" and exit_code == 0):
                if pod_phase(rt.spec, rt.containers, terminal=False) in _TERMINAL_PHASES:
                    await self._pod_finished_by_itself(rt)
                return
            if loop.time() - ran_from >= CRASH_BACKOFF_RESET_SECONDS:
                crashes = 0
            delay = 0.0 if crashes == 0 else min(CRASH_BACKOFF_MAX_SECONDS,
                                                  CRASH_BACKOFF_INITIAL_SECONDS * 2 ** (crashes - 1))
            crashes += 1
            container.crashed()
            self._mark_dirty(rt)
            if delay:
                log.info("fake_vllm_backoff", pod=rt.key, seconds=delay)
                await asyncio.sleep(delay)
            if rt.termination is not None:
                return
            container.restart_count += 1

    async def _kill_orphans(self, rt: _Pod) -> None:
        """A kubelet killed with SIGKILL alone leaves its fake vLLMs running (re-parented), holding
        the pods' addresses: stop the one on this pod's address so it can start again."""
        assert rt.ip is not None
        for pid in _orphaned_fake_vllms(rt.ip, rt.port):
            log.warning("fake_vllm_orphan_killed", pod=rt.key, pid=pid)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for _ in range(40):
            if _port_free(rt.ip, rt.port):
                return
            await asyncio.sleep(0.05)

    async def _probe(self, rt: _Pod) -> None:
        """The readiness probe of the fake vLLM container: GET /health, 200 means ready."""
        container = rt.vllm_container
        assert container is not None and self._http is not None
        url = f"http://{rt.ip}:{rt.port}/health"
        timeout = aiohttp.ClientTimeout(total=PROBE_TIMEOUT_SECONDS)
        while not rt.terminal:
            await asyncio.sleep(PROBE_PERIOD_SECONDS)
            if container.state != "running":
                continue
            try:
                async with self._http.get(url, timeout=timeout) as response:
                    ok = response.status == 200
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
                ok = False
            if container.state == "running" and ok != container.ready:
                container.ready = ok
                log.info("container_readiness", pod=rt.key, container=container.name, ready=ok)
                self._mark_dirty(rt)

    async def _pod_finished_by_itself(self, rt: _Pod) -> None:
        """restartPolicy Never/OnFailure and every container done: terminal, sandbox torn down."""
        rt.terminal, rt.sandbox = True, False
        await self._status_synced(rt)
        self._drop(rt)

    # --- termination -------------------------------------------------------------------------------

    def _begin_termination(self, rt: _Pod, *, grace: float, shutdown: bool = False, force: bool = False
                           ) -> _Termination:
        """Start the kubelet's kill sequence, or shorten one already running (a grace period only
        ever decreases, as in pod_workers' calculateEffectiveGracePeriod)."""
        loop = asyncio.get_running_loop()
        termination = rt.termination
        if termination is None:
            termination = _Termination(deadline=loop.time() + grace, shutdown=shutdown, force=force)
            rt.termination = termination
            log.info("pod_terminating", pod=rt.key, grace=grace, reason="node shutdown" if shutdown else
                     ("deleted from the API" if force else "deletion"))
            termination.task = self._spawn(self._terminate(rt, termination), name=f"terminate {rt.key}")
        else:
            if loop.time() + grace < termination.deadline:
                termination.deadline = loop.time() + grace
                log.info("pod_grace_shortened", pod=rt.key, grace=grace)
            termination.shutdown |= shutdown
            termination.force |= force
        return termination

    async def _terminate(self, rt: _Pod, termination: _Termination) -> None:
        try:
            await asyncio.gather(*(self._stop_container(rt, termination, c)
                                   for c in rt.containers if c.kind != "init"))
            for hook in list(rt.hooks):  # a hook still running dies with its container
                hook.cancel()
            rt.terminal, rt.sandbox = True, False
            log.info("pod_containers_stopped", pod=rt.key,
                     exit_codes={c.name: c.exit_code for c in rt.containers if c.kind != "init"})
            if not rt.gone and not termination.force:
                await self._status_synced(rt)
                if not rt.gone and (self._pods.get(rt.uid) or rt.pod)["metadata"].get("deletionTimestamp"):
                    await self._delete_pod_object(rt.pod)
            self._drop(rt)
        finally:
            termination.done.set()

    async def _stop_container(self, rt: _Pod, termination: _Termination, container: _Container) -> None:
        loop = asyncio.get_running_loop()
        if container.state == "waiting":
            if container.last is not None:  # between crash and restart: report its last exit
                container.state, container.exit_code = "terminated", int(container.last.get("exitCode") or 0)
                container.reason, container.finished_at = container.last.get("reason") or "Error", _now()
                container.last = None
            else:
                container.terminate(137)
            self._mark_dirty(rt)
            return
        if container.state == "terminated":
            return
        spec = next((c for c in (rt.spec.get("containers") or []) + (rt.spec.get("initContainers") or [])
                     if c.get("name") == container.name), {})
        pre_stop = (spec.get("lifecycle") or {}).get("preStop")
        if pre_stop and loop.time() < termination.deadline:
            hook = self._spawn(self._run_hook(rt, spec, pre_stop, termination), name=f"preStop {rt.key}",
                               owner=rt.hooks)
            started = loop.time()
            # Bounded by the grace period; a hook still running when it is over keeps running
            # (it "lives in the container") until the container is stopped.
            while not hook.done() and loop.time() < termination.deadline:
                await asyncio.wait({hook}, timeout=min(0.25, max(0.0, termination.deadline - loop.time())))
            log.info("prestop_done" if hook.done() else "prestop_timeout", pod=rt.key, container=container.name,
                     seconds=round(loop.time() - started, 2))
        sigterm_at = loop.time()
        if container is rt.vllm_container:
            while rt.spawning:
                await asyncio.sleep(0.02)
            process = rt.process
            if process is not None and process.returncode is None:
                _signal(process, signal.SIGTERM)
                log.info("container_sigterm", pod=rt.key, container=container.name, pid=process.pid)
                waiter = asyncio.ensure_future(process.wait())
                while not waiter.done():
                    kill_at = max(termination.deadline, sigterm_at + MIN_KILL_GRACE_SECONDS)
                    if loop.time() >= kill_at:
                        _signal(process, signal.SIGKILL)
                        log.info("container_sigkill", pod=rt.key, container=container.name, pid=process.pid,
                                 after=round(loop.time() - sigterm_at, 2))
                        break
                    await asyncio.wait({waiter}, timeout=min(0.25, kill_at - loop.time()))
                code = await waiter
                container.terminate(128 - code if code < 0 else code)
            else:
                container.terminate(0)
        else:
            # No process behind it: it stops at once.
            container.terminate(STATUS_ONLY_EXIT_CODE)
        self._mark_dirty(rt)

    async def _run_hook(self, rt: _Pod, spec: dict[str, Any], handler: dict[str, Any],
                        termination: _Termination) -> None:
        try:
            if "exec" in handler:
                await self._exec_hook(rt, spec, handler["exec"].get("command") or [])
            elif "httpGet" in handler:
                await self._http_hook(rt, spec, handler["httpGet"], termination)
            elif "sleep" in handler:
                await asyncio.sleep(float(handler["sleep"].get("seconds") or 0))
            else:
                log.warning("prestop_unsupported", pod=rt.key, handler=sorted(handler))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a failing hook is logged and the kill goes on
            log.warning("prestop_failed", pod=rt.key, container=spec.get("name"), error=str(exc))

    async def _exec_hook(self, rt: _Pod, spec: dict[str, Any], command: list[str]) -> None:
        if not rt.fake_vllm:
            # Only pods written for the simulation have commands meant for this machine; a real
            # image's hook (`kill 1`, `nginx -s quit`) must never run on the host.
            log.info("prestop_exec_skipped", pod=rt.key, container=spec.get("name"), command=command,
                     reason="not a fake-vllm pod")
            return
        if not command:
            return
        env = {**os.environ}
        for item in spec.get("env") or []:
            if "value" in item:
                env[item["name"]] = str(item["value"])
        env["POD_IP"] = env["VLLM_HOST"] = rt.ip or HOST_IP
        log.info("prestop_exec", pod=rt.key, container=spec.get("name"), command=command)
        with open(self._pod_log(rt), "ab") as output:
            output.write(f"--- {_now()} sim-kubelet: preStop exec {shlex.join(command)}\n".encode())
            output.flush()
            process = await asyncio.create_subprocess_exec(
                *command, stdin=asyncio.subprocess.DEVNULL, stdout=output, stderr=asyncio.subprocess.STDOUT,
                cwd=self._state_dir, env=env)
        try:
            code = await process.wait()
            if code != 0:
                log.warning("prestop_failed", pod=rt.key, container=spec.get("name"), exit_code=code)
        finally:
            if process.returncode is None:
                _signal(process, signal.SIGKILL)
                await process.wait()

    async def _http_hook(self, rt: _Pod, spec: dict[str, Any], action: dict[str, Any],
                         termination: _Termination) -> None:
        assert self._http is not None
        port = action.get("port")
        if isinstance(port, str) and not port.isdigit():
            port = next((p.get("containerPort") for p in spec.get("ports") or [] if p.get("name") == port), None)
            if port is None:
                raise ValueError(f"named port {action.get('port')!r} not found in the container")
        host = action.get("host") or rt.ip or HOST_IP
        path = action.get("path") or "/"
        if not path.startswith("/"):
            path = "/" + path
        url = f"{(action.get('scheme') or 'HTTP').lower()}://{host}:{port}{path}"
        headers = {h["name"]: h.get("value", "") for h in action.get("httpHeaders") or []}
        remaining = max(0.1, termination.deadline - asyncio.get_running_loop().time())
        log.info("prestop_http", pod=rt.key, container=spec.get("name"), url=url)
        async with self._http.get(url, headers=headers, timeout=aiohttp.ClientTimeout(total=remaining)) as response:
            if response.status >= 400:
                log.warning("prestop_failed", pod=rt.key, container=spec.get("name"), http_status=response.status)

    async def _delete_pod_object(self, obj: dict[str, Any]) -> None:
        """What the kubelet's status manager does once a deleted pod is terminal: delete it for good
        (grace 0, only this incarnation: UID precondition)."""
        meta = obj["metadata"]
        body = {"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": 0,
                "preconditions": {"uid": meta["uid"]}}
        try:
            await self._retry(f"delete {_key(obj)}", lambda: self._api.call(
                "DELETE", f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}", body=body),
                done_statuses=(404, 409))
            log.info("pod_object_deleted", pod=_key(obj))
        finally:
            self._deleting.discard(meta["uid"])

    # --- ending a pod's run ------------------------------------------------------------------------

    def _kill_now(self, rt: _Pod) -> None:
        """The VM is gone: SIGKILL, no grace, nothing written."""
        current = asyncio.current_task()
        for task in list(rt.tasks) + list(rt.hooks) + [t for t in (rt.writer,) if t is not None]:
            if task is not current:
                task.cancel()
        if rt.termination is not None and rt.termination.task is not None and rt.termination.task is not current:
            rt.termination.task.cancel()
            rt.termination.done.set()
        if rt.process is not None and rt.process.returncode is None:
            _signal(rt.process, signal.SIGKILL)
            log.info("container_sigkill", pod=rt.key, pid=rt.process.pid, reason="VM gone")
        rt.terminal = True
        # Not marked finished: if a VM of the same name comes back, the pods still bound to it
        # (and not terminal) would be started again, as a fresh kubelet would.
        self._drop(rt, finished=False)

    def _drop(self, rt: _Pod, *, finished: bool = True) -> None:
        """Forget a pod whose run is over; its IP is free once no live pod object holds it."""
        if self._runtimes.get(rt.uid) is not rt:
            return
        del self._runtimes[rt.uid]
        node = self._nodes.get(rt.node)
        if node is not None:
            node.pods.discard(rt.uid)
        current = asyncio.current_task()
        for task in list(rt.tasks):
            if task is not current:
                task.cancel()
        if finished:
            self._finished.add(rt.uid)
        cached = self._pods.get(rt.uid)
        if cached is None or _terminal(cached):
            self._ips.release(rt.uid)

    async def _retry(self, what: str, call: Callable[[], Coroutine[Any, Any, Any]], *,
                     done_statuses: tuple[int, ...] = (404,)) -> None:
        attempt = 0
        while not self._stopping:
            try:
                await call()
                return
            except ApiError as exc:
                if exc.status in done_statuses:
                    return
                delay = backoff_delay(attempt, base=0.5, cap=10.0)
                attempt += 1
                log.warning("api_call_failed", what=what, error=str(exc), retry_in=round(delay, 2))
                await asyncio.sleep(delay)


def _key(obj: dict[str, Any]) -> str:
    return f"{obj['metadata'].get('namespace', '')}/{obj['metadata']['name']}"


def _port_free(ip: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # only a listener counts
        try:
            probe.bind((ip, port))
        except OSError:
            return False
    return True


def _orphaned_fake_vllms(ip: str, port: int) -> list[int]:
    """Fake vLLM processes serving ip:port whose parent is not a simulated kubelet (another
    cluster's kubelet on this machine may legitimately run one on the same address)."""
    needle = f"{ip}:{port}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if b"spotguard.sim.fake_vllm" not in argv or needle not in argv:
                continue
            parent = (entry / "stat").read_text().rsplit(")", 1)[1].split()[1]
            parent_argv = Path(f"/proc/{parent}/cmdline").read_bytes()
        except (OSError, IndexError):
            continue
        if b"spotguard.sim.kubelet" not in parent_argv:
            found.append(int(entry.name))
    return found


def _signal(process: asyncio.subprocess.Process, signum: int) -> None:
    try:
        process.send_signal(signum)
    except ProcessLookupError:
        pass


@functools.cache
def _arch() -> str:
    machine = platform.machine().lower()
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm"}.get(machine, machine)


# =================================================================================================
# Reclaiming a simulated VM


def reclaim(api_client: Any, node_name: str, *, at: datetime) -> None:
    """The cloud reclaims the VM behind `node_name` at `at` (timezone-aware).

    Annotates the Node `sim.spotguard.io/reclaim-at`; the simulated kubelet then begins GKE's
    graceful node shutdown at max(now, at - 30 s) and makes the VM disappear at `at`. This is the
    kubelet's side only: the metadata server's preemption notice is the GCE emulator's business.
    """
    if at.tzinfo is None:
        raise ValueError("`at` must be timezone-aware, e.g. datetime.now(timezone.utc) + timedelta(seconds=30)")
    stamp = at.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    # A raw merge patch, not CoreV1Api.patch_node: the typed API builds its pydantic models on first
    # use (about 0.4 s here), and World.preempt calls this on the event loop that also serves the
    # metadata emulator, so the notice itself would reach spotguard that much later.
    request = api_client.param_serialize(
        method="PATCH", resource_path=f"/api/v1/nodes/{node_name}", auth_settings=["BearerToken"],
        header_params={"Content-Type": "application/merge-patch+json", "Accept": "application/json"},
        body={"metadata": {"annotations": {RECLAIM_ANNOTATION: stamp}}})
    response = api_client.call_api(*request, _request_timeout=10)
    response.read()
    if response.status >= 400:
        raise ApiException(status=response.status, reason=response.reason)


# =================================================================================================
# Command line


def _client_from_kubeconfig(path: str | None) -> Any:
    configuration = k8s.Configuration()
    k8s_config.load_kube_config(config_file=path, client_configuration=configuration)
    configuration.connection_pool_maxsize = 16  # the write pool (8) and the two watches
    return k8s.ApiClient(configuration)


def add_kubelet_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG"), required="KUBECONFIG" not in os.environ,
                        help="kubeconfig of the cluster (default $KUBECONFIG)")
    parser.add_argument("--state-dir", type=Path, default=None,
                        help="where pod logs go (logs/pods/<ns>_<name>.log); default: the kubeconfig's directory")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))


def run_kubelet_from_args(args: argparse.Namespace) -> int:
    """Run until SIGTERM/SIGINT; then every fake vLLM process is stopped and 0 returned."""
    configure_logging(level=args.log_level)
    state_dir = args.state_dir or Path(args.kubeconfig).resolve().parent
    try:
        api_client = _client_from_kubeconfig(args.kubeconfig)
    except (k8s_config.ConfigException, OSError) as exc:
        print(f"sim kubelet: cannot use kubeconfig {args.kubeconfig}: {exc}", file=sys.stderr)
        return 2
    kubelet = SimKubelet(api_client, state_dir=state_dir)

    async def until_signal() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await kubelet.run(stop)

    asyncio.run(until_signal())
    return 0


def add_reclaim_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("node", help="the Node whose VM is reclaimed")
    parser.add_argument("--in", dest="in_seconds", type=float, required=True, metavar="SECONDS",
                        help="seconds from now until the VM is gone (graceful shutdown starts 30 s before)")
    parser.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG"), required="KUBECONFIG" not in os.environ,
                        help="kubeconfig of the cluster (default $KUBECONFIG)")


def reclaim_from_args(args: argparse.Namespace) -> int:
    if args.in_seconds < 0:
        print("reclaim: --in must not be negative", file=sys.stderr)
        return 2
    at = _utcnow() + timedelta(seconds=args.in_seconds)
    try:
        api_client = _client_from_kubeconfig(args.kubeconfig)
    except (k8s_config.ConfigException, OSError) as exc:
        print(f"reclaim: cannot use kubeconfig {args.kubeconfig}: {exc}", file=sys.stderr)
        return 2
    try:
        reclaim(api_client, args.node, at=at)
    except Exception as exc:  # noqa: BLE001 - a CLI: one line, not a traceback
        reason = getattr(exc, "reason", None) or exc
        print(f"reclaim: cannot annotate node {args.node!r}: {reason}", file=sys.stderr)
        return 1
    finally:
        api_client.close()
    print(f"node {args.node}: VM reclaimed at {format_time(at)} "
          f"(graceful shutdown from {format_time(at - timedelta(seconds=SHUTDOWN_GRACE_SECONDS))})")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["reclaim"]:
        parser = argparse.ArgumentParser(prog="python -m spotguard.sim.kubelet reclaim",
                                         description="Reclaim a simulated VM: GKE graceful node shutdown, then "
                                                     "the Node is gone.")
        add_reclaim_arguments(parser)
        return reclaim_from_args(parser.parse_args(argv[1:]))
    parser = argparse.ArgumentParser(prog="python -m spotguard.sim.kubelet",
                                     description="The simulated kubelet of every managed Node in the cluster.",
                                     epilog="Also: python -m spotguard.sim.kubelet reclaim NODE --in SECONDS")
    add_kubelet_arguments(parser)
    code = run_kubelet_from_args(parser.parse_args(argv))
    sys.stdout.flush()
    sys.stderr.flush()
    # The API thread pool may be inside a call (bounded by its timeout); every process we started
    # is already stopped, so there is nothing left to wait for.
    os._exit(code)


if __name__ == "__main__":
    raise SystemExit(main())

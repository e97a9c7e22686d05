"""What the simulated kubelet reports, computed the way the real kubelet computes it.

Pure functions over plain dicts (no API calls, no processes), so they can be reasoned about and
tested without a cluster: a container's status, the pod's ContainersReady / Ready conditions (every
container ready AND every readiness gate True), its phase, the minimal status patch, and the pod IP
pool. Sources: pkg/kubelet/status/generate.go and kubelet_pods.go (getPhase) of Kubernetes v1.36.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

TERMINAL_PHASES = ("Succeeded", "Failed")
NODE_SHUTDOWN_REASON = "Terminated"
NODE_SHUTDOWN_MESSAGE = "Pod was terminated in response to imminent node shutdown."
NODE_SHUTDOWN_REJECT_REASON = "NodeShutdown"
NODE_SHUTDOWN_REJECT_MESSAGE = "Pod was rejected: Pod was rejected as the node is shutting down."
NODE_SHUTTING_DOWN = "node is shutting down"


# =================================================================================================
# Time


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def format_time(moment: datetime) -> str:
    """metav1.Time: RFC 3339, whole seconds, UTC."""
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def micro_time(moment: datetime) -> str:
    """metav1.MicroTime (Lease renewTime)."""
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str) -> datetime:
    """RFC 3339 -> aware datetime (a value without offset is taken as UTC)."""
    moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def now_rfc3339() -> str:
    return format_time(utcnow())


# =================================================================================================
# Pod status, as the kubelet computes it (pkg/kubelet/status/generate.go, kubelet_pods.go getPhase).
# Pure functions over plain dicts, so they can be reasoned about (and tested) without a cluster.


@dataclass
class Container:
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
        self.state, self.started_at, self.ready = "running", now_rfc3339(), False
        self.finished_at, self.exit_code, self.reason = None, 0, ""

    def terminate(self, exit_code: int, *, reason: str | None = None) -> None:
        if self.state == "terminated":
            return
        if self.state == "waiting" and self.started_at is None:
            # Never ran (the pod went away before it started): what the kubelet reports then.
            reason = reason or "ContainerStatusUnknown"
        self.state, self.ready, self.exit_code = "terminated", False, exit_code
        self.reason = reason or ("Completed" if exit_code == 0 else "Error")
        self.finished_at = now_rfc3339()

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


def containers_ready_condition(spec: dict[str, Any], containers: list[Container], phase: str) -> dict[str, Any]:
    """ContainersReady: True when every regular container (and sidecar) is ready."""
    if phase in TERMINAL_PHASES:
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


def pod_phase(spec: dict[str, Any], containers: list[Container], *, terminal: bool) -> str:
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


def condition_patch(current: list[dict[str, Any]], desired: list[dict[str, Any]], now: str, *,
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


def matches(desired: Any, current: Any) -> bool:
    """True when `current` holds everything `desired` says (extra fields in `current` are ignored)."""
    if isinstance(desired, dict):
        if not isinstance(current, dict):
            return not desired and not current
        for key, value in desired.items():
            if value in (None, {}, []):
                if current.get(key) not in (None, {}, []):
                    return False
            elif not matches(value, current.get(key)):
                return False
        return True
    if isinstance(desired, list):
        return (isinstance(current, list) and len(current) == len(desired)
                and all(matches(d, c) for d, c in zip(desired, current)))
    return desired == current


def pod_status_patch(current: dict[str, Any], desired: dict[str, Any], now: str) -> dict[str, Any] | None:
    patch: dict[str, Any] = {}
    for key in ("phase", "reason", "message", "hostIP", "hostIPs", "podIP", "podIPs", "startTime"):
        if key in desired and current.get(key) != desired[key]:
            patch[key] = desired[key]
    for key in ("containerStatuses", "initContainerStatuses"):
        # Lists without a merge key: sent whole when anything in them changed.
        if key in desired and not matches(desired[key], current.get(key)):
            patch[key] = desired[key]
    conditions = condition_patch(current.get("conditions") or [], desired["conditions"], now)
    if conditions:
        patch["conditions"] = conditions
    return patch or None


def resource_version(obj: dict[str, Any] | None) -> int:
    try:
        return int(((obj or {}).get("metadata") or {}).get("resourceVersion") or -1)
    except ValueError:  # opaque by contract; etcd-backed servers give integers
        return -1


def priority(pod: dict[str, Any]) -> int:
    return int((pod.get("spec") or {}).get("priority") or 0)


def annotations_of(obj: dict[str, Any]) -> dict[str, str]:
    return (obj.get("metadata") or {}).get("annotations") or {}


def is_terminal(pod: dict[str, Any]) -> bool:
    return ((pod.get("status") or {}).get("phase")) in TERMINAL_PHASES


# =================================================================================================
# Pod IPs: one /16 of 127.0.0.0/8 per cluster, 127.<n>.0.1 upward, n in 1..254 derived from the API
# server's URL (stable across kubelet restarts; several clusters on one machine rarely share it).
# 127.0.0.0/16 is left to the host: 127.0.0.1 is every node's address.


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

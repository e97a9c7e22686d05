"""Kubernetes adapter: what spotguard does to its node and its pods, on the plumbing of `kubeapi`.

The operations (cordon and taint as one PATCH, the readiness condition, evictions that name the
blocking PDB, Events, access checks) are methods of `Kube`; the pure functions at the bottom turn
the API's JSON dicts into the lifecycle's `PodFacts` / `Progress` and back. Every call is
synchronous (that is the client); the daemon runs them with asyncio.to_thread.
"""

from __future__ import annotations

import re
import time
from datetime import datetime, timezone
from typing import Any, Mapping

from spotguard import handover, placeholder
from spotguard.kubeapi import USER_AGENT, Api, KubeError, ListWatch, Obj  # noqa: F401 - re-exported
from spotguard.evictions import EvictionOutcome
from spotguard.lifecycle import (
    SERVING_CONDITION,
    TAINT_KEY,
    NotEvictable,
    Phase,
    PlaceholderFacts,
    PodFacts,
    Progress,
    Report,
    UpdateNode,
)

ANNOTATION_PREFIX = "spotguard.io/"
METRICS_PORT_ANNOTATION = "spotguard.io/metrics-port"
METRICS_PATH_ANNOTATION = "spotguard.io/metrics-path"
EVICT_ANNOTATION = "spotguard.io/evict"
# The pod finishes its in-flight requests itself on SIGTERM: evict it as soon as it is out of rotation.
DRAINS_ON_SIGTERM_ANNOTATION = "spotguard.io/drains-on-sigterm"
MIRROR_ANNOTATION = "kubernetes.io/config.mirror"
# On every Eviction spotguard sends: the chart's admission policies use it to find its evictions.
EVICTION_LABEL = "spotguard.io/evicted-by"
# On every Event spotguard posts, for the same reason.
EVENT_LABEL = "spotguard.io/reported-by"
# Node annotations that hold one notice's progress (see Progress).
PROGRESS_ANNOTATIONS = {
    "phase": "spotguard.io/phase",
    "notice_kind": "spotguard.io/notice-kind",
    "deadline": "spotguard.io/deadline",
    "noticed_at": "spotguard.io/noticed-at",
    "phase_since": "spotguard.io/phase-since",
    "cordoned_by_us": "spotguard.io/cordoned-by-spotguard",
    "tainted_by_us": "spotguard.io/tainted-by-spotguard",
    "drain_from": "spotguard.io/drain-from",
    "excluded_by_us": "spotguard.io/lb-excluded-by-spotguard",
}
# The well-known label cloud controllers read: no external load balancer sends traffic through
# this node (--exclude-from-load-balancers).
EXCLUDE_LB_LABEL = "node.kubernetes.io/exclude-from-external-load-balancers"
_SMP = "application/strategic-merge-patch+json"
_MERGE_PATCH = "application/merge-patch+json"


class Kube(Api):
    """The API calls spotguard makes, for one node."""

    def __init__(self, api_client: Any, *, node_name: str, request_timeout: float = 10.0,
                 dry_run: bool = False) -> None:
        super().__init__(api_client, request_timeout=request_timeout)
        self.node_name = node_name
        # Server-side dry run: the API server authorizes, admits, validates and (for evictions)
        # checks PodDisruptionBudgets exactly as for real, then persists nothing.
        self.write_query = {"dryRun": "All"} if dry_run else {}

    # -- the node ---------------------------------------------------------------------------

    def get_node(self) -> Obj:
        return self.call("GET", f"/api/v1/nodes/{self.node_name}")

    def patch_node(self, update: UpdateNode, *, current: Obj | None = None, attempts: int = 5) -> Obj:
        """Apply one UpdateNode. Node taints are a plain list (no merge key), so changing them means
        writing the whole list: done against a known resourceVersion and retried on conflict, so a
        taint another controller adds at the same moment is never lost."""
        node = current or self.get_node()
        for attempt in range(attempts):
            try:
                return self.call("PATCH", f"/api/v1/nodes/{self.node_name}", body=node_patch(update, node),
                                 content_type=_MERGE_PATCH, query=self.write_query)
            except KubeError as error:
                if error.status != 409 or attempt == attempts - 1:
                    raise
                node = self.get_node()
        raise AssertionError("unreachable")

    # -- pods ------------------------------------------------------------------------------

    def pods_path(self) -> tuple[str, dict[str, str]]:
        return "/api/v1/pods", {"fieldSelector": f"spec.nodeName={self.node_name}"}

    def list_pods(self) -> tuple[list[Obj], str]:
        path, query = self.pods_path()
        listed = self.call("GET", path, query=query)
        return listed.get("items", []), listed["metadata"]["resourceVersion"]

    def set_serving(self, pod: PodFacts, value: bool, *, reason: str, message: str) -> None:
        condition = {"type": SERVING_CONDITION, "status": "True" if value else "False", "reason": reason,
                     "message": message, "lastTransitionTime": _rfc3339(time.time())}
        # metadata.uid in the patch is a precondition: never touch a same-named replacement pod.
        body = {"metadata": {"uid": pod.uid}, "status": {"conditions": [condition]}}
        # serving=True is written even in dry-run: it is the gate's normal state, and without it a
        # pod that declares the gate would never become Ready while spotguard is being tried out.
        self.call("PATCH", f"/api/v1/namespaces/{pod.namespace}/pods/{pod.name}/status", body=body,
                  content_type=_SMP, query={} if value else self.write_query)

    # -- surge placeholders (spotguard.placeholder) -------------------------------------------

    def placeholders_path(self) -> tuple[str, dict[str, str]]:
        return "/api/v1/pods", {"labelSelector": f"{placeholder.NODE_LABEL}={self.node_name}"}

    def create_placeholder(self, manifest: Obj) -> bool:
        """POST a placeholder; False when it exists already (a retry, or a restarted daemon)."""
        namespace = manifest["metadata"]["namespace"]
        try:
            self.call("POST", f"/api/v1/namespaces/{namespace}/pods", body=manifest, query=self.write_query)
        except KubeError as error:
            if error.status == 409:
                return False
            raise
        return True

    # -- surge hand-over (spotguard.handover) --------------------------------------------------

    def release_pod(self, pod: PodFacts, key: str) -> bool:
        """Take the pod from its ReplicaSet; False when it is gone (or is another pod by now)."""
        return self._patch_pod_metadata(pod, handover.release_patch(pod.uid, key))

    def readopt_pod(self, pod: PodFacts, key: str) -> None:
        self._patch_pod_metadata(pod, handover.readopt_patch(pod.uid, key))

    def _patch_pod_metadata(self, pod: PodFacts, patch: Obj) -> bool:
        try:
            self.call("PATCH", f"/api/v1/namespaces/{pod.namespace}/pods/{pod.name}", body=patch,
                      content_type=_MERGE_PATCH, query=self.write_query)
        except KubeError as error:
            if error.status in (404, 409):  # 409: the uid precondition, a same-named pod
                return False
            raise
        return True

    def replicas_ready(self, namespace: str, key: str) -> bool:
        """Has the ReplicaSet `key` ("<replicaset>/<hash>") names every replica Ready (without the
        pods released from it)?"""
        name, _, template_hash = key.partition("/")
        cached = {"resourceVersion": "0"}   # served from the API server's watch cache, not etcd
        try:
            replicaset = self.call("GET", f"/apis/apps/v1/namespaces/{namespace}/replicasets/{name}", query=cached)
        except KubeError as error:
            if error.status == 404:
                return handover.replicas_ready(None, [])
            raise
        pods = self.call("GET", f"/api/v1/namespaces/{namespace}/pods",
                         query={**cached, "labelSelector": f"{handover.TEMPLATE_HASH_LABEL}={template_hash}"})
        return handover.replicas_ready(replicaset, pods.get("items", []))

    def delete_placeholder(self, found: PlaceholderFacts) -> None:
        try:
            self.call("DELETE", f"/api/v1/namespaces/{found.namespace}/pods/{found.name}", query=self.write_query)
        except KubeError as error:
            if error.status != 404:
                raise

    def endpoints_ready(self, namespaces: set[str]) -> dict[str, bool]:
        """Pod UID -> does any EndpointSlice in these namespaces list it as ready?"""
        ready: dict[str, bool] = {}
        for namespace in sorted(namespaces):
            slices = self.call("GET", f"/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices")
            for endpoint_slice in slices.get("items", []):
                for endpoint in endpoint_slice.get("endpoints") or []:
                    uid = (endpoint.get("targetRef") or {}).get("uid")
                    if uid:
                        # Absent "ready" means ready, per the EndpointSlice API.
                        is_ready = (endpoint.get("conditions") or {}).get("ready") is not False
                        ready[uid] = ready.get(uid, False) or is_ready
        return ready

    def evict(self, pod: PodFacts, *, grace_seconds: int) -> tuple[EvictionOutcome, str | None]:
        """Ask the Eviction API (which enforces PodDisruptionBudgets) to evict the pod.

        Returns the outcome and, when refused, the PodDisruptionBudget(s) responsible.
        """
        # The label routes the eviction to the chart's admission policy that checks the pod's node
        # (daemonset/templates/validatingadmissionpolicy.yaml); without it the chart refuses it.
        body = {"apiVersion": "policy/v1", "kind": "Eviction",
                "metadata": {"name": pod.name, "namespace": pod.namespace, "labels": {EVICTION_LABEL: "spotguard"}},
                "deleteOptions": {"gracePeriodSeconds": grace_seconds, "preconditions": {"uid": pod.uid}}}
        try:
            self.call("POST", f"/api/v1/namespaces/{pod.namespace}/pods/{pod.name}/eviction", body=body,
                      query=self.write_query)
        except KubeError as error:
            if error.status == 404:
                return EvictionOutcome.GONE, None
            if error.status == 409:  # UID precondition: the pod we meant is already gone
                return EvictionOutcome.GONE, None
            if error.status == 429:
                named = blocking_pdb(error.body)
                if named is not None or _is_pdb_refusal(error.body):
                    return EvictionOutcome.BLOCKED_BY_PDB, named or self._pdbs_for(pod)
                return EvictionOutcome.ERROR, f"HTTP 429: {error.body.get('message', 'too many requests')}"
            if error.status == 500 and "more than one" in str(error.body.get("message", "")).lower():
                return EvictionOutcome.MULTIPLE_PDBS, self._pdbs_for(pod)
            return EvictionOutcome.ERROR, str(error)
        return EvictionOutcome.EVICTED, None

    def _pdbs_for(self, pod: PodFacts) -> str | None:
        try:
            listed = self.call("GET", f"/apis/policy/v1/namespaces/{pod.namespace}/poddisruptionbudgets")
            labels = self.call("GET", f"/api/v1/namespaces/{pod.namespace}/pods/{pod.name}")["metadata"].get(
                "labels") or {}
        except KubeError:
            return None
        names = [p["metadata"]["name"] for p in listed.get("items", [])
                 if selector_matches((p.get("spec") or {}).get("selector"), labels)]
        return ",".join(sorted(names)) or None

    # -- events ------------------------------------------------------------------------------

    def record_event(self, report: Report, *, node_uid: str | None) -> None:
        if report.pod is not None:
            namespace = report.pod.namespace
            involved = {"kind": "Pod", "apiVersion": "v1", "namespace": namespace, "name": report.pod.name,
                        "uid": report.pod.uid}
        else:
            namespace = "default"  # where kubectl looks for a Node's events
            involved = {"kind": "Node", "apiVersion": "v1", "name": self.node_name, "uid": node_uid or ""}
        now = _rfc3339(time.time())
        event = {
            # The label routes a pod's Event to the chart's policy that checks the pod's node.
            "metadata": {"generateName": f"{involved['name']}.spotguard.", "namespace": namespace,
                         "labels": {EVENT_LABEL: "spotguard"}},
            "involvedObject": involved, "reason": report.reason, "message": report.message[:1024],
            "type": "Warning" if report.warning else "Normal",
            "source": {"component": "spotguard", "host": self.node_name},
            "reportingComponent": "spotguard.io/spotguard", "reportingInstance": self.node_name,
            "firstTimestamp": now, "lastTimestamp": now, "count": 1,
        }
        self.call("POST", f"/api/v1/namespaces/{namespace}/events", body=event, query=self.write_query)

    # -- checks ------------------------------------------------------------------------------

    def can_i(self, *, verb: str, resource: str, group: str = "", subresource: str = "",
              namespace: str = "", name: str = "") -> tuple[bool, str]:
        review = {"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
                  "spec": {"resourceAttributes": {"verb": verb, "resource": resource, "group": group,
                                                  "subresource": subresource, "namespace": namespace,
                                                  "name": name}}}
        answer = self.call("POST", "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews", body=review)
        status = answer.get("status", {})
        return bool(status.get("allowed")), status.get("reason", "") or status.get("evaluationError", "")


# ---------------------------------------------------------------------------------------------
# Pure translations between API objects and the lifecycle's types


def is_serving_pod(pod: Obj) -> bool:
    gates = (pod.get("spec") or {}).get("readinessGates") or []
    return any(g.get("conditionType") == SERVING_CONDITION for g in gates)


def not_evictable_reason(pod: Obj) -> NotEvictable | None:
    metadata = pod.get("metadata") or {}
    if any(ref.get("kind") == "DaemonSet" and ref.get("controller")
           for ref in metadata.get("ownerReferences") or []):
        return NotEvictable.DAEMONSET
    annotations = metadata.get("annotations") or {}
    if MIRROR_ANNOTATION in annotations:
        return NotEvictable.MIRROR
    if str(annotations.get(EVICT_ANNOTATION, "")).strip().lower() == "false":
        return NotEvictable.OPTED_OUT
    if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
        return NotEvictable.FINISHED
    return None


def condition_status(pod: Obj, condition_type: str) -> bool | None:
    for condition in (pod.get("status") or {}).get("conditions") or []:
        if condition.get("type") == condition_type:
            return {"True": True, "False": False}.get(condition.get("status"))
    return None


def pod_facts(pod: Obj, *, endpoints_ready: bool | None = None, in_flight: int | None = None,
              metrics_unreadable: bool = False, replacement_ready: bool | None = None) -> PodFacts:
    metadata = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    grace = spec.get("terminationGracePeriodSeconds")
    return PodFacts(
        namespace=metadata.get("namespace", ""),
        name=metadata.get("name", ""),
        uid=metadata.get("uid", ""),
        serving=is_serving_pod(pod),
        serving_condition=condition_status(pod, SERVING_CONDITION),
        not_evictable=not_evictable_reason(pod),
        terminating=metadata.get("deletionTimestamp") is not None,
        termination_grace_seconds=int(grace) if isinstance(grace, int) and grace >= 0 else 30,
        endpoints_ready=endpoints_ready,
        in_flight=in_flight,
        metrics_unreadable=metrics_unreadable,
        drains_itself=drains_on_sigterm(pod),
        surge=placeholder.wants_surge(pod),
        release_key=handover.release_key(pod),
        released_from="/".join(released) if (released := handover.released_from(pod)) else None,
        replacement_ready=replacement_ready,
    )


def placeholder_facts(pod: Obj) -> PlaceholderFacts:
    metadata = pod.get("metadata") or {}
    running = bool((pod.get("spec") or {}).get("nodeName")) and (pod.get("status") or {}).get("phase") == "Running"
    return PlaceholderFacts(namespace=metadata.get("namespace", ""), name=metadata.get("name", ""),
                            for_uid=(metadata.get("labels") or {}).get(placeholder.FOR_LABEL, ""),
                            running=running and metadata.get("deletionTimestamp") is None)


def drains_on_sigterm(pod: Obj) -> bool:
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    return str(annotations.get(DRAINS_ON_SIGTERM_ANNOTATION, "")).strip().lower() == "true"


def metrics_url(pod: Obj) -> str | None:
    """Where the pod's vLLM serves /metrics: pod IP, port and path from spotguard.io/ annotations."""
    ip = (pod.get("status") or {}).get("podIP")
    if not ip:
        return None
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    port = str(annotations.get(METRICS_PORT_ANNOTATION, "8000")).strip()
    # isascii: str.isdigit() is also true for digits int() refuses ("²"), which would raise here
    # on every drain step and stall the drain of the whole node.
    if not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        return None
    path = str(annotations.get(METRICS_PATH_ANNOTATION, "/metrics")).strip() or "/metrics"
    if not path.startswith("/"):
        path = "/" + path
    host = f"[{ip}]" if ":" in ip else ip
    return f"http://{host}:{port}{path}"


def node_has_taint(node: Obj) -> bool:
    return any(t.get("key") == TAINT_KEY for t in (node.get("spec") or {}).get("taints") or [])


def node_unschedulable(node: Obj) -> bool:
    return bool((node.get("spec") or {}).get("unschedulable"))


def node_excluded_from_lb(node: Obj) -> bool:
    return EXCLUDE_LB_LABEL in ((node.get("metadata") or {}).get("labels") or {})


def progress_from_node(node: Obj) -> Progress | None:
    """Read a notice's progress back from the node annotations; None if absent or unreadable."""
    annotations = (node.get("metadata") or {}).get("annotations") or {}
    values = {field: annotations.get(key) for field, key in PROGRESS_ANNOTATIONS.items()}
    # "guarding" is no notice, not a drain to resume (spotguard never writes it; the lifecycle has
    # no step for it).
    if values["phase"] is None or values["phase"] == Phase.GUARDING.value:
        return None
    try:
        return Progress(
            phase=Phase(values["phase"]),
            notice_kind=str(values["notice_kind"]),
            deadline=_parse_rfc3339(values["deadline"]),
            noticed_at=_parse_rfc3339(values["noticed_at"]),
            phase_since=_parse_rfc3339(values["phase_since"]),
            cordoned_by_us=values["cordoned_by_us"] == "true",
            tainted_by_us=values["tainted_by_us"] == "true",
            drain_from=None if values["drain_from"] is None else _parse_rfc3339(values["drain_from"]),
            excluded_by_us=values["excluded_by_us"] == "true",
        )
    except (ValueError, TypeError):
        return None


def node_patch(update: UpdateNode, node: Obj) -> Obj:
    """The JSON merge patch for one UpdateNode, given the node as last seen."""
    patch: Obj = {}
    spec: Obj = {}
    metadata: Obj = {}
    if update.unschedulable is not None:
        spec["unschedulable"] = update.unschedulable
    if update.taint_value is not None or update.remove_taint:
        others = [t for t in (node.get("spec") or {}).get("taints") or [] if t.get("key") != TAINT_KEY]
        ours = [{"key": TAINT_KEY, "value": update.taint_value, "effect": "NoSchedule"}] \
            if update.taint_value is not None else []
        spec["taints"] = others + ours
        # The whole list is written: only against the version it was computed from.
        metadata["resourceVersion"] = (node.get("metadata") or {}).get("resourceVersion")
    if spec:
        patch["spec"] = spec
    if update.exclude_from_lb is not None:
        metadata["labels"] = {EXCLUDE_LB_LABEL: "true" if update.exclude_from_lb else None}
    if update.progress is not None:
        progress = update.progress
        metadata["annotations"] = {
            PROGRESS_ANNOTATIONS["phase"]: progress.phase.value,
            PROGRESS_ANNOTATIONS["notice_kind"]: progress.notice_kind,
            PROGRESS_ANNOTATIONS["deadline"]: _rfc3339(progress.deadline),
            PROGRESS_ANNOTATIONS["noticed_at"]: _rfc3339(progress.noticed_at),
            PROGRESS_ANNOTATIONS["phase_since"]: _rfc3339(progress.phase_since),
            PROGRESS_ANNOTATIONS["cordoned_by_us"]: "true" if progress.cordoned_by_us else "false",
            PROGRESS_ANNOTATIONS["tainted_by_us"]: "true" if progress.tainted_by_us else "false",
            PROGRESS_ANNOTATIONS["drain_from"]: None if progress.drain_from is None else _rfc3339(progress.drain_from),
            # Written only when true, so nodes handled without the option keep the annotations they had.
            PROGRESS_ANNOTATIONS["excluded_by_us"]: "true" if progress.excluded_by_us else None,
        }
    elif update.clear_progress:
        metadata["annotations"] = {key: None for key in PROGRESS_ANNOTATIONS.values()}
    if metadata:
        patch["metadata"] = metadata
    return patch


_PDB_NAME = re.compile(r"disruption budget ([a-z0-9]([-a-z0-9.]*[a-z0-9])?)", re.IGNORECASE)


def blocking_pdb(status: Obj) -> str | None:
    """The PDB named in a 429 Eviction answer (details.causes[].message), if any."""
    for cause in _causes(status):
        match = _PDB_NAME.search(str(cause.get("message", "")))
        if match:
            return match.group(1)
    return None


def _is_pdb_refusal(status: Obj) -> bool:
    return any(c.get("reason") == "DisruptionBudget" for c in _causes(status)) or \
        "disruption budget" in str(status.get("message", "")).lower()


def _causes(status: Obj) -> list[Obj]:
    """details.causes of a Status, keeping only what has the documented shape (a body that is not
    a Status must not turn an Eviction answer into an exception)."""
    details = status.get("details")
    causes = details.get("causes") if isinstance(details, dict) else None
    return [cause for cause in causes if isinstance(cause, dict)] if isinstance(causes, list) else []


def selector_matches(selector: Obj | None, labels: Mapping[str, str]) -> bool:
    """metav1.LabelSelector semantics; a PDB with a null selector selects nothing (policy/v1)."""
    if selector is None:
        return False
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions") or []:
        key, operator, values = expression.get("key"), expression.get("operator"), expression.get("values") or []
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and key in labels and labels[key] in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return True


def _rfc3339(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, tz=timezone.utc).isoformat(timespec="milliseconds") \
        .replace("+00:00", "Z")


def _parse_rfc3339(value: Any) -> float:
    # Milliseconds, as written: the lifecycle compares what it stored with what it reads back.
    return round(datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp(), 3)

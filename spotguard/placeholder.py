"""Surge placeholders: pods that hold a serving pod's resources on new capacity. Pure functions.

A placeholder asks the scheduler for what the serving pod asks for (each container's requests and
limits, GPUs included; the pod's node selector, affinity, tolerations, runtime class and
scheduler) but never for this node, at the chart's low PriorityClass (negative, preemptionPolicy
Never). Nothing fits it on the pool's other nodes, so the node-pool autoscaler adds one; when the
serving pod is evicted, its replacement (normal priority) preempts the placeholder there. The
placeholder runs a pause image, as the cluster autoscaler's own overprovisioning recipe does, with
no token, no volumes and every privilege dropped, so it passes the restricted Pod Security level.

It is owned by the serving pod (no controller, no blockOwnerDeletion), so the garbage collector
deletes it once that pod is gone; spotguard deletes it itself on a cancelled notice, when it gives
the surge up, and when it finds one with no notice behind it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from spotguard.handover import RELEASED_ANNOTATION

Obj = dict[str, Any]

# Labels of every placeholder: the node whose pod it stands in for (the daemon lists and the chart's
# admission policy checks placeholders by it), and that pod's uid.
NODE_LABEL = "spotguard.io/placeholder-node"
FOR_LABEL = "spotguard.io/placeholder-for"
SURGE_ANNOTATION = "spotguard.io/surge"
# Kinds whose pods come back when evicted: a placeholder is only worth it for those.
REPLACING_OWNERS = ("ReplicaSet", "StatefulSet")


@dataclass(frozen=True)
class Settings:
    priority_class: str
    image: str


def wants_surge(pod: Obj) -> bool:
    """Annotated spotguard.io/surge: "true", and owned by a controller that replaces it (or released
    from one by spotguard: spotguard.handover)."""
    metadata = pod.get("metadata") or {}
    annotations = metadata.get("annotations") or {}
    opted_in = str(annotations.get(SURGE_ANNOTATION, "")).strip().lower() == "true"
    replaced = RELEASED_ANNOTATION in annotations or any(
        ref.get("controller") and ref.get("kind") in REPLACING_OWNERS for ref in metadata.get("ownerReferences") or [])
    return opted_in and replaced


def name_for(pod_name: str, pod_uid: str) -> str:
    """Stable per serving pod, so a restarted daemon finds its placeholder instead of adding one."""
    return f"{pod_name[:200]}-surge-{pod_uid[:8]}"


def manifest(pod: Obj, *, node_name: str, settings: Settings) -> Obj:
    """The placeholder for `pod` (a serving pod on `node_name`), ready to POST."""
    metadata, spec = pod.get("metadata") or {}, pod.get("spec") or {}
    containers = [{
        "name": f"hold-{index}",
        "image": settings.image,
        "resources": {key: value for key, value in (container.get("resources") or {}).items()
                      if key in ("requests", "limits")},
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]}},
    } for index, container in enumerate(spec.get("containers") or [])]
    placeholder_spec: Obj = {
        "priorityClassName": settings.priority_class,
        "containers": containers,
        "affinity": _never_on(node_name, spec.get("affinity")),
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": 0,   # nothing to stop: let the preemptor in at once
        "securityContext": {"runAsNonRoot": True, "runAsUser": 65535, "runAsGroup": 65535,
                            "seccompProfile": {"type": "RuntimeDefault"}},
    }
    for key in ("nodeSelector", "tolerations", "runtimeClassName", "schedulerName", "topologySpreadConstraints"):
        if spec.get(key):
            placeholder_spec[key] = copy.deepcopy(spec[key])
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": name_for(metadata.get("name", "pod"), metadata.get("uid", "")),
            "namespace": metadata.get("namespace"),
            "labels": {NODE_LABEL: node_name, FOR_LABEL: metadata.get("uid", ""),
                       "app.kubernetes.io/managed-by": "spotguard"},
            # The cluster autoscaler may remove a node that holds only placeholders.
            "annotations": {"cluster-autoscaler.kubernetes.io/safe-to-evict": "true"},
            "ownerReferences": [{"apiVersion": "v1", "kind": "Pod", "name": metadata.get("name"),
                                 "uid": metadata.get("uid")}],
        },
        "spec": placeholder_spec,
    }


def _never_on(node_name: str, affinity: Obj | None) -> Obj:
    """The pod's affinity, with "not on this node" added to every required node selector term
    (terms are ORed: each must exclude it). matchFields on metadata.name: a node's hostname label
    need not be its name."""
    result = copy.deepcopy(affinity or {})
    node_affinity = result.setdefault("nodeAffinity", {})
    required = node_affinity.setdefault("requiredDuringSchedulingIgnoredDuringExecution", {})
    not_here = {"key": "metadata.name", "operator": "NotIn", "values": [node_name]}
    terms = required.get("nodeSelectorTerms") or [{}]
    required["nodeSelectorTerms"] = [{**term, "matchFields": [*(term.get("matchFields") or []), not_here]}
                                     for term in terms]
    return result

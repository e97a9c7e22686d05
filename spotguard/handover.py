"""Surge by hand-over: a Deployment's pod released from its ReplicaSet, so its replacement starts
while it still serves. Pure functions.

A ReplicaSet owns the pods its selector matches, and a Deployment's ReplicaSet selects on the
`pod-template-hash` label. Take that label off a pod and the ReplicaSet lets the pod go (it drops
its ownerReference) and creates a replacement at once, as for any missing replica; the pod itself
keeps running, and keeps serving, because a Service selects on the app's labels, never on the hash.
spotguard does that on a long notice, and takes the released pod out of rotation only once the
ReplicaSet has all its replicas Ready again: the pool never serves with one replica fewer. The
replacement is an ordinary pod of the ReplicaSet: Pending, it makes the node-pool autoscaler add
the capacity it needs (no placeholder is needed). Its former ReplicaSet is remembered in an
annotation, so a restarted daemon knows the pod.

A withdrawn notice gives the label back, with the lowest pod-deletion-cost: the ReplicaSet adopts
the pod again and removes one replica, and it removes a not-ready one first (the replacement, while
it still starts), else the lowest cost, this pod. It never picks another Ready pod, here or on
another node.

StatefulSet pods cannot be handed over (a replacement would take the same name), nor pods with a
PersistentVolumeClaim (a ReadWriteOnce volume would hold the replacement until the pod is gone):
they surge with a placeholder (spotguard.placeholder).
"""

from __future__ import annotations

from typing import Any

Obj = dict[str, Any]

TEMPLATE_HASH_LABEL = "pod-template-hash"
# "<replicaset>/<pod-template-hash>" on a pod spotguard released; the chart's admission policy
# checks that it names the pod's own ReplicaSet and hash.
RELEASED_ANNOTATION = "spotguard.io/released-from"
# The ReplicaSet controller removes pods with a lower cost first (after unscheduled, pending and
# not-ready ones): a pod given back goes before any other Ready pod.
DELETION_COST_ANNOTATION = "controller.kubernetes.io/pod-deletion-cost"
LOWEST_DELETION_COST = str(-2**31)


def release_key(pod: Obj) -> str | None:
    """"<replicaset>/<hash>" for a pod a ReplicaSet controls through the hash label (a
    Deployment's pod), None for any other pod."""
    metadata = pod.get("metadata") or {}
    template_hash = (metadata.get("labels") or {}).get(TEMPLATE_HASH_LABEL)
    owners = [ref.get("name") for ref in metadata.get("ownerReferences") or []
              if ref.get("controller") and ref.get("kind") == "ReplicaSet" and ref.get("apiVersion") == "apps/v1"
              and ref.get("name")]
    claims = any("persistentVolumeClaim" in volume for volume in (pod.get("spec") or {}).get("volumes") or [])
    if not template_hash or len(owners) != 1 or claims:
        return None
    return f"{owners[0]}/{template_hash}"


def released_from(pod: Obj) -> tuple[str, str] | None:
    """(replicaset, hash) of a pod spotguard released, None for any other pod (or a garbled value)."""
    value = str(((pod.get("metadata") or {}).get("annotations") or {}).get(RELEASED_ANNOTATION, ""))
    replicaset, _, template_hash = value.partition("/")
    return (replicaset, template_hash) if replicaset and template_hash and "/" not in template_hash else None


def release_patch(uid: str, key: str) -> Obj:
    """Merge patch that releases the pod `key` names; metadata.uid is a precondition (never touch a
    same-named pod)."""
    return {"metadata": {"uid": uid, "labels": {TEMPLATE_HASH_LABEL: None}, "annotations": {RELEASED_ANNOTATION: key}}}


def readopt_patch(uid: str, key: str) -> Obj:
    """Merge patch that gives a released pod its label back, so its ReplicaSet adopts it again, and
    the lowest deletion cost, so of the replicas it then has one too many of it removes a not-ready
    one or this one."""
    template_hash = key.partition("/")[2]
    return {"metadata": {"uid": uid, "labels": {TEMPLATE_HASH_LABEL: template_hash},
                         "annotations": {RELEASED_ANNOTATION: None, DELETION_COST_ANNOTATION: LOWEST_DELETION_COST}}}


def replicas_ready(replicaset: Obj | None, pods: list[Obj]) -> bool:
    """Has the ReplicaSet every replica Ready without the pods released from it? Counted from its
    own pods (those still carrying its hash and ownerReference), not from its status, which can lag
    the release by a sync. A ReplicaSet that is gone, or scaled to 0 by a rollout, waits for nothing."""
    if replicaset is None:
        return True
    metadata = replicaset.get("metadata") or {}
    wanted = (replicaset.get("spec") or {}).get("replicas", 1)
    ready = 0
    for pod in pods:
        pod_metadata = pod.get("metadata") or {}
        owned = any(ref.get("controller") and ref.get("uid") == metadata.get("uid")
                    for ref in pod_metadata.get("ownerReferences") or [])
        pod_ready = any(c.get("type") == "Ready" and c.get("status") == "True"
                        for c in (pod.get("status") or {}).get("conditions") or [])
        if owned and pod_ready and not pod_metadata.get("deletionTimestamp"):
            ready += 1
    return ready >= wanted

"""spotguard.handover: which pods can be handed over, the patches that do it, and when the
ReplicaSet has its replicas back."""

from __future__ import annotations

from spotguard import handover
from spotguard import kube as k

RS_UID = "rs-uid"


def deployment_pod(name: str = "vllm-7d9f-abcde", *, ready: bool = True, owner_uid: str = RS_UID,
                   deleting: bool = False) -> dict:
    metadata = {"name": name, "namespace": "ml", "uid": f"uid-{name}",
                "labels": {"app": "vllm", "pod-template-hash": "7d9f"},
                "annotations": {"spotguard.io/surge": "true"},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "vllm-7d9f",
                                     "uid": owner_uid, "controller": True}]}
    if deleting:
        metadata["deletionTimestamp"] = "2026-12-01T10:00:00Z"
    return {"metadata": metadata, "spec": {"readinessGates": [{"conditionType": "spotguard.io/serving"}]},
            "status": {"conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}


def released(pod: dict) -> dict:
    """What the API server holds after the release and the ReplicaSet letting go."""
    metadata = dict(pod["metadata"], labels={"app": "vllm"}, ownerReferences=[],
                    annotations={**pod["metadata"]["annotations"], handover.RELEASED_ANNOTATION: "vllm-7d9f/7d9f"})
    return {**pod, "metadata": metadata}


def replicaset(replicas: int) -> dict:
    return {"metadata": {"name": "vllm-7d9f", "uid": RS_UID}, "spec": {"replicas": replicas}}


def test_a_deployments_pod_can_be_handed_over_and_others_cannot():
    assert handover.release_key(deployment_pod()) == "vllm-7d9f/7d9f"
    statefulset = deployment_pod()
    statefulset["metadata"]["ownerReferences"][0]["kind"] = "StatefulSet"
    no_hash = deployment_pod()
    del no_hash["metadata"]["labels"]["pod-template-hash"]
    not_controller = deployment_pod()
    not_controller["metadata"]["ownerReferences"][0]["controller"] = False
    other_group = deployment_pod()
    other_group["metadata"]["ownerReferences"][0]["apiVersion"] = "example.com/v1"
    # A ReadWriteOnce claim would hold the replacement until the pod is gone: a placeholder then.
    with_claim = deployment_pod()
    with_claim["spec"]["volumes"] = [{"name": "models", "persistentVolumeClaim": {"claimName": "models"}}]
    assert [handover.release_key(p) for p in (statefulset, no_hash, not_controller, other_group, with_claim)] == \
        [None] * 5


def test_the_patches_take_the_hash_label_and_give_it_back_with_a_uid_precondition():
    assert handover.release_patch("uid-1", "vllm-7d9f/7d9f") == {"metadata": {
        "uid": "uid-1", "labels": {"pod-template-hash": None},
        "annotations": {"spotguard.io/released-from": "vllm-7d9f/7d9f"}}}
    assert handover.readopt_patch("uid-1", "vllm-7d9f/7d9f") == {"metadata": {
        "uid": "uid-1", "labels": {"pod-template-hash": "7d9f"},
        "annotations": {"spotguard.io/released-from": None, "controller.kubernetes.io/pod-deletion-cost": "-2147483648"}}}


def test_a_released_pod_is_known_by_its_annotation_and_still_surges():
    facts = k.pod_facts(released(deployment_pod()), replacement_ready=False)
    assert facts.released_from == "vllm-7d9f/7d9f" and facts.release_key is None
    assert facts.surge and facts.replacement_ready is False
    before = k.pod_facts(deployment_pod())
    assert before.release_key == "vllm-7d9f/7d9f" and before.released_from is None and before.surge
    garbled = released(deployment_pod())
    for value in ("", "vllm-7d9f", "/7d9f", "a/b/c"):
        garbled["metadata"]["annotations"][handover.RELEASED_ANNOTATION] = value
        assert handover.released_from(garbled) is None, value


def test_the_replicaset_is_whole_again_when_its_own_ready_pods_reach_its_replicas():
    old = released(deployment_pod("vllm-7d9f-old"))
    others = [deployment_pod("vllm-7d9f-b")]
    starting = deployment_pod("vllm-7d9f-new", ready=False)
    # The released pod no longer counts, whatever its readiness; a starting replacement does not yet.
    assert not handover.replicas_ready(replicaset(2), [old, *others, starting])
    assert handover.replicas_ready(replicaset(2), [old, *others, deployment_pod("vllm-7d9f-new")])
    # Pods of another ReplicaSet with the same hash, or on their way out, do not count.
    assert not handover.replicas_ready(replicaset(2), [*others, deployment_pod("x", owner_uid="other")])
    assert not handover.replicas_ready(replicaset(2), [*others, deployment_pod("y", deleting=True)])


def test_a_replicaset_that_is_gone_or_scaled_to_zero_waits_for_nothing():
    assert handover.replicas_ready(None, [])
    assert handover.replicas_ready(replicaset(0), [])

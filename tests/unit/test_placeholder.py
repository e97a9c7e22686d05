"""spotguard.placeholder: the surge placeholder asks the scheduler for what its pod asks, never here."""

from __future__ import annotations

from spotguard import kube as k
from spotguard import placeholder

SETTINGS = placeholder.Settings(priority_class="spotguard-placeholder", image="registry.k8s.io/pause:3.10.2")


def vllm_pod(**spec_extra) -> dict:
    return {
        "metadata": {"name": "vllm-7d9f-abcde", "namespace": "ml", "uid": "0123456789abcdef",
                     "labels": {"app": "vllm", "pod-template-hash": "7d9f"},
                     "annotations": {"spotguard.io/surge": "true"},
                     "ownerReferences": [{"kind": "ReplicaSet", "name": "vllm-7d9f", "controller": True}]},
        "spec": {
            "nodeName": "gpu-1",
            "serviceAccountName": "vllm",
            "nodeSelector": {"cloud.google.com/gke-spot": "true"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "runtimeClassName": "nvidia",
            "volumes": [{"name": "models", "hostPath": {"path": "/models"}}],
            "initContainers": [{"name": "fetch", "image": "busybox"}],
            "containers": [{"name": "vllm", "image": "vllm/vllm-openai:v0.32.0", "command": ["vllm", "serve"],
                            "env": [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "t"}}}],
                            "volumeMounts": [{"name": "models", "mountPath": "/models"}],
                            "securityContext": {"privileged": True},
                            "resources": {"requests": {"cpu": "8", "memory": "64Gi"},
                                          "limits": {"nvidia.com/gpu": "1", "memory": "64Gi"},
                                          "claims": [{"name": "gpu"}]}},
                           {"name": "sidecar", "image": "proxy", "resources": {"requests": {"cpu": "100m"}}}],
            **spec_extra,
        },
    }


def test_the_placeholder_holds_the_same_resources_where_the_pod_could_run_but_not_on_its_node():
    made = placeholder.manifest(vllm_pod(), node_name="gpu-1", settings=SETTINGS)
    spec = made["spec"]
    assert [c["resources"] for c in spec["containers"]] == [
        {"requests": {"cpu": "8", "memory": "64Gi"}, "limits": {"nvidia.com/gpu": "1", "memory": "64Gi"}},
        {"requests": {"cpu": "100m"}}]
    assert {c["image"] for c in spec["containers"]} == {"registry.k8s.io/pause:3.10.2"}
    assert spec["nodeSelector"] == {"cloud.google.com/gke-spot": "true"}
    assert spec["tolerations"] == vllm_pod()["spec"]["tolerations"] and spec["runtimeClassName"] == "nvidia"
    assert spec["priorityClassName"] == "spotguard-placeholder" and "priority" not in spec
    assert spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"] == {
        "nodeSelectorTerms": [{"matchFields": [{"key": "metadata.name", "operator": "NotIn", "values": ["gpu-1"]}]}]}
    assert "nodeName" not in spec


def test_the_placeholder_carries_nothing_of_the_pod_but_its_shape():
    made = placeholder.manifest(vllm_pod(), node_name="gpu-1", settings=SETTINGS)
    spec, metadata = made["spec"], made["metadata"]
    for absent in ("volumes", "initContainers", "serviceAccountName", "nodeName", "hostNetwork"):
        assert absent not in spec, absent
    for container in spec["containers"]:
        assert set(container) == {"name", "image", "resources", "securityContext"}
        assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert spec["automountServiceAccountToken"] is False and spec["securityContext"]["runAsNonRoot"] is True
    # Not the pod's labels: it must never join the pod's Service or be adopted by its ReplicaSet.
    assert metadata["labels"] == {"spotguard.io/placeholder-node": "gpu-1",
                                  "spotguard.io/placeholder-for": "0123456789abcdef",
                                  "app.kubernetes.io/managed-by": "spotguard"}
    assert metadata["name"] == "vllm-7d9f-abcde-surge-01234567" and metadata["namespace"] == "ml"
    assert metadata["ownerReferences"] == [{"apiVersion": "v1", "kind": "Pod", "name": "vllm-7d9f-abcde",
                                            "uid": "0123456789abcdef"}]


def test_each_required_node_term_is_kept_and_excludes_the_node():
    affinity = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["a"]}]},
                    {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["b"]}]}]}},
                "podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
                    {"labelSelector": {"matchLabels": {"app": "vllm"}}, "topologyKey": "kubernetes.io/hostname"}]}}
    pod = vllm_pod(affinity=affinity)
    made = placeholder.manifest(pod, node_name="gpu-1", settings=SETTINGS)["spec"]["affinity"]
    terms = made["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert [t["matchExpressions"][0]["values"] for t in terms] == [["a"], ["b"]]
    assert all(t["matchFields"] == [{"key": "metadata.name", "operator": "NotIn", "values": ["gpu-1"]}] for t in terms)
    assert made["podAntiAffinity"] == affinity["podAntiAffinity"]
    assert "matchFields" not in str(pod["spec"]["affinity"]), "the pod's own spec is not modified"


def test_only_opted_in_pods_that_something_replaces_are_surged():
    pod = vllm_pod()
    assert placeholder.wants_surge(pod) and k.pod_facts(pod).surge
    pod["metadata"]["annotations"] = {"spotguard.io/surge": "false"}
    assert not placeholder.wants_surge(pod)
    bare = vllm_pod()
    bare["metadata"]["ownerReferences"] = []
    assert not placeholder.wants_surge(bare)
    job = vllm_pod()
    job["metadata"]["ownerReferences"] = [{"kind": "Job", "name": "j", "controller": True}]
    assert not placeholder.wants_surge(job)


def test_placeholder_facts_say_running_only_when_bound_running_and_not_deleted():
    made = placeholder.manifest(vllm_pod(), node_name="gpu-1", settings=SETTINGS)
    made["metadata"]["uid"] = "p-uid"
    assert k.placeholder_facts(made) == k.PlaceholderFacts("ml", "vllm-7d9f-abcde-surge-01234567",
                                                           "0123456789abcdef", running=False)
    made["spec"]["nodeName"], made["status"] = "gpu-2", {"phase": "Running"}
    assert k.placeholder_facts(made).running
    made["metadata"]["deletionTimestamp"] = "2026-11-30T00:00:00Z"
    assert not k.placeholder_facts(made).running

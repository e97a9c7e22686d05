"""The pure translations between API objects and the lifecycle's types (no API server here)."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from spotguard import kube as k
from spotguard import lifecycle as lc
from spotguard.notice import Notice, NoticeKind


def pod_obj(name="vllm-0", *, gate=True, annotations=None, owner=None, phase="Running", deleting=False,
            conditions=None, ip="127.1.0.7", grace=45):
    metadata = {"name": name, "namespace": "ml", "uid": f"uid-{name}", "annotations": annotations or {}}
    if owner:
        metadata["ownerReferences"] = [{"kind": owner, "name": "x", "controller": True}]
    if deleting:
        metadata["deletionTimestamp"] = "2026-11-28T00:00:00Z"
    spec = {"containers": [{"name": "c"}], "terminationGracePeriodSeconds": grace}
    if gate:
        spec["readinessGates"] = [{"conditionType": "spotguard.io/serving"}]
    return {"metadata": metadata, "spec": spec,
            "status": {"phase": phase, "podIP": ip, "conditions": conditions or []}}


def test_serving_pod_is_recognised_by_its_readiness_gate():
    assert k.is_serving_pod(pod_obj())
    assert not k.is_serving_pod(pod_obj(gate=False))


def test_pods_that_must_never_be_evicted():
    assert k.not_evictable_reason(pod_obj(owner="DaemonSet")) == "daemonset"
    assert k.not_evictable_reason(pod_obj(annotations={"kubernetes.io/config.mirror": "abc"})) == "mirror"
    assert k.not_evictable_reason(pod_obj(annotations={"spotguard.io/evict": "False"})) == "opted-out"
    assert k.not_evictable_reason(pod_obj(phase="Succeeded")) == "finished"
    assert k.not_evictable_reason(pod_obj(owner="ReplicaSet")) is None
    assert k.not_evictable_reason(pod_obj(annotations={"spotguard.io/evict": "true"})) is None


def test_pod_facts_carry_condition_termination_and_grace():
    facts = k.pod_facts(pod_obj(deleting=True, conditions=[{"type": "spotguard.io/serving", "status": "False"}]),
                        in_flight=3)
    assert facts == lc.PodFacts(namespace="ml", name="vllm-0", uid="uid-vllm-0", serving=True,
                                serving_condition=False, not_evictable=None, terminating=True,
                                termination_grace_seconds=45, in_flight=3)


def test_metrics_url_uses_pod_ip_and_annotations():
    assert k.metrics_url(pod_obj()) == "http://127.1.0.7:8000/metrics"
    annotated = pod_obj(annotations={"spotguard.io/metrics-port": "9000", "spotguard.io/metrics-path": "stats"})
    assert k.metrics_url(annotated) == "http://127.1.0.7:9000/stats"
    assert k.metrics_url(pod_obj(ip="fd00::5")) == "http://[fd00::5]:8000/metrics"


def test_metrics_url_refuses_bad_port_and_missing_ip():
    assert k.metrics_url(pod_obj(annotations={"spotguard.io/metrics-port": "http"})) is None
    assert k.metrics_url(pod_obj(annotations={"spotguard.io/metrics-port": "70000"})) is None
    assert k.metrics_url(pod_obj(ip=None)) is None


def test_metrics_port_of_digits_int_refuses_means_no_url_not_an_error():
    # str.isdigit() accepts "²", int() does not: the ValueError escaped into every drain step and
    # stalled the node's drain (nothing was evicted, ever).
    assert k.metrics_url(pod_obj(annotations={"spotguard.io/metrics-port": "²"})) is None
    assert k.metrics_url(pod_obj(annotations={"spotguard.io/metrics-port": "８０００"})) is None


def test_progress_round_trips_through_node_annotations():
    progress = lc.Progress(phase=lc.Phase.DRAINING, notice_kind="preemption", deadline=1_800_000_030.25,
                           noticed_at=1_800_000_000.5, phase_since=1_800_000_001.0, cordoned_by_us=True,
                           tainted_by_us=False)
    patch = k.node_patch(lc.UpdateNode(progress=progress), {})
    node = {"metadata": {"annotations": patch["metadata"]["annotations"]}}
    assert k.progress_from_node(node) == progress
    # After a surge the drain's budget starts at its end; an older daemon's annotations lack it.
    surged = replace(progress, drain_from=1_800_000_240.0)
    patch = k.node_patch(lc.UpdateNode(progress=surged), {})
    assert k.progress_from_node({"metadata": {"annotations": patch["metadata"]["annotations"]}}) == surged


@settings(max_examples=1000, deadline=None)
@given(deadline=st.floats(min_value=1e9, max_value=4e9), noticed=st.floats(min_value=1e9, max_value=4e9))
def test_stored_progress_reads_back_equal_for_any_time(deadline, noticed):
    # The decision loop compares stored and wanted progress; a mismatch would re-PATCH forever.
    state = lc.decide(lc.State(), lc.Seen(notice=Notice(NoticeKind.PREEMPTION, deadline=deadline, source="t",
                                                        detail="TRUE"),
                                          node_unschedulable=False, node_has_taint=False, pods=()),
                      now=noticed, timing=lc.Timing()).state
    patch = k.node_patch(lc.UpdateNode(progress=state.progress), {})
    assert k.progress_from_node({"metadata": patch["metadata"]}) == state.progress


def test_unreadable_progress_annotations_mean_no_progress():
    node = {"metadata": {"annotations": {"spotguard.io/phase": "draining", "spotguard.io/deadline": "soon"}}}
    assert k.progress_from_node(node) is None
    assert k.progress_from_node({"metadata": {"annotations": {"spotguard.io/phase": "partying"}}}) is None


def test_a_stored_guarding_phase_is_no_drain_to_resume():
    # It parsed as a Progress the lifecycle has no step for: with a notice up, every decision
    # raised KeyError and the node was never drained.
    annotations = {key: "2026-11-28T00:00:00Z" for key in k.PROGRESS_ANNOTATIONS.values()}
    annotations["spotguard.io/phase"] = "guarding"
    node = {"metadata": {"annotations": annotations}}
    assert k.progress_from_node(node) is None
    notice = Notice(NoticeKind.PREEMPTION, deadline=1_800_000_030.0, source="t", detail="TRUE")
    seen = lc.Seen(notice=notice, node_unschedulable=False, node_has_taint=False, pods=(),
                   stored_progress=k.progress_from_node(node))
    decision = lc.decide(lc.State(progress=k.progress_from_node(node)), seen, now=1_800_000_000.0,
                         timing=lc.Timing())
    assert decision.state.progress is not None and decision.state.progress.phase is lc.Phase.DEREGISTERING


def test_node_patch_adds_our_taint_and_keeps_everyone_elses():
    node = {"metadata": {"resourceVersion": "41"},
            "spec": {"taints": [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]}}
    assert k.node_patch(lc.UpdateNode(unschedulable=True, taint_value="preemption"), node) == {
        "spec": {"unschedulable": True, "taints": [
            {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"},
            {"key": "spotguard.io/impending-termination", "value": "preemption", "effect": "NoSchedule"}]},
        "metadata": {"resourceVersion": "41"}}


def test_node_patch_removes_only_our_taint_and_clears_progress():
    node = {"metadata": {"resourceVersion": "42"},
            "spec": {"taints": [{"key": "spotguard.io/impending-termination", "value": "p", "effect": "NoSchedule"},
                                {"key": "other", "effect": "NoExecute"}]}}
    undo = k.node_patch(lc.UpdateNode(unschedulable=False, remove_taint=True, clear_progress=True), node)
    assert undo["spec"] == {"unschedulable": False, "taints": [{"key": "other", "effect": "NoExecute"}]}
    assert undo["metadata"]["resourceVersion"] == "42"
    assert set(undo["metadata"]["annotations"]) == set(k.PROGRESS_ANNOTATIONS.values())
    assert all(value is None for value in undo["metadata"]["annotations"].values())


def test_node_patch_without_taint_change_needs_no_version():
    assert "resourceVersion" not in k.node_patch(lc.UpdateNode(unschedulable=True), {"metadata": {
        "resourceVersion": "7"}}).get("metadata", {})


def test_blocking_pdb_is_read_from_the_429_causes():
    status = {"message": "Cannot evict pod as it would violate the pod's disruption budget.",
              "details": {"causes": [{"reason": "DisruptionBudget",
                                      "message": "The disruption budget vllm-pdb needs 2 healthy pods and has 2 currently"}]}}
    assert k.blocking_pdb(status) == "vllm-pdb"
    assert k.blocking_pdb({"message": "Too many requests"}) is None


def test_eviction_answers_of_any_shape_name_no_pdb_rather_than_raise():
    # A 429 whose body is not a Status (a proxy's, a rate limiter's) raised AttributeError here,
    # so the answer was counted as a failed call instead of a refused eviction.
    for status in ({"details": "x"}, {"details": {"causes": {"a": 1}}}, {"details": {"causes": ["s", 3]}},
                   {"details": {"causes": None}}, {"details": ["causes"]}):
        assert k.blocking_pdb(status) is None
        assert k._is_pdb_refusal(status) is False
    assert k._is_pdb_refusal({"details": {"causes": ["s", {"reason": "DisruptionBudget"}]}}) is True


def test_label_selectors_follow_kubernetes_semantics():
    labels = {"app": "vllm", "tier": "gpu"}
    assert k.selector_matches({"matchLabels": {"app": "vllm"}}, labels)
    assert not k.selector_matches({"matchLabels": {"app": "web"}}, labels)
    assert k.selector_matches({"matchExpressions": [{"key": "tier", "operator": "In", "values": ["gpu"]}]}, labels)
    assert not k.selector_matches({"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["gpu"]}]},
                                  labels)
    assert k.selector_matches({"matchExpressions": [{"key": "zone", "operator": "DoesNotExist"}]}, labels)
    assert not k.selector_matches({"matchExpressions": [{"key": "zone", "operator": "Exists"}]}, labels)
    assert k.selector_matches({}, labels)  # empty selector: everything
    assert not k.selector_matches(None, labels)  # null selector: nothing (policy/v1)


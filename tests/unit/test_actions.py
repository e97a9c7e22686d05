"""spotguard.actions: every lifecycle action is handled by every function that dispatches on it."""

from __future__ import annotations

import typing

import pytest

from spotguard import actions
from spotguard import kube as k
from spotguard import evictions as ev
from spotguard import lifecycle as lc
from spotguard import placeholder
from spotguard.observability import ACTIONS

POD = lc.PodFacts(namespace="ml", name="vllm-0", uid="uid-0", serving=True, serving_condition=True,
                  not_evictable=None, terminating=False)
RELEASABLE = lc.PodFacts(namespace="ml", name="vllm-1", uid="uid-1", serving=True, serving_condition=True,
                         not_evictable=None, terminating=False, surge=True, release_key="vllm-7d9f/7d9f")
RELEASED = lc.PodFacts(namespace="ml", name="vllm-1", uid="uid-1", serving=True, serving_condition=True,
                       not_evictable=None, terminating=False, surge=True, released_from="vllm-7d9f/7d9f")
PROGRESS = lc.Progress(phase=lc.Phase.DRAINING, notice_kind="preemption", deadline=130.0, noticed_at=100.0,
                       phase_since=101.0, cordoned_by_us=True, tainted_by_us=True)
# One of each action type: the union's members, found from the type itself, so a new member that is
# missing here fails the next test.
EXAMPLES: dict[type, lc.Action] = {
    lc.UpdateNode: lc.UpdateNode(unschedulable=True, taint_value="preemption", progress=PROGRESS),
    lc.SetServing: lc.SetServing(POD, False),
    lc.Evict: lc.Evict(POD, 25),
    lc.CreatePlaceholder: lc.CreatePlaceholder(POD),
    lc.DeletePlaceholder: lc.DeletePlaceholder(lc.PlaceholderFacts("ml", "vllm-0-surge-uid-0", "uid-0", True)),
    lc.ReleasePod: lc.ReleasePod(RELEASABLE),
    lc.ReadoptPod: lc.ReadoptPod(RELEASED),
    lc.Report: lc.Report(lc.Reason.EVICTED, "evicted", pod=POD),
}
PODS = {"uid-0": {"metadata": {"name": "vllm-0", "namespace": "ml", "uid": "uid-0"},
                  "spec": {"containers": [{"name": "vllm", "resources": {"limits": {"nvidia.com/gpu": "1"}}}]}}}
SURGE = placeholder.Settings(priority_class="spotguard-placeholder", image="pause:1")


class RecordingKube:
    """Records which adapter call an action became (spelling the calls out, not importing them)."""

    node_name = "gpu-1"

    def __init__(self, *, refuse: int | None = None) -> None:
        self.calls: list[str] = []
        self.refuse = refuse

    def patch_node(self, update, *, current):  # type: ignore[no-untyped-def]
        self.calls.append("patch_node")
        return {"metadata": {"name": "n"}}

    def set_serving(self, pod, value, *, reason, message):  # type: ignore[no-untyped-def]
        self.calls.append(f"set_serving:{value}:{reason}")

    def evict(self, pod, *, grace_seconds):  # type: ignore[no-untyped-def]
        self.calls.append(f"evict:{grace_seconds}")
        return ev.EvictionOutcome.EVICTED, None

    def create_placeholder(self, manifest):  # type: ignore[no-untyped-def]
        self.calls.append(f"create_placeholder:{manifest['metadata']['name']}:{manifest['spec']['priorityClassName']}")
        if self.refuse:
            raise k.KubeError(self.refuse, "exceeded quota: gpu")
        return True

    def delete_placeholder(self, found):  # type: ignore[no-untyped-def]
        self.calls.append(f"delete_placeholder:{found.name}")

    def release_pod(self, pod, key):  # type: ignore[no-untyped-def]
        self.calls.append(f"release_pod:{pod.name}:{key}")
        if self.refuse:
            raise k.KubeError(self.refuse, "denied by spotguard-own-pods")
        return True

    def readopt_pod(self, pod, key):  # type: ignore[no-untyped-def]
        self.calls.append(f"readopt_pod:{pod.name}:{key}")
        if self.refuse:
            raise k.KubeError(self.refuse, "denied by spotguard-own-handed-over-pods")

    def record_event(self, report, *, node_uid):  # type: ignore[no-untyped-def]
        self.calls.append(f"event:{report.reason}:{node_uid}")


def perform(action, kube):  # type: ignore[no-untyped-def]
    return actions.perform(action, kube, node={"metadata": {"uid": "node-uid"}}, pods=PODS, surge=SURGE)


def test_examples_cover_the_whole_action_union() -> None:
    assert set(EXAMPLES) == set(typing.get_args(lc.Action))


@pytest.mark.parametrize("kind", sorted(EXAMPLES, key=lambda t: t.__name__), ids=lambda t: t.__name__)
def test_every_action_has_names_a_key_log_fields_and_an_effect(kind: type) -> None:
    action = EXAMPLES[kind]
    assert actions.names(action) and set(actions.names(action)) <= set(ACTIONS)
    assert actions.dry_run_key(action)
    assert actions.log_fields(action, PROGRESS, now=110.0)["seconds_to_deadline"] == 20.0
    kube = RecordingKube()
    perform(action, kube)
    assert len(kube.calls) == 1


def test_effects_are_the_adapter_calls_the_contract_names() -> None:
    kube = RecordingKube()
    for action in EXAMPLES.values():
        perform(action, kube)
    assert kube.calls == ["patch_node", "set_serving:False:TerminationNotice", "evict:25",
                          "create_placeholder:vllm-0-surge-uid-0:spotguard-placeholder",
                          "delete_placeholder:vllm-0-surge-uid-0", "release_pod:vllm-1:vllm-7d9f/7d9f",
                          "readopt_pod:vllm-1:vllm-7d9f/7d9f", "event:Evicted:node-uid"]


def test_a_placeholder_refused_for_good_comes_back_as_the_reason_others_raise() -> None:
    create = EXAMPLES[lc.CreatePlaceholder]
    assert perform(create, RecordingKube(refuse=403)) == "HTTP 403: exceeded quota: gpu"
    with pytest.raises(k.KubeError):
        perform(create, RecordingKube(refuse=503))   # asked for again by the next decision
    gone = lc.CreatePlaceholder(lc.PodFacts(namespace="ml", name="x", uid="gone", serving=True,
                                            serving_condition=True, not_evictable=None, terminating=False))
    kube = RecordingKube()
    assert perform(gone, kube) is False and kube.calls == []


def test_a_release_or_give_back_refused_for_good_comes_back_as_the_reason_others_raise() -> None:
    release = EXAMPLES[lc.ReleasePod]
    assert perform(release, RecordingKube(refuse=403)) == "HTTP 403: denied by spotguard-own-pods"
    with pytest.raises(k.KubeError):
        perform(release, RecordingKube(refuse=503))
    give_back = EXAMPLES[lc.ReadoptPod]
    assert perform(give_back, RecordingKube(refuse=403)) == "HTTP 403: denied by spotguard-own-handed-over-pods"
    assert perform(give_back, RecordingKube()) is None
    with pytest.raises(k.KubeError):
        perform(give_back, RecordingKube(refuse=503))


def test_one_node_patch_counts_as_each_thing_it_does() -> None:
    undo = lc.UpdateNode(unschedulable=False, remove_taint=True, clear_progress=True)
    assert actions.names(undo) == ["uncordon", "untaint", "save_progress"]
    assert actions.names(EXAMPLES[lc.UpdateNode]) == ["cordon", "taint", "save_progress"]


def test_an_unknown_action_fails_loudly() -> None:
    with pytest.raises(AssertionError):
        actions.names("not an action")  # type: ignore[arg-type]
    with pytest.raises(AssertionError):
        perform("not an action", RecordingKube())

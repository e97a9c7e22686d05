"""spotguard.actions: every lifecycle action is handled by every function that dispatches on it."""

from __future__ import annotations

import typing

import pytest

from spotguard import actions
from spotguard import lifecycle as lc
from spotguard.observability import ACTIONS

POD = lc.PodFacts(namespace="ml", name="vllm-0", uid="uid-0", serving=True, serving_condition=True,
                  not_evictable=None, terminating=False)
PROGRESS = lc.Progress(phase=lc.Phase.DRAINING, notice_kind="preemption", deadline=130.0, noticed_at=100.0,
                       phase_since=101.0, cordoned_by_us=True, tainted_by_us=True)
# One of each action type: the union's members, found from the type itself, so a new member that is
# missing here fails the next test.
EXAMPLES: dict[type, lc.Action] = {
    lc.UpdateNode: lc.UpdateNode(unschedulable=True, taint_value="preemption", progress=PROGRESS),
    lc.SetServing: lc.SetServing(POD, False),
    lc.Evict: lc.Evict(POD, 25),
    lc.Report: lc.Report(lc.Reason.EVICTED, "evicted", pod=POD),
}


class RecordingKube:
    """Records which adapter call an action became (spelling the calls out, not importing them)."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def patch_node(self, update, *, current):  # type: ignore[no-untyped-def]
        self.calls.append("patch_node")
        return {"metadata": {"name": "n"}}

    def set_serving(self, pod, value, *, reason, message):  # type: ignore[no-untyped-def]
        self.calls.append(f"set_serving:{value}:{reason}")

    def evict(self, pod, *, grace_seconds):  # type: ignore[no-untyped-def]
        self.calls.append(f"evict:{grace_seconds}")
        return lc.EvictionOutcome.EVICTED, None

    def record_event(self, report, *, node_uid):  # type: ignore[no-untyped-def]
        self.calls.append(f"event:{report.reason}:{node_uid}")


def test_examples_cover_the_whole_action_union() -> None:
    assert set(EXAMPLES) == set(typing.get_args(lc.Action))


@pytest.mark.parametrize("kind", sorted(EXAMPLES, key=lambda t: t.__name__), ids=lambda t: t.__name__)
def test_every_action_has_names_a_key_log_fields_and_an_effect(kind: type) -> None:
    action = EXAMPLES[kind]
    assert actions.names(action) and set(actions.names(action)) <= set(ACTIONS)
    assert actions.dry_run_key(action)
    assert actions.log_fields(action, PROGRESS, now=110.0)["seconds_to_deadline"] == 20.0
    kube = RecordingKube()
    actions.perform(action, kube, node={"metadata": {"uid": "node-uid"}})  # type: ignore[arg-type]
    assert len(kube.calls) == 1


def test_effects_are_the_adapter_calls_the_contract_names() -> None:
    kube = RecordingKube()
    for action in EXAMPLES.values():
        actions.perform(action, kube, node={"metadata": {"uid": "node-uid"}})  # type: ignore[arg-type]
    assert kube.calls == ["patch_node", "set_serving:False:TerminationNotice", "evict:25",
                          "event:Evicted:node-uid"]


def test_one_node_patch_counts_as_each_thing_it_does() -> None:
    undo = lc.UpdateNode(unschedulable=False, remove_taint=True, clear_progress=True)
    assert actions.names(undo) == ["uncordon", "untaint", "save_progress"]
    assert actions.names(EXAMPLES[lc.UpdateNode]) == ["cordon", "taint", "save_progress"]


def test_an_unknown_action_fails_loudly() -> None:
    with pytest.raises(AssertionError):
        actions.names("not an action")  # type: ignore[arg-type]
    with pytest.raises(AssertionError):
        actions.perform("not an action", RecordingKube(), node=None)  # type: ignore[arg-type]

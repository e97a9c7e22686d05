"""--exclude-from-load-balancers: at a notice the node is labelled out of cloud load balancers, and
the label is removed again on a withdrawn notice only when spotguard put it there."""

from __future__ import annotations

from dataclasses import replace

from test_lifecycle import PREEMPTED, T0, TIMING, of_type, pod, seen

from spotguard import kube as k
from spotguard import lifecycle as lc

EXCLUDING = replace(TIMING, exclude_from_load_balancers=True)


def labelled(*pods: lc.PodFacts, **kwargs) -> lc.Seen:
    return replace(seen(*pods, **kwargs), node_excluded_from_lb=True)


def test_a_notice_labels_the_node_with_the_cordon_and_owns_the_label():
    decision = lc.decide(lc.State(), seen(pod("vllm-0")), now=T0, timing=EXCLUDING)
    [update] = of_type(decision.actions, lc.UpdateNode)
    assert (update.unschedulable, update.exclude_from_lb) == (True, True)
    assert update.progress.excluded_by_us
    patch = k.node_patch(update, {})
    assert patch["metadata"]["labels"] == {k.EXCLUDE_LB_LABEL: "true"}
    assert patch["metadata"]["annotations"]["spotguard.io/lb-excluded-by-spotguard"] == "true"


def test_without_the_option_the_labels_are_never_touched():
    decision = lc.decide(lc.State(), seen(pod("vllm-0")), now=T0, timing=TIMING)
    [update] = of_type(decision.actions, lc.UpdateNode)
    assert update.exclude_from_lb is None and not update.progress.excluded_by_us
    assert "labels" not in k.node_patch(update, {})["metadata"]


def test_a_label_someone_else_set_is_not_spotguards_and_stays_on_a_withdrawn_notice():
    state = lc.decide(lc.State(), labelled(pod("vllm-0")), now=T0, timing=EXCLUDING).state
    assert not state.progress.excluded_by_us
    undo = lc.decide(state, labelled(pod("vllm-0"), notice=None, unschedulable=True, tainted=True,
                                     stored=state.progress), now=T0 + 2, timing=EXCLUDING)
    [update] = of_type(undo.actions, lc.UpdateNode)
    assert update.unschedulable is False and update.exclude_from_lb is None


def test_a_withdrawn_notice_removes_spotguards_label():
    state = lc.decide(lc.State(), seen(pod("vllm-0")), now=T0, timing=EXCLUDING).state
    undo = lc.decide(state, labelled(pod("vllm-0"), notice=None, unschedulable=True, tainted=True,
                                     stored=state.progress), now=T0 + 2, timing=EXCLUDING)
    [update] = of_type(undo.actions, lc.UpdateNode)
    assert update.exclude_from_lb is False and update.clear_progress
    assert k.node_patch(update, {})["metadata"]["labels"] == {k.EXCLUDE_LB_LABEL: None}


def test_a_removed_label_is_put_back_while_the_notice_lasts():
    state = lc.decide(lc.State(), seen(pod("vllm-0")), now=T0, timing=EXCLUDING).state
    later = lc.decide(state, seen(pod("vllm-0"), unschedulable=True, tainted=True, stored=state.progress),
                      now=T0 + 1, timing=EXCLUDING)
    assert [u.exclude_from_lb for u in of_type(later.actions, lc.UpdateNode)] == [True]


def test_a_restarted_daemon_keeps_the_label_spotguards():
    first = lc.decide(lc.State(), seen(pod("vllm-0")), now=T0, timing=EXCLUDING).state
    node = {"metadata": {"annotations": k.node_patch(lc.UpdateNode(progress=first.progress), {})["metadata"]
                         ["annotations"]}}
    stored = k.progress_from_node(node)
    assert stored is not None and stored.excluded_by_us
    # A restart after an undo that did not land: the stored progress says whose label it is.
    undo = lc.decide(lc.State(), labelled(pod("vllm-0"), notice=None, unschedulable=True, tainted=True,
                                          stored=stored), now=T0 + 3, timing=EXCLUDING)
    assert [u.exclude_from_lb for u in of_type(undo.actions, lc.UpdateNode)] == [False]
    # And a notice seen again by a restarted daemon keeps the ownership.
    again = lc.decide(lc.State(), labelled(pod("vllm-0"), notice=PREEMPTED, unschedulable=True, tainted=True,
                                           stored=stored), now=T0 + 3, timing=EXCLUDING)
    assert again.state.progress.excluded_by_us

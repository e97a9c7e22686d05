"""Cordon-only notices (--cordon-only, --rebalance-action cordon): cordoned and tainted, the pods keep
serving, nothing is evicted; a later notice that asks for more drains as usual."""

from __future__ import annotations

from dataclasses import replace

from test_lifecycle import PREEMPTED, T0, TIMING, of_type, pod, seen

from spotguard import lifecycle as lc
from spotguard.notice import Notice, NoticeKind

REBALANCE = Notice(NoticeKind.REBALANCE, deadline=T0 + 1800, source="aws:events/recommendations/rebalance",
                   detail="2026-11-30T10:00:00Z", cordon_only=True)


def test_a_cordon_only_notice_cordons_and_taints_and_leaves_the_pods_serving():
    vllm, web = pod("vllm-0"), pod("web", serving=False)
    decision = lc.decide(lc.State(), seen(vllm, web, notice=REBALANCE), now=T0, timing=TIMING)
    [update] = of_type(decision.actions, lc.UpdateNode)
    assert (update.unschedulable, update.taint_value) == (True, "rebalance-recommendation")
    assert update.progress.phase is lc.Phase.CORDONED
    assert of_type(decision.actions, lc.SetServing) == [] and of_type(decision.actions, lc.Evict) == []
    assert [r.reason for r in of_type(decision.actions, lc.Report)] == ["Cordoned"]
    # And it stays that way, however long it lasts.
    later = lc.decide(decision.state, seen(vllm, web, notice=REBALANCE, unschedulable=True, tainted=True,
                                           stored=update.progress), now=T0 + 1000, timing=TIMING)
    assert later.actions == () and later.state.progress.phase is lc.Phase.CORDONED


def test_an_undone_cordon_is_put_back_while_cordoned():
    state = lc.decide(lc.State(), seen(pod("vllm-0"), notice=REBALANCE), now=T0, timing=TIMING).state
    decision = lc.decide(state, seen(pod("vllm-0"), notice=REBALANCE, tainted=True, stored=state.progress),
                         now=T0 + 5, timing=TIMING)
    assert [a.unschedulable for a in of_type(decision.actions, lc.UpdateNode)] == [True]


def test_an_interruption_after_the_cordon_drains_and_the_cordon_stays_spotguards():
    vllm = pod("vllm-0")
    state = lc.decide(lc.State(), seen(vllm, notice=REBALANCE), now=T0, timing=TIMING).state
    interruption = replace(PREEMPTED, deadline=T0 + 130)
    decision = lc.decide(state, seen(vllm, notice=interruption, unschedulable=True, tainted=True,
                                     stored=state.progress), now=T0 + 10, timing=TIMING)
    progress = decision.state.progress
    assert progress.phase is lc.Phase.DEREGISTERING and progress.notice_kind == "preemption"
    assert progress.deadline == T0 + 130 and progress.cordoned_by_us and progress.tainted_by_us
    assert of_type(decision.actions, lc.SetServing) == [lc.SetServing(vllm, False)]
    assert of_type(decision.actions, lc.UpdateNode)[0].taint_value == "preemption"


def test_a_released_cordon_is_undone_when_spotguard_made_it():
    state = lc.decide(lc.State(), seen(pod("vllm-0"), notice=REBALANCE), now=T0, timing=TIMING).state
    decision = lc.decide(state, seen(pod("vllm-0"), notice=None, unschedulable=True, tainted=True,
                                     stored=state.progress), now=T0 + 1800, timing=TIMING)
    [update] = of_type(decision.actions, lc.UpdateNode)
    assert update.unschedulable is False and update.remove_taint and update.clear_progress
    assert decision.state.progress is None


def test_cordon_only_never_surges_even_on_a_long_notice():
    surging = lc.Timing(surge_min_notice_seconds=60, surge_drain_reserve_seconds=30)
    long_cordon = Notice(NoticeKind.HOST_MAINTENANCE, deadline=T0 + 3600, source="gce:instance/maintenance-event",
                         detail="TERMINATE_ON_HOST_MAINTENANCE", cordon_only=True)
    opted_in = replace(pod("vllm-0"), surge=True)
    decision = lc.decide(lc.State(), seen(opted_in, notice=long_cordon), now=T0, timing=surging)
    assert decision.state.progress.phase is lc.Phase.CORDONED
    assert of_type(decision.actions, lc.CreatePlaceholder) == []

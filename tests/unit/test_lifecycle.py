"""Every transition of the decision state machine, with explicit times (no clock, no sleeps)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from spotguard import evictions as ev
from spotguard import lifecycle as lc
from spotguard.notice import Notice, NoticeKind

T0 = 1_800_000_000.0
TIMING = lc.Timing(safety_margin_seconds=5, endpoint_wait_seconds=10, max_drain_seconds=300,
                   eviction_retry_base_seconds=0.5, eviction_retry_cap_seconds=5)
PREEMPTED = Notice(NoticeKind.PREEMPTION, deadline=T0 + 30, source="gce:instance/preempted", detail="TRUE")


def pod(name: str, *, serving: bool = True, condition: bool | None = True,
        not_evictable: lc.NotEvictable | None = None,
        terminating: bool = False, endpoints_ready: bool | None = None, in_flight: int | None = None,
        unreadable: bool = False, grace: int = 30, drains_itself: bool = False) -> lc.PodFacts:
    return lc.PodFacts(namespace="ml", name=name, uid=f"uid-{name}", serving=serving,
                       serving_condition=condition if serving else None, not_evictable=not_evictable,
                       terminating=terminating, termination_grace_seconds=grace,
                       endpoints_ready=endpoints_ready, in_flight=in_flight, metrics_unreadable=unreadable,
                       drains_itself=drains_itself)


def seen(*pods: lc.PodFacts, notice: Notice | None = PREEMPTED, unschedulable: bool = False,
         tainted: bool = False, stored: lc.Progress | None = None) -> lc.Seen:
    return lc.Seen(notice=notice, node_unschedulable=unschedulable, node_has_taint=tainted, pods=pods,
                   stored_progress=stored)


def of_type(actions, kind):
    return [a for a in actions if isinstance(a, kind)]


def started(*pods: lc.PodFacts, unschedulable: bool = False, tainted: bool = False) -> lc.State:
    return lc.decide(lc.State(), seen(*pods, unschedulable=unschedulable, tainted=tainted), now=T0,
                     timing=TIMING).state


def in_phase(phase: lc.Phase, *, since: float = T0) -> lc.State:
    return lc.State(progress=lc.Progress(phase=phase, notice_kind="preemption", deadline=T0 + 30,
                                         noticed_at=T0, phase_since=since, cordoned_by_us=True,
                                         tainted_by_us=True))


# -- guarding ------------------------------------------------------------------------------------


def test_without_notice_serving_pods_are_set_serving():
    fresh = pod("vllm-new", condition=None)
    settled = pod("vllm-old", condition=True)
    other = pod("web", serving=False)
    decision = lc.decide(lc.State(), seen(fresh, settled, other, notice=None), now=T0, timing=TIMING)
    assert decision.actions == (lc.SetServing(fresh, True),)
    assert decision.state.progress is None


def test_without_notice_terminating_pods_are_left_alone():
    decision = lc.decide(lc.State(), seen(pod("old", condition=False, terminating=True), notice=None), now=T0,
                         timing=TIMING)
    assert decision.actions == ()


# -- the notice ----------------------------------------------------------------------------------


def test_notice_cordons_taints_and_sets_serving_pods_not_ready_in_one_decision():
    vllm = pod("vllm-0")
    web = pod("web", serving=False)
    decision = lc.decide(lc.State(), seen(vllm, web), now=T0, timing=TIMING)
    update = of_type(decision.actions, lc.UpdateNode)[0]
    assert update.unschedulable is True
    assert update.taint_value == "preemption"
    assert update.progress.phase is lc.Phase.DEREGISTERING
    assert update.progress.deadline == T0 + 30
    assert update.progress.cordoned_by_us and update.progress.tainted_by_us
    assert of_type(decision.actions, lc.SetServing) == [lc.SetServing(vllm, False)]
    reports = of_type(decision.actions, lc.Report)
    assert [r.reason for r in reports] == ["TerminationNotice", "NotServing"]
    assert reports[1].pod == vllm
    # The reaction comes before anything slow: node and readiness first.
    assert isinstance(decision.actions[0], lc.UpdateNode)


def test_node_already_cordoned_by_someone_else_is_not_owned():
    decision = lc.decide(lc.State(), seen(pod("vllm-0"), unschedulable=True, tainted=True), now=T0,
                         timing=TIMING)
    update = of_type(decision.actions, lc.UpdateNode)[0]
    assert update.unschedulable is None and update.taint_value is None
    assert not update.progress.cordoned_by_us and not update.progress.tainted_by_us


def test_non_serving_pods_are_evicted_at_once_serving_pods_wait():
    vllm, web = pod("vllm-0", condition=False, endpoints_ready=True), pod("web", serving=False)
    decision = lc.decide(started(vllm, web), seen(vllm, web), now=T0 + 0.1, timing=TIMING)
    assert [e.pod.name for e in of_type(decision.actions, lc.Evict)] == ["web"]


def test_daemonset_mirror_and_opted_out_pods_are_never_evicted():
    pods = [pod("ds", serving=False, not_evictable=lc.NotEvictable.DAEMONSET), pod("mirror", serving=False, not_evictable=lc.NotEvictable.MIRROR),
            pod("keep", serving=False, not_evictable=lc.NotEvictable.OPTED_OUT)]
    decision = lc.decide(in_phase(lc.Phase.EVICTING), seen(*pods), now=T0 + 1, timing=TIMING)
    assert of_type(decision.actions, lc.Evict) == []
    assert decision.state.progress.phase is lc.Phase.DRAINED


# -- deregistering -------------------------------------------------------------------------------


def test_waits_for_endpoints_to_show_not_ready():
    vllm = pod("vllm-0", condition=False, endpoints_ready=True)
    decision = lc.decide(started(vllm), seen(vllm), now=T0 + 1, timing=TIMING)
    assert decision.state.progress.phase is lc.Phase.DEREGISTERING


def test_endpoints_not_ready_moves_to_draining():
    vllm = pod("vllm-0", condition=False, endpoints_ready=False)
    decision = lc.decide(started(vllm), seen(vllm), now=T0 + 1, timing=TIMING)
    assert decision.state.progress.phase is lc.Phase.DRAINING
    assert of_type(decision.actions, lc.UpdateNode)[0].progress.phase is lc.Phase.DRAINING


def test_endpoint_wait_is_bounded_and_reported():
    vllm = pod("vllm-0", condition=False, endpoints_ready=True)
    decision = lc.decide(started(vllm), seen(vllm), now=T0 + 10, timing=TIMING)
    assert decision.state.progress.phase is lc.Phase.DRAINING
    assert [r.reason for r in of_type(decision.actions, lc.Report)] == ["EndpointsStillReady"]


def test_a_failed_readiness_patch_is_asked_for_again():
    vllm = pod("vllm-0", condition=True, endpoints_ready=True)  # the first PATCH did not land
    decision = lc.decide(started(vllm), seen(vllm), now=T0 + 0.5, timing=TIMING)
    assert lc.SetServing(vllm, False) in decision.actions


def test_a_failed_cordon_is_asked_for_again():
    vllm = pod("vllm-0", condition=False, endpoints_ready=True)
    state = started(vllm)
    decision = lc.decide(state, seen(vllm, unschedulable=False, tainted=True, stored=state.progress),
                         now=T0 + 0.5, timing=TIMING)
    update = of_type(decision.actions, lc.UpdateNode)[0]
    assert update.unschedulable is True and update.taint_value is None


def test_node_with_no_serving_pods_goes_straight_to_draining_and_evicting():
    web = pod("web", serving=False)
    state = started(web)
    decision = lc.decide(state, seen(web), now=T0 + 0.2, timing=TIMING)
    assert decision.state.progress.phase is lc.Phase.DRAINING
    decision = lc.decide(decision.state, seen(web), now=T0 + 0.3, timing=TIMING)
    assert decision.state.progress.phase is lc.Phase.EVICTING


# -- pods that drain themselves (evict at the notice) -----------------------------------------------


def test_a_pod_that_drains_itself_is_evicted_as_soon_as_its_endpoints_are_out():
    self_draining = pod("vllm-0", condition=True, drains_itself=True, in_flight=4)
    state = started(self_draining)
    # Still in rotation: not yet.
    still = pod("vllm-0", condition=False, drains_itself=True, endpoints_ready=True, in_flight=4)
    assert of_type(lc.decide(state, seen(still), now=T0 + 0.3, timing=TIMING).actions, lc.Evict) == []
    out = pod("vllm-0", condition=False, drains_itself=True, endpoints_ready=False, in_flight=4)
    decision = lc.decide(state, seen(out), now=T0 + 0.5, timing=TIMING)
    # Evicted with 4 requests in flight (it finishes them itself), the grace capped to the time left.
    assert of_type(decision.actions, lc.Evict) == [lc.Evict(out, 30)]
    assert decision.state.progress.phase is lc.Phase.DRAINING


def test_a_pod_that_drains_itself_gets_at_most_the_time_left():
    out = pod("vllm-0", condition=False, drains_itself=True, endpoints_ready=False, grace=60)
    decision = lc.decide(started(out), seen(out), now=T0 + 12.5, timing=TIMING)
    assert of_type(decision.actions, lc.Evict) == [lc.Evict(out, 18)]


def test_a_pod_that_drains_itself_goes_when_the_endpoint_wait_runs_out():
    stuck = pod("vllm-0", condition=False, drains_itself=True, endpoints_ready=True, in_flight=2)
    decision = lc.decide(started(stuck), seen(stuck), now=T0 + 10, timing=TIMING)
    assert decision.state.progress.phase is lc.Phase.DRAINING
    decision = lc.decide(decision.state, seen(stuck), now=T0 + 10.5, timing=TIMING)
    assert of_type(decision.actions, lc.Evict) == [lc.Evict(stuck, 20)]


def test_the_drain_waits_only_for_pods_that_do_not_drain_themselves():
    self_draining = pod("vllm-0", condition=False, drains_itself=True, in_flight=5, endpoints_ready=False)
    plain = pod("vllm-1", condition=False, in_flight=2, endpoints_ready=False)
    state = in_phase(lc.Phase.DRAINING)
    decision = lc.decide(state, seen(self_draining, plain), now=T0 + 2, timing=TIMING)
    assert of_type(decision.actions, lc.Evict) == [lc.Evict(self_draining, 28)]
    state, _ = ev.record_eviction(decision.state, self_draining, ev.EvictionOutcome.EVICTED, now=T0 + 2, timing=TIMING)
    idle = replace(plain, in_flight=0)
    decision = lc.decide(state, seen(self_draining, idle), now=T0 + 3, timing=TIMING)
    assert decision.state.progress.phase is lc.Phase.EVICTING
    assert of_type(decision.actions, lc.Evict) == [lc.Evict(idle, 27)]


def test_the_evicted_event_says_why_a_pod_went_before_its_drain():
    self_draining = pod("vllm-0", condition=False, drains_itself=True)
    _, reports = ev.record_eviction(in_phase(lc.Phase.DEREGISTERING), self_draining, ev.EvictionOutcome.EVICTED,
                                    now=T0 + 1, timing=TIMING)
    assert reports[0].reason == "Evicted" and "drains its own in-flight requests" in reports[0].message
    _, reports = ev.record_eviction(in_phase(lc.Phase.EVICTING), pod("vllm-1", condition=False),
                                    ev.EvictionOutcome.EVICTED, now=T0 + 9, timing=TIMING)
    assert reports[0].message == "evicted through the Eviction API"


# -- draining ------------------------------------------------------------------------------------


def test_draining_waits_while_requests_are_in_flight():
    vllm = pod("vllm-0", condition=False, in_flight=3)
    decision = lc.decide(in_phase(lc.Phase.DRAINING), seen(vllm), now=T0 + 5, timing=TIMING)
    assert decision.state.progress.phase is lc.Phase.DRAINING
    assert of_type(decision.actions, lc.Evict) == []


def test_unknown_in_flight_counts_as_busy():
    vllm = pod("vllm-0", condition=False, in_flight=None)
    decision = lc.decide(in_phase(lc.Phase.DRAINING), seen(vllm), now=T0 + 5, timing=TIMING)
    assert decision.state.progress.phase is lc.Phase.DRAINING


def test_zero_in_flight_evicts_the_serving_pod_with_grace_capped_to_the_deadline():
    vllm = pod("vllm-0", condition=False, in_flight=0, grace=120)
    decision = lc.decide(in_phase(lc.Phase.DRAINING), seen(vllm), now=T0 + 8, timing=TIMING)
    assert decision.state.progress.phase is lc.Phase.EVICTING
    assert of_type(decision.actions, lc.Evict) == [lc.Evict(vllm, 22)]
    assert [r.reason for r in of_type(decision.actions, lc.Report)] == ["Drained"]


def test_drain_budget_ends_at_deadline_minus_safety_margin():
    vllm = pod("vllm-0", condition=False, in_flight=2)
    state = in_phase(lc.Phase.DRAINING)
    assert lc.decide(state, seen(vllm), now=T0 + 24.9, timing=TIMING).state.progress.phase is lc.Phase.DRAINING
    decision = lc.decide(state, seen(vllm), now=T0 + 25, timing=TIMING)
    assert decision.state.progress.phase is lc.Phase.EVICTING
    report = of_type(decision.actions, lc.Report)[0]
    assert report.reason == "DrainBudgetSpent" and "ml/vllm-0=2" in report.message
    assert of_type(decision.actions, lc.Evict) == [lc.Evict(vllm, 5)]


def test_long_notice_drain_is_capped_by_max_drain():
    state = lc.State(progress=replace(in_phase(lc.Phase.DRAINING).progress, deadline=T0 + 3600))
    vllm = pod("vllm-0", condition=False, in_flight=1)
    maintenance = Notice(NoticeKind.HOST_MAINTENANCE, deadline=T0 + 3600, source="gce", detail="TERMINATE")
    assert lc.decide(state, seen(vllm, notice=maintenance), now=T0 + 299,
                     timing=TIMING).state.progress.phase is lc.Phase.DRAINING
    assert lc.decide(state, seen(vllm, notice=maintenance), now=T0 + 300,
                     timing=TIMING).state.progress.phase is lc.Phase.EVICTING


def test_unreadable_metrics_are_reported_once():
    vllm = pod("vllm-0", condition=False, unreadable=True)
    first = lc.decide(in_phase(lc.Phase.DRAINING), seen(vllm), now=T0 + 1, timing=TIMING)
    assert [r.reason for r in of_type(first.actions, lc.Report)] == ["MetricsUnavailable"]
    second = lc.decide(first.state, seen(vllm), now=T0 + 2, timing=TIMING)
    assert of_type(second.actions, lc.Report) == []


# -- evicting ------------------------------------------------------------------------------------


def test_evicted_pod_is_never_evicted_again():
    vllm = pod("vllm-0", condition=False, in_flight=0)
    state = in_phase(lc.Phase.EVICTING)
    state, reports = ev.record_eviction(state, vllm, ev.EvictionOutcome.EVICTED, now=T0 + 9, timing=TIMING)
    assert [r.reason for r in reports] == ["Evicted"]
    decision = lc.decide(state, seen(vllm), now=T0 + 9.5, timing=TIMING)
    assert of_type(decision.actions, lc.Evict) == []
    assert decision.state.progress.phase is lc.Phase.DRAINED


def test_pdb_block_is_retried_with_backoff_and_reported_once_with_the_pdb():
    vllm = pod("vllm-0", condition=False, in_flight=0)
    state = in_phase(lc.Phase.EVICTING)
    state, reports = ev.record_eviction(state, vllm, ev.EvictionOutcome.BLOCKED_BY_PDB, now=T0 + 9,
                                        timing=TIMING, blocked_by="vllm-pdb")
    assert [r.reason for r in reports] == ["EvictionBlocked"] and "vllm-pdb" in reports[0].message
    retry_at = state.attempts[vllm.uid].retry_at
    assert T0 + 9 < retry_at <= T0 + 9 + 5
    assert of_type(lc.decide(state, seen(vllm), now=retry_at - 0.01, timing=TIMING).actions, lc.Evict) == []
    assert of_type(lc.decide(state, seen(vllm), now=retry_at, timing=TIMING).actions, lc.Evict) != []
    state, reports = ev.record_eviction(state, vllm, ev.EvictionOutcome.BLOCKED_BY_PDB, now=retry_at,
                                        timing=TIMING, blocked_by="vllm-pdb")
    assert reports == ()
    assert state.attempts[vllm.uid].attempts == 2


def test_pdb_block_keeps_retrying_after_the_deadline_and_reports_the_miss_once():
    vllm = pod("vllm-0", condition=False)
    state = in_phase(lc.Phase.EVICTING)
    state, _ = ev.record_eviction(state, vllm, ev.EvictionOutcome.BLOCKED_BY_PDB, now=T0 + 28, timing=TIMING)
    decision = lc.decide(state, seen(vllm), now=T0 + 40, timing=TIMING)
    assert [r.reason for r in of_type(decision.actions, lc.Report)] == ["DeadlineMissed"]
    # Past the deadline the grace is 1 s, never 0: gracePeriodSeconds=0 would be a force delete.
    assert of_type(decision.actions, lc.Evict) == [lc.Evict(vllm, 1)]
    again = lc.decide(decision.state, seen(vllm), now=T0 + 41, timing=TIMING)
    assert of_type(again.actions, lc.Report) == []


def test_multiple_pdbs_are_reported_as_such():
    vllm = pod("vllm-0")
    _, reports = ev.record_eviction(in_phase(lc.Phase.EVICTING), vllm, ev.EvictionOutcome.MULTIPLE_PDBS,
                                    now=T0, timing=TIMING, blocked_by="a,b")
    assert reports[0].reason == "EvictionBlocked" and "more than one" in reports[0].message


def test_gone_pod_counts_as_evicted_without_an_event():
    vllm = pod("vllm-0")
    state, reports = ev.record_eviction(in_phase(lc.Phase.EVICTING), vllm, ev.EvictionOutcome.GONE, now=T0,
                                        timing=TIMING)
    assert vllm.uid in state.evicted and reports == ()


def test_drained_node_evicts_pods_that_appear_later():
    newcomer = pod("late", serving=False)
    decision = lc.decide(in_phase(lc.Phase.DRAINED), seen(newcomer), now=T0 + 12, timing=TIMING)
    assert of_type(decision.actions, lc.Evict) == [lc.Evict(newcomer, 18)]


def test_drained_node_with_nothing_new_does_nothing():
    state = in_phase(lc.Phase.DRAINED)
    decision = lc.decide(state, seen(stored=state.progress, unschedulable=True, tainted=True), now=T0 + 12,
                         timing=TIMING)
    assert decision.actions == ()


# -- resume and cancellation ---------------------------------------------------------------------


def test_resumed_drain_does_not_cordon_again():
    state = in_phase(lc.Phase.DRAINING)
    vllm = pod("vllm-0", condition=False, in_flight=1)
    decision = lc.decide(state, seen(vllm, unschedulable=True, tainted=True, stored=state.progress),
                         now=T0 + 3, timing=TIMING)
    assert of_type(decision.actions, lc.UpdateNode) == []


def test_resumed_drain_does_not_evict_terminating_pods_again():
    state = in_phase(lc.Phase.EVICTING)
    evicted = pod("vllm-0", condition=False, terminating=True)
    decision = lc.decide(state, seen(evicted, unschedulable=True, tainted=True, stored=state.progress),
                         now=T0 + 10, timing=TIMING)
    assert of_type(decision.actions, lc.Evict) == []


def test_withdrawn_notice_undoes_only_what_spotguard_did():
    vllm = pod("vllm-0", condition=False)
    state = started(vllm, unschedulable=True)  # someone else had cordoned the node
    decision = lc.decide(state, seen(vllm, notice=None, unschedulable=True, tainted=True), now=T0 + 5,
                         timing=TIMING)
    update = of_type(decision.actions, lc.UpdateNode)[0]
    assert update.unschedulable is None  # their cordon stays
    assert update.remove_taint is True and update.clear_progress is True
    assert lc.SetServing(vllm, True) in decision.actions
    assert decision.state == lc.State()
    reports = of_type(decision.actions, lc.Report)
    assert "stays" in reports[0].message
    assert [(r.reason, r.pod) for r in reports[1:]] == [("ServingRestored", vllm)]


def test_withdrawn_notice_uncordons_when_spotguard_cordoned():
    vllm = pod("vllm-0", condition=False)
    decision = lc.decide(started(vllm), seen(vllm, notice=None, unschedulable=True, tainted=True), now=T0 + 5,
                         timing=TIMING)
    assert of_type(decision.actions, lc.UpdateNode)[0].unschedulable is False


def test_a_closer_deadline_replaces_the_old_one():
    maintenance = Notice(NoticeKind.HOST_MAINTENANCE, deadline=T0 + 3600, source="gce", detail="TERMINATE")
    state = lc.decide(lc.State(), seen(notice=maintenance), now=T0, timing=TIMING).state
    decision = lc.decide(state, seen(notice=PREEMPTED), now=T0 + 1, timing=TIMING)
    assert decision.state.progress.deadline == T0 + 30
    assert decision.state.progress.notice_kind == "preemption"


@pytest.mark.parametrize("phase", list(lc.Phase)[1:])
def test_every_active_phase_handles_cancellation(phase):
    decision = lc.decide(in_phase(phase), seen(notice=None), now=T0 + 1, timing=TIMING)
    assert decision.state.progress is None
    assert of_type(decision.actions, lc.UpdateNode)[0].clear_progress


def test_an_undo_that_did_not_land_is_asked_for_again():
    stored = in_phase(lc.Phase.DRAINING).progress
    decision = lc.decide(lc.State(), seen(notice=None, unschedulable=True, tainted=True, stored=stored),
                         now=T0 + 2, timing=TIMING)
    update = of_type(decision.actions, lc.UpdateNode)[0]
    assert update.unschedulable is False and update.remove_taint and update.clear_progress


def test_a_serving_pod_whose_vllm_already_stopped_is_not_waited_for():
    stopped = pod("vllm-0", condition=False, not_evictable=lc.NotEvictable.FINISHED, unreadable=True)
    decision = lc.decide(in_phase(lc.Phase.DRAINING), seen(stopped), now=T0 + 3, timing=TIMING)
    assert decision.state.progress.phase is lc.Phase.EVICTING
    assert of_type(decision.actions, lc.Evict) == []


def test_grace_is_never_zero_even_for_pods_that_ask_for_none():
    impatient = pod("web", serving=False, grace=0)
    decision = lc.decide(in_phase(lc.Phase.EVICTING), seen(impatient), now=T0 + 29.5, timing=TIMING)
    assert of_type(decision.actions, lc.Evict) == [lc.Evict(impatient, 1)]


def test_a_new_notice_before_an_undo_landed_keeps_spotguards_ownership():
    # Cancelled, but the undo PATCH failed: the node still carries spotguard's cordon and taint.
    stored = in_phase(lc.Phase.DRAINING).progress
    decision = lc.decide(lc.State(), seen(pod("vllm-0"), unschedulable=True, tainted=True, stored=stored),
                         now=T0 + 5, timing=TIMING)
    assert decision.state.progress.cordoned_by_us and decision.state.progress.tainted_by_us

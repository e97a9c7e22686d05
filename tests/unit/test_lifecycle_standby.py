"""Standing by: a surge-only notice (an AWS rebalance recommendation with --rebalance-action surge)
brings up capacity and touches nothing else, with explicit times (no clock)."""

from __future__ import annotations

from dataclasses import replace

from spotguard import lifecycle as lc
from spotguard.notice import Notice, NoticeKind

T0 = 1_800_000_000.0
TIMING = lc.Timing(safety_margin_seconds=5, endpoint_wait_seconds=10, max_drain_seconds=300,
                   surge_min_notice_seconds=600, surge_drain_reserve_seconds=120)
# Released 30 min after the recommendation if no interruption comes.
REBALANCE = Notice(NoticeKind.REBALANCE, deadline=T0 + 1800, source="aws:events/recommendations/rebalance",
                   detail="2027-01-15T08:00:00Z", surge_only=True)
SPOT = Notice(NoticeKind.PREEMPTION, deadline=T0 + 300, source="aws:spot/instance-action", detail="terminate")
MAINTENANCE = Notice(NoticeKind.HOST_MAINTENANCE, deadline=T0 + 3600, source="aws:events/maintenance/scheduled",
                     detail="system-reboot")


def pod(name: str, *, surge: bool = True, uid: str | None = None) -> lc.PodFacts:
    return lc.PodFacts(namespace="ml", name=name, uid=uid or f"uid-{name}", serving=True, serving_condition=True,
                       not_evictable=None, terminating=False, surge=surge)


def placeholder(for_pod: lc.PodFacts, *, running: bool = True) -> lc.PlaceholderFacts:
    return lc.PlaceholderFacts(namespace="ml", name=f"{for_pod.name}-surge", for_uid=for_pod.uid, running=running)


def seen(*pods: lc.PodFacts, notice: Notice | None = REBALANCE, placeholders=(), stored: lc.Progress | None = None,
         cordoned: bool = False, tainted: bool = False) -> lc.Seen:
    return lc.Seen(notice=notice, node_unschedulable=cordoned, node_has_taint=tainted, pods=pods,
                   stored_progress=stored, placeholders=tuple(placeholders))


def of_type(actions, kind):
    return [a for a in actions if isinstance(a, kind)]


def standing_by(*pods: lc.PodFacts) -> lc.State:
    decision = lc.decide(lc.State(), seen(*pods), now=T0, timing=TIMING)
    assert decision.state.progress.phase is lc.Phase.STANDBY
    return decision.state


def test_a_surge_only_notice_creates_placeholders_and_touches_nothing_else():
    vllm, plain = pod("vllm-0"), pod("vllm-1", surge=False)
    decision = lc.decide(lc.State(), seen(vllm, plain), now=T0, timing=TIMING)
    [update] = of_type(decision.actions, lc.UpdateNode)
    # Progress is stored (so a restart resumes it), but no cordon, taint or label, and nothing owned.
    assert (update.unschedulable, update.taint_value, update.exclude_from_lb) == (None, None, None)
    assert update.progress.phase is lc.Phase.STANDBY and update.progress.deadline == T0 + 1800
    assert not (update.progress.cordoned_by_us or update.progress.tainted_by_us or update.progress.excluded_by_us)
    assert of_type(decision.actions, lc.CreatePlaceholder) == [lc.CreatePlaceholder(vllm)]
    assert of_type(decision.actions, lc.SetServing) == [] and of_type(decision.actions, lc.Evict) == []
    [report] = of_type(decision.actions, lc.Report)
    assert report.reason is lc.Reason.SURGE_STARTED and not report.warning
    assert "1 placeholder(s)" in report.message and "released in 1800s" in report.message


def test_standing_by_keeps_one_placeholder_per_opted_in_pod_and_drops_those_of_pods_gone():
    vllm = pod("vllm-0")
    state = standing_by(vllm)
    held = seen(vllm, placeholders=[placeholder(vllm)], stored=state.progress)
    assert lc.decide(state, held, now=T0 + 60, timing=TIMING).actions == ()
    # vllm-0 was replaced by a rollout meanwhile: the new pod gets a placeholder, the old one goes.
    successor = pod("vllm-0b")
    decision = lc.decide(state, seen(successor, placeholders=[placeholder(vllm)], stored=state.progress),
                         now=T0 + 120, timing=TIMING)
    assert of_type(decision.actions, lc.CreatePlaceholder) == [lc.CreatePlaceholder(successor)]
    assert of_type(decision.actions, lc.DeletePlaceholder) == [lc.DeletePlaceholder(placeholder(vllm))]
    assert decision.state.progress.phase is lc.Phase.STANDBY


def test_an_interruption_that_follows_drains_onto_the_capacity_already_there():
    vllm = pod("vllm-0")
    state = standing_by(vllm)
    running = placeholder(vllm, running=True)
    decision = lc.decide(state, seen(vllm, notice=SPOT, placeholders=[running], stored=state.progress),
                         now=T0 + 600, timing=TIMING)
    [update] = of_type(decision.actions, lc.UpdateNode)
    # A fresh start: cordoned and tainted now, and both spotguard's (the stand-by owned nothing).
    assert update.unschedulable is True and update.taint_value == "preemption"
    progress = decision.state.progress
    assert progress.phase is lc.Phase.DEREGISTERING and progress.cordoned_by_us and progress.tainted_by_us
    assert progress.deadline == T0 + 300 and progress.notice_kind == "preemption"
    assert of_type(decision.actions, lc.SetServing) == [lc.SetServing(vllm, False)]
    # The running placeholder stays for the replacement to preempt; no second one.
    assert of_type(decision.actions, lc.CreatePlaceholder) == [] and of_type(decision.actions, lc.DeletePlaceholder) == []
    assert of_type(decision.actions, lc.Report)[0].reason is lc.Reason.TERMINATION_NOTICE


def test_a_long_notice_that_follows_surges_with_the_placeholders_it_has():
    vllm, late = pod("vllm-0"), pod("vllm-1")
    state = standing_by(vllm)
    decision = lc.decide(state, seen(vllm, late, notice=MAINTENANCE, placeholders=[placeholder(vllm)],
                                     stored=state.progress), now=T0 + 60, timing=TIMING)
    assert decision.state.progress.phase is lc.Phase.SURGING
    assert of_type(decision.actions, lc.UpdateNode)[0].unschedulable is True
    assert of_type(decision.actions, lc.CreatePlaceholder) == [lc.CreatePlaceholder(late)]


def test_an_admins_cordon_stays_the_admins_through_a_stand_by_and_an_interruption():
    vllm = pod("vllm-0")
    first = lc.decide(lc.State(), seen(vllm, cordoned=True), now=T0, timing=TIMING)
    state = first.state
    interrupted = lc.decide(state, seen(vllm, notice=SPOT, stored=state.progress, cordoned=True),
                            now=T0 + 60, timing=TIMING)
    assert not interrupted.state.progress.cordoned_by_us and interrupted.state.progress.tainted_by_us
    undone = lc.decide(interrupted.state, seen(vllm, notice=None, stored=interrupted.state.progress, cordoned=True,
                                               tainted=True), now=T0 + 90, timing=TIMING)
    [undo] = of_type(undone.actions, lc.UpdateNode)
    assert undo.unschedulable is None and undo.remove_taint and undo.clear_progress


def test_released_without_an_interruption_the_placeholders_go_and_nothing_else_changes():
    vllm = pod("vllm-0")
    state = standing_by(vllm)
    held = placeholder(vllm)
    decision = lc.decide(state, seen(vllm, notice=None, placeholders=[held], stored=state.progress),
                         now=T0 + 1800, timing=TIMING)
    [undo] = of_type(decision.actions, lc.UpdateNode)
    assert (undo.unschedulable, undo.remove_taint, undo.exclude_from_lb, undo.clear_progress) == (None, False, None, True)
    assert of_type(decision.actions, lc.DeletePlaceholder) == [lc.DeletePlaceholder(held)]
    assert of_type(decision.actions, lc.SetServing) == []
    [report] = of_type(decision.actions, lc.Report)
    assert report.reason is lc.Reason.NOTICE_CANCELLED and "released 1 placeholder(s)" in report.message
    assert decision.state == lc.State()


def test_an_undo_that_has_not_landed_is_finished_before_standing_by():
    vllm = pod("vllm-0")
    # An earlier notice's cordon, withdrawn, whose undo PATCH failed: the node still says so.
    left = lc.Progress(phase=lc.Phase.DEREGISTERING, notice_kind="preemption", deadline=T0 - 10, noticed_at=T0 - 100,
                       phase_since=T0 - 100, cordoned_by_us=True, tainted_by_us=True)
    decision = lc.decide(lc.State(), seen(vllm, stored=left, cordoned=True, tainted=True), now=T0, timing=TIMING)
    [undo] = of_type(decision.actions, lc.UpdateNode)
    assert undo.unschedulable is False and undo.remove_taint and undo.clear_progress
    assert decision.state.progress is None
    # Once it has landed, the stand-by starts.
    again = lc.decide(decision.state, seen(vllm), now=T0 + 1, timing=TIMING)
    assert again.state.progress.phase is lc.Phase.STANDBY


def test_a_restarted_daemon_resumes_the_stand_by_without_a_second_placeholder():
    vllm = pod("vllm-0")
    stored = standing_by(vllm).progress
    resumed = lc.State(progress=stored)   # what the daemon loads from the node's annotations
    decision = lc.decide(resumed, seen(vllm, placeholders=[placeholder(vllm, running=False)], stored=stored),
                         now=T0 + 30, timing=TIMING)
    assert decision.actions == ()


# -- a notice withdrawn while a lesser one remains -----------------------------------------------

CORDON_ONLY = Notice(NoticeKind.REBALANCE, deadline=T0 + 1800, source="aws:events/recommendations/rebalance",
                     detail="2027-01-15T08:00:00Z", cordon_only=True)


def test_a_withdrawn_drain_under_a_remaining_cordon_only_notice_keeps_the_cordon_and_serves_again():
    vllm, other = pod("vllm-0", surge=False), pod("vllm-1", surge=False)
    short = Notice(NoticeKind.HOST_MAINTENANCE, deadline=T0 + 300, source="aws:events/maintenance/scheduled",
                   detail="system-reboot")
    started = lc.decide(lc.State(), seen(vllm, other, notice=short), now=T0, timing=TIMING)
    assert started.state.progress.phase is lc.Phase.DEREGISTERING
    out = replace(vllm, serving_condition=False)
    stray = placeholder(vllm)   # one left over, say, from an earlier surge
    decision = lc.decide(started.state, seen(out, other, notice=CORDON_ONLY, placeholders=[stray],
                                             stored=started.state.progress, cordoned=True, tainted=True),
                         now=T0 + 20, timing=TIMING)
    progress = decision.state.progress
    assert progress.phase is lc.Phase.CORDONED and progress.deadline == T0 + 1800
    assert progress.notice_kind == "rebalance-recommendation" and progress.cordoned_by_us and progress.tainted_by_us
    [update] = of_type(decision.actions, lc.UpdateNode)
    assert (update.unschedulable, update.remove_taint, update.progress) == (None, False, progress)
    assert of_type(decision.actions, lc.SetServing) == [lc.SetServing(out, True)]
    assert of_type(decision.actions, lc.DeletePlaceholder) == [lc.DeletePlaceholder(stray)]
    assert of_type(decision.actions, lc.Report)[0].reason is lc.Reason.NOTICE_CANCELLED
    # And it stays there: nothing more is done while only the cordon-only notice remains.
    later = lc.decide(decision.state, seen(vllm, other, notice=CORDON_ONLY, stored=progress, cordoned=True,
                                           tainted=True), now=T0 + 30, timing=TIMING)
    assert later.actions == ()


def test_a_withdrawn_surge_under_a_remaining_surge_only_notice_undoes_the_cordon_then_stands_by():
    vllm = pod("vllm-0")
    started = lc.decide(lc.State(), seen(vllm, notice=MAINTENANCE), now=T0, timing=TIMING)
    surging = started.state.progress
    assert surging.phase is lc.Phase.SURGING
    held = placeholder(vllm, running=False)
    # First the undo, exactly as for a withdrawn notice, but the placeholder stays.
    undo = lc.decide(started.state, seen(vllm, placeholders=[held], stored=surging, cordoned=True, tainted=True),
                     now=T0 + 60, timing=TIMING)
    [update] = of_type(undo.actions, lc.UpdateNode)
    assert update.unschedulable is False and update.remove_taint and update.clear_progress
    assert of_type(undo.actions, lc.DeletePlaceholder) == [] and undo.state.progress is None
    # The undo did not land (the node still says surging, still cordoned): asked again, ownership intact.
    again = lc.decide(undo.state, seen(vllm, placeholders=[held], stored=surging, cordoned=True, tainted=True),
                      now=T0 + 61, timing=TIMING)
    [update] = of_type(again.actions, lc.UpdateNode)
    assert update.unschedulable is False and update.remove_taint and again.state.progress is None
    # Once it has, the stand-by starts, with the placeholder it has.
    standby = lc.decide(again.state, seen(vllm, placeholders=[held]), now=T0 + 62, timing=TIMING)
    assert standby.state.progress.phase is lc.Phase.STANDBY
    assert of_type(standby.actions, lc.CreatePlaceholder) == [] and of_type(standby.actions, lc.DeletePlaceholder) == []


def test_new_pods_serve_on_a_node_standing_by_or_only_cordoned():
    newcomer = lc.PodFacts(namespace="ml", name="vllm-9", uid="uid-vllm-9", serving=True, serving_condition=None,
                           not_evictable=None, terminating=False, surge=True)
    state = standing_by(pod("vllm-0"))
    decision = lc.decide(state, seen(pod("vllm-0"), newcomer, stored=state.progress), now=T0 + 5, timing=TIMING)
    assert lc.SetServing(newcomer, True) in decision.actions
    cordoned = lc.decide(lc.State(), seen(newcomer, notice=CORDON_ONLY), now=T0, timing=TIMING)
    assert cordoned.state.progress.phase is lc.Phase.CORDONED
    later = lc.decide(cordoned.state, seen(newcomer, notice=CORDON_ONLY, stored=cordoned.state.progress,
                                           cordoned=True, tainted=True), now=T0 + 5, timing=TIMING)
    assert of_type(later.actions, lc.SetServing) == [lc.SetServing(newcomer, True)]


def test_no_event_where_nothing_is_opted_in_to_the_surge():
    decision = lc.decide(lc.State(), seen(pod("vllm-0", surge=False)), now=T0, timing=TIMING)
    assert decision.state.progress.phase is lc.Phase.STANDBY
    assert of_type(decision.actions, lc.Report) == [] and of_type(decision.actions, lc.CreatePlaceholder) == []

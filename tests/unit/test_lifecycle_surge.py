"""The surge: placeholders before the drain on long notices, with explicit times (no clock)."""

from __future__ import annotations

from dataclasses import replace

from spotguard import lifecycle as lc
from spotguard.notice import Notice, NoticeKind

T0 = 1_800_000_000.0
TIMING = lc.Timing(safety_margin_seconds=5, endpoint_wait_seconds=10, max_drain_seconds=300,
                   surge_min_notice_seconds=600, surge_drain_reserve_seconds=120)
MAINTENANCE = Notice(NoticeKind.HOST_MAINTENANCE, deadline=T0 + 3600, source="gce:instance/maintenance-event",
                     detail="TERMINATE_ON_HOST_MAINTENANCE")
SURGE_UNTIL = T0 + 3600 - 5 - 120


def pod(name: str, *, surge: bool = True, condition: bool | None = True, terminating: bool = False,
        endpoints_ready: bool | None = None, in_flight: int | None = None, serving: bool = True) -> lc.PodFacts:
    return lc.PodFacts(namespace="ml", name=name, uid=f"uid-{name}", serving=serving,
                       serving_condition=condition if serving else None, not_evictable=None,
                       terminating=terminating, endpoints_ready=endpoints_ready, in_flight=in_flight,
                       surge=surge)


def placeholder(for_pod: lc.PodFacts, *, running: bool) -> lc.PlaceholderFacts:
    return lc.PlaceholderFacts(namespace=for_pod.namespace, name=f"{for_pod.name}-surge", for_uid=for_pod.uid,
                               running=running)


def seen(*pods: lc.PodFacts, notice: Notice | None = MAINTENANCE,
         placeholders: tuple[lc.PlaceholderFacts, ...] = (), stored: lc.Progress | None = None) -> lc.Seen:
    """The node as spotguard left it: cordoned and tainted (by it) when a drain is `stored`."""
    return lc.Seen(notice=notice, node_unschedulable=stored is not None, node_has_taint=stored is not None,
                   pods=pods, stored_progress=stored, placeholders=placeholders)


def after(state: lc.State, *pods: lc.PodFacts, **kwargs) -> lc.Seen:
    return seen(*pods, stored=state.progress, **kwargs)


def of_type(actions, kind):
    return [a for a in actions if isinstance(a, kind)]


def surging(*pods: lc.PodFacts) -> lc.State:
    decision = lc.decide(lc.State(), seen(*pods), now=T0, timing=TIMING)
    assert decision.state.progress.phase is lc.Phase.SURGING
    return decision.state


def test_a_long_notice_cordons_and_creates_placeholders_while_the_pods_keep_serving():
    vllm, plain, web = pod("vllm-0"), pod("vllm-1", surge=False), pod("web", serving=False, surge=False)
    decision = lc.decide(lc.State(), seen(vllm, plain, web), now=T0, timing=TIMING)
    update = of_type(decision.actions, lc.UpdateNode)[0]
    assert update.unschedulable is True and update.taint_value == "host-maintenance"
    assert update.progress.phase is lc.Phase.SURGING
    assert of_type(decision.actions, lc.CreatePlaceholder) == [lc.CreatePlaceholder(vllm)]
    # Nobody leaves rotation and nothing is evicted yet: not even the pods that do not surge.
    assert of_type(decision.actions, lc.SetServing) == [] and of_type(decision.actions, lc.Evict) == []
    report = of_type(decision.actions, lc.Report)[0]
    assert report.reason is lc.Reason.SURGE_STARTED and "for at most 3475s" in report.message


def test_no_surge_on_a_short_notice_without_opted_in_pods_or_when_switched_off():
    short = Notice(NoticeKind.PREEMPTION, deadline=T0 + 120, source="aws", detail="terminate")
    cases = [(seen(pod("vllm-0"), notice=short), TIMING),
             (seen(pod("vllm-0", surge=False)), TIMING),
             (seen(pod("vllm-0")), replace(TIMING, surge_min_notice_seconds=0)),
             # long enough, but the drain's reserve would leave the surge no time at all
             (seen(pod("vllm-0")), replace(TIMING, surge_drain_reserve_seconds=3600))]
    for observed, timing in cases:
        decision = lc.decide(lc.State(), observed, now=T0, timing=timing)
        assert decision.state.progress.phase is lc.Phase.DEREGISTERING
        assert of_type(decision.actions, lc.CreatePlaceholder) == []
        assert [a.value for a in of_type(decision.actions, lc.SetServing)] == [False]


def test_surging_waits_for_a_running_placeholder_and_creates_a_missing_one_again():
    vllm = pod("vllm-0")
    state = surging(vllm)
    pending = lc.decide(state, after(state, vllm, placeholders=(placeholder(vllm, running=False),)), now=T0 + 60,
                        timing=TIMING)
    assert pending.actions == () and pending.state.progress.phase is lc.Phase.SURGING
    deleted_by_someone = lc.decide(state, after(state, vllm), now=T0 + 61, timing=TIMING)
    assert deleted_by_someone.actions == (lc.CreatePlaceholder(vllm),)


def test_once_every_placeholder_runs_the_pods_leave_rotation_and_the_drain_budget_starts_then():
    vllm, other = pod("vllm-0"), pod("vllm-1")
    state = surging(vllm, other)
    running = (placeholder(vllm, running=True), placeholder(other, running=True))
    decision = lc.decide(state, after(state, vllm, other, placeholders=running), now=T0 + 240, timing=TIMING)
    progress = decision.state.progress
    assert progress.phase is lc.Phase.DEREGISTERING and progress.drain_from == T0 + 240
    assert {a.pod.name for a in of_type(decision.actions, lc.SetServing) if not a.value} == {"vllm-0", "vllm-1"}
    reasons = [r.reason for r in of_type(decision.actions, lc.Report)]
    assert reasons[0] is lc.Reason.SURGE_READY and reasons.count(lc.Reason.NOT_SERVING) == 2
    assert of_type(decision.actions, lc.DeletePlaceholder) == []   # the replacements preempt them
    # The drain's 300 s budget counts from the surge's end, not from the notice 240 s earlier.
    out = [replace(p, serving_condition=False, endpoints_ready=False, in_flight=3) for p in (vllm, other)]
    draining = lc.decide(decision.state, after(decision.state, *out), now=T0 + 241, timing=TIMING).state
    assert draining.progress.phase is lc.Phase.DRAINING
    still = lc.decide(draining, after(draining, *out), now=T0 + 240 + 299, timing=TIMING)
    assert still.state.progress.phase is lc.Phase.DRAINING and of_type(still.actions, lc.Evict) == []
    spent = lc.decide(draining, after(draining, *out), now=T0 + 240 + 300, timing=TIMING)
    assert [r.reason for r in of_type(spent.actions, lc.Report)] == [lc.Reason.DRAIN_BUDGET_SPENT]


def test_when_the_surge_time_is_up_it_is_given_up_and_the_pending_placeholder_deleted():
    ready, stuck = pod("vllm-0"), pod("vllm-1")
    state = surging(ready, stuck)
    found = (placeholder(ready, running=True), placeholder(stuck, running=False))
    waiting = lc.decide(state, after(state, ready, stuck, placeholders=found), now=SURGE_UNTIL - 0.1, timing=TIMING)
    assert waiting.actions == ()
    decision = lc.decide(state, after(state, ready, stuck, placeholders=found), now=SURGE_UNTIL, timing=TIMING)
    assert decision.state.progress.phase is lc.Phase.DEREGISTERING
    assert of_type(decision.actions, lc.DeletePlaceholder) == [lc.DeletePlaceholder(found[1])]
    given_up = [r for r in of_type(decision.actions, lc.Report) if r.reason is lc.Reason.SURGE_GIVEN_UP]
    assert [r.pod for r in given_up] == [stuck] and given_up[0].warning
    ready_report = next(r for r in of_type(decision.actions, lc.Report) if r.reason is lc.Reason.SURGE_READY)
    assert ready_report.message.startswith("1 of 2 pod(s) have their replacement Ready or a placeholder running")


def test_a_refused_placeholder_is_reported_once_and_the_surge_goes_on_without_it():
    refused, fine = pod("vllm-0"), pod("vllm-1")
    state = surging(refused, fine)
    state, reports = lc.record_surge_refused(state, lc.CreatePlaceholder(refused), "HTTP 403: exceeded quota: gpu")
    assert [r.reason for r in reports] == [lc.Reason.SURGE_GIVEN_UP] and "exceeded quota" in reports[0].message
    assert lc.record_surge_refused(state, lc.CreatePlaceholder(refused), "again")[1] == ()
    # Not asked for again; the other one is awaited, then both go.
    decision = lc.decide(state, after(state, refused, fine), now=T0 + 1, timing=TIMING)
    assert decision.actions == (lc.CreatePlaceholder(fine),)
    done = lc.decide(state, after(state, refused, fine, placeholders=(placeholder(fine, running=True),)), now=T0 + 2,
                     timing=TIMING)
    assert done.state.progress.phase is lc.Phase.DEREGISTERING


def test_a_shorter_second_notice_ends_the_surge_at_once():
    vllm = pod("vllm-0")
    state = surging(vllm)
    preempted = Notice(NoticeKind.PREEMPTION, deadline=T0 + 100 + 30, source="gce:instance/preempted", detail="TRUE")
    decision = lc.decide(state, after(state, vllm, notice=preempted, placeholders=(placeholder(vllm, running=False),)),
                         now=T0 + 100, timing=TIMING)
    assert decision.state.progress.phase is lc.Phase.DEREGISTERING
    assert decision.state.progress.deadline == T0 + 130
    assert len(of_type(decision.actions, lc.DeletePlaceholder)) == 1
    assert [a.value for a in of_type(decision.actions, lc.SetServing)] == [False]


def test_a_cancelled_notice_deletes_the_placeholders_and_undoes_the_cordon():
    vllm = pod("vllm-0")
    state = surging(vllm)
    found = (placeholder(vllm, running=True),)
    decision = lc.decide(state, after(state, vllm, notice=None, placeholders=found), now=T0 + 30, timing=TIMING)
    assert decision.state == lc.State()
    assert of_type(decision.actions, lc.DeletePlaceholder) == [lc.DeletePlaceholder(found[0])]
    update = of_type(decision.actions, lc.UpdateNode)[0]
    assert update.unschedulable is False and update.remove_taint and update.clear_progress
    # The pods never left rotation, so there is nothing to restore.
    assert of_type(decision.actions, lc.SetServing) == []


def test_placeholders_with_no_notice_behind_them_are_deleted():
    vllm = pod("vllm-0")
    orphan = placeholder(vllm, running=True)
    decision = lc.decide(lc.State(), seen(vllm, notice=None, placeholders=(orphan,)), now=T0, timing=TIMING)
    assert decision.actions == (lc.DeletePlaceholder(orphan),)


def test_a_restarted_daemon_resumes_the_surge_from_the_node_without_a_second_placeholder():
    vllm = pod("vllm-0")
    stored = surging(vllm).progress
    found = (placeholder(vllm, running=False),)
    # The daemon starts from the progress its node's annotations hold (Daemon._load_node).
    resumed = lc.decide(lc.State(progress=stored), seen(vllm, stored=stored, placeholders=found), now=T0 + 5,
                        timing=TIMING)
    assert resumed.state.progress == stored
    assert resumed.actions == ()

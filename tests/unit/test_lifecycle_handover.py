"""The surge by hand-over: a Deployment's pod released from its ReplicaSet on a long notice, drained
once the ReplicaSet has every replica Ready again (explicit times, no clock)."""

from __future__ import annotations

from dataclasses import replace

from spotguard import lifecycle as lc
from spotguard.notice import Notice

from test_lifecycle_surge import MAINTENANCE, SURGE_UNTIL, T0, TIMING, after, of_type, placeholder, seen


def deployment_pod(name: str, **facts) -> lc.PodFacts:
    return lc.PodFacts(namespace="ml", name=name, uid=f"uid-{name}", serving=True, serving_condition=True,
                       not_evictable=None, terminating=False, surge=True, release_key="vllm-7d9f/7d9f", **facts)


def released(pod: lc.PodFacts, *, replacement_ready: bool | None) -> lc.PodFacts:
    """The pod as the watch shows it once the release landed: no hash label, no owner, annotated."""
    return replace(pod, release_key=None, released_from="vllm-7d9f/7d9f", replacement_ready=replacement_ready)


def statefulset_pod(name: str) -> lc.PodFacts:
    return lc.PodFacts(namespace="ml", name=name, uid=f"uid-{name}", serving=True, serving_condition=True,
                       not_evictable=None, terminating=False, surge=True)


def started(*pods: lc.PodFacts) -> lc.Decision:
    decision = lc.decide(lc.State(), seen(*pods), now=T0, timing=TIMING)
    assert decision.state.progress.phase is lc.Phase.SURGING
    return decision


def test_a_long_notice_releases_a_deployments_pod_and_gives_a_statefulsets_pod_a_placeholder():
    web, db = deployment_pod("web-0"), statefulset_pod("db-0")
    decision = started(web, db)
    assert of_type(decision.actions, lc.ReleasePod) == [lc.ReleasePod(web)]
    assert of_type(decision.actions, lc.CreatePlaceholder) == [lc.CreatePlaceholder(db)]   # none for web
    assert [r.pod for r in of_type(decision.actions, lc.Report) if r.reason is lc.Reason.RELEASED] == [web]
    started_report = next(r for r in of_type(decision.actions, lc.Report) if r.reason is lc.Reason.SURGE_STARTED)
    assert "1 pod(s) handed over to replacements started now, 1 placeholder(s)" in started_report.message
    # Both keep serving: nobody leaves rotation, nothing is evicted.
    assert of_type(decision.actions, lc.SetServing) == [] and of_type(decision.actions, lc.Evict) == []


def test_the_released_pod_serves_until_its_replicaset_has_every_replica_ready_again():
    web = deployment_pod("web-0")
    state = started(web).state
    # The watch has not shown the release yet: asked again (the PATCH is idempotent).
    assert lc.decide(state, after(state, web), now=T0 + 1, timing=TIMING).actions == (lc.ReleasePod(web),)
    for unknown_or_not in (None, False):
        waiting = lc.decide(state, after(state, released(web, replacement_ready=unknown_or_not)), now=T0 + 60,
                            timing=TIMING)
        assert waiting.actions == () and waiting.state.progress.phase is lc.Phase.SURGING
    ready = lc.decide(state, after(state, released(web, replacement_ready=True)), now=T0 + 300, timing=TIMING)
    assert ready.state.progress.phase is lc.Phase.DEREGISTERING
    assert ready.state.progress.drain_from == T0 + 300   # the drain's budget starts now
    assert of_type(ready.actions, lc.SetServing) == [lc.SetServing(released(web, replacement_ready=True), False)]
    assert of_type(ready.actions, lc.ReleasePod) == []


def test_a_mixed_node_waits_for_both_the_replacement_and_the_placeholder():
    web, db = deployment_pod("web-0"), statefulset_pod("db-0")
    state = started(web, db).state
    only_replacement = lc.decide(state, after(state, released(web, replacement_ready=True), db,
                                              placeholders=(placeholder(db, running=False),)), now=T0 + 60, timing=TIMING)
    assert only_replacement.actions == () and only_replacement.state.progress.phase is lc.Phase.SURGING
    both = lc.decide(state, after(state, released(web, replacement_ready=True), db,
                                  placeholders=(placeholder(db, running=True),)), now=T0 + 61, timing=TIMING)
    assert both.state.progress.phase is lc.Phase.DEREGISTERING


def test_when_the_surge_time_is_up_a_late_replacement_is_reported_and_the_pod_drained_anyway():
    web = deployment_pod("web-0")
    state = started(web).state
    late = released(web, replacement_ready=False)
    decision = lc.decide(state, after(state, late), now=SURGE_UNTIL, timing=TIMING)
    assert decision.state.progress.phase is lc.Phase.DEREGISTERING
    given_up = [r for r in of_type(decision.actions, lc.Report) if r.reason is lc.Reason.SURGE_GIVEN_UP]
    assert [r.pod for r in given_up] == [late] and "replacement still comes" in given_up[0].message
    assert of_type(decision.actions, lc.DeletePlaceholder) == []
    assert of_type(decision.actions, lc.SetServing) == [lc.SetServing(late, False)]


def test_a_refused_release_is_reported_once_and_the_surge_goes_on_without_that_pod():
    refused, fine = deployment_pod("web-0"), statefulset_pod("db-0")
    state = started(refused, fine).state
    state, reports = lc.record_surge_refused(state, lc.ReleasePod(refused), "HTTP 403: denied by spotguard-own-pods")
    assert [r.reason for r in reports] == [lc.Reason.SURGE_GIVEN_UP]
    assert "its release from its ReplicaSet was refused (HTTP 403" in reports[0].message
    decision = lc.decide(state, after(state, refused, fine, placeholders=(placeholder(fine, running=True),)),
                         now=T0 + 2, timing=TIMING)
    assert of_type(decision.actions, lc.ReleasePod) == [] and decision.state.progress.phase is lc.Phase.DEREGISTERING


def test_a_withdrawn_notice_gives_the_released_pod_back_to_its_replicaset():
    web = deployment_pod("web-0")
    state = started(web).state
    gone = released(web, replacement_ready=False)
    decision = lc.decide(state, after(state, gone, notice=None), now=T0 + 30, timing=TIMING)
    assert decision.state == lc.State()
    assert of_type(decision.actions, lc.ReadoptPod) == [lc.ReadoptPod(gone)]
    assert [r.pod for r in of_type(decision.actions, lc.Report) if r.reason is lc.Reason.READOPTED] == [gone]
    undo = of_type(decision.actions, lc.UpdateNode)[0]
    assert undo.unschedulable is False and undo.remove_taint and undo.clear_progress


def test_released_pods_with_no_notice_behind_them_are_given_back():
    left = released(deployment_pod("web-0"), replacement_ready=None)
    decision = lc.decide(lc.State(), seen(left, notice=None), now=T0, timing=TIMING)
    assert of_type(decision.actions, lc.ReadoptPod) == [lc.ReadoptPod(left)]
    terminating = replace(left, terminating=True)
    assert of_type(lc.decide(lc.State(), seen(terminating, notice=None), now=T0, timing=TIMING).actions,
                   lc.ReadoptPod) == []


def test_a_restarted_daemon_resumes_the_hand_over_without_releasing_again():
    web = deployment_pod("web-0")
    stored = started(web).state.progress
    fresh = lc.State()   # what a restarted daemon starts with
    resumed = lc.decide(fresh, seen(released(web, replacement_ready=False), stored=stored), now=T0 + 90, timing=TIMING)
    assert of_type(resumed.actions, lc.ReleasePod) == [] and resumed.state.progress.phase is lc.Phase.SURGING


def test_a_refused_give_back_is_reported_once_and_not_asked_again():
    left = released(deployment_pod("web-0"), replacement_ready=None)
    state = lc.State()
    state, reports = lc.record_surge_refused(state, lc.ReadoptPod(left), "HTTP 403: denied")
    assert [r.reason for r in reports] == [lc.Reason.SURGE_GIVEN_UP] and "stays released" in reports[0].message
    assert of_type(lc.decide(state, seen(left, notice=None), now=T0, timing=TIMING).actions, lc.ReadoptPod) == []


def test_a_pod_no_longer_opted_in_is_not_given_back():
    # The policy would refuse it (the surge annotation is what lets spotguard touch the pod).
    left = replace(released(deployment_pod("web-0"), replacement_ready=None), surge=False)
    assert of_type(lc.decide(lc.State(), seen(left, notice=None), now=T0, timing=TIMING).actions, lc.ReadoptPod) == []


def test_a_stand_by_placeholder_goes_once_its_pod_is_handed_over():
    web = deployment_pod("web-0")
    state = started(web).state
    gone = released(web, replacement_ready=False)
    standing = placeholder(web, running=True)
    decision = lc.decide(state, after(state, gone, placeholders=(standing,)), now=T0 + 5, timing=TIMING)
    assert of_type(decision.actions, lc.DeletePlaceholder) == [lc.DeletePlaceholder(standing)]


def test_cordoned_and_standing_by_nodes_ask_again_for_a_give_back_that_did_not_land():
    left = released(deployment_pod("web-0"), replacement_ready=None)
    cordon_only = Notice(MAINTENANCE.kind, deadline=T0 + 3600, cordon_only=True, source="test", detail="rebalance")
    cordoned = lc.decide(lc.State(), seen(left, notice=cordon_only), now=T0, timing=TIMING).state
    assert cordoned.progress.phase is lc.Phase.CORDONED
    again = lc.decide(cordoned, after(cordoned, left, notice=cordon_only), now=T0 + 1, timing=TIMING)
    assert of_type(again.actions, lc.ReadoptPod) == [lc.ReadoptPod(left)]
    surge_only = Notice(MAINTENANCE.kind, deadline=T0 + 1800, surge_only=True, source="test", detail="rebalance")
    standby = lc.decide(lc.State(), seen(left, notice=surge_only), now=T0, timing=TIMING).state
    assert standby.progress.phase is lc.Phase.STANDBY
    again = lc.decide(standby, seen(left, notice=surge_only), now=T0 + 1, timing=TIMING)
    assert of_type(again.actions, lc.ReadoptPod) == [lc.ReadoptPod(left)]


def test_a_full_notice_withdrawn_under_a_lesser_one_gives_the_pod_back_too():
    web = deployment_pod("web-0")
    state = started(web).state
    gone = released(web, replacement_ready=False)
    cordon_only = Notice(MAINTENANCE.kind, deadline=T0 + 3600, cordon_only=True, source="test", detail="rebalance")
    decision = lc.decide(state, after(state, gone, notice=cordon_only), now=T0 + 30, timing=TIMING)
    assert decision.state.progress.phase is lc.Phase.CORDONED
    assert of_type(decision.actions, lc.ReadoptPod) == [lc.ReadoptPod(gone)]

r"""The decision state machine: what to do next, given what the daemon sees. Pure: no I/O, no clock.

The daemon calls `decide(state, seen, now=...)` every time something changes (a notice, a pod or
node update, a vLLM reading, a timer while draining) and carries out the returned actions. It is
level-triggered like a Kubernetes controller: each call looks at the whole observed world and asks
for what is still missing, so a failed API call is simply asked for again on the next call, and a
restarted daemon picks up where the node annotations (`Progress`) say it was.

The path of one notice:

    guarding --notice--> deregistering --endpoints not-ready--> draining --in-flight 0--> evicting
        ^    \             (cordon, taint,      (or wait bounded)          (or budget spent)    |
        |     \             serving=False)                                                     v
        |      long notice, pods opted in: surging --replacements up--^                      drained
        |      (cordon, taint, hand-overs or       (or the surge's time is up)                  |
        |       placeholders; the pods keep serving)                                            |
        |      cordon-only notice: cordoned --a notice that is more--> (as any notice)          |
        |      (cordon, taint; the pods keep serving)                                           |
        |      surge-only notice: standby --a notice that is more--> (as any notice)            |
        |      (placeholders only; no cordon)                                                   |
        +--------------- notice withdrawn: undo only what spotguard did ------------------------+

Surging: on a notice long enough (--surge-min-notice-seconds), each serving pod annotated
spotguard.io/surge: "true" has its replacement brought up while it keeps serving. A Deployment's
pod is handed over (spotguard.handover): released from its ReplicaSet, which starts the replacement
at once (Pending, it makes the node-pool autoscaler add a node); the pod is drained once the
ReplicaSet has every replica Ready again, so the pool never serves with one fewer. Any other pod (a
StatefulSet's) gets a placeholder shaped like it (same requests, selectors, tolerations, never on
this node) at a low priority, which brings the node; its replacement preempts the placeholder there
after the eviction. Once every replacement is Ready and every placeholder runs (or the surge's time
is up, keeping --surge-drain-reserve-seconds for the drain), the pods are deregistered, drained and
evicted as usual. A withdrawn notice gives released pods back to their ReplicaSets.

Standing by: a surge-only notice (an AWS rebalance recommendation with --rebalance-action surge)
says an interruption is more likely, not that one comes. The same placeholders are made, but the
node is not cordoned and nothing is drained; they are released when the notice is withdrawn (EC2
drops the recommendation, or --rebalance-release-seconds passed). An interruption that does come
starts as any notice, and its replacements find the capacity already there.

Stepping back: when the notice that asked for a drain is withdrawn while a lesser one remains (a
cancelled EC2 scheduled event under a rebalance recommendation's cordon or surge), the pods serve
again and the node goes to `cordoned` or `standby`, as if only the lesser notice had come.
"""

from __future__ import annotations

import math
from dataclasses import replace

# The types decisions are made of live in lifecycle_types; they are re-exported here, so the rest of
# spotguard (and its tests) reads them as lifecycle.X.
from spotguard.lifecycle_types import (  # noqa: F401 - re-exported
    SERVING_CONDITION,
    TAINT_KEY,
    Phase,
    Reason,
    NotEvictable,
    PodFacts,
    PlaceholderFacts,
    Seen,
    Timing,
    Progress,
    EvictionAttempt,
    State,
    UpdateNode,
    SetServing,
    Evict,
    CreatePlaceholder,
    DeletePlaceholder,
    ReleasePod,
    ReadoptPod,
    Report,
    Action,
    Decision,
)


# ---------------------------------------------------------------------------------------------
# Deciding


def decide(state: State, seen: Seen, *, now: float, timing: Timing) -> Decision:
    progress = state.progress
    if seen.notice is None:
        if progress is None and seen.stored_progress is not None:
            # An undo that did not land, or a notice withdrawn while the daemon was down.
            return _cancel(replace(state, progress=seen.stored_progress), seen)
        if progress is None:
            # Placeholders and released pods with no notice behind them: left by a daemon that
            # stopped mid-surge.
            return Decision(state, (*_keep_serving(seen.pods), *map(DeletePlaceholder, seen.placeholders),
                                    *_readopt(state, seen.pods)))
        return _cancel(state, seen)
    if progress is None:
        return _start(state, seen, now=now, timing=timing)
    if not seen.notice.full and progress.phase not in (Phase.CORDONED, Phase.STANDBY):
        return _step_back(state, seen, now=now)
    # A second notice can only bring the deadline closer (maintenance, then preempted).
    if seen.notice.deadline < progress.deadline:
        progress = replace(progress, deadline=_stored_time(seen.notice.deadline),
                           notice_kind=seen.notice.kind.value)
        state = replace(state, progress=progress)
    step = {
        Phase.CORDONED: _cordoned,
        Phase.STANDBY: _standby,
        Phase.SURGING: _surging,
        Phase.DEREGISTERING: _deregistering,
        Phase.DRAINING: _draining,
        Phase.EVICTING: _evicting,
        Phase.DRAINED: _drained,
    }[progress.phase]
    decision = step(state, seen, now=now, timing=timing)
    return Decision(decision.state, (*_repair_node(state.progress, seen, decision.actions), *decision.actions))


def _repair_node(progress: Progress | None, seen: Seen, planned: tuple[Action, ...]) -> tuple[Action, ...]:
    """Ask again for node changes a failed PATCH (API server down, a conflict) did not make."""
    if progress is None or any(isinstance(a, UpdateNode) for a in planned):
        return ()
    cordon = progress.cordoned_by_us and not seen.node_unschedulable
    taint = progress.tainted_by_us and not seen.node_has_taint
    exclude = progress.excluded_by_us and not seen.node_excluded_from_lb
    if not (cordon or taint or exclude or seen.stored_progress != progress):
        return ()
    return (UpdateNode(unschedulable=True if cordon else None,
                       taint_value=progress.notice_kind if taint else None,
                       exclude_from_lb=True if exclude else None, progress=progress),)


def _keep_serving(pods: tuple[PodFacts, ...]) -> tuple[Action, ...]:
    """No notice: every serving pod gets serving=True, so new vLLM pods are not held unready."""
    return tuple(SetServing(pod, True) for pod in pods
                 if pod.serving and not pod.terminating and pod.serving_condition is not True)


def _start(state: State, seen: Seen, *, now: float, timing: Timing, owned: Progress | None = None) -> Decision:
    """A notice: cordon and taint, then surge, or deregister, or (cordon-only) nothing more. The
    cordon and taint already on the node are spotguard's when `owned` (or the node's stored
    progress, an undo that has not landed) says so."""
    notice = seen.notice
    assert notice is not None
    if notice.surge_only:
        return _stand_by(state, seen, now=now, owned=owned or seen.stored_progress)
    fits = not notice.cordon_only and _surge_fits(notice.deadline, now=now, timing=timing)
    surge = _surge_pods(seen.pods) if fits else []
    progress = Progress(
        phase=Phase.CORDONED if notice.cordon_only else Phase.SURGING if surge else Phase.DEREGISTERING,
        notice_kind=notice.kind.value,
        deadline=_stored_time(notice.deadline),
        noticed_at=_stored_time(now),
        phase_since=_stored_time(now),
        cordoned_by_us=not seen.node_unschedulable,
        tainted_by_us=not seen.node_has_taint,
        excluded_by_us=timing.exclude_from_load_balancers and not seen.node_excluded_from_lb,
    )
    owned = owned or seen.stored_progress
    if owned is not None:
        progress = replace(progress, cordoned_by_us=owned.cordoned_by_us, tainted_by_us=owned.tainted_by_us,
                           excluded_by_us=owned.excluded_by_us or progress.excluded_by_us)
    node_update = UpdateNode(
        unschedulable=True if progress.cordoned_by_us else None,
        taint_value=notice.kind.value if progress.tainted_by_us else None,
        exclude_from_lb=True if progress.excluded_by_us else None,
        progress=progress,
    )
    state = replace(state, progress=progress, evicted=frozenset(), attempts={}, reported=frozenset(),
                    surge_refused=frozenset())
    if notice.cordon_only:   # a cordon-only node does not surge: placeholders left from a stand-by go
        return Decision(state, (node_update, *map(DeletePlaceholder, seen.placeholders), Report(
            Reason.CORDONED, f"{notice.kind.value} notice from {notice.source} ({notice.detail}): cordoned and "
                             "tainted only; the pods keep serving", warning=True)))
    if surge:
        until = _surge_until(progress, timing)
        handed = sum(1 for pod in surge if _hands_over(pod))
        report = Report(Reason.SURGE_STARTED,
                        f"{notice.kind.value} notice from {notice.source} ({notice.detail}); the VM goes in "
                        f"{notice.deadline - now:.0f}s: cordoned, tainted; {handed} pod(s) handed over to "
                        f"replacements started now, {len(surge) - handed} placeholder(s) bring up capacity; "
                        f"the pods keep serving (for at most {until - now:.0f}s)", warning=True)
        asks = _surge_asks(state, surge, seen)
        state, released = _released_reports(state, asks)
        return Decision(state, (node_update, *asks, report, *released))
    not_serving = _not_serving(seen.pods)
    report = Report(Reason.TERMINATION_NOTICE,
                    f"{notice.kind.value} notice from {notice.source} ({notice.detail}); the VM goes in "
                    f"{max(0.0, notice.deadline - now):.0f}s: cordoned, tainted, {len(not_serving)} "
                    f"serving pod(s) set not-ready", warning=True)
    per_pod = _not_serving_reports(not_serving)
    return Decision(state, (node_update, *not_serving, report, *per_pod))


def _not_serving_reports(actions: tuple[SetServing, ...]) -> tuple[Report, ...]:
    return tuple(Report(Reason.NOT_SERVING, "termination notice: spotguard.io/serving=False, so the pod leaves its "
                                            "Services' endpoints before it is drained and evicted", pod=action.pod)
                 for action in actions)


def _not_serving(pods: tuple[PodFacts, ...]) -> tuple[SetServing, ...]:
    return tuple(SetServing(pod, False) for pod in pods
                 if pod.serving and not pod.terminating and pod.serving_condition is not False)


def _stored_time(timestamp: float) -> float:
    """Times as the node annotations hold them (RFC 3339, milliseconds), so that what is read back
    compares equal to what was written."""
    return round(timestamp, 3)


def _move(state: State, phase: Phase, *, now: float) -> tuple[State, UpdateNode]:
    assert state.progress is not None
    progress = replace(state.progress, phase=phase, phase_since=_stored_time(now))
    return replace(state, progress=progress), UpdateNode(progress=progress)


def _cordoned(state: State, seen: Seen, *, now: float, timing: Timing) -> Decision:
    """Cordoned only, until a notice that asks for more (an interruption after a rebalance
    recommendation): that one starts as any notice, the cordon and taint staying spotguard's."""
    assert seen.notice is not None
    if seen.notice.cordon_only:
        # The pods serve: new ones too; a pod a give-back missed is asked for again.
        return Decision(state, (*_keep_serving(seen.pods), *_readopt(state, seen.pods)))
    return _start(state, seen, now=now, timing=timing, owned=state.progress)


def _step_back(state: State, seen: Seen, *, now: float) -> Decision:
    """The notice that asked for a drain was withdrawn (an EC2 scheduled event cancelled) while a
    lesser one remains (a rebalance recommendation's cordon or surge): the pods serve again, and
    only what the remaining one asks for stays. Pods already evicted cannot be brought back."""
    progress, notice = state.progress, seen.notice
    assert progress is not None and notice is not None
    if notice.surge_only:
        # A stand-by cordons nothing: undo what spotguard did, as on any withdrawn notice but
        # keeping the placeholders; the stand-by starts once the node says the undo landed.
        return _cancel(state, seen, keep_placeholders=True)
    # Cordon-only: the cordon, taint and label stay, and stay spotguard's.
    kept = replace(progress, phase=Phase.CORDONED, notice_kind=notice.kind.value,
                   deadline=_stored_time(notice.deadline), phase_since=_stored_time(now), drain_from=None)
    restored = tuple(SetServing(pod, True) for pod in seen.pods
                     if pod.serving and not pod.terminating and pod.serving_condition is False)
    report = Report(Reason.NOTICE_CANCELLED, f"the {progress.notice_kind} notice was withdrawn; the "
                                             f"{notice.kind.value} remains, so the node is only cordoned and the "
                                             f"pods serve again")
    readopt = _readopt(state, seen.pods)
    return Decision(State(progress=kept), (UpdateNode(progress=kept), *restored, *readopt,
                                           *map(DeletePlaceholder, seen.placeholders), report,
                                           *_readopted_reports(readopt)))


# -- standing by ------------------------------------------------------------------------------

def _stand_by(state: State, seen: Seen, *, now: float, owned: Progress | None) -> Decision:
    """A surge-only notice: placeholders for the opted-in pods, nothing else. The node is not
    cordoned, so spotguard owns nothing on it: what an earlier notice made spotguard's (`owned`:
    the state's progress, or the node's, for an undo that has not landed) is undone first."""
    notice = seen.notice
    assert notice is not None
    if owned is not None and owned.phase is not Phase.STANDBY:
        return _cancel(replace(state, progress=owned), seen, keep_placeholders=True)
    progress = Progress(phase=Phase.STANDBY, notice_kind=notice.kind.value, deadline=_stored_time(notice.deadline),
                        noticed_at=_stored_time(now), phase_since=_stored_time(now),
                        cordoned_by_us=False, tainted_by_us=False)
    state = replace(state, progress=progress, evicted=frozenset(), attempts={}, reported=frozenset(),
                    surge_refused=frozenset())
    surge = _surge_pods(seen.pods)
    # Said (Event, webhook) only where there is something to surge: every node sees the recommendation.
    report = (Report(Reason.SURGE_STARTED,
                     f"{notice.kind.value} from {notice.source} ({notice.detail}): {len(surge)} placeholder(s) "
                     f"bring up capacity in case an interruption follows; not cordoned, the pods keep serving; "
                     f"released in {max(0.0, notice.deadline - now):.0f}s if none comes"),) if surge else ()
    return Decision(state, (UpdateNode(progress=progress), *_keep_serving(seen.pods),
                            *map(CreatePlaceholder, _without_placeholder(surge, seen)), *report))


def _standby(state: State, seen: Seen, *, now: float, timing: Timing) -> Decision:
    """Keep a placeholder for each opted-in pod (a pod replaced meanwhile gets a new one, and the
    old one goes), until a notice that is more than a surge: that one starts as any notice, on a
    node spotguard has not touched (so nothing it finds there is spotguard's)."""
    assert seen.notice is not None
    if not seen.notice.surge_only:
        return _start(replace(state, progress=None), replace(seen, stored_progress=None), now=now, timing=timing)
    surge = [pod for pod in _surge_pods(seen.pods) if pod.uid not in state.surge_refused]
    wanted = {pod.uid for pod in surge}
    stale = [placeholder for placeholder in seen.placeholders if placeholder.for_uid not in wanted]
    # The node is not cordoned: new pods come, and serve; a pod a give-back missed is asked for again.
    return Decision(state, (*_keep_serving(seen.pods), *map(CreatePlaceholder, _without_placeholder(surge, seen)),
                            *map(DeletePlaceholder, stale), *_readopt(state, seen.pods)))


def _without_placeholder(pods: list[PodFacts], seen: Seen) -> list[PodFacts]:
    have = {placeholder.for_uid for placeholder in seen.placeholders}
    return [pod for pod in pods if pod.uid not in have]


# -- handing over (spotguard.handover) --------------------------------------------------------

def _hands_over(pod: PodFacts) -> bool:
    """A Deployment's pod: its ReplicaSet replaces it while it serves; no placeholder."""
    return pod.release_key is not None or pod.released_from is not None


def _surge_asks(state: State, pods: list[PodFacts], seen: Seen) -> list[Action]:
    """What the surge still needs for these pods: released from their ReplicaSets, or placeholders."""
    asks: list[Action] = []
    for pod in pods:
        if pod.uid in state.surge_refused or pod.released_from is not None:
            continue
        asks.append(ReleasePod(pod) if pod.release_key is not None else CreatePlaceholder(pod))
    have = {placeholder.for_uid for placeholder in seen.placeholders}
    return [ask for ask in asks if not (isinstance(ask, CreatePlaceholder) and ask.pod.uid in have)]


def _released_reports(state: State, asks: list[Action]) -> tuple[State, list[Action]]:
    """Once per pod: a release is asked again until the watch shows it landed."""
    reports: list[Action] = []
    for ask in asks:
        if isinstance(ask, ReleasePod):
            state, first = report_once(state, Report(
                Reason.RELEASED, "taken from its ReplicaSet, which starts its replacement now; it serves until that "
                                 "one is Ready", pod=ask.pod))
            reports += first
    return state, reports


def _readopt(state: State, pods: tuple[PodFacts, ...]) -> tuple[ReadoptPod, ...]:
    """Released pods with no surge behind them any more, to give back (not those the API server
    refused to take back: asked again, it would refuse again)."""
    return tuple(ReadoptPod(pod) for pod in pods if pod.released_from is not None and pod.release_key is None
                 and pod.surge and not pod.terminating and pod.uid not in state.surge_refused)


def _readopted_reports(actions: tuple[ReadoptPod, ...]) -> tuple[Report, ...]:
    return tuple(Report(Reason.READOPTED, "the notice was withdrawn: given back to its ReplicaSet, which removes "
                                          "one replica: a not-ready one (the replacement, while it starts), else "
                                          "this one", pod=action.pod) for action in actions)


# -- surging ------------------------------------------------------------------------------------

def _surge_pods(pods: tuple[PodFacts, ...]) -> list[PodFacts]:
    return [pod for pod in _live_serving(pods) if pod.surge]


def _surge_until(progress: Progress, timing: Timing) -> float:
    return progress.deadline - timing.safety_margin_seconds - timing.surge_drain_reserve_seconds


def _surge_fits(deadline: float, *, now: float, timing: Timing) -> bool:
    """The notice is long enough to surge, and leaves the surge some time before the drain's reserve."""
    return (timing.surge_min_notice_seconds > 0 and deadline - now >= timing.surge_min_notice_seconds
            and deadline - timing.safety_margin_seconds - timing.surge_drain_reserve_seconds > now)


def _surging(state: State, seen: Seen, *, now: float, timing: Timing) -> Decision:
    """Wait until every opted-in pod's replacement is Ready (handed over) or its placeholder runs,
    asking for what is missing, or until the surge's time is up; then take the pods out of rotation
    and go on as after any notice."""
    assert state.progress is not None
    placeholders = {placeholder.for_uid: placeholder for placeholder in seen.placeholders}

    def covered(pod: PodFacts) -> bool:
        if _hands_over(pod):
            return pod.released_from is not None and pod.replacement_ready is True
        return pod.uid in placeholders and placeholders[pod.uid].running

    pods = _surge_pods(seen.pods)
    # A stand-by's placeholder for a pod now handed over holds capacity its replacement can use.
    held = tuple(DeletePlaceholder(placeholders[pod.uid]) for pod in pods
                 if pod.released_from is not None and pod.uid in placeholders)
    waiting = [pod for pod in pods if pod.uid not in state.surge_refused and not covered(pod)]
    if waiting and now < _surge_until(state.progress, timing):
        asks = _surge_asks(state, waiting, seen)
        state, released = _released_reports(state, asks)
        return Decision(state, (*held, *asks, *released))
    actions: list[Action] = []
    for pod in waiting:  # the surge's time is up: drain without them, and leave nothing behind
        late = ("its replacement was not Ready in time; draining it anyway (the replacement still comes)"
                if pod.released_from is not None else
                "it was not released from its ReplicaSet in time; draining without a replacement started"
                if _hands_over(pod) else "its placeholder did not run on new capacity in time; draining without it")
        state, first = report_once(state, Report(Reason.SURGE_GIVEN_UP, late, pod=pod, warning=True))
        actions += first
        if pod.uid in placeholders:
            actions.append(DeletePlaceholder(placeholders[pod.uid]))
    actions += [delete for delete in held if delete not in actions]
    ready = len(pods) - len(waiting)
    actions.append(Report(Reason.SURGE_READY, f"{ready} of {len(pods)} pod(s) have their replacement Ready or a "
                                              "placeholder running on new capacity; taking the pods out of rotation"))
    state = replace(state, progress=replace(state.progress, drain_from=_stored_time(now)))
    state, node_update = _move(state, Phase.DEREGISTERING, now=now)
    not_serving = _not_serving(seen.pods)
    return Decision(state, (*actions, node_update, *not_serving, *_not_serving_reports(not_serving)))


def record_surge_refused(state: State, action: CreatePlaceholder | ReleasePod | ReadoptPod,
                         detail: str) -> tuple[State, tuple[Report, ...]]:
    """The API server refused a placeholder or a release (a ResourceQuota, a policy): the surge goes
    on without that pod. Or it refused to take a released pod back: it is not asked again."""
    state = replace(state, surge_refused=state.surge_refused | {action.pod.uid})
    if isinstance(action, ReadoptPod):
        state, reports = report_once(state, Report(
            Reason.SURGE_GIVEN_UP, f"giving it back to its ReplicaSet was refused ({detail}); it stays released "
                                   "(its ReplicaSet has one pod more until it is deleted)", pod=action.pod, warning=True))
        return state, tuple(reports)
    what = "its placeholder" if isinstance(action, CreatePlaceholder) else "its release from its ReplicaSet"
    state, reports = report_once(state, Report(
        Reason.SURGE_GIVEN_UP, f"{what} was refused ({detail}); it will be drained without a replacement started",
        pod=action.pod, warning=True))
    return state, tuple(reports)


def _deregistering(state: State, seen: Seen, *, now: float, timing: Timing) -> Decision:
    assert state.progress is not None
    # New serving pods, or a PATCH that failed: ask again. Pods that serve nothing can go at once,
    # and so can a pod that drains itself once routers no longer send it work.
    actions: list[Action] = [*_not_serving(seen.pods)]
    actions += _evict_due(state, [p for p in _evictable(seen.pods)
                                  if not p.serving or (p.drains_itself and _out_of_rotation(p))], now=now)
    serving = _live_serving(seen.pods)
    still_ready = [pod for pod in serving if pod.endpoints_ready or pod.serving_condition is not False]
    waited = now - state.progress.phase_since
    if still_ready and waited < timing.endpoint_wait_seconds and now < _drain_until(state.progress, timing):
        return Decision(state, tuple(actions))
    if still_ready:
        state, first = report_once(state, Report(
            Reason.ENDPOINTS_STILL_READY,
            f"endpoints of {', '.join(p.key for p in still_ready)} still ready after {waited:.1f}s; "
            "draining anyway", warning=True))
        actions += first
    state, node_update = _move(state, Phase.DRAINING, now=now)
    return Decision(state, (*actions, node_update))


def _out_of_rotation(pod: PodFacts) -> bool:
    """spotguard.io/serving is False and no EndpointSlice lists the pod as ready any more."""
    return pod.serving_condition is False and not pod.endpoints_ready


def _live_serving(pods: tuple[PodFacts, ...]) -> list[PodFacts]:
    """Serving pods that still run: a pod that finished (its vLLM stopped, e.g. by the kubelet's
    node shutdown) has nothing left to drain, so the drain must not wait for its /metrics."""
    return [pod for pod in pods if pod.serving and not pod.terminating and pod.not_evictable is not NotEvictable.FINISHED]


def _drain_until(progress: Progress, timing: Timing) -> float:
    started = progress.noticed_at if progress.drain_from is None else progress.drain_from
    return min(progress.deadline - timing.safety_margin_seconds, started + timing.max_drain_seconds)


def _draining(state: State, seen: Seen, *, now: float, timing: Timing) -> Decision:
    assert state.progress is not None
    actions: list[Action] = [*_not_serving(seen.pods)]
    # The endpoint wait is over: a pod that drains itself goes now, whatever the EndpointSlices say.
    actions += _evict_due(state, [p for p in _evictable(seen.pods) if not p.serving or p.drains_itself], now=now)
    # spotguard waits only for the pods that do not drain themselves.
    serving = [p for p in _live_serving(seen.pods) if not p.drains_itself and p.uid not in state.evicted]
    for pod in serving:
        if pod.metrics_unreadable:
            state, first = report_once(state, Report(
                Reason.METRICS_UNAVAILABLE, "vLLM /metrics unreadable; falling back to the time budget",
                pod=pod, warning=True))
            actions += first
    busy = [pod for pod in serving if pod.in_flight != 0]
    if busy and now < _drain_until(state.progress, timing):
        return Decision(state, tuple(actions))
    if busy:
        counts = ", ".join(f"{p.key}={'unknown' if p.in_flight is None else p.in_flight}" for p in busy)
        actions.append(Report(Reason.DRAIN_BUDGET_SPENT,
                              f"drain budget spent with requests in flight ({counts}); evicting",
                              warning=True))
    else:
        actions.append(Report(Reason.DRAINED, f"{len(serving)} serving pod(s) have no requests in flight"))
    state, node_update = _move(state, Phase.EVICTING, now=now)
    planned = {a.pod.uid for a in actions if isinstance(a, Evict)}
    evictions = _evict_due(state, [p for p in _evictable(seen.pods) if p.uid not in planned], now=now)
    return Decision(state, (*actions, node_update, *evictions))


def _evicting(state: State, seen: Seen, *, now: float, timing: Timing) -> Decision:
    assert state.progress is not None
    actions: list[Action] = [*_evict_due(state, _evictable(seen.pods), now=now)]
    if now >= state.progress.deadline:
        left = [p.key for p in _evictable(seen.pods) if p.uid not in state.evicted]
        state, first = report_once(state, Report(
            Reason.DEADLINE_MISSED, f"deadline passed with pods not evicted: {', '.join(left)}", warning=True))
        actions += first
    remaining = [p for p in _evictable(seen.pods) if p.uid not in state.evicted]
    if remaining:
        return Decision(state, tuple(actions))
    state, node_update = _move(state, Phase.DRAINED, now=now)
    actions.append(node_update)
    actions.append(Report(Reason.NODE_DRAINED, "every evictable pod is evicted or terminating"))
    return Decision(state, tuple(actions))


def _drained(state: State, seen: Seen, *, now: float, timing: Timing) -> Decision:
    # Pods created after the drain (a controller that tolerates our taint) are evicted too.
    return _evicting(state, seen, now=now, timing=timing) if _has_new_pods(state, seen) \
        else Decision(state, ())


def _has_new_pods(state: State, seen: Seen) -> bool:
    return any(p.uid not in state.evicted for p in _evictable(seen.pods))


def _evictable(pods: tuple[PodFacts, ...]) -> list[PodFacts]:
    return [pod for pod in pods if pod.not_evictable is None and not pod.terminating]


def _evict_due(state: State, candidates: list[PodFacts], *, now: float) -> list[Action]:
    """Evictions of `candidates` not yet evicted and not waiting for a retry."""
    assert state.progress is not None
    # Never 0: gracePeriodSeconds=0 deletes the object at once while its containers still run
    # (a force delete). At the last second, or past the deadline, the pod still gets 1 s.
    grace = max(1, math.ceil(state.progress.deadline - now))
    actions: list[Action] = []
    for pod in candidates:
        if pod.uid in state.evicted:
            continue
        attempt = state.attempts.get(pod.uid)
        if attempt is not None and attempt.retry_at > now:
            continue
        actions.append(Evict(pod, max(1, min(pod.termination_grace_seconds, grace))))
    return actions


def report_once(state: State, report: Report) -> tuple[State, list[Action]]:
    """The report, unless this notice already made it (a level-triggered loop sees things many times)."""
    key = f"{report.reason}:{report.pod.uid if report.pod else ''}"
    if key in state.reported:
        return state, []
    return replace(state, reported=state.reported | {key}), [report]


def _cancel(state: State, seen: Seen, *, keep_placeholders: bool = False) -> Decision:
    """Undo what spotguard did for the notice in `state` (only that: ownership says what), serve
    again, and (unless kept for a stand-by that follows) delete the placeholders."""
    progress = state.progress
    assert progress is not None
    restored = tuple(SetServing(pod, True) for pod in seen.pods
                     if pod.serving and not pod.terminating and pod.serving_condition is False)
    undo = UpdateNode(unschedulable=False if progress.cordoned_by_us else None,
                      remove_taint=progress.tainted_by_us,
                      exclude_from_lb=False if progress.excluded_by_us else None, clear_progress=True)
    kept = "" if progress.cordoned_by_us else " (the cordon was not spotguard's, so it stays)"
    gone = f"; {len(state.evicted)} pod(s) already evicted cannot be brought back" if state.evicted else ""
    report = Report(Reason.NOTICE_CANCELLED, f"the {progress.notice_kind} notice was withdrawn: undid "
                                       f"spotguard's cordon and taint{kept}{gone}")
    per_pod = tuple(Report(Reason.SERVING_RESTORED, "the termination notice was withdrawn: spotguard.io/serving=True",
                           pod=action.pod) for action in restored)
    dropped = () if keep_placeholders else tuple(map(DeletePlaceholder, seen.placeholders))
    readopt = _readopt(state, seen.pods)
    if progress.phase is Phase.STANDBY:
        report = Report(Reason.NOTICE_CANCELLED, f"the {progress.notice_kind} was withdrawn or its time is up with no "
                                                 f"interruption: released {len(dropped)} placeholder(s)")
    return Decision(State(), (undo, *restored, *readopt, *dropped, report, *per_pod, *_readopted_reports(readopt)))

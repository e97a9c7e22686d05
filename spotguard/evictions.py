"""What an Eviction API call answered, fed back into the lifecycle's state: accepted pods are
never evicted again, refused ones are retried with backoff, and each refusal is reported once.

Kept apart from `lifecycle.decide` because it is the one input that comes from carrying out an
action rather than from watching the world.
"""

from __future__ import annotations

import enum
from dataclasses import replace

from spotguard.backoff import backoff_delay
from spotguard.lifecycle import EvictionAttempt, PodFacts, Reason, Report, State, Timing, report_once


class EvictionOutcome(enum.StrEnum):
    EVICTED = "evicted"  # 200/201: the pod is terminating
    BLOCKED_BY_PDB = "blocked_by_pdb"  # 429: a PodDisruptionBudget allows no disruption now
    MULTIPLE_PDBS = "multiple_pdbs"  # 500: more than one PDB selects the pod; the API refuses
    GONE = "gone"  # 404: already deleted
    ERROR = "error"  # anything else; retried


def record_eviction(state: State, pod: PodFacts, outcome: EvictionOutcome, *, now: float, timing: Timing,
                    blocked_by: str | None = None, rand: float = 0.5) -> tuple[State, tuple[Report, ...]]:
    """Remember an Eviction API answer: accepted pods are never evicted again, refused ones retried."""
    if outcome in (EvictionOutcome.EVICTED, EvictionOutcome.GONE):
        attempts = {uid: a for uid, a in state.attempts.items() if uid != pod.uid}
        state = replace(state, evicted=state.evicted | {pod.uid}, attempts=attempts)
        how = ("evicted through the Eviction API as soon as it left its Services' endpoints: it drains its own "
               "in-flight requests on SIGTERM (spotguard.io/drains-on-sigterm), so its replacement starts now"
               if pod.serving and pod.drains_itself else "evicted through the Eviction API")
        return state, (Report(Reason.EVICTED, how, pod=pod),) if outcome is EvictionOutcome.EVICTED else ()
    previous = state.attempts.get(pod.uid)
    count = previous.attempts + 1 if previous else 1
    delay = backoff_delay(count, base=timing.eviction_retry_base_seconds,
                          cap=timing.eviction_retry_cap_seconds, rand=lambda: rand)
    attempts = {**state.attempts, pod.uid: EvictionAttempt(count, now + delay)}
    state = replace(state, attempts=attempts)
    if outcome is EvictionOutcome.BLOCKED_BY_PDB:
        report = Report(Reason.EVICTION_BLOCKED,
                        f"PodDisruptionBudget {blocked_by or '(unknown)'} allows no disruption; retrying "
                        f"until the deadline", pod=pod, warning=True)
    elif outcome is EvictionOutcome.MULTIPLE_PDBS:
        report = Report(Reason.EVICTION_BLOCKED, "more than one PodDisruptionBudget selects this pod "
                                           f"({blocked_by or 'unknown'}); the Eviction API refuses it",
                        pod=pod, warning=True)
    else:
        report = Report(Reason.EVICTION_FAILED, f"eviction failed ({blocked_by or 'unknown error'}); retrying",
                        pod=pod, warning=True)
    state, reports = report_once(state, report)
    return state, tuple(reports)

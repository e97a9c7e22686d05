"""What the lifecycle's decisions are made of: what the daemon sees (`Seen`, `PodFacts`), what it
remembers (`Progress`, `State`), what it is asked to do (the actions) and the catalogues (`Phase`,
`Reason`, `NotEvictable`). Plain frozen data, no logic; `spotguard.lifecycle` decides with them and
re-exports them, so callers read them as `lifecycle.X`."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Mapping, Union

from spotguard.notice import Notice

SERVING_CONDITION = "spotguard.io/serving"
TAINT_KEY = "spotguard.io/impending-termination"


class Phase(enum.StrEnum):
    GUARDING = "guarding"
    SURGING = "surging"  # cordoned; the pods keep serving while their replacements start elsewhere
    CORDONED = "cordoned"  # cordoned and tainted only (a cordon-only notice); the pods keep serving
    STANDBY = "standby"  # not cordoned; placeholders hold capacity in case (a surge-only notice)
    DEREGISTERING = "deregistering"  # cordoned, pods set not-ready; waiting for endpoints to follow
    DRAINING = "draining"  # waiting for vLLM's in-flight requests to finish
    EVICTING = "evicting"  # Eviction API calls, retried while a PDB refuses
    DRAINED = "drained"  # every evictable pod is gone or terminating; the VM may go


class Reason(enum.StrEnum):
    """Every Kubernetes Event spotguard posts (and logs), by reason: the catalogue. Node Events
    first, then pod Events."""

    TERMINATION_NOTICE = "TerminationNotice"  # node: a notice; cordoned, tainted, pods not-ready
    CORDONED = "Cordoned"  # node: a cordon-only notice; cordoned and tainted, the pods keep serving
    ENDPOINTS_STILL_READY = "EndpointsStillReady"  # node: the endpoint wait ran out; draining anyway
    DRAINED = "Drained"  # node: nothing in flight any more
    DRAIN_BUDGET_SPENT = "DrainBudgetSpent"  # node: evicting with requests still in flight
    DEADLINE_MISSED = "DeadlineMissed"  # node: the VM's time came with pods not evicted
    NODE_DRAINED = "NodeDrained"  # node: every evictable pod evicted or terminating
    NOTICE_CANCELLED = "NoticeCancelled"  # node: the notice was withdrawn; spotguard undid its part
    SURGE_STARTED = "SurgeStarted"  # node: placeholders created; the pods serve until they run
    SURGE_READY = "SurgeReady"  # node: the surge is over (placeholders running, or its time up)
    NOT_SERVING = "NotServing"  # pod: spotguard.io/serving=False
    SERVING_RESTORED = "ServingRestored"  # pod: spotguard.io/serving=True again after a cancellation
    METRICS_UNAVAILABLE = "MetricsUnavailable"  # pod: vLLM /metrics unreadable; the time budget decides
    EVICTED = "Evicted"  # pod: the Eviction API accepted it
    EVICTION_BLOCKED = "EvictionBlocked"  # pod: a PodDisruptionBudget refused; retried
    EVICTION_FAILED = "EvictionFailed"  # pod: the Eviction API failed otherwise; retried
    SURGE_GIVEN_UP = "SurgeGivenUp"  # pod: its placeholder or replacement was refused or late
    RELEASED = "Released"  # pod: taken from its ReplicaSet, which starts the replacement now
    READOPTED = "Readopted"  # pod: given back to its ReplicaSet after a cancellation


class NotEvictable(enum.StrEnum):
    """Why spotguard never evicts a pod."""

    DAEMONSET = "daemonset"  # a DaemonSet's pod (spotguard's own among them) would come straight back
    MIRROR = "mirror"  # a static pod: the kubelet owns it, the API cannot evict it
    OPTED_OUT = "opted-out"  # annotated spotguard.io/evict: "false"
    FINISHED = "finished"  # Succeeded or Failed: nothing runs


# ---------------------------------------------------------------------------------------------
# What the daemon sees


@dataclass(frozen=True)
class PodFacts:
    namespace: str
    name: str
    uid: str
    # Declares the spotguard.io/serving readiness gate: a vLLM pod spotguard deregisters and drains.
    serving: bool
    # Current value of the spotguard.io/serving condition; None when not set.
    serving_condition: bool | None
    # Why the pod must never be evicted, or None.
    not_evictable: NotEvictable | None
    terminating: bool
    termination_grace_seconds: int = 30
    # Does any EndpointSlice still list this pod as ready? None: no endpoints, or not looked at.
    endpoints_ready: bool | None = None
    # running + waiting requests from vLLM's /metrics; None: not read yet or unreadable.
    in_flight: int | None = None
    # The last /metrics read failed (so `in_flight` is not known).
    metrics_unreadable: bool = False
    # The pod finishes its own in-flight requests on SIGTERM (vLLM --shutdown-timeout, or the chart's
    # drain-aware preStop helper; annotation spotguard.io/drains-on-sigterm: "true"). Such a pod is
    # evicted as soon as it is out of its Services' endpoints, so its replacement starts at once
    # while it drains; other serving pods are drained first, then evicted.
    drains_itself: bool = False
    # Annotated spotguard.io/surge: "true" and owned by a ReplicaSet or StatefulSet (something
    # that replaces it), or released from one: on a long notice, its replacement comes first.
    surge: bool = False
    # "<replicaset>/<pod-template-hash>" of a Deployment's pod, which a surge hands over to its
    # replacement (spotguard.handover) instead of making it a placeholder; None for other pods.
    release_key: str | None = None
    # The same, for a pod spotguard released (spotguard.io/released-from), else None.
    released_from: str | None = None
    # For a released pod: has its former ReplicaSet every replica Ready again? None: not known.
    replacement_ready: bool | None = None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class PlaceholderFacts:
    """A surge placeholder spotguard made for one of this node's pods (it runs elsewhere)."""

    namespace: str
    name: str
    for_uid: str  # the serving pod it makes room for
    running: bool  # bound to a node, and Running there


@dataclass(frozen=True)
class Seen:
    notice: Notice | None
    node_unschedulable: bool
    node_has_taint: bool
    pods: tuple[PodFacts, ...]
    # The node carries node.kubernetes.io/exclude-from-external-load-balancers.
    node_excluded_from_lb: bool = False
    # What the node's annotations hold now (lags `State.progress` when a PATCH failed).
    stored_progress: Progress | None = None
    placeholders: tuple[PlaceholderFacts, ...] = ()


@dataclass(frozen=True)
class Timing:
    # Evictions are issued at the latest this long before the deadline.
    safety_margin_seconds: float = 5.0
    # Longest wait for EndpointSlices to show the pods not-ready.
    endpoint_wait_seconds: float = 10.0
    # Longest drain even when the notice is long (GPU host maintenance gives an hour): a not-ready
    # pod holds a GPU that its replacement needs, and vLLM requests rarely run for minutes.
    max_drain_seconds: float = 300.0
    # Retrying an eviction refused by a PDB: exponential from base to cap.
    eviction_retry_base_seconds: float = 0.5
    eviction_retry_cap_seconds: float = 5.0
    # Surge only on notices at least this long (0: never); the surge ends at the latest this long
    # before the deadline (minus the safety margin), which is what is left for the drain.
    surge_min_notice_seconds: float = 600.0
    surge_drain_reserve_seconds: float = 120.0
    # Not a time, but read with them: label the node out of cloud load balancers at a notice
    # (--exclude-from-load-balancers), so traffic from outside stops coming through this node.
    exclude_from_load_balancers: bool = False


# ---------------------------------------------------------------------------------------------
# What the daemon remembers


@dataclass(frozen=True)
class Progress:
    """One notice's progress; stored in the node's spotguard.io/ annotations so a restart resumes."""

    phase: Phase
    notice_kind: str
    deadline: float
    noticed_at: float
    phase_since: float
    # Ownership: undo on cancellation only what spotguard itself did.
    cordoned_by_us: bool
    tainted_by_us: bool
    # When the drain's time budget (--max-drain-seconds) starts: the notice, or the surge's end.
    drain_from: float | None = None
    # spotguard put node.kubernetes.io/exclude-from-external-load-balancers on the node.
    excluded_by_us: bool = False


@dataclass(frozen=True)
class EvictionAttempt:
    attempts: int
    retry_at: float


@dataclass(frozen=True)
class State:
    progress: Progress | None = None
    # In memory only: after a restart, pods already evicted show up as terminating or gone.
    evicted: frozenset[str] = frozenset()
    attempts: Mapping[str, EvictionAttempt] = field(default_factory=dict)
    # Events already recorded for this notice, so a level-triggered loop reports each thing once.
    reported: frozenset[str] = frozenset()
    # Pods whose placeholder or release the API server refused (quota, policy): the surge goes on
    # without them.
    surge_refused: frozenset[str] = frozenset()


# ---------------------------------------------------------------------------------------------
# What the daemon is asked to do


@dataclass(frozen=True)
class UpdateNode:
    """One node PATCH: cordon/uncordon, add/remove spotguard's taint and the load-balancer exclusion
    label, write/clear progress."""

    unschedulable: bool | None = None
    taint_value: str | None = None  # add the taint with this value (the notice kind)
    remove_taint: bool = False
    exclude_from_lb: bool | None = None  # add (True) or remove (False) the exclusion label
    progress: Progress | None = None
    clear_progress: bool = False


@dataclass(frozen=True)
class SetServing:
    pod: PodFacts
    value: bool


@dataclass(frozen=True)
class Evict:
    pod: PodFacts
    # Capped so the pod is asked to finish before the VM disappears.
    grace_seconds: int


@dataclass(frozen=True)
class CreatePlaceholder:
    pod: PodFacts


@dataclass(frozen=True)
class DeletePlaceholder:
    placeholder: PlaceholderFacts


@dataclass(frozen=True)
class ReleasePod:
    """Take the pod from its ReplicaSet (spotguard.handover): the replacement starts now."""

    pod: PodFacts


@dataclass(frozen=True)
class ReadoptPod:
    """Give a released pod back to its ReplicaSet (a withdrawn notice)."""

    pod: PodFacts


@dataclass(frozen=True)
class Report:
    """A Kubernetes Event (on the pod when given, else the node) and a log line."""

    reason: Reason
    message: str
    pod: PodFacts | None = None
    warning: bool = False


Action = Union[UpdateNode, SetServing, Evict, CreatePlaceholder, DeletePlaceholder, ReleasePod, ReadoptPod, Report]


@dataclass(frozen=True)
class Decision:
    state: State
    actions: tuple[Action, ...]

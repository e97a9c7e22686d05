"""What the benchmark compares: notice profiles, scenarios (handlers x vLLM's SIGTERM behaviour) and
its own settings (full, quick and the tests' smoke configuration)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from spotguard_sim.router import DurationDistribution

DEFAULT_DIR = Path(".spotguard-sim/bench")
PARTS = ("footprint", "reaction", "scenarios", "storm", "admission")
BENCH_LABEL = "sim.spotguard.io/bench"
DAEMON_USER_AGENT_PREFIX = "spotguard/"
# GKE's graceful node shutdown (kubelet shutdownGracePeriod 30 s, 15 s of it for critical pods).
GKE_SHUTDOWN_SECONDS = 30.0
GKE_NON_CRITICAL_GRACE_SECONDS = 15.0
MiB = 1024 * 1024

Say = Callable[[str], None]


@dataclass(frozen=True)
class Profile:
    """A notice length; GKE starts its graceful node shutdown 30 s before the VM goes."""

    name: str
    notice_s: float
    description: str

    @property
    def shutdown_after_s(self) -> float:
        """Seconds from the notice until the kubelet's node shutdown SIGTERMs the pods."""
        return max(0.0, self.notice_s - GKE_SHUTDOWN_SECONDS)

    @property
    def budget_s(self) -> float:
        """Seconds from the notice until a non-critical pod on the node is killed at the latest:
        the most any handler can give a request that is already running there."""
        return self.shutdown_after_s + GKE_NON_CRITICAL_GRACE_SECONDS


PROFILES = {
    "spot30": Profile("spot30", 30.0, "GCE spot default: 30 s notice; GKE's node shutdown SIGTERMs pods at "
                                      "the notice with 15 s grace"),
    "notice120": Profile("notice120", 120.0, "GCE preemptionNoticeDuration=120s: node shutdown starts 90 s "
                                             "after the notice (30 s before the VM goes)"),
}


@dataclass(frozen=True)
class Scenario:
    name: str
    handler: str  # "none" | "evict_immediately" | "spotguard"
    shutdown_timeout: bool  # vLLM --shutdown-timeout (drain on SIGTERM) instead of abort
    description: str
    control: bool = False

    @property
    def spotguard(self) -> bool:
        return self.handler == "spotguard"


SCENARIOS = {
    s.name: s for s in (
        Scenario("kubelet_only", "none", False,
                 "no handler: GKE graceful node shutdown alone; vLLM default (abort in-flight on SIGTERM)"),
        Scenario("evict_immediately", "evict_immediately", False,
                 "AWS NTH's behaviour re-implemented (not NTH itself): poll metadata every 2 s, then cordon "
                 "and evict every pod at once; vLLM default SIGTERM"),
        Scenario("spotguard", "spotguard", False, "spotguard; vLLM default SIGTERM (abort)"),
        Scenario("spotguard_drain", "spotguard", True, "spotguard; vLLM --shutdown-timeout"),
        Scenario("kubelet_only_drain", "none", True,
                 "control: no handler, vLLM --shutdown-timeout (what vLLM's own drain gives without spotguard)",
                 control=True),
    )
}


@dataclass(frozen=True)
class BenchConfig:
    profiles: tuple[str, ...] = ("spot30", "notice120")
    scenarios: tuple[str, ...] = tuple(SCENARIOS)
    runs: int = 2
    rate: float = 5.0  # requests/s over the Service (two replicas)
    warmup_s: float = 25.0  # load before the notice: the in-flight set reaches its steady state
    after_vm_gone_s: float = 5.0  # keep sending this long after the preempted VM is gone
    durations: DurationDistribution = DurationDistribution()
    token_interval: float = 0.1
    vllm_shutdown_timeout_s: float = 25.0  # the longest request: "let every request finish"
    grace_seconds: int = 30  # terminationGracePeriodSeconds of the vLLM pods
    provisioning_delay_s: float = 10.0  # the autoscaler's time to bring a replacement node
    replacement_timeout_s: float = 60.0  # after the VM is gone, stop waiting for the replacement
    nth_poll_s: float = 2.0  # AWS NTH polls IMDS every 2 s
    drain_poll_s: float = 0.5  # spotguard's --drain-poll-seconds (its default)
    reaction_reps: int = 100
    footprint_s: float = 60.0
    storm_nodes: int = 100
    storm_batch: int = 10
    storm_min_free_mib: int = 2048
    storm_setup_limit_s: float = 900.0
    admission_pod_counts: tuple[int, ...] = (10, 1000, 5000)
    admission_evictions: int = 200  # per user and namespace size
    seed: int = 7

    @classmethod
    def full(cls) -> BenchConfig:
        return cls()

    @classmethod
    def quick(cls) -> BenchConfig:
        """One profile (GKE's default), one run per scenario, fewer repetitions, a smaller storm."""
        return cls(profiles=("spot30",), runs=1, reaction_reps=30, storm_nodes=30,
                   admission_pod_counts=(10, 1000), admission_evictions=50)

    @classmethod
    def smoke(cls) -> BenchConfig:
        """The smallest end-to-end configuration (tests): short requests, a few seconds each."""
        return cls(profiles=("spot30",), runs=1, rate=4.0, warmup_s=5.0, after_vm_gone_s=1.0,
                   durations=DurationDistribution(median_s=1.5, sigma=0.6, min_s=0.3, max_s=6.0),
                   vllm_shutdown_timeout_s=6.0, provisioning_delay_s=2.0, replacement_timeout_s=30.0,
                   reaction_reps=5, footprint_s=5.0, storm_nodes=3, storm_batch=3,
                   admission_pod_counts=(4, 40), admission_evictions=10)

    def describe(self) -> dict[str, Any]:
        data = asdict(self)
        data["durations"] = {**asdict(self.durations), "text": self.durations.describe()}
        return data



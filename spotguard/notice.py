"""The one type every cloud provider emits: a Notice that this VM is going away."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class NoticeKind(enum.StrEnum):
    # The VM is reclaimed for capacity: GCE instance/preempted, AWS spot instance-action,
    # Azure Preempt. Short notice (30 s to 2 min).
    PREEMPTION = "preemption"
    # The host goes into maintenance and this VM cannot live-migrate (GPU VMs):
    # GCE TERMINATE_ON_HOST_MAINTENANCE, Azure Terminate/Redeploy/Reboot, an EC2 scheduled event.
    # Long notice (GCE: 60 min for GPUs; Azure 5-15 min; EC2: acted on an hour ahead by default).
    HOST_MAINTENANCE = "host-maintenance"
    # AWS's rebalance recommendation, acted on only with --rebalance-action: a higher risk of an
    # interruption, not a notice that one comes.
    REBALANCE = "rebalance-recommendation"
    # AWS: the instance's Auto Scaling group is terminating it (target lifecycle state Terminated).
    ASG_TERMINATION = "asg-termination"


@dataclass(frozen=True)
class Notice:
    kind: NoticeKind
    # Wall-clock time (Unix seconds) when the VM is expected to be gone. Wall clock, not a
    # monotonic one, because the deadline is stored on the node and read back by a restarted daemon.
    deadline: float
    # Where it came from, e.g. "gce:instance/preempted".
    source: str
    # The raw value the provider saw, e.g. "TERMINATE_ON_HOST_MAINTENANCE", for logs and Events.
    detail: str
    # Cordon and taint only; the pods keep serving and nothing is evicted (--cordon-only, or
    # --rebalance-action cordon). A later notice without it goes on as usual.
    cordon_only: bool = False
    # Bring up capacity only: placeholders for the pods opted in to the surge, no cordon, the pods
    # keep serving (--rebalance-action surge). Its deadline is when the placeholders are released.
    # A later notice without it goes on as usual, onto the capacity already there.
    surge_only: bool = False

    def __post_init__(self) -> None:
        assert not (self.cordon_only and self.surge_only), "a notice is cordon-only or surge-only, not both"

    @property
    def full(self) -> bool:
        """A notice that the VM goes: more than a cordon or a surge."""
        return not (self.cordon_only or self.surge_only)

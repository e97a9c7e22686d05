"""The cloud's side of a simulated VM's end: `reclaim(node, at=...)` says when the VM goes.

The simulated kubelet reads the Node's `sim.spotguard.io/reclaim-at` annotation and plays GKE's
graceful node shutdown from 30 s before that moment (non-critical pods 15 s, critical pods 15 s),
then the VM is gone: its processes die, its Lease stops and its Node is deleted. The metadata
server's notice is the metadata emulator's business, not this module's.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from spotguard.kubeapi import Api
from spotguard_sim.support import USER_AGENT

RECLAIM_ANNOTATION = "sim.spotguard.io/reclaim-at"
# The kubelet's graceful node shutdown settings for this VM's end (shutdownGracePeriod and
# shutdownGracePeriodCriticalPods); without them, GKE's defaults below.
SHUTDOWN_GRACE_ANNOTATION = "sim.spotguard.io/shutdown-grace-seconds"
SHUTDOWN_GRACE_CRITICAL_ANNOTATION = "sim.spotguard.io/shutdown-grace-critical-seconds"
SHUTDOWN_GRACE_SECONDS = 30.0  # GKE: shutdownGracePeriod
SHUTDOWN_GRACE_CRITICAL_SECONDS = 15.0  # GKE: shutdownGracePeriodCriticalPods


def reclaim(api_client: Any, node_name: str, *, at: datetime, shutdown_grace: float = SHUTDOWN_GRACE_SECONDS,
            critical_grace: float = SHUTDOWN_GRACE_CRITICAL_SECONDS) -> None:
    """The cloud reclaims the VM behind `node_name` at `at` (timezone-aware).

    Annotates the Node; the simulated kubelet then begins its graceful node shutdown at
    max(now, at - shutdown_grace) (non-critical pods get shutdown_grace - critical_grace, critical
    pods critical_grace, GKE's 30 s / 15 s by default) and makes the VM disappear at `at`.
    """
    if not 0 <= critical_grace <= shutdown_grace:
        raise ValueError("need 0 <= critical_grace <= shutdown_grace")
    if at.tzinfo is None:
        raise ValueError("`at` must be timezone-aware, e.g. datetime.now(timezone.utc) + timedelta(seconds=30)")
    stamp = at.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    # A raw merge patch, not CoreV1Api.patch_node: the typed API builds its pydantic models on first
    # use (about 0.4 s here), and World.preempt calls this on the event loop that also serves the
    # metadata emulator, so the notice itself would reach spotguard that much later.
    Api(api_client, user_agent=USER_AGENT).call(
        "PATCH", f"/api/v1/nodes/{node_name}", body={"metadata": {"annotations": {
            RECLAIM_ANNOTATION: stamp, SHUTDOWN_GRACE_ANNOTATION: f"{shutdown_grace:g}",
            SHUTDOWN_GRACE_CRITICAL_ANNOTATION: f"{critical_grace:g}"}}},
        content_type="application/merge-patch+json")

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
SHUTDOWN_GRACE_SECONDS = 30.0  # GKE: shutdownGracePeriod
SHUTDOWN_GRACE_CRITICAL_SECONDS = 15.0  # GKE: shutdownGracePeriodCriticalPods


def reclaim(api_client: Any, node_name: str, *, at: datetime) -> None:
    """The cloud reclaims the VM behind `node_name` at `at` (timezone-aware).

    Annotates the Node; the simulated kubelet then begins GKE's graceful node shutdown at
    max(now, at - 30 s) and makes the VM disappear at `at`.
    """
    if at.tzinfo is None:
        raise ValueError("`at` must be timezone-aware, e.g. datetime.now(timezone.utc) + timedelta(seconds=30)")
    stamp = at.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    # A raw merge patch, not CoreV1Api.patch_node: the typed API builds its pydantic models on first
    # use (about 0.4 s here), and World.preempt calls this on the event loop that also serves the
    # metadata emulator, so the notice itself would reach spotguard that much later.
    Api(api_client, user_agent=USER_AGENT).call(
        "PATCH", f"/api/v1/nodes/{node_name}", body={"metadata": {"annotations": {RECLAIM_ANNOTATION: stamp}}},
        content_type="application/merge-patch+json")

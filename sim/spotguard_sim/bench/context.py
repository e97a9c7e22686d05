"""The benchmark's cluster context: a fresh namespace and node pool per part, cleaned up after, and
the moves every part makes (add a VM, preempt it, read a daemon's metrics)."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from spotguard.kubeapi import Api, KubeError, Obj
from spotguard_sim.bench.config import BENCH_LABEL, BenchConfig, Profile, Say
from spotguard_sim.kubelet import reclaim
from spotguard_sim.kubelet.nodes import GPUS_KEY
from spotguard_sim.support import USER_AGENT
from spotguard_sim.world import POOL_LABEL, World


@dataclass
class Context:
    api_client: Any
    kubeconfig: Path
    cluster_dir: Path
    log_dir: Path
    config: BenchConfig
    say: Say
    audit_log: Path | None
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:4])

    def new_world(self, label: str, *, daemon_env: dict[str, str] | None = None, cloud: str = "gce") -> World:
        suffix = uuid.uuid4().hex[:5]
        namespace = f"bench-{label}-{suffix}".replace("_", "-")[:63]
        self._call("POST", "/api/v1/namespaces",
                   body={"metadata": {"name": namespace, "labels": {BENCH_LABEL: "true"}}})
        world = World(api_client=self.api_client, kubeconfig=self.kubeconfig, namespace=namespace,
                      log_dir=self.log_dir / namespace, pool=f"bp-{suffix}", cloud=cloud,
                      daemon_env={"SPOTGUARD_DRAIN_POLL_SECONDS": str(self.config.drain_poll_s),
                                  "SPOTGUARD_LOG_LEVEL": "info", **(daemon_env or {})})
        return world

    def _call(self, method: str, path: str, **kwargs: Any) -> Obj:
        return Api(self.api_client, user_agent=USER_AGENT).call(method, path, **kwargs)

    async def dispose(self, world: World) -> None:
        """Stop everything the world started, delete its nodes (also those the autoscaler added)
        and its namespace. Errors are reported, never raised: cleanup must go on."""
        try:
            await world.close()
        except Exception as error:  # noqa: BLE001
            self.say(f"  warning: closing {world.namespace}: {error}")
        try:
            nodes = await asyncio.to_thread(self._call, "GET", "/api/v1/nodes",
                                            query={"labelSelector": f"{POOL_LABEL}={world.pool}"})
            for node in nodes["items"]:
                await asyncio.to_thread(self._delete, f"/api/v1/nodes/{node['metadata']['name']}")
        except Exception as error:  # noqa: BLE001
            self.say(f"  warning: deleting nodes of pool {world.pool}: {error}")
        await asyncio.to_thread(self._delete, f"/api/v1/namespaces/{world.namespace}")

    def _delete(self, path: str) -> None:
        try:
            self._call("DELETE", path)
        except KubeError as error:
            if error.status != 404:
                self.say(f"  warning: DELETE {path}: {error}")


def cleanup_leftovers(ctx: Context) -> None:
    """Nodes and namespaces an interrupted bench left behind in a reused cluster."""
    for node in ctx._call("GET", "/api/v1/nodes", query={"labelSelector": BENCH_LABEL})["items"]:
        ctx._delete(f"/api/v1/nodes/{node['metadata']['name']}")
    for namespace in ctx._call("GET", "/api/v1/namespaces", query={"labelSelector": BENCH_LABEL})["items"]:
        if not namespace["metadata"].get("deletionTimestamp"):
            ctx._delete(f"/api/v1/namespaces/{namespace['metadata']['name']}")


async def add_vm(world: World, name: str, *, spotguard: bool, gpus: int = 0) -> Any:
    labels = {BENCH_LABEL: "true", **({GPUS_KEY: str(gpus)} if gpus else {})}
    return await world.add_vm(name, spotguard=spotguard, labels=labels)


async def preempt(world: World, node: str, profile: Profile) -> float:
    """The notice of `profile` on `node`'s metadata server and, at the same moment, the VM's end
    scheduled for the simulated kubelet (its graceful node shutdown at the profile's times). Not
    World.preempt: the metadata emulators serve from this loop, and a synchronous API call here
    would delay the daemons' notice, not the kubelet's."""
    noticed = time.time()
    metadata = world.vms[node].metadata
    if profile.notice == "maintenance":
        window = datetime.fromtimestamp(noticed + profile.deadline_s, tz=timezone.utc)
        metadata.set_maintenance("TERMINATE_ON_HOST_MAINTENANCE",
                                 window_start=window.isoformat(timespec="seconds").replace("+00:00", "Z"))
    elif profile.cloud == "aws":
        metadata.preempt(seconds=profile.deadline_s)
    else:
        metadata.preempt()
    at = datetime.fromtimestamp(noticed + profile.vm_gone_s, tz=timezone.utc)
    await asyncio.to_thread(reclaim, world.api_client, node, at=at, shutdown_grace=profile.shutdown_grace_s,
                            critical_grace=profile.critical_grace_s)
    return noticed


async def daemon_metrics(daemon: Any) -> str | None:
    try:
        return await asyncio.to_thread(daemon.metrics)
    except OSError:
        return None

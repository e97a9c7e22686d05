"""What users run today, as handlers the benchmark can put beside spotguard."""

from __future__ import annotations

import asyncio
import time

import aiohttp

from spotguard.kubeapi import KubeError, Obj
from spotguard_sim.world import World


class EvictImmediately:
    """A RE-IMPLEMENTATION of AWS Node Termination Handler's behaviour in IMDS mode, for comparison;
    not NTH itself. It reads the emulated metadata of the profile's cloud: EC2's spot instance-action
    (IMDSv2), or GCE's instance/preempted and a terminating maintenance-event.

    Like NTH it polls the instance metadata every 2 s; on a termination notice it cordons the node
    and evicts every pod on it at once through the Eviction API with the pods' own grace periods
    (NTH's default podTerminationGracePeriod -1), retrying refused evictions every 5 s for up to
    120 s (nodeTerminationGracePeriod). It changes no readiness and does not wait for in-flight
    requests: the load balancer learns of the pod only when the pod is already terminating.
    """

    def __init__(self, world: World, *, node: str, metadata_url: str, cloud: str = "gce",
                 poll_seconds: float = 2.0, retry_seconds: float = 5.0, drain_timeout: float = 120.0) -> None:
        self.world = world
        self.node = node
        self.root = metadata_url
        self.cloud = cloud
        self.poll_seconds = poll_seconds
        self.retry_seconds = retry_seconds
        self.drain_timeout = drain_timeout
        self.noticed_at: float | None = None
        self.cordoned_at: float | None = None
        self.evicted_at: dict[str, float] = {}
        self.errors = 0

    async def run(self) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.5)) as session:
            while True:
                try:
                    noticed = await (self._ec2_notice(session) if self.cloud == "aws" else self._gce_notice(session))
                except (aiohttp.ClientError, TimeoutError):
                    noticed = False
                if noticed:
                    self.noticed_at = time.time()
                    await self._cordon_and_evict()
                    return
                await asyncio.sleep(self.poll_seconds)

    async def _gce_notice(self, session: aiohttp.ClientSession) -> bool:
        headers = {"Metadata-Flavor": "Google"}
        base = f"{self.root}/computeMetadata/v1/instance/"
        async with session.get(base + "preempted", headers=headers) as response:
            if response.status == 200 and (await response.text()).strip() == "TRUE":
                return True
        async with session.get(base + "maintenance-event", headers=headers) as response:
            return response.status == 200 and (await response.text()).strip().startswith(("TERMINATE", "SHUTDOWN"))

    async def _ec2_notice(self, session: aiohttp.ClientSession) -> bool:
        async with session.put(f"{self.root}/latest/api/token",
                               headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"}) as response:
            token = await response.text()
        async with session.get(f"{self.root}/latest/meta-data/spot/instance-action",
                               headers={"X-aws-ec2-metadata-token": token}) as response:
            return response.status == 200

    async def _cordon_and_evict(self) -> None:
        call = self.world.api.call
        await asyncio.to_thread(call, "PATCH", f"/api/v1/nodes/{self.node}", body={"spec": {"unschedulable": True}},
                                content_type="application/merge-patch+json")
        self.cordoned_at = time.time()
        pods = (await asyncio.to_thread(call, "GET", "/api/v1/pods",
                                        query={"fieldSelector": f"spec.nodeName={self.node}"}))["items"]
        evictable = [p for p in pods
                     if not any(ref.get("kind") == "DaemonSet" for ref in p["metadata"].get("ownerReferences") or [])
                     and "kubernetes.io/config.mirror" not in (p["metadata"].get("annotations") or {})
                     and (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed")]
        await asyncio.gather(*(self._evict(pod) for pod in evictable))

    async def _evict(self, pod: Obj) -> None:
        name, namespace = pod["metadata"]["name"], pod["metadata"]["namespace"]
        body = {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": name, "namespace": namespace}}
        give_up = time.monotonic() + self.drain_timeout
        while time.monotonic() < give_up:
            try:
                await asyncio.to_thread(self.world.api.call, "POST",
                                        f"/api/v1/namespaces/{namespace}/pods/{name}/eviction", body=body)
                self.evicted_at[name] = time.time()
                return
            except KubeError as error:
                if error.status == 404:
                    return
                self.errors += 1
            await asyncio.sleep(self.retry_seconds)



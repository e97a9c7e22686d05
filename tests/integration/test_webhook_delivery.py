"""Webhooks against real local HTTP receivers (loopback): delivered, retried, given up, never in
the way; and from the real daemon through a preemption on the real control plane."""

from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator

import pytest
from aiohttp import web
from spotguard_sim.support import free_port, wait_until

from spotguard import lifecycle as lc
from spotguard import webhooks

POD = lc.PodFacts(namespace="ml", name="vllm-0", uid="uid-0", serving=True, serving_condition=False,
                  not_evictable=None, terminating=False)


class Receiver:
    """A local webhook receiver: `behaviour` is "ok", "fail" (HTTP 500) or "hang" (never answers)."""

    def __init__(self, behaviour: str) -> None:
        self.behaviour = behaviour
        self.bodies: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.hits = 0
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        self.hits += 1
        if self.behaviour == "hang":
            await asyncio.sleep(3600)
        if self.behaviour == "fail":
            return web.Response(status=500)
        self.bodies.append(await request.json())
        self.headers.append(dict(request.headers))
        return web.Response(status=200)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self._runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self._runner.setup()
        port = free_port("127.0.0.1")
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}/hook"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def receivers() -> AsyncIterator[dict[str, Receiver]]:
    made = {behaviour: Receiver(behaviour) for behaviour in ("ok", "fail", "hang")}
    try:
        for receiver in made.values():
            await receiver.start()
        yield made
    finally:
        for receiver in made.values():
            await receiver.stop()


async def test_delivered_retried_and_given_up_each_counted(receivers):
    counted: list[str] = []
    urls = tuple(r.url for r in receivers.values())
    notifier = webhooks.Notifier(urls, count=counted.append, timeout_seconds=0.5, attempts=3,
                                 retry_base_seconds=0.05, headers=(("Authorization", "Bearer t0ken"),))
    notifier.start()
    try:
        report = lc.Report(lc.Reason.EVICTED, "evicted through the Eviction API", pod=POD)
        notifier.send(report, node="gpu-1", progress=None)
        assert receivers["ok"].hits == 0, "send only queues"
        await asyncio.wait_for(_until(lambda: len(counted) == 3), timeout=20)
    finally:
        await notifier.stop()
    assert sorted(counted) == ["error", "error", "ok"]
    assert receivers["fail"].hits == 3 and receivers["hang"].hits == 3   # every attempt made
    [body] = receivers["ok"].bodies
    assert body["event"] == "Evicted" and body["node"] == "gpu-1" and body["pod"] == "ml/vllm-0"
    [headers] = receivers["ok"].headers
    assert headers["Authorization"] == "Bearer t0ken" and headers["Content-Type"] == "application/json"


async def _until(check) -> None:  # type: ignore[no-untyped-def]
    while not check():
        await asyncio.sleep(0.05)


@pytest.mark.cluster
async def test_the_daemon_tells_the_channel_and_a_hanging_one_delays_nothing(world, receivers):
    world.daemon_env.update({"SPOTGUARD_WEBHOOK_URLS": f"{receivers['hang'].url},{receivers['ok'].url}"})
    node = "gpu-hook-1"
    vm = await world.add_vm(node)
    world.deploy_vllm(replicas=1, shutdown_timeout=10, drains_on_sigterm=True)
    pod = (await asyncio.to_thread(world.wait_ready_pods, 1))[0]
    noticed = world.preempt(node, vm_lifetime_seconds=None)

    def evicted() -> bool:
        current = world.api.call("GET", f"/api/v1/namespaces/{world.namespace}/pods/{pod['metadata']['name']}")
        return current["metadata"].get("deletionTimestamp") is not None

    await asyncio.to_thread(wait_until, evicted, timeout=15, what="the pod evicted")
    # The hanging receiver holds its notice for the whole 5 s timeout (and again on each retry):
    # the eviction did not wait for it.
    assert time.time() - noticed < webhooks.TIMEOUT_SECONDS
    await asyncio.wait_for(_until(lambda: {b["event"] for b in receivers["ok"].bodies} >= {"TerminationNotice",
                                                                                           "Evicted"}), timeout=30)
    notice = next(b for b in receivers["ok"].bodies if b["event"] == "TerminationNotice")
    assert notice["node"] == node and notice["notice_kind"] == "preemption" and notice["deadline"].endswith("Z")
    assert 0 < notice["seconds_to_deadline"] <= 30
    evicted_body = next(b for b in receivers["ok"].bodies if b["event"] == "Evicted")
    assert evicted_body["pod"] == f"{world.namespace}/{pod['metadata']['name']}"
    assert vm.daemon.metric("spotguard_webhook_deliveries_total", result="ok") >= 2

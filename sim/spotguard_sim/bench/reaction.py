"""Reaction, many times: notice -> node cordoned and pod not-ready, on an idle node."""

from __future__ import annotations

import asyncio
import os
import random
import time
from typing import Any

from spotguard.providers.aws import AwsProvider
from spotguard.providers.azure import AzureProvider

# How long a polling provider's cycle is (its default --poll-seconds): notices are spread over it.
POLL_CYCLE_SECONDS = {"aws": AwsProvider.default_poll_seconds, "azure": AzureProvider.default_poll_seconds}
from spotguard_sim.bench.context import Context, add_vm, daemon_metrics
from spotguard_sim.bench.measure import ms, quantiles_ms
from spotguard_sim.bench.observe import Observer
from spotguard_sim.support import metric_value


async def bench_reaction(ctx: Context, reps: int, *, cloud: str = "gce") -> dict[str, Any]:
    """Preempt (metadata only, no node shutdown) and withdraw, `reps` times, on one guarded node
    with one serving pod; each time measure notice -> node cordoned and pod not-ready from a watch.
    `cloud` picks the metadata server: GCE's hanging GETs, or AWS's and Azure's polling (once a
    second), whose wait for the next poll is part of what a user sees.

    The withdrawal (the emulator reset: no notice) is only how the harness re-arms the node between
    repetitions: spotguard undoes its cordon and the pod becomes Ready again."""
    world = ctx.new_world(f"reaction-{cloud}", cloud=cloud)
    observer: Observer | None = None
    try:
        vm = await add_vm(world, f"{world.pool}-r", spotguard=True)
        # Not evictable: with nothing in flight spotguard drains at once and could evict the pod
        # before the harness withdraws the notice, and each repetition needs the same pod back.
        world.deploy_vllm(replicas=1, token_interval=ctx.config.token_interval, evictable=False)
        pod = (await asyncio.to_thread(world.wait_ready_pods, 1, timeout=90))[0]
        observer = Observer(ctx.api_client, pool=world.pool, namespace=world.namespace)
        await observer.start()
        uid, node = pod["metadata"]["uid"], vm.name
        assert vm.daemon is not None
        external, own_writes, daemon_side = [], [], []

        def guarding(o: Observer) -> bool:
            return not o.nodes[node].get("unschedulable") and o.pods[uid].get("ready") == "True"

        def reacted(o: Observer) -> bool:
            return bool(o.nodes[node].get("unschedulable")) and o.pods[uid].get("ready") == "False" \
                and o.pods[uid].get("serving") == "False"

        for rep in range(reps):
            await observer.wait_for(guarding, timeout=30)
            # A real notice comes at any moment of a polling provider's cycle. The harness re-arms
            # right after a poll saw the withdrawal, so without a delay spread over a whole cycle
            # every notice would land at about the same phase (it did: p50 604 ms, p99 701 ms).
            await asyncio.sleep(0.3 + random.random() * POLL_CYCLE_SECONDS.get(cloud, 0.2))
            before = await daemon_metrics(vm.daemon) or ""
            notice = time.time()
            vm.metadata.preempt()
            await observer.wait_for(reacted, timeout=30)
            cordon = observer.first(node, "unschedulable", True, after=notice)
            ready_false = observer.first(uid, "ready", "False", after=notice)
            serving_false = observer.first(uid, "serving", "False", after=notice)
            assert cordon and ready_false and serving_false
            external.append(max(cordon, ready_false) - notice)
            own_writes.append(max(cordon, serving_false) - notice)
            # The daemon records its reaction when both PATCHes are answered, which can be after the
            # watch showed their effect: wait (briefly) for its count to move.
            name = "spotguard_reaction_duration_seconds"
            after = ""
            for _ in range(40):
                after = await daemon_metrics(vm.daemon) or ""
                if metric_value(after, f"{name}_count") > metric_value(before, f"{name}_count"):
                    break
                await asyncio.sleep(0.05)
            if metric_value(after, f"{name}_count") - metric_value(before, f"{name}_count") == 1:
                daemon_side.append(metric_value(after, f"{name}_sum") - metric_value(before, f"{name}_sum"))
            vm.metadata.reset()
            if (rep + 1) % max(1, reps // 5) == 0:
                ctx.say(f"  reaction ({cloud}) {rep + 1}/{reps}: last {external[-1] * 1000:.0f} ms")
        buckets = await daemon_metrics(vm.daemon) or ""
        return {
            "cloud": cloud, "repetitions": reps, "loadavg_1m": round(os.getloadavg()[0], 2),
            "poll_seconds": POLL_CYCLE_SECONDS.get(cloud), "external_ms": quantiles_ms(external),
            "own_writes_ms": quantiles_ms(own_writes),
            "daemon_histogram_ms": quantiles_ms(daemon_side),
            "daemon_histogram_buckets": histogram_buckets(buckets, "spotguard_reaction_duration_seconds"),
            "samples_ms": {"external": [ms(v) for v in external], "own_writes": [ms(v) for v in own_writes],
                           "daemon": [ms(v) for v in daemon_side]},
        }
    finally:
        if observer is not None:
            await observer.stop()
        await ctx.dispose(world)


def histogram_buckets(text: str, name: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        if family.name == name:
            return {s.labels["le"]: s.value for s in family.samples if s.name == f"{name}_bucket"}
    return {}



"""Storm: as many nodes (one daemon process each) preempted at once as this machine holds."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from spotguard_sim.bench.context import Context, add_vm, daemon_metrics
from spotguard_sim.bench.measure import (
    audit_requests,
    mem_available_mib,
    proc_rss_mib,
    quantiles_ms,
    rounded,
)
from spotguard_sim.bench.observe import Observer
from spotguard_sim.support import metric_value, quantile


async def bench_storm(ctx: Context, target: int) -> dict[str, Any]:
    """`target` nodes, one real daemon process each, preempted at the same moment."""
    cfg = ctx.config
    world = ctx.new_world("storm")
    observer: Observer | None = None
    stopped_by = None
    try:
        setup_began = time.monotonic()
        while len(world.vms) < target:
            free = mem_available_mib()
            if free < cfg.storm_min_free_mib:
                stopped_by = f"memory: {free:.0f} MiB available, below the {cfg.storm_min_free_mib} MiB floor kept free"
                break
            if time.monotonic() - setup_began > cfg.storm_setup_limit_s:
                stopped_by = f"time: setting up took longer than {cfg.storm_setup_limit_s:.0f} s"
                break
            batch = min(cfg.storm_batch, target - len(world.vms))
            first = len(world.vms)
            names = [f"{world.pool}-{first + i:03d}" for i in range(batch)]
            results = await asyncio.gather(*(add_vm(world, name, spotguard=True) for name in names),
                                           return_exceptions=True)
            failures = [r for r in results if isinstance(r, BaseException)]
            if failures:
                stopped_by = f"a daemon or node did not come up: {failures[0]}"
                break
            ctx.say(f"  storm: {len(world.vms)}/{target} nodes with a daemon "
                    f"({time.monotonic() - setup_began:.0f}s, {mem_available_mib():.0f} MiB available)")
        vms = [vm for vm in world.vms.values() if vm.daemon is not None and vm.daemon.process is not None
               and vm.daemon.process.poll() is None]
        daemon_rss = sum(proc_rss_mib(vm.daemon.process.pid) for vm in vms)  # type: ignore[union-attr]
        setup_s = time.monotonic() - setup_began
        await asyncio.sleep(5)
        observer = Observer(ctx.api_client, pool=world.pool)
        await observer.start()
        load_before = os.getloadavg()
        notice = time.time()
        for vm in vms:
            vm.metadata.preempt()
        names = [vm.name for vm in vms]
        try:
            await observer.wait_for(lambda o: all(o.nodes.get(n, {}).get("unschedulable") for n in names),
                                    timeout=180)
        except TimeoutError:
            ctx.say("  storm: not every node was cordoned within 180 s")
        cordoned = [observer.first(n, "unschedulable", True, after=notice) for n in names]
        cordon_s = [t - notice for t in cordoned if t is not None]
        await asyncio.sleep(10)  # let the daemons finish (no serving pods: they drain at once)
        window_end = time.time()
        metrics = await asyncio.gather(*(daemon_metrics(vm.daemon) for vm in vms))
        daemon_errors = sum(metric_value(text, "spotguard_kube_api_errors_total") +
                            metric_value(text, "spotguard_actions_total", result="error")
                            for text in metrics if text)
        reactions = [metric_value(t, "spotguard_reaction_duration_seconds_sum") for t in metrics
                     if t and metric_value(t, "spotguard_reaction_duration_seconds_count") == 1]
        drained = sum(1 for t in metrics if t and metric_value(t, "spotguard_phase", phase="drained") == 1)
        audit_errors = audit_requests(ctx.audit_log, start=notice, end=window_end, errors_only=True)
        audit_all = audit_requests(ctx.audit_log, start=notice, end=window_end)
        if stopped_by is None:
            stopped_by = (f"none: the target of {target} was reached ({setup_s:.0f} s to start them, "
                          f"{daemon_rss / 1024:.1f} GiB RSS for the daemons, {mem_available_mib() / 1024:.1f} GiB "
                          f"still available)")
        return {
            "nodes": len(vms), "target": target, "limit": stopped_by,
            "all_cordoned_s": rounded(max(cordon_s), 2) if len(cordon_s) == len(names) and names else None,
            "cordoned": len(cordon_s),
            "cordon_s": {"p50": rounded(quantile(cordon_s, 0.5), 3), "p99": rounded(quantile(cordon_s, 0.99), 3),
                         "min": rounded(min(cordon_s), 3) if cordon_s else None},
            "api_errors": len(audit_errors) if audit_errors is not None else int(daemon_errors),
            "api_errors_source": "audit log: spotguard/* requests answered >= 400" if audit_errors is not None
            else "daemon counters (no audit log)",
            "api_errors_detail": (audit_errors or [])[:20],
            "api_errors_daemon_counted": int(daemon_errors),
            "api_requests": len(audit_all) if audit_all is not None else None,
            "daemon_reaction_ms": quantiles_ms(reactions),
            "drained": drained,
            "setup_s": round(setup_s, 1), "daemon_rss_total_mib": round(daemon_rss),
            "loadavg_1m_before": round(load_before[0], 2), "loadavg_1m_after": round(os.getloadavg()[0], 2),
        }
    finally:
        if observer is not None:
            await observer.stop()
        ctx.say(f"  storm: stopping {len(world.vms)} daemons")
        await ctx.dispose(world)



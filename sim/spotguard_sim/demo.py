"""`spotguard-sim demo`: the whole story on the local cluster, in about a minute and a half.

A 2-node GPU spot pool, one spotguard per node (the same `spotguard run` the DaemonSet runs), a
vLLM Deployment (2 replicas, readiness gate, PDB) behind a Service, steady streaming load through a
Service-following router, the node-pool autoscaler, then a spot preemption of one node (GCE by
default; `--cloud aws|azure` plays it through EC2's or Azure's metadata instead). It prints a live
timeline, ends with a table, and writes a PNG timeline plot.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

NAMESPACE = "spotguard-demo"
POOL = "demo-gpu"
# Each cloud's name in the story, and its usual spot notice in seconds.
CLOUDS = {"gce": ("GCE", 30.0), "aws": ("EC2", 120.0), "azure": ("Azure", 30.0)}


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", type=Path, default=Path(".spotguard-sim"),
                        help="cluster directory (default .spotguard-sim); the demo's output goes to DIR/demo")
    parser.add_argument("--cloud", choices=sorted(CLOUDS), default="gce",
                        help="whose metadata server announces the preemption, and which spotguard provider "
                             "reads it (default gce)")
    parser.add_argument("--notice-seconds", type=float, default=None,
                        help="notice length; default the cloud's: GCE 30 (up to 120 with "
                             "preemptionNoticeDuration), AWS 120, Azure 30")
    parser.add_argument("--rate", type=float, default=3.0, help="requests per second (default 3)")
    parser.add_argument("--shutdown-timeout", type=int, default=15,
                        help="vLLM --shutdown-timeout in seconds; 0 = vLLM's default (abort on SIGTERM)")
    parser.add_argument("--provisioning-delay", type=float, default=8.0,
                        help="seconds the node-pool autoscaler takes to add a node (default 8)")
    parser.add_argument("--keep-cluster", action="store_true",
                        help="leave the local cluster running afterwards (it is stopped if the demo started it)")


@dataclass
class Timeline:
    """Milestones relative to the notice, as seen from outside (the API server and the router)."""

    notice: float = 0.0
    marks: dict[str, float] = field(default_factory=dict)
    alerts: list[str] = field(default_factory=list)

    def mark(self, name: str, at: float | None = None) -> bool:
        if name in self.marks:
            return False
        self.marks[name] = (at or time.time()) - self.notice
        return True


def run_demo_from_args(args: argparse.Namespace) -> int:
    if args.notice_seconds is None:
        args.notice_seconds = CLOUDS[args.cloud][1]
    try:
        return asyncio.run(_demo(args))
    except KeyboardInterrupt:
        print("\ninterrupted; cleaned up", file=sys.stderr)
        return 130


def _say(text: str) -> None:
    print(text, flush=True)


async def _demo(args: argparse.Namespace) -> int:
    import logging

    import structlog

    from spotguard_sim import controlplane
    from spotguard_sim.router import EndpointTracker, LoadGenerator
    from spotguard_sim.support import wait_until
    from spotguard_sim.world import World

    # The demo prints its own story; the simulation's components only speak up for problems.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    out_dir = args.dir.resolve() / "demo"
    out_dir.mkdir(parents=True, exist_ok=True)
    was_running = controlplane.read_info(args.dir.resolve()) is not None
    info = controlplane.up(args.dir)
    _say(f"KUBECONFIG={info.kubeconfig}")
    from kubernetes import config as kube_config

    api_client = kube_config.new_client_from_config(config_file=str(info.kubeconfig))
    world = World(api_client=api_client, kubeconfig=info.kubeconfig, namespace=NAMESPACE, log_dir=out_dir / "logs",
                  pool=POOL, daemon_env={"SPOTGUARD_NOTICE_SECONDS": str(args.notice_seconds)}, cloud=args.cloud)
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    tracker = load = prometheus = None
    try:
        await asyncio.to_thread(_clean_previous_run, world)
        world.api.call("POST", "/api/v1/namespaces", body={"metadata": {"name": NAMESPACE}})
        _say(f"\n== a 2-node GPU spot pool '{POOL}', spotguard on each node")
        for name in (f"{POOL}-1", f"{POOL}-2"):
            vm = await world.add_vm(name)
            _say(f"   node {name}: metadata emulator {vm.metadata.url}, spotguard {vm.daemon.url}/metrics")
        shutdown = args.shutdown_timeout if args.shutdown_timeout > 0 else None
        # A pod whose vLLM drains on SIGTERM says so, and spotguard evicts it at the notice.
        world.deploy_vllm(replicas=2, shutdown_timeout=shutdown, pdb_min_available=1,
                          grace_seconds=max(30, int(args.notice_seconds)), drains_on_sigterm=bool(shutdown))
        _say("== vLLM Deployment: 2 replicas, readiness gate spotguard.io/serving, PDB minAvailable 1 "
             f"(AlwaysAllow), vLLM {'--shutdown-timeout ' + str(shutdown) if shutdown else 'default SIGTERM (abort)'}"
             + (", annotated spotguard.io/drains-on-sigterm (evicted at the notice)" if shutdown else ""))
        pods = await asyncio.to_thread(world.wait_ready_pods, 2, timeout=90)
        _say("   ready: " + ", ".join(f"{p['metadata']['name']} on {p['spec']['nodeName']} ({p['status']['podIP']})"
                                      for p in pods))
        prometheus = await asyncio.to_thread(_start_prometheus, world, out_dir)
        await world.start_autoscaler(provisioning_delay=args.provisioning_delay,
                                     on_event=lambda e: _say(f"   [autoscaler] {e.kind}: {e.message}"))
        tracker = EndpointTracker(api_client, namespace=NAMESPACE, service="vllm", port_name="http")
        tracker.start()
        await tracker.wait_synced()
        duration = 12 + args.notice_seconds + 25
        load = LoadGenerator(tracker, rate=args.rate, duration=duration, seed=7)
        _say(f"== load: {args.rate:g} streaming requests/s for {duration:.0f} s; durations "
             f"{load.durations.describe()}")
        load.start()
        await _sleep_or_stop(10, stopping)
        victim = f"{POOL}-1"
        victim_pods = {p["metadata"]["name"] for p in world.pods("app=vllm") if p["spec"]["nodeName"] == victim}
        timeline = Timeline(notice=world.preempt(victim, vm_lifetime_seconds=args.notice_seconds))
        in_flight = load.in_flight_at(timeline.notice)
        _say(f"\n== t=0.000s {CLOUDS[args.cloud][0]} preempts {victim} (notice {args.notice_seconds:g} s; "
             f"graceful node shutdown "
             f"starts at t={max(0.0, args.notice_seconds - 30):g}s); {in_flight} requests in flight on the pool")
        watcher = asyncio.create_task(_watch(world, tracker, timeline, victim, victim_pods, prometheus))
        await asyncio.wait([asyncio.create_task(load.wait()), asyncio.create_task(stopping.wait())],
                           return_when=asyncio.FIRST_COMPLETED)
        if not stopping.is_set():
            await asyncio.to_thread(wait_until, lambda: "replacement Ready" in timeline.marks, timeout=60,
                                    what="replacement Ready")
        watcher.cancel()
        _report(load, timeline, victim, world, out_dir, args)
        return 0
    finally:
        if prometheus is not None:
            prometheus.stop()
        if load is not None:
            await load.stop(drain=False)
        if tracker is not None:
            await tracker.stop()
        await world.close(delete_nodes=False)
        if not (args.keep_cluster or was_running):
            controlplane.down(args.dir)
        else:
            _say(f"cluster left running: KUBECONFIG={info.kubeconfig}  (stop it: spotguard-sim cluster down)")
        api_client.close()


async def _sleep_or_stop(seconds: float, stopping: asyncio.Event) -> None:
    try:
        await asyncio.wait_for(stopping.wait(), timeout=seconds)
    except asyncio.TimeoutError:
        return
    raise KeyboardInterrupt


def _clean_previous_run(world: Any) -> None:
    """Running the demo twice works: remove what an earlier run left."""
    from spotguard.kube import KubeError
    from spotguard_sim.support import wait_until
    from spotguard_sim.world import POOL_LABEL

    for node in world.api.call("GET", "/api/v1/nodes", query={"labelSelector": f"{POOL_LABEL}={POOL}"})["items"]:
        world.api.call("DELETE", f"/api/v1/nodes/{node['metadata']['name']}")
    try:
        world.api.call("DELETE", f"/api/v1/namespaces/{NAMESPACE}")
    except KubeError as error:
        if error.status != 404:
            raise
        return

    def gone() -> bool:
        try:
            world.api.call("GET", f"/api/v1/namespaces/{NAMESPACE}")
        except KubeError as error:
            return error.status == 404
        return False

    wait_until(gone, timeout=60, what="the previous demo namespace deleted")


def _start_prometheus(world: Any, out_dir: Path) -> Any:
    """A real Prometheus scraping every daemon and vLLM pod and evaluating the chart's alert rules;
    None (with the reason) when Prometheus is not installed."""
    from spotguard_sim.prometheus import (
        FAST_ALERTS,
        PrometheusError,
        SimPrometheus,
        render_rule_file,
        targets_for,
    )

    try:
        rules = render_rule_file(out_dir / "alerts.yaml", values=FAST_ALERTS)
        prometheus = SimPrometheus(rule_file=rules, work_dir=out_dir / "prometheus").start()
    except (PrometheusError, OSError, ImportError) as error:
        _say(f"   (no Prometheus for this run: {error})")
        return None
    prometheus.set_targets(targets_for(world))
    _say(f"== Prometheus {prometheus.url} scrapes every spotguard and vLLM pod and evaluates the chart's alerts "
         "(their `for:` durations shortened for the demo); open /alerts while it runs")
    return prometheus


async def _watch(world: Any, tracker: Any, timeline: Timeline, victim: str, victim_pods: set[str],
                 prometheus: Any) -> None:
    """Print each milestone once, as the API server and the router see it."""
    last_targets = 0.0

    def show(name: str, detail: str = "", at: float | None = None) -> None:
        if timeline.mark(name, at):
            _say(f"   t={timeline.marks[name]:7.3f}s  {name}{'  ' + detail if detail else ''}")

    while True:
        try:
            node = await asyncio.to_thread(world.node, victim)
        except Exception:  # noqa: BLE001 - the VM is gone: the node was deleted
            node = None
            if timeline.marks:
                show("VM gone", f"node {victim} deleted")
        if node is not None:
            phase = (node["metadata"].get("annotations") or {}).get("spotguard.io/phase")
            if node["spec"].get("unschedulable"):
                show("cordoned", f"node {victim} unschedulable + tainted spotguard.io/impending-termination")
            if phase in ("evicting", "drained"):
                show("drained", "vLLM reports 0 requests running or waiting (or the budget ran out)")
        for change in tracker.changes:
            if change.at >= timeline.notice and change.pod in victim_pods and change.ready is False:
                show("not-ready", f"EndpointSlice shows {change.pod} not ready: the router stops sending it work",
                     at=change.at)
            if change.at >= timeline.notice and change.pod not in victim_pods and change.ready:
                show("replacement Ready", f"{change.pod} is ready and receives traffic", at=change.at)
        pods = await asyncio.to_thread(world.pods, "app=vllm")
        for pod in pods:
            if pod["metadata"]["name"] not in victim_pods:
                continue
            if pod["metadata"].get("deletionTimestamp") and "pod stopped" not in timeline.marks:
                show("evicted", f"{pod['metadata']['name']} evicted through the Eviction API (PDB respected)")
            if pod.get("status", {}).get("phase") in ("Succeeded", "Failed") and "evicted" not in timeline.marks:
                show("pod stopped", f"{pod['metadata']['name']} stopped by the kubelet's graceful node shutdown "
                                    "(vLLM finished its in-flight requests first)")
        if prometheus is not None and time.monotonic() - last_targets > 2:
            last_targets = time.monotonic()
            await asyncio.to_thread(_follow_alerts, world, prometheus, timeline)
        await asyncio.sleep(0.1)


def _follow_alerts(world: Any, prometheus: Any, timeline: Timeline) -> None:
    from spotguard_sim.prometheus import PrometheusError, targets_for

    try:
        prometheus.set_targets(targets_for(world))
        for alert in prometheus.alerts():
            name = alert["labels"].get("alertname", "?")
            if alert.get("state") == "firing" and name not in timeline.alerts:
                timeline.alerts.append(name)
                _say(f"   t={time.time() - timeline.notice:7.3f}s  alert firing: {name} "
                     f"{ {k: v for k, v in alert['labels'].items() if k in ('node', 'pod', 'pdb')} }")
    except (PrometheusError, OSError, ValueError):
        pass  # the demo goes on without the alert view


def _report(load: Any, timeline: Timeline, victim: str, world: Any, out_dir: Path, args: argparse.Namespace) -> None:
    from spotguard_sim.router import Outcome

    summary = load.summary()
    reaction = _daemon_reaction_ms(world, victim)
    rows = [
        ("requests sent", f"{summary['requests']}"),
        ("completed", f"{summary[Outcome.COMPLETED.value]}"),
        ("aborted mid-stream", f"{summary[Outcome.ABORTED.value]}"),
        ("refused", f"{summary[Outcome.REFUSED.value]}"),
    ]
    for name in ("cordoned", "not-ready", "pod stopped", "drained", "evicted", "VM gone", "replacement Ready"):
        value = timeline.marks.get(name)
        if value is not None:
            rows.append((f"time to {name}", f"{value:.3f} s"))
    if reaction is not None:
        rows.append(("reaction (daemon's own histogram)", f"{reaction:.1f} ms"))
    rows.append(("alerts that fired", ", ".join(timeline.alerts) or "none"))
    width = max(len(name) for name, _ in rows)
    _say("\n== result")
    for name, value in rows:
        _say(f"   {name:<{width}}  {value}")
    aborted = [r for r in load.records if r.outcome is Outcome.ABORTED]
    if aborted:
        _say(f"   ({len(aborted)} aborted requests needed {min(r.intended_s for r in aborted):.1f}-"
             f"{max(r.intended_s for r in aborted):.1f} s: longer than the grace vLLM had after SIGTERM)")
    report = {"summary": summary, "timeline_s": timeline.marks, "reaction_ms": reaction, "alerts": timeline.alerts,
              "notice_seconds": args.notice_seconds, "cloud": args.cloud, "requests": [r.as_dict() for r in load.records]}
    (out_dir / "demo.json").write_text(json.dumps(report, indent=2, default=str))
    png = out_dir / "demo-timeline.png"
    _plot(load.records, timeline, png, victim)
    _say(f"\n   timeline plot: {png}\n   raw data:      {out_dir / 'demo.json'}\n   daemon logs:   {out_dir / 'logs'}")


def _daemon_reaction_ms(world: Any, victim: str) -> float | None:
    from prometheus_client.parser import text_string_to_metric_families

    vm = world.vms.get(victim)
    if vm is None or vm.daemon is None:
        return None
    try:
        text = vm.daemon.metrics()
    except OSError:
        return None
    total = count = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "spotguard_reaction_duration_seconds_sum":
                total = sample.value
            if sample.name == "spotguard_reaction_duration_seconds_count":
                count = sample.value
    return total / count * 1000 if count else None


def _plot(records: list[Any], timeline: Timeline, path: Path, victim: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from spotguard_sim.router import Outcome

    colours = {Outcome.COMPLETED: "#2e7d32", Outcome.ABORTED: "#c62828", Outcome.REFUSED: "#ef6c00",
               Outcome.ERROR: "#6a1b9a", Outcome.CANCELLED: "#9e9e9e"}
    fig, ax = plt.subplots(figsize=(11, 6))
    ordered = sorted(records, key=lambda r: r.start)
    for index, record in enumerate(ordered):
        end = record.end if record.end is not None else record.start + record.intended_s
        lost = record.outcome in (Outcome.ABORTED, Outcome.REFUSED)
        ax.hlines(index, record.start - timeline.notice, end - timeline.notice,
                  colors=colours.get(record.outcome, "#9e9e9e"), linewidth=3.5 if lost else 1.6)
        if lost:  # a lost request must stand out even when it lasted a fraction of a second
            ax.plot(end - timeline.notice, index, marker="x", color=colours[record.outcome], markersize=8)
    top = max(len(ordered), 1)
    for step, (name, at) in enumerate(sorted(timeline.marks.items(), key=lambda item: item[1])):
        ax.axvline(at, color="#37474f", linestyle="--", linewidth=0.8)
        # Staggered heights so milestones a few ms apart stay readable.
        ax.text(at + 0.3, top * (0.97 - 0.07 * step), f"{name} ({at:.2f} s)", fontsize=8, ha="left", va="top",
                bbox={"boxstyle": "round,pad=0.2", "facecolor": "white", "edgecolor": "#b0bec5", "alpha": 0.9})
    ax.axvline(0, color="black", linewidth=1.2)
    handles = [plt.Line2D([0], [0], color=c, linewidth=3, label=o.value) for o, c in colours.items()
               if any(r.outcome is o for r in records)]
    ax.legend(handles=handles, loc="lower left")
    ax.set_xlabel(f"seconds since the preemption notice for {victim}")
    ax.set_ylabel("request (by start time)")
    ax.set_title("spotguard demo: every request, coloured by how it ended")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

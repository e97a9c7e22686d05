"""One preemption under load, handled a scenario's way, measured; and a scenario's runs summed up."""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

from spotguard.kubeapi import Obj
from spotguard_sim.autoscaler import AutoscalerEmulator
from spotguard_sim.bench import nth
from spotguard_sim.bench.baselines import EvictImmediately
from spotguard_sim.bench.config import BenchConfig, Profile, Scenario
from spotguard_sim.bench.context import Context, add_vm, daemon_metrics, preempt
from spotguard_sim.bench.measure import ms, quantiles_ms, rounded
from spotguard_sim.bench.observe import Observer
from spotguard_sim.router import EndpointChange, EndpointTracker, LoadGenerator, Outcome, RequestRecord
from spotguard_sim.support import metric_value, quantile


def pod_grace_seconds(cfg: BenchConfig, scenario: Scenario) -> int:
    """The vLLM pods' terminationGracePeriodSeconds: with the preStop helper it must hold the hook's
    wait and vLLM's drain after it, plus a few seconds, as the helper's usage says. (A node shutdown
    caps it anyway: on gke-spot-30 every pod gets 15 s.)"""
    if not scenario.prestop:
        return cfg.grace_seconds
    return max(cfg.grace_seconds, math.ceil(cfg.prestop_max_wait_s) + cfg.vllm_shutdown_timeout_s + 5)


async def run_scenario(ctx: Context, profile: Profile, scenario: Scenario, rep: int) -> dict[str, Any]:
    """One preemption under load, handled the scenario's way. Returns the run's measurements."""
    cfg = ctx.config
    world = ctx.new_world(f"{profile.name}-{scenario.name}-{rep}",
                          daemon_env={**profile.daemon_env, **scenario.daemon_env(profile)}, cloud=profile.cloud)
    tasks: list[asyncio.Task[Any]] = []
    tracker: EndpointTracker | None = None
    observer: Observer | None = None
    autoscaler: Any = None
    generator: LoadGenerator | None = None
    handlers: dict[str, EvictImmediately | nth.Nth] = {}
    try:
        vms = await asyncio.gather(*(add_vm(world, f"{world.pool}-{n}", spotguard=scenario.spotguard,
                                            gpus=cfg.gpus_per_node) for n in ("a", "b")))
        if scenario.surge:
            await asyncio.to_thread(world.ensure_placeholder_priority_class)
        if scenario.handler == "evict_immediately":
            for vm in vms:
                handlers[vm.name] = EvictImmediately(world, node=vm.name, metadata_url=vm.metadata.url,
                                                     cloud=profile.cloud, poll_seconds=cfg.nth_poll_s)
                tasks.append(asyncio.create_task(handlers[vm.name].run(), name=f"evict-immediately-{vm.name}"))
        if scenario.handler == "nth":
            executable = nth.binary()
            if executable is None:
                raise RuntimeError("the nth scenarios need AWS's NTH binary: run scripts/install-nth.sh")
            for vm in vms:
                handlers[vm.name] = nth.Nth(world, node=vm.name, metadata_url=vm.metadata.url, executable=executable)
                tasks.append(asyncio.create_task(handlers[vm.name].run(), name=f"nth-{vm.name}"))
        world.deploy_vllm(replicas=2, shutdown_timeout=cfg.vllm_shutdown_timeout_s if scenario.shutdown_timeout
                          else None, prestop_max_wait=cfg.prestop_max_wait_s if scenario.prestop else None,
                          grace_seconds=pod_grace_seconds(cfg, scenario), token_interval=cfg.token_interval,
                          readiness_gate=scenario.spotguard, probe_period=cfg.probe_period_s,
                          drains_on_sigterm=scenario.spotguard and scenario.drain_aware,
                          real_vllm=cfg.vllm == "real", surge=scenario.surge, gpus=cfg.gpus_per_node)
        # Real vLLM loads for 25-45 s on this machine (more with two at once).
        pods = await asyncio.to_thread(world.wait_ready_pods, 2, timeout=300 if cfg.vllm == "real" else 90)
        # The preempted pod is the one the router's round-robin (pods in name order) serves first, so
        # in every scenario it gets the same requests of the same seeded sequence.
        first = min(pods, key=lambda p: p["metadata"]["name"])
        victim, victim_node = first["metadata"]["name"], first["spec"]["nodeName"]
        initial_pods = {p["metadata"]["name"] for p in pods}

        observer = Observer(ctx.api_client, pool=world.pool, namespace=world.namespace)
        await observer.start()
        tracker = EndpointTracker(ctx.api_client, namespace=world.namespace, service="vllm")
        tracker.start()
        await tracker.wait_synced()
        await world.wait_routable(tracker, 2)

        loop = asyncio.get_running_loop()

        def adopt(event: Any) -> None:
            # The replacement VM gets what every node of this scenario has (spotguard or nothing).
            if event.kind == "node_added" and event.node not in world.vms:
                tasks.append(loop.create_task(world.adopt_vm(event.node, spotguard=scenario.spotguard)))

        autoscaler = AutoscalerEmulator(ctx.api_client, provisioning_delay=cfg.provisioning_delay_s,
                                        max_nodes_per_pool=4, namespace=world.namespace, on_event=adopt)
        autoscaler.start()
        await autoscaler.wait_synced()

        send_for = cfg.warmup_s + profile.vm_gone_s + cfg.after_vm_gone_s
        generator = LoadGenerator(tracker, rate=cfg.rate, duration=send_for, durations=cfg.durations,
                                  seed=cfg.seed + rep, token_interval=cfg.token_interval)
        began = loop.time()
        generator.start()
        # Half a send interval off the sending grid, so no request leaves in the same instant.
        await asyncio.sleep(max(0.0, began + cfg.warmup_s + 0.5 / cfg.rate - loop.time()))
        notice = await preempt(world, victim_node, profile)
        ctx.say(f"    notice at +{cfg.warmup_s:.0f}s; {generator.in_flight_at(notice)} requests in flight")
        vm_gone_at = notice + profile.vm_gone_s

        async def wait_and_stop_daemon() -> None:
            # The preempted node's spotguard dies with its VM.
            await asyncio.sleep(max(0.0, vm_gone_at + 0.5 - time.time()))
            daemon = world.vms[victim_node].daemon
            if daemon is not None:
                with_metrics = await daemon_metrics(daemon)
                daemon_reaction.append(with_metrics)
                await asyncio.to_thread(daemon.stop)

        daemon_reaction: list[str | None] = []
        stopper = asyncio.create_task(wait_and_stop_daemon())
        tasks.append(stopper)
        try:
            await asyncio.wait_for(generator.wait(), timeout=send_for + cfg.durations.max_s + 45)
        except TimeoutError:
            ctx.say("    warning: requests still open long after their end; cancelling them")
            await generator.stop(drain=False)

        def replaced(t: EndpointTracker) -> bool:
            return any(e.pod not in initial_pods for e in t.ready_endpoints)

        try:
            await tracker.wait_for(replaced, timeout=max(0.0, vm_gone_at + cfg.replacement_timeout_s - time.time()))
        except TimeoutError:
            ctx.say("    no replacement became ready in time")
        await asyncio.wait_for(stopper, timeout=30)
        events = await asyncio.to_thread(world.events)
        return _measure_run(profile=profile, scenario=scenario, rep=rep, notice=notice, victim=victim,
                            victim_node=victim_node, initial_pods=initial_pods, generator=generator,
                            tracker=tracker, observer=observer, handler=handlers.get(victim_node),
                            daemon_metrics=daemon_reaction[0] if daemon_reaction else None, events=events,
                            namespace=world.namespace)
    finally:
        if generator is not None:
            await generator.stop(drain=False)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if autoscaler is not None:
            await autoscaler.stop()
        if tracker is not None:
            await tracker.stop()
        if observer is not None:
            await observer.stop()
        await ctx.dispose(world)


def capacity_gap(changes: list[EndpointChange], *, notice: float, until: float, desired: int) -> tuple[float, bool]:
    """Seconds between `notice` and `until` during which fewer than `desired` serving replicas were
    ready in the router's view, and whether the gap was still open at `until`. Pure: the endpoint
    changes the tracker recorded, replayed in order."""
    ready: set[str] = set()
    for change in changes:  # the state at the notice
        if change.at > notice:
            break
        _apply(ready, change)
    gap, since = 0.0, notice if len(ready) < desired else None
    for change in changes:
        if change.at <= notice or change.at > until:
            continue
        _apply(ready, change)
        if since is None and len(ready) < desired:
            since = change.at
        elif since is not None and len(ready) >= desired:
            gap, since = gap + change.at - since, None
    if since is not None:
        gap += until - since
    return gap, since is not None


def _apply(ready: set[str], change: EndpointChange) -> None:
    key = f"{change.address}:{change.port}"
    if change.ready:
        ready.add(key)
    else:
        ready.discard(key)


def _servable(record: RequestRecord, *, victim: str, notice: float, budget_s: float) -> bool:
    """Could a correct handler have served this request? Every request can, except one already
    running on the preempted pod at the notice whose intended end lies past the moment the pod is
    killed at the latest (notice + budget): no handler can finish it there."""
    if record.pod == victim and record.start <= notice:
        return record.start + record.intended_s <= notice + budget_s
    return True


def _measure_run(*, profile: Profile, scenario: Scenario, rep: int, notice: float, victim: str, victim_node: str,
                 initial_pods: set[str], generator: LoadGenerator, tracker: EndpointTracker, observer: Observer,
                 handler: EvictImmediately | nth.Nth | None, daemon_metrics: str | None, events: list[Obj],
                 namespace: str) -> dict[str, Any]:
    records = generator.records
    counts = {outcome.value: sum(1 for r in records if r.outcome is outcome) for outcome in Outcome}
    counts["unfinished"] = sum(1 for r in records if r.outcome is None)
    at_risk = [r for r in records if r.pod == victim and r.outcome is not Outcome.REFUSED
               and r.start <= notice and (r.end is None or r.end > notice)]
    lost = [r for r in records if r.lost and _servable(r, victim=victim, notice=notice, budget_s=profile.budget_s)]
    unservable_lost = [r for r in records if r.lost and not _servable(r, victim=victim, notice=notice,
                                                                       budget_s=profile.budget_s)]
    uid = observer.pod_uid(victim)
    cordoned = observer.first(victim_node, "unschedulable", True, after=notice)
    pod_ready_false = observer.first(uid, "ready", "False", after=notice) if uid else None
    pod_terminating = observer.first(uid, "terminating", True, after=notice) if uid else None
    pod_serving_false = observer.first(uid, "serving", "False", after=notice) if uid else None
    not_ready_candidates = [t for t in (pod_ready_false, pod_terminating) if t is not None]
    pod_not_ready = min(not_ready_candidates) if not_ready_candidates else None
    reaction = (max(cordoned, pod_not_ready) - notice) if cordoned and pod_not_ready else None
    endpoint_out = next((c.at for c in tracker.changes if c.pod == victim and c.ready is not True
                         and c.at >= notice), None)
    replacement = next((c.at for c in tracker.changes if c.ready is True and c.pod not in initial_pods
                        and c.at >= notice), None)
    node_shutdown = observer.first(victim_node, "ready", "False", after=notice)
    # Up to the replacement's readiness (or the end of the watch): fewer than 2 ready replicas.
    gap_until = replacement if replacement is not None else max((c.at for c in tracker.changes), default=notice)
    gap, gap_open = capacity_gap(tracker.changes, notice=notice, until=max(gap_until, notice), desired=2)
    vm_gone = observer.first(victim_node, "exists", False, after=notice)
    pod_finished = next((t for t in (observer.first(uid, "phase", phase, after=notice) for phase in
                                     ("Succeeded", "Failed")) if t is not None), None) if uid else None

    # spotguard's drain: how long after the pod really had nothing in flight did the daemon move on?
    phases = {phase: observer.first(victim_node, "phase", phase, after=notice)
              for phase in ("deregistering", "draining", "evicting", "drained")}
    reasons = {e.get("reason") for e in events if (e.get("involvedObject") or {}).get("name") == victim_node}
    drain_lag = None
    drain_ended_by = None
    if scenario.spotguard:
        drain_ended_by = "in_flight_zero" if "Drained" in reasons else (
            "budget_spent" if "DrainBudgetSpent" in reasons else None)
        left_draining = next((phases[p] for p in ("evicting", "drained") if phases[p] is not None), None)
        on_victim_ends = [r.end for r in records if r.pod == victim and r.end is not None
                          and r.outcome is not Outcome.REFUSED]
        if drain_ended_by == "in_flight_zero" and left_draining is not None and phases["draining"] is not None:
            idle_since = max([phases["draining"], *on_victim_ends])
            if idle_since <= left_draining:
                drain_lag = left_draining - idle_since

    daemon_reaction = None
    if daemon_metrics:
        count = metric_value(daemon_metrics, "spotguard_reaction_duration_seconds_count")
        if count == 1:
            daemon_reaction = metric_value(daemon_metrics, "spotguard_reaction_duration_seconds_sum")

    def rel(t: float | None) -> float | None:
        return None if t is None else round(t - notice, 3)

    return {
        "profile": profile.name, "scenario": scenario.name, "rep": rep, "namespace": namespace,
        "notice_wall": notice, "victim_pod": victim, "victim_node": victim_node,
        "requests": len(records), **counts,
        "requests_in_flight_at_notice": len(at_risk),
        "requests_in_flight_at_notice_all": generator.in_flight_at(notice),
        "lost": len(lost), "lost_aborted": sum(1 for r in lost if r.outcome is Outcome.ABORTED),
        "lost_refused": sum(1 for r in lost if r.outcome is Outcome.REFUSED),
        "lost_unservable": len(unservable_lost),
        "unservable": sum(1 for r in records if not _servable(r, victim=victim, notice=notice,
                                                              budget_s=profile.budget_s)),
        "reaction_s": reaction, "notready_s": rel(endpoint_out) if endpoint_out else None,
        "daemon_reaction_s": daemon_reaction,
        "drain_detect_lag_s": drain_lag, "drain_ended_by": drain_ended_by,
        "replacement_ready_s": rel(replacement),
        "capacity_gap_s": round(gap, 3), "capacity_gap_open": gap_open,
        "markers": {"cordoned": rel(cordoned), "pod_serving_false": rel(pod_serving_false),
                    "pod_ready_false": rel(pod_ready_false), "pod_terminating": rel(pod_terminating),
                    "endpoint_not_ready": rel(endpoint_out), "node_shutdown": rel(node_shutdown),
                    "pod_finished": rel(pod_finished), "vm_gone": rel(vm_gone), "replacement_ready": rel(replacement),
                    "nth_noticed": rel(handler.noticed_at) if handler else None,
                    "nth_evicted": rel(handler.evicted_at.get(victim)) if handler else None,
                    **{f"phase_{p}": rel(t) for p, t in phases.items()}},
        "timeline": [[round(r.start - notice, 3), round((r.end if r.end is not None else r.start) - notice, 3),
                      r.outcome.value if r.outcome else "unfinished", r.pod == victim, r.intended_s]
                     for r in records],
    }


def summarize_runs(runs: list[dict[str, Any]], scenario: Scenario, profile: Profile) -> dict[str, Any]:
    """One scenario's runs in one profile, in the report's shape (counts summed over runs)."""
    def total(key: str) -> int:
        return sum(run[key] for run in runs)

    replacement = [run["replacement_ready_s"] for run in runs]
    lags = [run["drain_detect_lag_s"] for run in runs]
    summary: dict[str, Any] = {
        "description": scenario.description, "control": scenario.control, "runs": len(runs),
        "requests": total("requests"),
        "requests_in_flight_at_notice": total("requests_in_flight_at_notice"),
        "completed": total("completed"), "aborted": total("aborted"), "refused": total("refused"),
        "error": total("error"), "cancelled": total("cancelled"), "unfinished": total("unfinished"),
        "lost": total("lost"), "lost_aborted": total("lost_aborted"), "lost_refused": total("lost_refused"),
        "lost_unservable": total("lost_unservable"), "unservable": total("unservable"),
        "reaction_ms": quantiles_ms([run["reaction_s"] for run in runs]),
        "notready_ms": quantiles_ms([run["notready_s"] for run in runs]),
        "daemon_reaction_ms": quantiles_ms([run["daemon_reaction_s"] for run in runs]),
        "drain_detect_lag_ms": {"p50": ms(quantile(lags, 0.5)), "n": sum(v is not None for v in lags)},
        "drain_ended_by": [run["drain_ended_by"] for run in runs],
        "replacement_ready_s": rounded(quantile(replacement, 0.5), 1),
        "capacity_gap_s": rounded(quantile([run["capacity_gap_s"] for run in runs], 0.5), 1),
        "capacity_gap_s_runs": [rounded(run["capacity_gap_s"], 1) for run in runs],
        "replacement_ready_s_runs": [rounded(v, 1) for v in replacement],
        "per_run": [{k: run[k] for k in ("rep", "requests", "completed", "aborted", "refused", "lost",
                                         "requests_in_flight_at_notice", "reaction_s", "notready_s",
                                         "drain_detect_lag_s", "drain_ended_by", "replacement_ready_s",
                                         "capacity_gap_s", "capacity_gap_open",
                                         "markers")} for run in runs],
    }
    nulls = {}
    if summary["reaction_ms"]["p50"] is None:
        nulls["reaction_ms"] = ("no handler: nothing cordons the node (GKE's shutdown only makes it NotReady)"
                                if scenario.handler == "none" else "not observed")
    if summary["drain_detect_lag_ms"]["p50"] is None:
        nulls["drain_detect_lag_ms"] = (
            "no drain: this handler never waits for in-flight requests" if not scenario.spotguard else
            "the pod drains itself (drains-on-sigterm): spotguard evicts it without waiting for its requests"
            if scenario.drain_aware else "the drain never ended by seeing 0 in flight (see drain_ended_by)")
    if summary["replacement_ready_s"] is None:
        nulls["replacement_ready_s"] = "no replacement pod became Ready within the wait"
    if summary["notready_ms"]["p50"] is None:
        nulls["notready_ms"] = "the router never saw the pod's endpoint leave"
    for key in ("reaction_ms", "notready_ms", "daemon_reaction_ms"):
        if summary[key]["p50"] is None:
            summary[key] = {"p50": None, "p99": None, "n": 0}
    if scenario.handler != "spotguard":
        summary["daemon_reaction_ms"] = None
    summary["null_reasons"] = nulls
    summary["budget_s"] = profile.budget_s
    return summary



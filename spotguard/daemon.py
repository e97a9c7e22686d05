"""Wires the provider -> lifecycle -> adapters, and owns the asyncio loop and shutdown.

One loop decides; everything else feeds it:
- the provider task sets the current notice;
- two list-watches (`kube.ListWatch`, each in a thread: the kubernetes client is synchronous) keep
  this node and its pods cached;
- while a notice is being handled, a timer refreshes EndpointSlice readiness and vLLM in-flight
  counts every --drain-poll-seconds. With no notice nothing polls: the watches are the only API
  traffic, one request per watch every five minutes.
Each wake-up builds a `Seen` from the caches, asks `lifecycle.decide` what to do, and does it.
"""

from __future__ import annotations

import asyncio
import random
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Callable

import aiohttp
import structlog
from aiohttp import web

from spotguard import actions
from spotguard import kube as k
from spotguard import evictions as ev
from spotguard import lifecycle as lc
from spotguard import placeholder, vllm, webhooks
from spotguard.backoff import backoff_delay
from spotguard.config import Config
from spotguard.notice import Notice, NoticeKind
from spotguard.observability import Metrics, health_app
from spotguard.providers import Provider
from spotguard.replacements import Replacements

log = structlog.get_logger("spotguard")
WATCH_TIMEOUT_SECONDS = 300
# An Event whose POST fails is tried again this many times, in the background, with backoff from
# the base: Events are how people see what happened (kubectl describe), and API trouble is likeliest
# during a preemption storm. Unlike node and pod changes, nothing else would ask for it again.
EVENT_RETRIES = 3
EVENT_RETRY_BASE_SECONDS = 1.0


@dataclass
class _Reading:
    in_flight: int | None = None
    unreadable: bool = False
    # The engine-step counter, to tell stale gauges from busy ones (vllm.settled_in_flight).
    engine: vllm.EngineActivity | None = None
    stale_reported: bool = False


class ClaimTooLate(Exception):
    """A node write claimed as spotguard's a cordon or label someone else made just before it."""


class ListenError(Exception):
    """The health and metrics server cannot listen where configured; one line naming the flag."""


class Daemon:
    def __init__(self, *, config: Config, provider: Provider, kube: k.Kube, metrics: Metrics,
                 timing: lc.Timing, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.provider = provider
        self.kube = kube
        self.metrics = metrics
        self.timing = timing
        self.clock = clock
        self.state = lc.State()
        self.node: k.Obj | None = None
        self.pods: dict[str, k.Obj] = {}
        # Surge placeholders made for this node's pods (they run elsewhere), by uid; watched only
        # when surging is on.
        self.surging_on = timing.surge_min_notice_seconds > 0
        self.placeholders: dict[str, k.Obj] = {}
        self.placeholders_synced = not self.surging_on
        self.surge = placeholder.Settings(priority_class=config.surge_priority_class,
                                          image=config.surge_placeholder_image)
        self.notifier = webhooks.Notifier(config.webhook_urls, dry_run=config.dry_run, template=config.webhook_template,
                                          headers=config.webhook_headers,
                                          count=lambda result: metrics.webhooks.labels(result=result).inc())
        self.notice: Notice | None = None
        self.provider_ready = False
        self.pods_synced = False
        self.readings: dict[str, _Reading] = {}
        self.endpoints: dict[str, bool] = {}
        self.replacements = Replacements(kube, on_error=metrics.kube_errors.labels(operation="get_replicaset").inc)
        self.notice_received_at: float | None = None  # monotonic, for the reaction histogram
        self.dry_run_done: set[str] = set()
        self.failed_actions = 0
        self.node_missing = False
        self.failing_steps = 0
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self._event_retries: set[asyncio.Task[None]] = set()
        self._list_watches: list[k.ListWatch] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._main: asyncio.Task[Any] | None = None
        self._session: aiohttp.ClientSession | None = None

    # -- running -----------------------------------------------------------------------------

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._main = asyncio.current_task()
        # Room for a node PATCH plus one pods/status PATCH per serving pod at the same moment.
        self._loop.set_default_executor(ThreadPoolExecutor(max_workers=16, thread_name_prefix="kube"))
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._loop.add_signal_handler(sig, self.stop)
        runner = web.AppRunner(health_app(metrics=self.metrics, alive=self._alive, ready=self._ready),
                               access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.config.listen_host, self.config.listen_port).start()
        except OSError as error:  # in use, not an address of this host, unresolvable
            await runner.cleanup()
            raise ListenError(f"--listen / SPOTGUARD_LISTEN: cannot listen on "
                              f"{self.config.listen_host}:{self.config.listen_port}: {error.strerror or error}") from None
        self._session = aiohttp.ClientSession()
        self.notifier.start()
        log.info("started", listen=f"{self.config.listen_host}:{self.config.listen_port}",
                 provider=self.provider.name, dry_run=self.config.dry_run)
        try:
            await self._load_node()
            self._list_watches = self._watches()
            for watch in self._list_watches:
                watch.start()
            self._tasks = [asyncio.create_task(self._follow_provider(), name="provider"),
                           asyncio.create_task(self._decide_loop(), name="decide")]
            await asyncio.gather(*self._tasks)
        except asyncio.CancelledError:
            pass
        finally:
            for task in [*self._tasks, *self._event_retries]:
                task.cancel()
            await asyncio.gather(*self._tasks, *self._event_retries, return_exceptions=True)
            for watch in self._list_watches:
                await watch.stop()
            await self.notifier.stop()
            await self._session.close()
            await runner.cleanup()
            log.info("stopped")

    def stop(self) -> None:
        """SIGTERM/SIGINT: end `run` wherever it is (even still waiting for the node)."""
        log.info("stopping")
        if self._main is not None:
            self._main.cancel()

    def _alive(self) -> bool:
        return all(not task.done() for task in self._tasks) and all(w.running for w in self._list_watches)

    async def _ready(self) -> tuple[bool, str]:
        # From cached state only: a kubelet probing /readyz every 10 s must not become API traffic.
        if self.node_missing:
            return False, f"node {self.config.node_name} not found (NODE_NAME)"
        if not self._list_watches:  # started after the node's first read, still under way
            return False, f"reading node {self.config.node_name}"
        if not all(watch.healthy for watch in self._list_watches):
            return False, "kubernetes API not reachable (watch down)"
        if not self.provider_ready or not self.metrics.metadata_reachable:
            return False, "metadata server not reachable"
        return True, "ok"

    # -- feeding the loop --------------------------------------------------------------------

    async def _load_node(self) -> None:
        """Read the node once before deciding anything; a saved progress means we resume a drain."""
        attempt = 0
        while True:
            try:
                self.node = await asyncio.to_thread(self.kube.get_node)
                break
            except Exception as error:  # noqa: BLE001 - any failure: log, back off, retry
                attempt += 1
                self.metrics.kube_errors.labels(operation="get_node").inc()
                if isinstance(error, k.KubeError) and error.status == 404:
                    # Not the API failing: NODE_NAME names no node. Said as such, every time.
                    self.node_missing = True
                    self.metrics.node_found.set(0)
                    log.error("node not found", node=self.config.node_name, attempt=attempt,
                              hint="NODE_NAME comes from the downward API (spec.nodeName); is it set?")
                else:
                    log.warning("node not readable yet", error=str(error), attempt=attempt)
                await asyncio.sleep(backoff_delay(attempt, base=0.5, cap=10))
        self.node_missing = False
        self.metrics.node_found.set(1)
        progress = k.progress_from_node(self.node)
        if progress is not None:
            log.info("resuming", phase=progress.phase.value, notice_kind=progress.notice_kind,
                     seconds_to_deadline=round(progress.deadline - self.clock(), 1))
            self.state = lc.State(progress=progress)

    async def _follow_provider(self) -> None:
        async for notice in self.provider.watch():
            if notice is not None and self.config.cordon_only and not notice.surge_only:
                notice = replace(notice, cordon_only=True)
            if notice is not None and (self.notice is None or notice.kind != self.notice.kind):
                self.metrics.notices.labels(provider=self.provider.name, kind=notice.kind.value).inc()
                self.notice_received_at = time.monotonic()
                log.warning("notice", notice_kind=notice.kind.value, source=notice.source, detail=notice.detail,
                            seconds_to_deadline=round(notice.deadline - self.clock(), 1))
            elif notice is None and self.notice is not None:
                self.metrics.notices_cancelled.labels(provider=self.provider.name).inc()
                log.warning("notice withdrawn", notice_kind=self.notice.kind.value)
            self.notice = notice
            self.provider_ready = True
            self._wake.set()

    def _watches(self) -> list[k.ListWatch]:
        """This node, the pods bound to it and (surge on) its placeholders, kept current by watches
        (the only idle traffic)."""

        def count_error(operation: str) -> Callable[[Exception], None]:
            return lambda _: self.metrics.kube_errors.labels(operation=operation).inc()

        def then_wake(apply: Callable[..., None]) -> Callable[..., None]:
            def wrapped(*args: Any) -> None:
                apply(*args)
                self._wake.set()
            return wrapped

        node_name = self.config.node_name
        path, query = self.kube.placeholders_path()
        placeholders = [k.ListWatch(self.kube.client, path, query=query, on_sync=then_wake(self._set_placeholders),
                                    on_event=then_wake(self._apply_placeholder_event), name="placeholders",
                                    timeout_seconds=WATCH_TIMEOUT_SECONDS, on_error=count_error("watch_placeholders"))]
        return [
            k.ListWatch(self.kube.client, "/api/v1/nodes", query={"fieldSelector": f"metadata.name={node_name}"},
                        on_sync=then_wake(lambda items: self._set_node(items[0] if items else None)),
                        on_event=then_wake(self._apply_node_event), name="node",
                        timeout_seconds=WATCH_TIMEOUT_SECONDS, on_error=count_error("watch_node")),
            k.ListWatch(self.kube.client, "/api/v1/pods", query={"fieldSelector": f"spec.nodeName={node_name}"},
                        on_sync=then_wake(self._set_pods), on_event=then_wake(self._apply_pod_event), name="pods",
                        timeout_seconds=WATCH_TIMEOUT_SECONDS, on_error=count_error("watch_pods")),
            *(placeholders if self.surging_on else []),
        ]

    def _set_node(self, node: k.Obj | None) -> None:
        if node is None and self.node is not None:
            log.warning("node object is gone")
        if node is not None and self.node is not None and _older(node, than=self.node):
            return  # a watch event from before the PATCH response we already hold
        self.node = node

    def _apply_node_event(self, kind: str, node: k.Obj) -> None:
        self._set_node(None if kind == "DELETED" else node)

    def _set_pods(self, items: list[k.Obj]) -> None:
        self.pods = {pod["metadata"]["uid"]: pod for pod in items}
        self.readings = {uid: reading for uid, reading in self.readings.items() if uid in self.pods}
        self.pods_synced = True

    def _apply_pod_event(self, kind: str, pod: k.Obj) -> None:
        uid = pod["metadata"]["uid"]
        if kind == "DELETED":
            self.pods.pop(uid, None)
            self.readings.pop(uid, None)
        elif uid not in self.pods or not _older(pod, than=self.pods[uid]):
            self.pods[uid] = pod

    def _set_placeholders(self, items: list[k.Obj]) -> None:
        self.placeholders = {pod["metadata"]["uid"]: pod for pod in items}
        self.placeholders_synced = True

    def _apply_placeholder_event(self, kind: str, pod: k.Obj) -> None:
        uid = pod["metadata"]["uid"]
        if kind == "DELETED":
            self.placeholders.pop(uid, None)
        elif uid not in self.placeholders or not _older(pod, than=self.placeholders[uid]):
            self.placeholders[uid] = pod

    # -- deciding ----------------------------------------------------------------------------

    async def _decide_loop(self) -> None:
        while True:
            # A timer only while a notice is handled or a failed action waits to be asked again.
            ticking = self.state.progress is not None or self.failing_steps > 0
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self.config.drain_poll_seconds if ticking else None)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            # Nothing is decided on a partial picture: a drain resumed before the pods are listed
            # would see "no serving pods" and evict at once. The metadata server's first answer is
            # not waited for (see `_current_notice`).
            if not self.pods_synced or not self.placeholders_synced or self.node is None:
                continue
            try:
                failures_before = self.failed_actions
                acted = await self._step()
                if self.failed_actions > failures_before:
                    # The API server is failing (down, overloaded): ask again, but back off, so a
                    # pool of daemons draining at once does not hammer it while it recovers.
                    self.failing_steps += 1
                    await asyncio.sleep(backoff_delay(self.failing_steps, base=0.25, cap=5))
                elif acted:
                    self.failing_steps = 0
                    # Let the watches report what the actions changed before deciding again.
                    await asyncio.sleep(0.02)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a bug in one step must not stop the guard
                log.exception("decision step failed")
                await asyncio.sleep(self.config.drain_poll_seconds)

    async def _step(self) -> bool:
        progress = self.state.progress
        if progress is not None and self._current_notice() is not None:
            await self._observe(progress.phase)
        await self.replacements.refresh(self.pods.values())
        waiting = progress is not None and progress.phase in (lc.Phase.CORDONED, lc.Phase.STANDBY)
        if self.notice is not None and (progress is None or (waiting and self.notice.full)):
            # Ownership (was the node already cordoned by someone else?) and the pods to take out
            # of rotation are decided on this step: read them, rather than trust watch caches that
            # may be behind (by milliseconds, or by minutes if a connection died silently).
            node, pods = await asyncio.gather(asyncio.to_thread(self.kube.get_node),
                                              asyncio.to_thread(self.kube.list_pods), return_exceptions=True)
            if isinstance(node, dict):
                self._set_node(node)
            if isinstance(pods, tuple):
                self._set_pods(pods[0])
            if not (isinstance(node, dict) and isinstance(pods, tuple)):
                log.warning("node or pods not readable at the notice; using the cached copies",
                            error=str(node if not isinstance(node, dict) else pods)[:200])
        seen = self._seen()
        before = self.state.progress
        decision = lc.decide(self.state, seen, now=self.clock(), timing=self.timing)
        self.state = decision.state
        after = self.state.progress
        # The reaction: the first step of a notice, or of the notice that ends a cordon-only one or
        # a stand-by (which cordoned nothing, so it is no reaction itself).
        waiting = (lc.Phase.CORDONED, lc.Phase.STANDBY)
        first_reaction = after is not None and after.phase is not lc.Phase.STANDBY and (
            before is None or (before.phase in waiting and after.phase is not before.phase))
        await self._execute(decision.actions, first_reaction=first_reaction)
        self._update_gauges(before, after)
        return bool(decision.actions)

    async def _observe(self, phase: lc.Phase) -> None:
        serving = [pod for pod in self.pods.values() if k.is_serving_pod(pod)
                   and not pod["metadata"].get("deletionTimestamp")]
        if phase is lc.Phase.DEREGISTERING and serving:
            namespaces = {pod["metadata"]["namespace"] for pod in serving}
            try:
                self.endpoints = await asyncio.to_thread(self.kube.endpoints_ready, namespaces)
            except Exception as error:  # noqa: BLE001
                self.metrics.kube_errors.labels(operation="list_endpointslices").inc()
                log.warning("endpointslices not readable", error=str(error)[:300])
        if phase is lc.Phase.DRAINING and serving:
            await asyncio.gather(*(self._read_in_flight(pod) for pod in serving))

    async def _read_in_flight(self, pod: k.Obj) -> None:
        uid, key = pod["metadata"]["uid"], f"{pod['metadata']['namespace']}/{pod['metadata']['name']}"
        url = k.metrics_url(pod)
        reading = self.readings.setdefault(uid, _Reading())
        if url is None:
            reading.in_flight, reading.unreadable = None, True
            return
        assert self._session is not None
        try:
            result = await vllm.read_in_flight(self._session, url,
                                               timeout=min(2.0, max(0.2, self.config.drain_poll_seconds * 2)))
        except vllm.ScrapeError as error:
            if not reading.unreadable:
                log.warning("vllm metrics unreadable", pod=key, reason=error.reason, error=str(error)[:200])
            self.metrics.scrape_errors.labels(reason=error.reason).inc()
            reading.in_flight, reading.unreadable = None, True  # a stale 0 must not pass as drained
            return
        now = time.monotonic()
        reading.engine = vllm.follow_engine(reading.engine, result, now=now)
        count = vllm.settled_in_flight(result, reading.engine, now=now)
        if count != int(result.total) and not reading.stale_reported:
            reading.stale_reported = True
            log.warning("vllm gauges stale", pod=key, gauges=int(result.total),
                        note=f"no engine step for {vllm.STALE_GAUGE_SECONDS:g} s: counted as 0 in flight")
        if reading.in_flight != count:
            log.info("in flight", pod=key, in_flight=count)
        reading.in_flight, reading.unreadable = count, False
        self.metrics.in_flight.labels(namespace=pod["metadata"]["namespace"], pod=pod["metadata"]["name"]).set(count)

    def _current_notice(self) -> Notice | None:
        """The provider's notice; before its first answer, the one a saved drain was following.

        So a metadata server that does not answer (blocked, restarting) neither holds new pods
        unready (no notice known: keep serving) nor stalls a drain resumed after a restart, and a
        drain is never undone just because the provider has not spoken yet."""
        if self.provider_ready or self.state.progress is None:
            return self.notice
        progress = self.state.progress
        kind = NoticeKind(progress.notice_kind) if progress.notice_kind in set(NoticeKind) else NoticeKind.PREEMPTION
        return Notice(kind=kind, deadline=progress.deadline, cordon_only=progress.phase is lc.Phase.CORDONED,
                      surge_only=progress.phase is lc.Phase.STANDBY,
                      source="spotguard.io/ node annotations", detail="resumed before the metadata server answered")

    def _seen(self) -> lc.Seen:
        assert self.node is not None
        facts = []
        for uid, pod in self.pods.items():
            reading = self.readings.get(uid, _Reading())
            facts.append(k.pod_facts(pod, endpoints_ready=self.endpoints.get(uid), in_flight=reading.in_flight,
                                     metrics_unreadable=reading.unreadable,
                                     replacement_ready=self.replacements.ready.get(uid)))
        return lc.Seen(notice=self._current_notice(), node_unschedulable=k.node_unschedulable(self.node),
                       node_has_taint=k.node_has_taint(self.node), pods=tuple(facts),
                       node_excluded_from_lb=k.node_excluded_from_lb(self.node),
                       stored_progress=k.progress_from_node(self.node),
                       placeholders=tuple(k.placeholder_facts(p) for p in self.placeholders.values()))

    # -- acting ------------------------------------------------------------------------------

    async def _execute(self, planned: tuple[lc.Action, ...], *, first_reaction: bool) -> None:
        """Node and readiness changes first and together (they are the reaction), then evictions,
        then Events."""
        urgent = [a for a in planned if isinstance(a, (lc.UpdateNode, lc.SetServing))]
        done = await asyncio.gather(*(self._do(action) for action in urgent))
        # A release before the node records the surge could be undone by a restart that finds no
        # surge on the node: it waits for the next step.
        node_written = all(ok is not None or not isinstance(a, lc.UpdateNode) for a, ok in zip(urgent, done))
        if first_reaction and self.notice_received_at is not None:
            reaction = time.monotonic() - self.notice_received_at
            self.metrics.reaction.observe(reaction)
            log.info("reacted", reaction_ms=round(reaction * 1000, 1))
            self.notice_received_at = None
        reports = [a for a in planned if isinstance(a, lc.Report)]
        await asyncio.gather(*(self._do(a) for a in planned if isinstance(a, lc.DeletePlaceholder)))
        surges = [a for a in planned if isinstance(a, (lc.CreatePlaceholder, lc.ReadoptPod))
                  or (isinstance(a, lc.ReleasePod) and node_written)]
        not_released: set[str] = {a.pod.uid for a in planned if isinstance(a, lc.ReleasePod) and a not in surges}
        for surge, result in zip(surges, await asyncio.gather(*(self._do(a) for a in surges))):
            if isinstance(surge, lc.ReleasePod) and result is not True:
                not_released.add(surge.pod.uid)
            if isinstance(result, str):  # refused for good: the surge goes on without this pod
                self.state, follow = lc.record_surge_refused(self.state, surge, result)
                reports.extend(follow)
        # "Released" only for a release that landed; it is asked again, and said then, otherwise.
        reports = [r for r in reports if not (r.reason is lc.Reason.RELEASED and r.pod and r.pod.uid in not_released)]
        self.state = replace(self.state, reported=self.state.reported - {f"{lc.Reason.RELEASED}:{uid}"
                                                                         for uid in not_released})
        evictions = [a for a in planned if isinstance(a, lc.Evict)]
        results = await asyncio.gather(*(self._do(action) for action in evictions))
        for evict, result in zip(evictions, results):
            if result is None:
                continue
            outcome, detail = result
            self.state, follow = ev.record_eviction(self.state, evict.pod, outcome, now=self.clock(),
                                                    timing=self.timing, blocked_by=detail, rand=random.random())
            reports.extend(follow)
            self._count_eviction(evict.pod, outcome, detail)
        for report in reports:
            self._count_report(report)
            self.notifier.send(report, node=self.config.node_name, progress=self.state.progress)
        posted = await asyncio.gather(*(self._do(report) for report in reports))
        for report, ok in zip(reports, posted):
            if not ok:
                task = asyncio.create_task(self._retry_event(report), name=f"event-{report.reason}")
                self._event_retries.add(task)
                task.add_done_callback(self._event_retries.discard)

    async def _retry_event(self, report: lc.Report) -> None:
        for attempt in range(EVENT_RETRIES):
            await asyncio.sleep(backoff_delay(attempt, base=EVENT_RETRY_BASE_SECONDS, cap=8.0))
            if await self._do(report):
                return
        log.warning("event dropped", reason=report.reason, attempts=EVENT_RETRIES + 1)

    async def _do(self, action: lc.Action) -> Any:
        names = actions.names(action)
        fields = actions.log_fields(action, self.state.progress, self.clock())
        dry_run = self.config.dry_run and not (isinstance(action, lc.SetServing) and action.value)
        if dry_run:
            # Every write goes to the API server with dryRun=All (checked, PDBs answered, nothing
            # stored). The cluster does not change, so the level-triggered loop asks again: once.
            key = actions.dry_run_key(action)
            if key in self.dry_run_done:
                if isinstance(action, lc.Evict):
                    return ev.EvictionOutcome.EVICTED, None
                return isinstance(action, lc.Report)   # an Event counts as posted
            self.dry_run_done.add(key)
        try:
            result = await asyncio.to_thread(self._call, action)
        except Exception as error:  # noqa: BLE001 - report, count, and let the next decision ask again
            if isinstance(error, ClaimTooLate):
                # Asking again would be refused again: start the notice over from the node as it is.
                log.warning("node changed before spotguard's first write landed; starting the notice over",
                            error=str(error))
                self.state = lc.State()
            if not isinstance(action, lc.Report):  # Events are retried by _execute, not by the loop
                self.failed_actions += 1
            self._count(names, "error")
            if isinstance(error, k.KubeError) and error.status == 404 and isinstance(action, lc.UpdateNode):
                log.warning("node is gone; nothing to change", actions=names)
            else:
                log.warning("action failed", actions=names, error=str(error)[:300], **fields)
            return None
        self._count(names, "dry_run" if dry_run else "ok")
        if not isinstance(action, lc.Report):
            log.info("dry-run" if dry_run else "done", actions=names, **fields)
        return result

    def _count(self, names: list[actions.ActionName], result: str) -> None:
        for name in names:
            self.metrics.actions.labels(action=name, result=result).inc()

    def _call(self, action: lc.Action) -> Any:
        """The blocking API call for one action (runs in a worker thread)."""
        try:
            result = actions.perform(action, self.kube, node=self.node, pods=self.pods, surge=self.surge)
        except k.KubeError as error:
            if error.status == 403 and isinstance(action, lc.UpdateNode) and self._claim_too_late(action):
                raise ClaimTooLate(str(error)) from error
            raise
        if isinstance(action, lc.UpdateNode):
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._set_node, result)
            return True   # landed (a failure is None, from _do): releases may follow in this step
        return result

    def _claim_too_late(self, update: lc.UpdateNode) -> bool:
        """A notice's first write claimed the cordon (or the load-balancer label) as spotguard's, and
        someone else made it in the moment before: the node has it and spotguard's annotations do
        not say it is spotguard's, so the chart's policies refuse the claim (rightly)."""
        if update.progress is None:
            return False
        node = self.kube.get_node()
        stored = k.progress_from_node(node)
        cordon = update.progress.cordoned_by_us and k.node_unschedulable(node) and not (stored and stored.cordoned_by_us)
        label = update.progress.excluded_by_us and k.node_excluded_from_lb(node) and not (
            stored and stored.excluded_by_us)
        return bool(cordon or label)

    # -- telling people ----------------------------------------------------------------------

    def _count_eviction(self, pod: lc.PodFacts, outcome: ev.EvictionOutcome, detail: str | None) -> None:
        self.metrics.evictions.labels(result=outcome.value).inc()
        blocked = self.metrics.eviction_blocked
        if outcome in (ev.EvictionOutcome.BLOCKED_BY_PDB, ev.EvictionOutcome.MULTIPLE_PDBS):
            blocked.labels(namespace=pod.namespace, pod=pod.name, pdb=detail or "unknown").set(1)
            log.warning("eviction blocked", pod=pod.key, pdb=detail, outcome=outcome.value)
        elif outcome not in (ev.EvictionOutcome.EVICTED, ev.EvictionOutcome.GONE):
            log.warning("eviction failed", pod=pod.key, error=detail)

    def _count_report(self, report: lc.Report) -> None:
        if report.reason is lc.Reason.DEADLINE_MISSED:
            self.metrics.drain_missed_deadline.inc()
        if report.reason is lc.Reason.SURGE_GIVEN_UP:
            self.metrics.surge_given_up.inc()
        if report.reason is lc.Reason.DRAIN_BUDGET_SPENT:
            self.metrics.abandoned_requests.inc(sum(r.in_flight or 0 for uid, r in self.readings.items()
                                                    if uid in self.pods))
        log_fields = {"reason": report.reason, "message": report.message}
        if report.pod is not None:
            log_fields["pod"] = report.pod.key
        (log.warning if report.warning else log.info)("event", **log_fields)

    def _update_gauges(self, before: lc.Progress | None, after: lc.Progress | None) -> None:
        phase = after.phase.value if after else "guarding"
        self.metrics.set_phase(phase)
        self.metrics.seconds_to_deadline.set(max(0.0, after.deadline - self.clock()) if after else 0)
        if before is not None and before.phase is lc.Phase.DRAINING and after is not None \
                and after.phase is lc.Phase.EVICTING:   # a drain that ended (not one stepped back from)
            self.metrics.drain.observe(max(0.0, self.clock() - before.noticed_at))
        # A blocked pod that is gone or finished (the kubelet stopped it) is blocked no more.
        live = {(p["metadata"]["namespace"], p["metadata"]["name"]) for p in self.pods.values()
                if k.not_evictable_reason(p) is None and not p["metadata"].get("deletionTimestamp")}
        for namespace, pod, pdb in list(self.metrics.eviction_blocked._metrics):
            if (namespace, pod) not in live:
                self.metrics.eviction_blocked.remove(namespace, pod, pdb)
        if before is not None and after is None:  # cancelled: forget per-notice series
            self.readings.clear()
            self.endpoints.clear()
            self.metrics.eviction_blocked.clear()
            self.metrics.in_flight.clear()
        if before is None or after is None or before.phase is not after.phase:
            structlog.contextvars.bind_contextvars(phase=phase)
            if after is not None:
                structlog.contextvars.bind_contextvars(notice_kind=after.notice_kind)


def _older(obj: k.Obj, *, than: k.Obj) -> bool:
    """Is `obj` an older version of `than`? Resource versions are opaque strings; compare them only
    when both are integers (as etcd's are) and otherwise take the newer arrival."""
    mine, theirs = obj["metadata"].get("resourceVersion", ""), than["metadata"].get("resourceVersion", "")
    return mine.isdigit() and theirs.isdigit() and int(mine) < int(theirs)

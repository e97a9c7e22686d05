"""Everything an operator watches: Prometheus metrics, structured JSON logs, the health server.

Metric definitions live here and nowhere else. Every series that has no per-pod label exists from
start-up at 0 (label combinations are enumerated up front), so alerts and dashboards never see
"no data" before the first preemption (AWS NTH's issue 200).
"""

from __future__ import annotations

import logging
import sys
from typing import Awaitable, Callable

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from spotguard import __version__
from spotguard.actions import ActionName
from spotguard.evictions import EvictionOutcome
from spotguard.lifecycle import Phase
from spotguard.notice import NoticeKind
from spotguard.providers.base import MetadataFailure
from spotguard.vllm import ScrapeFailure

# Label values, each derived from the enum of the module that produces them, so a new phase,
# action, outcome or failure cannot be missing from the series that exist at 0 from start.
PHASES = tuple(Phase)
ACTIONS = tuple(ActionName)
ACTION_RESULTS = ("ok", "error", "dry_run")
EVICTION_RESULTS = tuple(EvictionOutcome)
METADATA_ERRORS = tuple(MetadataFailure)
SCRAPE_ERRORS = tuple(ScrapeFailure)
# Seconds; notices run from ~30 s (spot) to 60 min (GPU host maintenance).
# `*_created` series double the exposition and no alert or dashboard reads them.
disable_created_metrics()
_DRAIN_BUCKETS = (0.5, 1, 2, 5, 10, 15, 20, 25, 30, 45, 60, 90, 120, 300, 600, 1800, 3600)
# Seconds; the reaction target is 100 ms.
_REACTION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5)


class Metrics:
    """spotguard's own series (prefix spotguard_), on a registry of their own."""

    def __init__(self, *, provider: str, registry: CollectorRegistry | None = None) -> None:
        self.provider = provider
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.build_info = Gauge("spotguard_build_info", "Always 1; labels say which spotguard runs.",
                                ["version", "provider"], registry=r)
        self.notices = Counter("spotguard_notices_total",
                               "Termination notices received from the cloud provider.",
                               ["provider", "kind"], registry=r)
        self.notices_cancelled = Counter("spotguard_notices_cancelled_total",
                                         "Notices withdrawn by the provider (maintenance back to NONE).",
                                         ["provider"], registry=r)
        self.actions = Counter("spotguard_actions_total", "Actions taken on the node and its pods.",
                               ["action", "result"], registry=r)
        self.evictions = Counter("spotguard_evictions_total",
                                 "Eviction API answers, by outcome (blocked_by_pdb = HTTP 429).",
                                 ["result"], registry=r)
        self.eviction_blocked = Gauge("spotguard_eviction_blocked",
                                      "1 while the pod's eviction is refused by the named PodDisruptionBudget.",
                                      ["namespace", "pod", "pdb"], registry=r)
        self.in_flight = Gauge("spotguard_in_flight_requests",
                               "Requests running + waiting in the serving pod's vLLM, last read while draining.",
                               ["namespace", "pod"], registry=r)
        self.abandoned_requests = Counter("spotguard_abandoned_requests_total",
                                          "Requests still in flight when the drain budget ran out "
                                          "(they are likely aborted when the pod stops).", registry=r)
        self.drain_missed_deadline = Counter("spotguard_drain_missed_deadline_total",
                                             "Drains that had not evicted every pod when the deadline passed.",
                                             registry=r)
        self.surge_given_up = Counter("spotguard_surge_given_up_total",
                                      "Pods drained without the replacement capacity a surge was to bring "
                                      "(placeholder refused, or not running in time).", registry=r)
        self.webhooks = Counter("spotguard_webhook_deliveries_total",
                                "Webhook notifications, by result: ok, error (every attempt failed), "
                                "dropped (the queue was full).", ["result"], registry=r)
        self.reaction = Histogram("spotguard_reaction_duration_seconds",
                                  "Notice received -> node cordoned and every serving pod not-ready.",
                                  buckets=_REACTION_BUCKETS, registry=r)
        self.drain = Histogram("spotguard_drain_duration_seconds",
                               "Notice received -> in-flight requests at 0 (or drain budget spent).",
                               buckets=_DRAIN_BUCKETS, registry=r)
        self.phase = Gauge("spotguard_phase", "1 for the phase the daemon is in, 0 for the others.",
                           ["phase"], registry=r)
        self.seconds_to_deadline = Gauge("spotguard_seconds_to_deadline",
                                         "Seconds left until the VM is expected to go; 0 without a notice.",
                                         registry=r)
        self.metadata_up = Gauge("spotguard_metadata_up",
                                 "1 when the last request to the metadata server succeeded.", registry=r)
        self.metadata_errors = Counter("spotguard_metadata_errors_total",
                                       "Failed requests to the metadata server, by reason.",
                                       ["provider", "reason"], registry=r)
        self.scrape_errors = Counter("spotguard_vllm_scrape_errors_total",
                                     "Failed reads of a serving pod's vLLM /metrics, by reason.",
                                     ["reason"], registry=r)
        self.node_found = Gauge("spotguard_node_found",
                                "0 while the API server says the node this daemon guards (NODE_NAME) does "
                                "not exist; 1 otherwise.", registry=r)
        self.node_found.set(1)
        self.kube_errors = Counter("spotguard_kube_api_errors_total",
                                   "Failed Kubernetes API calls (retried).", ["operation"], registry=r)

        self.use_provider(provider)
        for action in ACTIONS:
            for result in ACTION_RESULTS:
                self.actions.labels(action=action, result=result)
        for result in EVICTION_RESULTS:
            self.evictions.labels(result=result)
        for result in ("ok", "error", "dropped"):
            self.webhooks.labels(result=result)
        for reason in SCRAPE_ERRORS:
            self.scrape_errors.labels(reason=reason)
        self.set_phase("guarding")

    def use_provider(self, provider: str) -> None:
        """The `provider` label from now on: `auto` until AutoProvider has found the cloud. Counts
        already made under the old name stay (failed probes while detecting are real errors)."""
        if self.provider != provider:
            # Only series that say which cloud this is; error counts keep the name they were made under.
            self.build_info.remove(__version__, self.provider)
            for kind in NoticeKind:
                self.notices.remove(self.provider, kind.value)
            self.notices_cancelled.remove(self.provider)
        self.provider = provider
        self.build_info.labels(version=__version__, provider=provider).set(1)
        for kind in NoticeKind:
            self.notices.labels(provider=provider, kind=kind.value)
        self.notices_cancelled.labels(provider=provider)
        for reason in METADATA_ERRORS:
            self.metadata_errors.labels(provider=provider, reason=reason)

    # The provider reports each metadata request here; /readyz reads `metadata_reachable`.
    metadata_reachable = False

    def metadata_ok(self) -> None:
        self.metadata_reachable = True
        self.metadata_up.set(1)

    def metadata_failed(self, reason: str) -> None:
        self.metadata_reachable = False
        self.metadata_up.set(0)
        self.metadata_errors.labels(provider=self.provider, reason=reason).inc()

    def set_phase(self, current: str) -> None:
        for phase in PHASES:
            self.phase.labels(phase=phase).set(1 if phase == current else 0)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def configure_logging(*, level: str = "info", node: str | None = None) -> None:
    """JSON lines on stdout, one event per line, with the node on every line."""
    numeric = getattr(logging, level.upper())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stdout),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.clear_contextvars()
    if node:
        structlog.contextvars.bind_contextvars(node=node)


def health_app(*, metrics: Metrics, alive: Callable[[], bool],
               ready: Callable[[], Awaitable[tuple[bool, str]]]) -> web.Application:
    """/metrics, /healthz (the daemon's loop is turning) and /readyz (API server and metadata reachable)."""

    async def metrics_handler(_: web.Request) -> web.Response:
        return web.Response(body=metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        ok = alive()
        return web.Response(status=200 if ok else 503, text="ok\n" if ok else "event loop stalled\n")

    async def readyz(_: web.Request) -> web.Response:
        ok, why = await ready()
        return web.Response(status=200 if ok else 503, text=why + "\n")

    app = web.Application()
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app

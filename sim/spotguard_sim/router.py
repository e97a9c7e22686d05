"""A Service-following router and an open-loop load generator: what users' traffic sees.

`EndpointTracker` follows the EndpointSlices of one Service (label `kubernetes.io/service-name`)
the way a gateway with EndpointSlice discovery does (Envoy Gateway, the Gateway API inference
extension, kube-proxy): it lists, then watches, and routes round-robin over the endpoints whose
`conditions.ready` is true (absent means true, per the EndpointSlice API). So a pod stops receiving
new work when, and only when, the EndpointSlice controller publishes it as not ready - which is the
signal spotguard's readiness gate drives. (Some routers ignore Pod Ready altogether, e.g. vLLM
production-stack's pod-IP discovery reads containerStatuses; against those a readiness gate does
nothing, see docs/simulation.md.)

`LoadGenerator` sends streaming `POST /v1/completions` requests at a steady rate, each to the next
ready endpoint, each lasting a duration drawn from a stated, seeded distribution (made exact by
`max_tokens` x `sim_token_interval`, which the fake vLLM honours), and records how every request
ended: completed ([DONE] arrived), aborted (the stream was cut after the server accepted it) or
refused (no ready endpoint, connection refused/reset before a response, HTTP 5xx).

`spotguard-sim router ...` runs both against a cluster and writes the records as JSON
(`add_router_arguments` / `run_router_from_args`).
"""

from __future__ import annotations

import argparse
import asyncio
import enum
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

import aiohttp
import structlog

from spotguard.kubeapi import KubeError, ListWatch, Obj
from spotguard_sim.support import USER_AGENT, quantile

log = structlog.get_logger("spotguard_sim.router")

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
WATCH_TIMEOUT_SECONDS = 60
Clock = Callable[[], float]


# ---------------------------------------------------------------------------------------------
# Endpoints


@dataclass(frozen=True)
class Endpoint:
    """One address:port of the Service, as an EndpointSlice lists it."""

    address: str
    port: int
    pod: str | None = None
    pod_uid: str | None = None
    node: str | None = None
    ready: bool = True
    serving: bool | None = None
    terminating: bool | None = None

    @property
    def key(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.key}"


@dataclass(frozen=True)
class EndpointChange:
    """An endpoint appeared, changed readiness, or went away (`ready` None) at wall-clock `at`."""

    at: float
    address: str
    port: int
    pod: str | None
    ready: bool | None


def endpoints_of_slice(endpoint_slice: Obj, *, port_name: str | None = None,
                       port: int | None = None) -> list[Endpoint]:
    """The endpoints of one EndpointSlice on the chosen port.

    The port is `port` when given; else the slice's port named `port_name`; else its first port.
    A slice without that port contributes nothing (the Service does not route there either).
    """
    chosen = port
    if chosen is None:
        for entry in endpoint_slice.get("ports") or []:
            if entry.get("port") is None:
                continue
            if port_name is None or entry.get("name") == port_name:
                chosen = int(entry["port"])
                break
    if chosen is None:
        return []
    found = []
    for endpoint in endpoint_slice.get("endpoints") or []:
        addresses = endpoint.get("addresses") or []
        if not addresses:
            continue
        conditions = endpoint.get("conditions") or {}
        target = endpoint.get("targetRef") or {}
        pod = target.get("name") if target.get("kind", "Pod") == "Pod" else None
        found.append(Endpoint(
            address=addresses[0], port=chosen, pod=pod, pod_uid=target.get("uid"),
            node=endpoint.get("nodeName"),
            # Absent "ready" means ready, per the EndpointSlice API; serving/terminating are kept as given.
            ready=conditions.get("ready") is not False,
            serving=conditions.get("serving"), terminating=conditions.get("terminating")))
    return found


class EndpointSource(Protocol):
    def next_endpoint(self) -> Endpoint | None:
        """The endpoint the next request goes to, or None when there is none to send to."""


class _RoundRobin:
    def __init__(self) -> None:
        self._turn = 0

    def pick(self, ready: tuple[Endpoint, ...]) -> Endpoint | None:
        if not ready:
            return None
        chosen = ready[self._turn % len(ready)]
        self._turn += 1
        return chosen


class StaticEndpoints:
    """A fixed endpoint list (round-robin over its ready ones), for runs without a Service."""

    def __init__(self, endpoints: Iterable[Endpoint]) -> None:
        self.endpoints = tuple(endpoints)
        self._round_robin = _RoundRobin()

    def next_endpoint(self) -> Endpoint | None:
        return self._round_robin.pick(tuple(e for e in self.endpoints if e.ready))


class EndpointTracker:
    """The ready endpoints of one Service, followed through its EndpointSlices; round-robin routing.

    `start()` begins the list + watch (use `async with`, or `await stop()`); `wait_synced()` waits
    for the first list. `changes` records every appearance, readiness change and removal with the
    wall-clock time the tracker saw it; `on_change` (optional) is called with each one.
    """

    def __init__(self, api_client: Any, *, namespace: str, service: str, port_name: str | None = None,
                 port: int | None = None, clock: Clock = time.time,
                 on_change: Callable[[EndpointChange], None] | None = None) -> None:
        self.namespace = namespace
        self.service = service
        self.port_name = port_name
        self.port = port
        self.clock = clock
        self.on_change = on_change
        self.changes: list[EndpointChange] = []
        self._slices: dict[str, list[Endpoint]] = {}
        self._endpoints: dict[str, Endpoint] = {}
        self._ready: tuple[Endpoint, ...] = ()
        self._round_robin = _RoundRobin()
        self._changed = asyncio.Event()
        self.watch = ListWatch(
            api_client, f"/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices",
            query={"labelSelector": f"{SERVICE_NAME_LABEL}={service}"},
            on_sync=self._on_sync, on_event=self._on_event, name=f"endpointslices/{namespace}/{service}",
            user_agent=USER_AGENT)

    async def __aenter__(self) -> EndpointTracker:
        self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.stop()

    def start(self) -> None:
        self.watch.start()

    async def stop(self) -> None:
        await self.watch.stop()

    async def wait_synced(self, timeout: float = 30.0) -> None:
        async with asyncio.timeout(timeout):
            await self.watch.synced.wait()

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        """Every endpoint the slices list, ready or not, in routing order."""
        return tuple(sorted(self._endpoints.values(), key=_order))

    @property
    def ready_endpoints(self) -> tuple[Endpoint, ...]:
        return self._ready

    def ready_pods(self) -> set[str]:
        return {e.pod for e in self._ready if e.pod}

    def next_endpoint(self) -> Endpoint | None:
        return self._round_robin.pick(self._ready)

    def last_change(self, pod: str, *, ready: bool | None) -> EndpointChange | None:
        """The latest recorded change of this pod's endpoint to `ready` (None: removal)."""
        for change in reversed(self.changes):
            if change.pod == pod and change.ready is ready:
                return change
        return None

    async def wait_for(self, predicate: Callable[[EndpointTracker], bool], *, timeout: float) -> None:
        """Wait until `predicate(tracker)` holds (checked now and after every change)."""
        async with asyncio.timeout(timeout):
            while not predicate(self):
                changed = self._changed
                await changed.wait()

    # -- applying what the watch saw ---------------------------------------------------------

    def _on_sync(self, items: list[Obj]) -> None:
        self._slices = {s["metadata"]["name"]: self._parse(s) for s in items}
        self._recompute()

    def _on_event(self, kind: str, endpoint_slice: Obj) -> None:
        name = endpoint_slice["metadata"]["name"]
        if kind == "DELETED":
            self._slices.pop(name, None)
        else:
            self._slices[name] = self._parse(endpoint_slice)
        self._recompute()

    def _parse(self, endpoint_slice: Obj) -> list[Endpoint]:
        return endpoints_of_slice(endpoint_slice, port_name=self.port_name, port=self.port)

    def _recompute(self) -> None:
        merged: dict[str, Endpoint] = {}
        for endpoints in self._slices.values():
            for endpoint in endpoints:
                # The same address in two slices (a slice being rebalanced): ready if either says so.
                known = merged.get(endpoint.key)
                if known is None or (endpoint.ready and not known.ready):
                    merged[endpoint.key] = endpoint
        now = self.clock()
        changes = []
        for key, endpoint in merged.items():
            before = self._endpoints.get(key)
            if before is None or before.ready != endpoint.ready or before.pod != endpoint.pod:
                changes.append(EndpointChange(at=now, address=endpoint.address, port=endpoint.port,
                                              pod=endpoint.pod, ready=endpoint.ready))
        for key, endpoint in self._endpoints.items():
            if key not in merged:
                changes.append(EndpointChange(at=now, address=endpoint.address, port=endpoint.port,
                                              pod=endpoint.pod, ready=None))
        self._endpoints = merged
        self._ready = tuple(sorted((e for e in merged.values() if e.ready), key=_order))
        for change in changes:
            self.changes.append(change)
            log.info("endpoint_changed", service=self.service, pod=change.pod,
                     endpoint=f"{change.address}:{change.port}",
                     ready={True: "true", False: "false", None: "removed"}[change.ready])
            if self.on_change is not None:
                self.on_change(change)
        # Wake every waiter; the next waiter gets a fresh event.
        self._changed.set()
        self._changed = asyncio.Event()


def _order(endpoint: Endpoint) -> tuple[str, str, int]:
    return (endpoint.pod or "", endpoint.address, endpoint.port)


# ---------------------------------------------------------------------------------------------
# Load


class Outcome(str, enum.Enum):
    COMPLETED = "completed"  # the whole answer: a normal finish_reason ("length"/"stop"), then data: [DONE]
    # The server accepted it (HTTP 200) but the answer is not whole: the stream was cut, went silent,
    # ended with finish_reason "abort" (vLLM's engine abort, still followed by [DONE]) or an error event.
    ABORTED = "aborted"
    REFUSED = "refused"  # never served: no ready endpoint, connection refused/reset, HTTP 5xx
    ERROR = "error"  # HTTP 4xx: the request itself was wrong (a load-generator bug, not a loss)
    CANCELLED = "cancelled"  # the load generator was stopped before the request ended


LOST_OUTCOMES = (Outcome.ABORTED, Outcome.REFUSED)
# The answer is whole: it reached max_tokens, or the model stopped by itself.
NORMAL_FINISH_REASONS = ("length", "stop")


class _StreamEnd:
    """Reads an SSE stream as it arrives and keeps what decides its outcome: the finish_reason of
    the choice, an error event, and the closing `data: [DONE]`. Token events (finish_reason null)
    are skipped without decoding them."""

    def __init__(self) -> None:
        self._buffer = b""
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.done = False

    def feed(self, chunk: bytes) -> None:
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                self.done = True
            elif b'"finish_reason":null' not in payload.replace(b" ", b"") or b'"error"' in payload:
                self._decode(payload)

    def _decode(self, payload: bytes) -> None:
        try:
            event = json.loads(payload)
        except ValueError:
            return
        if not isinstance(event, dict):
            return
        if event.get("error") is not None:
            error = event["error"]
            self.error = str(error.get("message") if isinstance(error, dict) else error)[:200]
        for choice in event.get("choices") or []:
            if isinstance(choice, dict) and choice.get("finish_reason") is not None:
                self.finish_reason = str(choice["finish_reason"])


@dataclass(frozen=True)
class DurationDistribution:
    """Request durations: a lognormal (median `median_s`, log-sd `sigma`) clipped to [min_s, max_s].

    The defaults give most requests under 10 s and a tail up to 25 s: median 4 s, 87% under 10 s,
    about 1% clipped at 25 s - the shape of chat completions behind a gateway.
    """

    median_s: float = 4.0
    sigma: float = 0.8
    min_s: float = 0.5
    max_s: float = 25.0

    def __post_init__(self) -> None:
        if not 0 < self.min_s <= self.median_s <= self.max_s:
            raise ValueError("durations need 0 < min <= median <= max seconds")
        if self.sigma < 0:
            raise ValueError("sigma must not be negative")

    def sample(self, rng: random.Random) -> float:
        drawn = rng.lognormvariate(math.log(self.median_s), self.sigma) if self.sigma else self.median_s
        return min(max(drawn, self.min_s), self.max_s)

    def fraction_below(self, seconds: float) -> float:
        """P(duration <= seconds), from the distribution itself (not from a sample)."""
        if seconds < self.min_s:
            return 0.0
        if seconds >= self.max_s:
            return 1.0
        if self.sigma == 0:
            return 1.0 if seconds >= self.median_s else 0.0
        z = (math.log(seconds) - math.log(self.median_s)) / self.sigma
        return 0.5 * (1 + math.erf(z / math.sqrt(2)))

    def describe(self) -> str:
        return (f"lognormal(median {self.median_s:g} s, sigma {self.sigma:g}) clipped to "
                f"[{self.min_s:g}, {self.max_s:g}] s; {self.fraction_below(10.0):.0%} under 10 s")


@dataclass(slots=True)
class RequestRecord:
    """One request, from the moment it was sent. Times are wall-clock seconds (the `clock`)."""

    id: int
    intended_s: float
    max_tokens: int
    token_interval: float
    start: float
    endpoint: str | None = None
    pod: str | None = None
    status: int | None = None
    first_token: float | None = None
    end: float | None = None
    outcome: Outcome | None = None
    reason: str | None = None
    # The finish_reason the stream ended with (None: it ended without one).
    finish_reason: str | None = None

    @property
    def lost(self) -> bool:
        return self.outcome in LOST_OUTCOMES

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["outcome"] = self.outcome.value if self.outcome else None
        return data


class LoadGenerator:
    """Streaming completions at a steady rate to whatever `endpoints.next_endpoint()` picks.

    Open loop: request i is sent at start + i / rate whatever happened to earlier ones, as users'
    traffic does. Each request's duration comes from `durations` with a seeded RNG (the same seed
    gives the same sequence of durations), and is made exact by `max_tokens` x `sim_token_interval`
    with an interval near `token_interval`. One aiohttp session (unlimited connections) carries
    every stream, reusing idle keep-alive connections unless `new_connection_per_request` (through a
    Service's ClusterIP, kube-proxy balances connections, not requests: a reused connection stays
    with the pod it first reached, in or out of the endpoints); the client reads the SSE events and decodes only those that end the
    answer (a non-null finish_reason, an error, `[DONE]`), so hundreds of concurrent streams cost
    little. A request counts as completed only when its answer is whole: a normal finish_reason
    ("length" or "stop") followed by `[DONE]`. vLLM ends an aborted stream with finish_reason
    "abort" and `[DONE]` too: that is a lost request, not a served one.
    """

    def __init__(self, endpoints: EndpointSource, *, rate: float, duration: float,
                 durations: DurationDistribution = DurationDistribution(), seed: int = 0,
                 token_interval: float = 0.1, model: str | None = None, path: str = "/v1/completions",
                 session: aiohttp.ClientSession | None = None, clock: Clock = time.time,
                 connect_timeout: float = 2.0, timeout_slack: float = 30.0,
                 new_connection_per_request: bool = False,
                 on_record: Callable[[RequestRecord], None] | None = None) -> None:
        if rate <= 0 or duration < 0:
            raise ValueError("rate must be > 0 requests/s and duration >= 0 s")
        if token_interval <= 0:
            raise ValueError("token_interval must be > 0 s")
        self.endpoints = endpoints
        self.rate = rate
        self.duration = duration
        self.durations = durations
        self.seed = seed
        self.token_interval = token_interval
        self.model = model
        self.path = path
        self.clock = clock
        self.connect_timeout = connect_timeout
        self.timeout_slack = timeout_slack
        self.new_connection_per_request = new_connection_per_request
        self.on_record = on_record
        self.records: list[RequestRecord] = []
        self._rng = random.Random(seed)
        self._session = session
        self._own_session = session is None
        self._tasks: set[asyncio.Task[RequestRecord]] = set()
        self._sender: asyncio.Task[None] | None = None

    # -- running -----------------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        """Send for `duration`, wait for every request to end, return `summary()`."""
        self.start()
        try:
            await self.wait()
        finally:
            await self.stop()
        return self.summary()

    def start(self) -> None:
        """Begin sending in the background; `stop()` (or `run()`) ends it."""
        if self._sender is not None:
            raise RuntimeError("the load generator is already running")
        self._sender = asyncio.create_task(self._send_steadily(), name="load-sender")

    async def wait(self) -> None:
        """Until sending is over and every request sent has ended."""
        if self._sender is not None:
            try:
                await asyncio.shield(self._sender)
            except asyncio.CancelledError:
                if not self._sender.cancelled():  # we were cancelled, not the sender (by stop())
                    raise
        while self._tasks:
            await asyncio.wait(set(self._tasks))

    async def stop(self, *, drain: bool = True, timeout: float | None = None) -> None:
        """Stop sending; let in-flight requests end (`drain`, bounded by `timeout`), cancel the rest."""
        if self._sender is not None and not self._sender.done():
            self._sender.cancel()
            try:
                await self._sender
            except asyncio.CancelledError:
                pass
        if drain and self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks))
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    async def request(self, intended_s: float | None = None) -> RequestRecord:
        """Send one request now (duration drawn, or `intended_s`) and return its record once it ends."""
        return await self._spawn(intended_s)

    def _spawn(self, intended_s: float | None = None) -> asyncio.Task[RequestRecord]:
        intended = self.durations.sample(self._rng) if intended_s is None else intended_s
        tokens = max(1, round(intended / self.token_interval))
        record = RequestRecord(id=len(self.records), intended_s=round(intended, 3), max_tokens=tokens,
                               token_interval=intended / tokens, start=self.clock())
        self.records.append(record)
        task = asyncio.create_task(self._send(record), name=f"request-{record.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _send_steadily(self) -> None:
        loop = asyncio.get_running_loop()
        began = loop.time()
        log.info("load_started", rate=self.rate, duration_s=self.duration, seed=self.seed,
                 durations=self.durations.describe())
        index = 0
        while index / self.rate < self.duration:
            delay = began + index / self.rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            self._spawn()
            index += 1
        log.info("load_sent", requests=index)

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            # limit=0: no cap on connections, so hundreds of streams never queue client-side.
            connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, force_close=self.new_connection_per_request)
            self._session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None))
        return self._session

    async def _send(self, record: RequestRecord) -> RequestRecord:
        endpoint = self.endpoints.next_endpoint()
        record.start = self.clock()
        if endpoint is None:
            return self._end(record, Outcome.REFUSED, "no_endpoint")
        record.endpoint = endpoint.key
        record.pod = endpoint.pod
        # ignore_eos: real vLLM generates exactly max_tokens; sim_token_interval paces the fake.
        body: dict[str, Any] = {"prompt": "spotguard load", "stream": True, "max_tokens": record.max_tokens,
                                "ignore_eos": True, "sim_token_interval": record.token_interval}
        if self.model is not None:
            body["model"] = self.model
        timeout = aiohttp.ClientTimeout(total=record.intended_s + self.timeout_slack,
                                        sock_connect=self.connect_timeout)
        accepted = False
        events = _StreamEnd()
        try:
            async with self._client().post(endpoint.url + self.path, json=body, timeout=timeout) as response:
                record.status = response.status
                if response.status != 200:
                    outcome = Outcome.REFUSED if response.status >= 500 else Outcome.ERROR
                    return self._end(record, outcome, f"http_{response.status}")
                accepted = True
                async for chunk in response.content.iter_any():
                    if record.first_token is None:
                        record.first_token = self.clock()
                    events.feed(chunk)
            return self._end_stream(record, events)
        except asyncio.CancelledError:
            self._end(record, Outcome.CANCELLED, "load_generator_stopped")
            raise
        except aiohttp.ClientConnectorError as error:
            return self._end(record, Outcome.REFUSED, _connect_reason(error))
        except (TimeoutError, aiohttp.ClientError, OSError) as error:
            if events.done:  # everything arrived; only the connection's close went wrong
                return self._end_stream(record, events)
            reason = "timeout" if isinstance(error, TimeoutError) else type(error).__name__
            return self._end(record, Outcome.ABORTED if accepted else Outcome.REFUSED, reason)

    def _end_stream(self, record: RequestRecord, events: _StreamEnd) -> RequestRecord:
        record.finish_reason = events.finish_reason
        if events.error is not None:
            return self._end(record, Outcome.ABORTED, f"error_event: {events.error}")
        if not events.done:
            return self._end(record, Outcome.ABORTED, "stream_ended_without_done")
        if events.finish_reason not in NORMAL_FINISH_REASONS:
            return self._end(record, Outcome.ABORTED, f"finish_reason_{events.finish_reason}")
        return self._end(record, Outcome.COMPLETED, "done")

    def _end(self, record: RequestRecord, outcome: Outcome, reason: str) -> RequestRecord:
        record.end = self.clock()
        record.outcome = outcome
        record.reason = reason
        if outcome is not Outcome.COMPLETED:
            log.info("request_not_completed", id=record.id, outcome=outcome.value, reason=reason,
                     pod=record.pod, endpoint=record.endpoint, intended_s=record.intended_s)
        if self.on_record is not None:
            self.on_record(record)
        return record

    # -- results -----------------------------------------------------------------------------

    def lost(self, budget_s: float | None = None) -> list[RequestRecord]:
        """Aborted + refused requests whose intended duration fits `budget_s` (None: all of them)."""
        return [r for r in self.records
                if r.lost and (budget_s is None or r.intended_s <= budget_s)]

    def in_flight_at(self, at: float) -> int:
        """Requests an endpoint was serving at wall-clock time `at` (sent before, ended after)."""
        return sum(1 for r in self.records
                   if r.endpoint is not None and r.outcome is not Outcome.REFUSED
                   and r.start <= at and (r.end is None or r.end > at))

    def summary(self, *, budget_s: float | None = None) -> dict[str, Any]:
        counts = {outcome.value: 0 for outcome in Outcome}
        by_pod: dict[str, dict[str, int]] = {}
        unfinished = 0
        for record in self.records:
            if record.outcome is None:
                unfinished += 1
                continue
            counts[record.outcome.value] += 1
            pod = by_pod.setdefault(record.pod or "(none)", {})
            pod[record.outcome.value] = pod.get(record.outcome.value, 0) + 1
        intended = sorted(r.intended_s for r in self.records)
        return {"requests": len(self.records), **counts, "unfinished": unfinished,
                "lost": len(self.lost(budget_s)), "lost_budget_s": budget_s, "by_pod": by_pod,
                "rate_rps": self.rate, "duration_s": self.duration, "seed": self.seed,
                "durations": self.durations.describe(),
                "intended_s": {"p50": quantile(intended, 0.5), "p90": quantile(intended, 0.9),
                               "max": intended[-1] if intended else None}}

    def report(self, *, budget_s: float | None = None) -> dict[str, Any]:
        """summary() plus every request's record, as plain JSON-ready data."""
        return {"summary": self.summary(budget_s=budget_s),
                "requests": [record.as_dict() for record in self.records]}


def _connect_reason(error: aiohttp.ClientConnectorError) -> str:
    if isinstance(error.os_error, ConnectionRefusedError):
        return "connection_refused"
    return f"connect_error:{type(error.os_error).__name__}"


# ---------------------------------------------------------------------------------------------
# `spotguard-sim router`


def add_router_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `spotguard-sim router`."""
    parser.add_argument("--kubeconfig", type=Path, default=None,
                        help="kubeconfig of the cluster (default: $KUBECONFIG)")
    parser.add_argument("--namespace", default="default", help="namespace of the Service (default default)")
    parser.add_argument("--service", required=True, help="the Service whose EndpointSlices are followed")
    parser.add_argument("--port-name", default=None,
                        help="use the EndpointSlice port of this name (default: the slice's first port)")
    parser.add_argument("--port", type=int, default=None, help="send to this port instead of the slice's")
    parser.add_argument("--rate", type=float, default=2.0, help="requests per second (default 2)")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds to send for (default 60)")
    parser.add_argument("--out", type=Path, default=None, help="write the summary and every request as JSON here")
    parser.add_argument("--seed", type=int, default=0, help="RNG seed of the request durations (default 0)")
    parser.add_argument("--token-interval", type=float, default=0.1,
                        help="about this many seconds per streamed token (default 0.1)")
    defaults = DurationDistribution()
    parser.add_argument("--median", type=float, default=defaults.median_s,
                        help=f"median request duration, s (default {defaults.median_s:g})")
    parser.add_argument("--sigma", type=float, default=defaults.sigma,
                        help=f"log-sd of the lognormal durations (default {defaults.sigma:g})")
    parser.add_argument("--min", dest="min_s", type=float, default=defaults.min_s,
                        help=f"shortest request, s (default {defaults.min_s:g})")
    parser.add_argument("--max", dest="max_s", type=float, default=defaults.max_s,
                        help=f"longest request, s (default {defaults.max_s:g})")
    parser.add_argument("--budget", type=float, default=None,
                        help="count as lost only aborted/refused requests at most this long (default: all)")
    parser.add_argument("--wait-ready", type=float, default=30.0,
                        help="wait up to this long for a ready endpoint before sending (default 30)")


def run_router_from_args(args: argparse.Namespace) -> int:
    """0 when the run finished (whatever the requests' outcomes), 2 on bad flags, 1 on errors."""
    from spotguard.observability import configure_logging

    configure_logging(level="info")
    kubeconfig = args.kubeconfig or (Path(os.environ["KUBECONFIG"]) if os.environ.get("KUBECONFIG") else None)
    if kubeconfig is None:
        print("spotguard-sim router: give --kubeconfig or set KUBECONFIG", file=sys.stderr)
        return 2
    try:
        durations = DurationDistribution(median_s=args.median, sigma=args.sigma, min_s=args.min_s,
                                         max_s=args.max_s)
        report = run_router(kubeconfig=kubeconfig, namespace=args.namespace, service=args.service,
                            rate=args.rate, duration=args.duration, out=args.out, seed=args.seed,
                            port_name=args.port_name, port=args.port, token_interval=args.token_interval,
                            durations=durations, budget_s=args.budget, wait_ready=args.wait_ready)
    except ValueError as error:
        print(f"spotguard-sim router: {error}", file=sys.stderr)
        return 2
    except (OSError, KubeError) as error:
        print(f"spotguard-sim router: error: {error}", file=sys.stderr)
        return 1
    print(json.dumps({k: v for k, v in report["summary"].items() if k != "by_pod"}))
    return 0


def run_router(*, kubeconfig: Path, namespace: str, service: str, rate: float, duration: float,
               out: Path | None = None, seed: int = 0, port_name: str | None = None, port: int | None = None,
               token_interval: float = 0.1, durations: DurationDistribution = DurationDistribution(),
               budget_s: float | None = None, wait_ready: float = 30.0) -> dict[str, Any]:
    """Follow the Service, send load for `duration` (SIGINT/SIGTERM end it early), write `out`.

    Returns the report: {"summary": ..., "endpoint_changes": [...], "requests": [...]}.
    """
    from kubernetes import config

    if not Path(kubeconfig).exists():
        raise OSError(f"kubeconfig {kubeconfig} does not exist (is the cluster up?)")
    api_client = config.new_client_from_config(config_file=str(kubeconfig))
    try:
        return asyncio.run(_run_router(api_client, namespace=namespace, service=service, rate=rate,
                                       duration=duration, out=out, seed=seed, port_name=port_name, port=port,
                                       token_interval=token_interval, durations=durations, budget_s=budget_s,
                                       wait_ready=wait_ready))
    finally:
        api_client.close()


async def _run_router(api_client: Any, *, namespace: str, service: str, rate: float, duration: float,
                      out: Path | None, seed: int, port_name: str | None, port: int | None,
                      token_interval: float, durations: DurationDistribution, budget_s: float | None,
                      wait_ready: float) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    tracker = EndpointTracker(api_client, namespace=namespace, service=service, port_name=port_name, port=port)
    generator = LoadGenerator(tracker, rate=rate, duration=duration, durations=durations, seed=seed,
                              token_interval=token_interval)
    stopping = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    try:
        async with tracker:
            await tracker.wait_synced()
            try:
                await tracker.wait_for(lambda t: bool(t.ready_endpoints), timeout=wait_ready)
            except TimeoutError:
                log.warning("no_ready_endpoint", service=service, waited_s=wait_ready)
            generator.start()
            waiting = asyncio.create_task(generator.wait())
            stop = asyncio.create_task(stopping.wait())
            await asyncio.wait({waiting, stop}, return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            if not waiting.done():
                # Interrupted: stop sending, give the streams in flight a few seconds, cancel the rest.
                log.info("router_interrupted", in_flight=sum(r.outcome is None for r in generator.records))
                waiting.cancel()
            await generator.stop(drain=True, timeout=5.0)
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
    report = {"namespace": namespace, "service": service, **generator.report(budget_s=budget_s),
              "endpoint_changes": [asdict(change) for change in tracker.changes]}
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1))
        log.info("router_report_written", path=str(out))
    return report

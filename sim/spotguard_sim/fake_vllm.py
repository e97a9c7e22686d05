"""A fake vLLM OpenAI-compatible server: what spotguard drains, without a GPU.

Every behaviour below is real vLLM 0.32.0's, as recorded on this machine and traced to vLLM's
source in docs/real-vllm-facts.md; tests/sim/test_vllm_conformance.py drives the same scenarios
against this fake and against real vLLM and asserts they look the same from outside.

- `POST /v1/completions` and `/v1/chat/completions`, streaming (SSE chunks in OpenAI's format,
  `data: [DONE]` last) or not. A request makes `max_tokens` tokens, one every `token_interval`
  seconds (the extra body field `sim_token_interval` overrides it per request, so a load generator
  can draw durations); `ignore_eos` is accepted. A request is first rendered and tokenized
  (`--preprocess-seconds`) without being counted anywhere, then waits for a batch slot
  (`--max-num-seqs` per engine), then runs.
- `GET /metrics`: vLLM's own series, names and labels (`model_name`, `engine`, one child per
  data-parallel engine), updated once per engine step (`--step-seconds`) as vLLM's scheduler
  publishes them, plus the process's `python_*` series. `vllm:prompt_tokens_total` grows when a
  prefill ends. A client that disconnects is not counted as `abort`; an abort by the engine is.
  `--disable-log-stats`: `/metrics` answers, without any `vllm:` series.
- `GET /health`: 200 whenever the server listens (while the model loads it does not listen at all).
- SIGTERM, as vLLM's `serve_http` handles it (a second signal is ignored):
  - default (`--shutdown-timeout 0`): the engine aborts every request; each stream gets a final
    chunk with `finish_reason: "abort"` and `data: [DONE]`, the connections and the listener close,
    the process exits 0 within a second. Real vLLM loses that race now and then (its EngineCore is
    killed before the aborts get out): `--abort-style silent` plays that outcome, where the streams
    go silent, the listener closes, and the process lingers until the clients disconnect.
  - `--shutdown-timeout N` (whole seconds): in-flight requests go on; a new request gets HTTP 500
    "cannot schedule new futures after shutdown"; `/health` stays 200. Streams that end in time end
    normally, and the server still stays up until N s after the signal (the CPU build's worker
    teardown, see the facts page). Streams still running at N go silent, the listener closes, and
    the process lingers until their clients disconnect.
  After an engine abort the gauges stay frozen at their last values (no engine step runs again).
- `--stale-gauges-after-abort` plays vllm-project/vllm#22545: when every request was aborted by its
  client, the gauges keep the aborted requests (no final engine step). The engine-step counter
  (`vllm:iteration_tokens_total`) does not move then: spotguard's drain reads that.
- `--ignore-sigterm` plays a server that does not handle SIGTERM at all (fault-injection tests).

Use it as a class in tests (`FakeVllm`) or as a process (`python -m spotguard_sim.fake_vllm
--listen HOST:PORT`, or `spotguard-sim vllm`).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import signal
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector

from spotguard.observability import configure_logging

log = structlog.get_logger("spotguard_sim.fake_vllm")

DEFAULT_MODEL = "sim/fake-llm"
DEFAULT_TOKEN_INTERVAL = 0.02
DEFAULT_MAX_TOKENS = 16
DEFAULT_MAX_NUM_SEQS = 256
DEFAULT_STEP_SECONDS = 0.02
DEFAULT_PREPROCESS_SECONDS = 0.005
MAX_MODEL_LEN = 65536
# vLLM's finish reasons (vllm/v1/engine/__init__.py FinishReason), the `finished_reason` label.
FINISH_REASONS = ("stop", "length", "abort", "error", "repetition")
WAITING_REASONS = ("capacity", "deferred")
# What a request sent during a drain gets (vLLM's renderer pool is already shut down).
DRAIN_REFUSAL = {"error": {"message": "cannot schedule new futures after shutdown", "type": "InternalServerError",
                           "param": None, "code": 500}}
# Where a handler keeps the response it wrote (a stream or a whole reply), to hand it back to aiohttp.
RESPONSE = web.RequestKey("fake_vllm_response", web.StreamResponse)
# vLLM closes its listener this long after the engine stopped (measured 0.1-0.3 s).
LISTENER_CLOSE_SECONDS = 0.1
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                    120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
_ITERATION_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
_WORDS = (" the", " quick", " brown", " fox", " jumps", " over", " a", " lazy", " dog", ".")


def token_text(index: int) -> str:
    """The text of the index-th generated token (deterministic, so tests can check content)."""
    return _WORDS[index % len(_WORDS)]


class _VllmSeries:
    """vLLM's metric names, types and labels, on a registry of their own (never the global one)."""

    def __init__(self, *, model: str, engines: int, log_stats: bool) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # vLLM serves prometheus_client's global registry, which has these too.
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.log_stats = log_stats
        # Without stats vLLM never creates its logger: the series are kept off the registry.
        r = self.registry if log_stats else CollectorRegistry()
        labels = ["model_name", "engine"]
        self.running = Gauge("vllm:num_requests_running", "Number of requests in model execution batches.",
                             labels, registry=r)
        self.waiting = Gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.",
                             labels, registry=r)
        self.waiting_by_reason = Gauge("vllm:num_requests_waiting_by_reason",
                                       "Number of requests waiting, by reason.", labels + ["reason"], registry=r)
        self.kv_cache_usage = Gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
                                    labels, registry=r)
        self.request_success = Counter("vllm:request_success_total", "Count of successfully processed requests.",
                                       labels + ["finished_reason"], registry=r)
        self.prompt_tokens = Counter("vllm:prompt_tokens_total", "Number of prefill tokens processed.",
                                     labels, registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens_total", "Number of generation tokens processed.",
                                         labels, registry=r)
        self.iteration_tokens = Histogram("vllm:iteration_tokens_total", "Histogram of number of tokens per engine_step.",
                                          labels, buckets=_ITERATION_BUCKETS, registry=r)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                              labels, buckets=_TTFT_BUCKETS, registry=r)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                             labels, buckets=_LATENCY_BUCKETS, registry=r)
        for engine in range(engines):
            key = {"model_name": model, "engine": str(engine)}
            for gauge in (self.running, self.waiting, self.kv_cache_usage):
                gauge.labels(**key).set(0)
            for reason in WAITING_REASONS:
                self.waiting_by_reason.labels(**key, reason=reason).set(0)
            for reason in FINISH_REASONS:
                self.request_success.labels(**key, finished_reason=reason)
            for metric in (self.prompt_tokens, self.generation_tokens, self.iteration_tokens, self.ttft, self.e2e):
                metric.labels(**key)


@dataclass(eq=False)
class _Request:
    engine: _Engine
    arrival: float
    prompt_tokens: int
    state: str = "waiting"  # waiting -> running -> finished
    # Set by the engine when it aborts the request (a shutdown), or stops it without a word.
    aborted: asyncio.Event = field(default_factory=asyncio.Event)
    silenced: bool = False
    admission: asyncio.Future[bool] | None = None
    first_token_at: float | None = None


class _Engine:
    """One data-parallel engine: its batch slots, its queue, and its step loop, which publishes the
    gauges once per step while it has requests (and one last time after they are gone)."""

    def __init__(self, index: int, *, max_num_seqs: int, series: _VllmSeries, model: str, step_seconds: float,
                 stale_after_client_abort: bool) -> None:
        self.index = index
        self.max_num_seqs = max_num_seqs
        self.series = series
        self.labels = {"model_name": model, "engine": str(index)}
        self.step_seconds = step_seconds
        self.stale_after_client_abort = stale_after_client_abort
        self.running: set[_Request] = set()
        self.waiting: collections.deque[_Request] = collections.deque()
        self.tokens_since_step = 0
        self.final_step_due = False
        self.dead = False  # stopped by a shutdown: no step will ever publish again
        self.wake = asyncio.Event()

    def add(self, req: _Request) -> None:
        self.waiting.append(req)
        self.wake.set()

    async def admit(self, req: _Request) -> bool:
        """Wait for a batch slot; False when the request was aborted while it waited."""
        if len(self.running) < self.max_num_seqs and self.waiting and self.waiting[0] is req:
            self._run(req)
            return True
        req.admission = asyncio.get_running_loop().create_future()
        return await req.admission

    def _run(self, req: _Request) -> None:
        self.waiting.remove(req)
        self.running.add(req)
        req.state = "running"

    def remove(self, req: _Request, *, by_client: bool) -> None:
        if req.state == "running":
            self.running.discard(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        req.state = "finished"
        while self.waiting and len(self.running) < self.max_num_seqs:
            nxt = self.waiting[0]
            if nxt.admission is None:
                break  # it is about to ask for a slot itself
            self._run(nxt)
            if not nxt.admission.done():
                nxt.admission.set_result(True)
        # A finished or aborted request leaves the scheduler with one more step to run, which
        # publishes the new counts; #22545: not when every request was aborted by its client.
        if not (by_client and self.stale_after_client_abort and not (self.running or self.waiting)):
            self.final_step_due = True
        self.wake.set()

    async def loop(self) -> None:
        while not self.dead:
            if not (self.running or self.waiting or self.final_step_due):
                self.wake.clear()
                await self.wake.wait()
                continue
            self.final_step_due = False
            # A step publishes the counts it was scheduled with, when it ends.
            running, waiting = len(self.running), len(self.waiting)
            await asyncio.sleep(self.step_seconds)
            if not self.dead:
                self.publish(running, waiting)

    def publish(self, running: int, waiting: int) -> None:
        s = self.series
        s.running.labels(**self.labels).set(running)
        s.waiting.labels(**self.labels).set(waiting)
        s.waiting_by_reason.labels(**self.labels, reason="capacity").set(waiting)
        s.waiting_by_reason.labels(**self.labels, reason="deferred").set(0)
        # A stand-in for block usage: each running sequence holds an equal share of the cache.
        s.kv_cache_usage.labels(**self.labels).set(running / self.max_num_seqs)
        if running or self.tokens_since_step:
            s.iteration_tokens.labels(**self.labels).observe(max(self.tokens_since_step, running))
        self.tokens_since_step = 0


@dataclass(frozen=True)
class _Params:
    stream: bool
    max_tokens: int
    interval: float
    prompt_tokens: int
    include_usage: bool
    model: str | None


class FakeVllm:
    """One fake vLLM server on host:port (port 0 picks a free one; read `url` after start)."""

    def __init__(self, host: str, port: int, *, model: str = DEFAULT_MODEL,
                 token_interval: float = DEFAULT_TOKEN_INTERVAL, engines: int = 1,
                 shutdown_timeout: int = 0, max_num_seqs: int = DEFAULT_MAX_NUM_SEQS,
                 startup_delay: float = 0.0, step_seconds: float = DEFAULT_STEP_SECONDS,
                 preprocess_seconds: float = DEFAULT_PREPROCESS_SECONDS, log_stats: bool = True,
                 abort_style: str = "chunk", stale_gauges_after_abort: bool = False) -> None:
        if engines < 1 or max_num_seqs < 1:
            raise ValueError("engines and max_num_seqs must be at least 1")
        if isinstance(shutdown_timeout, bool) or not isinstance(shutdown_timeout, int) or shutdown_timeout < 0:
            raise ValueError("shutdown_timeout must be a whole number of seconds >= 0 (vLLM takes an int)")
        if min(token_interval, startup_delay, preprocess_seconds) < 0 or step_seconds <= 0:
            raise ValueError("token_interval, startup_delay and preprocess_seconds must not be negative, "
                             "step_seconds must be > 0")
        if abort_style not in ("chunk", "silent"):
            raise ValueError("abort_style must be chunk or silent")
        self.host = host
        self.port = port
        self.model = model
        self.token_interval = token_interval
        self.shutdown_timeout = shutdown_timeout
        self.startup_delay = startup_delay
        self.preprocess_seconds = preprocess_seconds
        self.abort_style = abort_style
        self._series = _VllmSeries(model=model, engines=engines, log_stats=log_stats)
        self._engines = [_Engine(i, max_num_seqs=max_num_seqs, series=self._series, model=model,
                                 step_seconds=step_seconds, stale_after_client_abort=stale_gauges_after_abort)
                         for i in range(engines)]
        self._handlers = 0  # HTTP requests being handled (open streams included)
        self._idle = asyncio.Event()
        self._idle.set()
        self._requests: set[_Request] = set()
        self._draining = False
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._created = int(time.time())

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def in_flight(self) -> int:
        """Requests the engines have (waiting or running), not counting any still being tokenized."""
        return sum(len(e.running) + len(e.waiting) for e in self._engines)

    @property
    def shutting_down(self) -> bool:
        return self._draining

    async def start(self) -> None:
        """Load the "model" (`startup_delay`: nothing listens meanwhile), then serve."""
        if self.startup_delay:
            await asyncio.sleep(self.startup_delay)
        app = web.Application()
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat_completions)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, self.host, self.port)
        await self._site.start()
        self.port = self._runner.addresses[0][1]
        self._tasks = [asyncio.create_task(engine.loop(), name=f"engine-{engine.index}") for engine in self._engines]
        log.info("fake_vllm_listening", url=self.url, model=self.model, engines=len(self._engines),
                 shutdown_timeout=self.shutdown_timeout, log_stats=self._series.log_stats)

    async def terminate(self) -> None:
        """What vLLM does on SIGTERM (see the module's docstring); returns when the process may exit."""
        loop = asyncio.get_running_loop()
        signalled = loop.time()
        self._draining = True
        if self.shutdown_timeout == 0:
            self._stop_engines(silently=self.abort_style == "silent")
        else:
            log.info("fake_vllm_draining", in_flight=self.in_flight, timeout=self.shutdown_timeout)
            deadline = signalled + self.shutdown_timeout
            while self._requests and loop.time() < deadline:
                await asyncio.sleep(min(0.05, max(0.0, deadline - loop.time())))
            if self._requests:
                log.info("fake_vllm_drain_timeout", still_in_flight=len(self._requests))
                self._stop_engines(silently=True)
            else:
                # The drain is over, but the CPU build waits for its worker until the deadline.
                await asyncio.sleep(max(0.0, deadline - loop.time()))
                self._stop_engines(silently=False)
        await asyncio.sleep(LISTENER_CLOSE_SECONDS)
        await self._close_listener()
        # Open connections are waited for without a limit, as uvicorn does (the kubelet's SIGKILL ends it).
        await self._idle.wait()
        await self.stop()

    def _stop_engines(self, *, silently: bool) -> None:
        """The engine is gone: its requests end (an abort chunk each) or just stop (silence)."""
        for engine in self._engines:
            engine.dead = True
            engine.wake.set()
        for req in list(self._requests):
            if silently:
                req.silenced = True
            else:
                self._series.request_success.labels(**req.engine.labels, finished_reason="abort").inc()
            req.aborted.set()
            if req.admission is not None and not req.admission.done():
                req.admission.set_result(False)

    async def _close_listener(self) -> None:
        if self._site is not None:
            await self._site.stop()
            self._site = None

    async def stop(self) -> None:
        """Close everything (what the end of the process does)."""
        self._stop_engines(silently=False)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._close_listener()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # --- HTTP handlers -------------------------------------------------------------------------

    async def _health(self, _: web.Request) -> web.Response:
        return web.Response(status=200)

    async def _metrics(self, _: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self._series.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _models(self, _: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{
            "id": self.model, "object": "model", "created": self._created, "owned_by": "vllm",
            "root": self.model, "parent": None, "max_model_len": MAX_MODEL_LEN}]})

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=False)

    async def _chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=True)

    async def _serve(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        self._handlers += 1
        self._idle.clear()
        try:
            if self._draining:
                return web.json_response(DRAIN_REFUSAL, status=500)
            try:
                body = await request.json()
            except ValueError:
                return _error(400, "The request body is not valid JSON.", "BadRequestError")
            try:
                params = _parse_params(body, chat=chat, default_interval=self.token_interval)
            except ValueError as exc:
                return _error(400, str(exc), "BadRequestError")
            if params.model is not None and params.model != self.model:
                return _error(404, f"The model `{params.model}` does not exist.", "NotFoundError")
            # Rendering and tokenizing: in flight, but no engine has it yet.
            await asyncio.sleep(self.preprocess_seconds)
            if self._draining:
                return web.json_response(DRAIN_REFUSAL, status=500)
            engine = min(self._engines, key=lambda e: (len(e.running) + len(e.waiting), e.index))
            req = _Request(engine=engine, arrival=asyncio.get_running_loop().time(),
                           prompt_tokens=params.prompt_tokens)
            self._requests.add(req)
            engine.add(req)
            by_client = True
            try:
                by_client = await self._generate(request, req, params, chat=chat)
            finally:
                self._requests.discard(req)
                engine.remove(req, by_client=by_client)
            # The response this handler wrote (a stream, or a whole reply); aiohttp wants it back.
            return request.get(RESPONSE) or web.Response(status=200)
        finally:
            self._handlers -= 1
            if self._handlers == 0:
                self._idle.set()

    async def _generate(self, request: web.Request, req: _Request, params: _Params, *, chat: bool) -> bool:
        """Serve one request; returns whether it ended by its client going away."""
        labels = req.engine.labels
        series = self._series
        chunks = _Chunks.for_request(self.model, chat)
        if not await req.engine.admit(req):
            return await self._end_aborted(request, req, None, chunks)
        stream: web.StreamResponse | None = None
        if params.stream:
            stream = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8",
                                                 "Cache-Control": "no-cache"})
            await stream.prepare(request)
            request[RESPONSE] = stream
            if chat and not await _send(stream, chunks.role()):
                return True
        text: list[str] = []
        for index in range(params.max_tokens):
            if await _aborted_within(req.aborted, params.interval):
                return await self._end_aborted(request, req, stream, chunks)
            if _client_gone(request):
                return True
            if req.first_token_at is None:
                req.first_token_at = asyncio.get_running_loop().time()
                series.ttft.labels(**labels).observe(req.first_token_at - req.arrival)
                series.prompt_tokens.labels(**labels).inc(params.prompt_tokens)  # the prefill is done
            series.generation_tokens.labels(**labels).inc()
            req.engine.tokens_since_step += 1
            piece = token_text(index)
            if stream is None:
                text.append(piece)
            elif not await _send(stream, chunks.token(piece)):
                return True
        series.request_success.labels(**labels, finished_reason="length").inc()
        series.e2e.labels(**labels).observe(asyncio.get_running_loop().time() - req.arrival)
        usage = {"prompt_tokens": params.prompt_tokens, "completion_tokens": params.max_tokens,
                 "total_tokens": params.prompt_tokens + params.max_tokens}
        if stream is None:
            await _reply(request, chunks.whole("".join(text), "length", usage))
            return False
        events = [chunks.finish("length")] + ([chunks.usage(usage)] if params.include_usage else [])
        for event in events:
            if not await _send(stream, event):
                return True
        await _finish_stream(stream)
        return False

    async def _end_aborted(self, request: web.Request, req: _Request, stream: web.StreamResponse | None,
                           chunks: _Chunks) -> bool:
        """The engine aborted the request: a final `abort` chunk and [DONE], then the connection
        closes; or, silenced, nothing more until the client gives up."""
        if req.silenced:
            while not _client_gone(request):
                await asyncio.sleep(0.1)
            return True
        if stream is None:
            await _reply(request, chunks.whole("", "abort", {"prompt_tokens": req.prompt_tokens,
                                                             "completion_tokens": 0,
                                                             "total_tokens": req.prompt_tokens}))
        else:
            await _send(stream, chunks.finish("abort"))
            await _finish_stream(stream)
        if request.transport is not None:
            request.transport.close()
        return False


async def _reply(request: web.Request, payload: dict[str, Any]) -> None:
    response = web.json_response(payload)
    await response.prepare(request)
    await response.write_eof()
    request[RESPONSE] = response


async def _finish_stream(stream: web.StreamResponse) -> None:
    try:
        await stream.write(b"data: [DONE]\n\n")
        await stream.write_eof()
    except ConnectionError:
        pass


async def _aborted_within(aborted: asyncio.Event, seconds: float) -> bool:
    """Sleep `seconds` (one token's time); True as soon as the request is aborted instead."""
    if aborted.is_set():
        return True
    try:
        async with asyncio.timeout(seconds):
            await aborted.wait()
    except TimeoutError:
        return False
    return True


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def _send(stream: web.StreamResponse, payload: dict[str, Any]) -> bool:
    """Write one SSE event; False when the client has gone."""
    try:
        await stream.write(b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n")
    except ConnectionError:
        return False
    return True


def _error(status: int, message: str, kind: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": kind, "param": None, "code": status}},
                             status=status)


@dataclass(frozen=True)
class _Chunks:
    """OpenAI's response shapes for completions and chat completions, as vLLM fills them."""

    request_id: str
    model: str
    created: int
    chat: bool

    @classmethod
    def for_request(cls, model: str, chat: bool) -> _Chunks:
        return cls(request_id=f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:16]}", model=model,
                   created=int(time.time()), chat=chat)

    def _envelope(self, choices: list[dict[str, Any]], *, whole: bool = False) -> dict[str, Any]:
        kind = ("chat.completion" if whole else "chat.completion.chunk") if self.chat else "text_completion"
        return {"id": self.request_id, "object": kind, "created": self.created, "model": self.model,
                "choices": choices}

    def role(self) -> dict[str, Any]:
        return self._envelope([{"index": 0, "delta": {"role": "assistant", "content": ""},
                                "logprobs": None, "finish_reason": None}])

    def token(self, piece: str) -> dict[str, Any]:
        if self.chat:
            choice = {"index": 0, "delta": {"content": piece}, "logprobs": None, "finish_reason": None}
        else:
            choice = {"index": 0, "text": piece, "logprobs": None, "finish_reason": None, "stop_reason": None}
        return self._envelope([choice])

    def finish(self, reason: str) -> dict[str, Any]:
        if self.chat:
            choice = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": "", "logprobs": None, "finish_reason": reason, "stop_reason": None}
        return self._envelope([choice])

    def usage(self, usage: dict[str, int]) -> dict[str, Any]:
        return {**self._envelope([]), "usage": usage}

    def whole(self, text: str, reason: str, usage: dict[str, int]) -> dict[str, Any]:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason, "stop_reason": None}
        return {**self._envelope([choice], whole=True), "usage": usage}


def _parse_params(body: Any, *, chat: bool, default_interval: float) -> _Params:
    if not isinstance(body, dict):
        raise ValueError("The request body must be a JSON object.")
    max_tokens = body.get("max_completion_tokens") if chat else None
    if max_tokens is None:
        max_tokens = body.get("max_tokens")
    if max_tokens is None:
        max_tokens = DEFAULT_MAX_TOKENS
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= MAX_MODEL_LEN:
        raise ValueError(f"max_tokens must be an integer from 1 to {MAX_MODEL_LEN}.")
    interval = body.get("sim_token_interval", default_interval)
    if isinstance(interval, bool) or not isinstance(interval, (int, float)) or not 0 <= interval <= 3600:
        raise ValueError("sim_token_interval must be a number of seconds from 0 to 3600.")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ValueError("stream must be true or false.")
    options = body.get("stream_options") or {}
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ValueError("model must be a string.")
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list.")
        words = sum(len(str(m.get("content", "")).split()) for m in messages if isinstance(m, dict))
    else:
        prompt = body.get("prompt", "")
        words = len(" ".join(prompt).split()) if isinstance(prompt, list) else len(str(prompt).split())
    return _Params(stream=stream, max_tokens=max_tokens, interval=float(interval),
                   prompt_tokens=max(words, 1), include_usage=include_usage, model=model)


# --- the process -------------------------------------------------------------------------------

def add_vllm_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `spotguard-sim vllm` (and of `python -m spotguard_sim.fake_vllm`); those vLLM has
    too are spelled and typed as vLLM does."""
    parser.add_argument("--listen", required=True, metavar="HOST:PORT",
                        help="address to serve on; port 0 picks a free one (logged at start)")
    parser.add_argument("--model", "--served-model-name", dest="model", default=DEFAULT_MODEL,
                        help=f"served model name (default {DEFAULT_MODEL})")
    parser.add_argument("--shutdown-timeout", type=int, default=0, metavar="SECONDS",
                        help="on SIGTERM, let in-flight requests finish for up to this many whole seconds while "
                             "refusing new ones with HTTP 500 (default 0: abort them, as vLLM does)")
    parser.add_argument("--max-num-seqs", type=int, default=DEFAULT_MAX_NUM_SEQS, metavar="N",
                        help=f"running requests per engine before new ones wait (default {DEFAULT_MAX_NUM_SEQS})")
    parser.add_argument("--disable-log-stats", action="store_true",
                        help="no vllm: series on /metrics (vLLM's flag of the same name)")
    parser.add_argument("--data-parallel-size", "--engines", dest="engines", type=int, default=1, metavar="N",
                        help="data-parallel engines, one `engine` label value each (default 1)")
    sim = parser.add_argument_group("the fake's own settings")
    sim.add_argument("--token-interval", type=float, default=DEFAULT_TOKEN_INTERVAL, metavar="SECONDS",
                     help=f"seconds per generated token (default {DEFAULT_TOKEN_INTERVAL}); a request's "
                          "sim_token_interval overrides it")
    sim.add_argument("--step-seconds", type=float, default=DEFAULT_STEP_SECONDS, metavar="SECONDS",
                     help=f"engine step: how often the gauges are published (default {DEFAULT_STEP_SECONDS})")
    sim.add_argument("--preprocess-seconds", type=float, default=DEFAULT_PREPROCESS_SECONDS, metavar="SECONDS",
                     help="rendering and tokenizing a request, during which no gauge counts it "
                          f"(default {DEFAULT_PREPROCESS_SECONDS})")
    sim.add_argument("--startup-delay", type=float, default=0.0, metavar="SECONDS",
                     help="model loading: nothing listens for this long after start")
    sim.add_argument("--abort-style", choices=("chunk", "silent"), default="chunk",
                     help="how a default SIGTERM ends streams: an abort chunk and [DONE] (default), or "
                          "silence until the clients leave (real vLLM's other outcome of the race)")
    sim.add_argument("--stale-gauges-after-abort", action="store_true",
                     help="when every request was aborted by its client, keep them in the gauges (vLLM #22545)")
    sim.add_argument("--ignore-sigterm", action="store_true",
                     help="ignore SIGTERM and keep serving until SIGKILL (SIGINT still stops it), like a "
                          "server that does not handle the signal: for fault-injection tests")


def run_vllm_from_args(args: argparse.Namespace) -> int:
    """Run the fake until SIGTERM/SIGINT; exit code 0 after its shutdown, 2 on bad flags."""
    configure_logging(level="info")
    try:
        host, port = parse_listen(args.listen)
        fake = FakeVllm(host, port, model=args.model, token_interval=args.token_interval, engines=args.engines,
                        shutdown_timeout=args.shutdown_timeout, max_num_seqs=args.max_num_seqs,
                        startup_delay=args.startup_delay, step_seconds=args.step_seconds,
                        preprocess_seconds=args.preprocess_seconds, log_stats=not args.disable_log_stats,
                        abort_style=args.abort_style, stale_gauges_after_abort=args.stale_gauges_after_abort)
    except ValueError as exc:
        print(f"spotguard-sim vllm: {exc}", file=sys.stderr)
        return 2
    if args.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return asyncio.run(run_fake_vllm(fake=fake, ignore_sigterm=args.ignore_sigterm))


async def run_fake_vllm(*, fake: FakeVllm, ignore_sigterm: bool = False) -> int:
    """Serve until the first SIGTERM/SIGINT, then shut down as vLLM does; later signals are
    ignored, as vLLM's handler ignores them. With `ignore_sigterm`, only SIGINT is handled."""
    loop = asyncio.get_running_loop()
    signalled = asyncio.Event()
    handled = (signal.SIGINT,) if ignore_sigterm else (signal.SIGTERM, signal.SIGINT)

    def on_signal(signum: int) -> None:
        log.info("fake_vllm_signal", signal=signal.Signals(signum).name, ignored=signalled.is_set(),
                 mode="drain" if fake.shutdown_timeout else "abort", in_flight=fake.in_flight)
        signalled.set()

    for signum in handled:
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        starting = asyncio.create_task(fake.start())
        stopping = asyncio.create_task(signalled.wait())
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not starting.done():  # stopped while loading the model
            starting.cancel()
            return 0
        try:
            starting.result()
        except OSError as exc:
            log.error("fake_vllm_listen_failed", host=fake.host, port=fake.port, error=str(exc))
            return 1
        await signalled.wait()
        await fake.terminate()
    finally:
        for signum in handled:
            loop.remove_signal_handler(signum)
    log.info("fake_vllm_exit", code=0)
    return 0


def parse_listen(value: str) -> tuple[str, int]:
    """'HOST:PORT' or '[v6]:PORT' -> (host, port)."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"--listen must be HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port_text)


def main(argv: list[str] | None = None) -> int:
    """`python -m spotguard_sim.fake_vllm`: as a pod's container it gets the container's vLLM args,
    some of which the fake does not model (--max-model-len, --dtype, ...): those are ignored."""
    parser = argparse.ArgumentParser(prog="python -m spotguard_sim.fake_vllm", description=__doc__.splitlines()[0])
    add_vllm_arguments(parser)
    args, ignored = parser.parse_known_args(argv)
    if ignored:
        print(f"fake vllm: ignoring vLLM arguments it does not model: {' '.join(ignored)}", file=sys.stderr)
    return run_vllm_from_args(args)


if __name__ == "__main__":
    raise SystemExit(main())

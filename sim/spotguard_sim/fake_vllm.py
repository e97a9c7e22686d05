"""A fake vLLM OpenAI-compatible server: what spotguard drains, without a GPU.

It speaks what spotguard and its users touch on a real vLLM (V1 engine):
- `POST /v1/completions` and `POST /v1/chat/completions`, streaming (SSE chunks in OpenAI's format,
  ending with `data: [DONE]`) or not. A request makes `max_tokens` tokens (default 16), one every
  `token_interval` seconds; the extra body field `sim_token_interval` overrides that per request so
  a load generator can draw request durations.
- `GET /metrics` with vLLM's own series names and labels (`model_name`, `engine`), one series per
  data-parallel engine, including `vllm:num_requests_waiting_by_reason` so parsers prove they match
  names exactly.
- `GET /health` (200 when serving, 503 while starting up or shutting down), `GET /v1/models`.
- A concurrency limit per engine (`max_num_seqs`); requests above it wait and count as waiting.
- vLLM's SIGTERM semantics: by default every in-flight request is aborted at once (streams are cut,
  no `[DONE]`) and the process exits; with `--shutdown-timeout N` new requests get 503 while the
  in-flight ones get up to N seconds to finish, then the rest are aborted. A second signal aborts
  at once. SIGKILL is just death. `--ignore-sigterm` plays a server that ignores SIGTERM (keeps
  serving until SIGKILL), for fault-injection tests of the kubelet's grace period.

Use it as a class in tests (`FakeVllm`) or as a process (`python -m spotguard_sim.fake_vllm
--listen HOST:PORT`, or `spotguard-sim vllm`, which calls `add_vllm_arguments` / `run_vllm_from_args`).
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
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from spotguard.observability import configure_logging

log = structlog.get_logger("spotguard_sim.fake_vllm")

DEFAULT_MODEL = "sim/fake-llm"
DEFAULT_TOKEN_INTERVAL = 0.02
DEFAULT_MAX_TOKENS = 16
DEFAULT_MAX_NUM_SEQS = 256
MAX_MODEL_LEN = 4096
# vLLM's finish reasons (the `finished_reason` label of vllm:request_success_total).
FINISH_REASONS = ("stop", "length", "abort", "error", "repetition")
# vLLM's reasons for vllm:num_requests_waiting_by_reason.
WAITING_REASONS = ("capacity", "deferred")
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                    120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
_WORDS = (" the", " quick", " brown", " fox", " jumps", " over", " a", " lazy", " dog", ".")


def token_text(index: int) -> str:
    """The text of the index-th generated token (deterministic, so tests can check content)."""
    return _WORDS[index % len(_WORDS)]


class _VllmSeries:
    """vLLM's metric names, types and labels, on a registry of their own (never the global one)."""

    def __init__(self, *, model: str, engines: int) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        labels = ["model_name", "engine"]
        self.running = Gauge("vllm:num_requests_running", "Requests in the engine's running batch.",
                             labels, registry=r)
        self.waiting = Gauge("vllm:num_requests_waiting", "Requests queued for the engine.",
                             labels, registry=r)
        self.waiting_by_reason = Gauge("vllm:num_requests_waiting_by_reason",
                                       "Queued requests, split by why they wait.",
                                       labels + ["reason"], registry=r)
        self.kv_cache_usage = Gauge("vllm:kv_cache_usage_perc",
                                    "Fraction of KV-cache blocks in use (1 = full).", labels, registry=r)
        self.request_success = Counter("vllm:request_success_total", "Finished requests, by finish reason.",
                                       labels + ["finished_reason"], registry=r)
        self.prompt_tokens = Counter("vllm:prompt_tokens_total", "Prompt tokens processed.",
                                     labels, registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens_total", "Tokens generated.",
                                         labels, registry=r)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Seconds from arrival to first token.",
                              labels, buckets=_TTFT_BUCKETS, registry=r)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Seconds from arrival to finish.",
                             labels, buckets=_LATENCY_BUCKETS, registry=r)
        # Like vLLM, every engine's series exist from start-up at 0.
        for engine in range(engines):
            key = {"model_name": model, "engine": str(engine)}
            for gauge in (self.running, self.waiting, self.kv_cache_usage):
                gauge.labels(**key).set(0)
            for reason in WAITING_REASONS:
                self.waiting_by_reason.labels(**key, reason=reason).set(0)
            for reason in FINISH_REASONS:
                self.request_success.labels(**key, finished_reason=reason)
            for metric in (self.prompt_tokens, self.generation_tokens, self.ttft, self.e2e):
                metric.labels(**key)


@dataclass(eq=False)
class _Engine:
    index: int
    free_slots: int
    queue: collections.deque[asyncio.Future[bool]] = field(default_factory=collections.deque)
    running: int = 0
    waiting: int = 0


@dataclass(eq=False)
class _Request:
    engine: _Engine
    arrival: float
    aborted: asyncio.Event = field(default_factory=asyncio.Event)
    state: str = "waiting"  # waiting -> running -> finished
    admission: asyncio.Future[bool] | None = None
    first_token_at: float | None = None


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
                 shutdown_timeout: float | None = None, max_num_seqs: int = DEFAULT_MAX_NUM_SEQS,
                 startup_delay: float = 0.0) -> None:
        if engines < 1:
            raise ValueError("engines must be at least 1")
        if max_num_seqs < 1:
            raise ValueError("max_num_seqs must be at least 1")
        if token_interval < 0 or startup_delay < 0 or (shutdown_timeout is not None and shutdown_timeout < 0):
            raise ValueError("token_interval, startup_delay and shutdown_timeout must not be negative")
        self.host = host
        self.port = port
        self.model = model
        self.token_interval = token_interval
        self.max_num_seqs = max_num_seqs
        # vLLM's default (0) and "not given" mean the same: abort in-flight requests on SIGTERM.
        self.shutdown_timeout = shutdown_timeout or None
        self.startup_delay = startup_delay
        self._series = _VllmSeries(model=model, engines=engines)
        self._engines = [_Engine(index=i, free_slots=max_num_seqs) for i in range(engines)]
        self._requests: set[_Request] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._shutting_down = False
        self._ready_at = 0.0
        self._runner: web.AppRunner | None = None
        self._created = int(time.time())

    @property
    def url(self) -> str:
        """Base URL, e.g. http://127.0.0.1:8000 (the bound port once started)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def in_flight(self) -> int:
        """Requests running or waiting right now."""
        return len(self._requests)

    @property
    def shutting_down(self) -> bool:
        return self._shutting_down

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat_completions)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        # The backstop only: stop() has already ended every handler by the time cleanup runs.
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]
        self._ready_at = asyncio.get_running_loop().time() + self.startup_delay
        log.info("fake_vllm_listening", url=self.url, model=self.model, engines=len(self._engines),
                 max_num_seqs=self.max_num_seqs, shutdown_timeout=self.shutdown_timeout,
                 startup_delay=self.startup_delay)

    async def terminate(self) -> None:
        """What vLLM does on SIGTERM: refuse new work, drain (bounded) or abort, then stop."""
        self._shutting_down = True
        if self.shutdown_timeout is not None and self._requests:
            log.info("fake_vllm_draining", in_flight=len(self._requests), timeout=self.shutdown_timeout)
            try:
                async with asyncio.timeout(self.shutdown_timeout):
                    await self._idle.wait()
            except TimeoutError:
                log.info("fake_vllm_drain_timeout", still_in_flight=len(self._requests))
        await self.stop()

    def abort_all(self) -> int:
        """Abort every request now (streams are cut); returns how many were in flight."""
        requests = list(self._requests)
        for req in requests:
            _abort(req)
        return len(requests)

    async def stop(self) -> None:
        """Abort whatever is still in flight and close the listener."""
        self._shutting_down = True
        aborted = self.abort_all()
        if aborted:
            log.info("fake_vllm_aborted", requests=aborted)
        try:
            # Handlers wake on their abort event within one loop turn; bounded in case one is stuck.
            async with asyncio.timeout(2.0):
                await self._idle.wait()
        except TimeoutError:
            log.warning("fake_vllm_requests_still_open", requests=len(self._requests))
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # --- HTTP handlers -------------------------------------------------------------------------

    async def _health(self, _: web.Request) -> web.Response:
        if self._shutting_down:
            return web.Response(status=503, text="shutting down\n")
        if not self._ready():
            return web.Response(status=503, text="starting\n")
        return web.Response(status=200)

    async def _metrics(self, _: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self._series.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _models(self, _: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{
            "id": self.model, "object": "model", "created": self._created, "owned_by": "vllm",
            "root": self.model, "parent": None, "max_model_len": MAX_MODEL_LEN}]})

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=False)

    async def _chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=True)

    async def _serve(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        if self._shutting_down:
            return _error(503, "The server is shutting down and accepts no new requests.",
                          "ServiceUnavailableError")
        if not self._ready():
            return _error(503, "The server is still starting up.", "ServiceUnavailableError")
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

        req = self._open()
        try:
            return await self._generate(request, req, params, chat=chat)
        finally:
            self._close(req)

    # --- request lifecycle ---------------------------------------------------------------------

    def _ready(self) -> bool:
        return asyncio.get_running_loop().time() >= self._ready_at

    def _open(self) -> _Request:
        # Least-loaded engine first, like a data-parallel front end spreading work.
        engine = min(self._engines, key=lambda e: (e.running + e.waiting, e.index))
        req = _Request(engine=engine, arrival=asyncio.get_running_loop().time())
        engine.waiting += 1
        self._requests.add(req)
        self._idle.clear()
        self._publish(engine)
        return req

    async def _admit(self, req: _Request) -> bool:
        """Wait for a batch slot on the request's engine; False when aborted while waiting."""
        engine = req.engine
        if engine.free_slots > 0 and not engine.queue:
            engine.free_slots -= 1
            return True
        req.admission = asyncio.get_running_loop().create_future()
        engine.queue.append(req.admission)
        try:
            return await req.admission
        except asyncio.CancelledError:
            # Cancelled by the server's own shutdown: a slot handed over meanwhile goes back.
            if req.admission.done() and not req.admission.cancelled() and req.admission.result():
                self._release_slot(engine)
            else:
                req.admission.cancel()
            raise

    def _release_slot(self, engine: _Engine) -> None:
        while engine.queue:
            waiter = engine.queue.popleft()
            if not waiter.done():
                waiter.set_result(True)
                return
        engine.free_slots += 1

    async def _generate(self, request: web.Request, req: _Request, params: _Params, *,
                        chat: bool) -> web.StreamResponse:
        labels = {"model_name": self.model, "engine": str(req.engine.index)}
        if not await self._admit(req):
            return _cut(request, None)  # aborted while waiting; _close counts it
        req.state = "running"
        req.engine.waiting -= 1
        req.engine.running += 1
        self._publish(req.engine)
        self._series.prompt_tokens.labels(**labels).inc(params.prompt_tokens)

        request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        chunks = _Chunks(request_id=request_id, model=self.model, created=int(time.time()), chat=chat)
        stream: web.StreamResponse | None = None
        if params.stream:
            stream = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8",
                                                 "Cache-Control": "no-cache"})
            await stream.prepare(request)
            if chat and not await _send(stream, chunks.role()):
                return _cut(request, stream)
        text: list[str] = []
        for index in range(params.max_tokens):
            if await _aborted_within(req.aborted, params.interval) or _client_gone(request):
                return _cut(request, stream)
            if req.first_token_at is None:
                req.first_token_at = asyncio.get_running_loop().time()
                self._series.ttft.labels(**labels).observe(req.first_token_at - req.arrival)
            self._series.generation_tokens.labels(**labels).inc()
            piece = token_text(index)
            if stream is None:
                text.append(piece)
            elif not await _send(stream, chunks.token(piece)):
                return _cut(request, stream)
        # Counted before the last bytes go out: from here on the request holds no batch slot.
        self._finish(req, "length")

        usage = {"prompt_tokens": params.prompt_tokens, "completion_tokens": params.max_tokens,
                 "total_tokens": params.prompt_tokens + params.max_tokens}
        if stream is None:
            return web.json_response(chunks.whole("".join(text), "length", usage))
        events = [chunks.finish("length")] + ([chunks.usage(usage)] if params.include_usage else [])
        for event in events:
            if not await _send(stream, event):
                return stream
        try:
            await stream.write(b"data: [DONE]\n\n")
            await stream.write_eof()
        except ConnectionError:
            pass
        return stream

    def _finish(self, req: _Request, reason: str) -> None:
        """Count a finished request once and give its batch slot to the next waiting one."""
        if req.state == "finished":
            return
        labels = {"model_name": self.model, "engine": str(req.engine.index)}
        self._series.request_success.labels(**labels, finished_reason=reason).inc()
        self._series.e2e.labels(**labels).observe(asyncio.get_running_loop().time() - req.arrival)
        if req.state == "running":
            req.engine.running -= 1
            self._release_slot(req.engine)
        else:
            req.engine.waiting -= 1
        req.state = "finished"
        self._publish(req.engine)

    def _close(self, req: _Request) -> None:
        # Whatever ended the handler (finish, abort, client gone, cancellation, a bug), the books
        # balance here: a request not finished normally was aborted, as vLLM counts it.
        self._finish(req, "abort")
        self._requests.discard(req)
        if not self._requests:
            self._idle.set()

    def _publish(self, engine: _Engine) -> None:
        key = {"model_name": self.model, "engine": str(engine.index)}
        self._series.running.labels(**key).set(engine.running)
        self._series.waiting.labels(**key).set(engine.waiting)
        self._series.waiting_by_reason.labels(**key, reason="capacity").set(engine.waiting)
        self._series.waiting_by_reason.labels(**key, reason="deferred").set(0)
        # A stand-in for block usage: each running sequence holds an equal share of the cache.
        self._series.kv_cache_usage.labels(**key).set(engine.running / self.max_num_seqs)


def _abort(req: _Request) -> None:
    req.aborted.set()
    if req.admission is not None and not req.admission.done():
        req.admission.set_result(False)


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
    # vLLM aborts a request whose client went away; so does the fake, checked once per token.
    transport = request.transport
    return transport is None or transport.is_closing()


def _cut(request: web.Request, stream: web.StreamResponse | None) -> web.StreamResponse:
    """End an aborted request the way a dying vLLM does: the connection just closes."""
    if request.transport is not None:
        request.transport.close()
    # aiohttp's attempt to finish this response meets the closed transport and is dropped quietly.
    return stream if stream is not None else web.Response(status=500)


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
    """OpenAI's response shapes for completions and chat completions."""

    request_id: str
    model: str
    created: int
    chat: bool

    def _envelope(self, choices: list[dict[str, Any]], *, whole: bool = False) -> dict[str, Any]:
        if self.chat:
            kind = "chat.completion" if whole else "chat.completion.chunk"
        else:
            kind = "text_completion"
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
    """The flags of `spotguard-sim vllm` (and of `python -m spotguard_sim.fake_vllm`)."""
    parser.add_argument("--listen", required=True, metavar="HOST:PORT",
                        help="address to serve on; port 0 picks a free one (logged at start)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"served model name (default {DEFAULT_MODEL})")
    parser.add_argument("--token-interval", type=float, default=DEFAULT_TOKEN_INTERVAL, metavar="SECONDS",
                        help=f"seconds per generated token (default {DEFAULT_TOKEN_INTERVAL}); "
                             "a request's sim_token_interval overrides it")
    parser.add_argument("--shutdown-timeout", type=float, default=0.0, metavar="SECONDS",
                        help="on SIGTERM, let in-flight requests finish for up to this long while "
                             "refusing new ones (default 0: abort them at once, as vLLM does)")
    parser.add_argument("--engines", type=int, default=1, metavar="N",
                        help="data-parallel engines, one `engine` label value each (default 1)")
    parser.add_argument("--max-num-seqs", type=int, default=DEFAULT_MAX_NUM_SEQS, metavar="N",
                        help=f"running requests per engine before new ones wait (default {DEFAULT_MAX_NUM_SEQS})")
    parser.add_argument("--startup-delay", type=float, default=0.0, metavar="SECONDS",
                        help="answer /health and requests with 503 for this long after start (model loading)")
    parser.add_argument("--ignore-sigterm", action="store_true",
                        help="ignore SIGTERM and keep serving until SIGKILL (SIGINT still stops it), like a "
                             "server that does not handle the signal: for fault-injection tests")


def run_vllm_from_args(args: argparse.Namespace) -> int:
    """Run the fake until SIGTERM/SIGINT; exit code 0 after a clean shutdown, 2 on bad flags."""
    configure_logging(level="info")
    try:
        host, port = parse_listen(args.listen)
        fake = FakeVllm(host, port, model=args.model, token_interval=args.token_interval,
                        engines=args.engines, shutdown_timeout=args.shutdown_timeout,
                        max_num_seqs=args.max_num_seqs, startup_delay=args.startup_delay)
    except ValueError as exc:
        print(f"spotguard-sim vllm: {exc}", file=sys.stderr)
        return 2
    if args.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return asyncio.run(run_fake_vllm(fake=fake, ignore_sigterm=args.ignore_sigterm))


async def run_fake_vllm(*, fake: FakeVllm, ignore_sigterm: bool = False) -> int:
    """Serve until the first SIGTERM/SIGINT, then shut down as vLLM does; a second signal aborts.
    With `ignore_sigterm`, only SIGINT is handled (the caller has set SIGTERM to be ignored)."""
    loop = asyncio.get_running_loop()
    signals = asyncio.Queue[int]()
    handled = (signal.SIGINT,) if ignore_sigterm else (signal.SIGTERM, signal.SIGINT)
    for signum in handled:
        loop.add_signal_handler(signum, signals.put_nowait, signum)
    try:
        try:
            await fake.start()
        except OSError as exc:
            log.error("fake_vllm_listen_failed", host=fake.host, port=fake.port, error=str(exc))
            return 1
        first = await signals.get()
        log.info("fake_vllm_signal", signal=signal.Signals(first).name,
                 mode="drain" if fake.shutdown_timeout else "abort", in_flight=fake.in_flight)
        shutdown = asyncio.create_task(fake.terminate())
        second = asyncio.create_task(signals.get())
        done, _ = await asyncio.wait({shutdown, second}, return_when=asyncio.FIRST_COMPLETED)
        if second in done:
            log.info("fake_vllm_signal", signal=signal.Signals(second.result()).name, mode="abort now")
            fake.abort_all()
            await shutdown
        else:
            second.cancel()
        await shutdown  # re-raises anything terminate() raised
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
    parser = argparse.ArgumentParser(prog="python -m spotguard_sim.fake_vllm", description=__doc__.splitlines()[0])
    add_vllm_arguments(parser)
    return run_vllm_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())

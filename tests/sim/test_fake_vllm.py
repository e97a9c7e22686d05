"""The real /metrics reader and the preStop hook against the fake vLLM, over loopback HTTP.

Also vLLM's SIGTERM semantics on a real fake-vLLM process: abort by default, drain with
--shutdown-timeout. Token intervals of tens of milliseconds keep the file to seconds. Every server,
process and client task is stopped by its fixture or context manager, even when a test fails.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families
from spotguard_sim.fake_vllm import FakeVllm, token_text
from spotguard_sim.support import eventually, free_port

from spotguard.vllm import (
    InFlight,
    MetricsFormatError,
    ScrapeConnectionError,
    ScrapeHTTPError,
    ScrapeTimeoutError,
    read_in_flight,
)

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[2]
PRESTOP = REPO / "daemonset" / "files" / "vllm-drain-prestop.py"
HOST = "127.0.0.1"


# --- helpers ------------------------------------------------------------------------------------

@dataclass
class Stream:
    """What a streaming client saw: the JSON events, whether [DONE] came, how it ended."""

    events: list[dict[str, Any]] = field(default_factory=list)
    done: bool = False
    status: int | None = None
    error: BaseException | None = None
    first_event: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def text(self) -> str:
        parts = []
        for event in self.events:
            for choice in event.get("choices", []):
                parts.append(choice.get("text") or choice.get("delta", {}).get("content") or "")
        return "".join(parts)


class Streams:
    """Client streams running as tasks; every one is cancelled and awaited on exit."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self.session = session
        self.tasks: list[asyncio.Task[None]] = []

    def start(self, url: str, **body: Any) -> Stream:
        stream = Stream()
        self.tasks.append(asyncio.create_task(self._consume(url, {"stream": True, **body}, stream)))
        return stream

    async def _consume(self, url: str, body: dict[str, Any], stream: Stream) -> None:
        try:
            async with self.session.post(url, json=body) as resp:
                stream.status = resp.status
                async for raw in resp.content:
                    line = raw.decode().strip()
                    if not line.startswith("data: "):
                        continue
                    data = line.removeprefix("data: ")
                    if data == "[DONE]":
                        stream.done = True
                    else:
                        stream.events.append(json.loads(data))
                        stream.first_event.set()
        except aiohttp.ClientError as exc:  # the server cut the stream
            stream.error = exc

    async def wait(self, timeout: float = 10.0) -> None:
        await asyncio.wait_for(asyncio.gather(*self.tasks), timeout)

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


@asynccontextmanager
async def fake_vllm(**options: Any) -> AsyncIterator[FakeVllm]:
    fake = FakeVllm(HOST, 0, **options)
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
async def streams(session: aiohttp.ClientSession) -> AsyncIterator[Streams]:
    running = Streams(session)
    try:
        yield running
    finally:
        await running.close()


async def scrape(session: aiohttp.ClientSession, fake: FakeVllm) -> InFlight:
    """What spotguard reads, a few engine steps (0.02 s each) after what the test just did: the
    gauges are published once per step, as vLLM's are."""
    await asyncio.sleep(0.1)
    return await read_in_flight(session, fake.url + "/metrics", timeout=2.0)


async def counter(session: aiohttp.ClientSession, url: str, name: str, **labels: str) -> float:
    async with session.get(url + "/metrics") as resp:
        text = await resp.text()
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


class FakeVllmProcess:
    """`python -m spotguard_sim.fake_vllm` as a child process; killed on exit if still running."""

    def __init__(self, *flags: str) -> None:
        self.flags = flags
        self.proc: asyncio.subprocess.Process | None = None
        self.url = ""

    async def __aenter__(self) -> FakeVllmProcess:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "spotguard_sim.fake_vllm", "--listen", f"{HOST}:0", *self.flags,
            cwd=REPO, stdout=asyncio.subprocess.PIPE)
        assert self.proc.stdout is not None
        while not self.url:
            line = await asyncio.wait_for(self.proc.stdout.readline(), 20)
            assert line, "fake vLLM exited before listening"
            event = json.loads(line)
            if event.get("event") == "fake_vllm_listening":
                self.url = event["url"]
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.kill()
        await self.proc.wait()

    def sigterm(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)

    async def exit_code(self, timeout: float) -> int:
        assert self.proc is not None
        return await asyncio.wait_for(self.proc.wait(), timeout)


async def run_prestop(*args: str) -> tuple[int, str, float]:
    """Run the preStop script to completion; (exit code, stderr, seconds it took)."""
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(sys.executable, str(PRESTOP), *args,
                                                stderr=asyncio.subprocess.PIPE)
    try:
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return proc.returncode or 0, err.decode(), time.monotonic() - started


# --- the reader against the fake ----------------------------------------------------------------

async def test_reader_counts_streams_while_they_run_and_zero_after(
        session: aiohttp.ClientSession, streams: Streams) -> None:
    async with fake_vllm(engines=2) as fake:
        running = [streams.start(fake.url + "/v1/completions", max_tokens=10, sim_token_interval=0.05)
                   for _ in range(4)]
        await eventually(lambda: all(s.first_event.is_set() for s in running), timeout=5)

        during = await scrape(session, fake)
        await streams.wait()
        after = await scrape(session, fake)

    assert (during.running, during.waiting, during.engines) == (4.0, 0.0, 2)
    assert all(s.done for s in running)
    assert (after.total, after.engines) == (0.0, 2)


async def test_requests_beyond_max_num_seqs_count_as_waiting(
        session: aiohttp.ClientSession, streams: Streams) -> None:
    async with fake_vllm(max_num_seqs=1) as fake:
        queued = [streams.start(fake.url + "/v1/completions", max_tokens=5, sim_token_interval=0.05)
                  for _ in range(3)]
        await eventually(lambda: fake.in_flight == 3, timeout=5)
        during = await scrape(session, fake)
        await streams.wait()

    assert (during.running, during.waiting) == (1.0, 2.0)
    assert during.kv_cache_usage == 1.0
    assert all(s.done for s in queued)


async def test_kv_cache_usage_follows_running_requests(session: aiohttp.ClientSession, streams: Streams) -> None:
    async with fake_vllm(max_num_seqs=4) as fake:
        idle = await scrape(session, fake)
        first = streams.start(fake.url + "/v1/completions", max_tokens=20, sim_token_interval=0.05)
        await asyncio.wait_for(first.first_event.wait(), 5)
        busy = await scrape(session, fake)

    assert (idle.kv_cache_usage, busy.kv_cache_usage) == (0.0, 0.25)


# --- the OpenAI API -----------------------------------------------------------------------------

async def test_streaming_completion_sends_one_chunk_per_token_then_done(streams: Streams) -> None:
    async with fake_vllm(token_interval=0.01) as fake:
        stream = streams.start(fake.url + "/v1/completions", prompt="Say something", max_tokens=5,
                               stream_options={"include_usage": True})
        await streams.wait()

    assert (stream.status, stream.done, stream.error) == (200, True, None)
    assert stream.text == "".join(token_text(i) for i in range(5))
    assert stream.events[0]["object"] == "text_completion"
    assert stream.events[-2]["choices"][0]["finish_reason"] == "length"
    assert stream.events[-1]["usage"] == {"prompt_tokens": 2, "completion_tokens": 5, "total_tokens": 7}


async def test_streaming_chat_completion_sends_role_then_content_deltas(streams: Streams) -> None:
    async with fake_vllm(token_interval=0.01) as fake:
        stream = streams.start(fake.url + "/v1/chat/completions", max_tokens=3,
                               messages=[{"role": "user", "content": "hello"}])
        await streams.wait()

    assert stream.done
    assert stream.events[0]["object"] == "chat.completion.chunk"
    assert stream.events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert stream.text == "".join(token_text(i) for i in range(3))
    assert stream.events[-1]["choices"][0]["finish_reason"] == "length"


async def test_non_streaming_completion_returns_the_whole_text_and_usage(session: aiohttp.ClientSession) -> None:
    async with fake_vllm(token_interval=0.0) as fake:
        async with session.post(fake.url + "/v1/completions", json={"prompt": "a b c"}) as resp:
            body = await resp.json()

    assert resp.status == 200
    assert body["choices"][0]["text"] == "".join(token_text(i) for i in range(16))  # default max_tokens
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 16, "total_tokens": 19}


@pytest.mark.parametrize(("body", "status"), [
    ({"prompt": "x", "max_tokens": 0}, 400),
    ({"prompt": "x", "max_tokens": "ten"}, 400),
    ({"prompt": "x", "sim_token_interval": -1}, 400),
    ({"prompt": "x", "model": "someone/else"}, 404),
])
async def test_invalid_requests_are_refused(session: aiohttp.ClientSession, body: dict[str, Any],
                                            status: int) -> None:
    async with fake_vllm() as fake:
        async with session.post(fake.url + "/v1/completions", json=body) as resp:
            error = await resp.json()
    assert resp.status == status
    assert error["error"]["code"] == status


async def test_models_lists_the_served_model(session: aiohttp.ClientSession) -> None:
    async with fake_vllm(model="acme/llm-7b") as fake:
        async with session.get(fake.url + "/v1/models") as resp:
            models = await resp.json()
    assert [m["id"] for m in models["data"]] == ["acme/llm-7b"]


async def test_nothing_listens_until_the_model_is_loaded(session: aiohttp.ClientSession) -> None:
    # vLLM starts its HTTP server only once the engine is up: a probe meanwhile is refused.
    fake = FakeVllm(HOST, free_port(HOST), startup_delay=0.5)
    starting = asyncio.create_task(fake.start())
    try:
        await asyncio.sleep(0.2)
        with pytest.raises(aiohttp.ClientConnectorError):
            async with session.get(fake.url + "/health"):
                pass
        await starting
        async with session.get(fake.url + "/health") as up:
            assert up.status == 200
    finally:
        await fake.stop()


async def test_metrics_use_vllm_names_and_count_finished_but_not_client_aborted_requests(
        session: aiohttp.ClientSession, streams: Streams) -> None:
    async with fake_vllm(token_interval=0.02, engines=2) as fake:
        finished = streams.start(fake.url + "/v1/completions", max_tokens=3)
        await streams.wait()
        # A client that goes away mid-stream is aborted, but vLLM's success counter does not see it.
        async with session.post(fake.url + "/v1/completions",
                                json={"stream": True, "max_tokens": 100}) as resp:
            await resp.content.readline()
        await eventually(lambda: fake.in_flight == 0, timeout=5)
        async with session.get(fake.url + "/metrics") as metrics:
            names = {s.name for f in text_string_to_metric_families(await metrics.text()) for s in f.samples}
        success = "vllm:request_success_total"
        lengths = await counter(session, fake.url, success, finished_reason="length")
        aborts = await counter(session, fake.url, success, finished_reason="abort")
        generated = await counter(session, fake.url, "vllm:generation_tokens_total")

    assert finished.done
    assert (lengths, aborts) == (1.0, 0.0)
    assert generated >= 4.0  # 3 of the finished request, at least 1 of the aborted one
    assert {"vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:num_requests_waiting_by_reason",
            "vllm:kv_cache_usage_perc", "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
            "vllm:time_to_first_token_seconds_bucket", "vllm:e2e_request_latency_seconds_count"} <= names


# --- the reader's failures, each with its reason ------------------------------------------------

@pytest.fixture
async def misbehaving() -> AsyncIterator[str]:
    """An HTTP server that fails in each way a pod's /metrics can."""

    async def status_500(_: web.Request) -> web.Response:
        return web.Response(status=500, text="internal error")

    async def html(_: web.Request) -> web.Response:
        return web.Response(text="<html><body>It works!</body></html>", content_type="text/html")

    async def endless(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        line = b"vllm:num_requests_running 1\n" * 2048
        try:
            while True:
                await resp.write(line)
        except ConnectionError:
            return resp

    async def trickle(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        try:
            for _ in range(100):
                await resp.write(b"# still coming\n")
                await asyncio.sleep(0.1)
        except ConnectionError:
            pass
        return resp

    app = web.Application()
    app.router.add_get("/500", status_500)
    app.router.add_get("/html", html)
    app.router.add_get("/endless", endless)
    app.router.add_get("/trickle", trickle)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, HOST, 0)
    await site.start()
    try:
        yield f"http://{HOST}:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def test_nothing_listening_is_a_connection_error(session: aiohttp.ClientSession) -> None:
    with pytest.raises(ScrapeConnectionError) as caught:
        await read_in_flight(session, f"http://{HOST}:{free_port(HOST)}/metrics", timeout=2.0)
    assert caught.value.reason == "connection"


async def test_server_that_never_answers_is_a_timeout(session: aiohttp.ClientSession) -> None:
    release = asyncio.Event()
    writers: list[asyncio.StreamWriter] = []

    async def accept_and_hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        await reader.read(65536)
        await release.wait()

    server = await asyncio.start_server(accept_and_hang, HOST, 0)
    port = server.sockets[0].getsockname()[1]
    started = time.monotonic()
    try:
        with pytest.raises(ScrapeTimeoutError) as caught:
            await read_in_flight(session, f"http://{HOST}:{port}/metrics", timeout=0.3)
    finally:
        release.set()
        for writer in writers:
            writer.close()
        server.close()
        await server.wait_closed()
    assert caught.value.reason == "timeout"
    assert time.monotonic() - started < 2.0


async def test_body_that_trickles_past_the_timeout_is_a_timeout(session: aiohttp.ClientSession,
                                                                misbehaving: str) -> None:
    started = time.monotonic()
    with pytest.raises(ScrapeTimeoutError):
        await read_in_flight(session, misbehaving + "/trickle", timeout=0.5)
    assert time.monotonic() - started < 2.0


async def test_non_200_is_an_http_error(session: aiohttp.ClientSession, misbehaving: str) -> None:
    with pytest.raises(ScrapeHTTPError) as caught:
        await read_in_flight(session, misbehaving + "/500", timeout=2.0)
    assert (caught.value.reason, caught.value.status) == ("http", 500)


async def test_page_that_is_not_vllm_metrics_is_a_bad_body(session: aiohttp.ClientSession,
                                                          misbehaving: str) -> None:
    with pytest.raises(MetricsFormatError) as caught:
        await read_in_flight(session, misbehaving + "/html", timeout=2.0)
    assert caught.value.reason == "bad_body"


async def test_endless_body_is_cut_at_the_size_limit(session: aiohttp.ClientSession, misbehaving: str) -> None:
    with pytest.raises(MetricsFormatError, match="byte limit"):
        await read_in_flight(session, misbehaving + "/endless", timeout=10.0, max_body_bytes=1024 * 1024)


# --- the preStop hook against the fake -----------------------------------------------------------

async def test_prestop_returns_once_in_flight_reaches_zero(streams: Streams) -> None:
    async with fake_vllm() as fake:
        running = [streams.start(fake.url + "/v1/completions", max_tokens=16, sim_token_interval=0.05)
                   for _ in range(2)]
        await eventually(lambda: all(s.first_event.is_set() for s in running), timeout=5)
        code, err, took = await run_prestop("--port", str(fake.port), "--interval", "0.1", "--max-wait", "20")
        left_in_flight = fake.in_flight

    assert code == 0
    assert left_in_flight == 0
    assert all(s.done for s in running)
    assert "no request in flight" in err
    assert took < 10


async def test_prestop_gives_up_at_max_wait_when_requests_never_end(streams: Streams) -> None:
    async with fake_vllm() as fake:
        stuck = streams.start(fake.url + "/v1/completions", max_tokens=10, sim_token_interval=60)
        await eventually(lambda: fake.in_flight == 1, timeout=5)
        code, err, took = await run_prestop("--port", str(fake.port), "--interval", "0.1", "--max-wait", "1")
        still_in_flight, still_running = fake.in_flight, not stuck.done

    assert code == 0
    assert 1.0 <= took < 4.0
    assert still_in_flight == 1 and still_running
    assert "gave up" in err and "1 still in flight" in err


async def test_prestop_returns_at_once_on_an_idle_server() -> None:
    async with fake_vllm() as fake:
        code, err, took = await run_prestop("--port", str(fake.port), "--max-wait", "20")
    assert (code, took < 3.0) == (0, True)
    assert "no request in flight" in err


async def test_prestop_exits_zero_when_nothing_listens() -> None:
    code, err, took = await run_prestop("--port", str(free_port(HOST)), "--max-wait", "20")
    assert (code, took < 3.0) == (0, True)
    assert "refuses connections" in err


# --- the fake's own knobs (real vLLM has no switch for these; each stands for a real behaviour) ----

async def test_a_request_being_tokenized_is_in_flight_but_not_counted(session: aiohttp.ClientSession,
                                                                      streams: Streams) -> None:
    async with fake_vllm(preprocess_seconds=0.6) as fake:
        pending = streams.start(fake.url + "/v1/completions", max_tokens=2)
        during = await scrape(session, fake)
        await streams.wait()
    assert during.total == 0.0 and pending.done


async def test_stale_gauges_after_every_request_was_aborted_and_the_engine_step_counter_stands_still(
        session: aiohttp.ClientSession) -> None:
    async with fake_vllm(stale_gauges_after_abort=True) as fake:
        async with session.post(fake.url + "/v1/completions", json={"stream": True, "max_tokens": 100}) as resp:
            await resp.content.readline()
        await eventually(lambda: fake.in_flight == 0, timeout=5)
        first = await scrape(session, fake)
        steps = await counter(session, fake.url, "vllm:iteration_tokens_total_count")
        await asyncio.sleep(0.5)
        later = await scrape(session, fake)
        steps_later = await counter(session, fake.url, "vllm:iteration_tokens_total_count")
    # vLLM #22545: the gauge still says 1 although nothing runs; no engine step has run since.
    assert (first.running, later.running) == (1.0, 1.0)
    assert steps_later == steps


async def test_silent_abort_style_leaves_streams_open_until_the_client_goes(streams: Streams) -> None:
    async with FakeVllmProcess("--abort-style", "silent") as process:
        stream = streams.start(process.url + "/v1/completions", max_tokens=200, sim_token_interval=0.05)
        await asyncio.wait_for(stream.first_event.wait(), 10)
        process.sigterm()
        await asyncio.sleep(1.0)
        assert not stream.done and stream.error is None and process.proc.returncode is None
        await streams.close()   # the client leaves
        assert await process.exit_code(10) == 0

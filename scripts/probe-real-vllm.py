"""Record what REAL vLLM 0.32.0 does on the wire in the scenarios the fake vLLM must match.

    python3 scripts/probe-real-vllm.py --out DIR [SCENARIO...]

Scenarios: metrics, disconnect, sigterm, drain, drain-timeout, second-sigterm, disable-log-stats,
flags (no server). Default: all. Each starts its own real vLLM (spotguard_sim.real_vllm) on 127.0.0.1,
one at a time, and stops it (its whole process group) before the next, even on failure.
Writes DIR/<scenario>-<run>.txt: raw transcripts (HTTP status lines, SSE `data:` lines with the time
they arrived relative to the SIGTERM or the scenario's start, how each connection ended), the
/metrics and /health samples, the process's exit code and time. Long streams are elided in the
middle (the first and last lines are kept, with a count).

The HTTP client is a raw socket client (asyncio streams, chunked decoding by hand), so a reset, a
clean close, a terminal chunk and silence are told apart. Standard library only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spotguard_sim import real_vllm

HOST = "127.0.0.1"
KEEP_HEAD = 3
KEEP_TAIL = 4


class Clock:
    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def mark(self) -> None:
        self.t0 = time.monotonic()

    def now(self) -> float:
        return time.monotonic() - self.t0


@dataclass
class Exchange:
    """One HTTP request on its own connection, and everything that came back, with times."""

    name: str
    clock: Clock
    events: list[tuple[float, str, str]] = field(default_factory=list)
    status: int | None = None
    data_lines: int = 0
    writer: asyncio.StreamWriter | None = None
    ended: asyncio.Event = field(default_factory=asyncio.Event)

    def add(self, kind: str, text: str = "") -> None:
        # Absolute time: rendered relative to the clock's zero at render time (the SIGTERM when a
        # scenario marks it), so events before the mark come out negative.
        self.events.append((time.monotonic(), kind, text))

    def render(self) -> str:
        out = [f"--- {self.name}"]
        data = [e for e in self.events if e[1] == "data"]
        elide = set()
        if len(data) > KEEP_HEAD + KEEP_TAIL + 1:
            elide = {id(e) for e in data[KEEP_HEAD:-KEEP_TAIL]}
        shown_gap = False
        for event in self.events:
            if id(event) in elide:
                if not shown_gap:
                    out.append(f"  ... {len(elide)} more `data:` lines ...")
                    shown_gap = True
                continue
            t, kind, text = event
            out.append(f"  {t - self.clock.t0:+8.3f}s {kind:<14} {text}")
        return "\n".join(out)


async def exchange(ex: Exchange, port: int, method: str, path: str, body: Any = None, *,
                   wait_eof: float = 3.0, keep_alive: bool = True) -> Exchange:
    """Send one request and read the response to its end (and then to EOF, for up to wait_eof s)."""
    try:
        reader, writer = await asyncio.open_connection(HOST, port)
    except OSError as exc:
        ex.add("connect-failed", f"{type(exc).__name__}: {exc}")
        ex.ended.set()
        return ex
    ex.writer = writer
    payload = b"" if body is None else json.dumps(body).encode()
    head = [f"{method} {path} HTTP/1.1", f"Host: {HOST}:{port}", "Accept: */*"]
    if body is not None:
        head += ["Content-Type: application/json", f"Content-Length: {len(payload)}"]
    if not keep_alive:
        head.append("Connection: close")
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + payload)
    ex.add("sent", f"{method} {path}" + (f" {json.dumps(body)}" if body is not None else ""))
    try:
        await writer.drain()
        status_line = await reader.readline()
        if not status_line:
            ex.add("eof", "connection closed before a status line")
            return ex
        ex.add("status", status_line.decode().strip())
        ex.status = int(status_line.split()[1])
        headers = {}
        while True:
            line = await reader.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            key, _, value = line.decode().partition(":")
            headers[key.strip().lower()] = value.strip()
        ex.add("headers", ", ".join(f"{k}: {v}" for k, v in headers.items() if k in (
            "content-type", "content-length", "transfer-encoding", "connection")))
        if headers.get("transfer-encoding") == "chunked":
            buffer = ""
            while True:
                size_line = await reader.readline()
                if not size_line:
                    ex.add("eof", "connection closed mid-body (no terminal chunk)")
                    return ex
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    await reader.readline()
                    if buffer.strip():
                        ex.add("body", buffer.strip())
                    ex.add("body-complete", "terminal chunk received")
                    break
                chunk = await reader.readexactly(size + 2)
                buffer += chunk[:-2].decode(errors="replace")
                while "\n\n" in buffer:
                    event, buffer = buffer.split("\n\n", 1)
                    for line in event.splitlines():
                        if line.startswith("data:"):
                            ex.data_lines += 1
                            ex.add("data", line)
                        elif line:
                            ex.add("sse-other", line)
        else:
            length = int(headers.get("content-length", "0"))
            content = await reader.readexactly(length) if length else b""
            text = content.decode(errors="replace")
            ex.add("body", text if len(text) < 600 else text[:600] + f"... ({len(text)} bytes)")
            ex.add("body-complete", f"{length} bytes")
        if wait_eof > 0:
            try:
                rest = await asyncio.wait_for(reader.read(1), timeout=wait_eof)
                ex.add("eof" if not rest else "extra-bytes", "server closed the connection" if not rest else repr(rest))
            except TimeoutError:
                ex.add("still-open", f"connection still open {wait_eof:.1f}s after the response (keep-alive)")
    except asyncio.IncompleteReadError as exc:
        ex.add("eof", f"connection closed mid-chunk ({len(exc.partial)} bytes of a chunk)")
    except ConnectionResetError as exc:
        ex.add("reset", f"ConnectionResetError: {exc}")
    except asyncio.CancelledError:
        ex.add("client-closed", "the probe closed the connection (client disconnect)")
        raise
    except OSError as exc:
        ex.add("error", f"{type(exc).__name__}: {exc}")
    finally:
        ex.ended.set()
        writer.close()
    return ex


def completion_body(max_tokens: int, *, prompt: str = "The quick brown fox", stream: bool = True) -> dict[str, Any]:
    return {"model": real_vllm.MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True,
            "stream": stream, "temperature": 0}


METRIC_RE = re.compile(r"^(vllm:[a-z_]+)(\{[^}]*\})?\s+(\S+)$")


async def get_text(port: int, path: str, timeout: float = 5.0) -> tuple[int | str, str]:
    """A short GET on a fresh connection: (status or an error word, body)."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), timeout)
    except (OSError, TimeoutError) as exc:
        return type(exc).__name__, ""
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode())
        raw = await asyncio.wait_for(reader.read(), timeout)
    except (OSError, TimeoutError) as exc:
        return type(exc).__name__, ""
    finally:
        writer.close()
    if not raw:
        return "empty-reply", ""
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b"\r\n")[0].split()[1])
    if b"transfer-encoding: chunked" in head.lower():
        out, rest = b"", body
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line or b"0", 16)
            if size == 0:
                break
            out, rest = out + rest[:size], rest[size + 2:]
        body = out
    return status, body.decode(errors="replace")


def gauges(text: str) -> dict[str, float]:
    """The request gauges and finished counters, summed over labels but by finished_reason."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = METRIC_RE.match(line)
        if not m:
            continue
        name, labels, value = m.group(1), m.group(2) or "", float(m.group(3))
        if name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
            out[name.split(":")[1]] = out.get(name.split(":")[1], 0) + value
        elif name == "vllm:num_requests_waiting_by_reason":
            reason = re.search(r'reason="([^"]+)"', labels).group(1)  # type: ignore[union-attr]
            out[f"waiting_{reason}"] = value
        elif name == "vllm:request_success_total":
            reason = re.search(r'finished_reason="([^"]+)"', labels).group(1)  # type: ignore[union-attr]
            if value:
                out[f"success_{reason}"] = value
        elif name in ("vllm:generation_tokens_total", "vllm:prompt_tokens_total"):
            out[name.split(":")[1]] = value
    return out


def fmt_gauges(g: dict[str, float]) -> str:
    return " ".join(f"{k}={v:g}" for k, v in sorted(g.items()))


class Report:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.lines: list[str] = []

    def __call__(self, text: str = "") -> None:
        self.lines.append(text)
        print(text, flush=True)

    def save(self) -> None:
        self.path.write_text("\n".join(self.lines) + "\n")


async def poll_metrics(port: int, clock: Clock, log: Report, stop: asyncio.Event, every: float,
                       label: str = "metrics") -> None:
    """Scrape /metrics every `every` s; log a line when the values change, with how many scrapes
    came back since the last change and the longest a single scrape took (a blocked event loop
    shows as a long scrape, not as a gauge)."""
    last = None
    polls, slowest = 0, 0.0
    while not stop.is_set():
        began = time.monotonic()
        status, body = await get_text(port, "/metrics", timeout=2.0)
        took = time.monotonic() - began
        polls, slowest = polls + 1, max(slowest, took)
        g = fmt_gauges(gauges(body)) if status == 200 else ""
        line = f"{status} {g}"
        if line != last:
            log(f"  {clock.now():+8.3f}s {label:<14} {line}  [{polls} scrapes since last change, "
                f"slowest {slowest * 1000:.0f} ms]")
            last, polls, slowest = line, 0, 0.0
        try:
            await asyncio.wait_for(stop.wait(), every)
        except TimeoutError:
            pass


async def poll_health(port: int, clock: Clock, log: Report, stop: asyncio.Event, every: float) -> None:
    last = None
    while not stop.is_set():
        status, _ = await get_text(port, "/health", timeout=2.0)
        if status != last:
            log(f"  {clock.now():+8.3f}s {'health':<14} {status}")
            last = status
        try:
            await asyncio.wait_for(stop.wait(), every)
        except TimeoutError:
            pass


async def watch_exit(server: real_vllm.RealVllm, clock: Clock, log: Report, limit: float) -> int | None:
    deadline = time.monotonic() + limit
    assert server.proc is not None
    while time.monotonic() < deadline:
        code = server.proc.poll()
        if code is not None:
            log(f"  {clock.now():+8.3f}s {'process-exit':<14} code {code} "
                f"({'signal ' + signal.Signals(-code).name if code < 0 else 'exit status'})")
            return code
        await asyncio.sleep(0.01)
    log(f"  {clock.now():+8.3f}s {'process-alive':<14} still running after {limit:.0f}s")
    return None


async def watch_port(port: int, clock: Clock, log: Report, limit: float) -> None:
    """When the listening socket stops accepting connections."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            _, writer = await asyncio.open_connection(HOST, port)
            writer.close()
        except OSError as exc:
            log(f"  {clock.now():+8.3f}s {'port-closed':<14} new connections fail: {type(exc).__name__}")
            return
        await asyncio.sleep(0.01)


async def calibrate(port: int, log: Report) -> float:
    """Seconds per token of one stream right now (for choosing max_tokens)."""
    clock = Clock()
    ex = Exchange("calibration", clock)
    await exchange(ex, port, "POST", "/v1/completions", completion_body(1000), wait_eof=0)
    data = [e for e in ex.events if e[1] == "data"]
    per_token = (data[-2][0] - data[0][0]) / max(len(data) - 2, 1) if len(data) > 3 else 0.005
    log(f"calibration: 1000 tokens in {clock.now():.2f}s, {per_token * 1000:.2f} ms a token after the first")
    return per_token


def tokens_for(seconds: float, per_token: float) -> int:
    return max(16, min(60000, int(seconds / per_token)))


def start_server(out: Path, name: str, log: Report, **kwargs: Any) -> real_vllm.RealVllm:
    server = real_vllm.RealVllm(log=out / f"{name}.server.log", **kwargs)
    log(f"command: {' '.join(server.command()[1:])}")
    seconds = server.start()
    rss = server.rss_bytes()
    log(f"healthy after {seconds:.1f}s; RSS " + ", ".join(f"{k}: {v / 2**20:.0f} MiB" for k, v in rss.items())
        + f"; total {sum(rss.values()) / 2**30:.2f} GiB")
    return server


# --- scenarios ---------------------------------------------------------------------------------

async def sc_metrics(out: Path, run: int) -> None:
    log = Report(out / f"metrics-{run}.txt")
    with start_server(out, f"metrics-{run}", log) as server:
        port = server.port
        status, text = await get_text(port, "/health")
        log(f"GET /health idle -> {status} body={text!r}")
        status, text = await get_text(port, "/metrics")
        log(f"GET /metrics idle -> {status}; vllm: series (name{{labels}} value):")
        for line in text.splitlines():
            if line.startswith("vllm:") and not re.search(r"_bucket\{", line):
                log(f"    {line}")
        log("  # HELP/TYPE lines of vllm: metrics:")
        for line in text.splitlines():
            if line.startswith("# TYPE vllm:"):
                log(f"    {line}")
        per_token = await calibrate(port, log)

        log("\n== 3 streams of ~4 s; /metrics polled every 50 ms (changes only)")
        clock = Clock()
        stop = asyncio.Event()
        poller = asyncio.create_task(poll_metrics(port, clock, log, stop, 0.05))
        await asyncio.sleep(0.3)
        exes = [Exchange(f"stream {i}", clock) for i in range(3)]
        tasks = [asyncio.create_task(exchange(ex, port, "POST", "/v1/completions",
                                              completion_body(tokens_for(4, per_token)), wait_eof=0.5))
                 for ex in exes]
        await asyncio.sleep(1.5)
        status, text = await get_text(port, "/health")
        log(f"  {clock.now():+8.3f}s GET /health while streaming -> {status}")
        await asyncio.gather(*tasks)
        await asyncio.sleep(1.5)
        stop.set()
        await poller
        for ex in exes:
            log(ex.render())

        log("\n== is a request counted while the API server still tokenizes it? one request with a"
            " ~45 KB prompt (rejected or not), /metrics polled every 10 ms")
        clock = Clock()
        stop = asyncio.Event()
        poller = asyncio.create_task(poll_metrics(port, clock, log, stop, 0.01))
        await asyncio.sleep(0.2)
        big = Exchange("big prompt", clock)
        prompt = " ".join(["spot instance drain eviction"] * 1500)
        await exchange(big, port, "POST", "/v1/completions",
                       completion_body(tokens_for(1, per_token), prompt=prompt, stream=False), wait_eof=0)
        await asyncio.sleep(0.5)
        stop.set()
        await poller
        log(big.render())

        log("\n== more requests than --max-num-seqs (16): 24 streams of ~3 s; gauges every 50 ms")
        clock = Clock()
        stop = asyncio.Event()
        poller = asyncio.create_task(poll_metrics(port, clock, log, stop, 0.05))
        exes = [Exchange(f"burst {i}", clock) for i in range(24)]
        tasks = [asyncio.create_task(exchange(ex, port, "POST", "/v1/completions",
                                              completion_body(tokens_for(3, per_token)), wait_eof=0))
                 for ex in exes]
        await asyncio.gather(*tasks)
        await asyncio.sleep(1.0)
        stop.set()
        await poller
        ends = sorted(ex.events[-1][0] - clock.t0 for ex in exes)
        log(f"  24 streams ended between {ends[0]:+.3f}s and {ends[-1]:+.3f}s; statuses "
            f"{sorted({ex.status for ex in exes})}")
        status, text = await get_text(port, "/metrics")
        log("\n/metrics after all that (selected series):")
        for line in text.splitlines():
            if re.match(r"vllm:(num_requests|kv_cache|request_success_total|prompt_tokens_total|"
                        r"generation_tokens_total|e2e_request_latency_seconds_count|"
                        r"time_to_first_token_seconds_count)", line):
                log(f"    {line}")
    log.save()


async def sc_disconnect(out: Path, run: int) -> None:
    log = Report(out / f"disconnect-{run}.txt")
    with start_server(out, f"disconnect-{run}", log) as server:
        port = server.port
        per_token = await calibrate(port, log)
        for count in (3, 12):
            log(f"\n== {count} streams of ~20 s; all clients disconnect at +2 s; /metrics every 50 ms")
            clock = Clock()
            stop = asyncio.Event()
            poller = asyncio.create_task(poll_metrics(port, clock, log, stop, 0.05))
            exes = [Exchange(f"stream {i}", clock) for i in range(count)]
            tasks = [asyncio.create_task(exchange(ex, port, "POST", "/v1/completions",
                                                  completion_body(tokens_for(20, per_token)), wait_eof=0))
                     for ex in exes]
            await asyncio.sleep(2.0)
            log(f"  {clock.now():+8.3f}s {'disconnect':<14} closing {count} client sockets")
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.sleep(4.0)
            stop.set()
            await poller
            log(exes[0].render())
        log("\n== after the aborts, the server idle for 6 s: do the gauges stay where they were?")
        clock = Clock()
        stop = asyncio.Event()
        poller = asyncio.create_task(poll_metrics(port, clock, log, stop, 0.5))
        await asyncio.sleep(6)
        stop.set()
        await poller
        log("\n== one new short request after that")
        ex = Exchange("after", clock)
        await exchange(ex, port, "POST", "/v1/completions", completion_body(5), wait_eof=0)
        status, text = await get_text(port, "/metrics")
        log(f"  {clock.now():+8.3f}s metrics {fmt_gauges(gauges(text))}")
    log.save()


async def sc_sigterm(out: Path, run: int, *, shutdown_timeout: int | None, stream_seconds: float,
                     name: str, second_sigterm_at: float | None = None, late_request_at: float = 1.0,
                     release_clients_at: float | None = None) -> None:
    log = Report(out / f"{name}-{run}.txt")
    with start_server(out, f"{name}-{run}", log, shutdown_timeout=shutdown_timeout) as server:
        port = server.port
        per_token = await calibrate(port, log)
        tokens = tokens_for(stream_seconds, per_token)
        log(f"\n== 3 streams of {tokens} tokens (~{stream_seconds:.0f} s); SIGTERM to the API server at "
            f"+1.0 s after they start; times below are relative to the SIGTERM")
        clock = Clock()
        exes = [Exchange(f"stream {i}", clock) for i in range(3)]
        tasks = [asyncio.create_task(exchange(ex, port, "POST", "/v1/completions", completion_body(tokens),
                                              wait_eof=3.0)) for ex in exes]
        await asyncio.sleep(1.0)
        clock.mark()
        server.sigterm()
        log(f"  {clock.now():+8.3f}s {'SIGTERM':<14} sent to pid {server.pid}")
        stop = asyncio.Event()
        watchers = [asyncio.create_task(poll_metrics(port, clock, log, stop, 0.1)),
                    asyncio.create_task(poll_health(port, clock, log, stop, 0.1)),
                    asyncio.create_task(watch_port(port, clock, log, 120))]
        exit_task = asyncio.create_task(watch_exit(server, clock, log, 120 if release_clients_at is None
                                                   else release_clients_at + 30))
        late: list[asyncio.Task[Exchange]] = []
        await asyncio.sleep(late_request_at)
        if server.proc is not None and server.proc.poll() is None:
            for path, body in (("/v1/completions", completion_body(5, stream=True)),
                               ("/v1/completions", completion_body(5, stream=False)),
                               ("/v1/chat/completions", {"model": real_vllm.MODEL_NAME, "max_tokens": 5,
                                                         "messages": [{"role": "user", "content": "hi"}]})):
                ex = Exchange(f"new request during shutdown: {path} stream={body.get('stream', False)}", clock)
                late.append(asyncio.create_task(exchange(ex, port, "POST", path, body, wait_eof=1.0)))
            await asyncio.gather(*late)
        if second_sigterm_at is not None:
            await asyncio.sleep(max(0.0, second_sigterm_at - clock.now()))
            if server.proc is not None and server.proc.poll() is None:
                server.sigterm()
                log(f"  {clock.now():+8.3f}s {'SIGTERM #2':<14} sent")
        if release_clients_at is not None:
            await asyncio.sleep(max(0.0, release_clients_at - clock.now()))
            alive = server.proc is not None and server.proc.poll() is None
            open_streams = [ex for ex in exes if not ex.ended.is_set()]
            log(f"  {clock.now():+8.3f}s {'clients-close':<14} process alive={alive}; "
                f"{len(open_streams)} streams still open; the probe closes them now")
            for task in tasks:
                task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        code = await exit_task
        stop.set()
        await asyncio.gather(*watchers, return_exceptions=True)
        for ex in exes + [t.result() for t in late]:
            log(ex.render())
        log(f"\nexit code {code}")
    log.save()


async def sc_disable_log_stats(out: Path, run: int) -> None:
    log = Report(out / f"disable-log-stats-{run}.txt")
    with start_server(out, f"disable-log-stats-{run}", log, extra_args=("--disable-log-stats",)) as server:
        port = server.port
        ex = Exchange("one request", Clock())
        await exchange(ex, port, "POST", "/v1/completions", completion_body(20), wait_eof=0)
        status, text = await get_text(port, "/metrics")
        names = sorted({m.group(1) for line in text.splitlines() if (m := METRIC_RE.match(line))})
        log(f"GET /metrics with --disable-log-stats -> {status}; {len(text)} bytes; "
            f"vllm: series: {names or 'none'}")
        others = sorted({line.split("{")[0].split(" ")[0] for line in text.splitlines()
                         if line and not line.startswith("#")})
        log(f"  series present: {others}")
    log.save()


async def sc_flags(out: Path, run: int) -> None:
    """How the flag parser takes odd --shutdown-timeout values (a server that starts is stopped)."""
    log = Report(out / f"flags-{run}.txt")
    python = real_vllm.venv_python()
    for value in ("1.5", "-1"):
        cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model",
               str(real_vllm.cache_root() / "tiny-llama"), "--host", HOST, "--port", str(real_vllm.free_port()),
               *real_vllm.SERVER_ARGS, "--shutdown-timeout", value]
        proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.STDOUT, start_new_session=True,
                                                    env={**__import__("os").environ, **real_vllm.SERVER_ENV})
        try:
            output, _ = await asyncio.wait_for(proc.communicate(), 150)
            code: int | str | None = proc.returncode
        except TimeoutError:
            __import__("os").killpg(proc.pid, signal.SIGKILL)
            output, _ = await proc.communicate()
            code = "still running after 150 s (killed)"
        lines = [line for line in output.decode(errors="replace").splitlines()
                 if re.search(r"shutdown.timeout|[Ee]rror", line)]
        log(f"--shutdown-timeout {value}: exit {code}")
        for line in lines[-4:]:
            log(f"    {line[:400]}")
    log.save()


SCENARIOS = {
    "metrics": lambda out, run: sc_metrics(out, run),
    "disconnect": lambda out, run: sc_disconnect(out, run),
    # Streams of ~30 s, and the probe lets go of them at +15 s: when the EngineCore is killed before
    # it sends its abort outputs (a race, see docs/real-vllm-facts.md), they go silent and the
    # process waits for the clients.
    "sigterm": lambda out, run: sc_sigterm(out, run, shutdown_timeout=None, stream_seconds=30, name="sigterm",
                                           release_clients_at=15.0),
    "drain": lambda out, run: sc_sigterm(out, run, shutdown_timeout=10, stream_seconds=4, name="drain"),
    "drain-timeout": lambda out, run: sc_sigterm(out, run, shutdown_timeout=3, stream_seconds=30,
                                                 name="drain-timeout", release_clients_at=15.0),
    "second-sigterm": lambda out, run: sc_sigterm(out, run, shutdown_timeout=10, stream_seconds=5,
                                                  name="second-sigterm", second_sigterm_at=1.5),
    "disable-log-stats": lambda out, run: sc_disable_log_stats(out, run),
    "flags": lambda out, run: sc_flags(out, run),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("scenarios", nargs="*", default=list(SCENARIOS))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    def _interrupt(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")  # so the servers' cleanup (killpg) still runs

    signal.signal(signal.SIGTERM, _interrupt)
    for name in args.scenarios:
        for run in range(1, args.runs + 1):
            print(f"\n##### {name} run {run}", flush=True)
            asyncio.run(SCENARIOS[name](args.out, run))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

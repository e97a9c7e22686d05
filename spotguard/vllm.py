"""Read how many requests a vLLM server has in flight, from its Prometheus /metrics.

In-flight = `vllm:num_requests_running` + `vllm:num_requests_waiting`, summed over every series:
a data-parallel vLLM exports one series per `engine` label value, and the `model_name` label
is summed too. Names are matched exactly, never by prefix: newer vLLM also exports
`vllm:num_requests_waiting_by_reason` (the same waiting requests split by reason), and counting it
would double the waiting count and stall every drain.

`parse_in_flight` is pure (text in, `InFlight` out); `read_in_flight` adds the HTTP GET. Every
failure is a `ScrapeError` whose `reason` is a `ScrapeFailure`, so the daemon can count it under
spotguard_vllm_scrape_errors_total{reason} without a mapping table.
"""

from __future__ import annotations

import asyncio
import enum
import math
from dataclasses import dataclass

import aiohttp
from prometheus_client.parser import text_string_to_metric_families


RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
KV_CACHE_USAGE = "vllm:kv_cache_usage_perc"
# The name before vLLM renamed it (V0 engine and early V1 releases).
KV_CACHE_USAGE_OLD = "vllm:gpu_cache_usage_perc"
ENGINE_LABEL = "engine"
# A histogram observed once per engine step: its count moves while an engine does any work.
ENGINE_STEPS = "vllm:iteration_tokens_total_count"
# Gauges that say "in flight" while no engine step has run for this long are stale (vLLM #22545:
# after every request was aborted, no step runs to publish the zeros).
STALE_GAUGE_SECONDS = 1.0

# A vLLM /metrics is tens to a few hundred KiB (histograms per engine, per LoRA). 8 MiB leaves
# room for large data-parallel deployments while a runaway or hostile endpoint cannot make the
# daemon, which runs on every GPU node, hold an unbounded body in memory.
MAX_BODY_BYTES = 8 * 1024 * 1024


class ScrapeFailure(enum.StrEnum):
    """Why a read of vLLM's /metrics failed: the `reason` label of
    spotguard_vllm_scrape_errors_total (observability derives its label values from this)."""

    CONNECTION = "connection"
    TIMEOUT = "timeout"
    HTTP = "http"
    BAD_BODY = "bad_body"


class ScrapeError(Exception):
    """Reading a vLLM /metrics failed, for `reason`."""

    def __init__(self, reason: ScrapeFailure, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class ScrapeConnectionError(ScrapeError):
    """Nothing answered, or the connection broke before the whole body arrived."""

    def __init__(self, message: str) -> None:
        super().__init__(ScrapeFailure.CONNECTION, message)


class ScrapeTimeoutError(ScrapeError):
    """The server did not send the whole response within the timeout."""

    def __init__(self, message: str) -> None:
        super().__init__(ScrapeFailure.TIMEOUT, message)


class ScrapeHTTPError(ScrapeError):
    """The server answered with a status other than 200."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(ScrapeFailure.HTTP, message)
        self.status = status


class MetricsFormatError(ScrapeError):
    """The body is not a vLLM /metrics page we can trust a drain decision on."""

    def __init__(self, message: str) -> None:
        super().__init__(ScrapeFailure.BAD_BODY, message)


@dataclass(frozen=True)
class InFlight:
    """One reading of a vLLM server's request queue, summed over its engines."""

    running: float
    waiting: float
    # Distinct `engine` label values seen (1 for a server whose series carry no engine label).
    engines: int
    # Fraction 0..1 of KV-cache blocks in use on the fullest engine; None when not exported.
    kv_cache_usage: float | None
    # Engine steps so far, summed over engines (vllm:iteration_tokens_total); None when not exported.
    engine_steps: float | None = None

    @property
    def total(self) -> float:
        return self.running + self.waiting


def parse_in_flight(text: str) -> InFlight:
    """Sum vLLM's running and waiting gauges over every engine and model.

    Raises MetricsFormatError when the text does not parse, when either gauge has no series at all
    (a missing half would under-count and end a drain early), or when a value is NaN, infinite or
    negative (a gauge of requests cannot be; trusting it could end a drain early too).
    """
    running: list[float] = []
    waiting: list[float] = []
    engines: set[str] = set()
    kv_new: list[float] = []
    kv_old: list[float] = []
    steps: list[float] = []
    try:
        # The parser is lazy: errors surface while iterating, so the whole walk is inside the try.
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == RUNNING or sample.name == WAITING:
                    value = float(sample.value)
                    if math.isnan(value) or math.isinf(value) or value < 0:
                        raise MetricsFormatError(f"{sample.name}{_labels(sample.labels)} is {value}, "
                                                 "not a count of requests")
                    (running if sample.name == RUNNING else waiting).append(value)
                    engines.add(sample.labels.get(ENGINE_LABEL, ""))
                elif sample.name == KV_CACHE_USAGE:
                    kv_new.append(float(sample.value))
                elif sample.name == KV_CACHE_USAGE_OLD:
                    kv_old.append(float(sample.value))
                elif sample.name == ENGINE_STEPS:
                    steps.append(float(sample.value))
    except MetricsFormatError:
        raise
    except Exception as exc:  # noqa: BLE001 - see below
        # The body comes from a pod we do not control, and prometheus_client's parser raises
        # whatever its string handling trips on (ValueError mostly, but not only). Any failure to
        # parse is the same fact for the caller: this body cannot be trusted.
        raise MetricsFormatError(f"not Prometheus text exposition: {type(exc).__name__}: {exc}") from exc

    missing = [name for name, values in ((RUNNING, running), (WAITING, waiting)) if not values]
    if missing and not (running or waiting) and "vllm:" not in text:
        raise MetricsFormatError("no vllm: series at all: vLLM runs with --disable-log-stats (or this is not "
                                 "vLLM's /metrics); only the time budget can end its drain")
    if missing:
        raise MetricsFormatError(f"no series for {' and '.join(missing)}: is this a vLLM /metrics?")
    return InFlight(running=sum(running), waiting=sum(waiting), engines=len(engines),
                    kv_cache_usage=_fullest(kv_new) if kv_new else _fullest(kv_old),
                    engine_steps=sum(steps) if steps and all(math.isfinite(v) for v in steps) else None)


@dataclass(frozen=True)
class EngineActivity:
    """The engine-step count of one pod's vLLM as last read, and since when it has had that value."""

    steps: float
    since: float


def follow_engine(previous: EngineActivity | None, reading: InFlight, *, now: float) -> EngineActivity | None:
    """Update what is known of a pod's engine steps with a new reading taken at `now` (monotonic)."""
    if reading.engine_steps is None:
        return None
    if previous is None or previous.steps != reading.engine_steps:
        return EngineActivity(steps=reading.engine_steps, since=now)
    return previous


def settled_in_flight(reading: InFlight, activity: EngineActivity | None, *, now: float) -> int:
    """The in-flight count to drain on: the gauges, unless they say "busy" while no engine step has
    run for STALE_GAUGE_SECONDS, which no working engine does (each step moves the step counter).
    Then the gauges are stale (vLLM #22545, or a frozen engine) and nothing is in flight. Without
    the step counter (older vLLM) the gauges are all there is."""
    count = int(reading.total)
    if count and activity is not None and now - activity.since >= STALE_GAUGE_SECONDS:
        return 0
    return count


async def read_in_flight(session: aiohttp.ClientSession, url: str, *, timeout: float,
                         max_body_bytes: int = MAX_BODY_BYTES) -> InFlight:
    """GET `url` (a vLLM /metrics) and parse it; every failure is a ScrapeError.

    `timeout` bounds the whole exchange (connect, headers and body), so a server that trickles
    bytes cannot hold a drain past its budget.
    """
    try:
        async with asyncio.timeout(timeout):
            body = await _get_body(session, url, max_body_bytes=max_body_bytes)
    except TimeoutError as exc:
        raise ScrapeTimeoutError(f"GET {url}: no complete answer within {timeout:g} s") from exc
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MetricsFormatError(f"GET {url}: body is not UTF-8 ({exc})") from exc
    try:
        return parse_in_flight(text)
    except MetricsFormatError as exc:
        raise MetricsFormatError(f"GET {url}: {exc}") from exc


async def _get_body(session: aiohttp.ClientSession, url: str, *, max_body_bytes: int) -> bytes:
    try:
        # Plain text exposition explicitly: the parser does not read OpenMetrics.
        async with session.get(url, headers={"Accept": "text/plain"}, allow_redirects=False) as resp:
            if resp.status != 200:
                raise ScrapeHTTPError(resp.status, f"GET {url}: HTTP {resp.status} {resp.reason or ''}".rstrip())
            if resp.content_length is not None and resp.content_length > max_body_bytes:
                raise MetricsFormatError(f"GET {url}: body of {resp.content_length} bytes exceeds "
                                         f"the {max_body_bytes} byte limit")
            chunks: list[bytes] = []
            size = 0
            # Counted after decompression, so a small gzip body cannot expand without limit either.
            async for chunk in resp.content.iter_chunked(64 * 1024):
                size += len(chunk)
                if size > max_body_bytes:
                    raise MetricsFormatError(f"GET {url}: body exceeds the {max_body_bytes} byte limit")
                chunks.append(chunk)
            return b"".join(chunks)
    except asyncio.CancelledError:
        raise
    except (ScrapeError, TimeoutError):
        raise
    except aiohttp.ClientResponseError as exc:
        # A response arrived but was not valid HTTP (or failed mid-way in a way aiohttp classes
        # as a response problem).
        raise ScrapeHTTPError(exc.status, f"GET {url}: bad HTTP response: {exc}") from exc
    except (aiohttp.ClientError, OSError) as exc:
        raise ScrapeConnectionError(f"GET {url}: {type(exc).__name__}: {exc}") from exc


def _fullest(values: list[float]) -> float | None:
    # Informational only: a NaN or out-of-range usage is dropped rather than failing the scrape.
    usable = [v for v in values if 0.0 <= v <= 1.0]
    return max(usable) if usable else None


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"

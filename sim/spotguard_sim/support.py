"""Small helpers the simulation and its tests share: the simulation's user agent, a free loopback
port, waiting for a condition (blocking and async), a nearest-rank quantile and one Prometheus
sample sum. One copy each."""

from __future__ import annotations

import asyncio
import inspect
import math
import socket
import time
from typing import Any, Callable, Iterable

from spotguard import __version__

# The simulation's own API requests say so: the benchmark counts the daemons' requests in the
# API server's audit log by their user agent, `spotguard/<version>`.
USER_AGENT = f"spotguard-sim/{__version__}"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the OS's pick), on a loopback address."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_until(check: Callable[[], Any], *, timeout: float, interval: float = 0.1, what: str = "condition") -> Any:
    """Call `check` until it returns something truthy, which is returned; blocking. An exception
    from `check` counts as "not yet", and the last one is named if time runs out."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except Exception as error:  # noqa: BLE001 - keep polling; report the last one
            last_error = error
        time.sleep(interval)
    raise TimeoutError(f"{what} not reached in {timeout:g}s" + (f" (last error: {last_error})" if last_error else ""))


async def eventually(check: Callable[[], Any], *, timeout: float = 5.0, what: str = "condition",
                     interval: float = 0.05) -> Any:
    """The async `wait_until`: `check` may be a plain function or a coroutine function. Unlike
    `wait_until` an exception from `check` is raised at once (tests want to see it)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached in {timeout:g}s")
        await asyncio.sleep(interval)


def quantile(values: Iterable[float | None], q: float) -> float | None:
    """Nearest-rank quantile, no interpolation (with few samples p99 is the maximum); None values
    are skipped; None when there is nothing left."""
    ordered = sorted(v for v in values if v is not None)
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples called `name` whose labels include `labels`, in Prometheus text."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()))

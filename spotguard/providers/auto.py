"""`--provider auto`: find the cloud by probing each provider in turn, then be that provider."""

from __future__ import annotations

import asyncio
import time
from contextlib import aclosing
from typing import AsyncIterator, Callable

import structlog

from spotguard.backoff import backoff_delay
from spotguard.config import Config
from spotguard.notice import Notice
from spotguard.providers.base import Factory, Provider, ProviderUnreachable, unheard

# Providers `auto` tries, in order.
# GCE first: its probe fails at once off GCE (metadata.google.internal does not resolve), while
# 169.254.169.254 answers on several clouds, and each probe there checks for its own cloud's answer.
AUTO_ORDER: tuple[str, ...] = ("gce", "aws", "azure")


async def detect(config: Config, registry: dict[str, Factory], *,
                 on_error: Callable[[str], None] = unheard,
                 on_ok: Callable[[], None] = unheard,
                 clock: Callable[[], float] = time.time) -> Provider:
    """The configured provider; for `auto`, the first whose metadata server answers a probe.

    Raises `ProviderUnreachable` naming every provider tried and why it failed, so an operator
    running off-cloud (or with a blocked metadata server) sees one clear line.
    """
    if config.provider != "auto":
        return registry[config.provider](config, on_error=on_error, on_ok=on_ok, clock=clock)
    failures: list[ProviderUnreachable] = []
    for name in AUTO_ORDER:
        provider = registry[name](config, on_error=on_error, on_ok=on_ok, clock=clock)
        try:
            await provider.probe()
        except ProviderUnreachable as error:
            failures.append(error)
            continue
        return provider
    raise ProviderUnreachable(
        "--provider auto: no cloud metadata server answered ("
        + "; ".join(f"{name}: {error}" for name, error in zip(AUTO_ORDER, failures)) + "); "
        "set --provider / SPOTGUARD_PROVIDER, or --metadata-url if the server lives elsewhere",
        reason=failures[0].reason)


class AutoProvider:
    """`--provider auto`: find the cloud, then be its provider.

    Watching it probes every provider of AUTO_ORDER until one answers, retrying in-process with
    backoff capped at 2 s like the GCE provider's own retries (so a notice that comes right after
    the metadata server does is not missed). Meanwhile the daemon runs: /healthz answers, /readyz says the
    metadata server is not reachable, spotguard_metadata_up is 0 (the SpotguardMetadataUnreachable
    alert), and a drain saved on the node resumes. Exiting instead would put the pod in
    CrashLoopBackOff, whose restart delay grows to 5 minutes: the node unguarded that long because,
    say, GKE's gke-metadata-server started a little after spotguard on a new node.
    """

    def __init__(self, config: Config, registry: dict[str, Factory], *, on_error: Callable[[str], None] = unheard,
                 on_ok: Callable[[], None] = unheard, clock: Callable[[], float] = time.time,
                 on_detected: Callable[[str], None] = unheard,
                 backoff_base: float = 0.5, backoff_cap: float = 2.0) -> None:
        self.name = "auto"   # the detected provider's name once found
        self._config = config
        self._registry = registry
        self._on_error, self._on_ok, self._clock = on_error, on_ok, clock
        self._on_detected = on_detected
        self._backoff_base, self._backoff_cap = backoff_base, backoff_cap
        self._found: Provider | None = None
        self._log = structlog.get_logger(provider="auto")

    async def probe(self) -> None:
        await self._detect_once()

    async def _detect_once(self) -> Provider:
        if self._found is None:
            found = await detect(self._config, self._registry, on_error=self._on_error, on_ok=self._on_ok, clock=self._clock)
            self._log.info("provider detected", detected=found.name)
            # Told before it is kept: should the callback fail, the next call detects and tells again.
            self._on_detected(found.name)
            self._found, self.name = found, found.name
        return self._found

    async def watch(self) -> AsyncIterator[Notice | None]:
        failures = 0
        while True:
            try:
                found = await self._detect_once()
                break
            except ProviderUnreachable as error:
                self._on_error(error.reason)
                delay = backoff_delay(failures, base=self._backoff_base, cap=self._backoff_cap)
                failures += 1
                self._log.warning("no metadata server answered yet", error=str(error), failed_probes=failures,
                                  retry_in_seconds=round(delay, 3))
                await asyncio.sleep(delay)
        async with aclosing(found.watch()) as notices:
            async for notice in notices:
                yield notice

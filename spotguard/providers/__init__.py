"""Where notices come from: one small interface every cloud implements, and the choice of cloud.

A provider turns its cloud's metadata service into a stream of `Notice | None`; the daemon and the
lifecycle never know which cloud spoke. Adding a cloud means one module here and a few lines in
`make_provider`, nothing in the daemon.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import aclosing
from typing import AsyncIterator, Callable, Protocol

import structlog

from spotguard.backoff import backoff_delay
from spotguard.config import AWS_DEFAULT_METADATA_URL, AZURE_DEFAULT_METADATA_URL, GCE_DEFAULT_METADATA_URL, Config
from spotguard.notice import Notice

# Providers `auto` tries, in order.
# GCE first: its probe fails at once off GCE (metadata.google.internal does not resolve), while
# 169.254.169.254 answers on several clouds, and each probe there checks for its own cloud's answer.
AUTO_ORDER: tuple[str, ...] = ("gce", "aws", "azure")


class ProviderUnreachable(Exception):
    """The metadata server did not answer as expected; the message says where and why, `reason` is
    the category counted in spotguard_metadata_errors_total (connection, timeout, bad_body, ...)."""

    def __init__(self, message: str, *, reason: str = "connection") -> None:
        super().__init__(message)
        self.reason = reason


class Provider(Protocol):
    # Short cloud name, used as the `provider` label of metrics and in logs: "gce", "aws", ...
    name: str

    def watch(self) -> AsyncIterator[Notice | None]:
        """Yield the state read at start-up, then again at every change.

        The first item is what the cloud says now (a notice already present when the daemon
        starts must be acted on). Later items come only when the state changes: a `Notice` while
        the VM is going away, `None` when that is withdrawn. Errors talking to the metadata server
        are retried inside, never raised. Close it with `contextlib.aclosing` (or let the task
        iterating it be cancelled) so its connections are released.
        """
        ...

    async def probe(self) -> None:
        """One quick request; raises `ProviderUnreachable` with a readable reason if it fails."""
        ...


def unheard(*_: object) -> None:
    """The default of every callback (on_error, on_ok, on_detected) nobody passed: not reported."""


def make_provider(config: Config, *, name: str | None = None,
                  on_error: Callable[[str], None] = unheard,
                  on_ok: Callable[[], None] = unheard,
                  on_detected: Callable[[str], None] = unheard,
                  clock: Callable[[], float] = time.time) -> Provider:
    """Build the provider the configuration names (or `name`, used by `detect`), without I/O.

    `on_error(reason)` and `on_ok()` are called for every failed / successful request to the
    metadata server (the daemon wires them to spotguard_metadata_errors_total and
    spotguard_metadata_up). For `auto` it is an `AutoProvider`, which finds the cloud when watched
    and then calls `on_detected(name)`.
    """
    chosen = name or config.provider
    if chosen == "gce":
        # Imported here so that this module stays importable by every provider module.
        from spotguard.providers.gce import GceProvider

        return GceProvider(root_url=config.metadata_url or config.gce_metadata_host_url or GCE_DEFAULT_METADATA_URL,
                           notice_seconds=config.notice_seconds,
                           on_error=on_error, on_ok=on_ok, clock=clock)
    if chosen == "aws":
        from spotguard.providers.aws import AwsProvider

        return AwsProvider(root_url=config.metadata_url or AWS_DEFAULT_METADATA_URL,
                           notice_seconds=config.notice_seconds,
                           on_error=on_error, on_ok=on_ok, clock=clock)
    if chosen == "azure":
        from spotguard.providers.azure import AzureProvider

        return AzureProvider(root_url=config.metadata_url or AZURE_DEFAULT_METADATA_URL,
                             notice_seconds=config.notice_seconds,
                             on_error=on_error, on_ok=on_ok, clock=clock)
    if chosen == "auto":
        return AutoProvider(config, on_error=on_error, on_ok=on_ok, on_detected=on_detected, clock=clock)
    raise ValueError(f"no provider named {chosen!r}; known: auto, {', '.join(AUTO_ORDER)}")


async def detect(config: Config, *,
                 on_error: Callable[[str], None] = unheard,
                 on_ok: Callable[[], None] = unheard,
                 clock: Callable[[], float] = time.time) -> Provider:
    """The configured provider; for `auto`, the first whose metadata server answers a probe.

    Raises `ProviderUnreachable` naming every provider tried and why it failed, so an operator
    running off-cloud (or with a blocked metadata server) sees one clear line.
    """
    if config.provider != "auto":
        return make_provider(config, on_error=on_error, on_ok=on_ok, clock=clock)
    failures: list[ProviderUnreachable] = []
    for name in AUTO_ORDER:
        provider = make_provider(config, name=name, on_error=on_error, on_ok=on_ok, clock=clock)
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

    def __init__(self, config: Config, *, on_error: Callable[[str], None] = unheard,
                 on_ok: Callable[[], None] = unheard, clock: Callable[[], float] = time.time,
                 on_detected: Callable[[str], None] = unheard,
                 backoff_base: float = 0.5, backoff_cap: float = 2.0) -> None:
        self.name = "auto"   # the detected provider's name once found
        self._config = config
        self._on_error, self._on_ok, self._clock = on_error, on_ok, clock
        self._on_detected = on_detected
        self._backoff_base, self._backoff_cap = backoff_base, backoff_cap
        self._found: Provider | None = None
        self._log = structlog.get_logger(provider="auto")

    async def probe(self) -> None:
        await self._detect_once()

    async def _detect_once(self) -> Provider:
        if self._found is None:
            found = await detect(self._config, on_error=self._on_error, on_ok=self._on_ok, clock=self._clock)
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

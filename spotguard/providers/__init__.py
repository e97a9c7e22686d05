"""Where notices come from: one small interface every cloud implements, and the choice of cloud.

A provider turns its cloud's metadata service into a stream of `Notice | None`; the daemon and the
lifecycle never know which cloud spoke. Adding AWS or Azure means one module here and one line in
`_build`, nothing in the daemon.
"""

from __future__ import annotations

import time
from typing import AsyncIterator, Callable, Protocol

from spotguard.config import GCE_DEFAULT_METADATA_URL, Config
from spotguard.notice import Notice

# Providers `auto` tries, in order. Only clouds whose provider exists are listed.
AUTO_ORDER: tuple[str, ...] = ("gce",)


class ProviderUnreachable(Exception):
    """The metadata server did not answer as expected; the message says where and why."""


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


def _ignore_error(reason: str) -> None:
    pass


def _ignore_ok() -> None:
    pass


def make_provider(config: Config, *, name: str | None = None,
                  on_error: Callable[[str], None] = _ignore_error,
                  on_ok: Callable[[], None] = _ignore_ok,
                  clock: Callable[[], float] = time.time) -> Provider:
    """Build the provider the configuration names (or `name`, used by `detect`), without I/O.

    `on_error(reason)` and `on_ok()` are called for every failed / successful request to the
    metadata server (the daemon wires them to spotguard_metadata_errors_total and
    spotguard_metadata_up). For `auto`, use `detect`, which has to ask the network.
    """
    chosen = name or config.provider
    if chosen == "gce":
        # Imported here so that this module stays importable by every provider module.
        from spotguard.providers.gce import GceProvider

        return GceProvider(root_url=config.metadata_url or GCE_DEFAULT_METADATA_URL,
                           notice_seconds=config.notice_seconds,
                           on_error=on_error, on_ok=on_ok, clock=clock)
    if chosen == "auto":
        raise ValueError("provider 'auto' needs the network to decide: use `await detect(config)`")
    raise ValueError(f"no provider named {chosen!r} is built; known: {', '.join(AUTO_ORDER)}")


async def detect(config: Config, *,
                 on_error: Callable[[str], None] = _ignore_error,
                 on_ok: Callable[[], None] = _ignore_ok,
                 clock: Callable[[], float] = time.time) -> Provider:
    """The configured provider; for `auto`, the first whose metadata server answers a probe.

    Raises `ProviderUnreachable` naming every provider tried and why it failed, so an operator
    running off-cloud (or with a blocked metadata server) sees one clear line.
    """
    if config.provider != "auto":
        return make_provider(config, on_error=on_error, on_ok=on_ok, clock=clock)
    failures: list[str] = []
    for name in AUTO_ORDER:
        provider = make_provider(config, name=name, on_error=on_error, on_ok=on_ok, clock=clock)
        try:
            await provider.probe()
        except ProviderUnreachable as error:
            failures.append(f"{name}: {error}")
            continue
        return provider
    raise ProviderUnreachable(
        "--provider auto: no cloud metadata server answered (" + "; ".join(failures) + "); "
        "set --provider / SPOTGUARD_PROVIDER, or --metadata-url if the server lives elsewhere")

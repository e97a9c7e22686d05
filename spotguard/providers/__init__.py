"""Where notices come from: the registry of cloud providers, by the name `--provider` takes.

A provider turns its cloud's metadata service into a stream of `Notice | None` (the interface is
`base.Provider`); the daemon and the lifecycle never know which cloud spoke. Adding a cloud means one
module here with a `from_config` factory and one line in `REGISTRY`, nothing in the daemon.
"""

from __future__ import annotations

import time
from typing import Callable

from spotguard.config import Config
from spotguard.providers import auto, aws, azure, gce
from spotguard.providers.auto import AUTO_ORDER, AutoProvider
from spotguard.providers.base import Factory, Provider, ProviderUnreachable, unheard

__all__ = ["AUTO_ORDER", "REGISTRY", "AutoProvider", "Factory", "Provider", "ProviderUnreachable", "detect",
           "make_provider", "unheard"]


# Every cloud by its `--provider` name (`auto` is not a cloud: it picks one of these).
REGISTRY: dict[str, Factory] = {
    "gce": gce.from_config,
    "aws": aws.from_config,
    "azure": azure.from_config,
}


def make_provider(config: Config, *, name: str | None = None,
                  on_error: Callable[[str], None] = unheard,
                  on_ok: Callable[[], None] = unheard,
                  on_detected: Callable[[str], None] = unheard,
                  clock: Callable[[], float] = time.time) -> Provider:
    """Build the provider the configuration names (or `name`), without I/O.

    `on_error(reason)` and `on_ok()` are called for every failed / successful request to the
    metadata server (the daemon wires them to spotguard_metadata_errors_total and
    spotguard_metadata_up). For `auto` it is an `AutoProvider`, which finds the cloud when watched
    and then calls `on_detected(name)`.
    """
    chosen = name or config.provider
    if chosen == "auto":
        return auto.AutoProvider(config, REGISTRY, on_error=on_error, on_ok=on_ok, on_detected=on_detected,
                                 clock=clock)
    if chosen not in REGISTRY:
        raise ValueError(f"no provider named {chosen!r}; known: auto, {', '.join(REGISTRY)}")
    return REGISTRY[chosen](config, on_error=on_error, on_ok=on_ok, clock=clock)


async def detect(config: Config, *, on_error: Callable[[str], None] = unheard,
                 on_ok: Callable[[], None] = unheard, clock: Callable[[], float] = time.time) -> Provider:
    """The configured provider; for `auto`, the first whose metadata server answers a probe (see
    `auto.detect`)."""
    return await auto.detect(config, REGISTRY, on_error=on_error, on_ok=on_ok, clock=clock)

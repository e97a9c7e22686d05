"""What every cloud provider is: one small interface, its error, and the default callback.

Kept apart from the registry (`spotguard.providers`) so that a provider module imports only this,
and the registry can import every provider module without a cycle.
"""

from __future__ import annotations

import enum
from typing import AsyncIterator, Callable, Protocol

from spotguard.config import Config
from spotguard.notice import Notice


class MetadataFailure(enum.StrEnum):
    """Why a request to the metadata server failed: the `reason` label of
    spotguard_metadata_errors_total (observability derives its label values from this)."""

    CONNECTION = "connection"
    TIMEOUT = "timeout"
    HTTP_5XX = "http_5xx"
    HTTP_429 = "http_429"
    HTTP_OTHER = "http_other"
    BAD_BODY = "bad_body"
    BAD_FLAVOR = "bad_flavor"  # GCE: an answer without Metadata-Flavor: Google (not the metadata server)


class ProviderUnreachable(Exception):
    """The metadata server did not answer as expected; the message says where and why, `reason` is
    the category counted in spotguard_metadata_errors_total (connection, timeout, bad_body, ...)."""

    def __init__(self, message: str, *, reason: MetadataFailure = MetadataFailure.CONNECTION) -> None:
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


class Factory(Protocol):
    """How the registry builds a provider from the daemon's configuration, without I/O (each
    provider module's `from_config`)."""

    def __call__(self, config: Config, *, on_error: Callable[[str], None], on_ok: Callable[[], None],
                 clock: Callable[[], float]) -> Provider: ...

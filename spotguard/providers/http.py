"""What every provider's talk with its metadata server shares: bounded bodies, failure reasons,
and the readable errors garbage gets.

A metadata server lives on the VM and answers in a few bytes; anything else (a proxy's error page,
a captive portal, a body that never ends) must become one counted, logged error, never a crash or
an unbounded read.
"""

from __future__ import annotations

import asyncio
import json
from contextlib import contextmanager
from datetime import datetime
from typing import Any, Iterator

import aiohttp

from spotguard.providers.base import MetadataFailure, ProviderUnreachable

# Every real body is a few bytes (a JSON document a few hundred). Anything much larger is not the
# metadata server, and reading it all would let a broken proxy exhaust memory.
MAX_BODY_BYTES = 64 * 1024


class MetadataBodyError(ValueError):
    """A metadata body is not what the cloud documents (garbage, non-UTF-8, too large)."""


class RequestFailed(Exception):
    """One failed request, for `reason`."""

    def __init__(self, reason: str, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.status = status


def status_failure(status: int, *, what: str = "") -> RequestFailed:
    """The failure a non-success HTTP status amounts to (`what`: which request, for the message)."""
    if status == 429:
        reason = MetadataFailure.HTTP_429
    elif status >= 500:
        reason = MetadataFailure.HTTP_5XX
    else:
        reason = MetadataFailure.HTTP_OTHER
    return RequestFailed(reason, f"{what + ': ' if what else ''}HTTP {status}", status=status)


def body_text(body: bytes | str, *, key: str) -> str:
    """The body as stripped text; MetadataBodyError when too large or not UTF-8."""
    size = len(body)
    if size > MAX_BODY_BYTES:
        raise MetadataBodyError(f"{key}: body of {size} bytes is larger than {MAX_BODY_BYTES}")
    if isinstance(body, bytes):
        try:
            body = body.decode("utf-8")
        except UnicodeDecodeError:
            raise MetadataBodyError(f"{key}: body is not UTF-8") from None
    return body.strip()


def body_json(body: bytes | str, *, key: str) -> Any:
    """The body parsed as JSON; MetadataBodyError (showing the start of it) when it is not."""
    text = body_text(body, key=key)
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        raise MetadataBodyError(f"{key}: not JSON: {shown(text)}") from None


def shown(text: str) -> str:
    """A bounded repr for error messages, so a garbage body cannot flood the log line."""
    return repr(text[:40] + ("..." if len(text) > 40 else ""))


def parse_rfc3339(text: str) -> float:
    """An RFC 3339 timestamp with a zone (`2025-01-02T03:04:05Z`) as Unix seconds; ValueError else."""
    try:
        moment = datetime.fromisoformat(text)
    except (ValueError, OverflowError, TypeError):
        raise ValueError(f"not an RFC 3339 timestamp: {shown(str(text))}") from None
    if moment.tzinfo is None:
        raise ValueError(f"timestamp has no time zone: {shown(text)}")
    try:
        return moment.timestamp()
    except (ValueError, OverflowError):
        raise ValueError(f"timestamp out of range: {shown(text)}") from None


async def read_limited(response: aiohttp.ClientResponse) -> bytes:
    """The body, refusing (as bad_body) to read more than MAX_BODY_BYTES."""
    too_large = RequestFailed(MetadataFailure.BAD_BODY, f"body larger than {MAX_BODY_BYTES} bytes")
    if response.content_length is not None and response.content_length > MAX_BODY_BYTES:
        raise too_large
    body = bytearray()
    async for chunk in response.content.iter_chunked(16 * 1024):
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise too_large
    return bytes(body)


def transport_failure(error: BaseException, *, timeout: float) -> RequestFailed:
    """What a timeout or a connection error of aiohttp amounts to."""
    if isinstance(error, asyncio.TimeoutError):
        return RequestFailed(MetadataFailure.TIMEOUT, f"no answer within {timeout:g} s")
    return RequestFailed(MetadataFailure.CONNECTION, f"{type(error).__name__}: {error}")


def session(headers: dict[str, str] | None = None) -> aiohttp.ClientSession:
    # trust_env=False: an HTTP(S)_PROXY in the pod's environment must never carry metadata requests
    # off the node.
    return aiohttp.ClientSession(headers=headers, trust_env=False)


@contextmanager
def unreachable_if_failing(where: str) -> Iterator[None]:
    """For a probe: a failed request or an unreadable body inside becomes `ProviderUnreachable`
    naming `where` (the server) and the reason."""
    try:
        yield
    except RequestFailed as failure:
        raise ProviderUnreachable(f"{where}: {failure.reason}: {failure}", reason=failure.reason) from None
    except MetadataBodyError as error:
        raise ProviderUnreachable(f"{where}: bad_body: {error}", reason=MetadataFailure.BAD_BODY) from None

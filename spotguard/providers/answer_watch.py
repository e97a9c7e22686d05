"""A cheap change detector for one metadata URL: a thread that GETs it every few hundred
milliseconds and wakes the provider when the answer changes.

Why a thread and a raw socket: a four-times-a-second poll through aiohttp costs about 1 ms of CPU
per read in the event loop (an idle daemon: 4.0 mCPU, bench 00:10), most of it request building and
response parsing that a change detector does not need. Here one keep-alive connection carries a
request prebuilt as bytes, and only the status line, the Content-Length and the body are looked
at (an idle daemon with this watch: 1.33 mCPU, bench 07:30; docs/BENCHMARKS.md). The provider still reads and judges
everything through its normal path (aiohttp, bounded bodies, parsers, error reporting): this only
tells it *when*, so what it acts on never comes from this crude HTTP reader.

Anything unexpected (refused connection, timeout, a proxy's odd answer, framing it does not
understand) counts as an answer too: it is compared with the last one like any other and never
raised, so the provider's own read then meets the problem and reports it.
"""

from __future__ import annotations

import socket
import threading
from typing import Callable
from urllib.parse import urlsplit

# More than any metadata answer; what is beyond it is not compared.
_MAX_ANSWER_BYTES = 64 * 1024

Answer = tuple[bytes, bytes]  # (status code, body), or (b"error", b"") for any failure


class AnswerWatch:
    """GET `url` every `every` seconds from a daemon thread; call `wake()` (from that thread: it
    must be thread-safe, e.g. `loop.call_soon_threadsafe(event.set)`) when the answer differs from
    the previous one. `headers()` gives the request's headers, read anew each time (a token that
    is renewed); None means "not yet" and skips the read."""

    def __init__(self, url: str, *, headers: Callable[[], dict[str, str] | None], every: float,
                 wake: Callable[[], None], timeout: float = 2.0) -> None:
        parts = urlsplit(url)
        self._address = (parts.hostname or "", parts.port or 80)
        self._host = parts.netloc
        self._path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._headers = headers
        self._every = every
        self._wake = wake
        self._timeout = timeout
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"answer-watch {url}", daemon=True)
        self._socket: socket.socket | None = None
        self._request: tuple[dict[str, str], bytes] | None = None  # headers, and the bytes built from them

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Asks the thread to end; it does within one request's timeout (it never blocks the caller)."""
        self._stopped.set()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread to end; whether it has."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        # The first answer wakes too: a notice that came between the provider's first read and
        # this thread's first one would otherwise be taken as the way things are.
        last: Answer | None = None
        while not self._stopped.is_set():
            headers = self._headers()
            if headers is not None:
                answer = self._ask(headers)
                if answer != last and not self._stopped.is_set():
                    try:
                        self._wake()
                    except RuntimeError:   # the provider's event loop is gone: nobody to tell
                        break
                last = answer
            self._stopped.wait(self._every)
        self._close()

    def _ask(self, headers: dict[str, str]) -> Answer:
        for attempt in (1, 2):
            reused = self._socket is not None
            try:
                return self._get(headers)
            except Exception:  # noqa: BLE001 - any failure is one answer; the provider's own read says which
                self._close()
                # A kept-alive connection the server closed while idle fails without saying anything
                # about the server: ask once more on a new one before calling it an answer.
                if not (reused and attempt == 1):
                    break
        return b"error", b""

    def _get(self, headers: dict[str, str]) -> Answer:
        if self._request is None or self._request[0] != headers:
            lines = [f"GET {self._path} HTTP/1.1", f"Host: {self._host}",
                     *(f"{name}: {value}" for name, value in headers.items())]
            self._request = dict(headers), ("\r\n".join(lines) + "\r\n\r\n").encode()
        if self._socket is None:
            self._socket = socket.create_connection(self._address, timeout=self._timeout)
        self._socket.sendall(self._request[1])
        data = self._socket.recv(_MAX_ANSWER_BYTES)
        if not data:
            raise ConnectionError("closed by the server")   # a kept-alive connection the server dropped
        head, _, body = data.partition(b"\r\n\r\n")
        status = head[9:12]
        fields = head.lower()
        start = fields.find(b"\r\ncontent-length:")
        if start < 0 or b"\r\nconnection: close" in fields or fields.startswith(b"http/1.0"):
            # No length to read up to (chunked, or read-until-close): compare what came, start afresh.
            self._close()
            return status, body
        end = fields.find(b"\r\n", start + 2)
        length = int(fields[start + 17:end if end > 0 else len(fields)].strip())
        if length > _MAX_ANSWER_BYTES:   # more than any metadata answer: compare the start, do not keep the rest
            self._close()
            return status, body[:_MAX_ANSWER_BYTES]
        while len(body) < length:
            more = self._socket.recv(_MAX_ANSWER_BYTES)
            if not more:
                raise ConnectionError("closed in the middle of an answer")
            body += more
        return status, body[:length]

    def _close(self) -> None:
        if self._socket is not None:
            try:
                self._socket.close()
            finally:
                self._socket = None

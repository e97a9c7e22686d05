"""AnswerWatch against small loopback servers: it wakes on a changed answer and only then, treats
every failure as an answer, never raises, and stops."""

from __future__ import annotations

import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator

import pytest
from spotguard_sim.support import wait_until

from spotguard.providers.answer_watch import AnswerWatch

EVERY = 0.02


class Metadata(ThreadingHTTPServer):
    """Answers `status` / `body` on every path, over keep-alive HTTP/1.1; records each request's
    token header and how many connections it accepted."""

    daemon_threads = True

    def __init__(self) -> None:
        self.status, self.body = 404, b"Not Found"
        self.tokens: list[str | None] = []
        self.connections = 0
        self.down = False   # drop every connection without an answer
        self.close_next = False   # close the connection after the next answer
        super().__init__(("127.0.0.1", 0), _Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/latest/meta-data/spot/instance-action"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Metadata

    def setup(self) -> None:
        super().setup()
        self.server.connections += 1

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.server.down:
            self.close_connection = True
            return
        self.server.tokens.append(self.headers.get("X-aws-ec2-metadata-token"))
        self.send_response(self.server.status)
        self.send_header("Content-Length", str(len(self.server.body)))
        self.end_headers()
        self.wfile.write(self.server.body)
        if self.server.close_next:
            self.server.close_next, self.close_connection = False, True

    def log_message(self, *args: Any) -> None:
        """No access log on the test's stderr."""


@pytest.fixture
def metadata() -> Iterator[Metadata]:
    server = Metadata()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def watching() -> Iterator[Any]:
    watches: list[AnswerWatch] = []

    def start(url: str, *, headers: Any = lambda: {"X-aws-ec2-metadata-token": "t1"}) -> list[float]:
        wakes: list[float] = []
        watch = AnswerWatch(url, headers=headers, every=EVERY, wake=lambda: wakes.append(time.monotonic()),
                            timeout=0.5)
        watches.append(watch)
        watch.start()
        return wakes

    yield start
    for watch in watches:
        watch.stop()
    assert all(watch.join(timeout=2) for watch in watches), "a watch thread did not end"


def test_it_wakes_once_per_change_and_not_while_the_answer_stays(metadata, watching):
    wakes = watching(metadata.url)
    wait_until(lambda: len(metadata.tokens) >= 10, timeout=5, what="ten reads")
    assert len(wakes) == 1   # the first answer: what came before the watch began is not taken for granted
    metadata.status, metadata.body = 200, b'{"action": "terminate", "time": "2027-01-15T08:00:00Z"}'
    wait_until(lambda: len(wakes) == 2, timeout=5, what="a wake for the notice")
    seen = len(metadata.tokens)
    wait_until(lambda: len(metadata.tokens) >= seen + 10, timeout=5, what="ten more reads")
    assert len(wakes) == 2
    metadata.body = b'{"action": "terminate", "time": "2027-01-15T08:00:05Z"}'   # the same status, a new body
    wait_until(lambda: len(wakes) == 3, timeout=5, what="a wake for the changed body")
    # All of it over one kept-alive connection.
    assert metadata.connections == 1


def test_the_headers_are_read_anew_and_none_means_no_read_yet(metadata, watching):
    token: list[str | None] = [None]
    watching(metadata.url, headers=lambda: None if token[0] is None else {"X-aws-ec2-metadata-token": token[0]})
    time.sleep(EVERY * 10)
    assert metadata.tokens == []
    token[0] = "t1"
    wait_until(lambda: "t1" in metadata.tokens, timeout=5, what="a read with the first token")
    token[0] = "t2"
    wait_until(lambda: metadata.tokens[-1] == "t2", timeout=5, what="a read with the renewed token")


def test_an_outage_and_its_end_are_two_changes_and_never_an_exception(metadata, watching):
    wakes = watching(metadata.url)
    wait_until(lambda: len(metadata.tokens) >= 3, timeout=5, what="reads")
    assert len(wakes) == 1
    metadata.down = True
    wait_until(lambda: len(wakes) == 2, timeout=5, what="a wake for the dropped connection")
    connections = metadata.connections
    wait_until(lambda: metadata.connections >= connections + 5, timeout=5, what="five more attempts")
    assert len(wakes) == 2   # still failing: the same answer
    metadata.down = False
    wait_until(lambda: len(wakes) == 3, timeout=5, what="a wake for the server back")


def test_a_kept_alive_connection_the_server_closed_is_asked_again_not_an_outage(metadata, watching):
    wakes = watching(metadata.url)
    wait_until(lambda: len(metadata.tokens) >= 3, timeout=5, what="reads")
    metadata.close_next = True   # the server drops the idle connection once, as servers do
    connections = metadata.connections
    wait_until(lambda: metadata.connections > connections and len(metadata.tokens) >= 10, timeout=5,
               what="reads on a new connection")
    assert len(wakes) == 1


@pytest.mark.parametrize("answer", [
    b"hello\r\n\r\n",                                                         # not HTTP at all
    b"HTTP/1.1 200 OK\r\nContent-Length: many\r\n\r\n{}",                     # a length that is no number
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",   # no length: read and close
    b"",                                                                      # closed at once
])
def test_garbage_answers_are_answers_and_the_thread_goes_on(watching, answer):
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    served: list[int] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            with conn:
                conn.recv(65536)
                conn.sendall(answer)
                served.append(1)

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        wakes = watching(f"http://127.0.0.1:{listener.getsockname()[1]}/latest/meta-data/spot/instance-action")
        # It keeps asking (a new connection each time: every one of these answers ends its connection),
        # and the same garbage every time is one answer: one wake, the first.
        wait_until(lambda: len(served) >= 5, timeout=5, what="five answers served")
        assert len(wakes) == 1
    finally:
        stop.set()
        server.join(timeout=2)
        listener.close()

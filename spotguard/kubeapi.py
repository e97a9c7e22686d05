"""Generic Kubernetes API plumbing: the client, raw JSON calls, watches, list-watch. No domain logic.

spotguard's own operations (cordon, readiness, evictions, Events) are in `spotguard.kube`, built on
this; the simulation reuses the same client, calls and list-watch for its kubelet, routers and
autoscaler instead of growing copies of them.

Objects are kept as the plain JSON dicts the API server sends (no model classes): they are cheap to
hold and easy to build in tests. Requests go through the official client's ApiClient, which owns
authentication (kubeconfig, in-cluster token refresh) and TLS. Every call is synchronous (that is
the client): callers on an event loop use asyncio.to_thread, and `ListWatch` keeps a collection
current from a thread of its own.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from typing import Any, Callable, Iterator, Mapping

import structlog

from spotguard import __version__
from spotguard.backoff import backoff_delay

USER_AGENT = f"spotguard/{__version__}"
Obj = dict[str, Any]
_log = structlog.get_logger("spotguard.kubeapi")

# TCP keepalive on every API connection. A watch whose connection dies without a FIN or RST (a NAT
# or load balancer forgetting an idle flow) would otherwise be noticed only at its read timeout,
# minutes later. Probes after 15 s idle, every 5 s, 3 unanswered: about 30 s, after which the
# watch re-lists. (client-go uses 30 s idle with Go's 15 s x 9 probes.)
KEEPALIVE = {"idle": 15, "interval": 5, "count": 3}


def new_client(kubeconfig: str | None = None) -> Any:
    """An ApiClient from `kubeconfig` (default: $KUBECONFIG when set), else the in-cluster service
    account, with TCP keepalive on its connections."""
    from kubernetes import client, config
    from kubernetes.utils.keepalive import tcp_keepalive_socket_options

    configuration = client.Configuration()
    configuration.socket_options = tcp_keepalive_socket_options(**KEEPALIVE)
    kubeconfig = kubeconfig or os.environ.get("KUBECONFIG")
    if kubeconfig:
        # Passed explicitly: the client's own default is read once, when it is imported. A
        # colon-separated list of files is merged as kubectl does.
        return config.new_client_from_config(kubeconfig, client_configuration=configuration)
    config.load_incluster_config(client_configuration=configuration)
    return client.ApiClient(configuration)


class KubeError(Exception):
    def __init__(self, status: int, message: str, body: Obj | None = None) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.body = body or {}


class Api:
    """Raw JSON requests to the API server through one ApiClient (which may be shared)."""

    def __init__(self, api_client: Any, *, user_agent: str = USER_AGENT, request_timeout: float = 10.0) -> None:
        self.client = api_client
        self.user_agent = user_agent
        self.request_timeout = request_timeout

    def _open(self, method: str, path: str, *, query: Mapping[str, Any] | None = None,
              body: Any = None, content_type: str | None = None, timeout: float | None = None) -> Any:
        headers = {"Accept": "application/json"}
        if content_type or body is not None:
            headers["Content-Type"] = content_type or "application/json"
        method, url, headers, body, post = self.client.param_serialize(
            method=method, resource_path=path, query_params=list((query or {}).items()), header_params=headers,
            body=body, auth_settings=["BearerToken"])
        # Set here, per request: the client's default headers override those passed in, and the
        # client may be shared with code that calls itself something else.
        headers["User-Agent"] = self.user_agent
        return self.client.call_api(method, url, header_params=headers, body=body, post_params=post,
                                    _request_timeout=timeout or self.request_timeout)

    def call(self, method: str, path: str, **kwargs: Any) -> Obj:
        response = self._open(method, path, **kwargs)
        raw = response.read()
        try:
            decoded = json.loads(raw) if raw else {}
        except (ValueError, RecursionError):
            decoded = None
        if not isinstance(decoded, dict):
            # Not a Kubernetes object or Status (a proxy's page, a bare JSON value): callers read
            # dicts, so the body becomes the message of one.
            decoded = {"message": raw[:200].decode(errors="replace")}
        if response.status >= 400:
            raise KubeError(response.status, decoded.get("message", response.reason or ""), decoded)
        return decoded

    def watch(self, path: str, *, query: Mapping[str, Any], resource_version: str,
              timeout_seconds: int) -> Iterator[tuple[str, Obj]]:
        """Yield (type, object) from one watch request until the server ends it.

        Raises KubeError(410) when the resource version is too old: the caller lists again.
        """
        params = {**query, "watch": "true", "resourceVersion": resource_version,
                  "allowWatchBookmarks": "true", "timeoutSeconds": str(timeout_seconds)}
        response = self._open("GET", path, query=params, timeout=(10, timeout_seconds + 30))
        if response.status >= 400:
            raise KubeError(response.status, response.read()[:200].decode(errors="replace"))
        buffer = b""
        try:
            for chunk in response.response.stream(65536, decode_content=True):
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if not line.strip():
                        continue
                    event = json.loads(line)
                    if event.get("type") == "ERROR":
                        status = event.get("object", {})
                        raise KubeError(int(status.get("code", 500)), status.get("message", "watch error"))
                    yield event["type"], event["object"]
        finally:
            response.response.release_conn()


# ---------------------------------------------------------------------------------------------
# List + watch, in a thread of its own (the kubernetes client is synchronous)


class _InterruptibleApi(Api):
    """Api that remembers its open watch response, so `interrupt` can end a blocked read.

    A watch sits in a socket read for up to its timeout; shutting the socket's read side down from
    the event loop's thread makes that read return at once, so stopping never waits a minute.
    """

    def __init__(self, api_client: Any, *, user_agent: str) -> None:
        super().__init__(api_client, user_agent=user_agent)
        self._lock = threading.Lock()
        self._watch_response: Any = None
        self.interrupted = False
        self.watches_opened = 0

    def _open(self, method: str, path: str, *, query: Mapping[str, Any] | None = None, **kwargs: Any) -> Any:
        response = super()._open(method, path, query=query, **kwargs)
        if (query or {}).get("watch") == "true":
            with self._lock:
                self._watch_response = response
                self.watches_opened += 1
                if self.interrupted:
                    _shutdown(response)
        return response

    def interrupt(self, *, for_good: bool = True) -> None:
        with self._lock:
            self.interrupted = self.interrupted or for_good
            if self._watch_response is not None:
                _shutdown(self._watch_response)


def _shutdown(response: Any) -> None:
    try:
        response.response.shutdown()
    except (ValueError, RuntimeError, OSError, AttributeError):
        pass  # already released or closed: nothing is blocked on it


class ListWatch:
    """List, then watch one collection; on errors back off and list again; 410 lists again at once.

    Runs in a thread of its own and hands everything to the event loop that called `start`:
    `on_sync(items)` after every (re)list - the consumer replaces its whole view - and
    `on_event(type, object)` for ADDED / MODIFIED / DELETED. Reuses `Api.call` / `Api.watch`.
    """

    def __init__(self, api_client: Any, path: str, *, query: Mapping[str, str] | None = None,
                 on_sync: Callable[[list[Obj]], None], on_event: Callable[[str, Obj], None],
                 name: str, timeout_seconds: int = 60,
                 on_error: Callable[[Exception], None] | None = None, user_agent: str = USER_AGENT) -> None:
        self.path = path
        self.query = dict(query or {})
        self.name = name
        self.timeout_seconds = timeout_seconds
        self.synced = asyncio.Event()
        self.errors = 0
        self.relists = 0
        # False from the first failure until a list or watch works again (the daemon's /readyz).
        self.healthy = False
        self._on_error = on_error
        self._on_sync = on_sync
        self._on_event = on_event
        self._kube = _InterruptibleApi(api_client, user_agent=user_agent)
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError(f"{self.name}: already started")
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name=f"watch-{self.name}", daemon=True)
        self._thread.start()

    async def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        self._kube.interrupt()
        deadline = time.monotonic() + timeout
        while self._thread is not None and self._thread.is_alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if self._thread is not None and self._thread.is_alive():
            _log.warning("watch thread still running", watch=self.name)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def connections(self) -> int:
        """Watch requests opened so far (1 + reconnections)."""
        return self._kube.watches_opened

    def drop_connection(self) -> None:
        """Cut the open watch connection, as a network blip or an API server restart would; the
        watch recovers by itself (backoff, list again). For fault-injection tests."""
        self._kube.interrupt(for_good=False)

    def _deliver(self, function: Callable[..., None], *args: Any) -> bool:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(function, *args)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self._stopping.set()
            return False
        return True

    def _run(self) -> None:
        attempt = 0
        version: str | None = None
        while not self._stopping.is_set():
            try:
                if version is None:
                    listed = self._kube.call("GET", self.path, query=self.query)
                    version = listed["metadata"]["resourceVersion"]
                    self.relists += 1
                    if not self._deliver(self._synced, listed.get("items") or []):
                        return
                attempt = 0
                self.healthy = True
                for kind, obj in self._kube.watch(self.path, query=self.query, resource_version=version,
                                                  timeout_seconds=self.timeout_seconds):
                    version = (obj.get("metadata") or {}).get("resourceVersion") or version
                    if kind != "BOOKMARK" and not self._deliver(self._on_event, kind, obj):
                        return
            except Exception as error:  # noqa: BLE001 - a watch must survive anything
                if self._stopping.is_set():
                    return
                version = None
                if isinstance(error, KubeError) and error.status == 410:
                    _log.info("watch expired; listing again", watch=self.name)
                    continue
                attempt += 1
                self.errors += 1
                self.healthy = False
                if self._on_error is not None:
                    self._on_error(error)
                _log.warning("watch failed", watch=self.name, error=str(error)[:300], attempt=attempt)
                self._stopping.wait(backoff_delay(attempt - 1, base=0.2, cap=5.0))

    def _synced(self, items: list[Obj]) -> None:
        self._on_sync(items)
        self.synced.set()

"""An emulated GCE metadata server: the keys spotguard reads, with GCE's hanging-GET semantics.

Served under /computeMetadata/v1/instance/: preempted, maintenance-event, upcoming-maintenance,
id, name, zone, hostname. Like the real server it
- requires `Metadata-Flavor: Google` on requests (403 otherwise), refuses requests carrying
  `X-Forwarded-For` (403), and sets `Metadata-Flavor: Google` on every answer;
- gives every value an ETag that changes whenever the value changes;
- with `?wait_for_change=true`: answers at once when `last_etag` differs from the current ETag,
  otherwise holds the request until the value changes or `timeout_sec` passes (then answers the
  unchanged value); without `last_etag` it waits for the next change.

Triggers and faults (no flavour header needed), for tests and the demo:
  POST /sim/preempt                         instance/preempted -> TRUE
  POST /sim/maintenance?event=E[&window_start=RFC3339]
                                            E = TERMINATE_ON_HOST_MAINTENANCE |
                                            MIGRATE_ON_HOST_MAINTENANCE | NONE
  POST /sim/reset                           back to FALSE / NONE / {} and no fault
  POST /sim/fault?mode=M[&seconds=S]        M = none | http_500 | http_503 | http_429 | hang |
                                            slow (S seconds late, default 2) | garbage |
                                            no_flavor | refuse (close without answering) |
                                            ignore_wait (answer hanging GETs at once, like a
                                            proxy without wait_for_change)
  GET  /sim/state                           the current values, ETags and fault as JSON
The same is available from Python: `preempt()`, `set_maintenance(...)`, `set_fault(...)`, `reset()`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import sys
from collections import Counter
from dataclasses import dataclass
from types import TracebackType

from aiohttp import web

from spotguard.providers.gce import (
    FLAVOR,
    FLAVOR_HEADER,
    MAINTENANCE_EVENTS,
    MAINTENANCE_NONE,
    parse_rfc3339,
)

PREEMPTED = "instance/preempted"
MAINTENANCE_EVENT = "instance/maintenance-event"
UPCOMING_MAINTENANCE = "instance/upcoming-maintenance"
FAULT_MODES = ("none", "http_500", "http_503", "http_429", "hang", "slow", "garbage", "no_flavor", "refuse",
               "ignore_wait")
_FAULT_STATUS = {"http_500": 500, "http_503": 503, "http_429": 429}
# A body no metadata key ever has: not UTF-8, and HTML besides, like a captive portal's page.
_GARBAGE = b"\xff\xfe<html><body>503 upstream connect error</body></html>\x00"


@dataclass
class _Value:
    text: str
    etag: str


class GceMetadataEmulator:
    """The emulated server. `async with GceMetadataEmulator() as emulator: emulator.url ...`"""

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0,
                 instance_name: str = "spotguard-sim-node",
                 instance_id: str = "4520000000000000001",
                 project_id: str = "spotguard-sim", project_number: str = "123456789012",
                 zone: str = "us-central1-a",
                 slow_seconds: float = 2.0,
                 access_log: bool = False) -> None:
        self._host = host
        self._port = port
        self._slow_seconds = slow_seconds
        self._access_log = access_log
        self._generation = 0
        self._values: dict[str, _Value] = {}
        self._fixed = {
            "instance/id": instance_id,
            "instance/name": instance_name,
            "instance/zone": f"projects/{project_number}/zones/{zone}",
            "instance/hostname": f"{instance_name}.{zone}.c.{project_id}.internal",
        }
        # Replaced by a fresh Event at every change (value, fault, stop): whoever waits on the old
        # one wakes up and re-checks. Creating an Event needs no running loop (Python >= 3.10).
        self._changed = asyncio.Event()
        self._fault = "none"
        self._stopping = False
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        # Observable by tests: requests per key, and hanging GETs waiting right now per key.
        self.requests: Counter[str] = Counter()
        self.waiting: Counter[str] = Counter()
        self.reset()

    # -- life cycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        self._stopping = False
        app = web.Application()
        app.router.add_get("/computeMetadata/v1/{key:instance/[^?]+}", self._serve_key)
        app.router.add_post("/sim/preempt", self._sim_preempt)
        app.router.add_post("/sim/maintenance", self._sim_maintenance)
        app.router.add_post("/sim/reset", self._sim_reset)
        app.router.add_post("/sim/fault", self._sim_fault)
        app.router.add_get("/sim/state", self._sim_state)
        # A short shutdown_timeout: held requests are woken by stop() anyway, and tests must
        # not wait a minute for aiohttp's default.
        runner = web.AppRunner(app, shutdown_timeout=0.5,
                               access_log=web.access_logger if self._access_log else None)
        await runner.setup()
        site = web.TCPSite(runner, self._host, self._port)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner, self._site = runner, site
        sockets = site._server.sockets if site._server else ()  # type: ignore[union-attr]
        if sockets:
            self._port = sockets[0].getsockname()[1]

    async def stop(self) -> None:
        self._stopping = True
        self._notify()
        if self._runner is not None:
            runner, self._runner, self._site = self._runner, None, None
            await runner.cleanup()

    async def __aenter__(self) -> GceMetadataEmulator:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    @property
    def url(self) -> str:
        """Root URL (scheme://host:port), what --metadata-url takes."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self._port}"

    # -- triggers -----------------------------------------------------------------------------

    def preempt(self) -> None:
        self._set(PREEMPTED, "TRUE")

    def set_preempted(self, preempted: bool) -> None:
        self._set(PREEMPTED, "TRUE" if preempted else "FALSE")

    def set_maintenance(self, event: str, *, window_start: str | None = None) -> None:
        """Set instance/maintenance-event; `window_start` (RFC 3339) fills upcoming-maintenance."""
        if event not in MAINTENANCE_EVENTS:
            raise ValueError(f"event must be one of {', '.join(sorted(MAINTENANCE_EVENTS))}, got {event!r}")
        if window_start is not None:
            parse_rfc3339(window_start)  # ValueError for a bad timestamp
        upcoming: dict[str, object] = {}
        if event != MAINTENANCE_NONE and window_start is not None:
            upcoming = {"can_reschedule": False, "latest_window_start_time": window_start,
                        "maintenance_status": "PENDING", "type": "SCHEDULED",
                        "window_start_time": window_start}
        # The window first: a client woken by the event change must find it already there.
        self._set(UPCOMING_MAINTENANCE, json.dumps(upcoming, sort_keys=True))
        self._set(MAINTENANCE_EVENT, event)

    def set_raw(self, key: str, text: str) -> None:
        """Any text for an emulated key (e.g. a value GCE does not document), for tests."""
        if key not in self._values:
            raise KeyError(key)
        self._set(key, text)

    def set_fault(self, mode: str, *, seconds: float | None = None) -> None:
        """Make every metadata request fail in the given way (`none` to recover)."""
        if mode not in FAULT_MODES:
            raise ValueError(f"mode must be one of {', '.join(FAULT_MODES)}, got {mode!r}")
        if seconds is not None:
            if not seconds >= 0:
                raise ValueError(f"seconds must be >= 0, got {seconds!r}")
            self._slow_seconds = seconds
        self._fault = mode
        # Held requests wake up and answer with the fault (or, for `none`, carry on waiting).
        self._notify()

    def reset(self) -> None:
        self._fault = "none"
        for key, text in self._fixed.items():
            self._set(key, text)
        self._set(UPCOMING_MAINTENANCE, "{}")
        self._set(MAINTENANCE_EVENT, MAINTENANCE_NONE)
        self._set(PREEMPTED, "FALSE")
        self._notify()

    def state(self) -> dict[str, object]:
        return {"fault": self._fault,
                "values": {key: {"value": value.text, "etag": value.etag}
                           for key, value in sorted(self._values.items())}}

    def _set(self, key: str, text: str) -> None:
        current = self._values.get(key)
        if current is not None and current.text == text:
            return  # unchanged: same ETag, held requests keep waiting
        self._generation += 1
        # Derived from a generation counter as well as the text, so that FALSE -> TRUE -> FALSE
        # gives three different ETags and a client holding the first one is answered at once.
        etag = hashlib.sha256(f"{self._generation}:{key}:{text}".encode()).hexdigest()[:16]
        self._values[key] = _Value(text=text, etag=etag)
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    # -- metadata requests --------------------------------------------------------------------

    async def _serve_key(self, request: web.Request) -> web.StreamResponse:
        key = request.match_info["key"]
        if "X-Forwarded-For" in request.headers:
            # GCE refuses requests that look proxied, so a workload cannot be tricked into
            # relaying metadata (and its tokens) to someone else.
            return self._plain(403, "Request had X-Forwarded-For header and was rejected.\n")
        if request.headers.get(FLAVOR_HEADER) != FLAVOR:
            return self._plain(403, f"Missing required header: {FLAVOR_HEADER}: {FLAVOR}\n")
        if key not in self._values:
            return self._plain(404, "Not found\n")
        self.requests[key] += 1
        alt_json = request.query.get("alt") == "json"

        faulted = await self._fault_response(request, key, alt_json=alt_json, delay=True)
        if faulted is not None:
            return faulted
        if request.query.get("wait_for_change", "").lower() == "true" and self._fault != "ignore_wait":
            try:
                timeout = float(request.query.get("timeout_sec", "3600"))
            except ValueError:
                return self._plain(400, "timeout_sec must be a number of seconds\n")
            if not 0 <= timeout <= 3600:
                return self._plain(400, "timeout_sec must be between 0 and 3600\n")
            await self._wait_for_change(key, last_etag=request.query.get("last_etag"), timeout=timeout)
            # A fault set while the request was held applies to its answer.
            faulted = await self._fault_response(request, key, alt_json=alt_json, delay=False)
            if faulted is not None:
                return faulted
        return self._value_response(key, alt_json=alt_json, flavor=True)

    async def _wait_for_change(self, key: str, *, last_etag: str | None, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        # Without last_etag: wait for the next change from now.
        waited_etag = last_etag if last_etag is not None else self._values[key].etag
        self.waiting[key] += 1
        try:
            while self._values[key].etag == waited_etag and not self._stopping:
                if self._fault not in ("none", "slow", "ignore_wait"):
                    return
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return
                try:
                    await asyncio.wait_for(self._changed.wait(), remaining)
                except asyncio.TimeoutError:
                    return
        finally:
            self.waiting[key] -= 1

    async def _fault_response(self, request: web.Request, key: str, *, alt_json: bool,
                              delay: bool) -> web.StreamResponse | None:
        """The faulty answer for the current fault mode, or None to answer normally."""
        while self._fault == "hang" and not self._stopping:
            # Held until the fault changes (or the server stops); the client times out first.
            await self._changed.wait()
        mode = self._fault
        if mode in _FAULT_STATUS:
            return self._plain(_FAULT_STATUS[mode], f"emulated fault: {mode}\n")
        if mode == "garbage":
            return web.Response(body=_GARBAGE, headers={FLAVOR_HEADER: FLAVOR,
                                                        "ETag": self._values[key].etag,
                                                        "Content-Type": "application/text"})
        if mode == "no_flavor":
            return self._value_response(key, alt_json=alt_json, flavor=False)
        if mode == "refuse":
            if request.transport is not None:
                request.transport.abort()
            return web.Response()  # never reaches the client: the connection is gone
        if mode == "slow" and delay:
            await asyncio.sleep(self._slow_seconds)
        return None

    def _value_response(self, key: str, *, alt_json: bool, flavor: bool) -> web.Response:
        value = self._values[key]
        headers = {"ETag": value.etag, "Server": "Metadata Server for VM"}
        if flavor:
            headers[FLAVOR_HEADER] = FLAVOR
        if key == UPCOMING_MAINTENANCE:
            headers["Content-Type"] = "application/json"
            return web.Response(text=value.text, headers=headers)
        if alt_json:
            headers["Content-Type"] = "application/json"
            return web.Response(text=json.dumps(value.text), headers=headers)
        headers["Content-Type"] = "application/text"
        return web.Response(text=value.text, headers=headers)

    @staticmethod
    def _plain(status: int, text: str) -> web.Response:
        return web.Response(status=status, text=text,
                            headers={FLAVOR_HEADER: FLAVOR, "Content-Type": "text/plain"})

    # -- /sim endpoints -----------------------------------------------------------------------

    async def _sim_preempt(self, _: web.Request) -> web.Response:
        self.preempt()
        return web.json_response(self.state())

    async def _sim_maintenance(self, request: web.Request) -> web.Response:
        try:
            self.set_maintenance(request.query.get("event", ""),
                                 window_start=request.query.get("window_start"))
        except ValueError as error:
            return web.json_response({"error": str(error)}, status=400)
        return web.json_response(self.state())

    async def _sim_reset(self, _: web.Request) -> web.Response:
        self.reset()
        return web.json_response(self.state())

    async def _sim_fault(self, request: web.Request) -> web.Response:
        try:
            seconds_text = request.query.get("seconds")
            seconds = float(seconds_text) if seconds_text is not None else None
            self.set_fault(request.query.get("mode", ""), seconds=seconds)
        except ValueError as error:
            return web.json_response({"error": str(error)}, status=400)
        return web.json_response(self.state())

    async def _sim_state(self, _: web.Request) -> web.Response:
        return web.json_response(self.state())


def _parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port_text = listen.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) < 65536:
        raise ValueError(f"--listen must be HOST:PORT, got {listen!r}")
    return host.strip("[]"), int(port_text)


async def _serve(host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with GceMetadataEmulator(host=host, port=port, access_log=True) as emulator:
        print(f"GCE metadata emulator listening on {emulator.url}", flush=True)
        print(f"SPOTGUARD_METADATA_URL={emulator.url}", flush=True)
        print(f"trigger a preemption: curl -X POST {emulator.url}/sim/preempt", flush=True)
        await stop.wait()


def run_gce_metadata(listen: str) -> int:
    """Serve an emulated GCE metadata server on HOST:PORT until SIGINT or SIGTERM.

    It answers /computeMetadata/v1/instance/{preempted,maintenance-event,upcoming-maintenance,
    id,name,zone,hostname} like GCE (Metadata-Flavor header, ETags, wait_for_change). Flip it with
    POST /sim/preempt, POST /sim/maintenance?event=TERMINATE_ON_HOST_MAINTENANCE
    [&window_start=RFC3339], POST /sim/reset, and inject failures with
    POST /sim/fault?mode=none|http_500|http_503|http_429|hang|slow|garbage|no_flavor|refuse|ignore_wait.
    Point spotguard at it with --metadata-url http://HOST:PORT. Returns the exit status.
    """
    try:
        host, port = _parse_listen(listen)
    except ValueError as error:
        print(f"spotguard sim gce-metadata: {error}", file=sys.stderr)
        return 2
    try:
        asyncio.run(_serve(host, port))
    except OSError as error:
        print(f"spotguard sim gce-metadata: cannot listen on {listen}: {error}", file=sys.stderr)
        return 1
    return 0

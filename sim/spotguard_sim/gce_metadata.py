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
from collections import Counter
from dataclasses import dataclass
from datetime import datetime

from aiohttp import web

from spotguard_sim.metadata_server import EmulatedServer, run_emulator

# Spelled here from Google's documentation (Compute Engine: "About VM metadata", "Set up host
# maintenance notifications"), never imported from the provider: a typo there must fail a test.
FLAVOR_HEADER = "Metadata-Flavor"
FLAVOR = "Google"
MAINTENANCE_NONE = "NONE"
MAINTENANCE_EVENTS = frozenset({MAINTENANCE_NONE, "MIGRATE_ON_HOST_MAINTENANCE", "TERMINATE_ON_HOST_MAINTENANCE",
                                "SHUTDOWN_ON_HOST_MAINTENANCE"})

PREEMPTED = "instance/preempted"
MAINTENANCE_EVENT = "instance/maintenance-event"
UPCOMING_MAINTENANCE = "instance/upcoming-maintenance"


@dataclass
class _Value:
    text: str
    etag: str


class GceMetadataEmulator(EmulatedServer):
    """The emulated server. `async with GceMetadataEmulator() as emulator: emulator.url ...`"""

    extra_fault_modes = ("no_flavor", "ignore_wait")

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0,
                 instance_name: str = "spotguard-sim-node",
                 instance_id: str = "4520000000000000001",
                 project_id: str = "spotguard-sim", project_number: str = "123456789012",
                 zone: str = "us-central1-a",
                 slow_seconds: float = 2.0,
                 access_log: bool = False) -> None:
        super().__init__(host=host, port=port, slow_seconds=slow_seconds, access_log=access_log)
        self._generation = 0
        self._values: dict[str, _Value] = {}
        self._fixed = {
            "instance/id": instance_id,
            "instance/name": instance_name,
            "instance/zone": f"projects/{project_number}/zones/{zone}",
            "instance/hostname": f"{instance_name}.{zone}.c.{project_id}.internal",
        }
        # Observable by tests: requests per key, and hanging GETs waiting right now per key.
        self.requests: Counter[str] = Counter()
        self.waiting: Counter[str] = Counter()
        self.reset()

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/computeMetadata/v1/{key:instance/[^?]+}", self._serve_key)
        app.router.add_post("/sim/preempt", self._sim_preempt)
        app.router.add_post("/sim/maintenance", self._sim_maintenance)

    # -- triggers -----------------------------------------------------------------------------

    def preempt(self) -> None:
        self._set(PREEMPTED, "TRUE")

    def set_maintenance(self, event: str, *, window_start: str | None = None) -> None:
        """Set instance/maintenance-event; `window_start` (RFC 3339) fills upcoming-maintenance."""
        if event not in MAINTENANCE_EVENTS:
            raise ValueError(f"event must be one of {', '.join(sorted(MAINTENANCE_EVENTS))}, got {event!r}")
        if window_start is not None:
            datetime.fromisoformat(window_start)  # ValueError for a bad timestamp
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

    def reset(self) -> None:
        self._fault = "none"
        for key, text in self._fixed.items():
            self._set(key, text)
        self._set(UPCOMING_MAINTENANCE, "{}")
        self._set(MAINTENANCE_EVENT, MAINTENANCE_NONE)
        self._set(PREEMPTED, "FALSE")
        self.notify()

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
        self.notify()

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
        if self._fault == "no_flavor":
            return self._value_response(key, alt_json=alt_json, flavor=False)
        return await self.fault_response(request, headers={FLAVOR_HEADER: FLAVOR, "ETag": self._values[key].etag},
                                         delay=delay)

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
        return self.answer_trigger(lambda: self.set_maintenance(request.query.get("event", ""),
                                                                window_start=request.query.get("window_start")))


def run_gce_metadata(listen: str) -> int:
    """Serve an emulated GCE metadata server on HOST:PORT until SIGINT or SIGTERM.

    It answers /computeMetadata/v1/instance/{preempted,maintenance-event,upcoming-maintenance,
    id,name,zone,hostname} like GCE (Metadata-Flavor header, ETags, wait_for_change). Flip it with
    POST /sim/preempt, POST /sim/maintenance?event=TERMINATE_ON_HOST_MAINTENANCE
    [&window_start=RFC3339], POST /sim/reset, and inject failures with
    POST /sim/fault?mode=none|http_500|http_503|http_429|hang|slow|garbage|no_flavor|refuse|ignore_wait.
    Point spotguard at it with --metadata-url http://HOST:PORT. Returns the exit status.
    """
    return run_emulator("gce-metadata", listen, lambda host, port: GceMetadataEmulator(host=host, port=port,
                                                                                        access_log=True),
                        lambda url: [f"GCE metadata emulator listening on {url}", f"SPOTGUARD_METADATA_URL={url}",
                                     f"trigger a preemption: curl -X POST {url}/sim/preempt"])

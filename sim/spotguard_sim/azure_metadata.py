"""An emulated Azure Instance Metadata Service: Scheduled Events and the VM's compute metadata.

Like Azure's IMDS it
- requires `Metadata: true` (400 otherwise) and an `api-version` (400 otherwise), and refuses
  requests carrying `X-Forwarded-For` (400);
- answers `GET /metadata/instance/compute` (`{"name", "vmId", "azEnvironment", ...}`) and
  `GET /metadata/scheduledevents` (`{"DocumentIncarnation": n, "Events": [...]}`, the incarnation
  going up at every change, `NotBefore` written like `Mon, 19 Sep 2016 18:29:47 GMT`);
- accepts acknowledgements (`POST /metadata/scheduledevents` with `{"StartRequests": [...]}`) and
  records them in `acknowledged`, so a test can show spotguard never sends one;
- can hold the first Scheduled Events request (`first_call_delay`), as Azure does while it turns
  the service on for the VM.

Triggers and faults, for tests and the demo:
  POST /sim/preempt[?seconds=30]            a Preempt event for this VM, NotBefore in `seconds`
  POST /sim/event?type=T[&seconds=S][&resources=a,b][&status=Scheduled|Started]
                                            any event (T = Freeze | Reboot | Redeploy | Preempt |
                                            Terminate), for this VM unless `resources` is given
  POST /sim/reset                           no events (a cancellation: events simply disappear)
  POST /sim/fault?mode=M[&seconds=S]        M = none | http_500 | http_503 | http_429 | hang |
                                            slow (S seconds late, default 2) | garbage | refuse
  GET  /sim/state                           events, acknowledgements and fault as JSON
The same is available from Python: `preempt()`, `add_event(...)`, `set_fault(...)`, `reset()`.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from email.utils import formatdate
from typing import Any

from aiohttp import web

# Spelled here from Azure's documentation ("Azure Metadata Service: Scheduled Events for Linux VMs"),
# never imported from the provider: a typo there must fail a test.
EVENT_TYPES = frozenset({"Freeze", "Reboot", "Redeploy", "Preempt", "Terminate"})
from spotguard_sim.metadata_server import EmulatedServer, run_emulator


class AzureMetadataEmulator(EmulatedServer):
    """The emulated IMDS. `async with AzureMetadataEmulator() as emulator: emulator.url ...`"""

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, vm_name: str = "aks-gpuspot-12345678-vmss_0",
                 first_call_delay: float = 0.0, slow_seconds: float = 2.0, access_log: bool = False) -> None:
        super().__init__(host=host, port=port, slow_seconds=slow_seconds, access_log=access_log)
        self.vm_name = vm_name
        self._vm_id = str(uuid.uuid5(uuid.NAMESPACE_DNS, vm_name))
        self._first_call_delay = first_call_delay
        self._events: list[dict[str, Any]] = []
        self._raw: str | None = None
        self._incarnation = 1
        # Observable by tests: event ids acknowledged, and Scheduled Events requests answered.
        self.acknowledged: list[str] = []
        self.requests = 0

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/metadata/instance/compute", self._serve_compute)
        app.router.add_get("/metadata/scheduledevents", self._serve_events)
        app.router.add_post("/metadata/scheduledevents", self._serve_ack)
        app.router.add_post("/sim/preempt", self._sim_preempt)
        app.router.add_post("/sim/event", self._sim_event)

    # -- triggers -----------------------------------------------------------------------------

    def preempt(self, *, seconds: float = 30.0) -> None:
        """A spot eviction of this VM (Azure gives at least 30 s)."""
        self.add_event("Preempt", seconds=seconds)

    def add_event(self, event_type: str, *, seconds: float = 30.0, resources: list[str] | None = None,
                  status: str = "Scheduled") -> str:
        if event_type not in EVENT_TYPES:
            raise ValueError(f"type must be one of {', '.join(sorted(EVENT_TYPES))}, got {event_type!r}")
        if status not in ("Scheduled", "Started"):
            raise ValueError(f"status must be Scheduled or Started, got {status!r}")
        event_id = str(uuid.uuid4()).upper()
        self._events.append({
            "EventId": event_id, "EventType": event_type, "ResourceType": "VirtualMachine",
            "Resources": resources if resources is not None else [self.vm_name], "EventStatus": status,
            "NotBefore": "" if status == "Started" else formatdate(time.time() + seconds, usegmt=True),
            "Description": f"emulated {event_type}", "EventSource": "Platform",
            "DurationInSeconds": -1})
        self._incarnation += 1
        return event_id

    def set_raw(self, document: str) -> None:
        """Any Scheduled Events body (say, one Azure does not document), for tests; reset() undoes it."""
        self._raw = document

    def reset(self) -> None:
        if self._events:
            self._incarnation += 1
        self._events = []
        self._raw = None
        self._fault = "none"
        self.notify()

    def document(self) -> dict[str, Any]:
        return {"DocumentIncarnation": self._incarnation, "Events": list(self._events)}

    def state(self) -> dict[str, Any]:
        return {"fault": self._fault, "scheduled_events": self.document(), "acknowledged": self.acknowledged}

    # -- IMDS requests ------------------------------------------------------------------------

    def _refused(self, request: web.Request) -> web.Response | None:
        if "X-Forwarded-For" in request.headers:
            return web.json_response({"error": "Bad request. Proxies are not supported."}, status=400)
        if request.headers.get("Metadata", "").lower() != "true":
            return web.json_response({"error": "Bad request. Required metadata header not specified"}, status=400)
        if "api-version" not in request.query:
            return web.json_response({"error": "Bad request. api-version was not specified"}, status=400)
        return None

    async def _serve_compute(self, request: web.Request) -> web.StreamResponse:
        refused = self._refused(request) or await self.fault_response(request)
        if refused is not None:
            return refused
        return web.json_response({"name": self.vm_name, "vmId": self._vm_id, "azEnvironment": "AzurePublicCloud",
                                  "location": "westeurope", "priority": "Spot", "vmSize": "Standard_NC4as_T4_v3"})

    async def _serve_events(self, request: web.Request) -> web.StreamResponse:
        refused = self._refused(request) or await self.fault_response(request)
        if refused is not None:
            return refused
        self.requests += 1
        if self.requests == 1 and self._first_call_delay:
            await asyncio.sleep(self._first_call_delay)
        if self._raw is not None:
            return web.Response(text=self._raw, content_type="application/json")
        return web.json_response(self.document())

    async def _serve_ack(self, request: web.Request) -> web.StreamResponse:
        refused = self._refused(request)
        if refused is not None:
            return refused
        try:
            body = await request.json()
            ids = [entry["EventId"] for entry in body["StartRequests"]]
        except (ValueError, KeyError, TypeError):
            return web.json_response({"error": "Bad request"}, status=400)
        self.acknowledged.extend(ids)
        return web.Response(status=200)

    # -- /sim endpoints -----------------------------------------------------------------------

    async def _sim_preempt(self, request: web.Request) -> web.Response:
        return self.answer_trigger(lambda: self.preempt(seconds=float(request.query.get("seconds", "30"))))

    async def _sim_event(self, request: web.Request) -> web.Response:
        query = request.query
        return self.answer_trigger(lambda: self.add_event(
            query.get("type", ""), seconds=float(query.get("seconds", "30")),
            resources=query["resources"].split(",") if "resources" in query else None,
            status=query.get("status", "Scheduled")))


def run_azure_metadata(listen: str) -> int:
    """Serve an emulated Azure IMDS on HOST:PORT until SIGINT or SIGTERM."""
    return run_emulator("azure-metadata", listen, lambda host, port: AzureMetadataEmulator(host=host, port=port,
                                                                                            access_log=True),
                        lambda url: [f"Azure IMDS emulator (Scheduled Events) listening on {url}",
                                     f"SPOTGUARD_PROVIDER=azure SPOTGUARD_METADATA_URL={url}",
                                     f"trigger a spot eviction: curl -X POST {url}/sim/preempt"])

"""An emulated EC2 instance metadata service (IMDSv2 only): the keys spotguard reads.

Like EC2 with `HttpTokens: required` it
- hands out session tokens on `PUT /latest/api/token` (TTL header 1-21600 s required, else 400;
  requests carrying `X-Forwarded-For` refused with 403) and echoes the TTL in the answer's
  `X-aws-ec2-metadata-token-ttl-seconds`, as EC2 does and some SDKs require;
- answers `GET /latest/meta-data/...` only with a valid, unexpired token (401 otherwise):
  spot/instance-action (404 until a notice, then `{"action": ..., "time": ...}`),
  events/recommendations/rebalance (404 until `{"noticeTime": ...}`), events/maintenance/scheduled
  (the list: `[]` with none, as EC2 answers it (AWS's own Node Termination Handler treats any
  other status there as an error and stops after a few); ended events kept with "[Canceled]" or
  "[Completed]" in front of their description, as EC2 keeps them for a while),
  autoscaling/target-lifecycle-state (InService, as in an EKS managed node group), instance-id.

Triggers and faults, for tests and the demo:
  POST /sim/preempt[?action=terminate|stop|hibernate&seconds=120]
                                            spot/instance-action appears, `seconds` from now
  POST /sim/rebalance                       a rebalance recommendation appears
  POST /sim/schedule[?code=system-reboot&seconds=3600]
                                            a scheduled event starting `seconds` from now (its EventId in the state)
  POST /sim/schedule/cancel?id=ID           that event cancelled
  POST /sim/schedule/complete?id=ID         that event completed
  POST /sim/asg?state=Terminated            the Auto Scaling target lifecycle state (none: 404, not in a group)
  POST /sim/reset                           no notice, no fault
  POST /sim/fault?mode=M[&seconds=S]        (token requests included) M = none | http_500 | http_503 | http_429 | hang |
                                            slow (S seconds late, default 2) | garbage | refuse |
                                            expire_tokens (every token issued so far turns invalid) |
                                            token_hangs (PUT never answers: what a pod sees with hop
                                            limit 1)
  GET  /sim/state                           the current values and fault as JSON
The same is available from Python: `preempt()`, `rebalance()`, `schedule()`, `end_scheduled()`,
`set_lifecycle_state()`, `set_fault(...)`, `reset()`.
"""

from __future__ import annotations

import json
import secrets
import time
from collections import Counter
from datetime import datetime, timezone

from aiohttp import web

from spotguard_sim.metadata_server import EmulatedServer, run_emulator

# Spelled here from AWS's documentation (EC2 User Guide: "Use IMDSv2", "Spot Instance interruption
# notices", "Rebalance recommendations"), never imported from the provider: a typo there must fail.
TOKEN_HEADER = "X-aws-ec2-metadata-token"
TOKEN_TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
INSTANCE_ACTION_KEY = "spot/instance-action"
REBALANCE_KEY = "events/recommendations/rebalance"
SCHEDULED_KEY = "events/maintenance/scheduled"
ASG_STATE_KEY = "autoscaling/target-lifecycle-state"
ASG_STATES = frozenset({"InService", "Terminated", "Detached", "Standby", "Warmed:Hibernated", "Warmed:Running",
                        "Warmed:Stopped", "Warmed:Terminated"})
INSTANCE_ID_KEY = "instance-id"
ACTIONS = frozenset({"terminate", "stop", "hibernate"})
EVENT_CODES = frozenset({"instance-reboot", "system-reboot", "system-maintenance", "instance-retirement",
                         "instance-stop"})

MAX_TOKEN_TTL_SECONDS = 21600


def _rfc3339(moment: float) -> str:
    return datetime.fromtimestamp(moment, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _event_time(moment: float) -> str:
    """How IMDS writes a scheduled event's times: "21 Jan 2019 09:00:43 GMT"."""
    return datetime.fromtimestamp(moment, timezone.utc).strftime("%d %b %Y %H:%M:%S GMT")


class AwsMetadataEmulator(EmulatedServer):
    """The emulated service. `async with AwsMetadataEmulator() as emulator: emulator.url ...`"""

    extra_fault_modes = ("expire_tokens", "token_hangs")

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, instance_id: str = "i-0123456789abcdef0",
                 slow_seconds: float = 2.0, access_log: bool = False) -> None:
        super().__init__(host=host, port=port, slow_seconds=slow_seconds, access_log=access_log)
        self._instance_id = instance_id
        # token -> expiry (monotonic)
        self._tokens: dict[str, float] = {}
        self._values: dict[str, str | None] = {}
        self._scheduled: list[dict[str, str]] = []
        # Observable by tests: requests per key ("api/token" for the PUTs).
        self.requests: Counter[str] = Counter()
        self.reset()

    def add_routes(self, app: web.Application) -> None:
        app.router.add_put("/latest/api/token", self._serve_token)
        app.router.add_get("/latest/meta-data/{key:.+}", self._serve_key)
        app.router.add_post("/sim/preempt", self._sim_preempt)
        app.router.add_post("/sim/rebalance", self._sim_rebalance)
        app.router.add_post("/sim/schedule", self._sim_schedule)
        app.router.add_post("/sim/schedule/{how:cancel|complete}", self._sim_end_scheduled)
        app.router.add_post("/sim/asg", self._sim_asg)

    # -- triggers -----------------------------------------------------------------------------

    def preempt(self, *, action: str = "terminate", seconds: float = 120.0) -> None:
        """A spot interruption notice: `action` in `seconds` from now (EC2 gives 120)."""
        if action not in ACTIONS:
            raise ValueError(f"action must be one of {', '.join(sorted(ACTIONS))}, got {action!r}")
        self._values[INSTANCE_ACTION_KEY] = json.dumps({"action": action, "time": _rfc3339(time.time() + seconds)})

    def rebalance(self) -> None:
        self._values[REBALANCE_KEY] = json.dumps({"noticeTime": _rfc3339(time.time())})

    def schedule(self, *, code: str = "system-reboot", seconds: float = 3600.0,
                 duration_seconds: float = 1200.0) -> str:
        """An EC2 scheduled event starting `seconds` from now; its EventId."""
        if code not in EVENT_CODES:
            raise ValueError(f"code must be one of {', '.join(sorted(EVENT_CODES))}, got {code!r}")
        event_id = f"instance-event-{secrets.token_hex(8)}"
        start = time.time() + seconds
        self._scheduled.append({"NotBefore": _event_time(start), "Code": code, "Description": f"scheduled {code}",
                                "EventId": event_id, "NotAfter": _event_time(start + duration_seconds),
                                "State": "active"})
        self._values[SCHEDULED_KEY] = json.dumps(self._scheduled, indent=2)
        return event_id

    def end_scheduled(self, event_id: str, *, how: str = "cancel") -> None:
        """The event cancelled (`how="cancel"`) or completed: EC2 keeps listing it for a while,
        its description prefixed "[Canceled]" or "[Completed]"."""
        event = next((e for e in self._scheduled if e["EventId"] == event_id), None)
        if event is None:
            raise KeyError(event_id)
        prefix = {"cancel": "[Canceled]", "complete": "[Completed]"}[how]
        event["Description"] = f"{prefix} {event['Description']}"
        self._values[SCHEDULED_KEY] = json.dumps(self._scheduled, indent=2)

    def set_lifecycle_state(self, state: str | None) -> None:
        """The Auto Scaling target lifecycle state (None: 404, the instance is in no group)."""
        if state is not None and state not in ASG_STATES:
            raise ValueError(f"state must be one of {', '.join(sorted(ASG_STATES))}, got {state!r}")
        self._values[ASG_STATE_KEY] = state

    def set_raw(self, key: str, text: str | None) -> None:
        """Any body (None: 404) for an emulated key, e.g. one EC2 does not document, for tests."""
        if key not in self._values:
            raise KeyError(key)
        self._values[key] = text

    def set_fault(self, mode: str, *, seconds: float | None = None) -> None:
        """`expire_tokens` is a one-off (every token issued so far turns invalid), not a lasting mode."""
        if mode == "expire_tokens":
            self._tokens.clear()
            mode = "none"
        super().set_fault(mode, seconds=seconds)

    def reset(self) -> None:
        self._fault = "none"
        self._scheduled = []
        self._values = {INSTANCE_ID_KEY: self._instance_id, INSTANCE_ACTION_KEY: None, REBALANCE_KEY: None,
                        SCHEDULED_KEY: "[]", ASG_STATE_KEY: "InService"}
        self.notify()

    def state(self) -> dict[str, object]:
        return {"fault": self._fault, "values": dict(self._values), "tokens": len(self._tokens)}

    # -- metadata requests --------------------------------------------------------------------

    async def _serve_token(self, request: web.Request) -> web.StreamResponse:
        self.requests["api/token"] += 1
        if "X-Forwarded-For" in request.headers:
            return web.Response(status=403, text="Forbidden\n")
        await self.hold_while(lambda: self._fault == "token_hangs")
        faulted = await self.fault_response(request)
        if faulted is not None:
            return faulted
        try:
            ttl = int(request.headers.get(TOKEN_TTL_HEADER, ""))
        except ValueError:
            ttl = 0
        if not 1 <= ttl <= MAX_TOKEN_TTL_SECONDS:
            return web.Response(status=400, text="Missing or Invalid Parameters\n")
        token = secrets.token_urlsafe(32)
        self._tokens[token] = time.monotonic() + ttl
        return web.Response(text=token, headers={TOKEN_TTL_HEADER: str(ttl)})

    async def _serve_key(self, request: web.Request) -> web.StreamResponse:
        key = request.match_info["key"]
        expiry = self._tokens.get(request.headers.get(TOKEN_HEADER, ""))
        if expiry is None or expiry < time.monotonic():
            return web.Response(status=401, text="Unauthorized\n")
        if key not in self._values:
            return web.Response(status=404, text="Not Found\n")
        self.requests[key] += 1
        faulted = await self.fault_response(request)
        if faulted is not None:
            return faulted
        value = self._values[key]
        if value is None:
            return web.Response(status=404, text="Not Found\n")
        return web.Response(text=value, content_type="text/plain")

    # -- /sim endpoints -----------------------------------------------------------------------

    async def _sim_preempt(self, request: web.Request) -> web.Response:
        return self.answer_trigger(lambda: self.preempt(action=request.query.get("action", "terminate"),
                                                        seconds=float(request.query.get("seconds", "120"))))

    async def _sim_rebalance(self, _: web.Request) -> web.Response:
        return self.answer_trigger(self.rebalance)

    async def _sim_schedule(self, request: web.Request) -> web.Response:
        return self.answer_trigger(lambda: self.schedule(code=request.query.get("code", "system-reboot"),
                                                         seconds=float(request.query.get("seconds", "3600"))))

    async def _sim_asg(self, request: web.Request) -> web.Response:
        return self.answer_trigger(lambda: self.set_lifecycle_state(request.query.get("state") or None))

    async def _sim_end_scheduled(self, request: web.Request) -> web.Response:
        how = request.match_info["how"]
        return self.answer_trigger(lambda: self.end_scheduled(request.query.get("id", ""), how=how))


def run_aws_metadata(listen: str) -> int:
    """Serve an emulated EC2 instance metadata service on HOST:PORT until SIGINT or SIGTERM."""
    return run_emulator("aws-metadata", listen, lambda host, port: AwsMetadataEmulator(host=host, port=port,
                                                                                        access_log=True),
                        lambda url: [f"EC2 instance metadata emulator (IMDSv2) listening on {url}",
                                     f"SPOTGUARD_PROVIDER=aws SPOTGUARD_METADATA_URL={url}",
                                     f"trigger a spot interruption: curl -X POST {url}/sim/preempt"])

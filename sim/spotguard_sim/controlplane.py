"""The local control plane: real etcd, kube-apiserver, kube-controller-manager and kube-scheduler.

They are built once from Go modules (tools/controlplane, Kubernetes v1.36.3) into a single binary,
cached under ~/.cache/spotguard keyed by a hash of the Go sources, and started as background
processes listening on 127.0.0.1 only. The simulated kubelet (spotguard_sim.kubelet) is started
alongside, so Nodes and Pods behave as they would on a cluster without Docker.

`up` is idempotent: a second call finds the running cluster through DIR/cluster.json and reuses
it. `down` stops every process `up` started, children included.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from spotguard_sim import paths
from spotguard_sim.support import free_port

KUBERNETES_VERSION = "v1.36.3"
DEFAULT_DIR = Path(".spotguard-sim")
SERVICE_CIDR = "10.96.0.0/16"

Progress = Callable[[str], None]


class ControlPlaneError(RuntimeError):
    """The control plane could not be built or started; the message says why and what to do."""


def _say(message: str) -> None:
    print(f"[spotguard-sim] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Building


def cache_root() -> Path:
    explicit = os.environ.get("SPOTGUARD_CACHE_DIR")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "spotguard"


# The one change to upstream Kubernetes, applied at build time to a private copy of the module (the
# Go module cache is never modified and no Kubernetes code is kept in this repository). Endpoint and
# EndpointSlice validation refuses loopback addresses, but simulated pods have no container network:
# they serve on unique 127.0.0.0/8 addresses (Linux routes all of 127/8 to lo). Without this the real
# EndpointSlice controller could not publish them, and nothing could follow Pod readiness the way
# Services and gateways do. Every other validation, controller and API behaviour is upstream's.
_PATCHED_FILE = "pkg/apis/core/validation/validation.go"
_PATCH_FIND = "\tif ip.IsLoopback() {\n"
_PATCH_REPLACE = "\tif false && ip.IsLoopback() { // spotguard sim: pods serve on 127.0.0.0/8\n"


def _source_key() -> str:
    digest = hashlib.sha256()
    for name in ("go.mod", "go.sum", "main.go", "certs.go"):
        digest.update((paths.controlplane_source() / name).read_bytes())
    digest.update((_PATCHED_FILE + _PATCH_FIND + _PATCH_REPLACE).encode())
    return digest.hexdigest()[:12]


def _prepare_workdir(go: str, workdir: Path, env: dict[str, str]) -> None:
    """Lay out tools/controlplane in workdir with k8s.io/kubernetes replaced by a patched copy.

    The copy is made of hard links into the module cache (cheap), except the one patched file.
    """
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    subprocess.run([go, "mod", "download", "k8s.io/kubernetes"], cwd=paths.controlplane_source(), env=env, check=True)
    module_dir = Path(subprocess.run([go, "list", "-m", "-f", "{{.Dir}}", "k8s.io/kubernetes"], cwd=paths.controlplane_source(),
                                     env=env, check=True, capture_output=True, text=True).stdout.strip())
    text = (module_dir / _PATCHED_FILE).read_text()
    if text.count(_PATCH_FIND) != 1:
        raise ControlPlaneError(f"cannot apply the loopback-endpoint patch: {_PATCHED_FILE} changed upstream "
                                f"(expected exactly one {_PATCH_FIND.strip()!r})")

    def link_or_copy(source: str, target: str) -> None:
        try:
            os.link(source, target)
        except OSError:
            shutil.copy2(source, target)

    shutil.copytree(module_dir, workdir / "kubernetes", copy_function=link_or_copy)
    patched = workdir / "kubernetes" / _PATCHED_FILE
    patched.unlink()
    patched.write_text(text.replace(_PATCH_FIND, _PATCH_REPLACE))
    for name in ("go.sum", "main.go", "certs.go"):
        shutil.copy2(paths.controlplane_source() / name, workdir / name)
    go_mod = (paths.controlplane_source() / "go.mod").read_text()
    (workdir / "go.mod").write_text(go_mod + "\nreplace k8s.io/kubernetes => ./kubernetes\n")


def binary_path() -> Path:
    return cache_root() / f"controlplane-{KUBERNETES_VERSION}-{_source_key()}" / "spotguard-controlplane"


def ensure_built(*, say: Progress = _say) -> Path:
    """Return the control-plane binary, building it first if this source has never been built."""
    binary = binary_path()
    if binary.exists():
        return binary
    go = shutil.which("go")
    if go is None:
        raise ControlPlaneError("Go is not installed: the local control plane is built from Go modules; "
                                "install Go >= 1.26 (https://go.dev/dl) and retry")
    binary.parent.mkdir(parents=True, exist_ok=True)
    partial = binary.with_suffix(".partial")
    version_flags = " ".join([
        f"-X k8s.io/component-base/version.gitVersion={KUBERNETES_VERSION}",
        f"-X k8s.io/component-base/version.gitMajor={KUBERNETES_VERSION.split('.')[0][1:]}",
        f"-X k8s.io/component-base/version.gitMinor={KUBERNETES_VERSION.split('.')[1]}",
        "-X k8s.io/component-base/version.gitTreeState=clean",
    ])
    say(f"building Kubernetes {KUBERNETES_VERSION} control plane + etcd from Go modules (first time only; "
        f"measured 4-5 min on 2 cores; progress every 100 packages) -> {binary}")
    started = time.monotonic()
    # CGO_ENABLED=0 as upstream builds Kubernetes, and as tools/kind/setup.sh builds its binaries:
    # with the same flags and module versions, the packages outside k8s.io/kubernetes compile once
    # for both (Go's build cache), which matters on a fresh machine.
    env = {**os.environ, "GOFLAGS": os.environ.get("GOFLAGS", "") + " -mod=readonly", "CGO_ENABLED": "0"}
    workdir = binary.parent / "src"
    _prepare_workdir(go, workdir, env)
    command = [go, "build", "-v", "-trimpath", "-buildvcs=false",
               "-ldflags", f"-s -w {version_flags}", "-o", str(partial), "."]
    process = subprocess.Popen(command, cwd=workdir, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    assert process.stdout is not None
    compiled = 0
    tail: list[str] = []
    for line in process.stdout:
        line = line.rstrip()
        tail = (tail + [line])[-30:]
        if line and not line.startswith(("#", " ", "go: downloading")):
            compiled += 1
            if compiled % 100 == 0:
                say(f"  compiled {compiled} packages ({time.monotonic() - started:.0f}s) ... {line}")
        elif line.startswith("go: downloading") and compiled == 0:
            say(f"  {line}")
    if process.wait() != 0:
        raise ControlPlaneError("building the control plane failed (go build in tools/controlplane):\n"
                                + "\n".join(tail))
    partial.rename(binary)
    shutil.rmtree(workdir, ignore_errors=True)
    for stale in binary.parent.parent.glob("controlplane-*"):
        if stale != binary.parent:  # builds of older sources: never used again
            shutil.rmtree(stale, ignore_errors=True)
    say(f"built in {time.monotonic() - started:.0f}s ({compiled} packages), cached for next time")
    return binary


# ---------------------------------------------------------------------------------------------
# Running


@dataclass
class ProcessRecord:
    name: str
    pid: int
    # /proc start time, so a recycled pid is never mistaken for ours.
    started: str
    # The command line it was started with, so `start_component` can start it again after
    # `stop_component`; None in a cluster.json written before commands were recorded.
    command: list[str] | None = None


@dataclass
class ClusterInfo:
    dir: str
    apiserver_port: int
    etcd_port: int
    processes: list[ProcessRecord]

    @property
    def kubeconfig(self) -> Path:
        return Path(self.dir) / "kubeconfig"

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.apiserver_port}"


def _proc_start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Fields after the ")" that ends the command name: state is field 3, starttime field 22.
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] in ("Z", "X") else fields[19]


def _alive(record: ProcessRecord) -> bool:
    return _proc_start_time(record.pid) == record.started


def _kubeconfig(directory: Path, *, server: str, user: str) -> str:
    return json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "spotguard-sim",
        "clusters": [{"name": "spotguard-sim", "cluster": {
            "server": server, "certificate-authority": str(directory / "pki" / "ca.crt")}}],
        "users": [{"name": user, "user": {
            "client-certificate": str(directory / "pki" / f"{user}.crt"),
            "client-key": str(directory / "pki" / f"{user}.key")}}],
        "contexts": [{"name": "spotguard-sim", "context": {"cluster": "spotguard-sim", "user": user}}],
    }, indent=2)


def read_info(directory: Path) -> ClusterInfo | None:
    try:
        raw = json.loads((directory / "cluster.json").read_text())
    except (OSError, ValueError):
        return None
    raw["processes"] = [ProcessRecord(**p) for p in raw["processes"]]
    return ClusterInfo(**raw)


def _readyz(info: ClusterInfo, timeout: float = 2.0) -> bool:
    context = ssl.create_default_context(cafile=str(Path(info.dir) / "pki" / "ca.crt"))
    try:
        with urllib.request.urlopen(f"{info.server}/readyz", context=context, timeout=timeout) as response:
            return response.status == 200
    except OSError:
        return False


def up(directory: Path = DEFAULT_DIR, *, say: Progress = _say, kubelet: bool = True,
       audit: bool = False) -> ClusterInfo:
    """Start the cluster in the background (or find it running) and return where it is.

    `audit=True` starts kube-apiserver with an audit log (DIR/logs/audit.log, see AUDIT_POLICY):
    one JSON line per request with its user agent, which `apiserver_request_total` does not carry.
    It applies only when this call starts the cluster; `audit_log(DIR)` says whether a running
    cluster has one.
    """
    directory = directory.resolve()
    existing = read_info(directory)
    if existing and all(_alive(p) for p in existing.processes) and _readyz(existing):
        say(f"cluster already running in {directory}")
        return existing
    if existing:
        say("found a stale cluster (some processes are gone); restarting it")
        down(directory, say=lambda _: None)
    binary = ensure_built(say=say)
    started = time.monotonic()
    for sub in ("pki", "logs", "etcd"):
        (directory / sub).mkdir(parents=True, exist_ok=True)
    pki = directory / "pki"
    subprocess.run([str(binary), "certs", str(pki)], check=True)
    etcd_port, peer_port, api_port = free_port(), free_port(), free_port()
    server = f"https://127.0.0.1:{api_port}"
    for user, file in (("admin", "kubeconfig"), ("controller-manager", "controller-manager.kubeconfig"),
                       ("scheduler", "scheduler.kubeconfig")):
        (directory / file).write_text(_kubeconfig(directory, server=server, user=user))

    info = ClusterInfo(dir=str(directory), apiserver_port=api_port, etcd_port=etcd_port, processes=[])
    etcd_url, peer_url = f"http://127.0.0.1:{etcd_port}", f"http://127.0.0.1:{peer_port}"
    components: list[tuple[str, list[str]]] = [
        ("etcd", [str(binary), "etcd", "--name", "sim", "--data-dir", str(directory / "etcd"),
                  "--listen-client-urls", etcd_url, "--advertise-client-urls", etcd_url,
                  "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
                  "--initial-cluster", f"sim={peer_url}", "--log-level", "warn",
                  # A throwaway test cluster: durability is not worth an fsync per write.
                  "--unsafe-no-fsync"]),
        ("kube-apiserver", [
            str(binary), "kube-apiserver", "--etcd-servers", etcd_url,
            "--bind-address", "127.0.0.1", "--advertise-address", "127.0.0.1",
            "--secure-port", str(api_port),
            "--tls-cert-file", str(pki / "apiserver.crt"), "--tls-private-key-file", str(pki / "apiserver.key"),
            "--client-ca-file", str(pki / "ca.crt"),
            "--service-account-issuer", "https://kubernetes.default.svc",
            "--service-account-key-file", str(pki / "sa.pub"),
            "--service-account-signing-key-file", str(pki / "sa.key"),
            "--service-cluster-ip-range", SERVICE_CIDR,
            "--authorization-mode", "Node,RBAC", "--allow-privileged", "--profiling=false",
            "--endpoint-reconciler-type", "none", "--v", "1",
            *(_audit_flags(directory) if audit else [])]),
        ("kube-controller-manager", [
            str(binary), "kube-controller-manager",
            "--kubeconfig", str(directory / "controller-manager.kubeconfig"),
            "--authentication-kubeconfig", str(directory / "controller-manager.kubeconfig"),
            "--authorization-kubeconfig", str(directory / "controller-manager.kubeconfig"),
            "--bind-address", "127.0.0.1", "--secure-port", "0", "--leader-elect=false",
            "--use-service-account-credentials", "--service-account-private-key-file", str(pki / "sa.key"),
            "--root-ca-file", str(pki / "ca.crt"), "--service-cluster-ip-range", SERVICE_CIDR,
            # Fast reaction to simulated VMs that disappear (the defaults are for real networks).
            "--node-monitor-period", "2s", "--node-monitor-grace-period", "20s",
            "--controllers", "*", "--v", "1"]),
        ("kube-scheduler", [
            str(binary), "kube-scheduler", "--kubeconfig", str(directory / "scheduler.kubeconfig"),
            "--authentication-kubeconfig", str(directory / "scheduler.kubeconfig"),
            "--authorization-kubeconfig", str(directory / "scheduler.kubeconfig"),
            "--bind-address", "127.0.0.1", "--secure-port", "0", "--leader-elect=false", "--v", "1"]),
    ]
    if kubelet:
        components.append(("sim-kubelet", [sys.executable, "-m", "spotguard_sim.kubelet",
                                           "--kubeconfig", str(directory / "kubeconfig")]))
    try:
        for name, command in components:
            info.processes.append(_spawn(name, command, directory))
            (directory / "cluster.json").write_text(json.dumps(asdict(info), indent=2))
            if name == "etcd":
                _wait_for(lambda: _port_open(etcd_port), what="etcd", seconds=30, directory=directory)
            if name == "kube-apiserver":
                say("waiting for kube-apiserver /readyz")
                _wait_for(lambda: _readyz(info), what="kube-apiserver /readyz", seconds=90,
                          directory=directory)
    except BaseException:
        down(directory, say=lambda _: None)
        raise
    say(f"control plane {KUBERNETES_VERSION} ready in {time.monotonic() - started:.1f}s; logs in {directory}/logs")
    return info


# Every request of clients outside the control plane (the admin kubeconfig: the sim kubelet, the
# daemons, tests) when its response completes, and long-running ones (watches) also when they start
# (same auditID: count distinct IDs); the controllers' and scheduler's own traffic is left out.
AUDIT_POLICY = """apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
- level: None
  users: ["system:kube-controller-manager", "system:kube-scheduler", "system:apiserver"]
- level: None
  userGroups: ["system:serviceaccounts", "system:nodes"]
- level: Metadata
"""


def _audit_flags(directory: Path) -> list[str]:
    policy = directory / "audit-policy.yaml"
    policy.write_text(AUDIT_POLICY)
    return ["--audit-policy-file", str(policy), "--audit-log-path", str(directory / "logs" / "audit.log"),
            "--audit-log-maxsize", "500", "--audit-log-maxbackup", "1"]


def audit_log(directory: Path = DEFAULT_DIR) -> Path | None:
    """The audit log of the cluster running in `directory`, or None when its API server has none."""
    info = read_info(directory.resolve())
    for record in info.processes if info else []:
        if record.name == "kube-apiserver" and _alive(record):
            try:
                argv = Path(f"/proc/{record.pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                return None
            if b"--audit-log-path" in argv:
                return Path(argv[argv.index(b"--audit-log-path") + 1].decode())
    return None


def _spawn(name: str, command: list[str], directory: Path) -> ProcessRecord:
    log = open(directory / "logs" / f"{name}.log", "ab")
    # A session of its own: the cluster outlives the `up` command, and `down` can stop a
    # component together with its children (the fake vLLM processes of the sim kubelet).
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               start_new_session=True, cwd=directory)
    log.close()
    started = _proc_start_time(process.pid)
    assert started is not None
    return ProcessRecord(name=name, pid=process.pid, started=started, command=list(command))


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _wait_for(check: Callable[[], bool], *, what: str, seconds: float, directory: Path) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise ControlPlaneError(f"{what} not ready after {seconds:.0f}s; see {directory}/logs")


def down(directory: Path = DEFAULT_DIR, *, say: Progress = _say) -> None:
    """Stop every process `up` started (newest first), with their children; keep the logs."""
    directory = directory.resolve()
    info = read_info(directory)
    if info is None:
        say(f"no cluster in {directory}")
        return
    for record in reversed(info.processes):
        if _alive(record):
            _stop_group(record)
    (directory / "cluster.json").unlink(missing_ok=True)
    shutil.rmtree(directory / "etcd", ignore_errors=True)
    say(f"cluster in {directory} stopped")


def stop_component(directory: Path, name: str) -> ProcessRecord:
    """Stop one component of a running cluster (with its children), leaving the others running.

    For fault injection: an API server outage is `stop_component(dir, "kube-apiserver")`, then
    `start_component(dir, "kube-apiserver")`. Returns the record of what was stopped.
    """
    directory = directory.resolve()
    _, record = _component(directory, name)
    if _alive(record):
        _stop_group(record)
    return record


def start_component(directory: Path, name: str, *, say: Progress = _say, timeout: float = 90.0) -> ProcessRecord:
    """Start again a component `stop_component` stopped, with the command line `up` recorded, and
    wait until it serves (etcd: its client port; kube-apiserver: /readyz). A component that is
    running is left alone. cluster.json is updated, so `down` stops the new process."""
    directory = directory.resolve()
    info, record = _component(directory, name)
    if _alive(record):
        return record
    if not record.command:
        raise ControlPlaneError(f"{name}: cluster.json in {directory} has no recorded command line (the "
                                "cluster was started by an older spotguard); restart it with down + up")
    started = _spawn(name, record.command, directory)
    # Re-read right before writing: only this component's record changes.
    info, _ = _component(directory, name)
    info.processes = [started if p.name == name else p for p in info.processes]
    (directory / "cluster.json").write_text(json.dumps(asdict(info), indent=2))
    if name == "etcd":
        _wait_for(lambda: _port_open(info.etcd_port), what="etcd", seconds=timeout, directory=directory)
    if name == "kube-apiserver":
        say("waiting for kube-apiserver /readyz")
        _wait_for(lambda: _readyz(info), what="kube-apiserver /readyz", seconds=timeout, directory=directory)
    return started


def _component(directory: Path, name: str) -> tuple[ClusterInfo, ProcessRecord]:
    info = read_info(directory)
    if info is None:
        raise ControlPlaneError(f"no cluster in {directory} (no readable cluster.json)")
    for record in info.processes:
        if record.name == name:
            return info, record
    known = ", ".join(p.name for p in info.processes)
    raise ControlPlaneError(f"no component {name!r} in the cluster in {directory}; it has {known}")


def _stop_group(record: ProcessRecord, grace: float = 10.0) -> None:
    try:
        os.killpg(record.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and _alive(record):
        time.sleep(0.05)
    try:
        os.killpg(record.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    # Reap it if it is our child (it is, when up and down run in the same process).
    try:
        os.waitpid(record.pid, os.WNOHANG)
    except ChildProcessError:
        pass

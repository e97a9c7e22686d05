"""A real Prometheus server for the simulation: it scrapes every simulated spotguard daemon and
every fake vLLM pod, and evaluates the chart's own alert rules.

The server is Debian's `prometheus` (scripts/install-prometheus.sh), run as a child process on
127.0.0.1 with its own throw-away TSDB and 1 s scrape and evaluation intervals. Targets come from
file-based service discovery (one JSON file per job, rewritten atomically), so daemons and pods can
come and go while it runs.

The scrape is configured the way the chart's PodMonitor configures it on a real cluster, because the
alerts depend on it: spotguard's targets carry `node=<node>` (the PodMonitor's relabeling of
__meta_kubernetes_pod_node_name) plus the `namespace`/`pod` of spotguard's own pod, and
`honor_labels: true` lets the `namespace`/`pod`/`pdb` that spotguard exports (the *blocked* pod's)
win over those. vLLM targets carry `namespace`, `pod` and `node`, as a PodMonitor on vLLM would.

    rules = render_rule_file(tmp / "rules.yaml", values=FAST_ALERTS)
    with SimPrometheus(rule_file=rules) as prom:
        prom.set_targets(targets_for(world))
        prom.wait_for_alert("SpotguardPreemptionInProgress", labels={"node": "gpu-1"})
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from spotguard_sim.support import free_port, wait_until

if TYPE_CHECKING:
    from spotguard_sim.world import World

PROMETHEUS = "/usr/bin/prometheus"
SPOTGUARD_JOB = "spotguard"
VLLM_JOB = "vllm"
JOBS = (SPOTGUARD_JOB, VLLM_JOB)
# Where the simulated DaemonSet "runs": the namespace label spotguard's own targets get, which
# honor_labels must let spotguard_eviction_blocked{namespace=...} override.
DAEMON_NAMESPACE = "spotguard-system"

# Chart values for the simulation: the chart's `for:` durations (30 s to 10 min) shortened so an
# alert's pending -> firing transition happens within a test, still long enough (several 1 s
# evaluations) that `pending` is observable. Only durations change; expressions and labels are the
# product's.
FAST_ALERTS: dict[str, Any] = {"prometheusRule": {
    "evictionBlockedFor": "5s", "metadataUnreachableFor": "5s", "missingFor": "10s"}}

ALERT_STATES = ("pending", "firing")


class PrometheusError(RuntimeError):
    """Prometheus is missing, did not start, or answered an API call with an error."""


@dataclass(frozen=True)
class Target:
    """One scrape target: `address` is host:port, `labels` become the target's labels."""

    job: str
    address: str
    labels: Mapping[str, str] = field(default_factory=dict)


def render_rule_file(path: Path, *, values: dict[str, Any] | None = None) -> Path:
    """The chart's alert rules (the PrometheusRule's groups, rendered by the Helm engine with
    `values`) written as a plain Prometheus rule file."""
    from spotguard_sim.chart import write_rule_file

    path.parent.mkdir(parents=True, exist_ok=True)
    return write_rule_file(path, values)


def targets_for(world: World, *, daemon_namespace: str = DAEMON_NAMESPACE) -> list[Target]:
    """Every running spotguard daemon of `world` and every fake vLLM pod in its namespace that has an
    IP and is not being deleted, labelled as the chart's PodMonitor (and one on vLLM) would."""
    targets: list[Target] = []
    for vm in world.vms.values():
        daemon = vm.daemon
        if daemon is None or daemon.process is None or daemon.process.poll() is not None:
            continue
        targets.append(Target(SPOTGUARD_JOB, f"127.0.0.1:{daemon.port}", {
            "node": vm.name, "namespace": daemon_namespace, "pod": f"spotguard-{vm.name}"}))
    for pod in world.pods():
        meta, status = pod["metadata"], pod.get("status", {})
        annotations = meta.get("annotations") or {}
        if annotations.get("sim.spotguard.io/fake-vllm") != "true" or meta.get("deletionTimestamp"):
            continue
        if not status.get("podIP") or status.get("phase") != "Running":
            continue
        port = annotations.get("spotguard.io/metrics-port", "8000")
        targets.append(Target(VLLM_JOB, f"{status['podIP']}:{port}", {
            "namespace": meta["namespace"], "pod": meta["name"], "node": pod["spec"].get("nodeName", "")}))
    return targets


class SimPrometheus:
    """`prometheus` as a child process on 127.0.0.1:<free port>. `stop()` always ends it (SIGTERM,
    then SIGKILL); as a context manager it is started on entry and stopped on exit.

    `work_dir` holds the configuration, the target files, the TSDB and prometheus.log; without one
    a temporary directory is used and removed by `stop()`.
    """

    def __init__(self, *, rule_file: Path | None = None, work_dir: Path | None = None,
                 interval: str = "1s", retention: str = "2h", binary: str = PROMETHEUS) -> None:
        self.rule_file = rule_file.resolve() if rule_file is not None else None
        self.interval = interval
        self.retention = retention
        self.binary = binary
        self._own_dir = work_dir is None
        self.work_dir = Path(tempfile.mkdtemp(prefix="spotguard-prometheus-")) if work_dir is None else work_dir
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.work_dir / "prometheus.log"

    # -- process -------------------------------------------------------------------------------

    def start(self, timeout: float = 30) -> SimPrometheus:
        if not os.access(self.binary, os.X_OK):
            raise PrometheusError(f"{self.binary} not found: run scripts/install-prometheus.sh")
        self.work_dir.mkdir(parents=True, exist_ok=True)
        for job in JOBS:
            if not self._targets_file(job).exists():
                self._write_json(self._targets_file(job), [])
        config = self.work_dir / "prometheus.yml"
        self._write_json(config, self._config())  # JSON is YAML
        # A free port is only free until someone else takes it: up to three tries with fresh ports.
        for attempt in range(3):
            self.port = free_port()
            with open(self.log_path, "ab") as log:
                self.process = subprocess.Popen(
                    [self.binary, f"--config.file={config}", f"--web.listen-address=127.0.0.1:{self.port}",
                     f"--storage.tsdb.path={self.work_dir / 'data'}",
                     f"--storage.tsdb.retention.time={self.retention}", "--web.enable-lifecycle"],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            try:
                self._wait_ready(timeout)
                return self
            except PrometheusError:
                self._end_process()
                if attempt == 2 or "address already in use" not in self._log_tail():
                    self.stop()
                    raise
            except BaseException:
                self.stop()
                raise
        raise AssertionError("unreachable")

    def stop(self) -> None:
        self._end_process()
        if self._own_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def __enter__(self) -> SimPrometheus:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def reload(self) -> None:
        """Re-read the configuration and the rule file (POST /-/reload, --web.enable-lifecycle)."""
        request = urllib.request.Request(f"{self.url}/-/reload", method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                raise PrometheusError(f"prometheus exited with {self.process.returncode}: {self._log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise PrometheusError(f"prometheus on {self.url} not ready in {timeout:.0f}s: {self._log_tail()}")
            time.sleep(0.1)

    def _end_process(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)

    def _log_tail(self, lines: int = 3) -> str:
        """The log's error lines (why it exited), else its last lines."""
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return f"(no log at {self.log_path})"
        errors = [line for line in text if "level=error" in line]
        return " | ".join((errors or text)[-lines:]) + f" (log: {self.log_path})"

    # -- configuration -------------------------------------------------------------------------

    def _config(self) -> dict[str, Any]:
        def job(name: str, *, honor_labels: bool) -> dict[str, Any]:
            return {"job_name": name, "honor_labels": honor_labels, "scrape_interval": self.interval,
                    "scrape_timeout": self.interval,
                    "file_sd_configs": [{"files": [str(self._targets_file(name))], "refresh_interval": "1s"}]}

        config: dict[str, Any] = {
            "global": {"scrape_interval": self.interval, "scrape_timeout": self.interval,
                       "evaluation_interval": self.interval},
            "scrape_configs": [job(SPOTGUARD_JOB, honor_labels=True), job(VLLM_JOB, honor_labels=False)],
        }
        if self.rule_file is not None:
            config["rule_files"] = [str(self.rule_file)]
        return config

    def _targets_file(self, job: str) -> Path:
        return self.work_dir / f"targets-{job}.json"

    def set_targets(self, targets: Iterable[Target]) -> None:
        """Replace every job's targets. Prometheus reads the files at once (inotify, with a 1 s
        re-read as backstop) but its scrape manager applies new target sets only every 5 s:
        `wait_for_targets` waits until it scrapes them."""
        by_job: dict[str, list[dict[str, Any]]] = {job: [] for job in JOBS}
        for target in targets:
            if target.job not in by_job:
                raise ValueError(f"unknown job {target.job!r}; jobs are {', '.join(JOBS)}")
            by_job[target.job].append({"targets": [target.address], "labels": dict(target.labels)})
        for job, groups in by_job.items():
            self._write_json(self._targets_file(job), groups)

    @staticmethod
    def _write_json(path: Path, content: Any) -> None:
        # Write then rename, so Prometheus never reads a half-written file.
        partial = path.with_name(f".{path.name}.tmp")
        partial.write_text(json.dumps(content, indent=1))
        partial.replace(path)

    # -- HTTP API ------------------------------------------------------------------------------

    def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/<path>; the `data` of a successful answer."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}", timeout=10) as response:
                body = json.load(response)
        except urllib.error.HTTPError as error:
            body = json.load(error)
        if body.get("status") != "success":
            raise PrometheusError(f"/api/v1/{path}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query; for a vector, a list of {"metric": {labels}, "value": [ts, "value"]}."""
        result: list[dict[str, Any]] = self.api("query", query=expr)["result"]
        return result

    def alerts(self) -> list[dict[str, Any]]:
        """Active alerts (pending and firing), as GET /api/v1/alerts gives them: labels (alertname
        included), annotations, state, activeAt, value. Resolved alerts are not listed."""
        alerts: list[dict[str, Any]] = self.api("alerts")["alerts"]
        return alerts

    def targets(self) -> list[dict[str, Any]]:
        """Active scrape targets with their health (GET /api/v1/targets)."""
        active: list[dict[str, Any]] = self.api("targets", state="active")["activeTargets"]
        return active

    def matching_alerts(self, name: str, labels: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
        wanted = {"alertname": name, **(labels or {})}
        return [a for a in self.alerts() if all(a["labels"].get(k) == v for k, v in wanted.items())]

    def wait_for_alert(self, name: str, state: str = "firing", labels: Mapping[str, str] | None = None,
                       timeout: float = 30) -> dict[str, Any]:
        """The first active alert `name` whose labels include `labels` and that has reached `state`:
        "pending" is satisfied by a pending or a firing alert (every firing alert was pending, for
        one evaluation or for its `for:`), "firing" only by a firing one."""
        if state not in ALERT_STATES:
            raise ValueError(f"state must be one of {ALERT_STATES}, not {state!r}")
        accepted = ALERT_STATES[ALERT_STATES.index(state):]

        def reached() -> dict[str, Any] | None:
            return next((a for a in self.matching_alerts(name, labels) if a["state"] in accepted), None)

        try:
            found: dict[str, Any] = wait_until(reached, timeout=timeout, interval=0.2,
                                               what=f"alert {name}{dict(labels or {})} {state}")
        except TimeoutError as error:
            raise TimeoutError(f"{error}; active alerts: {self._describe_alerts()}") from None
        return found

    def wait_for_no_alert(self, name: str, labels: Mapping[str, str] | None = None, timeout: float = 30) -> None:
        """Until no alert `name` with `labels` is pending or firing (it resolved, or never started)."""
        try:
            wait_until(lambda: not self.matching_alerts(name, labels), timeout=timeout, interval=0.2,
                       what=f"alert {name}{dict(labels or {})} resolved")
        except TimeoutError as error:
            raise TimeoutError(f"{error}; active alerts: {self._describe_alerts()}") from None

    def wait_for_targets(self, targets: Iterable[Target], timeout: float = 30) -> None:
        """Until each of `targets` has been scraped successfully (health "up")."""
        addresses = {(t.job, t.address) for t in targets}

        def all_up() -> bool:
            up = {(t["labels"].get("job"), t["labels"].get("instance")) for t in self.targets()
                  if t.get("health") == "up"}
            return addresses <= up

        try:
            wait_until(all_up, timeout=timeout, interval=0.2, what=f"targets {sorted(addresses)} up")
        except TimeoutError as error:
            seen = [(t["labels"].get("job"), t["labels"].get("instance"), t.get("health"), t.get("lastError"))
                    for t in self.targets()]
            raise TimeoutError(f"{error}; targets: {seen}") from None

    def _describe_alerts(self) -> str:
        try:
            return "; ".join(sorted(f"{a['state']} {a['labels']}" for a in self.alerts())) or "none"
        except (OSError, PrometheusError) as error:
            return f"unknown ({error})"

"""Shared fixtures. Tests marked `cluster` run against the real local control plane
(spotguard_sim.controlplane: etcd, kube-apiserver, kube-controller-manager, kube-scheduler and the
simulated kubelet), started once per test session and stopped at its end, even on failure."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator

import pytest
import setup_steps
from setup_steps import STEP_OF_MARKER
from spotguard_sim import controlplane


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[controlplane.ClusterInfo]:
    # SPOTGUARD_TEST_CLUSTER_DIR reuses a cluster a developer keeps running between test runs.
    reuse = os.environ.get("SPOTGUARD_TEST_CLUSTER_DIR")
    directory = Path(reuse) if reuse else tmp_path_factory.mktemp("sim-cluster")
    info = controlplane.up(directory)
    try:
        yield info
    finally:
        if not reuse:
            controlplane.down(directory)


@pytest.fixture(scope="session")
def api_client(cluster: controlplane.ClusterInfo):
    from kubernetes import config

    client = config.new_client_from_config(config_file=str(cluster.kubeconfig))
    yield client
    client.close()


@pytest.fixture
def namespace(api_client) -> Iterator[str]:
    """A fresh namespace per test, deleted afterwards (its pods with it). Ready once its `default`
    ServiceAccount exists: until the controller-manager has made it, the API server refuses pods
    there (403 "serviceaccount default not found"), which the first test of a fresh cluster hits."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    core = client.CoreV1Api(api_client)
    name = f"t-{uuid.uuid4().hex[:8]}"
    core.create_namespace({"metadata": {"name": name}})
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                core.read_namespaced_service_account("default", name)
                break
            except ApiException as exc:
                if exc.status != 404 or time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield name
    finally:
        core.delete_namespace(name, grace_period_seconds=0)


@pytest.fixture
async def world(cluster, api_client, namespace, tmp_path):
    """A simulated GPU spot pool in this test's namespace (spotguard_sim.world.World); its daemons,
    emulators and nodes are stopped and deleted afterwards."""
    from spotguard_sim.world import World

    sim = World(api_client=api_client, kubeconfig=cluster.kubeconfig, namespace=namespace,
                log_dir=tmp_path / "logs", pool=f"pool-{uuid.uuid4().hex[:6]}")
    try:
        yield sim
    finally:
        await sim.close()


# ---------------------------------------------------------------------------------------------
# Set-up steps that ./dev test runs in the background (tests/setup_steps.py): a test marked
# awstools, realvllm or kind waits for its step, and such tests run last.

def _progress(config: pytest.Config, message: str) -> None:
    """A line on pytest's terminal at once, past its output capture (a plain print is captured)."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None:
        print(message, flush=True)
        return
    with capture.global_and_fixture_disabled():
        reporter.ensure_newline()
        reporter.write(f"{message}\n", flush=True)


@pytest.fixture(scope="session")
def progress(request: pytest.FixtureRequest) -> Callable[[str], None]:
    """Writes a progress line on the terminal at once, even when every test passes."""
    return lambda message: _progress(request.config, message)


_SETUP_MISSING = pytest.StashKey[str]()


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):  # type: ignore[no-untyped-def]
    """Wait for the test's background steps outside the test (outermost: pytest-timeout's clock
    has not started), so a long first build does not count as a hung test."""
    for marker, step in STEP_OF_MARKER.items():
        if item.get_closest_marker(marker) is not None:
            reason = setup_steps.wait(step, lambda message: _progress(item.config, message))
            if reason:
                item.stash[_SETUP_MISSING] = reason
                break
    yield


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    if _SETUP_MISSING in item.stash:
        pytest.skip(item.stash[_SETUP_MISSING])


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests that wait for a background step last, by step (kind last of all), whole modules at a
    time so module fixtures are set up once."""
    def rank(item: pytest.Item) -> int:
        marks = [i for i, marker in enumerate(STEP_OF_MARKER, start=1) if item.get_closest_marker(marker)]
        return max(marks, default=0)

    def module(item: pytest.Item) -> str:
        return item.nodeid.split("::")[0]

    module_rank: dict[str, int] = {}
    for item in items:
        module_rank[module(item)] = max(module_rank.get(module(item), 0), rank(item))
    items.sort(key=lambda item: module_rank[module(item)])


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """Under CI=true a skipped test that needs a set-up step fails: CI runs where all of them work
    (Docker, root, the registries), so a skip there means that path silently stopped being tested."""
    outcome = yield
    report = outcome.get_result()
    needs = [marker for marker in STEP_OF_MARKER if item.get_closest_marker(marker) is not None]
    if report.skipped and needs and os.environ.get("CI") == "true":
        report.outcome = "failed"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.longrepr = f"{needs[0]} test skipped under CI=true: {reason}"


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:  # type: ignore[no-untyped-def]
    """Where the run's time went, by test folder: what to look at when CI gets slow."""
    seconds: dict[str, float] = {}
    for reports in terminalreporter.stats.values():
        for report in reports:
            if isinstance(report, pytest.TestReport):
                folder = report.nodeid.split("::")[0].rsplit("/", 1)[0]
                seconds[folder] = seconds.get(folder, 0.0) + report.duration
    if seconds:
        terminalreporter.write_sep("-", "time by folder (setup + call + teardown)")
        for folder, total in sorted(seconds.items(), key=lambda kv: -kv[1]):
            terminalreporter.write_line(f"{total:8.1f} s  {folder}")

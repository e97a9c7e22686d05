"""Shared fixtures. Tests marked `cluster` run against the real local control plane
(spotguard_sim.controlplane: etcd, kube-apiserver, kube-controller-manager, kube-scheduler and the
simulated kubelet), started once per test session and stopped at its end, even on failure."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Iterator

import pytest
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
    """A fresh namespace per test, deleted afterwards (its pods with it)."""
    from kubernetes import client

    core = client.CoreV1Api(api_client)
    name = f"t-{uuid.uuid4().hex[:8]}"
    core.create_namespace({"metadata": {"name": name}})
    try:
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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The kind tests last: ./dev test builds their images in the background meanwhile."""
    items.sort(key=lambda item: item.get_closest_marker("kind") is not None)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """Under CI=true a skipped kind test fails: CI runs where Docker can run, so a skip there means
    the kind path silently stopped being tested."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and item.get_closest_marker("kind") is not None and os.environ.get("CI") == "true":
        report.outcome = "failed"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.longrepr = f"kind test skipped under CI=true: {reason}"

"""spotguard on kind, offline: real kubelets, containerd, kube-proxy and graceful node shutdown.

The image is built from the repository's Dockerfile, the chart installed with Helm into a namespace
at the Pod Security level it documents, `spotguard check` run inside each pod, and a preemption
measured under load through a Service's ClusterIP from two clients (one reusing keep-alive
connections, one opening a connection per request): `kubelet_only_drain` (no handler) and
`spotguard_drain` (the chart, drain-aware pods), two runs each, on the gke-spot-30 profile (the
node powers off at the notice). spotguard_sim.kindbench does the work; tools/kind builds the
cluster's images (./dev setup, or in the background from ./dev test: these tests wait for it).

Where no Docker engine can run, the tests skip with the reason; under CI=true a skip fails the run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from spotguard_sim import kindbench

pytestmark = [pytest.mark.kind, pytest.mark.slow]

RUNS = 2


@pytest.fixture(scope="module")
def say(progress: Callable[[str], None]) -> Callable[[str], None]:
    """`[kind] ...` lines on the terminal at once: the CI log shows the image built from the
    Dockerfile and the cluster created from the local node image even when every test passes."""
    return lambda message: progress(f"[kind] {message}")


def _why_kind_cannot_run() -> str | None:
    """None when tools/kind/setup.sh has built everything (conftest waited for ./dev test's
    background run of it), else why kind cannot run here."""
    if shutil.which("docker") is None or shutil.which("kind") is None or shutil.which("kubectl") is None:
        return "no docker, kind or kubectl on PATH (run tools/kind/setup.sh)"
    if subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        return "the Docker engine does not answer (run tools/kind/setup.sh)"
    if subprocess.run(["docker", "image", "inspect", kindbench.PYTHON_BASE], capture_output=True).returncode != 0:
        return "the offline images are not built (run tools/kind/setup.sh)"
    return None


@pytest.fixture(scope="module")
def kind(tmp_path_factory: pytest.TempPathFactory, say: Callable[[str], None]) -> Iterator[kindbench.KindCluster]:
    reason = _why_kind_cannot_run()
    if reason:
        pytest.skip(reason)
    cluster = kindbench.KindCluster(kubeconfig=tmp_path_factory.mktemp("kind") / "kubeconfig", say=say)
    cluster.down()   # a cluster an interrupted run left behind
    try:
        cluster.up(workers=3)   # two replicas, and a third worker for the replacement
        kindbench.build_images(cluster)
        kindbench.install_emulators(cluster)
        yield cluster
    finally:
        cluster.down()


@pytest.fixture(scope="module")
def measured() -> dict[str, list[dict[str, Any]]]:
    return {}


@pytest.mark.timeout(2400)
def test_the_image_comes_from_the_dockerfile_runs_as_65532_and_holds_no_simulation(kind) -> None:
    user, simulation = kindbench.image_user_and_contents(kind)
    assert user == "65532:65532"
    assert simulation == [], simulation


@pytest.mark.timeout(2400)
def test_without_a_handler_the_kubelets_shutdown_alone_decides(kind, measured) -> None:
    runs = [kindbench.run_preemption(kind, scenario="kubelet_only_drain", rep=rep) for rep in range(RUNS)]
    measured["kubelet_only_drain"] = runs
    for run in runs:
        for client in run["clients"].values():
            assert client["requests"] > 0 and client["completed"] + client["lost"] <= client["requests"]
        assert run["replacement_ready_s"] > 0
        assert run["evicted_events"] == [], "no handler: nothing evicts"


@pytest.mark.timeout(2400)
def test_the_chart_installs_and_every_pod_says_its_node_is_protected(kind) -> None:
    kindbench.install_chart(kind)
    checks = kindbench.spotguard_check(kind)
    assert sorted(checks) == kind.workers()
    for node, output in checks.items():
        assert "PROTECTED: 0 failed" in output, f"{node}:\n{output}"
        assert f"OK   admission: may cordon, taint and annotate node {node} (dry run)" in output


@pytest.mark.timeout(2400)
def test_spotguard_drains_a_real_node_shutdown_and_its_replacement_starts_at_the_notice(kind, measured, say) -> None:
    runs = [kindbench.run_preemption(kind, scenario="spotguard_drain", rep=rep) for rep in range(RUNS)]
    measured["spotguard_drain"] = runs
    for run in runs:
        assert any("drains its own in-flight" in message for message in run["evicted_events"]), \
            f"spotguard did not evict {run['victim_pod']} at the notice: {run['evicted_events']}"
    summary = kindbench.summarize([r for scenario in measured.values() for r in scenario])
    say(json.dumps(summary))
    if os.environ.get("SPOTGUARD_KIND_RESULTS"):
        Path(os.environ["SPOTGUARD_KIND_RESULTS"]).write_text(json.dumps({"summary": summary, "runs": measured},
                                                                        indent=1))

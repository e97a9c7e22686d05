"""The preemption scenario on a kind cluster, for users with Docker (see README.md here).

Not run in this project's CI: no Docker engine there. Skipped with the reason when Docker or kind
is missing."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

HERE = Path(__file__).parent
ROOT = HERE.parents[2]
CLUSTER = "spotguard"


def _docker_ready() -> bool:
    if shutil.which("docker") is None or shutil.which("kind") is None or shutil.which("kubectl") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True).returncode == 0


pytestmark = [
    pytest.mark.kind,
    pytest.mark.skipif(not _docker_ready(), reason="needs a running Docker engine, kind and kubectl "
                                                   "(not available on this project's CI machines)"),
]


def run(*command: str, **kwargs) -> str:
    return subprocess.run(command, check=True, capture_output=True, text=True, **kwargs).stdout


def kubectl(*args: str) -> str:
    return run("kubectl", "--context", f"kind-{CLUSTER}", *args)


@pytest.fixture(scope="module")
def kind_cluster():
    run("kind", "create", "cluster", "--config", str(HERE / "kind-config.yaml"), "--wait", "120s")
    try:
        run("docker", "build", "-t", "spotguard:dev", str(ROOT))
        run("kind", "load", "docker-image", "spotguard:dev", "--name", CLUSTER)
        yield
    finally:
        run("kind", "delete", "cluster", "--name", CLUSTER)


def wait(check, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(1)
    raise TimeoutError("condition not reached")


def test_preemption_on_kind_cordons_deregisters_and_evicts(kind_cluster):
    import yaml
    from spotguard_sim.chart import render

    kubectl("apply", "-f", str(HERE / "gce-metadata.yaml"), "-f", str(HERE / "vllm.yaml"))
    values = yaml.safe_load((HERE / "values-kind.yaml").read_text())
    rendered = render(values, namespace="spotguard", api_versions=["admissionregistration.k8s.io/v1"])
    manifests = "\n---\n".join(text for path, text in sorted(rendered.items()) if not path.endswith("NOTES.txt"))
    kubectl("create", "namespace", "spotguard")
    subprocess.run(["kubectl", "--context", f"kind-{CLUSTER}", "apply", "-f", "-"], input=manifests,
                   text=True, check=True)

    def vllm_ready() -> bool:
        pods = json.loads(kubectl("-n", "inference", "get", "pods", "-l", "app=vllm", "-o", "json"))["items"]
        return len(pods) == 2 and all(any(c["type"] == "Ready" and c["status"] == "True"
                                          for c in p["status"].get("conditions", [])) for p in pods)

    wait(vllm_ready)
    pods = json.loads(kubectl("-n", "inference", "get", "pods", "-l", "app=vllm", "-o", "json"))["items"]
    node, victim = pods[0]["spec"]["nodeName"], pods[0]["metadata"]["name"]
    metadata_pod = kubectl("-n", "spotguard-sim", "get", "pod", "-l", "app=gce-metadata",
                           "--field-selector", f"spec.nodeName={node}", "-o", "name").strip()
    kubectl("-n", "spotguard-sim", "exec", metadata_pod, "--", "python", "-c",
            "import urllib.request; urllib.request.urlopen(urllib.request.Request("
            "'http://127.0.0.1:8089/sim/preempt', method='POST'))")

    def cordoned_and_evicted() -> bool:
        held = json.loads(kubectl("get", "node", node, "-o", "json"))
        taints = [t["key"] for t in held["spec"].get("taints") or []]
        names = kubectl("-n", "inference", "get", "pods", "-o", "name")
        return held["spec"].get("unschedulable") is True and "spotguard.io/impending-termination" in taints \
            and f"pod/{victim}" not in names

    wait(cordoned_and_evicted)
    events = kubectl("get", "events", "-A", "--field-selector", "reason=TerminationNotice", "-o", "name")
    assert events.strip()

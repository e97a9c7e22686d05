"""AWS's Node Termination Handler itself (v1.25.0, IMDS mode), as a benchmark peer on the AWS profile.

`evict_immediately` (baselines.py) re-implements what NTH does; this runs the real binary, built
from the Go module proxy by scripts/install-nth.sh, one process per node, against the node's
emulated EC2 metadata (IMDSv2) and the local control plane, with the settings of NTH's Helm chart
in IMDS mode (spot interruption and scheduled-event draining on, pods' own grace periods, daemon
sets ignored; the 2 s IMDS poll is built in).

NTH takes its Kubernetes credentials only from the in-cluster paths
(/var/run/secrets/kubernetes.io/serviceaccount). So each process runs in a private mount namespace
(`unshare --mount`, which needs root) with a tmpfs over /run holding its own ServiceAccount token
and the control plane's CA: nothing is written to the host's /var/run/secrets. Its ServiceAccount
is bound to cluster-admin in the benchmark's cluster: how narrow NTH's own ClusterRole is does not
change what it does.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from spotguard.kubeapi import KubeError
from spotguard_sim import paths
from spotguard_sim.world import World

# NTH's Helm chart defaults for IMDS mode, spelled out (its env names).
SETTINGS = {
    "ENABLE_SPOT_INTERRUPTION_DRAINING": "true",
    "ENABLE_SCHEDULED_EVENT_DRAINING": "true",
    "ENABLE_REBALANCE_MONITORING": "false",
    "DELETE_LOCAL_DATA": "true",
    "IGNORE_DAEMON_SETS": "true",
    "POD_TERMINATION_GRACE_PERIOD": "-1",
    "NODE_TERMINATION_GRACE_PERIOD": "120",
    "METADATA_TRIES": "3",
    "JSON_LOGGING": "true",
    "ENABLE_PROMETHEUS_SERVER": "false",
    "ENABLE_PROBES_SERVER": "false",
    "EMIT_KUBERNETES_EVENTS": "false",
}
SERVICE_ACCOUNT = "node-termination-handler"
# In the private mount namespace: a tmpfs over /run (/var/run links there), the ServiceAccount
# files where client-go's in-cluster config reads them, then NTH itself.
_IN_PRIVATE_RUN = (
    'mount -t tmpfs -o size=1m,mode=0755 tmpfs /run && '
    'd=/run/secrets/kubernetes.io/serviceaccount && mkdir -p "$d" && '
    'cp "$1" "$d/token" && cp "$2" "$d/ca.crt" && printf %s "$3" > "$d/namespace" && '
    'shift 3 && exec "$@"'
)


def binary() -> Path | None:
    """The built NTH binary, or None when scripts/install-nth.sh has not run."""
    return paths.installed("install-nth.sh")


class Nth:
    """One NTH process for one node, started by `run()` and stopped when that task is cancelled.
    It reports nothing itself: the benchmark watches what it does through the API server."""

    # What the scenario's measurement reads from a handler: NTH reports neither (it is watched instead).
    noticed_at: float | None = None

    def __init__(self, world: World, *, node: str, metadata_url: str, executable: Path) -> None:
        self.world = world
        self.node = node
        self.metadata_url = metadata_url
        self.executable = executable
        self.evicted_at: dict[str, float] = {}
        self.log_path = world.log_dir / f"nth-{node}.log"

    async def run(self) -> None:
        process = await asyncio.to_thread(self._start)
        try:
            await asyncio.to_thread(process.wait)
            raise RuntimeError(f"NTH on {self.node} exited with {process.returncode}; see {self.log_path}")
        finally:
            if process.poll() is None:
                process.terminate()
                try:
                    await asyncio.to_thread(process.wait, 10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    await asyncio.to_thread(process.wait, 10)

    def _start(self) -> subprocess.Popen[bytes]:
        server, ca_file = _cluster(self.world.kubeconfig)
        self.world.log_dir.mkdir(parents=True, exist_ok=True)
        token_file = self.world.log_dir / f"nth-{self.node}.token"
        token_file.touch(mode=0o600)
        token_file.write_text(_token(self.world))
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **SETTINGS, "NODE_NAME": self.node,
               "INSTANCE_METADATA_URL": self.metadata_url, "POD_NAMESPACE": self.world.namespace,
               "KUBERNETES_SERVICE_HOST": server.hostname or "127.0.0.1",
               "KUBERNETES_SERVICE_PORT": str(server.port or 443)}
        with self.log_path.open("ab") as log:
            return subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", _IN_PRIVATE_RUN, "nth",
                 str(token_file), str(ca_file), self.world.namespace, str(self.executable)],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _cluster(kubeconfig: Path) -> tuple[Any, Path]:
    """The API server's URL and the CA file, from the control plane's kubeconfig."""
    cluster = json.loads(kubeconfig.read_text())["clusters"][0]["cluster"]
    return urlsplit(cluster["server"]), Path(cluster["certificate-authority"])


def _token(world: World) -> str:
    """A token of NTH's ServiceAccount in the world's namespace (created and bound on first use; the
    binding is owned by the namespace, so the garbage collector deletes it with the namespace)."""
    namespace, api = world.namespace, world.api
    owner = api.call("GET", f"/api/v1/namespaces/{namespace}")["metadata"]
    for method, path, body in (
        ("POST", f"/api/v1/namespaces/{namespace}/serviceaccounts", {"metadata": {"name": SERVICE_ACCOUNT}}),
        ("POST", "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings", {
            "metadata": {"name": f"{SERVICE_ACCOUNT}-{namespace}"[:253], "ownerReferences": [
                {"apiVersion": "v1", "kind": "Namespace", "name": namespace, "uid": owner["uid"]}]},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
            "subjects": [{"kind": "ServiceAccount", "name": SERVICE_ACCOUNT, "namespace": namespace}]}),
    ):
        try:
            api.call(method, path, body=body)
        except KubeError as error:
            if error.status != 409:
                raise
    return api.call("POST", f"/api/v1/namespaces/{namespace}/serviceaccounts/{SERVICE_ACCOUNT}/token",
                    body={"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                          "spec": {"expirationSeconds": 3600}})["status"]["token"]

"""The chart installed with the Helm SDK into the real local control plane.

Proves what rendering cannot: the API server accepts every object (including the
ValidatingAdmissionPolicy's CEL), the DaemonSet controller puts a spotguard pod on GPU spot nodes
and on no other, and RBAC plus the admission policy allow what the daemon does on its own node
and refuse the rest. Requests are made with real tokens of spotguard's ServiceAccount, each bound
(TokenRequest) to a pod of that account on the node in question, as the kubelet mounts them: the
`authentication.kubernetes.io/node-name` claim the policies read comes from the token itself.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import chartlib
import helm_python as helm
import pytest
import yaml
from kubernetes import config as kube_config

from spotguard import handover, placeholder
from spotguard.kube import EVICTION_LABEL

pytestmark = pytest.mark.cluster

PAUSE = "registry.k8s.io/pause:3.10"


class ApiError(Exception):
    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(f"HTTP {status}: {body.get('message', body)}")
        self.status = status
        self.message = str(body.get("message", ""))


def _call(client: Any, method: str, path: str, body: Any = None,
          content_type: str = "application/json") -> dict[str, Any]:
    headers = {"Accept": "application/json"}
    if body is not None:
        headers["Content-Type"] = content_type
    request = client.param_serialize(method=method, resource_path=path, header_params=headers, body=body,
                                     auth_settings=["BearerToken"])
    response = client.call_api(*request, _request_timeout=30)
    raw = response.read()
    if response.status >= 400:
        # Not always a Status: a group not served yet (a CRD just created) answers "404 page not found".
        try:
            status = json.loads(raw) if raw else {}
        except ValueError:
            status = {"message": raw.decode(errors="replace").strip()}
        raise ApiError(response.status, status)
    decoded = json.loads(raw) if raw else {}
    result: dict[str, Any] = decoded
    return result


def _wait(check: Callable[[], Any], *, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except ApiError as error:
            last = error
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}: {last}")


def _node(name: str, labels: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, **labels}}}


def _pod(name: str, node: str | None) -> dict[str, Any]:
    """A pod bound to `node`; with None, one that no node fits, so it stays unscheduled."""
    placement = {"nodeName": node} if node else {"nodeSelector": {"sim.spotguard.io/no-such-node": "true"}}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"app": "victim"}},
            "spec": {**placement, "terminationGracePeriodSeconds": 0,
                     "containers": [{"name": "main", "image": PAUSE}]}}


@pytest.fixture(scope="module")
def release(cluster: Any, api_client: Any) -> Iterator[dict[str, Any]]:
    suffix = uuid.uuid4().hex[:6]
    namespace, name = f"sg-chart-{suffix}", f"sg-{suffix}"
    nodes = {
        "gpu_spot": (f"gpu-spot-{suffix}", {"cloud.google.com/gke-spot": "true",
                                            "cloud.google.com/gke-accelerator": "nvidia-l4"}),
        "gpu_preemptible": (f"gpu-pre-{suffix}", {"cloud.google.com/gke-preemptible": "true",
                                                  "cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}),
        "cpu_spot": (f"cpu-spot-{suffix}", {"cloud.google.com/gke-spot": "true"}),
        "gpu_on_demand": (f"gpu-od-{suffix}", {"cloud.google.com/gke-accelerator": "nvidia-l4"}),
    }
    _call(api_client, "POST", "/api/v1/namespaces", {"metadata": {"name": namespace}})
    # Pods can be created once the controller-manager has given the namespace its default account.
    _wait(lambda: _call(api_client, "GET", f"/api/v1/namespaces/{namespace}/serviceaccounts/default"),
          timeout=30, what="the namespace's default ServiceAccount")
    for node_name, labels in nodes.values():
        _call(api_client, "POST", "/api/v1/nodes", _node(node_name, labels))
    helm_config = helm.Config(kubeconfig_path=cluster.kubeconfig, namespace=namespace)
    try:
        installed = helm_config.install(chartlib.CHART_DIR, name, {}, namespace=namespace, timeout=120)
        yield {"namespace": namespace, "name": name, "nodes": {k: v[0] for k, v in nodes.items()},
               "manifest": installed["manifest"], "service_account": name + "-spotguard"}
    finally:
        try:
            helm_config.uninstall(name, ignore_not_found=True, timeout=60)
        finally:
            helm_config.close()
            for node_name, _ in nodes.values():
                try:
                    _call(api_client, "DELETE", f"/api/v1/nodes/{node_name}")
                except ApiError:
                    pass
            _call(api_client, "DELETE", f"/api/v1/namespaces/{namespace}")


def test_install_creates_every_object(release: dict[str, Any], api_client: Any) -> None:
    kinds = {doc["kind"] for doc in chartlib.objects({"manifest": release["manifest"]})}
    # The real API server serves admissionregistration.k8s.io/v1, so `auto` installs the policy.
    assert {"DaemonSet", "ServiceAccount", "ClusterRole", "ClusterRoleBinding",
            "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding", "PriorityClass"} <= kinds
    base = "/apis/admissionregistration.k8s.io/v1/validatingadmissionpolicies"
    names = [p["metadata"]["name"] for p in _call(api_client, "GET", base)["items"]
             if p["metadata"]["name"].startswith(release["name"] + "-spotguard-own-")]
    assert len(names) == 8, names

    def type_checked(name: str) -> dict[str, Any] | None:
        policy = _call(api_client, "GET", f"{base}/{name}")
        done = policy.get("status", {}).get("observedGeneration") == policy["metadata"]["generation"]
        return policy if done else None

    # The API server type-checks every CEL expression against the kind its policy matches.
    warnings = {}
    for name in names:
        policy = _wait(lambda: type_checked(name), timeout=30, what=f"type checking of {name}")
        found = (policy["status"].get("typeChecking") or {}).get("expressionWarnings") or []
        if found:
            warnings[name] = [w["warning"].splitlines()[0] for w in found]
    assert not warnings, warnings


def test_daemonset_runs_on_gpu_spot_nodes_only(release: dict[str, Any], api_client: Any) -> None:
    nodes = release["nodes"]
    selector = f"app.kubernetes.io/instance={release['name']}"

    def placed() -> dict[str, str] | None:
        pods = _call(api_client, "GET", f"/api/v1/namespaces/{release['namespace']}/pods?labelSelector={selector}")
        on = {p["spec"].get("nodeName") or _affinity_node(p): p["metadata"]["name"] for p in pods["items"]}
        return on if {nodes["gpu_spot"], nodes["gpu_preemptible"]} <= set(on) else None

    on = _wait(placed, timeout=90, what="spotguard pods on both GPU spot nodes")
    assert nodes["cpu_spot"] not in on and nodes["gpu_on_demand"] not in on


def _affinity_node(pod: dict[str, Any]) -> str | None:
    """The node a DaemonSet pod is meant for, before the scheduler binds it."""
    terms = (pod["spec"].get("affinity", {}).get("nodeAffinity", {})
             .get("requiredDuringSchedulingIgnoredDuringExecution", {}).get("nodeSelectorTerms", []))
    for term in terms:
        for field in term.get("matchFields", []):
            if field["key"] == "metadata.name":
                return str(field["values"][0])
    return None


@pytest.fixture(scope="module")
def as_spotguard(release: dict[str, Any], cluster: Any, api_client: Any,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Any]]:
    """An API client holding a token of spotguard's ServiceAccount: bound to a pod of that account
    on `node`, as the kubelet mounts it into the spotguard container (so the token carries the
    node-name claim), or, with None, bound to nothing (a TokenRequest made by hand)."""
    namespace, account = release["namespace"], release["service_account"]
    admin = yaml.safe_load(Path(cluster.kubeconfig).read_text())
    directory = tmp_path_factory.mktemp("tokens")
    clients: list[Any] = []

    def make(node: str | None) -> Any:
        spec: dict[str, Any] = {"expirationSeconds": 3600}
        if node is not None:
            holder = _token_holder(api_client, namespace, account, node)
            spec["boundObjectRef"] = {"apiVersion": "v1", "kind": "Pod", "name": holder["metadata"]["name"],
                                      "uid": holder["metadata"]["uid"]}
        token = _call(api_client, "POST", f"/api/v1/namespaces/{namespace}/serviceaccounts/{account}/token",
                      {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec})["status"]["token"]
        claims = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
        assert claims["kubernetes.io"].get("node", {}).get("name") == node, claims
        path = directory / f"{node or 'unbound'}-{len(clients)}.kubeconfig"
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "spotguard",
            "clusters": [{"name": "local", "cluster": admin["clusters"][0]["cluster"]}],
            "users": [{"name": "spotguard", "user": {"token": token}}],
            "contexts": [{"name": "spotguard", "context": {"cluster": "local", "user": "spotguard"}}]}))
        client = kube_config.new_client_from_config(config_file=str(path))
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def _token_holder(api_client: Any, namespace: str, account: str, node: str) -> dict[str, Any]:
    """A pod of spotguard's ServiceAccount bound to `node` (nothing runs it: these nodes have no
    kubelet), for its tokens: the DaemonSet's own pods are bound only once scheduled."""
    name = f"token-holder-{node}"
    try:
        return _call(api_client, "GET", f"/api/v1/namespaces/{namespace}/pods/{name}")
    except ApiError as error:
        if error.status != 404:
            raise
    pod = _pod(name, node)
    pod["metadata"]["labels"] = {"app": "token-holder"}
    pod["spec"].update(serviceAccountName=account, automountServiceAccountToken=False)
    return _call(api_client, "POST", f"/api/v1/namespaces/{namespace}/pods", pod)


@pytest.fixture(scope="module")
def victims(release: dict[str, Any], api_client: Any) -> dict[str, str]:
    namespace, nodes = release["namespace"], release["nodes"]
    names = {"own": "victim-own", "own_evict": "victim-own-evict", "other": "victim-other",
             "unscheduled": "victim-unscheduled"}
    placement = {"own": nodes["gpu_spot"], "own_evict": nodes["gpu_spot"], "other": nodes["gpu_preemptible"],
                 "unscheduled": None}
    for key, pod_name in names.items():
        _call(api_client, "POST", f"/api/v1/namespaces/{namespace}/pods", _pod(pod_name, placement[key]))
    return names


def _denied(call: Callable[[], Any], *, status: int = 403, contains: str | tuple[str, ...] = "") -> str:
    """The call is refused with `status`, and the message contains `contains` (or one of them: when
    two policies refuse the same request, the API server reports one, in no fixed order)."""
    with pytest.raises(ApiError) as raised:
        call()
    assert raised.value.status == status, raised.value
    alternatives = (contains,) if isinstance(contains, str) else contains
    assert any(text in raised.value.message for text in alternatives), raised.value.message
    return raised.value.message


def _event(node: str, involved: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """A core/v1 Event as spotguard's daemon posts it (spotguard.kube.Kube.record_event), spelled out."""
    return {"metadata": {"generateName": "spotguard-", "labels": {"spotguard.io/reported-by": "spotguard"}},
            "reason": "NotServing", "message": "test", "type": "Normal", "involvedObject": involved,
            "source": {"component": "spotguard", "host": node}, "reportingComponent": "spotguard.io/spotguard",
            "reportingInstance": node, **fields}


def _wait_policy_active(client: Any, other_node: str) -> None:
    """Admission policies take effect a moment after they are created."""
    patch = {"metadata": {"annotations": {"spotguard.io/probe": "1"}}}

    def refused() -> bool:
        try:
            _call(client, "PATCH", f"/api/v1/nodes/{other_node}", patch, "application/merge-patch+json")
        except ApiError as error:
            return error.status == 403 and "its own Node" in error.message
        return False

    _wait(refused, timeout=30, what="the admission policy to refuse another node")


def _uid(client: Any, namespace: str, pod: str) -> str:
    return str(_call(client, "GET", f"/api/v1/namespaces/{namespace}/pods/{pod}")["metadata"]["uid"])


def _eviction(namespace: str, pod: str, *, uid: str | None, labelled: bool = True) -> dict[str, Any]:
    """An Eviction as spotguard sends it: labelled, so that the policy reading the pod applies, and
    pinned to the pod's uid."""
    metadata: dict[str, Any] = {"name": pod, "namespace": namespace}
    if labelled:
        metadata["labels"] = {EVICTION_LABEL: "spotguard"}
    eviction: dict[str, Any] = {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": metadata}
    if uid is not None:
        eviction["deleteOptions"] = {"preconditions": {"uid": uid}}
    return eviction


def _wait_eviction_policy_active(client: Any, namespace: str, other_pod: str) -> None:
    """The eviction policy also needs the API server's Pod informer behind its params. Probed with a
    dry-run eviction, so nothing is evicted while it is not active yet."""
    uid = _uid(client, namespace, other_pod)

    def refused() -> bool:
        try:
            _call(client, "POST", f"/api/v1/namespaces/{namespace}/pods/{other_pod}/eviction?dryRun=All",
                  _eviction(namespace, other_pod, uid=uid))
        except ApiError as error:
            return error.status == 403 and "may only evict pods on its own node" in error.message
        return False

    _wait(refused, timeout=30, what="the admission policy to refuse evicting a pod on another node")


def test_spotguard_may_do_its_job_on_its_own_node(release: dict[str, Any], as_spotguard: Callable[..., Any],
                                                  victims: dict[str, str], api_client: Any) -> None:
    nodes, namespace = release["nodes"], release["namespace"]
    me = as_spotguard(nodes["gpu_spot"])
    _wait_policy_active(me, nodes["gpu_preemptible"])
    merge, strategic = "application/merge-patch+json", "application/strategic-merge-patch+json"
    # Cordon, taint and annotate its node.
    _call(me, "PATCH", f"/api/v1/nodes/{nodes['gpu_spot']}", {
        "metadata": {"annotations": {"spotguard.io/phase": "deregistering"}},
        "spec": {"unschedulable": True,
                 "taints": [{"key": "spotguard.io/impending-termination", "value": "preemption",
                             "effect": "NoSchedule"}]}}, merge)
    # Read what it needs (and see the change stored).
    node = _call(me, "GET", f"/api/v1/nodes/{nodes['gpu_spot']}")
    assert node["spec"]["unschedulable"] is True
    assert node["metadata"]["annotations"]["spotguard.io/phase"] == "deregistering"
    _call(me, "GET", f"/api/v1/pods?fieldSelector=spec.nodeName%3D{nodes['gpu_spot']}")
    _call(me, "GET", "/apis/discovery.k8s.io/v1/endpointslices")
    _call(me, "GET", f"/apis/policy/v1/namespaces/{namespace}/poddisruptionbudgets")
    _call(me, "POST", "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
          {"spec": {"resourceAttributes": {"verb": "patch", "resource": "nodes"}}})
    # The readiness-gate condition on a pod of its node.
    patched = _wait(lambda: _call(me, "PATCH", f"/api/v1/namespaces/{namespace}/pods/{victims['own']}/status",
                                  {"status": {"conditions": [{"type": "spotguard.io/serving", "status": "False"}]}},
                                  strategic), timeout=30, what="the pod's status patch")
    assert {"type": "spotguard.io/serving", "status": "False"}.items() <= next(
        c for c in patched["status"]["conditions"] if c["type"] == "spotguard.io/serving").items()
    # Evict a pod of its node, once the eviction policy is judging evictions at all.
    _wait_eviction_policy_active(me, namespace, victims["other"])
    _call(me, "POST", f"/api/v1/namespaces/{namespace}/pods/{victims['own_evict']}/eviction",
          _eviction(namespace, victims["own_evict"], uid=_uid(me, namespace, victims["own_evict"])))
    _wait(lambda: victims["own_evict"] not in
          [p["metadata"]["name"] for p in _call(api_client, "GET", f"/api/v1/namespaces/{namespace}/pods")["items"]
           if not p["metadata"].get("deletionTimestamp")],
          timeout=30, what="the evicted pod to be deleted")
    # Events about its node (cluster-scoped objects' Events live in "default") and its pods, as
    # spotguard posts them.
    core_event = _call(me, "POST", "/api/v1/namespaces/default/events",
                       _event(nodes["gpu_spot"], {"kind": "Node", "name": nodes["gpu_spot"], "apiVersion": "v1"}))
    assert core_event["involvedObject"]["name"] == nodes["gpu_spot"]
    own = victims["own"]
    pod_event = _call(me, "POST", f"/api/v1/namespaces/{namespace}/events", _event(nodes["gpu_spot"], {
        "kind": "Pod", "namespace": namespace, "name": own, "uid": _uid(me, namespace, own), "apiVersion": "v1"}))
    assert pod_event["involvedObject"]["name"] == own


def test_spotguard_is_refused_outside_its_node(release: dict[str, Any], as_spotguard: Callable[..., Any],
                                               victims: dict[str, str], api_client: Any) -> None:
    nodes, namespace = release["nodes"], release["namespace"]
    me = as_spotguard(nodes["gpu_spot"])
    _wait_policy_active(me, nodes["gpu_preemptible"])
    merge, strategic = "application/merge-patch+json", "application/strategic-merge-patch+json"
    _denied(lambda: _call(me, "PATCH", f"/api/v1/nodes/{nodes['gpu_preemptible']}",
                          {"spec": {"unschedulable": True}}, merge), contains="may only modify its own Node")
    _denied(lambda: _call(me, "PATCH", f"/api/v1/namespaces/{namespace}/pods/{victims['other']}/status",
                          {"status": {"conditions": [{"type": "spotguard.io/serving", "status": "False"}]}},
                          strategic), contains="may only modify pods on its own node")
    _denied(lambda: _call(me, "POST", "/api/v1/namespaces/default/events", _event(
        nodes["gpu_spot"], {"kind": "Node", "name": nodes["gpu_preemptible"], "apiVersion": "v1"})),
        contains="Events about its own Node")
    # events.k8s.io is not spotguard's at all (RBAC).
    _denied(lambda: _call(me, "POST", "/apis/events.k8s.io/v1/namespaces/default/events", {
        "metadata": {"generateName": "spotguard-"}, "reason": "PreemptionNotice", "note": "test",
        "type": "Warning", "action": "Cordon", "reportingController": "spotguard.io/spotguard",
        "reportingInstance": "spotguard", "eventTime": "2026-01-01T00:00:00.000000Z",
        "regarding": {"kind": "Node", "name": nodes["gpu_spot"], "apiVersion": "v1"}}),
        contains="cannot create resource")
    # RBAC: no secrets, no deleting nodes or pods, no writing pods themselves.
    _denied(lambda: _call(me, "GET", f"/api/v1/namespaces/{namespace}/secrets"))
    _denied(lambda: _call(me, "DELETE", f"/api/v1/nodes/{nodes['gpu_preemptible']}"))
    _denied(lambda: _call(me, "DELETE", f"/api/v1/namespaces/{namespace}/pods/{victims['other']}"))
    _denied(lambda: _call(me, "PATCH", f"/api/v1/namespaces/{namespace}/pods/{victims['other']}",
                          {"metadata": {"labels": {"x": "y"}}}, merge))
    # Nothing of the above changed anything.
    other_node = _call(api_client, "GET", f"/api/v1/nodes/{nodes['gpu_preemptible']}")
    assert not other_node["spec"].get("unschedulable")
    other_pod = _call(api_client, "GET", f"/api/v1/namespaces/{namespace}/pods/{victims['other']}")
    assert "x" not in (other_pod["metadata"].get("labels") or {})
    assert not other_pod["metadata"].get("deletionTimestamp")
    # Admins are not affected by the policy.
    patched = _call(api_client, "PATCH", f"/api/v1/nodes/{nodes['gpu_preemptible']}",
                    {"metadata": {"annotations": {"test": "admin"}}}, merge)
    assert patched["metadata"]["annotations"]["test"] == "admin"


def test_a_token_without_node_claim_may_not_write(release: dict[str, Any], as_spotguard: Callable[..., Any]) -> None:
    nodes = release["nodes"]
    _wait_policy_active(as_spotguard(nodes["gpu_spot"]), nodes["gpu_preemptible"])
    anonymous_node = as_spotguard(None)
    _denied(lambda: _call(anonymous_node, "PATCH", f"/api/v1/nodes/{nodes['gpu_spot']}",
                          {"metadata": {"annotations": {"x": "y"}}}, "application/merge-patch+json"),
            contains="pod-bound token")
    assert "x" not in (_call(anonymous_node, "GET", f"/api/v1/nodes/{nodes['gpu_spot']}")["metadata"].get(
        "annotations") or {})   # reads do not go through admission: the same token may read the node


def test_eviction_on_another_node_is_refused(
        release: dict[str, Any], as_spotguard: Callable[..., Any], victims: dict[str, str], api_client: Any) -> None:
    nodes, namespace = release["nodes"], release["namespace"]
    me = as_spotguard(nodes["gpu_spot"])
    _wait_eviction_policy_active(me, namespace, victims["other"])
    other = _uid(api_client, namespace, victims["other"])

    def evict(client: Any, pod: str, eviction: dict[str, Any], *, dry_run: bool = False) -> dict[str, Any]:
        query = "?dryRun=All" if dry_run else ""
        return _call(client, "POST", f"/api/v1/namespaces/{namespace}/pods/{pod}/eviction{query}", eviction)

    message = _denied(lambda: evict(me, victims["other"], _eviction(namespace, victims["other"], uid=other)),
                      contains="may only evict pods on its own node")
    assert f"{namespace}/{victims['other']}" in message
    # Still there, not even marked for deletion.
    assert not _call(api_client, "GET", f"/api/v1/namespaces/{namespace}/pods/{victims['other']}")["metadata"].get(
        "deletionTimestamp")
    # The same eviction by spotguard on the pod's own node is allowed (dry run: nothing is deleted)...
    on_its_node = as_spotguard(nodes["gpu_preemptible"])
    evict(on_its_node, victims["other"], _eviction(namespace, victims["other"], uid=other), dry_run=True)
    # ...but only pinned to the uid of the pod the policy judged (a pod re-created under the same name
    # elsewhere could otherwise be evicted while the API server's cache still shows the old one).
    _denied(lambda: evict(on_its_node, victims["other"], _eviction(namespace, victims["other"], uid=None),
                          dry_run=True), contains=("must carry the pod's uid", "may only evict pods on its own node"))
    _denied(lambda: evict(on_its_node, victims["other"],
                          _eviction(namespace, victims["other"], uid="00000000-0000-0000-0000-000000000000"),
                          dry_run=True), contains="may only evict pods on its own node")
    # Without the label that routes it to the policy reading the pod, spotguard's eviction is refused.
    _denied(lambda: evict(me, victims["other"], _eviction(namespace, victims["other"], uid=other, labelled=False)),
            contains="must be labelled spotguard.io/evicted-by=spotguard")
    # A token without the node-name claim may not evict at all, labelled or not.
    _denied(lambda: evict(as_spotguard(None), victims["other"], _eviction(namespace, victims["other"], uid=other),
                          dry_run=True), contains=("pod-bound token", "may only evict pods on"))
    # A pod not scheduled anywhere is on nobody's node.
    pending = victims["unscheduled"]
    _denied(lambda: evict(me, pending, _eviction(namespace, pending, uid=_uid(api_client, namespace, pending)),
                          dry_run=True), contains="may only evict pods on its own node")
    # Evicting a pod that does not exist is a 404 from the API, not a refusal by the policy.
    _denied(lambda: evict(me, "no-such-pod", _eviction(namespace, "no-such-pod", uid=other)), status=404)


def test_on_its_own_node_a_stolen_token_can_only_do_spotguards_job(
        release: dict[str, Any], as_spotguard: Callable[..., Any], victims: dict[str, str], api_client: Any) -> None:
    """The attacker's view: spotguard's pod-bound token on node A, trying what spotguard never does
    on node A itself (issue 11). Each is refused, and nothing changed."""
    nodes, namespace = release["nodes"], release["namespace"]
    node = nodes["gpu_spot"]
    me = as_spotguard(node)
    _wait_policy_active(me, nodes["gpu_preemptible"])
    merge, strategic = "application/merge-patch+json", "application/strategic-merge-patch+json"
    own = victims["own"]
    status_path = f"/api/v1/namespaces/{namespace}/pods/{own}/status"
    # pods/status: only the spotguard.io/serving condition.
    _denied(lambda: _call(me, "PATCH", status_path, {"status": {"podIP": "10.66.6.6",
                                                                "podIPs": [{"ip": "10.66.6.6"}]}}, merge),
            contains="spotguard.io/serving condition")
    _denied(lambda: _call(me, "PATCH", status_path, {"status": {"phase": "Failed"}}, strategic),
            contains="spotguard.io/serving condition")
    _denied(lambda: _call(me, "PATCH", status_path, {"status": {"conditions": [
        {"type": "Ready", "status": "False", "reason": "Hijacked"}]}}, strategic),
        contains="spotguard.io/serving condition")
    _denied(lambda: _call(me, "PATCH", status_path, {"status": {"conditions": [
        {"type": "spotguard.io/serving", "status": "Unknown"}]}}, strategic), contains="True or False")
    _denied(lambda: _call(me, "PATCH", status_path, {"metadata": {"labels": {"app": "hijacked"}}}, strategic),
            contains="spotguard.io/serving condition")
    # Its own Node: labels, foreign taints, an admin's cordon, other spec fields.
    node_path = f"/api/v1/nodes/{node}"
    _denied(lambda: _call(me, "PATCH", node_path, {"metadata": {"labels": {"pool": "mine"}}}, merge),
            contains="labels, owners")
    _denied(lambda: _call(me, "PATCH", node_path, {"metadata": {"labels": {
        "node-restriction.kubernetes.io/trusted": "true"}}}, merge), contains="labels, owners")
    _denied(lambda: _call(me, "PATCH", node_path, {"metadata": {"annotations": {"team": "mine"}}}, merge),
            contains="spotguard.io/ annotations")
    # The load-balancer exclusion label only with excludeFromLoadBalancers (off in this release).
    _denied(lambda: _call(me, "PATCH", node_path, {"metadata": {"labels": {
        "node.kubernetes.io/exclude-from-external-load-balancers": "true"}}}, merge),
        contains="excludeFromLoadBalancers")
    _denied(lambda: _call(me, "PATCH", node_path, {"spec": {"providerID": "gce://evil/zone/vm"}}, merge),
            contains="other spec fields")
    _call(api_client, "PATCH", node_path, {"spec": {"unschedulable": True, "taints": [
        {"key": "admin/maintenance", "value": "x", "effect": "NoSchedule"}]}}, merge)
    try:
        _denied(lambda: _call(me, "PATCH", node_path, {"spec": {"taints": []}}, merge),
                contains="its own spotguard.io/impending-termination taint")
        _denied(lambda: _call(me, "PATCH", node_path, {"spec": {"unschedulable": False}}, merge),
                contains="uncordon a Node it cordoned itself")
        # Nor in two steps: first claiming the admin's cordon (or a load-balancer exclusion) as its own.
        _denied(lambda: _call(me, "PATCH", node_path, {"metadata": {"annotations": {
            "spotguard.io/cordoned-by-spotguard": "true"}}}, merge), contains="write that cordons the Node")
        _denied(lambda: _call(me, "PATCH", node_path, {"metadata": {"annotations": {
            "spotguard.io/lb-excluded-by-spotguard": "true"}}}, merge),
            contains="write that adds the exclude-from-external-load-balancers label")
        _denied(lambda: _call(me, "PATCH", node_path, {"spec": {"taints": [
            {"key": "admin/maintenance", "value": "x", "effect": "NoSchedule"},
            {"key": "spotguard.io/impending-termination", "value": "x", "effect": "NoExecute"}]}}, merge),
            contains=("spotguard's taint is NoSchedule", "only add or remove its own"))
        held = _call(api_client, "GET", node_path)
        assert held["spec"]["unschedulable"] is True and "pool" not in held["metadata"].get("labels", {})
        keys = [t["key"] for t in held["spec"]["taints"]]
        assert "admin/maintenance" in keys and "spotguard.io/impending-termination" not in keys
        assert "providerID" not in held["spec"] or held["spec"]["providerID"] != "gce://evil/zone/vm"
    finally:
        _call(api_client, "PATCH", node_path, {"spec": {"unschedulable": None, "taints": None}}, merge)
    # Uncordoning what spotguard itself cordoned (its annotation says so) is allowed.
    _call(me, "PATCH", node_path, {"spec": {"unschedulable": True}, "metadata": {"annotations": {
        "spotguard.io/cordoned-by-spotguard": "true"}}}, merge)
    _call(me, "PATCH", node_path, {"spec": {"unschedulable": False}, "metadata": {"annotations": {
        "spotguard.io/cordoned-by-spotguard": None}}}, merge)
    # Events: only spotguard's own, about its node or its node's pods, whatever the kind's spelling.
    other = victims["other"]
    other_pod = {"kind": "Pod", "namespace": namespace, "name": other, "uid": _uid(api_client, namespace, other),
                 "apiVersion": "v1"}
    _denied(lambda: _call(me, "POST", f"/api/v1/namespaces/{namespace}/events", _event(node, other_pod)),
            contains="Events about pods on its own node")
    own_pod = {"kind": "Pod", "namespace": namespace, "name": own, "uid": _uid(api_client, namespace, own),
               "apiVersion": "v1"}
    _denied(lambda: _call(me, "POST", f"/api/v1/namespaces/{namespace}/events",
                          _event(node, own_pod, source={"component": "kubelet", "host": node})),
            contains="only record Events as spotguard")
    # Not in the pod's own namespace: the API server's validation refuses that for anyone.
    _denied(lambda: _call(me, "POST", "/api/v1/namespaces/kube-system/events", _event(node, own_pod)),
            status=422, contains="does not match event.namespace")
    for spelling in ("node", "NODE"):
        _denied(lambda: _call(me, "POST", "/api/v1/namespaces/default/events", _event(
            node, {"kind": spelling, "name": nodes["gpu_preemptible"]})), contains="Events about its own Node")
    _denied(lambda: _call(me, "POST", "/api/v1/namespaces/default/events", _event(
        node, {"name": nodes["gpu_preemptible"]})), contains="Events about its own Node")
    created = _call(me, "POST", "/api/v1/namespaces/default/events",
                    _event(node, {"kind": "node", "name": node, "apiVersion": "v1"}))
    # RBAC: no changing Events, not even its own.
    _denied(lambda: _call(me, "PATCH", f"/api/v1/namespaces/default/events/{created['metadata']['name']}",
                          {"message": "edited"}, merge), contains="cannot patch resource")


MONITORING_CRDS = {"PodMonitor": "podmonitors", "ServiceMonitor": "servicemonitors",
                   "PrometheusRule": "prometheusrules"}


def test_spotguard_may_create_and_delete_only_placeholders_of_its_own_node(
        release: dict[str, Any], as_spotguard: Callable[..., Any], victims: dict[str, str], api_client: Any) -> None:
    """RBAC lets spotguard create and delete any pod (it cannot say "placeholders"); the -own-placeholders
    policy keeps that to a pause pod at the placeholder priority, labelled with its node."""
    nodes, namespace = release["nodes"], release["namespace"]
    me = as_spotguard(nodes["gpu_spot"])
    pods = f"/api/v1/namespaces/{namespace}/pods"
    shape = _call(api_client, "GET", f"{pods}/{victims['own']}")
    settings = placeholder.Settings(priority_class=f"{release['name']}-spotguard-placeholder",
                                    image="registry.k8s.io/pause:3.10.2")
    good = placeholder.manifest(shape, node_name=nodes["gpu_spot"], settings=settings)

    def variant(change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        made = json.loads(json.dumps(good))
        change(made)
        return made

    bad = {
        "another node's label": variant(lambda m: m["metadata"]["labels"].update(
            {"spotguard.io/placeholder-node": nodes["gpu_preemptible"]})),
        "a higher priority": variant(lambda m: m["spec"].update(priorityClassName="system-node-critical")),
        "another image": variant(lambda m: m["spec"]["containers"][0].update(image="attacker/miner:latest")),
        "a hostPath volume": variant(lambda m: m["spec"].update(
            volumes=[{"name": "root", "hostPath": {"path": "/"}}])),
        "the host network": variant(lambda m: m["spec"].update(hostNetwork=True)),
        "a privileged container": variant(lambda m: m["spec"]["containers"][0].update(
            securityContext={"privileged": True})),
        "a service-account token": variant(lambda m: m["spec"].update(automountServiceAccountToken=True)),
        "a node of its choosing": variant(lambda m: m["spec"].update(nodeName=nodes["gpu_preemptible"])),
        "an init container": variant(lambda m: m["spec"].update(
            initContainers=[{"name": "x", "image": "registry.k8s.io/pause:3.10.2"}])),
    }

    def refused_probe() -> bool:   # policies take effect a moment after they are created
        try:
            _call(me, "POST", f"{pods}?dryRun=All", bad["a higher priority"])
        except ApiError as error:
            return error.status == 403 and "placeholder" in error.message
        return False

    _wait(refused_probe, timeout=30, what="the placeholder policy to refuse a high-priority pod")
    for what, body in bad.items():
        print(f"a placeholder with {what}: refused?")   # shown if the next line fails
        _denied(lambda: _call(me, "POST", f"{pods}?dryRun=All", body),
                contains=("surge placeholder", "placeholders labelled"))
    # The placeholder the daemon makes is admitted, and spotguard may delete it again, but not a
    # workload's pod and not another node's placeholder.
    created = _call(me, "POST", pods, good)
    assert created["spec"]["priority"] == -1 and created["spec"]["preemptionPolicy"] == "Never"
    _denied(lambda: _call(me, "DELETE", f"{pods}/{victims['own']}?dryRun=All"),
            contains="may only delete its own surge placeholders")
    other_node = as_spotguard(nodes["gpu_preemptible"])
    _denied(lambda: _call(other_node, "DELETE", f"{pods}/{created['metadata']['name']}?dryRun=All"),
            contains="may only delete its own surge placeholders")
    _call(me, "DELETE", f"{pods}/{created['metadata']['name']}")


def test_spotguard_may_hand_over_only_opted_in_pods_of_its_own_node_and_only_as_it_does(
        release: dict[str, Any], as_spotguard: Callable[..., Any], api_client: Any) -> None:
    """RBAC lets spotguard patch any pod; the -own-handed-over-pods policy keeps that to taking a
    surge pod's pod-template-hash label off on its own node (with the annotation naming its own
    ReplicaSet and hash) and giving it back, and nothing else."""
    nodes, namespace = release["nodes"], release["namespace"]
    pods, merge = f"/api/v1/namespaces/{namespace}/pods", "application/merge-patch+json"

    def replicaset(name: str, node: str, *, surge: bool = True) -> dict[str, Any]:
        """A ReplicaSet as a Deployment makes it, of one pod bound to `node` (no kubelet runs it)."""
        labels = {"app": name, "pod-template-hash": "7d9f"}
        annotations = {"spotguard.io/surge": "true"} if surge else {}
        body = {"apiVersion": "apps/v1", "kind": "ReplicaSet", "metadata": {"name": f"{name}-7d9f"},
                "spec": {"replicas": 1, "selector": {"matchLabels": labels}, "template": {
                    "metadata": {"labels": labels, "annotations": annotations},
                    "spec": {"nodeName": node, "terminationGracePeriodSeconds": 0,
                             "containers": [{"name": "main", "image": PAUSE}]}}}}
        _call(api_client, "POST", f"/apis/apps/v1/namespaces/{namespace}/replicasets", body)
        return _wait(lambda: [p for p in _call(api_client, "GET", f"{pods}?labelSelector=app%3D{name}")["items"]
                              if p["metadata"].get("ownerReferences")], timeout=30, what=f"{name}'s pod")[0]

    own, other, plain = (replicaset("handed", nodes["gpu_spot"]), replicaset("elsewhere", nodes["gpu_preemptible"]),
                         replicaset("plain", nodes["gpu_spot"], surge=False))
    me = as_spotguard(nodes["gpu_spot"])

    def release_of(pod: dict[str, Any], key: str | None = None) -> dict[str, Any]:
        return handover.release_patch(pod["metadata"]["uid"], key or f"{pod['metadata']['labels']['app']}-7d9f/7d9f")

    def patch(client: Any, pod: dict[str, Any], body: Any, *, dry: bool = True,
              content_type: str = merge) -> dict[str, Any]:
        return _call(client, "PATCH", f"{pods}/{pod['metadata']['name']}" + ("?dryRun=All" if dry else ""), body,
                     content_type)

    def refused_probe() -> bool:   # policies take effect a moment after they are created
        try:
            patch(me, other, release_of(other))
        except ApiError as error:
            return error.status == 403 and "hand over pods on its own node" in error.message
        return False

    _wait(refused_probe, timeout=30, what="the hand-over policy to refuse another node's pod")
    bad = {
        "another node's pod": (other, release_of(other)),
        "a pod not opted in": (plain, release_of(plain)),
        "another ReplicaSet named": (own, release_of(own, "victim-rs/7d9f")),
        "the label off, no annotation": (own, {"metadata": {"labels": {"pod-template-hash": None}}}),
        "another hash given": (own, {"metadata": {"labels": {"pod-template-hash": "evil"}}}),
        "another label changed": (own, {"metadata": {"labels": {"app": "hijacked"}}}),
        "an annotation of its own choosing": (own, {"metadata": {"annotations": {"prometheus.io/scrape": "true"}}}),
    }
    for what, (pod, body) in bad.items():
        print(f"a hand-over of {what}: refused?")   # shown if the next line fails
        _denied(lambda: patch(me, pod, body), contains=("hand over", "hand-over"))
    # A pod's image may be changed in place (the API allows it): not by spotguard.
    image = [{"op": "replace", "path": "/spec/containers/0/image", "value": "attacker/miner:latest"}]
    _denied(lambda: patch(me, own, image, content_type="application/json-patch+json"), contains="hand-over")
    # What the daemon does is admitted: released (for real, so the way back can be tried), then given
    # back only with the hash the annotation names.
    released = patch(me, own, release_of(own), dry=False)
    assert "pod-template-hash" not in released["metadata"]["labels"]
    readopt = handover.readopt_patch(own["metadata"]["uid"], "handed-7d9f/7d9f")
    wrong_hash = handover.readopt_patch(own["metadata"]["uid"], "handed-7d9f/other")
    _denied(lambda: patch(me, own, wrong_hash), contains="gives back only the hash")
    # Given back at the usual deletion cost, the ReplicaSet could remove another Ready pod of its own.
    keeps_cost = json.loads(json.dumps(readopt))
    del keeps_cost["metadata"]["annotations"][handover.DELETION_COST_ANNOTATION]
    _denied(lambda: patch(me, own, keeps_cost), contains="lowest")
    _denied(lambda: patch(as_spotguard(nodes["gpu_preemptible"]), own, readopt), contains="hand over pods on its own node")
    given_back = patch(me, own, readopt, dry=False)
    assert given_back["metadata"]["labels"]["pod-template-hash"] == "7d9f"
    assert handover.RELEASED_ANNOTATION not in (given_back["metadata"].get("annotations") or {})
    assert given_back["metadata"]["annotations"][handover.DELETION_COST_ANNOTATION] == "-2147483648"


def _minimal_crd(kind: str, plural: str) -> dict[str, Any]:
    """The Prometheus Operator's kinds with an open schema: enough for the API server to store
    (and so accept) what the chart renders; the Operator's own validation is not reproduced."""
    return {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": f"{plural}.monitoring.coreos.com"},
            "spec": {"group": "monitoring.coreos.com", "scope": "Namespaced",
                     "names": {"kind": kind, "plural": plural, "singular": kind.lower(), "listKind": f"{kind}List"},
                     "versions": [{"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": {
                         "type": "object", "x-kubernetes-preserve-unknown-fields": True}}}]}}


def test_monitoring_objects_install_against_the_operators_kinds(cluster: Any, api_client: Any) -> None:
    suffix = uuid.uuid4().hex[:6]
    namespace, name = f"sg-mon-{suffix}", f"sgm-{suffix}"
    created: list[str] = []
    for kind, plural in MONITORING_CRDS.items():
        try:
            _call(api_client, "POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
                  _minimal_crd(kind, plural))
            created.append(f"{plural}.monitoring.coreos.com")
        except ApiError as error:
            if error.status != 409:  # already there from an earlier run: fine
                raise
    for kind, plural in MONITORING_CRDS.items():
        _wait(lambda: _call(api_client, "GET", f"/apis/monitoring.coreos.com/v1/namespaces/default/{plural}"),
              timeout=30, what=f"{kind} served")
    _call(api_client, "POST", "/api/v1/namespaces", {"metadata": {"name": namespace}})
    helm_config = helm.Config(kubeconfig_path=cluster.kubeconfig, namespace=namespace)
    values = {"podMonitor": {"enabled": True}, "serviceMonitor": {"enabled": True},
              "prometheusRule": {"enabled": True}, "dashboard": {"enabled": True}}
    try:
        helm_config.install(chartlib.CHART_DIR, name, values, namespace=namespace, timeout=120)
        for kind, plural in MONITORING_CRDS.items():
            items = _call(api_client, "GET", f"/apis/monitoring.coreos.com/v1/namespaces/{namespace}/{plural}")["items"]
            assert len(items) == 1, (kind, items)
        rule = _call(api_client, "GET", f"/apis/monitoring.coreos.com/v1/namespaces/{namespace}/prometheusrules")
        alerts = {r["alert"] for g in rule["items"][0]["spec"]["groups"] for r in g["rules"] if "alert" in r}
        assert {"SpotguardEvictionBlockedByPDB", "SpotguardDrainMissedDeadline"} <= alerts
        dashboards = _call(api_client, "GET", f"/api/v1/namespaces/{namespace}/configmaps"
                                              "?labelSelector=grafana_dashboard%3D1")["items"]
        assert len(dashboards) == 1
    finally:
        try:
            helm_config.uninstall(name, ignore_not_found=True, timeout=60)
        finally:
            helm_config.close()
            _call(api_client, "DELETE", f"/api/v1/namespaces/{namespace}")
            for crd in created:
                _call(api_client, "DELETE", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{crd}")


def test_install_into_a_namespace_that_would_refuse_the_pods_is_refused(cluster: Any, api_client: Any) -> None:
    """Pod Security `baseline` refuses hostNetwork pods: Helm would say "deployed" while the
    DaemonSet runs none. The chart reads the namespace's level and refuses to install there."""
    suffix = uuid.uuid4().hex[:6]
    namespace, name = f"sg-psa-{suffix}", f"sgp-{suffix}"
    _call(api_client, "POST", "/api/v1/namespaces", {"metadata": {
        "name": namespace, "labels": {"pod-security.kubernetes.io/enforce": "baseline"}}})
    helm_config = helm.Config(kubeconfig_path=cluster.kubeconfig, namespace=namespace)
    try:
        with pytest.raises(Exception) as raised:
            helm_config.install(chartlib.CHART_DIR, name, {}, namespace=namespace, timeout=60)
        assert 'enforces Pod Security level "baseline"' in str(raised.value)
        assert "pod-security.kubernetes.io/enforce=privileged" in str(raised.value)
        # Nothing of the release was created.
        assert not _call(api_client, "GET", f"/apis/apps/v1/namespaces/{namespace}/daemonsets")["items"]
        # Without hostNetwork the pods fit `baseline`: the same namespace takes them.
        helm_config.install(chartlib.CHART_DIR, name, {"hostNetwork": False}, namespace=namespace, timeout=60)
        assert _call(api_client, "GET", f"/apis/apps/v1/namespaces/{namespace}/daemonsets")["items"]
    finally:
        try:
            helm_config.uninstall(name, ignore_not_found=True, timeout=60)
        finally:
            helm_config.close()
            _call(api_client, "DELETE", f"/api/v1/namespaces/{namespace}")

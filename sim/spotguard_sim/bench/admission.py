"""The API server's cost of the chart's param policies, for `spotguard-sim bench --parts admission`.

The chart's `-own-evicted-pods` ValidatingAdmissionPolicy (daemonset/templates/validatingadmissionpolicy.yaml)
sees the evicted pod by taking every Pod of the request's namespace as a param and evaluating its
CEL once per pod, so an eviction by spotguard costs more in a namespace with more pods. Its
objectSelector is meant to spare everybody else that cost: it selects only Evictions labelled
spotguard.io/evicted-by=spotguard. This measures both sides with the whole request: spotguard's
labelled eviction (its ServiceAccount with its node-name claim) against an unlabelled eviction by
a second ServiceAccount with the same RBAC, as kubectl drain or cluster-autoscaler send them.
The requests alternate between the two users, so both see the same machine; the second user's
latency staying flat as the namespace grows is the evidence that other clients pay nothing.

The chart's `-own-pod-events` policy works the same way for the Events spotguard records about a
pod (labelled spotguard.io/reported-by=spotguard, each Pod of the namespace a param), so the same
is measured for Events: spotguard's, exactly as `Kube.record_event` sends it, against an unlabelled
Event like the kubelet's, by the second user.

Evictions and Events are dry runs (`dryRun=All`): admission and the PodDisruptionBudget check run as
for real, nothing is deleted or stored, so every sample evicts pods that are still there. Pods are bound to
Nodes the simulated kubelet does not manage (`sim.spotguard.io/unmanaged`), so a namespace of
thousands of pods puts no load on it.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Callable, Iterable

from spotguard import lifecycle as lc
from spotguard.kube import EVICTION_LABEL, Kube
from spotguard.kubeapi import Api, KubeError, Obj
from spotguard_sim.bench.config import BENCH_LABEL
from spotguard_sim.chart import VAP_API, render_objects
from spotguard_sim.support import USER_AGENT, quantile

NODE_CLAIM = "authentication.kubernetes.io/node-name"
PAUSE = "registry.k8s.io/pause:3.10"


def _quantile_ms(samples: list[float], q: float) -> float:
    value = quantile(samples, q)
    assert value is not None, "no samples"
    return round(value * 1000, 2)


def _eviction(namespace: str, pod: str, uid: str, *, labelled: bool) -> Obj:
    """As spotguard.kube.Kube.evict sends it: pinned to the pod's uid; labelled for spotguard."""
    metadata: Obj = {"name": pod, "namespace": namespace}
    if labelled:
        metadata["labels"] = {EVICTION_LABEL: "spotguard"}
    return {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": metadata,
            "deleteOptions": {"preconditions": {"uid": uid}}}


class _AdmissionBench:
    def __init__(self, api_client: Any, kubeconfig: Any, say: Callable[[str], None]) -> None:
        from kubernetes import config as k8s_config

        self.admin = Api(api_client, user_agent=USER_AGENT)
        self.new_client = lambda: k8s_config.new_client_from_config(config_file=str(kubeconfig))
        self.say = say
        suffix = uuid.uuid4().hex[:5]
        self.namespace = f"bench-admission-{suffix}"
        self.release = f"sgb-{suffix}"
        self.own_node, self.other_node = f"bench-adm-{suffix}-own", f"bench-adm-{suffix}-other"
        self.created: list[str] = []   # API paths to delete at the end, newest last
        self.clients: list[Any] = []
        self.pods: dict[str, list[str]] = {self.own_node: [], self.other_node: []}
        self.uids: dict[str, str] = {}

    # -- set-up --------------------------------------------------------------------------------

    def create(self, collection: str, body: Obj) -> Obj:
        created = self.admin.call("POST", collection, body=body)
        self.created.append(f"{collection}/{created['metadata']['name']}")
        return created

    def set_up(self) -> tuple[Kube, Kube]:
        """Nodes, namespace, the chart's ClusterRole for two ServiceAccounts, and its eviction and
        Event policies. Returns (spotguard on its node, the control user)."""
        labels = {BENCH_LABEL: "true"}
        self.create("/api/v1/namespaces", {"metadata": {"name": self.namespace, "labels": labels}})
        for node in self.pods:
            self.create("/api/v1/nodes", {"metadata": {"name": node, "labels": labels,
                                                       "annotations": {"sim.spotguard.io/unmanaged": "true"}}})
        self.wait_default_service_account()
        objects = render_objects(name=self.release, namespace=self.namespace, api_versions=[VAP_API])
        role = next(o for o in objects if o["kind"] == "ClusterRole")
        policies = [o for o in objects if o["kind"] == "ValidatingAdmissionPolicy"
                    and o["metadata"]["name"].endswith(("-own-evictions", "-own-evicted-pods", "-own-events",
                                                         "-own-pod-events"))]
        bindings = [o for o in objects if o["kind"] == "ValidatingAdmissionPolicyBinding"
                    and o["spec"]["policyName"] in {p["metadata"]["name"] for p in policies}]
        spotguard_sa = next(o for o in objects if o["kind"] == "ServiceAccount")["metadata"]["name"]
        control_sa = f"{self.release}-control"
        self.create("/apis/rbac.authorization.k8s.io/v1/clusterroles", role)
        self.create("/apis/rbac.authorization.k8s.io/v1/clusterrolebindings", {
            "metadata": {"name": f"{self.release}-bench"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                        "name": role["metadata"]["name"]},
            "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": self.namespace}
                         for sa in (spotguard_sa, control_sa)]})
        admission = "/apis/admissionregistration.k8s.io/v1"
        for policy in policies:
            self.create(f"{admission}/validatingadmissionpolicies", policy)
        for binding in bindings:
            self.create(f"{admission}/validatingadmissionpolicybindings", binding)
        return self.user(spotguard_sa), self.user(control_sa)

    def wait_default_service_account(self, timeout: float = 30) -> None:
        """Pods are refused until the controller-manager has created the namespace's `default`."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.admin.call("GET", f"/api/v1/namespaces/{self.namespace}/serviceaccounts/default")
                return
            except KubeError as error:
                if error.status != 404 or time.monotonic() > deadline:
                    raise
            time.sleep(0.2)

    def user(self, service_account: str) -> Kube:
        """A client that is `service_account` on the own node, as with a pod-bound token; its writes
        through `Kube`'s own methods are dry runs."""
        client = self.new_client()
        client.set_default_header("Impersonate-User", f"system:serviceaccount:{self.namespace}:{service_account}")
        client.set_default_header(f"Impersonate-Extra-{NODE_CLAIM.replace('/', '%2F')}", self.own_node)
        self.clients.append(client)
        return Kube(client, node_name=self.own_node, dry_run=True)

    def grow_to(self, count: int) -> None:
        """Pods in the namespace, alternating between the two nodes, until there are `count`."""
        have = sum(len(names) for names in self.pods.values())
        started = time.monotonic()
        for index in range(have, count):
            node = self.own_node if index % 2 == 0 else self.other_node
            name = f"p-{index}"
            created = self.admin.call("POST", f"/api/v1/namespaces/{self.namespace}/pods", body={
                "metadata": {"name": name},
                "spec": {"nodeName": node, "containers": [{"name": "main", "image": PAUSE}]}})
            self.pods[node].append(name)
            self.uids[name] = created["metadata"]["uid"]
            if (index + 1) % 1000 == 0:
                self.say(f"    {index + 1}/{count} pods")
        if count > have:
            self.say(f"    {count} pods in {time.monotonic() - started:.1f} s")

    def evict(self, kube: Kube, pod: str, *, labelled: bool) -> float:
        path = f"/api/v1/namespaces/{self.namespace}/pods/{pod}/eviction"
        began = time.perf_counter()
        kube.call("POST", path, query={"dryRun": "All"},
                  body=_eviction(self.namespace, pod, self.uids[pod], labelled=labelled))
        return time.perf_counter() - began

    def record(self, kube: Kube, pod: str, *, as_spotguard: bool) -> float:
        """One Event about `pod`: spotguard's own (labelled), or one like the kubelet's (not)."""
        began = time.perf_counter()
        if as_spotguard:
            facts = lc.PodFacts(namespace=self.namespace, name=pod, uid=self.uids[pod], serving=True,
                                serving_condition=False, not_evictable=None, terminating=False)
            kube.record_event(lc.Report(lc.Reason.NOT_SERVING, "admission bench", pod=facts), node_uid=None)
        else:
            kube.call("POST", f"/api/v1/namespaces/{self.namespace}/events", query={"dryRun": "All"}, body={
                "metadata": {"generateName": f"{pod}."},
                "involvedObject": {"kind": "Pod", "apiVersion": "v1", "namespace": self.namespace, "name": pod,
                                   "uid": self.uids[pod]},
                "reason": "Killing", "message": "admission bench", "type": "Normal",
                "source": {"component": "kubelet", "host": self.own_node}})
        return time.perf_counter() - began

    def wait_policy_active(self, spotguard: Kube, timeout: float = 60) -> None:
        """Until the policies refuse spotguard's eviction of, and Event about, a pod on the other node."""
        other = self.pods[self.other_node][0]
        checks = [lambda: self.evict(spotguard, other, labelled=True),
                  lambda: self.record(spotguard, other, as_spotguard=True)]
        deadline = time.monotonic() + timeout
        while checks and time.monotonic() < deadline:
            try:
                checks[0]()
            except KubeError as error:
                if error.status == 403:
                    checks.pop(0)
                    continue
            time.sleep(0.2)
        if checks:
            raise TimeoutError("the eviction and Event policies did not become active")

    # -- measurement ---------------------------------------------------------------------------

    def measure(self, spotguard: Kube, control: Kube, evictions: int) -> dict[str, Any]:
        """`evictions` dry-run evictions each, then as many dry-run Events, about pods on the own
        node, alternating the two users."""
        own = self.pods[self.own_node]
        samples: dict[str, list[float]] = {"policy": [], "control": [], "event_policy": [], "event_control": []}
        for index in range(evictions * 2):
            mine = index % 2 == 0
            pod = own[(index // 2) % len(own)]
            samples["policy" if mine else "control"].append(
                self.evict(spotguard if mine else control, pod, labelled=mine))
        for index in range(evictions * 2):
            mine = index % 2 == 0
            pod = own[(index // 2) % len(own)]
            samples["event_policy" if mine else "event_control"].append(
                self.record(spotguard if mine else control, pod, as_spotguard=mine))
        result: dict[str, Any] = {}
        for who, values in samples.items():
            result[f"{who}_ms"] = {"p50": _quantile_ms(values, 0.5), "p99": _quantile_ms(values, 0.99),
                                   "n": len(values)}
        result["ratio_p50"] = round(result["policy_ms"]["p50"] / result["control_ms"]["p50"], 2)
        result["event_ratio_p50"] = round(result["event_policy_ms"]["p50"] / result["event_control_ms"]["p50"], 2)
        return result

    def tear_down(self) -> None:
        for client in self.clients:
            client.close()
        for path in reversed(self.created):
            try:
                self.admin.call("DELETE", path)
            except KubeError as error:
                if error.status != 404:
                    self.say(f"  warning: DELETE {path}: {error}")


def bench_admission(api_client: Any, kubeconfig: Any, *, pod_counts: Iterable[int], evictions: int,
                    say: Callable[[str], None]) -> dict[str, Any]:
    """Eviction latency with and without the policy's per-pod evaluation, per namespace size."""
    bench = _AdmissionBench(api_client, kubeconfig, say)
    try:
        spotguard, control = bench.set_up()
        counts = sorted(set(pod_counts))
        bench.grow_to(counts[0])
        bench.wait_policy_active(spotguard)
        results = []
        for count in counts:
            bench.grow_to(count)
            result = {"pods_in_namespace": count, **bench.measure(spotguard, control, evictions)}
            say(f"  {count} pods: eviction p50 {result['policy_ms']['p50']} ms, control p50 "
                f"{result['control_ms']['p50']} ms (x{result['ratio_p50']}); Event p50 "
                f"{result['event_policy_ms']['p50']} ms, control p50 {result['event_control_ms']['p50']} ms "
                f"(x{result['event_ratio_p50']})")
            results.append(result)
        return {"evictions_per_user": evictions, "sizes": results,
                "definitions": {
                    "policy_ms": "dry-run eviction by spotguard's ServiceAccount with its node-name claim, "
                                 "labelled: the chart's -own-evicted-pods policy evaluates once per pod of the "
                                 "namespace",
                    "control_ms": "the same eviction, unlabelled, by a ServiceAccount with the same RBAC (what "
                                  "kubectl drain or cluster-autoscaler send), alternating with the first",
                    "ratio_p50": "policy p50 / control p50",
                    "event_policy_ms": "dry-run Event about a pod on its node, as spotguard records it (labelled "
                                       "spotguard.io/reported-by): the chart's -own-pod-events policy evaluates "
                                       "once per pod of the namespace",
                    "event_control_ms": "an unlabelled Event about the same pod, like the kubelet's, by the second "
                                        "user, alternating with the first",
                    "event_ratio_p50": "event_policy p50 / event_control p50"}}
    finally:
        bench.tear_down()

"""What the rendered DaemonSet, RBAC and admission policy promise: hardening, the daemon's settings
and least privilege."""

from __future__ import annotations

import argparse
from typing import Any

import chartlib
import pytest
from chartlib import VAP_API, only, render_objects

from spotguard import config
from spotguard.kube import EVENT_LABEL, EVICTION_LABEL


def _pod_spec(values: dict[str, Any] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = only(render_objects(values), "DaemonSet")["spec"]["template"]["spec"]
    return spec


def _container(values: dict[str, Any] | None = None) -> dict[str, Any]:
    container: dict[str, Any] = _pod_spec(values)["containers"][0]
    return container


def _env(values: dict[str, Any] | None = None) -> dict[str, str]:
    return {e["name"]: e["value"] for e in _container(values)["env"] if "value" in e}


def test_daemonset_is_hardened() -> None:
    spec = _pod_spec()
    container = spec["containers"][0]
    pod_sc, sc = spec["securityContext"], container["securityContext"]
    assert pod_sc["runAsNonRoot"] is True and pod_sc["runAsUser"] == 65532
    assert pod_sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 65532
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["resources"] == {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "128Mi"}}
    assert spec["priorityClassName"] == "system-node-critical"


def test_daemonset_ports_probes_and_network() -> None:
    spec = _pod_spec()
    container = spec["containers"][0]
    assert container["ports"] == [{"name": "metrics", "containerPort": 9101, "protocol": "TCP"}]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert spec["hostNetwork"] is True and spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert container["args"] == ["run"]
    off = _pod_spec({"hostNetwork": False})
    assert off["hostNetwork"] is False and off["dnsPolicy"] == "ClusterFirst"
    # /metrics on the pod's (the node's) own address, not 0.0.0.0: the kubelet expands $(POD_IP)
    # from the downward-API variable declared before it.
    env = container["env"]
    names = [e["name"] for e in env]
    assert env[names.index("POD_IP")]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert names.index("POD_IP") < names.index("SPOTGUARD_LISTEN")
    assert env[names.index("SPOTGUARD_LISTEN")]["value"] == "$(POD_IP):9101"


def test_default_scheduling_targets_gke_gpu_spot_nodes_and_tolerates_their_taints() -> None:
    spec = _pod_spec()
    terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    as_sets = [{(e["key"], e["operator"], tuple(e.get("values", []))) for e in t["matchExpressions"]} for t in terms]
    accelerator = ("cloud.google.com/gke-accelerator", "Exists", ())
    assert {("cloud.google.com/gke-spot", "In", ("true",)), accelerator} in as_sets
    assert {("cloud.google.com/gke-preemptible", "In", ("true",)), accelerator} in as_sets
    assert len(as_sets) == 2
    # Every taint, whatever its key or effect: the taints of a dying node (spotguard's own,
    # cloud.google.com/impending-node-termination, ToBeDeletedByClusterAutoscaler,
    # node.cloudprovider.kubernetes.io/shutdown) must not keep a recreated pod away from it.
    assert spec["tolerations"] == [{"operator": "Exists"}]
    extra = {"key": "dedicated", "operator": "Equal", "value": "llm", "effect": "NoSchedule"}
    assert extra in _pod_spec({"extraTolerations": [extra]})["tolerations"]


def test_node_name_comes_from_the_downward_api() -> None:
    node = next(e for e in _container()["env"] if e["name"] == "NODE_NAME")
    assert node == {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}


# Every daemon setting (spotguard/config.py SETTINGS) and the chart value that reaches it, with a
# non-default value to prove the value is what arrives. A setting added to the daemon without a
# chart value fails test_every_daemon_setting_has_a_chart_value.
SETTING_VALUES: dict[str, tuple[dict[str, Any], str]] = {
    "SPOTGUARD_PROVIDER": ({"provider": "gce"}, "gce"),
    "SPOTGUARD_METADATA_URL": ({"metadataUrl": "http://127.0.0.1:8080"}, "http://127.0.0.1:8080"),
    "SPOTGUARD_LISTEN": ({"listen": "127.0.0.1:9200", "port": 9200}, "127.0.0.1:9200"),
    "SPOTGUARD_DRY_RUN": ({"dryRun": True}, "true"),
    "SPOTGUARD_NOTICE_SECONDS": ({"noticeSeconds": 120}, "120"),
    "SPOTGUARD_SAFETY_MARGIN_SECONDS": ({"safetyMarginSeconds": 7.5}, "7.5"),
    "SPOTGUARD_ENDPOINT_WAIT_SECONDS": ({"endpointWaitSeconds": 3}, "3"),
    "SPOTGUARD_MAX_DRAIN_SECONDS": ({"maxDrainSeconds": 900}, "900"),
    "SPOTGUARD_DRAIN_POLL_SECONDS": ({"drainPollSeconds": 0.25}, "0.25"),
    "SPOTGUARD_LOG_LEVEL": ({"logLevel": "debug"}, "debug"),
    "SPOTGUARD_POLL_SECONDS": ({"pollSeconds": 0.5}, "0.5"),
    "SPOTGUARD_SCHEDULED_EVENT_LEAD_SECONDS": ({"scheduledEventLeadSeconds": 7200}, "7200"),
    "SPOTGUARD_REBALANCE_ACTION": ({"rebalanceAction": "cordon"}, "cordon"),
    "SPOTGUARD_REBALANCE_RELEASE_SECONDS": ({"rebalanceReleaseSeconds": 600}, "600"),
    "SPOTGUARD_CORDON_ONLY": ({"cordonOnly": True}, "true"),
    "SPOTGUARD_EXCLUDE_FROM_LOAD_BALANCERS": ({"excludeFromLoadBalancers": True}, "true"),
    "SPOTGUARD_ASG_TERMINATION_ACTION": ({"asgTerminationAction": "log"}, "log"),
    "SPOTGUARD_SURGE_MIN_NOTICE_SECONDS": ({"surge": {"minNoticeSeconds": 900},
                                            "validatingAdmissionPolicy": {"enabled": True}}, "900"),
    "SPOTGUARD_SURGE_DRAIN_RESERVE_SECONDS": ({"surge": {"drainReserveSeconds": 90}}, "90"),
    "SPOTGUARD_SURGE_PRIORITY_CLASS": ({"surge": {"priorityClass": {"name": "hold"}}}, "hold"),
    "SPOTGUARD_SURGE_PLACEHOLDER_IMAGE": ({"surge": {"placeholderImage": "mirror.example/pause:3.10.2"}},
                                          "mirror.example/pause:3.10.2"),
    "SPOTGUARD_WEBHOOK_TEMPLATE": ({"webhooks": {"template": "{event} on {node}"}}, "{event} on {node}"),
}


def test_every_daemon_setting_has_a_chart_value() -> None:
    envs = {s.env for s in config.SETTINGS}
    # NODE_NAME is not a value: it always comes from the downward API; the webhook URLs and headers
    # come from a Secret (test_webhook_urls_come_from_a_secret...).
    assert envs - {"NODE_NAME", "SPOTGUARD_WEBHOOK_URLS", "SPOTGUARD_WEBHOOK_HEADERS"} == set(SETTING_VALUES)


def test_webhook_urls_come_from_a_secret_never_from_a_plain_value() -> None:
    assert "SPOTGUARD_WEBHOOK_URLS" not in {e["name"] for e in _container()["env"]}
    urls = ["https://hooks.slack.com/services/T/B/token", "https://alerts.example/hook"]
    objs = render_objects({"webhooks": {"urls": urls}})
    secret = only(objs, "Secret")
    assert secret["metadata"]["name"] == "spotguard-webhooks" and secret["stringData"] == {"urls": ",".join(urls)}
    env = {e["name"]: e for e in only(objs, "DaemonSet")["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["SPOTGUARD_WEBHOOK_URLS"] == {"name": "SPOTGUARD_WEBHOOK_URLS", "valueFrom": {
        "secretKeyRef": {"name": "spotguard-webhooks", "key": "urls"}}}
    assert config.load(argparse.Namespace(), {"NODE_NAME": "n", "SPOTGUARD_WEBHOOK_URLS": secret["stringData"]["urls"]}
                       ).webhook_urls == tuple(urls)
    mine = render_objects({"webhooks": {"existingSecret": "chat", "existingSecretKey": "hooks"}})
    assert "Secret" not in chartlib.kinds(mine)
    env = {e["name"]: e for e in only(mine, "DaemonSet")["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["SPOTGUARD_WEBHOOK_URLS"]["valueFrom"] == {"secretKeyRef": {"name": "chat", "key": "hooks"}}
    assert "SPOTGUARD_WEBHOOK_HEADERS" not in env


def test_webhook_headers_come_from_the_same_secret_and_parse_as_the_daemon_reads_them() -> None:
    headers = {"Authorization": "Bearer t0ken, with a comma", "X-Team": "gpu"}
    objs = render_objects({"webhooks": {"urls": ["https://alerts.example/hook"], "headers": headers}})
    secret = only(objs, "Secret")
    env = {e["name"]: e for e in only(objs, "DaemonSet")["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["SPOTGUARD_WEBHOOK_HEADERS"]["valueFrom"] == {
        "secretKeyRef": {"name": "spotguard-webhooks", "key": "headers"}}
    loaded = config.load(argparse.Namespace(), {"NODE_NAME": "n", "SPOTGUARD_WEBHOOK_HEADERS": secret["stringData"]["headers"]})
    assert dict(loaded.webhook_headers) == headers
    mine = render_objects({"webhooks": {"existingSecret": "chat", "existingSecretHeadersKey": "headers"}})
    env = {e["name"]: e for e in only(mine, "DaemonSet")["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["SPOTGUARD_WEBHOOK_HEADERS"]["valueFrom"] == {"secretKeyRef": {"name": "chat", "key": "headers"}}


@pytest.mark.parametrize("env_name", sorted(SETTING_VALUES))
def test_daemon_setting_is_reachable_from_values(env_name: str) -> None:
    values, expected = SETTING_VALUES[env_name]
    assert _env(values)[env_name] == expected


def test_rendered_environment_is_accepted_by_the_daemon() -> None:
    """The env the chart renders, defaults and every setting changed, parses with config.load."""
    defaults = config.load(argparse.Namespace(), {**_env(), "NODE_NAME": "gpu-node-1"})
    assert defaults.provider == "auto" and defaults.listen_port == 9101 and not defaults.dry_run
    assert (defaults.safety_margin_seconds, defaults.endpoint_wait_seconds, defaults.max_drain_seconds,
            defaults.drain_poll_seconds) == (5, 10, 300, 0.5)
    everything: dict[str, Any] = {}
    for values, _ in SETTING_VALUES.values():
        everything = chartlib.deep_merge(everything, values)
    loaded = config.load(argparse.Namespace(), {**_env(everything), "NODE_NAME": "gpu-node-1"})
    assert loaded == config.Config(
        node_name="gpu-node-1", provider="gce", metadata_url="http://127.0.0.1:8080",
        listen_host="127.0.0.1", listen_port=9200, dry_run=True, notice_seconds=120.0,
        safety_margin_seconds=7.5, endpoint_wait_seconds=3.0, max_drain_seconds=900.0,
        drain_poll_seconds=0.25, log_level="debug", surge_min_notice_seconds=900.0,
        surge_drain_reserve_seconds=90.0, surge_priority_class="hold",
        surge_placeholder_image="mirror.example/pause:3.10.2", poll_seconds=0.5,
        scheduled_event_lead_seconds=7200.0, cordon_only=True, rebalance_action="cordon",
        rebalance_release_seconds=600.0, asg_termination_action="log", webhook_template="{event} on {node}",
        exclude_from_load_balancers=True)


def test_without_the_admission_policies_there_is_no_surge_and_no_pod_create() -> None:
    """RBAC cannot keep "create pods" to placeholders; only the policy can, so no policy, no surge."""
    assert _env({"validatingAdmissionPolicy": {"enabled": False}})["SPOTGUARD_SURGE_MIN_NOTICE_SECONDS"] == "0"
    assert _env({"surge": {"enabled": False}, "validatingAdmissionPolicy": {"enabled": True}})[
        "SPOTGUARD_SURGE_MIN_NOTICE_SECONDS"] == "0"
    assert _env({"validatingAdmissionPolicy": {"enabled": True}})["SPOTGUARD_SURGE_MIN_NOTICE_SECONDS"] == "600"
    objs = render_objects({"validatingAdmissionPolicy": {"enabled": False}})
    assert not any(r["resources"] == ["pods"] and "create" in r["verbs"] for r in only(objs, "ClusterRole")["rules"])
    assert "PriorityClass" not in chartlib.kinds(objs)


def test_optional_settings_are_left_to_the_daemon_when_unset() -> None:
    env = _env()
    assert "SPOTGUARD_METADATA_URL" not in env and "SPOTGUARD_NOTICE_SECONDS" not in env
    assert "SPOTGUARD_POLL_SECONDS" not in env


def test_extra_env_is_appended() -> None:
    extra = [{"name": "GCE_METADATA_HOST", "value": "127.0.0.1:8080"},
             {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}]
    env = _container({"extraEnv": extra})["env"]
    assert env[-2:] == extra


# --- RBAC ------------------------------------------------------------------------------------

EXPECTED_PERMISSIONS = {
    ("", "nodes"): {"get", "list", "watch", "patch"},
    ("", "pods"): {"get", "list", "watch"},
    ("", "pods/status"): {"patch"},
    ("", "pods/eviction"): {"create"},
    ("", "events"): {"create"},
    ("discovery.k8s.io", "endpointslices"): {"list", "watch"},
    ("policy", "poddisruptionbudgets"): {"list", "get"},
    ("authorization.k8s.io", "selfsubjectaccessreviews"): {"create"},
}


def test_cluster_role_grants_exactly_what_the_daemon_uses() -> None:
    role = only(render_objects(), "ClusterRole")
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert set(rule) <= {"apiGroups", "resources", "verbs"}, "no resourceNames/nonResourceURLs expected"
        for field in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[field], f"wildcard in {field}: {rule}"
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                assert "secret" not in resource
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    assert granted == EXPECTED_PERMISSIONS


def test_binding_ties_the_role_to_the_release_service_account() -> None:
    objs = render_objects()
    binding, account = only(objs, "ClusterRoleBinding"), only(objs, "ServiceAccount")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": only(objs, "ClusterRole")["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"],
                                    "namespace": chartlib.NAMESPACE}]
    assert _pod_spec()["serviceAccountName"] == account["metadata"]["name"]


# --- ValidatingAdmissionPolicy -----------------------------------------------------------------

def _policies(values: dict[str, Any] | None = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    objs = render_objects(values, api_versions=[VAP_API])
    return ([o for o in objs if o["kind"] == "ValidatingAdmissionPolicy"],
            [o for o in objs if o["kind"] == "ValidatingAdmissionPolicyBinding"])


def test_admission_policies_apply_to_spotguards_service_account_only() -> None:
    policies, bindings = _policies({"serviceAccount": {"name": "guard"}})
    assert len(policies) == len(bindings) == 8
    param_policies = ("-own-evicted-pods", "-own-pod-events")
    user = f'request.userInfo.username == "system:serviceaccount:{chartlib.NAMESPACE}:guard"'
    for policy in policies:
        spec = policy["spec"]
        assert spec["failurePolicy"] == "Fail"
        variables = {v["name"]: v["expression"] for v in spec["variables"]}
        assert "authentication.kubernetes.io/node-name" in variables["hasNodeClaim"]
        if policy["metadata"]["name"].endswith(param_policies):
            # matchConditions would be evaluated once per param: the expression checks the user.
            assert "matchConditions" not in spec
            assert variables["isSpotguard"] == user
            assert "!variables.isSpotguard" in spec["validations"][0]["expression"]
            continue
        assert "isSpotguard" not in variables
        assert spec["matchConditions"] == [{"name": "is-spotguard", "expression": user}]
        # Every other policy first requires the node-name claim of a pod-bound token.
        assert spec["validations"][0]["expression"] == "variables.hasNodeClaim"
    assert sorted(b["spec"]["policyName"] for b in bindings) == sorted(p["metadata"]["name"] for p in policies)
    assert all(b["spec"]["validationActions"] == ["Deny"] for b in bindings)


def test_with_the_policies_the_surge_may_create_delete_and_patch_pods_and_read_replicasets() -> None:
    role = only(render_objects(api_versions=[VAP_API]), "ClusterRole")
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    pods = granted.pop(("", "pods"))
    assert pods == {"get", "list", "watch", "create", "delete", "patch"}
    assert granted.pop(("apps", "replicasets")) == {"get"}
    assert granted == {key: verbs for key, verbs in EXPECTED_PERMISSIONS.items() if key != ("", "pods")}
    priority_class = only(render_objects(api_versions=[VAP_API]), "PriorityClass")
    assert priority_class["metadata"]["name"] == "spotguard-placeholder"   # <fullname>-placeholder
    assert _env({"validatingAdmissionPolicy": {"enabled": True}})["SPOTGUARD_SURGE_PRIORITY_CLASS"] == \
        "spotguard-placeholder"
    assert (priority_class["value"], priority_class["preemptionPolicy"], priority_class["globalDefault"]) == \
        (-1, "Never", False)


def test_admission_policies_cover_every_write_the_role_allows() -> None:
    policies, bindings = _policies()
    covered = {(group, resource, op)
               for policy in policies
               for rule in policy["spec"]["matchConstraints"]["resourceRules"]
               for group in rule["apiGroups"] for resource in rule["resources"] for op in rule["operations"]}
    # patch arrives at admission as UPDATE; create as CREATE, delete as DELETE.
    role = only(render_objects(api_versions=[VAP_API]), "ClusterRole")
    admitted = {"patch": "UPDATE", "create": "CREATE", "delete": "DELETE"}
    writes = {(g, r, admitted[v]) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
              for v in rule["verbs"] if v in admitted and r != "selfsubjectaccessreviews"}
    assert {("", "pods", "CREATE"), ("", "pods", "DELETE"), ("", "pods", "UPDATE")} <= writes
    assert writes <= covered
    by_name = {policy["metadata"]["name"].rsplit("-own-", 1)[1]:
               " ".join(v["expression"] for v in policy["spec"]["validations"]) for policy in policies}
    assert "object.metadata.name == variables.node" in by_name["nodes"]
    assert "object.spec.nodeName == variables.node" in by_name["pods"]
    assert "oldObject.spec.nodeName == variables.node" in by_name["handed-over-pods"]
    assert "object.spec == oldObject.spec" in by_name["handed-over-pods"]
    assert "oldObject.spec.nodeName == variables.node" in by_name["pods"]
    # Evictions: spotguard's must carry the label that routes them to the policy reading the pod.
    assert "object.metadata.labels['spotguard.io/evicted-by'] == 'spotguard'" in by_name["evictions"]
    assert "params.spec.nodeName == variables.node" in by_name["evicted-pods"]
    evicted_pods = next(p for p in policies if p["metadata"]["name"].endswith("-own-evicted-pods"))
    assert evicted_pods["spec"]["paramKind"] == {"apiVersion": "v1", "kind": "Pod"}
    # Only labelled evictions: other clients' evictions never pay one evaluation per pod.
    assert evicted_pods["spec"]["matchConstraints"]["objectSelector"] == {
        "matchLabels": {EVICTION_LABEL: "spotguard"}}
    binding = next(b for b in bindings if b["spec"]["policyName"] == evicted_pods["metadata"]["name"])
    assert binding["spec"]["paramRef"] == {"selector": {}, "parameterNotFoundAction": "Allow"}
    pod_events = next(p for p in policies if p["metadata"]["name"].endswith("-own-pod-events"))
    assert pod_events["spec"]["matchConstraints"]["objectSelector"] == {
        "matchLabels": {EVENT_LABEL: "spotguard"}}
    assert "params.spec.nodeName == variables.node" in by_name["pod-events"]
    assert all("paramRef" not in b["spec"] for b in bindings
               if b is not binding and not b["spec"]["policyName"].endswith("-own-pod-events"))
    assert all("paramKind" not in p["spec"] and "objectSelector" not in p["spec"]["matchConstraints"]
               for p in policies if p not in (evicted_pods, pod_events))
    # Old against new: what spotguard does not change must be as it was.
    assert "oldObject.metadata.labels" in by_name["nodes"] and "oldObject.spec.taints" in by_name["nodes"]
    assert "oldObject.status.podIP" in by_name["pods"] and "oldObject.status.conditions" in by_name["pods"]
    assert "spotguard.io/cordoned-by-spotguard" in by_name["nodes"]
    assert "lowerAscii()" in by_name["events"] and "dyn(object).source.component == 'spotguard'" in by_name["events"]


def test_admission_policy_can_start_in_warn_mode() -> None:
    _, bindings = _policies({"validatingAdmissionPolicy": {"validationActions": ["Warn", "Audit"]}})
    assert all(b["spec"]["validationActions"] == ["Warn", "Audit"] for b in bindings)


def test_the_eviction_node_check_can_be_turned_off_for_very_large_namespaces() -> None:
    policies, bindings = _policies({"validatingAdmissionPolicy": {"evictionNodeCheck": False}})
    names = sorted(p["metadata"]["name"].rsplit("-own-", 1)[1] for p in policies)
    assert names == ["events", "evictions", "handed-over-pods", "nodes", "placeholders", "pod-events", "pods"]
    assert len(bindings) == 7
    assert all("paramRef" not in b["spec"] for b in bindings if not b["spec"]["policyName"].endswith("pod-events"))
    # Nor are label and uid asked for: they only route evictions to the check that is gone.
    evictions = next(p for p in policies if p["metadata"]["name"].endswith("-own-evictions"))
    assert [v["expression"] for v in evictions["spec"]["validations"]] == ["variables.hasNodeClaim"]

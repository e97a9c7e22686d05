"""The chart lints clean and renders a matrix of values with the real Helm engine."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import chartlib
import helm_python as helm
import pytest
from chartlib import VAP_API, example_values, kinds, only, render, render_objects

MONITORING_ON = {
    "podMonitor": {"enabled": True},
    "serviceMonitor": {"enabled": True},
    "prometheusRule": {"enabled": True},
    "dashboard": {"enabled": True},
}
CORE_KINDS = ["ClusterRole", "ClusterRoleBinding", "DaemonSet", "ServiceAccount"]
# One policy (and binding) per kind of object: nodes, pods, evictions, core and events.k8s.io Events.
# With the policies, the surge is on: its two policies (placeholders, hand-overs) and PriorityClass
# come with them.
VAP_KINDS = ["ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"] * 8 + ["PriorityClass"]
MONITORING_KINDS = ["ConfigMap", "PodMonitor", "PrometheusRule", "Service", "ServiceMonitor"]


@pytest.mark.parametrize("values_file", [None, *chartlib.EXAMPLES],
                         ids=lambda p: "defaults" if p is None else p.name)
def test_lint_is_clean(values_file: Path | None) -> None:
    values = example_values(values_file) if values_file else None
    report = helm.lint(chartlib.CHART_DIR, values, strict=True, kube_version="v1.30.0")
    # Severity 1 is informational ("icon is recommended"); warnings and errors fail.
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not problems and not report["errors"], report


MATRIX: dict[str, tuple[dict[str, Any], list[str], list[str]]] = {
    # name: (values, api versions the "cluster" serves, expected kinds)
    "defaults-no-vap-api": ({}, [], CORE_KINDS),
    "defaults-vap-api": ({}, [VAP_API], sorted(CORE_KINDS + VAP_KINDS)),
    "vap-forced-on": ({"validatingAdmissionPolicy": {"enabled": True}}, [], sorted(CORE_KINDS + VAP_KINDS)),
    "vap-off-despite-api": ({"validatingAdmissionPolicy": {"enabled": False}}, [VAP_API], CORE_KINDS),
    "monitoring-on": (MONITORING_ON, [VAP_API], sorted(CORE_KINDS + VAP_KINDS + MONITORING_KINDS)),
    "monitoring-off": ({k: {"enabled": False} for k in MONITORING_ON}, [VAP_API],
                       sorted(CORE_KINDS + VAP_KINDS)),
    "podmonitor-only": ({"podMonitor": {"enabled": True}}, [], sorted(CORE_KINDS + ["PodMonitor"])),
    "no-rbac-no-sa": ({"rbac": {"create": False}, "serviceAccount": {"create": False, "name": "mine"}},
                      [], ["DaemonSet"]),
    "gke-quota": ({"criticalPodsQuota": {"enabled": True}}, [], sorted(CORE_KINDS + ["ResourceQuota"])),
    "surge-off": ({"surge": {"enabled": False}}, [VAP_API],
                  sorted(CORE_KINDS + ["ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"] * 6)),
    "surge-own-priority-class": ({"surge": {"priorityClass": {"create": False, "name": "mine"}}}, [VAP_API],
                                 sorted(CORE_KINDS + VAP_KINDS[:-1])),
}
for _example in chartlib.EXAMPLES:
    MATRIX[_example.stem] = (example_values(_example), [VAP_API], None)  # type: ignore[assignment]


@pytest.mark.parametrize("case", sorted(MATRIX))
def test_render_matrix(case: str) -> None:
    values, api_versions, expected = MATRIX[case]
    rendered = render(values, api_versions=api_versions)
    objs = chartlib.objects(rendered)
    for obj in objs:
        assert obj.get("apiVersion") and obj.get("kind") and obj["metadata"].get("name"), obj
        cluster_scoped = obj["kind"].startswith(("Cluster", "ValidatingAdmission", "PriorityClass"))
        assert ("namespace" in obj["metadata"]) != cluster_scoped, obj["metadata"]
    if expected is not None:
        assert kinds(objs) == expected
    assert "spotguard check" in rendered["spotguard/templates/NOTES.txt"]


def test_monitoring_and_extras_are_off_by_default() -> None:
    objs = render_objects(api_versions=[VAP_API, "monitoring.coreos.com/v1"])
    assert not [o for o in objs if o["apiVersion"].startswith("monitoring.coreos.com")]
    assert not [o for o in objs if o["kind"] in ("Service", "ConfigMap", "ResourceQuota")]


def test_vap_auto_follows_the_api_servers_capabilities() -> None:
    assert "ValidatingAdmissionPolicy" not in kinds(render_objects())
    assert "ValidatingAdmissionPolicy" in kinds(render_objects(api_versions=[VAP_API]))
    notes = render({})["spotguard/templates/NOTES.txt"]
    assert "no ValidatingAdmissionPolicy" in notes


def test_chart_metadata() -> None:
    metadata = chartlib.chart().metadata
    assert metadata["apiVersion"] == "v2" and metadata["name"] == "spotguard"
    assert metadata["appVersion"] == "0.1.0"
    # ValidatingAdmissionPolicy v1 is GA from 1.30; "-0" admits versions like v1.30.5-gke.1014001.
    assert metadata["kubeVersion"] == ">=1.30.0-0"
    # Rendering for a provider-suffixed version works.
    render({}, kube_version="v1.30.5-gke.1014001")


def test_client_dry_run_install(tmp_path: Path) -> None:
    """The install action (`helm install --dry-run=client`), not only the template engine."""
    config = helm.Config(kubeconfig_content="apiVersion: v1\nkind: Config\nclusters: []\ncontexts: []\nusers: []\n",
                         namespace=chartlib.NAMESPACE)
    try:
        release = config.install(chartlib.CHART_DIR, "spotguard", {"dryRun": True}, dry_run="client",
                                 namespace=chartlib.NAMESPACE)
        assert "kind: DaemonSet" in release["manifest"]
        assert "DRY RUN" in release["notes"]
        with pytest.raises(helm.HelmError, match="additional properties 'dryrun' not allowed"):
            config.install(chartlib.CHART_DIR, "spotguard", {"dryrun": True}, dry_run="client",
                           namespace=chartlib.NAMESPACE)
    finally:
        config.close()


def test_image_defaults_to_app_version_and_digest_wins() -> None:
    container = only(render_objects(), "DaemonSet")["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == f"ghcr.io/spotguard/spotguard:{chartlib.chart().metadata['appVersion']}"
    digest = "sha256:" + "a" * 64
    container = only(render_objects({"image": {"repository": "r.example/sg", "digest": digest}}),
                     "DaemonSet")["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == f"r.example/sg@{digest}"


def test_a_rebalance_surge_without_the_surge_is_refused_at_render() -> None:
    # Else every spotguard pod would refuse to start (--rebalance-action surge needs the surge on).
    for values, api_versions in (({"rebalanceAction": "surge"}, []),
                                 ({"rebalanceAction": "surge", "surge": {"enabled": False}}, [VAP_API])):
        with pytest.raises(helm.HelmRenderError, match="rebalanceAction: surge needs the surge on"):
            render(values, api_versions=api_versions)
    env = {e["name"]: e.get("value") for e in only(render_objects({"rebalanceAction": "surge"}, api_versions=[VAP_API]),
                                                   "DaemonSet")["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["SPOTGUARD_REBALANCE_ACTION"] == "surge" and env["SPOTGUARD_SURGE_MIN_NOTICE_SECONDS"] != "0"


def test_listen_must_use_the_metrics_port() -> None:
    with pytest.raises(helm.HelmRenderError, match="must end in :9101"):
        render({"listen": "0.0.0.0:9000"})
    env = {e["name"]: e.get("value") for e in only(render_objects({"listen": "127.0.0.1:9101"}), "DaemonSet")
           ["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["SPOTGUARD_LISTEN"] == "127.0.0.1:9101"


def test_examples_select_their_clouds_spot_nodes() -> None:
    def terms(name: str) -> list[dict[str, Any]]:
        values = example_values(chartlib.CHART_DIR / "examples" / name)
        spec = only(render_objects(values), "DaemonSet")["spec"]["template"]["spec"]
        return spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]

    def keys(term_list: list[dict[str, Any]]) -> set[tuple[str, str, tuple[str, ...]]]:
        return {(e["key"], e["operator"], tuple(e.get("values", [])))
                for t in term_list for e in t["matchExpressions"]}

    assert ("cloud.google.com/gke-spot", "In", ("true",)) in keys(terms("values-gke.yaml"))
    assert ("cloud.google.com/gke-preemptible", "In", ("true",)) in keys(terms("values-gke.yaml"))
    assert ("cloud.google.com/gke-accelerator", "Exists", ()) in keys(terms("values-gke.yaml"))
    assert keys(terms("values-eks.yaml")) == {("eks.amazonaws.com/capacityType", "In", ("SPOT",)),
                                               ("karpenter.sh/capacity-type", "In", ("spot",))}
    assert keys(terms("values-aks.yaml")) == {("kubernetes.azure.com/scalesetpriority", "In", ("spot",))}
    # Every example keeps the default: every taint tolerated, AKS's spot taint and a dying node's included.
    for example in ("values-gke.yaml", "values-eks.yaml", "values-aks.yaml"):
        daemonset = only(render_objects(example_values(chartlib.CHART_DIR / "examples" / example)), "DaemonSet")
        assert daemonset["spec"]["template"]["spec"]["tolerations"] == [{"operator": "Exists"}], example


def test_affinity_override_replaces_the_default_node_selection() -> None:
    affinity = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["gpu-spot"]}]}]}}}
    spec = only(render_objects({"affinity": affinity}), "DaemonSet")["spec"]["template"]["spec"]
    assert spec["affinity"] == affinity
    spec = only(render_objects({"nodeSelectorTerms": []}), "DaemonSet")["spec"]["template"]["spec"]
    assert "affinity" not in spec


def test_dashboard_configmap_has_the_sidecar_label_and_valid_json() -> None:
    config_map = next(o for o in render_objects({"dashboard": {"enabled": True}}) if o["kind"] == "ConfigMap")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    board = json.loads(config_map["data"]["spotguard.json"])
    assert board["uid"] == "spotguard-overview" and board["panels"]
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))


def test_service_is_headless_and_only_with_the_servicemonitor() -> None:
    objs = render_objects({"serviceMonitor": {"enabled": True}})
    service = only(objs, "Service")
    assert service["spec"]["clusterIP"] == "None"
    monitor = only(objs, "ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()


@pytest.mark.parametrize("kind", ["PodMonitor", "ServiceMonitor"])
def test_scrape_keeps_spotguards_own_labels_and_adds_node(kind: str) -> None:
    key = "podMonitor" if kind == "PodMonitor" else "serviceMonitor"
    monitor = only(render_objects({key: {"enabled": True, "labels": {"release": "kps"}}}), kind)
    endpoint = (monitor["spec"].get("podMetricsEndpoints") or monitor["spec"]["endpoints"])[0]
    assert monitor["metadata"]["labels"]["release"] == "kps"
    assert endpoint["port"] == "metrics" and endpoint["honorLabels"] is True
    assert {"action": "replace", "sourceLabels": ["__meta_kubernetes_pod_node_name"],
            "targetLabel": "node"} in endpoint["relabelings"]


def test_prestop_helper_configmap_ships_the_script_in_each_namespace() -> None:
    script = (chartlib.CHART_DIR / "files" / "vllm-drain-prestop.py")
    if not script.exists():
        with pytest.raises(helm.HelmRenderError, match="vllm-drain-prestop.py is missing"):
            render({"vllmPreStopHelper": {"enabled": True}})
        pytest.skip("daemonset/files/vllm-drain-prestop.py is not written yet")
    objs = render_objects({"vllmPreStopHelper": {"enabled": True, "namespaces": ["llm-a", "llm-b"]}})
    config_maps = [o for o in objs if o["kind"] == "ConfigMap"]
    assert sorted(c["metadata"]["namespace"] for c in config_maps) == ["llm-a", "llm-b"]
    for config_map in config_maps:
        assert config_map["data"]["vllm-drain-prestop.py"] == script.read_text().rstrip("\n")
    default = [o for o in render_objects({"vllmPreStopHelper": {"enabled": True}}) if o["kind"] == "ConfigMap"]
    assert [c["metadata"]["namespace"] for c in default] == [chartlib.NAMESPACE]


def test_notes_name_the_policies_that_were_installed() -> None:
    notes = render({}, api_versions=[VAP_API])["spotguard/templates/NOTES.txt"]
    assert "-own-{nodes,pods,evictions,evicted-pods,events,pod-events}" in notes
    notes = render({"validatingAdmissionPolicy": {"evictionNodeCheck": False}},
                   api_versions=[VAP_API])["spotguard/templates/NOTES.txt"]
    assert "-own-{nodes,pods,evictions,events,pod-events}" in notes
    assert "except evictions (evictionNodeCheck: false)" in notes


def test_notes_say_which_pod_security_level_the_namespace_needs() -> None:
    notes = render({})["spotguard/templates/NOTES.txt"]
    assert "pod-security.kubernetes.io/enforce=privileged" in notes and "not kube-system" in notes
    assert "POD SECURITY" not in render({"hostNetwork": False})["spotguard/templates/NOTES.txt"]

"""Every metric an alert or a dashboard panel reads exists in what spotguard (or vLLM) exports.

A metric renamed or relabelled in spotguard/observability.py breaks this test, not the pager.
"""

from __future__ import annotations

import chartlib
import pytest

# Everything the alerts and the dashboard may rely on: spotguard's own /metrics, vLLM's /metrics
# as the simulation's fake vLLM exports it (vLLM's real names), and kube-state-metrics' node labels.
ALERT_GROUPS = chartlib.alert_rule_groups()
DASHBOARD = chartlib.dashboard()


@pytest.fixture(scope="module")
def known_series() -> dict[str, set[str]]:
    series = {**chartlib.spotguard_series(), **chartlib.vllm_series()}
    for name in chartlib.EXTERNAL_METRICS:
        series[name] = {"*"}  # labels depend on kube-state-metrics' allow-list
    return series


def _used(exprs: list[str]) -> list[tuple[str, str, set[str]]]:
    return [(expr, name, labels) for expr in exprs for name, labels in chartlib.selectors(expr)]


@pytest.mark.parametrize("source", ["alerts", "dashboard"])
def test_every_metric_used_exists(source: str, known_series: dict[str, set[str]]) -> None:
    exprs = chartlib.alert_exprs(ALERT_GROUPS) if source == "alerts" else chartlib.dashboard_exprs(DASHBOARD)
    used = _used(exprs)
    assert used, "no metric found: the PromQL scan is broken"
    missing = sorted({name for _, name, _ in used if name not in known_series})
    assert not missing, f"{source} use metrics nobody exports: {missing}"


@pytest.mark.parametrize("source", ["alerts", "dashboard"])
def test_every_label_matched_exists_on_its_metric(source: str, known_series: dict[str, set[str]]) -> None:
    exprs = chartlib.alert_exprs(ALERT_GROUPS) if source == "alerts" else chartlib.dashboard_exprs(DASHBOARD)
    for expr, name, labels in _used(exprs):
        available = known_series.get(name, set())
        if "*" in available:
            continue
        unknown = labels - available - chartlib.TARGET_LABELS
        assert not unknown, f"{name} has no label {sorted(unknown)} (in {expr!r})"


def test_dashboard_uses_only_spotguard_and_vllm_metrics() -> None:
    names = chartlib.metric_names(chartlib.dashboard_exprs(DASHBOARD))
    assert all(n.startswith(("spotguard_", "vllm:")) for n in names), names


def test_alerts_cover_the_agreed_conditions() -> None:
    alerts = {rule["alert"]: rule for group in ALERT_GROUPS for rule in group["rules"]}
    assert set(alerts) == {
        "SpotguardPreemptionInProgress", "SpotguardDrainMissedDeadline", "SpotguardEvictionBlockedByPDB",
        "SpotguardRequestsAborted", "SpotguardMetadataUnreachable", "SpotguardMissingOnGpuNode",
        "SpotguardSurgeGivenUp", "SpotguardWebhookFailing"}
    for name, rule in alerts.items():
        assert {"summary", "description", "runbook"} <= set(rule["annotations"]), name
        assert rule["labels"]["severity"] in ("info", "warning", "critical"), name


def test_the_scan_catches_a_renamed_metric(known_series: dict[str, set[str]]) -> None:
    """The checker itself: a name or label that does not exist is reported."""
    used = _used(['sum by (phase) (spotguard_phases{node=~"$node"})',
                  'increase(spotguard_notices_total{kind="preemption"}[5m]) > 0 and on (node) spotguard_metadata_up'])
    assert [(n, lbl) for _, n, lbl in used] == [("spotguard_phases", {"node"}),
                                                 ("spotguard_notices_total", {"kind"}),
                                                 ("spotguard_metadata_up", set())]
    assert "spotguard_phases" not in known_series
    assert "kind" in known_series["spotguard_notices_total"]
    assert "reason" not in known_series["spotguard_phase"]

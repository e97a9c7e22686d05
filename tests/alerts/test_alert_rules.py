"""The chart's alerting rules, proven the way Prometheus proves rules: with promtool.

The rule groups are taken from the rendered chart (the PrometheusRule's spec.groups, i.e. a plain
Prometheus rule file), checked with `promtool check rules`, and every alert has unit tests
(`promtool test rules`, *.test.yaml beside this file) for when it fires, with which labels and
annotations, and when it does not. promtool comes from Debian's `prometheus` package:
scripts/install-prometheus.sh installs it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "chart"))
import chartlib  # noqa: E402

HERE = Path(__file__).resolve().parent
UNIT_TESTS = sorted(HERE.glob("*.test.yaml"))
PROMTOOL = shutil.which("promtool")

pytestmark = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed: run scripts/install-prometheus.sh (Debian's prometheus package)")


@pytest.fixture(scope="module")
def groups() -> list[dict[str, Any]]:
    return chartlib.alert_rule_groups()


@pytest.fixture(scope="module")
def rule_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return chartlib.write_rule_file(tmp_path_factory.mktemp("rules") / "rendered-rules.yaml")


def _promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def _rules_by_alert(groups: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {rule["alert"]: rule for group in groups for rule in group["rules"]}


def test_rendered_rules_pass_promtool_check(rule_file: Path, groups: list[dict[str, Any]]) -> None:
    result = _promtool("check", "rules", str(rule_file))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(_rules_by_alert(groups))} rules found" in result.stdout


def test_rules_with_every_option_set_pass_promtool_check(tmp_path: Path) -> None:
    values = {"prometheusRule": {
        "alertLabels": {"team": "inference"}, "runbookBaseUrl": "https://runbooks.example/spotguard",
        "evictionBlockedFor": "1m", "metadataUnreachableFor": "10m", "missingFor": "15m", "incidentWindow": "1h",
        "gpuSpotNodeSelectors": ['label_karpenter_sh_capacity_type="spot"']}}
    path = chartlib.write_rule_file(tmp_path / "rules.yaml", values)
    result = _promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    rules = _rules_by_alert(yaml.safe_load(path.read_text())["groups"])
    assert all(r["labels"]["team"] == "inference" for r in rules.values())
    assert rules["SpotguardMissingOnGpuNode"]["annotations"]["runbook_url"] == \
        "https://runbooks.example/spotguard#spotguardmissingongpunode"
    # No selector at all: the alert that needs kube-state-metrics is left out.
    path = chartlib.write_rule_file(tmp_path / "none.yaml", {"prometheusRule": {"gpuSpotNodeSelectors": []}})
    assert "SpotguardMissingOnGpuNode" not in _rules_by_alert(yaml.safe_load(path.read_text())["groups"])


def test_every_alert_has_firing_and_quiet_unit_tests(groups: list[dict[str, Any]]) -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for path in UNIT_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case["alert_rule_test"]:
                (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    alerts = set(_rules_by_alert(groups))
    assert alerts <= firing, f"no firing case for {sorted(alerts - firing)}"
    assert alerts <= quiet, f"no not-firing case for {sorted(alerts - quiet)}"


def test_unit_tests_feed_only_series_that_exist() -> None:
    """Input series use the daemon's real /metrics names (and vLLM's, kube-state-metrics')."""
    known = {**chartlib.spotguard_series(), **chartlib.vllm_series()}
    for path in UNIT_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for series in case["input_series"]:
                name = series["series"].split("{", 1)[0]
                assert name in known or name in chartlib.EXTERNAL_METRICS, f"{path.name}: {name} is exported by nobody"


def _with_rule_file(path: Path, rule_file: Path, rules: dict[str, dict[str, Any]], out: Path) -> Path:
    """The unit test file pointed at the rendered rules, with each rule's static runbook text added
    to the expected annotations (summary and description stay as the test file states them)."""
    spec = yaml.safe_load(path.read_text())
    spec["rule_files"] = [str(rule_file)]
    for case in spec["tests"]:
        for check in case["alert_rule_test"]:
            static = {k: v for k, v in rules[check["alertname"]]["annotations"].items()
                      if k not in ("summary", "description")}
            for alert in check.get("exp_alerts") or []:
                alert.setdefault("exp_annotations", {}).update(static)
                alert["exp_labels"].setdefault("alertname", check["alertname"])
    target = out / path.name
    target.write_text(yaml.safe_dump(spec, sort_keys=False, width=10_000))
    return target


@pytest.mark.parametrize("path", UNIT_TESTS, ids=[p.name for p in UNIT_TESTS])
def test_promtool_unit_tests(path: Path, rule_file: Path, groups: list[dict[str, Any]], tmp_path: Path) -> None:
    prepared = _with_rule_file(path, rule_file, _rules_by_alert(groups), tmp_path)
    result = _promtool("test", "rules", str(prepared), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout

"""`spotguard-sim bench` end to end in its smallest configuration: one short run per scenario, a
few seconds of footprint, a storm of a few nodes, on a cluster the bench starts (with its audit log)
and stops itself.

Benchmarks report measurements, they are not timed assertions: this test checks that the report
has every key, that its numbers add up, and that fields are null exactly where they do not apply -
never that a speed target is met.
"""

from __future__ import annotations

import json

import pytest
from spotguard_sim import controlplane
from spotguard_sim.bench.config import PROFILES, SCENARIOS, BenchConfig

from spotguard_sim.bench.run import bench

# What the smoke run's one profile (GKE, a short notice, SIGTERM at the notice) runs: no surge (long
# notices only), no real NTH (AWS profiles only), the preStop helper (it matters there); the rule is
# tested in test_bench_measures.py.
SHORT_NOTICE_SCENARIOS = {name for name, scenario in SCENARIOS.items() if scenario.applies_to(PROFILES["gke-spot-30"])}

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

REQUIRED_SCENARIO_KEYS = ("requests_in_flight_at_notice", "completed", "aborted", "refused", "lost",
                          "reaction_ms", "notready_ms", "drain_detect_lag_ms", "replacement_ready_s",
                          "capacity_gap_s")


@pytest.fixture(scope="module")
def report_and_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    out = root / "out" / "bench.json"
    messages: list[str] = []
    report = bench(BenchConfig.smoke(), directory=root / "cluster", out=out, say=messages.append)
    return report, out, root / "cluster", messages


@pytest.mark.timeout(1200)
def test_report_has_every_key_and_the_json_matches(report_and_files):
    report, out, _, _ = report_and_files
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert report["kubernetes_version"].startswith("v1.")
    assert report["runs"] == 1
    # The smoke profile (gke-spot-30) is too short to surge: spotguard_surge runs on long notices only.
    assert set(report["scenarios"]) == SHORT_NOTICE_SCENARIOS
    for name, scenario in report["scenarios"].items():
        for key in REQUIRED_SCENARIO_KEYS:
            assert key in scenario, (name, key)
        assert set(scenario["reaction_ms"]) >= {"p50", "p99"}
        assert set(scenario["notready_ms"]) >= {"p50", "p99"}
        assert "p50" in scenario["drain_detect_lag_ms"]
    for key in ("rss_mb", "cpu_millicores_idle", "api_requests_per_min_idle"):
        assert key in report["footprint"]
    for key in ("nodes", "all_cordoned_s", "api_errors"):
        assert key in report["storm"]
    assert set(report["targets"]) >= {"reaction_p99", "idle_rss", "idle_cpu", "idle_api_requests"}


@pytest.mark.timeout(1200)
def test_admission_part_measures_both_users_at_every_namespace_size(report_and_files):
    report, _, _, _ = report_and_files
    cfg = BenchConfig.smoke()
    sizes = report["admission"]["sizes"]
    assert [s["pods_in_namespace"] for s in sizes] == sorted(cfg.admission_pod_counts)
    for size in sizes:
        for who in ("policy_ms", "control_ms", "event_policy_ms", "event_control_ms"):
            assert size[who]["n"] == cfg.admission_evictions
            assert 0 < size[who]["p50"] <= size[who]["p99"]
        assert size["ratio_p50"] == round(size["policy_ms"]["p50"] / size["control_ms"]["p50"], 2)
        assert size["event_ratio_p50"] == round(size["event_policy_ms"]["p50"] / size["event_control_ms"]["p50"], 2)


@pytest.mark.timeout(1200)
def test_request_counts_add_up_in_every_scenario_and_run(report_and_files):
    report, out, _, _ = report_and_files
    for name, s in report["scenarios"].items():
        assert s["requests"] > 0, name
        assert s["completed"] + s["aborted"] + s["refused"] + s["error"] + s["cancelled"] + s["unfinished"] \
            == s["requests"], name
        # No request the bench itself got wrong (4xx), none left hanging at the end.
        assert s["error"] == 0 and s["unfinished"] == 0 and s["cancelled"] == 0, name
        assert s["lost"] == s["lost_aborted"] + s["lost_refused"], name
        assert s["lost"] + s["lost_unservable"] == s["aborted"] + s["refused"], name
        assert 0 <= s["requests_in_flight_at_notice"] <= s["requests"], name
    runs = json.loads(out.with_name("bench-runs.json").read_text())
    assert len(runs) == len(SHORT_NOTICE_SCENARIOS)
    for run in runs:
        outcomes = [row[2] for row in run["timeline"]]
        assert len(outcomes) == run["requests"]
        assert outcomes.count("completed") == run["completed"]
        assert outcomes.count("aborted") == run["aborted"]
        assert outcomes.count("refused") == run["refused"]


@pytest.mark.timeout(1200)
def test_fields_are_null_exactly_where_they_do_not_apply(report_and_files):
    report, _, _, _ = report_and_files
    s = report["scenarios"]
    for name in ("kubelet_only", "kubelet_only_drain", "kubelet_only_prestop"):
        assert s[name]["reaction_ms"]["p50"] is None, "nothing cordons without a handler"
        assert "reaction_ms" in s[name]["null_reasons"]
    for name in ("kubelet_only", "evict_immediately", "kubelet_only_drain", "evict_immediately_drain",
                 "kubelet_only_prestop"):
        assert s[name]["drain_detect_lag_ms"]["p50"] is None and "drain_detect_lag_ms" in s[name]["null_reasons"]
        assert s[name]["daemon_reaction_ms"] is None
    for name, scenario in s.items():
        # One replica was lost for a while in every scenario: the gap is measured, never negative.
        assert scenario["capacity_gap_s"] is not None and scenario["capacity_gap_s"] > 0, name
    for name in ("evict_immediately", "spotguard", "spotguard_drain", "spotguard_prestop"):
        assert s[name]["reaction_ms"]["p50"] is not None and s[name]["reaction_ms"]["p50"] >= 0, name
    for name, scenario in s.items():
        assert scenario["notready_ms"]["p50"] is not None, name
        assert scenario["replacement_ready_s"] is None or scenario["replacement_ready_s"] > 0


@pytest.mark.timeout(1200)
def test_footprint_reaction_and_storm_are_measured(report_and_files):
    report, _, _, _ = report_and_files
    footprint = report["footprint"]
    assert footprint["rss_mb"] > 0 and footprint["cpu_millicores_idle"] >= 0
    # The bench starts its cluster with an audit log, so API requests are counted, not guessed.
    assert footprint["api_requests_per_min_idle"] is not None and footprint["api_requests_startup"] > 0
    assert footprint["processes"]["python_idle"]["rss_mib"] > 0
    reaction = report["reaction"]
    assert reaction["cloud"] == "gce"
    assert reaction["repetitions"] == len(reaction["samples_ms"]["external"]) == 5
    assert reaction["external_ms"]["p50"] <= reaction["external_ms"]["p99"]
    # The polled clouds too, each through its own emulator and provider.
    assert {cloud: r["cloud"] for cloud, r in report["reaction_polled"].items()} == {"aws": "aws", "azure": "azure"}
    for polled in report["reaction_polled"].values():
        assert len(polled["samples_ms"]["external"]) == 5 and polled["external_ms"]["p50"] > 0
    storm = report["storm"]
    assert storm["nodes"] == 3 and storm["cordoned"] == 3
    assert storm["all_cordoned_s"] is not None and storm["all_cordoned_s"] >= 0
    assert isinstance(storm["api_errors"], int) and storm["api_errors"] >= 0


@pytest.mark.timeout(1200)
def test_plots_are_written_and_the_cluster_it_started_is_stopped(report_and_files):
    _, out, cluster_dir, messages = report_and_files
    for name in ("timeline-gke-spot-30.png", "reaction.png"):
        assert (out.parent / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert controlplane.read_info(cluster_dir) is None, "the bench must stop the cluster it started"
    assert any("kubelet_only run 1/1" in m for m in messages), "progress is reported while it runs"

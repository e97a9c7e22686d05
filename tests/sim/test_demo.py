"""`spotguard-sim demo`, the main job (`./dev demo`), end to end as a user runs it: its own cluster,
started and stopped by the demo, in a fresh directory."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from spotguard_sim import controlplane

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


# GCE is the default; Azure plays the same story through Scheduled Events (polled), with the same
# 30 s notice, so its run takes as long.
@pytest.mark.parametrize("cloud", ["gce", "azure"])
@pytest.mark.timeout(600)
def test_demo_runs_the_whole_story_reports_it_and_cleans_up(tmp_path, cloud):
    directory = tmp_path / "sim"
    run = subprocess.run([sys.executable, "-m", "spotguard_sim", "demo", "--dir", str(directory),
                          *([] if cloud == "gce" else ["--cloud", cloud])],
                         capture_output=True, text=True, timeout=540)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "== result" in run.stdout

    report = json.loads((directory / "demo" / "demo.json").read_text())
    summary = report["summary"]
    assert summary["requests"] > 0
    assert sum(summary[k] for k in ("completed", "aborted", "refused", "error", "cancelled", "unfinished")) \
        == summary["requests"]
    assert len(report["requests"]) == summary["requests"]
    marks = report["timeline_s"]
    # The story in its order: spotguard reacts, the pod leaves the Service, the VM goes.
    assert {"cordoned", "not-ready", "VM gone"} <= set(marks)
    assert 0 <= marks["cordoned"] < marks["VM gone"] and 0 <= marks["not-ready"] < marks["VM gone"]
    assert report["reaction_ms"] is not None and report["reaction_ms"] > 0
    assert report["notice_seconds"] == 30 and report["cloud"] == cloud
    assert f"{'GCE' if cloud == 'gce' else 'Azure'} preempts" in run.stdout
    assert (directory / "demo" / "demo-timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The cluster the demo started is stopped again.
    info = controlplane.read_info(directory)
    assert info is None or not any(controlplane._alive(p) for p in info.processes)

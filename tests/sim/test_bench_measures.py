"""The benchmark's pure measures, on hand-made inputs: the capacity gap, the profiles' arithmetic,
and what a load-generator request counts as."""

from __future__ import annotations

import pytest

from spotguard_sim.bench.config import PROFILES, SCENARIOS
from spotguard_sim.bench.scenarios import capacity_gap
from spotguard_sim.router import EndpointChange, _StreamEnd

T = 1000.0


def change(at: float, address: str, ready: bool | None) -> EndpointChange:
    return EndpointChange(at=T + at, address=address, port=8000, pod=f"pod-{address}", ready=ready)


def test_the_gap_runs_from_a_replica_leaving_until_its_replacement_is_ready() -> None:
    changes = [change(-30, "a", True), change(-30, "b", True),      # both ready before the notice
               change(0.2, "a", False),                             # taken out of rotation
               change(3.0, "a", None),                              # gone
               change(12.5, "c", False), change(14.0, "c", True)]   # the replacement, then ready
    gap, still_open = capacity_gap(changes, notice=T, until=T + 14.0, desired=2)
    assert gap == pytest.approx(13.8) and not still_open


def test_a_gap_still_open_at_the_end_counts_to_the_end() -> None:
    changes = [change(-5, "a", True), change(-5, "b", True), change(1.0, "b", False)]
    assert capacity_gap(changes, notice=T, until=T + 31.0, desired=2) == (30.0, True)


def test_no_gap_when_capacity_never_drops() -> None:
    changes = [change(-5, "a", True), change(-5, "b", True), change(2.0, "c", True), change(3.0, "a", False)]
    assert capacity_gap(changes, notice=T, until=T + 10, desired=2) == (0.0, False)


def test_every_profile_kills_non_critical_pods_before_the_vm_goes() -> None:
    for profile in PROFILES.values():
        assert 0 <= profile.shutdown_at_s <= profile.budget_s <= profile.vm_gone_s, profile.name
        assert profile.deadline_s <= profile.vm_gone_s, profile.name
    assert PROFILES["gke-spot-30"].budget_s == 15.0      # SIGTERM at t=0, 15 s of grace
    assert PROFILES["gke-spot-120"].budget_s == 105.0
    assert PROFILES["gce-notice-120"].vm_gone_s == 150.0


def stream(*events: bytes) -> _StreamEnd:
    end = _StreamEnd()
    whole = b"".join(b"data: " + e + b"\n\n" for e in events)
    for i in range(0, len(whole), 7):   # arriving in pieces that split lines
        end.feed(whole[i:i + 7])
    return end


TOKEN = b'{"choices":[{"index":0,"text":" the","finish_reason":null}]}'


def test_each_scenario_runs_on_the_profiles_it_can_tell_something_about() -> None:
    def runs_on(scenario: str) -> set[str]:
        return {name for name, profile in PROFILES.items() if SCENARIOS[scenario].applies_to(profile)}

    assert runs_on("spotguard_drain") == set(PROFILES)
    assert runs_on("spotguard_surge") == {"gce-maintenance-180"}
    assert runs_on("nth") == {"aws-spot-120"}
    # The preStop helper only matters where vLLM gets SIGTERM while still in its Service (GKE).
    assert runs_on("spotguard_prestop") == runs_on("kubelet_only_prestop") == {"gke-spot-30", "gke-spot-120"}
    assert SCENARIOS["spotguard_prestop"].drain_aware and not SCENARIOS["spotguard"].drain_aware


def test_a_whole_answer_ends_with_a_normal_finish_reason_then_done() -> None:
    end = stream(TOKEN, b'{"choices":[{"index":0,"text":"","finish_reason":"length"}]}', b"[DONE]")
    assert (end.finish_reason, end.done, end.error) == ("length", True, None)


def test_vllms_abort_ending_is_seen_although_done_follows() -> None:
    end = stream(TOKEN, b'{"choices":[{"index":0,"text":"","finish_reason":"abort"}]}', b"[DONE]")
    assert (end.finish_reason, end.done) == ("abort", True)


def test_an_error_event_is_seen() -> None:
    end = stream(TOKEN, b'{"error":{"message":"boom","code":500}}', b"[DONE]")
    assert end.error == "boom" and end.done


def test_a_reaction_only_run_plots_one_full_width_panel_not_half_a_blank_figure(tmp_path) -> None:
    from PIL import Image
    from spotguard_sim.bench.report import write_plots

    reaction = {"repetitions": 3, "samples_ms": {"external": [20.0, 25.0, 40.0], "own_writes": [22.0, 27.0, 41.0],
                                                 "daemon": [18.0, 21.0, 30.0]}}
    (path,) = write_plots({"reaction": reaction}, [], tmp_path)
    assert path.name == "reaction.png"
    with Image.open(path) as image:
        assert image.size[0] == 7 * 110   # one 7-inch panel at 110 dpi (two panels were 12 inches)

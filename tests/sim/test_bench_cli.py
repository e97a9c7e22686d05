"""`spotguard-sim bench` on the command line: what an interrupted run says (no cluster needed)."""

from __future__ import annotations

import argparse
import asyncio

import pytest
from spotguard_sim.bench import run


@pytest.mark.parametrize("interruption", [KeyboardInterrupt, asyncio.CancelledError])
def test_an_interrupted_bench_says_so_in_one_line_and_exits_130(monkeypatch, capsys, tmp_path, interruption):
    def interrupted(*_: object, **__: object) -> None:
        raise interruption()

    monkeypatch.setattr(run, "bench", interrupted)
    parser = argparse.ArgumentParser()
    run.add_bench_arguments(parser)
    args = parser.parse_args(["--quick", "--out", str(tmp_path / "quick.json")])
    assert run.run_bench_from_args(args) == 130
    err = capsys.readouterr().err
    assert err == f"spotguard-sim bench: interrupted; nothing written to {tmp_path / 'quick.json'}\n"


def test_a_profile_none_of_the_chosen_scenarios_runs_on_is_refused_at_start(monkeypatch, capsys):
    monkeypatch.setattr(run, "bench", lambda *_, **__: pytest.fail("the bench must not start"))
    parser = argparse.ArgumentParser()
    run.add_bench_arguments(parser)
    args = parser.parse_args(["--profiles", "gke-spot-30,aws-spot-120", "--scenarios", "spotguard_prestop"])
    assert run.run_bench_from_args(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--scenarios" in err and "aws-spot-120" in err and "gke-spot-30" not in err

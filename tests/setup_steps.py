"""./dev test's background set-up steps, as the tests see them.

`./dev test` runs the slow set-up that only some tests need (real vLLM, AWS's tools, kind) in the
background and writes each step's state to <cache>/setup/<step>.status: `running`, `ok` or
`failed ...`, its output to <step>.log beside it. A test that needs a step waits for it here
(tests/conftest.py); pytest run directly, with no status file, waits for nothing.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

STATUS_DIR = Path(os.environ.get("SPOTGUARD_CACHE_DIR") or Path.home() / ".cache" / "spotguard") / "setup"

# marker -> step, in the order their tests run (kind, the longest set-up, last)
STEP_OF_MARKER = {"awstools": "aws-tools", "realvllm": "vllm", "kind": "kind"}


def wait(step: str, say: Callable[[str], None], *, status_dir: Path = STATUS_DIR, timeout: float = 3600,
         poll: float = 2.0, say_every: float = 60.0) -> str | None:
    """None once `step` has finished (or was never started here), else why it cannot be used.
    While it runs, says every `say_every` seconds how long it has waited and the log's last line."""
    status, log = status_dir / f"{step}.status", status_dir / f"{step}.log"
    started = time.monotonic()
    said = started - say_every   # say at once when there is anything to wait for
    while status.exists() and status.read_text().startswith("running"):
        now = time.monotonic()
        if now - started > timeout:
            return f"the background set-up step {step!r} still runs after {timeout:.0f} s (log: {log})"
        if now - said >= say_every:
            said = now
            lines = log.read_text(errors="replace").splitlines() if log.exists() else []
            say(f"[setup] waiting for {step} ({now - started:.0f} s): {lines[-1][:160] if lines else ''}")
        time.sleep(poll)
    if status.exists() and not status.read_text().startswith("ok"):
        return f"the background set-up step {step!r}: {status.read_text().strip()}"
    return None

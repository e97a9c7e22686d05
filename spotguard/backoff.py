"""The one retry delay of the project: exponential backoff with "equal jitter".

Every retry loop (metadata server, Kubernetes API, vLLM scrapes, evictions refused by a PDB) asks
this function how long to sleep, so the retry behaviour is the same everywhere and tested once.

Why equal jitter (half fixed, half random) rather than "full jitter" (anything from 0 to the
ceiling): a delay of 0 would turn a broken metadata server into a busy loop, and the fixed half
guarantees a minimum pause that still grows with each failure. The random half keeps the
DaemonSet's many pods (one per node, all seeing the same outage) from retrying in lock-step.
"""

from __future__ import annotations

import random
from typing import Callable

# 2**64 is far beyond any useful cap; clamping the exponent avoids OverflowError on float math
# when a loop has been failing for a very long time.
_MAX_EXPONENT = 64


def backoff_delay(attempt: int, *, base: float, cap: float,
                  rand: Callable[[], float] = random.random) -> float:
    """Seconds to wait before retry number `attempt` (0 for the first retry).

    The ceiling grows as `base * 2**attempt` up to `cap`; the result lies in
    [ceiling / 2, ceiling], so it is never 0 and never above `cap`. `rand` returns a float in
    [0, 1) (injectable so tests are deterministic).
    """
    if base <= 0:
        raise ValueError(f"base must be > 0 seconds, got {base!r}")
    if cap < base:
        raise ValueError(f"cap must be >= base ({base!r}), got {cap!r}")
    exponent = min(max(attempt, 0), _MAX_EXPONENT)
    ceiling = min(cap, base * (2 ** exponent))
    half = ceiling / 2
    # Clamped so that a custom `rand` straying outside [0, 1] still cannot give 0 or exceed cap.
    fraction = min(max(rand(), 0.0), 1.0)
    return half + half * fraction

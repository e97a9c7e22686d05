#!/usr/bin/env python3
"""preStop hook for a vLLM container: wait until vLLM has no request in flight, then let it stop.

Kubernetes runs the preStop hook before it sends SIGTERM. vLLM aborts every in-flight request on
SIGTERM unless it runs with `--shutdown-timeout N`, so this hook holds SIGTERM back until
`vllm:num_requests_running + vllm:num_requests_waiting` (summed over every `engine` and model
series) reaches 0, or `--max-wait` seconds pass. It never fails the hook: whatever happens it
exits 0 and says on stderr what it saw, because a failed preStop hook only adds noise (the kubelet
logs a FailedPreStopHook event and sends SIGTERM anyway).

Only the Python standard library is used, so it runs in any vLLM image as is.

Usage (in the vLLM container of the pod spec; the chart ships this file in a ConfigMap):

    lifecycle:
      preStop:
        exec:
          command: ["python3", "/etc/spotguard/vllm-drain-prestop.py", "--port", "8000", "--max-wait", "25"]
    # The hook's time counts against the grace period: keep
    # terminationGracePeriodSeconds > max-wait + vLLM's --shutdown-timeout + a few seconds.

Options (each also read from the environment):
    --port N            vLLM's HTTP port (SPOTGUARD_METRICS_PORT, default 8000). Not VLLM_PORT:
                        vLLM itself reads that variable for its internal ports.
    --path PATH         metrics path (SPOTGUARD_METRICS_PATH, default /metrics)
    --max-wait SECONDS  give up waiting after this long (SPOTGUARD_PRESTOP_MAX_WAIT, default 25)
    --interval SECONDS  time between polls (default 0.5)

Requests that arrive while the hook waits keep it waiting: take the pod out of its Service first
(spotguard does, through the pod's readiness gate) so the count can reach 0.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import urllib.error
import urllib.request

IN_FLIGHT_GAUGES = ("vllm:num_requests_running", "vllm:num_requests_waiting")
# A vLLM /metrics is well under this; the cap keeps a broken endpoint from filling the container's
# memory while the pod is already being stopped.
MAX_BODY_BYTES = 8 * 1024 * 1024


def in_flight(text: str) -> float | None:
    """running + waiting summed over all series; None unless both gauges have a usable series.

    Names are matched exactly: `vllm:num_requests_waiting_by_reason` splits the same waiting
    requests by reason, and counting it too would double them.
    """
    sums = {name: 0.0 for name in IN_FLIGHT_GAUGES}
    seen: set[str] = set()
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parsed = _sample(line)
        if parsed is None:
            continue
        name, value = parsed
        if name in sums:
            if math.isnan(value) or math.isinf(value) or value < 0:
                return None
            sums[name] += value
            seen.add(name)
    if len(seen) != len(IN_FLIGHT_GAUGES):
        return None
    return sum(sums.values())


def _sample(line: str) -> tuple[str, float] | None:
    """`name{labels} value [timestamp]` -> (name, value); None for anything else."""
    end = 0
    while end < len(line) and line[end] not in "{ \t":
        end += 1
    name = line[:end]
    rest = line[end:]
    if rest.startswith("{"):
        # Skip the label set, minding quoted values: they may hold '}', spaces and \" escapes.
        i, quoted = 1, False
        while i < len(rest):
            ch = rest[i]
            if quoted and ch == "\\":
                i += 2
                continue
            if ch == '"':
                quoted = not quoted
            elif ch == "}" and not quoted:
                break
            i += 1
        else:
            return None
        rest = rest[i + 1:]
    fields = rest.split()
    if not name or not fields:
        return None
    try:
        return name, float(fields[0])
    except ValueError:
        return None


def _read(url: str, timeout: float) -> str:
    request = urllib.request.Request(url, headers={"Accept": "text/plain"})
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - fixed local URL
        body = response.read(MAX_BODY_BYTES + 1)
    if len(body) > MAX_BODY_BYTES:
        raise ValueError(f"body larger than {MAX_BODY_BYTES} bytes")
    return body.decode("utf-8")


def _say(message: str) -> None:
    print(f"vllm-drain-prestop: {message}", file=sys.stderr, flush=True)


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name, "")
    try:
        return float(value) if value else default
    except ValueError:
        _say(f"ignoring {name}={value!r}: not a number")
        return default


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Wait until vLLM has no request in flight (preStop hook).")
    # In a pod vLLM is on localhost; the simulation runs this script on the host and sets the pod IP.
    parser.add_argument("--host", default=os.environ.get("SPOTGUARD_METRICS_HOST") or "127.0.0.1")
    parser.add_argument("--port", type=int, default=int(_env_float("SPOTGUARD_METRICS_PORT", 8000)))
    parser.add_argument("--path", default=os.environ.get("SPOTGUARD_METRICS_PATH") or "/metrics")
    parser.add_argument("--max-wait", type=float, default=_env_float("SPOTGUARD_PRESTOP_MAX_WAIT", 25.0))
    parser.add_argument("--interval", type=float, default=0.5)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        # A bad flag must not fail the hook either (argparse has printed why).
        if exc.code:
            _say("bad arguments; not waiting")
        return 0

    url = f"http://{args.host}:{args.port}{args.path if args.path.startswith('/') else '/' + args.path}"
    start = time.monotonic()
    deadline = start + max(args.max_wait, 0.0)
    last_count: float | None = None
    polls = 0
    while True:
        polls += 1
        problem = ""
        # Each poll may use at most what is left of the budget, so the hook never overstays it.
        per_poll = max(min(2.0, deadline - time.monotonic()), 0.1)
        try:
            count = in_flight(_read(url, per_poll))
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, ConnectionRefusedError):
                # Nothing listens: vLLM is not (or no longer) serving, so nothing can be in flight.
                _say(f"{url} refuses connections; nothing to drain, done after {time.monotonic() - start:.1f} s")
                return 0
            count, problem = None, f"cannot read {url}: {exc.reason}"
        except (OSError, ValueError) as exc:  # timeouts, resets, bad bodies
            count, problem = None, f"cannot read {url}: {type(exc).__name__}: {exc}"
        if count is None and not problem:
            problem = f"{url} has no usable {' and '.join(IN_FLIGHT_GAUGES)}"
        if count is not None:
            if count != last_count:
                _say(f"{count:g} request(s) in flight")
            last_count = count
            if count == 0:
                _say(f"no request in flight, done after {time.monotonic() - start:.1f} s ({polls} polls)")
                return 0
        now = time.monotonic()
        if now >= deadline:
            seen = problem or f"{last_count:g} still in flight"
            _say(f"gave up after {now - start:.1f} s (--max-wait {args.max_wait:g}): {seen}")
            return 0
        time.sleep(min(args.interval, deadline - now))


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as exc:  # noqa: BLE001 - the hook must never fail the pod's shutdown
        _say(f"unexpected error, not waiting: {type(exc).__name__}: {exc}")
        sys.exit(0)

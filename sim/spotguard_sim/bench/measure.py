"""Numbers the benchmark reads off the machine (/proc, the API server's audit log) and the small
formatting helpers every part uses."""

from __future__ import annotations

import json
import os
import platform
from datetime import datetime
from pathlib import Path
from typing import Any

from spotguard.kubeapi import Obj
from spotguard_sim.bench.config import DAEMON_USER_AGENT_PREFIX
from spotguard_sim.support import quantile


def rounded(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def quantiles_ms(values: list[float | None]) -> dict[str, Any]:
    present = [v for v in values if v is not None]
    return {"p50": ms(quantile(present, 0.5)), "p99": ms(quantile(present, 0.99)),
            "max": ms(max(present)) if present else None, "n": len(present)}


def condition_status(obj: Obj, kind: str) -> str | None:
    for condition in (obj.get("status") or {}).get("conditions") or []:
        if condition.get("type") == kind:
            return condition.get("status")
    return None


def proc_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # utime and stime are fields 14 and 15 of stat (11 and 12 after the command name).
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def mem_available_mib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def machine() -> dict[str, Any]:
    """What this ran on, from /proc."""
    model, cores = None, 0
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name") and model is None:
            model = line.split(":", 1)[1].strip()
        if line.startswith("processor"):
            cores += 1
    mem_kib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal:"))
    return {"cpu_model": model, "cores": cores, "memory_gib": round(mem_kib / 1024 / 1024, 1),
            "kernel": platform.release(), "python": platform.python_version()}


def audit_requests(path: Path | None, *, start: float, end: float, errors_only: bool = False,
                    agent_prefix: str = DAEMON_USER_AGENT_PREFIX) -> list[str] | None:
    """Distinct requests (by auditID) from clients whose user agent starts with `agent_prefix`,
    received in [start, end]: "VERB URI -> code" each. None when there is no audit log."""
    if path is None:
        return None
    found: dict[str, str] = {}
    with open(path, "rb") as log:
        for line in log:
            if agent_prefix.encode() not in line:
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if not str(entry.get("userAgent", "")).startswith(agent_prefix):
                continue
            received = datetime.fromisoformat(entry["requestReceivedTimestamp"].replace("Z", "+00:00")).timestamp()
            if not start <= received <= end:
                continue
            code = (entry.get("responseStatus") or {}).get("code")
            if errors_only and (code is None or code < 400):
                continue
            found[entry["auditID"]] = f"{entry.get('verb')} {entry.get('requestURI', '')[:160]} -> {code}"
    return list(found.values())

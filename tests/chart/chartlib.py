"""Helpers for the chart tests: the rendered chart, PromQL selectors, the series that exist.

Rendering lives in spotguard_sim.chart (the simulation's Prometheus loads the same alert rules);
it is re-exported here so tests keep saying `chartlib.render(...)`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable

import yaml
from spotguard_sim import paths
from spotguard_sim.chart import (  # noqa: F401 - re-exported for the tests
    NAMESPACE,
    RELEASE,
    VAP_API,
    alert_rule_groups,
    chart,
    deep_merge,
    objects,
    only,
    render,
    render_objects,
    write_rule_file,
)

CHART_DIR = paths.chart_dir()
EXAMPLES = sorted((CHART_DIR / "examples").glob("values-*.yaml"))

# Series that an alert or panel may use although neither spotguard nor vLLM exports them.
# kube-state-metrics' node labels: SpotguardMissingOnGpuNode needs them (daemonset/README.md).
EXTERNAL_METRICS = frozenset({"kube_node_labels"})
# Labels the scrape adds to every spotguard series (PodMonitor/ServiceMonitor relabeling and
# Prometheus' own target labels), so alerts may match on them although /metrics lacks them.
TARGET_LABELS = frozenset({"node", "namespace", "pod", "instance", "job", "container", "endpoint"})


def kinds(objs: list[dict[str, Any]]) -> list[str]:
    return sorted(o["kind"] for o in objs)


def example_values(path: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(path.read_text()) or {}
    return loaded


def dashboard(values: dict[str, Any] | None = None) -> dict[str, Any]:
    merged = deep_merge({"dashboard": {"enabled": True}}, values or {})
    config_map = next(o for o in render_objects(merged)
                      if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-dashboard"))
    loaded: dict[str, Any] = json.loads(config_map["data"]["spotguard.json"])
    return loaded


def dashboard_exprs(board: dict[str, Any]) -> list[str]:
    exprs = []
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            exprs.append(target["expr"])
    return exprs


def alert_exprs(groups: list[dict[str, Any]]) -> list[str]:
    return [rule["expr"] for group in groups for rule in group["rules"]]


# --- PromQL: the metric names and label matchers an expression uses --------------------------

_KEYWORDS = frozenset({
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
    "bool", "offset", "atan2", "inf", "nan",
})
_IDENT = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


def _strip(expr: str) -> str:
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)          # string literals
    expr = re.sub(r"\[[^\]]*\]", "", expr)                     # range and subquery brackets
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    return expr


def selectors(expr: str) -> list[tuple[str, set[str]]]:
    """(metric name, label names matched on it) for every vector selector in a PromQL expression."""
    expr = expr.replace("$__rate_interval", "5m").replace("$node", ".*")
    stripped = _strip(expr)
    found: list[tuple[str, set[str]]] = []
    position = 0
    while True:
        match = _IDENT.search(stripped, position)
        if not match:
            return found
        name, end = match.group(0), match.end()
        position = end
        before = stripped[match.start() - 1] if match.start() else " "
        if before.isdigit() or before == ".":                   # part of a number like 1e3
            continue
        rest = stripped[end:].lstrip()
        if rest.startswith("(") or name.lower() in _KEYWORDS:   # function call or keyword
            continue
        labels: set[str] = set()
        if rest.startswith("{"):
            body = stripped[end:].split("{", 1)[1].split("}", 1)[0]
            labels = {m.group(1) for m in re.finditer(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!=|!~|=)", body)}
            position = stripped.index("}", end) + 1
        found.append((name, labels))


def metric_names(exprs: Iterable[str]) -> set[str]:
    return {name for expr in exprs for name, _ in selectors(expr)}


# --- What the daemon (and vLLM) actually export ------------------------------------------------

def exported_series(exposition: str) -> dict[str, set[str]]:
    """Series name -> label names, from Prometheus text exposition, including the names a
    labelled family would expose once it has children (counter _total, histogram _bucket...)."""
    from prometheus_client.parser import text_string_to_metric_families

    names: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(exposition):
        suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
                    "summary": ("", "_sum", "_count", "_created"), "gauge": ("",), "info": ("_info",)}
        for suffix in suffixes.get(family.type, ("",)):
            names.setdefault(family.name + suffix, set())
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    return names


def spotguard_series() -> dict[str, set[str]]:
    """The daemon's own /metrics, with the label names of families that have no child yet."""
    from prometheus_client.metrics import MetricWrapperBase

    from spotguard.observability import Metrics

    metrics = Metrics(provider="gce")
    series = exported_series(metrics.exposition().decode())
    # Families with per-pod labels have no sample before the first drain; their label names
    # come from the metric objects themselves.
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            base = value._name  # noqa: SLF001 - prometheus_client keeps no public accessor
            for name in series:
                if name == base or (name.startswith(base) and name[len(base):] in
                                    ("_total", "_bucket", "_sum", "_count", "_created")):
                    series[name] |= set(value._labelnames)  # noqa: SLF001
    return series


# vLLM V1 names from DESIGN.md section 4, used only if the fake vLLM cannot be imported.
_VLLM_V1_FALLBACK = {
    "vllm:num_requests_running": {"model_name", "engine"},
    "vllm:num_requests_waiting": {"model_name", "engine"},
    "vllm:kv_cache_usage_perc": {"model_name", "engine"},
    "vllm:request_success_total": {"model_name", "engine", "finished_reason"},
    "vllm:prompt_tokens_total": {"model_name", "engine"},
    "vllm:generation_tokens_total": {"model_name", "engine"},
    "vllm:time_to_first_token_seconds_bucket": {"model_name", "engine", "le"},
    "vllm:e2e_request_latency_seconds_bucket": {"model_name", "engine", "le"},
}


def vllm_series() -> dict[str, set[str]]:
    """vLLM's series as the simulation's fake vLLM exports them (vLLM's real names)."""
    try:
        from spotguard_sim import fake_vllm
    except ImportError:
        return {name: set(labels) for name, labels in _VLLM_V1_FALLBACK.items()}
    import asyncio

    import aiohttp

    async def scrape() -> str:
        server = fake_vllm.FakeVllm("127.0.0.1", 0)
        await server.start()
        try:
            async with aiohttp.ClientSession() as session:
                # One finished request so the labelled counters have children to show labels.
                async with session.post(f"{server.url}/v1/completions",
                                        json={"model": server.model, "prompt": "x", "max_tokens": 1}) as response:
                    await response.read()
                async with session.get(f"{server.url}/metrics") as response:
                    return await response.text()
        finally:
            await server.stop()

    return exported_series(asyncio.run(scrape()))


"""Render the Helm chart in daemonset/ with the real Helm engine (helm-python-sdk), offline.

Used by tests/chart/ and tests/alerts/ (and usable by anything else that needs the rendered
chart, e.g. the simulation's Prometheus loading the alert rules: `alert_rule_groups()`).
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

import helm_python as helm
import yaml
from helm_python import _native

REPO = Path(__file__).resolve().parents[2]
CHART_DIR = REPO / "daemonset"
EXAMPLES = sorted((CHART_DIR / "examples").glob("values-*.yaml"))
RELEASE = "spotguard"
NAMESPACE = "spotguard-system"
VAP_API = "admissionregistration.k8s.io/v1/ValidatingAdmissionPolicy"

# Series that an alert or panel may use although neither spotguard nor vLLM exports them.
# kube-state-metrics' node labels: SpotguardMissingOnGpuNode needs them (daemonset/README.md).
EXTERNAL_METRICS = frozenset({"kube_node_labels"})
# Labels the scrape adds to every spotguard series (PodMonitor/ServiceMonitor relabeling and
# Prometheus' own target labels), so alerts may match on them although /metrics lacks them.
TARGET_LABELS = frozenset({"node", "namespace", "pod", "instance", "job", "container", "endpoint"})


@lru_cache(maxsize=1)
def chart() -> helm.Chart:
    return helm.Chart.load(CHART_DIR)


def render(values: dict[str, Any] | None = None, *, api_versions: Iterable[str] = (),
           kube_version: str | None = None, namespace: str = NAMESPACE,
           name: str = RELEASE) -> dict[str, str]:
    """Template path -> rendered text, as `helm template` would give it.

    Chart.render() of helm-python-sdk 0.2.2 has no parameter for the capabilities, but the C ABI
    underneath takes `api_versions` and `kube_version` in its options (the equivalents of
    `helm template --api-versions --kube-version`), so they are passed through it here.
    """
    options: dict[str, Any] = {"name": name, "namespace": namespace, "is_install": True}
    if api_versions:
        options["api_versions"] = list(api_versions)
    if kube_version:
        options["kube_version"] = kube_version
    payload = _native.call_string("helm_render", chart()._raw(),
                                  None if values is None else json.dumps(values), json.dumps(options))
    rendered: dict[str, str] = json.loads(payload)
    return rendered


def objects(rendered: dict[str, str]) -> list[dict[str, Any]]:
    """Every Kubernetes object in the rendered manifests (NOTES.txt left out)."""
    found: list[dict[str, Any]] = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        for document in yaml.safe_load_all(text):
            if document:
                found.append(document)
    return found


def render_objects(values: dict[str, Any] | None = None, **kwargs: Any) -> list[dict[str, Any]]:
    return objects(render(values, **kwargs))


def only(objs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    matching = [o for o in objs if o["kind"] == kind]
    assert len(matching) == 1, f"expected one {kind}, found {len(matching)}"
    return matching[0]


def kinds(objs: list[dict[str, Any]]) -> list[str]:
    return sorted(o["kind"] for o in objs)


def example_values(path: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(path.read_text()) or {}
    return loaded


def alert_rule_groups(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The PrometheusRule's groups, i.e. the content of a plain Prometheus rule file."""
    merged = {"prometheusRule": {"enabled": True}}
    if values:
        merged = _deep_merge(merged, values)
    rule = only(render_objects(merged), "PrometheusRule")
    groups: list[dict[str, Any]] = rule["spec"]["groups"]
    return groups


def write_rule_file(path: Path, values: dict[str, Any] | None = None) -> Path:
    path.write_text(yaml.safe_dump({"groups": alert_rule_groups(values)}, sort_keys=False, width=10_000))
    return path


def dashboard(values: dict[str, Any] | None = None) -> dict[str, Any]:
    merged = _deep_merge({"dashboard": {"enabled": True}}, values or {})
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
        from spotguard.sim import fake_vllm
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


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


deep_merge = _deep_merge

"""The Helm chart in daemonset/, rendered offline with the real Helm engine (helm-python-sdk).

One place for "what does the chart produce": the chart tests (tests/chart/chartlib.py re-exports
these), the promtool rule tests (tests/alerts/) and the simulation's Prometheus
(spotguard_sim.prometheus), which loads exactly the alert rules an operator's PrometheusRule holds.

helm-python-sdk is a dependency of spotguard-sim, never of the daemon: it is imported only
when something is rendered, and its absence is reported with the command that installs it.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from spotguard_sim import paths

if TYPE_CHECKING:
    import helm_python

RELEASE = "spotguard"
NAMESPACE = "spotguard-system"
# What `helm template --api-versions` needs to render the ValidatingAdmissionPolicies.
VAP_API = "admissionregistration.k8s.io/v1/ValidatingAdmissionPolicy"


class ChartUnavailable(RuntimeError):
    """The chart or the Helm engine that renders it is not there."""


def _helm() -> Any:
    try:
        import helm_python
    except ImportError as error:
        raise ChartUnavailable("rendering the chart needs helm-python-sdk (the Helm engine): "
                               "pip install -e sim (or ./dev setup)") from error
    return helm_python


@lru_cache(maxsize=1)
def chart() -> helm_python.Chart:
    try:
        chart_dir = paths.chart_dir()
    except paths.SourceTreeNotFound as error:
        raise ChartUnavailable(f"no Helm chart: {error}") from None
    if not (chart_dir / "Chart.yaml").is_file():
        raise ChartUnavailable(f"no Helm chart at {chart_dir}: the chart ships with the source tree, "
                               "not with the installed package")
    chart_: helm_python.Chart = _helm().Chart.load(chart_dir)
    return chart_


def render(values: dict[str, Any] | None = None, *, api_versions: Iterable[str] = (),
           kube_version: str | None = None, namespace: str = NAMESPACE,
           name: str = RELEASE) -> dict[str, str]:
    """Template path -> rendered text, as `helm template` would give it.

    Chart.render() of helm-python-sdk 0.2.2 has no parameter for the capabilities, but the C ABI
    underneath takes `api_versions` and `kube_version` in its options (the equivalents of
    `helm template --api-versions --kube-version`), so they are passed through it here.
    """
    from helm_python import _native

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
    import yaml

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


def alert_rule_groups(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The PrometheusRule's groups, i.e. the content of a plain Prometheus rule file."""
    merged: dict[str, Any] = {"prometheusRule": {"enabled": True}}
    if values:
        merged = deep_merge(merged, values)
    rule = only(render_objects(merged), "PrometheusRule")
    groups: list[dict[str, Any]] = rule["spec"]["groups"]
    return groups


def write_rule_file(path: Path, values: dict[str, Any] | None = None) -> Path:
    """The chart's alert rules (rendered with `values`) as a Prometheus rule file at `path`."""
    import yaml

    path.write_text(yaml.safe_dump({"groups": alert_rule_groups(values)}, sort_keys=False, width=10_000))
    return path


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`override` on top of `base`, the way Helm merges values files (maps merge, the rest replaces)."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged

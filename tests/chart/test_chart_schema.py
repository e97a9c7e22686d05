"""values.schema.json: every value typed, unknown keys refused, errors that name the key."""

from __future__ import annotations

import json
from typing import Any, Iterator

import chartlib
import helm_python as helm
import jsonschema
import pytest
import yaml

SCHEMA = json.loads((chartlib.CHART_DIR / "values.schema.json").read_text())
DEFAULTS = yaml.safe_load((chartlib.CHART_DIR / "values.yaml").read_text())

# Kubernetes structures passed through as-is, too deep to restate in the schema (they are typed
# "object" and validated by the API server).
OPAQUE = {"/affinity/nodeAffinity", "/affinity/podAffinity", "/affinity/podAntiAffinity"}


def _resolve(node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        node = SCHEMA["definitions"][node["$ref"].rsplit("/", 1)[1]]
    return node


def _walk(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    node = _resolve(node)
    yield path, node
    for key, child in node.get("properties", {}).items():
        yield from _walk(child, f"{path}/{key}")
    if isinstance(node.get("items"), dict):
        yield from _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _walk(node["additionalProperties"], f"{path}/*")


def test_schema_is_valid_draft7_and_accepts_the_defaults_and_examples() -> None:
    jsonschema.Draft7Validator.check_schema(SCHEMA)
    jsonschema.validate(DEFAULTS, SCHEMA)
    chartlib.chart().validate_schema({})
    for example in chartlib.EXAMPLES:
        chartlib.chart().validate_schema(chartlib.example_values(example))


def test_every_level_is_closed_and_typed() -> None:
    for path, node in _walk(SCHEMA):
        assert "type" in node or "enum" in node, f"{path or '/'} has no type"
        types = node.get("type")
        if types == "object" and path not in OPAQUE:
            assert "additionalProperties" in node, f"{path or '/'} accepts unknown keys"
            assert node["additionalProperties"] is False or isinstance(node["additionalProperties"], dict)


def test_every_default_value_is_described_by_the_schema() -> None:
    def check(values: dict[str, Any], node: dict[str, Any], path: str) -> None:
        node = _resolve(node)
        for key, value in values.items():
            assert key in node.get("properties", {}) or isinstance(node.get("additionalProperties"), dict), \
                f"{path}/{key} is in values.yaml but not in the schema"
            child = node.get("properties", {}).get(key)
            if isinstance(value, dict) and child is not None and f"{path}/{key}" not in OPAQUE:
                check(value, child, f"{path}/{key}")

    check(DEFAULTS, SCHEMA, "")
    assert set(DEFAULTS) == set(SCHEMA["properties"]), "values.yaml and the schema list different keys"


BAD_VALUES = [
    # (values, words the error must contain)
    ({"port": "9101"}, ["/port", "integer"]),
    ({"dryRun": "yes"}, ["/dryRun", "boolean"]),
    ({"noticeSeconds": "soon"}, ["/noticeSeconds"]),
    ({"noticeSeconds": 0}, ["/noticeSeconds"]),
    ({"drainPollSeconds": 0}, ["/drainPollSeconds"]),
    ({"provider": "gcp"}, ["/provider"]),
    ({"logLevel": "verbose"}, ["/logLevel"]),
    ({"metadataUrl": "http://metadata/computeMetadata/v1"}, ["/metadataUrl"]),
    ({"dryrun": True}, ["dryrun", "not allowed"]),
    ({"image": {"tagg": "1"}}, ["/image", "tagg"]),
    ({"tolerations": [{"key": "x", "operater": "Exists"}]}, ["/tolerations/0", "operater"]),
    ({"nodeSelectorTerms": [{"matchExpressions": [{"key": "a", "operator": "Is"}]}]},
     ["/nodeSelectorTerms/0/matchExpressions/0/operator"]),
    ({"extraEnv": [{"name": "A", "value": 1}]}, ["/extraEnv/0/value", "string"]),
    ({"resources": {"requests": {"cpu": "lots"}}}, ["/resources/requests/cpu"]),
    ({"securityContext": {"privilegd": True}}, ["/securityContext", "privilegd"]),
    ({"validatingAdmissionPolicy": {"enabled": "yes"}}, ["/validatingAdmissionPolicy/enabled"]),
    ({"validatingAdmissionPolicy": {"validationActions": ["Block"]}}, ["/validatingAdmissionPolicy/validationActions/0"]),
    ({"podMonitor": {"interval": "15 seconds"}}, ["/podMonitor/interval"]),
    ({"prometheusRule": {"enabled": True, "evictionBlockedFor": 30}}, ["/prometheusRule/evictionBlockedFor"]),
    ({"prometheusRule": {"alertLabels": {"team": 7}}}, ["/prometheusRule/alertLabels/team", "string"]),
    ({"dashboard": {"labels": {"grafana_dashboard": 1}}}, ["/dashboard/labels/grafana_dashboard"]),
    ({"vllmPreStopHelper": {"namespaces": ["Not_A_Namespace"]}}, ["/vllmPreStopHelper/namespaces/0"]),
    ({"serviceAccount": {"create": "true"}}, ["/serviceAccount/create", "boolean"]),
    ({"affinity": {"nodeAfinity": {}}}, ["/affinity", "nodeAfinity"]),
]


@pytest.mark.parametrize("values,words", BAD_VALUES, ids=[json.dumps(v)[:60] for v, _ in BAD_VALUES])
def test_schema_rejects_bad_values_with_a_readable_error(values: dict[str, Any], words: list[str]) -> None:
    with pytest.raises(helm.HelmValuesError) as raised:
        chartlib.chart().validate_schema(values)
    message = str(raised.value)
    for word in words:
        assert word in message, message
    # One line per problem, naming the key: no Go stack, no dump of the whole values.
    assert len(message) < 400, message


def test_install_path_validates_too() -> None:
    """Rendering (what install and template do) applies the schema, not only validate_schema."""
    with pytest.raises(helm.HelmError, match="additional properties 'bogus' not allowed"):
        chartlib.render({"bogus": 1})

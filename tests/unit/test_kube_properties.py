"""Properties of the Kubernetes adapter's parsers of outside input: node annotations (anyone with
node write access can put anything there), the Eviction API's refusal bodies, pod annotations that
say where vLLM's /metrics are, and whatever bytes come back as an API response. None of them may
raise anything but what their caller handles, and what they return must be usable by the lifecycle.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from typing import Any

import yarl
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from spotguard import kube as k
from spotguard import lifecycle as lc
from spotguard.notice import Notice, NoticeKind

FUZZ = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NOW = 1_700_000_000.0
TIMING = lc.Timing()

# Annotation values are any string the API server stores (valid UTF-8: no lone surrogates).
_strings = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | _strings,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(_strings, children, max_size=3),
    max_leaves=10,
)
_times = st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30),
                      timezones=st.none() | st.timezones()).map(lambda d: d.isoformat())
_recent = st.floats(min_value=NOW - 86_400 * 365, max_value=NOW + 86_400 * 365, allow_nan=False)


@st.composite
def progress_annotations(draw: st.DrawFn) -> dict[str, str]:
    """spotguard's progress annotations, each mostly well-formed, sometimes any string or absent
    (well-formed ones must be likely: a progress is only read when every field parses)."""
    annotations = {}
    for field, key in k.PROGRESS_ANNOTATIONS.items():
        if field != "phase" and draw(st.integers(0, 9)) == 0:
            continue
        if draw(st.integers(0, 3)) == 0:
            annotations[key] = draw(_strings)
            continue
        if field == "phase":
            good = st.sampled_from([p.value for p in lc.Phase])
        elif field == "notice_kind":
            good = st.sampled_from([kind.value for kind in NoticeKind])
        elif field in ("deadline", "noticed_at", "phase_since", "drain_from"):
            good = _times
        else:
            good = st.sampled_from(["true", "false"])
        annotations[key] = draw(good)
    return annotations


def _seen(notice: Notice | None, stored: lc.Progress | None) -> lc.Seen:
    pod = lc.PodFacts(namespace="ns", name="vllm", uid="u1", serving=True, serving_condition=True,
                      not_evictable=None, terminating=False, in_flight=0)
    return lc.Seen(notice=notice, node_unschedulable=False, node_has_taint=False, pods=(pod,),
                   stored_progress=stored)


@FUZZ
@given(annotations=progress_annotations(), notice_kind=st.sampled_from(list(NoticeKind)))
def test_any_progress_annotations_give_a_progress_the_lifecycle_can_resume_or_none(
        annotations: dict[str, str], notice_kind: NoticeKind) -> None:
    node = {"metadata": {"name": "n", "annotations": annotations}}
    progress = k.progress_from_node(node)
    if progress is None:
        return
    assert isinstance(progress, lc.Progress)
    # A restarted daemon resumes from it, with the notice still up or withdrawn: both must decide.
    notice = Notice(kind=notice_kind, deadline=NOW + 30, source="test", detail="")
    lc.decide(lc.State(progress=progress), _seen(notice, progress), now=NOW, timing=TIMING)
    lc.decide(lc.State(), _seen(None, progress), now=NOW, timing=TIMING)


@FUZZ
@given(phase=st.sampled_from([p for p in lc.Phase if p is not lc.Phase.GUARDING]),
       kind=st.sampled_from(list(NoticeKind)), deadline=_recent, noticed=_recent, since=_recent,
       cordoned=st.booleans(), tainted=st.booleans(), drain_from=st.none() | _recent)
def test_progress_written_to_the_node_reads_back_equal(phase: lc.Phase, kind: NoticeKind, deadline: float,
                                                       noticed: float, since: float, cordoned: bool,
                                                       tainted: bool, drain_from: float | None) -> None:
    # The lifecycle compares what it stored with what it reads back; a difference would make it
    # rewrite the node at every step.
    progress = lc.Progress(phase=phase, notice_kind=kind.value, deadline=round(deadline, 3),
                           noticed_at=round(noticed, 3), phase_since=round(since, 3),
                           cordoned_by_us=cordoned, tainted_by_us=tainted,
                           drain_from=None if drain_from is None else round(drain_from, 3))
    patch = k.node_patch(lc.UpdateNode(progress=progress), {"metadata": {}})
    assert k.progress_from_node(patch) == progress


_causes = st.lists(st.fixed_dictionaries({}, optional={"reason": _json | st.just("DisruptionBudget"),
                                                       "message": _json | _strings.map(
                                                           lambda s: f"The disruption budget {s} needs 1")}),
                   max_size=3)
_status_bodies = st.dictionaries(_strings, _json, max_size=3) | st.fixed_dictionaries(
    {}, optional={"message": _json, "details": _json | st.fixed_dictionaries({}, optional={"causes": _json | _causes})})


@FUZZ
@given(body=_status_bodies)
def test_any_eviction_refusal_body_names_a_pdb_or_none(body: dict[str, Any]) -> None:
    named = k.blocking_pdb(body)
    assert named is None or (isinstance(named, str) and named)
    assert isinstance(k._is_pdb_refusal(body), bool)


@FUZZ
@given(ip=st.ip_addresses().map(str),
       annotations=st.fixed_dictionaries({}, optional={
           k.METRICS_PORT_ANNOTATION: _strings | st.integers(-10, 70_000).map(str),
           k.METRICS_PATH_ANNOTATION: _strings | st.just("/metrics")}))
@example(ip="127.1.0.7", annotations={k.METRICS_PORT_ANNOTATION: "²"})  # a digit to isdigit(), not to int()
def test_any_metrics_annotations_give_a_url_on_the_pod_ip_or_none(ip: str, annotations: dict[str, str]) -> None:
    pod = {"metadata": {"annotations": annotations}, "status": {"podIP": ip}}
    url = k.metrics_url(pod)
    if url is None:
        return
    parsed = yarl.URL(url)
    assert parsed.scheme == "http" and parsed.host == ip.split("%")[0]
    port = annotations.get(k.METRICS_PORT_ANNOTATION, "8000").strip()
    assert parsed.port == int(port) and 0 < parsed.port < 65536
    assert parsed.path.startswith("/")


@FUZZ
@given(annotations=st.dictionaries(st.sampled_from([k.EVICT_ANNOTATION, k.MIRROR_ANNOTATION, "other"]), _strings,
                                   max_size=3),
       grace=_json, phase=_json, deleted=st.booleans(),
       gates=st.lists(st.fixed_dictionaries({"conditionType": _strings | st.just(lc.SERVING_CONDITION)}),
                      max_size=2),
       conditions=st.lists(st.fixed_dictionaries({"type": st.just(lc.SERVING_CONDITION) | _strings,
                                                  "status": _strings | st.sampled_from(["True", "False"])}),
                           max_size=2))
def test_any_pod_gives_facts_the_lifecycle_can_use(annotations: dict[str, str], grace: Any, phase: Any,
                                                   deleted: bool, gates: list[dict[str, str]],
                                                   conditions: list[dict[str, str]]) -> None:
    metadata: dict[str, Any] = {"namespace": "ns", "name": "p", "uid": "u", "annotations": annotations}
    if deleted:
        metadata["deletionTimestamp"] = "2025-01-01T00:00:00Z"
    pod = {"metadata": metadata, "spec": {"terminationGracePeriodSeconds": grace, "readinessGates": gates},
           "status": {"phase": phase, "conditions": conditions}}
    facts = k.pod_facts(pod)
    assert isinstance(facts.termination_grace_seconds, int) and facts.termination_grace_seconds >= 0
    assert facts.serving_condition in (True, False, None)
    if str(annotations.get(k.EVICT_ANNOTATION, "")).strip().lower() == "false":
        assert facts.not_evictable is not None


class _Response:
    def __init__(self, status: int, body: bytes) -> None:
        self.status, self.reason, self._body = status, "", body

    def read(self) -> bytes:
        return self._body


class _Api:
    """Just enough of kubernetes.client.ApiClient for Kube.call, answering one canned response."""

    def __init__(self, response: _Response) -> None:
        self.response = response

    def param_serialize(self, **_: Any) -> tuple[Any, ...]:
        return "GET", "https://k8s/api/v1/nodes/n", {}, None, None  # method, url, headers, body, post

    def call_api(self, *_: Any, **__: Any) -> _Response:
        return self.response


@FUZZ
@given(status=st.sampled_from([200, 201, 404, 409, 429, 500, 503]),
       body=st.binary(max_size=64) | _json.map(lambda v: json.dumps(v).encode()))
def test_any_api_answer_is_a_json_object_or_a_kube_error(status: int, body: bytes) -> None:
    kube = k.Kube(_Api(_Response(status, body)), node_name="n")
    try:
        decoded = kube.call("GET", "/api/v1/nodes/n")
    except k.KubeError as error:
        assert status >= 400 and error.status == status and isinstance(error.body, dict)
    else:
        assert status < 400 and isinstance(decoded, dict)


def test_api_answers_that_are_not_json_objects_become_a_message() -> None:
    # A JSON list or null from a proxy raised AttributeError (on error) or reached callers that
    # index dicts (on success).
    for status in (200, 429):
        for body in (b"[]", b"null", b'"busy"', b"<html>busy</html>"):
            kube = k.Kube(_Api(_Response(status, body)), node_name="n")
            try:
                decoded = kube.call("GET", "/api/v1/nodes/n")
            except k.KubeError as error:
                assert error.status == 429 and error.body == {"message": body.decode()}
            else:
                assert decoded == {"message": body.decode()}


def test_rfc3339_bounds_are_read_not_raised() -> None:
    # The extremes a datetime can spell, with and without a zone, are values or None, never errors.
    for text in ("0001-01-01T00:00:00", "0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00",
                 (datetime(1970, 1, 1, tzinfo=timezone.utc) - timedelta(days=1)).isoformat()):
        node = {"metadata": {"annotations": {**{key: "true" for key in k.PROGRESS_ANNOTATIONS.values()},
                                             k.PROGRESS_ANNOTATIONS["phase"]: "draining",
                                             k.PROGRESS_ANNOTATIONS["deadline"]: text}}}
        progress = k.progress_from_node(node)
        assert progress is None or isinstance(progress.deadline, float)

"""What each lifecycle action does, in one place: its API call, its metric names, its dry-run
identity and its log fields.

Every function here dispatches with `match` over the `lifecycle.Action` union and ends in
`assert_never`: a new action type that one of them does not handle is a type error (mypy) and an
AssertionError the first time it runs (tests/unit/test_actions.py runs every action through every
function), never a silent default.
"""

from __future__ import annotations

import enum
from typing import Any, Mapping, assert_never

from spotguard import kube as k
from spotguard import lifecycle as lc
from spotguard import placeholder


class ActionName(enum.StrEnum):
    """The `action` label of spotguard_actions_total (one node PATCH can be several of these)."""

    CORDON = "cordon"
    TAINT = "taint"
    SAVE_PROGRESS = "save_progress"
    SET_NOT_SERVING = "set_not_serving"
    SET_SERVING = "set_serving"
    EVICT = "evict"
    CREATE_PLACEHOLDER = "create_placeholder"
    DELETE_PLACEHOLDER = "delete_placeholder"
    RELEASE = "release"
    READOPT = "readopt"
    UNCORDON = "uncordon"
    UNTAINT = "untaint"
    EXCLUDE_FROM_LB = "exclude_from_lb"
    INCLUDE_IN_LB = "include_in_lb"
    EVENT = "event"


def names(action: lc.Action) -> list[ActionName]:
    """Metric and log names of what one action does."""
    match action:
        case lc.UpdateNode():
            found = []
            if action.unschedulable is not None:
                found.append(ActionName.CORDON if action.unschedulable else ActionName.UNCORDON)
            if action.taint_value is not None:
                found.append(ActionName.TAINT)
            if action.remove_taint:
                found.append(ActionName.UNTAINT)
            if action.exclude_from_lb is not None:
                found.append(ActionName.EXCLUDE_FROM_LB if action.exclude_from_lb else ActionName.INCLUDE_IN_LB)
            if action.progress is not None or action.clear_progress:
                found.append(ActionName.SAVE_PROGRESS)
            return found
        case lc.SetServing():
            return [ActionName.SET_SERVING if action.value else ActionName.SET_NOT_SERVING]
        case lc.Evict():
            return [ActionName.EVICT]
        case lc.CreatePlaceholder():
            return [ActionName.CREATE_PLACEHOLDER]
        case lc.DeletePlaceholder():
            return [ActionName.DELETE_PLACEHOLDER]
        case lc.ReleasePod():
            return [ActionName.RELEASE]
        case lc.ReadoptPod():
            return [ActionName.READOPT]
        case lc.Report():
            return [ActionName.EVENT]
        case _:
            assert_never(action)


def dry_run_key(action: lc.Action) -> tuple[Any, ...]:
    """What an action changes, without the pod facts that vary from one step to the next: in dry-run
    mode the cluster never changes, so the level-triggered loop would ask for the same write again
    and again; each is sent (as a server-side dry run) once."""
    match action:
        case lc.UpdateNode():
            return ("node", action.unschedulable, action.taint_value, action.remove_taint, action.exclude_from_lb,
                    action.progress.phase if action.progress else None, action.clear_progress)
        case lc.SetServing():
            return ("serving", action.pod.uid, action.value)
        case lc.Evict():
            return ("evict", action.pod.uid)
        case lc.CreatePlaceholder():
            return ("placeholder", action.pod.uid)
        case lc.DeletePlaceholder():
            return ("delete-placeholder", action.placeholder.namespace, action.placeholder.name)
        case lc.ReleasePod():
            return ("release", action.pod.uid)
        case lc.ReadoptPod():
            return ("readopt", action.pod.uid)
        case lc.Report():
            return ("event", action.reason, action.pod.uid if action.pod else None)
        case _:
            assert_never(action)


def log_fields(action: lc.Action, progress: lc.Progress | None, now: float) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    if progress is not None:
        fields["seconds_to_deadline"] = round(progress.deadline - now, 1)
    match action:
        case lc.UpdateNode():
            if action.progress is not None:
                fields["phase"] = action.progress.phase.value
        case lc.SetServing():
            fields["pod"] = action.pod.key
        case lc.Evict():
            fields["pod"] = action.pod.key
            fields["grace_seconds"] = action.grace_seconds
            if action.pod.serving:
                # Why now: the pod drains itself on SIGTERM, or spotguard's drain is over.
                fields["drain"] = "in-pod" if action.pod.drains_itself else "spotguard"
        case lc.CreatePlaceholder():
            fields["pod"] = action.pod.key
        case lc.DeletePlaceholder():
            fields["placeholder"] = f"{action.placeholder.namespace}/{action.placeholder.name}"
        case lc.ReleasePod():
            fields["pod"] = action.pod.key
            fields["replicaset"] = (action.pod.release_key or "").partition("/")[0]
        case lc.ReadoptPod():
            fields["pod"] = action.pod.key
            fields["replicaset"] = (action.pod.released_from or "").partition("/")[0]
        case lc.Report():
            if action.pod is not None:
                fields["pod"] = action.pod.key
        case _:
            assert_never(action)
    return fields


# A placeholder or release the API server refuses for good (a ResourceQuota, an admission policy,
# an invalid spec): asking again would not help. Other failures (429, 5xx, timeouts) are asked again.
_REFUSALS = (400, 403, 422)


def perform(action: lc.Action, kube: k.Kube, *, node: k.Obj | None, pods: Mapping[str, k.Obj],
            surge: placeholder.Settings) -> Any:
    """The blocking API call for one action (the daemon runs it in a worker thread). `node` is the
    node as last seen (a PATCH of its taints is made against its resourceVersion); `pods` the pods
    on it by uid, as last seen (a placeholder is shaped like its pod).

    Returns, by action: UpdateNode -> the node as the API server now has it; SetServing -> None;
    Evict -> (EvictionOutcome, detail); CreatePlaceholder -> True (created), False (there already,
    or the pod is gone) or the API server's refusal as a string; ReleasePod -> True (released),
    False (the pod is gone) or the refusal as a string; ReadoptPod -> None or the refusal as a
    string; DeletePlaceholder -> None; Report -> True. Raises on failure.
    """
    match action:
        case lc.UpdateNode():
            return kube.patch_node(action, current=node)
        case lc.SetServing():
            reason = "Guarding" if action.value else "TerminationNotice"
            message = ("spotguard guards this node; no termination notice" if action.value
                       else "the node has a termination notice; stop sending new requests")
            kube.set_serving(action.pod, action.value, reason=reason, message=message)
            return None
        case lc.Evict():
            return kube.evict(action.pod, grace_seconds=action.grace_seconds)
        case lc.CreatePlaceholder():
            pod = pods.get(action.pod.uid)
            if pod is None:
                return False
            try:
                return kube.create_placeholder(placeholder.manifest(pod, node_name=kube.node_name, settings=surge))
            except k.KubeError as error:
                if error.status in _REFUSALS:
                    return str(error)[:300]
                raise
        case lc.DeletePlaceholder():
            kube.delete_placeholder(action.placeholder)
            return None
        case lc.ReleasePod():
            assert action.pod.release_key is not None
            try:
                return kube.release_pod(action.pod, action.pod.release_key)
            except k.KubeError as error:
                if error.status in _REFUSALS:
                    return str(error)[:300]
                raise
        case lc.ReadoptPod():
            assert action.pod.released_from is not None
            try:
                kube.readopt_pod(action.pod, action.pod.released_from)
            except k.KubeError as error:
                if error.status in _REFUSALS:
                    return str(error)[:300]
                raise
            return None
        case lc.Report():
            kube.record_event(action, node_uid=(node or {}).get("metadata", {}).get("uid"))
            return True
        case _:
            assert_never(action)

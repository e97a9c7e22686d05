"""Which pending pods make the autoscaler emulator add a node: the cluster autoscaler's rules."""

from __future__ import annotations

from spotguard_sim.autoscaler import is_unschedulable

UNSCHEDULABLE = {"phase": "Pending",
                 "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable"}]}


def pending(*, priority: int | None = None, nominated: str | None = None) -> dict:
    spec = {} if priority is None else {"priority": priority}
    status = dict(UNSCHEDULABLE, **({"nominatedNodeName": nominated} if nominated else {}))
    return {"metadata": {"name": "p"}, "spec": spec, "status": status}


def test_an_unschedulable_pod_needs_capacity_unless_expendable_or_already_nominated():
    assert is_unschedulable(pending())
    assert is_unschedulable(pending(priority=-1))   # spotguard's surge placeholder
    assert is_unschedulable(pending(priority=-10))  # at the cutoff: not below it
    assert not is_unschedulable(pending(priority=-11))
    # A replacement preempting a placeholder waits for that node; it must not bring another.
    assert not is_unschedulable(pending(nominated="gpu-3"))


def test_bound_deleted_or_merely_pending_pods_need_nothing():
    bound = pending()
    bound["spec"]["nodeName"] = "gpu-1"
    deleted = pending()
    deleted["metadata"]["deletionTimestamp"] = "2026-11-30T00:00:00Z"
    waiting = {"metadata": {}, "spec": {}, "status": {"phase": "Pending"}}
    assert not any(is_unschedulable(p) for p in (bound, deleted, waiting))

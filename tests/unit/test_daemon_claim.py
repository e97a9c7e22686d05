"""A notice's first node write that claims a cordon someone else made just before it: the chart's
policies refuse the claim (403), and the daemon starts the notice over from the node as it is
instead of sending the same refused write forever (spotguard.daemon.Daemon._do)."""

from __future__ import annotations

import argparse
import time
from typing import Any

from spotguard import daemon as daemon_module
from spotguard import lifecycle as lc
from spotguard.config import add_arguments, load
from spotguard.kube import KubeError
from spotguard.observability import Metrics

NOW = time.time()
CLAIM = lc.Progress(phase=lc.Phase.DEREGISTERING, notice_kind="preemption", deadline=NOW + 30, noticed_at=NOW,
                    phase_since=NOW, cordoned_by_us=True, tainted_by_us=True)
FIRST_WRITE = lc.UpdateNode(unschedulable=True, taint_value="preemption", progress=CLAIM)


class RefusingNode:
    """Stands in for spotguard.kube.Kube: every node PATCH is refused by admission; the node reads
    back as `node`."""

    def __init__(self, node: dict[str, Any]) -> None:
        self.node = node
        self.patches = 0

    def patch_node(self, update: lc.UpdateNode, *, current: Any = None) -> Any:
        self.patches += 1
        raise KubeError(403, "admission webhook denied: cordoned-by-spotguard may only be set in the write that cordons")

    def get_node(self) -> dict[str, Any]:
        return self.node


def make_daemon(kube: RefusingNode) -> daemon_module.Daemon:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = load(parser.parse_args(["--node-name", "node-a", "--provider", "gce"]), environ={})
    daemon = daemon_module.Daemon(config=config, provider=None, kube=kube,  # type: ignore[arg-type]
                                  metrics=Metrics(provider="gce"), timing=lc.Timing())
    daemon.state = lc.State(progress=CLAIM)
    return daemon


async def test_a_cordon_made_by_someone_else_first_starts_the_notice_over() -> None:
    daemon = make_daemon(RefusingNode({"metadata": {"name": "node-a"}, "spec": {"unschedulable": True}}))
    assert await daemon._do(FIRST_WRITE) is None
    assert daemon.state == lc.State()   # the next step reads the node and claims nothing


async def test_a_refusal_for_anything_else_keeps_the_notice_going() -> None:
    # Not cordoned by anyone, or cordoned and already recorded as spotguard's: the claim was not the problem.
    for node in ({"metadata": {"name": "node-a"}, "spec": {}},
                 {"metadata": {"name": "node-a", "annotations": {
                     "spotguard.io/phase": "deregistering", "spotguard.io/notice-kind": "preemption",
                     "spotguard.io/deadline": "2030-01-01T00:00:00.000Z",
                     "spotguard.io/noticed-at": "2030-01-01T00:00:00.000Z",
                     "spotguard.io/phase-since": "2030-01-01T00:00:00.000Z",
                     "spotguard.io/cordoned-by-spotguard": "true", "spotguard.io/tainted-by-spotguard": "true"}},
                  "spec": {"unschedulable": True}}):
        daemon = make_daemon(RefusingNode(node))
        assert await daemon._do(FIRST_WRITE) is None
        assert daemon.state.progress == CLAIM

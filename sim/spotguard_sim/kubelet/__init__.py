"""The simulated kubelet: one process that plays the kubelet of every Node in the local cluster.

    kubelet.py     pods: admission, status writes, the termination sequence, GKE node shutdown
    nodes.py       nodes: Lease, labels and status
    containers.py  the processes behind pods (the fake vLLM), probes, preStop hooks, SIGTERM/SIGKILL
    status.py      what the kubelet reports, computed as the real one does (pure)
    reclaim.py     the cloud's side: when a simulated VM goes
    __main__.py    `python -m spotguard_sim.kubelet` and `... reclaim NODE --in SECONDS`

Every difference from a real kubelet is listed in docs/simulation.md ("The simulated kubelet").
"""

from spotguard_sim.kubelet.containers import (
           FAKE_VLLM_ANNOTATION,
           FAKE_VLLM_ARGS_ANNOTATION,
)
from spotguard_sim.kubelet.kubelet import UNMANAGED_ANNOTATION, SimKubelet
from spotguard_sim.kubelet.reclaim import RECLAIM_ANNOTATION, reclaim
from spotguard_sim.kubelet.status import NODE_SHUTDOWN_MESSAGE, parse_time

__all__ = ["FAKE_VLLM_ANNOTATION", "FAKE_VLLM_ARGS_ANNOTATION", "NODE_SHUTDOWN_MESSAGE", "RECLAIM_ANNOTATION",
           "UNMANAGED_ANNOTATION", "SimKubelet", "parse_time", "reclaim"]

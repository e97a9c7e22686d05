"""The simulated kubelet: one process that plays the kubelet of every Node in the local cluster.

There is no container runtime here (no Docker, no containerd), so this process does what a kubelet
shows the API server, and nothing a container would need:
- Nodes (all of them, except those annotated `sim.spotguard.io/unmanaged: "true"`): Ready and the
  pressure conditions, capacity (plus `nvidia.com/gpu` from `sim.spotguard.io/gpus`), nodeInfo,
  addresses, a Lease in kube-node-lease renewed every 10 s, status re-posted on change or every 60 s.
- Pods bound to those nodes: Running with a unique pod IP in 127.0.0.0/8 (Linux routes all of it to
  loopback, so a process here can serve on it), the kubelet's conditions and containerStatuses, and
  Ready computed as the kubelet's status manager does: every container ready AND every readiness
  gate condition True, re-evaluated whenever somebody changes a condition.
- Pods annotated `sim.spotguard.io/fake-vllm: "true"` get a real process (containers.py); other
  pods only get status, as kwok would.
- Deletion runs the kubelet's termination sequence (containers.py stops the containers: preStop,
  SIGTERM, grace period, SIGKILL; then terminal status, and the object is deleted with grace 0 and
  a UID precondition).
- GKE graceful node shutdown when a simulated VM is reclaimed (`reclaim()` or `python -m
  spotguard_sim.kubelet reclaim NODE --in SECONDS`): from 30 s before the VM goes the node is
  NotReady, non-critical pods get 15 s, critical pods 15 s more; when the VM goes its processes are
  killed, its Lease stops and its Node object is deleted (as GKE's cloud node lifecycle does).

Every difference from a real kubelet is listed in docs/simulation.md ("The simulated kubelet").

What the kubelet reports is computed in status.py (pure). The API is spotguard's own plumbing
(`spotguard.kubeapi`: the client, raw calls, `ListWatch`), in one thread per watch and a small pool
for writes; all state lives in one asyncio loop. Nothing polls the API: two watches (nodes, pods)
plus the lease timer.
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Coroutine

import aiohttp
import structlog

from spotguard.backoff import backoff_delay
from spotguard.kubeapi import Api, KubeError, ListWatch
from spotguard_sim.kubelet.containers import (
    DEFAULT_VLLM_PORT,
    FAKE_VLLM_ANNOTATION,
    HOST_IP,
    METRICS_PORT_ANNOTATION,
    ContainerRunner,
    PodRun,
    Termination,
    port_free,
    send_signal,
)
from spotguard_sim.kubelet.nodes import KUBELET_VERSION, Node, NodeHeartbeat
from spotguard_sim.kubelet.reclaim import (
    RECLAIM_ANNOTATION,
    SHUTDOWN_GRACE_ANNOTATION,
    SHUTDOWN_GRACE_CRITICAL_ANNOTATION,
    SHUTDOWN_GRACE_CRITICAL_SECONDS,
    SHUTDOWN_GRACE_SECONDS,
)
from spotguard_sim.kubelet.status import (
    NODE_SHUTDOWN_MESSAGE,
    NODE_SHUTDOWN_REASON,
    NODE_SHUTDOWN_REJECT_MESSAGE,
    NODE_SHUTDOWN_REJECT_REASON,
    Container,
    IpPool,
    annotations_of,
    containers_ready_condition,
    format_time,
    is_terminal,
    now_rfc3339,
    parse_time,
    pod_phase,
    pod_ready_condition,
    pod_status_patch,
    priority,
    resource_version,
    utcnow,
)
from spotguard_sim.support import USER_AGENT

log = structlog.get_logger("spotguard_sim.kubelet")

# --- contracts (DESIGN.md section 3) -------------------------------------------------------------
UNMANAGED_ANNOTATION = "sim.spotguard.io/unmanaged"

# --- what the real components do (kubelet v1.36, GKE) --------------------------------------------
CRITICAL_PRIORITY = 2_000_000_000  # system-cluster-critical; system-node-critical is above it

_STRATEGIC_MERGE = "application/strategic-merge-patch+json"


class SimKubelet:
    """The kubelet of every managed Node; `await run(stop)` until `stop` is set, then every process
    it started is stopped (SIGTERM, SIGKILL after 5 s). API objects are left as they are, as a real
    kubelet that stops leaves them."""

    def __init__(self, api_client: Any, *, state_dir: Path, python: str = sys.executable) -> None:
        self._client = api_client
        self._api = Api(api_client, user_agent=USER_AGENT, request_timeout=15.0)
        # API writes run here, off the event loop (the client is synchronous).
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="sim-kubelet-api")
        self._state_dir = Path(state_dir).resolve()
        self._heartbeat = NodeHeartbeat(self._call)
        self._runner = ContainerRunner(state_dir=self._state_dir, python=python, on_change=self._mark_dirty,
                                       on_exited=self._pod_finished_by_itself, spawn=self._spawn,
                                       stopping=lambda: self._stopping)
        self._ips = IpPool.for_cluster(str(api_client.configuration.host))
        self._nodes: dict[str, Node] = {}
        self._pods: dict[str, dict[str, Any]] = {}  # every pod bound to a node, by uid
        self._runtimes: dict[str, PodRun] = {}  # pods this kubelet runs, by uid
        self._finished: set[str] = set()  # uids whose run is over (never start them again)
        self._deleting: set[str] = set()  # terminal pods whose object we are deleting
        self._rejected: set[str] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._watches: list[ListWatch] = []
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- running -----------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        self._loop = asyncio.get_running_loop()
        (self._state_dir / "logs" / "pods").mkdir(parents=True, exist_ok=True)
        self._runner.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True))
        # The daemon's own list-watch: nothing polls the API.
        self._watches = [
            ListWatch(self._client, "/api/v1/nodes", on_sync=self._nodes_listed, on_event=self._node_event,
                      name="sim-kubelet-nodes", timeout_seconds=300, user_agent=USER_AGENT),
            # Only pods bound to some node; the IP reservation looks at all of them.
            ListWatch(self._client, "/api/v1/pods", query={"fieldSelector": "spec.nodeName!="},
                      on_sync=self._pods_listed, on_event=self._pod_event, name="sim-kubelet-pods",
                      timeout_seconds=300, user_agent=USER_AGENT),
        ]
        for watch in self._watches:
            watch.start()
        log.info("kubelet_started", version=KUBELET_VERSION, state_dir=str(self._state_dir), pid=os.getpid(),
                 pod_network=self._ips.network)
        try:
            await stop.wait()
        finally:
            await self._shutdown()

    async def _shutdown(self) -> None:
        self._stopping = True
        log.info("kubelet_stopping", pods=len(self._runtimes))
        await asyncio.gather(*(watch.stop() for watch in self._watches))
        current = asyncio.current_task()
        for task in list(self._tasks):
            if task is not current:
                task.cancel()
        await asyncio.gather(*(t for t in list(self._tasks) if t is not current), return_exceptions=True)
        processes = [rt.process for rt in self._runtimes.values()
                     if rt.process is not None and rt.process.returncode is None]
        for process in processes:
            send_signal(process, signal.SIGTERM)
        if processes:
            await asyncio.wait([asyncio.ensure_future(p.wait()) for p in processes], timeout=5.0)
            for process in processes:
                if process.returncode is None:
                    send_signal(process, signal.SIGKILL)
            await asyncio.gather(*(p.wait() for p in processes), return_exceptions=True)
        if self._runner.http is not None:
            await self._runner.http.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
        log.info("kubelet_stopped", processes_stopped=len(processes))

    async def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        """One API request, off the loop; every failure is a KubeError (status 0: no answer)."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, functools.partial(self._api.call, method, path, **kwargs))
        except KubeError:
            raise
        except Exception as exc:  # noqa: BLE001 - connection errors from urllib3, timeouts
            raise KubeError(0, f"{type(exc).__name__}: {exc}") from exc

    def _spawn(self, coro: Coroutine[Any, Any, Any], *, name: str, owner: set[asyncio.Task[Any]] | None = None
               ) -> asyncio.Task[Any]:
        """A background task that is tracked (cancelled at shutdown) and whose crash is logged."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        if owner is not None:
            owner.add(task)

        def finished(t: asyncio.Task[Any]) -> None:
            self._tasks.discard(t)
            if owner is not None:
                owner.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.error("task_crashed", task=t.get_name(), error=repr(t.exception()),
                          exc_info=t.exception())

        task.add_done_callback(finished)
        return task

    # --- nodes: events -----------------------------------------------------------------------------

    def _nodes_listed(self, items: list[dict[str, Any]]) -> None:
        seen = set()
        for obj in items:
            seen.add(obj["metadata"]["name"])
            self._node_event("MODIFIED", obj)
        for name in list(self._nodes):
            if name not in seen:
                self._node_gone(name, why="node deleted")

    def _node_event(self, kind: str, obj: dict[str, Any]) -> None:
        if self._stopping:
            return
        name, uid = obj["metadata"]["name"], obj["metadata"]["uid"]
        if kind == "DELETED":
            node = self._nodes.get(name)
            if node is not None and node.uid == uid:
                self._node_gone(name, why="node deleted")
            return
        node = self._nodes.get(name)
        if node is not None and node.uid != uid:
            self._node_gone(name, why="node replaced")  # same name, new object: a new VM
            node = None
        if annotations_of(obj).get(UNMANAGED_ANNOTATION) == "true":
            if node is not None:
                self._node_gone(name, why="node marked unmanaged")
            return
        if node is None:
            if obj["metadata"].get("deletionTimestamp"):
                return
            node = Node(name=name, uid=uid, obj=obj)
            self._nodes[name] = node
            node.loop_task = self._spawn(self._heartbeat.run(node), name=f"node {name}")
            log.info("node_managed", node=name)
            for pod in list(self._pods.values()):
                if (pod.get("spec") or {}).get("nodeName") == name:
                    self._pod_changed(pod)
        elif resource_version(obj) < resource_version(node.obj):
            return  # older than what a write of ours already returned
        node.obj = obj
        node.wake.set()
        self._schedule_reclaim(node)

    def _node_gone(self, name: str, *, why: str) -> None:
        """The VM behind the node is gone (or no longer ours): its processes die with it."""
        node = self._nodes.pop(name, None)
        if node is None:
            return
        node.gone = True
        log.info("node_forgotten", node=name, reason=why, pods=len(node.pods))
        current = asyncio.current_task()
        for task in (node.loop_task, node.reclaim_task):
            if task is not None and task is not current:
                task.cancel()
        for uid in list(node.pods):
            rt = self._runtimes.get(uid)
            if rt is not None:
                self._kill_now(rt)

    def _schedule_reclaim(self, node: Node) -> None:
        text = annotations_of(node.obj).get(RECLAIM_ANNOTATION)
        try:
            at = parse_time(text) if text else None
        except ValueError:
            log.warning("reclaim_annotation_invalid", node=node.name, value=text)
            at = None
        if at == node.reclaim_at:
            return
        if node.shutting_down:
            # Like a real VM: once the OS is shutting down there is no way back.
            log.warning("reclaim_change_ignored", node=node.name, value=text, reason="shutdown already began")
            return
        if node.reclaim_task is not None:
            node.reclaim_task.cancel()
            node.reclaim_task = None
        node.reclaim_at = at
        if at is not None:
            log.info("reclaim_scheduled", node=node.name, at=format_time(at),
                     in_seconds=round((at - utcnow()).total_seconds(), 1))
            node.reclaim_task = self._spawn(self._reclaim(node, at, *_shutdown_grace(node.obj)),
                                            name=f"reclaim {node.name}")
        else:
            log.info("reclaim_cancelled", node=node.name)

    # --- node shutdown (GKE) ---------------------------------------------------------------------

    async def _reclaim(self, node: Node, at: datetime, grace: float, critical: float) -> None:
        loop = asyncio.get_running_loop()
        gone_at = loop.time() + (at - utcnow()).total_seconds()
        begin = gone_at - grace
        if begin > loop.time():
            await asyncio.sleep(begin - loop.time())
        shutdown = None
        if gone_at > loop.time():
            shutdown = self._spawn(self._graceful_shutdown(node, grace, critical), name=f"shutdown {node.name}")
            await asyncio.sleep(gone_at - loop.time())
        if shutdown is not None and not shutdown.done():
            shutdown.cancel()
        await self._vm_gone(node)

    async def _graceful_shutdown(self, node: Node, grace: float, critical: float) -> None:
        """What the kubelet's shutdown manager does with shutdownGracePeriod `grace` and
        shutdownGracePeriodCriticalPods `critical` (GKE: 30 s and 15 s): pods by priority group,
        each group given its share."""
        node.shutting_down = True
        node.wake.set()
        log.info("node_shutdown_begin", node=node.name)
        groups = (("non-critical", lambda p: p < CRITICAL_PRIORITY, grace - critical),
                  ("critical", lambda p: p >= CRITICAL_PRIORITY, critical))
        for label, member, group_grace in groups:
            pods = [self._runtimes[uid] for uid in node.pods
                    if uid in self._runtimes and not self._runtimes[uid].terminal
                    and member(priority(self._runtimes[uid].pod))]
            if not pods:
                continue
            terminations = []
            for rt in pods:
                grace = group_grace
                # The pod's own grace period when shorter (nodeshutdown_manager.go killPods).
                own = rt.spec.get("terminationGracePeriodSeconds")
                if own is not None and own <= grace:
                    grace = float(own)
                terminations.append(self._begin_termination(rt, grace=grace, shutdown=True))
            log.info("node_shutdown_group", node=node.name, group=label, pods=[rt.key for rt in pods],
                     grace=group_grace)
            waiters = [asyncio.ensure_future(t.done.wait()) for t in terminations]
            _, pending = await asyncio.wait(waiters, timeout=group_grace)
            for waiter in pending:
                waiter.cancel()
        log.info("node_shutdown_pods_done", node=node.name)

    async def _vm_gone(self, node: Node) -> None:
        log.info("node_vm_gone", node=node.name, pods=len(node.pods))
        self._node_gone(node.name, why="VM reclaimed")
        # GKE's cloud node lifecycle controller deletes the Node of a VM that no longer exists;
        # the pod GC controller then deletes its pods and their controllers replace them.
        body = {"kind": "DeleteOptions", "apiVersion": "v1", "preconditions": {"uid": node.uid}}
        attempt = 0
        while not self._stopping:
            try:
                await self._call("DELETE", f"/api/v1/nodes/{node.name}", body=body)
                log.info("node_deleted", node=node.name)
                return
            except KubeError as exc:
                if exc.status in (404, 409):
                    return
                delay = backoff_delay(attempt, base=0.5, cap=10.0)
                attempt += 1
                log.warning("node_delete_failed", node=node.name, error=str(exc), retry_in=round(delay, 2))
                await asyncio.sleep(delay)

    # --- pods: events ------------------------------------------------------------------------------

    def _pods_listed(self, items: list[dict[str, Any]]) -> None:
        # IPs first: a restarted kubelet must know every address in use before it hands out one.
        for obj in items:
            self._reserve_ip(obj)
        seen = set()
        for obj in items:
            seen.add(obj["metadata"]["uid"])
            self._pod_event("MODIFIED", obj)
        for uid in list(self._pods):
            if uid not in seen:
                self._pod_event("DELETED", self._pods[uid])

    def _reserve_ip(self, obj: dict[str, Any]) -> None:
        uid = obj["metadata"]["uid"]
        ip = (obj.get("status") or {}).get("podIP")
        if not ip or ip not in self._ips:
            return
        if is_terminal(obj):
            if uid not in self._runtimes:
                self._ips.release(uid)
            return
        if not self._ips.reserve(ip, uid):
            log.warning("pod_ip_conflict", pod=_key(obj), ip=ip, held_by=self._ips.holder(ip))

    def _pod_event(self, kind: str, obj: dict[str, Any]) -> None:
        if self._stopping:
            return
        uid = obj["metadata"]["uid"]
        if kind == "DELETED":
            self._pods.pop(uid, None)
            self._finished.discard(uid)
            self._deleting.discard(uid)
            self._rejected.discard(uid)
            rt = self._runtimes.get(uid)
            if rt is None:
                self._ips.release(uid)
                return
            rt.gone = True
            if not rt.terminal:
                # Deleted without us (force delete, or pod GC): the kubelet still stops it, with
                # the shortest grace it has (1 s, and SIGTERM still gets its 2 s).
                log.info("pod_deleted_while_running", pod=rt.key)
                self._begin_termination(rt, grace=1.0, force=True)
            return
        cached = self._pods.get(uid)
        if cached is not None and resource_version(obj) <= resource_version(cached):
            return  # a write of ours already told us this (or newer)
        self._pods[uid] = obj
        self._reserve_ip(obj)
        self._pod_changed(obj)

    def _pod_changed(self, obj: dict[str, Any]) -> None:
        uid = obj["metadata"]["uid"]
        node = self._nodes.get((obj.get("spec") or {}).get("nodeName") or "")
        if node is None or node.gone:
            return
        rt = self._runtimes.get(uid)
        if rt is None:
            if is_terminal(obj):
                if obj["metadata"].get("deletionTimestamp") and uid not in self._deleting:
                    # A finished pod being deleted: the kubelet removes the object.
                    self._deleting.add(uid)
                    self._spawn(self._delete_pod_object(obj), name=f"delete {_key(obj)}")
                return
            if uid in self._finished:
                return
            self._admit(obj, node)
            return
        rt.pod = obj
        if obj["metadata"].get("deletionTimestamp") and not rt.terminal:
            grace = float(obj["metadata"].get("deletionGracePeriodSeconds") or 0)
            self._begin_termination(rt, grace=max(grace, 1.0))
        self._mark_dirty(rt)

    def _admit(self, obj: dict[str, Any], node: Node) -> None:
        meta, spec, status = obj["metadata"], obj.get("spec") or {}, obj.get("status") or {}
        uid = meta["uid"]
        if node.shutting_down:
            if uid not in self._rejected:
                self._rejected.add(uid)
                log.info("pod_rejected", pod=_key(obj), node=node.name, reason=NODE_SHUTDOWN_REJECT_REASON)
                self._spawn(self._reject(obj), name=f"reject {_key(obj)}")
            return
        never_started = bool(meta.get("deletionTimestamp")) and not status.get("podIP")
        ip: str | None
        if spec.get("hostNetwork"):
            ip = HOST_IP
        elif never_started:
            ip = None
        else:
            have = status.get("podIP")
            if have and have in self._ips and self._ips.reserve(have, uid):
                ip = have  # recovered after a kubelet restart
            else:
                ip = self._allocate_ip(uid, obj)
        previous = {s.get("name"): s for s in (status.get("containerStatuses") or [])
                    + (status.get("initContainerStatuses") or [])}
        containers = []
        for c in spec.get("initContainers") or []:
            containers.append(Container(name=c["name"], image=c.get("image", ""),
                                         kind="sidecar" if c.get("restartPolicy") == "Always" else "init"))
        for c in spec.get("containers") or []:
            containers.append(Container(name=c["name"], image=c.get("image", ""), kind="regular"))
        annotations = annotations_of(obj)
        fake = annotations.get(FAKE_VLLM_ANNOTATION) == "true"
        try:
            port = int(annotations.get(METRICS_PORT_ANNOTATION) or DEFAULT_VLLM_PORT)
        except ValueError:
            log.warning("metrics_port_invalid", pod=_key(obj), value=annotations.get(METRICS_PORT_ANNOTATION))
            port = DEFAULT_VLLM_PORT
        rt = PodRun(uid=uid, namespace=meta["namespace"], name=meta["name"], node=node.name, pod=obj, ip=ip,
                  start_time=status.get("startTime") or now_rfc3339(), containers=containers, fake_vllm=fake, port=port)
        self._runtimes[uid] = rt
        node.pods.add(uid)
        vllm = rt.vllm_container
        for c in containers:
            before = previous.get(c.name) or {}
            c.restart_count = int(before.get("restartCount") or 0)
            if never_started:
                continue
            if c.kind == "init":
                c.run()
                c.terminate(0)
                c.ready = True  # a completed init container reports ready (prober_manager.go)
            elif c is vllm:
                if (before.get("state") or {}).get("running") or (before.get("state") or {}).get("terminated"):
                    c.restart_count += 1  # it ran under a previous kubelet; that process is gone
            else:
                c.run()
                c.ready = True
                if (before.get("state") or {}).get("running"):
                    c.started_at = before["state"]["running"].get("startedAt") or c.started_at
        log.info("pod_admitted", pod=rt.key, node=node.name, ip=ip, fake_vllm=fake,
                 recovered=bool(status.get("podIP")))
        if never_started:
            rt.sandbox = False
            self._begin_termination(rt, grace=1.0)
            return
        if fake and vllm is not None and not meta.get("deletionTimestamp"):
            self._spawn(self._runner.supervise(rt), name=f"vllm {rt.key}", owner=rt.tasks)
            self._spawn(self._runner.probe(rt), name=f"probe {rt.key}", owner=rt.tasks)
        elif vllm is not None:
            vllm.run()  # a recovered pod that is already terminating: nothing left to start
            vllm.ready = True
        self._mark_dirty(rt)
        if meta.get("deletionTimestamp"):
            grace = float(meta.get("deletionGracePeriodSeconds") or 0)
            self._begin_termination(rt, grace=max(grace, 1.0))

    def _allocate_ip(self, uid: str, obj: dict[str, Any]) -> str:
        ip = self._ips.allocate(uid)
        if annotations_of(obj).get(FAKE_VLLM_ANNOTATION) != "true":
            return ip
        try:
            port = int(annotations_of(obj).get(METRICS_PORT_ANNOTATION) or DEFAULT_VLLM_PORT)
        except ValueError:
            return ip
        # Another cluster on this machine may serve on the same address: skip what is taken.
        for _ in range(64):
            if port_free(ip, port):
                return ip
            log.warning("pod_ip_port_taken", pod=_key(obj), ip=ip, port=port)
            self._ips.release(uid)
            ip = self._ips.allocate(uid)
        return ip

    async def _reject(self, obj: dict[str, Any]) -> None:
        body = {"status": {"phase": "Failed", "reason": NODE_SHUTDOWN_REJECT_REASON,
                           "message": NODE_SHUTDOWN_REJECT_MESSAGE}}
        await self._retry(f"reject {_key(obj)}", lambda: self._call(
            "PATCH", f"/api/v1/namespaces/{obj['metadata']['namespace']}/pods/{obj['metadata']['name']}/status",
            body=body, content_type=_STRATEGIC_MERGE))

    # --- pods: status ------------------------------------------------------------------------------

    def _desired_pod_status(self, rt: PodRun) -> dict[str, Any]:
        spec = rt.spec
        current = (rt.pod.get("status") or {})
        termination = rt.termination
        phase = pod_phase(spec, rt.containers, terminal=rt.terminal)
        # Node shutdown: DisruptionTarget always; reason/message only when the pod ends Failed.
        # A pod whose containers all exited 0 ends Succeeded, as upstream's kubelet reports it
        # since 1.27 (the phase comes from the exit codes: kubernetes#118310).
        shutdown = termination is not None and termination.shutdown and rt.terminal
        containers_ready = containers_ready_condition(spec, [c for c in rt.containers if c.kind != "init"], phase)
        init_done = all(c.state == "terminated" and c.exit_code == 0 for c in rt.containers if c.kind == "init")
        initialized: dict[str, Any] = {"type": "Initialized", "status": "True" if init_done else "False"}
        if phase == "Succeeded":
            initialized["reason"] = "PodCompleted"
        elif not init_done:
            initialized["reason"] = "ContainersNotInitialized"
        conditions = [
            {"type": "PodReadyToStartContainers", "status": "True" if rt.sandbox else "False"},
            initialized,
            pod_ready_condition(spec, current.get("conditions") or [], containers_ready),
            containers_ready,
            {"type": "PodScheduled", "status": "True"},
        ]
        if shutdown:
            conditions.append({"type": "DisruptionTarget", "status": "True", "reason": "TerminationByKubelet",
                               "message": NODE_SHUTDOWN_MESSAGE})
        status: dict[str, Any] = {
            "phase": phase, "conditions": conditions, "hostIP": HOST_IP, "hostIPs": [{"ip": HOST_IP}],
            "startTime": rt.start_time,
            "containerStatuses": [c.api_status() for c in rt.containers if c.kind == "regular"],
        }
        inits = [c.api_status() for c in rt.containers if c.kind != "regular"]
        if inits:
            status["initContainerStatuses"] = inits
        if rt.ip:
            status["podIP"], status["podIPs"] = rt.ip, [{"ip": rt.ip}]
        if shutdown and phase == "Failed":
            status["reason"], status["message"] = NODE_SHUTDOWN_REASON, NODE_SHUTDOWN_MESSAGE
        return status

    def _mark_dirty(self, rt: PodRun) -> None:
        """Status may have changed: write it (once; coalesced with other changes in flight)."""
        rt.dirty = True
        if (rt.writer is None or rt.writer.done()) and not rt.gone and not self._stopping:
            rt.writer = self._spawn(self._write_status(rt), name=f"status {rt.key}")

    async def _write_status(self, rt: PodRun) -> None:
        attempt = 0
        while rt.dirty and not rt.gone and not self._stopping:
            rt.dirty = False
            patch = pod_status_patch(rt.pod.get("status") or {}, self._desired_pod_status(rt), now_rfc3339())
            if patch is None:
                continue
            try:
                obj = await self._call(
                    "PATCH", f"/api/v1/namespaces/{rt.namespace}/pods/{rt.name}/status",
                    body={"metadata": {"uid": rt.uid}, "status": patch}, content_type=_STRATEGIC_MERGE)
            except KubeError as exc:
                if exc.status in (404, 409):
                    return  # gone (or replaced by a pod of the same name): the watch tells the rest
                rt.dirty = True
                delay = backoff_delay(attempt, base=0.5, cap=10.0)
                attempt += 1
                log.warning("pod_status_write_failed", pod=rt.key, error=str(exc), retry_in=round(delay, 2))
                await asyncio.sleep(delay)
                continue
            attempt = 0
            log.debug("pod_status_written", pod=rt.key, fields=sorted(patch))
            if resource_version(obj) > resource_version(self._pods.get(rt.uid)) and not rt.gone:
                self._pods[rt.uid] = obj
                rt.pod = obj

    async def _status_synced(self, rt: PodRun) -> None:
        """Return once what `rt` says now is on the API server (or the pod is gone)."""
        self._mark_dirty(rt)
        while rt.writer is not None and not rt.writer.done():
            writer = rt.writer
            try:
                await asyncio.shield(writer)
            except Exception:  # noqa: BLE001 - already logged by _spawn; never block the kill on it
                return
            if rt.dirty and not rt.gone and not self._stopping:
                self._mark_dirty(rt)

    async def _pod_finished_by_itself(self, rt: PodRun) -> None:
        """restartPolicy Never/OnFailure and every container done: terminal, sandbox torn down."""
        rt.terminal, rt.sandbox = True, False
        await self._status_synced(rt)
        self._drop(rt)

    # --- termination -------------------------------------------------------------------------------

    def _begin_termination(self, rt: PodRun, *, grace: float, shutdown: bool = False, force: bool = False
                           ) -> Termination:
        """Start the kubelet's kill sequence, or shorten one already running (a grace period only
        ever decreases, as in pod_workers' calculateEffectiveGracePeriod)."""
        loop = asyncio.get_running_loop()
        termination = rt.termination
        if termination is None:
            termination = Termination(deadline=loop.time() + grace, shutdown=shutdown, force=force)
            rt.termination = termination
            log.info("pod_terminating", pod=rt.key, grace=grace, reason="node shutdown" if shutdown else
                     ("deleted from the API" if force else "deletion"))
            termination.task = self._spawn(self._terminate(rt, termination), name=f"terminate {rt.key}")
        else:
            if loop.time() + grace < termination.deadline:
                termination.deadline = loop.time() + grace
                log.info("pod_grace_shortened", pod=rt.key, grace=grace)
            termination.shutdown |= shutdown
            termination.force |= force
        return termination

    async def _terminate(self, rt: PodRun, termination: Termination) -> None:
        try:
            await asyncio.gather(*(self._runner.stop_container(rt, termination, c)
                                   for c in rt.containers if c.kind != "init"))
            for hook in list(rt.hooks):  # a hook still running dies with its container
                hook.cancel()
            rt.terminal, rt.sandbox = True, False
            log.info("pod_containers_stopped", pod=rt.key,
                     exit_codes={c.name: c.exit_code for c in rt.containers if c.kind != "init"})
            if not rt.gone and not termination.force:
                await self._status_synced(rt)
                if not rt.gone and (self._pods.get(rt.uid) or rt.pod)["metadata"].get("deletionTimestamp"):
                    await self._delete_pod_object(rt.pod)
            self._drop(rt)
        finally:
            termination.done.set()

    async def _delete_pod_object(self, obj: dict[str, Any]) -> None:
        """What the kubelet's status manager does once a deleted pod is terminal: delete it for good
        (grace 0, only this incarnation: UID precondition)."""
        meta = obj["metadata"]
        body = {"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": 0,
                "preconditions": {"uid": meta["uid"]}}
        try:
            await self._retry(f"delete {_key(obj)}", lambda: self._call(
                "DELETE", f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}", body=body),
                done_statuses=(404, 409))
            log.info("pod_object_deleted", pod=_key(obj))
        finally:
            self._deleting.discard(meta["uid"])

    # --- ending a pod's run ------------------------------------------------------------------------

    def _kill_now(self, rt: PodRun) -> None:
        """The VM is gone: SIGKILL, no grace, nothing written."""
        current = asyncio.current_task()
        for task in list(rt.tasks) + list(rt.hooks) + [t for t in (rt.writer,) if t is not None]:
            if task is not current:
                task.cancel()
        if rt.termination is not None and rt.termination.task is not None and rt.termination.task is not current:
            rt.termination.task.cancel()
            rt.termination.done.set()
        if rt.process is not None and rt.process.returncode is None:
            send_signal(rt.process, signal.SIGKILL)
            log.info("container_sigkill", pod=rt.key, pid=rt.process.pid, reason="VM gone")
        rt.terminal = True
        # Not marked finished: if a VM of the same name comes back, the pods still bound to it
        # (and not terminal) would be started again, as a fresh kubelet would.
        self._drop(rt, finished=False)

    def _drop(self, rt: PodRun, *, finished: bool = True) -> None:
        """Forget a pod whose run is over; its IP is free once no live pod object holds it."""
        if self._runtimes.get(rt.uid) is not rt:
            return
        del self._runtimes[rt.uid]
        node = self._nodes.get(rt.node)
        if node is not None:
            node.pods.discard(rt.uid)
        current = asyncio.current_task()
        for task in list(rt.tasks):
            if task is not current:
                task.cancel()
        if finished:
            self._finished.add(rt.uid)
        cached = self._pods.get(rt.uid)
        if cached is None or is_terminal(cached):
            self._ips.release(rt.uid)

    async def _retry(self, what: str, call: Callable[[], Coroutine[Any, Any, Any]], *,
                     done_statuses: tuple[int, ...] = (404,)) -> None:
        attempt = 0
        while not self._stopping:
            try:
                await call()
                return
            except KubeError as exc:
                if exc.status in done_statuses:
                    return
                delay = backoff_delay(attempt, base=0.5, cap=10.0)
                attempt += 1
                log.warning("api_call_failed", what=what, error=str(exc), retry_in=round(delay, 2))
                await asyncio.sleep(delay)


def _key(obj: dict[str, Any]) -> str:
    return f"{obj['metadata'].get('namespace', '')}/{obj['metadata']['name']}"


def _shutdown_grace(node: dict[str, Any]) -> tuple[float, float]:
    """(shutdownGracePeriod, shutdownGracePeriodCriticalPods) for this VM's end, from its Node."""
    annotations = annotations_of(node)
    try:
        grace = float(annotations.get(SHUTDOWN_GRACE_ANNOTATION, SHUTDOWN_GRACE_SECONDS))
        critical = float(annotations.get(SHUTDOWN_GRACE_CRITICAL_ANNOTATION, SHUTDOWN_GRACE_CRITICAL_SECONDS))
    except ValueError:
        return SHUTDOWN_GRACE_SECONDS, SHUTDOWN_GRACE_CRITICAL_SECONDS
    if not 0 <= critical <= grace:
        return SHUTDOWN_GRACE_SECONDS, SHUTDOWN_GRACE_CRITICAL_SECONDS
    return grace, critical

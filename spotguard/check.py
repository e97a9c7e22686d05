"""`spotguard check`: is this node protected? Answered before an incident, not during one.

Prints one line per check (OK / WARN / FAIL with the reason) and exits 1 when any check fails.
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass
from typing import Callable, TextIO

import aiohttp

from spotguard import kube as k
from spotguard import kubeapi
from spotguard import evictions as ev
from spotguard import lifecycle as lc
from spotguard import handover, placeholder, providers, vllm
from spotguard.config import Config

# (verb, resource, group, subresource): every call the daemon makes.
REQUIRED_ACCESS = (
    ("get", "nodes", "", ""),
    ("list", "nodes", "", ""),
    ("watch", "nodes", "", ""),
    ("patch", "nodes", "", ""),
    ("list", "pods", "", ""),
    ("watch", "pods", "", ""),
    ("get", "pods", "", ""),
    ("patch", "pods", "", "status"),
    ("create", "pods", "", "eviction"),
    ("create", "events", "", ""),
    ("list", "endpointslices", "discovery.k8s.io", ""),
    ("list", "poddisruptionbudgets", "policy", ""),
)
# daemonset/files/vllm-drain-prestop.py's --max-wait when its command gives none.
PRESTOP_HELPER_DEFAULT_WAIT = 25.0
# With the surge on: its placeholders, and Deployment pods handed over to their replacements.
SURGE_ACCESS = (("create", "pods", "", ""), ("delete", "pods", "", ""), ("patch", "pods", "", ""),
                ("get", "replicasets", "apps", ""))


@dataclass(frozen=True)
class Finding:
    level: str  # OK, WARN, FAIL
    text: str


async def run_check(config: Config, *, out: TextIO = sys.stdout,
                    client_factory: Callable[[], object] | None = None) -> int:
    findings: list[Finding] = []

    def say(level: str, text: str) -> None:
        findings.append(Finding(level, text))
        print(f"{level:<4} {text}", file=out, flush=True)

    cloud = await _check_provider(config, say)
    try:
        api = k.Kube((client_factory or kubeapi.new_client)(), node_name=config.node_name)
    except Exception as error:  # noqa: BLE001 - report, don't crash
        say("FAIL", f"Kubernetes credentials: {error}")
        return 1
    await asyncio.to_thread(_check_node_and_access, api, config, say)
    try:
        pods: list[k.Obj] | None = (await asyncio.to_thread(api.list_pods))[0]
    except Exception as error:  # noqa: BLE001
        say("FAIL", f"pods on the node: {error}")
        pods = None
    await asyncio.to_thread(_check_admission, api, config, pods or [], say)
    if pods is not None:
        await _check_pods(pods, say, cloud=cloud)
    failed = [f for f in findings if f.level == "FAIL"]
    print(f"{'NOT PROTECTED' if failed else 'PROTECTED'}: {len(failed)} failed, "
          f"{sum(f.level == 'WARN' for f in findings)} warnings", file=out)
    return 1 if failed else 0


async def _check_provider(config: Config, say: Callable[[str, str], None]) -> str | None:
    """Whether the metadata server answers; the cloud's name ("gce", "aws", "azure") when it does."""
    try:
        provider = await providers.detect(config)
        await provider.probe()
    except providers.ProviderUnreachable as error:
        say("FAIL", f"metadata: {error}")
        return None
    say("OK", f"metadata: {provider.name} metadata server answers"
              f"{' at ' + config.metadata_url if config.metadata_url else ''}")
    return provider.name


def _check_node_and_access(api: k.Kube, config: Config, say: Callable[[str, str], None]) -> None:
    try:
        node = api.get_node()
    except k.KubeError as error:
        say("FAIL", f"node {config.node_name}: {error}")
        return
    except Exception as error:  # noqa: BLE001
        say("FAIL", f"Kubernetes API: {error}")
        return
    say("OK", f"node {config.node_name} found")
    progress = k.progress_from_node(node)
    if progress is not None:
        say("WARN", f"node is in the middle of a drain (phase {progress.phase.value}, {progress.notice_kind})")
    for verb, resource, group, subresource in REQUIRED_ACCESS + (SURGE_ACCESS if config.surge_min_notice_seconds else ()):
        what = f"{verb} {resource}{'/' + subresource if subresource else ''}"
        try:
            allowed, reason = api.can_i(verb=verb, resource=resource, group=group, subresource=subresource)
        except Exception as error:  # noqa: BLE001
            say("FAIL", f"RBAC {what}: cannot ask ({error})")
            continue
        if allowed:
            say("OK", f"RBAC {what}")
        else:
            say("FAIL", f"RBAC {what}: denied{' (' + reason + ')' if reason else ''}")


def _check_admission(api: k.Kube, config: Config, pods: list[k.Obj], say: Callable[[str, str], None]) -> None:
    """RBAC says what the ServiceAccount may do; admission policies can still refuse it (the chart's
    refuse every write by a token without a node-name claim, and any change spotguard does not
    make). So the writes a notice needs are sent as the daemon sends them, through the same adapter,
    as server-side dry runs: the API server runs every admission policy, answers PDBs, and stores
    nothing. Each verdict is reported, with the policy's own message when it refuses."""
    dry = k.Kube(api.client, node_name=config.node_name, dry_run=True)
    try:
        node = api.get_node()
    except Exception as error:  # noqa: BLE001 - report, don't crash
        say("FAIL", f"admission: not tried, node {config.node_name} not readable: {str(error)[:200]}")
        return
    now = time.time()
    # What a notice's first write would be on this node as it is now: a cordon or label already
    # there is not spotguard's (and the chart's policies refuse claiming it).
    cordon = not k.node_unschedulable(node)
    exclude = config.exclude_from_load_balancers and not k.node_excluded_from_lb(node)
    progress = lc.Progress(phase=lc.Phase.DEREGISTERING, notice_kind="preemption", deadline=now + 30,
                           noticed_at=now, phase_since=now, cordoned_by_us=cordon, tainted_by_us=True,
                           excluded_by_us=exclude)
    label = ", label out of external load balancers" if exclude else ""
    _verdict(say, f"{'cordon, ' if cordon else ''}taint{label} and annotate node {config.node_name}",
             lambda: dry.patch_node(lc.UpdateNode(unschedulable=True if cordon else None, taint_value="preemption",
                                                  exclude_from_lb=True if exclude else None, progress=progress),
                                    current=node))
    serving = [pod for pod in pods if k.is_serving_pod(pod)]
    _check_surge(dry, config, serving, say)
    if not serving:
        return
    pod = k.pod_facts(serving[0])
    _verdict(say, f"set {lc.SERVING_CONDITION}=False on {pod.key}",
             lambda: dry.set_serving(pod, False, reason="TerminationNotice", message="spotguard check (dry run)"))
    node_uid = (node.get("metadata") or {}).get("uid")
    _verdict(say, f"record an Event about {pod.key}",
             lambda: dry.record_event(lc.Report(lc.Reason.NOT_SERVING, "spotguard check (dry run)", pod=pod),
                                      node_uid=node_uid))
    outcome, detail = dry.evict(pod, grace_seconds=30)
    if outcome in (ev.EvictionOutcome.EVICTED, ev.EvictionOutcome.GONE):
        say("OK", f"admission: may evict {pod.key} (dry run)")
    elif outcome in (ev.EvictionOutcome.BLOCKED_BY_PDB, ev.EvictionOutcome.MULTIPLE_PDBS):
        say("OK", f"admission: may evict {pod.key} (dry run); PodDisruptionBudget {detail} blocks it right now")
    else:
        say("FAIL", f"admission: evicting {pod.key} refused: {detail}")


def _check_surge(dry: k.Kube, config: Config, serving: list[k.Obj], say: Callable[[str, str], None]) -> None:
    """Whether a long notice would surge here: on or off; the release of the first opted-in
    Deployment pod and the placeholder of the first other one (and, standing by on rebalance
    recommendations, of that Deployment pod too) sent as dry runs (the API server checks the
    chart's policies, the PriorityClass and quotas)."""
    if not config.surge_min_notice_seconds:
        say("OK", "surge: off (--surge-min-notice-seconds 0): long notices drain without bringing capacity first")
        return
    surging = [pod for pod in serving if placeholder.wants_surge(pod)]
    if not surging:
        say("OK", f"surge: on for notices of {config.surge_min_notice_seconds:g} s or more; no serving pod here is "
                  f"annotated {placeholder.SURGE_ANNOTATION}: \"true\" (and owned by a ReplicaSet or StatefulSet)")
        return
    handed = [pod for pod in surging if handover.release_key(pod)]
    if handed:
        facts = k.pod_facts(handed[0])
        key = facts.release_key
        assert key is not None
        _verdict(say, f"hand {_key(handed[0])} over to a replacement (release it from ReplicaSet "
                      f"{key.partition('/')[0]})", lambda: dry.release_pod(facts, key))
    # Placeholders: for a pod that cannot be handed over, and, when a rebalance recommendation
    # stands by with placeholders (--rebalance-action surge), for one that can too.
    others = [pod for pod in surging if not handover.release_key(pod)][:1]
    if config.rebalance_action == "surge":
        others += handed[:1]
    settings = placeholder.Settings(priority_class=config.surge_priority_class, image=config.surge_placeholder_image)
    for pod in others:
        manifest = placeholder.manifest(pod, node_name=config.node_name, settings=settings)
        _verdict(say, f"create the surge placeholder of {_key(pod)} at PriorityClass "
                      f"{config.surge_priority_class}", lambda: dry.create_placeholder(manifest))


def _verdict(say: Callable[[str, str], None], what: str, write: Callable[[], object]) -> None:
    try:
        write()
    except Exception as error:  # noqa: BLE001 - report, don't crash
        say("FAIL", f"admission: may not {what}: {error}")
        return
    say("OK", f"admission: may {what} (dry run)")


async def _check_pods(pods: list[k.Obj], say: Callable[[str, str], None], *, cloud: str | None) -> None:
    serving = [pod for pod in pods if k.is_serving_pod(pod)]
    unguarded = [pod for pod in pods if not k.is_serving_pod(pod) and _looks_like_vllm(pod)]
    if not serving:
        say("WARN", "no serving pods on this node (none declares readiness gate spotguard.io/serving)")
    for pod in unguarded:
        say("WARN", f"pod {_key(pod)} looks like vLLM but has no spotguard.io/serving readiness gate: "
                    "routers will keep sending it work after a notice")
    for pod in serving:
        _check_drain_on_sigterm(pod, say, cloud=cloud)
    async with aiohttp.ClientSession() as session:
        for pod in serving:
            url = k.metrics_url(pod)
            if url is None:
                say("FAIL", f"pod {_key(pod)}: no pod IP or bad spotguard.io/metrics-port annotation")
                continue
            try:
                reading = await vllm.read_in_flight(session, url, timeout=3)
            except vllm.ScrapeError as error:
                say("FAIL", f"pod {_key(pod)}: vLLM metrics at {url} unreadable ({error.reason}: {error})")
                continue
            say("OK", f"pod {_key(pod)}: readiness gate declared; vLLM metrics at {url} "
                      f"({reading.total:.0f} in flight over {reading.engines} engine(s))")


def _check_drain_on_sigterm(pod: k.Obj, say: Callable[[str, str], None], *, cloud: str | None) -> None:
    """A pod annotated spotguard.io/drains-on-sigterm is evicted as soon as it is out of rotation,
    trusting it to finish its in-flight requests after SIGTERM: say whether its spec backs that up
    (vLLM's --shutdown-timeout, or the chart's drain-aware preStop helper) and whether its grace
    period leaves the drain the time it asks for. `cloud` (None: not known) decides the GKE advice."""
    timeout, helper_wait = _shutdown_timeout(pod), _prestop_helper_wait(pod)
    helper = helper_wait is not None
    grace = (pod.get("spec") or {}).get("terminationGracePeriodSeconds", 30)
    how = " behind ".join(filter(None, (f"vLLM --shutdown-timeout {timeout}" if timeout else "",
                                         "the drain preStop helper" if helper else "")))
    if not k.drains_on_sigterm(pod):
        if timeout or helper:
            say("OK", f"pod {_key(pod)} drains on SIGTERM ({how}); annotate it {k.DRAINS_ON_SIGTERM_ANNOTATION}: "
                      "\"true\" and spotguard evicts it at the notice, so its replacement starts while it drains")
        return
    if not (timeout or helper):
        say("WARN", f"pod {_key(pod)} is annotated {k.DRAINS_ON_SIGTERM_ANNOTATION} but runs neither vLLM "
                    "--shutdown-timeout nor the chart's drain preStop helper: evicted at the notice, its in-flight "
                    "requests are aborted on SIGTERM (vLLM's default)")
        return
    needed = (timeout or 0) + (helper_wait or 0)
    if isinstance(grace, int) and grace < needed:
        say("WARN", f"pod {_key(pod)}: terminationGracePeriodSeconds {grace} is shorter than {how} "
                    f"({needed:g} s): the kubelet kills it before its drain ends")
        return
    advice = ""
    if not helper and cloud in ("gce", None):
        # vLLM's drain refuses new requests from its SIGTERM; on GCE the node's shutdown, and so the
        # kubelet's SIGTERM, comes with the notice, tens of milliseconds before any handler has the
        # pod out of its Service (docs/BENCHMARKS.md). On AWS and Azure it comes at the notice's end.
        where = "on GCE (without preemptionNoticeDuration)" if cloud == "gce" else "where (as on GKE)"
        advice = (f"; {where} the node's shutdown starts with the notice: also run the chart's preStop helper, "
                  "so vLLM does not refuse requests sent before the pod leaves its Service")
    say("OK", f"pod {_key(pod)} drains itself on SIGTERM ({how}): spotguard evicts it at the notice{advice}")


def _shutdown_timeout(pod: k.Obj) -> int | None:
    """vLLM's --shutdown-timeout in a container's command or args (integer seconds; 0 means off)."""
    for container in (pod.get("spec") or {}).get("containers") or []:
        words = [str(w) for w in list(container.get("command") or []) + list(container.get("args") or [])]
        value = _flag_value(words, "--shutdown-timeout")
        if value is not None and value.strip().isdigit() and int(value) > 0:
            return int(value)
    return None


def _flag_value(words: list[str], flag: str) -> str | None:
    """The value of `flag` in a command line, written `flag N` or `flag=N`; None when absent."""
    for index, word in enumerate(words):
        if word == flag and index + 1 < len(words):
            return words[index + 1]
        if word.startswith(flag + "="):
            return word.partition("=")[2]
    return None


def _prestop_helper_wait(pod: k.Obj) -> float | None:
    """The --max-wait of the chart's drain preStop helper when a container runs it (its default, 25 s,
    when the command does not say); None without the helper."""
    for container in (pod.get("spec") or {}).get("containers") or []:
        command = [str(word) for word in
                   (((container.get("lifecycle") or {}).get("preStop") or {}).get("exec") or {}).get("command") or []]
        if any("vllm-drain-prestop" in word for word in command):
            value = _flag_value(command, "--max-wait")
            try:
                return max(0.0, float(value)) if value is not None else PRESTOP_HELPER_DEFAULT_WAIT
            except ValueError:
                return PRESTOP_HELPER_DEFAULT_WAIT  # the helper itself would refuse it; judge by its default
    return None


def _looks_like_vllm(pod: k.Obj) -> bool:
    for container in (pod.get("spec") or {}).get("containers") or []:
        words = [container.get("image", "")] + list(container.get("command") or []) + list(container.get("args") or [])
        if any("vllm" in str(word).lower() for word in words):
            return True
    return False


def _key(pod: k.Obj) -> str:
    return f"{pod['metadata'].get('namespace')}/{pod['metadata'].get('name')}"

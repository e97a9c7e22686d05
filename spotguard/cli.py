"""Command line: `spotguard run | check | version | sim ...` (also `python -m spotguard`)."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Sequence

from spotguard import __version__
from spotguard import config as cfg

DESCRIPTION = """\
spotguard protects vLLM inference on spot/preemptible GPU nodes. On a termination notice from the
cloud's metadata server it cordons and taints the node, flips serving pods to not-ready through
the spotguard.io/serving readiness gate so routers stop sending work, waits for vLLM's in-flight
requests to finish, then evicts pods through the Eviction API (PodDisruptionBudgets respected)."""

RUN_EPILOG = """\
Every flag also reads the environment variable shown; the flag wins. A serving pod is one whose
spec.readinessGates lists conditionType spotguard.io/serving; its vLLM metrics are read from the pod
IP on annotation spotguard.io/metrics-port (default 8000), path spotguard.io/metrics-path (default
/metrics). Annotate a pod spotguard.io/evict: "false" to keep spotguard from evicting it.
Kubernetes credentials: KUBECONFIG when set, the in-cluster service account otherwise."""


def build_parser(*, with_sim: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spotguard", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"spotguard {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = commands.add_parser("run", help="guard this node (the DaemonSet's command)",
                              description="Watch for termination notices and drain this node safely.",
                              epilog=RUN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    cfg.add_arguments(run)
    check = commands.add_parser("check", help="tell whether this node is protected, before an incident",
                                description="Check metadata access, the node, RBAC and the serving pods; "
                                            "exit 1 with the reasons when something is missing.",
                                epilog=RUN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    cfg.add_arguments(check)
    commands.add_parser("version", help="print the version")

    sim = commands.add_parser("sim", help="the preemption simulation: local cluster, emulators, demo, bench",
                              description="Run spotguard's preemption simulation on this machine.")
    if with_sim:  # only when asked for: the daemon's path never imports simulation code
        from spotguard.sim import cli as sim_cli

        sim_cli.add_commands(sim)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(with_sim=bool(argv) and argv[0] == "sim")
    args = parser.parse_args(argv)
    if args.command == "version":
        print(f"spotguard {__version__}")
        return 0
    if args.command == "sim":
        from spotguard.sim import cli as sim_cli

        return sim_cli.run(args)
    try:
        config = cfg.load(args)
    except cfg.ConfigError as error:
        print(f"spotguard: error: {error}", file=sys.stderr)
        return 2
    if args.command == "check":
        from spotguard.check import run_check

        return asyncio.run(run_check(config))
    return _run(config)


def _run(config: cfg.Config) -> int:
    from spotguard import kube, lifecycle, providers
    from spotguard.daemon import Daemon
    from spotguard.observability import Metrics, configure_logging

    configure_logging(level=config.log_level, node=config.node_name)
    try:
        api_client = kube_client()
    except Exception as error:  # noqa: BLE001 - one readable line, not a traceback
        print(f"spotguard: error: cannot load Kubernetes credentials: {error}", file=sys.stderr)
        return 2

    async def main_async() -> None:
        metrics = Metrics(provider=config.provider)
        provider = providers.make_provider(config, on_error=metrics.metadata_failed, on_ok=metrics.metadata_ok,
                                           on_detected=metrics.use_provider)
        timing = lifecycle.Timing(safety_margin_seconds=config.safety_margin_seconds,
                                  endpoint_wait_seconds=config.endpoint_wait_seconds,
                                  max_drain_seconds=config.max_drain_seconds)
        daemon = Daemon(config=config, provider=provider,
                        kube=kube.Kube(api_client, node_name=config.node_name, dry_run=config.dry_run),
                        metrics=metrics, timing=timing)
        await daemon.run()

    asyncio.run(main_async())
    return 0


# TCP keepalive on every API connection. A watch whose connection dies without a FIN or RST (a NAT
# or load balancer forgetting an idle flow) would otherwise be noticed only at its read timeout,
# minutes later. Probes after 15 s idle, every 5 s, 3 unanswered: about 30 s, after which the
# watch re-lists. (client-go uses 30 s idle with Go's 15 s x 9 probes.)
KEEPALIVE = {"idle": 15, "interval": 5, "count": 3}


def kube_client():
    """An ApiClient from KUBECONFIG when set, else the in-cluster service account."""
    from kubernetes import client, config
    from kubernetes.utils.keepalive import tcp_keepalive_socket_options

    configuration = client.Configuration()
    configuration.socket_options = tcp_keepalive_socket_options(**KEEPALIVE)
    if os.environ.get("KUBECONFIG"):
        # Passed explicitly: the client's own default is read once, when it is imported. A
        # colon-separated list of files is merged as kubectl does.
        return config.new_client_from_config(os.environ["KUBECONFIG"], client_configuration=configuration)
    config.load_incluster_config(client_configuration=configuration)
    return client.ApiClient(configuration)


if __name__ == "__main__":
    raise SystemExit(main())

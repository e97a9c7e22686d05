"""Command line: `spotguard run | check | version` (also `python -m spotguard`).

The preemption simulation is a separate distribution with its own command, `spotguard-sim`."""

from __future__ import annotations

import argparse
import asyncio
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


SIM_MOVED = ("spotguard: the simulation moved to its own command: `spotguard-sim ...` "
             "(package spotguard-sim, in sim/ of the source tree)")


def build_parser() -> argparse.ArgumentParser:
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["sim"]:
        print(SIM_MOVED, file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    if args.command == "version":
        print(f"spotguard {__version__}")
        return 0
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
    from spotguard import kube, kubeapi, lifecycle, providers
    from spotguard.daemon import Daemon, ListenError
    from spotguard.observability import Metrics, configure_logging

    configure_logging(level=config.log_level, node=config.node_name)
    try:
        api_client = kubeapi.new_client()
    except Exception as error:  # noqa: BLE001 - one readable line, not a traceback
        print(f"spotguard: error: cannot load Kubernetes credentials: {error}", file=sys.stderr)
        return 2

    async def main_async() -> None:
        metrics = Metrics(provider=config.provider)
        provider = providers.make_provider(config, on_error=metrics.metadata_failed, on_ok=metrics.metadata_ok,
                                           on_detected=metrics.use_provider)
        timing = lifecycle.Timing(safety_margin_seconds=config.safety_margin_seconds,
                                  endpoint_wait_seconds=config.endpoint_wait_seconds,
                                  max_drain_seconds=config.max_drain_seconds,
                                  surge_min_notice_seconds=config.surge_min_notice_seconds,
                                  surge_drain_reserve_seconds=config.surge_drain_reserve_seconds,
                                  exclude_from_load_balancers=config.exclude_from_load_balancers)
        daemon = Daemon(config=config, provider=provider,
                        kube=kube.Kube(api_client, node_name=config.node_name, dry_run=config.dry_run),
                        metrics=metrics, timing=timing)
        await daemon.run()

    try:
        asyncio.run(main_async())
    except ListenError as error:
        print(f"spotguard: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`python -m spotguard_sim.kubelet`: the simulated kubelet of every managed Node (what
`spotguard-sim cluster up` starts), and `... reclaim NODE --in SECONDS`."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

from kubernetes import client as k8s
from kubernetes import config as k8s_config

from spotguard.observability import configure_logging
from spotguard_sim.kubelet.kubelet import SimKubelet
from spotguard_sim.kubelet.reclaim import SHUTDOWN_GRACE_SECONDS, reclaim
from spotguard_sim.kubelet.status import format_time, utcnow


def _client_from_kubeconfig(path: str | None) -> Any:
    configuration = k8s.Configuration()
    k8s_config.load_kube_config(config_file=path, client_configuration=configuration)
    configuration.connection_pool_maxsize = 16  # the write pool (8) and the two watches
    return k8s.ApiClient(configuration)


def add_kubelet_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG"), required="KUBECONFIG" not in os.environ,
                        help="kubeconfig of the cluster (default $KUBECONFIG)")
    parser.add_argument("--state-dir", type=Path, default=None,
                        help="where pod logs go (logs/pods/<ns>_<name>.log); default: the kubeconfig's directory")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))


def run_kubelet_from_args(args: argparse.Namespace) -> int:
    """Run until SIGTERM/SIGINT; then every fake vLLM process is stopped and 0 returned."""
    configure_logging(level=args.log_level)
    state_dir = args.state_dir or Path(args.kubeconfig).resolve().parent
    try:
        api_client = _client_from_kubeconfig(args.kubeconfig)
    except (k8s_config.ConfigException, OSError) as exc:
        print(f"sim kubelet: cannot use kubeconfig {args.kubeconfig}: {exc}", file=sys.stderr)
        return 2
    kubelet = SimKubelet(api_client, state_dir=state_dir)

    async def until_signal() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await kubelet.run(stop)

    asyncio.run(until_signal())
    return 0


def add_reclaim_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("node", help="the Node whose VM is reclaimed")
    parser.add_argument("--in", dest="in_seconds", type=float, required=True, metavar="SECONDS",
                        help="seconds from now until the VM is gone (graceful shutdown starts 30 s before)")
    parser.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG"), required="KUBECONFIG" not in os.environ,
                        help="kubeconfig of the cluster (default $KUBECONFIG)")


def reclaim_from_args(args: argparse.Namespace) -> int:
    if args.in_seconds < 0:
        print("reclaim: --in must not be negative", file=sys.stderr)
        return 2
    at = utcnow() + timedelta(seconds=args.in_seconds)
    try:
        api_client = _client_from_kubeconfig(args.kubeconfig)
    except (k8s_config.ConfigException, OSError) as exc:
        print(f"reclaim: cannot use kubeconfig {args.kubeconfig}: {exc}", file=sys.stderr)
        return 2
    try:
        reclaim(api_client, args.node, at=at)
    except Exception as exc:  # noqa: BLE001 - a CLI: one line, not a traceback
        reason = getattr(exc, "reason", None) or exc
        print(f"reclaim: cannot annotate node {args.node!r}: {reason}", file=sys.stderr)
        return 1
    finally:
        api_client.close()
    print(f"node {args.node}: VM reclaimed at {format_time(at)} "
          f"(graceful shutdown from {format_time(at - timedelta(seconds=SHUTDOWN_GRACE_SECONDS))})")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["reclaim"]:
        parser = argparse.ArgumentParser(prog="python -m spotguard_sim.kubelet reclaim",
                                         description="Reclaim a simulated VM: GKE graceful node shutdown, then "
                                                     "the Node is gone.")
        add_reclaim_arguments(parser)
        return reclaim_from_args(parser.parse_args(argv[1:]))
    parser = argparse.ArgumentParser(prog="python -m spotguard_sim.kubelet",
                                     description="The simulated kubelet of every managed Node in the cluster.",
                                     epilog="Also: python -m spotguard_sim.kubelet reclaim NODE --in SECONDS")
    add_kubelet_arguments(parser)
    code = run_kubelet_from_args(parser.parse_args(argv))
    sys.stdout.flush()
    sys.stderr.flush()
    # The API thread pool may be inside a call (bounded by its timeout); every process we started
    # is already stopped, so there is nothing left to wait for.
    os._exit(code)


if __name__ == "__main__":
    raise SystemExit(main())

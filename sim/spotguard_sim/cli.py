"""`spotguard-sim ...` (also `python -m spotguard_sim`): the simulation's commands.

Each command's module is imported only when that command runs, so that `spotguard-sim vllm`, started
once per simulated pod, does not pay for the benchmark's imports."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

DESCRIPTION = """\
spotguard's preemption simulation: a real local Kubernetes control plane with a simulated kubelet,
emulated GCE/AWS/Azure metadata servers, a fake vLLM, a router and load generator, a node-pool
autoscaler, the demo and the benchmark. It drives real `spotguard run` processes."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spotguard-sim", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="sim_command", metavar="COMMAND", required=True)

    cluster = commands.add_parser("cluster", help="start or stop the local control plane",
                                  description="The local control plane: real etcd, kube-apiserver, "
                                              "kube-controller-manager and kube-scheduler (built once from "
                                              "Go modules and cached) plus the simulated kubelet.")
    cluster_commands = cluster.add_subparsers(dest="cluster_command", metavar="up|down", required=True)
    cluster_commands.add_parser("build", help="build and cache the control plane binary (up does it too)")
    for name, text in (("up", "start it in the background (or reuse the running one); prints KUBECONFIG=..."),
                       ("down", "stop every process `up` started")):
        command = cluster_commands.add_parser(name, help=text, description=text)
        command.add_argument("--dir", type=Path, default=Path(".spotguard-sim"),
                             help="cluster directory: kubeconfig, certificates, logs (default .spotguard-sim)")

    metadata = commands.add_parser("gce-metadata", help="serve an emulated GCE metadata server",
                                   description="Emulated GCE metadata server. POST /sim/preempt, "
                                               "/sim/maintenance?event=..., /sim/fault?mode=..., /sim/reset.")
    metadata.add_argument("--listen", default="127.0.0.1:8089", help="HOST:PORT (default 127.0.0.1:8089)")
    aws_metadata = commands.add_parser("aws-metadata", help="serve an emulated EC2 instance metadata service (IMDSv2)",
                                       description="Emulated EC2 instance metadata (IMDSv2 tokens, spot "
                                                   "instance-action, rebalance). POST /sim/preempt"
                                                   "[?action=terminate&seconds=120], /sim/rebalance, "
                                                   "/sim/fault?mode=..., /sim/reset.")
    aws_metadata.add_argument("--listen", default="127.0.0.1:8090", help="HOST:PORT (default 127.0.0.1:8090)")
    azure_metadata = commands.add_parser("azure-metadata", help="serve an emulated Azure IMDS (Scheduled Events)",
                                         description="Emulated Azure Instance Metadata Service: Scheduled Events "
                                                     "and compute metadata. POST /sim/preempt[?seconds=30], "
                                                     "/sim/event?type=Reboot|Redeploy|Terminate|Freeze|Preempt, "
                                                     "/sim/fault?mode=..., /sim/reset.")
    azure_metadata.add_argument("--listen", default="127.0.0.1:8091", help="HOST:PORT (default 127.0.0.1:8091)")

    from spotguard_sim import fake_vllm

    vllm = commands.add_parser("vllm", help="serve a fake vLLM (OpenAI API, /metrics, SIGTERM semantics)",
                               description="A fake vLLM server speaking vLLM's real /metrics text.")
    fake_vllm.add_vllm_arguments(vllm)

    from spotguard_sim import autoscaler, router

    router_parser = commands.add_parser("router", help="route load like a Service-following gateway; record outcomes",
                                        description="Send streaming completions to the ready endpoints of a "
                                                    "Service and record every request's outcome.")
    router.add_router_arguments(router_parser)
    autoscaler_parser = commands.add_parser("autoscaler", help="emulate the node-pool autoscaler",
                                            description="Add a node to a pool when pods are Pending for lack "
                                                        "of one, after a provisioning delay.")
    autoscaler.add_autoscaler_arguments(autoscaler_parser)

    from spotguard_sim import load

    load_parser = commands.add_parser("load", help="send streaming completions to one address (a Service); print "
                                                   "every request's outcome as JSON",
                                      description=load.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    load.add_load_arguments(load_parser)

    from spotguard_sim import demo

    demo_parser = commands.add_parser("demo", help="the preemption demo: load, a preemption, a timeline and a table",
                                      description=demo.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_demo_arguments(demo_parser)

    from spotguard_sim import bench
    from spotguard_sim.bench import run as bench_run

    bench_parser = commands.add_parser("bench", help="benchmark spotguard against no handler and an NTH-like "
                                                     "handler; footprint, reaction, storm",
                                       description=bench.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_run.add_bench_arguments(bench_parser)

    reclaim = commands.add_parser("reclaim", help="reclaim a simulated VM (GKE graceful node shutdown)",
                                  description="Annotate the node so the simulated kubelet shuts it down "
                                              "like GKE: pods get SIGTERM 30 s before the VM goes.")
    reclaim.add_argument("node")
    reclaim.add_argument("--in", dest="seconds", type=float, default=30.0,
                         help="seconds until the VM is gone (default 30)")
    reclaim.add_argument("--dir", type=Path, default=Path(".spotguard-sim"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    if args.sim_command == "cluster":
        from spotguard_sim import controlplane

        try:
            if args.cluster_command == "build":
                print(controlplane.ensure_built())
            elif args.cluster_command == "up":
                info = controlplane.up(args.dir)
                print(f"KUBECONFIG={info.kubeconfig}")
            else:
                controlplane.down(args.dir)
        except controlplane.ControlPlaneError as error:
            print(f"spotguard-sim: error: {error}", file=sys.stderr)
            return 1
        return 0
    if args.sim_command == "gce-metadata":
        from spotguard_sim.gce_metadata import run_gce_metadata

        return run_gce_metadata(args.listen)
    if args.sim_command == "aws-metadata":
        from spotguard_sim.aws_metadata import run_aws_metadata

        return run_aws_metadata(args.listen)
    if args.sim_command == "azure-metadata":
        from spotguard_sim.azure_metadata import run_azure_metadata

        return run_azure_metadata(args.listen)
    if args.sim_command == "vllm":
        from spotguard_sim.fake_vllm import run_vllm_from_args

        return run_vllm_from_args(args)
    if args.sim_command == "router":
        from spotguard_sim.router import run_router_from_args

        return run_router_from_args(args)
    if args.sim_command == "autoscaler":
        from spotguard_sim.autoscaler import run_autoscaler_from_args

        return run_autoscaler_from_args(args)
    if args.sim_command == "load":
        from spotguard_sim.load import run_load_from_args

        return run_load_from_args(args)
    if args.sim_command == "demo":
        from spotguard_sim.demo import run_demo_from_args

        return run_demo_from_args(args)
    if args.sim_command == "bench":
        from spotguard_sim.bench.run import run_bench_from_args

        return run_bench_from_args(args)
    if args.sim_command == "reclaim":
        from datetime import datetime, timedelta, timezone

        from kubernetes import config

        from spotguard_sim.kubelet import reclaim

        api = config.new_client_from_config(config_file=str(args.dir / "kubeconfig"))
        reclaim(api, args.node, at=datetime.now(timezone.utc) + timedelta(seconds=args.seconds))
        return 0
    raise AssertionError(args.sim_command)

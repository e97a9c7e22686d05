"""`spotguard-sim load --url URL`: the load generator alone, against one fixed address.

Where a Service's ClusterIP does the routing (kube-proxy in a kind cluster), the load generator
runs as a pod and sends every request to the Service's address; which pod serves each one is the
cluster's business. It prints the report (summary and every request) as one JSON line at the end,
so `kubectl logs` of the pod is the result.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from urllib.parse import urlsplit

import structlog

from spotguard_sim.router import DurationDistribution, Endpoint, LoadGenerator, StaticEndpoints


def add_load_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", required=True, help="http://HOST:PORT to send every request to (a Service)")
    parser.add_argument("--rate", type=float, default=2.0, help="requests per second (default 2)")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds to send for (default 60)")
    parser.add_argument("--seed", type=int, default=0, help="RNG seed of the request durations (default 0)")
    parser.add_argument("--new-connection-per-request", action="store_true",
                        help="open a new TCP connection for every request instead of reusing idle keep-alive "
                             "ones (through a ClusterIP, a reused connection stays with the pod it first reached)")
    parser.add_argument("--token-interval", type=float, default=0.1,
                        help="about this many seconds per streamed token (default 0.1)")
    defaults = DurationDistribution()
    parser.add_argument("--median", type=float, default=defaults.median_s, help="median request duration, s")
    parser.add_argument("--sigma", type=float, default=defaults.sigma, help="log-sd of the lognormal durations")
    parser.add_argument("--min", dest="min_s", type=float, default=defaults.min_s, help="shortest request, s")
    parser.add_argument("--max", dest="max_s", type=float, default=defaults.max_s, help="longest request, s")


def run_load_from_args(args: argparse.Namespace) -> int:
    """0 when the run finished (whatever the requests' outcomes), 2 on bad flags."""
    parts = urlsplit(args.url)
    if parts.scheme != "http" or not parts.hostname or parts.path not in ("", "/"):
        print("spotguard-sim load: --url must be http://HOST:PORT", file=sys.stderr)
        return 2
    try:
        durations = DurationDistribution(median_s=args.median, sigma=args.sigma, min_s=args.min_s, max_s=args.max_s)
        target = Endpoint(address=parts.hostname, port=parts.port or 80, pod=parts.hostname)
        generator = LoadGenerator(StaticEndpoints([target]), rate=args.rate, duration=args.duration,
                                  durations=durations, seed=args.seed, token_interval=args.token_interval,
                                  new_connection_per_request=args.new_connection_per_request)
    except ValueError as error:
        print(f"spotguard-sim load: {error}", file=sys.stderr)
        return 2
    # stdout carries the report alone; the load generator's own log lines go to stderr.
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=sys.stderr))
    print(json.dumps(asyncio.run(_run(generator))), flush=True)
    return 0


async def _run(generator: LoadGenerator) -> dict[str, object]:
    """Send for the duration and wait for every request; SIGTERM/SIGINT end sending early."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, lambda: asyncio.ensure_future(generator.stop(drain=True, timeout=60)))
    try:
        generator.start()
        await generator.wait()
    finally:
        await generator.stop(drain=False)
    return generator.report()

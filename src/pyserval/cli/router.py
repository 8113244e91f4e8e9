"""``pyserval router``: run a service router."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys

from ..control import DEFAULT_ROUTER_PORT, Router
from .common import (
    add_metrics_argument,
    address,
    naming_address,
    run_until_signal,
    start_metrics,
)

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``pyserval router``."""
    parser.add_argument(
        "--listen",
        type=address,
        default=f"0.0.0.0:{DEFAULT_ROUTER_PORT}",
        help="UDP address to serve on, IP:PORT or [IPv6]:PORT",
    )
    parser.add_argument("--upstream", help="router to announce to and send unresolved SYNs to")
    parser.add_argument(
        "--announce", action="append", default=[], help="prefix to announce upstream"
    )
    parser.add_argument(
        "--delay", action="append", default=[], help="prefix whose SYNs wait for an instance"
    )
    parser.add_argument(
        "--delay-timeout",
        type=float,
        default=5.0,
        help="seconds a delayed SYN waits for an instance before it is dropped",
    )
    parser.add_argument(
        "--max-nonces",
        type=int,
        default=100_000,
        help="registrations remembered against replay (one source may hold a tenth)",
    )
    parser.add_argument(
        "--pcap", metavar="FILE", help="record every datagram sent and received in a pcap file"
    )
    parser.add_argument(
        "--certified",
        action="append",
        default=[],
        help="prefix whose IDs must be self-certifying (registrations signed by their key)",
    )
    parser.add_argument(
        "--etcd",
        action="append",
        default=[],
        help="etcd member URL(s) (http://IP:PORT, comma-separated or repeated): share the "
        "registry with the other routers of --cluster (needs pyserval[cluster])",
    )
    parser.add_argument("--cluster", help="the cluster's name (its prefix in etcd)")
    parser.add_argument(
        "--lease-ttl",
        type=float,
        default=3.0,
        help="seconds after this router dies until the others drop its instances (default 3)",
    )
    add_metrics_argument(parser)


async def _serve(args: argparse.Namespace) -> None:
    router = Router(
        args.listen,
        upstream=args.upstream,
        announce=args.announce,
        delay=args.delay,
        delay_timeout=args.delay_timeout,
        certified_prefixes=args.certified,
        max_nonces=args.max_nonces,
        pcap=args.pcap,
        etcd=args.etcd or None,
        cluster=args.cluster,
        lease_ttl=args.lease_ttl,
    )
    async with contextlib.AsyncExitStack() as stack:
        async with naming_address(args.listen):
            await stack.enter_async_context(router)
        print(f"router listening on {router.address_text}", flush=True)
        if router.cluster is not None:
            state = "in sync" if router.cluster.connected else "etcd unreachable, retrying"
            print(
                f"cluster {router.cluster.name}: router {router.cluster.router_id}, "
                f"lease {router.cluster.lease:x}, {state}",
                flush=True,
            )
        metrics = await start_metrics(args, lambda m: m.add_router(router))
        try:
            await asyncio.Event().wait()
        finally:
            if metrics is not None:
                await metrics.close()


def run(args: argparse.Namespace) -> int:
    """Serve until interrupted."""
    if bool(args.etcd) != bool(args.cluster):
        print("pyserval router: --etcd and --cluster go together", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    return run_until_signal(_serve(args))

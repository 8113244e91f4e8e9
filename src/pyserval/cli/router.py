"""``pyserval router``: run a service router."""

from __future__ import annotations

import argparse
import asyncio

from ..control import DEFAULT_ROUTER_PORT, Router
from .common import run_until_signal

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``pyserval router``."""
    parser.add_argument(
        "--listen",
        default=f"0.0.0.0:{DEFAULT_ROUTER_PORT}",
        help=f"UDP address, IP:PORT or [IPv6]:PORT (default 0.0.0.0:{DEFAULT_ROUTER_PORT})",
    )
    parser.add_argument("--upstream", help="router to announce to and send unresolved SYNs to")
    parser.add_argument(
        "--announce", action="append", default=[], help="prefix to announce upstream"
    )
    parser.add_argument(
        "--delay", action="append", default=[], help="prefix whose SYNs wait for an instance"
    )
    parser.add_argument("--delay-timeout", type=float, default=5.0)
    parser.add_argument(
        "--max-nonces",
        type=int,
        default=100_000,
        help="registrations remembered against replay (one source may hold a tenth; "
        "default 100000)",
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
    )
    async with router:
        print(f"router listening on {router.address_text}", flush=True)
        await asyncio.Event().wait()


def run(args: argparse.Namespace) -> int:
    """Serve until interrupted."""
    return run_until_signal(_serve(args))

"""``pyserval flows``: a host's live connections, as ``ss -ti`` shows TCP.

Asks a host that answers inspection (``pyserval echo --inspect``, or
``pyserval.control.enable_inspection(host)`` in a program) for its connections: service,
flowIDs, state, and per path the addresses, RTT, congestion window, bytes each way and
retransmissions.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from ..control import fetch_flows, format_flows
from ..runtime.host import REFERENCE_PORTS
from .common import address

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``pyserval flows``."""
    parser.add_argument(
        "--host",
        type=address,
        default=f"127.0.0.1:{REFERENCE_PORTS[0]}",
        help="the host to ask (IP:PORT of a host answering inspection: `pyserval echo --inspect`)",
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for answers")
    parser.add_argument(
        "--name", action="append", default=[], help="service name to show instead of its ID"
    )


def run(args: argparse.Namespace) -> int:
    """Fetch and print the connections."""
    try:
        flows = asyncio.run(fetch_flows(args.host, timeout=args.timeout))
    except TimeoutError:
        print(
            f"pyserval flows: error: no answer from {args.host} within {args.timeout:g} s "
            "(is a host answering inspection there? `pyserval echo --inspect`)",
            file=sys.stderr,
        )
        return 1
    if args.json:
        print(json.dumps([f.model_dump() for f in flows], indent=1))
    else:
        print(format_flows(flows, {n: n for n in args.name}))
    return 0

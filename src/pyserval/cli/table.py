"""``pyserval table``: print a router's service table and counters."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from ..control import DEFAULT_ROUTER_PORT, fetch_table, format_table
from .common import address

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``pyserval table``."""
    parser.add_argument(
        "--router",
        "--host",
        dest="router",
        type=address,
        default=f"127.0.0.1:{DEFAULT_ROUTER_PORT}",
        help="the router (or a host serving inspection, e.g. `pyserval echo --inspect`)",
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for answers")


def run(args: argparse.Namespace) -> int:
    """Fetch and print the table."""
    try:
        dump = asyncio.run(fetch_table(args.router, timeout=args.timeout))
    except TimeoutError:
        print(
            f"pyserval table: error: no answer from a router at {args.router} within "
            f"{args.timeout:g} s (is it running, and is that its address?)",
            file=sys.stderr,
        )
        return 1
    if args.json:
        entries = [e.model_dump() for e in dump.entries]
        print(json.dumps({"entries": entries, "counters": dump.counters}, indent=1))
    else:
        print(format_table(dump))
    return 0

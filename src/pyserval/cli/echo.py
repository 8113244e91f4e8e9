"""``pyserval echo``: an echo service instance (for demonstrations and tests)."""

from __future__ import annotations

import argparse

import anyio

from ..control import enable_inspection
from ..runtime import Host, ServalStream
from ..sal.inet import format_address
from .common import run_until_signal

__all__ = ["add_arguments", "run", "serve_echo"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``pyserval echo``."""
    parser.add_argument("--service", default="echo", help="service name, ID or prefix")
    parser.add_argument(
        "--listen", default="127.0.0.1:0", help="UDP address (IP:PORT or [IPv6]:PORT)"
    )
    parser.add_argument("--router", help="service router to register with (IP:PORT or [IPv6]:PORT)")
    parser.add_argument("--broadcast", help="ad hoc: broadcast IP:PORT for unresolved SYNs")
    parser.add_argument("--weight", type=int, default=1)
    parser.add_argument("--priority", type=int, default=0)
    parser.add_argument("--name", default="", help="label printed with each connection")
    parser.add_argument(
        "--inspect", action="store_true", help="answer `pyserval table` about this host"
    )


async def serve_echo(stream: ServalStream) -> None:
    """Send back everything received, then end the stream."""
    try:
        while True:
            await stream.send(await stream.receive())
    except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
        pass  # the listener's serve() closes the stream


async def _serve(args: argparse.Namespace) -> None:
    host = Host([args.listen], router=args.router, broadcast=args.broadcast)
    async with host:
        if args.inspect:
            enable_inspection(host)
        listener = await host.listen(args.service, weight=args.weight, priority=args.priority)
        addr = format_address(host.addresses[0])
        print(f"echo {args.name} serving {args.service} at {addr}", flush=True)
        await listener.serve(serve_echo)


def run(args: argparse.Namespace) -> int:
    """Serve until interrupted (then unregister and close cleanly)."""
    return run_until_signal(_serve(args))

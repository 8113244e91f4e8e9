"""``pyserval echo``: an echo service instance (for demonstrations and tests)."""

from __future__ import annotations

import argparse
import sys
import time

import anyio

from ..control import enable_inspection
from ..runtime import Host, ServalStream
from ..runtime.secure import SecureStream, ServalSecurityError, check_securable
from ..sal.inet import format_address
from .common import run_until_signal
from .secure_args import add_secure_arguments, secure_settings

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
    add_secure_arguments(parser, serving="with --secure")
    parser.add_argument(
        "--pcap", metavar="FILE", help="record every datagram sent and received in a pcap file"
    )


async def serve_echo(stream: ServalStream | SecureStream) -> None:
    """Send back everything received, then end the stream."""
    try:
        while True:
            await stream.send(await stream.receive())
    except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
        pass  # the listener's serve() closes the stream


async def _serve(args: argparse.Namespace) -> None:
    key, delegation = secure_settings(args)
    host = Host([args.listen], router=args.router, broadcast=args.broadcast, pcap=args.pcap)
    async with host:
        if args.inspect:
            enable_inspection(host)
        listener = await host.listen(
            args.service,
            weight=args.weight,
            priority=args.priority,
            key=key,
            secure=args.secure,
            delegation=delegation,
        )
        addr = format_address(host.addresses[0])
        secure = " (secure)" if args.secure else ""
        print(f"echo {args.name} serving {args.service} at {addr}{secure}", flush=True)
        await listener.serve(serve_echo)


def run(args: argparse.Namespace) -> int:
    """Serve until interrupted (then unregister and close cleanly)."""
    try:
        key, delegation = secure_settings(args)  # unreadable files: say so before starting
        if args.secure:
            sid = check_securable(args.service)
            if key is None:
                raise ValueError("--secure needs --key-file")
            if delegation is not None:
                delegation.check(sid, key.public_key, time.time())
            elif not key.verify(sid):
                raise ValueError(
                    f"the key in {args.key_file} does not certify {sid.hex} "
                    "(an instance key needs --delegation-file)"
                )
    except (ValueError, ServalSecurityError) as exc:
        print(f"pyserval echo: {exc}", file=sys.stderr)
        return 2
    return run_until_signal(_serve(args))

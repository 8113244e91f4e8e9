"""``pyserval echo``: an echo service instance (for demonstrations and tests)."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any

import anyio

from ..control import enable_inspection
from ..naming.service_id import as_service_prefix
from ..runtime import Host, ServalStream
from ..runtime.secure import SecureStream, ServalSecurityError, check_securable
from ..sal.inet import format_address
from .common import (
    add_metrics_argument,
    address,
    naming_address,
    run_until_signal,
    start_metrics,
)
from .secure_args import add_secure_arguments, secure_settings

__all__ = ["add_arguments", "run", "serve_echo", "wait_acknowledged"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``pyserval echo``."""
    parser.add_argument("--service", default="echo", help="service name, ID or prefix")
    parser.add_argument(
        "--listen",
        type=address,
        default="127.0.0.1:0",
        help="UDP address (IP:PORT or [IPv6]:PORT)",
    )
    parser.add_argument("--router", help="service router to register with (IP:PORT or [IPv6]:PORT)")
    parser.add_argument(
        "--broadcast", type=address, help="ad hoc: broadcast IP:PORT for unresolved SYNs"
    )
    parser.add_argument("--weight", type=int, default=1, help="registration weight (1-65535)")
    parser.add_argument("--priority", type=int, default=0, help="registration priority")
    parser.add_argument("--name", default="", help="label printed with each connection")
    parser.add_argument(
        "--inspect",
        action="store_true",
        help="answer `pyserval table --host` and `pyserval flows --host` about this host",
    )
    add_secure_arguments(parser, serving="with --secure")
    parser.add_argument(
        "--pcap", metavar="FILE", help="record every datagram sent and received in a pcap file"
    )
    parser.add_argument(
        "--register-timeout",
        type=float,
        default=3.0,
        help="warn when the router has not acknowledged the registration after this long (s)",
    )
    add_metrics_argument(parser)


async def serve_echo(stream: ServalStream | SecureStream) -> None:
    """Send back everything received, then end the stream."""
    try:
        while True:
            await stream.send(await stream.receive())
    except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
        pass  # the listener's serve() closes the stream


async def wait_acknowledged(host: Host, service: str, timeout: float) -> str | None:
    """None once the host's router acknowledged ``service``; else what to warn about
    (the router refused it, or said nothing within ``timeout`` seconds)."""
    prefix = as_service_prefix(service)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        controller: Any = host.controller
        core = getattr(controller, "core", None)
        if core is not None:
            if prefix in getattr(core, "accepted", ()):
                return None
            refused = getattr(core, "refused", {}).get(prefix)
            if refused is not None:
                return f"the router refused the registration of {service!r}: {refused}"
        if loop.time() >= deadline:
            return (
                f"the router at {host.config.router} has not acknowledged the registration "
                f"of {service!r} after {timeout:g} s: is it running, and reachable?"
            )
        await asyncio.sleep(0.05)


async def _serve(args: argparse.Namespace) -> None:
    key, delegation = secure_settings(args)
    host = Host([args.listen], router=args.router, broadcast=args.broadcast, pcap=args.pcap)
    async with naming_address(args.listen):
        await host.start()
    async with host:
        if args.inspect:
            enable_inspection(host)
        metrics = await start_metrics(args, lambda m: m.add_host(host, args.name or "echo"))
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
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(listener.serve, serve_echo)
                if args.router is not None:
                    warning = await wait_acknowledged(host, args.service, args.register_timeout)
                    if warning is not None:
                        print(f"pyserval echo: warning: {warning}", file=sys.stderr, flush=True)
        finally:
            if metrics is not None:
                await metrics.close()


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

"""``pyserval serve-asgi MODULE:APP --service NAME``: an ASGI application on a serviceID."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any

from ..runtime import Host
from .common import run_until_signal

__all__ = ["add_arguments", "load_app", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``pyserval serve-asgi``."""
    parser.add_argument("app", help="the ASGI application as MODULE:ATTRIBUTE (e.g. main:app)")
    parser.add_argument("--service", default="web", help="service name, ID or prefix (web)")
    parser.add_argument("--listen", default="127.0.0.1:0", help="UDP address (127.0.0.1:0)")
    parser.add_argument("--router", help="service router to register with (IP:PORT)")
    parser.add_argument("--weight", type=int, default=1, help="share of the load (1)")
    parser.add_argument("--priority", type=int, default=0, help="router priority (0)")
    parser.add_argument("--app-dir", default=".", help="directory to import the module from (.)")
    parser.add_argument("--no-lifespan", action="store_true", help="skip the ASGI lifespan")
    parser.add_argument(
        "--pcap", metavar="FILE", help="record every datagram sent and received in a pcap file"
    )


def load_app(spec: str, app_dir: str = ".") -> Any:
    """Import ``MODULE:ATTRIBUTE`` (dots allowed in both) with ``app_dir`` on the path."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"expected MODULE:ATTRIBUTE, got {spec!r}")
    if app_dir not in sys.path:
        sys.path.insert(0, app_dir)
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


async def _serve(args: argparse.Namespace, app: Any) -> None:
    from ..http import serve_asgi

    host = Host([args.listen], router=args.router, pcap=args.pcap)
    async with host:
        addr = "{}:{}".format(*host.addresses[0])

        def ready() -> None:
            print(f"serving {args.app} on service {args.service} at {addr}", flush=True)

        await serve_asgi(
            app,
            host,
            args.service,
            weight=args.weight,
            priority=args.priority,
            lifespan=not args.no_lifespan,
            ready=ready,
        )


def run(args: argparse.Namespace) -> int:
    """Serve until interrupted."""
    try:
        app = load_app(args.app, args.app_dir)
    except (ImportError, AttributeError, ValueError) as exc:
        print(f"pyserval serve-asgi: cannot load {args.app}: {exc}", file=sys.stderr)
        return 2
    from ..http import LifespanError

    try:
        return run_until_signal(_serve(args, app))
    except LifespanError as exc:
        print(f"pyserval serve-asgi: the application's startup failed: {exc}", file=sys.stderr)
        return 1

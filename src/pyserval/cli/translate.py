"""``pyserval translate``: a TCP <-> Serval translator (one direction per process).

    pyserval translate --from tcp:127.0.0.1:8080 --to service:web --router 127.0.0.1:54326
    pyserval translate --from service:web --to tcp:127.0.0.1:80 --router 127.0.0.1:54326

With ``--secure`` the Serval hop is TLS 1.3 proving a self-certifying serviceID (given in
hex): the outbound side serves with ``--key-file`` (and ``--delegation-file``), the inbound
side checks the proof.

Prints ``translating FROM -> TO`` once ready (with the TCP port actually bound), logs each
connection on standard error, and runs until SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import logging
import sys

from ..runtime.secure import ServalSecurityError
from ..translator import DEFAULT_CHUNK, Translator
from .common import add_metrics_argument, run_until_signal, start_metrics
from .secure_args import add_secure_arguments, secure_settings

__all__ = ["add_arguments", "run"]


def _route(text: str) -> tuple[str, str]:
    name, sep, address = text.partition("=")
    if not sep or not name or not address:
        raise argparse.ArgumentTypeError(f"expected SERVICE=IP:PORT, got {text!r}")
    return name, address


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``pyserval translate``."""
    parser.add_argument(
        "--from", dest="source", required=True, help="tcp:HOST:PORT or service:NAME"
    )
    parser.add_argument("--to", dest="target", required=True, help="service:NAME or tcp:HOST:PORT")
    parser.add_argument("--router", help="service router (IP:PORT)")
    parser.add_argument(
        "--route",
        action="append",
        type=_route,
        default=[],
        help="static route SERVICE=IP:PORT instead of (or besides) a router",
    )
    parser.add_argument(
        "--listen", default="127.0.0.1:0", help="UDP address of the Serval interface"
    )
    parser.add_argument(
        "--max-connections", type=int, default=1024, help="connections translated at once"
    )
    parser.add_argument(
        "--mss", type=int, help="Serval segment size (default: 1408, or what the MTU allows)"
    )
    parser.add_argument(
        "--chunk", type=int, default=DEFAULT_CHUNK, help="largest read on either side (bytes)"
    )
    parser.add_argument(
        "--connect-timeout", type=float, default=10.0, help="seconds to reach the other side"
    )
    parser.add_argument("--syn-rto", type=float, default=1.0, help="first SYN retry (s)")
    parser.add_argument("--weight", type=int, default=1, help="outbound: registration weight")
    parser.add_argument("--priority", type=int, default=0, help="outbound: registration priority")
    parser.add_argument(
        "--probe-interval",
        type=float,
        default=0.5,
        help="outbound: how often a TCP server found down is tried again (s)",
    )
    parser.add_argument(
        "--health-interval",
        type=float,
        default=0.0,
        help="outbound: also check the TCP server this often while up (s; 0: only on failure)",
    )
    add_secure_arguments(parser, serving="outbound")
    parser.add_argument(
        "--log-level", default="INFO", help="DEBUG, INFO, WARNING (connection logs are INFO)"
    )
    add_metrics_argument(parser)


def _translator(args: argparse.Namespace) -> Translator:
    key, delegation = secure_settings(args)
    return Translator(
        args.source,
        args.target,
        router=args.router,
        routes=dict(args.route) or None,
        listen=args.listen,
        max_connections=args.max_connections,
        mss=args.mss,
        syn_rto=args.syn_rto,
        chunk=args.chunk,
        connect_timeout=args.connect_timeout,
        weight=args.weight,
        priority=args.priority,
        probe_interval=args.probe_interval,
        health_interval=args.health_interval,
        secure=args.secure,
        key=key,
        delegation=delegation,
    )


def run(args: argparse.Namespace) -> int:
    """Translate until interrupted (then reset what is still open and unregister)."""
    try:
        translator = _translator(args)  # bad endpoints, addresses or settings: say so now
    except (ValueError, ServalSecurityError) as exc:
        print(f"pyserval translate: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    failed: list[OSError] = []

    async def serve() -> None:
        try:
            async with translator:
                print(f"translating {translator.describe()}", flush=True)
                metrics = await start_metrics(args, lambda m: m.add_translator(translator))
                try:
                    await translator.serve_forever()
                finally:
                    if metrics is not None:
                        await metrics.close()
        except OSError as exc:  # e.g. the TCP address is taken
            failed.append(exc)

    run_until_signal(serve())
    if failed:
        print(f"pyserval translate: {failed[0]}", file=sys.stderr)
        return 1
    return 0

"""The ``pyserval`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from . import decode, demo, dissector, echo, key, router, serve_asgi, table, tour, translate

__all__ = ["main"]

# Sub-command name -> (module with add_arguments/run, help text): a dispatch table.
_COMMANDS: dict[
    str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int], str]
] = {
    "demo": (demo.add_arguments, demo.run, "a router, two replicas and a client, live"),
    "router": (router.add_arguments, router.run, "run a service router"),
    "table": (table.add_arguments, table.run, "print a router's service table and counters"),
    "echo": (echo.add_arguments, echo.run, "run an echo service instance"),
    "tour": (tour.add_arguments, tour.run, "the sans-I/O parts at work (simulated network)"),
    "decode": (decode.add_arguments, decode.run, "decode SAL packets given in hex"),
    "translate": (translate.add_arguments, translate.run, "translate between TCP and Serval"),
    "key": (key.add_arguments, key.run, "make service keys and delegations for --secure"),
    "dissector": (
        dissector.add_arguments,
        dissector.run,
        "print the path of the Wireshark/tshark dissector for SAL",
    ),
    "serve-asgi": (
        serve_asgi.add_arguments,
        serve_asgi.run,
        "serve an ASGI application (HTTP/1.1) on a serviceID",
    ),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pyserval`` command."""
    parser = argparse.ArgumentParser(prog="pyserval", description="Serval for Python")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add_arguments, _, help_text) in _COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    return _COMMANDS[args.command][1](args)


if __name__ == "__main__":
    sys.exit(main())

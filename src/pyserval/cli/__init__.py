"""The ``pyserval`` command line.

Errors a user can cause (a malformed address, a port in use, a router that does not
answer) are reported as one line on standard error, without a traceback: exit code 2 for
a bad command line, 1 for a failure at run time.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from . import (
    decode,
    demo,
    dissector,
    echo,
    flows,
    key,
    router,
    serve_asgi,
    table,
    tour,
    translate,
)
from .common import describe_error

__all__ = ["main"]

# Sub-command name -> (module with add_arguments/run, help text): a dispatch table.
_COMMANDS: dict[
    str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int], str]
] = {
    "demo": (demo.add_arguments, demo.run, "a router, two replicas and a client, live"),
    "router": (router.add_arguments, router.run, "run a service router"),
    "table": (table.add_arguments, table.run, "print a router's service table and counters"),
    "flows": (flows.add_arguments, flows.run, "print a host's live connections (like ss -ti)"),
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


class _Parser(argparse.ArgumentParser):
    """Reports a bad command line in one line (``prog: error: ...``), exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _Formatter(argparse.HelpFormatter):
    """Every option's help ends with its default, when it has one worth saying."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            "%(default)" in text
            or not action.option_strings
            or default is None
            or default is False
            or default == []
            or default == ""
            or default is argparse.SUPPRESS
        ):
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


def _version() -> str:
    from .. import __version__

    return __version__


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pyserval`` command."""
    parser = _Parser(prog="pyserval", description="Serval for Python", formatter_class=_Formatter)
    parser.add_argument("--version", action="version", version=f"pyserval {_version()}")
    parser.add_argument(
        "--log-level",
        dest="global_log_level",
        metavar="LEVEL",
        help="log to standard error at this level (DEBUG, INFO, WARNING; default: quiet)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (add_arguments, _, help_text) in _COMMANDS.items():
        add_arguments(
            sub.add_parser(name, help=help_text, description=help_text, formatter_class=_Formatter)
        )
    args = parser.parse_args(argv)
    if args.global_log_level:
        try:
            logging.basicConfig(
                level=args.global_log_level.upper(),
                format="%(asctime)s %(name)s %(levelname)s %(message)s",
                stream=sys.stderr,
            )
        except ValueError:
            parser.error(f"unknown log level {args.global_log_level!r}")
    try:
        return _COMMANDS[args.command][1](args)
    except KeyboardInterrupt:
        return 130
    except (OSError, ValueError, RuntimeError) as exc:
        logging.getLogger("pyserval.cli").debug("%s failed", args.command, exc_info=True)
        print(f"pyserval {args.command}: error: {describe_error(exc)}", file=sys.stderr)
        return 2 if isinstance(exc, ValueError) else 1


if __name__ == "__main__":
    sys.exit(main())

"""The ``pyserval`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from . import decode, demo

__all__ = ["main"]

# Sub-command name -> (module with add_arguments/run, help text): a dispatch table.
_COMMANDS: dict[
    str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int], str]
] = {
    "demo": (demo.add_arguments, demo.run, "show pyserval's parts at work"),
    "decode": (decode.add_arguments, decode.run, "decode SAL packets given in hex"),
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

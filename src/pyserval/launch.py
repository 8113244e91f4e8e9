"""Run an unchanged asyncio program on Serval: ``python -m pyserval.launch PROGRAM [ARGS]``.

Every event loop the program makes (``asyncio.run`` included) resolves ``NAME.serval`` as
the service NAME (:func:`pyserval.runtime.install.install_on_new_loops`), through the
process-wide default host configured by ``PYSERVAL_*`` environment variables. So a program
written for TCP, given ``redis.serval`` where it took a host name, runs on Serval with no
changed line::

    export PYSERVAL_ROUTER=127.0.0.1:54326
    python -m pyserval.launch examples/ports/redis_tcp.py redis.serval

``PROGRAM`` is a script path, or ``-m MODULE`` to run a module. Programs that make their own
event loop class (uvloop) or set their own event loop policy are not covered: use
:func:`pyserval.install` in them instead.
"""

from __future__ import annotations

import os
import runpy
import sys

from .runtime.install import install_on_new_loops

__all__ = ["main"]


def main(argv: list[str] | None = None) -> None:
    """Install on new loops, then run the program as ``__main__`` with its arguments."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help") or (args[0] == "-m" and len(args) < 2):
        print("usage: python -m pyserval.launch (PROGRAM | -m MODULE) [ARGS ...]")
        raise SystemExit(0 if args and args[0] in ("-h", "--help") else 2)
    install_on_new_loops()
    if args[0] == "-m":
        sys.argv = [args[1], *args[2:]]
        runpy.run_module(args[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(args)
        sys.path.insert(0, os.path.dirname(os.path.abspath(args[0])))  # as python does
        runpy.run_path(args[0], run_name="__main__")


if __name__ == "__main__":
    main()

"""Shared pieces of the command-line tools: running until a signal, address arguments,
the ``--metrics`` option, and one-line error messages."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import signal
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from ..runtime.host import parse_address

__all__ = [
    "add_metrics_argument",
    "address",
    "describe_error",
    "naming_address",
    "run_until_signal",
    "start_metrics",
]


def run_until_signal(main: Coroutine[Any, Any, None]) -> int:
    """Run ``main`` until it ends or SIGINT/SIGTERM arrives (then cancel it cleanly)."""

    async def runner() -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(main)
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(runner())
    return 0


def address(text: str) -> str:
    """An argparse ``type``: ``IP:PORT``, checked now so a typo is one clear line."""
    try:
        parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def add_metrics_argument(parser: argparse.ArgumentParser) -> None:
    """``--metrics HOST:PORT``: serve Prometheus metrics there (needs ``[metrics]``)."""
    parser.add_argument(
        "--metrics",
        type=address,
        metavar="IP:PORT",
        help="serve Prometheus metrics at http://IP:PORT/metrics (needs pyserval[metrics])",
    )


async def start_metrics(args: argparse.Namespace, add: Callable[[Any], None]) -> Any:
    """Start the metrics endpoint of ``--metrics`` (None when not asked for): ``add`` puts
    the command's components into the exporter. Prints where it listens."""
    if getattr(args, "metrics", None) is None:
        return None
    from ..metrics import MetricsExporter

    exporter = MetricsExporter()
    add(exporter)
    bound = await exporter.serve(args.metrics)
    print(f"metrics at http://{bound[0]}:{bound[1]}/metrics", flush=True)
    return exporter


@contextlib.asynccontextmanager
async def naming_address(address: str) -> AsyncIterator[None]:
    """Say which address could not be bound when a port is taken (or not ours)."""
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL):
            raise OSError(exc.errno, f"{address}: {_os_text(exc)}") from None
        raise


def describe_error(exc: BaseException) -> str:
    """One line saying what went wrong, for errors a user can cause (no traceback)."""
    if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
        return f"cannot listen: {_os_text(exc)} (is another program using that port?)"
    if isinstance(exc, OSError) and exc.errno == errno.EADDRNOTAVAIL:
        return f"cannot listen: {_os_text(exc)} (not an address of this machine)"
    errors = getattr(exc, "errors", None)
    if callable(errors):  # a pydantic ValidationError: its first message
        with contextlib.suppress(Exception):
            first = errors()[0]
            return str(first.get("msg", exc)).removeprefix("Value error, ")
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _os_text(exc: OSError) -> str:
    text = str(exc)
    return text.split("] ", 1)[1] if text.startswith("[Errno") and "] " in text else text

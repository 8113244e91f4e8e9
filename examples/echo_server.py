"""An echo service on a Serval host: everything a client sends comes back.

Usage (pyserval installed, or ``PYTHONPATH=src`` from the repository)::

    python examples/echo_server.py [--listen 127.0.0.1:54325] [--service echo]

The host listens for Serval packets (encapsulated in UDP) on ``--listen`` and serves the
service ``--service`` (a name, hashed to a serviceID, or 64 hex digits). Once ready it prints
one line, ``listening on IP:PORT service <hex>``, and flushes it, so a script can wait for it
(``--listen 127.0.0.1:0`` picks a free port and the line tells which). Stop it with Ctrl-C
or SIGTERM.

A client connects by serviceID, not by address; see ``examples/echo_client.py``::

    python examples/echo_client.py --route 127.0.0.1:54325 hello serval
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal

import anyio

import pyserval


async def echo(stream: pyserval.ServalStream) -> None:
    """Send back every chunk until the client finishes sending (then the stream closes)."""
    with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
        while True:
            await stream.send(await stream.receive())


async def serve(listen: str, service: str) -> None:
    """Run the echo service on a host bound to ``listen`` until cancelled."""
    async with pyserval.Host(listen=[listen]) as host:
        listener = await host.listen(service)
        ip, port = host.addresses[0]
        print(f"listening on {ip}:{port} service {listener.service_id.hex}", flush=True)
        await listener.serve(echo)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serval echo server")
    parser.add_argument("--listen", default="127.0.0.1:54325", help="IP:PORT to bind")
    parser.add_argument("--service", default="echo", help="service name or 64-hex serviceID")
    args = parser.parse_args(argv)

    async def run() -> None:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await serve(args.listen, args.service)

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

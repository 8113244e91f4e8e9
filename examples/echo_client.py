"""Connect to an echo service by serviceID, send messages, print the replies.

Usage (pyserval installed, or ``PYTHONPATH=src`` from the repository)::

    python examples/echo_client.py [--route 127.0.0.1:54325] [--service echo] [message ...]

The client's host has one static route in its service table: ``--service`` (a name or a
64-hex serviceID) to the Serval host at ``--route``. The connection is late-bound: the client
names the service and the service table picks where the SYN goes. ``--listen`` is this
host's own UDP address (default ``0.0.0.0:0``: any interface, a free port). Each message is sent in
turn and its echo printed on a line of its own (``hello`` when no message is given); the
client then half-closes, waits for the server to finish and exits 0. It exits 1 when the
service cannot be reached.

Without ``--route`` the route comes from the environment instead, through the default host
that ``pyserval.connect`` uses (a static route, a service router, or ad hoc broadcast)::

    PYSERVAL_ROUTES=echo=127.0.0.1:54325 python examples/echo_client.py hello
    PYSERVAL_ROUTER=127.0.0.1:54326 python examples/echo_client.py hello
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

import anyio

import pyserval


async def exchange(stream: pyserval.ServalStream, messages: list[str]) -> list[str]:
    """Send each message and read back exactly as many bytes; return the replies."""
    replies = []
    for message in messages:
        data = message.encode()
        await stream.send(data)
        got = b""
        while len(got) < len(data):
            got += await stream.receive()
        replies.append(got.decode())
    await stream.send_eof()
    try:  # the server closes its side once it has seen ours
        while await stream.receive():
            pass
    except anyio.EndOfStream:
        pass
    await stream.aclose()
    return replies


async def run(
    route: str | None, service: str, messages: list[str], *, listen: str, timeout: float
) -> int:
    """Connect (through ``route``, or PYSERVAL_ROUTES when None) and exchange the messages."""
    try:
        if route is not None:
            async with pyserval.Host(listen=[listen]) as host:
                host.add_route(service, route)
                stream = await host.connect(service, timeout=timeout)
                replies = await exchange(stream, messages)
        else:
            stream = await pyserval.connect(service, timeout=timeout)
            replies = await exchange(stream, messages)
            await (await pyserval.default_host()).close()
    except pyserval.ServalConnectError as exc:
        print(f"echo_client: {exc}", file=sys.stderr)
        return 1
    for reply in replies:
        print(reply, flush=True)
    return 0


def _configured() -> bool:
    """Whether the environment tells the default host how to reach services."""
    return any(os.environ.get(f"PYSERVAL_{k}") for k in ("ROUTES", "ROUTER", "BROADCAST"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serval echo client")
    parser.add_argument(
        "--route",
        default=None if _configured() else "127.0.0.1:54325",
        help="IP:PORT of the host serving the service (default: the PYSERVAL_* environment "
        "(ROUTES, ROUTER or BROADCAST) if set, else 127.0.0.1:54325)",
    )
    parser.add_argument("--listen", default="0.0.0.0:0", help="IP:PORT of this host (with --route)")
    parser.add_argument("--service", default="echo", help="service name or 64-hex serviceID")
    parser.add_argument("--timeout", type=float, default=10.0, help="connect timeout, seconds")
    parser.add_argument("messages", nargs="*", default=["hello"], help="messages to send")
    args = parser.parse_args(argv)
    return asyncio.run(
        run(args.route, args.service, args.messages, listen=args.listen, timeout=args.timeout)
    )


if __name__ == "__main__":
    raise SystemExit(main())

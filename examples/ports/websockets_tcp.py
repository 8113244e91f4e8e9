"""websockets (its asyncio API) on plain TCP: an echo server and a client that sends text,
a 1 MB binary message, and ends with a close code of the server's choosing.

The plain-TCP twin of ``websockets_serval.py``: ``diff websockets_tcp.py
websockets_serval.py`` is the whole port.

Usage: ``python examples/ports/websockets_tcp.py serve [HOST [PORT]]`` (the echo server;
prints ``serving``, then ``closed CODE`` for every connection that ends), or
``python examples/ports/websockets_tcp.py [HOST [PORT [ROUNDS]]]`` (the client, ROUNDS
1 MB messages; prints one JSON line).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys

from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed


async def echo(ws: ServerConnection) -> None:
    try:
        async for message in ws:
            if message == "close 4001":
                await ws.close(4001, "asked to")
                break
            await ws.send(message)
    finally:
        print(f"closed {ws.close_code}", flush=True)


async def server(host: str, port: int) -> None:
    async with serve(echo, host, port, max_size=2**21) as srv:
        print(f"serving websockets on {host}:{port}", flush=True)
        await srv.serve_forever()


async def client(host: str, port: int, rounds: int) -> dict[str, object]:
    sent, echoed = hashlib.sha256(), hashlib.sha256()
    # Pings every 5 s: a server that went away silently is noticed in about 10 s.
    async with connect(
        f"ws://{host}:{port}/", max_size=2**21, ping_interval=5, ping_timeout=5
    ) as ws:
        await ws.send("hello")
        text = await ws.recv()
        for _ in range(rounds):
            big = os.urandom(1_000_000)
            sent.update(big)
            await ws.send(big)
            back = await ws.recv()
            echoed.update(back if isinstance(back, bytes) else b"")
    # A second connection: the server closes it with its own code.
    async with connect(f"ws://{host}:{port}/") as ws:
        await ws.send("close 4001")
        try:
            await ws.recv()
        except ConnectionClosed as exc:
            code, reason = exc.rcvd.code if exc.rcvd else None, exc.rcvd.reason if exc.rcvd else ""
    return {
        "text": text,
        "sent_sha256": sent.hexdigest(),
        "echo_sha256": echoed.hexdigest(),
        "close_code": code,
        "close_reason": reason,
    }


if __name__ == "__main__":
    args = sys.argv[1:]
    serving = bool(args) and args[0] == "serve"
    args = args[1:] if serving else args
    host = args[0] if args else "127.0.0.1"
    port = int(args[1]) if len(args) > 1 else 8765
    if serving:
        asyncio.run(server(host, port))
    else:
        rounds = int(args[2]) if len(args) > 2 else 1
        print(json.dumps(asyncio.run(client(host, port, rounds))))

"""aiohttp on plain TCP: a web server with a streamed GET and a streamed POST, and a client.

The plain-TCP twin of ``aiohttp_serval.py``: ``diff aiohttp_tcp.py aiohttp_serval.py`` is
the whole port.

Usage: ``python examples/ports/aiohttp_tcp.py serve [HOST [PORT]]`` (the server; prints
``serving``), or ``python examples/ports/aiohttp_tcp.py [HOST [PORT [SIZE]]]`` (the client:
GET ``/data?size=SIZE`` and POST as many bytes to ``/sha256``, both streamed; prints one JSON
line).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

CHUNK = 64 * 1024
# A server that goes away silently must not leave the client waiting for ever.
TIMEOUT = aiohttp.ClientTimeout(total=None, sock_read=10)


def block(i: int) -> bytes:
    """The i-th 64 KiB of the content served by GET /data: SHA-256 of i, repeated."""
    return hashlib.sha256(str(i).encode()).digest() * (CHUNK // 32)


async def data(request: web.Request) -> web.StreamResponse:
    size = int(request.query["size"])
    response = web.StreamResponse()
    response.content_length = size
    await response.prepare(request)
    for i in range((size + CHUNK - 1) // CHUNK):
        await response.write(block(i)[: size - i * CHUNK])
    await response.write_eof()
    return response


async def sha256(request: web.Request) -> web.Response:
    digest, total = hashlib.sha256(), 0
    async for chunk in request.content.iter_chunked(CHUNK):
        digest.update(chunk)
        total += len(chunk)
    return web.json_response({"sha256": digest.hexdigest(), "bytes": total})


async def server(host: str, port: int) -> None:
    app = web.Application()
    app.add_routes([web.get("/data", data), web.post("/sha256", sha256)])
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    print(f"serving aiohttp on {host}:{port}", flush=True)
    await asyncio.Event().wait()


async def client(host: str, port: int, size: int) -> dict[str, object]:
    async def body() -> AsyncIterator[bytes]:
        for i in range((size + CHUNK - 1) // CHUNK):
            yield block(i)[: size - i * CHUNK]

    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        got, total = hashlib.sha256(), 0
        async with session.get(f"http://{host}:{port}/data", params={"size": size}) as resp:
            async for chunk in resp.content.iter_chunked(CHUNK):
                got.update(chunk)
                total += len(chunk)
        async with session.post(f"http://{host}:{port}/sha256", data=body()) as resp:
            posted = await resp.json()
    return {"get_sha256": got.hexdigest(), "get_bytes": total, "post": posted}


if __name__ == "__main__":
    args = sys.argv[1:]
    serving = bool(args) and args[0] == "serve"
    args = args[1:] if serving else args
    host = args[0] if args else "127.0.0.1"
    port = int(args[1]) if len(args) > 1 else 8080
    if serving:
        asyncio.run(server(host, port))
    else:
        size = int(args[2]) if len(args) > 2 else 3_000_000
        print(json.dumps(asyncio.run(client(host, port, size))))

"""A plain ASGI application for the HTTP-over-Serval tests (in process and as replicas).

- ``GET /whoami``: ``{"replica": $HTTP_APP_REPLICA, "pid": ..., "flowid": ...}``
- ``POST /sha256``: reads the body as it streams, answers ``{"bytes": n, "sha256": hex}``
- ``GET /download?n=BYTES``: streams :func:`pattern` bytes, 64 KiB per body message
- ``GET /boom``: raises (the server answers 500); ``/halfboom`` raises half way through
- ``GET /state``: what the lifespan startup put in the state
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qs

Message = MutableMapping[str, Any]

CHUNK = 65536


def pattern(index: int) -> bytes:
    """The ``index``-th 64 KiB chunk of a download: SHA-256 of the index, repeated."""
    return hashlib.sha256(index.to_bytes(8, "big")).digest() * (CHUNK // 32)


class Probe:
    """What the in-process tests watch: bytes produced by downloads, read by uploads."""

    def __init__(self) -> None:
        self.produced = 0
        self.upload_started = asyncio.Event()
        self.release_upload: asyncio.Event | None = None


probe = Probe()


async def _json(
    send: Callable[[Message], Awaitable[None]], data: object, status: int = 200
) -> None:
    body = json.dumps(data).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def app(
    scope: MutableMapping[str, Any],
    receive: Callable[[], Awaitable[Message]],
    send: Callable[[Message], Awaitable[None]],
) -> None:
    """The application (ASGI 3)."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                scope["state"]["started_by"] = "lifespan"
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    path, method = scope["path"], scope["method"]
    if path == "/whoami":
        serval = scope["extensions"]["serval"]
        await _json(
            send,
            {
                "replica": os.environ.get("HTTP_APP_REPLICA", "?"),
                "pid": os.getpid(),
                "flowid": serval["remote_flowid"],
                "query": scope["query_string"].decode(),
            },
        )
    elif path == "/sha256" and method == "POST":
        digest, total, first = hashlib.sha256(), 0, True
        while True:
            message = await receive()
            body = message.get("body", b"")
            digest.update(body)
            total += len(body)
            if first and probe.release_upload is not None:
                first = False
                probe.upload_started.set()
                await probe.release_upload.wait()
            if not message.get("more_body", False):
                break
        await _json(send, {"bytes": total, "sha256": digest.hexdigest()})
    elif path == "/download":
        size = int(parse_qs(scope["query_string"].decode())["n"][0])
        headers = [(b"content-type", b"application/octet-stream")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        index = 0
        while index * CHUNK < size:
            chunk = pattern(index)[: size - index * CHUNK]
            probe.produced += len(chunk)
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            index += 1
        await send({"type": "http.response.body", "body": b""})
    elif path == "/boom":
        raise RuntimeError("boom (on purpose)")
    elif path == "/halfboom":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"partial", "more_body": True})
        raise RuntimeError("boom half way (on purpose)")
    elif path == "/state":
        await _json(send, dict(scope["state"]))
    else:
        await _json(send, {"error": "not found"}, status=404)

"""A Serval stream reader that counts and hashes what it receives (in-process tests)."""

from __future__ import annotations

import asyncio
import hashlib

import anyio

from pyserval.runtime.streams import ServalStream


async def digest_sink(stream: ServalStream, digest: asyncio.Future[tuple[int, str]]) -> None:
    """Read ``stream`` to its end; set ``digest`` to (byte count, SHA-256 hex)."""
    h = hashlib.sha256()
    n = 0
    try:
        while True:
            chunk = await stream.receive(1 << 20)
            h.update(chunk)
            n += len(chunk)
    except anyio.EndOfStream:
        pass
    digest.set_result((n, h.hexdigest()))

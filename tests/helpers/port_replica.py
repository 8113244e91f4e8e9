"""One server replica of a ported program (``examples/ports/NAME_serval.py serve``) that
reports, from its own process, what it is carrying: the replica-SIGKILL tests kill the
replica that says it carries the transfer, not one guessed from outside.

Run as a script (``PYTHONPATH`` must reach ``src``)::

    python tests/helpers/port_replica.py aiohttp serve
    python tests/helpers/port_replica.py asyncssh serve KEYS

The example runs unchanged (as ``__main__``, with the rest of the command line); only the
library's own server-side send or write path is wrapped, so the probe sees the bytes the
library handed on. It prints, flushed, on stdout:

- ``request WHAT`` when a transfer starts (aiohttp: a response is prepared, ``GET /data``;
  websockets: the first message echoed on a connection; asyncssh: an SFTP file opened);
- ``carrying N`` once per transfer, when N >= 4 MiB of it went through this replica (aiohttp:
  body bytes written and drained; websockets: bytes echoed; asyncssh: bytes written to the
  SFTP file);
- ``done WHAT N`` when a transfer ended normally, with its byte count.

It is a test helper, not an example: it adds nothing to the lines-changed figures.
"""

from __future__ import annotations

import runpy
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

PORTS = Path(__file__).resolve().parents[2] / "examples" / "ports"
MARK = 4 * 1024 * 1024


class Tally:
    """Bytes per transfer (keyed by the library's object for it), and the lines to print."""

    def __init__(self) -> None:
        self.sent: dict[int, int] = {}
        self.what: dict[int, str] = {}

    def start(self, key: object, what: str) -> None:
        self.sent[id(key)], self.what[id(key)] = 0, what
        say(f"request {what}")

    def add(self, key: object, n: int) -> None:
        before = self.sent.get(id(key), 0)
        self.sent[id(key)] = before + n
        if before < MARK <= before + n:
            say(f"carrying {before + n}")

    def end(self, key: object) -> None:
        say(f"done {self.what.pop(id(key), '?')} {self.sent.pop(id(key), 0)}")


def say(line: str) -> None:
    print(line, flush=True)


def probe_aiohttp(tally: Tally) -> None:
    from aiohttp import web

    prepare, write, write_eof = (
        web.StreamResponse.prepare,
        web.StreamResponse.write,
        web.StreamResponse.write_eof,
    )

    async def traced_prepare(self: web.StreamResponse, request: web.BaseRequest) -> Any:
        if not self.prepared:  # aiohttp prepares a handler's response once more: no-op
            tally.start(self, f"{request.method} {request.path_qs}")
        return await prepare(self, request)

    async def traced_write(self: web.StreamResponse, data: Any) -> None:
        await write(self, data)
        tally.add(self, len(data))

    async def traced_write_eof(self: web.StreamResponse, data: bytes = b"") -> None:
        await write_eof(self, data)
        if id(self) in tally.sent:
            tally.end(self)

    web.StreamResponse.prepare = traced_prepare  # type: ignore[method-assign]
    web.StreamResponse.write = traced_write  # type: ignore[method-assign]
    web.StreamResponse.write_eof = traced_write_eof  # type: ignore[method-assign]


def probe_websockets(tally: Tally) -> None:
    from websockets.asyncio.server import ServerConnection

    send = ServerConnection.send

    async def traced_send(self: ServerConnection, message: Any, *args: Any, **kw: Any) -> None:
        if id(self) not in tally.sent:
            tally.start(self, "websocket")
        await send(self, message, *args, **kw)
        tally.add(self, len(message))

    ServerConnection.send = traced_send  # type: ignore[method-assign,assignment]  # a wrapper


def probe_asyncssh(tally: Tally) -> None:
    import asyncssh

    server = asyncssh.SFTPServer
    open_, write, close = server.open, server.write, server.close

    def traced_open(self: Any, path: bytes, pflags: int, attrs: Any) -> Any:
        file_obj = open_(self, path, pflags, attrs)
        tally.start(file_obj, f"sftp {path.decode(errors='replace')}")
        return file_obj

    def traced_write(self: Any, file_obj: Any, offset: int, data: bytes) -> Any:
        done = write(self, file_obj, offset, data)
        tally.add(file_obj, len(data))
        return done

    def traced_close(self: Any, file_obj: Any) -> Any:
        done = close(self, file_obj)
        tally.end(file_obj)
        return done

    server.open = traced_open  # type: ignore[method-assign]
    server.write = traced_write  # type: ignore[method-assign]
    server.close = traced_close  # type: ignore[method-assign]


PROBES: dict[str, Callable[[Tally], None]] = {
    "aiohttp": probe_aiohttp,
    "websockets": probe_websockets,
    "asyncssh": probe_asyncssh,
}

if __name__ == "__main__":
    name, argv = sys.argv[1], sys.argv[2:]
    PROBES[name](Tally())
    script = PORTS / f"{name}_serval.py"
    sys.argv = [str(script), *argv]
    runpy.run_path(str(script), run_name="__main__")

"""A minimal ASGI application to serve on a serviceID with ``pyserval serve-asgi``.

Usage (pyserval installed with the [http] extra)::

    pyserval serve-asgi asgi_hello:app --app-dir examples --service web --router 127.0.0.1:54326

Any ASGI application works the same way (Starlette, FastAPI: ``main:app``); this one needs no
framework. ``GET /`` answers which instance served it (the process ID) and the client's
flowID; any other path echoes the request body back.
"""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Message = MutableMapping[str, Any]


async def app(
    scope: MutableMapping[str, Any],
    receive: Callable[[], Awaitable[Message]],
    send: Callable[[Message], Awaitable[None]],
) -> None:
    """The application (ASGI 3)."""
    if scope["type"] != "http":
        return  # no lifespan handlers needed
    if scope["path"] == "/":
        serval = scope["extensions"]["serval"]
        body = json.dumps({"pid": os.getpid(), "client_flowid": serval["remote_flowid"]}).encode()
        content_type = b"application/json"
    else:
        body = b""
        while True:  # the body arrives as the application asks for it
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        content_type = b"application/octet-stream"
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})

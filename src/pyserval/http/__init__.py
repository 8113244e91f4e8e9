"""HTTP over Serval: httpx clients reach services by serviceID, ASGI apps serve on one.

- Client: ``httpx.AsyncClient(transport=AsyncServalTransport(host))`` and URLs
  ``http://NAME.serval/path`` (:mod:`pyserval.http.client`).
- Server: ``await serve_asgi(app, host, "web")`` or ``pyserval serve-asgi module:app --service
  web`` (:mod:`pyserval.http.server`).

Needs the optional extra: ``pip install 'pyserval[http]'`` (httpx, httpcore, h11). Not
imported by ``import pyserval``.
"""

from __future__ import annotations

try:
    from .client import (
        SERVAL_SUFFIX,
        AsyncServalTransport,
        ServalNetworkBackend,
        ServalNetworkStream,
        resolve_serval_host,
    )
    from .server import ASGIApp, AsgiServer, LifespanError, serve_asgi
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        f"pyserval.http needs the [http] extra: pip install 'pyserval[http]' ({exc})"
    ) from exc

__all__ = [
    "SERVAL_SUFFIX",
    "ASGIApp",
    "AsgiServer",
    "AsyncServalTransport",
    "LifespanError",
    "ServalNetworkBackend",
    "ServalNetworkStream",
    "resolve_serval_host",
    "serve_asgi",
]

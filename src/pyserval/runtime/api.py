"""The high-level API on a process-wide default host: ``pyserval.connect`` and friends.

The default host is created on first use from ``PYSERVAL_*`` environment variables
(:meth:`HostConfig.from_env`) and started on the running event loop. Every function takes
``host=`` to use another one.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from typing import Literal, overload

from ..naming.delegation import Delegation
from ..naming.keys import ServiceKey
from ..naming.service_id import ServiceLike
from .host import Host, HostConfig
from .secure import SecureListener, SecureStream
from .stdio import open_connection_on, start_server_on
from .streams import ServalListener, ServalStream

__all__ = ["connect", "default_host", "listen", "open_connection", "start_server"]

_default: Host | None = None
_default_loop: asyncio.AbstractEventLoop | None = None


async def default_host() -> Host:
    """The process-wide host (created and started on first use, per event loop)."""
    global _default, _default_loop
    loop = asyncio.get_running_loop()
    if _default is None or _default_loop is not loop or _default.closed:
        # A closed default host is replaced: a Host does not restart.
        _default = Host(config=HostConfig.from_env())
        _default_loop = loop
        await _default.start()
    return _default


@overload
async def connect(
    service: ServiceLike,
    *,
    host: Host | None = None,
    timeout: float | None = None,
    secure: Literal[False] = False,
) -> ServalStream: ...


@overload
async def connect(
    service: ServiceLike,
    *,
    host: Host | None = None,
    timeout: float | None = None,
    secure: Literal[True],
    ssl_context: ssl.SSLContext | None = None,
) -> SecureStream: ...


async def connect(
    service: ServiceLike,
    *,
    host: Host | None = None,
    timeout: float | None = None,
    secure: bool = False,
    ssl_context: ssl.SSLContext | None = None,
) -> ServalStream | SecureStream:
    """Open a stream to ``service`` (an ``anyio.abc.ByteStream``); ``secure=True``: TLS 1.3
    that proves the serviceID (see :meth:`Host.connect`).

    Raises :class:`ServalConnectError`; after ``timeout`` seconds without an answer its
    subclass :class:`ServalConnectTimeout`, which is also a :class:`TimeoutError`.
    """
    h = host or await default_host()
    stream: ServalStream | SecureStream = await h.connect(
        service, timeout=timeout, secure=secure, ssl_context=ssl_context
    )
    return stream


@overload
async def listen(
    service: ServiceLike,
    *,
    host: Host | None = None,
    backlog: int = 128,
    weight: int = 1,
    priority: int = 0,
    key: ServiceKey | None = None,
    secure: Literal[False] = False,
) -> ServalListener: ...


@overload
async def listen(
    service: ServiceLike,
    *,
    host: Host | None = None,
    backlog: int = 128,
    weight: int = 1,
    priority: int = 0,
    key: ServiceKey | None = None,
    secure: Literal[True],
    delegation: Delegation | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> SecureListener: ...


async def listen(
    service: ServiceLike,
    *,
    host: Host | None = None,
    backlog: int = 128,
    weight: int = 1,
    priority: int = 0,
    key: ServiceKey | None = None,
    secure: bool = False,
    delegation: Delegation | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> ServalListener | SecureListener:
    """Accept streams to ``service``: ``async for stream in listener`` or ``serve(handler)``.

    ``weight``, ``priority`` and ``key`` are those of :meth:`Host.listen` (the registration
    with the host's router; ``key`` signs a self-certifying serviceID's); ``secure``,
    ``delegation``, ``ssl_context`` as for :meth:`Host.listen` too.
    """
    h = host or await default_host()
    listener: ServalListener | SecureListener = await h.listen(
        service,
        backlog,
        weight=weight,
        priority=priority,
        key=key,
        secure=secure,
        delegation=delegation,
        ssl_context=ssl_context,
    )
    return listener


async def open_connection(
    service: ServiceLike,
    *,
    host: Host | None = None,
    timeout: float | None = None,
    limit: int = 2**16,
    secure: bool = False,
    ssl_context: ssl.SSLContext | None = None,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Like :func:`asyncio.open_connection`, to a serviceID instead of host and port
    (``secure=True``: TLS 1.3 that proves the serviceID, see :meth:`Host.connect`)."""
    h = host or await default_host()
    return await open_connection_on(
        h, service, timeout=timeout, limit=limit, secure=secure, ssl_context=ssl_context
    )


async def start_server(
    client_connected_cb: Callable[
        [asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None] | None
    ],
    service: ServiceLike,
    *,
    host: Host | None = None,
    backlog: int = 128,
    limit: int = 2**16,
    key: ServiceKey | None = None,
    secure: bool = False,
    delegation: Delegation | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> asyncio.AbstractServer:
    """Like :func:`asyncio.start_server`, serving a serviceID (``key``, ``secure``,
    ``delegation``, ``ssl_context`` as for :meth:`Host.listen`)."""
    h = host or await default_host()
    return await start_server_on(
        h,
        client_connected_cb,
        service,
        backlog=backlog,
        limit=limit,
        key=key,
        secure=secure,
        delegation=delegation,
        ssl_context=ssl_context,
    )

"""asyncio ``StreamReader``/``StreamWriter`` over Serval: port an asyncio program by
changing one call (``asyncio.open_connection`` -> ``pyserval.open_connection``).

:class:`ServalTransport` is an ``asyncio.Transport`` on a Serval connection. Writes go into
the connection's bounded send buffer; what does not fit waits in the transport, and past the
high-water mark the protocol is paused, so ``writer.drain()`` really waits until the peer has
acknowledged data. ``pause_reading`` stops taking data from the connection, which closes the
advertised window: the sender slows down.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from ..naming.delegation import Delegation
from ..naming.keys import ServiceKey
from ..naming.service_id import ServiceLike
from ..transport.connection import Connection
from ..transport.events import (
    ConnectionClosed,
    ConnectionReset,
    ConnectionTimedOut,
    DataReceived,
    Event,
    SendSpaceAvailable,
    StreamEnded,
)
from .secure import SecureListener, SecureStream
from .stream_transport import ByteStreamTransport
from .streams import ServalListener, ServalStream, StreamHost

if TYPE_CHECKING:  # only the two openers below need a whole host
    from .host import Host

__all__ = ["ServalServer", "ServalTransport", "open_connection_on", "start_server_on"]

ClientConnected = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None] | None]


class ServalTransport(asyncio.Transport):
    """An asyncio transport on one Serval connection (see the module docstring)."""

    def __init__(self, host: StreamHost, conn: Connection, protocol: asyncio.BaseProtocol) -> None:
        super().__init__()
        self._host = host
        self._conn = conn
        self._protocol = protocol
        self._pending = bytearray()
        self._high = 64 * 1024
        self._low = 16 * 1024
        self._write_paused = False
        self._read_paused = False
        self._closing = False
        self._eof_wanted = False
        self._lost = False
        self._eof_delivered = False
        host.watch(conn, self._on_event)
        protocol.connection_made(self)
        self._deliver()

    # -- events from the core -----------------------------------------------------------
    def _on_event(self, event: Event) -> None:
        if isinstance(event, DataReceived | StreamEnded):
            self._deliver()
        elif isinstance(event, SendSpaceAvailable):
            self._push()
        elif isinstance(event, ConnectionReset | ConnectionTimedOut):
            self._connection_lost(ConnectionResetError(f"Serval connection lost: {event.reason}"))
        elif isinstance(event, ConnectionClosed):
            self._deliver()
            self._connection_lost(None)

    def _deliver(self) -> None:
        conn = self._conn
        while not self._read_paused and not self._lost:
            data = conn.read(256 * 1024)
            if not data:
                break
            _feed(self._protocol, data)
            self._host.schedule_flush()  # the window may have opened
        if conn.at_eof and not self._eof_delivered and not self._read_paused and not self._lost:
            self._eof_delivered = True
            keep_open = self._protocol.eof_received()  # type: ignore[attr-defined]
            if not keep_open:
                self.close()

    def _push(self) -> None:
        conn = self._conn
        if self._pending and not conn.closed:
            n = conn.write(self._pending)
            del self._pending[:n]
            self._host.schedule_flush()
        if self._write_paused and len(self._pending) <= self._low:
            self._write_paused = False
            self._protocol.resume_writing()
        if not self._pending and self._eof_wanted and conn.fin_offset is None:
            if not conn.closed:
                conn.shutdown()
                self._host.schedule_flush()
            if self._closing:
                self._host.loop.call_soon(self._connection_lost, None)

    def _connection_lost(self, exc: Exception | None) -> None:
        if self._lost:
            return
        self._lost = True
        self._host.unwatch(self._conn)
        self._protocol.connection_lost(exc)

    # -- asyncio.WriteTransport ---------------------------------------------------------
    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._eof_wanted:
            raise RuntimeError("cannot write after write_eof() or close()")
        if self._lost or self._conn.closed:
            return  # like asyncio's transports: writes after loss are dropped
        self._pending += data
        self._push()
        if not self._write_paused and len(self._pending) > self._high:
            self._write_paused = True
            self._protocol.pause_writing()

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self._eof_wanted = True
        self._push()

    def get_write_buffer_size(self) -> int:
        return len(self._pending)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low, self._high

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._high = 64 * 1024 if high is None else high
        self._low = self._high // 4 if low is None else low

    def abort(self) -> None:
        self._closing = True
        self._conn.abort()
        self._host.schedule_flush()
        self._host.loop.call_soon(self._connection_lost, None)

    # -- asyncio.ReadTransport ----------------------------------------------------------
    def pause_reading(self) -> None:
        self._read_paused = True

    def resume_reading(self) -> None:
        if self._read_paused:
            self._read_paused = False
            self._deliver()

    def is_reading(self) -> bool:
        return not self._read_paused

    # -- asyncio.BaseTransport ----------------------------------------------------------
    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._eof_wanted = True
        if self._conn.closed and not self._pending:
            self._host.loop.call_soon(self._connection_lost, None)
            return
        self._push()

    def is_closing(self) -> bool:
        return self._closing or self._lost

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        sf = self._conn.primary
        info = {
            "peername": sf.remote_addr,
            "sockname": sf.local_addr,
            "serviceid": self._conn.service_id,
            "local_flowid": sf.local_flowid,
            "remote_flowid": sf.remote_flowid,
            "serval_connection": self._conn,
        }
        return info.get(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol


def _feed(protocol: asyncio.BaseProtocol, data: bytes) -> None:
    """Hand ``data`` to a protocol of either kind (TLS on top is a ``BufferedProtocol``)."""
    if not isinstance(protocol, asyncio.BufferedProtocol):
        protocol.data_received(data)  # type: ignore[attr-defined]
        return
    view = memoryview(data)
    while view:
        buf = memoryview(protocol.get_buffer(len(view)))
        n = min(len(buf), len(view))
        if n == 0:
            raise RuntimeError("get_buffer() returned an empty buffer")
        buf[:n] = view[:n]
        protocol.buffer_updated(n)
        view = view[n:]


async def open_connection_on(
    host: Host,
    service: ServiceLike,
    *,
    timeout: float | None = None,
    limit: int = 2**16,
    secure: bool = False,
    ssl_context: ssl.SSLContext | None = None,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """``asyncio.open_connection`` to ``service`` through ``host`` (``secure`` and
    ``ssl_context`` as for :meth:`Host.connect`)."""
    stream = await host.connect(service, timeout=timeout, secure=secure, ssl_context=ssl_context)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=limit, loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    transport = _transport_for(host, stream, protocol)
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)
    return reader, writer


def _transport_for(
    host: StreamHost, stream: ServalStream | SecureStream, protocol: asyncio.Protocol
) -> asyncio.Transport:
    """A plain stream's connection directly; a secure one through its TLS layer."""
    if isinstance(stream, ServalStream):
        return ServalTransport(host, stream.connection, protocol)
    assert isinstance(stream, SecureStream)
    extra = {
        "peername": stream.remote_address,
        "sockname": stream.local_address,
        "serviceid": stream.service_id,
        "local_flowid": stream.local_flowid,
        "remote_flowid": stream.remote_flowid,
        "serval_connection": stream.connection,
        "ssl_object": stream._ssl_object,
        "peer_identity": stream.peer,
    }
    return ByteStreamTransport(stream, protocol, extra)


class ServalServer(asyncio.AbstractServer):
    """What :func:`start_server_on` returns: an ``asyncio.AbstractServer`` on a service."""

    def __init__(
        self,
        host: StreamHost,
        listener: ServalListener | SecureListener,
        callback: ClientConnected,
        limit: int,
    ) -> None:
        self._host = host
        self._listener = listener
        self._callback = callback
        self._limit = limit
        self._task: asyncio.Task[None] | None = asyncio.ensure_future(self._accept_loop())
        self._closed = asyncio.Event()

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        async for stream in self._listener:
            reader = asyncio.StreamReader(limit=self._limit, loop=loop)
            protocol = asyncio.StreamReaderProtocol(reader, self._callback, loop=loop)
            _transport_for(self._host, stream, protocol)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self._host.loop.call_soon(lambda: asyncio.ensure_future(self._listener.aclose()))
        self._closed.set()

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._host.loop

    def is_serving(self) -> bool:
        return self._task is not None

    async def start_serving(self) -> None:
        return None

    async def serve_forever(self) -> None:
        await self._closed.wait()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    @property
    def sockets(self) -> tuple[Any, ...]:
        return ()


async def start_server_on(
    host: Host,
    callback: ClientConnected,
    service: ServiceLike,
    *,
    backlog: int = 128,
    limit: int = 2**16,
    key: ServiceKey | None = None,
    secure: bool = False,
    delegation: Delegation | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> ServalServer:
    """``asyncio.start_server`` for ``service`` on ``host`` (``key``, ``secure``,
    ``delegation`` and ``ssl_context`` as for :meth:`Host.listen`)."""
    listener = await host.listen(
        service, backlog, key=key, secure=secure, delegation=delegation, ssl_context=ssl_context
    )
    return ServalServer(host, listener, callback, limit)

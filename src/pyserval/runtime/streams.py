"""Streams and listeners for applications: ``anyio.abc.ByteStream`` over Serval TCP."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol

import anyio
import anyio.abc

from ..core.host import Listener
from ..errors import (  # re-exported: their home before pyserval.errors
    ServalConnectError,
    ServalConnectRefused,
    ServalConnectTimeout,
    ServalConnectUnreachable,
    ServalMigrationError,
)
from ..naming.service_id import ServiceID
from ..sal.inet import Address
from ..transport.connection import Connection, State
from ..transport.events import Event

__all__ = [
    "ServalConnectError",
    "ServalConnectRefused",
    "ServalConnectTimeout",
    "ServalConnectUnreachable",
    "ServalListener",
    "ServalMigrationError",
    "ServalStream",
    "StreamHost",
]


class StreamHost(Protocol):
    """What streams, listeners and transports need from their host: a
    :class:`~pyserval.runtime.host.Host` is one. (A protocol, so that this module, below the
    host, does not import it.)"""

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop the host runs on."""
        ...

    def schedule_flush(self) -> None:
        """Send what the core has, once, at the end of this loop pass."""

    def send_now(self) -> None:
        """Send what the core has at once (a SYN, FIN or RST an application call caused)."""

    async def wait(self, conn: Connection, ready: Callable[[], bool]) -> None:
        """Wait until ``ready()`` holds for ``conn`` (or the host closed)."""

    async def wait_incoming(self, listener: Listener) -> Connection | None:
        """The next established connection of ``listener`` (None once closed)."""

    def close_listener(self, listener: Listener) -> None:
        """Stop accepting on ``listener``."""

    def watch(self, conn: Connection | int, callback: Callable[[Event], None]) -> None:
        """Call ``callback`` with every event of ``conn``."""

    def unwatch(self, conn: Connection | int) -> None:
        """Stop calling the watcher of ``conn``."""

    async def migrate(
        self,
        conn: Connection,
        local: str | Address,
        timeout: float,
        remote: str | Address | None = None,
    ) -> None:
        """Move ``conn`` to the interface ``local``; returns once the peer confirmed."""

    async def add_path(
        self, conn: Connection, local: str | Address, remote: str | Address, timeout: float
    ) -> None:
        """Open another subflow of multipath ``conn``; returns once it carries data."""


class ServalStream(anyio.abc.ByteStream):
    """A connected Serval TCP stream. ``send`` waits while the send buffer is full."""

    def __init__(self, host: StreamHost, conn: Connection) -> None:
        self._host = host
        self._conn = conn
        self._closed = False

    # -- identity -----------------------------------------------------------------------
    @property
    def connection(self) -> Connection:
        """The sans-I/O connection underneath."""
        return self._conn

    @property
    def service_id(self) -> ServiceID:
        """The serviceID this stream was connected to (or accepted on)."""
        return self._conn.service_id

    @property
    def local_flowid(self) -> int:
        """Our flowID of the (first) subflow."""
        return self._conn.primary.local_flowid

    @property
    def remote_flowid(self) -> int:
        """The peer's flowID of the (first) subflow."""
        return self._conn.primary.remote_flowid

    @property
    def local_address(self) -> Address:
        """Our address on the (first) subflow."""
        return self._conn.primary.local_addr

    @property
    def remote_address(self) -> Address | None:
        """The peer's address on the (first) subflow."""
        return self._conn.primary.remote_addr

    @property
    def paths(self) -> list[tuple[Address, Address | None]]:
        """(local, remote) address pair of each subflow."""
        return self._conn.flows.paths

    @property
    def multipath(self) -> bool:
        """Whether both ends agreed to multipath (``StreamConfig(multipath=True)``)."""
        return self._conn.mp is not None

    @property
    def peer_addresses(self) -> list[Address]:
        """Other addresses the peer advertised (ADD_ADDR): candidates for :meth:`add_path`."""
        mp = self._conn.mp
        return list(mp.peer_addresses) if mp is not None else []

    async def add_path(
        self, local_address: str | Address, remote_address: str | Address, *, timeout: float = 10.0
    ) -> None:
        """Open another subflow between one of the host's interfaces and one of the peer's
        addresses; returns once it carries data. The connection must be multipath."""
        self._check()
        await self._host.add_path(self._conn, local_address, remote_address, timeout)

    async def migrate(
        self,
        local_address: str | Address,
        *,
        timeout: float = 10.0,
        remote: str | Address | None = None,
    ) -> None:
        """Move this connection to another of the host's interfaces (``"IP:PORT"`` or
        ``"[IPv6]:PORT"``).

        Returns once the peer confirmed the move (RSYN exchange); raises
        :class:`ServalMigrationError` if it cannot start or is not confirmed in time. Data
        in flight is sent again on the new path; nothing is lost or duplicated. A move to
        the other IP family also needs the peer's address in that family: ``remote``, or
        one the peer advertised (multipath ADD_ADDR).
        """
        self._check()
        await self._host.migrate(self._conn, local_address, timeout, remote)

    # -- anyio.abc.ByteStream -----------------------------------------------------------
    def _check(self) -> None:
        if self._closed:
            raise anyio.ClosedResourceError("this stream was closed")
        if self._conn.state is State.CLOSED and self._conn.error:
            raise anyio.BrokenResourceError(f"connection lost: {self._conn.error}")

    def _check_send(self) -> None:
        self._check()
        conn = self._conn
        if conn.fin_offset is not None:
            # Our own send_eof (or close): anyio's contract says ClosedResourceError.
            raise anyio.ClosedResourceError("this stream's sending side was closed (send_eof)")
        if conn.state is State.CLOSED or conn.state is State.TIME_WAIT:
            raise anyio.BrokenResourceError("the connection is closed")

    async def send(self, item: bytes) -> None:
        """Send all of ``item``, waiting while the send buffer is full (backpressure).

        ``anyio.ClosedResourceError`` after our own ``aclose`` or ``send_eof``,
        ``anyio.BrokenResourceError`` once the connection was lost (reset, timed out)."""
        self._check_send()
        conn = self._conn
        view = memoryview(item)
        while view:
            n = conn.write(view)
            view = view[n:]
            self._host.schedule_flush()
            if view:
                await self._host.wait(conn, lambda: conn.send.free > 0 or conn.closed)
                self._check_send()

    async def receive(self, max_bytes: int = 65536) -> bytes:
        """The next bytes; ``anyio.EndOfStream`` once the peer finished sending."""
        if self._closed:
            raise anyio.ClosedResourceError("this stream was closed")
        conn = self._conn
        await self._host.wait(
            conn, lambda: conn.readable > 0 or conn.peer_fin_received or conn.closed
        )
        data = conn.read(max_bytes)
        if data:
            self._host.schedule_flush()  # may open the window
            return data
        if conn.peer_fin_received:
            raise anyio.EndOfStream
        if conn.error:
            raise anyio.BrokenResourceError(f"connection lost: {conn.error}")
        raise anyio.EndOfStream

    async def send_eof(self) -> None:
        """Half-close: the peer reads end of stream after what we sent (again: nothing)."""
        self._check()
        conn = self._conn
        if conn.fin_offset is not None:
            return
        if conn.state is State.CLOSED or conn.state is State.TIME_WAIT:
            raise anyio.BrokenResourceError("the connection is closed")
        conn.shutdown()
        self._host.send_now()

    async def aclose(self) -> None:
        """Close: finish sending (FIN) and stop using the stream."""
        if self._closed:
            return
        self._closed = True
        conn = self._conn
        if conn.state in (State.ESTABLISHED, State.SYN_RECEIVED) and conn.fin_offset is None:
            conn.shutdown()
        self._host.send_now()

    async def abort(self) -> None:
        """Reset the connection at once."""
        self._closed = True
        self._conn.abort()
        self._host.send_now()


class ServalListener(anyio.abc.Listener[ServalStream]):
    """Accepts streams to a service: an ``anyio.abc.Listener`` (``serve(handler)``,
    ``async with listener``), and ``async for stream in listener``."""

    def __init__(self, host: StreamHost, listener: Listener) -> None:
        self._host = host
        self._listener = listener

    @property
    def service_id(self) -> ServiceID:
        """The service listened on."""
        return self._listener.service_id

    async def accept(self) -> ServalStream:
        """The next incoming stream."""
        conn = await self._host.wait_incoming(self._listener)
        if conn is None:
            raise anyio.ClosedResourceError("the listener was closed")
        return ServalStream(self._host, conn)

    def __aiter__(self) -> AsyncIterator[ServalStream]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[ServalStream]:
        while True:
            try:
                yield await self.accept()
            except anyio.ClosedResourceError:
                return

    async def serve(
        self,
        handler: Callable[[ServalStream], Awaitable[object]],
        task_group: anyio.abc.TaskGroup | None = None,
    ) -> None:
        """Run ``handler(stream)`` in its own task for every incoming stream (in
        ``task_group`` if given, else in one of its own), until the listener is closed.
        Each stream is closed when its handler returns."""
        if task_group is not None:
            async for stream in self:
                task_group.start_soon(_run_handler, handler, stream)
            return
        async with anyio.create_task_group() as tg:
            async for stream in self:
                tg.start_soon(_run_handler, handler, stream)

    async def aclose(self) -> None:
        """Stop listening."""
        self._host.close_listener(self._listener)


async def _run_handler(
    handler: Callable[[ServalStream], Awaitable[object]], stream: ServalStream
) -> None:
    async with stream:
        await handler(stream)

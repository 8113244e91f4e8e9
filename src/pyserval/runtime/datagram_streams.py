"""Connected datagram flows for applications: ``anyio.abc.UnreliableObjectStream[bytes]``.

``await host.connect(service, kind="datagram")`` returns a :class:`ServalDatagramStream`;
``await host.listen(service, kind="datagram")`` a :class:`ServalDatagramListener` that yields
one such stream per client flow. Each ``send`` is one datagram and each ``receive`` returns
one, boundaries kept, with no serviceID per call (the peer is fixed by the handshake). As
with UDP nothing is retransmitted or reordered back: a datagram lost on the way, or arriving
while the receive queue is full, is gone (``dropped`` counts the latter).

Errors are anyio's: ``EndOfStream`` once the peer closed (its SAL FIN) and every datagram
was taken, ``BrokenResourceError`` after a reset or timeout, ``ClosedResourceError`` after
our own ``aclose``. What this module does not do: connect or resolve (the host does), or
unconnected datagrams (``ServalSocket.sendto``/``recvfrom``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import anyio
import anyio.abc

from ..core.host import Listener
from ..errors import ConnectionStateError
from ..naming.service_id import ServiceID
from ..sal.inet import Address
from ..transport.connection import State
from ..transport.datagram_flow import DatagramConnection
from .streams import StreamHost

__all__ = ["ServalDatagramListener", "ServalDatagramStream"]


class ServalDatagramStream(anyio.abc.UnreliableObjectStream[bytes]):
    """A connected Serval datagram flow (see the module docstring)."""

    def __init__(self, host: StreamHost, conn: DatagramConnection) -> None:
        self._host = host
        self._conn = conn
        self._closed = False

    # -- identity -----------------------------------------------------------------------
    @property
    def connection(self) -> DatagramConnection:
        """The sans-I/O flow underneath."""
        return self._conn

    @property
    def service_id(self) -> ServiceID:
        """The serviceID this flow was connected to (or accepted on)."""
        return self._conn.service_id

    @property
    def local_flowid(self) -> int:
        """Our flowID."""
        return self._conn.primary.local_flowid

    @property
    def remote_flowid(self) -> int:
        """The peer's flowID."""
        return self._conn.primary.remote_flowid

    @property
    def local_address(self) -> Address:
        """Our address (changes with :meth:`migrate`)."""
        return self._conn.primary.local_addr

    @property
    def remote_address(self) -> Address | None:
        """The peer's address."""
        return self._conn.primary.remote_addr

    @property
    def dropped(self) -> int:
        """Datagrams dropped by this end because a queue was full."""
        drops = self._conn.drops
        return drops["rx_queue_full"] + drops["tx_queue_full"]

    async def migrate(self, local_address: str | Address, *, timeout: float = 10.0) -> None:
        """Move this flow to another of the host's interfaces (RSYN exchange); returns once
        the peer confirmed (``ServalMigrationError`` otherwise)."""
        self._check()
        await self._host.migrate(self._conn, local_address, timeout)

    # -- anyio.abc.UnreliableObjectStream -------------------------------------------------
    def _check(self) -> None:
        if self._closed:
            raise anyio.ClosedResourceError("this datagram stream was closed")
        conn = self._conn
        if conn.state is State.CLOSED and conn.error:
            raise anyio.BrokenResourceError(f"flow lost: {conn.error}")

    def _check_send(self) -> None:
        self._check()
        if self._conn.fin_offset is not None:
            # Our own send_eof: anyio's contract says ClosedResourceError, not broken.
            raise anyio.ClosedResourceError("this flow's sending side was closed (send_eof)")

    async def send(self, item: bytes) -> None:
        """Send one datagram (``DatagramTooLarge`` above the limit, ValueError if empty).

        When the send queue is full it first lets the host send (one loop pass); a datagram
        that still finds it full (the flow is migrating) is dropped, as UDP would.
        """
        self._check_send()
        conn = self._conn
        if not conn.has_room(len(item)):
            self._host.schedule_flush()
            await anyio.sleep(0)  # the flush runs: the queue empties unless the path changes
            self._check_send()
        try:
            conn.send_datagram(item)
        except ConnectionStateError as exc:
            raise anyio.BrokenResourceError(str(exc)) from None
        self._host.schedule_flush()

    async def receive(self) -> bytes:
        """The next datagram; ``anyio.EndOfStream`` once the peer closed."""
        if self._closed:
            raise anyio.ClosedResourceError("this datagram stream was closed")
        conn = self._conn
        await self._host.wait(
            conn, lambda: conn.readable > 0 or conn.peer_fin_received or conn.closed
        )
        data = conn.receive_datagram()
        if data is not None:
            return data
        if conn.peer_fin_received:
            raise anyio.EndOfStream
        if conn.error:
            raise anyio.BrokenResourceError(f"flow lost: {conn.error}")
        raise anyio.EndOfStream

    async def send_eof(self) -> None:
        """Close our sending side (SAL FIN): the peer reads end of stream; ``receive`` goes
        on until the peer closes too."""
        self._check()
        conn = self._conn
        if conn.state is State.ESTABLISHED and conn.fin_offset is None:
            conn.shutdown()
            self._host.schedule_flush()

    async def aclose(self) -> None:
        """Close our side (SAL FIN); the peer reads end of stream."""
        if self._closed:
            return
        self._closed = True
        conn = self._conn
        if conn.state is State.ESTABLISHED and conn.fin_offset is None:
            conn.shutdown()
        elif conn.state is State.SYN_RECEIVED:
            conn.abort()
        self._host.schedule_flush()

    async def abort(self) -> None:
        """Reset the flow at once."""
        self._closed = True
        self._conn.abort()
        self._host.schedule_flush()


class ServalDatagramListener:
    """Accepts datagram flows to a service: ``async for flow in listener`` or ``serve``."""

    def __init__(self, host: StreamHost, listener: Listener) -> None:
        self._host = host
        self._listener = listener

    @property
    def service_id(self) -> ServiceID:
        """The service listened on."""
        return self._listener.service_id

    async def accept(self) -> ServalDatagramStream:
        """The next client's flow."""
        conn = await self._host.wait_incoming(self._listener)
        if conn is None:
            raise anyio.ClosedResourceError("the listener was closed")
        assert isinstance(conn, DatagramConnection)  # a datagram listener makes only these
        return ServalDatagramStream(self._host, conn)

    def __aiter__(self) -> AsyncIterator[ServalDatagramStream]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[ServalDatagramStream]:
        while True:
            try:
                yield await self.accept()
            except anyio.ClosedResourceError:
                return

    async def serve(self, handler: Callable[[ServalDatagramStream], Awaitable[object]]) -> None:
        """Run ``handler(flow)`` in its own task for every client flow (closed after)."""
        async with anyio.create_task_group() as tg:
            async for flow in self:
                tg.start_soon(_run_handler, handler, flow)

    async def aclose(self) -> None:
        """Stop listening (flows already accepted go on)."""
        self._host.close_listener(self._listener)


async def _run_handler(
    handler: Callable[[ServalDatagramStream], Awaitable[object]], flow: ServalDatagramStream
) -> None:
    async with flow:
        await handler(flow)

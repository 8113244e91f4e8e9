"""``ServalSocket``: the BSD-style socket of Serval, stream and datagram kinds.

Like a socket, but names are serviceIDs: ``bind`` and ``connect`` take a serviceID (or its
text), ``accept`` and ``recvfrom`` report the peer's address and, for datagrams, its
serviceID. Every blocking call is a coroutine. A datagram socket works unconnected
(``sendto``/``recvfrom``) or, as the reference's, connected: ``connect`` runs the SAL
handshake and ``bind`` + ``listen`` + ``accept`` hands out one socket per client flow; a
connected one uses ``send``/``recv`` (see ``runtime.datagram_streams``).

Unconnected datagrams answer as UDP's do: ``sendto(reply, source)`` with the ``source``
that ``recvfrom`` returned (a ``(serviceID, address)`` pair) goes straight back to that
address, whether or not the sender's serviceID is routable (an unbound socket's is random).
A refusal (the peer host has no such service) arrives after ``sendto`` returned, so it is
reported as a distinct :class:`DatagramError` (``recv_error`` / ``datagram_errors``), never
raised by an unrelated later ``recvfrom``. This module does no routing of its own.
"""

from __future__ import annotations

import asyncio
import os
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio

from ..core.host import DatagramEndpoint
from ..errors import SocketClosed
from ..naming.keys import ServiceKey
from ..naming.service_id import ServiceID, ServiceLike, as_service_id
from ..sal.inet import Address
from ..transport.events import DatagramReceived, DatagramRefused, Event
from .datagram_streams import ServalDatagramListener, ServalDatagramStream
from .interfaces import parse_address
from .streams import ServalListener, ServalStream

if TYPE_CHECKING:  # the host makes sockets (Host.socket): it imports this module
    from .host import Host

__all__ = ["DatagramError", "SocketClosed", "ServalSocket"]

DATAGRAM_QUEUE = 1024
ERROR_QUEUE = 64  # refusals kept for recv_error(); older ones are dropped (and counted)


@dataclass(frozen=True, slots=True)
class DatagramError:
    """An asynchronous error of an unconnected datagram socket: the host at ``address``
    refused a datagram we sent it (``reason``)."""

    reason: str
    address: Address


class ServalSocket:
    """A Serval socket: ``kind`` is ``"stream"`` (Serval TCP) or ``"datagram"``."""

    def __init__(self, kind: str = "stream", *, host: Host | None = None) -> None:
        if kind not in ("stream", "datagram"):
            raise ValueError(f"socket kind must be 'stream' or 'datagram', not {kind!r}")
        self.kind = kind
        self._host = host
        self._local: ServiceID | None = None
        self._peer: ServiceID | None = None
        self._stream: ServalStream | None = None
        self._listener: ServalListener | None = None
        self._endpoint: DatagramEndpoint | None = None
        self._flow: ServalDatagramStream | None = None  # a connected datagram socket
        self._flow_listener: ServalDatagramListener | None = None
        self._datagrams: deque[tuple[bytes, ServiceID, Address]] = deque()
        self._datagram_ready = asyncio.Event()
        self._errors: deque[DatagramError] = deque()
        self._error_ready = asyncio.Event()
        self.dropped_datagrams = 0
        self.dropped_errors = 0
        self._closed = False
        self._registration: dict[str, Any] = {}

    # -- names and state ----------------------------------------------------------------
    @property
    def local_service(self) -> ServiceID | None:
        """The serviceID bound (or accepted on)."""
        return self._local

    @property
    def peer_service(self) -> ServiceID | None:
        """The serviceID connected to."""
        return self._peer

    @property
    def local_flowid(self) -> int | None:
        """Our flowID (stream: of the connection; datagram: of the socket)."""
        if self._stream is not None:
            return self._stream.local_flowid
        if self._flow is not None:
            return self._flow.local_flowid
        return self._endpoint.flowid if self._endpoint is not None else None

    @property
    def remote_flowid(self) -> int | None:
        """The peer's flowID of a connected socket."""
        if self._flow is not None:
            return self._flow.remote_flowid
        return self._stream.remote_flowid if self._stream is not None else None

    @property
    def local_address(self) -> Address | None:
        """Our address of a connected socket."""
        if self._flow is not None:
            return self._flow.local_address
        return self._stream.local_address if self._stream is not None else None

    @property
    def peer_address(self) -> Address | None:
        """The peer's address of a connected socket."""
        if self._flow is not None:
            return self._flow.remote_address
        return self._stream.remote_address if self._stream is not None else None

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise SocketClosed(f"cannot {what}: the socket is closed")

    async def _get_host(self) -> Host:
        if self._host is None:
            from .api import default_host

            self._host = await default_host()
        return self._host

    # -- set-up -------------------------------------------------------------------------
    def bind(
        self,
        service: ServiceLike,
        *,
        weight: int = 1,
        priority: int = 0,
        key: ServiceKey | None = None,
    ) -> None:
        """Name this socket: the serviceID it listens on or sends datagrams from.

        ``weight``, ``priority`` and ``key`` (for a self-certifying ID) go into the
        registration with the host's service router.
        """
        self._check_open("bind")
        if self._local is not None:
            raise SocketClosed(f"socket already bound to {self._local.hex}")
        sid = as_service_id(service)
        if key is not None and not key.verify(sid):
            raise ValueError(f"key {key.public_key.raw.hex()} does not certify {sid.hex}")
        self._local = sid
        self._registration = {"weight": weight, "priority": priority, "key": key}

    async def listen(self, backlog: int = 128) -> None:
        """Accept connections to the bound serviceID (registers it with the host)."""
        self._check_open("listen")
        if self._local is None:
            raise SocketClosed("bind a serviceID before listen")
        host = await self._get_host()
        if self.kind == "datagram":
            if self._endpoint is not None or self._flow is not None:
                raise SocketClosed("listen needs a datagram socket not yet used or connected")
            self._flow_listener = await host.listen(
                self._local, backlog, kind="datagram", **self._registration
            )
            return
        self._listener = await host.listen(self._local, backlog, **self._registration)

    async def accept(self) -> tuple[ServalSocket, Address | None]:
        """The next connection: a connected socket and the peer's address."""
        self._check_open("accept")
        if self._flow_listener is not None:
            flow = await self._flow_listener.accept()
            peer = ServalSocket("datagram", host=self._host)
            peer._flow = flow
            peer._local = flow.service_id
            return peer, flow.remote_address
        if self._listener is None:
            raise SocketClosed("accept needs a listening socket")
        stream = await self._listener.accept()
        sock = ServalSocket("stream", host=self._host)
        sock._stream = stream
        sock._local = stream.service_id
        return sock, stream.remote_address

    async def connect(self, service: ServiceLike, *, timeout: float | None = None) -> None:
        """Connect to ``service`` (``ServalConnectError`` on failure): a stream, or for a
        datagram socket a connected flow (SAL handshake; then ``send``/``recv``)."""
        self._check_open("connect")
        if self._stream is not None or self._flow is not None:
            raise SocketClosed("socket is already connected")
        if self._flow_listener is not None:
            raise SocketClosed("a listening socket cannot connect")
        host = await self._get_host()
        peer = as_service_id(service)
        if self.kind == "datagram":
            self._flow = await host.connect(peer, timeout=timeout, kind="datagram")
        else:
            self._stream = await host.connect(peer, timeout=timeout)
        self._peer = peer

    # -- streams --------------------------------------------------------------------------
    def _connected(self, what: str) -> ServalStream:
        self._check_open(what)
        if self._stream is None:
            raise SocketClosed(f"cannot {what}: the socket is not connected")
        return self._stream

    async def send(self, data: bytes) -> int:
        """Send all of ``data`` (waits while the send buffer is full); returns its length.
        A connected datagram socket sends it as one datagram."""
        if self._flow is not None:
            return await self._flow_send(data)
        stream = self._connected("send")
        try:
            await stream.send(data)
        except anyio.BrokenResourceError as exc:
            raise ConnectionResetError(str(exc)) from None
        return len(data)

    sendall = send

    async def recv(self, max_bytes: int = 65536) -> bytes:
        """Up to ``max_bytes``; ``b""`` at end of stream. A connected datagram socket
        returns the next datagram (truncated to ``max_bytes``); ``b""`` once the peer closed."""
        if self._flow is not None:
            return await self._flow_recv(max_bytes)
        stream = self._connected("recv")
        try:
            return await stream.receive(max_bytes)
        except anyio.EndOfStream:
            return b""
        except anyio.BrokenResourceError as exc:
            raise ConnectionResetError(str(exc)) from None

    async def shutdown(self) -> None:
        """Half-close the write side (the peer reads end of stream)."""
        if self._flow is not None:
            self._check_open("shut down")
            await self._flow.send_eof()
            return
        await self._connected("shut down").send_eof()

    # -- connected datagrams --------------------------------------------------------------
    async def _flow_send(self, data: bytes) -> int:
        self._check_open("send")
        assert self._flow is not None
        try:
            await self._flow.send(data)
        except anyio.BrokenResourceError as exc:
            raise ConnectionResetError(str(exc)) from None
        return len(data)

    async def _flow_recv(self, max_bytes: int) -> bytes:
        self._check_open("recv")
        assert self._flow is not None
        try:
            return (await self._flow.receive())[:max_bytes]
        except anyio.EndOfStream:
            return b""
        except anyio.BrokenResourceError as exc:
            raise ConnectionResetError(str(exc)) from None

    # -- datagrams ------------------------------------------------------------------------
    async def _ensure_endpoint(self) -> DatagramEndpoint:
        if self._endpoint is not None:
            return self._endpoint
        if self._flow is not None or self._flow_listener is not None:
            raise SocketClosed("a connected or listening datagram socket uses send/recv")
        host = await self._get_host()
        if host.core is None:
            raise SocketClosed("the host is not running")
        ephemeral = self._local is None
        if self._local is None:
            # An unbound datagram socket gets a random name of its own, like an ephemeral
            # port: not a service, so it is not registered with the router.
            self._local = ServiceID(int.from_bytes(os.urandom(32), "big"))
        self._endpoint = host.bind_datagram(
            self._local, register=not ephemeral, **self._registration
        )
        host.watch(self._endpoint.flowid, self._on_event)
        return self._endpoint

    def _on_event(self, event: Event) -> None:
        if isinstance(event, DatagramReceived):
            if len(self._datagrams) >= DATAGRAM_QUEUE:
                self.dropped_datagrams += 1  # bounded, like a socket's receive buffer
                return
            source = event.source_service if event.source_service is not None else ServiceID(0)
            self._datagrams.append((event.data, source, event.address))
            self._datagram_ready.set()
        elif isinstance(event, DatagramRefused):
            if len(self._errors) >= ERROR_QUEUE:
                self._errors.popleft()
                self.dropped_errors += 1
            self._errors.append(DatagramError(event.reason, event.address))
            self._error_ready.set()

    async def sendto(
        self, data: bytes, target: ServiceLike | tuple[ServiceLike, Address | str]
    ) -> int:
        """Send one datagram; returns its length.

        ``target`` is a service (resolved through the service table, like a SYN), or a
        ``(service, address)`` pair such as ``recvfrom`` returns: then the datagram goes
        straight to ``address`` (``"IP:PORT"`` or a tuple), the natural way to answer a
        sender whose serviceID no router knows. Errors known at once (no route, too large)
        are raised here; a later refusal by the peer is a :class:`DatagramError`.
        """
        self._check_open("sendto")
        if self.kind != "datagram":
            raise SocketClosed("sendto needs a datagram socket")
        to: Address | None = None
        if isinstance(target, tuple):
            service, where = target
            to = parse_address(where) if isinstance(where, str) else (str(where[0]), where[1])
        else:
            service = target
        ep = await self._ensure_endpoint()
        host = await self._get_host()
        host.send_datagram(ep, service, data, to=to)
        return len(data)

    async def recvfrom(self, max_bytes: int = 65536) -> tuple[bytes, tuple[ServiceID, Address]]:
        """The next datagram (truncated to ``max_bytes``) and (source serviceID, address)."""
        self._check_open("recvfrom")
        if self.kind != "datagram":
            raise SocketClosed("recvfrom needs a datagram socket")
        await self._ensure_endpoint()
        while not self._datagrams:
            self._datagram_ready.clear()
            await self._datagram_ready.wait()
            self._check_open("recvfrom")
        data, source, address = self._datagrams.popleft()
        return data[:max_bytes], (source, address)

    @property
    def datagram_errors(self) -> list[DatagramError]:
        """Refusals received and not yet taken by :meth:`recv_error` (oldest first)."""
        return list(self._errors)

    async def recv_error(self) -> DatagramError:
        """The next refusal of a datagram this socket sent (waits for one): errors are
        reported here, apart from the datagrams ``recvfrom`` returns."""
        self._check_open("recv_error")
        if self.kind != "datagram":
            raise SocketClosed("recv_error needs a datagram socket")
        await self._ensure_endpoint()
        while not self._errors:
            self._error_ready.clear()
            await self._error_ready.wait()
            self._check_open("recv_error")
        return self._errors.popleft()

    # -- closing --------------------------------------------------------------------------
    async def close(self) -> None:
        """Close: a stream finishes sending (FIN); a listener or datagram socket stops."""
        if self._closed:
            return
        self._closed = True
        if self._stream is not None:
            await self._stream.aclose()
        if self._flow is not None:
            await self._flow.aclose()
        if self._listener is not None:
            await self._listener.aclose()
        if self._flow_listener is not None:
            await self._flow_listener.aclose()
        if self._endpoint is not None and self._host is not None:
            self._host.unwatch(self._endpoint.flowid)
            self._host.unbind_datagram(self._endpoint)
        self._datagram_ready.set()
        self._error_ready.set()

    async def __aenter__(self) -> ServalSocket:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

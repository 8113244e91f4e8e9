"""One UDP socket of a host (an "interface"), driven by the asyncio event loop (Linux).

An endpoint is IPv4 or IPv6 by its local address (``"::1"`` opens an IPv6 socket). An IPv6
socket is IPv6 only (``IPV6_V6ONLY``): a dual-stack host opens one interface per family,
so an IPv4 peer never appears as an IPv4-mapped IPv6 address. Remote addresses are always
``(ip, port)`` pairs: the flow label and scope of IPv6 socket addresses are dropped on
receive (a link-local peer keeps its zone in the IP text, as the kernel writes it).

Serval packets travel encapsulated in UDP. :class:`UdpEndpoint` is the lowest runtime piece:
it owns one non-blocking socket, reads *batches* of datagrams per wake-up and sends batches
with as few system calls as the kernel allows.

Receive: on readability the endpoint reads until the socket is empty or ``max_batch``
datagrams are in hand, then calls ``on_datagrams(batch)`` once, so the host can process the
whole batch and flush its replies once. With UDP GRO (``gro=True``, when the kernel has it)
one read may return many datagrams that a GSO sender wrote in one call; they are split here
and handed over one by one, exactly as they were sent.

Send: :meth:`UdpEndpoint.send` sends at once; when the kernel buffer is full the datagram
waits in a bounded queue drained by a writer callback (beyond the bound it is dropped and
counted: UDP may lose packets and the transport above retransmits).
:meth:`UdpEndpoint.send_many` uses UDP GSO (``UDP_SEGMENT``) where consecutive datagrams go
to the same remote and all but the last have the same size: one system call carries up to 64
of them and the receiver sees the same datagrams as with one ``sendto`` each.

Errors: an ICMP error or any other failed ``recv``/``send`` never escapes into the event
loop; it is counted in :attr:`UdpEndpoint.errors`. With ``on_icmp_error`` the endpoint also
asks the kernel for the ICMP errors of an unconnected socket (``IP_RECVERR``, or
``IPV6_RECVERR`` for ICMPv6) and reports
which remote each one was about.

Measured on CPython 3.11 (loopback): ``recvfrom(65536)`` per datagram is cheaper than
``recvfrom_into`` a preallocated buffer followed by ``bytes(view[:n])`` (1.95 vs 2.34 us for
1,400 bytes; 3.2 vs 3.8 us for 8,000), because the buffer copy and the memoryview slice cost
more than shrinking the freshly allocated result. So the plain read stays.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import struct
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Final, cast

from ..sal.inet import Address
from ..sal.train import SUPER_MAX_BYTES, SUPER_MAX_SEGMENTS, SuperDatagram

__all__ = [
    "DEFAULT_BUFFER",
    "DEFAULT_MAX_BATCH",
    "DEFAULT_SEND_QUEUE",
    "GSO_MAX_BYTES",
    "GSO_MAX_SEGMENTS",
    "Address",
    "DatagramHandler",
    "IcmpErrorHandler",
    "UdpEndpoint",
    "UdpStats",
]

"""A socket address: (IP text, port); IPv6 text as the kernel writes it."""

DatagramHandler = Callable[[list[tuple[bytes, Address]]], None]
"""Receives one batch of ``(payload, source address)`` pairs per socket wake-up.

An exception it raises goes to the event loop's exception handler; the endpoint keeps
reading."""

IcmpErrorHandler = Callable[[Address, int], None]
"""Receives ``(remote the failed datagram was sent to, errno)`` for each ICMP error."""

DEFAULT_BUFFER: Final = 4 * 1024 * 1024
DEFAULT_MAX_BATCH: Final = 256
DEFAULT_SEND_QUEUE: Final = 4096
GSO_MAX_SEGMENTS: Final = SUPER_MAX_SEGMENTS
"""Datagrams per GSO call: the kernel's UDP_MAX_SEGMENTS on older kernels (newer allow 128)."""
GSO_MAX_BYTES: Final = SUPER_MAX_BYTES
"""Payload bytes per GSO call: the whole super-datagram must fit one IP packet length
(IPv4's 65,535 with its header; IPv6's payload length field counts the UDP header too)."""

# Linux values; the socket module of Python 3.11 does not export them.
_UDP_SEGMENT: Final = 103
_UDP_GRO: Final = 104
_SO_SNDBUFFORCE: Final = 32
_SO_RCVBUFFORCE: Final = 33
_IP_RECVERR: Final = 11
_IPV6_RECVERR: Final = 25
_SO_EE_ORIGIN_ICMP6: Final = 3
_SO_EE_ORIGIN_ICMP: Final = 2

# The largest IPv4 UDP payload is 65,507 bytes; a GRO read returns at most one IP packet's
# worth of coalesced datagrams, which also fits.
_RECV_SIZE: Final = 65536
_GRO_CMSG_SPACE: Final = socket.CMSG_SPACE(4)
# struct sock_extended_err followed by the offender's sockaddr_in, with room to spare.
_ERRQUEUE_CMSG_SPACE: Final = socket.CMSG_SPACE(64)
_SOCK_EXTENDED_ERR: Final = struct.Struct("=IBBBBII")
_NATIVE_INT: Final = struct.Struct("=i")

# Errors that mean "a GSO send is impossible on this socket at all" (no kernel support, no
# checksum offload on the device, IPsec): GSO is then off for good on this endpoint.
_GSO_FATAL: Final = frozenset({errno.EIO, errno.ENOPROTOOPT, errno.EOPNOTSUPP})
# Errors that mean "not with this segment size" (the segment exceeds the path MTU): smaller
# segments may still work, so only the size limit is lowered.
_GSO_TOO_BIG: Final = frozenset({errno.EINVAL, errno.EMSGSIZE})
# With IP_RECVERR the kernel reports a pending ICMP error on the next system call, whichever
# remote it is for: a send failing with one of these may be about another peer, so it is
# retried once (reporting the error cleared it).
_ASYNC_ERRORS: Final = frozenset(
    {errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN}
)


def _errname(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, str(exc.errno))


@dataclass(slots=True)
class UdpStats:
    """Counters of one endpoint (datagrams are counted once each, also inside GSO/GRO)."""

    datagrams_sent: int = 0
    bytes_sent: int = 0
    datagrams_received: int = 0
    bytes_received: int = 0
    batches: int = 0
    """Calls of ``on_datagrams`` (one per wake-up that read something)."""
    gso_calls: int = 0
    """System calls that sent several datagrams at once with UDP GSO."""
    gso_datagrams: int = 0
    """Datagrams sent inside those calls."""
    gro_reads: int = 0
    """Reads that returned several coalesced datagrams (UDP GRO)."""
    queued_total: int = 0
    """Datagrams that had to wait in the send queue because the kernel buffer was full."""


def _set_buffer(sock: socket.socket, force: int, plain: int, size: int) -> None:
    # The *FORCE variants ignore net.core.[rw]mem_max but need CAP_NET_ADMIN: try them,
    # then settle for what the unprivileged option gives (capped by the sysctl).
    for option in (force, plain):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, size)
            return
        except OSError:
            continue


def _make_socket(local: Address, reuse_port: bool, rcvbuf: int, sndbuf: int) -> socket.socket:
    v6 = ":" in local[0]
    sock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        if v6:
            # One family per socket: an IPv4 peer reaches the host's IPv4 interface.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        else:
            # Ad hoc discovery sends unresolved SYNs to a broadcast address (IPv4 only).
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if rcvbuf > 0:
            _set_buffer(sock, _SO_RCVBUFFORCE, socket.SO_RCVBUF, rcvbuf)
        if sndbuf > 0:
            _set_buffer(sock, _SO_SNDBUFFORCE, socket.SO_SNDBUF, sndbuf)
        sock.bind(local)
    except BaseException:
        sock.close()
        raise
    return sock


def _probe_option(sock: socket.socket, option: int, value: int) -> bool:
    try:
        sock.setsockopt(socket.SOL_UDP, option, value)
    except OSError:
        return False
    return True


class UdpEndpoint:
    """One bound UDP socket on the running event loop; see the module docstring.

    Create with :meth:`open`; use as ``async with`` or call :meth:`close`.
    """

    __slots__ = (
        "_gro",
        "_gso",
        "_gso_max_segment",
        "_loop",
        "_max_batch",
        "_on_datagrams",
        "_on_icmp_error",
        "_options",
        "_queue",
        "_queue_limit",
        "_reading",
        "_sock",
        "_v6",
        "_want_gro",
        "_want_gso",
        "_writing",
        "address",
        "errors",
        "stats",
    )

    address: Address
    """The bound local address (the real port when opened with port 0)."""
    errors: Counter[str]
    """Failures by kind: ``recv:ERRNO``, ``send:ERRNO``, ``icmp:ERRNO``, ``local:ERRNO``,
    ``send_queue_full``, ``gso_fallback:ERRNO``, ``rebind_dropped``."""
    stats: UdpStats

    def __init__(
        self,
        sock: socket.socket,
        loop: asyncio.AbstractEventLoop,
        on_datagrams: DatagramHandler,
        *,
        options: tuple[bool, int, int],
        gso: bool,
        gro: bool,
        max_batch: int,
        send_queue: int,
        on_icmp_error: IcmpErrorHandler | None,
    ) -> None:
        """Wrap an already bound socket; use :meth:`open` instead."""
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if send_queue < 0:
            raise ValueError("send_queue must not be negative")
        self._sock: socket.socket | None = None
        self._loop = loop
        self._on_datagrams = on_datagrams
        self._on_icmp_error = on_icmp_error
        self._options = options
        self._want_gso = gso
        self._want_gro = gro
        self._gso = False
        self._gro = False
        self._v6 = False
        self._gso_max_segment = GSO_MAX_BYTES
        self._max_batch = max_batch
        self._queue: deque[tuple[bytes, Address]] = deque()
        self._queue_limit = send_queue
        self._reading = False
        self._writing = False
        self.errors = Counter()
        self.stats = UdpStats()
        self._attach(sock)

    @classmethod
    async def open(
        cls,
        local: Address,
        on_datagrams: DatagramHandler,
        *,
        reuse_port: bool = False,
        rcvbuf: int = DEFAULT_BUFFER,
        sndbuf: int = DEFAULT_BUFFER,
        gso: bool = True,
        gro: bool = True,
        max_batch: int = DEFAULT_MAX_BATCH,
        send_queue: int = DEFAULT_SEND_QUEUE,
        on_icmp_error: IcmpErrorHandler | None = None,
    ) -> UdpEndpoint:
        """Bind ``local`` (port 0 picks one) and start reading on the running loop.

        ``rcvbuf``/``sndbuf`` are requests (0 keeps the system default); the kernel may
        grant less. ``gso``/``gro`` allow UDP segmentation offload on send and coalesced
        reads; each is used only when the kernel accepts it (see :attr:`gso`, :attr:`gro`).
        ``max_batch`` bounds the datagrams handed over per wake-up, ``send_queue`` the
        datagrams waiting for kernel buffer space. ``on_icmp_error`` turns on ICMP error
        reporting (``IP_RECVERR``) for this unconnected socket.
        """
        loop = asyncio.get_running_loop()
        sock = _make_socket(local, reuse_port, rcvbuf, sndbuf)
        try:
            return cls(
                sock,
                loop,
                on_datagrams,
                options=(reuse_port, rcvbuf, sndbuf),
                gso=gso,
                gro=gro,
                max_batch=max_batch,
                send_queue=send_queue,
                on_icmp_error=on_icmp_error,
            )
        except BaseException:
            sock.close()
            raise

    # -- state ---------------------------------------------------------------------------

    def _attach(self, sock: socket.socket) -> None:
        # Setting UDP_SEGMENT to 0 changes nothing (it is the per-socket default segment
        # size, and sends here pass the size per call) but fails without kernel support:
        # a probe that costs no datagram.
        self._gso = self._want_gso and _probe_option(sock, _UDP_SEGMENT, 0)
        self._gro = self._want_gro and _probe_option(sock, _UDP_GRO, 1)
        self._v6 = sock.family == socket.AF_INET6
        if self._on_icmp_error is not None:
            if self._v6:
                sock.setsockopt(socket.IPPROTO_IPV6, _IPV6_RECVERR, 1)
            else:
                sock.setsockopt(socket.IPPROTO_IP, _IP_RECVERR, 1)
        self._sock = sock
        self.address = sock.getsockname()[:2]
        self._loop.add_reader(sock.fileno(), self._on_readable)
        self._reading = True

    def _detach(self) -> socket.socket | None:
        sock, self._sock = self._sock, None
        if sock is None:
            return None
        if self._reading:
            self._loop.remove_reader(sock.fileno())
            self._reading = False
        if self._writing:
            self._loop.remove_writer(sock.fileno())
            self._writing = False
        return sock

    @property
    def gso(self) -> bool:
        """Whether :meth:`send_many` uses UDP GSO (cleared if the kernel refuses it later)."""
        return self._gso

    @property
    def gro(self) -> bool:
        """Whether reads may return coalesced datagrams (UDP GRO) that are split here."""
        return self._gro

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._sock is None

    @property
    def queued(self) -> int:
        """Datagrams waiting for kernel buffer space (a sign to slow down)."""
        return len(self._queue)

    @property
    def rcvbuf(self) -> int:
        """The receive buffer size the kernel reports (Linux reports twice the request)."""
        return self._getsockopt(socket.SO_RCVBUF)

    @property
    def sndbuf(self) -> int:
        """The send buffer size the kernel reports (Linux reports twice the request)."""
        return self._getsockopt(socket.SO_SNDBUF)

    def _getsockopt(self, option: int) -> int:
        if self._sock is None:
            raise OSError(errno.EBADF, "endpoint is closed")
        return self._sock.getsockopt(socket.SOL_SOCKET, option)

    def fileno(self) -> int:
        """The socket's file descriptor (-1 once closed)."""
        return -1 if self._sock is None else self._sock.fileno()

    def __repr__(self) -> str:
        state = "closed" if self._sock is None else f"{self.address[0]}:{self.address[1]}"
        return f"<UdpEndpoint {state} gso={self._gso} gro={self._gro} queued={self.queued}>"

    # -- receive -------------------------------------------------------------------------

    def _on_readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        batch: list[tuple[bytes, Address]] = []
        if self._gro:
            nbytes, failed = self._read_gro(sock, batch)
        else:
            nbytes, failed = self._read_plain(sock, batch)
        if self._on_icmp_error is not None and (failed or not batch):
            # With IP_RECVERR, queued ICMP errors keep the socket "ready" (EPOLLERR) until
            # they are read from the error queue: a wake-up that found no data, or a read
            # that reported one, means they are waiting.
            self._drain_error_queue(sock)
        if batch:
            if self._v6:
                # (host, port, flowinfo, scope_id) -> (host, port): one address form.
                batch = [(data, addr[:2]) for data, addr in batch]
            stats = self.stats
            stats.datagrams_received += len(batch)
            stats.bytes_received += nbytes
            stats.batches += 1
            self._on_datagrams(batch)

    def _read_plain(
        self, sock: socket.socket, batch: list[tuple[bytes, Address]]
    ) -> tuple[int, bool]:
        recvfrom = sock.recvfrom
        append = batch.append
        nbytes = 0
        failed = False
        # Errors count against the batch limit so that a socket stuck in an error state
        # cannot spin here forever.
        budget = self._max_batch
        while budget > 0:
            budget -= 1
            try:
                data, addr = recvfrom(_RECV_SIZE)
            except BlockingIOError:
                break
            except OSError as exc:
                self.errors["recv:" + _errname(exc)] += 1
                failed = True
                continue
            append((data, addr))
            nbytes += len(data)
        return nbytes, failed

    def _read_gro(
        self, sock: socket.socket, batch: list[tuple[bytes, Address]]
    ) -> tuple[int, bool]:
        recvmsg = sock.recvmsg
        append = batch.append
        nbytes = 0
        failed = False
        limit = self._max_batch
        reads = 0
        while len(batch) < limit and reads < limit:
            reads += 1
            try:
                data, ancdata, _flags, addr = recvmsg(_RECV_SIZE, _GRO_CMSG_SPACE)
            except BlockingIOError:
                break
            except OSError as exc:
                self.errors["recv:" + _errname(exc)] += 1
                failed = True
                continue
            size = len(data)
            nbytes += size
            if ancdata:  # (the kernel adds UDP_GRO to a read that coalesced datagrams only)
                segment = 0
                for level, kind, value in ancdata:
                    if level == socket.SOL_UDP and kind == _UDP_GRO:
                        segment = _NATIVE_INT.unpack_from(value)[0]
                if 0 < segment < size:
                    self.stats.gro_reads += 1
                    # Slicing bytes copies once, into the datagram's own bytes object.
                    batch.extend([(data[o : o + segment], addr) for o in range(0, size, segment)])
                    continue
            append((data, addr))
        return nbytes, failed

    def _drain_error_queue(self, sock: socket.socket) -> None:
        handler = self._on_icmp_error
        for _ in range(self._max_batch):
            try:
                _data, ancdata, _flags, addr = sock.recvmsg(
                    1, _ERRQUEUE_CMSG_SPACE, socket.MSG_ERRQUEUE
                )
            except OSError:
                # EAGAIN: the queue is empty (anything else: nothing more to learn here).
                return
            for level, kind, value in ancdata:
                if (level, kind) not in (
                    (socket.IPPROTO_IP, _IP_RECVERR),
                    (socket.IPPROTO_IPV6, _IPV6_RECVERR),
                ):
                    continue
                if len(value) < _SOCK_EXTENDED_ERR.size:
                    continue
                err, origin = _SOCK_EXTENDED_ERR.unpack_from(value)[:2]
                name = errno.errorcode.get(err, str(err))
                icmp = origin in (_SO_EE_ORIGIN_ICMP, _SO_EE_ORIGIN_ICMP6)
                self.errors[("icmp:" if icmp else "local:") + name] += 1
                if handler is not None and isinstance(addr, tuple):
                    handler(addr[:2], err)

    # -- send ----------------------------------------------------------------------------

    def send(self, data: bytes, remote: Address) -> None:
        """Send one datagram now, or queue it if the kernel buffer is full.

        Never raises for network conditions: errors are counted in :attr:`errors` and the
        datagram is dropped (as the network might have done).
        """
        sock = self._sock
        if sock is None:
            raise OSError(errno.EBADF, "endpoint is closed")
        if self._queue:
            # Older datagrams are waiting: keep the order.
            self._enqueue(data, remote)
            return
        try:
            sock.sendto(data, remote)
        except BlockingIOError:
            self._enqueue(data, remote)
            self._start_writer()
            return
        except OSError as exc:
            try:
                if not self._send_failed(sock, exc, data, remote):
                    return
            except BlockingIOError:  # the retry (see _ASYNC_ERRORS) found the buffer full
                self._enqueue(data, remote)
                self._start_writer()
                return
        stats = self.stats
        stats.datagrams_sent += 1
        stats.bytes_sent += len(data)

    def send_many(self, items: Sequence[tuple[bytes | SuperDatagram, Address]]) -> None:
        """Send a batch in order, with GSO where consecutive datagrams allow it.

        A :class:`~pyserval.sal.train.SuperDatagram` goes with one GSO call as it is (its
        datagrams one by one when the socket has no GSO or refuses it). Like
        :meth:`send`: what the kernel cannot take now is queued (up to the bound), and
        errors are counted, not raised.
        """
        if self._sock is None:
            raise OSError(errno.EBADF, "endpoint is closed")
        if not items:
            return
        if self._queue:
            for data, remote in items:
                self._enqueue(data, remote)
            return
        done = self._transmit(items)
        if done < len(items):
            for i in range(done, len(items)):
                data, remote = items[i]
                self._enqueue(data, remote)
            self._start_writer()

    def _transmit(self, items: Sequence[tuple[bytes | SuperDatagram, Address]]) -> int:
        """Send ``items`` in order until the kernel buffer is full; return how many left
        (sent or dropped for an error) before that point."""
        sock = self._sock
        assert sock is not None
        if not self._gso:
            return self._transmit_plain(sock, items)
        sendto = sock.sendto
        stats = self.stats
        n = len(items)
        i = 0
        sent = 0
        nbytes = 0
        try:
            while i < n:
                data, remote = items[i]
                if isinstance(data, SuperDatagram):
                    count, stalled = self._send_super(sock, data, remote)
                    i += 1
                    if count:
                        sent += count
                        nbytes += len(data.data)
                    if stalled:
                        break  # its rest is queued: what follows must queue behind it
                    continue
                size = len(data)
                j = i + 1
                if self._gso and 0 < size <= self._gso_max_segment and j < n:
                    j = self._gso_group(items, i, size, remote)
                # When GSO refuses a group, its first datagram goes plainly below and the
                # rest are regrouped (or sent plainly) on the next rounds.
                if j - i > 1 and self._send_gso(sock, items, i, j, size, remote):
                    count = j - i
                    sent += count
                    nbytes += size * (count - 1) + len(items[j - 1][0])  # type: ignore[arg-type]
                    i = j
                    continue
                try:
                    sendto(data, remote)
                except BlockingIOError:
                    raise
                except OSError as exc:
                    if not self._send_failed(sock, exc, data, remote):
                        i += 1
                        continue
                sent += 1
                nbytes += size
                i += 1
        except BlockingIOError:
            pass
        stats.datagrams_sent += sent
        stats.bytes_sent += nbytes
        return i

    def _send_super(
        self, sock: socket.socket, sup: SuperDatagram, remote: Address
    ) -> tuple[int, bool]:
        """Send a super-datagram with one GSO call: returns (datagrams sent that way,
        whether the kernel buffer filled up part way).

        Raises BlockingIOError when the kernel buffer is full (then nothing went). When
        GSO refuses it, its datagrams go one by one (counted there); those the kernel
        cannot take then are queued, and the caller must queue what follows behind them.
        """
        if self._gso and sup.segment <= self._gso_max_segment:
            control = [(socket.SOL_UDP, _UDP_SEGMENT, struct.pack("=H", sup.segment))]
            if self._sendmsg_gso(sock, [sup.data], control, sup.segment, remote):
                count = sup.count
                stats = self.stats
                stats.gso_calls += 1
                stats.gso_datagrams += count
                return count, False
        parts: list[tuple[bytes | SuperDatagram, Address]] = [
            (part, remote) for part in sup.split()
        ]
        done = self._transmit_plain(sock, parts)
        if done < len(parts):
            for part, _ in parts[done:]:
                self._enqueue(part, remote)
            self._start_writer()
            return 0, True
        return 0, False

    def _transmit_plain(
        self, sock: socket.socket, items: Sequence[tuple[bytes | SuperDatagram, Address]]
    ) -> int:
        """:meth:`_transmit` without GSO: a tighter loop for the common case."""
        sendto = sock.sendto
        done = 0
        sent = 0
        nbytes = 0
        try:
            for data, remote in items:
                if isinstance(data, SuperDatagram):
                    # Its datagrams in order; those the kernel cannot take now are queued
                    # (the caller queues what follows after them).
                    parts = [(part, remote) for part in data.split()]
                    k = self._transmit_plain(sock, parts)
                    done += 1
                    if k < len(parts):
                        for part, _ in parts[k:]:
                            self._enqueue(part, remote)
                        self._start_writer()
                        raise BlockingIOError
                    continue
                try:
                    sendto(data, remote)
                except BlockingIOError:
                    raise
                except OSError as exc:
                    if not self._send_failed(sock, exc, data, remote):
                        done += 1
                        continue
                done += 1
                sent += 1
                nbytes += len(data)
        except BlockingIOError:
            pass
        stats = self.stats
        stats.datagrams_sent += sent
        stats.bytes_sent += nbytes
        return done

    def _gso_group(
        self,
        items: Sequence[tuple[bytes | SuperDatagram, Address]],
        i: int,
        size: int,
        remote: Address,
    ) -> int:
        """The end (exclusive) of the GSO group that starts at ``items[i]``."""
        limit = min(len(items), i + GSO_MAX_SEGMENTS)
        total = size
        j = i + 1
        while j < limit:
            data, other = items[j]
            if isinstance(data, SuperDatagram):
                break  # it goes on its own
            length = len(data)
            if (
                length == 0
                or length > size
                or total + length > GSO_MAX_BYTES
                or (other is not remote and other != remote)
            ):
                break
            total += length
            j += 1
            if length < size:
                # Only the last segment may be shorter: the receiver cuts at ``size``.
                break
        return j

    def _send_gso(
        self,
        sock: socket.socket,
        items: Sequence[tuple[bytes | SuperDatagram, Address]],
        i: int,
        j: int,
        size: int,
        remote: Address,
    ) -> bool:
        """One GSO call for ``items[i:j]``; False if GSO failed (then nothing was sent).

        Raises BlockingIOError when the kernel buffer is full (nothing was sent either:
        the whole super-datagram is one skb).
        """
        # Plain datagrams only: _gso_group stops at a SuperDatagram.
        buffers = cast("list[bytes]", [items[k][0] for k in range(i, j)])
        control = [(socket.SOL_UDP, _UDP_SEGMENT, struct.pack("=H", size))]
        if not self._sendmsg_gso(sock, buffers, control, size, remote):
            return False
        stats = self.stats
        stats.gso_calls += 1
        stats.gso_datagrams += j - i
        return True

    def _sendmsg_gso(
        self,
        sock: socket.socket,
        buffers: list[bytes] | list[bytes | memoryview],
        control: list[tuple[int, int, bytes]],
        size: int,
        remote: Address,
    ) -> bool:
        """One ``sendmsg`` with UDP_SEGMENT ``size``; False if GSO failed (then nothing
        was sent, and what failed is counted and remembered).

        Raises BlockingIOError when the kernel buffer is full (nothing was sent either:
        the whole super-datagram is one skb).
        """
        retried = False
        while True:
            try:
                sock.sendmsg(buffers, control, 0, remote)
                return True
            except BlockingIOError:
                raise
            except OSError as exc:
                if not retried and self._pending_icmp(exc):
                    # Another peer's ICMP error, reported on this call (see _ASYNC_ERRORS).
                    self.errors["send:" + _errname(exc)] += 1
                    retried = True
                    continue
                self.errors["gso_fallback:" + _errname(exc)] += 1
                if exc.errno in _GSO_FATAL:
                    self._gso = False
                elif exc.errno in _GSO_TOO_BIG:
                    # Larger than the path MTU allows as one segment (IP would fragment a
                    # plain datagram instead): groups of this size and more go plainly now.
                    self._gso_max_segment = min(self._gso_max_segment, size - 1)
                return False

    def _send_failed(self, sock: socket.socket, exc: OSError, data: bytes, remote: Address) -> bool:
        """Count a failed ``sendto``; return True if a retry then sent ``data``.

        Raises BlockingIOError if the retry found the buffer full.
        """
        self.errors["send:" + _errname(exc)] += 1
        if not self._pending_icmp(exc):
            return False
        try:
            sock.sendto(data, remote)
        except BlockingIOError:
            raise
        except OSError as again:
            self.errors["send:" + _errname(again)] += 1
            return False
        return True

    def _pending_icmp(self, exc: OSError) -> bool:
        """Whether ``exc`` may be a queued ICMP error about some other send."""
        return self._on_icmp_error is not None and exc.errno in _ASYNC_ERRORS

    def _enqueue(self, data: bytes | SuperDatagram, remote: Address) -> None:
        if isinstance(data, SuperDatagram):
            # Queued as its datagrams: the bound counts datagrams, and a send after the
            # wait regroups them anyway.
            for part in data.split():
                self._enqueue(part, remote)
            return
        if len(self._queue) >= self._queue_limit:
            self.errors["send_queue_full"] += 1
            return
        self._queue.append((data, remote))
        self.stats.queued_total += 1

    def _start_writer(self) -> None:
        if not self._writing and self._sock is not None and self._queue:
            self._loop.add_writer(self._sock.fileno(), self._on_writable)
            self._writing = True

    def _on_writable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        queue = self._queue
        while queue:
            chunk = [queue.popleft() for _ in range(min(len(queue), self._max_batch))]
            done = self._transmit(chunk)
            if done < len(chunk):
                queue.extendleft(reversed(chunk[done:]))
                return
        self._loop.remove_writer(sock.fileno())
        self._writing = False

    # -- lifetime ------------------------------------------------------------------------

    def rebind(self, new_local: Address) -> None:
        """Move to a new local address (an address change): bind a new socket, then drop
        the old one. Queued datagrams are dropped (counted ``rebind_dropped``): they carry
        the old source address, and the transport retransmits.

        On failure (e.g. the address is not available) the endpoint keeps its old socket.
        """
        if self._sock is None:
            raise OSError(errno.EBADF, "endpoint is closed")
        reuse_port, rcvbuf, sndbuf = self._options
        sock = _make_socket(new_local, reuse_port, rcvbuf, sndbuf)
        old = self._detach()
        if self._queue:
            self.errors["rebind_dropped"] += len(self._queue)
            self._queue.clear()
        self._gso_max_segment = GSO_MAX_BYTES
        try:
            self._attach(sock)
        except BaseException:
            sock.close()
            raise
        finally:
            if old is not None:
                old.close()

    def close(self) -> None:
        """Stop reading and writing and close the socket; queued datagrams are dropped.

        Calling it again does nothing.
        """
        sock = self._detach()
        self._queue.clear()
        if sock is not None:
            sock.close()

    async def __aenter__(self) -> UdpEndpoint:
        """Return the endpoint itself (it is open already)."""
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the endpoint."""
        self.close()

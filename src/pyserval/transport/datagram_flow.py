"""Connected datagram flows: Serval UDP with a SAL handshake (sans-I/O, no clock).

The reference's datagram sockets also connect and accept like stream sockets
(``shared/spec/sal-wire.md``, "Connected datagram flows"): the SAL handshake runs with
protocol 17 and an empty UDP header (ports 0, length 8) after the SYN's, SYN-ACK's and third
ACK's extensions; data is base header (shl 3) + UDP header + payload, demultiplexed by
flowID; there is no transport close, only the SAL FIN and its ACK.

Design: a :class:`DatagramConnection` is a :class:`~pyserval.transport.connection.Connection`
whose one :class:`DatagramSubflow` carries UDP instead of TCP. Everything SAL about a flow
is the same as on a stream and already lives in ``Connection``/``Subflow``: the control
channel (nonces, control numbers, stop-and-wait retransmission with the same timers), the
RSYN migration and address-check (NAT rebinding) exchanges, the SAL FIN exchange and
TIME_WAIT, stateless-reset checks, and the host core's demultiplexing, timers and
flush. Subclassing reuses all of that unchanged; this module overrides only what differs:

* packet builders (protocol 17, the empty UDP header in the handshake, no TCP header);
* the data path: a bounded queue of whole datagrams each way instead of byte buffers,
  no sequence numbers, no retransmission, no congestion control (UDP semantics: what does
  not fit is dropped and counted);
* close: :meth:`DatagramConnection.shutdown` starts the SAL FIN at once (no TCP FIN first),
  and the peer's SAL FIN is taken without waiting for a TCP FIN;
* timers: control retransmission, migration timers, TIME_WAIT and the optional idle
  timeout; no TCP timers and no keepalive probes (a UDP flow has nothing to probe with).

A separate class built beside ``Connection`` would have had to copy the control, migration
and close code (about 400 lines) or move it out of ``connection.py``, which other work edits.

What this module does not do: multipath (a datagram flow has one subflow; its SYN never
offers MP_CAPABLE), fragmentation (a datagram larger than :data:`MAX_FLOW_DATAGRAM` is
refused with :class:`DatagramTooLarge`), or any delivery guarantee.
"""

from __future__ import annotations

import random
from collections import Counter, deque
from collections.abc import Callable
from typing import Final

from ..errors import ConnectionStateError, DatagramTooLarge
from ..naming.service_id import ServiceID
from ..sal.checksum import BytesLike
from ..sal.control import ControlTimeout
from ..sal.extensions import ControlExt, ControlFlags, Extension, ServiceExt
from ..sal.inet import Address
from ..sal.packet import SalPacket
from ..sal.transport_headers import PROTO_UDP, TcpHeader, UdpHeader
from .close_state import CloseEvent, Side, Stage
from .config import StreamConfig
from .connection import Connection, Role, State, Subflow
from .events import ConnectionEstablished, DataReceived, Event, StreamEnded

__all__ = [
    "DATAGRAM_QUEUE",
    "MAX_FLOW_DATAGRAM",
    "DatagramConnection",
    "DatagramSubflow",
    "DatagramTooLarge",
    "refuse_unconnected",
]

# The largest UDP payload over IPv4 (65,535 - 20 - 8) less the SAL base header and the UDP
# header a flow's data packet carries.
MAX_FLOW_DATAGRAM: Final = 65507 - 12 - 8
DATAGRAM_QUEUE: Final = 1024  # datagrams held each way per flow (and at most the buffer size)
_ZERO_NONCE: Final = bytes(8)


def refuse_unconnected(pkt: SalPacket) -> SalPacket:
    """The answer to an unconnected datagram (no flowID) that reached a listening
    connected-mode datagram socket: CONTROL(ACK+RST) with verno 0, ackno 0 and nonce 0, as
    the reference sends it. Such a socket accepts only SYNs."""
    rst = ControlExt(ControlFlags.ACK | ControlFlags.RST, 0, 0, _ZERO_NONCE)
    return SalPacket(0, pkt.src_flowid, PROTO_UDP, [rst])


class DatagramSubflow(Subflow):
    """The SAL flow of a :class:`DatagramConnection`: UDP in every packet it builds."""

    def syn_packet(self, control: ControlExt, service_id: ServiceID) -> SalPacket:
        """SYN: base, CONTROL(SYN), SERVICE(destination), empty UDP header (shl 17)."""
        exts: list[Extension] = [control, ServiceExt(service_id)]
        return SalPacket(self.local_flowid, 0, PROTO_UDP, exts, UdpHeader())

    def synack_packet(self, control: ControlExt) -> SalPacket:
        """SYN-ACK: base, CONTROL(SYN+ACK), empty UDP header."""
        return SalPacket(self.local_flowid, self.remote_flowid, PROTO_UDP, [control], UdpHeader())

    def third_ack_packet(self, service_id: ServiceID) -> SalPacket:
        """Third ACK: base, CONTROL(ACK), SERVICE(destination), empty UDP header."""
        exts: list[Extension] = [self.control.ext(ControlFlags.ACK), ServiceExt(service_id)]
        return SalPacket(self.local_flowid, self.remote_flowid, PROTO_UDP, exts, UdpHeader())

    def control_packet(
        self,
        control: ControlExt,
        extra: list[Extension] | None = None,
        tcp: TcpHeader | None = None,
    ) -> SalPacket:
        """A SAL control packet (FIN, control ACK, RST, RSYN): base + CONTROL, protocol 17.

        ``tcp`` is ignored: a datagram flow has no TCP header to piggyback.
        """
        exts: list[Extension] = [control, *(extra or [])]
        return SalPacket(self.local_flowid, self.remote_flowid, PROTO_UDP, exts)

    def data_packet(self, payload: bytes) -> SalPacket:
        """A datagram of the flow: base header (shl 3), UDP header, payload."""
        return SalPacket(self.local_flowid, self.remote_flowid, PROTO_UDP, [], UdpHeader(), payload)

    # A datagram flow has no TCP: nothing to send or time at that level.
    def output(self, now: float, out: list[SalPacket]) -> None:
        """Nothing: the connection sends its queued datagrams itself."""

    def on_timer(self, now: float, out: list[SalPacket]) -> None:
        """Nothing: no TCP retransmission or persist timers."""

    def on_tcp(self, tcp: TcpHeader, payload: BytesLike, now: float, dss: object = None) -> None:
        """A TCP segment on a UDP flow: ignored (counted by the connection)."""
        conn = self.conn
        if isinstance(conn, DatagramConnection):
            conn.drops["not_udp"] += 1


class DatagramConnection(Connection):
    """A connected datagram flow (see the module docstring).

    The application calls :meth:`send_datagram` and :meth:`receive_datagram`;
    :meth:`shutdown` closes (SAL FIN). ``drops`` counts what was dropped, by reason:
    ``rx_queue_full``, ``tx_queue_full``, ``empty`` (a zero-length datagram, which the
    reference drops too), ``after_fin`` and ``not_udp``. Its ``DataReceived`` events count
    datagrams waiting, not bytes.
    """

    def __init__(
        self,
        conn_id: int,
        role: Role,
        service_id: ServiceID,
        config: StreamConfig,
        emit: Callable[[Event], None],
        *,
        max_queue: int = DATAGRAM_QUEUE,
    ) -> None:
        super().__init__(conn_id, role, service_id, config, emit)
        self.mp_offer = None  # a datagram flow never offers multipath
        # No TCP options to agree it with: the spec's close, whatever the configuration.
        self.compact_close = False
        self.max_queue = max_queue
        self.rx: deque[bytes] = deque()
        self.rx_bytes = 0
        self.tx: deque[bytes] = deque()
        self.tx_bytes = 0
        self.drops: Counter[str] = Counter()
        self.received = 0  # datagrams delivered to the queue
        self.sent = 0  # datagrams handed to the network
        self._fin_wanted = False  # shutdown() asked for the SAL FIN: output() starts it

    @classmethod
    def create(
        cls,
        conn_id: int,
        role: Role,
        service_id: ServiceID,
        config: StreamConfig,
        emit: Callable[[Event], None],
        local: Address,
        remote: Address | None,
        rng: random.Random,
    ) -> tuple[DatagramConnection, DatagramSubflow]:
        """A flow and its one subflow (``conn_id`` is also the subflow's flowID)."""
        conn = cls(conn_id, role, service_id, config, emit)
        sf = DatagramSubflow(conn, conn_id, local, remote, rng)
        conn.subflows.append(sf)
        return conn, sf

    # -- application API ----------------------------------------------------------------
    def send_datagram(self, data: bytes | bytearray | memoryview) -> bool:
        """Queue one datagram; False when the send queue is full (dropped and counted).

        Raises :class:`DatagramTooLarge` above :data:`MAX_FLOW_DATAGRAM` bytes, ValueError
        for an empty datagram (the peer would drop it), ConnectionError_ once closed.
        """
        self._check_open("send")
        if self.fin_offset is not None:
            raise ConnectionStateError("cannot send after the flow was shut down")
        n = len(data)
        if n > MAX_FLOW_DATAGRAM:
            raise DatagramTooLarge(
                f"datagram of {n} bytes exceeds the limit of {MAX_FLOW_DATAGRAM} bytes"
            )
        if n == 0:
            raise ValueError("a datagram flow cannot carry an empty datagram (only a FIN is)")
        if not self.has_room(n):
            self.drops["tx_queue_full"] += 1
            return False
        self.tx.append(bytes(data))
        self.tx_bytes += n
        self.wake(self)
        return True

    def has_room(self, size: int) -> bool:
        """Whether the send queue takes a datagram of ``size`` bytes now."""
        return len(self.tx) < self.max_queue and self.tx_bytes + size <= self.config.send_buffer

    def receive_datagram(self) -> bytes | None:
        """The oldest datagram received and not yet taken, or None."""
        if not self.rx:
            return None
        data = self.rx.popleft()
        self.rx_bytes -= len(data)
        return data

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """One datagram (see :meth:`send_datagram`); returns its length, or 0 if dropped."""
        return len(data) if self.send_datagram(data) else 0

    def read(self, max_bytes: int = -1) -> bytes:
        """One datagram, truncated to ``max_bytes`` (b"" when none is waiting)."""
        data = self.receive_datagram()
        if data is None:
            return b""
        return data if max_bytes < 0 else data[:max_bytes]

    @property
    def readable(self) -> int:
        """Datagrams waiting to be taken."""
        return len(self.rx)

    @property
    def at_eof(self) -> bool:
        """The peer closed (its SAL FIN arrived) and every datagram was taken."""
        return self.peer_fin_received and not self.rx

    def shutdown(self) -> None:
        """Close our side: the SAL FIN goes after the datagrams already queued."""
        self._check_open("shut down")
        if self.fin_offset is None:
            self.fin_offset = 0
            self._close_event(Side.LOCAL, CloseEvent.SHUTDOWN)
            # Without a transport FIN the peer's close is its SAL FIN: we closed first
            # unless that already arrived.
            self.close.active_close = not self.peer_sal_fin
            self._fin_wanted = True
            self.wake(self)

    # -- handshake ----------------------------------------------------------------------
    def on_synack(self, sf: Subflow, pkt: SalPacket, src: Address, now: float) -> bool:
        """Client: the SYN-ACK (protocol 17, CONTROL(SYN+ACK) acknowledging our SYN)."""
        ctl = pkt.control
        want = ControlFlags.SYN | ControlFlags.ACK
        if (
            ctl is None
            or pkt.protocol != PROTO_UDP
            or ctl.flags & want != want
            or not sf.control.acked(ctl)
        ):
            return False
        sf.control.complete()
        sf.control.peer_nonce = ctl.nonce
        sf.control.peer_consumed(ctl.verno)
        sf.remote_flowid = pkt.src_flowid
        sf.remote_addr = src
        sf.handshake_sample(now)
        self.state = State.ESTABLISHED
        self.last_heard = now
        self.third_ack_pending = True
        self.emit(ConnectionEstablished(self.conn_id))
        return True

    def accept_syn(self, sf: Subflow, pkt: SalPacket, now: float) -> SalPacket:
        """Server: take the client's SYN and return our SYN-ACK."""
        ctl = pkt.control
        assert ctl is not None
        sf.control.peer_nonce = ctl.nonce
        sf.control.peer_consumed(ctl.verno)
        sf.remote_flowid = pkt.src_flowid
        self.last_heard = now
        sf.handshake_sent_at = now
        return sf.synack_packet(sf.control.send_reliable(ControlFlags.SYN | ControlFlags.ACK, now))

    def on_handshake_ack(self, sf: Subflow, pkt: SalPacket, now: float) -> bool:
        """Server: the third ACK, or a datagram of the flow standing in for a lost one.

        A datagram proves the client took our SYN-ACK: it names our flowID, which only the
        SYN-ACK told (the host has checked the client's flowID and address). It is kept.
        """
        ctl = pkt.control
        if ctl is not None:
            if ctl.flags & ControlFlags.SYN:
                return False  # a duplicate SYN: the host re-sends the SYN-ACK
            if not sf.control.nonce_ok(ctl) or not sf.control.acked(ctl):
                return False
        elif pkt.protocol != PROTO_UDP or pkt.udp is None or not pkt.payload:
            return False
        sf.control.complete()
        if ctl is not None:
            sf.handshake_sample(now)
        self.state = State.ESTABLISHED
        if ctl is None:
            self.on_datagram(pkt, now)
        return True

    # -- receive path -------------------------------------------------------------------
    def on_datagram(self, pkt: SalPacket, now: float) -> None:
        """A packet of the established flow after its CONTROL (if any) was handled: queue
        its payload as one datagram."""
        if pkt.protocol != PROTO_UDP or pkt.udp is None:
            if pkt.control is None:
                self.drops["not_udp"] += 1
            return
        payload = pkt.payload
        if not payload:
            if pkt.control is None:
                self.drops["empty"] += 1  # only a FIN may be empty (the reference drops it)
            return  # an empty UDP header riding on control (a repeated third ACK)
        self.last_heard = now
        if self.state is not State.ESTABLISHED or self.peer_sal_fin:
            self.drops["after_fin"] += 1
            return
        n = len(payload)
        if len(self.rx) >= self.max_queue or self.rx_bytes + n > self.config.receive_buffer:
            self.drops["rx_queue_full"] += 1
            return
        self.rx.append(bytes(payload))
        self.rx_bytes += n
        self.received += 1
        self.emit(DataReceived(self.conn_id, len(self.rx)))

    def on_control(
        self, sf: Subflow, ext: ControlExt, now: float, src: Address | None = None
    ) -> None:
        """As on a stream, except that the peer's SAL FIN is its whole close."""
        if src is None or src == sf.remote_addr:
            self.last_heard = now
        if (
            ext.flags & ControlFlags.FIN
            and not self.peer_fin_received
            and self.state is State.ESTABLISHED
            and ext.verno == sf.control.rcv_ackno
        ):
            self.peer_fin_received = True  # no transport FIN comes first on a UDP flow
            self.emit(StreamEnded(self.conn_id))
        super().on_control(sf, ext, now, src)

    @property
    def fin_acked(self) -> bool:
        """Our close is complete: the SAL FIN is acknowledged (what Host.close waits for;
        a datagram flow has no transport FIN whose ACK would say more)."""
        return self.close.local is Stage.DONE

    # -- output -------------------------------------------------------------------------
    def output(self, now: float, out: list[SalPacket]) -> None:
        """The third ACK, queued datagrams (unless the path is changing), then control."""
        if self.state is State.ESTABLISHED or self.state is State.TIME_WAIT:
            sf = self.primary
            assert isinstance(sf, DatagramSubflow)
            if self.third_ack_pending:
                self.third_ack_pending = False
                out.append(sf.third_ack_packet(self.service_id))
            if self.state is State.ESTABLISHED and not sf.frozen:
                tx = self.tx
                while tx:
                    data = tx.popleft()
                    out.append(sf.data_packet(data))
                    self.sent += 1
                self.tx_bytes = 0
            if self._fin_wanted and not sf.frozen:
                self._fin_wanted = False
                if self.state is State.ESTABLISHED:
                    # No transport FIN to wait for: the SAL FIN is due at once, after the
                    # exchange in progress (an RSYN) if there is one.
                    self._close_event(Side.LOCAL, CloseEvent.FIN_ACKED)
                    self._sal_fin_when_free(now)
        self.ack_now = False  # no transport ACKs on a datagram flow
        super().output(now, out)

    # -- timers -------------------------------------------------------------------------
    def next_deadline(self) -> float | None:
        """Control retransmission, migration timers, TIME_WAIT, idle timeout."""
        if self.state is State.CLOSED:
            return None
        if self.state is State.TIME_WAIT:
            return self.time_wait_deadline
        best = self.primary.next_deadline()
        idle = self.config.idle_timeout
        if self.state is State.ESTABLISHED and idle is not None:
            end = self.last_heard + idle
            if best is None or end < best:
                best = end
        return best

    def on_timer(self, now: float, out: list[SalPacket]) -> None:
        """Run every timer that is due."""
        if self.state is State.TIME_WAIT:
            if self.time_wait_deadline is not None and now >= self.time_wait_deadline:
                self.state = State.CLOSED
            return
        if self.closed:
            return
        idle = self.config.idle_timeout
        if self.state is State.ESTABLISHED and idle is not None and now >= self.last_heard + idle:
            self.time_out("idle")
            return
        sf = self.primary
        if sf.mig is not None or sf.challenge is not None:
            self._migration_timers(sf, now)
            if self.closed:  # it may have timed out
                return
        try:
            if sf.control.due(now):
                self.resend_control(sf, out)
        except ControlTimeout as exc:
            self.time_out(f"control packet unanswered ({exc})")

"""TIME_WAIT as a small record: what a closed flow still owes the network, and no more.

A connection that closed first waits ``StreamConfig.time_wait`` (30 s) before its flowID
is forgotten, so that a late retransmission from the peer is answered (our last ACK was
lost) rather than met with a RST. Everything it can still send is fixed by then: the ACK of
the peer's data and FIN, and the control ACK of the peer's SAL FIN. So the host keeps the
numbers those two packets carry (control numbers, TCP sequence, ACK and window) and the few
fields that check who may draw them, and lets the connection object go (a whole connection
with its buffers and subflow is about 9 KB; this record is a few hundred bytes). The packets
are encoded only when a late packet draws one: most flows end their wait without, and two
encodings per closed connection were a tenth of its set-up and teardown cost.

The answers are the connection's own (see ``tests/test_time_wait.py``, which compares them
with a host keeping whole connections): data or a TCP FIN draws the ACK, a CONTROL(FIN)
with the peer's nonce draws the control ACK; everything else is dropped and counted. A RST
never ends TIME_WAIT early (RFC 1337). What a record does not do: follow an RSYN (the peer
moving while we wait: its late packets from the new address are dropped) or multipath
(connections with more than one subflow keep the whole object).

Records expire in the order they were made (a record never outlives a later one by more
than the difference of their configured waits), and when the host's flow table is full the
oldest record gives way to a new flow, as Linux drops TIME_WAIT sockets past
``tcp_max_tw_buckets``: flowIDs are random 32-bit values, so a flow reusing the number soon
after is unlikely anyway. Sans-I/O: ``now`` is passed in.
"""

from __future__ import annotations

import struct
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from typing import TYPE_CHECKING, Final

from ..sal.extensions import ControlExt, ControlFlags
from ..sal.inet import Address
from ..sal.packet import SalPacket
from ..sal.transport_headers import PROTO_TCP, PROTO_UDP, TcpFlags, TcpHeader, TcpOption

if TYPE_CHECKING:
    from ..transport.connection import Connection, Subflow

__all__ = ["TimeWait", "TimeWaitTable"]

_FIN: Final = int(ControlFlags.FIN)
_RST: Final = int(ControlFlags.RST)
# verno, ackno (control ACK); seq, ack, window (pure ACK): see TimeWait.__init__.
_NUMBERS: Final = struct.Struct("!IIIIH")


class TimeWait:
    """One flow in TIME_WAIT: who may speak to it and what it answers."""

    __slots__ = (
        "conn",
        "expires",
        "flowid",
        "local",
        "local_nonce",
        "numbers",
        "options",
        "peer",
        "peer_flowid",
        "peer_nonce",
        "protocol",
    )

    def __init__(
        self,
        flowid: int,
        peer_flowid: int,
        peer: Address,
        local: Address,
        peer_nonce: bytes,
        control: ControlExt,
        protocol: int,
        tcp: TcpHeader | None,
        expires: float,
        conn: weakref.ref[Connection] | None,
    ) -> None:
        self.flowid = flowid
        self.peer_flowid = peer_flowid
        self.peer = peer
        self.local = local
        self.peer_nonce = peer_nonce
        # What the two answers carry, packed (one small bytes object rather than five
        # ints): the control ACK's verno and ackno (its flags are ACK, its reserved bits
        # zero; our nonce is kept as it is) and the pure ACK's sequence, ACK and window.
        # A datagram flow (protocol 17) has no TCP side: its three are zero and unused.
        self.local_nonce = control.nonce
        self.protocol = protocol
        seq = ack = window = 0
        self.options: list[TcpOption] | None = None
        if tcp is not None:
            seq, ack, window = tcp.seq, tcp.ack, tcp.window
            self.options = tcp.options or None  # SACK blocks, rare by then
        self.numbers = _NUMBERS.pack(control.verno, control.ackno, seq, ack, window)
        self.expires = expires
        # The connection object, if the application still holds it: told CLOSED at the end.
        self.conn = conn

    @classmethod
    def of(cls, conn: Connection, sf: Subflow, datagram: bool) -> TimeWait | None:
        """The record standing for ``conn`` (in TIME_WAIT, one subflow ``sf``), or None
        when it cannot be made (no peer address or nonce: nothing can reach it anyway)."""
        peer, nonce, deadline = sf.remote_addr, sf.control.peer_nonce, conn.time_wait_deadline
        if peer is None or nonce is None or deadline is None:
            return None
        # The packets the connection itself would send: a control ACK (alone, as a flow
        # whose TCP side is done sends it) and, on a stream, the pure ACK. Built by the
        # subflow's control channel and segment builder, so they are its own; kept as
        # their numbers, encoded when drawn. (The control ACK's extension is all that is
        # kept of it, and its protocol is the flow's: no packet is built around it.)
        control = sf.control.ext(ControlFlags.ACK)
        tcp = None if datagram else sf.ack_header()  # pure_ack()'s header, no packet around it
        return cls(
            sf.local_flowid,
            sf.remote_flowid,
            peer,
            sf.local_addr,
            nonce,
            control,
            PROTO_UDP if datagram else PROTO_TCP,
            tcp,
            deadline,
            weakref.ref(conn),
        )

    @property
    def ctl_ack(self) -> bytes:
        """The control ACK (of the peer's SAL FIN), encoded."""
        verno, ackno = _NUMBERS.unpack(self.numbers)[:2]
        ext = ControlExt(ControlFlags.ACK, verno, ackno, self.local_nonce)
        pkt = SalPacket(self.flowid, self.peer_flowid, self.protocol, [ext])
        return pkt.encode(self.local[0], self.peer[0])

    @property
    def both_acks(self) -> bytes:
        """The control ACK and the pure ACK's TCP header in one packet (a compact close's
        last packet: see transport.close_state)."""
        verno, ackno, seq, ack, window = _NUMBERS.unpack(self.numbers)
        ext = ControlExt(ControlFlags.ACK, verno, ackno, self.local_nonce)
        tcp = self._tcp_header(seq, ack, window)
        pkt = SalPacket(self.flowid, self.peer_flowid, self.protocol, [ext], tcp)
        return pkt.encode(self.local[0], self.peer[0])

    def _tcp_header(self, seq: int, ack: int, window: int) -> TcpHeader:
        return TcpHeader(
            seq=seq,
            ack=ack,
            flags=TcpFlags.ACK,
            window=window,
            options=list(self.options or ()),
        )

    @property
    def tcp_ack(self) -> bytes | None:
        """The pure ACK (of the peer's data and FIN), encoded; None on a datagram flow."""
        if self.protocol != PROTO_TCP:
            return None
        tcp = self._tcp_header(*_NUMBERS.unpack(self.numbers)[2:])
        pkt = SalPacket(self.flowid, self.peer_flowid, self.protocol, [], tcp)
        return pkt.encode(self.local[0], self.peer[0])

    def answer(self, pkt: SalPacket, src: Address) -> tuple[bytes | None, str | None]:
        """What to send back for ``pkt`` from ``src`` (bytes or None), and the reason it is
        dropped (None when it was taken). The caller checked the source flowID."""
        if src != self.peer:
            return None, "not_peer_address"
        ctl = pkt.control
        if ctl is not None:
            flags = ctl.flags
            if flags & _RST:
                return None, "time_wait_rst"  # RFC 1337: a RST does not end TIME_WAIT
            if ctl.nonce != self.peer_nonce:
                return None, "bad_nonce"
            if flags & _FIN:
                tcp = pkt.tcp
                if tcp is not None and tcp.flags & TcpFlags.FIN:
                    # A compact close's FIN and SAL FIN again: both ACKs, in one packet
                    # as the connection sent them.
                    return self.both_acks, None
                return self.ctl_ack, None  # our control ACK of its SAL FIN was lost
            if pkt.tcp is None:
                return None, "time_wait_control"
        tcp = pkt.tcp
        if tcp is not None and (pkt.payload or tcp.flags & TcpFlags.FIN):
            return self.tcp_ack, None  # a retransmission: our last ACK was lost
        return None, "time_wait_quiet"  # never answer a pure ACK (two TIME_WAITs would loop)


class TimeWaitTable:
    """The host's records, oldest first (see the module docstring)."""

    __slots__ = ("_records",)

    def __init__(self) -> None:
        self._records: OrderedDict[int, TimeWait] = OrderedDict()

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[TimeWait]:
        return iter(self._records.values())

    def add(self, record: TimeWait) -> None:
        """Keep ``record`` until it expires (never before a record made earlier)."""
        records = self._records
        if records:
            last = next(reversed(records.values()))
            if record.expires < last.expires:
                record.expires = last.expires  # keeps the table in expiry order
        records[record.flowid] = record

    def pop(self, flowid: int) -> TimeWait | None:
        """Remove and return the record of ``flowid``, if any."""
        return self._records.pop(flowid, None)

    def next_deadline(self) -> float | None:
        """When the oldest record expires, or None."""
        for record in self._records.values():
            return record.expires
        return None

    def expire(self, now: float) -> list[TimeWait]:
        """Remove and return every record whose wait is over."""
        done: list[TimeWait] = []
        records = self._records
        while records:
            record = next(iter(records.values()))
            if record.expires > now:
                break
            records.popitem(last=False)
            done.append(record)
        return done

    def oldest(self) -> TimeWait | None:
        """Remove and return the oldest record (to make room), or None."""
        if not self._records:
            return None
        return self._records.popitem(last=False)[1]

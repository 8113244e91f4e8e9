"""Serval TCP connections: a stream over one or more subflows, with no I/O and no clock.

A :class:`Connection` is what the application sees: a bounded send buffer, a receive buffer
whose free space is the advertised window (so a slow reader slows the sender), half-close
and abort. It owns one or more :class:`~pyserval.transport.subflow.Subflow` objects; each is
one SAL flow (its own flowIDs, address pair, SAL control channel) carrying its own TCP
sequence space, congestion control, RTT estimate and SACK scoreboard. A single-path
connection's subflow data offsets are the connection's; multipath adds a mapping between
the two without changing this structure.

Where the rest lives: a subflow's TCP send and receive path is ``subflow.py``; its
scoreboard, loss rules, pipe and RTO are ``recovery.py``; the segments it sends are built in
``packets.py``; sequence arithmetic (:func:`unwrap`) and :class:`Role` are ``common.py``.
This module keeps the SAL side of a connection: the handshake, control packets, migration
and multipath bookkeeping, close, liveness timers and the connection's output.

The host core (``pyserval.core``) feeds decoded packets to :meth:`Subflow.on_packet`, calls
:meth:`Connection.on_timer` at :meth:`Connection.next_deadline`, and collects datagrams
with :meth:`Connection.output`.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

from ..naming.service_id import ServiceID
from ..sal.control import ControlTimeout
from ..sal.extensions import (
    AddAddrExt,
    ControlExt,
    ControlFlags,
    Extension,
    JoinExt,
    MpCapableExt,
    ServiceExt,
)
from ..sal.packet import SalPacket
from ..sal.transport_headers import PROTO_TCP, TcpFlags
from .buffers import ReceiveBuffer, SendBuffer
from .common import MASK32, Address, Role, unwrap
from .config import StreamConfig
from .events import (
    ConnectionClosed,
    ConnectionEstablished,
    ConnectionReset,
    ConnectionTimedOut,
    Event,
    FlowMigrated,
    PathAdded,
    PathFailed,
    SendSpaceAvailable,
    StreamEnded,
)
from .migration import CHALLENGE, CHALLENGE_TRIES, Challenge, MigrationState
from .multipath import (
    DEAD_AFTER_RTOS,
    JOIN_RETRIES,
    Lia,
    MultipathState,
    SeqTracker,
    get_scheduler,
    join_ack_proof,
    new_key,
)
from .subflow import Subflow

# Role, Subflow, unwrap and Address are re-exported: their old import path.
__all__ = ["Address", "Connection", "ConnectionError_", "Role", "State", "Subflow", "unwrap"]


def _no_wake(conn: Connection) -> None:
    """Default wake-up hook for a connection not attached to a host."""


class ConnectionError_(Exception):
    """Local misuse of a connection (writing after shutdown, using a closed one, ...)."""


class State(enum.Enum):
    """Connection state (SAL and TCP handshake move together, as in the reference)."""

    SYN_SENT = "syn_sent"
    SYN_RECEIVED = "syn_received"
    ESTABLISHED = "established"
    TIME_WAIT = "time_wait"
    CLOSED = "closed"


class Connection:
    """A Serval TCP connection as the application sees it (see the module docstring)."""

    def __init__(
        self,
        conn_id: int,
        role: Role,
        service_id: ServiceID,
        config: StreamConfig,
        emit: Callable[[Event], None],
    ) -> None:
        self.conn_id = conn_id
        self.role = role
        self.service_id = service_id
        self.config = config
        self._emit = emit
        self.state = State.SYN_SENT if role is Role.CLIENT else State.SYN_RECEIVED
        self.subflows: list[Subflow] = []
        self.send = SendBuffer(config.send_buffer)
        self.recv = ReceiveBuffer(config.receive_buffer)
        self.send_blocked = False
        self.fin_offset: int | None = None  # set by shutdown: where our FIN sits
        self.fin_acked = False
        self.peer_fin_offset: int | None = None
        self.peer_fin_received = False
        self.sal_fin_acked = False
        self.peer_sal_fin = False
        self.active_close = False
        self.ack_now = False
        self.challenge_ack_due = False  # an RFC 5961 ACK, if the host's rate limit allows
        self.third_ack_pending = False
        self.unacked_segments = 0
        self.dupacks_owed = 0  # immediate ACKs owed for out-of-order segments (bounded)
        self.delack_deadline: float | None = None
        self.time_wait_deadline: float | None = None
        self.last_heard = 0.0
        self.keepalives_sent = 0  # probes since we last heard from the peer
        self.stats_heard_again = 0  # resends hastened by hearing the peer (_heard_again)
        self.unreachable_since = -1.0  # last_heard when ICMP errors started to arrive
        self.unreachable_count = 0
        self.error: str | None = None
        self.listener_id: int | None = None
        self.peer_key: tuple[Address, int] | None = None  # server side: (peer address, flowID)
        self.scheduled: float | None = None  # the deadline the host's timer heap holds
        # Work the next output() call must do (set on demand, not per packet).
        self.pending_control = False  # (re)send our outstanding control packet
        self.control_ack_pending = False  # acknowledge a peer's SAL FIN
        self.rst_pending = False
        self.rsynack_pending = False  # answer a peer's RSYN
        self.challenge_pending = False  # send our address check (again)
        self.challenge_echo: tuple[int, int] | None = None  # answer the peer's check
        self.sal_fin_due = False  # our SAL FIN waits for an RSYN exchange to finish
        self.syn_due = False  # SYN (re)transmission: the host resolves the service again
        self.syn_first = False
        self.wake: Callable[[Connection], None] = _no_wake  # the host polls us for output
        # Multipath: the key our SYN offers (client with config.multipath), then the state
        # once both ends agreed; subflows given up, for the host to forget.
        self.mp_offer: int | None = new_key() if config.multipath and role is Role.CLIENT else None
        self.mp: MultipathState | None = None
        self.dead_subflows: list[Subflow] = []
        self.join_syn_due: list[Subflow] = []
        self.control_ack_sf: Subflow | None = None

    # -- events and misuse --------------------------------------------------------------
    def emit(self, event: Event) -> None:
        """Report an event to the host."""
        self._emit(event)

    @property
    def primary(self) -> Subflow:
        """The first subflow (the one the handshake created)."""
        return self.subflows[0]

    @property
    def closed(self) -> bool:
        """Whether the connection is gone (closed, reset or timed out)."""
        return self.state is State.CLOSED

    def _check_open(self, what: str) -> None:
        if self.state is State.CLOSED or self.state is State.TIME_WAIT:
            raise ConnectionError_(
                f"cannot {what}: connection {self.conn_id:#x} is closed"
                + (f" ({self.error})" if self.error else "")
            )

    # -- application API ----------------------------------------------------------------
    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Queue bytes to send; returns how many fit in the send buffer (may be 0)."""
        self._check_open("send")
        if self.fin_offset is not None:
            raise ConnectionError_("cannot send after shutdown of the write side")
        n = self.send.write(data)
        if n < len(data):
            self.send_blocked = True
        if n:
            self.wake(self)
        return n

    def read(self, max_bytes: int = -1) -> bytes:
        """Take received bytes (b"" when none are ready); opens the window as it reads."""
        data = self.recv.read(max_bytes)
        if data and self.subflows and self.state is State.ESTABLISHED:
            sf = self.primary
            opened = self.recv.window - sf.last_adv_window
            if opened >= min(2 * sf.mss, self.recv.capacity // 2):
                self.ack_now = True  # window update, so a sender waiting on us resumes
                self.wake(self)
        return data

    @property
    def readable(self) -> int:
        """Bytes ready to read."""
        return self.recv.readable

    @property
    def at_eof(self) -> bool:
        """The peer finished sending and every byte was read."""
        return self.peer_fin_received and self.recv.readable == 0

    def shutdown(self) -> None:
        """Half-close: send FIN after the data already queued."""
        self._check_open("shut down")
        if self.fin_offset is None:
            self.fin_offset = self.send.end
            if not self.peer_fin_received:
                self.active_close = True
            self.wake(self)

    def abort(self) -> None:
        """Abortive close: reset the peer and drop everything.

        In TIME_WAIT both directions were delivered and closed already: the connection just
        goes, with nothing sent (RFC 9293 3.10.7.1: ABORT in TIME-WAIT sends no RST).
        """
        if self.state is State.TIME_WAIT:
            self.state = State.CLOSED
            self.wake(self)
        elif self.state is not State.CLOSED:
            self.abort_with("aborted locally", send_rst=True)
            self.wake(self)

    # -- handshake ----------------------------------------------------------------------
    def syn_packet(self, now: float, first: bool) -> SalPacket:
        """The client's SYN (``first``: start the control exchange; else a retransmission)."""
        sf = self.primary
        ext = sf.control.send_reliable(ControlFlags.SYN, now) if first else sf.control.resend()
        sf.handshake_sent_at = now if first else None  # Karn: an answer to which copy?
        return sf.syn_packet(ext, self.service_id)

    def on_synack(self, sf: Subflow, pkt: SalPacket, src: Address, now: float) -> bool:
        """Client: the SYN-ACK from whichever instance answered; False if not acceptable."""
        ctl, tcp = pkt.control, pkt.tcp
        want = ControlFlags.SYN | ControlFlags.ACK
        if ctl is None or tcp is None or ctl.flags & want != want or not sf.control.acked(ctl):
            return False
        if tcp.flags & (TcpFlags.SYN | TcpFlags.ACK) != TcpFlags.SYN | TcpFlags.ACK:
            return False
        if tcp.ack != (sf.iss + 1) & MASK32:
            return False
        sf.control.complete()
        sf.control.peer_nonce = ctl.nonce
        sf.control.peer_consumed(ctl.verno)
        sf.remote_flowid = pkt.src_flowid
        sf.remote_addr = src
        sf.take_peer_syn(tcp)
        sf.handshake_sample(now)
        offer = pkt.find(MpCapableExt)
        if self.mp_offer is not None and offer is not None:
            self._enable_multipath(self.mp_offer, offer.key)
        self.state = State.ESTABLISHED
        self.last_heard = now
        self.third_ack_pending = True
        self.emit(ConnectionEstablished(self.conn_id))
        return True

    def accept_syn(self, sf: Subflow, pkt: SalPacket, now: float) -> SalPacket:
        """Server: take the client's SYN and return our SYN-ACK."""
        ctl, tcp = pkt.control, pkt.tcp
        assert ctl is not None and tcp is not None
        sf.control.peer_nonce = ctl.nonce
        sf.control.peer_consumed(ctl.verno)
        sf.remote_flowid = pkt.src_flowid
        sf.take_peer_syn(tcp)
        self.last_heard = now
        offer = pkt.find(MpCapableExt)
        if offer is not None and self.config.accept_multipath:
            self._enable_multipath(new_key(), offer.key)
        sf.handshake_sent_at = now
        return sf.synack_packet(sf.control.send_reliable(ControlFlags.SYN | ControlFlags.ACK, now))

    # -- multipath ----------------------------------------------------------------------
    def _enable_multipath(self, local_key: int, peer_key: int) -> None:
        """Both ends agreed: data from now on is mapped by DSN (see transport.multipath)."""
        mp = MultipathState(local_key, peer_key, get_scheduler(self.config.scheduler))
        self.mp = mp
        sf = self.primary
        mp.snd_right = sf.snd_wnd  # the window the peer's SYN (or SYN-ACK) offered
        sf.rcv_track = SeqTracker()
        sf.cc = Lia(sf.mss, mp.group)

    def live_subflows(self) -> list[Subflow]:
        """Subflows that carry data (joined, not given up)."""
        return [sf for sf in self.subflows if sf.join_state is None]

    def add_subflow(self, sf: Subflow, now: float) -> None:
        """Client: open another subflow (its JOIN SYN goes out from ``sf.local_addr``)."""
        mp = self.mp
        if mp is None:
            raise ConnectionError_(
                "this connection is not multipath: connect with StreamConfig(multipath=True)"
            )
        if self.state is not State.ESTABLISHED:
            raise ConnectionError_(f"cannot add a path: connection {self.conn_id:#x} is closing")
        sf.join_state = "syn_sent"
        sf.control.max_retries = JOIN_RETRIES
        sf.rcv_track = SeqTracker()
        sf.cc = Lia(sf.mss, mp.group)
        self.subflows.append(sf)
        cc = sf.control
        cc.rto = min(max(self.primary.rtt.rto, cc.timers.min_rto), cc.timers.initial_rto)
        cc.send_reliable(ControlFlags.SYN, now)
        sf.join_third_ack = False
        self.join_syn_due.append(sf)
        self.wake(self)

    def accept_join(self, sf: Subflow, pkt: SalPacket, now: float) -> SalPacket:
        """Server: a JOIN SYN for this connection; returns the SYN-ACK."""
        mp = self.mp
        ctl, tcp = pkt.control, pkt.tcp
        assert mp is not None and ctl is not None and tcp is not None
        sf.join_state = "syn_received"
        sf.control.max_retries = JOIN_RETRIES
        sf.rcv_track = SeqTracker()
        sf.cc = Lia(sf.mss, mp.group)
        sf.control.peer_nonce = ctl.nonce
        sf.control.peer_consumed(ctl.verno)
        sf.remote_flowid = pkt.src_flowid
        sf.take_peer_syn(tcp)
        sf.cc.set_mss(sf.mss)
        self.subflows.append(sf)
        return sf.synack_packet(sf.control.send_reliable(ControlFlags.SYN | ControlFlags.ACK, now))

    def on_join_synack(self, sf: Subflow, pkt: SalPacket, src: Address, now: float) -> bool:
        """Client: the SYN-ACK of a joining subflow; False if it is not acceptable."""
        ctl, tcp = pkt.control, pkt.tcp
        want = ControlFlags.SYN | ControlFlags.ACK
        if ctl is None or tcp is None or ctl.flags & want != want or not sf.control.acked(ctl):
            return False
        if tcp.ack != (sf.iss + 1) & MASK32:
            return False
        sf.control.complete()
        sf.control.peer_nonce = ctl.nonce
        sf.control.peer_consumed(ctl.verno)
        sf.remote_flowid = pkt.src_flowid
        sf.remote_addr = src
        sf.take_peer_syn(tcp)
        sf.cc.set_mss(sf.mss)
        sf.join_state = None
        sf.join_third_ack = True
        sf.control.max_retries = sf.control.timers.max_retries
        self.emit(PathAdded(self.conn_id, sf.local_addr, src))
        self.wake(self)
        return True

    def join_proven(self, sf: Subflow, join: JoinExt | None) -> bool:
        """Server: whether the third ACK's JOIN proves the client holds the keys."""
        mp = self.mp
        if mp is None or join is None or sf.control.peer_nonce is None:
            return False
        expected = join_ack_proof(
            mp.peer_key, mp.local_key, sf.control.peer_nonce, sf.control.local_nonce
        )
        return join.proof == expected

    def join_established(self, sf: Subflow) -> None:
        """Server: the joining subflow's handshake completed (and was proven)."""
        if sf.join_state == "syn_received":
            sf.control.max_retries = sf.control.timers.max_retries
            sf.control.complete()
            sf.join_state = None
            assert sf.remote_addr is not None
            self.emit(PathAdded(self.conn_id, sf.local_addr, sf.remote_addr))

    def subflow_failed(self, sf: Subflow, now: float) -> None:
        """Give up a subflow (its path died): its unacknowledged data goes on the others."""
        mp = self.mp
        if mp is None or sf not in self.subflows or len(self.subflows) < 2:
            return
        for start, seg in sf.segments.items():
            if seg.dsn >= 0 and not seg.fin:
                mp.reinject.append((seg.dsn, seg.dsn + (seg.end - start)))
        sf.segments.clear()
        sf.lost.clear()
        sf.rto_deadline = None
        sf.fin_seq = None
        if isinstance(sf.cc, Lia):
            sf.cc.leave()
        was_primary = sf is self.primary
        self.subflows.remove(sf)
        self.dead_subflows.append(sf)
        mp.failed += 1
        remote = sf.remote_addr or ("", 0)
        self.emit(PathFailed(self.conn_id, sf.local_addr, remote))
        if was_primary and self.fin_acked and not self.sal_fin_acked:
            # The SAL FIN was on the dead path: start it again on the new primary.
            self.fin_acked = False
            self.on_fin_acked(now)
        elif was_primary and self.fin_offset is not None and not self.fin_acked:
            self.primary.fin_seq = None  # the DATA_FIN goes again on the new primary
        self.wake(self)

    def mp_take(self, sf: Subflow, max_len: int, dsn_limit: int) -> tuple[int, int] | None:
        """The scheduler: the next DSN range for ``sf`` (data to resend first), or None."""
        mp = self.mp
        assert mp is not None
        while mp.reinject:
            start, end = mp.reinject[0]
            start = max(start, mp.data_ack)  # what was delivered meanwhile is skipped
            if start >= end:
                mp.reinject.popleft()
                continue
            n = min(max_len, end - start, dsn_limit - start)
            if n <= 0:
                return None
            if start + n < end:
                mp.reinject[0] = (start + n, end)
            else:
                mp.reinject.popleft()
            return start, n
        return mp.scheduler.take(mp, sf, self.send.end, max_len, dsn_limit)

    def read_dsn(self, dsn: int, n: int) -> bytes:
        """``n`` bytes from ``dsn``; zeros for any already released (delivered by another
        subflow: the receiver drops them)."""
        start = self.send.start
        if dsn >= start:
            return self.send.read(dsn, dsn + n)
        gone = min(start - dsn, n)
        return bytes(gone) + (self.send.read(start, dsn + n) if n > gone else b"")

    def maybe_data_fin_acked(self, now: float) -> None:
        """Multipath: our DATA_FIN is acknowledged on its subflow and every byte before it
        at the connection level: the stream is done, start the SAL FIN."""
        mp = self.mp
        fin = self.fin_offset
        if mp is None or fin is None or mp.data_ack < fin:
            return
        if any(sf.fin_seq_acked for sf in self.subflows):
            self.on_fin_acked(now)

    def on_data_ack(self, ack: int, window: int = -1, now: float = 0.0) -> None:
        """The peer's cumulative data ACK (and the window it offers from there): free what
        it covers, move the connection's right edge."""
        mp = self.mp
        if mp is None:
            return
        if window >= 0 and ack + window > mp.snd_right and ack >= mp.data_ack:
            mp.snd_right = ack + window
        if ack <= mp.data_ack or ack > self.send.end:
            return
        mp.data_ack = ack
        if self.fin_offset is not None and ack >= self.fin_offset:
            self.maybe_data_fin_acked(now)
        released = self.send.release(ack)
        if released and self.send_blocked and self.send.free > 0:
            self.send_blocked = False
            self.emit(SendSpaceAvailable(self.conn_id, self.send.free))

    def on_add_addr(self, address: Address) -> None:
        """The peer told us another of its addresses (kept, at most eight)."""
        mp = self.mp
        if mp is not None and address not in mp.peer_addresses and len(mp.peer_addresses) < 8:
            mp.peer_addresses.append(address)

    def check_peer_fin(self, now: float) -> None:
        """Multipath: every byte before the peer's DATA_FIN arrived: end of stream."""
        if (
            self.peer_fin_offset is not None
            and not self.peer_fin_received
            and self.recv.rcv_nxt >= self.peer_fin_offset
        ):
            self.peer_fin_received = True
            self.primary.ack_pending = True
            self.emit(StreamEnded(self.conn_id))
            self.on_peer_fin(now)

    def on_handshake_ack(self, sf: Subflow, pkt: SalPacket, now: float) -> bool:
        """Server: the third ACK, or data proving it was sent; True when established."""
        ctl, tcp = pkt.control, pkt.tcp
        if ctl is not None:
            if ctl.flags & ControlFlags.SYN:
                return False  # a duplicate SYN: the host re-sends the SYN-ACK
            if not sf.control.nonce_ok(ctl) or not sf.control.acked(ctl):
                return False
        elif tcp is None or not tcp.flags & TcpFlags.ACK or tcp.ack != (sf.iss + 1) & MASK32:
            return False  # only a TCP ACK of our SYN stands in for a lost third ACK
        sf.control.complete()
        if ctl is not None:  # only the third ACK itself: data standing in for it came later
            sf.handshake_sample(now)
        self.state = State.ESTABLISHED
        return True  # the host reports the connection, then hands it the segment

    # -- driven by the subflow ----------------------------------------------------------
    def on_reset(self) -> None:
        """A genuine RST from the peer.

        If both streams already completed (our FIN acknowledged, the peer's FIN received) the
        peer only forgot the flow while we finished the SAL FIN exchange (its TIME_WAIT ran
        out): no data was lost, so the connection counts as closed cleanly.
        """
        if self.state is State.CLOSED or self.state is State.TIME_WAIT:
            return  # RFC 1337: a RST must not cut TIME_WAIT short
        self.state = State.CLOSED
        if self.fin_acked and self.peer_fin_received:
            self.emit(ConnectionClosed(self.conn_id))
            return
        self.error = "reset by peer"
        self.emit(ConnectionReset(self.conn_id, "reset by peer"))

    def on_fin_acked(self, now: float) -> None:
        """Our TCP FIN was acknowledged: start the SAL FIN exchange."""
        if self.fin_acked:
            return
        self.fin_acked = True
        if self.primary.control.outstanding is not None:
            self.sal_fin_due = True  # an RSYN is outstanding (one exchange at a time)
            return
        self._start_sal_fin(now)

    def _start_sal_fin(self, now: float) -> None:
        self.sal_fin_due = False
        sf = self.primary
        # The path's RTT is known by now: time the SAL FIN by it, not by the 3 s used for a
        # SYN, so a lost FIN is repaired before the peer's TIME_WAIT runs out.
        timers = sf.control.timers
        sf.control.rto = min(max(sf.rtt.rto, timers.min_rto), timers.initial_rto)
        sf.control.send_reliable(ControlFlags.FIN, now)
        self.pending_control = True

    def on_peer_fin(self, now: float) -> None:
        """The peer's TCP FIN arrived after all its data."""
        self._maybe_finish(now)

    def ack_sent(self) -> None:
        """A segment carrying our current ACK went out: no separate ACK needed."""
        self.ack_now = False
        self.unacked_segments = 0
        self.delack_deadline = None

    def protocol_violation(self, what: str) -> None:
        """The peer broke the protocol: reset it and tell the application."""
        self.abort_with(f"protocol violation: {what}", send_rst=True)

    def time_out(self, why: str) -> None:
        """Give up: retransmissions went unanswered."""
        self.error = f"timed out: {why}"
        self.state = State.CLOSED
        self.emit(ConnectionTimedOut(self.conn_id, why))

    def abort_with(self, reason: str, *, send_rst: bool) -> None:
        """Close at once; optionally send a CONTROL(RST) to the peer first."""
        if self.state is State.CLOSED:
            return
        if send_rst and self.subflows and self.primary.remote_flowid:
            self.rst_pending = True
        self.error = reason
        self.state = State.CLOSED
        self.emit(ConnectionReset(self.conn_id, reason))

    def on_control(
        self, sf: Subflow, ext: ControlExt, now: float, src: Address | None = None
    ) -> None:
        """A CONTROL extension with the right nonce on an established connection, from
        ``src`` (None: the flow's current remote address)."""
        flags = ext.flags
        if flags & ControlFlags.RST:
            self.on_reset()
            return
        if src is None:
            src = sf.remote_addr
            assert src is not None
        if flags & ControlFlags.RSYN:
            if flags & CHALLENGE:
                self._on_challenge(sf, ext, src, now)
            elif flags & ControlFlags.ACK:
                self._on_rsynack(sf, ext, src, now)
            else:
                self._on_rsyn(sf, ext, src, now)
            return
        mig = sf.mig
        if mig is not None and mig.awaiting_ack and flags & ControlFlags.ACK:
            # The moving peer's ACK of our RSYN+ACK: the new path is confirmed.
            self._on_move_ack(sf, src, now)
        if sf.join_state == "syn_received":
            return  # the host establishes a JOIN only on its proven third ACK
        if flags & ControlFlags.ACK and sf.control.acked(ext):
            if sf.control.outstanding == ControlFlags.RSYN:
                # A plain ACK of our RSYN (its RSYN+ACK was lost, or both ends moved and
                # this ACK answers ours): the move is acknowledged all the same.
                self._on_rsynack(sf, ext, src, now)
                return
            if sf.control.outstanding == ControlFlags.FIN:
                self.sal_fin_acked = True
            sf.control.complete()
        if flags & ControlFlags.FIN:
            if not self.peer_fin_received:
                return  # its TCP FIN has not reached us yet: the peer will send again
            sf.control.peer_consumed(ext.verno)
            self.peer_sal_fin = True
            self.control_ack_pending = True
            self.control_ack_sf = sf  # answered on the subflow (and channel) it came on
        self._maybe_finish(now)

    # -- migration ----------------------------------------------------------------------
    def start_migration(self, sf: Subflow, now: float, local: Address) -> bool:
        """Move ``sf`` to the local address ``local`` (RSYN from there). False when the
        control channel is busy with another exchange (a closing flow): nothing started."""
        if self.state is not State.ESTABLISHED:
            raise ConnectionError_(f"cannot migrate connection {self.conn_id:#x}: not established")
        cc = sf.control
        mig = sf.mig
        if cc.outstanding is not None and not (mig is not None and mig.own_rsyn):
            return False
        if mig is None:
            mig = sf.mig = MigrationState()
        sf.local_addr = local
        mig.reason = "migrated"
        if not mig.own_rsyn:
            mig.own_rsyn = True
            # Time the RSYN by the path's RTO, not the 3 s used for a SYN: the flow is
            # waiting on it.
            cc.rto = min(max(sf.rtt.rto, cc.timers.min_rto), cc.timers.initial_rto)
            cc.send_reliable(ControlFlags.RSYN, now)
        self.pending_control = True  # (again) from the new address
        self.wake(self)
        return True

    def _on_rsyn(self, sf: Subflow, ext: ControlExt, src: Address, now: float) -> None:
        """The peer moves to ``src``."""
        cc = sf.control
        expected = cc.rcv_ackno
        mig = sf.mig
        if ext.verno == (expected - 1) & MASK32:
            # A retransmitted (or late, reordered) RSYN: answer it again. It changes the
            # address only while the exchange is open (the peer's ACK decides in the end).
            if mig is not None and mig.awaiting_ack:
                sf.remote_addr = src
                self.rsynack_pending = True
            elif src == sf.remote_addr:
                self.rsynack_pending = True
            else:
                cc.ignored += 1
            return
        if ext.verno != expected:
            cc.ignored += 1  # neither the next RSYN nor a retransmission of the last one
            return
        cc.peer_consumed(ext.verno)
        if mig is None:
            mig = sf.mig = MigrationState(reason="peer_moved")
        elif not mig.own_rsyn:
            mig.reason = "peer_moved"
        if src != sf.remote_addr:
            self._set_remote(sf, src, now)
        mig.awaiting_ack = True
        mig.rsynack_rto = max(sf.rtt.rto, cc.timers.min_rto)
        mig.rsynack_deadline = now + mig.rsynack_rto
        mig.rsynack_tries = 0
        self.rsynack_pending = True

    def _on_rsynack(self, sf: Subflow, ext: ControlExt, src: Address, now: float) -> None:
        """The peer answered our RSYN: switch and ACK."""
        mig = sf.mig
        cc = sf.control
        if mig is None or not mig.own_rsyn:
            if src == sf.remote_addr:
                self.control_ack_pending = True  # our ACK was lost: send it again
            return
        if cc.outstanding != ControlFlags.RSYN or not cc.acked(ext):
            cc.ignored += 1
            return
        cc.complete()
        mig.own_rsyn = False
        self.control_ack_pending = True
        self._maybe_commit(sf, now)

    def _on_move_ack(self, sf: Subflow, src: Address, now: float) -> None:
        """The moving peer's ACK of our RSYN+ACK: its address is the one it came from."""
        mig = sf.mig
        assert mig is not None
        if src != sf.remote_addr:
            self._set_remote(sf, src, now)
        mig.awaiting_ack = False
        mig.rsynack_deadline = None
        self._maybe_commit(sf, now)

    def _set_remote(self, sf: Subflow, remote: Address, now: float) -> None:
        sf.prev_remote = sf.remote_addr
        # Late packets from where the peer was are still taken for a while (reordering);
        # after that the old address is a stranger like any other.
        sf.prev_remote_until = now + 2 * sf.rtt.rto
        sf.remote_addr = remote

    def _maybe_commit(self, sf: Subflow, now: float) -> None:
        mig = sf.mig
        if mig is None or mig.busy:
            return
        sf.mig = None
        sf.path_changed(now)
        self.ack_now = True
        remote = sf.remote_addr
        assert remote is not None
        self.emit(FlowMigrated(self.conn_id, sf.local_addr, remote, mig.reason))
        if self.sal_fin_due:
            self._start_sal_fin(now)

    def _migration_timers(self, sf: Subflow, now: float) -> None:
        mig = sf.mig
        if mig is not None:
            d = mig.rsynack_deadline
            if d is not None and now >= d:
                mig.rsynack_tries += 1
                if mig.rsynack_tries > sf.control.timers.max_retries:
                    self.time_out("migration unconfirmed")
                    return
                mig.rsynack_rto = min(mig.rsynack_rto * 2, sf.control.timers.max_rto)
                mig.rsynack_deadline = now + mig.rsynack_rto
                self.rsynack_pending = True
        ch = sf.challenge
        if ch is not None and now >= ch.deadline:
            if ch.tries >= CHALLENGE_TRIES:
                sf.challenge = None  # the candidate never answered: keep the path
                return
            ch.tries += 1
            ch.rto = min(ch.rto * 2, sf.control.timers.max_rto)
            ch.deadline = now + ch.rto
            self.challenge_pending = True

    # -- address checks (NAT rebinding) ---------------------------------------------------
    def check_address(self, sf: Subflow, candidate: Address, token: int, now: float) -> None:
        """The peer was seen at ``candidate``: check it with a challenge (see
        ``transport.migration``). A check of another candidate replaces this one."""
        rto = max(sf.rtt.rto, sf.control.timers.min_rto)
        sf.challenge = Challenge(candidate, token & ((1 << 64) - 1), now + rto, rto)
        self.challenge_pending = True
        self.wake(self)

    def challenge_packet(self, sf: Subflow) -> SalPacket:
        """Our challenge to the candidate: the token, and no nonce."""
        ch = sf.challenge
        assert ch is not None
        flags = ControlFlags.RSYN | CHALLENGE
        ext = ControlExt(flags, ch.token >> 32, ch.token & MASK32, bytes(8))
        return sf.control_packet(ext)

    def _on_challenge(self, sf: Subflow, ext: ControlExt, src: Address, now: float) -> None:
        flags = ext.flags
        if not flags & ControlFlags.ACK:
            # The peer checks where we are: answer from here, to its verified address only
            # (so the answer cannot be aimed anywhere else).
            if src == sf.remote_addr:
                self.challenge_echo = (ext.verno, ext.ackno)
            return
        ch = sf.challenge
        if ch is None or src != ch.candidate or ((ext.verno << 32) | ext.ackno) != ch.token:
            sf.control.ignored += 1
            return
        sf.challenge = None
        self._set_remote(sf, src, now)
        sf.path_changed(now)
        self.ack_now = True
        self.emit(FlowMigrated(self.conn_id, sf.local_addr, src, "rebinding"))

    def _maybe_finish(self, now: float) -> None:
        if not (self.sal_fin_acked and self.peer_sal_fin) or self.state is not State.ESTABLISHED:
            return
        if self.active_close:
            self.state = State.TIME_WAIT
            self.time_wait_deadline = now + self.config.time_wait
        else:
            self.state = State.CLOSED
        self.emit(ConnectionClosed(self.conn_id))

    # -- timers -------------------------------------------------------------------------
    def next_deadline(self) -> float | None:
        """The earliest timer of this connection and its subflows."""
        if self.state is State.CLOSED:
            return None
        if self.state is State.TIME_WAIT:
            # Everything was delivered and acknowledged both ways: only TIME_WAIT's own end
            # is left (on_timer runs nothing else, so nothing else may be armed).
            return self.time_wait_deadline
        best = None
        for d in (self.delack_deadline, *(sf.next_deadline() for sf in self.subflows)):
            if d is not None and (best is None or d < best):
                best = d
        if self.state is State.ESTABLISHED:
            live = self._liveness_deadline()
            if live is not None and (best is None or live < best):
                best = live
        return best

    def _waiting_since(self) -> float | None:
        """Since when our data has waited for an ACK (the latest of the subflows')."""
        latest = None
        for sf in self.subflows:
            w = sf.waiting_since
            if w is not None and (latest is None or w > latest):
                latest = w
        return latest

    def _control_outstanding(self) -> bool:
        """A control packet (SAL FIN, RSYN, JOIN) awaits its answer: its own retransmissions
        keep the path busy and decide when to give up, so keepalives wait."""
        return any(sf.control.deadline is not None for sf in self.subflows)

    def _liveness_deadline(self) -> float | None:
        """The earliest of the idle timeout, the next keepalive probe (or the end of the
        probes) and the user timeout."""
        cfg = self.config
        heard = self.last_heard
        best = None if cfg.idle_timeout is None else heard + cfg.idle_timeout
        if cfg.keepalive is not None and not self._control_outstanding():
            # The next probe, or (all sent) the end of the wait for an answer.
            d = heard + cfg.keepalive + self.keepalives_sent * cfg.keepalive_interval
            if best is None or d < best:
                best = d
        if cfg.user_timeout is not None:
            waiting = self._waiting_since()
            if waiting is not None and (best is None or waiting + cfg.user_timeout < best):
                best = waiting + cfg.user_timeout
        return best

    def _check_liveness(self, now: float, out: list[SalPacket]) -> bool:
        """Idle timeout, keepalive probes and user timeout; True if the connection ended."""
        cfg = self.config
        heard = self.last_heard
        if cfg.idle_timeout is not None and now >= heard + cfg.idle_timeout:
            self.time_out("idle")
            return True
        if cfg.user_timeout is not None:
            waiting = self._waiting_since()
            if waiting is not None and now >= waiting + cfg.user_timeout:
                self.time_out(f"user timeout: data unacknowledged for {now - waiting:.1f} s")
                return True
        ka = cfg.keepalive
        if ka is None or self._control_outstanding():
            return False
        probes = cfg.keepalive_probes
        interval = cfg.keepalive_interval
        if now >= heard + ka + probes * interval:
            self.time_out(f"peer silent for {now - heard:.1f} s: {probes} keepalives unanswered")
            return True
        if now >= heard + ka + self.keepalives_sent * interval:
            # Count the intervals that passed (a late timer sends one probe, not several).
            passed = 1 + int((now - heard - ka) // interval)
            self.keepalives_sent = min(max(passed, self.keepalives_sent + 1), probes)
            sf = self.primary
            # An already-acknowledged sequence number: the peer answers with an ACK, and
            # both ends' NAT mappings see a packet go out.
            out.append(
                SalPacket(
                    sf.local_flowid,
                    sf.remote_flowid,
                    PROTO_TCP,
                    [],
                    sf.ack_header(TcpFlags.ACK, sf.snd_una - 1),
                )
            )
        return False

    def on_timer(self, now: float, out: list[SalPacket]) -> None:
        """Run every timer that is due."""
        if self.state is State.TIME_WAIT:
            if self.time_wait_deadline is not None and now >= self.time_wait_deadline:
                self.state = State.CLOSED
            return
        if self.delack_deadline is not None and now >= self.delack_deadline:
            self.delack_deadline = None
            self.ack_now = True
            if self.mp is not None:
                for sf in self.subflows:
                    if sf.mp_unacked:
                        sf.ack_pending = True
        if self.state is State.ESTABLISHED and self._check_liveness(now, out):
            return
        for sf in list(self.subflows):  # a subflow may be given up on the way
            if sf not in self.subflows:
                continue
            if sf.mig is not None or sf.challenge is not None:
                self._migration_timers(sf, now)
                if self.state is State.CLOSED:
                    return
            cc = sf.control
            if (
                self.mp is not None
                and len(self.subflows) > 1
                and cc.deadline is not None
                and now >= cc.deadline
                and cc.retries + 1 >= DEAD_AFTER_RTOS
            ):
                # A control packet (a SAL FIN, a JOIN) unanswered on this path while others
                # work: the path is dead; what it owed goes on the others.
                self.subflow_failed(sf, now)
                continue
            try:
                if sf.control.due(now):
                    self.resend_control(sf, out)
            except ControlTimeout as exc:
                if self.mp is not None and len(self.subflows) > 1:
                    # A JOIN nobody answers, or a path that died with a control packet
                    # outstanding: give up that subflow, not the connection.
                    self.subflow_failed(sf, now)
                    continue
                self.time_out(f"control packet unanswered ({exc})")
                return
            if not sf.frozen:
                sf.on_timer(now, out)
            if self.state is State.CLOSED:
                return

    def resend_control(self, sf: Subflow, out: list[SalPacket]) -> None:
        """Retransmit the outstanding control packet of an established subflow."""
        if self.state is State.SYN_SENT:
            self.syn_due = True  # the host resolves the service again and sends the SYN
            return
        ext = sf.control.resend()
        if sf.join_state == "syn_sent":
            out.append(sf.join_syn_packet(ext))
            return
        if self.state is State.SYN_RECEIVED or sf.join_state == "syn_received":
            sf.handshake_sent_at = None  # retransmitted: no RTT sample from its answer
            out.append(sf.synack_packet(ext))
        elif self.state is State.ESTABLISHED:
            out.append(sf.control_packet(ext))

    # -- output -------------------------------------------------------------------------
    def output(self, now: float, out: list[SalPacket]) -> None:
        """Append every packet this connection has to send now."""
        if self.state is not State.ESTABLISHED and self.state is not State.TIME_WAIT:
            if self.rst_pending and self.subflows:
                self._send_rst(out)
            return
        sf = self.primary
        if self.third_ack_pending:
            self.third_ack_pending = False
            ext = sf.control.ext(ControlFlags.ACK)
            # Always at our initial sequence number + 1, even when data went out since: a
            # server answering with SYN cookies rebuilds our ISN from it.
            tcp = sf.ack_header(TcpFlags.ACK, 0)
            out.append(sf.control_packet(ext, [ServiceExt(self.service_id)], tcp))
            self.ack_sent()
        frozen = sf.frozen
        if self.mp is not None:
            self._output_mp(now, out, frozen)
        else:
            if self.state is State.ESTABLISHED and not frozen:
                sf.output(now, out)
            # Duplicate ACKs owed for out-of-order segments go even if data carried the ACK
            # (a segment with data is no duplicate ACK to its receiver); one is the ACK below.
            owed = self.dupacks_owed
            self.dupacks_owed = 0
            if self.ack_now and not frozen:
                # A SAL FIN and/or control ACK due now rides on the TCP ACK.
                closing = self._closing_control(sf)
                if closing is not None:
                    out.append(sf.control_packet(closing, [], sf.ack_header()))
                else:
                    out.append(sf.pure_ack(duplicate=owed > 0))
                self.ack_sent()
                owed -= 1
            if not frozen:
                for _ in range(owed):
                    out.append(sf.pure_ack(duplicate=True))
        closing = self._closing_control(sf)
        if closing is not None:
            out.append(sf.control_packet(closing))
        if self.pending_control:
            self.pending_control = False
            if sf.control.outstanding is not None:
                out.append(sf.control_packet(sf.control.resend()))
        if self.rsynack_pending:
            self.rsynack_pending = False
            out.append(sf.control_packet(sf.control.ext(ControlFlags.RSYN | ControlFlags.ACK)))
        if self.challenge_pending:
            self.challenge_pending = False
            if sf.challenge is not None:
                out.append(self.challenge_packet(sf))
        if self.challenge_echo is not None:
            verno, ackno = self.challenge_echo
            self.challenge_echo = None
            flags = ControlFlags.RSYN | ControlFlags.ACK | CHALLENGE
            ext = ControlExt(flags, verno, ackno, sf.control.local_nonce)
            out.append(sf.control_packet(ext))
        if self.control_ack_pending:
            self.control_ack_pending = False
            out.append(sf.control_packet(sf.control.ext(ControlFlags.ACK)))

    def _closing_control(self, sf: Subflow) -> ControlExt | None:
        """Our SAL FIN and our ACK of the peer's, as one CONTROL (FIN+ACK, as SYN+ACK),
        when either is due; None when neither is (other control packets go separately).
        Multipath: an ACK owed on another subflow is left to :meth:`_output_mp`."""
        cc = sf.control
        fin = self.pending_control and cc.outstanding == ControlFlags.FIN
        ack = self.control_ack_pending and self.control_ack_sf in (None, sf)
        if not fin and not ack:
            return None
        self.control_ack_pending = False
        if not fin:
            return cc.ext(ControlFlags.ACK)
        self.pending_control = False
        ext = cc.resend()
        if ack:
            ext = ControlExt(ext.flags | ControlFlags.ACK, ext.verno, ext.ackno, ext.nonce)
        return ext

    def _output_mp(self, now: float, out: list[SalPacket], frozen: bool) -> None:
        """Multipath output: joins, data by the scheduler's order, each subflow's ACK."""
        mp = self.mp
        assert mp is not None
        for sf in self.join_syn_due:
            out.append(sf.join_syn_packet(sf.control.resend()))
        self.join_syn_due.clear()
        live = self.live_subflows()
        for sf in live:
            if sf.join_third_ack:
                # First: the peer takes nothing on a JOIN before this proven third ACK.
                sf.join_third_ack = False
                assert sf.control.peer_nonce is not None
                ext = sf.control.ext(ControlFlags.ACK)
                proof = join_ack_proof(
                    mp.local_key, mp.peer_key, sf.control.local_nonce, sf.control.peer_nonce
                )
                join = JoinExt(mp.peer_token, proof)
                out.append(sf.control_packet(ext, [sf.dss(), join], sf.ack_header()))
                sf.ack_pending = False
        if self.state is State.ESTABLISHED:
            for sf in mp.scheduler.order(live):
                if not sf.frozen:
                    sf.output(now, out)
        primary = self.primary
        if self.ack_now and not frozen:
            for sf in live:  # a window update (or keepalive answer) matters on every path
                sf.ack_pending = True
            self.ack_sent()
        owed = self.control_ack_sf
        if self.control_ack_pending and owed is not None and owed is not primary:
            self.control_ack_pending = False
            if owed in self.subflows:
                out.append(owed.control_packet(owed.control.ext(ControlFlags.ACK)))
        if mp.advertise and self.state is State.ESTABLISHED and mp.advertise_rounds > 0:
            # Our other addresses (up to four), in three packets: nothing acknowledges an
            # ADD_ADDR, so one lost copy must not leave the peer without them.
            extra: list[Extension] = [AddAddrExt(a) for a in mp.advertise[:4]]
            mp.advertise_rounds -= 1
            out.append(primary.control_packet(primary.control.ext(ControlFlags.ACK), extra))
        for sf in live:
            if sf.ack_pending and not sf.frozen:
                out.append(sf.pure_ack())

    def _send_rst(self, out: list[SalPacket]) -> None:
        self.rst_pending = False
        for sf in self.subflows:  # multipath: every subflow, or the peer keeps the others
            if sf.remote_flowid:
                out.append(sf.control_packet(sf.control.ext(ControlFlags.RST)))

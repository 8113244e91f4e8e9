"""Serval TCP connections: a stream over one or more subflows, with no I/O and no clock.

A :class:`Connection` is what the application sees: a bounded send buffer, a receive buffer
whose free space is the advertised window (so a slow reader slows the sender), half-close
and abort. Its subflows belong to its flow manager (``conn.flows``, see
``transport.flows``); each :class:`~pyserval.transport.subflow.Subflow` is one SAL flow (its
own flowIDs, address pair, SAL control channel) carrying its own TCP sequence space,
congestion control, RTT estimate and SACK scoreboard. On a single path the subflow's data
offsets are the connection's; multipath maps the stream's bytes (DSN) onto subflows. The
close sequence is ``transport.close_state``'s state machine (``conn.close``).

Where the rest lives: a subflow's TCP send and receive path is ``subflow.py``; its
scoreboard, loss rules, pipe and RTO are ``recovery.py``; the segments it sends are built in
``packets.py``; sequence arithmetic (:func:`unwrap`) and :class:`Role` are ``common.py``;
idle timeout, keepalive and user timeout are ``liveness.py``. What this module does not do:
choose paths, move or join subflows (the flow manager), or send anything itself.

The host core (``pyserval.core``) feeds decoded packets to :meth:`Subflow.on_packet`, calls
:meth:`Connection.on_timer` at :meth:`Connection.next_deadline`, and collects datagrams
with :meth:`Connection.output`.
"""

from __future__ import annotations

import enum
import weakref
from collections.abc import Callable
from typing import Final

from ..errors import ConnectionStateError
from ..naming.service_id import ServiceID
from ..sal.control import ControlChannel, ControlTimeout
from ..sal.extensions import (
    ControlExt,
    ControlFlags,
    JoinExt,
    MpCapableExt,
    ServiceExt,
)
from ..sal.packet import SalPacket
from ..sal.transport_headers import TcpFlags, TcpHeader
from . import liveness
from .buffers import ReceiveBuffer, SendBuffer
from .close_state import CloseEvent, CloseState, Side, Stage
from .common import MASK32, Address, Role, unwrap
from .config import StreamConfig
from .events import (
    ConnectionClosed,
    ConnectionEstablished,
    ConnectionReset,
    ConnectionTimedOut,
    Event,
    SendSpaceAvailable,
    StreamEnded,
)
from .flows import FlowManager
from .flows.multipath import DEAD_AFTER_RTOS, MultipathState, new_key
from .packets import SegmentBuilder
from .receive_budget import ReceiveBudget
from .subflow import Subflow

# Role, Subflow, unwrap and Address are re-exported: their old import path.
__all__ = [
    "Address",
    "Connection",
    "ConnectionError_",
    "ConnectionStateError",
    "Role",
    "State",
    "Subflow",
    "unwrap",
]

_FIN_ACKED_STAGES: Final = frozenset({Stage.FIN_ACKED, Stage.SAL_FIN_SENT, Stage.DONE})
# Stage.OPEN itself is a slow lookup (an Enum class attribute, ~0.2 us) on a hot path;
# so are the sides and events every connection's close reports.
_OPEN: Final = Stage.OPEN
_DONE: Final = Stage.DONE
_FIN_SENT: Final = Stage.FIN_SENT
_FINS_SENT: Final = Stage.FINS_SENT
_LOCAL: Final = Side.LOCAL
_REMOTE: Final = Side.REMOTE
_EV_SHUTDOWN: Final = CloseEvent.SHUTDOWN
_EV_FIN: Final = CloseEvent.FIN
_EV_FIN_ACKED: Final = CloseEvent.FIN_ACKED
_EV_SAL_FIN_SENT: Final = CloseEvent.SAL_FIN_SENT
_EV_SAL_FIN_ACKED: Final = CloseEvent.SAL_FIN_ACKED
_EV_SAL_FIN: Final = CloseEvent.SAL_FIN


def _with_ack(ext: ControlExt) -> ControlExt:
    """``ext`` (our SAL FIN) also acknowledging the peer's control packet: FIN+ACK, as
    SYN+ACK."""
    return ControlExt(ext.flags | ControlFlags.ACK, ext.verno, ext.ackno, ext.nonce)


def _acks_our_syn(sf: Subflow, tcp: TcpHeader | None) -> bool:
    """Whether ``tcp`` acknowledges our SYN: only such a TCP ACK stands in for a lost third
    ACK (RFC 9293 3.10.7.4: an acceptable ACK in SYN-RECEIVED establishes, and the segment
    is processed on)."""
    return tcp is not None and bool(tcp.flags & TcpFlags.ACK) and tcp.ack == (sf.iss + 1) & MASK32


def _send_sal_fin(sf: Subflow, now: float) -> None:
    """Start our SAL FIN on ``sf``'s control channel."""
    # The path's RTT is known by now: time the SAL FIN by it, not by the 3 s used for a
    # SYN, so a lost FIN is repaired before the peer's TIME_WAIT runs out.
    control = sf.control
    timers = control.timers
    control.rto = min(max(sf.rtt.rto, timers.min_rto), timers.initial_rto)
    control.send_reliable(ControlFlags.FIN, now)


def _no_wake(conn: Connection) -> None:
    """Default wake-up hook for a connection not attached to a host."""


ConnectionError_ = ConnectionStateError  # its old name, kept for code that imports it


class State(enum.Enum):
    """Connection state (SAL and TCP handshake move together, as in the reference)."""

    SYN_SENT = "syn_sent"
    SYN_RECEIVED = "syn_received"
    ESTABLISHED = "established"
    TIME_WAIT = "time_wait"
    CLOSED = "closed"


# States and roles bound once: in Python 3.11 reading a member off an Enum class takes
# about 0.1 us (the metaclass defines __getattr__, which sends every class attribute read
# through a Python-level hook), and a connection tests its state several times per packet.
_SYN_SENT: Final = State.SYN_SENT
_SYN_RECEIVED: Final = State.SYN_RECEIVED
_ESTABLISHED: Final = State.ESTABLISHED
_TIME_WAIT: Final = State.TIME_WAIT
_CLOSED: Final = State.CLOSED
_CLIENT: Final = Role.CLIENT


class Connection:
    """A Serval TCP connection as the application sees it (see the module docstring).

    It keeps the byte stream (buffers, FIN offsets, ACK timing), the handshake, the close
    sequence (``self.close``, a :class:`~.close_state.CloseState`) and the timers. Its
    subflows, and which of them sends, belong to ``self.flows`` (a
    :class:`~.flows.FlowManager`): migration, address checks, JOIN, scheduling and
    reinjection live there.
    """

    # Slots: a connection has some forty attributes, and past thirty an instance's
    # attributes leave CPython 3.11's shared-key layout for a dict of their own, which
    # made setting them in __init__ cost three times as much (1.4 us against 0.4 for
    # forty-five) and every read a dict lookup. ``__dict__`` stays (made only when used),
    # so code that hangs an attribute of its own on a connection still may.
    __slots__ = (
        "_emit",
        "ack_now",
        "budget",
        "budget_epoch",
        "challenge_ack_due",
        "close",
        "compact_close",
        "config",
        "conn_id",
        "control_ack_pending",
        "control_ack_sf",
        "dead_subflows",
        "delack_deadline",
        "dupacks_owed",
        "error",
        "fin_offset",
        "flows",
        "keepalives_sent",
        "last_heard",
        "listener_id",
        "mp",
        "peer_fin_offset",
        "peer_key",
        "pending_control",
        "recv",
        "role",
        "rst_pending",
        "scheduled",
        "send",
        "send_blocked",
        "service_id",
        "state",
        "stats_heard_again",
        "subflows",
        "syn_due",
        "syn_first",
        "third_ack_pending",
        "time_wait_deadline",
        "unacked_segments",
        "unreachable_count",
        "unreachable_since",
        "wake",
        "__weakref__",
        "__dict__",
    )

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
        self.state = _SYN_SENT if role is _CLIENT else _SYN_RECEIVED
        self.flows = flows = FlowManager(self, config.multipath and role is _CLIENT)
        self.subflows: list[Subflow] = flows.subflows  # the same list, primary first
        # Subflows the flow manager gave up, for the host to forget: a tuple, the shared
        # empty one until a multipath connection loses a path (no list per connection).
        self.dead_subflows: tuple[Subflow, ...] = ()
        # The flow manager's multipath state once both ends agreed (None: single path),
        # set by FlowManager.enable_multipath; a plain attribute because the per-packet
        # path reads it (a property costs about 0.15 us a read).
        self.mp: MultipathState | None = None
        self.close = CloseState()
        # Whether this connection closes compactly (the SAL FIN on the TCP FIN): the
        # configuration's wish until the handshake settles it (see take_peer_syn).
        self.compact_close = config.compact_close
        self.send = SendBuffer(config.send_buffer)
        self.recv = ReceiveBuffer(config.receive_buffer)
        self.send_blocked = False
        self.fin_offset: int | None = None  # set by shutdown: where our FIN sits
        self.peer_fin_offset: int | None = None
        self.ack_now = False
        self.challenge_ack_due = False  # an RFC 5961 ACK, if the host's rate limit allows
        self.third_ack_pending = False
        self.unacked_segments = 0
        self.dupacks_owed = 0  # immediate ACKs owed for out-of-order segments (bounded)
        # The host's receive budget, if it has one (set by the host), and the epoch this
        # connection was last counted in as receiving (transport.receive_budget).
        self.budget: ReceiveBudget | None = None
        self.budget_epoch = 0
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
        self.control_ack_pending = False  # acknowledge a peer's SAL FIN (or RSYN+ACK)
        self.control_ack_sf: Subflow | None = None  # ... on this subflow (None: primary)
        self.rst_pending = False
        self.syn_due = False  # SYN (re)transmission: the host resolves the service again
        self.syn_first = False
        self.wake: Callable[[Connection], None] = _no_wake  # the host polls us for output

    def unlink_parts(self) -> None:
        """The host has forgotten this connection (closed, or a TIME_WAIT record stands
        for it): its flow manager and subflows refer to it weakly from now on.

        A connection and its parts refer to each other (subflow -> connection ->
        subflows), so every connection would otherwise end as a cycle of about 30 objects
        for the cyclic garbage collector (about 30 us of CPU per connection on the
        connect/close benchmark). With the back references weak, reference counting
        frees it all when the application drops it. The object stays readable as long
        as the application holds the connection; a subflow kept alone without its
        connection can no longer reach it (its ``conn`` raises ReferenceError).
        """
        # (annotated rather than cast(): typing.cast is a Python call, one per close)
        ref: Connection = weakref.proxy(self)
        self.flows.conn = ref
        for sf in self.subflows:
            sf.conn = ref

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
        return self.state is _CLOSED

    def _check_open(self, what: str) -> None:
        if self.state is _CLOSED or self.state is _TIME_WAIT:
            raise ConnectionStateError(
                f"cannot {what}: connection {self.conn_id:#x} is closed"
                + (f" ({self.error})" if self.error else "")
            )

    # -- the close sequence, as the rest of the package reads it (see close_state) -------
    @property
    def fin_acked(self) -> bool:
        """Our FIN (and every byte before it) is acknowledged."""
        return self.close.local in _FIN_ACKED_STAGES

    @property
    def peer_fin_received(self) -> bool:
        """The peer's FIN arrived, and every byte before it."""
        return self.close.remote is not _OPEN  # read per packet: no Enum class lookup

    @peer_fin_received.setter
    def peer_fin_received(self, value: bool) -> None:
        # The receive path reports the peer's FIN by setting this (only ever to True).
        if value:
            self._close_event(_REMOTE, _EV_FIN)

    @property
    def peer_sal_fin(self) -> bool:
        """The peer's SAL FIN arrived: its direction is closed at both levels."""
        return self.close.remote is _DONE  # read per datagram on a datagram flow

    def _close_event(self, side: Side, event: CloseEvent) -> bool:
        """Advance the close sequence. An event its tables refuse is a protocol violation:
        the peer is reset, and False returned."""
        close = self.close
        if close.advance(side, event) is None:
            self.protocol_violation(str(close.refusal(side, event)))
            return False
        return True

    # -- the flow manager, as the host and the subflows reach it -------------------------
    @property
    def mp_offer(self) -> int | None:
        """The multipath key our SYN offers (None: no offer)."""
        return self.flows.mp_offer

    @mp_offer.setter
    def mp_offer(self, key: int | None) -> None:
        self.flows.mp_offer = key

    def live_subflows(self) -> list[Subflow]:
        """Subflows that carry data (joined, not given up)."""
        return self.flows.live_subflows()

    def mp_take(self, sf: Subflow, max_len: int, dsn_limit: int) -> tuple[int, int] | None:
        """The next DSN range for ``sf`` (see :meth:`FlowManager.take`)."""
        return self.flows.take(sf, max_len, dsn_limit)

    def on_add_addr(self, address: Address) -> None:
        """The peer told us another of its addresses."""
        self.flows.on_add_addr(address)

    def add_subflow(self, sf: Subflow, now: float) -> None:
        """Client: open another subflow (its JOIN SYN goes out from ``sf.local_addr``)."""
        if self.flows.mp is None:
            raise ConnectionError_(
                "this connection is not multipath: connect with StreamConfig(multipath=True)"
            )
        if self.state is not _ESTABLISHED:
            raise ConnectionError_(f"cannot add a path: connection {self.conn_id:#x} is closing")
        self.flows.add_subflow(sf, now)
        self.wake(self)

    def accept_join(self, sf: Subflow, pkt: SalPacket, now: float) -> SalPacket:
        """Server: a JOIN SYN for this connection; returns the SYN-ACK."""
        return self.flows.accept_join(sf, pkt, now)

    def on_join_synack(self, sf: Subflow, pkt: SalPacket, src: Address, now: float) -> bool:
        """Client: the SYN-ACK of a joining subflow; False if it is not acceptable."""
        if not self.flows.on_join_synack(sf, pkt, src):
            return False
        self.wake(self)
        return True

    def join_proven(self, sf: Subflow, join: JoinExt | None) -> bool:
        """Server: whether the third ACK's JOIN proves the client holds the keys."""
        return self.flows.join_proven(sf, join)

    def join_established(self, sf: Subflow) -> None:
        """Server: the joining subflow's handshake completed (and was proven)."""
        self.flows.join_established(sf)

    def subflow_failed(self, sf: Subflow, now: float) -> None:
        """Give up a subflow (its path died): its unacknowledged data goes on the others,
        and what the close sequence had on it starts again on the new primary."""
        was_primary = self.flows.subflow_failed(sf)
        if was_primary is None:
            return
        if was_primary:
            if self.close.local is Stage.FIN_ACKED or self.close.local is Stage.SAL_FIN_SENT:
                # The SAL FIN was (or was to go) on the dead path: again on the new primary.
                self._close_event(Side.LOCAL, CloseEvent.SAL_FIN_RESTART)
                self._sal_fin_when_free(now)
            elif self.fin_offset is not None and not self.fin_acked:
                self.primary.fin_seq = None  # the DATA_FIN goes again on the new primary
        self.wake(self)

    def start_migration(self, sf: Subflow, now: float, local: Address) -> bool:
        """Move ``sf`` to the local address ``local`` (RSYN from there). False when the
        control channel is busy with another exchange (a closing flow): nothing started."""
        if self.state is not _ESTABLISHED:
            raise ConnectionError_(f"cannot migrate connection {self.conn_id:#x}: not established")
        if not self.flows.start_migration(sf, now, local):
            return False
        self.pending_control = True  # (again) from the new address
        self.wake(self)
        return True

    def check_address(self, sf: Subflow, candidate: Address, token: int, now: float) -> None:
        """The peer was seen at ``candidate``: check it (see :meth:`FlowManager.check_address`)."""
        self.flows.check_address(sf, candidate, token, now)
        self.wake(self)

    def on_path_settled(self, now: float) -> None:
        """A move finished: a SAL FIN that waited for the control channel goes now."""
        if self.close.local is Stage.FIN_ACKED:
            self._start_sal_fin(now)

    def _migration_timers(self, sf: Subflow, now: float) -> None:
        if not self.flows.migration_timers(sf, now):
            self.time_out("migration unconfirmed")

    # -- application API ----------------------------------------------------------------
    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Queue bytes to send; returns how many fit in the send buffer (may be 0)."""
        self._check_open("send")
        if self.fin_offset is not None:
            raise ConnectionStateError("cannot send after shutdown of the write side")
        n = self.send.write(data)
        if n < len(data):
            self.send_blocked = True
        if n:
            self.wake(self)
        return n

    def read(self, max_bytes: int = -1) -> bytes:
        """Take received bytes (b"" when none are ready); opens the window as it reads."""
        data = self.recv.read(max_bytes)
        if data and self.subflows and self.state is _ESTABLISHED:
            sf = self.primary
            opened = sf.window_now() - sf.last_adv_window
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
        return self.close.remote is not _OPEN and self.recv.readable == 0

    def shutdown(self) -> None:
        """Half-close: send FIN after the data already queued."""
        self._check_open("shut down")
        if self.fin_offset is None:
            self.fin_offset = self.send.end
            self._close_event(_LOCAL, _EV_SHUTDOWN)
            self.wake(self)

    def abort(self) -> None:
        """Abortive close: reset the peer and drop everything.

        In TIME_WAIT both directions were delivered and closed already: the connection just
        goes, with nothing sent (RFC 9293 3.10.7.1: ABORT in TIME-WAIT sends no RST).
        """
        if self.state is _TIME_WAIT:
            self.state = _CLOSED
            self.wake(self)
        elif self.state is not _CLOSED:
            self.abort_with("aborted locally", send_rst=True)
            self.wake(self)

    # -- handshake ----------------------------------------------------------------------
    def syn_packet(self, now: float, first: bool) -> SalPacket:
        """The client's SYN (``first``: start the control exchange; else a retransmission)."""
        sf = self.subflows[0]  # the primary
        if first and self.mp_offer is not None:
            self.compact_close = False  # single-path connections only: not offered
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
        mp_offer = self.flows.mp_offer
        if mp_offer is not None:  # (the SYN-ACK is searched for MP_CAPABLE only if we asked)
            offer = pkt.find(MpCapableExt)
            if offer is not None:
                self.flows.enable_multipath(mp_offer, offer.key)
        self.state = _ESTABLISHED
        self.last_heard = now
        self.third_ack_pending = True
        self._emit(ConnectionEstablished(self.conn_id))
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
            self.flows.enable_multipath(new_key(), offer.key)
            self.compact_close = False  # single-path connections only
        sf.handshake_sent_at = now
        return sf.synack_packet(sf.control.send_reliable(ControlFlags.SYN | ControlFlags.ACK, now))

    def on_handshake_ack(self, sf: Subflow, pkt: SalPacket, now: float) -> bool:
        """Server: the third ACK, or data proving it was sent (a compact close's FIN +
        SAL FIN too); True when established."""
        ctl, tcp = pkt.control, pkt.tcp
        third_ack = ctl is not None
        if ctl is not None:
            if ctl.flags & ControlFlags.SYN:
                return False  # a duplicate SYN: the host re-sends the SYN-ACK
            if not sf.control.nonce_ok(ctl):
                return False
            if not sf.control.acked(ctl):
                # The client's FIN + SAL FIN (a compact close), sent after its third ACK
                # that was lost: its TCP ACK stands in, as data's does (the host then
                # takes the segment and the SAL FIN).
                if not (ctl.flags & ControlFlags.FIN and _acks_our_syn(sf, tcp)):
                    return False
                third_ack = False
        elif not _acks_our_syn(sf, tcp):
            return False
        sf.control.complete()
        if third_ack:  # only the third ACK itself: data standing in for it came later
            sf.handshake_sample(now)
        self.state = _ESTABLISHED
        return True  # the host reports the connection, then hands it the segment

    # -- the byte stream over several subflows (DSN) --------------------------------------
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
        mp = self.flows.mp
        fin = self.fin_offset
        if mp is None or fin is None or mp.data_ack < fin:
            return
        if any(sf.fin_seq_acked for sf in self.subflows):
            self.on_fin_acked(now)

    def on_data_ack(self, ack: int, window: int = -1, now: float = 0.0) -> None:
        """The peer's cumulative data ACK (and the window it offers from there): free what
        it covers, move the connection's right edge."""
        if self.flows.mp is None or not self.flows.on_data_ack(ack, window, self.send.end):
            return
        if self.fin_offset is not None and ack >= self.fin_offset:
            self.maybe_data_fin_acked(now)
        released = self.send.release(ack)
        if released and self.send_blocked and self.send.free > 0:
            self.send_blocked = False
            self.emit(SendSpaceAvailable(self.conn_id, self.send.free))

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

    # -- closing ------------------------------------------------------------------------
    def on_reset(self) -> None:
        """A genuine RST from the peer.

        If both streams already completed (our FIN acknowledged, the peer's FIN received) the
        peer only forgot the flow while we finished the SAL FIN exchange (its TIME_WAIT ran
        out): no data was lost, so the connection counts as closed cleanly.
        """
        if self.state is _CLOSED or self.state is _TIME_WAIT:
            return  # RFC 1337: a RST must not cut TIME_WAIT short
        self.state = _CLOSED
        if self.fin_acked and self.peer_fin_received:
            self.emit(ConnectionClosed(self.conn_id))
            return
        self.error = "reset by peer"
        self.emit(ConnectionReset(self.conn_id, "reset by peer"))

    def on_fin_acked(self, now: float) -> None:
        """Our TCP FIN was acknowledged: start the SAL FIN exchange (a compact close: it
        was sent with the FIN, so it is under way, or even acknowledged already)."""
        local = self.close.local
        if local is _FIN_SENT:
            if self._close_event(_LOCAL, _EV_FIN_ACKED):
                self._sal_fin_when_free(now)
        elif local is _FINS_SENT:
            self._close_event(_LOCAL, _EV_FIN_ACKED)
            self._maybe_finish(now)
        # else acknowledged before: every later ACK covers it too

    def sal_fin_with_fin(self, sf: Subflow, now: float) -> None:
        """Our TCP FIN goes out for the first time: on a compact close, start the SAL FIN
        with it (it rides in the same packet, :meth:`fin_control`). Not while another
        control exchange (an RSYN) is under way, nor on a moving path: the FIN then waits
        for its ACK as the spec's close does."""
        if (
            self.compact_close
            and self.close.local is _FIN_SENT
            and sf is self.subflows[0]
            and sf.control.outstanding is None
            and sf.mig is None
            and self.mp is None
            and self._close_event(_LOCAL, _EV_SAL_FIN_SENT)
        ):
            _send_sal_fin(sf, now)

    def fin_control(self, sf: SegmentBuilder) -> ControlExt | None:
        """The CONTROL a segment of subflow ``sf`` carrying our TCP FIN takes along: our
        SAL FIN while it is outstanding on a compact close (with our ACK of the peer's, if
        one is owed); None otherwise."""
        control = sf.control
        if self.close.local is not _FINS_SENT or control.outstanding != ControlFlags.FIN:
            return None
        ext = self._sal_fin(control)
        if self.control_ack_pending and self.control_ack_sf in (None, sf):
            self.control_ack_pending = False
            if not ext.flags & ControlFlags.ACK:
                ext = _with_ack(ext)
        return ext

    def _sal_fin(self, control: ControlChannel) -> ControlExt:
        """Our outstanding SAL FIN, again. On a compact close, with the ACK flag once the
        peer's SAL FIN is in (its ackno always says so; the flag makes it count), as every
        TCP segment after the SYN carries the ACK: else an ACK of the peer's SAL FIN that
        was lost is never repaired when the peer acknowledges this FIN and we finish, and
        the peer sends its SAL FIN into a flow we forgot and ends on our RST. (Not on the
        spec's close: the reference sends a plain FIN there, and so do we.) A copy that
        leaves before the peer's SAL FIN is in makes us linger (close_state)."""
        ext = control.resend()
        close = self.close
        if close.remote is not _DONE:
            close.linger = True  # the peer may ACK this copy and miss our ACK of its FIN
        elif self.compact_close:
            ext = _with_ack(ext)
        return ext

    def _sal_fin_when_free(self, now: float) -> None:
        if self.subflows[0].control.outstanding is None:  # the primary's (no property call)
            self._start_sal_fin(now)
        # else an RSYN is outstanding (one exchange at a time): on_path_settled sends it.

    def _start_sal_fin(self, now: float) -> None:
        if not self._close_event(_LOCAL, _EV_SAL_FIN_SENT):
            return
        _send_sal_fin(self.subflows[0], now)  # on the primary
        self.pending_control = True

    def _maybe_finish(self, now: float) -> None:
        """The joint rule of the close sequence: both directions done ends the connection."""
        if not self.close.finished or self.state is not _ESTABLISHED:
            return
        close = self.close
        if close.active_close or close.linger:
            self.state = _TIME_WAIT
            self.time_wait_deadline = now + self.config.time_wait
        else:
            self.state = _CLOSED
        self._emit(ConnectionClosed(self.conn_id))

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
        self.state = _CLOSED
        self.emit(ConnectionTimedOut(self.conn_id, why))

    def abort_with(self, reason: str, *, send_rst: bool) -> None:
        """Close at once; optionally send a CONTROL(RST) to the peer first."""
        if self.state is _CLOSED:
            return
        if send_rst and self.subflows and self.primary.remote_flowid:
            self.rst_pending = True
        self.error = reason
        self.state = _CLOSED
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
            self.flows.on_rsyn_control(sf, ext, src, now)
            return
        mig = sf.mig
        if mig is not None and mig.awaiting_ack and flags & ControlFlags.ACK:
            # The moving peer's ACK of our RSYN+ACK: the new path is confirmed.
            self.flows.on_move_ack(sf, src, now)
        if sf.join_state == "syn_received":
            return  # the host establishes a JOIN only on its proven third ACK
        if flags & ControlFlags.ACK and sf.control.acked(ext):
            if sf.control.outstanding == ControlFlags.RSYN:
                # A plain ACK of our RSYN (its RSYN+ACK was lost, or both ends moved and
                # this ACK answers ours): the move is acknowledged all the same.
                self.flows.on_rsynack(sf, ext, src, now)
                return
            if sf.control.outstanding == ControlFlags.FIN and not self._close_event(
                _LOCAL, _EV_SAL_FIN_ACKED
            ):
                return
            sf.control.complete()
        if flags & ControlFlags.FIN:
            if self.close.remote is _OPEN:  # not peer_fin_received (without its call)
                # Its TCP FIN has not reached us yet: the peer will send again. Counted
                # with the flow's other ignored control packets.
                sf.control.ignored += 1
                return
            sf.control.peer_consumed(ext.verno)
            if not self._close_event(_REMOTE, _EV_SAL_FIN):
                return
            self.control_ack_pending = True
            self.control_ack_sf = sf  # answered on the subflow (and channel) it came on
        self._maybe_finish(now)

    # -- timers -------------------------------------------------------------------------
    def next_deadline(self) -> float | None:
        """The earliest timer of this connection and its subflows."""
        state = self.state
        if state is not _ESTABLISHED:  # (one test for the state nearly every call finds)
            if state is _CLOSED:
                return None
            if state is _TIME_WAIT:
                # Everything was delivered and acknowledged both ways: only TIME_WAIT's own
                # end is left (on_timer runs nothing else, so nothing else may be armed).
                return self.time_wait_deadline
        best = self.delack_deadline
        for sf in self.subflows:  # (a loop, not a generator: this runs after every flush)
            d = sf.next_deadline()
            if d is not None and (best is None or d < best):
                best = d
        if state is _ESTABLISHED:
            return liveness.deadline(self, best)  # the idle, keepalive and user timeouts
        return best

    def on_timer(self, now: float, out: list[SalPacket]) -> None:
        """Run every timer that is due."""
        if self.state is _TIME_WAIT:
            if self.time_wait_deadline is not None and now >= self.time_wait_deadline:
                self.state = _CLOSED
            return
        multipath = self.flows.mp is not None
        if self.delack_deadline is not None and now >= self.delack_deadline:
            self.delack_deadline = None
            self.ack_now = True
            if multipath:
                for sf in self.subflows:
                    if sf.mp_unacked:
                        sf.ack_pending = True
        if self.state is _ESTABLISHED and liveness.check(self, now, out):
            return
        for sf in list(self.subflows):  # a subflow may be given up on the way
            if sf not in self.subflows:
                continue
            if sf.mig is not None or sf.challenge is not None:
                self._migration_timers(sf, now)
                if self.state is _CLOSED:
                    return
            cc = sf.control
            if (
                multipath
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
                if multipath and len(self.subflows) > 1:
                    # A JOIN nobody answers, or a path that died with a control packet
                    # outstanding: give up that subflow, not the connection.
                    self.subflow_failed(sf, now)
                    continue
                self.time_out(f"control packet unanswered ({exc})")
                return
            if not sf.frozen:
                sf.on_timer(now, out)
            if self.state is _CLOSED:
                return

    def resend_control(self, sf: Subflow, out: list[SalPacket]) -> None:
        """Retransmit the outstanding control packet of an established subflow."""
        if self.state is _SYN_SENT:
            self.syn_due = True  # the host resolves the service again and sends the SYN
            return
        ext = sf.control.resend()
        if sf.join_state == "syn_sent":
            out.append(sf.join_syn_packet(ext))
            return
        if self.state is _SYN_RECEIVED or sf.join_state == "syn_received":
            sf.handshake_sent_at = None  # retransmitted: no RTT sample from its answer
            out.append(sf.synack_packet(ext))
        elif self.state is _ESTABLISHED:
            if sf.control.outstanding == ControlFlags.FIN:
                ext = self._sal_fin(sf.control)
            out.append(sf.control_packet(ext))

    # -- output -------------------------------------------------------------------------
    def output(self, now: float, out: list[SalPacket]) -> None:
        """Append every packet this connection has to send now."""
        if self.state is not _ESTABLISHED and self.state is not _TIME_WAIT:
            if self.rst_pending and self.subflows:
                self._send_rst(out)
            return
        sf = self.subflows[0]  # the primary (read per flush: no property)
        if self.third_ack_pending:
            self.third_ack_pending = False
            ext = sf.control.ext(ControlFlags.ACK)
            # Always at our initial sequence number + 1, even when data went out since: a
            # server answering with SYN cookies rebuilds our ISN from it.
            tcp = sf.ack_header(TcpFlags.ACK, 0)
            out.append(sf.control_packet(ext, [ServiceExt(self.service_id)], tcp))
            self.ack_sent()
        mig = sf.mig
        frozen = mig is not None and mig.busy  # sf.frozen
        flows = self.flows
        if flows.mp is not None:
            self._output_mp(now, out, frozen)
        else:
            if self.state is _ESTABLISHED and not frozen:
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
            if owed > 0 and not frozen:
                for _ in range(owed):
                    out.append(sf.pure_ack(duplicate=True))
        if self.pending_control or (
            self.control_ack_pending and not self._control_ack_waits()
        ):  # else _closing_control: None
            closing = self._closing_control(sf)
            if closing is not None:
                out.append(sf.control_packet(closing))
            # (Tested here: _closing_control may clear pending_control, never set it.)
            if self.pending_control:
                self.pending_control = False
                if sf.control.outstanding is not None:
                    out.append(sf.control_packet(sf.control.resend()))
        if flows.rsynack_pending or flows.challenge_pending or flows.challenge_echo is not None:
            flows.output_control(sf, out)
        if self.control_ack_pending and not self._control_ack_waits():
            self.control_ack_pending = False
            out.append(sf.control_packet(sf.control.ext(ControlFlags.ACK)))

    def _control_ack_waits(self) -> bool:
        """On a compact close, our ACK of the peer's SAL FIN waits for the TCP ACK of its
        FIN when that is delayed (for our own FIN to carry both): it goes with that ACK
        (the delayed-ACK timer, :meth:`_closing_control`) or on our FIN
        (:meth:`fin_control`), never alone."""
        return (
            self.compact_close and self.delack_deadline is not None and self.state is _ESTABLISHED
        )

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
        ext = self._sal_fin(cc)
        if ack and not ext.flags & ControlFlags.ACK:
            ext = _with_ack(ext)
        return ext

    def _output_mp(self, now: float, out: list[SalPacket], frozen: bool) -> None:
        """Multipath output: joins, data in the flow manager's order, each subflow's ACK."""
        flows = self.flows
        live = flows.output_joins(out)
        established = self.state is _ESTABLISHED
        if established:
            for sf in flows.order(live):
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
        if established:
            flows.output_advertise(out)
        for sf in live:
            if sf.ack_pending and not sf.frozen:
                out.append(sf.pure_ack())

    def _send_rst(self, out: list[SalPacket]) -> None:
        self.rst_pending = False
        for sf in self.subflows:  # multipath: every subflow, or the peer keeps the others
            if sf.remote_flowid:
                out.append(sf.control_packet(sf.control.ext(ControlFlags.RST)))

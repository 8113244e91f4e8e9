"""Serval TCP connections: a stream over one or more subflows, with no I/O and no clock.

A :class:`Connection` is what the application sees: a bounded send buffer, a receive buffer
whose free space is the advertised window (so a slow reader slows the sender), half-close
and abort. It owns one or more :class:`Subflow` objects; each is one SAL flow (its own
flowIDs, address pair, SAL control channel) carrying its own TCP sequence space, congestion
control, RTT estimate and SACK scoreboard. Today a connection runs one subflow and the
subflow's data offsets are the connection's; multipath adds a mapping between the two
without changing this structure.

The host core (``pyserval.core``) feeds decoded packets to :meth:`Subflow.on_packet`, calls
:meth:`Connection.on_timer` at :meth:`Connection.next_deadline`, and collects datagrams
with :meth:`Connection.output`.

Offsets: stream data byte *k* has offset *k*; on the wire its sequence number is
``ISS + 1 + k`` (mod 2**32). Only :func:`unwrap` and the packet builders see 32-bit numbers.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable
from typing import Final

from sortedcontainers import SortedDict, SortedList

from ..errors import ConnectionStateError
from ..naming.service_id import ServiceID
from ..sal.checksum import BytesLike
from ..sal.control import ControlChannel, ControlTimeout
from ..sal.extensions import (
    AddAddrExt,
    ControlExt,
    ControlFlags,
    DssExt,
    Extension,
    JoinExt,
    MpCapableExt,
    ServiceExt,
)
from ..sal.inet import Address
from ..sal.packet import SalPacket
from ..sal.transport_headers import PROTO_TCP, TcpFlags, TcpHeader, TcpOption
from .buffers import ReceiveBuffer, SendBuffer
from .config import StreamConfig
from .congestion import CongestionControl, make_congestion_control
from .events import (
    ConnectionClosed,
    ConnectionEstablished,
    ConnectionReset,
    ConnectionTimedOut,
    DataReceived,
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
    join_proof,
    new_key,
)
from .reasons import MigrationReason
from .rtt import RttEstimator

__all__ = [
    "Connection",
    "ConnectionError_",
    "ConnectionStateError",
    "Role",
    "State",
    "Subflow",
    "unwrap",
]

MASK32: Final = 0xFFFFFFFF
HALF32: Final = 0x80000000
DUP_THRESH: Final = 3
# Duplicate ACKs owed by the receiver within one receive batch (one per out-of-order
# segment, RFC 5681 4.2): bounded like every queue; the runtime hands over at most 256
# datagrams per batch, so this cap is only reached by a flood.
MAX_OWED_DUPACKS: Final = 256
_PEER_DEFAULT_MSS: Final = 536  # RFC 9293 default when the peer sends no MSS option
_MIN_PEER_MSS: Final = 256
_CONTROL_PACKET: Final = 32  # bytes of a SAL control packet: base header + CONTROL


def _no_wake(conn: Connection) -> None:
    """Default wake-up hook for a connection not attached to a host."""


def unwrap(wire: int, base: int, ref: int) -> int:
    """The absolute offset of 32-bit ``wire`` (offset 0 = ``base``) nearest to ``ref``."""
    delta = (wire - base - ref) & MASK32
    if delta >= HALF32:
        delta -= 1 << 32
    return ref + delta


ConnectionError_ = ConnectionStateError  # its old name, kept for code that imports it


class Role(enum.Enum):
    """Which side opened the connection."""

    CLIENT = "client"
    SERVER = "server"


class State(enum.Enum):
    """Connection state (SAL and TCP handshake move together, as in the reference)."""

    SYN_SENT = "syn_sent"
    SYN_RECEIVED = "syn_received"
    ESTABLISHED = "established"
    TIME_WAIT = "time_wait"
    CLOSED = "closed"


class SentSegment:
    """One transmitted range [start, end) of a subflow's sequence space."""

    __slots__ = ("end", "sent_at", "retransmitted", "resent", "sacked", "lost", "fin", "dsn")

    def __init__(self, end: int, sent_at: float, fin: bool, dsn: int = -1) -> None:
        self.end = end
        self.dsn = dsn  # multipath: the data sequence number of its first byte (else -1)
        self.sent_at = sent_at
        self.retransmitted = False  # sent again in this loss episode (counts in pipe)
        self.resent = False  # ever sent more than once (Karn: never an RTT sample)
        self.sacked = False
        self.lost = False
        self.fin = fin


class Subflow:
    """One SAL flow of a connection and the TCP sequence space that rides in it."""

    def __init__(
        self,
        conn: Connection,
        local_flowid: int,
        local_addr: Address,
        remote_addr: Address | None,
        rng: random.Random,
    ) -> None:
        cfg = conn.config
        self.conn = conn
        self.local_flowid = local_flowid
        self.remote_flowid = 0
        self.local_addr = local_addr
        self.remote_addr = remote_addr
        self.control = ControlChannel(rng, cfg.control)
        # TCP send side.
        self.iss = rng.getrandbits(32)
        self.snd_una = 0
        self.snd_max = 0  # highest offset sent + 1 (FIN counts one)
        self.snd_wnd = cfg.mss  # until the peer tells us
        self.max_snd_wnd = 0xFFFF  # the largest window the peer offered (RFC 5961 5.2)
        self.snd_wscale = 0
        self.rcv_wscale = cfg.window_scale
        self.mss = cfg.mss
        self.sack_ok = False
        self.cc: CongestionControl = make_congestion_control(cfg.congestion, cfg.mss)
        self.rtt = RttEstimator(cfg.initial_rto, cfg.min_rto, cfg.max_rto)
        self.segments: SortedDict = SortedDict()  # start offset -> SentSegment
        self.lost: SortedList = SortedList()  # starts of lost segments awaiting resend
        # The newest send time of anything SACKed (RACK, RFC 8985): a retransmission sent
        # well before it and still not SACKed was lost too.
        self.rack_time = 0.0
        self.sacked_bytes = 0
        self.dupacks = 0
        # Without SACK: segments the duplicate ACKs say have left the network (each one
        # was caused by a segment arriving above the hole), kept through a recovery episode
        # and taken off the pipe, as Linux does for Reno; with SACK the scoreboard knows.
        self.dup_segments = 0
        # Without SACK: the next retransmission of the lost head goes out whatever the pipe
        # (the fast retransmit on the third duplicate ACK, RFC 5681 3.2 step 2, and the
        # retransmission on a partial ACK, RFC 6582 3.2 step 3).
        self.rexmit_now = False
        self.in_recovery = False
        self.recovery_after_rto = False
        self.recovery_point = 0
        self.rto_deadline: float | None = None
        self.rto_count = 0
        # Since when sent data has waited for an ACK that moves snd_una (None: nothing
        # in flight): the user timeout (StreamConfig.user_timeout) counts from here.
        self.waiting_since: float | None = None
        self.retransmissions = 0  # data segments sent again (for inspection and metrics)
        self.persist_deadline: float | None = None
        self.persist_backoff = 0
        # TCP receive side.
        self.irs = 0
        self.last_adv_window = 0
        self.peer_offered_wscale = False
        # Migration (RSYN): None when the addresses are settled.
        self.mig: MigrationState | None = None
        self.prev_remote: Address | None = None  # where the peer was before it moved
        self.prev_remote_until = 0.0  # ... and until when its late packets are taken
        self.challenge: Challenge | None = None  # checking the peer at a new address
        # Multipath (None/False on a single-path connection).
        self.rcv_track: SeqTracker | None = None  # our receive sequence, data kept by DSN
        self.join_state: str | None = None  # "syn_sent" / "syn_received" while joining
        self.join_third_ack = False
        self.ack_pending = False  # this subflow owes the peer an ACK
        self.mp_unacked = 0  # data segments received since our last ACK on this subflow
        self.fin_seq: int | None = None  # where our DATA_FIN sits in this subflow
        self.fin_seq_acked = False
        # When our SYN (client) or SYN-ACK (server) went out, if only once: its answer is
        # the first RTT sample, so early timers need not start from the 1 s default.
        self.handshake_sent_at: float | None = None
        self.peer_key: tuple[Address, int] | None = None  # server: its JOIN's (address, flowID)
        self.redundant_next = 0  # the redundant scheduler's next DSN for this subflow

    def handshake_sample(self, now: float) -> None:
        """The handshake's answer arrived: its time is the first RTT sample, unless the
        exchange was retransmitted (Karn) or took longer than the initial RTO (a SYN held by
        a DELAY rule, a lost third ACK: that is waiting, not the path)."""
        sent = self.handshake_sent_at
        self.handshake_sent_at = None
        if sent is not None and now - sent <= self.conn.config.initial_rto:
            self.rtt.sample(now - sent)

    @property
    def frozen(self) -> bool:
        """Transport output waits while the flow's path changes."""
        mig = self.mig
        return mig is not None and mig.busy

    def path_changed(self, now: float) -> None:
        """The flow moved to a new path: resume without taking the move for congestion.

        What was in flight on the old path is sent again as if after a timeout, but the
        congestion state starts afresh for the new path (slow start, no loss response) and
        the RTO backoff is forgotten. Slow start stops at the old path's window (the only
        hint there is about the new one) instead of running until it overflows a queue.
        """
        old_cwnd = self.cc.cwnd
        self.cc.on_path_change(now)
        self.cc.ssthresh = max(old_cwnd, 2 * self.mss)
        self.rtt.clear_backoff()
        self.rto_count = 0
        self.dupacks = 0
        self.dup_segments = 0
        self.rexmit_now = False
        self.persist_deadline = None
        self.persist_backoff = 0
        if self.waiting_since is not None:
            self.waiting_since = now  # the new path gets the whole user timeout
        if self.segments:
            self.lost.clear()
            for start, seg in self.segments.items():
                if not seg.sacked:
                    seg.lost = True
                    seg.retransmitted = False
                    self.lost.add(start)
            self.in_recovery = True
            self.recovery_after_rto = True
            self.recovery_point = self.snd_max
            self.rto_deadline = now + self.rtt.rto
        else:
            self.rto_deadline = None

    def take_peer_syn(self, tcp: TcpHeader) -> None:
        """Adopt what the peer's SYN or SYN-ACK says: ISN, MSS, window scale, SACK."""
        self.irs = tcp.seq
        # A floor on the peer's MSS: a hostile peer must not force tiny segments on us.
        self.mss = min(self.conn.config.mss, max(tcp.mss or _PEER_DEFAULT_MSS, _MIN_PEER_MSS))
        self.cc.set_mss(self.mss)
        ws = tcp.window_scale
        self.peer_offered_wscale = ws is not None
        if ws is None:
            self.snd_wscale = self.rcv_wscale = 0  # scaling needs both sides (RFC 7323)
        else:
            self.snd_wscale = min(ws, 14)
        self.sack_ok = self.conn.config.sack and tcp.sack_permitted
        self.snd_wnd = tcp.window  # never scaled in a SYN

    # -- sequence helpers ---------------------------------------------------------------
    def wire_seq(self, offset: int) -> int:
        """32-bit sequence number of send offset ``offset``."""
        return (self.iss + 1 + offset) & MASK32

    def wire_ack(self) -> int:
        """The 32-bit acknowledgement number we send."""
        track = self.rcv_track
        if track is not None:
            return (self.irs + 1 + track.rcv_nxt) & MASK32
        conn = self.conn
        return (self.irs + 1 + conn.recv.rcv_nxt + (1 if conn.peer_fin_received else 0)) & MASK32

    def advertised_window(self, hold: bool = False) -> int:
        """The 16-bit window field: receive buffer space scaled down.

        ``hold``: a duplicate ACK repeats the window last advertised when the real one only
        grew since (the application read): a sender counts an ACK that changes the window
        as a window update, not as a duplicate (RFC 5681 section 2), and would miss the
        loss. The growth goes out with the next ACK that is no duplicate.
        """
        win = self.conn.recv.window
        if hold and self.mss <= self.last_adv_window <= win:
            win = self.last_adv_window
        self.last_adv_window = win
        return min(win >> self.rcv_wscale, 0xFFFF)

    @property
    def flight(self) -> int:
        """Bytes in the network by RFC 6675's pipe (outside recovery: unSACKed bytes).

        Without SACK each duplicate ACK stands for one segment that left the network, so
        the pipe shrinks by a segment per duplicate ACK: outside recovery that is limited
        transmit (RFC 3042: one new segment on each of the first two), in recovery it does
        what RFC 5681's window inflation does, and a partial ACK takes back the duplicates
        of the segments it covers (RFC 6582's deflation).
        """
        if not self.in_recovery:
            pipe = self.snd_max - self.snd_una - self.sacked_bytes
        else:
            pipe = 0
            for start, seg in self.segments.items():
                if seg.sacked:
                    continue
                n = seg.end - start
                if not seg.lost:
                    pipe += n
                if seg.retransmitted and seg.lost:
                    pipe += n
        if self.dup_segments:
            pipe = max(pipe - self.dup_segments * self.mss, 0)
        return pipe

    # -- packet builders ----------------------------------------------------------------
    def _syn_options(self) -> list[TcpOption]:
        opts = [
            TcpOption.mss(self.conn.config.mss),
            TcpOption.nop(),
            TcpOption.window_scale(self.rcv_wscale),
        ]
        if self.conn.config.sack:
            opts += [TcpOption.nop(), TcpOption.nop(), TcpOption.sack_permitted()]
        return opts

    def syn_packet(self, control: ControlExt, service_id: ServiceID) -> SalPacket:
        """SYN: base, CONTROL(SYN), SERVICE(destination) and the TCP SYN."""
        tcp = TcpHeader(seq=self.iss, flags=TcpFlags.SYN, window=0, options=self._syn_options())
        exts: list[Extension] = [control, ServiceExt(service_id)]
        if self.conn.mp_offer is not None:
            exts.append(MpCapableExt(self.conn.mp_offer))
        return SalPacket(self.local_flowid, 0, PROTO_TCP, exts, tcp)

    def join_syn_packet(self, control: ControlExt) -> SalPacket:
        """The SYN of a new subflow: JOIN names the connection instead of a service."""
        mp = self.conn.mp
        assert mp is not None
        join = JoinExt(mp.peer_token, join_proof(mp.local_key, mp.peer_key))
        tcp = TcpHeader(seq=self.iss, flags=TcpFlags.SYN, window=0, options=self._syn_options())
        return SalPacket(self.local_flowid, 0, PROTO_TCP, [control, join], tcp)

    def synack_packet(self, control: ControlExt) -> SalPacket:
        """SYN-ACK: base, CONTROL(SYN+ACK) and the TCP SYN-ACK."""
        opts = [TcpOption.mss(self.conn.config.mss)]
        if self.peer_offered_wscale:
            opts += [TcpOption.nop(), TcpOption.window_scale(self.rcv_wscale)]
        if self.sack_ok:
            opts += [TcpOption.nop(), TcpOption.nop(), TcpOption.sack_permitted()]
        tcp = TcpHeader(
            seq=self.iss,
            ack=self.wire_ack(),
            flags=TcpFlags.SYN | TcpFlags.ACK,
            window=min(self.conn.recv.window, 0xFFFF),  # never scaled in a SYN
            options=opts,
        )
        exts: list[Extension] = [control]
        mp = self.conn.mp
        if mp is not None and self is self.conn.primary:
            exts.append(MpCapableExt(mp.local_key))
        return SalPacket(self.local_flowid, self.remote_flowid, PROTO_TCP, exts, tcp)

    def dss(self, flags: int = 0, dsn: int = 0) -> DssExt:
        """The DSS extension with our current data ACK."""
        return DssExt(flags, dsn, self.conn.recv.rcv_nxt)

    def pure_ack(self, duplicate: bool = False) -> SalPacket:
        """An ACK of this subflow (with the data ACK on a multipath connection);
        ``duplicate``: one owed for an out-of-order segment (its window is held)."""
        exts: list[Extension] = [self.dss()] if self.conn.mp is not None else []
        self.ack_pending = False
        self.mp_unacked = 0
        tcp = self.ack_header(hold_window=duplicate)
        return SalPacket(self.local_flowid, self.remote_flowid, PROTO_TCP, exts, tcp)

    def ack_header(
        self, flags: int = TcpFlags.ACK, offset: int | None = None, hold_window: bool = False
    ) -> TcpHeader:
        """A TCP header with our current ACK, window and SACK blocks (``hold_window``: see
        :meth:`advertised_window`)."""
        opts: list[TcpOption] = []
        if self.sack_ok:
            track = self.rcv_track
            blocks = track.sack_blocks(3) if track is not None else self.conn.recv.sack_blocks(3)
            if blocks:
                base = self.irs + 1
                opts = [TcpOption.nop(), TcpOption.nop()]
                opts.append(
                    TcpOption.sack([((base + s) & MASK32, (base + e) & MASK32) for s, e in blocks])
                )
        return TcpHeader(
            seq=self.wire_seq(self.snd_max if offset is None else offset),
            ack=self.wire_ack(),
            flags=flags,
            window=self.advertised_window(hold_window),
            options=opts,
        )

    def control_packet(
        self,
        control: ControlExt,
        extra: list[Extension] | None = None,
        tcp: TcpHeader | None = None,
    ) -> SalPacket:
        """A SAL control packet of this flow (SAL FIN, control ACK, RST, third ACK)."""
        exts: list[Extension] = [control, *(extra or [])]
        return SalPacket(self.local_flowid, self.remote_flowid, PROTO_TCP, exts, tcp)

    # -- receive path -------------------------------------------------------------------
    def on_tcp(
        self, tcp: TcpHeader, payload: BytesLike, now: float, dss: DssExt | None = None
    ) -> None:
        """A TCP segment for this subflow (handshake already complete or completing);
        ``dss`` is its DSS extension on a multipath connection."""
        conn = self.conn
        flags = tcp.flags
        if conn.mp is not None:
            self._on_tcp_mp(tcp, payload, now, dss)
            return
        if flags & TcpFlags.RST:
            return  # resets travel as SAL CONTROL(RST), which carries the nonce
        if flags & TcpFlags.SYN:
            # A retransmitted SYN-ACK: our third ACK was lost; answer it again.
            conn.third_ack_pending = conn.role is Role.CLIENT
            conn.ack_now = True
            return
        if not self._acceptable(tcp, len(payload) + (1 if flags & TcpFlags.FIN else 0)):
            conn.challenge_ack_due = True  # RFC 5961: ACK it, change nothing
            return
        self._heard_again(now)
        conn.last_heard = now
        conn.keepalives_sent = 0
        if flags & TcpFlags.ACK:
            self._on_ack(tcp, bool(payload) or bool(flags & TcpFlags.FIN), now)
        if payload or flags & TcpFlags.FIN:
            self._on_data(tcp, payload, now)
        elif unwrap(tcp.seq, self.irs + 1, conn.recv.rcv_nxt) < conn.recv.rcv_nxt:
            # An old sequence number: a keepalive or zero-window probe. Answer with an ACK
            # that carries our window (RFC 9293: unacceptable segments are acknowledged).
            conn.ack_now = True

    def _acceptable(self, tcp: TcpHeader, length: int, track: SeqTracker | None = None) -> bool:
        """Whether a segment's numbers are plausible for this flow (RFC 9293 3.10.7.4 and
        RFC 5961): its sequence range touches what the receive buffer could ever have
        offered around ``rcv_nxt``, and its ACK lies in [snd_una - max window, snd_max].
        Anything else is not from the peer as it stands now, and changes nothing.
        ``track``: a multipath subflow's own sequence space (its ``rcv_track``)."""
        if tcp.flags & TcpFlags.ACK:
            ack = unwrap(tcp.ack, self.iss + 1, self.snd_una)
            if ack > self.snd_max or ack < self.snd_una - self.max_snd_wnd:
                return False
        recv = self.conn.recv
        rcv_nxt = recv.rcv_nxt if track is None else track.rcv_nxt
        seq = unwrap(tcp.seq, self.irs + 1, rcv_nxt)
        cap = recv.capacity
        return seq < rcv_nxt + cap and seq + length + cap >= rcv_nxt

    def _heard_again(self, now: float) -> None:
        """The peer speaks after a silence while our data waits in RTO backoff: what we
        sent was probably lost on the way (a NAT mapping that expired meanwhile, a path
        that was down), and the peer is there again, so it goes now rather than at the
        next backed-off timeout. Only after a silence longer than the base RTO, so a peer
        that keeps sending while our data is lost does not set off a resend per segment."""
        if (
            self.rto_count
            and self.rto_deadline is not None
            and self.rto_deadline > now
            and now - self.conn.last_heard > self.rtt.base_rto
        ):
            self.rtt.clear_backoff()
            self.rto_count -= 1  # _on_rto counts this one again
            self.rto_deadline = now
            self.conn.stats_heard_again += 1

    def _on_tcp_mp(
        self, tcp: TcpHeader, payload: BytesLike, now: float, dss: DssExt | None
    ) -> None:
        """on_tcp of a multipath connection: data goes to the connection by DSN."""
        conn = self.conn
        flags = tcp.flags
        if flags & (TcpFlags.RST | TcpFlags.SYN):
            if flags & TcpFlags.SYN:
                self.ack_pending = True  # a retransmitted SYN-ACK: our ACK was lost
            return
        track = self.rcv_track
        assert track is not None
        if not self._acceptable(tcp, len(payload) + (1 if flags & TcpFlags.FIN else 0), track):
            conn.challenge_ack_due = True  # RFC 5961 as on a single path: change nothing
            return
        self._heard_again(now)
        conn.last_heard = now
        conn.keepalives_sent = 0
        if dss is not None:
            conn.on_data_ack(dss.data_ack, tcp.window << self.snd_wscale, now)
        fin = bool(flags & TcpFlags.FIN)
        if flags & TcpFlags.ACK:
            self._on_ack(tcp, bool(payload) or fin, now)
        if not payload and not fin:
            if unwrap(tcp.seq, self.irs + 1, track.rcv_nxt) < track.rcv_nxt:
                self.ack_pending = True  # a keepalive or window probe: answer it
            return
        seq = unwrap(tcp.seq, self.irs + 1, track.rcv_nxt)
        end = seq + len(payload) + (1 if fin else 0)
        if end <= track.rcv_nxt or dss is None or not dss.flags & DssExt.HAS_DSN:
            self.ack_pending = True
            return  # a duplicate (ACK it again), or data we cannot place
        # Delayed ACKs as on a single path (every second full segment, or the timer):
        # ACKing every segment would make this subflow smoother, and so luckier at a
        # shared drop-tail queue, than the single-path flows it competes with.
        in_order = seq == track.rcv_nxt and not track.has_holes
        self.mp_unacked += 1
        if not in_order or fin or self.mp_unacked >= conn.config.ack_every:
            self.ack_pending = True
        elif conn.delack_deadline is None:
            conn.delack_deadline = now + conn.config.delayed_ack
        recv = conn.recv
        if payload:
            fin_at = conn.peer_fin_offset
            if fin_at is not None and dss.dsn + len(payload) > fin_at:
                conn.challenge_ack_due = True  # contradicts the DATA_FIN: changes nothing
                return
            if dss.dsn + len(payload) > recv.rcv_nxt + recv.window:
                self.ack_pending = True
                return  # no room in the connection's buffer: not taken, the peer resends
            dropped = recv.dropped_segments
            if recv.offer(dss.dsn, payload):
                conn.emit(DataReceived(conn.conn_id, recv.readable))
            if recv.dropped_segments != dropped:
                self.ack_pending = True
                return  # too many holes to keep it: not taken (so not ACKed), resent later
        if fin and dss.flags & DssExt.DATA_FIN:
            # A DATA_FIN that contradicts what we have is not from the peer as we know it:
            # as on a single path it gets a challenge ACK (a reset would let anyone who
            # knows the flowIDs end the connection).
            if (
                conn.peer_fin_offset is not None and conn.peer_fin_offset != dss.dsn
            ) or dss.dsn < recv.rcv_nxt:
                conn.challenge_ack_due = True
                return
            conn.peer_fin_offset = dss.dsn
        track.add(seq, end)
        conn.check_peer_fin(now)

    def _on_ack(self, tcp: TcpHeader, carries_data: bool, now: float) -> None:
        conn = self.conn
        ack = unwrap(tcp.ack, self.iss + 1, self.snd_una)
        if ack > self.snd_max:
            conn.ack_now = True  # acknowledges what we never sent: tell the peer where we are
            return
        window = tcp.window << self.snd_wscale
        window_changed = window != self.snd_wnd
        if ack >= self.snd_una:
            self.snd_wnd = window
            if window > self.max_snd_wnd:
                self.max_snd_wnd = window
            if window and self.persist_deadline is not None:
                self.persist_deadline = None
                self.persist_backoff = 0
        sacked_before = self.sacked_bytes
        if self.sack_ok and tcp.options:
            self._on_sack(tcp.sack_blocks, now)
        if ack > self.snd_una:
            self._on_new_ack(ack, now)
        elif (
            ack == self.snd_una
            and self.snd_max > self.snd_una
            and not carries_data
            and not window_changed
            # With SACK a duplicate ACK counts only if it SACKs new data (RFC 6675 section
            # 2): the peer's answers to copies of data it already had (as after a move,
            # when the old path delivered what was resent) say nothing about loss.
            and (not self.sack_ok or self.sacked_bytes > sacked_before)
        ):
            self.dupacks += 1
            if not self.sack_ok and not self.recovery_after_rto:
                # Never more than the segments above the first: that one is the hole.
                self.dup_segments = min(self.dup_segments + 1, max(len(self.segments) - 1, 0))
        if self.snd_max > self.snd_una and not self.in_recovery:
            if self.dupacks >= self._dup_thresh() or (self.sack_ok and self._first_lost()):
                self._enter_recovery(now)
        elif self.in_recovery and self.sack_ok:
            self._mark_lost()

    def _on_new_ack(self, ack: int, now: float) -> None:
        conn = self.conn
        flight_before = self.snd_max - self.snd_una - self.sacked_bytes
        newly = ack - self.snd_una
        rtt_sample: float | None = None
        karn = False
        segs = self.segments
        covered = 0  # segments acknowledged whole
        while segs:
            start, seg = segs.peekitem(0)
            if start >= ack:
                break
            del segs[start]
            if seg.lost:
                self.lost.discard(start)
            if seg.end > ack:
                # Partially acknowledged: keep the rest as its own segment.
                rest = SentSegment(
                    seg.end, seg.sent_at, seg.fin, seg.dsn + (ack - start) if seg.dsn >= 0 else -1
                )
                rest.retransmitted, rest.lost, rest.resent = seg.retransmitted, seg.lost, seg.resent
                segs[ack] = rest
                if rest.lost:
                    self.lost.add(ack)
                if seg.sacked:
                    self.sacked_bytes -= ack - start
                    rest.sacked = True
                break
            covered += 1
            if seg.sacked:
                self.sacked_bytes -= seg.end - start
            if seg.resent:
                karn = True
            else:
                rtt_sample = now - seg.sent_at  # the newest: least inflated by holes
        if rtt_sample is not None and not karn:
            # Karn, extended as Linux does: no sample from an ACK that also covers a
            # retransmission (it would time the wait for the hole to be filled).
            self.rtt.sample(rtt_sample)
        else:
            self.rtt.clear_backoff()
        self.snd_una = ack
        self.waiting_since = now if self.snd_max > ack else None
        self.dupacks = 0
        self.rto_count = 0
        if self.dup_segments:
            # All but the first segment this ACK covers had each caused a duplicate ACK; the
            # rest came from segments above the new left edge (Linux's tcp_remove_reno_sacks).
            left = max(min(self.dup_segments - covered + 1, len(self.segments) - 1), 0)
            if self.in_recovery and ack < self.recovery_point:
                self.dup_segments = left  # a partial ACK
            elif self.in_recovery and not self.recovery_after_rto and left >= DUP_THRESH:
                # Recovery ends, but the receiver already holds at least three segments
                # above the new left edge: a segment sent during recovery was lost (a new
                # congestion event). Retransmit it now; its duplicate ACKs came while we
                # counted them for the old hole, and no more will come if the sender has
                # nothing new to send.
                self.dup_segments = left
                self.dupacks = left
            else:
                self.dup_segments = 0
        if conn.mp is None:
            released = conn.send.release(min(ack, conn.send.end))
            if released and conn.send_blocked and conn.send.free > 0:
                conn.send_blocked = False
                conn.emit(SendSpaceAvailable(conn.conn_id, conn.send.free))
            if conn.fin_offset is not None and ack > conn.fin_offset:
                conn.on_fin_acked(now)
        elif self.fin_seq is not None and ack > self.fin_seq:
            self.fin_seq_acked = True
            conn.maybe_data_fin_acked(now)
        if self.in_recovery:
            if ack >= self.recovery_point:
                self.in_recovery = False
                if not self.recovery_after_rto:
                    self.cc.on_recovery_exit(now)
                self.recovery_after_rto = False
                for start in list(self.lost):
                    self.segments[start].lost = False
                self.lost.clear()
                self.rexmit_now = False
            elif not self.sack_ok:
                # NewReno partial ACK (RFC 6582): the next hole is lost too, and is resent
                # at once.
                first = self.segments.peekitem(0) if self.segments else None
                if first is not None and not first[1].lost:
                    first[1].lost = True
                    first[1].retransmitted = False
                    self.lost.add(first[0])
                    self.rexmit_now = not self.recovery_after_rto
        if not self.in_recovery or self.recovery_after_rto:
            self.cc.on_ack(newly, now, rtt_sample, flight_before)
        self.rto_deadline = now + self.rtt.rto if self.snd_max > self.snd_una else None

    def _on_sack(self, blocks: list[tuple[int, int]], now: float) -> None:
        base = self.iss + 1
        segs = self.segments
        for left_w, right_w in blocks:
            left = unwrap(left_w, base, self.snd_una)
            right = unwrap(right_w, base, self.snd_una)
            if right <= left or left < self.snd_una or right > self.snd_max:
                continue  # stale or bogus block
            # Only segments wholly inside the block become SACKed.
            for start in segs.irange(left, right, inclusive=(True, False)):
                seg = segs[start]
                if seg.end <= right and not seg.sacked:
                    seg.sacked = True
                    self.sacked_bytes += seg.end - start
                    # RFC 8985 6.2: a resent segment SACKed within a min RTT of its
                    # resending was the original arriving late: its time says nothing.
                    min_rtt = self.rtt.min_rtt
                    if seg.sent_at > self.rack_time and not (
                        seg.resent and (min_rtt is None or now - seg.sent_at < min_rtt)
                    ):
                        self.rack_time = seg.sent_at
                    if seg.lost:
                        self.lost.discard(start)

    def _dup_thresh(self) -> int:
        """Duplicate ACKs that start a fast retransmit: three, or fewer without SACK when
        fewer than four segments are outstanding and nothing new can be sent (Early
        Retransmit, RFC 5827: at most ``oseg - 1`` duplicates can come then)."""
        if self.sack_ok or self.conn.mp is not None:
            return DUP_THRESH
        oseg = len(self.segments)
        if oseg > DUP_THRESH or oseg < 2:
            return DUP_THRESH
        conn = self.conn
        more = self.snd_max < conn.send.end or (
            conn.fin_offset is not None and self.snd_max <= conn.fin_offset
        )
        if more and self.snd_max < self.snd_una + self.snd_wnd:
            return DUP_THRESH  # new data can still go out and bring its own duplicates
        return oseg - 1

    def _first_lost(self) -> bool:
        """RFC 6675 IsLost for the first unacknowledged segment."""
        if not self.segments or self.sacked_bytes == 0:
            return False
        seg = self.segments.peekitem(0)[1]
        if seg.sacked:
            return False
        return self.sacked_bytes > (DUP_THRESH - 1) * self.mss

    def _mark_lost(self) -> None:
        """Mark unSACKed segments with enough SACKed data above them as lost."""
        if not self.sack_ok:
            if self.segments:
                start, seg = self.segments.peekitem(0)
                if not seg.lost and not seg.sacked:
                    seg.lost = True
                    self.lost.add(start)
            return
        above = 0
        threshold = (DUP_THRESH - 1) * self.mss
        segs = self.segments
        # A retransmission older than something already SACKed (by more than a reordering
        # window of a quarter of the minimum RTT) was lost as well: send it again rather
        # than wait for the retransmission timer (RACK's rule, RFC 8985 6.2).
        min_rtt = self.rtt.min_rtt
        rack = self.rack_time - min_rtt / 4 if min_rtt is not None else -1.0
        # reversed(SortedDict) walks its sorted list directly; reversed(keys()) would index
        # the view once per step (each an O(log n) position lookup).
        for start in reversed(segs):
            seg = segs[start]
            if seg.sacked:
                above += seg.end - start
            elif seg.retransmitted:
                if seg.sent_at < rack and seg.lost:
                    seg.retransmitted = False  # lost again: back in the queue to resend
                    self.lost.add(start)
            elif above > threshold and not seg.lost:
                seg.lost = True
                self.lost.add(start)

    def _enter_recovery(self, now: float) -> None:
        self.in_recovery = True
        self.recovery_after_rto = False
        self.recovery_point = self.snd_max
        self.cc.on_congestion_event(now, self.snd_max - self.snd_una - self.sacked_bytes)
        self._mark_lost()
        if not self.lost and self.segments:  # dupacks without SACK: the first one is lost
            start, seg = self.segments.peekitem(0)
            seg.lost = True
            self.lost.add(start)
        self.rexmit_now = not self.sack_ok

    def _on_data(self, tcp: TcpHeader, payload: BytesLike, now: float) -> None:
        conn = self.conn
        recv = conn.recv
        seq = unwrap(tcp.seq, self.irs + 1, recv.rcv_nxt)
        end = seq + len(payload)
        # Segments that contradict the peer's FIN (data past it, a FIN elsewhere, a FIN
        # before data already taken) are not from the peer as we know it: an ACK answers
        # them (RFC 5961's challenge ACK) and they change nothing. A reset would let anyone
        # who guesses the flowIDs end the flow.
        if conn.peer_fin_received:
            assert conn.peer_fin_offset is not None
            if end > conn.peer_fin_offset:
                conn.challenge_ack_due = True
            else:
                conn.ack_now = True  # an old duplicate or retransmitted FIN: our ACK was lost
            return
        if tcp.flags & TcpFlags.FIN:
            if (conn.peer_fin_offset is not None and conn.peer_fin_offset != end) or (
                end < recv.rcv_nxt
            ):
                conn.challenge_ack_due = True
                return
            conn.peer_fin_offset = end
        if conn.peer_fin_offset is not None and end > conn.peer_fin_offset:
            conn.challenge_ack_due = True
            return
        in_order = seq == recv.rcv_nxt
        had_holes = recv.out_of_order_bytes > 0
        delivered = recv.offer(seq, payload) if payload else 0
        if delivered:
            conn.emit(DataReceived(conn.conn_id, recv.readable))
        if conn.peer_fin_offset is not None and recv.rcv_nxt == conn.peer_fin_offset:
            conn.peer_fin_received = True
            if conn.fin_offset is None and in_order and not had_holes:
                # Applications mostly close on end of stream: a short delayed ACK lets our
                # FIN carry it (one packet instead of two). Not when it filled a hole: the
                # peer's loss recovery is waiting for that ACK.
                if conn.delack_deadline is None:
                    conn.delack_deadline = now + conn.config.delayed_ack
            else:
                conn.ack_now = True
            conn.emit(StreamEnded(conn.conn_id))
            conn.on_peer_fin(now)
            return
        if not in_order or had_holes or recv.out_of_order_bytes or not delivered:
            conn.ack_now = True  # out of order, filled a hole, or outside the window
            if seq > recv.rcv_nxt:
                # Above a hole: one duplicate ACK for each such segment (RFC 5681 4.2), even
                # when several come in one receive batch; a sender without SACK counts them.
                conn.dupacks_owed = min(conn.dupacks_owed + 1, MAX_OWED_DUPACKS)
            return
        conn.unacked_segments += 1
        if conn.unacked_segments >= conn.config.ack_every:
            conn.ack_now = True
        elif conn.delack_deadline is None:
            conn.delack_deadline = now + conn.config.delayed_ack

    # -- send path ----------------------------------------------------------------------
    def output(self, now: float, out: list[SalPacket]) -> None:
        """Send what congestion control, the peer's window and the data allow."""
        conn = self.conn
        send_end = conn.send.end
        fin_off = conn.fin_offset
        mss = self.mss
        # Computed once (it scans the segments in recovery) and then kept up to date here:
        # each segment sent adds its length to the pipe, as RFC 6675 counts it.
        pipe = self.flight
        while True:
            if self.lost:
                start = self.lost[0]
                seg = self.segments[start]
                if seg.retransmitted or seg.sacked:
                    self.lost.discard(start)
                    continue
                if pipe > 0 and pipe + (seg.end - start) > self.cc.cwnd and not self.rexmit_now:
                    break
                self.rexmit_now = False
                seg.retransmitted = True
                seg.resent = True
                self.retransmissions += 1
                seg.sent_at = now
                self.lost.discard(start)
                out.append(self._data_packet(start, seg.end, seg.fin, seg.dsn))
                pipe += seg.end - start
                if self.rto_deadline is None:
                    self.rto_deadline = now + self.rtt.rto
                continue
            if conn.mp is not None:
                self._output_new_mp(now, out, pipe)
                break
            if self.snd_max < send_end:
                wnd_end = self.snd_una + self.snd_wnd
                room = min(wnd_end - self.snd_max, send_end - self.snd_max, mss)
                if room <= 0:
                    if self.snd_wnd == 0 and self.snd_max == self.snd_una:
                        self._arm_persist(now)
                    break
                if room < mss and send_end - self.snd_max > room and pipe > 0:
                    break  # sender SWS avoidance: wait for a full segment's room
                if pipe > 0 and pipe + room > self.cc.cwnd:
                    break
                start = self.snd_max
                end = start + room
                fin = fin_off is not None and end == fin_off
                self._send_new(start, end, fin, now, out)
                pipe += room
                continue
            if fin_off is not None and self.snd_max == fin_off:
                self._send_new(fin_off, fin_off, True, now, out)
            break

    def _output_new_mp(self, now: float, out: list[SalPacket], pipe: int) -> None:
        """Multipath: take data from the connection (by scheduler) while cwnd allows."""
        conn = self.conn
        mp = conn.mp
        assert mp is not None
        mss = self.mss
        while not (pipe > 0 and pipe + mss > self.cc.cwnd):
            # The peer's window is the connection's right edge (from the newest data ACK
            # and window on any subflow), as in RFC 8684 3.3.4.
            chunk = conn.mp_take(self, mss, mp.snd_right)
            if chunk is None:
                if (
                    mp.snd_right <= mp.snd_nxt
                    and mp.snd_nxt < conn.send.end
                    and self.snd_max == self.snd_una
                    and self is conn.primary
                ):
                    self._arm_persist(now)  # the window is shut: probe it
                break
            dsn, n = chunk
            start = self.snd_max
            self.segments[start] = SentSegment(start + n, now, False, dsn)
            self.snd_max = start + n
            if self.waiting_since is None:
                self.waiting_since = now
            out.append(self._data_packet(start, start + n, False, dsn))
            pipe += n
            if self.rto_deadline is None:
                self.rto_deadline = now + self.rtt.rto
        fin_off = conn.fin_offset
        if (
            self is conn.primary
            and fin_off is not None
            and self.fin_seq is None
            and mp.snd_nxt >= fin_off
            and not mp.reinject
        ):
            start = self.snd_max
            self.fin_seq = start
            self.segments[start] = SentSegment(start + 1, now, True, fin_off)
            self.snd_max = start + 1
            if self.waiting_since is None:
                self.waiting_since = now
            out.append(self._data_packet(start, start + 1, True, fin_off))
            if self.rto_deadline is None:
                self.rto_deadline = now + self.rtt.rto

    def _send_new(self, start: int, end: int, fin: bool, now: float, out: list[SalPacket]) -> None:
        seg_end = end + (1 if fin else 0)
        self.segments[start] = SentSegment(seg_end, now, fin)
        self.snd_max = seg_end
        if self.waiting_since is None:
            self.waiting_since = now
        out.append(self._data_packet(start, seg_end, fin))
        self.conn.ack_sent()
        if self.rto_deadline is None:
            self.rto_deadline = now + self.rtt.rto

    def _data_packet(self, start: int, end: int, fin: bool, dsn: int = -1) -> SalPacket:
        data_end = end - 1 if fin else end
        conn = self.conn
        exts: list[Extension] = []
        if dsn < 0:
            payload = conn.send.read(start, data_end) if data_end > start else b""
        else:
            payload = conn.read_dsn(dsn, data_end - start) if data_end > start else b""
            flags = DssExt.HAS_DSN | (DssExt.DATA_FIN if fin else 0)
            exts.append(self.dss(flags, dsn))
            self.ack_pending = False
            self.mp_unacked = 0
        flags = TcpFlags.ACK | (TcpFlags.FIN if fin else 0) | (TcpFlags.PSH if payload else 0)
        tcp = self.ack_header(flags, start)
        return SalPacket(self.local_flowid, self.remote_flowid, PROTO_TCP, exts, tcp, payload)

    def _arm_persist(self, now: float) -> None:
        if self.persist_deadline is None:
            self.persist_deadline = now + min(self.rtt.rto * (1 << self.persist_backoff), 60.0)

    def on_timer(self, now: float, out: list[SalPacket]) -> None:
        """Retransmission and persist timers of this subflow."""
        if self.rto_deadline is not None and now >= self.rto_deadline:
            self._on_rto(now)
        if self.persist_deadline is not None and now >= self.persist_deadline:
            # Zero-window probe: an already-acknowledged sequence number, so the peer answers
            # with an ACK that carries its current window without us sending new data.
            self.persist_backoff = min(self.persist_backoff + 1, 6)
            self.persist_deadline = None
            out.append(
                SalPacket(
                    self.local_flowid,
                    self.remote_flowid,
                    PROTO_TCP,
                    [],
                    self.ack_header(TcpFlags.ACK, self.snd_una - 1),
                )
            )
            self._arm_persist(now)

    def _on_rto(self, now: float) -> None:
        conn = self.conn
        if self.snd_max == self.snd_una:
            self.rto_deadline = None
            return
        self.rto_count += 1
        if (
            conn.mp is not None
            and self.rto_count >= DEAD_AFTER_RTOS
            and len(conn.live_subflows()) > 1
        ):
            conn.subflow_failed(self, now)  # its data goes on the other paths
            return
        if self.rto_count > conn.config.max_retransmissions:
            conn.time_out("data retransmissions unanswered")
            return
        self.cc.on_retransmission_timeout(now, self.snd_max - self.snd_una - self.sacked_bytes)
        self.rtt.backoff()
        # Everything is presumed lost and resent in order from the window start, SACKed
        # data included: the receiver may have reneged on it (RFC 2018 section 8, RFC 6675
        # section 5.1), and the segment at the left edge must go again in any case.
        self.lost.clear()
        for start, seg in self.segments.items():
            seg.sacked = False
            seg.lost = True
            seg.retransmitted = False
            self.lost.add(start)
        self.sacked_bytes = 0
        self.in_recovery = True
        self.recovery_after_rto = True
        self.recovery_point = self.snd_max
        self.dupacks = 0
        self.dup_segments = 0
        self.rexmit_now = False
        self.rto_deadline = now + self.rtt.rto

    def next_deadline(self) -> float | None:
        """The earliest of this subflow's timers."""
        mig = self.mig
        if mig is not None and mig.busy:
            d = None  # transport timers wait with the transport
        else:
            d = self.rto_deadline
            p = self.persist_deadline
            if p is not None and (d is None or p < d):
                d = p
        c = self.control.deadline
        if c is not None and (d is None or c < d):
            d = c
        if mig is not None:
            r = mig.rsynack_deadline
            if r is not None and (d is None or r < d):
                d = r
        ch = self.challenge
        if ch is not None and (d is None or ch.deadline < d):
            d = ch.deadline
        return d


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
            raise ConnectionStateError(
                f"cannot {what}: connection {self.conn_id:#x} is closed"
                + (f" ({self.error})" if self.error else "")
            )

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
            raise ConnectionStateError(
                "this connection is not multipath: connect with StreamConfig(multipath=True)"
            )
        if self.state is not State.ESTABLISHED:
            raise ConnectionStateError(
                f"cannot add a path: connection {self.conn_id:#x} is closing"
            )
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
            raise ConnectionStateError(
                f"cannot migrate connection {self.conn_id:#x}: not established"
            )
        cc = sf.control
        mig = sf.mig
        if cc.outstanding is not None and not (mig is not None and mig.own_rsyn):
            return False
        if mig is None:
            mig = sf.mig = MigrationState()
        sf.local_addr = local
        mig.reason = MigrationReason.MIGRATED
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
            mig = sf.mig = MigrationState(reason=MigrationReason.PEER_MOVED)
        elif not mig.own_rsyn:
            mig.reason = MigrationReason.PEER_MOVED
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
        self.emit(FlowMigrated(self.conn_id, sf.local_addr, src, MigrationReason.REBINDING))

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

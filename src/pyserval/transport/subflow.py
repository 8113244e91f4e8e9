"""One SAL flow of a connection and the TCP sequence space that rides in it.

A :class:`Subflow` has its own flowIDs, address pair and SAL control channel, and its own
TCP send and receive state: sequence numbers, the peer's window, congestion control, the
persist timer and the retransmission timer. What it sent and what was lost is its
:class:`~pyserval.transport.recovery.Recovery` (scoreboard, SACK, loss rules, pipe, RTT);
its segments are built by the :class:`~pyserval.transport.packets.SegmentBuilder` methods it
inherits. On a single-path connection its data offsets are the connection's; on a
multipath one data segments carry DSNs and received data goes to the connection by DSN.

The :class:`~pyserval.transport.connection.Connection` owns its subflows and drives them:
:meth:`Subflow.on_tcp` for each TCP segment, :meth:`Subflow.output` and
:meth:`Subflow.on_timer` when it sends or its timers run, :meth:`Subflow.next_deadline`.
A subflow reads and updates its connection's byte stream (send and receive buffers, FIN
offsets, ACK flags). It does no I/O and reads no clock; it does not run the SAL control
exchanges (handshake, RSYN, SAL FIN: the connection does), nor choose among subflows.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Final

from sortedcontainers import SortedList

from ..sal.checksum import BytesLike
from ..sal.control import ControlChannel
from ..sal.extensions import DssExt
from ..sal.packet import SalPacket
from ..sal.transport_headers import TcpFlags, TcpHeader
from .close_state import Stage
from .common import Address, Role, unwrap
from .congestion import CongestionControl, make_congestion_control
from .events import DataReceived, SendSpaceAvailable, StreamEnded
from .migration import Challenge, MigrationState
from .multipath import DEAD_AFTER_RTOS, SeqTracker
from .packets import SegmentBuilder
from .recovery import DUP_THRESH, Recovery
from .rtt import RttEstimator

if TYPE_CHECKING:
    from .connection import Connection

__all__ = ["MAX_OWED_DUPACKS", "Subflow", "new_data_end"]

# Duplicate ACKs owed by the receiver within one receive batch (one per out-of-order
# segment, RFC 5681 4.2): bounded like every queue; the runtime hands over at most 256
# datagrams per batch, so this cap is only reached by a flood.
MAX_OWED_DUPACKS: Final = 256
_PEER_DEFAULT_MSS: Final = 536  # RFC 9293 default when the peer sends no MSS option
_MIN_PEER_MSS: Final = 256
_CLIENT: Final = Role.CLIENT  # bound once: an Enum member read off its class is slow
_OPEN: Final = Stage.OPEN
_RST_OR_SYN: Final = TcpFlags.RST | TcpFlags.SYN


def new_data_end(snd_max: int, wnd_end: int, send_end: int, pipe: int, cwnd: int, mss: int) -> int:
    """Where the new data that may go now ends: full segments while the peer's window
    (up to ``wnd_end``), the data (up to ``send_end``) and cwnd allow, then a short one
    only where sender SWS avoidance (RFC 9293 3.8.6.2.1) and cwnd let it go. Per segment
    the rule is RFC 5681's: one may go when nothing is in flight (``pipe`` 0) or when it
    fits in cwnd with what is. Worked out at once rather than segment by segment (a
    subflow sends a whole train per flush).

    Returns ``snd_max`` when nothing may go, and one less when the window or the data
    leave no room at all (the caller then arms the persist timer if the window is shut).
    """
    avail = min(wnd_end, send_end) - snd_max
    if avail <= 0:
        return snd_max - 1
    full = avail // mss
    # With nothing in flight the first segment goes whatever cwnd says.
    fit = max(1, cwnd // mss) if pipe <= 0 else max(0, cwnd - pipe) // mss
    n = full if full < fit else fit
    end = snd_max + n * mss
    pipe += n * mss
    if n == full:
        tail = avail - n * mss
        # A short segment waits while more data is queued than the window takes (SWS
        # avoidance) or cwnd has no room for it, unless nothing is in flight.
        if tail > 0 and not (pipe > 0 and (send_end - end > tail or pipe + tail > cwnd)):
            end += tail
    return end


class Subflow(SegmentBuilder):
    """One SAL flow of a connection and the TCP sequence space that rides in it."""

    # Slots, as Connection has them (some forty-five attributes: see there).
    __slots__ = (
        "ack_pending",
        "adv_edge",
        "adv_rcv_nxt",
        "cc",
        "challenge",
        "conn",
        "control",
        "fin_seq",
        "fin_seq_acked",
        "handshake_sent_at",
        "irs",
        "iss",
        "join_state",
        "join_third_ack",
        "last_adv_window",
        "local_addr",
        "local_flowid",
        "max_snd_wnd",
        "mig",
        "mp_unacked",
        "mss",
        "peer_key",
        "peer_offered_wscale",
        "persist_backoff",
        "persist_deadline",
        "prev_remote",
        "prev_remote_until",
        "probes",
        "pto_deadline",
        "rcv_track",
        "rcv_wscale",
        "recovery",
        "redundant_next",
        "remote_addr",
        "remote_flowid",
        "retransmissions",
        "rto_count",
        "rto_deadline",
        "rtt",
        "sack_ok",
        "segments",
        "snd_max",
        "snd_una",
        "snd_wnd",
        "snd_wscale",
        "tlp",
        "waiting_since",
    )

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
        self.recovery = rec = Recovery(
            RttEstimator(cfg.initial_rto, cfg.min_rto, cfg.max_rto), cfg.mss
        )
        # The recovery's RTT estimate and scoreboard under the subflow's names (the same
        # objects, never replaced): the connection times its control packets by ``rtt``
        # and gives up a dead subflow's ``segments``; the host checks a reset against them.
        self.rtt = rec.rtt
        self.segments = rec.segments
        self.rto_deadline: float | None = None
        self.rto_count = 0
        # The tail loss probe's timer (RFC 8985 7.2); None when no probe is due: see
        # _arm_pto for when it runs.
        self.tlp = cfg.tail_loss_probe
        self.pto_deadline: float | None = None
        self.probes = 0  # tail loss probes sent (for inspection and metrics)
        # Since when sent data has waited for an ACK that moves snd_una (None: nothing
        # in flight): the user timeout (StreamConfig.user_timeout) counts from here.
        self.waiting_since: float | None = None
        self.retransmissions = 0  # data segments sent again (for inspection and metrics)
        self.persist_deadline: float | None = None
        self.persist_backoff = 0
        # TCP receive side.
        self.irs = 0
        self.last_adv_window = 0
        self.adv_edge = 0
        self.adv_rcv_nxt = 0
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
    def lost(self) -> SortedList:
        """Starts of the segments lost and awaiting resend (the recovery's list: made on
        the first loss, so not kept here as ``rtt`` and ``segments`` are)."""
        return self.recovery.lost

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
        self.rto_count = 0
        self.persist_deadline = None
        self.persist_backoff = 0
        if self.waiting_since is not None:
            self.waiting_since = now  # the new path gets the whole user timeout
        self.recovery.on_path_change(self.snd_max)
        self.rto_deadline = now + self.rtt.rto if self.segments else None
        self.pto_deadline = None  # resent as after a timeout: the RTO path repairs it

    def take_peer_syn(self, tcp: TcpHeader) -> None:
        """Adopt what the peer's SYN or SYN-ACK says: ISN, MSS, window scale, SACK."""
        self.irs = tcp.seq
        cfg = self.conn.config
        peer_mss, ws, sack_permitted, compact = tcp.syn_options()
        if not compact:
            # The compact close needs both ends: our offer and the server's agreement (a
            # client), or the client's offer (a server, which agrees in its SYN-ACK).
            self.conn.compact_close = False
        # A floor on the peer's MSS: a hostile peer must not force tiny segments on us.
        self.mss = mss = min(cfg.mss, max(peer_mss or _PEER_DEFAULT_MSS, _MIN_PEER_MSS))
        cc = self.cc
        if cc.mss != mss:
            # Made for our own MSS with the subflow, and nothing is sent before the
            # handshake completes: for the same MSS set_mss would recompute the same
            # initial window (about 0.8 us per connection).
            cc.set_mss(mss)
        self.peer_offered_wscale = ws is not None
        if ws is None:
            self.snd_wscale = self.rcv_wscale = 0  # scaling needs both sides (RFC 7323)
        else:
            self.snd_wscale = min(ws, 14)
        self.sack_ok = cfg.sack and sack_permitted
        self.recovery.set_peer(mss, self.sack_ok)
        self.snd_wnd = tcp.window  # never scaled in a SYN

    @property
    def flight(self) -> int:
        """Bytes in the network by RFC 6675's pipe (see :meth:`Recovery.pipe`)."""
        return self.recovery.pipe(self.snd_una, self.snd_max)

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
        if flags & _RST_OR_SYN:  # (one test for the usual segment, which has neither)
            if flags & TcpFlags.SYN and not flags & TcpFlags.RST:
                # A retransmitted SYN-ACK: our third ACK was lost; answer it again.
                conn.third_ack_pending = conn.role is _CLIENT
                conn.ack_now = True
            return  # resets travel as SAL CONTROL(RST), which carries the nonce
        fin = flags & TcpFlags.FIN
        # The two numbers the test unwraps serve the ACK and data paths below as well
        # (neither reference moves before they read them): one unwrap each per segment.
        numbers = self.acceptable_numbers(tcp, len(payload) + (1 if fin else 0))
        if numbers is None:
            conn.challenge_ack_due = True  # RFC 5961: ACK it, change nothing
            return
        ack, seq = numbers
        if self.rto_count:  # (what _heard_again tests first: no call per segment)
            self._heard_again(now)
        conn.last_heard = now
        conn.keepalives_sent = 0
        if flags & TcpFlags.ACK:
            self._on_ack(tcp, ack, bool(payload) or bool(fin), now)
        if payload or fin:
            self._on_data(tcp, seq, payload, now)
        elif seq < conn.recv.rcv_nxt:  # (no data taken, so rcv_nxt as the test saw it)
            # An old sequence number: a keepalive or zero-window probe. Answer with an ACK
            # that carries our window (RFC 9293: unacceptable segments are acknowledged).
            conn.ack_now = True

    def acceptable(self, tcp: TcpHeader, length: int, track: SeqTracker | None = None) -> bool:
        """Whether a segment's numbers are plausible for this flow (RFC 9293 3.10.7.4 and
        RFC 5961): its sequence range touches what the receive buffer could ever have
        offered around ``rcv_nxt``, and its ACK lies in [snd_una - max window, snd_max].
        Anything else is not from the peer as it stands now, and changes nothing.
        ``track``: a multipath subflow's own sequence space (its ``rcv_track``)."""
        return self.acceptable_numbers(tcp, length, track) is not None

    def acceptable_numbers(
        self, tcp: TcpHeader, length: int, track: SeqTracker | None = None
    ) -> tuple[int, int] | None:
        """:meth:`acceptable`'s test, giving the segment's ACK (0 without the ACK flag)
        and sequence number unwrapped (around ``snd_una`` and ``rcv_nxt``) when it passes,
        None when it does not."""
        ack = 0
        if tcp.flags & TcpFlags.ACK:
            ack = unwrap(tcp.ack, self.iss + 1, self.snd_una)
            if ack > self.snd_max or ack < self.snd_una - self.max_snd_wnd:
                return None
        recv = self.conn.recv
        rcv_nxt = recv.rcv_nxt if track is None else track.rcv_nxt
        seq = unwrap(tcp.seq, self.irs + 1, rcv_nxt)
        cap = recv.capacity
        if seq < rcv_nxt + cap and seq + length + cap >= rcv_nxt:
            return ack, seq
        return None

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
        if not self.acceptable(tcp, len(payload) + (1 if flags & TcpFlags.FIN else 0), track):
            conn.challenge_ack_due = True  # RFC 5961 as on a single path: change nothing
            return
        if self.rto_count:  # (what _heard_again tests first: no call per segment)
            self._heard_again(now)
        conn.last_heard = now
        conn.keepalives_sent = 0
        if dss is not None:
            conn.on_data_ack(dss.data_ack, tcp.window << self.snd_wscale, now)
        fin = bool(flags & TcpFlags.FIN)
        if flags & TcpFlags.ACK:
            self._on_ack(
                tcp, unwrap(tcp.ack, self.iss + 1, self.snd_una), bool(payload) or fin, now
            )
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

    def _on_ack(self, tcp: TcpHeader, ack: int, carries_data: bool, now: float) -> None:
        """The ACK field (and SACK blocks) of a segment from the peer; ``ack`` is its ACK
        unwrapped (around ``snd_una``)."""
        if ack > self.snd_max:
            # Acknowledges what we never sent: tell the peer where we are.
            self.conn.ack_now = True
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
        rec = self.recovery
        sack_ok = self.sack_ok
        newly_sacked = 0
        if sack_ok and tcp.options:
            base = self.iss + 1
            una = self.snd_una
            blocks = [(unwrap(lw, base, una), unwrap(rw, base, una)) for lw, rw in tcp.sack_blocks]
            newly_sacked = rec.on_sack(blocks, una, self.snd_max, now)
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
            and (not sack_ok or newly_sacked > 0)
        ):
            rec.on_duplicate_ack()
        if self.snd_max > self.snd_una and not rec.in_recovery:
            # The threshold is at least one: without duplicates it is not worked out.
            dupacks = rec.dupacks
            if (dupacks and dupacks >= self._dup_thresh()) or (sack_ok and rec.first_lost()):
                # A congestion event: the window shrinks for what is in flight now.
                self.cc.on_congestion_event(now, self.snd_max - self.snd_una - rec.sacked_bytes)
                rec.enter_recovery(self.snd_max)
                self.pto_deadline = None
            elif rec.probe_end is not None and rec.probe_answered():
                # The probe got through above a hole: what it was sent after is lost. A
                # congestion event, as above.
                self.cc.on_congestion_event(now, self.snd_max - self.snd_una - rec.sacked_bytes)
                rec.enter_recovery_after_probe(self.snd_max)
                self.pto_deadline = None
        elif rec.in_recovery and sack_ok:
            rec.mark_lost()

    def _on_new_ack(self, ack: int, now: float) -> None:
        """The ACK moved our left edge to ``ack``."""
        conn = self.conn
        rec = self.recovery
        flight_before = self.snd_max - self.snd_una - rec.sacked_bytes
        newly = ack - self.snd_una
        # Whether this ACK may end a fast recovery (not one after a timeout, which has no
        # congestion response to undo).
        fast_recovery = rec.in_recovery and not rec.recovery_after_rto
        rtt_sample = rec.on_ack(ack, now)
        self.snd_una = ack
        self.waiting_since = now if self.snd_max > ack else None
        self.rto_count = 0
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
        # (probe_end tested first, as probe_acked does: no call for an ACK without a probe.)
        probe_loss = rec.probe_end is not None and rec.probe_acked(ack)
        if not rec.in_recovery:
            if fast_recovery:
                self.cc.on_recovery_exit(now)
            if probe_loss:
                # The probe sent the tail again and this ACK covers it: without DSACK the
                # original or the probe was lost (RFC 8985 7.4), and nothing else starts a
                # recovery for it. The loss response is what a fast retransmit gets; no
                # growth on this ACK.
                self.cc.on_congestion_event(now, flight_before)
            else:
                self.cc.on_ack(newly, now, rtt_sample, flight_before)
        elif rec.recovery_after_rto:
            self.cc.on_ack(newly, now, rtt_sample, flight_before)
        if self.snd_max > self.snd_una:
            self.rto_deadline = now + self.rtt.rto
            if self.tlp:
                self._arm_pto(now)
        else:
            self.rto_deadline = None
            self.pto_deadline = None

    def _dup_thresh(self) -> int:
        """Duplicate ACKs that start a fast retransmit (:meth:`Recovery.dup_thresh`; always
        three on a multipath connection)."""
        if self.sack_ok or self.conn.mp is not None:
            return DUP_THRESH
        conn = self.conn
        more = self.snd_max < conn.send.end or (
            conn.fin_offset is not None and self.snd_max <= conn.fin_offset
        )
        return self.recovery.dup_thresh(more and self.snd_max < self.snd_una + self.snd_wnd)

    def _on_data(self, tcp: TcpHeader, seq: int, payload: BytesLike, now: float) -> None:
        """A segment with data or a FIN (single path); ``seq`` is its sequence number
        unwrapped (around ``rcv_nxt``)."""
        conn = self.conn
        recv = conn.recv
        end = seq + len(payload)
        # Segments that contradict the peer's FIN (data past it, a FIN elsewhere, a FIN
        # before data already taken) are not from the peer as we know it: an ACK answers
        # them (RFC 5961's challenge ACK) and they change nothing. A reset would let anyone
        # who guesses the flowIDs end the flow.
        if conn.close.remote is not _OPEN:  # conn.peer_fin_received, without its call
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
        elif conn.peer_fin_offset is not None and end > conn.peer_fin_offset:
            # (Data past a FIN seen out of order; a FIN segment ends where the FIN is.)
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
            # (No joint-rule check here: the peer's FIN leaves its direction at
            # FIN_RECEIVED, and the connection ends only once both are DONE.)
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
        if (
            self.snd_max >= send_end
            and (fin_off is None or self.snd_max != fin_off)
            and conn.mp is None
            # Nothing in flight, nothing lost (lost segments are in the scoreboard, which
            # covers [snd_una, snd_max)): tested first, as ``lost`` (a SortedList) answers
            # its truth value through a Python-level __len__.
            and (self.snd_max == self.snd_una or not self.recovery.lost)
        ):
            return  # nothing new, no FIN due, nothing to resend: what the loop below finds
        rec = self.recovery
        lost = rec.lost
        mss = self.mss
        # Read once and then kept up to date here: each segment sent adds its length to
        # the pipe, as RFC 6675 counts it.
        pipe = rec.pipe(self.snd_una, self.snd_max)
        # New data goes out as one segment train (sal.train): consecutive segments of
        # this flush are recorded one by one (the scoreboard stays per segment) and built
        # as one unit, sharing the header, ACK, window and SACK blocks.
        train_start = -1
        snd_max_before = self.snd_max
        while True:
            if lost:
                start = rec.take_lost(pipe, self.cc.cwnd, now)
                if start is None:
                    if lost:
                        break  # no room in the window for the next lost segment
                else:
                    if train_start >= 0:
                        self._send_train(train_start, now, out)
                        train_start = -1
                    seg = self.segments[start]
                    self.retransmissions += 1
                    out.append(self._data_packet(start, seg.end, seg.fin, seg.dsn))
                    pipe += seg.end - start
                    if self.rto_deadline is None:
                        self.rto_deadline = now + self.rtt.rto
                    continue
            if conn.mp is not None:
                self._output_new_mp(now, out, pipe)
                break
            if self.snd_max < send_end:
                snd_max = self.snd_max
                end = new_data_end(
                    snd_max, self.snd_una + self.snd_wnd, send_end, pipe, self.cc.cwnd, mss
                )
                if end <= snd_max:
                    if end < snd_max and self.snd_wnd == 0 and snd_max == self.snd_una:
                        self._arm_persist(now)
                    break
                fin = fin_off is not None and end == fin_off
                rec.on_sent_run(snd_max, end, mss, fin, now)
                self.snd_max = end + 1 if fin else end
                if train_start < 0:
                    train_start = snd_max
                break
            if fin_off is not None and self.snd_max == fin_off:
                if train_start >= 0:
                    self._send_train(train_start, now, out)
                    train_start = -1
                self._send_new(fin_off, fin_off, True, now, out)
            break
        if train_start >= 0:
            self._send_train(train_start, now, out)
        if self.snd_max != snd_max_before and self.tlp:
            self._arm_pto(now)  # RFC 8985 7.2: from the newest data sent

    def _output_new_mp(self, now: float, out: list[SalPacket], pipe: int) -> None:
        """Multipath: take data from the connection (by scheduler) while cwnd allows."""
        conn = self.conn
        mp = conn.mp
        assert mp is not None
        mss = self.mss
        rec = self.recovery
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
            rec.on_sent(start, start + n, False, now, dsn)
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
            rec.on_sent(start, start + 1, True, now, fin_off)
            self.snd_max = start + 1
            if self.waiting_since is None:
                self.waiting_since = now
            out.append(self._data_packet(start, start + 1, True, fin_off))
            if self.rto_deadline is None:
                self.rto_deadline = now + self.rtt.rto

    def _send_new(self, start: int, end: int, fin: bool, now: float, out: list[SalPacket]) -> None:
        seg_end = end + (1 if fin else 0)
        if fin:
            self.conn.sal_fin_with_fin(self, now)  # a compact close: the SAL FIN goes along
        self.recovery.on_sent(start, seg_end, fin, now)
        self.snd_max = seg_end
        if self.waiting_since is None:
            self.waiting_since = now
        out.append(self._data_packet(start, seg_end, fin))
        self.conn.ack_sent()
        if self.rto_deadline is None:
            self.rto_deadline = now + self.rtt.rto

    def _send_train(self, start: int, now: float, out: list[SalPacket]) -> None:
        """The new segments [start, snd_max) just recorded as sent, as one train."""
        if self.waiting_since is None:
            self.waiting_since = now
        conn = self.conn
        fin_off = conn.fin_offset
        if fin_off is not None and self.snd_max == fin_off + 1:
            if conn.compact_close:
                # A compact close: the segment with the FIN takes the SAL FIN along, which
                # a train's segments cannot carry, so it leaves as a packet of its own
                # (the train is cut at the segment size from its start).
                conn.sal_fin_with_fin(self, now)
                last = start + (fin_off - 1 - start) // self.mss * self.mss
                if last > start:
                    out.append(self._data_train(start, last, False))
                out.append(self._data_packet(last, self.snd_max, True))
            else:
                out.append(self._data_train(start, self.snd_max, True))
        else:
            out.append(self._data_train(start, self.snd_max, False))
        conn.ack_sent()
        if self.rto_deadline is None:
            self.rto_deadline = now + self.rtt.rto

    def _arm_persist(self, now: float) -> None:
        if self.persist_deadline is None:
            self.persist_deadline = now + min(self.rtt.rto * (1 << self.persist_backoff), 60.0)

    # -- timers -------------------------------------------------------------------------
    def on_timer(self, now: float, out: list[SalPacket]) -> None:
        """Retransmission, tail loss probe and persist timers of this subflow."""
        if self.rto_deadline is not None and now >= self.rto_deadline:
            self._on_rto(now)
        if self.pto_deadline is not None and now >= self.pto_deadline:
            self.pto_deadline = None
            self._send_probe(now, out)
        if self.persist_deadline is not None and now >= self.persist_deadline:
            # Zero-window probe: an already-acknowledged sequence number, so the peer answers
            # with an ACK that carries its current window without us sending new data.
            self.persist_backoff = min(self.persist_backoff + 1, 6)
            self.persist_deadline = None
            out.append(self.probe_packet(self.snd_una))
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
        rec = self.recovery
        self.cc.on_retransmission_timeout(now, self.snd_max - self.snd_una - rec.sacked_bytes)
        rec.on_timeout(self.snd_max)  # everything resent from the window start
        self.rto_deadline = now + self.rtt.rto
        self.pto_deadline = None

    def _arm_pto(self, now: float) -> None:
        """Start (or restart) the tail loss probe timer, after new data went or an ACK
        moved the left edge with data still in flight.

        Not in a recovery (its own ACKs and the RTO drive it), not while a probe's episode
        lasts (one probe, then the RTO takes over), not on a multipath connection (a
        stalled path there is the scheduler's: its data is reinjected on the others after
        the subflow's RTOs), and never at or after the RTO: the timeout handles that."""
        rec = self.recovery
        rto = self.rto_deadline
        if rec.in_recovery or rec.probe_end is not None or rto is None or self.conn.mp is not None:
            self.pto_deadline = None
            return
        d = now + rec.probe_timeout(len(self.segments) == 1, self.conn.config.delayed_ack)
        self.pto_deadline = d if d < rto else None

    def _send_probe(self, now: float, out: list[SalPacket]) -> None:
        """The probe timeout expired (RFC 8985 7.3): one segment of new data if there is
        some and the peer's window takes it whole (congestion control is not asked: one
        segment, in place of the ACKs that did not come), else the highest unSACKed
        segment again. Its answer then starts the usual recovery (:meth:`_on_ack`)."""
        rec = self.recovery
        if self.snd_max == self.snd_una or rec.in_recovery or rec.probe_end is not None:
            return
        conn = self.conn
        snd_max = self.snd_max
        send_end = conn.send.end
        fin_off = conn.fin_offset
        mss = self.mss
        want = min(mss, send_end - snd_max)
        if want > 0 and self.snd_una + self.snd_wnd - snd_max >= want:
            end = snd_max + want
            self._send_new(snd_max, end, fin_off is not None and end == fin_off, now, out)
            rec.start_probe(snd_max, self.snd_max, False, now)
        else:
            start = rec.take_probe_resend(now)
            if start is None:
                return  # everything is SACKed: the ACK that moves the edge must come
            seg = self.segments[start]
            self.retransmissions += 1
            out.append(self._data_packet(start, seg.end, seg.fin, seg.dsn))
            rec.start_probe(start, snd_max, True, now)
        self.probes += 1

    def next_deadline(self) -> float | None:
        """The earliest of this subflow's timers."""
        d = self.rto_deadline
        p = self.persist_deadline
        if p is not None and (d is None or p < d):
            d = p
        p = self.pto_deadline
        if p is not None and (d is None or p < d):
            d = p
        mig = self.mig
        if mig is not None:  # (one test for both: a settled flow has no move under way)
            if mig.busy:
                d = None  # transport timers wait with the transport
            r = mig.rsynack_deadline
            if r is not None and (d is None or r < d):
                d = r
        c = self.control.deadline
        if c is not None and (d is None or c < d):
            d = c
        ch = self.challenge
        if ch is not None and (d is None or ch.deadline < d):
            d = ch.deadline
        return d

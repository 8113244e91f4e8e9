"""Building a subflow's segments: SYN, JOIN SYN and SYN-ACK with their options, data
segments, pure and duplicate ACKs, probes and SAL control packets.

:class:`SegmentBuilder` is a mixin of :class:`~pyserval.transport.subflow.Subflow`: its
methods are the subflow's own (``sf.ack_header()``, ``sf.control_packet(...)``), so
building a segment costs no extra call, and a subclass (the datagram flow's subflow)
overrides the ones it builds differently. The attributes it reads are declared below; the
subflow sets them. This is where offsets become 32-bit wire numbers (``ISS + 1 + offset``)
and the receive buffer's free space becomes the advertised window.

It decides nothing: what to send and when is the subflow's (``subflow.py``) and the
connection's; the SAL wire format itself is ``pyserval.sal``.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Final

from ..naming.service_id import ServiceID
from ..sal.extensions import ControlExt, DssExt, Extension, JoinExt, MpCapableExt, ServiceExt
from ..sal.packet import SalPacket
from ..sal.train import SegmentTrain
from ..sal.transport_headers import PROTO_TCP, TcpFlags, TcpHeader, TcpOption
from .close_state import Stage
from .common import MASK32
from .multipath import SeqTracker, join_proof
from .receive_budget import ReceiveBudget

if TYPE_CHECKING:
    from ..sal.control import ControlChannel
    from .connection import Connection

__all__ = ["SegmentBuilder"]

_SYN_ACK: Final = TcpFlags.SYN | TcpFlags.ACK
_OPEN: Final = Stage.OPEN  # bound once: an Enum member read off its class is slow


@functools.lru_cache(maxsize=64)
def _handshake_options(
    mss: int, wscale: int | None, sack: bool, compact: bool = False
) -> tuple[TcpOption, ...]:
    """The options of a SYN or SYN-ACK: MSS, window scale (None: not sent), SACK-permitted,
    the compact-close offer (or agreement).

    The same few combinations for every connection of a host, and the options are
    immutable: built once (six frozen objects cost about 5 us per SYN otherwise)."""
    opts = [TcpOption.mss(mss)]
    if wscale is not None:
        opts += [TcpOption.nop(), TcpOption.window_scale(wscale)]
    if sack:
        opts += [TcpOption.nop(), TcpOption.nop(), TcpOption.sack_permitted()]
    if compact:
        opts.append(TcpOption.compact_close())
    return tuple(opts)


class SegmentBuilder:
    """The segment builders of a subflow (see the module docstring)."""

    # Set by the subflow: what the builders read.
    conn: Connection
    local_flowid: int
    remote_flowid: int
    iss: int  # our initial sequence number
    irs: int  # the peer's
    snd_max: int  # where new data starts (send offset)
    mss: int
    rcv_wscale: int
    peer_offered_wscale: bool
    sack_ok: bool
    rcv_track: SeqTracker | None  # multipath: this subflow's receive sequence
    control: ControlChannel  # the flow's SAL control channel
    last_adv_window: int  # ... and written: the window last advertised
    adv_edge: int  # ... its right edge (a receive offset), kept by a receive budget
    adv_rcv_nxt: int  # ... and the receive offset it was advertised at
    ack_pending: bool  # ... cleared by every segment that carries our ACK
    mp_unacked: int

    # -- sequence numbers and window ----------------------------------------------------
    def wire_seq(self, offset: int) -> int:
        """32-bit sequence number of send offset ``offset``."""
        return (self.iss + 1 + offset) & MASK32

    def wire_ack(self) -> int:
        """The 32-bit acknowledgement number we send."""
        track = self.rcv_track
        if track is not None:
            return (self.irs + 1 + track.rcv_nxt) & MASK32
        conn = self.conn
        # The peer's FIN counts once it arrived (conn.peer_fin_received, read as the close
        # state's remote stage: a property costs a call, and this runs per segment sent).
        fin = 0 if conn.close.remote is _OPEN else 1
        return (self.irs + 1 + conn.recv.rcv_nxt + fin) & MASK32

    def advertised_window(self, hold: bool = False) -> int:
        """The 16-bit window field: receive buffer space scaled down.

        ``hold``: a duplicate ACK repeats the window last advertised when the real one only
        grew since (the application read): a sender counts an ACK that changes the window
        as a window update, not as a duplicate (RFC 5681 section 2), and would miss the
        loss. The growth goes out with the next ACK that is no duplicate.
        """
        conn = self.conn
        budget = conn.budget
        # Without a budget the window is the buffer's free space (window_now's first line).
        win = conn.recv.window if budget is None else self.window_now()
        if hold and self.mss <= self.last_adv_window <= win:
            win = self.last_adv_window
        self.last_adv_window = win
        if budget is not None:
            rcv_nxt = conn.recv.rcv_nxt
            self.adv_rcv_nxt = rcv_nxt
            self.adv_edge = rcv_nxt + win
        win >>= self.rcv_wscale
        return win if win < 0xFFFF else 0xFFFF

    def window_now(self) -> int:
        """The window to advertise now: the receive buffer's free space, but with a host
        receive budget (``transport.receive_budget``) at most the connection's share of
        it (but at least two segments), and never less than keeps the right edge
        advertised last where it was."""
        conn = self.conn
        recv = conn.recv
        win = recv.window
        budget = conn.budget
        if budget is None:
            return win
        rcv_nxt = recv.rcv_nxt
        if rcv_nxt != self.adv_rcv_nxt:  # took data since it last advertised: receiving
            budget.count(conn)
        cap = self._share(budget)
        if win > cap:
            kept = self.adv_edge - rcv_nxt
            if cap >= kept:
                return cap
            # Keep the edge promised, rounded up to the window scale's unit as Linux
            # does: rounded down, the scaled field would pull it back by a few bytes. (The
            # buffer's own edge never moves back, so the promise stays within it but for
            # that rounding.)
            shift = self.rcv_wscale
            return -(-kept >> shift) << shift
        return win

    def _share(self, budget: ReceiveBudget) -> int:
        share = budget.share
        floor = 2 * self.mss
        return share if share > floor else floor

    # -- handshake ----------------------------------------------------------------------
    def _syn_options(self) -> list[TcpOption]:
        conn = self.conn
        cfg = conn.config
        # The compact-close offer as the connection settled it (Connection.syn_packet);
        # never on a JOIN: the connection is multipath by then.
        compact = conn.compact_close and conn.mp is None
        return list(_handshake_options(cfg.mss, self.rcv_wscale, cfg.sack, compact))

    def syn_packet(self, control: ControlExt, service_id: ServiceID) -> SalPacket:
        """SYN: base, CONTROL(SYN), SERVICE(destination) and the TCP SYN."""
        # (seq, ack, flags, window, checksum, urgent, ports, options), positionally
        tcp = TcpHeader(self.iss, 0, TcpFlags.SYN, 0, 0, 0, 0, 0, self._syn_options())
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
        conn = self.conn
        wscale = self.rcv_wscale if self.peer_offered_wscale else None
        opts = list(_handshake_options(conn.config.mss, wscale, self.sack_ok, conn.compact_close))
        win = min(conn.recv.window, 0xFFFF)  # never scaled in a SYN
        budget = conn.budget
        if budget is not None:
            # A connection accepted is about to receive: it counts from its first window
            # (a thousand handshakes at once would otherwise promise 64 KiB each).
            budget.count(conn)
            win = min(win, self._share(budget))
            self.adv_rcv_nxt = conn.recv.rcv_nxt
            self.adv_edge = self.adv_rcv_nxt + win
        # (seq, ack, flags, window, checksum, urgent, ports, options), positionally
        tcp = TcpHeader(self.iss, self.wire_ack(), _SYN_ACK, win, 0, 0, 0, 0, opts)
        exts: list[Extension] = [control]
        mp = conn.mp
        if mp is not None and self is conn.primary:
            exts.append(MpCapableExt(mp.local_key))
        return SalPacket(self.local_flowid, self.remote_flowid, PROTO_TCP, exts, tcp)

    # -- ACKs and data ------------------------------------------------------------------
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
        conn = self.conn
        track = self.rcv_track
        if self.sack_ok:
            if track is not None:
                blocks = track.sack_blocks(3)
            elif conn.recv.out_of_order_bytes:
                blocks = conn.recv.sack_blocks(3)
            else:
                blocks = []  # nothing held out of order, so no block: no call to say so
            if blocks:
                base = self.irs + 1
                opts = [TcpOption.nop(), TcpOption.nop()]
                opts.append(
                    TcpOption.sack([((base + s) & MASK32, (base + e) & MASK32) for s, e in blocks])
                )
        # Positional (seq, ack, flags, window, checksum, urgent, ports, options) and the
        # sequence number worked out here: this runs for every segment we send.
        return TcpHeader(
            (self.iss + 1 + (self.snd_max if offset is None else offset)) & MASK32,
            self.wire_ack(),
            flags,
            self.advertised_window(hold_window),
            0,
            0,
            0,
            0,
            opts,
        )

    def _data_packet(self, start: int, end: int, fin: bool, dsn: int = -1) -> SalPacket:
        """The data segment [start, end) of our send offsets (``end`` counts a FIN);
        ``dsn``: multipath, the data sequence number of its first byte."""
        data_end = end - 1 if fin else end
        conn = self.conn
        exts: list[Extension] = []
        if fin and conn.compact_close:
            # A compact close: our SAL FIN rides on the TCP FIN while it is outstanding.
            ctl = conn.fin_control(self)
            if ctl is not None:
                exts.append(ctl)
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

    def _data_train(self, start: int, end: int, fin: bool) -> SegmentTrain:
        """The new data segments [start, end) of our send offsets as one train (``end``
        counts a FIN), cut at the segment size (single path only: no DSS)."""
        data_end = end - 1 if fin else end
        tcp = self.ack_header(TcpFlags.ACK | TcpFlags.PSH, start)
        payload = self.conn.send.read(start, data_end)
        return SegmentTrain(self.local_flowid, self.remote_flowid, tcp, payload, self.mss, fin)

    def probe_packet(self, snd_una: int) -> SalPacket:
        """A zero-window probe (or keepalive): an ACK at the already-acknowledged sequence
        number ``snd_una - 1``, so the peer answers with its current ACK and window."""
        return SalPacket(
            self.local_flowid,
            self.remote_flowid,
            PROTO_TCP,
            [],
            self.ack_header(TcpFlags.ACK, snd_una - 1),
        )

    # -- SAL control --------------------------------------------------------------------
    def control_packet(
        self,
        control: ControlExt,
        extra: list[Extension] | None = None,
        tcp: TcpHeader | None = None,
    ) -> SalPacket:
        """A SAL control packet of this flow (SAL FIN, control ACK, RST, third ACK)."""
        exts: list[Extension] = [control, *(extra or [])]
        return SalPacket(self.local_flowid, self.remote_flowid, PROTO_TCP, exts, tcp)

"""The flow manager: the subflows of one connection and the paths they take.

A :class:`FlowManager` belongs to one ``Connection`` (``conn.flows``) and owns everything
about *where* the connection's bytes go, none of *what* they are:

* the subflow set: the primary (the handshake's), JOINed ones (client :meth:`add_subflow`,
  server :meth:`accept_join`), and those given up (:meth:`subflow_failed`, with their
  unacknowledged data queued for reinjection on the others);
* multipath negotiation (the MP_CAPABLE key offered and agreed, :meth:`enable_multipath`)
  and the coupled congestion control of joined subflows (``flows.multipath.Lia``);
* scheduling: which subflow sends next (:meth:`order`) and which DSN range it takes
  (:meth:`take`, data to reinject first);
* migration (RSYN) and the address check that follows a NAT rebinding (``flows.migration``
  for the state and the wire exchange), including their timers and the control packets
  they owe;
* the :attr:`paths` view the API shows.

``Connection`` keeps the byte stream (buffers, FIN, DATA_ACK release), the handshake, the
close sequence (``transport.close_state``) and the connection's timers, and calls in here
for the rest. The per-path transport state (sequence space, recovery, RTT) stays on each
``Subflow``; the manager reads and resets it when a path changes.

What this module does not do: choose the addresses a packet is sent from and to (the host
core does, from each subflow's address pair and its pending address check), or I/O.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...sal.extensions import AddAddrExt, ControlExt, ControlFlags, Extension, JoinExt
from ...sal.inet import Address
from ...sal.packet import SalPacket
from ..events import FlowMigrated, PathAdded, PathFailed
from ..reasons import MigrationReason
from .migration import CHALLENGE, CHALLENGE_TRIES, Challenge, MigrationState
from .multipath import (
    JOIN_RETRIES,
    Lia,
    MultipathState,
    SeqTracker,
    get_scheduler,
    join_ack_proof,
    new_key,
)

if TYPE_CHECKING:
    from ..connection import Connection, Subflow

__all__ = ["FlowManager"]

_MASK32 = 0xFFFFFFFF


class FlowManager:
    """The subflows of one connection: opening, moving, scheduling, giving up."""

    __slots__ = (
        "conn",
        "subflows",
        "mp_offer",
        "mp",
        "join_syn_due",
        "rsynack_pending",
        "challenge_pending",
        "challenge_echo",
    )

    def __init__(self, conn: Connection, offer_multipath: bool) -> None:
        self.conn = conn
        self.subflows: list[Subflow] = []  # the first is the primary
        # Multipath: the key our SYN offers (a client with StreamConfig.multipath), then
        # the state once both ends agreed; the joining subflows whose JOIN SYN is due (a
        # tuple, the shared empty one until a join: most connections never make a list
        # for it). Subflows given up are the connection's ``dead_subflows``.
        self.mp_offer: int | None = new_key() if offer_multipath else None
        self.mp: MultipathState | None = None
        self.join_syn_due: tuple[Subflow, ...] = ()
        # Control packets owed by the migration exchanges (sent by output_control).
        self.rsynack_pending = False  # answer a peer's RSYN
        self.challenge_pending = False  # send our address check (again)
        self.challenge_echo: tuple[int, int] | None = None  # answer the peer's check

    # -- the view -----------------------------------------------------------------------
    @property
    def dead_subflows(self) -> list[Subflow]:
        """Subflows given up and not yet forgotten by the host (the connection's)."""
        return list(self.conn.dead_subflows)

    @property
    def paths(self) -> list[tuple[Address, Address | None]]:
        """(local, remote) address pair of each subflow, the primary first."""
        return [(sf.local_addr, sf.remote_addr) for sf in self.subflows]

    def live_subflows(self) -> list[Subflow]:
        """Subflows that carry data (joined, not given up)."""
        return [sf for sf in self.subflows if sf.join_state is None]

    # -- multipath: negotiation, JOIN, failure ------------------------------------------
    def enable_multipath(self, local_key: int, peer_key: int) -> None:
        """Both ends agreed: data from now on is mapped by DSN (see ``flows.multipath``)."""
        mp = MultipathState(local_key, peer_key, get_scheduler(self.conn.config.scheduler))
        self.mp = self.conn.mp = mp  # the connection's copy is read per packet
        sf = self.subflows[0]
        mp.snd_right = sf.snd_wnd  # the window the peer's SYN (or SYN-ACK) offered
        sf.rcv_track = SeqTracker()
        sf.cc = Lia(sf.mss, mp.group)

    def add_subflow(self, sf: Subflow, now: float) -> None:
        """Client: open another subflow (its JOIN SYN goes out from ``sf.local_addr``).
        The caller checked that the connection is multipath and established."""
        mp = self.mp
        assert mp is not None
        sf.join_state = "syn_sent"
        sf.control.max_retries = JOIN_RETRIES
        sf.rcv_track = SeqTracker()
        sf.cc = Lia(sf.mss, mp.group)
        self.subflows.append(sf)
        cc = sf.control
        cc.rto = min(max(self.subflows[0].rtt.rto, cc.timers.min_rto), cc.timers.initial_rto)
        cc.send_reliable(ControlFlags.SYN, now)
        sf.join_third_ack = False
        self.join_syn_due += (sf,)

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

    def on_join_synack(self, sf: Subflow, pkt: SalPacket, src: Address) -> bool:
        """Client: the SYN-ACK of a joining subflow; False if it is not acceptable."""
        ctl, tcp = pkt.control, pkt.tcp
        want = ControlFlags.SYN | ControlFlags.ACK
        if ctl is None or tcp is None or ctl.flags & want != want or not sf.control.acked(ctl):
            return False
        if tcp.ack != (sf.iss + 1) & _MASK32:
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
        self.conn.emit(PathAdded(self.conn.conn_id, sf.local_addr, src))
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
            self.conn.emit(PathAdded(self.conn.conn_id, sf.local_addr, sf.remote_addr))

    def subflow_failed(self, sf: Subflow) -> bool | None:
        """Give up a subflow (its path died): its unacknowledged data is queued for the
        others. Returns whether it was the primary; None when it cannot be given up (not
        multipath, not ours, or the last one)."""
        mp = self.mp
        subflows = self.subflows
        if mp is None or sf not in subflows or len(subflows) < 2:
            return None
        for start, seg in sf.segments.items():
            if seg.dsn >= 0 and not seg.fin:
                mp.reinject.append((seg.dsn, seg.dsn + (seg.end - start)))
        sf.recovery.forget()
        sf.rto_deadline = None
        sf.fin_seq = None
        if isinstance(sf.cc, Lia):
            sf.cc.leave()
        was_primary = sf is subflows[0]
        subflows.remove(sf)
        self.conn.dead_subflows += (sf,)
        mp.failed += 1
        remote = sf.remote_addr or ("", 0)
        self.conn.emit(PathFailed(self.conn.conn_id, sf.local_addr, remote))
        return was_primary

    def on_add_addr(self, address: Address) -> None:
        """The peer told us another of its addresses (kept, at most eight)."""
        mp = self.mp
        if mp is not None and address not in mp.peer_addresses and len(mp.peer_addresses) < 8:
            mp.peer_addresses.append(address)

    # -- scheduling ---------------------------------------------------------------------
    def order(self, live: list[Subflow]) -> list[Subflow]:
        """The order in which live subflows fill their congestion windows."""
        mp = self.mp
        assert mp is not None
        return mp.scheduler.order(live)

    def take(self, sf: Subflow, max_len: int, dsn_limit: int) -> tuple[int, int] | None:
        """The next DSN range (start, length) for ``sf``: data to reinject first (from a
        subflow given up), else what the scheduler gives; None when there is none."""
        mp = self.mp
        assert mp is not None
        reinject = mp.reinject
        while reinject:
            start, end = reinject[0]
            start = max(start, mp.data_ack)  # what was delivered meanwhile is skipped
            if start >= end:
                reinject.popleft()
                continue
            n = min(max_len, end - start, dsn_limit - start)
            if n <= 0:
                return None
            if start + n < end:
                reinject[0] = (start + n, end)
            else:
                reinject.popleft()
            return start, n
        return mp.scheduler.take(mp, sf, self.conn.send.end, max_len, dsn_limit)

    def on_data_ack(self, ack: int, window: int, send_end: int) -> bool:
        """The peer's cumulative data ACK and the window it offers from there: move the
        right edge; True when ``ack`` is new (the caller frees the bytes it covers)."""
        mp = self.mp
        assert mp is not None
        if window >= 0 and ack + window > mp.snd_right and ack >= mp.data_ack:
            mp.snd_right = ack + window
        if ack <= mp.data_ack or ack > send_end:
            return False
        mp.data_ack = ack
        return True

    def output_joins(self, out: list[SalPacket]) -> list[Subflow]:
        """JOIN SYNs due and proven third ACKs of joined subflows; returns the live ones."""
        mp = self.mp
        assert mp is not None
        for sf in self.join_syn_due:
            out.append(sf.join_syn_packet(sf.control.resend()))
        self.join_syn_due = ()
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
        return live

    def output_advertise(self, out: list[SalPacket]) -> None:
        """Our other addresses (up to four), in three packets: nothing acknowledges an
        ADD_ADDR, so one lost copy must not leave the peer without them."""
        mp = self.mp
        assert mp is not None
        if mp.advertise and mp.advertise_rounds > 0:
            extra: list[Extension] = [AddAddrExt(a) for a in mp.advertise[:4]]
            mp.advertise_rounds -= 1
            primary = self.subflows[0]
            out.append(primary.control_packet(primary.control.ext(ControlFlags.ACK), extra))

    # -- migration (RSYN) ---------------------------------------------------------------
    def start_migration(self, sf: Subflow, now: float, local: Address) -> bool:
        """Move ``sf`` to the local address ``local`` (RSYN from there). False when the
        control channel is busy with another exchange (a closing flow): nothing started.
        The caller sends the RSYN (``Connection.pending_control``)."""
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
        return True

    def on_rsyn_control(self, sf: Subflow, ext: ControlExt, src: Address, now: float) -> None:
        """A CONTROL with RSYN: a peer's move, the answer to ours, or an address check."""
        flags = ext.flags
        if flags & CHALLENGE:
            self._on_challenge(sf, ext, src, now)
        elif flags & ControlFlags.ACK:
            self.on_rsynack(sf, ext, src, now)
        else:
            self._on_rsyn(sf, ext, src, now)

    def _on_rsyn(self, sf: Subflow, ext: ControlExt, src: Address, now: float) -> None:
        """The peer moves to ``src``."""
        cc = sf.control
        expected = cc.rcv_ackno
        mig = sf.mig
        if ext.verno == (expected - 1) & _MASK32:
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

    def on_rsynack(self, sf: Subflow, ext: ControlExt, src: Address, now: float) -> None:
        """The peer answered our RSYN (an RSYN+ACK, or a plain ACK of it): switch and ACK."""
        mig = sf.mig
        cc = sf.control
        if mig is None or not mig.own_rsyn:
            if src == sf.remote_addr:
                self.conn.control_ack_pending = True  # our ACK was lost: send it again
            return
        if cc.outstanding != ControlFlags.RSYN or not cc.acked(ext):
            cc.ignored += 1
            return
        cc.complete()
        mig.own_rsyn = False
        self.conn.control_ack_pending = True
        self._maybe_commit(sf, now)

    def on_move_ack(self, sf: Subflow, src: Address, now: float) -> None:
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
        conn = self.conn
        conn.ack_now = True
        remote = sf.remote_addr
        assert remote is not None
        conn.emit(FlowMigrated(conn.conn_id, sf.local_addr, remote, mig.reason))
        conn.on_path_settled(now)

    def migration_timers(self, sf: Subflow, now: float) -> bool:
        """The RSYN+ACK and address-check retransmissions of ``sf``; False when the move
        was never confirmed (the caller times the connection out)."""
        mig = sf.mig
        if mig is not None:
            d = mig.rsynack_deadline
            if d is not None and now >= d:
                mig.rsynack_tries += 1
                if mig.rsynack_tries > sf.control.timers.max_retries:
                    return False
                mig.rsynack_rto = min(mig.rsynack_rto * 2, sf.control.timers.max_rto)
                mig.rsynack_deadline = now + mig.rsynack_rto
                self.rsynack_pending = True
        ch = sf.challenge
        if ch is not None and now >= ch.deadline:
            if ch.tries >= CHALLENGE_TRIES:
                sf.challenge = None  # the candidate never answered: keep the path
                return True
            ch.tries += 1
            ch.rto = min(ch.rto * 2, sf.control.timers.max_rto)
            ch.deadline = now + ch.rto
            self.challenge_pending = True
        return True

    # -- address checks (NAT rebinding) ---------------------------------------------------
    def check_address(self, sf: Subflow, candidate: Address, token: int, now: float) -> None:
        """The peer was seen at ``candidate``: check it with a challenge (see
        ``flows.migration``). A check of another candidate replaces this one."""
        rto = max(sf.rtt.rto, sf.control.timers.min_rto)
        sf.challenge = Challenge(candidate, token & ((1 << 64) - 1), now + rto, rto)
        self.challenge_pending = True

    def challenge_packet(self, sf: Subflow) -> SalPacket:
        """Our challenge to the candidate: the token, and no nonce."""
        ch = sf.challenge
        assert ch is not None
        flags = ControlFlags.RSYN | CHALLENGE
        ext = ControlExt(flags, ch.token >> 32, ch.token & _MASK32, bytes(8))
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
        conn = self.conn
        conn.ack_now = True
        conn.emit(FlowMigrated(conn.conn_id, sf.local_addr, src, MigrationReason.REBINDING))

    def output_control(self, sf: Subflow, out: list[SalPacket]) -> None:
        """The control packets the migration exchanges owe, on ``sf``."""
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

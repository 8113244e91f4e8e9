"""Packets of flows we have: demultiplexing by flowID, and what keeps off-path hosts out.

The flow table names the subflow; the packet then goes by the flow's state (SYN_SENT: the
SYN-ACK; SYN_RECEIVED: the third ACK; otherwise the established receive path). Nothing from
off the path changes a flow: the source flowID must be the peer's (another is answered as a
packet for no flow is, so probing reveals nothing), packets from an unverified address wait
for an address check that only a packet proving the flow may start (rate-limited per
connection and per host), and a RST must prove itself (the peer's nonce, our own nonce and
control number, or RFC 5961's exact sequence number). A packet for an unknown flow gets a
rate-limited stateless RST (unless it is a RST, or a SYN cookie's third ACK).
Functions of a ``HostCore`` (passed in): no I/O, no clock.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Final

from ..sal.control import MASK32
from ..sal.extensions import (
    AddAddrExt,
    ControlExt,
    ControlFlags,
    DssExt,
    JoinExt,
    RelayExt,
)
from ..sal.packet import SalPacket
from ..sal.transport_headers import (
    PROTO_TCP,
    TcpFlags,
)
from ..transport.connection import Connection, Role, State, Subflow, unwrap
from ..transport.datagram_flow import DatagramConnection
from ..transport.events import (
    DatagramRefused,
)
from ..transport.migration import CHALLENGE, HELD_BYTES, HELD_PACKETS
from . import handshake
from .ratelimit import TokenBucket
from .records import (
    CHECK_BURST,
    CHECK_RATE,
    CONTROL_EXT_BYTES,
    ZERO_NONCE,
    Address,
)
from .time_wait import TimeWait

if TYPE_CHECKING:
    from .host import HostCore

# Bound once: an Enum member read off its class is slow in Python 3.11 (see
# transport.connection), and these are tested per packet.
_SYN_SENT: Final = State.SYN_SENT
_SYN_RECEIVED: Final = State.SYN_RECEIVED
_ESTABLISHED: Final = State.ESTABLISHED
_TIME_WAIT: Final = State.TIME_WAIT
_CLOSED: Final = State.CLOSED
_CLIENT: Final = Role.CLIENT


# Header prediction: the SAL base header and the TCP header without options, unpacked
# at once; the offset-and-flags word of a plain data segment (data offset 5: no options;
# ACK, or ACK and PSH: no SYN, FIN, RST or URG).
_PREDICT: Final = struct.Struct("!IIBBHHHIIHHHH")
_PREDICT_LEN: Final = 32
_PLAIN_DATA: Final = (0x5010, 0x5018)
_SAL_MOD: Final = 0xFFFF
_SEQ: Final = struct.Struct("!I")
_SYNACK: Final = ControlFlags.SYN | ControlFlags.ACK


def predicted(
    host: HostCore, data: bytes, src: Address, dst: Address, now: float
) -> Connection | None:
    """Header prediction (RFC 9293 3.10.7.4's common case, as BSD and Linux do it): take
    the next in-order data segment of an established single-path flow without decoding
    it into objects. Returns its connection when taken (the caller reports DataReceived
    and wakes it), None when the packet needs the general path (``on_flow_packet``).

    Taken only when the general path would do exactly this and nothing else: the SAL base
    header alone (no extensions) with the right flowIDs and a checksum that verifies; a
    TCP header without options, flags ACK (and PSH), from the verified peer address to the
    flow's own; the sequence number is ``rcv_nxt`` with nothing held out of order and the
    data fits the window; the ACK and window repeat what we know (we have nothing in
    flight, no recovery, no timer backoff, no persist probe); no FIN seen; no address
    check, migration or JOIN under way. The state it changes is what ``Subflow.on_tcp``
    changes for such a segment: the bytes join the receive buffer, the peer was heard,
    and the delayed-ACK rule (an ACK every ``ack_every`` segments, else the timer).
    """
    if len(data) <= _PREDICT_LEN or data[8] != 3:
        return None  # no data, or extensions (shl is byte 8): not a plain data segment
    (src_fid, dst_fid, _, protocol, _, _, _, seq, ack, off_flags, window, _, _) = (
        _PREDICT.unpack_from(data)
    )
    if protocol != PROTO_TCP or off_flags not in _PLAIN_DATA:  # (shl: byte 8, above)
        return None
    sf = host.flows.get(dst_fid)
    if type(sf) is not Subflow or src_fid != sf.remote_flowid:
        return None
    conn = sf.conn
    if (
        conn.state is not _ESTABLISHED
        or conn.mp is not None
        or src != sf.remote_addr
        or dst != sf.local_addr
        or sf.snd_max != sf.snd_una
        or sf.rto_count
        or sf.persist_deadline is not None
        or sf.challenge is not None
        or sf.mig is not None
        or sf.join_state is not None
        or conn.peer_fin_offset is not None
        or ack != (sf.iss + 1 + sf.snd_una) & MASK32
        or window << sf.snd_wscale != sf.snd_wnd
        or sf.snd_wnd > sf.max_snd_wnd
        or sf.recovery.in_recovery
    ):
        return None
    recv = conn.recv
    rcv_nxt = recv.rcv_nxt
    size = len(data) - _PREDICT_LEN
    if seq != (sf.irs + 1 + rcv_nxt) & MASK32 or recv.out_of_order_bytes or size > recv.window:
        return None
    n = int.from_bytes(memoryview(data)[:12], "big")
    if n % _SAL_MOD or not n:
        return None  # the general path counts it as malformed
    recv.append_in_order(memoryview(data)[_PREDICT_LEN:])
    conn.last_heard = now
    conn.keepalives_sent = 0
    conn.unacked_segments += 1
    if conn.unacked_segments >= conn.config.ack_every:
        conn.ack_now = True
    elif conn.delack_deadline is None:
        conn.delack_deadline = now + conn.config.delayed_ack
    return conn


def predicted_run(
    conn: Connection,
    batch: list[tuple[bytes, Address]],
    start: int,
) -> int:
    """After :func:`predicted` took ``batch[start - 1]`` for ``conn``, take the following
    datagrams that continue it (a GRO read's train): returns the index of the first one
    not taken, which then goes the usual way.

    A datagram continues the run when it comes from the same source and its header
    repeats the taken one's byte for byte but for the sequence number, which must be the
    next in order, and the TCP checksum (not checked over UDP, ``sal-wire.md``), and its
    data fits the window. Such a datagram passes every test :func:`predicted` makes:
    the SAL header and its checksum are the same bytes, so are the flowIDs, the flags,
    the ACK and the window; and taking in-order data changes none of the state those
    tests read but the receive buffer, whose sequence and window are checked here. The
    delayed-ACK rule is applied once for the run, with the result of applying it per
    segment: an ACK is due once ``ack_every`` segments are unacknowledged. (Its other
    half, starting the timer while fewer are, never applies here: the first segment,
    taken by :func:`predicted`, either started it or already made the ACK due.)
    """
    first, src = batch[start - 1]
    n = len(batch)
    if start >= n:
        return start
    head = first[:16]  # the SAL header and the TCP ports
    middle = first[20:28]  # ACK, data offset and flags, window
    seq = _SEQ.unpack_from(first, 16)[0]
    size = len(first) - _PREDICT_LEN
    recv = conn.recv
    room = recv.window
    run: list[bytes] = []
    unpack_seq = _SEQ.unpack_from
    i = start
    while i < n:
        data, source = batch[i]
        if (source is not src and source != src) or data[:16] != head or data[20:28] != middle:
            break
        seq = (seq + size) & MASK32
        size = len(data) - _PREDICT_LEN
        if unpack_seq(data, 16)[0] != seq or size <= 0 or size > room:
            break
        room -= size
        run.append(data)
        i += 1
    taken = i - start
    if taken:
        recv.append_payloads(run, _PREDICT_LEN)
        before = conn.unacked_segments
        conn.unacked_segments = before + taken
        if before + taken >= conn.config.ack_every:
            conn.ack_now = True
    return i


def on_time_wait(
    host: HostCore,
    record: TimeWait,
    pkt: SalPacket,
    src: Address,
    dst: Address,
    now: float,
    size: int,
) -> None:
    """A packet for a flow in TIME_WAIT (see core.time_wait)."""
    ctl = pkt.control
    if pkt.src_flowid != record.peer_flowid and not (
        pkt.src_flowid == 0 and ctl is not None and ctl.flags & ControlFlags.RST
    ):
        wrong_peer_flow(host, pkt, ctl, size, dst, src, now)
        return
    answer, dropped = record.answer(pkt, src)
    if dropped is not None:
        host.drops[dropped] += 1
    if answer is not None:
        host.stats["time_wait_answered"] += 1
        host._out.append((answer, record.local, record.peer))


def on_flow_packet(
    host: HostCore, pkt: SalPacket, src: Address, dst: Address, now: float, size: int
) -> None:
    target = host.flows.get(pkt.dst_flowid)
    if target is None:
        ctl = pkt.control
        if ctl is not None and ctl.flags & ControlFlags.RST:
            host.drops["rst_unknown_flow"] += 1
        elif not handshake.on_cookie_ack(host, pkt, src, dst, now):
            host.drops["unknown_flow"] += 1
            send_stateless_rst(host, pkt, ctl, size, dst, src, now)
        return
    if not isinstance(target, Subflow):
        if isinstance(target, TimeWait):
            on_time_wait(host, target, pkt, src, dst, now, size)
            return
        ctl = pkt.control
        if ctl is not None and ctl.flags & ControlFlags.RST:
            host._emit(DatagramRefused(target.flowid, "datagram refused: no such service", src))
        return
    sf = target
    conn = sf.conn
    state = conn.state
    ctl = pkt.control
    # Data segments carry no CONTROL: the cheap test first, the set lookup only for the
    # few SYN-ACKs (this runs for every packet of every flow).
    if (
        ctl is not None
        and ctl.flags & _SYNACK == _SYNACK
        and state is not _SYN_RECEIVED
        and src in host.trusted_forwarders
    ):
        relay = pkt.find(RelayExt)
        if relay is not None and relay.is_relayed:
            # A SYN-ACK our router relayed: the instance is at relay.address (the
            # handshake's numbers prove the SYN-ACK answers our SYN); the third ACK
            # goes there directly and opens our NAT towards it. Only from our router:
            # nobody else may make us answer a third address.
            src = relay.address
            host.stats["relayed_synack"] += 1
    # The established receive path first: it takes nearly every packet.
    if state is _ESTABLISHED or state is _TIME_WAIT:
        on_established(host, conn, sf, pkt, ctl, now, src, dst)
        if (
            dst != sf.local_addr  # (read in place: nearly always equal, the test ends here)
            and src == sf.remote_addr
            and (":" in dst[0]) != (":" in sf.local_addr[0])
        ):
            # The peer moved to another family (an RSYN it proved, reaching us on our
            # interface of that family): answer from there, the only place that can.
            sf.local_addr = dst
    elif state is _SYN_SENT:
        if not conn.on_synack(sf, pkt, src, now):
            maybe_reset(host, conn, sf, pkt, src)
    elif state is _SYN_RECEIVED:
        listener = host._listener_by_id.get(conn.listener_id or 0)
        if pkt.src_flowid != sf.remote_flowid and not (
            pkt.src_flowid == 0 and ctl is not None and ctl.flags & ControlFlags.RST
        ):
            wrong_peer_flow(host, pkt, ctl, size, dst, src, now)
        elif (
            listener is not None
            and len(listener.accept_queue) >= listener.backlog
            and not (ctl is not None and ctl.flags & ControlFlags.RST)
        ):
            # Accept queue full: leave the flow half-open and drop the packet, as Linux
            # does by default; the client's retransmission or our SYN-ACK's completes
            # the handshake once the application has accepted.
            host.drops["accept_queue_full"] += 1
            sf.handshake_sent_at = None  # its eventual answer will not time the path
        elif conn.on_handshake_ack(sf, pkt, now):
            handshake.established_server(host, conn)
            host._synack_relays.pop(conn.conn_id, None)
            if src != sf.remote_addr and conn.state is _ESTABLISHED:
                # The third ACK of a client behind a NAT that maps each destination to
                # its own port (symmetric): the address challenge adopts the new port.
                from_elsewhere(host, conn, sf, pkt, src, now)
            tcp = pkt.tcp
            if tcp is not None and conn.state is _ESTABLISHED:
                dss = pkt.find(DssExt) if conn.mp is not None else None
                sf.on_tcp(tcp, pkt.payload, now, dss)
                if ctl is not None and ctl.flags & ControlFlags.FIN and conn.state is _ESTABLISHED:
                    # A compact close's FIN + SAL FIN stood in for the third ACK: the
                    # SAL FIN after the segment, as on_established takes it.
                    conn.on_control(sf, ctl, now, src)
        else:
            maybe_reset(host, conn, sf, pkt, src)
    else:  # CLOSED
        host.drops["closed_flow"] += 1  # closed, not yet forgotten: nothing to deliver
    host._wake(conn)


def on_established(
    host: HostCore,
    conn: Connection,
    sf: Subflow,
    pkt: SalPacket,
    ctl: ControlExt | None,
    now: float,
    src: Address,
    dst: Address | None = None,
) -> None:
    """A packet for an established (or closing) flow; ``ctl`` is its CONTROL extension
    (``pkt.control``, which the caller has already looked up: a property costs a call)."""
    if sf.join_state == "syn_sent":
        if not conn.on_join_synack(sf, pkt, src, now):
            host.drops["join_bad_synack"] += 1
        return
    if (
        ctl is not None
        and ctl.flags & ControlFlags.SYN
        and (pkt.src_flowid != sf.remote_flowid or src != sf.remote_addr)
    ):
        # Another instance answered a broadcast or retransmitted SYN too late: the
        # first answer won. Reset the loser so it does not hold a half-open flow; the
        # RST echoes the loser's own nonce (ours must never go to a stranger).
        host.stats["losing_synack"] += 1
        if not host.rst_limit.take(now):
            # Anyone who knows one of our flowIDs (its own connection's) can send these
            # from forged addresses: the answer is rate-limited like any stateless RST.
            host.stats["rst_rate_limited"] += 1
            return
        host.stats["rst_sent"] += 1
        rst = ControlExt(ControlFlags.RST, ctl.verno, 0, ctl.nonce)  # echoes its SYN-ACK
        loser = SalPacket(sf.local_flowid, pkt.src_flowid, pkt.protocol, [rst])
        host._send(loser, sf.local_addr, src)
        return
    if pkt.src_flowid != sf.remote_flowid and not (
        pkt.src_flowid == 0 and ctl is not None and ctl.flags & ControlFlags.RST
    ):
        # Only the peer's flow speaks on this flow (a stateless RST has no flowID).
        size = len(pkt.payload) + 32  # as _on_flow_packet counts it
        wrong_peer_flow(host, pkt, ctl, size, dst or sf.local_addr, src, now)
        return
    if src != sf.remote_addr and not from_elsewhere(host, conn, sf, pkt, src, now):
        return
    if sf.join_state == "syn_received" and ctl is not None and not ctl.flags & ControlFlags.RST:
        if (
            ctl.flags & ControlFlags.ACK
            and sf.control.nonce_ok(ctl)
            and sf.control.acked(ctl)
            and conn.join_proven(sf, pkt.find(JoinExt))
        ):
            conn.join_established(sf)
        else:
            host.drops["join_unproven"] += 1
        return
    late: ControlExt | None = None  # a CONTROL taken after the segment it rides on
    if ctl is not None:
        if ctl.flags & ControlFlags.RST:
            maybe_reset(host, conn, sf, pkt, src)
            return
        if ctl.flags & CHALLENGE and not ctl.flags & ControlFlags.ACK:
            # The peer checks where we are (it carries a token, not a nonce).
            conn.on_control(sf, ctl, now, src)
            return
        if not sf.control.nonce_ok(ctl):
            host.drops["bad_nonce"] += 1
            return
        if ctl.flags & CHALLENGE and src != sf.remote_addr:
            # The answer to our address check: once it proves the candidate, the
            # packets held from there are taken, in the order they came.
            ch = sf.challenge
            held = ch.held if ch is not None and ch.candidate == src else []
            conn.on_control(sf, ctl, now, src)
            if held and sf.remote_addr == src:
                host.stats["held_replayed"] += len(held)
                for old in held:
                    if conn.state is _CLOSED or sf.remote_addr != src:
                        break  # a held packet ended the flow or moved it: stop there
                    on_established(host, conn, sf, old, old.control, now, src)
            return
        if conn.mp is not None:
            for ext in pkt.extensions:
                if type(ext) is AddAddrExt:
                    conn.on_add_addr(ext.address)
        if ctl.flags & ControlFlags.SYN:
            if sf is not conn.primary:
                sf.join_third_ack = True  # a JOIN's third ACK was lost
            else:
                conn.third_ack_pending = conn.role is _CLIENT  # our third ACK was lost
            return
        if ctl.flags & ControlFlags.FIN and pkt.tcp is not None:
            # A SAL FIN on a TCP segment (a compact close): the segment first, so that
            # the TCP FIN it carries is in before the SAL FIN that must follow it.
            late = ctl
        else:
            conn.on_control(sf, ctl, now, src)
            if conn.state is _CLOSED:
                return
    tcp = pkt.tcp
    if isinstance(conn, DatagramConnection):
        conn.on_datagram(pkt, now)
    elif tcp is not None:
        if conn.state is _TIME_WAIT:
            # A retransmitted FIN or data: acknowledge again. Never answer a pure ACK:
            # two ends in TIME_WAIT (simultaneous close) would ACK each other forever.
            if pkt.payload or tcp.flags & TcpFlags.FIN:
                conn.ack_now = True
        else:
            if sf.join_state == "syn_received":
                return  # nothing is taken on a JOIN before its proven third ACK
            dss = pkt.find(DssExt) if conn.mp is not None else None
            sf.on_tcp(tcp, pkt.payload, now, dss)
    if late is not None and conn.state is not _CLOSED:
        conn.on_control(sf, late, now, src)


def from_elsewhere(
    host: HostCore, conn: Connection, sf: Subflow, pkt: SalPacket, src: Address, now: float
) -> bool:
    """A packet of an established flow from an address that is not the peer's.

    An RSYN (the peer moving) and packets from the peer's previous address (late ones)
    are taken as usual. Anything else may be the peer behind a NAT that rebound: the
    packet is taken (TCP checks its numbers), but nothing is sent there until an RSYN
    challenge comes back with the peer's nonce. Returns whether to process the packet.
    """
    ctl = pkt.control
    size = len(pkt.payload) + 32
    ch = sf.challenge
    if ch is not None and ch.candidate == src:
        ch.rx += size  # also the answer to our challenge: it counts for the budget
    if ctl is not None and ctl.flags & ControlFlags.RSYN:
        return True  # RSYN, RSYN+ACK or a challenge answer: nonce and exchange decide
    if src == sf.prev_remote and now < sf.prev_remote_until:
        return True  # late packets from where the (verified) peer just was
    if conn.state is not _ESTABLISHED:
        host.drops["not_peer_address"] += 1
        return False
    if ctl is not None and ctl.flags & ControlFlags.RST:
        host.drops["rst_from_elsewhere"] += 1
        return False
    mig = sf.mig
    if (ch is None or ch.candidate != src) and (mig is None or not mig.busy):
        if not proves_flow(host, conn, sf, pkt):
            host.drops["unproven_from_elsewhere"] += 1
            return False
        if not may_check(host, conn, now):
            host.drops["not_peer_address"] += 1
            return False
        conn.check_address(sf, src, host.rng.getrandbits(64), now)
        ch = sf.challenge
        assert ch is not None
        ch.rx = size
        host.stats["rebinding_challenge"] += 1
    if (
        ch is not None
        and ch.candidate == src
        and len(ch.held) < HELD_PACKETS
        and ch.held_bytes + size <= HELD_BYTES
    ):
        # Nothing from an unverified address changes the flow: the packet waits for the
        # address check (one round trip) and is taken only if the check succeeds.
        pkt.payload = bytes(pkt.payload)  # it was a view into the receive buffer
        ch.held.append(pkt)
        ch.held_bytes += size
        host.stats["held_unverified"] += 1
    else:
        host.drops["not_peer_address"] += 1
    return False


def wrong_peer_flow(
    host: HostCore,
    pkt: SalPacket,
    ctl: ControlExt | None,
    size: int,
    local: Address,
    remote: Address,
    now: float,
) -> None:
    """A packet for one of our flows from another flow than its peer's: answered
    exactly as a packet for no flow at all is, so that probing cannot tell which of our
    flowIDs are in use (and then guess the peer's flowID alone, 2^32 tries instead of
    2^64). The answer goes to the sender and names the sender's flow, not ours."""
    host.drops["wrong_peer_flow"] += 1
    if ctl is None or not ctl.flags & ControlFlags.RST:
        send_stateless_rst(host, pkt, ctl, size, local, remote, now)


def proves_flow(host: HostCore, conn: Connection, sf: Subflow, pkt: SalPacket) -> bool:
    """Whether a packet from an unverified address shows it comes from the flow's peer
    as it stands now: a CONTROL extension with the peer's nonce, or a TCP segment whose
    numbers are plausible (RFC 5961's window). Only such a packet may start an address
    check: the flowIDs alone would make the check an oracle for the peer's flowID. A
    connected datagram flow has no numbers: its two flowIDs (64 bits) are all it has."""
    ctl = pkt.control
    if ctl is not None and ctl.nonce == sf.control.peer_nonce:
        return True
    tcp = pkt.tcp
    if tcp is None:
        return isinstance(conn, DatagramConnection) and ctl is None
    track = sf.rcv_track if conn.mp is not None else None
    length = len(pkt.payload) + (1 if tcp.flags & TcpFlags.FIN else 0)
    return sf.acceptable(tcp, length, track)


def may_check(host: HostCore, conn: Connection, now: float) -> bool:
    """Whether ``conn`` may start one more address check now (see CHECK_BURST)."""
    limit = host._check_limits.get(conn.conn_id)
    if limit is None:
        limit = host._check_limits[conn.conn_id] = TokenBucket(CHECK_RATE, CHECK_BURST)
    if limit.take(now) and host.check_limit.take(now):
        return True
    host.stats["check_rate_limited"] += 1
    return False


def maybe_reset(
    host: HostCore, conn: Connection, sf: Subflow, pkt: SalPacket, src: Address | None = None
) -> None:
    """Act on a CONTROL(RST) only if it proves it comes from the peer."""
    ctl = pkt.control
    if ctl is None or not ctl.flags & ControlFlags.RST:
        host.drops["unexpected_packet"] += 1
        return
    cc = sf.control
    genuine = cc.peer_nonce is not None and ctl.nonce == cc.peer_nonce
    if not genuine and ctl.nonce == cc.local_nonce:
        # A stateless reset echoing our own nonce answers one of our control packets:
        # it must also echo that packet's number (the outstanding one, or the one our
        # ACKs carry), which nobody who did not see the packet knows.
        echoed = ctl.verno
        genuine = echoed == cc.snd_verno or (
            cc.outstanding is not None and echoed == cc.outstanding_verno
        )
    if not genuine and ctl.nonce == ZERO_NONCE and src == sf.remote_addr:
        # A stateless reset answering a data segment echoes that segment's sequence
        # number in verno: it must come from the peer's address and name the exact
        # start of a segment we have in flight (RFC 5961's exact-sequence rule). One
        # inside what we have in flight but not exact gets a challenge ACK.
        echoed = unwrap(ctl.verno, sf.iss + 1, sf.snd_una)
        genuine = echoed in sf.segments
        if not genuine and sf.snd_una <= echoed < sf.snd_max:
            challenge_ack(host, conn, "rst")
    if not genuine:
        host.drops["bad_nonce"] += 1
        return
    if conn.mp is not None and len(conn.subflows) > 1:
        conn.subflow_failed(sf, 0.0)  # one path reset: the others carry on
        return
    conn.on_reset()


def send_stateless_rst(
    host: HostCore,
    pkt: SalPacket,
    ctl: ControlExt | None,
    size: int,
    local: Address,
    remote: Address,
    now: float,
) -> None:
    """Answer ``pkt`` (``size`` bytes, for no flow or service of ours) with a RST, within
    the host's rate limit and never larger than the packet plus a CONTROL extension."""
    rst = rst_for(host, pkt, ctl).encode(local[0], remote[0])
    if len(rst) > size + CONTROL_EXT_BYTES:
        host.stats["rst_too_large"] += 1
        return
    if not host.rst_limit.take(now):
        host.stats["rst_rate_limited"] += 1
        return
    host.stats["rst_sent"] += 1
    host._out.append((rst, local, remote))


def challenge_ack(host: HostCore, conn: Connection, why: str) -> None:
    """RFC 5961: answer a doubtful segment with an ACK (so a genuine peer resyncs)
    instead of acting on it; at most ``challenge_ack_rate`` a second per host."""
    conn.challenge_ack_due = True
    host.stats[f"challenge_ack_{why}"] += 1
    host._wake(conn)


def rst_for(host: HostCore, pkt: SalPacket, ctl: ControlExt | None) -> SalPacket:
    """A stateless RST answering ``pkt`` (for an unknown flow or service)."""
    tcp = pkt.tcp
    if ctl is not None:
        nonce, echo = ctl.nonce, ctl.verno
    else:
        nonce, echo = ZERO_NONCE, (tcp.seq if tcp is not None else 0) & MASK32
    rst = ControlExt(ControlFlags.RST, echo, 0, nonce)
    return SalPacket(0, pkt.src_flowid, pkt.protocol, [rst])

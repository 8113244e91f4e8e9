"""Opening flows at the host: SYNs to our listeners, SYN cookies, multipath JOINs, our SYNs.

A SYN whose service resolves to a local listener (DEMUX) makes a half-open flow and is
answered with a SYN-ACK to the original source (SOURCE path[0] when it was forwarded; a
path not from a trusted forwarder gets one SYN-ACK and no retransmission). Half-open state
is bounded per listener and lives about a minute; past the bound a SYN is answered with a
cookie (``core.syncookies``) and the flow is built from a valid third ACK alone. Protocol 6
asks for a stream, protocol 17 for a connected datagram flow; each reaches only a listener
of its kind. A SYN for a service we do not serve is dropped and counted, never answered
with RST (the client retries and may reach another instance). Functions of a ``HostCore``
(passed in): no I/O, no clock.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from ..naming.service_id import ServiceID
from ..sal.checksum import BytesLike
from ..sal.control import MASK32
from ..sal.extensions import (
    ControlExt,
    ControlFlags,
    JoinExt,
    RelayExt,
    ServiceExt,
)
from ..sal.inet import WILDCARDS
from ..sal.packet import SalPacket
from ..sal.service_table import Action
from ..sal.transport_headers import (
    PROTO_TCP,
    PROTO_UDP,
    TcpFlags,
    TcpHeader,
    TcpOption,
    UdpHeader,
)
from ..transport.connection import Connection, Role, State, Subflow
from ..transport.events import (
    ConnectionFailed,
    IncomingConnection,
)
from ..transport.multipath import MAX_HALF_OPEN_JOINS, MAX_SUBFLOWS, join_proof, new_key
from . import relaying
from .records import (
    Address,
    Listener,
    first_router,
)
from .syncookies import Cookie

if TYPE_CHECKING:
    from .host import HostCore

# Bound once: an Enum member read off its class is slow in Python 3.11 (see
# transport.connection), and these are tested per packet.
_SYN_RECEIVED: Final = State.SYN_RECEIVED
_ESTABLISHED: Final = State.ESTABLISHED
_CLOSED: Final = State.CLOSED
_SERVER: Final = Role.SERVER


def send_syn(host: HostCore, conn: Connection, now: float) -> None:
    conn.syn_due = False
    sf = conn.subflows[0]  # the primary (no property call: once per connection)
    first = conn.syn_first
    conn.syn_first = False
    pkt = conn.syn_packet(now, first)  # starts (or keeps) the control retransmission
    remote = host._resolve(conn.service_id)
    if remote is None:
        entry = host.service_table.match(conn.service_id)
        if entry is not None and entry.action is Action.DELAY:
            remote = sf.remote_addr  # the controller's verdict, once it came
            if remote is None:
                relaying.ask(host, conn.service_id)
    if remote is None:
        host.stats["syn_no_route"] += 1
        if first and host.service_table.match(conn.service_id) is None:
            conn.state = _CLOSED
            conn.error = f"no route to service {conn.service_id.hex}"
            conn.emit(ConnectionFailed(conn.conn_id, conn.error))
        return  # a DELAY/DROP rule now may change: retransmissions try again
    sf.remote_addr = remote
    sf.local_addr = host.local_for(remote, sf.local_addr)
    if relaying.wants_relay(host, remote):
        pkt.extensions.append(RelayExt())  # the router may relay the SYN-ACK back
    host._send(pkt, sf.local_addr, remote)


def on_syn(
    host: HostCore,
    pkt: SalPacket,
    ctl: ControlExt,
    data: BytesLike,
    src: Address,
    dst: Address,
    now: float,
) -> None:
    svc, tcp = pkt.service, pkt.tcp
    datagram = pkt.protocol == PROTO_UDP  # a connected datagram flow (spec)
    if svc is None or (pkt.udp is None if datagram else tcp is None):
        host.drops["bad_syn"] += 1
        return
    res = host.service_table.lookup(svc.service_id)
    if res is None or not isinstance(res.listener, Listener):
        if res is not None and res.action is Action.FORWARD and res.target is not None:
            relaying.forward(host, pkt, data, src, dst, res.target.address, "syn")
        elif res is not None and res.action is Action.DELAY:
            relaying.hold(host, svc.service_id, data, src, dst, now)
        else:
            host.drops["syn_no_service"] += 1  # never RST a SYN
        return
    listener = res.listener
    if listener.datagram != datagram:
        host.drops["syn_wrong_protocol"] += 1  # a stream SYN to a datagram socket, or back
        return
    path = pkt.source_path()
    untrusted_path = False
    hop = src
    if path is not None:
        # A forwarded SYN: answer the client directly, not the forwarder. Anyone can
        # write a SOURCE path, so for one not from a known forwarder (our router or a
        # static route's target) the SYN-ACK is sent once and never retransmitted:
        # this host cannot be made to reflect more than it receives.
        untrusted_path = src not in host.trusted_forwarders
        src = path[0]
    key = (src, pkt.src_flowid)
    existing = host._peer_flows.get(key)
    if existing is not None:
        # A retransmitted or duplicated SYN: answer a half-open one again (our SYN-ACK
        # was lost); never make a second flow for the same peer flow.
        sf = existing.primary
        if existing.state is _SYN_RECEIVED:
            sf.handshake_sent_at = None  # two SYN-ACKs out: no RTT sample (Karn)
            synack = sf.synack_packet(sf.control.resend())
            host._send(synack, sf.local_addr, src)
            relay = host._synack_relays.get(existing.conn_id)
            if relay is not None:
                relaying.send_relayed(host, synack, sf.local_addr, *relay)
        host.stats["duplicate_syn"] += 1
        return
    if len(listener.accept_queue) >= listener.backlog:
        host.drops["accept_queue_full"] += 1
        return
    if len(listener.half_open) >= host.config.max_half_open:
        # A SYN flood, or a burst larger than the table: answer without keeping state
        # (and through the client's router as well when it may be behind a NAT).
        marker = pkt.find(RelayExt) if path is not None and not untrusted_path else None
        relay = None
        if path is not None and marker is not None and marker.is_request and host.nat_relay:
            relay = (first_router(path, hop), RelayExt(marker.address, marker.tag))
        here = host.local_for(src, dst)
        if tcp is None:
            send_datagram_cookie_synack(host, pkt, ctl, src, here, now, relay)
        else:
            send_cookie_synack(host, pkt, ctl, tcp, src, here, now, relay)
        return
    if not host.flow_room():
        host.drops["flow_table_full"] += 1  # (allocate would raise FlowTableFull)
        return
    flowid = host.flows.allocate()
    # A forwarded SYN may come from an IPv6 client over IPv4 (or the reverse).
    here = host.local_for(src, dst)
    conn, sf = host._new_flow(flowid, _SERVER, svc.service_id, here, src, datagram)
    conn.listener_id = listener.listener_id
    conn.peer_key = key
    host.flows.insert(flowid, sf)
    host.connections[flowid] = conn
    listener.half_open[key] = conn
    host._peer_flows[key] = conn
    synack = conn.accept_syn(sf, pkt, now)
    if conn.mp is not None:
        if conn.mp.local_token in host.mp_tokens:  # a token in use: pick another key
            while conn.mp.local_token in host.mp_tokens:
                conn.mp.local_key = new_key()
            synack = sf.synack_packet(sf.control.resend())
        host.mp_tokens[conn.mp.local_token] = conn
        conn.mp.advertise = [a for a in host.addresses if a != here and a[0] not in WILDCARDS]
    # Half-open state lives about a minute at most (see HALF_OPEN_LIFETIME).
    sf.control.max_retries = min(sf.control.max_retries, host._synack_retries)
    if untrusted_path:
        sf.control.max_retries = 0
        host.stats["syn_untrusted_path"] += 1
    host._send(synack, here, src)
    marker = pkt.find(RelayExt) if path is not None and not untrusted_path else None
    if path is not None and marker is not None and marker.is_request and host.nat_relay:
        # The client may be behind a NAT that lets in only the router it sent to: a
        # copy goes back through that router, the first on the path (whose tag it is).
        entry = (first_router(path, hop), RelayExt(marker.address, marker.tag))
        host._synack_relays[conn.conn_id] = entry
        relaying.send_relayed(host, synack, here, *entry)
    host._schedule(conn)


def send_cookie_synack(
    host: HostCore,
    pkt: SalPacket,
    ctl: ControlExt,
    tcp: TcpHeader,
    src: Address,
    dst: Address,
    now: float,
    relay: tuple[Address, RelayExt] | None = None,
) -> None:
    """Answer a SYN statelessly: the SYN-ACK's numbers encode the flow (core.syncookies);
    ``relay``: a copy goes back through the client's router too (see NATs)."""
    cfg = host.config
    sack = cfg.sack and tcp.sack_permitted
    cookie = host.syn_cookies.make(now, src, pkt.src_flowid, tcp.mss, tcp.window_scale, sack)
    if cookie.flowid in host.flows:
        host.drops["syn_cookie_collision"] += 1  # its retransmission may fall elsewhere
        return
    opts = [TcpOption.mss(cfg.mss)]
    if tcp.window_scale is not None:
        opts += [TcpOption.nop(), TcpOption.window_scale(cfg.window_scale)]
    if sack:
        opts += [TcpOption.nop(), TcpOption.nop(), TcpOption.sack_permitted()]
    synack = SalPacket(
        cookie.flowid,
        pkt.src_flowid,
        PROTO_TCP,
        [
            ControlExt(
                ControlFlags.SYN | ControlFlags.ACK,
                cookie.verno,
                (ctl.verno + 1) & MASK32,
                cookie.nonce,
            )
        ],
        TcpHeader(
            seq=cookie.iss,
            ack=(tcp.seq + 1) & MASK32,
            flags=TcpFlags.SYN | TcpFlags.ACK,
            window=min(cfg.receive_buffer, 0xFFFF),
            options=opts,
        ),
    )
    host.stats["syn_cookie_sent"] += 1
    host._send(synack, dst, src)
    if relay is not None:
        relaying.send_relayed(host, synack, dst, *relay)


def send_datagram_cookie_synack(
    host: HostCore,
    pkt: SalPacket,
    ctl: ControlExt,
    src: Address,
    dst: Address,
    now: float,
    relay: tuple[Address, RelayExt] | None = None,
) -> None:
    """Answer a connected-datagram SYN statelessly (see core.syncookies)."""
    cookie = host.syn_cookies.make_datagram(now, src, pkt.src_flowid)
    if cookie.flowid in host.flows:
        host.drops["syn_cookie_collision"] += 1
        return
    synack = datagram_cookie_synack(cookie, pkt.src_flowid, (ctl.verno + 1) & MASK32)
    host.stats["syn_cookie_sent"] += 1
    host._send(synack, dst, src)
    if relay is not None:
        relaying.send_relayed(host, synack, dst, *relay)


def datagram_cookie_synack(cookie: Cookie, peer_flowid: int, ackno: int) -> SalPacket:
    flags = ControlFlags.SYN | ControlFlags.ACK
    ext = ControlExt(flags, cookie.verno, ackno, cookie.nonce)
    return SalPacket(cookie.flowid, peer_flowid, PROTO_UDP, [ext], UdpHeader())


def on_datagram_cookie_ack(
    host: HostCore, pkt: SalPacket, src: Address, dst: Address, now: float
) -> bool:
    """_on_cookie_ack for a connected datagram flow (protocol 17)."""
    ctl, svc = pkt.control, pkt.service
    if pkt.udp is None:
        return False
    if ctl is None:
        # A datagram before the third ACK (lost): only the flowID can be checked, which
        # is enough to ask for the third ACK again, never to build the flow.
        cookie = host.syn_cookies.match_datagram_flowid(now, src, pkt.src_flowid, pkt.dst_flowid)
        if cookie is None:
            return False
        if host.rst_limit.take(now):
            host.stats["syn_cookie_reminder"] += 1
            host._send(datagram_cookie_synack(cookie, pkt.src_flowid, 0), dst, src)
        return True
    if (
        svc is None
        or ctl.flags & (ControlFlags.SYN | ControlFlags.RST | ControlFlags.RSYN)
        or not ctl.flags & ControlFlags.ACK
    ):
        return False
    cookie = host.syn_cookies.check_datagram(
        now, src, pkt.src_flowid, pkt.dst_flowid, (ctl.ackno - 1) & MASK32
    )
    if cookie is None:
        return False
    res = host.service_table.lookup(svc.service_id)
    listener = res.listener if res is not None else None
    if not isinstance(listener, Listener) or listener.closed or not listener.datagram:
        return False
    if len(listener.accept_queue) >= listener.backlog:
        host.drops["accept_queue_full"] += 1
        return True
    if not host.flow_room() or cookie.flowid in host.flows:
        host.drops["syn_cookie_no_room"] += 1
        return True
    conn, sf = host._new_flow(cookie.flowid, _SERVER, svc.service_id, dst, src, True)
    conn.listener_id = listener.listener_id
    key = (src, pkt.src_flowid)
    conn.peer_key = key
    sf.control.local_nonce = cookie.nonce
    sf.control.snd_verno = cookie.verno
    # The client's SYN as the third ACK implies it: its number is the ACK's less one.
    syn_ctl = ControlExt(ControlFlags.SYN, (ctl.verno - 1) & MASK32, 0, ctl.nonce)
    syn = SalPacket(pkt.src_flowid, 0, PROTO_UDP, [syn_ctl, ServiceExt(svc.service_id)])
    host.flows.insert(cookie.flowid, sf)
    host.connections[cookie.flowid] = conn
    host._peer_flows[key] = conn
    conn.accept_syn(sf, syn, now)  # its SYN-ACK went out as the cookie
    sf.handshake_sent_at = None
    if not conn.on_handshake_ack(sf, pkt, now):  # cannot fail: the cookie matched
        conn.abort_with("SYN cookie mismatch", send_rst=False)
        host._forget(conn)
        return True
    host.stats["syn_cookie_accepted"] += 1
    established_server(host, conn)
    host._wake(conn)
    return True


def on_cookie_ack(host: HostCore, pkt: SalPacket, src: Address, dst: Address, now: float) -> bool:
    """A packet for an unknown flow that may be the third ACK of a SYN answered with a
    cookie. True when it was one (taken, or answered); False: treat as unknown."""
    if pkt.protocol == PROTO_UDP:
        return on_datagram_cookie_ack(host, pkt, src, dst, now)
    tcp, ctl = pkt.tcp, pkt.control
    if tcp is None or tcp.flags & (TcpFlags.SYN | TcpFlags.RST) or not tcp.flags & TcpFlags.ACK:
        return False
    if ctl is not None and (
        not ctl.flags & ControlFlags.ACK
        or ctl.flags & (ControlFlags.SYN | ControlFlags.RST | ControlFlags.RSYN)
    ):
        return False
    cookie = host.syn_cookies.check(
        now,
        src,
        pkt.src_flowid,
        pkt.dst_flowid,
        (tcp.ack - 1) & MASK32,
        None if ctl is None else (ctl.ackno - 1) & MASK32,
    )
    if cookie is None:
        return False
    svc = pkt.service
    if ctl is None or svc is None:
        # Data before the third ACK (which was lost): ask for it again with a SYN-ACK,
        # which the client answers with its third ACK. Rate-limited as RSTs are.
        if host.rst_limit.take(now):
            host.stats["syn_cookie_reminder"] += 1
            remind = SalPacket(
                cookie.flowid,
                pkt.src_flowid,
                PROTO_TCP,
                [ControlExt(ControlFlags.SYN | ControlFlags.ACK, cookie.verno, 0, cookie.nonce)],
                TcpHeader(seq=cookie.iss, ack=tcp.seq, flags=TcpFlags.SYN | TcpFlags.ACK),
            )
            host._send(remind, dst, src)
        return True
    res = host.service_table.lookup(svc.service_id)
    listener = res.listener if res is not None else None
    # The cookie does not name the service: a stream made from it must not land in a
    # connected datagram listener's queue (only stream listeners ever send cookies).
    if not isinstance(listener, Listener) or listener.closed or listener.datagram:
        return False
    if len(listener.accept_queue) >= listener.backlog:
        host.drops["accept_queue_full"] += 1  # the client's next ACK may find room
        return True
    establish_from_cookie(host, listener, cookie, pkt, ctl, tcp, svc.service_id, src, dst, now)
    return True


def establish_from_cookie(
    host: HostCore,
    listener: Listener,
    cookie: Cookie,
    pkt: SalPacket,
    ctl: ControlExt,
    tcp: TcpHeader,
    sid: ServiceID,
    src: Address,
    dst: Address,
    now: float,
) -> None:
    """Build the server connection a valid cookie third ACK stands for."""
    flowid = cookie.flowid
    if not host.flow_room() or flowid in host.flows:
        host.drops["syn_cookie_no_room"] += 1
        return
    conn = Connection(flowid, _SERVER, sid, host.config, host._emit_hook)
    conn.wake = host._wake_hook
    conn.budget = host.receive_budget
    conn.listener_id = listener.listener_id
    key = (src, pkt.src_flowid)
    conn.peer_key = key
    sf = Subflow(conn, flowid, dst, src, host.rng)
    sf.iss = cookie.iss
    sf.control.local_nonce = cookie.nonce
    sf.control.snd_verno = cookie.verno
    # The client's SYN as the cookie remembers it: its numbers are the third ACK's less
    # one, its options the cookie's summary.
    opts = [TcpOption.mss(cookie.mss)]
    if cookie.window_scale is not None:
        opts.append(TcpOption.window_scale(cookie.window_scale))
    if cookie.sack:
        opts.append(TcpOption.sack_permitted())
    syn = SalPacket(
        pkt.src_flowid,
        0,
        PROTO_TCP,
        [ControlExt(ControlFlags.SYN, (ctl.verno - 1) & MASK32, 0, ctl.nonce), ServiceExt(sid)],
        TcpHeader(seq=(tcp.seq - 1) & MASK32, flags=TcpFlags.SYN, window=tcp.window, options=opts),
    )
    conn.subflows.append(sf)
    host.flows.insert(flowid, sf)
    host.connections[flowid] = conn
    host._peer_flows[key] = conn
    conn.accept_syn(sf, syn, now)  # the SYN-ACK it returns went out as the cookie
    sf.handshake_sent_at = None  # no RTT sample: we do not know when the SYN came
    if not conn.on_handshake_ack(sf, pkt, now):  # cannot fail: the cookie matched
        conn.abort_with("SYN cookie mismatch", send_rst=False)
        host._forget(conn)
        return
    host.stats["syn_cookie_accepted"] += 1
    established_server(host, conn)
    if conn.state is _ESTABLISHED:
        sf.on_tcp(tcp, pkt.payload, now)
    host._wake(conn)


def on_join(
    host: HostCore,
    pkt: SalPacket,
    ctl: ControlExt,
    join: JoinExt,
    src: Address,
    dst: Address,
    now: float,
) -> None:
    """A SYN opening another subflow of a multipath connection of ours."""
    conn = host.mp_tokens.get(join.token)
    mp = conn.mp if conn is not None else None
    if conn is None or mp is None or pkt.tcp is None or conn.state is not _ESTABLISHED:
        host.drops["join_unknown"] += 1
        return
    if join.proof != join_proof(mp.peer_key, mp.local_key):
        host.drops["join_bad_proof"] += 1
        return
    key = (src, pkt.src_flowid)
    existing = host._peer_flows.get(key)
    if existing is not None:
        for sf in existing.subflows:  # a retransmitted JOIN: answer it again
            if sf.remote_flowid == pkt.src_flowid and sf.join_state == "syn_received":
                host._send(sf.synack_packet(sf.control.resend()), sf.local_addr, src)
        return
    half_open = sum(x.join_state == "syn_received" for x in conn.subflows)
    if len(conn.subflows) >= MAX_SUBFLOWS or half_open >= MAX_HALF_OPEN_JOINS:
        host.drops["join_too_many"] += 1
        return
    if not host.flow_room():
        host.drops["flow_table_full"] += 1
        return
    flowid = host.flows.allocate()
    sf = Subflow(conn, flowid, dst, src, host.rng)
    sf.peer_key = key
    host.flows.insert(flowid, sf)
    host._peer_flows[key] = conn
    synack = conn.accept_join(sf, pkt, now)
    host._send(synack, dst, src)
    host.stats["joined"] += 1
    host._schedule(conn)


def established_server(host: HostCore, conn: Connection) -> None:
    # The SYN-ACK's retries were cut for half-open state (a minute at most, none for an
    # unproven path); the proven flow gets the full budget back.
    for sf in conn.subflows:
        sf.control.max_retries = sf.control.timers.max_retries
    listener = host._listener_by_id.get(conn.listener_id or 0)
    if listener is None or listener.closed:
        conn.abort_with("listener closed", send_rst=True)
        return
    if conn.peer_key is not None:
        listener.half_open.pop(conn.peer_key, None)
    listener.accept_queue.append(conn)  # bounded: checked before the handshake completes
    host._emit(IncomingConnection(conn.conn_id, listener.listener_id))

"""HostCore connections over the simulated network: handshake, losses, RST, nonces, limits.

Every scenario runs on :class:`pyserval.testing.SimNetwork` (virtual time), picks packets to
lose with its ``loss_filter`` (decoding them to find e.g. "the first SYN-ACK") and reads the
wire from its trace. The ``sim`` fixture checks that no host recorded an internal error.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from pyserval.core.host import HostCore, Listener
from pyserval.naming.service_id import ServiceID
from pyserval.sal import (
    PROTO_TCP,
    ControlExt,
    ControlFlags,
    Rule,
    SalPacket,
    ServiceExt,
    TcpFlags,
    TcpHeader,
    decode_packet,
)
from pyserval.sal.control import ControlTimers
from pyserval.sal.transport_headers import OPT_MSS, OPT_WSCALE
from pyserval.testing import Address, LinkConfig, SimNetwork
from pyserval.transport.config import StreamConfig
from pyserval.transport.connection import Connection, ConnectionError_, State
from pyserval.transport.events import (
    ConnectionClosed,
    ConnectionEstablished,
    ConnectionFailed,
    ConnectionReset,
    ConnectionTimedOut,
    DataReceived,
    Event,
    IncomingConnection,
    SendSpaceAvailable,
    StreamEnded,
)

A: Address = ("10.0.0.1", 54324)
B: Address = ("10.0.0.2", 54325)
SVC = "echo"
LINK = LinkConfig(delay=0.005)
FAST = ControlTimers(initial_rto=0.5, max_retries=3)  # gives up after 0.5+1+2+4 = 7.5 s

Filter = Callable[[bytes, Address, Address], bool]


# -- packet predicates ---------------------------------------------------------------------
def _flags(p: SalPacket) -> int:
    ctl = p.control
    return -1 if ctl is None else int(ctl.flags)


def is_syn(p: SalPacket) -> bool:
    return _flags(p) == ControlFlags.SYN


def is_synack(p: SalPacket) -> bool:
    return _flags(p) == ControlFlags.SYN | ControlFlags.ACK


def is_third_ack(p: SalPacket) -> bool:
    return _flags(p) == ControlFlags.ACK and p.service is not None


def is_rst(p: SalPacket) -> bool:
    return _flags(p) >= 0 and bool(_flags(p) & ControlFlags.RST)


def is_data(p: SalPacket) -> bool:
    return p.control is None and len(p.payload) > 0


def drop_first(pred: Callable[[SalPacket], bool], n: int = 1) -> tuple[Filter, list[SalPacket]]:
    """A loss filter dropping the first ``n`` packets matching ``pred`` (and the list of them)."""
    dropped: list[SalPacket] = []

    def f(data: bytes, src: Address, dst: Address) -> bool:
        if len(dropped) >= n:
            return False
        p = decode_packet(data)
        if pred(p):
            dropped.append(p)
            return True
        return False

    return f, dropped


@dataclass
class Sent:
    time: float
    src: Address
    dst: Address
    data: bytes
    pkt: SalPacket


class Sim:
    """A SimNetwork plus the hosts of one test (checked for internal errors at teardown)."""

    def __init__(self, link: LinkConfig = LINK, loss_filter: Filter | None = None) -> None:
        self.net = SimNetwork(seed=1, default_link=link, trace=True, loss_filter=loss_filter)
        self.hosts: list[HostCore] = []

    def host(self, addr: Address, config: StreamConfig | None = None) -> HostCore:
        h = HostCore([addr], config=config, rng=random.Random(len(self.hosts) + 1))
        self.net.attach(h, addr)
        self.hosts.append(h)
        return h

    def sent(self, src_ip: str | None = None, dst_ip: str | None = None) -> list[Sent]:
        """Packets handed to the network (by ``src_ip``, to ``dst_ip``), decoded."""
        out = []
        for ev in self.net.trace:
            if ev.fate != "sent":
                continue
            if src_ip is not None and ev.src[0] != src_ip:
                continue
            if dst_ip is not None and ev.dst[0] != dst_ip:
                continue
            out.append(Sent(ev.time, ev.src, ev.dst, ev.data, decode_packet(ev.data)))
        return out

    def run_until(self, pred: Callable[[], bool], timeout: float = 60.0) -> None:
        assert self.net.run_until(pred, timeout), f"condition not reached by t={self.net.now}"


@pytest.fixture
def sim() -> Iterator[Callable[..., Sim]]:
    made: list[Sim] = []

    def factory(link: LinkConfig = LINK, loss_filter: Filter | None = None) -> Sim:
        s = Sim(link, loss_filter)
        made.append(s)
        return s

    yield factory
    for s in made:
        for h in s.hosts:
            assert h.internal_errors == []
            assert h.stats["internal_error"] == 0


@dataclass
class Pair:
    sim: Sim
    a: HostCore
    b: HostCore
    listener: Listener

    @property
    def net(self) -> SimNetwork:
        return self.sim.net


def make_pair(
    sim: Callable[..., Sim],
    *,
    a_config: StreamConfig | None = None,
    b_config: StreamConfig | None = None,
    loss_filter: Filter | None = None,
    backlog: int = 128,
) -> Pair:
    s = sim(LINK, loss_filter)
    a = s.host(A, a_config)
    b = s.host(B, b_config)
    a.service_table.add(SVC, Rule.forward(B))
    return Pair(s, a, b, b.listen(SVC, backlog=backlog))


def connect(p: Pair, timeout: float = 60.0) -> tuple[Connection, Connection]:
    """Connect a -> b and accept on b; returns (client, server)."""
    c = p.a.connect(SVC, p.net.now)
    p.net.kick(p.a)
    p.sim.run_until(lambda: c.state is State.ESTABLISHED and bool(p.listener.accept_queue), timeout)
    s = p.listener.accept()
    assert s is not None
    return c, s


def transfer(p: Pair, c: Connection, s: Connection, data: bytes, timeout: float = 30.0) -> bytes:
    """Write ``data`` on c, read it all on s; returns what s read."""
    got = bytearray()
    view = memoryview(data)
    while view:
        n = c.write(view)
        view = view[n:]
        p.net.kick(p.a)
        p.sim.run_until(lambda: s.readable > 0 or c.send.free > 0, timeout)
        got += s.read()
        p.net.kick(p.b)
    p.sim.run_until(lambda: len(got) + s.readable >= len(data), timeout)
    got += s.read()
    p.net.kick(p.b)
    return bytes(got)


def kinds(events: list[Event]) -> list[type[Event]]:
    return [type(e) for e in events]


def forge(
    flags: int,
    src_flowid: int,
    dst_flowid: int,
    nonce: bytes,
    verno: int = 0,
    ackno: int = 0,
    src_ip: str = B[0],
    dst_ip: str = A[0],
) -> bytes:
    """A CONTROL-only packet (base + CONTROL) as an off-path attacker would build it."""
    pkt = SalPacket(src_flowid, dst_flowid, PROTO_TCP, [ControlExt(flags, verno, ackno, nonce)])
    return pkt.encode(src_ip, dst_ip)


# ==========================================================================================
# 1. The plain handshake
# ==========================================================================================
def test_handshake_events_and_reference_layout(sim: Callable[..., Sim]) -> None:
    p = make_pair(sim)
    c, s = connect(p)
    assert p.a.events() == [ConnectionEstablished(c.conn_id)]
    assert p.b.events() == [IncomingConnection(s.conn_id, p.listener.listener_id)]
    assert s.state is State.ESTABLISHED

    pkts = p.sim.sent()
    assert len(pkts) == 3, [x.pkt for x in pkts]
    syn, synack, ack = pkts
    assert (syn.src, syn.dst) == (A, B)
    assert (synack.src, synack.dst) == (B, A)
    assert (ack.src, ack.dst) == (A, B)
    csf, ssf = c.primary, s.primary

    # SYN: base + CONTROL(SYN) + SERVICE, shl 17, TCP SYN with MSS and window scale.
    sp = syn.pkt
    assert sp.shl == 17 and syn.data[8] == 17
    assert sp.protocol == PROTO_TCP
    assert sp.src_flowid == csf.local_flowid != 0
    assert sp.dst_flowid == 0
    assert [type(e) for e in sp.extensions] == [ControlExt, ServiceExt]
    sctl = sp.control
    assert sctl is not None and sctl.flags == ControlFlags.SYN
    assert sctl.ackno == 0
    assert sctl.nonce == csf.control.local_nonce
    assert sp.extensions[1] == ServiceExt(ServiceID.parse(SVC))
    stcp = sp.tcp
    assert stcp is not None and stcp.flags == TcpFlags.SYN
    assert (stcp.src_port, stcp.dst_port) == (0, 0)
    assert stcp.seq == csf.iss
    assert stcp.mss == 1408
    assert stcp.window_scale == StreamConfig().window_scale
    assert [o.kind for o in stcp.options][:1] == [OPT_MSS]
    assert OPT_WSCALE in [o.kind for o in stcp.options]
    assert sp.payload == b""

    # SYN-ACK: base + CONTROL(SYN+ACK), ackno = SYN verno + 1.
    ap = synack.pkt
    assert ap.shl == 8
    assert ap.src_flowid == ssf.local_flowid != 0
    assert ap.dst_flowid == sp.src_flowid
    assert [type(e) for e in ap.extensions] == [ControlExt]
    actl = ap.control
    assert actl is not None and actl.flags == ControlFlags.SYN | ControlFlags.ACK
    assert actl.ackno == (sctl.verno + 1) & 0xFFFFFFFF
    assert actl.nonce == ssf.control.local_nonce != sctl.nonce
    atcp = ap.tcp
    assert atcp is not None and atcp.flags == TcpFlags.SYN | TcpFlags.ACK
    assert atcp.seq == ssf.iss
    assert atcp.ack == (stcp.seq + 1) & 0xFFFFFFFF
    assert atcp.mss == 1408 and atcp.window_scale is not None

    # Third ACK: CONTROL(ACK) + SERVICE, verno = ISS + 1, ackno = peer ISS + 1, client nonce.
    kp = ack.pkt
    assert kp.shl == 17
    assert (kp.src_flowid, kp.dst_flowid) == (sp.src_flowid, ap.src_flowid)
    assert [type(e) for e in kp.extensions] == [ControlExt, ServiceExt]
    kctl = kp.control
    assert kctl is not None and kctl.flags == ControlFlags.ACK
    assert kctl.verno == (sctl.verno + 1) & 0xFFFFFFFF
    assert kctl.ackno == (actl.verno + 1) & 0xFFFFFFFF
    assert kctl.nonce == sctl.nonce
    assert kp.extensions[1] == ServiceExt(ServiceID.parse(SVC))
    ktcp = kp.tcp
    assert ktcp is not None and ktcp.flags & TcpFlags.ACK and not ktcp.flags & TcpFlags.SYN
    assert ktcp.seq == (stcp.seq + 1) & 0xFFFFFFFF
    assert ktcp.ack == (atcp.seq + 1) & 0xFFFFFFFF

    # Checksums: SAL header (decode_packet verified it) and TCP over the pseudo-header.
    for x in pkts:
        assert decode_packet(x.data, verify=True).encode() == x.data
        assert x.pkt.verify_transport_checksum(x.src[0], x.dst[0])
        assert not x.pkt.verify_transport_checksum("192.0.2.99", x.dst[0])

    # Both ends agree on the flowIDs and nonces.
    assert csf.remote_flowid == ssf.local_flowid and ssf.remote_flowid == csf.local_flowid
    assert csf.control.peer_nonce == ssf.control.local_nonce
    assert ssf.control.peer_nonce == csf.control.local_nonce
    assert len(p.a.flows) == len(p.b.flows) == 1
    assert p.a.drops == {} and p.b.drops == {}


def test_full_lifecycle_data_and_clean_close(sim: Callable[..., Sim]) -> None:
    p = make_pair(sim)
    c, s = connect(p)
    p.a.events(), p.b.events()
    data = random.Random(7).randbytes(50_000)
    c.write(data)
    c.shutdown()
    p.net.kick(p.a)
    got = bytearray()

    def read_all() -> bool:
        got.extend(s.read())
        return s.at_eof

    p.sim.run_until(read_all, 10)
    assert bytes(got) == data
    s.write(b"bye")
    s.shutdown()
    p.net.kick(p.b)
    p.sim.run_until(lambda: s.state is State.CLOSED and c.state is State.TIME_WAIT)
    assert c.read() == b"bye"
    assert c.at_eof
    b_ev = kinds(p.b.events())
    assert b_ev[-2:] == [StreamEnded, ConnectionClosed]
    assert DataReceived in b_ev
    a_ev = kinds(p.a.events())
    assert a_ev[-2:] == [StreamEnded, ConnectionClosed]
    assert p.b.connections == {} and len(p.b.flows) == 0
    p.net.run_for(StreamConfig().time_wait + 1)
    assert c.state is State.CLOSED
    assert p.a.connections == {} and len(p.a.flows) == 0
    assert p.a.drops == {} and p.b.drops == {}


# ==========================================================================================
# 2. Handshake losses
# ==========================================================================================
def test_lost_syn_is_retransmitted_after_control_rto(sim: Callable[..., Sim]) -> None:
    f, dropped = drop_first(is_syn)
    p = make_pair(sim, loss_filter=f)
    _c, _s = connect(p)
    assert len(dropped) == 1
    syns = [x for x in p.sim.sent(A[0]) if is_syn(x.pkt)]
    assert len(syns) == 2
    assert syns[0].time == 0.0
    assert syns[1].time == pytest.approx(1.0)  # default initial control RTO (RFC 6298)
    first, second = syns[0].pkt, syns[1].pkt
    # A retransmission, not a new attempt: same flowID, control numbers, nonce and ISS.
    assert second.src_flowid == first.src_flowid
    c1, c2 = first.control, second.control
    assert c1 is not None and c2 is not None
    assert (c2.verno, c2.nonce) == (c1.verno, c1.nonce)
    assert first.tcp is not None and second.tcp is not None and second.tcp.seq == first.tcp.seq
    assert p.net.now == pytest.approx(1.01, abs=0.005)
    assert kinds(p.a.events()) == [ConnectionEstablished]
    assert len(p.b.connections) == 1


def test_lost_synack_duplicate_syn_answered_without_second_flow(
    sim: Callable[..., Sim],
) -> None:
    f, dropped = drop_first(is_synack)
    # The server's own SYN-ACK retransmission comes late, so the client's SYN does the work.
    slow = StreamConfig(control=ControlTimers(initial_rto=10.0))
    p = make_pair(sim, b_config=slow, loss_filter=f)
    c, s = connect(p)
    assert len(dropped) == 1
    assert p.net.now < 2.0
    syns = [x for x in p.sim.sent(A[0]) if is_syn(x.pkt)]
    assert [round(x.time, 3) for x in syns] == [0.0, 1.0]
    synacks = [x for x in p.sim.sent(B[0]) if is_synack(x.pkt)]
    assert len(synacks) == 2
    assert synacks[1].time == pytest.approx(1.005)  # answers the duplicate SYN at once
    k1, k2 = synacks[0].pkt.control, synacks[1].pkt.control
    assert k1 is not None and k2 is not None
    assert (k2.verno, k2.ackno, k2.nonce) == (k1.verno, k1.ackno, k1.nonce)
    assert synacks[1].pkt.src_flowid == synacks[0].pkt.src_flowid
    assert p.b.stats["duplicate_syn"] == 1
    assert len(p.b.connections) == 1 and len(p.b.flows) == 1
    assert kinds(p.b.events()) == [IncomingConnection]
    assert transfer(p, c, s, b"payload" * 100) == b"payload" * 100


def test_lost_third_ack_first_data_segment_establishes_server(
    sim: Callable[..., Sim],
) -> None:
    f, dropped = drop_first(is_third_ack)
    p = make_pair(sim, loss_filter=f)
    c = p.a.connect(SVC, p.net.now)
    p.net.kick(p.a)
    p.sim.run_until(lambda: c.state is State.ESTABLISHED)
    assert len(dropped) == 1
    assert len(p.b.connections) == 1
    (srv,) = p.b.connections.values()
    assert srv.state is State.SYN_RECEIVED
    c.write(b"hello")
    p.net.kick(p.a)
    p.sim.run_until(lambda: bool(p.listener.accept_queue), 1.0)
    assert p.net.now < 0.1  # no SYN-ACK retransmission was needed
    s = p.listener.accept()
    assert s is srv and s.state is State.ESTABLISHED
    assert s.read() == b"hello"
    assert sorted(k.__name__ for k in kinds(p.b.events())) == [
        "DataReceived",
        "IncomingConnection",
    ]
    assert not [x for x in p.sim.sent(B[0]) if is_synack(x.pkt)][1:]
    assert transfer(p, c, s, b"more" * 5000) == b"more" * 5000


def test_lost_third_ack_incoming_connection_reported_before_its_data(
    sim: Callable[..., Sim],
) -> None:
    f, _dropped = drop_first(is_third_ack)
    p = make_pair(sim, loss_filter=f)
    c = p.a.connect(SVC, p.net.now)
    p.net.kick(p.a)
    p.sim.run_until(lambda: c.state is State.ESTABLISHED)
    c.write(b"hello")
    p.net.kick(p.a)
    p.sim.run_until(lambda: bool(p.listener.accept_queue), 1.0)
    assert kinds(p.b.events()) == [IncomingConnection, DataReceived]


def test_lost_third_ack_retransmitted_synack_is_answered(sim: Callable[..., Sim]) -> None:
    f, dropped = drop_first(is_third_ack)
    p = make_pair(sim, loss_filter=f)
    c = p.a.connect(SVC, p.net.now)
    p.net.kick(p.a)
    # No data from the client: the server's SYN-ACK retransmission must get a third ACK.
    p.sim.run_until(lambda: bool(p.listener.accept_queue), 10)
    assert len(dropped) == 1
    assert p.net.now == pytest.approx(1.015, abs=0.01)
    acks = [x for x in p.sim.sent(A[0]) if is_third_ack(x.pkt)]
    assert len(acks) == 2
    c1, c2 = acks[0].pkt.control, acks[1].pkt.control
    assert c1 is not None and c2 is not None and (c2.verno, c2.ackno) == (c1.verno, c1.ackno)
    s = p.listener.accept()
    assert s is not None
    assert kinds(p.a.events()) == [ConnectionEstablished]
    assert transfer(p, c, s, b"x" * 3000) == b"x" * 3000
    s.write(b"reply")
    p.net.kick(p.b)
    p.sim.run_until(lambda: c.readable == 5, 2)
    assert c.read() == b"reply"


# ==========================================================================================
# 3. Duplicate SYN
# ==========================================================================================
def test_duplicated_syn_makes_one_flow(sim: Callable[..., Sim]) -> None:
    p = make_pair(sim)
    p.net.set_link(A[0], B[0], LinkConfig(delay=0.005, duplicate=1.0))
    c = p.a.connect(SVC, p.net.now)
    p.net.kick(p.a)
    p.sim.run_until(lambda: c.state is State.ESTABLISHED and bool(p.listener.accept_queue))
    p.net.run_for(0.1)
    p.net.clear_link(A[0], B[0])
    assert p.net.link_stats(A[0], B[0]).duplicated >= 1
    assert p.b.stats["duplicate_syn"] == 1
    assert len(p.b.connections) == 1 and len(p.b.flows) == 1
    assert kinds(p.b.events()) == [IncomingConnection]
    assert kinds(p.a.events()) == [ConnectionEstablished]
    s = p.listener.accept()
    assert s is not None and p.listener.accept() is None
    assert transfer(p, c, s, b"abc" * 1000) == b"abc" * 1000


def test_late_duplicate_syn_after_handshake_makes_no_second_flow(
    sim: Callable[..., Sim],
) -> None:
    p = make_pair(sim)
    c, s = connect(p)
    p.net.run_for(0.1)
    syn = next(x for x in p.sim.sent(A[0]) if is_syn(x.pkt))
    # The same SYN, delayed in the network, arrives once more.
    p.b.receive_datagram(syn.data, A, B, p.net.now)
    p.net.kick(p.b)
    p.net.run_for(1.0)
    assert len(p.b.connections) == 1 and len(p.b.flows) == 1
    assert not p.listener.half_open
    assert c.state is State.ESTABLISHED and s.state is State.ESTABLISHED


# ==========================================================================================
# 4. Unroutable and unserved services
# ==========================================================================================
def test_connect_without_route_fails_at_once(sim: Callable[..., Sim]) -> None:
    s = sim()
    a = s.host(A)
    c = a.connect("nowhere", s.net.now)
    s.net.kick(a)
    ev = a.events()
    assert kinds(ev) == [ConnectionFailed]
    assert ev[0].conn_id == c.conn_id
    assert isinstance(ev[0], ConnectionFailed) and "no route" in ev[0].reason
    assert c.state is State.CLOSED
    assert a.connections == {} and len(a.flows) == 0
    assert s.sent() == []
    assert a.stats["syn_no_route"] == 1
    s.net.run_for(60)
    assert a.events() == [] and s.sent() == []


def test_connect_to_host_without_listener_times_out_never_rst(
    sim: Callable[..., Sim],
) -> None:
    s = sim()
    a = s.host(A, StreamConfig(control=FAST))
    b = s.host(B)
    a.service_table.add(SVC, Rule.forward(B))
    c = a.connect(SVC, s.net.now)
    s.net.kick(a)
    s.run_until(lambda: c.state is State.CLOSED, 30)
    assert s.net.now == pytest.approx(7.5)
    ev = a.events()
    assert kinds(ev) == [ConnectionTimedOut]
    assert ev[0].conn_id == c.conn_id
    assert b.drops["syn_no_service"] == 4  # the SYN and its 3 retransmissions
    assert len([x for x in s.sent(A[0]) if is_syn(x.pkt)]) == 4
    assert s.sent(B[0]) == []  # never a RST for a SYN
    assert b.events() == [] and b.connections == {}
    assert a.connections == {} and len(a.flows) == 0
    with pytest.raises(ConnectionError_, match="closed"):
        c.write(b"x")


# ==========================================================================================
# 5. RST
# ==========================================================================================
def _standalone() -> HostCore:
    return HostCore([B], rng=random.Random(5))


def test_data_to_unknown_flow_gets_stateless_rst() -> None:
    b = _standalone()
    tcp = TcpHeader(seq=0x12345678, ack=99, flags=TcpFlags.ACK | TcpFlags.PSH, window=1000)
    data = SalPacket(0xAAAA, 0xBBBB, PROTO_TCP, [], tcp, b"data").encode(A[0], B[0])
    b.receive_datagram(data, A, B, 1.0)
    out = b.datagrams_to_send(1.0)
    assert len(out) == 1
    raw, local, remote = out[0]
    assert (local, remote) == (B, A)
    rst = decode_packet(raw)
    assert rst.dst_flowid == 0xAAAA
    assert [type(e) for e in rst.extensions] == [ControlExt]
    ctl = rst.control
    assert ctl is not None and ctl.flags == ControlFlags.RST
    assert ctl.verno == 0x12345678  # echoes the segment's sequence number
    assert rst.tcp is None and rst.payload == b""
    assert b.drops["unknown_flow"] == 1
    assert b.internal_errors == []


def test_control_to_unknown_flow_gets_rst_echoing_nonce() -> None:
    b = _standalone()
    nonce = bytes(range(1, 9))
    b.receive_datagram(forge(ControlFlags.FIN, 0xAAAA, 0xBBBB, nonce, verno=77), A, B, 1.0)
    out = b.datagrams_to_send(1.0)
    assert len(out) == 1
    rst = decode_packet(out[0][0])
    ctl = rst.control
    assert ctl is not None and ctl.flags & ControlFlags.RST
    assert ctl.nonce == nonce and ctl.verno == 77
    assert rst.dst_flowid == 0xAAAA
    assert b.internal_errors == []


@pytest.mark.parametrize("dst_flowid", [0xBBBB, 0])
def test_rst_never_answers_rst(dst_flowid: int) -> None:
    b = _standalone()
    b.receive_datagram(forge(ControlFlags.RST, 0xAAAA, dst_flowid, bytes(8)), A, B, 1.0)
    b.receive_datagram(
        forge(ControlFlags.RST | ControlFlags.ACK, 0, dst_flowid, bytes(8)), A, B, 1.0
    )
    assert b.datagrams_to_send(1.0) == []
    reason = "rst_unknown_flow" if dst_flowid else "rst_no_flow"
    assert b.drops[reason] == 2
    assert b.internal_errors == []


def test_server_abort_resets_client(sim: Callable[..., Sim]) -> None:
    p = make_pair(sim)
    c, s = connect(p)
    p.a.events(), p.b.events()
    s.abort()
    p.net.kick(p.b)
    assert p.b.connections == {} and len(p.b.flows) == 0
    p.sim.run_until(lambda: c.state is State.CLOSED, 1)
    ev = p.a.events()
    assert ev == [ConnectionReset(c.conn_id, "reset by peer")]
    assert p.a.connections == {} and len(p.a.flows) == 0
    assert [x for x in p.sim.sent(A[0]) if is_rst(x.pkt)] == []  # RST never answers RST
    with pytest.raises(ConnectionError_, match="reset by peer"):
        c.write(b"x")


def test_forgotten_flow_answers_data_with_rst_that_resets_client(
    sim: Callable[..., Sim],
) -> None:
    f, dropped = drop_first(lambda pk: is_rst(pk) and pk.control is not None)
    p = make_pair(sim, loss_filter=f)
    c, s = connect(p)
    p.a.events()
    s.abort()  # its RST is lost: the server host simply forgot the flow
    p.net.kick(p.b)
    p.net.run_for(0.1)
    assert len(dropped) == 1 and c.state is State.ESTABLISHED
    c.write(b"are you there?")
    p.net.kick(p.a)
    p.sim.run_until(lambda: c.state is State.CLOSED, 5)
    assert p.b.drops["unknown_flow"] >= 1
    rsts = [x for x in p.sim.sent(B[0]) if is_rst(x.pkt)]
    assert len(rsts) == 2  # the lost one and the stateless answer
    assert rsts[1].pkt.dst_flowid == c.primary.local_flowid
    ev = p.a.events()
    assert kinds(ev) == [ConnectionReset]
    assert p.a.connections == {}
    assert [x for x in p.sim.sent(A[0]) if is_rst(x.pkt)] == []


def test_stateless_rst_answering_pure_ack_does_not_reset(sim: Callable[..., Sim]) -> None:
    """A zero-nonce RST must name data in flight; with none in flight it is not believed."""
    p = make_pair(sim)
    c, _s = connect(p)
    csf = c.primary
    raw = forge(ControlFlags.RST, 0, csf.local_flowid, bytes(8), verno=csf.wire_seq(0))
    p.a.receive_datagram(raw, B, A, p.net.now)
    p.net.kick(p.a)
    assert c.state is State.ESTABLISHED
    assert p.a.drops["bad_nonce"] == 1


# ==========================================================================================
# 6. Nonces stop off-path resets and closes
# ==========================================================================================
@pytest.mark.parametrize("side", ["client", "server"])
@pytest.mark.parametrize("flag", [ControlFlags.RST, ControlFlags.FIN])
def test_forged_control_with_wrong_nonce_is_ignored(
    sim: Callable[..., Sim],
    side: str,
    flag: int,  # ControlFlags are plain ints
) -> None:
    p = make_pair(sim)
    c, s = connect(p)
    p.a.events(), p.b.events()
    victim, host, peer_addr, own_addr = (c, p.a, B, A) if side == "client" else (s, p.b, A, B)
    vsf = victim.primary
    assert vsf.control.peer_nonce is not None
    for nonce in (b"\x5a" * 8, bytes(8), vsf.control.peer_nonce[::-1]):
        if nonce == vsf.control.peer_nonce:
            continue
        raw = forge(
            flag,
            vsf.remote_flowid,
            vsf.local_flowid,
            nonce,
            verno=vsf.control.rcv_ackno,  # even with the right control number
            ackno=vsf.control.snd_verno,
            src_ip=peer_addr[0],
            dst_ip=own_addr[0],
        )
        host.receive_datagram(raw, peer_addr, own_addr, p.net.now)
        p.net.kick(host)
    assert host.drops["bad_nonce"] == 3
    assert host.events() == []
    assert c.state is State.ESTABLISHED and s.state is State.ESTABLISHED
    assert not victim.peer_sal_fin
    # It keeps working, both ways, and closes cleanly.
    assert transfer(p, c, s, b"still here" * 500) == b"still here" * 500
    s.write(b"pong")
    p.net.kick(p.b)
    p.sim.run_until(lambda: c.readable == 4, 2)
    assert c.read() == b"pong"
    c.shutdown()
    p.net.kick(p.a)
    p.sim.run_until(lambda: s.at_eof, 2)
    s.shutdown()
    p.net.kick(p.b)
    p.sim.run_until(lambda: s.state is State.CLOSED and c.state is State.TIME_WAIT, 2)


def test_forged_rst_with_zero_nonce_outside_flight_is_ignored(
    sim: Callable[..., Sim],
) -> None:
    p = make_pair(sim)
    c, s = connect(p)
    p.net.cut(A[0], B[0])
    c.write(b"z" * 4000)
    p.net.kick(p.a)
    csf = c.primary
    assert csf.snd_max > csf.snd_una
    for off in (csf.snd_max, csf.snd_max + 10_000, csf.snd_una - 1):
        raw = forge(
            ControlFlags.RST, csf.remote_flowid, csf.local_flowid, bytes(8), verno=csf.wire_seq(off)
        )
        p.a.receive_datagram(raw, B, A, p.net.now)
        p.net.kick(p.a)
    assert p.a.drops["bad_nonce"] == 3
    assert c.state is State.ESTABLISHED
    p.net.restore(A[0], B[0])
    p.sim.run_until(lambda: s.readable == 4000, 10)
    assert s.read() == b"z" * 4000


# ==========================================================================================
# 7. Listener bounds
# ==========================================================================================
def _clients(s: Sim, n: int, config: StreamConfig | None = None) -> list[HostCore]:
    hosts = []
    for i in range(n):
        h = s.host((f"10.0.1.{i + 1}", 54324), config)
        h.service_table.add(SVC, Rule.forward(B))
        hosts.append(h)
    return hosts


def test_half_open_bound_answers_extra_syns_statelessly(sim: Callable[..., Sim]) -> None:
    s = sim(LINK, lambda d, src, dst: is_synack(decode_packet(d)))  # handshakes never finish
    b = s.host(B, StreamConfig(max_half_open=2))
    listener = b.listen(SVC)
    clients = _clients(s, 3)
    conns = []
    for h in clients:
        conns.append(h.connect(SVC, s.net.now))
        s.net.kick(h)
        s.net.run_for(0.1)
    assert len(listener.half_open) == 2
    assert len(b.connections) == 2 and len(b.flows) == 2  # the third left no state
    assert b.stats["syn_cookie_sent"] == 1
    assert all(c.state is State.SYN_SENT for c in conns)
    s.net.run_for(1.0)  # the third client's SYN retransmission (1 s RTO): a cookie, no state
    assert b.stats["syn_cookie_sent"] == 2
    assert len(b.connections) == 2


def test_backlog_bound_drops_extra_syns(sim: Callable[..., Sim]) -> None:
    s = sim()
    b = s.host(B)
    listener = b.listen(SVC, backlog=2)
    clients = _clients(s, 3, StreamConfig(control=FAST))
    conns = []
    for h in clients:
        conns.append(h.connect(SVC, s.net.now))
        s.net.kick(h)
        s.net.run_for(0.1)
    assert [c.state for c in conns[:2]] == [State.ESTABLISHED] * 2
    assert len(listener.accept_queue) == 2
    assert b.drops["accept_queue_full"] == 1
    s.run_until(lambda: conns[2].state is State.CLOSED, 30)
    assert kinds(clients[2].events()) == [ConnectionTimedOut]
    assert b.drops["accept_queue_full"] == 4
    assert len(listener.accept_queue) == 2 and len(b.connections) == 2
    # Accepting makes room again.
    assert listener.accept() is not None
    c4 = clients[2].connect(SVC, s.net.now)
    s.net.kick(clients[2])
    s.run_until(lambda: c4.state is State.ESTABLISHED, 5)


def test_backlog_bound_holds_for_simultaneous_syns(sim: Callable[..., Sim]) -> None:
    s = sim()
    b = s.host(B)
    listener = b.listen(SVC, backlog=2)
    clients = _clients(s, 4)
    for h in clients:
        h.connect(SVC, s.net.now)
        s.net.kick(h)
    s.net.run_for(1.0)
    assert len(listener.accept_queue) <= 2
    assert b.drops["accept_queue_full"] >= 2


# ==========================================================================================
# 8. Abort
# ==========================================================================================
def test_client_abort_sends_rst_with_nonce(sim: Callable[..., Sim]) -> None:
    p = make_pair(sim)
    c, s = connect(p)
    p.a.events(), p.b.events()
    before = len(p.sim.sent(A[0]))
    c.abort()
    p.net.kick(p.a)
    ev = p.a.events()
    assert kinds(ev) == [ConnectionReset]
    assert c.state is State.CLOSED
    assert p.a.connections == {} and len(p.a.flows) == 0
    out = p.sim.sent(A[0])[before:]
    assert len(out) == 1
    rst = out[0].pkt
    assert [type(e) for e in rst.extensions] == [ControlExt]
    ctl = rst.control
    assert ctl is not None and ctl.flags == ControlFlags.RST
    assert ctl.nonce == c.primary.control.local_nonce
    assert (rst.src_flowid, rst.dst_flowid) == (c.primary.local_flowid, s.primary.local_flowid)
    p.sim.run_until(lambda: s.state is State.CLOSED, 1)
    assert p.b.events() == [ConnectionReset(s.conn_id, "reset by peer")]
    assert p.b.connections == {} and len(p.b.flows) == 0
    assert [x for x in p.sim.sent(B[0]) if is_rst(x.pkt)] == []
    c.abort()  # aborting again is a no-op
    p.net.kick(p.a)
    assert p.a.events() == [] and len(p.sim.sent(A[0])) == before + 1


def test_abort_with_data_in_flight_resets_peer(sim: Callable[..., Sim]) -> None:
    p = make_pair(sim)
    c, s = connect(p)
    c.write(b"q" * 200_000)
    p.net.kick(p.a)
    p.net.run_for(0.02)
    c.abort()
    p.net.kick(p.a)
    p.sim.run_until(lambda: s.state is State.CLOSED, 2)
    assert ConnectionReset in kinds(p.b.events())
    p.net.run_for(5)
    assert p.a.connections == {} and p.b.connections == {}


# ==========================================================================================
# 9. Misuse of closed connections
# ==========================================================================================
def test_write_after_shutdown_raises(sim: Callable[..., Sim]) -> None:
    p = make_pair(sim)
    c, _s = connect(p)
    c.write(b"ok")
    c.shutdown()
    c.shutdown()  # idempotent
    with pytest.raises(ConnectionError_, match="after shutdown"):
        c.write(b"more")


def test_write_to_closed_connection_raises_clear_error(sim: Callable[..., Sim]) -> None:
    p = make_pair(sim)
    c, s = connect(p)
    c.abort()
    p.net.kick(p.a)
    with pytest.raises(ConnectionError_, match=r"cannot send: connection .* is closed") as ei:
        c.write(b"x")
    assert "aborted locally" in str(ei.value)
    with pytest.raises(ConnectionError_, match="closed"):
        c.shutdown()
    p.sim.run_until(lambda: s.state is State.CLOSED, 1)
    with pytest.raises(ConnectionError_, match="reset by peer"):
        s.write(b"x")
    assert c.read() == b""


def test_write_in_time_wait_raises(sim: Callable[..., Sim]) -> None:
    p = make_pair(sim)
    c, s = connect(p)
    c.shutdown()
    p.net.kick(p.a)
    p.sim.run_until(lambda: s.at_eof, 2)
    s.shutdown()
    p.net.kick(p.b)
    p.sim.run_until(lambda: c.state is State.TIME_WAIT and s.state is State.CLOSED, 2)
    with pytest.raises(ConnectionError_, match="closed"):
        c.write(b"x")
    with pytest.raises(ConnectionError_, match="closed"):
        s.write(b"x")


# ==========================================================================================
# 10. Idle timeout and keepalive
# ==========================================================================================
def test_idle_timeout_on_cut_link(sim: Callable[..., Sim]) -> None:
    cfg = StreamConfig(idle_timeout=2.0)
    p = make_pair(sim, a_config=cfg, b_config=cfg)
    c, s = connect(p)
    p.a.events(), p.b.events()
    t0 = p.net.now
    p.net.cut(A[0], B[0])
    p.sim.run_until(lambda: c.closed and s.closed, 10)
    assert p.net.now == pytest.approx(t0 + 2.0, abs=0.02)
    ev = p.a.events()
    assert kinds(ev) == [ConnectionTimedOut]
    assert isinstance(ev[0], ConnectionTimedOut) and "idle" in ev[0].reason
    assert kinds(p.b.events()) == [ConnectionTimedOut]
    assert p.a.connections == {} and p.b.connections == {}


def test_idle_timeout_with_keepalive_on_cut_link(sim: Callable[..., Sim]) -> None:
    cfg = StreamConfig(idle_timeout=3.0, keepalive=1.0)
    p = make_pair(sim, a_config=cfg, b_config=cfg)
    c, _s = connect(p)
    p.a.events()
    p.net.cut(A[0], B[0])
    p.sim.run_until(lambda: c.closed, 10)
    assert kinds(p.a.events()) == [ConnectionTimedOut]


@pytest.mark.parametrize("server_keepalive", [True, False])
def test_keepalive_keeps_idle_connection_up(
    sim: Callable[..., Sim], server_keepalive: bool
) -> None:
    cfg = StreamConfig(idle_timeout=3.0, keepalive=1.0)
    p = make_pair(sim, a_config=cfg, b_config=cfg if server_keepalive else None)
    c, s = connect(p)
    p.a.events(), p.b.events()
    t0 = p.net.now
    p.net.run_for(20.0)  # idle: nothing to send, but the link is up
    assert c.state is State.ESTABLISHED and s.state is State.ESTABLISHED
    assert p.a.events() == [] and p.b.events() == []
    probes = [x for x in p.sim.sent(A[0]) if x.time > t0]
    answers = [x for x in p.sim.sent(B[0]) if x.time > t0]
    assert len(probes) >= 5 and answers


# ==========================================================================================
# 11. Zero window and the persist timer
# ==========================================================================================
RCV = 16 * 1024
SND = 32 * 1024


def _zero_window_pair(sim: Callable[..., Sim], loss_filter: Filter | None = None) -> Pair:
    return make_pair(
        sim,
        a_config=StreamConfig(send_buffer=SND),
        b_config=StreamConfig(receive_buffer=RCV),
        loss_filter=loss_filter,
    )


def _fill(p: Pair, c: Connection, data: bytes) -> int:
    """Write as much of ``data`` as the client takes, letting the network run between."""
    written = 0
    for _ in range(100):
        n = c.write(data[written:])
        written += n
        p.net.kick(p.a)
        p.net.run_for(0.5)
        if n == 0 and c.write(data[written:]) == 0:
            break
    return written


def test_zero_window_persist_and_resume(sim: Callable[..., Sim]) -> None:
    p = _zero_window_pair(sim)
    c, s = connect(p)
    p.a.events(), p.b.events()
    data = random.Random(3).randbytes(200_000)
    written = _fill(p, c, data)
    # The server never reads: the client holds its send buffer, the server its window.
    assert written == SND + RCV
    assert s.readable == RCV
    assert c.primary.snd_wnd == 0
    p.a.events()
    # The client keeps probing the zero window, with a backoff.
    t0 = p.net.now
    p.net.run_for(30.0)
    probes = [x for x in p.sim.sent(A[0]) if x.time > t0 and x.pkt.tcp is not None]
    assert 3 <= len(probes) <= 12, [round(x.time, 2) for x in probes]
    assert all(x.pkt.payload == b"" for x in probes)
    gaps = [b2.time - b1.time for b1, b2 in itertools.pairwise(probes)]
    assert gaps == sorted(gaps)
    assert c.state is State.ESTABLISHED and s.state is State.ESTABLISHED
    # The server reads: the transfer resumes and completes byte-exact.
    got = bytearray()
    got += s.read()
    p.net.kick(p.b)
    for _ in range(2000):
        if written < len(data):
            written += c.write(data[written:])
            p.net.kick(p.a)
        p.net.run_for(0.05)
        got += s.read()
        p.net.kick(p.b)
        if len(got) == len(data):
            break
    assert bytes(got) == data
    assert SendSpaceAvailable in kinds(p.a.events())
    c.shutdown()
    p.net.kick(p.a)
    p.sim.run_until(lambda: s.at_eof, 5)


def test_zero_window_lost_window_update_recovered_by_probe(sim: Callable[..., Sim]) -> None:
    state = {"armed": False, "dropped": 0}

    def lose_window_update(d: bytes, src: Address, dst: Address) -> bool:
        if not state["armed"] or src != B:
            return False
        pk = decode_packet(d)
        if pk.control is None and pk.tcp is not None and pk.tcp.window > 0 and not pk.payload:
            state["armed"] = False
            state["dropped"] += 1
            return True
        return False

    p = _zero_window_pair(sim, lose_window_update)
    c, s = connect(p)
    data = random.Random(4).randbytes(100_000)
    written = _fill(p, c, data)
    assert written == SND + RCV and c.primary.snd_wnd == 0
    state["armed"] = True
    got = bytearray(s.read())
    p.net.kick(p.b)
    assert state["dropped"] == 1
    p.net.run_for(20.0)  # a few persist probes later the sender must know the window
    got += s.read()
    # The sender learnt of the open window from a probe's answer and filled it again.
    assert len(got) > RCV

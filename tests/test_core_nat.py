"""Behind NATs in the simulated network: RFC 4787's behaviours, the router's relay of the
SYN-ACK, migration, multipath and datagrams behind each, liveness defaults, ICMP.

The simulated NAT is checked against RFC 4787's definitions first (which outside sources a
mapping lets in); the protocol scenarios then run behind every kind.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyserval.core.host import HostCore, Listener
from pyserval.naming import ServiceID
from pyserval.sal import RelayExt, Rule, SalPacket, decode_packet
from pyserval.testing import LinkConfig, SimNetwork
from pyserval.testing.netsim import NatBehaviour
from pyserval.transport.config import StreamConfig
from pyserval.transport.connection import Connection, State
from pyserval.transport.events import (
    ConnectionFailed,
    ConnectionTimedOut,
    DatagramReceived,
    FlowMigrated,
)

Addr = tuple[str, int]
C1 = ("192.168.1.10", 40000)  # the client, inside the NAT
C2 = ("192.168.1.11", 40000)  # its second interface, inside the same NAT
PUBLIC = "203.0.113.1"  # the NAT's outside address
ROUTER = ("198.51.100.9", 7000)
SERVER = ("198.51.100.2", 54325)
SERVER2 = ("198.51.100.3", 54325)
D = 0.005  # one-way delay of every link

EI: NatBehaviour = "endpoint-independent"
AD: NatBehaviour = "address-dependent"
APD: NatBehaviour = "address-and-port-dependent"
KINDS: dict[str, dict[str, Any]] = {
    "full-cone": {"mapping": EI, "filtering": EI},
    "address-restricted": {"mapping": EI, "filtering": AD},
    "port-restricted": {"mapping": EI, "filtering": APD},
    "address-dependent-mapping": {"mapping": AD, "filtering": AD},
    "symmetric": {"mapping": APD, "filtering": APD},
    "symmetric-icmp": {"mapping": APD, "filtering": APD, "icmp": True, "timeout": 30.0},
}
DATA = random.Random(19).randbytes(300_000)


# -- the simulated NAT itself ----------------------------------------------------------------


class _Sink:
    """A node that records what it receives and sends what it is told."""

    def __init__(self) -> None:
        self.got: list[tuple[bytes, Addr, Addr]] = []
        self.out: list[tuple[bytes, Addr, Addr]] = []
        self.unreachable: list[Addr] = []

    def receive_datagram(self, data: bytes, src: Addr, dst: Addr, now: float) -> None:
        self.got.append((data, src, dst))

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Addr, Addr]]:
        out, self.out = self.out, []
        return out

    def next_deadline(self) -> float | None:
        return None

    def handle_timer(self, now: float) -> None:
        pass

    def on_unreachable(self, remote: Addr, now: float) -> None:
        self.unreachable.append(remote)


def _nat_net(**kind: Any) -> tuple[SimNetwork, _Sink, dict[Addr, _Sink]]:
    net = SimNetwork(seed=1, default_link=LinkConfig(delay=D))
    inside = _Sink()
    net.attach(inside, C1)
    server = _Sink()
    outside = {ROUTER: _Sink(), SERVER: server, (SERVER[0], 9999): server}
    net.attach(outside[ROUTER], ROUTER)
    net.attach(outside[SERVER], SERVER, (SERVER[0], 9999))
    net.add_nat([C1[0]], PUBLIC, **kind)
    return net, inside, outside


def _send(net: SimNetwork, node: _Sink, data: bytes, src: Addr, dst: Addr) -> None:
    node.out.append((data, src, dst))
    net.kick(node)
    net.run_for(0.1)


@pytest.mark.parametrize(
    ("mapping", "filtering", "same_port_to_other_host", "in_from"),
    [
        # RFC 4787 section 4.1 (mapping) and section 5 (filtering), after the client sent
        # to ROUTER only: who may then send in to the mapped port?
        (EI, EI, True, {"router", "server", "server-other-port"}),
        (EI, AD, True, {"router"}),
        (EI, APD, True, {"router"}),
        (AD, AD, False, {"router"}),
        (APD, APD, False, {"router"}),
    ],
)
def test_nat_behaviours_follow_rfc_4787(
    mapping: NatBehaviour, filtering: NatBehaviour, same_port_to_other_host: bool, in_from: set[str]
) -> None:
    net, inside, outside = _nat_net(mapping=mapping, filtering=filtering)
    _send(net, inside, b"to-router", C1, ROUTER)
    ((_, public, _),) = outside[ROUTER].got
    assert public[0] == PUBLIC
    senders = {"router": ROUTER, "server": SERVER, "server-other-port": (SERVER[0], 9999)}
    let_in = set()
    for name, addr in senders.items():
        node = outside[ROUTER] if addr == ROUTER else outside[SERVER]
        before = len(inside.got)
        _send(net, node, name.encode(), addr, public)
        if len(inside.got) > before:
            let_in.add(name)
    assert let_in == in_from
    # Then the client sends to the server: a new outside port unless mapping is EI, and
    # the server may answer from the address it was sent to (and, with AD, any port).
    _send(net, inside, b"to-server", C1, SERVER)
    (_, public2, _) = outside[SERVER].got[-1]
    assert (public2 == public) is same_port_to_other_host
    before = len(inside.got)
    _send(net, outside[SERVER], b"answer", SERVER, public2)
    assert len(inside.got) == before + 1


def test_nat_mapping_times_out_and_the_icmp_kind_answers() -> None:
    net, inside, outside = _nat_net(mapping=EI, filtering=APD, timeout=30.0, icmp=True)
    _send(net, inside, b"hello", C1, ROUTER)
    ((_, public, _),) = outside[ROUTER].got
    net.run_for(29.0)
    _send(net, outside[ROUTER], b"in time", ROUTER, public)  # inbound does not refresh
    assert len(inside.got) == 1
    net.run_for(1.0)
    _send(net, outside[ROUTER], b"too late", ROUTER, public)
    assert len(inside.got) == 1
    assert outside[ROUTER].unreachable == [public]  # the ICMP kind says so
    _send(net, inside, b"again", C1, ROUTER)
    assert outside[ROUTER].got[-1][1] != public  # a new mapping, a new port


# -- the protocol behind each NAT --------------------------------------------------------------


class Behind:
    """A client behind a NAT of one kind, a router and two instances on public addresses."""

    def __init__(self, kind: str, *, relay: bool = True, config: StreamConfig | None = None):
        self.net = net = SimNetwork(seed=2, default_link=LinkConfig(delay=D))
        cfg = config or StreamConfig(send_buffer=1 << 20, receive_buffer=1 << 20)
        self.client = HostCore([C1, C2], rng=random.Random(1), config=cfg)
        self.router = HostCore([ROUTER], rng=random.Random(2), forwarding=True)
        self.server = HostCore([SERVER], rng=random.Random(3), config=cfg, nat_relay=relay)
        self.server2 = HostCore([SERVER2], rng=random.Random(4), config=cfg, nat_relay=relay)
        for host, addrs in (
            (self.client, (C1, C2)),
            (self.router, (ROUTER,)),
            (self.server, (SERVER,)),
            (self.server2, (SERVER2,)),
        ):
            net.attach(host, *addrs)
        self.nat = net.add_nat([C1[0], C2[0]], PUBLIC, **KINDS[kind])
        # As the runtime does: the client's router and the instances' router are trusted.
        self.client.service_table.add("0" * 64 + "/0", Rule.forward(ROUTER))
        self.client.trusted_forwarders.add(ROUTER)
        for srv in (self.server, self.server2):
            srv.trusted_forwarders.add(ROUTER)
        self.router.service_table.add("svc", Rule.forward(SERVER))
        self.router.service_table.add("dgram", Rule.forward(SERVER2))
        self.listener: Listener = self.server.listen("svc")
        self.through_router = 0
        self.sent_by: Counter[Addr] = Counter()
        net.tap = self._tap

    def _tap(self, now: float, data: bytes, src: Addr, dst: Addr, fate: str) -> None:
        if fate == "delivered" and ROUTER in (src, dst):
            self.through_router += 1
        elif fate == "sent":
            self.sent_by[src] += 1

    def connect(self, timeout: float = 5.0) -> tuple[Connection, Connection, float]:
        t0 = self.net.now
        conn = self.client.connect("svc", t0)
        self.net.kick(self.client)
        got: list[Connection] = []
        established: list[float] = []

        def ready() -> bool:
            c = self.listener.accept()
            if c is not None:
                got.append(c)
            if conn.state is State.ESTABLISHED and not established:
                established.append(self.net.now)
            return bool(got) and conn.state is State.ESTABLISHED

        assert self.net.run_until(ready, timeout), f"no connection: {conn.state} {conn.error}"
        return conn, got[0], established[0] - t0

    def exchange(self, c: Connection, s: Connection, data: bytes, limit: float = 30.0) -> None:
        """``data`` both ways at once; asserts both arrive whole."""
        net = self.net
        t0 = net.now
        up = down = 0
        got_up, got_down = bytearray(), bytearray()
        while (len(got_up) < len(data) or len(got_down) < len(data)) and net.now < t0 + limit:
            up += c.write(data[up:])
            down += s.write(data[down:])
            net.kick(self.client, self.server)
            net.run_for(0.01)
            got_up += s.read()
            got_down += c.read()
        assert bytes(got_up) == data, f"up: {len(got_up)} of {len(data)}"
        assert bytes(got_down) == data, f"down: {len(got_down)} of {len(data)}"
        assert self.client.internal_errors == [] and self.server.internal_errors == []


@pytest.mark.parametrize("kind", KINDS)
def test_connect_through_the_router_behind_each_nat(kind: str) -> None:
    b = Behind(kind)
    c, s, took = b.connect()
    # A direct answer takes C->R->I->C (3 one-way delays); through the relay C->R->I->R->C
    # (4), and the instance hears the third ACK after a 5th: at most one more round trip
    # to the router than a direct answer, never a retransmission.
    assert took <= 4 * D + 1e-9, took
    b.exchange(c, s, DATA)
    # The router carried the SYN, the relay request and the relayed SYN-ACK, no data.
    assert b.router.stats["forwarded_syn"] == 1
    assert b.through_router <= 4, b.through_router
    remote = s.primary.remote_addr
    assert remote is not None and remote[0] == PUBLIC
    if KINDS[kind]["mapping"] != EI:
        # A new outside port towards the instance: adopted through the address challenge.
        assert b.server.stats["rebinding_challenge"] == 1


@pytest.mark.parametrize("kind", ["port-restricted", "symmetric"])
def test_without_the_relay_a_restricted_nat_drops_every_synack(kind: str) -> None:
    """The case issue 19 reported, kept as the control: instances that answer only
    directly are never heard behind these NATs."""
    b = Behind(kind, relay=False)
    conn = b.client.connect("svc", b.net.now)
    b.net.kick(b.client)
    b.net.run_for(5.0)
    assert conn.state is State.SYN_SENT
    assert b.nat.dropped >= 2


@pytest.mark.parametrize("kind", KINDS)
def test_migration_behind_each_nat(kind: str) -> None:
    b = Behind(kind)
    c, s, _ = b.connect()
    b.exchange(c, s, DATA[:50_000])
    assert b.client.migrate(c, C2, b.net.now)
    b.net.kick(b.client)
    b.exchange(c, s, DATA)
    assert c.primary.local_addr == C2
    moved = [e for e in b.client.events() if isinstance(e, FlowMigrated)]
    assert moved and moved[-1].reason == "migrated"


@pytest.mark.parametrize("kind", KINDS)
def test_multipath_behind_each_nat(kind: str) -> None:
    cfg = StreamConfig(send_buffer=1 << 20, receive_buffer=1 << 20, multipath=True)
    b = Behind(kind, config=cfg)
    c, s, _ = b.connect()
    assert c.mp is not None
    b.client.add_path(c, C2, SERVER, b.net.now)
    b.net.kick(b.client)
    b.net.run_for(0.5)
    assert len(c.live_subflows()) == 2 and len(s.live_subflows()) == 2
    b.exchange(c, s, DATA)


@pytest.mark.parametrize("kind", KINDS)
def test_datagram_answers_reach_a_client_behind_each_nat(kind: str) -> None:
    b = Behind(kind)
    mine = b.client.bind_datagram("me")
    ep = b.server2.bind_datagram("dgram")
    for i in range(20):
        b.client.send_datagram(mine, "dgram", b"ping %d" % i)
    b.net.kick(b.client)
    b.net.run_for(0.1)
    pings = [e for e in b.server2.events() if isinstance(e, DatagramReceived)]
    assert len(pings) == 20 and {e.address[0] for e in pings} == {PUBLIC}
    for e in pings:  # the instance answers the address it saw (as recvfrom/sendto do)
        b.server2.send_datagram(ep, "me", b"pong " + e.data, to=e.address)
    b.net.kick(b.server2)
    b.net.run_for(0.1)
    pongs = [e for e in b.client.events() if isinstance(e, DatagramReceived)]
    assert sorted(e.data for e in pongs) == sorted(b"pong ping %d" % i for i in range(20))
    # The client sees the instance's own address (the router only relayed) ...
    assert {(e.address, e.via) for e in pongs} == {(SERVER2, ROUTER)}
    # ... and answering it there goes straight, which opens the NAT: the instance's next
    # answers go straight back.
    b.client.send_datagram(mine, "dgram", b"direct", to=SERVER2)
    b.net.kick(b.client)
    b.net.run_for(0.1)
    (direct,) = [e for e in b.server2.events() if isinstance(e, DatagramReceived)]
    assert direct.via is None
    relayed_before = b.router.stats["relayed"]
    b.server2.send_datagram(ep, "me", b"straight back", to=direct.address)
    b.net.kick(b.server2)
    b.net.run_for(0.1)
    (back,) = [e for e in b.client.events() if isinstance(e, DatagramReceived)]
    assert back.data == b"straight back" and back.via is None
    assert b.router.stats["relayed"] == relayed_before


def test_a_router_relays_only_to_addresses_its_own_tag_names() -> None:
    b = Behind("port-restricted")
    c, _s, _ = b.connect()
    assert b.router.stats["relayed"] == 1
    # A relay request with a forged tag, or the right tag for another address, is dropped.
    captured: list[bytes] = []
    b.net.tap = lambda now, data, src, dst, fate: (
        captured.append(data) if fate == "sent" and dst == ROUTER and src == SERVER else None
    )
    conn = b.client.connect("svc", b.net.now)
    b.net.kick(b.client)
    b.net.run_until(lambda: conn.state is State.ESTABLISHED, 5)
    (request,) = captured
    pkt = decode_packet(request)
    relay = pkt.find(RelayExt)
    assert relay is not None and relay.is_request and relay.address[0] == PUBLIC
    others = [e for e in pkt.extensions if e is not relay]
    for forged in (
        RelayExt(relay.address, b"x" * 8),  # a tag the router did not make
        RelayExt(("198.51.100.66", 53), relay.tag),  # its tag, another address
    ):
        pkt.extensions = [*others, forged]
        b.router.receive_datagram(pkt.encode(SERVER[0], ROUTER[0]), SERVER, ROUTER, b.net.now)
    assert b.router.drops["relay_bad_tag"] == 2
    assert b.router.datagrams_to_send(b.net.now) == []
    assert c.state is State.ESTABLISHED


# -- liveness --------------------------------------------------------------------------------


def _pair(config: StreamConfig, kind: str | None = None) -> Behind:
    return Behind(kind or "full-cone", config=config)


def test_liveness_defaults() -> None:
    cfg = StreamConfig()
    assert cfg.keepalive is not None and cfg.keepalive <= 25.0
    assert cfg.keepalive + cfg.keepalive_probes * cfg.keepalive_interval <= 60.0
    assert cfg.user_timeout is not None and cfg.user_timeout <= 60.0
    with pytest.raises(ValueError, match="keepalive"):
        StreamConfig(keepalive=0)
    with pytest.raises(ValueError, match="user_timeout"):
        StreamConfig(user_timeout=-1)


def test_with_defaults_an_idle_reader_learns_of_a_dead_peer_within_60_s() -> None:
    b = _pair(StreamConfig())
    c, _s, _ = b.connect()
    b.client.events()
    t0 = b.net.now
    b.net.detach(b.server)  # the peer vanishes: UDP says nothing
    assert b.net.run_until(lambda: c.closed, 120)
    assert b.net.now - t0 <= 60.0
    (ev,) = [e for e in b.client.events() if isinstance(e, ConnectionTimedOut)]
    assert "keepalive" in ev.reason


def test_with_defaults_a_sender_facing_a_silent_peer_gives_up_within_60_s() -> None:
    b = _pair(StreamConfig())
    c, s, _ = b.connect()
    b.exchange(c, s, DATA[:10_000])
    b.net.cut(PUBLIC, SERVER[0])  # the peer stops answering (SIGSTOP)
    b.net.cut(C1[0], SERVER[0])
    t0 = b.net.now
    c.write(DATA[:100_000])
    b.net.kick(b.client)
    assert b.net.run_until(lambda: c.closed, 120)
    assert b.net.now - t0 <= 60.0
    assert c.error is not None and "timed out" in c.error


def test_user_timeout_ends_a_transfer_that_stays_unacknowledged() -> None:
    cfg = StreamConfig(user_timeout=5.0, keepalive=None, max_retransmissions=100)
    b = _pair(cfg)
    c, _s, _ = b.connect()
    b.net.cut(C1[0], SERVER[0])
    t0 = b.net.now
    c.write(b"x" * 5000)
    b.net.kick(b.client)
    assert b.net.run_until(lambda: c.closed, 60)
    assert 5.0 <= b.net.now - t0 <= 5.5
    assert c.error is not None and "user timeout" in c.error


def test_keepalive_alone_sends_probes_and_keeps_a_nat_mapping_open() -> None:
    # keepalive without idle_timeout (silently ignored before issue 19); a NAT that forgets
    # a mapping after 30 s idle: the server's data still gets in after 10 minutes.
    cfg = StreamConfig(keepalive=20.0, keepalive_interval=20.0)
    b = Behind("port-restricted", config=cfg)
    b.nat.timeout = 30.0
    c, s, _ = b.connect()
    t0 = b.net.now
    b.sent_by.clear()
    b.net.run_for(600.0)
    # Both ends probe after 20 s of silence and answer each other: 600 / 20 = 30 rounds.
    assert 20 <= b.sent_by[C1] <= 60 and 20 <= b.sent_by[SERVER] <= 60, b.sent_by
    s.write(b"late news")
    b.net.kick(b.server)
    b.net.run_for(0.1)
    assert c.read() == b"late news"
    assert c.state is State.ESTABLISHED and b.net.now - t0 > 600


def test_after_a_mapping_expired_the_server_data_goes_out_when_the_client_is_heard() -> None:
    cfg = StreamConfig(keepalive=None)
    b = Behind("port-restricted", config=cfg)
    b.nat.timeout = 30.0
    c, s, _ = b.connect()
    b.net.run_for(60.0)  # idle, no keepalive: the mapping expires
    s.write(b"while you were away")
    b.net.kick(b.server)
    b.net.run_for(20.0)  # RTOs back off at 1, 2, 4, 8 ... s into a closed NAT
    assert c.read() == b""
    t_speak = b.net.now
    c.write(b"hello again")
    b.net.kick(b.client)
    assert b.net.run_until(lambda: c.readable > 0, 10)
    # A new outside port: the address challenge (one round trip) and the resend at once,
    # not the next backed-off timeout (16 s away).
    assert b.net.now - t_speak < 0.1
    assert c.read() == b"while you were away"


def test_a_peer_heard_again_after_a_cut_gets_our_data_at_once() -> None:
    cfg = StreamConfig(keepalive=None)
    b = Behind("full-cone", config=cfg)
    c, s, _ = b.connect()
    b.net.cut(PUBLIC, SERVER[0])
    b.net.cut(C1[0], SERVER[0])
    s.write(b"x" * 3000)
    b.net.kick(b.server)
    b.net.run_for(20.0)
    b.net.restore(PUBLIC, SERVER[0])
    b.net.restore(C1[0], SERVER[0])
    t_speak = b.net.now
    c.write(b"ping")
    b.net.kick(b.client)
    assert b.net.run_until(lambda: c.readable >= 3000, 10)
    assert b.net.now - t_speak < 0.1
    assert s.stats_heard_again == 1


def test_icmp_from_a_nat_is_soft_for_an_established_flow_and_hard_for_a_syn() -> None:
    cfg = StreamConfig(keepalive=None)
    b = Behind("symmetric-icmp", config=cfg)
    c, s, _ = b.connect()
    b.net.run_for(40.0)  # past the 30 s mapping timeout
    s.write(b"a" * 20_000)
    b.net.kick(b.server)
    b.net.run_for(8.0)
    assert b.server.stats["icmp_unreachable"] >= 3
    assert s.state is State.ESTABLISHED  # three ICMPs used to reset it here
    c.write(b"back")
    b.net.kick(b.client)
    assert b.net.run_until(lambda: c.readable >= 20_000, 10)
    # A SYN towards an address whose NAT answers ICMP fails at once.
    net = b.net
    lone = HostCore([("198.51.100.50", 54324)], rng=random.Random(9))
    net.attach(lone, ("198.51.100.50", 54324))
    lone.service_table.add("svc", Rule.forward((PUBLIC, 12345)))
    conn = lone.connect("svc", net.now)
    net.kick(lone)
    net.run_for(0.1)
    assert conn.state is State.CLOSED and "unreachable" in (conn.error or "")
    assert any(isinstance(e, ConnectionFailed) for e in lone.events())


@pytest.mark.parametrize("what", ["syn", "datagram", "syn-padded"])
def test_a_relay_marker_is_filled_in_alike_by_the_fast_and_the_general_path(what: str) -> None:
    from pyserval.sal import PadExt
    from pyserval.sal.forwarding import forward_packet

    client = HostCore([C1], rng=random.Random(7))
    client.service_table.add("0" * 64 + "/0", Rule.forward(ROUTER))
    client.trusted_forwarders.add(ROUTER)
    if what.startswith("syn"):
        client.connect("svc", 0.0)
    else:
        client.send_datagram(client.bind_datagram("me"), "dgram", b"ping")
    ((data, _, _),) = client.datagrams_to_send(0.0)
    if what == "syn-padded":  # the marker at an odd offset: the checksum's other half
        pkt = decode_packet(data)
        pkt.extensions.insert(2, PadExt())
        data = pkt.encode(C1[0], ROUTER[0])
    marker = decode_packet(data).find(RelayExt)
    assert marker is not None and marker.is_marker
    router = HostCore([ROUTER], rng=random.Random(2), forwarding=True)
    router.service_table.add("0" * 64 + "/0", Rule.forward(SERVER))
    router.receive_datagram(data, C1, ROUTER, 0.0)  # the fast path
    ((fast, _, hop),) = router.datagrams_to_send(0.0)
    assert hop == SERVER and router.drops == {}
    general = forward_packet(data, decode_packet(data), C1, ROUTER, SERVER, router._relay_tag)
    if what != "syn-padded":
        assert fast == general
    else:  # the general path drops PAD; the fast one keeps every byte it does not fill

        def exts(raw: bytes) -> list[object]:
            return [e for e in decode_packet(raw).extensions if type(e) is not PadExt]

        assert exts(fast) == exts(general)
    filled = decode_packet(fast).find(RelayExt)  # the checksum holds: it decodes
    assert filled is not None and filled.address == C1 and filled.is_request
    assert router._relay_tag_ok(C1, filled.tag) and not router._relay_tag_ok(C2, filled.tag)


@pytest.mark.parametrize("kind", ["port-restricted", "symmetric"])
def test_through_a_router_hierarchy_the_first_router_relays(kind: str) -> None:
    """Client -> edge router -> datacenter router -> instance: the copy of the SYN-ACK
    goes to the edge router, the one the client's NAT knows and whose tag it carries."""
    b = Behind(kind)
    dc_addr = ("198.51.100.8", 7000)
    dc = HostCore([dc_addr], rng=random.Random(8), forwarding=True)
    b.net.attach(dc, dc_addr)
    b.router.service_table.remove("svc")
    b.router.service_table.add("svc", Rule.forward(dc_addr))
    dc.service_table.add("svc", Rule.forward(SERVER))
    b.server.trusted_forwarders.add(dc_addr)
    c, s, took = b.connect()
    assert took <= 5 * D + 1e-9, took  # one more hop each way than with one router
    assert dc.stats["forwarded_syn"] == 1 and b.router.stats["relayed"] == 1
    assert dc.drops == {}
    b.exchange(c, s, DATA[:100_000])


@settings(max_examples=200, deadline=None)
@given(
    st.tuples(st.sampled_from(["203.0.113.1", "198.51.100.66", "0.0.0.0"]), st.integers(0, 65535)),
    st.binary(min_size=8, max_size=8),
    st.integers(0, 255),
    st.integers(0, 2**32 - 1),
    st.booleans(),
)
def test_a_router_never_relays_on_a_tag_it_did_not_make(
    address: Addr, tag: bytes, flags: int, dst_flowid: int, datagram: bool
) -> None:
    router = HostCore([ROUTER], rng=random.Random(2), forwarding=True)
    router.service_table.add("0" * 64 + "/0", Rule.forward(SERVER))
    if datagram:
        from pyserval.sal import ServiceExt
        from pyserval.sal.transport_headers import UdpHeader

        exts: list[Any] = [ServiceExt(ServiceID.from_name("x")), RelayExt(address, tag)]
        pkt = SalPacket(1, 0, 17, exts, UdpHeader(), b"data")
    else:
        from pyserval.sal import ControlExt
        from pyserval.sal.transport_headers import TcpHeader

        exts = [ControlExt(flags, 1, 2, bytes(8)), RelayExt(address, tag)]
        pkt = SalPacket(1, dst_flowid, 6, exts, TcpHeader(seq=1, flags=0x12))
    router.receive_datagram(pkt.encode(SERVER[0], ROUTER[0]), SERVER, ROUTER, 1.0)
    out = router.datagrams_to_send(1.0)
    assert router.internal_errors == []
    assert router.stats["relayed"] == 0
    assert all(dst != address for _, _, dst in out)


@pytest.mark.parametrize("kind", ["port-restricted", "symmetric-icmp"])
def test_with_defaults_a_30_s_nat_mapping_stays_open_through_a_long_idle(kind: str) -> None:
    b = Behind(kind, config=StreamConfig())
    b.nat.timeout = 30.0
    c, s, _ = b.connect()
    dropped = b.nat.dropped  # the direct SYN-ACK, filtered (the relayed one got in)
    b.net.run_for(900.0)  # 15 minutes with nothing to say
    t0 = b.net.now
    s.write(b"still there?")
    b.net.kick(b.server)
    assert b.net.run_until(lambda: c.readable > 0, 1.0)
    assert b.net.now - t0 < 0.05  # one way, no retransmission: the mapping was open
    assert c.read() == b"still there?" and b.nat.dropped == dropped

"""Forwarding in the sans-I/O core: routers, the SOURCE path, DELAY, loops, broadcast."""

from __future__ import annotations

import random
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from pyserval.core.host import HostCore, Listener
from pyserval.naming import ServiceID
from pyserval.sal import ControlFlags, Rule, SourceExt, SourcePortsExt, decode_packet
from pyserval.sal.forwarding import ForwardRefused, forward_packet
from pyserval.testing import LinkConfig, SimNetwork
from pyserval.transport.connection import Connection, State
from pyserval.transport.events import DatagramReceived

CLIENT = ("10.0.0.1", 40000)
ROUTER = ("10.0.0.9", 7000)
ROUTER2 = ("10.0.0.8", 7000)
SERVER = ("10.0.0.2", 54325)
SERVER2 = ("10.0.0.3", 54325)
Addr = tuple[str, int]
ZERO = bytes(4)  # dst_flowid of a SYN


def _net(seed: int = 1) -> SimNetwork:
    return SimNetwork(seed=seed, default_link=LinkConfig(delay=0.002))


def _host(net: SimNetwork, addr: tuple[str, int], seed: int, **kw: object) -> HostCore:
    host = HostCore([addr], rng=random.Random(seed), **kw)  # type: ignore[arg-type]
    net.attach(host, addr)
    return host


def _transfer(net: SimNetwork, client: HostCore, server_listener: Listener, size: int) -> None:
    conn = client.connect("svc", net.now)
    net.kick(client)
    accepted: list[Connection] = []

    def ready() -> bool:
        srv = server_listener.accept()
        if srv is not None:
            accepted.append(srv)
        return conn.state is State.ESTABLISHED and bool(accepted)

    assert net.run_until(ready, 30)
    srv = accepted[0]
    data = bytes(range(256)) * (size // 256)
    sent = 0
    got = bytearray()
    while len(got) < len(data):
        sent += conn.write(data[sent:])
        net.kick(client)
        net.run_for(0.01)
        got += srv.read()
    assert bytes(got) == data


def test_forwarded_syn_is_answered_directly_and_data_bypasses_the_router() -> None:
    net = _net()
    client = _host(net, CLIENT, 1)
    router = _host(net, ROUTER, 2, forwarding=True)
    server = _host(net, SERVER, 3)
    client.service_table.add("svc", Rule.forward(ROUTER))
    router.service_table.add("svc", Rule.forward(SERVER))
    listener = server.listen("svc")
    seen: Counter[tuple[tuple[str, int], tuple[str, int]]] = Counter()
    syn_paths: list[list[tuple[str, int]] | None] = []

    def tap(now: float, data: bytes, src: tuple[str, int], dst: tuple[str, int], what: str) -> None:
        if what == "delivered":
            seen[(src, dst)] += 1
            if dst == SERVER and src == ROUTER:
                syn_paths.append(decode_packet(data).source_path())

    net.tap = tap
    _transfer(net, client, listener, 200_000)
    assert router.stats["forwarded_syn"] == 1
    # Through the router: the SYN only; its path names the client with its UDP port.
    assert seen[(CLIENT, ROUTER)] == 1 and seen[(ROUTER, SERVER)] == 1
    assert syn_paths == [[CLIENT, ROUTER]]
    # The data (200 kB: at least 142 segments of at most 1,408 bytes) and the ACKs go
    # directly (how many ACKs depends on how the server reads: one per run under GRO).
    assert seen[(CLIENT, SERVER)] >= 200_000 // 1408 and seen[(SERVER, CLIENT)] >= 2
    assert sum(n for (s, d), n in seen.items() if ROUTER in (s, d)) == 2


def test_two_routers_append_to_the_path_and_a_loop_is_dropped() -> None:
    net = _net()
    client = _host(net, CLIENT, 1)
    edge = _host(net, ROUTER, 2, forwarding=True)
    dc = _host(net, ROUTER2, 3, forwarding=True)
    server = _host(net, SERVER, 4)
    client.service_table.add("svc", Rule.forward(ROUTER))
    edge.service_table.add("svc", Rule.forward(ROUTER2))
    dc.service_table.add("svc", Rule.forward(SERVER))
    listener = server.listen("svc")
    _transfer(net, client, listener, 10_000)
    assert edge.stats["forwarded_syn"] == 1 and dc.stats["forwarded_syn"] == 1

    # A misconfigured pair of routers pointing at each other: the SYN dies at once.
    other = ServiceID.from_name("looping")
    client.service_table.add(other, Rule.forward(ROUTER))
    edge.service_table.add(other, Rule.forward(ROUTER2))
    dc.service_table.add(other, Rule.forward(ROUTER))
    conn = client.connect(other, net.now)
    net.kick(client)
    net.run_for(1.0)
    assert conn.state is State.SYN_SENT
    assert edge.drops["loop"] + dc.drops["loop"] == 1


def test_forward_packet_refuses_long_paths_and_keeps_the_transport_bytes() -> None:
    client = HostCore([CLIENT], rng=random.Random(5))
    client.service_table.add("svc", Rule.forward(ROUTER))
    client.connect("svc", 0.0)
    ((data, _, _),) = client.datagrams_to_send(0.0)
    pkt = decode_packet(data)
    out = forward_packet(data, pkt, CLIENT, ROUTER, SERVER)
    fwd = decode_packet(out)
    assert fwd.source_path() == [CLIENT, ROUTER]
    assert data[pkt.shl * 4 :] == out[fwd.shl * 4 :]  # TCP header and options untouched
    hops = [(f"10.1.0.{i}", 7000) for i in range(25)]
    for i in range(18):
        out = forward_packet(out, decode_packet(out), hops[i], hops[i + 1], hops[i + 2])
    assert len(decode_packet(out).source_path() or []) == 20
    try:
        forward_packet(out, decode_packet(out), hops[19], hops[20], hops[21])
    except ForwardRefused as exc:
        assert exc.reason == "path_too_long"
    else:
        raise AssertionError("a 21-hop path was forwarded")


def test_reference_source_without_ports_answers_the_reference_client_port() -> None:
    client = HostCore([CLIENT], rng=random.Random(5))
    client.service_table.add("svc", Rule.forward(ROUTER))
    client.connect("svc", 0.0)
    ((data, _, _),) = client.datagrams_to_send(0.0)
    pkt = decode_packet(data)
    pkt.extensions.append(SourceExt(("10.0.0.1", "10.0.0.9")))
    assert pkt.source_ports is None
    assert pkt.source_path() == [("10.0.0.1", 54324), ("10.0.0.9", 54324)]
    pkt.extensions.append(SourcePortsExt((1, 2)))
    assert decode_packet(pkt.encode()).source_path() == [("10.0.0.1", 1), ("10.0.0.9", 2)]


def test_delay_holds_syns_until_the_verdict() -> None:
    net = _net()
    client = _host(net, CLIENT, 1)
    router = _host(net, ROUTER, 2, forwarding=True, max_delayed=3)
    server = _host(net, SERVER, 3)
    client.service_table.add("0" * 64 + "/0", Rule.forward(ROUTER))
    router.service_table.add("svc", Rule.delay())
    listener = server.listen("svc")
    conns = [client.connect("svc", net.now) for _ in range(5)]
    net.kick(client)
    net.run_for(0.5)
    assert len(router.delayed) == 3 and router.drops["delay_queue_full"] == 2
    assert router.take_delay_requests() == [ServiceID.from_name("svc")]
    assert router.take_delay_requests() == []  # asked once, until answered
    assert router.release_delayed("svc", SERVER, net.now) == 3
    net.kick(router)
    assert net.run_until(lambda: sum(c.state is State.ESTABLISHED for c in conns) == 3, 1.0)
    net.run_for(0.1)  # the third ACKs
    assert len(listener.accept_queue) == 3
    # The other two were dropped at the full queue; their SYN retransmissions are held again
    # and this time the verdict is to drop them. The first retransmission goes at 1 s (the
    # initial control RTO), the next at 3 s: run until between the two.
    net.run_for(1.6 - net.now)
    assert router.take_delay_requests() == [ServiceID.from_name("svc")]
    assert router.release_delayed("svc", None, net.now) == 2
    assert router.drops["delay_verdict_drop"] == 2
    assert sum(c.state is State.SYN_SENT for c in conns) == 2


def test_local_connect_under_delay_asks_and_follows_the_verdict() -> None:
    net = _net()
    client = _host(net, CLIENT, 1)
    server = _host(net, SERVER, 3)
    client.service_table.add("svc", Rule.delay())
    listener = server.listen("svc")
    conn = client.connect("svc", net.now)
    net.kick(client)
    net.run_for(0.1)
    assert client.take_delay_requests() == [ServiceID.from_name("svc")]
    client.release_delayed("svc", SERVER, net.now)
    net.kick(client)
    assert net.run_until(lambda: conn.state is State.ESTABLISHED, 1.0)
    net.run_for(0.1)
    assert listener.accept() is not None


class _Duplicator:
    """Wraps a host: SYNs it sends to ``to`` also go to ``also`` (a broadcast stand-in)."""

    def __init__(self, core: HostCore, to: tuple[str, int], also: tuple[str, int]) -> None:
        self.core, self.to, self.also = core, to, also

    def receive_datagram(self, data: bytes, src: Addr, dst: Addr, now: float) -> None:
        self.core.receive_datagram(data, src, dst, now)

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Addr, Addr]]:
        out = self.core.datagrams_to_send(now)
        syns = [(d, loc, self.also) for d, loc, rem in out if rem == self.to and d[4:8] == ZERO]
        return out + syns

    def next_deadline(self) -> float | None:
        return self.core.next_deadline()

    def handle_timer(self, now: float) -> None:
        self.core.handle_timer(now)


def test_first_answer_wins_and_the_loser_is_reset() -> None:
    """Two instances answer one SYN (as after a broadcast): the second gets RST."""
    net = _net()
    client = HostCore([CLIENT], rng=random.Random(1))
    node = _Duplicator(client, SERVER, SERVER2)
    net.attach(node, CLIENT)
    fast = _host(net, SERVER, 2)
    slow = _host(net, SERVER2, 3)
    net.set_path(CLIENT[0], SERVER2[0], LinkConfig(delay=0.05))
    lf, ls = fast.listen("svc"), slow.listen("svc")
    client.service_table.add("svc", Rule.forward(SERVER))
    conn = client.connect("svc", net.now)
    to_loser: list[bytes] = []
    net.tap = lambda t, d, src, dst, fate: (
        to_loser.append(d) if fate == "sent" and dst == SERVER2 else None
    )
    net.kick(node)
    net.run_for(1.0)
    assert conn.state is State.ESTABLISHED and conn.primary.remote_addr == SERVER
    assert client.stats["losing_synack"] == 1
    # The RST echoes the loser's nonce: the client's own never goes to the loser.
    for data in to_loser:
        ctl = decode_packet(data).control
        assert ctl is not None
        assert ctl.flags & ControlFlags.SYN or ctl.nonce != conn.primary.control.local_nonce
    assert lf.accept() is not None and ls.accept() is None
    assert not ls.half_open and not slow.connections


def test_a_router_never_rebroadcasts() -> None:
    net = _net()
    client = _host(net, CLIENT, 1)
    router = _host(net, ROUTER, 2, forwarding=True)
    bcast = ("10.0.0.255", 54325)
    router.broadcast.add(bcast)
    router.service_table.add("0" * 64 + "/0", Rule.forward(bcast))
    client.service_table.add("svc", Rule.forward(ROUTER))
    client.connect("svc", net.now)
    net.kick(client)
    net.run_for(0.1)
    assert router.drops["no_rebroadcast"] == 1 and router.stats["forwarded_syn"] == 0


def test_unconnected_datagrams_are_forwarded_and_show_the_original_sender() -> None:
    net = _net()
    client = _host(net, CLIENT, 1)
    router = _host(net, ROUTER, 2, forwarding=True)
    server = _host(net, SERVER, 3)
    client.service_table.add("0" * 64 + "/0", Rule.forward(ROUTER))
    router.service_table.add("svc", Rule.forward(SERVER))
    ep = server.bind_datagram("svc")
    mine = client.bind_datagram("me")
    client.send_datagram(mine, "svc", b"ping")
    net.kick(client)
    net.run_for(0.1)
    (event,) = [e for e in server.events() if isinstance(e, DatagramReceived)]
    assert event.conn_id == ep.flowid and event.data == b"ping" and event.address == CLIENT
    assert router.stats["forwarded_datagram"] == 1


def test_fast_first_hop_gives_the_same_bytes_as_the_general_path() -> None:
    from pyserval.sal.forwarding import FAST_SYN, first_hop_bytes, scan_for_forwarding

    client = HostCore([CLIENT], rng=random.Random(7))
    client.service_table.add("svc", Rule.forward(ROUTER))
    client.connect("svc", 0.0)
    ((data, _, _),) = client.datagrams_to_send(0.0)
    scan = scan_for_forwarding(data)
    assert scan is not None
    kind, service, hlen = scan
    assert kind == FAST_SYN and service == ServiceID.from_name("svc").value
    fast = first_hop_bytes(data, hlen, CLIENT, ROUTER)
    assert fast == forward_packet(data, decode_packet(data), CLIENT, ROUTER, SERVER)
    # Already forwarded, corrupted or not a SYN: the full decoder decides.
    assert scan_for_forwarding(fast) is None
    assert scan_for_forwarding(data[:10] + bytes(2) + data[12:]) is None
    assert scan_for_forwarding(data[:20]) is None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 199), st.integers(0, 255))
def test_router_fast_path_never_raises(junk: bytes, pos: int, value: int) -> None:
    """Random bytes, and a real SYN with one byte changed, never escape a router."""
    router = HostCore([ROUTER], rng=random.Random(3), forwarding=True)
    router.service_table.add("0" * 64 + "/0", Rule.forward(SERVER))
    client = HostCore([CLIENT], rng=random.Random(7))
    client.service_table.add("svc", Rule.forward(ROUTER))
    client.connect("svc", 0.0)
    ((syn, _, _),) = client.datagrams_to_send(0.0)
    mutated = bytearray(syn)
    mutated[pos % len(syn)] = value
    for data in (junk, bytes(mutated)):
        router.receive_datagram(data, CLIENT, ROUTER, 0.0)
    router.datagrams_to_send(0.0)
    assert router.internal_errors == []


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 2**32 - 1),
    st.binary(min_size=32, max_size=32),
    st.tuples(st.integers(0, 255), st.integers(0, 255), st.integers(1, 65535)),
)
def test_fast_first_hop_checksum_is_right_for_any_packet(
    flowid: int, service: bytes, addr: tuple[int, int, int]
) -> None:
    from pyserval.sal import ControlExt, ControlFlags, SalPacket, ServiceExt, TcpHeader
    from pyserval.sal.forwarding import first_hop_bytes, scan_for_forwarding

    ctl = ControlExt(ControlFlags.SYN, flowid, 0, bytes(8))
    pkt = SalPacket(flowid, 0, 6, [ctl, ServiceExt(ServiceID(service))], TcpHeader(), b"x")
    data = pkt.encode()
    scan = scan_for_forwarding(data)
    assert scan is not None
    came_from = (f"10.{addr[0]}.{addr[1]}.1", addr[2])
    fast = first_hop_bytes(data, scan[2], came_from, ROUTER)
    general = forward_packet(data, pkt, came_from, ROUTER, SERVER)
    assert fast[:10] == general[:10] and fast[12:] == general[12:]
    decoded = decode_packet(fast)  # verifies the incrementally updated checksum
    assert decoded.source_path() == [came_from, ROUTER] and bytes(decoded.payload) == b"x"

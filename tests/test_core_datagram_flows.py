"""Connected datagram flows (Serval UDP with a handshake) on the simulated network.

The expected bytes are built here from the layout in ``shared/spec/sal-wire.md`` ("Connected
datagram flows"): field by field with ``struct`` and an independent ones'-complement sum, not
with the codec under test.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyserval.core.host import HostCore, Listener
from pyserval.naming.service_id import ServiceID
from pyserval.sal import Rule, decode_packet
from pyserval.testing import Address, LinkConfig, SimNetwork
from pyserval.transport.config import StreamConfig
from pyserval.transport.connection import State
from pyserval.transport.datagram_flow import (
    MAX_FLOW_DATAGRAM,
    DatagramConnection,
    DatagramTooLarge,
)
from pyserval.transport.events import (
    ConnectionClosed,
    DatagramReceived,
    DatagramRefused,
    FlowMigrated,
    StreamEnded,
)

A: Address = ("10.0.0.1", 54324)
A2: Address = ("10.0.9.1", 54324)
B: Address = ("10.0.0.2", 54325)
SVC = ServiceID.parse("dgram-flow")


def ones_sum(data: bytes) -> int:
    """RFC 1071 checksum, written out here (independent of pyserval.sal.checksum)."""
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def sal_base(src: int, dst: int, shl: int, proto: int, rest: bytes) -> bytes:
    """Base header with its checksum over base + extensions (``rest``)."""
    head = struct.pack("!IIBBH", src, dst, shl, proto, 0) + rest
    return struct.pack("!IIBBH", src, dst, shl, proto, ones_sum(head)) + rest


def udp_header(src_ip: str, dst_ip: str, payload: bytes) -> bytes:
    length = 8 + len(payload)
    pseudo = bytes(map(int, src_ip.split("."))) + bytes(map(int, dst_ip.split(".")))
    pseudo += struct.pack("!BBH", 0, 17, length)
    check = ones_sum(pseudo + struct.pack("!HHHH", 0, 0, length, 0) + payload) or 0xFFFF
    return struct.pack("!HHHH", 0, 0, length, check)


def control(flags: int, verno: int, ackno: int, nonce: bytes) -> bytes:
    return struct.pack("!BBBBII", 0x10, 20, flags, 0, verno, ackno) + nonce


def service(sid: ServiceID) -> bytes:
    return struct.pack("!BBH", 0x20, 36, 0) + sid.to_bytes()


SYN, ACK, RST, FIN = 0x80, 0x20, 0x08, 0x04


class Net:
    def __init__(
        self, seed: int = 1, loss: float = 0.0, server_config: StreamConfig | None = None
    ) -> None:
        self.net = SimNetwork(
            seed=seed, default_link=LinkConfig(delay=0.005, loss=loss), trace=True
        )
        self.a = HostCore([A, A2], rng=random.Random(seed))
        self.b = HostCore([B], rng=random.Random(seed + 100), config=server_config)
        self.net.attach(self.a, A, A2)
        self.net.attach(self.b, B)
        self.a.service_table.add(SVC, Rule.forward(B))
        self.listener: Listener = self.b.listen(SVC, datagram=True)
        self.client: DatagramConnection | None = None
        self.server: DatagramConnection | None = None
        self.events: dict[str, list[object]] = {"a": [], "b": []}

    def connect(self, timeout: float = 60.0) -> tuple[DatagramConnection, DatagramConnection]:
        conn = self.a.connect(SVC, self.net.now, datagram=True)
        assert isinstance(conn, DatagramConnection)
        self.client = conn
        self.net.kick(self.a)

        def ready() -> bool:
            if self.server is None:
                got = self.listener.accept()
                if got is not None:
                    assert isinstance(got, DatagramConnection)
                    self.server = got
            return self.server is not None and conn.state is State.ESTABLISHED

        assert self.net.run_until(ready, timeout), "handshake did not complete"
        assert self.server is not None
        return conn, self.server

    def run(self, seconds: float) -> None:
        self.net.kick(self.a, self.b)
        self.net.run_for(seconds)
        self.events["a"] += self.a.events()
        self.events["b"] += self.b.events()

    def sent(self, src_ip: str) -> list[bytes]:
        return [ev.data for ev in self.net.trace if ev.fate == "sent" and ev.src[0] == src_ip]


@pytest.fixture
def n() -> Iterator[Net]:
    net = Net()
    yield net
    assert net.a.internal_errors == [] and net.b.internal_errors == []


def drain(conn: DatagramConnection) -> list[bytes]:
    out = []
    while (d := conn.receive_datagram()) is not None:
        out.append(d)
    return out


def test_handshake_wire_layout_matches_spec(n: Net) -> None:
    client, server = n.connect()
    syn, third = n.sent(A[0])[:2]
    synack = n.sent(B[0])[0]
    # SYN: base + CONTROL(SYN) + SERVICE + empty UDP header; shl 17, protocol 17.
    verno, nonce = struct.unpack_from("!I", syn, 16)[0], syn[24:32]
    exts = control(SYN, verno, 0, nonce) + service(SVC)
    want = sal_base(client.conn_id, 0, 17, 17, exts) + udp_header(A[0], B[0], b"")
    assert syn == want
    assert (syn[8], syn[9]) == (17, 17) and len(syn) == 68 + 8
    assert syn[68:] == struct.pack("!HHH", 0, 0, 8) + syn[74:76]  # ports 0, length 8
    # SYN-ACK: base + CONTROL(SYN+ACK, ackno = ISS + 1) + empty UDP header.
    s_verno, s_nonce = struct.unpack_from("!I", synack, 16)[0], synack[24:32]
    exts = control(SYN | ACK, s_verno, (verno + 1) & 0xFFFFFFFF, s_nonce)
    assert synack == sal_base(server.conn_id, client.conn_id, 8, 17, exts) + udp_header(
        B[0], A[0], b""
    )
    # Third ACK: verno = ISS + 1, ackno = ISS' + 1, SERVICE, empty UDP header.
    exts = control(ACK, (verno + 1) & 0xFFFFFFFF, (s_verno + 1) & 0xFFFFFFFF, nonce)
    exts += service(SVC)
    assert third == sal_base(client.conn_id, server.conn_id, 17, 17, exts) + udp_header(
        A[0], B[0], b""
    )
    assert server.state is State.ESTABLISHED
    assert n.a.drops == {} and n.b.drops == {}


def test_data_both_ways_keeps_boundaries_and_layout(n: Net) -> None:
    client, server = n.connect()
    before = len(n.sent(A[0]))
    up = [bytes([i]) * (i * 37 + 1) for i in range(20)]
    for d in up:
        assert client.send_datagram(d)
    n.run(0.1)
    assert drain(server) == up
    down = [b"reply %d" % i for i in range(5)]
    for d in down:
        server.send_datagram(d)
    n.run(0.1)
    assert drain(client) == down
    # A data packet: base (shl 3, both flowIDs, protocol 17) + UDP header + payload.
    first = n.sent(A[0])[before]
    assert (
        first
        == sal_base(client.conn_id, server.conn_id, 3, 17, b"")
        + udp_header(A[0], B[0], up[0])
        + up[0]
    )
    assert len(n.sent(A[0])) == before + len(up)  # nothing but the datagrams (no ACKs)
    assert client.drops == {} and server.drops == {}


def test_close_by_sal_fin_only(n: Net) -> None:
    client, server = n.connect()
    client.send_datagram(b"last")
    client.shutdown()
    with pytest.raises(Exception, match="shut down"):
        client.send_datagram(b"more")
    mark_a, mark_b = len(n.sent(A[0])), len(n.sent(B[0]))
    n.run(0.1)
    assert drain(server) == [b"last"] and server.at_eof
    assert any(isinstance(e, StreamEnded) for e in n.events["b"])
    server.shutdown()
    n.run(0.1)
    assert server.state is State.CLOSED
    assert client.state is State.TIME_WAIT  # the active closer waits, as on a stream
    assert any(isinstance(e, ConnectionClosed) for e in n.events["a"])
    assert any(isinstance(e, ConnectionClosed) for e in n.events["b"])
    # Only base + CONTROL packets after the datagram: FIN, its ACK, FIN, its ACK.
    fin_a = n.sent(A[0])[mark_a + 1]
    _, _, shl, proto, _ = struct.unpack_from("!IIBBH", fin_a)
    assert (shl, proto, len(fin_a)) == (8, 17, 32)
    assert fin_a[12:16] == bytes([0x10, 20, FIN, 0])
    closing = n.sent(A[0])[mark_a + 1 :] + n.sent(B[0])[mark_b:]
    assert len(closing) == 4
    assert all(len(p) == 32 and p[9] == 17 for p in closing)
    flags = sorted(p[14] for p in closing)
    assert flags == [FIN, FIN, ACK, ACK]  # separate: the peer closed later
    n.run(40.0)  # TIME_WAIT ends; the hosts forget both flows
    assert client.closed
    assert n.a.connections == {} and n.b.connections == {}


def test_lost_synack_is_recovered_by_control_retransmission() -> None:
    n = Net()
    lost: list[bytes] = []

    def drop_first_synack(data: bytes, src: Address, dst: Address) -> bool:
        if src == B and not lost and data[9] == 17 and data[14] == SYN | ACK:
            lost.append(data)
            return True
        return False

    n.net.loss_filter = drop_first_synack
    client, server = n.connect(timeout=30.0)
    assert lost
    syns = [p for p in n.sent(A[0]) if p[14] == SYN]
    assert len(syns) == 2  # the SYN went again after the initial 1 s control RTO
    assert syns[0] == syns[1]  # same numbers, same nonce
    assert n.net.now >= 1.0
    assert n.b.stats["duplicate_syn"] == 1
    client.send_datagram(b"after")
    n.run(0.1)
    assert drain(server) == [b"after"]


def test_lost_third_ack_data_stands_in() -> None:
    n = Net()

    def drop_third_ack(data: bytes, src: Address, dst: Address) -> bool:
        return src == A and data[14] == ACK and data[8] == 17

    n.net.loss_filter = drop_third_ack
    client = n.a.connect(SVC, n.net.now, datagram=True)
    assert isinstance(client, DatagramConnection)
    n.run(0.1)
    assert client.state is State.ESTABLISHED and n.listener.accept() is None
    client.send_datagram(b"first")
    n.run(0.1)
    server = n.listener.accept()
    assert isinstance(server, DatagramConnection) and server.state is State.ESTABLISHED
    assert drain(server) == [b"first"]


def test_migration_of_a_datagram_flow(n: Net) -> None:
    client, server = n.connect()
    assert n.a.migrate(client, A2, n.net.now)
    for i in range(3):
        client.send_datagram(b"during %d" % i)  # held while the path changes
    n.run(0.2)
    assert [type(e) for e in n.events["a"] if isinstance(e, FlowMigrated)] == [FlowMigrated]
    moved = [e for e in n.events["b"] if isinstance(e, FlowMigrated)]
    assert len(moved) == 1 and moved[0].remote == A2 and moved[0].reason == "peer_moved"
    assert server.primary.remote_addr == A2 and client.primary.local_addr == A2
    assert drain(server) == [b"during 0", b"during 1", b"during 2"]
    server.send_datagram(b"to the new place")
    n.run(0.1)
    assert drain(client) == [b"to the new place"]
    rsyn = [p for p in n.sent(A2[0]) if len(p) == 32 and p[14] == 0x40]
    assert rsyn and rsyn[0][9] == 17  # the RSYN of a datagram flow says protocol 17
    assert all(p[9] == 17 for p in n.sent(A2[0]) + n.sent(B[0]))


def test_unconnected_datagram_to_listening_socket_gets_ack_rst(n: Net) -> None:
    ep = n.a.bind_datagram("client-side")
    n.a.send_datagram(ep, SVC, b"no flow")
    other = n.b.bind_datagram("plain")  # an unconnected socket on the same host still works
    n.a.service_table.add("plain", Rule.forward(B))
    n.a.send_datagram(ep, "plain", b"plain")
    n.run(0.1)
    (answer,) = n.sent(B[0])
    # CONTROL(ACK+RST), verno 0, ackno 0, nonce 0, to the sender's flowID.
    assert answer == sal_base(0, ep.flowid, 8, 17, control(ACK | RST, 0, 0, bytes(8)))
    assert n.b.drops["datagram_to_listener"] == 1
    refused = DatagramRefused(ep.flowid, "datagram refused: no such service", B)
    assert refused in n.events["a"]
    got = [e for e in n.events["b"] if isinstance(e, DatagramReceived)]
    assert [(e.conn_id, e.data) for e in got] == [(other.flowid, b"plain")]


def test_zero_length_and_oversized_datagrams(n: Net) -> None:
    client, server = n.connect()
    with pytest.raises(ValueError, match="empty"):
        client.send_datagram(b"")
    with pytest.raises(DatagramTooLarge):
        client.send_datagram(bytes(MAX_FLOW_DATAGRAM + 1))
    assert MAX_FLOW_DATAGRAM == 65507 - 12 - 8
    # A zero-length datagram from the peer (the reference drops it): dropped and counted.
    empty = sal_base(client.conn_id, server.conn_id, 3, 17, b"") + udp_header(A[0], B[0], b"")
    n.b.receive_datagram(empty, A, B, n.net.now)
    assert server.drops["empty"] == 1 and drain(server) == []
    assert client.send_datagram(bytes(MAX_FLOW_DATAGRAM))
    n.run(0.1)
    assert [len(d) for d in drain(server)] == [MAX_FLOW_DATAGRAM]


def test_receive_queue_is_bounded(n: Net) -> None:
    client, server = n.connect()
    server.max_queue = 10
    for i in range(25):
        client.send_datagram(b"%d" % i)
    n.run(0.1)
    assert server.drops["rx_queue_full"] == 15
    assert drain(server) == [b"%d" % i for i in range(10)]


def test_stream_and_datagram_syns_do_not_cross(n: Net) -> None:
    n.b.listen("streams")
    n.a.service_table.add("streams", Rule.forward(B))
    wrong = n.a.connect("streams", n.net.now, datagram=True)
    n.run(0.5)
    assert wrong.state is State.SYN_SENT and n.b.drops["syn_wrong_protocol"] == 1
    stream = n.a.connect(SVC, n.net.now)
    n.run(0.5)
    assert stream.state is State.SYN_SENT and n.b.drops["syn_wrong_protocol"] == 2
    assert n.listener.accept() is None


def test_reset_reaches_the_other_end(n: Net) -> None:
    client, server = n.connect()
    server.abort()
    n.run(0.1)
    assert client.state is State.CLOSED and client.error == "reset by peer"
    sent = n.sent(B[0])[-1]
    assert len(sent) == 32 and sent[9] == 17 and sent[14] == RST
    with pytest.raises(Exception, match="closed"):
        client.send_datagram(b"x")


@pytest.mark.parametrize("seed", range(3, 9))
def test_lossy_path_handshake_data_and_close_complete(seed: int) -> None:
    # The handshake on a clean link: a server gives half-open state up after about a minute
    # (issue 11), which a handshake at 30% loss each way can outlast; lost SYN-ACKs and third
    # ACKs are tested on their own above. Everything after it runs at 30% loss.
    n = Net(seed=seed)
    client, server = n.connect(timeout=300.0)
    n.net.default_link = LinkConfig(delay=0.005, loss=0.3)
    for i in range(100):
        client.send_datagram(b"%d" % i)
    n.run(0.1)
    got = drain(server)
    assert 40 <= len(got) <= 90 and got == sorted(got, key=int)  # some lost, none reordered
    client.shutdown()
    server.shutdown()
    n.run(300.0)
    assert client.state is State.CLOSED and server.state is State.CLOSED
    assert n.a.connections == {} and n.b.connections == {}
    # A FIN whose retransmissions outlast the peer's TIME_WAIT (30 s) meets a RST: both
    # ends are closed either way, as with streams.
    assert client.error in (None, "reset by peer") and server.error in (None, "reset by peer")


# -- a scripted peer that behaves as the spec says the reference does ---------------------
REF_SERVICE = ServiceID(bytes.fromhex("00004001") + bytes(28))


def reference_datagram_syn() -> bytes:
    """The reference client's captured TCP SYN turned into its datagram SYN as the spec
    describes it: the same SAL header with protocol 17 (checksum recomputed) and an empty
    UDP header instead of the TCP one."""
    from pyserval.data import reference_capture

    tcp_syn = next(p for p in reference_capture() if p.index == 0).payload
    assert tcp_syn[8] == 17 and tcp_syn[9] == 6  # shl 17: base + CONTROL + SERVICE
    exts = bytes(tcp_syn[12:68])
    src, dst = struct.unpack_from("!II", tcp_syn)
    return sal_base(src, dst, 17, 17, exts) + udp_header("127.0.0.1", "127.0.0.1", b"")


def test_reference_style_client_talks_to_a_listening_datagram_socket() -> None:
    here: Address = ("127.0.0.1", 54325)
    ref: Address = ("127.0.0.1", 54324)
    host = HostCore([here], rng=random.Random(9))
    listener = host.listen(REF_SERVICE, datagram=True)
    syn = reference_datagram_syn()
    ref_flow, iss, nonce = 3, 0x6694C269, bytes.fromhex("29a80971eaec1501")  # captured
    host.receive_datagram(syn, ref, here, 0.0)
    ((synack, frm, to),) = host.datagrams_to_send(0.0)
    assert (frm, to) == (here, ref)
    (our_flow,) = struct.unpack_from("!I", synack)
    (s_verno,) = struct.unpack_from("!I", synack, 16)
    s_nonce = synack[24:32]
    want = sal_base(our_flow, ref_flow, 8, 17, control(SYN | ACK, s_verno, iss + 1, s_nonce))
    assert synack == want + udp_header(here[0], ref[0], b"")
    # Third ACK, then one datagram, as the reference client would send them.
    third = control(ACK, iss + 1, s_verno + 1, nonce) + service(REF_SERVICE)
    host.receive_datagram(
        sal_base(ref_flow, our_flow, 17, 17, third) + udp_header(ref[0], here[0], b""),
        ref,
        here,
        0.01,
    )
    conn = listener.accept()
    assert isinstance(conn, DatagramConnection) and conn.state is State.ESTABLISHED
    data = sal_base(ref_flow, our_flow, 3, 17, b"") + udp_header(ref[0], here[0], b"hi")
    host.receive_datagram(data + b"hi", ref, here, 0.02)
    assert conn.receive_datagram() == b"hi"
    conn.send_datagram(b"hello back")
    ((reply, _, _),) = host.datagrams_to_send(0.03)
    assert (
        reply
        == sal_base(our_flow, ref_flow, 3, 17, b"")
        + udp_header(here[0], ref[0], b"hello back")
        + b"hello back"
    )
    # The reference closes: SAL FIN (verno ISS + 1: the SYN took ISS), we ACK it.
    fin = sal_base(ref_flow, our_flow, 8, 17, control(FIN, iss + 1, s_verno + 1, nonce))
    host.receive_datagram(fin, ref, here, 0.04)
    assert conn.at_eof
    ((ack, _, _),) = host.datagrams_to_send(0.04)
    assert ack == sal_base(our_flow, ref_flow, 8, 17, control(ACK, s_verno + 1, iss + 2, s_nonce))
    conn.shutdown()
    ((our_fin, _, _),) = host.datagrams_to_send(0.05)
    assert our_fin == sal_base(
        our_flow, ref_flow, 8, 17, control(FIN, s_verno + 1, iss + 2, s_nonce)
    )
    final = sal_base(ref_flow, our_flow, 8, 17, control(ACK, iss + 2, s_verno + 2, nonce))
    host.receive_datagram(final, ref, here, 0.06)
    assert conn.closed and conn.error is None
    host.datagrams_to_send(0.06)
    assert host.connections == {} and host.drops == {} and host.internal_errors == []


def test_pyserval_client_handshake_as_a_reference_server_expects() -> None:
    """Our client's SYN, answered by a scripted reference server's SYN-ACK, gives the third
    ACK the spec describes; the flow then carries data."""
    here: Address = ("127.0.0.1", 54324)
    ref: Address = ("127.0.0.1", 54325)
    host = HostCore([here], rng=random.Random(11))
    host.service_table.add(REF_SERVICE, Rule.forward(ref))
    conn = host.connect(REF_SERVICE, 0.0, datagram=True)
    ((syn, _, to),) = host.datagrams_to_send(0.0)
    assert to == ref
    iss, nonce = struct.unpack_from("!I", syn, 16)[0], syn[24:32]
    assert syn == sal_base(
        conn.conn_id, 0, 17, 17, control(SYN, iss, 0, nonce) + service(REF_SERVICE)
    ) + udp_header(here[0], ref[0], b"")
    ref_flow, ref_iss, ref_nonce = 4, 0x43DA7359, bytes.fromhex("d7374541ff71be76")
    synack = sal_base(
        ref_flow, conn.conn_id, 8, 17, control(SYN | ACK, ref_iss, iss + 1, ref_nonce)
    )
    host.receive_datagram(synack + udp_header(ref[0], here[0], b""), ref, here, 0.01)
    assert conn.state is State.ESTABLISHED
    ((third, _, _),) = host.datagrams_to_send(0.01)
    exts = control(ACK, iss + 1, ref_iss + 1, nonce) + service(REF_SERVICE)
    assert third == sal_base(conn.conn_id, ref_flow, 17, 17, exts) + udp_header(
        here[0], ref[0], b""
    )
    data = sal_base(ref_flow, conn.conn_id, 3, 17, b"") + udp_header(ref[0], here[0], b"x")
    host.receive_datagram(data + b"x", ref, here, 0.02)
    assert isinstance(conn, DatagramConnection) and conn.receive_datagram() == b"x"


def test_datagram_syn_through_a_router_then_direct() -> None:
    """Late binding works for datagram flows too: a router forwards the SYN by serviceID
    (SOURCE path recorded), the instance answers the client directly, and no later packet
    of the flow passes through the router."""
    client_addr: Address = ("10.0.0.1", 40000)
    router_addr: Address = ("10.0.0.9", 7000)
    net = SimNetwork(seed=2, default_link=LinkConfig(delay=0.002), trace=True)
    client = HostCore([client_addr], rng=random.Random(1))
    router = HostCore([router_addr], rng=random.Random(2), forwarding=True)
    server = HostCore([B], rng=random.Random(3))
    for h, addr in ((client, client_addr), (router, router_addr), (server, B)):
        net.attach(h, addr)
    client.service_table.add(SVC, Rule.forward(router_addr))
    router.service_table.add(SVC, Rule.forward(B))
    server.trusted_forwarders.add(router_addr)
    listener = server.listen(SVC, datagram=True)
    conn = client.connect(SVC, net.now, datagram=True)
    assert isinstance(conn, DatagramConnection)
    net.kick(client)
    assert net.run_until(lambda: conn.state is State.ESTABLISHED, 10)
    net.run_for(0.05)
    peer = listener.accept()
    assert isinstance(peer, DatagramConnection)
    conn.send_datagram(b"direct")
    net.kick(client)
    net.run_for(0.05)
    assert peer.receive_datagram() == b"direct"
    assert router.stats["forwarded_syn"] == 1
    via_router = [ev for ev in net.trace if ev.fate == "sent" and router_addr in (ev.src, ev.dst)]
    assert len(via_router) == 2  # the SYN in, the forwarded SYN out: nothing else
    forwarded = decode_packet(via_router[1].data)
    assert forwarded.protocol == 17 and forwarded.udp is not None
    assert forwarded.source_path() is not None


def test_nat_rebinding_of_a_datagram_flow_is_checked_then_followed() -> None:
    n = Net()
    nat = n.net.add_nat([A[0], A2[0]], "192.0.2.1")
    client, server = n.connect()
    old = server.primary.remote_addr
    nat.rebind()
    for i in range(5):
        client.send_datagram(b"after rebinding %d" % i)
        n.run(0.05)
    assert drain(server) == [b"after rebinding %d" % i for i in range(5)]  # taken at once
    n.run(0.5)
    new = server.primary.remote_addr
    assert new != old and new == nat.public_address(A)
    moved = [e for e in n.events["b"] if isinstance(e, FlowMigrated)]
    assert [e.reason for e in moved] == ["rebinding"]
    assert n.b.stats["rebinding_challenge"] >= 1
    server.send_datagram(b"to the new mapping")
    n.run(0.1)
    assert drain(client) == [b"to the new mapping"]


def test_off_path_fin_or_rst_with_a_wrong_nonce_is_ignored(n: Net) -> None:
    client, server = n.connect()
    evil: Address = ("10.6.6.6", 666)
    for flags in (FIN, RST, 0x40):
        forged = sal_base(client.conn_id, server.conn_id, 8, 17, control(flags, 0, 0, bytes(8)))
        n.b.receive_datagram(forged, A, B, n.net.now)  # even from the client's address
        n.b.receive_datagram(forged, evil, B, n.net.now)
    n.run(0.1)
    assert server.state is State.ESTABLISHED and not server.peer_fin_received
    client.send_datagram(b"still here")
    n.run(0.1)
    assert drain(server) == [b"still here"]


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([0, SYN, ACK, FIN, RST, 0x40, SYN | ACK, FIN | ACK, 0x40 | ACK, 0x42]),
            st.booleans(),  # the right nonce
            st.sampled_from([6, 17]),
            st.booleans(),  # a UDP header
            st.binary(max_size=8),
            st.booleans(),  # towards the server (else the client)
        ),
        max_size=12,
    )
)
def test_arbitrary_packets_on_a_flow_never_break_it(
    packets: list[tuple[int, bool, int, bool, bytes, bool]],
) -> None:
    n = Net()
    client, server = n.connect()
    for flags, right_nonce, proto, udp, payload, to_server in packets:
        me, peer = (server, client) if to_server else (client, server)
        host, src, dst = (n.b, A, B) if to_server else (n.a, B, A)
        nonce = peer.primary.control.local_nonce if right_nonce else bytes(8)
        cc = me.primary.control
        exts = control(flags, cc.rcv_ackno, cc.snd_verno, nonce) if flags else b""
        raw = sal_base(peer.conn_id, me.conn_id, 3 + len(exts) // 4, proto, exts)
        if udp and proto == 17:
            raw += udp_header(src[0], dst[0], payload) + payload
        host.receive_datagram(raw, src, dst, n.net.now)
        n.run(0.05)
    n.run(120.0)
    for h in (n.a, n.b):
        assert h.internal_errors == [] and h.stats["internal_error"] == 0
    for c in (client, server):
        assert c.rx_bytes == sum(map(len, c.rx)) and len(c.rx) <= c.max_queue
        assert c.state in (State.ESTABLISHED, State.CLOSED, State.TIME_WAIT)


# -- SYN cookies (issue 11): a SYN flood cannot lock a datagram listener out either ----------
def test_datagram_flows_complete_on_cookies_alone() -> None:
    n = Net(seed=3, server_config=StreamConfig(max_half_open=0))  # every SYN stateless
    client, server = n.connect()
    assert n.b.stats["syn_cookie_sent"] == 1 and n.b.stats["syn_cookie_accepted"] == 1
    assert not n.listener.half_open
    # The SYN-ACK on the wire: protocol 17, CONTROL(SYN+ACK) acknowledging the SYN's
    # number, and the cookie's verno in it (what the third ACK then acknowledges).
    syn, third = n.sent(A[0])[:2]
    synack = n.sent(B[0])[0]
    assert synack[9] == 17 and synack[14] == SYN | ACK
    syn_verno = struct.unpack_from("!I", syn, 16)[0]
    verno, ackno = struct.unpack_from("!II", synack, 16)
    assert ackno == (syn_verno + 1) & 0xFFFFFFFF
    assert struct.unpack_from("!I", third, 20)[0] == (verno + 1) & 0xFFFFFFFF
    for i in range(20):
        client.send_datagram(b"up%d" % i)
        server.send_datagram(b"down%d" % i)
    n.run(1.0)
    assert drain(server) == [b"up%d" % i for i in range(20)]
    assert drain(client) == [b"down%d" % i for i in range(20)]


def test_a_datagram_flow_whose_third_ack_was_lost_is_asked_for_it_again() -> None:
    n = Net(seed=4, server_config=StreamConfig(max_half_open=0))
    dropped: list[bytes] = []

    def lose_third_ack(data: bytes, src: Address, dst: Address) -> bool:
        if not dropped and src == A and data[14] == ACK:  # CONTROL(ACK) only: the third
            dropped.append(data)
            return True
        return False

    n.net.loss_filter = lose_third_ack
    client = n.a.connect(SVC, n.net.now, datagram=True)
    assert isinstance(client, DatagramConnection)
    n.net.kick(n.a)
    assert n.net.run_until(lambda: client.state is State.ESTABLISHED, 10)
    assert dropped and not n.b.connections  # the server keeps nothing
    client.send_datagram(b"first")  # flowIDs only: answered with a reminder SYN-ACK
    n.net.kick(n.a)
    assert n.net.run_until(lambda: bool(n.listener.accept_queue), 10)
    assert n.b.stats["syn_cookie_reminder"] == 1 and n.b.stats["syn_cookie_accepted"] == 1
    server = n.listener.accept()
    assert isinstance(server, DatagramConnection)
    client.send_datagram(b"second")
    n.run(1.0)
    # Datagram semantics: the one that drew the reminder was not kept (no state held it).
    assert drain(server) == [b"second"]


def test_forged_datagram_cookie_acks_make_nothing() -> None:
    n = Net(seed=5, server_config=StreamConfig(max_half_open=0))
    held: list[bytes] = []

    def hold_third_ack(data: bytes, src: Address, dst: Address) -> bool:
        if src == A and data[14] == ACK:
            held.append(data)
            return True
        return False

    n.net.loss_filter = hold_third_ack
    client = n.a.connect(SVC, n.net.now, datagram=True)
    assert isinstance(client, DatagramConnection)
    n.net.kick(n.a)
    assert n.net.run_until(lambda: bool(held), 10)
    third = held[0]
    ackno = struct.unpack_from("!I", third, 20)[0]
    for bad in (0x02, 0x80_00_00_00):  # the cookie's verno echoed with one bit flipped
        forged = bytearray(third)
        struct.pack_into("!I", forged, 20, ackno ^ bad)
        struct.pack_into("!H", forged, 10, 0)
        struct.pack_into("!H", forged, 10, ones_sum(bytes(forged[: 12 + 20 + 36])))
        n.b.receive_datagram(bytes(forged), A, B, n.net.now)
    assert n.b.syn_cookies.failed == 2 and not n.b.connections
    # From another address, the genuine third ACK is no cookie either (the MAC covers it).
    n.b.receive_datagram(third, A2, B, n.net.now)
    assert n.b.syn_cookies.failed == 3 and not n.b.connections
    n.b.receive_datagram(third, A, B, n.net.now)
    assert n.b.stats["syn_cookie_accepted"] == 1 and len(n.listener.accept_queue) == 1

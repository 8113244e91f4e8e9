"""HostCore unconnected datagrams over the simulated network: delivery, layout, errors, RST."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest

from pyserval.core.host import MAX_DATAGRAM, DatagramTooLarge, HostCore, NoRoute
from pyserval.naming.service_id import ServiceID
from pyserval.sal import (
    PROTO_UDP,
    ControlExt,
    ControlFlags,
    Rule,
    SalPacket,
    ServiceExt,
    UdpHeader,
    decode_packet,
)
from pyserval.testing import Address, LinkConfig, SimNetwork
from pyserval.transport.events import DatagramReceived, DatagramRefused

A: Address = ("10.0.0.1", 54324)
B: Address = ("10.0.0.2", 54325)


class Net:
    def __init__(self) -> None:
        self.net = SimNetwork(seed=1, default_link=LinkConfig(delay=0.005), trace=True)
        self.a = HostCore([A], rng=random.Random(1))
        self.b = HostCore([B], rng=random.Random(2))
        self.net.attach(self.a, A)
        self.net.attach(self.b, B)
        self.a.service_table.add("dgram", Rule.forward(B))

    def sent(self, src: Address) -> list[tuple[bytes, Address, Address, SalPacket]]:
        return [
            (ev.data, ev.src, ev.dst, decode_packet(ev.data))
            for ev in self.net.trace
            if ev.fate == "sent" and ev.src == src
        ]


@pytest.fixture
def n() -> Iterator[Net]:
    net = Net()
    yield net
    assert net.a.internal_errors == [] and net.b.internal_errors == []
    assert net.a.stats["internal_error"] == 0 and net.b.stats["internal_error"] == 0


def test_datagram_delivered_with_source_and_layout(n: Net) -> None:
    ep = n.b.bind_datagram("dgram")
    a_ep = n.a.bind_datagram("src")
    n.a.send_datagram(a_ep, "dgram", b"hi")
    n.net.kick(n.a)
    n.net.run_for(0.1)
    assert n.b.events() == [DatagramReceived(ep.flowid, b"hi", ServiceID.parse("src"), A)]
    assert n.a.events() == []
    ((raw, src, dst, pkt),) = n.sent(A)
    assert (src, dst) == (A, B)
    # base + SERVICE(destination) + SERVICE(source) + UDP
    assert pkt.src_flowid == a_ep.flowid != 0
    assert pkt.dst_flowid == 0
    assert pkt.protocol == PROTO_UDP
    assert pkt.shl == 21 and raw[8] == 21
    assert pkt.extensions == [ServiceExt(ServiceID.parse("dgram")), ServiceExt(a_ep.service_id)]
    udp = pkt.udp
    assert isinstance(udp, UdpHeader)
    assert (udp.src_port, udp.dst_port, udp.length) == (0, 0, 8 + 2)
    assert bytes(pkt.payload) == b"hi"
    assert udp.checksum != 0 and pkt.verify_transport_checksum(A[0], B[0])
    assert len(raw) == 12 + 72 + 8 + 2
    assert n.sent(B) == []  # nothing answers a delivered datagram
    assert n.a.drops == {} and n.b.drops == {}


def test_datagrams_both_ways_and_empty_payload(n: Net) -> None:
    ep = n.b.bind_datagram("dgram")
    a_ep = n.a.bind_datagram("src")
    n.b.service_table.add("src", Rule.forward(A))
    for data in (b"", b"x" * 1400, bytes(range(256)) * 40):
        n.a.send_datagram(a_ep, "dgram", data)
    n.net.kick(n.a)
    n.net.run_for(0.1)
    got = n.b.events()
    assert [e.data for e in got if isinstance(e, DatagramReceived)] == [
        b"",
        b"x" * 1400,
        bytes(range(256)) * 40,
    ]
    n.b.send_datagram(ep, "src", b"reply")
    n.net.kick(n.b)
    n.net.run_for(0.1)
    assert n.a.events() == [DatagramReceived(a_ep.flowid, b"reply", ServiceID.parse("dgram"), B)]


def test_largest_datagram_fits_and_one_more_byte_raises(n: Net) -> None:
    ep = n.b.bind_datagram("dgram")
    a_ep = n.a.bind_datagram("src")
    big = random.Random(1).randbytes(MAX_DATAGRAM)
    n.a.send_datagram(a_ep, "dgram", big)
    n.net.kick(n.a)
    n.net.run_for(0.1)
    ((raw, _, _, _),) = n.sent(A)
    assert len(raw) <= 65507  # fits one UDP/IPv4 datagram
    assert n.b.events() == [DatagramReceived(ep.flowid, big, a_ep.service_id, A)]
    too_big = MAX_DATAGRAM + 1
    with pytest.raises(DatagramTooLarge, match=str(too_big)) as ei:
        n.a.send_datagram(a_ep, "dgram", bytes(too_big))
    assert str(MAX_DATAGRAM) in str(ei.value)
    assert isinstance(ei.value, ValueError)
    n.net.kick(n.a)
    assert len(n.sent(A)) == 1


def test_datagram_without_route_raises_no_route(n: Net) -> None:
    a_ep = n.a.bind_datagram("src")
    with pytest.raises(NoRoute, match=ServiceID.parse("nowhere").hex):
        n.a.send_datagram(a_ep, "nowhere", b"hi")
    n.net.kick(n.a)
    assert n.sent(A) == []
    assert n.a.events() == []


@pytest.mark.parametrize("listening", [False, True])
def test_datagram_to_host_without_service_gets_rst(n: Net, listening: bool) -> None:
    if listening:
        n.b.listen("dgram")  # a stream listener is not a datagram socket
    a_ep = n.a.bind_datagram("src")
    n.a.send_datagram(a_ep, "dgram", b"anyone?")
    n.net.kick(n.a)
    n.net.run_for(0.1)
    assert n.b.drops["datagram_no_service"] == 1
    assert n.b.events() == []
    ((_raw, src, dst, rst),) = n.sent(B)
    assert (src, dst) == (B, A)
    assert rst.dst_flowid == a_ep.flowid
    assert [type(e) for e in rst.extensions] == [ControlExt]
    ctl = rst.control
    assert ctl is not None and ctl.flags == ControlFlags.RST
    ev = n.a.events()
    assert len(ev) == 1 and isinstance(ev[0], DatagramRefused)
    assert ev[0].conn_id == a_ep.flowid
    assert len(n.sent(A)) == 1  # the RST is not answered


def test_unbound_endpoint_refuses_datagrams_and_ignores_late_rst(n: Net) -> None:
    ep = n.b.bind_datagram("dgram")
    a_ep = n.a.bind_datagram("src")
    n.b.unbind_datagram(ep)
    n.b.unbind_datagram(ep)  # twice is harmless
    n.a.send_datagram(a_ep, "dgram", b"late")
    n.net.kick(n.a)
    n.net.run_for(0.1)
    assert n.b.events() == []
    assert n.b.drops["datagram_no_service"] == 1
    assert isinstance(n.a.events()[0], DatagramRefused)
    # Once a's socket is gone too, a RST for it is dropped, never answered.
    n.a.unbind_datagram(a_ep)
    rst = SalPacket(0, a_ep.flowid, PROTO_UDP, [ControlExt(ControlFlags.RST)]).encode(B[0], A[0])
    n.a.receive_datagram(rst, B, A, n.net.now)
    n.net.kick(n.a)
    assert n.a.drops["rst_unknown_flow"] == 1
    assert len(n.sent(A)) == 1


def test_bind_twice_is_refused(n: Net) -> None:
    n.b.bind_datagram("dgram")
    with pytest.raises(ValueError, match="already bound"):
        n.b.bind_datagram("dgram")

"""Adversarial review of the receive path (issue 11): answers an attacker can draw out.

The attacker is off-path but owns a connection of its own to the host (so it knows that
connection's two flowIDs) and forges source addresses. Whatever it sends, the host's answers
to addresses that did not ask for them stay within the per-host rate limits the README
promises (``rst_rate``/``rst_burst``), whichever path of the receive code answers.
"""

from __future__ import annotations

import random

from pyserval.core.host import CHECK_BURST, HostCore
from pyserval.naming.service_id import as_service_id
from pyserval.sal import (
    PROTO_TCP,
    PROTO_UDP,
    ControlExt,
    ControlFlags,
    DssExt,
    SalPacket,
    ServiceExt,
    TcpFlags,
    TcpHeader,
    UdpHeader,
    decode_packet,
)
from pyserval.transport.config import StreamConfig
from pyserval.transport.connection import State

from .simhelpers import A, B, make_pair
from .test_core_multipath import A1, B1, DATA, Two

BURST = 20  # the host's rst_burst in these tests: what may go out at one instant


def _victim(i: int) -> tuple[str, int]:
    return (f"10.7.{i // 250}.{i % 250 + 1}", 7000 + i)


def _sent_to_victims(host: HostCore, now: float) -> int:
    return sum(1 for _, _, to in host.datagrams_to_send(now) if to[0].startswith("10.7."))


def test_forged_synacks_on_an_own_flow_do_not_reflect_unlimited_resets() -> None:
    # A SYN-ACK on an established flow from elsewhere is answered with a RST ("losing
    # SYN-ACK"). The attacker's own connection gives it a flowID; forged sources aim the RSTs.
    p = make_pair()
    p.b.rst_limit.burst = p.b.rst_limit._tokens = BURST
    p.b.rst_limit.rate = 0.0
    p.connect()
    assert p.server is not None
    s = p.server.primary
    now = p.net.now
    out = 0
    for i in range(1000):
        ext = ControlExt(ControlFlags.SYN | ControlFlags.ACK, i, 0, bytes(8))
        pkt = SalPacket(0x1000 + i, s.local_flowid, PROTO_TCP, [ext])
        victim = _victim(i)
        p.b.receive_datagram(pkt.encode(victim[0], B[0]), victim, B, now)
        out += _sent_to_victims(p.b, now)
    assert p.b.stats["losing_synack"] == 1000
    assert out <= BURST, out
    assert p.server.state is State.ESTABLISHED


def test_packets_from_forged_addresses_do_not_reflect_unlimited_address_checks() -> None:
    # A packet of an own flow from an unverified address starts an address check: a
    # challenge to that address, retransmitted. Each forged source must not buy one.
    p = make_pair()
    p.connect()
    assert p.server is not None and p.client is not None
    s = p.server.primary
    now = p.net.now
    out = 0
    victims: set[tuple[str, int]] = set()
    for i in range(1000):
        tcp = TcpHeader(seq=s.irs + 1, ack=s.wire_seq(0), flags=TcpFlags.ACK)
        pkt = SalPacket(s.remote_flowid, s.local_flowid, PROTO_TCP, [], tcp)
        victim = _victim(i)
        p.b.receive_datagram(pkt.encode(victim[0], B[0]), victim, B, now)
        sent = _sent_to_victims(p.b, now)
        if sent:
            victims.add(victim)
        out += sent
    assert p.server.state is State.ESTABLISHED
    # Then let every retransmission of whatever check is left run out.
    for k in range(1, 400):
        t = now + k * 0.25
        p.b.handle_timer(t)
        out += _sent_to_victims(p.b, t)
    # Each check is one candidate: at most CHECK_BURST of them for this one connection,
    # however many sources the attacker forges (then one per 5 s), each retransmitted.
    assert len(victims) <= CHECK_BURST, victims
    assert p.b.stats["check_rate_limited"] == 1000 - len(victims)
    assert out <= 4 * CHECK_BURST, out
    assert s.remote_addr == A  # no check succeeded: the flow never moved


def test_unconnected_datagrams_to_a_connected_listener_get_rate_limited_refusals() -> None:
    host = HostCore([B], rng=random.Random(1), rst_rate=0.0, rst_burst=BURST)
    host.listen("dg", datagram=True)
    sid = as_service_id("dg")
    out = 0
    for i in range(1000):
        pkt = SalPacket(0x2000 + i, 0, PROTO_UDP, [ServiceExt(sid)], UdpHeader(), b"x")
        victim = _victim(i)
        host.receive_datagram(pkt.encode(victim[0], B[0]), victim, B, 0.0)
        out += _sent_to_victims(host, 0.0)
    assert host.drops["datagram_to_listener"] == 1000
    assert out <= BURST, out


def test_a_client_still_gets_its_first_refusal() -> None:
    host = HostCore([B], rng=random.Random(1))
    host.listen("dg", datagram=True)
    pkt = SalPacket(0x77, 0, PROTO_UDP, [ServiceExt(as_service_id("dg"))], UdpHeader(), b"x")
    host.receive_datagram(pkt.encode(A[0], B[0]), A, B, 0.0)
    ((data, _, to),) = host.datagrams_to_send(0.0)
    assert to == A and len(data) == 12 + 20


def test_multipath_segments_with_wild_numbers_neither_kill_nor_feed_the_flow() -> None:
    # Multipath subflows skipped RFC 5961's window checks: a segment with both flowIDs from
    # the peer's address but numbers far from anything in flight was taken, and a DATA_FIN
    # before what was already received reset the connection ("protocol violation").
    two = Two()
    two.transfer(DATA[:200_000])
    s = two.server.primary
    rcv = two.server.recv.rcv_nxt
    far = (s.irs + 1 + 1_000_000_000) & 0xFFFFFFFF
    ack = s.wire_seq(s.snd_una)
    forged = [
        (far, TcpFlags.ACK, DssExt(DssExt.HAS_DSN, rcv, 0), b"EVIL"),  # data far off
        (far, TcpFlags.FIN | TcpFlags.ACK, DssExt(DssExt.HAS_DSN | DssExt.DATA_FIN, 0, 0), b""),
        (far, TcpFlags.FIN | TcpFlags.ACK, DssExt(DssExt.HAS_DSN | DssExt.DATA_FIN, rcv, 0), b""),
    ]
    for seq, flags, dss, payload in forged:
        tcp = TcpHeader(seq=seq, ack=ack, flags=flags)
        pkt = SalPacket(s.remote_flowid, s.local_flowid, PROTO_TCP, [dss], tcp, payload)
        two.b.receive_datagram(pkt.encode(A1[0], B1[0]), A1, B1, two.net.now)
    assert two.server.state is State.ESTABLISHED, two.server.error
    assert two.server.peer_fin_offset is None and two.server.read() == b""
    two.transfer(DATA[200_000:400_000])  # and the flow still carries data intact


def _syn(flowid: int, service: str = "echo") -> bytes:
    ctl = ControlExt(ControlFlags.SYN, 1, 0, b"\x01" * 8)
    tcp = TcpHeader(seq=1, flags=TcpFlags.SYN)
    pkt = SalPacket(flowid, 0, PROTO_TCP, [ctl, ServiceExt(as_service_id(service))], tcp)
    return pkt.encode(A[0], B[0])


def test_a_full_flow_table_drops_syns_by_reason_not_as_internal_errors() -> None:
    host = HostCore([B], rng=random.Random(1), max_flows=3)
    host.listen("echo")
    for i in range(10):
        host.receive_datagram(_syn(0x100 + i), A, B, 0.0)
    assert len(host.flows) == 3
    assert host.internal_errors == [] and host.drops["internal_error"] == 0
    assert host.drops["flow_table_full"] == 7


def _answers(host: HostCore, pkt: SalPacket, src: tuple[str, int], now: float) -> list[bytes]:
    host.receive_datagram(pkt.encode(src[0], B[0]), src, B, now)
    return [data for data, _, to in host.datagrams_to_send(now) if to == src]


def test_probing_cannot_tell_a_flows_destination_flowid_from_an_unused_one() -> None:
    # Were a known destination flowID answered differently from an unknown one (silence
    # against a stateless RST), an attacker would find it by probing and then guess the
    # peer's flowID alone from its own address: 2^32 tries instead of 2^64.
    p = make_pair()
    p.connect()
    assert p.server is not None
    s = p.server.primary
    evil = ("10.6.6.6", 666)
    unused = s.local_flowid ^ 0x5A5A5A5A
    assert unused not in p.b.flows
    for guess in (s.remote_flowid ^ 1, s.remote_flowid ^ 2, 0x1234):
        tcp = TcpHeader(seq=12345, ack=67890, flags=TcpFlags.ACK)
        real = _answers(p.b, SalPacket(guess, s.local_flowid, PROTO_TCP, [], tcp), evil, p.net.now)
        other = _answers(p.b, SalPacket(guess, unused, PROTO_TCP, [], tcp), evil, p.net.now)
        assert len(real) == 1 and real == other  # byte for byte the same stateless RST
    assert p.server.state is State.ESTABLISHED


def test_the_right_flowids_with_numbers_it_cannot_know_start_no_address_check() -> None:
    p = make_pair()
    p.connect()
    assert p.server is not None
    s = p.server.primary
    evil = ("10.6.6.6", 666)
    tcp = TcpHeader(seq=(s.irs + 1 + 2**31) & 0xFFFFFFFF, ack=67890, flags=TcpFlags.ACK)
    pkt = SalPacket(s.remote_flowid, s.local_flowid, PROTO_TCP, [], tcp)
    assert _answers(p.b, pkt, evil, p.net.now) == []
    assert p.b.stats["rebinding_challenge"] == 0 and s.challenge is None
    assert p.b.drops["unproven_from_elsewhere"] == 1
    # The same packet with the numbers the peer would use does start one (NAT rebinding).
    tcp = TcpHeader(seq=s.irs + 1, ack=s.wire_seq(0), flags=TcpFlags.ACK)
    pkt = SalPacket(s.remote_flowid, s.local_flowid, PROTO_TCP, [], tcp)
    assert len(_answers(p.b, pkt, evil, p.net.now)) == 1
    assert p.b.stats["rebinding_challenge"] == 1 and s.challenge is not None


def _cookie_third_ack(host: HostCore, service: str) -> SalPacket:
    """A client at A sends a SYN for "echo", gets a SYN cookie, and answers it naming
    ``service`` in its third ACK."""
    host.receive_datagram(_syn(0x4242), A, B, 0.0)
    ((data, _, to),) = host.datagrams_to_send(0.0)
    synack = decode_packet(data)
    ctl, tcp = synack.control, synack.tcp
    assert to == A and ctl is not None and tcp is not None and host.stats["syn_cookie_sent"]
    ack = ControlExt(ControlFlags.ACK, 2, (ctl.verno + 1) & 0xFFFFFFFF, b"\x01" * 8)
    third = TcpHeader(seq=2, ack=(tcp.seq + 1) & 0xFFFFFFFF, flags=TcpFlags.ACK)
    return SalPacket(
        0x4242, synack.src_flowid, PROTO_TCP, [ack, ServiceExt(as_service_id(service))], third
    )


def test_a_cookie_for_one_service_opens_no_stream_on_a_datagram_listener() -> None:
    host = HostCore([B], rng=random.Random(1), config=StreamConfig(max_half_open=0))
    host.listen("echo")
    dg = host.listen("dg", datagram=True)
    pkt = _cookie_third_ack(host, "dg")
    host.receive_datagram(pkt.encode(A[0], B[0]), A, B, 0.0)
    assert not dg.accept_queue and not host.connections


def test_a_cookie_third_ack_naming_its_own_service_still_works() -> None:
    host = HostCore([B], rng=random.Random(1), config=StreamConfig(max_half_open=0))
    echo = host.listen("echo")
    pkt = _cookie_third_ack(host, "echo")
    host.receive_datagram(pkt.encode(A[0], B[0]), A, B, 0.0)
    assert len(echo.accept_queue) == 1 and host.stats["syn_cookie_accepted"] == 1

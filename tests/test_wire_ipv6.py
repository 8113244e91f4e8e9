"""pyserval's IP6 extension (type 15: SOURCE6, ADD_ADDR6, ADDRESS6), the IPv6 pseudo-header
checksum and forwarding over paths with IPv6 hops (sans-I/O).

Expected bytes are written out by hand from the layouts in README's wire notes; the IPv6
pseudo-header checksum is checked against RFC 8200 8.1 summed word by word here.
"""

from __future__ import annotations

import random
import socket
import struct

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pyserval.core.host import HostCore
from pyserval.naming import ServiceID
from pyserval.sal import (
    AddAddrExt,
    Address6Ext,
    ControlExt,
    ControlFlags,
    Extension,
    MalformedPacket,
    Reason,
    Rule,
    SalPacket,
    ServiceExt,
    Source6Ext,
    SourceExt,
    SourcePortsExt,
    TcpHeader,
    UdpHeader,
    UnknownExt,
    decode_packet,
)
from pyserval.sal.checksum import transport_checksum
from pyserval.sal.forwarding import (
    ForwardRefused,
    first_hop_bytes,
    forward_packet,
    scan_for_forwarding,
)

from .strategies import packets

CLIENT6 = ("fd00::1", 40000)
ROUTER6 = ("fd00::9", 7000)
SERVER6 = ("fd00::2", 54325)
ROUTER4 = ("10.0.0.9", 7000)
SERVER4 = ("10.0.0.2", 54325)

u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
ipv4 = st.tuples(*[st.integers(0, 255)] * 4).map(lambda t: ".".join(map(str, t)))
ipv6 = (
    st.binary(min_size=16, max_size=16)
    .filter(lambda b: b[:12] != bytes(10) + b"\xff\xff")  # IPv4-mapped reads back as IPv4
    .map(lambda b: socket.inet_ntop(socket.AF_INET6, b))
)
hops = st.tuples(st.one_of(ipv6, ipv4), u16)
source6_exts = st.builds(Source6Ext, st.lists(hops, min_size=2, max_size=13).map(tuple))
add_addr6_exts = st.builds(AddAddrExt, st.tuples(ipv6, u16))
address6_exts = st.builds(Address6Ext, u32, u32, st.lists(ipv6, max_size=15).map(tuple))
ip6_exts = st.one_of(source6_exts, add_addr6_exts, address6_exts)


def _with_ext(ext: bytes) -> bytes:
    """A packet with exactly ``ext`` (PAD to a word) as its only extension, checksummed."""
    ext = ext + bytes(-len(ext) % 4)
    pkt = bytearray(struct.pack("!IIBBH", 1, 2, (12 + len(ext)) // 4, 6, 0) + ext)
    total = sum(int.from_bytes(pkt[i : i + 2], "big") for i in range(0, len(pkt), 2))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    pkt[10:12] = (0xFFFF - total).to_bytes(2, "big")
    return bytes(pkt)


def _raises(data: bytes, reason: Reason) -> None:
    with pytest.raises(MalformedPacket) as info:
        decode_packet(data)
    assert info.value.reason is reason


# -- layouts ------------------------------------------------------------------------------


def test_source6_layout_by_hand() -> None:
    ext = Source6Ext((("fd00::1", 40000), ("10.0.0.9", 7000)))
    expected = (
        bytes((0xF0, 40, 1, 2))
        + bytes.fromhex("fd000000000000000000000000000001")
        + (40000).to_bytes(2, "big")
        + bytes.fromhex("00000000000000000000ffff0a000009")  # IPv4-mapped 10.0.0.9
        + (7000).to_bytes(2, "big")
        + bytes(0)  # 4 + 36 = 40: already whole words
    )
    assert ext.encode() == expected
    three = Source6Ext((("::1", 1), ("::2", 2), ("::3", 3))).encode()
    assert len(three) == 60 and three[1] == 60 and three[58:] == b"\0\0"  # 4 + 54 + 2 pad
    decoded = decode_packet(_with_ext(expected))
    assert decoded.extensions == [ext]
    assert decoded.source_path() == [("fd00::1", 40000), ("10.0.0.9", 7000)]


def test_add_addr6_and_address6_layouts_by_hand() -> None:
    assert AddAddrExt(("fd00::2", 54325)).encode() == (
        bytes((0xF0, 24, 2, 0)) + (54325).to_bytes(2, "big") + bytes(2)
        + bytes.fromhex("fd000000000000000000000000000002")
    )  # fmt: skip
    # IPv4 stays the type 9 form, byte for byte what it was.
    assert AddAddrExt(("10.0.0.2", 54325)).encode() == bytes.fromhex("9008d4350a000002")
    assert Address6Ext(1, 2, ("::1",)).encode() == (
        bytes((0xF0, 28, 3, 0)) + bytes.fromhex("0000000100000002") + bytes(15) + b"\x01"
    )


@given(ip6_exts)
def test_ip6_extensions_round_trip(ext: AddAddrExt | Source6Ext | Address6Ext) -> None:
    wire = ext.encode()
    (back,) = decode_packet(_with_ext(wire)).extensions[:1]
    assert back == ext and back.encode() == wire


@given(packets(), st.lists(ip6_exts, min_size=1, max_size=3))
def test_packets_with_ip6_extensions_round_trip(pkt: SalPacket, extra: list[Extension]) -> None:
    pkt.extensions = (pkt.extensions + list(extra))[:10]
    try:
        wire = pkt.encode()
    except ValueError:
        return  # too long for shl
    assert decode_packet(wire).encode() == wire


def test_malformed_ip6_extensions_are_rejected_by_reason() -> None:
    path = Source6Ext((("::1", 1), ("::2", 2))).encode()
    _raises(_with_ext(b"\xf0\x02"), Reason.IP6_LENGTH)  # no kind byte
    _raises(_with_ext(bytes((0xF0, 4, 1, 1))), Reason.IP6_LENGTH)  # one hop
    _raises(_with_ext(bytes((0xF0, 4, 1, 14))), Reason.IP6_LENGTH)  # 14 hops claimed
    _raises(_with_ext(bytes((0xF0, 44)) + path[2:] + bytes(4)), Reason.IP6_LENGTH)  # long
    _raises(_with_ext(bytes((0xF0, 40, 1, 3)) + path[4:]), Reason.IP6_LENGTH)  # count
    three = bytearray(Source6Ext((("::1", 1), ("::2", 2), ("::3", 3))).encode())
    three[-1] = 1
    _raises(_with_ext(bytes(three)), Reason.EXTENSION_RESERVED)  # padding not zero
    add = bytearray(AddAddrExt(("fd00::2", 9)).encode())
    _raises(_with_ext(bytes((0xF0, 20)) + bytes(add[2:20])), Reason.IP6_LENGTH)
    add[6] = 1
    _raises(_with_ext(bytes(add)), Reason.EXTENSION_RESERVED)
    mapped = bytes((0xF0, 24, 2, 0, 0, 9, 0, 0)) + bytes(10) + b"\xff\xff\x0a\x00\x00\x02"
    _raises(_with_ext(mapped), Reason.IP6_LENGTH)  # IPv4 goes in type 9
    _raises(_with_ext(bytes((0xF0, 20, 3, 0)) + bytes(16)), Reason.IP6_LENGTH)
    _raises(_with_ext(bytes((0xF0, 12, 3, 1)) + bytes(8)), Reason.EXTENSION_RESERVED)
    # A kind this version does not know is kept whole and ignored, as an unknown type is.
    later = bytes((0xF0, 8, 9, 0, 1, 2, 3, 4))
    assert decode_packet(_with_ext(later)).extensions[0] == UnknownExt(15, later)


def test_source6_encoding_refuses_what_does_not_fit() -> None:
    with pytest.raises(ValueError):
        Source6Ext((("::1", 1),)).encode()
    with pytest.raises(ValueError):
        Source6Ext(tuple((f"::{i + 1}", i) for i in range(14))).encode()
    with pytest.raises(ValueError):
        Source6Ext((("::1", 1), ("not-an-ip", 2))).encode()
    with pytest.raises(ValueError):
        Address6Ext(0, 0, tuple(f"::{i + 1}" for i in range(16))).encode()


@st.composite
def _mutated_ip6(draw: st.DrawFn) -> bytes:
    pkt = draw(packets())
    pkt.extensions = [*pkt.extensions[:6], draw(ip6_exts)]
    try:
        base = bytearray(pkt.encode())
    except ValueError:
        base = bytearray(_with_ext(draw(ip6_exts).encode()))
    for _ in range(draw(st.integers(1, 4))):
        if not base:
            break
        i = draw(st.integers(0, len(base) - 1))
        op = draw(st.sampled_from(["flip", "set", "cut", "delete"]))
        if op == "flip":
            base[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            base[i] = draw(st.integers(0, 255))
        elif op == "cut":
            del base[i:]
        else:
            del base[i : i + draw(st.integers(1, 8))]
    return bytes(base)


@settings(max_examples=500)
@given(_mutated_ip6(), st.booleans())
# Found by this test: a nonzero reserved field of MP_CAPABLE was dropped on re-encoding.
@example(
    bytes.fromhex("00000000000000002a06cb52600c0000")
    + bytes(8)
    + b"\x80\x10"
    + bytes(14)
    + b"\x80\x10"
    + bytes(14)
    + b"P\x18\t"
    + bytes(21)
    + b"`\x0c\x00\x01"
    + bytes(8)
    + b"\xf0L\x01\x04"
    + bytes(71)
    + b"\x03"
    + bytes(12)
    + b"P"
    + bytes(7),
    True,
)
def test_mutated_ip6_packets_decode_or_raise_malformed_only(data: bytes, verify: bool) -> None:
    try:
        pkt = decode_packet(data, verify=verify)
    except MalformedPacket as exc:
        assert exc.reason
        return
    wire = pkt.encode()  # whatever decodes encodes again
    if verify and data[10:12] != b"\xff\xff":
        assert wire == data


# -- checksum -----------------------------------------------------------------------------


def _rfc_sum(data: bytes) -> int:
    """RFC 1071 by the book: 16-bit words, end-around carry, complement."""
    if len(data) % 2:
        data += b"\0"
    total = 0
    for i in range(0, len(data), 2):
        total += (data[i] << 8) | data[i + 1]
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


@settings(max_examples=200)
@given(ipv6, ipv6, st.sampled_from([6, 17]), st.binary(min_size=20, max_size=20), st.binary())
def test_ipv6_pseudo_header_checksum_follows_rfc_8200(
    src: str, dst: str, proto: int, header: bytes, payload: bytes
) -> None:
    header = header[:16] + b"\0\0" + header[18:]  # checksum field zero (offset 16 in TCP)
    pseudo = (
        socket.inet_pton(socket.AF_INET6, src)
        + socket.inet_pton(socket.AF_INET6, dst)
        + (len(header) + len(payload)).to_bytes(4, "big")
        + bytes(3)
        + bytes((proto,))
    )
    # The pseudo-header's protocol byte is never zero, so neither sum meets the all-zero
    # corner where "+0" and "-0" differ.
    assert transport_checksum(src, dst, proto, header, payload) == _rfc_sum(
        pseudo + header + payload
    )


def test_tcp_and_udp_segments_verify_only_for_their_ipv6_addresses() -> None:
    syn = ControlExt(ControlFlags.SYN, 1, 0, bytes(8))
    for transport in (TcpHeader(src_port=1, dst_port=2, seq=5), UdpHeader(src_port=1, dst_port=2)):
        pkt = SalPacket(1, 0, 6 if isinstance(transport, TcpHeader) else 17, [syn], transport)
        pkt.payload = b"payload"
        wire = pkt.encode("fd00::1", "fd00::2")
        back = decode_packet(wire)
        assert back.verify_transport_checksum("fd00::1", "fd00::2")
        assert not back.verify_transport_checksum("fd00::1", "fd00::3")
        # The IPv4 sum differs: an IPv6 segment does not verify as IPv4 (and vice versa).
        assert not back.verify_transport_checksum("10.0.0.1", "10.0.0.2")


# -- forwarding ---------------------------------------------------------------------------


def _syn(service: str = "svc") -> tuple[bytes, SalPacket]:
    ctl = ControlExt(ControlFlags.SYN, 7, 0, bytes(8))
    pkt = SalPacket(7, 0, 6, [ctl, ServiceExt(ServiceID.from_name(service))], TcpHeader(), b"")
    data = pkt.encode()
    return data, decode_packet(data)


def test_an_ipv4_path_keeps_source_and_source_ports() -> None:
    data, pkt = _syn()
    out = decode_packet(forward_packet(data, pkt, ("10.0.0.1", 1), ROUTER4, SERVER4))
    assert out.find(SourceExt) is not None and out.find(SourcePortsExt) is not None
    assert out.find(Source6Ext) is None


def test_a_path_with_an_ipv6_hop_is_written_as_source6() -> None:
    data, pkt = _syn()
    # IPv6 client, IPv4 next hop: SOURCE6, the IPv4 router IPv4-mapped.
    once = forward_packet(data, pkt, CLIENT6, ROUTER4, SERVER4)
    hop1 = decode_packet(once)
    assert hop1.find(SourceExt) is None and hop1.find(SourcePortsExt) is None
    assert hop1.source_path() == [CLIENT6, ROUTER4]
    # IPv4 client and router, IPv6 next hop: the path leaves IPv4, so SOURCE6 too.
    v4 = decode_packet(forward_packet(data, pkt, ("10.0.0.1", 1), ROUTER4, SERVER6))
    assert v4.find(Source6Ext) is not None and v4.find(SourceExt) is None
    # A second hop extends SOURCE6 (and an old SOURCE is replaced, not kept beside it).
    twice = decode_packet(forward_packet(once, hop1, ROUTER4, ROUTER6, SERVER6))
    assert twice.source_path() == [CLIENT6, ROUTER4, ROUTER6]
    assert sum(isinstance(e, Source6Ext) for e in twice.extensions) == 1
    from_v4 = decode_packet(forward_packet(data, pkt, ("10.0.0.1", 1), ROUTER4, SERVER4))
    mixed = decode_packet(forward_packet(from_v4.encode(), from_v4, ROUTER4, ROUTER6, SERVER6))
    assert mixed.find(SourceExt) is None and mixed.find(SourcePortsExt) is None
    assert mixed.source_path() == [("10.0.0.1", 1), ROUTER4, ROUTER6]


def test_ipv6_loops_and_long_paths_are_refused() -> None:
    data, pkt = _syn()
    with pytest.raises(ForwardRefused) as info:
        forward_packet(data, pkt, CLIENT6, ROUTER6, CLIENT6)
    assert info.value.reason == "loop"
    path = tuple((f"fd00::{i + 1:x}", 1000 + i) for i in range(13))
    pkt.extensions.append(Source6Ext(path))
    data = pkt.encode()
    with pytest.raises(ForwardRefused) as info:
        forward_packet(data, decode_packet(data), path[-1], ("fd00::ff", 1), SERVER6)
    assert info.value.reason == "path_too_long"
    # The wildcard "::" never counts as a loop (a router bound there cannot name itself).
    data, pkt = _syn()
    out = forward_packet(data, pkt, CLIENT6, ("::", 7000), SERVER6)
    assert decode_packet(out).source_path() == [CLIENT6, ("::", 7000)]


@settings(max_examples=200, deadline=None)
@given(ipv6, u16, st.one_of(ipv6, ipv4), st.one_of(ipv6, ipv4))
def test_fast_first_hop_equals_the_general_path_with_ipv6(
    client_ip: str, port: int, router_ip: str, next_ip: str
) -> None:
    data, pkt = _syn()
    came_from, me, hop = (client_ip, port), (router_ip, 7000), (next_ip, 54325)
    if hop in (came_from, me):
        return
    scan = scan_for_forwarding(data)
    assert scan is not None
    fast = first_hop_bytes(data, scan[2], came_from, me, hop)
    assert fast == forward_packet(data, pkt, came_from, me, hop)
    assert decode_packet(fast).source_path() == [came_from, me]  # checksum verified
    assert scan_for_forwarding(fast) is None  # later hops take the general path


def test_dual_stack_server_answers_an_ipv6_client_from_its_ipv6_address() -> None:
    """A SYN from an IPv6 client reaches the server through an IPv4 router: the SYN-ACK
    goes straight to the client from the server's IPv6 address, with an IPv6 checksum."""
    server = HostCore([SERVER4, SERVER6], rng=random.Random(2))
    server.listen("svc")
    router = HostCore([ROUTER4], rng=random.Random(3), forwarding=True)
    router.service_table.add("svc", Rule.forward(SERVER4))
    client = HostCore([CLIENT6], rng=random.Random(4))
    client.service_table.add("svc", Rule.forward(("fd00::9", 7000)))
    client.connect("svc", 0.0)
    ((syn, c_local, _),) = client.datagrams_to_send(0.0)
    assert c_local == CLIENT6
    router.receive_datagram(syn, CLIENT6, ROUTER4, 0.0)  # (a dual-stack router's v4 side)
    ((fwd, r_local, r_remote),) = router.datagrams_to_send(0.0)
    assert (r_local, r_remote) == (ROUTER4, SERVER4)
    assert decode_packet(fwd).source_path() == [CLIENT6, ROUTER4]
    server.receive_datagram(fwd, ROUTER4, SERVER4, 0.0)
    ((synack, s_local, s_remote),) = server.datagrams_to_send(0.0)
    assert (s_local, s_remote) == (SERVER6, CLIENT6)
    assert decode_packet(synack).verify_transport_checksum(SERVER6[0], CLIENT6[0])


def test_a_host_sends_from_an_address_of_the_remotes_family() -> None:
    host = HostCore([SERVER4, SERVER6], rng=random.Random(5))
    assert host.local_for(CLIENT6, SERVER4) == SERVER6
    assert host.local_for(("10.0.0.1", 1), SERVER6) == SERVER4
    assert host.local_for(("10.0.0.1", 1), SERVER4) == SERVER4
    v4_only = HostCore([SERVER4], rng=random.Random(5))
    assert v4_only.local_for(CLIENT6, SERVER4) == SERVER4  # nothing better: the send fails
    ep = host.bind_datagram("dgram")
    host.send_datagram(ep, "elsewhere", b"hi", to=CLIENT6)
    ((_, local, remote),) = host.datagrams_to_send(0.0)
    assert (local, remote) == (SERVER6, CLIENT6)

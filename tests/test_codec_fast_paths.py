"""The codec's fast paths give exactly what the general paths give.

The SAL decoder recognises the two extension layouts of a connection's set-up and close
(CONTROL alone; CONTROL then SERVICE) without its general loop, and ``SalPacket.encode``
with addresses encodes a TCP header once and puts the checksum in place. Each is checked
here against the general code on the same input (hypothesis), and the checksum against
the pseudo-header verification of ``sal.checksum``.
"""

from __future__ import annotations

import copy
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyserval.data import reference_capture
from pyserval.naming import InvalidServiceID, ServiceID
from pyserval.naming.service_id import as_service_id
from pyserval.sal import (
    ControlExt,
    ControlFlags,
    Extension,
    MalformedPacket,
    Reason,
    RelayExt,
    SalPacket,
    TcpFlags,
    TcpHeader,
    TcpOption,
    decode_packet,
)
from pyserval.sal.checksum import internet_checksum, verify_transport_checksum
from pyserval.sal.extensions import control_ext
from pyserval.sal.packet import _decode_bare, _decode_extensions, _decode_extensions_general

from .strategies import control_exts, ipv4, packets, service_exts, tcp_headers, u32

CONTROL_HEAD = bytes((0x10, 20))
SERVICE_HEAD = bytes((0x20, 36))


def _outcome(view: memoryview, decoder: object) -> object:
    """What a decoder makes of ``view``: each extension's class and bytes, or the reason
    it refused."""
    try:
        exts = decoder(view)  # type: ignore[operator]
    except MalformedPacket as exc:
        return ("error", exc.reason)
    return [(type(e), e.encode()) for e in exts]


RELAY_HEAD = bytes((0xC0, 16))
relay_exts = st.builds(
    RelayExt, st.tuples(ipv4, st.integers(0, 0xFFFF)), st.binary(min_size=8, max_size=8)
)


@st.composite
def extension_areas(draw: st.DrawFn) -> bytes:
    """Bytes of the size of the three fast layouts, with their heads often right,
    sometimes with one head byte changed, and arbitrary otherwise."""
    kind = draw(st.sampled_from(["control", "control+service", "syn", "near", "random"]))
    control = draw(control_exts).encode()
    service = draw(service_exts).encode()
    relay = draw(relay_exts).encode()
    if kind == "control":
        return control
    if kind == "control+service":
        return control + service
    if kind == "syn":
        return control + service + relay
    if kind == "near":
        area = bytearray(
            draw(st.sampled_from([control, control + service, control + service + relay]))
        )
        i = draw(st.sampled_from([i for i in (0, 1, 20, 21, 56, 57) if i < len(area)]))
        area[i] = draw(st.integers(0, 255))
        return bytes(area)
    size = draw(st.sampled_from([20, 56, 72]))
    body = bytearray(draw(st.binary(min_size=size, max_size=size)))
    for offset, head in ((0, CONTROL_HEAD), (20, SERVICE_HEAD), (56, RELAY_HEAD)):
        if offset < size and draw(st.booleans()):
            body[offset : offset + 2] = head
    return bytes(body)


@settings(max_examples=1000)
@given(extension_areas())
def test_extension_fast_path_matches_general(area: bytes) -> None:
    view = memoryview(area)
    assert _outcome(view, _decode_extensions) == _outcome(view, _decode_extensions_general)


@settings(max_examples=500)
@given(st.binary(max_size=96).filter(lambda b: len(b) % 4 == 0 and b))
def test_extension_decoder_on_any_area(area: bytes) -> None:
    view = memoryview(area)
    assert _outcome(view, _decode_extensions) == _outcome(view, _decode_extensions_general)


def test_reference_capture_decodes_as_general() -> None:
    # The original stack's own packets (SYN, SYN-ACK, ACK, FIN, ...): the fast path takes
    # some of them, and every one decodes as the general loop decodes it.
    taken = 0
    for record in reference_capture():
        data = bytes(record.payload)
        hlen = data[8] * 4
        if hlen <= 12:
            continue
        area = memoryview(data)[12:hlen]
        if len(area) in (20, 56, 72):
            taken += 1
        assert _outcome(area, _decode_extensions) == _outcome(area, _decode_extensions_general)
    assert taken > 0


@settings(max_examples=400)
@given(packets().filter(lambda p: isinstance(p.transport, TcpHeader)), ipv4, ipv4)
def test_tcp_encode_with_addresses(packet: object, src: str, dst: str) -> None:
    # The previous formulation: the header's checksum computed by compute_checksum (which
    # encodes the header with a zero checksum), then the whole packet encoded.
    general = copy.deepcopy(packet)
    tcp = general.transport  # type: ignore[attr-defined]
    tcp.checksum = tcp.compute_checksum(src, dst, general.payload)  # type: ignore[attr-defined]
    expected = general.encode()  # type: ignore[attr-defined]
    wire = packet.encode(src, dst)  # type: ignore[attr-defined]
    assert wire == expected
    assert packet.transport.checksum == tcp.checksum  # type: ignore[attr-defined]
    # And independently: the segment verifies over the IPv4 pseudo-header.
    hlen = wire[8] * 4
    assert verify_transport_checksum(src, dst, 6, wire[hlen:])
    assert decode_packet(wire).encode() == wire


@pytest.mark.parametrize("seq", [0, 1, 0x12345678, 0xFFFFFFFF])
def test_tcp_checksum_of_a_zero_sum(seq: int) -> None:
    # A segment whose words sum to 0 modulo 0xFFFF: ones' complement arithmetic gives
    # 0xFFFF for the sum, so the field is 0x0000 (RFC 1071; what compute_checksum gives),
    # never 0xFFFF. One payload word chosen to make the sum so.
    src, dst = "127.0.0.1", "10.1.2.3"
    tcp = TcpHeader(seq=seq, ack=7, flags=0x18, window=512)
    c0 = tcp.compute_checksum(src, dst, b"\0\0")
    s0 = 0 if c0 == 0 else 0xFFFF - c0
    payload = ((0xFFFF - s0) % 0xFFFF).to_bytes(2, "big")
    assert tcp.compute_checksum(src, dst, payload) == 0
    wire = SalPacket(1, 2, 6, [], tcp, payload).encode(src, dst)
    assert wire[12 + 16 : 12 + 18] == b"\0\0"
    assert verify_transport_checksum(src, dst, 6, wire[12:])


@settings(max_examples=500)
@given(tcp_headers())
def test_tcp_options_written_out_and_shared(header: TcpHeader) -> None:
    # The header encoder writes the options out itself: the bytes must be those of each
    # option's own encoder, then the padding; the decoder's shared instances must equal
    # options built from the bytes, and re-encode to them.
    wire = header.encode()
    raw = b"".join(o.encode() for o in header.options) + header.option_padding
    raw += bytes(-len(raw) % 4)
    assert wire[20:] == raw
    assert wire[12] >> 4 == (20 + len(raw)) // 4
    decoded, length = TcpHeader.decode(memoryview(wire))
    assert length == len(wire)
    assert decoded.options == header.options
    assert [(o.kind, o.data) for o in decoded.options] == [(o.kind, o.data) for o in header.options]
    assert decoded.encode() == wire


# A SYN's TCP header: MSS 1408, NOP, window scale 7, NOP, NOP, SACK-permitted (RFC 9293,
# 7323, 2018 kinds), and the options it decodes to as (kind, data).
_SYN_AREA = bytes([2, 4, 0x05, 0x80, 1, 3, 3, 7, 1, 1, 4, 2])
_SYN_HEADER = bytes(12) + bytes([(20 + len(_SYN_AREA)) // 4 << 4, 0x02]) + bytes(6) + _SYN_AREA
_SYN_OPTIONS = [(2, b"\x05\x80"), (1, b""), (3, b"\x07"), (1, b""), (1, b""), (4, b"")]


def test_handshake_options_decode_from_bytes() -> None:
    for _ in range(2):  # the second time from the shared instances
        tcp, _ = TcpHeader.decode(memoryview(_SYN_HEADER))
        assert tcp.mss == 1408
        assert [(o.kind, o.data) for o in tcp.options] == _SYN_OPTIONS
        assert tcp.encode() == _SYN_HEADER


@pytest.mark.parametrize(
    "text", ["echo", "suite-connect", "  spaced  ", "ab" * 32, "AB" * 32, "x/y"]
)
def test_service_id_text_cache(text: str) -> None:
    # Cached or not, a name hashes to the ID of ServiceID.from_name, 64 hex digits are
    # the ID itself, and the same object comes back for the same text.
    first = as_service_id(text)
    again = as_service_id(text)
    assert first == again == ServiceID.parse(text)
    assert first is again
    stripped = text.strip()
    if len(stripped) == 64:
        assert first.value == int(stripped, 16)
    else:
        assert first == ServiceID.from_name(stripped)


@pytest.mark.parametrize("text", ["", "   ", "00/8"])
def test_service_id_bad_text_still_raises(text: str) -> None:
    for _ in range(2):  # a failure is not cached
        with pytest.raises(InvalidServiceID):
            as_service_id(text)


# -- decode_packet reads bytes directly; a view goes the way it always went ------------------


def _decoded(data: bytes | memoryview) -> object:
    """Everything a decode gives, as plain values: header fields, each extension's class
    and bytes, the transport's fields, the payload's bytes; or the reason it refused."""
    try:
        p = decode_packet(data)
    except MalformedPacket as exc:
        return ("error", exc.reason)
    t = p.transport
    fields = None if t is None else (type(t), t.encode(), getattr(t, "options", None))
    exts = [(type(e), e.encode()) for e in p.extensions]
    return (p.src_flowid, p.dst_flowid, p.protocol, exts, fields, bytes(p.payload))


@st.composite
def wires(draw: st.DrawFn) -> bytes:
    """Encoded packets (any layout), the connection cycle's own shapes, and either one
    with a byte changed or cut short."""
    if draw(st.booleans()):
        wire = bytearray(draw(packets()).encode())
    else:
        src, dst = draw(ipv4), draw(ipv4)
        ctl = draw(control_exts)
        tcp = draw(tcp_headers())
        shape = draw(st.sampled_from(["ctl", "ctl+tcp", "tcp", "ctl+svc+tcp"]))
        exts: list[object] = [] if shape == "tcp" else [ctl]
        if shape == "ctl+svc+tcp":
            exts.append(draw(service_exts))
        packet = SalPacket(1, 2, 6, exts, None if shape == "ctl" else tcp)  # type: ignore[arg-type]
        wire = bytearray(packet.encode(src, dst))
    if wire and draw(st.booleans()):
        i = draw(st.integers(0, len(wire) - 1))
        if draw(st.booleans()):
            wire[i] = draw(st.integers(0, 255))
        else:
            del wire[i:]
    return bytes(wire)


@settings(max_examples=1000)
@given(wires())
def test_decode_of_bytes_matches_decode_of_a_view(wire: bytes) -> None:
    # Bytes are read directly (struct, slices); a view inside a larger buffer is read
    # through the view: the same packet, or the same refusal, either way.
    buf = bytearray(b"xx" + wire + b"yy")
    assert _decoded(wire) == _decoded(memoryview(buf)[2:-2])


@settings(max_examples=500)
@given(packets())
def test_sal_header_checksum(packet: SalPacket) -> None:
    # The header checksum is worked out from the field values: it must be RFC 1071's
    # checksum of the header bytes with the field zero (sal.checksum.internet_checksum).
    wire = packet.encode()
    hlen = wire[8] * 4
    header = bytearray(wire[:hlen])
    stored = header[10:12]
    header[10:12] = b"\0\0"
    assert internet_checksum(header).to_bytes(2, "big") == bytes(stored)


def test_payload_is_a_view_into_the_datagram() -> None:
    tcp = TcpHeader(seq=1, ack=2, flags=0x18, window=100)
    wire = SalPacket(1, 2, 6, [], tcp, b"hello").encode("10.0.0.1", "10.0.0.2")
    p = decode_packet(wire)
    assert isinstance(p.payload, memoryview) and p.payload.obj is wire
    assert bytes(p.payload) == b"hello"
    empty = decode_packet(SalPacket(1, 2, 6, [], tcp).encode("10.0.0.1", "10.0.0.2"))
    assert isinstance(empty.payload, memoryview) and len(empty.payload) == 0


def test_option_areas_seen_before_give_lists_of_their_own() -> None:
    # A SYN's option area (MSS, NOP, window scale, NOP, NOP, SACK-permitted) is decoded
    # from the cache the second time: the list must be a new one each time (a caller may
    # change it), with the same options in it.
    first, _ = TcpHeader.decode(memoryview(_SYN_HEADER))
    first.options.append(TcpOption.nop())
    second, _ = TcpHeader.decode(memoryview(_SYN_HEADER))
    assert [(o.kind, o.data) for o in second.options] == _SYN_OPTIONS
    assert second.encode() == _SYN_HEADER
    # The first decode may have been the one that filled the cache: a list changed after
    # a decode that came from it must not show in the next one either.
    second.options.append(TcpOption.nop())
    third, _ = TcpHeader.decode(memoryview(_SYN_HEADER))
    assert [(o.kind, o.data) for o in third.options] == _SYN_OPTIONS
    assert third.options is not second.options


def test_the_option_area_cache_is_bounded() -> None:
    # Option areas that are not SACK blocks (here MSS options of every value an attacker
    # may send, one per SYN) are kept only up to the cache's bound.
    from pyserval.sal import transport_headers

    for mss in range(1000, 1000 + 10 * transport_headers._AREAS_MAX):
        area = bytes([2, 4, mss >> 8, mss & 0xFF])
        header = bytes(12) + bytes([(20 + len(area)) // 4 << 4, 0x02]) + bytes(6) + area
        tcp, _ = TcpHeader.decode(memoryview(header))
        assert tcp.mss == mss
        assert len(transport_headers._AREAS) <= transport_headers._AREAS_MAX


def test_handshake_option_lists_are_kept_bounded() -> None:
    # The wire bytes and the SYN reading of a list of handshake options are kept by the
    # options' identities, up to a bound: here an attacker's worth of distinct lists (every
    # MSS, window scale and SACK-permitted combination), each twice (the second time from
    # the tables), checked against the bytes RFC 9293, 7323 and 2018 give for them.
    from pyserval.sal import transport_headers

    bound = transport_headers._KNOWN_MAX
    for mss in range(1000, 1000 + 3 * bound):
        for shift, sack, compact in ((None, False, False), (mss % 15, True, mss % 2 == 0)):
            options = [TcpOption.mss(mss)]
            expected = bytes([2, 4, mss >> 8, mss & 0xFF])
            if shift is not None:
                options += [TcpOption.nop(), TcpOption.window_scale(shift)]
                expected += bytes([1, 3, 3, shift])
            if sack:
                options += [TcpOption.nop(), TcpOption.nop(), TcpOption.sack_permitted()]
                expected += bytes([1, 1, 4, 2])
            if compact:  # RFC 6994: kind 253, length 4, our ExID "SV"
                options.append(TcpOption.compact_close())
                expected += bytes([253, 4, 0x53, 0x56])
            for _ in range(2):
                tcp = TcpHeader(flags=TcpFlags.SYN, options=list(options))
                assert tcp.syn_options() == (mss, shift, sack, compact)
                wire = tcp.encode()
                assert wire[20:] == expected
                assert wire[12] >> 4 == 5 + len(expected) // 4
                # What a peer's stack reads in those bytes: the same, from the decoder's
                # instances.
                peer, _ = TcpHeader.decode(memoryview(wire))
                assert peer.syn_options() == (mss, shift, sack, compact)
                assert peer.encode() == wire
            assert len(transport_headers._WIRES) <= bound
            assert len(transport_headers._SYNS) <= bound


def test_a_kept_option_list_changed_is_read_afresh() -> None:
    # The tables are keyed by the options a list holds now: a list changed after it was
    # read (a caller may change it) reads and encodes as what it holds.
    options = [TcpOption.mss(1400), TcpOption.nop(), TcpOption.window_scale(7)]
    tcp = TcpHeader(flags=TcpFlags.SYN, options=options)
    assert tcp.syn_options() == (1400, 7, False, False)
    assert tcp.encode()[20:] == bytes([2, 4, 0x05, 0x78, 1, 3, 3, 7])
    options[0] = TcpOption.mss(536)
    options += [TcpOption.nop(), TcpOption.nop(), TcpOption.sack_permitted()]
    assert tcp.syn_options() == (536, 7, True, False)
    assert tcp.encode()[20:] == bytes([2, 4, 0x02, 0x18, 1, 3, 3, 7, 1, 1, 4, 2])
    # Padding after an EOL is the header's own: never taken from a list kept without it.
    tcp.option_padding = b"\x00\x00\x00\x00"
    assert tcp.encode()[20:] == bytes([2, 4, 0x02, 0x18, 1, 3, 3, 7, 1, 1, 4, 2, 0, 0, 0, 0])


@settings(max_examples=200)
@given(st.lists(st.tuples(u32, u32), min_size=1, max_size=4))
def test_sack_option_areas_are_not_kept(blocks: list[tuple[int, int]]) -> None:
    # SACK blocks differ per segment: such an area is decoded each time, never kept.
    from pyserval.sal import transport_headers

    area = bytes([1, 1]) + TcpOption.sack(blocks).encode()
    area += bytes(-len(area) % 4)
    header = bytes(12) + bytes([(20 + len(area)) // 4 << 4, 0x10]) + bytes(6) + area
    tcp, _ = TcpHeader.decode(memoryview(header))
    assert tcp.sack_blocks == blocks
    assert area not in transport_headers._AREAS
    # Nor is its wire form kept when it is encoded (the handshake options' are).
    assert tcp.encode() == header
    assert all(o.kind != 5 for known in transport_headers._WIRES.values() for o in known[0])


@given(control_exts)
def test_control_ext_without_checks(ext: ControlExt) -> None:
    fast = control_ext(ext.flags, ext.verno, ext.ackno, ext.nonce, ext.reserved)
    assert type(fast) is ControlExt
    assert fast.encode() == ext.encode()
    assert fast == ext
    assert (fast.flags, fast.verno, fast.ackno, fast.nonce, fast.reserved) == (
        ext.flags,
        ext.verno,
        ext.ackno,
        ext.nonce,
        ext.reserved,
    )


@settings(max_examples=500)
@given(tcp_headers())
def test_syn_options_in_one_pass(header: TcpHeader) -> None:
    # What the handshake reads in one pass is what the four properties give one by one
    # (each the first option of its kind), whatever the options and their order.
    def one_by_one(h: TcpHeader) -> tuple[int | None, int | None, bool, bool]:
        return (h.mss, h.window_scale, h.sack_permitted, h.compact_close)

    assert header.syn_options() == one_by_one(header)
    doubled = TcpHeader(options=header.options + header.options[::-1])
    assert doubled.syn_options() == one_by_one(doubled)


# -- packets without payload or TCP options: packed and unpacked at once ---------------------

ipv6 = st.sampled_from(["::1", "2001:db8::7", "fe80::1:2"])


@st.composite
def bare_packets(draw: st.DrawFn) -> SalPacket:
    """A packet of the bare codec's shapes: a TCP header alone, CONTROL alone, or
    CONTROL with a TCP header; no payload. Half the TCP headers have options (a
    handshake's, SACK blocks, padding after an EOL): the bare decoder takes CONTROL with
    such a header (a SYN-ACK), the encoder leaves them to the general path."""
    shape = draw(st.sampled_from(["tcp", "ctl", "ctl+tcp"]))
    exts: list[object] = [] if shape == "tcp" else [draw(control_exts)]
    tcp = None
    if shape != "ctl":
        with_options = draw(st.booleans())
        tcp = draw(tcp_headers()) if with_options else TcpHeader()
        tcp = TcpHeader(
            seq=draw(u32),
            ack=draw(u32),
            flags=draw(st.integers(0, 0xFFF)),
            window=draw(st.integers(0, 0xFFFF)),
            checksum=draw(st.integers(0, 0xFFFF)),  # stale: the encoder replaces it
            urgent=draw(st.integers(0, 0xFFFF)),
            src_port=draw(st.integers(0, 0xFFFF)),
            dst_port=draw(st.integers(0, 0xFFFF)),
            options=tcp.options,
            option_padding=tcp.option_padding,
        )
    protocol = 6 if tcp is not None else draw(st.sampled_from([6, 17]))
    return SalPacket(draw(u32), draw(u32), protocol, exts, tcp)  # type: ignore[arg-type]


def _assembled(packet: SalPacket, src: str, dst: str) -> bytes:
    """The packet's bytes put together from its parts: the base header and extensions
    with RFC 1071's checksum over them, then the TCP header with the checksum
    ``compute_checksum`` gives (pseudo-header, header with a zero field)."""
    ext = b"".join(e.encode() for e in packet.extensions)
    shl = (12 + len(ext)) // 4
    head = bytearray(
        packet.src_flowid.to_bytes(4, "big")
        + packet.dst_flowid.to_bytes(4, "big")
        + bytes((shl, packet.protocol, 0, 0))
        + ext
    )
    head[10:12] = internet_checksum(bytes(head)).to_bytes(2, "big")
    tcp = packet.tcp
    if tcp is None:
        return bytes(head)
    return bytes(head) + tcp.encode(tcp.compute_checksum(src, dst, b""))


@settings(max_examples=1000)
@given(bare_packets(), st.one_of(ipv4, ipv6), st.one_of(ipv4, ipv6))
def test_bare_packets_encode_as_their_parts(packet: SalPacket, src: str, dst: str) -> None:
    expected = _assembled(copy.deepcopy(packet), src, dst)
    assert packet.encode(src, dst) == expected
    if packet.tcp is not None:  # the checksum put in place, as the general path does
        tcp_wire = expected[len(expected) - packet.tcp.header_length :]
        assert packet.tcp.checksum == int.from_bytes(tcp_wire[16:18], "big")
        assert verify_transport_checksum(src, dst, 6, tcp_wire)


@settings(max_examples=1000)
@given(bare_packets(), ipv4, ipv4, st.data())
def test_bare_packets_decode_as_the_general_path(
    packet: SalPacket, src: str, dst: str, data: st.DataObject
) -> None:
    # The general decoder reads a view (decode_packet takes the fast path for bytes only).
    wire = bytearray(packet.encode(src, dst))
    if data.draw(st.booleans()):
        i = data.draw(st.integers(0, len(wire) - 1))
        wire[i] = data.draw(st.integers(0, 255))  # a head, a length, a flag, a checksum...
    raw = bytes(wire)
    assert _decoded(raw) == _decoded(memoryview(bytearray(raw)))


def test_bare_decoder_takes_the_connection_cycles_shapes() -> None:
    ctl = control_ext(0x24, 7, 9, b"12345678")
    tcp = TcpHeader(seq=5, ack=6, flags=0x11, window=100)
    # A SYN-ACK's: MSS 1408, NOP, window scale 7, NOP, NOP, SACK-permitted (12 bytes).
    options = TcpHeader.decode(memoryview(_SYN_HEADER))[0].options
    synack = TcpHeader(5, 6, 0x12, 100, 0, 0, 0, 0, options)
    for packet in (
        SalPacket(1, 2, 6, [], tcp),
        SalPacket(1, 2, 6, [ctl], None),
        SalPacket(1, 2, 6, [ctl], tcp),
        SalPacket(1, 2, 6, [ctl], synack),
    ):
        wire = packet.encode("10.0.0.1", "10.0.0.2")
        assert len(wire) in (32, 52, 64)
        assert _decode_bare(wire, len(wire), True) is not None
        broken = bytearray(wire)
        broken[10] ^= 1  # the SAL checksum: left to the general path, which refuses it
        assert _decode_bare(bytes(broken), len(wire), True) is None
        with pytest.raises(MalformedPacket):
            decode_packet(bytes(broken))


@pytest.mark.parametrize("with_control", [False, True])
def test_a_failed_encode_leaves_the_header_as_it_was(with_control: bool) -> None:
    # A field out of range makes the one-call packer raise; the TCP header's stored
    # checksum must be what it was, as the general path leaves it (review of the bare
    # path: it used to write the checksum before packing).
    header = TcpHeader(flags=TcpFlags.ACK, window=65536, checksum=0x1234)
    exts: list[Extension] = [control_ext(ControlFlags.ACK, 1, 2, bytes(8))] if with_control else []
    packet = SalPacket(1, 2, 6, exts, header)
    with pytest.raises(struct.error):
        packet.encode("10.0.0.1", "10.0.0.2")
    assert header.checksum == 0x1234


def test_a_payload_of_none_is_refused_on_the_bare_path() -> None:
    # Not a valid payload: the general path raises TypeError, and so must the shortcut
    # for packets without payload (it used to take None for "no payload").
    packet = SalPacket(1, 2, 6, [], TcpHeader(flags=TcpFlags.ACK), None)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        packet.encode("10.0.0.1", "10.0.0.2")


def test_a_synack_with_a_malformed_option_is_refused_as_the_general_path_refuses_it() -> None:
    # CONTROL then a TCP header whose MSS option says 5 bytes (RFC 9293: MSS is 4): the
    # datagram's bytes take the bare decoder, a view of them the general one; both refuse
    # it as a TCP option error.
    ctl = control_ext(0xA0, 7, 9, b"12345678")
    good = TcpHeader(5, 6, 0x12, 100, 0, 0, 0, 0, [TcpOption.mss(1408)])
    wire = bytearray(SalPacket(1, 2, 6, [ctl], good).encode("10.0.0.1", "10.0.0.2"))
    assert len(wire) == 56 and wire[52:54] == b"\x02\x04"
    wire[53] = 5
    for data in (bytes(wire), memoryview(bytearray(wire))):
        with pytest.raises(MalformedPacket) as refused:
            decode_packet(data)
        assert refused.value.reason is Reason.TCP_OPTION

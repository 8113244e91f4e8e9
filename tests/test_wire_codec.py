"""Round trips of every header kind, and the decoder's rejection of malformed input."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyserval.data import reference_capture
from pyserval.sal import (
    ControlExt,
    ControlFlags,
    MalformedPacket,
    Reason,
    SalPacket,
    ServiceExt,
    SourceExt,
    TcpHeader,
    TcpOption,
    UdpHeader,
    UnknownExt,
    decode_packet,
)
from pyserval.sal.checksum import internet_checksum, words_sum

from .strategies import packets

SYN = reference_capture()[0].payload


def _fields(p: SalPacket) -> tuple[object, ...]:
    return (p.src_flowid, p.dst_flowid, p.protocol, p.transport, bytes(p.payload))


@given(packets())
def test_encode_decode_round_trip(packet: SalPacket) -> None:
    wire = packet.encode("10.0.0.1", "10.0.0.2")
    decoded = decode_packet(wire)
    assert decoded.encode() == wire
    assert _fields(decoded) == _fields(packet)
    # Extensions come back in order (the encoder may add PAD bytes at the end only).
    non_pad = [e for e in packet.extensions if e.type != 0]
    assert [e for e in decoded.extensions if e.type != 0] == non_pad
    assert decoded.verify_transport_checksum("10.0.0.1", "10.0.0.2")
    assert len(wire[: decoded.shl * 4]) % 4 == 0


@given(packets())
def test_control_and_service_views(packet: SalPacket) -> None:
    decoded = decode_packet(packet.encode())
    controls = [e for e in packet.extensions if isinstance(e, ControlExt)]
    services = [e for e in packet.extensions if isinstance(e, ServiceExt)]
    assert decoded.control == (controls[0] if controls else None)
    assert decoded.services == services
    assert decoded.service == (services[0] if services else None)


def _raises(data: bytes, reason: Reason, verify: bool = True) -> None:
    with pytest.raises(MalformedPacket) as info:
        decode_packet(data, verify=verify)
    assert info.value.reason == reason


def _with_checksum(header_and_rest: bytes, shl: int) -> bytes:
    buf = bytearray(header_and_rest)
    buf[10:12] = b"\0\0"
    c = internet_checksum(buf[: shl * 4])
    buf[10:12] = c.to_bytes(2, "big")
    return bytes(buf)


def test_malformed_reasons() -> None:
    _raises(b"", Reason.SHORT_HEADER)
    _raises(SYN[:11], Reason.SHORT_HEADER)
    _raises(SYN[:8] + b"\x02" + SYN[9:], Reason.BAD_SHL, verify=False)
    _raises(SYN[:8] + b"\xff" + SYN[9:], Reason.SHL_PAST_END)
    _raises(SYN[:20] + bytes([SYN[20] ^ 0x40]) + SYN[21:], Reason.BAD_CHECKSUM)
    # CONTROL claiming 19 bytes (fix the checksum so the length check is what fails).
    bad = SYN[:13] + b"\x13" + SYN[14:]
    _raises(_with_checksum(bad, 17), Reason.CONTROL_LENGTH)
    _raises(_with_checksum(SYN[:9] + b"\x07" + SYN[10:], 17), Reason.BAD_PROTOCOL)
    # TCP data offset beyond the segment.
    tcp_at = 68
    bad_tcp = SYN[: tcp_at + 12] + b"\xf0" + SYN[tcp_at + 13 :]
    _raises(bad_tcp, Reason.TCP_DATA_OFFSET)
    _raises(SYN[: tcp_at + 10], Reason.TCP_TRUNCATED)
    # MSS option with length 5.
    opt_at = tcp_at + 20
    _raises(SYN[: opt_at + 1] + b"\x05" + SYN[opt_at + 2 :], Reason.TCP_OPTION)


def test_too_many_extensions() -> None:
    exts = [ControlExt(ControlFlags.ACK)] * 11
    wire = SalPacket(1, 2, 6, []).encode()
    # Build by hand: the encoder itself does not refuse, the decoder does.
    body = b"".join(e.encode() for e in exts)
    shl = (12 + len(body)) // 4
    raw = _with_checksum(wire[:8] + bytes((shl, 6)) + b"\0\0" + body, shl)
    _raises(raw, Reason.TOO_MANY_EXTENSIONS)
    ten = _with_checksum(wire[:8] + bytes(((12 + 200) // 4, 6)) + b"\0\0" + body[:200], 53)
    assert len(decode_packet(ten).extensions) == 10


def test_extension_length_errors() -> None:
    base = SalPacket(1, 2, 6, []).encode()

    def with_ext(ext: bytes) -> bytes:
        ext = ext + bytes(-len(ext) % 4)
        shl = (12 + len(ext)) // 4
        return _with_checksum(base[:8] + bytes((shl, 6)) + b"\0\0" + ext, shl)

    _raises(with_ext(b"\x20\x20" + bytes(30)), Reason.SERVICE_LENGTH)
    _raises(with_ext(b"\x30\x0d" + bytes(11)), Reason.ADDRESS_LENGTH)
    _raises(with_ext(b"\x40\x08" + bytes(6)), Reason.SOURCE_LENGTH)  # one address only
    _raises(with_ext(b"\x50\x01\x00\x00"), Reason.EXTENSION_LENGTH)
    _raises(with_ext(b"\x50\x09\x00\x00"), Reason.EXTENSION_TRUNCATED)
    _raises(with_ext(b"\x11\x14" + bytes(18)), Reason.EXTENSION_RESERVED)
    unknown = decode_packet(with_ext(b"\xa0\x04\xab\xcd"))
    assert unknown.extensions[0] == UnknownExt(10, b"\xa0\x04\xab\xcd")


def test_source_and_forwarded_syn_layout() -> None:
    syn = decode_packet(SYN)
    syn.extensions.append(SourceExt(("10.0.0.1", "10.0.0.254")))
    again = decode_packet(syn.encode())
    assert again.source is not None and again.source.addresses == ("10.0.0.1", "10.0.0.254")
    assert again.shl == 17 + 3


def test_udp_datagram_layout() -> None:
    from pyserval.naming import ServiceID

    dst, src = ServiceID.from_name("dst"), ServiceID.from_name("src")
    p = SalPacket(5, 0, 17, [ServiceExt(dst), ServiceExt(src)], UdpHeader(), b"hello")
    wire = p.encode("127.0.0.1", "127.0.0.1")
    d = decode_packet(wire)
    assert d.udp is not None and d.udp.length == 13 and bytes(d.payload) == b"hello"
    assert d.verify_transport_checksum("127.0.0.1", "127.0.0.1")
    assert not d.verify_transport_checksum("127.0.0.2", "127.0.0.1")
    _raises(wire + b"x", Reason.UDP_LENGTH)
    _raises(wire[: 12 + 72 + 5], Reason.UDP_TRUNCATED)


def test_tcp_option_views() -> None:
    h = TcpHeader(
        options=[
            TcpOption.mss(1448),
            TcpOption.nop(),
            TcpOption.window_scale(7),
            TcpOption.sack_permitted(),
            TcpOption.timestamps(1, 2),
            TcpOption.sack([(10, 20), (30, 40)]),
        ]
    )
    raw = h.encode()
    d, n = TcpHeader.decode(memoryview(raw))
    assert n == len(raw) and n % 4 == 0
    assert (d.mss, d.window_scale, d.sack_permitted, d.timestamps) == (1448, 7, True, (1, 2))
    assert d.sack_blocks == [(10, 20), (30, 40)]
    with pytest.raises(ValueError):
        TcpHeader(options=[TcpOption.sack([(1, 2)] * 4)] * 2).encode()


@given(st.binary(max_size=2000))
def test_checksum_matches_word_loop(data: bytes) -> None:
    padded = data + b"\0" * (len(data) & 1)
    s = 0
    for i in range(0, len(padded), 2):
        s += (padded[i] << 8) | padded[i + 1]
        s = (s & 0xFFFF) + (s >> 16)
    assert internet_checksum(data) == (~s) & 0xFFFF or (s == 0xFFFF and not any(data))
    assert words_sum(data) == int.from_bytes(padded, "big") % 0xFFFF

"""The decoder on arbitrary and mutated bytes raises only MalformedPacket."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pyserval.data import reference_capture
from pyserval.sal import MalformedPacket, SalPacket, decode_packet

from .strategies import packets

SEEDS = [p.payload for p in reference_capture()]


def _decode_or_reject(data: bytes, verify: bool) -> None:
    try:
        packet = decode_packet(data, verify=verify)
    except MalformedPacket as exc:
        assert exc.reason  # a machine-readable reason, always
        return
    # Whatever decodes must encode again (without error), and with a good checksum,
    # to exactly the same bytes.
    wire = packet.encode()
    if verify and data[10:12] != b"\xff\xff":
        assert wire == bytes(data)


@settings(max_examples=1000)
@given(st.binary(max_size=400), st.booleans())
def test_arbitrary_bytes(data: bytes, verify: bool) -> None:
    _decode_or_reject(data, verify)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    base = bytearray(
        draw(st.sampled_from(SEEDS[:3] + SEEDS[-8:]))
        if draw(st.booleans())
        else draw(packets()).encode()
    )
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "set", "cut", "insert", "delete"]))
        if not base:
            break
        i = draw(st.integers(0, len(base) - 1))
        if op == "flip":
            base[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            base[i] = draw(st.integers(0, 255))
        elif op == "cut":
            del base[i:]
        elif op == "insert":
            base[i:i] = draw(st.binary(min_size=1, max_size=8))
        else:
            del base[i : i + draw(st.integers(1, 8))]
    return bytes(base)


@settings(max_examples=1000)
@given(mutated(), st.booleans())
def test_mutated_packets(data: bytes, verify: bool) -> None:
    _decode_or_reject(data, verify)


@given(packets())
def test_memoryview_slices_decode_like_bytes(packet: SalPacket) -> None:
    wire = packet.encode()
    buf = bytearray(b"xx" + wire + b"yy")
    view = memoryview(buf)[2:-2]
    assert decode_packet(view).encode() == wire

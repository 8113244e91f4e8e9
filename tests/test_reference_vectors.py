"""The packets captured from the reference Serval stack decode, verify and re-encode exactly."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from pyserval.data import parse_capture, reference_capture
from pyserval.naming import ServiceID
from pyserval.sal import ControlFlags, decode_packet
from pyserval.sal.checksum import internet_checksum
from pyserval.sal.transport_headers import TcpFlags

# The tests' own copy of ../shared/vectors/reference-capture.txt (captured from the
# reference stack), so every clone checks the vectors; its SHA-256 is that of the shared file.
VECTORS = Path(__file__).resolve().parent / "data" / "reference-capture.txt"
VECTORS_SHA256 = "b503bd0aa1486f50a411483a8fefd7d30d457329584702a4e31070653231e89f"
PACKETS = parse_capture(VECTORS.read_text())
BY_INDEX = {p.index: p for p in PACKETS}
REFERENCE_SERVICE = ServiceID(bytes.fromhex("00004001") + bytes(28))


def test_vectors_are_the_reference_capture() -> None:
    assert hashlib.sha256(VECTORS.read_bytes()).hexdigest() == VECTORS_SHA256
    assert len(PACKETS) > 5 and {0, 1, 2, 3, 4, 8585, 8586} <= BY_INDEX.keys()


def test_packaged_copy_matches_the_vectors() -> None:
    assert reference_capture() == PACKETS


@pytest.mark.parametrize("pkt", PACKETS, ids=lambda p: str(p.index))
def test_round_trip_and_checksums(pkt) -> None:  # type: ignore[no-untyped-def]
    decoded = decode_packet(pkt.payload)
    assert decoded.encode() == pkt.payload
    shl = pkt.payload[8]
    assert decoded.shl == shl
    # SAL checksum: recomputing it with the field zeroed gives the stored value.
    header = bytearray(pkt.payload[: shl * 4])
    stored = int.from_bytes(header[10:12], "big")
    header[10:12] = b"\0\0"
    assert internet_checksum(header) == stored
    assert decoded.verify_transport_checksum(pkt.src_ip, pkt.dst_ip)
    # Re-encoding with the transport checksum recomputed from the addresses is identical too.
    assert decoded.encode(pkt.src_ip, pkt.dst_ip) == pkt.payload
    # Decoding a memoryview gives the same, and the payload is a view, not a copy.
    view = memoryview(pkt.payload)
    again = decode_packet(view)
    assert again.encode() == pkt.payload
    if again.payload:
        assert isinstance(again.payload, memoryview) and again.payload.obj is pkt.payload


def test_handshake_fields() -> None:
    syn = decode_packet(BY_INDEX[0].payload)
    assert (syn.src_flowid, syn.dst_flowid, syn.shl, syn.protocol) == (3, 0, 17, 6)
    c = syn.control
    assert c is not None and c.flags == ControlFlags.SYN
    assert (c.verno, c.ackno, c.nonce.hex()) == (0x6694C269, 0, "29a80971eaec1501")
    assert [type(e).__name__ for e in syn.extensions] == ["ControlExt", "ServiceExt"]
    assert syn.service is not None and syn.service.service_id == REFERENCE_SERVICE
    tcp = syn.tcp
    assert tcp is not None
    assert (tcp.src_port, tcp.dst_port) == (0, 0)
    assert tcp.flags == TcpFlags.SYN and tcp.seq == 0xBB262D9C and tcp.ack == 0
    assert tcp.mss == 1448 and tcp.window_scale == 1

    synack = decode_packet(BY_INDEX[1].payload)
    c2 = synack.control
    assert c2 is not None and c2.flags == ControlFlags.SYN | ControlFlags.ACK
    assert c2.ackno == c.verno + 1  # SYN consumed one control number
    assert synack.services == []
    assert synack.tcp is not None and synack.tcp.ack == tcp.seq + 1

    ack = decode_packet(BY_INDEX[2].payload)
    c3 = ack.control
    assert c3 is not None and c3.flags == ControlFlags.ACK
    assert (c3.verno, c3.ackno) == (c.verno + 1, c2.verno + 1)
    assert c3.nonce == c.nonce
    assert ack.service is not None and ack.service.service_id == REFERENCE_SERVICE


def test_data_segments_are_base_header_only() -> None:
    for index in (3, 4):
        data = decode_packet(BY_INDEX[index].payload)
        assert data.shl == 3 and data.extensions == [] and data.control is None
        assert len(data.payload) == 1408
        assert data.tcp is not None and data.tcp.flags == TcpFlags.ACK


def test_sal_fin_exchange() -> None:
    fin = decode_packet(BY_INDEX[8585].payload)
    assert fin.transport is None and fin.payload == b""
    assert fin.control is not None and fin.control.flags == ControlFlags.FIN
    fin_ack = decode_packet(BY_INDEX[8586].payload)
    assert fin_ack.control is not None and fin_ack.control.flags == ControlFlags.ACK
    assert fin_ack.control.ackno == fin.control.verno + 1  # FIN consumed one

"""The shipped Wireshark dissector, run by the real ``tshark``, and the pcap files we write.

Expectations come from the bytes themselves, read at the offsets the wire spec gives
(``/work/shared/spec/sal-wire.md``: base header, extension layouts) or README's notes for
pyserval's own extensions, and from packets built by hand here with ``struct``, never from
pyserval's codec. Skipped when ``tshark`` is not installed (``.ci/run`` installs it).
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

import pyserval
from pyserval.core.host import HostCore
from pyserval.data import reference_capture
from pyserval.runtime.host import parse_address
from pyserval.sal import Rule
from pyserval.sal.inet import Address
from pyserval.testing import LinkConfig, SimNetwork
from pyserval.tools.pcap import LINKTYPE_RAW, PcapWriter, dissector_path
from pyserval.transport.config import StreamConfig
from pyserval.transport.connection import State

from .helpers.processes import Peer
from .simhelpers import exchange, make_pair

TSHARK = shutil.which("tshark")
needs_tshark = pytest.mark.skipif(TSHARK is None, reason="tshark is not installed")

CLIENT: Address = ("127.0.0.1", 54324)
SERVER: Address = ("127.0.0.1", 54325)


def tshark(pcap: Path, *args: str) -> str:
    assert TSHARK is not None
    proc = subprocess.run(
        [TSHARK, "-n", "-X", f"lua_script:{dissector_path()}", "-r", str(pcap), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Lua: Error" not in proc.stderr and "error" not in proc.stderr.lower(), proc.stderr
    return proc.stdout


def fields(pcap: Path, names: list[str], display_filter: str | None = None) -> list[list[str]]:
    """One row per frame: each field's values (``-E occurrence=a``, comma-separated)."""
    args = ["-T", "fields", "-E", "separator=/t", "-E", "aggregator=,"]
    for name in names:
        args += ["-e", name]
    if display_filter:
        args += ["-Y", display_filter]
    out = tshark(pcap, *args)
    return [line.split("\t") for line in out.splitlines()]


def ones_complement(data: bytes) -> int:
    """The Internet checksum of ``data`` (RFC 1071), for packets built here."""
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def sal_packet(src: int, dst: int, exts: bytes, proto: int = 6, payload: bytes = b"") -> bytes:
    """Base header + extensions (a whole number of words) + ``payload``, checksum filled in."""
    assert len(exts) % 4 == 0
    shl = 3 + len(exts) // 4
    head = struct.pack("!IIBBH", src, dst, shl, proto, 0) + exts
    head = head[:10] + ones_complement(head).to_bytes(2, "big") + head[12:]
    return head + payload


def hexnum(value: int, width: int) -> str:
    return f"0x{value:0{width}x}"


# -- the pcap file itself ---------------------------------------------------------------------


def test_pcap_file_is_classic_libpcap_with_raw_ipv4_udp_frames(tmp_path: Path) -> None:
    path = tmp_path / "one.pcap"
    with PcapWriter(path) as w:
        w.write(b"abcd", ("10.0.0.1", 1000), ("10.0.0.2", 2000), timestamp=12.5)
    raw = path.read_bytes()
    magic, major, minor, _, _, snaplen, linktype = struct.unpack_from("<IHHiIII", raw)
    assert (magic, major, minor, snaplen) == (0xA1B2C3D4, 2, 4, 65535)
    assert linktype == LINKTYPE_RAW == 101  # pcap LINKTYPE_RAW: a bare IP packet
    sec, usec, caplen, origlen = struct.unpack_from("<IIII", raw, 24)
    assert (sec, usec, caplen, origlen) == (12, 500_000, 32, 32)
    frame = raw[40:]
    assert frame[0] == 0x45 and frame[9] == 17  # IPv4, 20-byte header, protocol UDP
    assert struct.unpack_from("!H", frame, 2)[0] == 32
    assert ones_complement(frame[:20]) == 0  # the header checksum verifies
    assert frame[12:20] == bytes([10, 0, 0, 1, 10, 0, 0, 2])
    assert struct.unpack_from("!HHH", frame, 20) == (1000, 2000, 12)
    assert frame[28:] == b"abcd"


def test_pcap_writer_stops_at_its_size_bound_and_counts_what_it_left_out(
    tmp_path: Path,
) -> None:
    path = tmp_path / "bounded.pcap"
    with PcapWriter(path, max_bytes=24 + 3 * (16 + 28 + 100)) as w:
        for _ in range(10):
            w.write(bytes(100), CLIENT, SERVER)
    assert (w.written, w.dropped) == (3, 7)
    assert path.stat().st_size == 24 + 3 * (16 + 28 + 100)


def test_pyserval_dissector_prints_the_installed_lua_file() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pyserval", "dissector"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.strip()
    path = Path(out)
    assert path.name == "sal.lua" and path.is_file()
    assert 'Proto("sal"' in path.read_text()


# -- the reference vectors --------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference_pcap(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference capture as UDP: client 54324 <-> server 54325 (flowID 3 is the client)."""
    path = tmp_path_factory.mktemp("ref") / "reference.pcap"
    with PcapWriter(path) as w:
        for i, pkt in enumerate(reference_capture()):
            from_client = pkt.payload[:4] == b"\0\0\0\x03"
            src, dst = (CLIENT, SERVER) if from_client else (SERVER, CLIENT)
            w.write(pkt.payload, src, dst, timestamp=float(i))
    return path


@needs_tshark
def test_reference_vectors_base_header_field_by_field(reference_pcap: Path) -> None:
    packets = reference_capture()
    rows = fields(
        reference_pcap,
        [
            *("sal.src_flowid", "sal.dst_flowid", "sal.shl", "sal.protocol", "sal.checksum"),
            *("sal.checksum.status", "sal.ext_count"),
        ],
    )
    assert len(rows) == len(packets) == 14
    for row, pkt in zip(rows, packets, strict=True):
        p = pkt.payload
        shl = p[8]
        # every extension in this capture is CONTROL (20 bytes) or SERVICE (36)
        exts = {0: 0, 20: 1, 56: 2}[shl * 4 - 12]
        assert row == [
            hexnum(int.from_bytes(p[0:4], "big"), 8),
            hexnum(int.from_bytes(p[4:8], "big"), 8),
            str(shl),
            str(p[9]),
            hexnum(int.from_bytes(p[10:12], "big"), 4),
            "good",
            str(exts),
        ], pkt.index


@needs_tshark
def test_reference_vectors_control_and_service_extensions(reference_pcap: Path) -> None:
    names = ["sal.ctl.flags", "sal.ctl.verno", "sal.ctl.ackno", "sal.ctl.nonce", "sal.svc.id"]
    names += ["sal.ctl.flags.syn", "sal.ctl.flags.ack", "sal.ctl.flags.fin"]
    rows = fields(reference_pcap, names)
    by_index = {
        pkt.index: (row, pkt.payload) for row, pkt in zip(rows, reference_capture(), strict=True)
    }
    for index in (0, 1, 2, 8585, 8586, 8589, 8590):  # the packets with a CONTROL extension
        row, p = by_index[index]
        c = p[12:32]  # CONTROL right after the base header: head, flags, reserved, ...
        assert c[0] >> 4 == 1 and c[1] == 20
        flags = c[2]
        expected = [
            hexnum(flags, 2),
            hexnum(int.from_bytes(c[4:8], "big"), 8),
            hexnum(int.from_bytes(c[8:12], "big"), 8),
            c[12:20].hex(),
            p[36:68].hex() if p[8] == 17 else "",  # SERVICE follows in SYN and third ACK
            str(int(bool(flags & 0x80))),
            str(int(bool(flags & 0x20))),
            str(int(bool(flags & 0x04))),
        ]
        assert row == expected, index
    # the spec's worked values: SYN verno = ISS, ackno 0; the SYN-ACK acknowledges ISS + 1
    syn, synack = by_index[0][0], by_index[1][0]
    assert syn[0] == "0x80" and syn[2] == "0x00000000"
    assert synack[0] == "0xa0" and int(synack[2], 16) == int(syn[1], 16) + 1
    assert syn[4] == "00004001" + "0" * 56  # serviceID 0x00004001, the rest zero


@needs_tshark
def test_reference_vectors_transport_goes_to_wiresharks_tcp(reference_pcap: Path) -> None:
    rows = fields(
        reference_pcap,
        ["tcp.srcport", "tcp.dstport", "tcp.seq_raw", "tcp.ack_raw", "tcp.len", "tcp.flags"],
        display_filter="tcp",
    )
    with_tcp = [pkt.payload for pkt in reference_capture() if len(pkt.payload) > pkt.payload[8] * 4]
    assert len(rows) == len(with_tcp) == 10
    for row, p in zip(rows, with_tcp, strict=True):
        t = p[p[8] * 4 :]
        header_len = (t[12] >> 4) * 4
        assert row == [
            "0",
            "0",
            str(int.from_bytes(t[4:8], "big")),
            str(int.from_bytes(t[8:12], "big")),
            str(len(t) - header_len),
            hexnum(((t[12] & 0x0F) << 8) | t[13], 4),
        ]
    assert rows[3][4] == "1408"  # the reference's 1408-byte segments


@needs_tshark
def test_reference_vectors_summary_lines(reference_pcap: Path) -> None:
    lines = tshark(reference_pcap).splitlines()
    assert "SAL 00000003>00000000 CTL[SYN] SVC[00004001...]" in lines[0]
    assert "SAL 00000004>00000003 CTL[SYN+ACK]" in lines[1]
    assert lines[8].rstrip().endswith("SAL 00000004>00000003 CTL[FIN]")


# -- pyserval's own extensions, unknown types, heuristics, damage ------------------------------


def own_extensions_packet() -> bytes:
    """A forwarded SYN with every extension pyserval adds (README "Wire format notes")."""
    control = bytes([0x10, 20, 0x80, 0]) + struct.pack("!II", 0x11223344, 0) + bytes(range(8))
    service = bytes([0x20, 36, 0, 0]) + bytes(range(32))
    source = bytes([0x40, 12, 0, 0]) + bytes([192, 0, 2, 1, 198, 51, 100, 7])
    ports = bytes([0x50, 8, 2, 0]) + struct.pack("!HH", 40001, 54326)
    mp_capable = bytes([0x60, 12, 0, 0]) + (0x0102030405060708).to_bytes(8, "big")
    dss = bytes([0x70, 20, 0x03, 0]) + struct.pack("!QQ", 2**40 + 5, 77)
    join = bytes([0x80, 16, 0, 0]) + struct.pack("!I", 0xCAFEBABE) + b"proof-8b"
    add_addr = bytes([0x90, 8]) + struct.pack("!H", 5555) + bytes([203, 0, 113, 9])
    unknown = bytes([0xB0, 8]) + b"\xde\xad\xbe\xef\x01\x02"  # type 11: not known (yet)
    pad = b"\0\0\0\0"
    exts = control + service + source + ports + mp_capable + dss + join + add_addr
    exts += unknown + pad
    tcp = struct.pack("!HHIIBBHHH", 0, 0, 1000, 0, 0x50, 0x02, 65535, 0, 0)
    return sal_packet(0xA1, 0, exts, payload=tcp)


@needs_tshark
def test_pyserval_extensions_5_to_9_and_an_unknown_type(tmp_path: Path) -> None:
    path = tmp_path / "own.pcap"
    with PcapWriter(path) as w:
        w.write(own_extensions_packet(), ("192.0.2.1", 40001), ("127.0.0.1", 54325))
    names = [
        "sal.checksum.status",
        "sal.ext_count",
        "sal.ext.type",
        "sal.source.ip",
        "sal.source_ports.count",
        "sal.source_ports.port",
        "sal.mp_capable.key",
        "sal.dss.flags.dsn",
        "sal.dss.flags.data_fin",
        "sal.dss.dsn",
        "sal.dss.data_ack",
        "sal.join.token",
        "sal.join.proof",
        "sal.add_addr.port",
        "sal.add_addr.ip",
        "sal.ext.data",
        "tcp.seq_raw",
    ]
    [row] = fields(path, names)
    assert dict(zip(names, row, strict=True)) == {
        "sal.checksum.status": "good",
        "sal.ext_count": "9",  # PAD bytes are not extensions (they are listed, not counted)
        "sal.ext.type": "1,2,4,5,6,7,8,9,11,0,0,0,0",
        "sal.source.ip": "192.0.2.1,198.51.100.7",
        "sal.source_ports.count": "2",
        "sal.source_ports.port": "40001,54326",
        "sal.mp_capable.key": "0x0102030405060708",
        "sal.dss.flags.dsn": "1",
        "sal.dss.flags.data_fin": "1",
        "sal.dss.dsn": str(2**40 + 5),
        "sal.dss.data_ack": "77",
        "sal.join.token": "0xcafebabe",
        "sal.join.proof": b"proof-8b".hex(),
        "sal.add_addr.port": "5555",
        "sal.add_addr.ip": "203.0.113.9",
        "sal.ext.data": "deadbeef0102",
        "tcp.seq_raw": "1000",
    }
    verbose = tshark(path, "-V")
    assert "extension type 11" in verbose
    assert "SOURCE: 192.0.2.1 > 198.51.100.7" in verbose


@needs_tshark
def test_unconnected_datagram_goes_to_wiresharks_udp(tmp_path: Path) -> None:
    """base + SERVICE(destination) + SERVICE(source) + UDP (protocol 17), as the spec lays
    out an unconnected datagram."""
    path = tmp_path / "dgram.pcap"
    dst_svc, src_svc = bytes(range(32)), bytes(range(32, 64))
    exts = bytes([0x20, 36, 0, 0]) + dst_svc + bytes([0x20, 36, 0, 0]) + src_svc
    payload = b"hello datagram"
    udp = struct.pack("!HHHH", 0, 0, 8 + len(payload), 0) + payload
    with PcapWriter(path) as w:
        w.write(sal_packet(9, 0, exts, proto=17, payload=udp), CLIENT, SERVER)
    [row] = fields(path, ["sal.protocol", "sal.svc.id", "udp.srcport", "udp.length", "data.data"])
    # the outer UDP header first, then the one inside the SAL
    assert row == ["17", f"{dst_svc.hex()},{src_svc.hex()}", "54324,0", "114,22", payload.hex()]


@needs_tshark
def test_random_bytes_on_the_sal_ports_never_raise_a_lua_error(tmp_path: Path) -> None:
    rng = random.Random(16)
    path = tmp_path / "fuzz.pcap"
    with PcapWriter(path) as w:
        for i in range(300):
            body = rng.randbytes(rng.randrange(0, 160))
            if i % 2 and len(body) >= 12:  # half with a plausible shl and a valid checksum
                shl = rng.randrange(3, len(body) // 4 + 1)
                body = sal_packet(1, 2, body[12 : shl * 4], rng.choice((6, 17)), body[shl * 4 :])
            w.write(body, CLIENT, SERVER)
    verbose = tshark(path, "-V")
    assert verbose.count("Frame ") >= 300
    assert "Lua Error" not in verbose


@needs_tshark
def test_heuristic_finds_sal_on_other_ports_and_leaves_other_udp_alone(tmp_path: Path) -> None:
    path = tmp_path / "heur.pcap"
    control = bytes([0x10, 20, 0x04, 0]) + struct.pack("!II", 7, 8) + bytes(8)
    with PcapWriter(path) as w:
        w.write(sal_packet(5, 6, control), ("127.0.0.1", 40000), ("127.0.0.1", 40001))
        w.write(b"\x00" * 40, ("127.0.0.1", 40000), ("127.0.0.1", 40001))  # not SAL
        w.write(bytes(range(48)), ("127.0.0.1", 40002), ("127.0.0.1", 40003))  # not SAL
    rows = fields(path, ["frame.number", "sal.src_flowid", "sal.ctl.flags.fin"])
    assert rows == [["1", "0x00000005", "1"], ["2", "", ""], ["3", "", ""]]


@needs_tshark
def test_damaged_headers_are_flagged_not_fatal(tmp_path: Path) -> None:
    path = tmp_path / "bad.pcap"
    control = bytes([0x10, 20, 0x20, 0]) + bytes(16)
    good = sal_packet(1, 2, control)
    bad_checksum = good[:10] + bytes([good[10] ^ 0xFF, good[11]]) + good[12:]
    # the extension claims 40 bytes in a 32-byte header
    overrun = sal_packet(1, 2, bytes([0x10, 40]) + bytes(18))
    short_control = sal_packet(
        1, 2, bytes([0x10, 8]) + bytes(6) + bytes([0x10, 4, 0, 0]) + bytes(4)
    )
    with PcapWriter(path) as w:
        for pkt in (bad_checksum, overrun, short_control, good[:11]):
            w.write(pkt, CLIENT, SERVER)
        # reserved low nibble set in a CONTROL head; then 11 PAD-free extensions
        w.write(sal_packet(1, 2, bytes([0x11, 20, 0x20, 0]) + bytes(16)), CLIENT, SERVER)
        w.write(sal_packet(1, 2, (bytes([0x90, 8]) + bytes(6)) * 11), CLIENT, SERVER)
    rows = fields(path, ["sal.checksum.status", "_ws.expert.message"])
    assert rows[0][0] == "bad" and "Bad SAL header checksum" in rows[0][1]
    assert "reserved bits set in an extension head" in rows[4][1]
    assert "more than 10 extensions" in rows[5][1]
    assert rows[1][0] == "good" and "extension length 40 past the header" in rows[1][1]
    assert "CONTROL of 8 bytes" in rows[2][1]
    assert rows[3] == ["", ""]  # 11 bytes: too short to be SAL at all


# -- captures of pyserval itself --------------------------------------------------------------


@needs_tshark
def test_simulated_network_capture_decodes_frame_for_frame(tmp_path: Path) -> None:
    pair = make_pair(seed=3)
    path = tmp_path / "sim.pcap"
    writer = pair.net.capture(path)
    pair.net.trace = []
    sent: list[tuple[float, bytes]] = []
    previous = pair.net.tap
    assert previous is not None

    def record(now: float, data: bytes, src: Address, dst: Address, fate: str) -> None:
        previous(now, data, src, dst, fate)
        if fate == "sent":
            sent.append((now, data))

    pair.net.tap = record
    pair.connect()
    assert pair.client is not None and pair.server is not None
    data = bytes(range(256)) * 40
    exchange(pair, data, data[::-1])
    pair.net.run_for(1)
    writer.close()
    rows = fields(path, ["frame.time_epoch", "sal.src_flowid", "sal.checksum.status"])
    assert len(rows) == len(sent) > 10
    for row, (now, data) in zip(rows, sent, strict=True):
        assert abs(float(row[0]) - now) < 2e-6
        assert row[1] == hexnum(int.from_bytes(data[:4], "big"), 8)
        assert row[2] == "good"
    first = fields(path, ["sal.ctl.flags", "sal.svc.id", "ip.src", "udp.dstport"])[0]
    assert first == ["0x80", pyserval.ServiceID.from_name("echo").hex, "10.0.0.1", "54325"]


@needs_tshark
def test_host_pcap_records_a_real_connection(tmp_path: Path) -> None:
    path = tmp_path / "host.pcap"
    message = hashlib.sha256(b"seed").digest() * 2000  # 64,000 bytes

    async def main() -> tuple[int, int, Address, Address]:
        server = pyserval.Host(["127.0.0.1:0"])
        async with server:
            listener = await server.listen("pcap-echo")
            route = "{}:{}".format(*server.addresses[0])
            client = pyserval.Host(["127.0.0.1:0"], routes={"pcap-echo": route}, pcap=path)
            async with client:
                stream = await client.connect("pcap-echo", timeout=10)
                peer = await listener.accept()
                await stream.send(message)
                await stream.send_eof()
                got = b""
                async with asyncio.timeout(10):
                    while len(got) < len(message):
                        got += await peer.receive()
                assert got == message
                ids = (stream.local_flowid, stream.remote_flowid)
                await peer.aclose()
                await stream.aclose()
            return ids[0], ids[1], client.addresses[0], server.addresses[0]

    local_id, remote_id, caddr, saddr = asyncio.run(main())
    rows = fields(
        path,
        [
            *("ip.src", "udp.srcport", "ip.dst", "udp.dstport", "sal.src_flowid"),
            *("sal.dst_flowid", "sal.ctl.flags", "sal.svc.id", "sal.checksum.status"),
            "tcp.payload",
        ],
    )
    assert rows, "no frames recorded"
    assert all(r[8] == "good" for r in rows)
    syn = rows[0]
    assert syn[:4] == [caddr[0], str(caddr[1]), saddr[0], str(saddr[1])]
    assert syn[4:7] == [hexnum(local_id, 8), "0x00000000", "0x80"]
    assert syn[7] == pyserval.ServiceID.from_name("pcap-echo").hex
    # sent frames carry our flowID first, received ones the peer's
    outgoing = [r for r in rows if r[1] == str(caddr[1])]
    incoming = [r for r in rows if r[3] == str(caddr[1])]
    assert outgoing and incoming
    assert all(r[4] == hexnum(local_id, 8) for r in outgoing)
    assert all(r[4] == hexnum(remote_id, 8) for r in incoming)
    # the payload bytes as Wireshark's TCP dissector shows them: exactly what was sent
    payload = b"".join(bytes.fromhex(r[9].replace(":", "")) for r in outgoing if r[9])
    assert payload == message


@needs_tshark
def test_multipath_capture_shows_pyserval_extensions_as_readme_defines_them(
    tmp_path: Path,
) -> None:
    """A multipath connection on the simulated network: MP_CAPABLE keys in SYN and SYN-ACK,
    the JOIN's token and proof by README's formulas, ADD_ADDR, DSS on data."""
    a1, a2 = ("10.0.1.1", 40000), ("10.0.2.1", 40000)
    b1, b2 = ("10.0.1.2", 54325), ("10.0.2.2", 54325)
    net = SimNetwork(seed=1, default_link=LinkConfig(delay=0.01))
    net.set_path(a1[0], b2[0], LinkConfig(down=True))
    net.set_path(a2[0], b1[0], LinkConfig(down=True))
    path = tmp_path / "mp.pcap"
    writer = net.capture(path)
    a = HostCore([a1, a2], rng=random.Random(1), config=StreamConfig(multipath=True))
    b = HostCore([b1, b2], rng=random.Random(2), config=StreamConfig())
    net.attach(a, a1, a2)
    net.attach(b, b1, b2)
    a.service_table.add("svc", Rule.forward(b1))
    listener = b.listen("svc")
    client = a.connect("svc", net.now)
    net.kick(a)
    assert net.run_until(lambda: client.state is State.ESTABLISHED, 10)
    a.add_path(client, a2, b2, net.now)
    net.kick(a)
    data = bytes(range(256)) * 2000
    sent = 0
    got = bytearray()
    server = None
    while len(got) < len(data) and net.now < 30:
        server = server or listener.accept()
        if sent < len(data):
            sent += client.write(data[sent : sent + 65536])
            net.kick(a)
        net.run_for(0.01)
        if server is not None:
            got += server.read()
    assert bytes(got) == data
    writer.close()

    names = ["ip.src", "sal.ctl.flags", "sal.mp_capable.key", "sal.join.token", "sal.join.proof"]
    names += ["sal.add_addr.ip", "sal.add_addr.port", "sal.dss.flags.dsn", "tcp.len"]
    rows = [dict(zip(names, r, strict=True)) for r in fields(path, names)]
    syn = next(r for r in rows if r["sal.ctl.flags"] == "0x80" and r["sal.mp_capable.key"])
    synack = next(r for r in rows if r["sal.ctl.flags"] == "0xa0" and r["sal.mp_capable.key"])
    client_key, server_key = (
        int(syn["sal.mp_capable.key"], 16),
        int(synack["sal.mp_capable.key"], 16),
    )
    join = next(r for r in rows if r["sal.join.token"])
    assert join["ip.src"] == a2[0] and join["sal.ctl.flags"] == "0x80"
    # README: a token is the first 4 bytes of SHA-256(key); the proof SHA-256(client key,
    # server key, "pyserval-join"), keys as 8 big-endian bytes
    token = hashlib.sha256(server_key.to_bytes(8, "big")).digest()[:4]
    assert join["sal.join.token"] == "0x" + token.hex()
    raw = client_key.to_bytes(8, "big") + server_key.to_bytes(8, "big") + b"pyserval-join"
    assert join["sal.join.proof"] == hashlib.sha256(raw).digest()[:8].hex()
    adverts = {(r["sal.add_addr.ip"], r["sal.add_addr.port"]) for r in rows if r["sal.add_addr.ip"]}
    assert (b2[0], str(b2[1])) in adverts
    data_frames = [r for r in rows if r["tcp.len"] not in ("", "0")]
    assert data_frames and all(r["sal.dss.flags.dsn"] == "1" for r in data_frames)
    assert {r["ip.src"] for r in data_frames} >= {a1[0]}


@needs_tshark
def test_router_pcap_shows_the_forwarded_syn_with_its_source_path(tmp_path: Path) -> None:
    """``pyserval router --pcap``: the SYN it forwards carries SOURCE [client, router] and
    SOURCE_PORTS with their UDP ports (spec: forwarded SYN; README: type 5)."""
    path = tmp_path / "router.pcap"
    router = Peer(["-m", "pyserval", "router", "--listen", "127.0.0.1:0", "--pcap", str(path)])
    replica: Peer | None = None
    try:
        line = router.wait_for(r"^router listening on ", 20)
        router_addr = parse_address(line.rsplit(" ", 1)[1])
        route = "{}:{}".format(*router_addr)
        replica = Peer(["-m", "pyserval", "echo", "--service", "pcap-fwd", "--router", route])
        replica.wait_for(r"^echo .* serving ", 20)

        async def main() -> Address:
            client = pyserval.Host(["127.0.0.1:0"], router=route)
            async with client:
                deadline = asyncio.get_running_loop().time() + 10
                while True:  # the replica's registration may still be on its way
                    try:
                        stream = await client.connect("pcap-fwd", timeout=2)
                        break
                    except pyserval.ServalConnectError:
                        assert asyncio.get_running_loop().time() < deadline
                await stream.send(b"ping")
                assert await stream.receive() == b"ping"
                await stream.aclose()
                return client.addresses[0]

        client_addr = asyncio.run(main())
    finally:
        for peer in (replica, router):
            if peer is not None:
                peer.stop()
    names = ["ip.src", "ip.dst", "sal.ctl.flags", "sal.source.ip", "sal.source_ports.port"]
    rows = [dict(zip(names, r, strict=True)) for r in fields(path, names, "sal.source.ip")]
    forwarded = [r for r in rows if r["ip.src"] == router_addr[0]]
    assert forwarded, rows
    assert forwarded[0]["sal.ctl.flags"] == "0x80"
    assert forwarded[0]["sal.source.ip"] == f"{client_addr[0]},{router_addr[0]}"
    assert forwarded[0]["sal.source_ports.port"] == f"{client_addr[1]},{router_addr[1]}"

"""``pyserval tour``: pyserval's sans-I/O parts at work, on data anyone can check.

It shows the foundation: naming (including a
self-certifying ID), the wire codec on packets captured from the reference Serval stack,
the service table resolving IDs by longest prefix, and malformed input being rejected with
a reason.
"""

from __future__ import annotations

import argparse
import collections
import random

from ..core import HostCore
from ..data import reference_capture
from ..naming import NotCertified, ServiceID, ServiceKey, ServicePrefix
from ..sal import MalformedPacket, Rule, ServiceTable, Target, decode_packet
from ..sal.checksum import internet_checksum
from ..testing import Address, LinkConfig, SimNetwork
from ..transport import State
from .decode import describe

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``pyserval tour``."""
    parser.add_argument("--seed", type=int, default=1, help="seed for the weighted choices")


def _title(text: str) -> None:
    print(f"\n== {text} " + "=" * max(0, 70 - len(text)))


def _naming() -> None:
    _title("naming: serviceIDs, prefixes, self-certifying IDs")
    echo = ServiceID.from_name("echo")
    print(f"ServiceID.from_name('echo') = {echo.hex}")
    block = ServicePrefix.parse("00004001/32")
    ref = ServiceID(bytes.fromhex("00004001") + bytes(28))
    print(f"prefix {block} contains the reference service {ref.hex[:8]}...: {block.contains(ref)}")
    key = ServiceKey.generate()
    sid = key.service_id("0a0b/16")
    print(f"self-certifying ID under 0a0b/16: {sid.hex}")
    print(f"  certified by its key: {key.verify(sid)}")
    other = ServiceKey.generate()
    try:
        other.public_key.check_certifies(sid)
    except NotCertified as exc:
        print(f"  another key is refused: {str(exc)[:90]}...")


def _wire() -> None:
    _title("wire codec: packets captured from the reference Serval stack")
    for pkt in reference_capture():
        decoded = decode_packet(pkt.payload)
        same = decoded.encode() == pkt.payload
        checksum = decoded.verify_transport_checksum(pkt.src_ip, pkt.dst_ip)
        print(f"#{pkt.index:<5} {describe(decoded)}")
        print(f"       re-encoded identical: {same}; SAL and TCP checksums verify: {checksum}")


def _table(seed: int) -> None:
    _title("service table: longest-prefix match, weighted FORWARD, DEMUX, DROP")
    table = ServiceTable(rng=random.Random(seed))
    echo = ServiceID.from_name("echo")
    table.add("0" * 64 + "/0", Rule.forward(("10.0.0.1", 54325)))  # default: a router
    table.add("00004001/32", Rule.forward(("10.0.0.2", 54325), ("10.0.0.3", 54325)))
    table.add(echo, Rule.demux("local echo listener"))
    table.add("0000dead/32", Rule.drop())
    weighted = ServicePrefix.parse("7700/16")
    table.replace(
        weighted,
        [Rule.forward(Target(("10.1.0.1", 54325), 3), Target(("10.1.0.2", 54325), 1))],
    )
    for entry in table:
        print(f"  {entry.prefix}  {[r.action.name for r in entry.rules]}")
    queries = {
        "echo (by name)": echo,
        "reference 00004001...": ServiceID(bytes.fromhex("00004001") + bytes(28)),
        "0000dead...": ServiceID(bytes.fromhex("0000dead") + bytes(28)),
        "anything else": ServiceID.from_name("unknown service"),
    }
    for label, sid in queries.items():
        res = table.lookup(sid)
        assert res is not None
        where = res.target.address if res.target else res.listener
        match = f"{res.entry.prefix.length:>3}-bit match"
        print(f"  {label:<24} -> {match}, {res.action.name} {where or ''}")
    counts: collections.Counter[Address] = collections.Counter()
    for i in range(4000):
        res = table.lookup(ServiceID((0x7700 << 240) | i))
        assert res is not None and res.target is not None
        counts[res.target.address] += 1
    print(f"  4000 lookups in 7700/16 with weights 3:1 -> {dict(counts)}")
    print(f"  hits per entry: {[(str(e.prefix.length), e.hits) for e in table]}")


def _fix_checksum(data: bytes) -> bytes:
    """Recompute the SAL checksum so that the decoder reaches the field we broke."""
    shl = data[8] * 4
    header = bytearray(data[:shl])
    header[10:12] = b"\0\0"
    header[10:12] = internet_checksum(header).to_bytes(2, "big")
    return bytes(header) + data[shl:]


def _simulated(seed: int) -> None:
    _title("Serval TCP between two sans-I/O hosts on a simulated lossy network")
    net = SimNetwork(seed=seed, default_link=LinkConfig(delay=0.01, loss=0.05, reorder=0.05))
    client_addr, server_addr = ("10.0.0.1", 54324), ("10.0.0.2", 54325)
    client = HostCore([client_addr], rng=random.Random(seed))
    server = HostCore([server_addr], rng=random.Random(seed + 1))
    net.attach(client, client_addr)
    net.attach(server, server_addr)
    client.service_table.add("echo", Rule.forward(server_addr))
    listener = server.listen("echo")
    shown: list[str] = []

    def tap(now: float, data: bytes, src: Address, dst: Address, fate: str) -> None:
        if fate in ("delivered", "lost") and len(shown) < 6:
            shown.append(
                f"  {now * 1000:7.1f} ms {src[0]}->{dst[0]} {fate:<9} "
                f"{describe(decode_packet(data))}"
            )

    net.tap = tap
    conn = client.connect("echo", net.now)
    net.kick(client)
    net.run_until(lambda: conn.state is State.ESTABLISHED, 60)
    payload = random.Random(seed).randbytes(1_000_000)
    sent, got, peer = 0, bytearray(), None
    start = net.now
    while len(got) < len(payload) or peer is None or not peer.at_eof:
        if sent < len(payload):
            sent += conn.write(payload[sent:])
            if sent == len(payload):
                conn.shutdown()
        peer = peer or listener.accept()
        if peer is not None:
            got += peer.read()
            if peer.at_eof and peer.fin_offset is None:
                peer.shutdown()
        net.kick(client, server)
        net.run_for(0.05)
    elapsed = net.now - start
    print("\n".join(shown))
    net.run_until(lambda: conn.state is not State.ESTABLISHED, 120)
    stats = net.stats.total
    print(
        f"  1 MB crossed 5% loss in {elapsed:.2f} s of virtual time "
        f"({len(payload) / elapsed / 1e6:.2f} MB/s), byte-exact: {bytes(got) == payload}"
    )
    print(
        f"  packets sent {stats.sent_packets}, lost {stats.dropped.get('loss', 0)}; "
        f"client ended {conn.state.name}, server {peer.state.name if peer else '?'}"
        + (f" (error: {conn.error})" if conn.error else "")
    )


def _malformed() -> None:
    _title("malformed input is rejected with a reason, never a crash")
    good = reference_capture()[0].payload
    samples = {
        "too short": good[:7],
        "shl past the end": good[:8] + b"\xff" + good[9:],
        "bit flipped in header": good[:20] + bytes([good[20] ^ 1]) + good[21:],
        "CONTROL length 19": _fix_checksum(good[:13] + b"\x13" + good[14:]),
    }
    for label, data in samples.items():
        try:
            decode_packet(data)
            print(f"  {label}: accepted?!")
        except MalformedPacket as exc:
            print(f"  {label:<24} -> {exc.reason}")


def run(args: argparse.Namespace) -> int:
    """Run every part of the demonstration."""
    _naming()
    _wire()
    _table(args.seed)
    _simulated(args.seed)
    _malformed()
    print(
        "\nThe networked demonstration (router, replicas, failover) comes with the control plane."
    )
    return 0

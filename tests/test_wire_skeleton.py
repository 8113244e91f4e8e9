"""``benchmarks/wire_skeleton.py``: pyserval's connect-and-close cycle on the wire with no
protocol behind it, the floor under any faster per-packet path.

The skeleton is only a floor of *our* cycle if it sends what our cycle sends. The
expectation comes from a real one: two pyserval hosts on loopback run the cycle, the
client records every datagram in a pcap file, and each datagram is classified from the
file by its direction and its CONTROL and TCP flags (the spec's bits); the skeleton run
over real sockets must send the same kinds, as many of each, at the same sizes, and its
server must accept every connection its client finished.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import sys
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar

import anyio
import pytest

import pyserval
from pyserval.sal.extensions import ControlFlags as C
from pyserval.sal.packet import decode_packet
from pyserval.sal.transport_headers import TcpFlags as T

from .helpers.processes import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import wire_skeleton as ws

pytestmark = pytest.mark.timeout(60)

CYCLES = 5

# (sent by the client, CONTROL flags or None, TCP flags or None) -> the skeleton's kind.
REAL_KINDS = {
    (True, C.SYN, T.SYN): ws.SYN,
    (False, C.SYN | C.ACK, T.SYN | T.ACK): ws.SYN_ACK,
    (True, C.ACK, T.ACK): ws.THIRD_ACK,
    (True, None, T.FIN | T.ACK): ws.CLIENT_FIN,
    (False, C.FIN, T.ACK): ws.SERVER_SAL_FIN,
    (True, C.FIN | C.ACK, None): ws.CLIENT_SAL_FIN,
    (False, C.ACK, None): ws.SAL_ACK,
    (False, None, T.FIN | T.ACK): ws.SERVER_FIN,
}


def _pcap_payloads(path: Path) -> list[tuple[bytes, int]]:
    """(UDP payload, source port) of each record of a LINKTYPE_RAW IPv4 pcap file."""
    data = path.read_bytes()
    at, out = 24, []
    while at < len(data):
        incl = struct.unpack_from("<I", data, at + 8)[0]
        frame = data[at + 16 : at + 16 + incl]
        ihl = (frame[0] & 0x0F) * 4
        out.append((frame[ihl + 8 :], struct.unpack_from("!H", frame, ihl)[0]))
        at += 16 + incl
    return out


async def _real_cycle(pcap: Path) -> list[tuple[int, int]]:
    """(kind, size) of every datagram of ``CYCLES`` real connect-and-close cycles."""
    config = pyserval.StreamConfig(time_wait=0.5)
    async with (
        pyserval.Host(["127.0.0.1:0"]) as server,
        pyserval.Host(["127.0.0.1:0"], stream_config=config, pcap=pcap) as client,
    ):
        listener = await server.listen("wire-skeleton", backlog=16)

        async def serve() -> None:
            async for stream in listener:
                await stream.aclose()

        task = asyncio.ensure_future(serve())
        client.add_route("wire-skeleton", "{}:{}".format(*server.addresses[0]))
        for _ in range(CYCLES):
            stream = await client.connect("wire-skeleton")
            with pytest.raises(anyio.EndOfStream):
                await stream.receive()
            await stream.aclose()
        await asyncio.sleep(0.3)  # the last close's tail
        client_port = client.addresses[0][1]
        task.cancel()
    kinds = []
    for payload, sport in _pcap_payloads(pcap):
        pkt = decode_packet(payload)
        ctl, tcp = pkt.control, pkt.tcp
        key = (
            sport == client_port,
            None if ctl is None else ctl.flags,
            None if tcp is None else tcp.flags & 0xFF,
        )
        assert key in REAL_KINDS, f"a datagram the skeleton does not know: {key}"
        assert not pkt.payload
        kinds.append((REAL_KINDS[key], len(payload)))
    return kinds


class _Recording(socket.socket):
    """A socket that notes the kind and size of each datagram it sends."""

    sent: ClassVar[list[tuple[int, int]]] = []

    def sendto(self, data: Any, address: Any) -> int:  # type: ignore[override]
        self.sent.append((data[0], len(data)))
        return super().sendto(data, address)


class _Ctl:
    """The parent's side of a child's pipe, in one process."""

    def __init__(self) -> None:
        self.address: tuple[str, int] | None = None
        self.stop = asyncio.Event()

    def announce(self, address: tuple[str, int]) -> None:
        self.address = address

    async def stopped(self) -> None:
        await self.stop.wait()


async def _skeleton_cycle(
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[list[tuple[int, int]], int, int]:
    """(kind, size) of every datagram of the skeleton's cycles, and how many connections
    its client finished and its server accepted."""

    def recording() -> socket.socket:
        sock = _Recording(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        sock.bind(("127.0.0.1", 0))
        return sock

    _Recording.sent = []
    monkeypatch.setattr(ws, "_socket", recording)
    ctl = _Ctl()
    server = asyncio.ensure_future(ws.skeleton_server(ctl, {}))  # type: ignore[arg-type]
    while ctl.address is None:
        await asyncio.sleep(0)
    loop = asyncio.get_running_loop()
    sock = ws._socket()
    client = ws._Client(sock, loop)
    loop.add_reader(sock.fileno(), client.readable)
    for _ in range(CYCLES):
        await client.cycle(ctl.address)
    await asyncio.sleep(0.2)  # the last close's tail
    loop.remove_reader(sock.fileno())
    sock.close()
    ctl.stop.set()
    accepted: int = (await server)["accepted"]
    return _Recording.sent, client.number, accepted


def test_the_skeleton_sends_what_a_real_cycle_sends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = asyncio.run(_real_cycle(tmp_path / "cycle.pcap"))
    skeleton, finished, accepted = asyncio.run(_skeleton_cycle(monkeypatch))
    # Every real datagram's size is the one the skeleton gives its kind.
    assert all(size == ws.SIZES[kind] for kind, size in real)
    assert Counter(skeleton) == Counter(real)
    # Eight of them a cycle, one of each kind.
    assert Counter(kind for kind, _ in real) == {kind: CYCLES for kind in ws.SIZES}
    assert finished == accepted == CYCLES


def test_a_skeleton_client_whose_server_is_gone_fails_instead_of_hanging(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gone = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    gone.bind(("127.0.0.1", 0))  # bound and never read: the SYN is lost
    monkeypatch.setattr(ws, "STALL", 0.2)
    params = {"address": gone.getsockname(), "seconds": 5.0}
    with pytest.raises(RuntimeError, match="no connection finished"):
        asyncio.run(ws.skeleton_client(None, params))  # type: ignore[arg-type]
    gone.close()

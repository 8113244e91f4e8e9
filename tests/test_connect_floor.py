"""``benchmarks/connect_floor.py``: pyserval's connect-and-close cycle with no protocol
behind it, the floor under any faster per-packet path.

The floor is only a floor of *our* cycle if it moves what our cycle moves. The expectation
comes from real cycles: two pyserval hosts on loopback run them one at a time (each close
finished before the next connect), the client records every datagram in a pcap file, and
the file must hold, cycle after cycle, the floor's datagrams in its order, from the same
sender and of the same size, for the spec's close and for the compact one.
"""

from __future__ import annotations

import asyncio
import struct
import sys
from pathlib import Path

import anyio
import pytest

import pyserval

from .helpers.processes import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import connect_floor as cf

pytestmark = pytest.mark.timeout(60)

CYCLES = 3


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


async def _real_cycles(pcap: Path, compact: bool) -> list[tuple[str, int]]:
    """(sender, size) of every datagram of ``CYCLES`` real cycles, one at a time."""
    config = pyserval.StreamConfig(time_wait=0.5, compact_close=compact)
    async with (
        pyserval.Host(["127.0.0.1:0"], stream_config=config) as server,
        pyserval.Host(["127.0.0.1:0"], stream_config=config, pcap=pcap) as client,
    ):
        listener = await server.listen("floor", backlog=16)

        async def serve() -> None:
            async for stream in listener:
                await stream.aclose()

        task = asyncio.ensure_future(serve())
        client.add_route("floor", "{}:{}".format(*server.addresses[0]))
        for _ in range(CYCLES):
            stream = await client.connect("floor")
            with pytest.raises(anyio.EndOfStream):
                await stream.receive()
            await stream.aclose()
            await asyncio.sleep(0.2)  # the close's tail, before the next connect
        client_port = client.addresses[0][1]
        task.cancel()
    return [
        ("client" if sport == client_port else "server", len(payload))
        for payload, sport in _pcap_payloads(pcap)
    ]


@pytest.mark.parametrize("cycle", ["spec", "compact"])
def test_the_floor_moves_what_a_real_cycle_moves(tmp_path: Path, cycle: str) -> None:
    real = asyncio.run(_real_cycles(tmp_path / "cycle.pcap", compact=cycle == "compact"))
    assert real == list(cf.CYCLES[cycle]) * CYCLES
    # The floor's own datagrams are those sizes, each carrying its place in the cycle.
    sent = cf.datagrams(cycle)
    assert [len(d) for d in sent] == [size for _, size in cf.CYCLES[cycle]]
    assert [d[0] for d in sent] == list(range(len(sent)))

"""Connected datagram flows on real loopback sockets: datagrams per second and loss.

    python benchmarks/datagram_flow_bench.py [--seconds 3] [--sizes 1400,8000] [--out FILE]

Client and server run in separate processes (``baselines.run_pair``). The sender opens one
flow (``host.connect(..., kind="datagram")``) and sends numbered datagrams as fast as
``flow.send`` takes them for ``--seconds``; the receiver accepts the flow and reads until
stopped. Every datagram is its 8-byte number followed by bytes derived from it, so the
receiver checks the content: the SHA-256 of what arrived must equal the SHA-256 of what
those numbers should carry. Printed as JSON per size: datagrams/s and MB/s as the receiver
saw them, loss (UDP semantics: nothing is retransmitted) and the drop counters of both
ends.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import anyio

from baselines import MB, Control, Params, Result, environment, run_pair
from report import emit

SERVICE = "dgram-bench"


def payload(number: int, size: int) -> bytes:
    """The datagram number ``number`` of ``size`` bytes (at least 8)."""
    seed = hashlib.sha256(number.to_bytes(8, "big")).digest()
    body = (seed * (size // 32 + 1))[: size - 8]
    return number.to_bytes(8, "big") + body


async def flow_receiver(ctl: Control, params: Params) -> Result:
    """Accept one datagram flow and read it until stopped."""
    import pyserval

    async with pyserval.Host(["127.0.0.1:0"]) as host:
        listener = await host.listen(SERVICE, kind="datagram")
        ctl.announce(host.addresses[0])
        flow = await listener.accept()
        got = hashlib.sha256()
        numbers: list[int] = []  # the expected content is hashed after the run
        count = 0
        nbytes = 0
        times = [0.0, 0.0]
        size = params["size"]

        async def read() -> None:
            nonlocal count, nbytes
            while True:
                try:
                    data = await flow.receive()
                except anyio.EndOfStream:
                    return
                now = time.perf_counter()
                if not count:
                    times[0] = now
                times[1] = now
                count += 1
                nbytes += len(data)
                got.update(data)
                numbers.append(int.from_bytes(data[:8], "big"))

        reader = asyncio.ensure_future(read())
        await ctl.stopped()
        reader.cancel()
        want = hashlib.sha256()
        for number in numbers:
            want.update(payload(number, size))
        return {
            "datagrams": count,
            "bytes": nbytes,
            "seconds": times[1] - times[0],
            "content_ok": got.digest() == want.digest(),
            "drops": dict(flow.connection.drops),
        }


async def flow_sender(ctl: Control, params: Params) -> Result:
    """Connect a datagram flow and send numbered datagrams for ``seconds``."""
    import pyserval

    size = params["size"]
    async with pyserval.Host(["127.0.0.1:0"]) as host:
        host.add_route(SERVICE, "{}:{}".format(*params["address"]))
        flow = await host.connect(SERVICE, kind="datagram")
        number = 0
        start = time.perf_counter()
        end = start + params["seconds"]
        while time.perf_counter() < end:
            for _ in range(64):
                await flow.send(payload(number, size))
                number += 1
            await asyncio.sleep(0)  # let the loop run, as a real program's would
        elapsed = time.perf_counter() - start
        conn = flow.connection
        return {
            "datagrams": number,
            "handed_to_network": conn.sent,
            "seconds": elapsed,
            "drops": dict(conn.drops),
        }


def flow_blast(seconds: float, size: int) -> Result:
    """One connected-flow blast over loopback: what arrived, how fast, and what was lost."""
    received, sent = run_pair(flow_receiver, flow_sender, {"seconds": seconds, "size": size})
    rx_seconds = received["seconds"] or float("nan")
    lost = sent["datagrams"] - received["datagrams"]
    return {
        "size": size,
        "datagrams_per_s_received": round(received["datagrams"] / rx_seconds),
        "mb_per_s_received": round(received["bytes"] / rx_seconds / MB, 1),
        "datagrams_per_s_offered": round(sent["datagrams"] / sent["seconds"]),
        "loss_percent": round(100 * lost / max(sent["datagrams"], 1), 2),
        "sent": sent["datagrams"],
        "received": received["datagrams"],
        "content_ok": received["content_ok"],
        "drops": {"receiver": received["drops"], "sender": sent["drops"]},
        "cpu_s": {"receiver": received["cpu_s"], "sender": sent["cpu_s"]},
    }


def main(argv: list[str] | None = None) -> int:
    """Run the blasts and print (or write) the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--sizes", default="1400,8000")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    result: dict[str, Any] = {
        "environment": environment(),
        "datagram_flow": [flow_blast(args.seconds, size) for size in sizes],
    }
    emit(result, args.out)
    return 0 if all(r["content_ok"] for r in result["datagram_flow"]) else 1


if __name__ == "__main__":
    sys.exit(main())

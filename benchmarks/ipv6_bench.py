"""One pyserval stream over IPv6 loopback against the same over IPv4, in one run.

    python benchmarks/ipv6_bench.py [--mib 256] [--mss 8192] [--rounds 3] [--out FILE]

Client and server run in separate processes (``baselines.run_pair``). Each round moves
``--mib`` MiB of pseudo-random bytes over ``127.0.0.1`` and over ``::1`` (alternating, so
machine load falls on both); the receiver hashes what it read and the figure counts only
when the SHA-256 matches the sender's. Printed as JSON: MB/s and CPU seconds (both
processes) per round and family, the medians, and their ratios (IPv6 / IPv4). On a loaded
machine the CPU seconds are the steadier figure: MB/s depends on who else runs.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any, cast

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import anyio

import baselines
import pyserval
from baselines import MB, Control, Params, Result, run_pair
from pyserval.transport.config import StreamConfig
from report import emit

SERVICE = "bench6"
CHUNK = 1 << 20


def _config(params: Params) -> StreamConfig:
    buffer = 8 << 20
    return StreamConfig(mss=params["mss"], send_buffer=buffer, receive_buffer=buffer)


def _data(mib: int) -> bytes:
    rng = random.Random(mib)
    return b"".join(rng.randbytes(CHUNK) for _ in range(mib))  # one call overflows past 2 Gbit


async def receiver(ctl: Control, params: Params) -> Result:
    """Accept one stream, read it to end of stream, hash it."""
    async with pyserval.Host([params["listen"]], stream_config=_config(params)) as host:
        listener = await host.listen(SERVICE)
        ctl.announce(host.addresses[0])
        stream = await listener.accept()
        h = hashlib.sha256()
        total, first = 0, 0.0
        try:
            while True:
                data = await stream.receive(CHUNK)
                if not total:
                    first = time.perf_counter()
                h.update(data)
                total += len(data)
        except anyio.EndOfStream:
            pass
        last = time.perf_counter()
    await ctl.stopped()
    return {"bytes": total, "seconds": last - first, "sha256": h.hexdigest()}


async def sender(ctl: Control, params: Params) -> Result:
    """Send the round's bytes, end the stream, wait until all is acknowledged."""
    data = _data(params["mib"])
    async with pyserval.Host([params["listen"]], stream_config=_config(params)) as host:
        host.add_route(SERVICE, tuple(params["address"]))
        stream = await host.connect(SERVICE)
        view = memoryview(data)
        for i in range(0, len(data), CHUNK):
            # (a view of immutable bytes, so what the stream keeps of it cannot change:
            # send is typed for bytes for that reason, and takes any such buffer)
            await stream.send(cast(bytes, view[i : i + CHUNK]))
        await stream.send_eof()
        sf = stream.connection.primary
        await host.wait(stream.connection, lambda: sf.snd_una >= sf.snd_max)
    return {"sha256": hashlib.sha256(data).hexdigest()}


def one(listen: str, mib: int, mss: int) -> Result:
    """One transfer; MB/s as the receiver saw it, checked by SHA-256."""
    params = {"listen": listen, "mib": mib, "mss": mss, "grace": 0.1}
    received, sent = run_pair(receiver, sender, params)
    if received["sha256"] != sent["sha256"] or received["bytes"] != mib * CHUNK:
        raise SystemExit(f"data mismatch over {listen}: {received} vs {sent}")
    return {
        "mb_per_s": round(received["bytes"] / received["seconds"] / MB, 1),
        "cpu_s": {"receiver": received["cpu_s"], "sender": sent["cpu_s"]},
    }


def main(argv: list[str] | None = None) -> int:
    """Run the rounds and print (and optionally write) the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--mss", type=int, default=8192)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    out: dict[str, Any] = {"environment": baselines.environment(), "mib": args.mib}
    rounds: dict[str, list[Result]] = {"ipv4": [], "ipv6": []}
    for _ in range(args.rounds):
        rounds["ipv4"].append(one("127.0.0.1:0", args.mib, args.mss))
        rounds["ipv6"].append(one("[::1]:0", args.mib, args.mss))
    out["rounds"] = rounds
    medians = {k: statistics.median(r["mb_per_s"] for r in v) for k, v in rounds.items()}
    out["median_mb_per_s"] = medians
    out["ratio_ipv6_vs_ipv4"] = round(medians["ipv6"] / medians["ipv4"], 3)
    cpu = {
        k: round(statistics.median(sum(r["cpu_s"].values()) for r in v), 3)
        for k, v in rounds.items()
    }
    out["median_cpu_s"] = cpu
    out["cpu_ratio_ipv6_vs_ipv4"] = round(cpu["ipv6"] / cpu["ipv4"], 3)
    emit(out, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

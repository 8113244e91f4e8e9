"""pyserval on real loopback sockets against the baselines, in one run.

    python benchmarks/host_bench.py [--seconds 3] [--out FILE] [--mss 1408,8192,32768]

Client and server run in separate processes (``baselines.run_pair``). Printed as JSON:

* ``serval_bulk``: one pyserval stream, 1 MiB ``send`` calls for ``--seconds``, the
  receiver reads to end of stream; MB/s as the receiver saw it, for each MSS;
* ``serval_connect``: sequential ``connect`` -> the server accepts and closes -> the client
  reads end of stream and closes; connections per second;
* the baselines in the same run: plain asyncio TCP bulk, a bare UDP blast with batched
  reads (the ceiling for any UDP-encapsulated Python stack), asyncio TCP connection rate;
* ratios of pyserval to each baseline.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import anyio

import baselines
import pyserval
from baselines import MB, Control, Params, Result, run_pair
from pyserval.transport.config import StreamConfig
from report import emit

SERVICE = "bench"


def _config(params: Params) -> StreamConfig | None:
    """The stream settings to measure; mss 0 means the host's defaults (segment size from
    the interface MTU, 1 MiB buffers), what an application gets without configuring."""
    if params.get("mss", 8192) == 0:
        return None
    buffer = params.get("buffer", 8 << 20)
    return StreamConfig(mss=params.get("mss", 8192), send_buffer=buffer, receive_buffer=buffer)


async def serval_bulk_receiver(ctl: Control, params: Params) -> Result:
    """Accept one stream and read it to end of stream."""
    async with pyserval.Host(["127.0.0.1:0"], stream_config=_config(params)) as host:
        listener = await host.listen(SERVICE)
        ctl.announce(host.addresses[0])
        stream = await listener.accept()
        total, first = 0, 0.0
        receive = stream.receive
        try:
            while True:
                data = await receive(params.get("read", 1 << 20))
                if not total:
                    first = time.perf_counter()
                total += len(data)
        except anyio.EndOfStream:
            pass
        last = time.perf_counter()
        assert host.core is not None
        drops = dict(host.core.drops)
    await ctl.stopped()
    return {"bytes": total, "seconds": last - first, "drops": drops}


async def serval_bulk_sender(ctl: Control, params: Params) -> Result:
    """Send chunks (1 MiB, or ``params["chunk"]``) for ``params["seconds"]``, then end the
    stream."""
    async with pyserval.Host(["127.0.0.1:0"], stream_config=_config(params)) as host:
        host.add_route(SERVICE, params["address"])
        stream = await host.connect(SERVICE)
        chunk = bytes(params.get("chunk", 1 << 20))
        total = 0
        start = time.perf_counter()
        end = start + params["seconds"]
        while time.perf_counter() < end:
            await stream.send(chunk)
            total += len(chunk)
        await stream.send_eof()
        sf = stream.connection.primary
        # Wait until everything is acknowledged, so the host is not closed under it.
        await host.wait(stream.connection, lambda: sf.snd_una >= sf.snd_max)
        return {"bytes": total, "seconds": time.perf_counter() - start}


def serval_bulk(seconds: float, mss: int) -> Result:
    """One pyserval stream over loopback UDP, MB/s as the receiver saw it."""
    received, sent = run_pair(
        serval_bulk_receiver, serval_bulk_sender, {"seconds": seconds, "mss": mss, "grace": 0.1}
    )
    return {
        "mss": mss or "default",
        "mb_per_s": round(received["bytes"] / received["seconds"] / MB, 1),
        "bytes": received["bytes"],
        "seconds": round(received["seconds"], 3),
        "drops": received["drops"],
        "cpu_s": {"receiver": received["cpu_s"], "sender": sent["cpu_s"]},
    }


async def serval_accept_server(ctl: Control, params: Params) -> Result:
    """Accept streams and close each at once, until stopped."""
    async with pyserval.Host(["127.0.0.1:0"]) as host:
        listener = await host.listen(SERVICE, backlog=1024)
        ctl.announce(host.addresses[0])
        return {"accepted": await baselines.accept_and_close(ctl, listener)}


async def serval_connect_client(ctl: Control, params: Params) -> Result:
    """Connect, read end of stream, close; one at a time for ``seconds``."""
    durations: list[float] = []
    config = StreamConfig(time_wait=1.0)
    async with pyserval.Host(["127.0.0.1:0"], stream_config=config) as host:
        host.add_route(SERVICE, params["address"])
        start = time.perf_counter()
        end = start + params["seconds"]
        now = start
        while now < end:
            stream = await host.connect(SERVICE)
            with contextlib.suppress(anyio.EndOfStream):
                await stream.receive()
            await stream.aclose()
            t = time.perf_counter()
            durations.append(t - now)
            now = t
    return {"durations": durations, "seconds": now - start}


def serval_connect_rate(seconds: float) -> Result:
    """Sequential pyserval connection set-ups per second over loopback."""
    received, sent = run_pair(serval_accept_server, serval_connect_client, {"seconds": seconds})
    return {
        **baselines.connect_summary(received, sent),
        "cycle": "connect, server accepts and closes, client reads end of stream, closes",
    }


def main(argv: list[str] | None = None) -> int:
    """Run everything and print (and optionally write) the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument(
        "--mss", default="0,1408,8192,32768", help="segment sizes; 0: the host default"
    )
    parser.add_argument("--out")
    parser.add_argument(
        "--loop",
        type=baselines.loop_name,
        default="asyncio",
        help="the event loop of every process: asyncio, uvloop (the optional [uvloop] "
        "extra) or busypoll[:US] (pyserval.busy_poll_loop, polling US microseconds)",
    )
    args = parser.parse_args(argv)
    baselines.use_loop(args.loop)
    out: dict[str, Any] = {"environment": baselines.environment()}
    out["serval_bulk"] = [serval_bulk(args.seconds, int(m)) for m in args.mss.split(",")]
    out["serval_connect"] = serval_connect_rate(args.seconds)
    out["tcp_throughput"] = baselines.tcp_throughput(args.seconds)
    out["udp_blast"] = {
        "1400_gso_gro": baselines.udp_blast(args.seconds, 1400, True, True),
        "8000_plain": baselines.udp_blast(args.seconds, 8000, False, False),
    }
    out["tcp_connect"] = baselines.tcp_connect_rate(args.seconds)
    best = max(r["mb_per_s"] for r in out["serval_bulk"])
    out["ratios"] = {
        "serval_best_vs_tcp": round(best / out["tcp_throughput"]["mb_per_s"], 3),
        "serval_best_vs_udp_blast_1400_gso_gro": round(
            best / out["udp_blast"]["1400_gso_gro"]["mb_per_s_received"], 3
        ),
        "serval_connect_vs_tcp_connect": round(
            out["serval_connect"]["per_s"] / out["tcp_connect"]["per_s"], 3
        ),
    }
    emit(out, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

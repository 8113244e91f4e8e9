"""CPU cost of the sans-I/O stream path per packet (simulated network, JSON out).

``host_bench.py`` measures throughput on real sockets, where the machine's load moves the
figures by tens of percent. This one measures what a change to ``transport/`` or
``core/`` costs per packet: one client -> server transfer of ``--mb`` MiB of random bytes
over :class:`pyserval.testing.SimNetwork` (both hosts and the network in this process),
timed with ``time.process_time`` (CPU seconds of this process, so other processes' load
counts much less than in wall-clock figures). The received bytes are checked by SHA-256.

Cases: ``single`` (one path, no loss), ``lossy`` (one path, 1% loss each way: recovery and
SACK), ``multipath`` (two paths, DSN mapping, the scheduler, per-subflow ACKs). Per case:
the best and median of ``--repeat`` runs in CPU seconds, and microseconds of CPU per data
packet sent (best run). ``connect``: ``--connections`` sequential connections (handshake,
the server closes, the client reads end of stream and closes, both ends closed), CPU
microseconds per connection, best and median of ``--repeat`` runs.

Run: ``python benchmarks/core_stream_bench.py [--mb 8] [--repeat 5] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from pyserval.core.host import HostCore
from pyserval.sal import Rule
from pyserval.sal.train import SegmentTrain
from pyserval.testing import LinkConfig, SimNetwork
from pyserval.transport.config import StreamConfig
from pyserval.transport.connection import Connection, State

A1, A2 = ("10.0.1.1", 40000), ("10.0.2.1", 40000)
B1, B2 = ("10.0.1.2", 54325), ("10.0.2.2", 54325)
CASES = ("single", "lossy", "multipath")


def transfer(case: str, size: int, seed: int) -> tuple[float, int]:
    """One transfer: (CPU seconds from the first write to the last byte read, data packets
    the client sent)."""
    loss = 0.01 if case == "lossy" else 0.0
    net = SimNetwork(seed=seed, default_link=LinkConfig(delay=0.005, loss=loss))
    multipath = case == "multipath"
    if multipath:
        net.set_path(A1[0], B2[0], LinkConfig(down=True))
        net.set_path(A2[0], B1[0], LinkConfig(down=True))
    cfg = StreamConfig(mss=1408, send_buffer=4 << 20, receive_buffer=4 << 20, multipath=multipath)
    a = HostCore([A1, A2], rng=random.Random(seed), config=cfg)
    b = HostCore([B1, B2], rng=random.Random(seed + 1), config=cfg)
    net.attach(a, A1, A2)
    net.attach(b, B1, B2)
    a.service_table.add("bulk", Rule.forward(B1))
    listener = b.listen("bulk")
    client = a.connect("bulk", net.now)
    net.kick(a)
    accepted: list[Connection] = []

    def ready() -> bool:
        if not accepted:
            conn = listener.accept()
            if conn is not None:
                accepted.append(conn)
        return bool(accepted) and client.state is State.ESTABLISHED

    if not net.run_until(ready, 60):
        raise RuntimeError("handshake did not complete")
    server = accepted[0]
    if multipath:
        a.add_path(client, A2, B2, net.now)
        net.kick(a)
        net.run_for(0.5)
        if len(client.subflows) != 2:
            raise RuntimeError("the second path did not join")
    data = random.Random(seed).randbytes(size)
    digest = hashlib.sha256(data).hexdigest()
    packets = 0
    count = a._send  # every packet the client host sends goes through here

    def counting(pkt: Any, local: Any, remote: Any) -> None:
        nonlocal packets
        if pkt.payload:
            # A segment train (sal.train) is several wire segments.
            packets += pkt.count if isinstance(pkt, SegmentTrain) else 1
        count(pkt, local, remote)

    a._send = counting  # type: ignore[method-assign]
    sent = 0
    got = bytearray()
    start = time.process_time()
    limit = net.now + 600
    while len(got) < size and net.now < limit:
        if sent < size:
            sent += client.write(data[sent : sent + (1 << 20)])
            net.kick(a)
        net.run_for(0.01)
        got += server.read()
    cpu = time.process_time() - start
    if hashlib.sha256(got).hexdigest() != digest:
        raise RuntimeError(f"{case}: received data differs ({len(got)} of {size} bytes)")
    return cpu, packets


def connections(count: int, seed: int) -> float:
    """CPU seconds for ``count`` sequential connections: connect, accept, the server
    closes, the client reads end of stream and closes, both ends gone."""
    net = SimNetwork(seed=seed, default_link=LinkConfig(delay=0.0005))
    cfg = StreamConfig(time_wait=0.01)
    a = HostCore([A1], rng=random.Random(seed), config=cfg)
    b = HostCore([B1], rng=random.Random(seed + 1), config=cfg)
    net.attach(a, A1)
    net.attach(b, B1)
    a.service_table.add("c", Rule.forward(B1))
    listener = b.listen("c")
    start = time.process_time()
    for _ in range(count):
        client = a.connect("c", net.now)
        net.kick(a)
        accepted: list[Connection] = []

        def ready(client: Connection = client, accepted: list[Connection] = accepted) -> bool:
            if not accepted:
                conn = listener.accept()
                if conn is not None:
                    accepted.append(conn)
            return bool(accepted) and client.state is State.ESTABLISHED

        if not net.run_until(ready, 10):
            raise RuntimeError("handshake did not complete")
        server = accepted[0]
        server.shutdown()
        net.kick(b)

        def at_eof(c: Connection = client) -> bool:
            return c.at_eof

        if not net.run_until(at_eof, 10):
            raise RuntimeError("no end of stream")
        client.shutdown()
        net.kick(a)

        def closed(c: Connection = client, s: Connection = server) -> bool:
            return c.closed and s.closed

        if not net.run_until(closed, 10):
            raise RuntimeError("the connection did not close")
    return time.process_time() - start


def main(argv: list[str] | None = None) -> int:
    """Run every case and print (and optionally write) the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=8.0)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--connections", type=int, default=500)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    size = int(args.mb * (1 << 20))
    out: dict[str, Any] = {"mib": args.mb, "repeat": args.repeat, "cases": {}}
    for case in filter(None, args.cases.split(",")):
        runs = [transfer(case, size, seed) for seed in range(1, args.repeat + 1)]
        cpus = [c for c, _ in runs]
        best = min(range(len(runs)), key=lambda i: cpus[i])
        out["cases"][case] = {
            "cpu_s_best": round(cpus[best], 4),
            "cpu_s_median": round(statistics.median(cpus), 4),
            "data_packets": runs[best][1],
            "us_per_packet_best": round(cpus[best] / max(runs[best][1], 1) * 1e6, 2),
        }
    if args.connections:
        cpus = [connections(args.connections, seed) for seed in range(1, args.repeat + 1)]
        out["connect"] = {
            "count": args.connections,
            "us_per_connection_best": round(min(cpus) / args.connections * 1e6, 1),
            "us_per_connection_median": round(statistics.median(cpus) / args.connections * 1e6, 1),
        }
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

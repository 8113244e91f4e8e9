"""Multipath aggregate throughput over two emulated paths (simulated network, JSON out).

Path 1: 10 Mbit/s, 20 ms RTT; path 2: 5 Mbit/s, 60 ms RTT (each with a one-BDP-ish queue).
One 6 MB transfer client -> server for each case, in virtual time (deterministic):

* ``single_fast``, ``single_slow``: one path only (the baselines);
* ``multipath``: both paths, lowest-RTT-first scheduler (the default);
* ``redundant``: both paths, every byte on each;
* ``multipath_cut``: both paths, path 2 cut 1.5 s into the transfer (nothing may be lost).

Run: ``python benchmarks/multipath_bench.py [--out FILE]``.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from typing import Any

from pyserval.core.host import HostCore
from pyserval.sal import Rule
from pyserval.testing import LinkConfig, SimNetwork
from pyserval.transport.config import StreamConfig
from pyserval.transport.connection import Connection, State
from report import emit

A1, A2 = ("10.0.1.1", 40000), ("10.0.2.1", 40000)
B1, B2 = ("10.0.1.2", 54325), ("10.0.2.2", 54325)
FAST = LinkConfig(delay=0.01, bandwidth=1.25e6, queue_limit=60_000)
SLOW = LinkConfig(delay=0.03, bandwidth=0.625e6, queue_limit=60_000)
SIZE = 6_000_000


def run(case: str) -> dict[str, Any]:
    """One transfer; goodput in Mbit/s of virtual time."""
    net = SimNetwork(seed=1, default_link=LinkConfig(delay=0.01))
    net.set_path(A1[0], B1[0], FAST)
    net.set_path(A2[0], B2[0], SLOW)
    net.set_path(A1[0], B2[0], LinkConfig(down=True))
    net.set_path(A2[0], B1[0], LinkConfig(down=True))
    multipath = case in ("multipath", "redundant", "multipath_cut")
    cfg = StreamConfig(
        send_buffer=4 << 20,
        receive_buffer=4 << 20,
        multipath=multipath,
        scheduler="redundant" if case == "redundant" else "lowest_rtt",
    )
    a = HostCore([A1, A2], rng=random.Random(1), config=cfg)
    b = HostCore([B1, B2], rng=random.Random(2), config=cfg)
    net.attach(a, A1, A2)
    net.attach(b, B1, B2)
    server_addr = B2 if case == "single_slow" else B1
    a.service_table.add("svc", Rule.forward(server_addr))
    if case == "single_slow":
        a.addresses = [A2, A1]  # connect from the slow path's address
    listener = b.listen("svc")
    client = a.connect("svc", net.now)
    net.kick(a)
    got_conn: list[Connection] = []

    def ready() -> bool:
        c = listener.accept()
        if c is not None:
            got_conn.append(c)
        return bool(got_conn) and client.state is State.ESTABLISHED

    assert net.run_until(ready, 10)
    server = got_conn[0]
    if multipath:
        a.add_path(client, A2, B2, net.now)
        net.kick(a)
    data = random.Random(3).randbytes(SIZE)
    sent, got, start = 0, bytearray(), net.now
    cut = 1.5 if case == "multipath_cut" else None
    while len(got) < SIZE and net.now < start + 60:
        if cut is not None and net.now >= start + cut:
            net.set_path(A2[0], B2[0], LinkConfig(down=True))
            cut = None
        if sent < SIZE:
            sent += client.write(data[sent : sent + 262144])
            net.kick(a)
        net.run_for(0.01)
        got += server.read()
    seconds = net.now - start
    return {
        "intact": bytes(got) == data,
        "seconds": round(seconds, 3),
        "mbit_per_s": round(len(got) * 8 / seconds / 1e6, 2),
        "subflows_at_end": len(client.subflows),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    cases = ("single_fast", "single_slow", "multipath", "redundant", "multipath_cut")
    results = {case: run(case) for case in cases}
    fast = results["single_fast"]["mbit_per_s"]
    out = {
        "benchmark": "multipath",
        "paths": {"path 1": "10 Mbit/s, 20 ms RTT", "path 2": "5 Mbit/s, 60 ms RTT"},
        "results": results,
        "multipath_vs_fast_path": round(results["multipath"]["mbit_per_s"] / fast, 3),
        "ideal_vs_fast_path": 1.5,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    emit(out, args.out)
    return 0 if all(r["intact"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Loss recovery with and without SACK: 1 MiB transfers at 1% loss (simulated, JSON out).

The reference Serval TCP ignores SACK-permitted, so a pyserval sender talking to it
recovers with duplicate ACKs alone (fast retransmit, NewReno partial ACKs, limited
transmit). This compares the two: one client -> server transfer of 1 MiB of random bytes
per seed (20 seeds), 1% random loss on both directions, SACK enabled at the receiver or not
(the sender offers it either way), in virtual time of :class:`pyserval.testing.SimNetwork`
(deterministic). The received bytes are checked by SHA-256.

Scenarios:

* ``open``: 10 ms one-way delay, no bandwidth limit (the issue's case; the test
  ``test_one_percent_loss_without_sack_is_within_1_5x_of_sack`` checks the same ratio);
* ``bottleneck``: 10 ms one-way delay, 10 Mbit/s with a queue of one bandwidth-delay product.

Per scenario and SACK setting: the median and per-seed transfer times (s), the retransmission
timeouts the sender took (summed over the seeds), and ``ratio`` = median without SACK /
median with it.

Run: ``python benchmarks/nosack_bench.py [--seeds 20] [--congestion cubic] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import statistics
import sys
import time
from typing import Any

from pyserval.core.host import HostCore
from pyserval.sal import Rule
from pyserval.testing import LinkConfig, SimNetwork
from pyserval.transport.config import StreamConfig
from pyserval.transport.connection import Connection, State
from report import emit

A = ("10.0.0.1", 54324)
B = ("10.0.0.2", 54325)
SIZE = 1 << 20
LOSS = 0.01
SCENARIOS = {
    "open": LinkConfig(delay=0.01, loss=LOSS),
    "bottleneck": LinkConfig(delay=0.01, loss=LOSS, bandwidth=1.25e6, queue_limit=25_000),
}


def transfer(link: LinkConfig, seed: int, sack: bool, congestion: str) -> tuple[float, int]:
    """One transfer: (virtual seconds from the write to the last byte read, timeouts)."""
    net = SimNetwork(seed=seed, default_link=link)
    client_cfg = StreamConfig(congestion=congestion)
    server_cfg = StreamConfig(congestion=congestion, sack=sack)
    a = HostCore([A], rng=random.Random(seed), config=client_cfg)
    b = HostCore([B], rng=random.Random(seed + 1000), config=server_cfg)
    net.attach(a, A)
    net.attach(b, B)
    a.service_table.add("bulk", Rule.forward(B))
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

    if not net.run_until(ready, 600):
        raise RuntimeError("handshake did not complete")
    server = accepted[0]
    sf = client.primary
    timeouts = 0
    on_rto = sf._on_rto

    def counting_rto(now: float) -> None:
        nonlocal timeouts
        timeouts += 1
        on_rto(now)

    sf._on_rto = counting_rto  # type: ignore[method-assign]
    data = random.Random(seed).randbytes(SIZE)
    start = net.now
    if client.write(data) != SIZE:
        raise RuntimeError("the send buffer should hold the whole transfer")
    net.kick(a)
    got = hashlib.sha256()
    count = 0

    def done() -> bool:
        nonlocal count
        chunk = server.read()
        got.update(chunk)
        count += len(chunk)
        return count >= SIZE

    if not net.run_until(done, 3600):
        raise RuntimeError(f"transfer incomplete: {count} of {SIZE} bytes")
    if got.digest() != hashlib.sha256(data).digest():
        raise RuntimeError("data corrupted")
    return net.now - start, timeouts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--congestion", default="cubic")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    results: dict[str, Any] = {}
    for name, link in SCENARIOS.items():
        entry: dict[str, Any] = {}
        for label, sack in (("sack", True), ("no_sack", False)):
            runs = [transfer(link, seed, sack, args.congestion) for seed in range(args.seeds)]
            times = [round(t, 4) for t, _ in runs]
            entry[label] = {
                "median_s": round(statistics.median(times), 4),
                "timeouts": sum(n for _, n in runs),
                "seconds": times,
            }
        entry["ratio"] = round(entry["no_sack"]["median_s"] / entry["sack"]["median_s"], 3)
        results[name] = entry
    report = {
        "size_bytes": SIZE,
        "loss": LOSS,
        "seeds": args.seeds,
        "congestion": args.congestion,
        "data_checked": "sha256",
        "scenarios": results,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

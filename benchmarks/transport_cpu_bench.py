"""CPU cost of the sans-I/O transport per megabyte, and a digest of every packet it sent.

One client -> server bulk transfer per scenario and seed over :class:`SimNetwork` (virtual
time, deterministic), both hosts in this process: what is timed is the transport and the
host core (segments built, sent, received, ACKed, lost and recovered), with no sockets and
no event loop. Scenarios:

* ``clean``: 10 ms one-way delay, no loss (the per-segment fast path);
* ``sack_loss``: 2% random loss, SACK on both ends (scoreboard, RFC 6675 recovery);
* ``nosack_loss``: 2% random loss, the receiver without SACK (duplicate ACKs, NewReno);
* ``bottleneck``: 5 MB/s with a 100 kB queue (slow start overshoot, RACK's rule).

Per scenario: megabytes moved, CPU seconds (``time.process_time``, best of ``--repeat``
runs of the whole scenario), MB per CPU second, the sender's retransmissions, the virtual
time at the end, and ``trace_sha256``: a SHA-256 over every datagram event (virtual time,
addresses, fate, bytes). Two builds with the same digests sent the same packets at the same
times: a refactoring that must not change behaviour can be checked by it. The received
bytes are checked by SHA-256.

``--batches``: the sim drives the hosts as the UDP adapter does on Linux (segment trains
out as GSO super-datagrams, what arrives at one instant in as one GRO batch; see
:mod:`pyserval.testing.netsim`): the code paths a real transfer takes. Its digests differ
(one ACK per run), so compare digests within one mode.

Run: ``python benchmarks/transport_cpu_bench.py [--seeds 3] [--repeat 3] [--scenarios a,b]
[--batches] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from pyserval.core.host import HostCore
from pyserval.sal import Rule
from pyserval.testing import LinkConfig, SimNetwork
from pyserval.transport.config import StreamConfig
from report import emit

A = ("10.0.0.1", 54324)
B = ("10.0.0.2", 54325)
BUFFERS = 4 << 20
SCENARIOS: dict[str, tuple[LinkConfig, bool, int]] = {
    # name: (link, receiver SACK, bytes)
    "clean": (LinkConfig(delay=0.01), True, 8_000_000),
    "sack_loss": (LinkConfig(delay=0.01, loss=0.02), True, 2_000_000),
    "nosack_loss": (LinkConfig(delay=0.01, loss=0.02), False, 2_000_000),
    "bottleneck": (
        LinkConfig(delay=0.01, bandwidth=5e6, queue_limit=100_000),
        True,
        4_000_000,
    ),
}


def open_bulk(net: SimNetwork, a: HostCore, b: HostCore, node: Any) -> tuple[Any, Any]:
    """Connect ``a`` (at A) to the service "bulk" that ``b`` (at B) listens on; ``node``:
    what the network knows ``a`` as (``a`` itself or a wrapper). The two connections."""
    a.service_table.add("bulk", Rule.forward(B))
    listener = b.listen("bulk")
    client = a.connect("bulk", net.now)
    net.kick(node)
    accepted: list[Any] = []

    def ready() -> bool:
        if not accepted:
            conn = listener.accept()
            if conn is not None:
                accepted.append(conn)
        return bool(accepted)

    if not net.run_until(ready, 60):
        raise RuntimeError("handshake did not complete")
    return client, accepted[0]


def transfer(
    link: LinkConfig, sack: bool, size: int, seed: int, batches: bool = False
) -> dict[str, Any]:
    """One transfer; CPU seconds of the data phase and what it sent."""
    trace = hashlib.sha256()

    def tap(now: float, data: bytes, src: Any, dst: Any, fate: str) -> None:
        trace.update(f"{now!r}|{src}|{dst}|{fate}|".encode())
        trace.update(data)

    net = SimNetwork(seed=seed, default_link=link, tap=tap, gso=batches, gro=batches)
    cfg = StreamConfig(send_buffer=BUFFERS, receive_buffer=BUFFERS)
    a = HostCore([A], rng=random.Random(seed), config=cfg)
    b = HostCore(
        [B],
        rng=random.Random(seed + 1000),
        config=StreamConfig(send_buffer=BUFFERS, receive_buffer=BUFFERS, sack=sack),
    )
    net.attach(a, A)
    net.attach(b, B)
    client, server = open_bulk(net, a, b, a)
    data = random.Random(seed).randbytes(size)
    got = hashlib.sha256()
    state = {"sent": 0, "received": 0}

    def done() -> bool:
        if state["sent"] < size:
            state["sent"] += client.write(data[state["sent"] : state["sent"] + 262144])
            net.kick(a)
        chunk = server.read()
        got.update(chunk)
        state["received"] += len(chunk)
        return state["received"] >= size

    cpu = time.process_time()
    if not net.run_until(done, 3600):
        raise RuntimeError(f"transfer incomplete: {state['received']} of {size} bytes")
    cpu = time.process_time() - cpu
    if got.digest() != hashlib.sha256(data).digest():
        raise RuntimeError("data corrupted")
    return {
        "cpu_s": cpu,
        "retransmissions": client.primary.retransmissions,
        "virtual_s": net.now,
        "trace": trace.hexdigest(),
    }


def main(argv: list[str] | None = None) -> int:
    """Run every scenario and print (and optionally write) the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=3, help="runs per scenario (best kept)")
    parser.add_argument(
        "--scenarios", default=",".join(SCENARIOS), help="comma-separated: " + ", ".join(SCENARIOS)
    )
    parser.add_argument("--batches", action="store_true", help="GSO trains out and GRO batches in")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    results: dict[str, Any] = {}
    for name in args.scenarios.split(","):
        link, sack, size = SCENARIOS[name]
        best = None
        runs: list[dict[str, Any]] = []
        for _ in range(args.repeat):
            runs = [
                transfer(link, sack, size, seed, args.batches) for seed in range(1, args.seeds + 1)
            ]
            cpu = sum(r["cpu_s"] for r in runs)
            best = cpu if best is None else min(best, cpu)
        assert best is not None
        mb = size * args.seeds / 1e6
        digest = hashlib.sha256("".join(r["trace"] for r in runs).encode()).hexdigest()
        results[name] = {
            "mb": mb,
            "cpu_s": round(best, 3),
            "mb_per_cpu_s": round(mb / best, 2),
            "retransmissions": [r["retransmissions"] for r in runs],
            "virtual_s": [round(r["virtual_s"], 6) for r in runs],
            "trace_sha256": digest,
        }
    report = {
        "benchmark": "transport_cpu",
        "seeds": args.seeds,
        "repeat": args.repeat,
        "batches": args.batches,
        "data_checked": "sha256",
        "python": sys.version.split()[0],
        "scenarios": results,
    }
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The sender's CPU cost of SACK loss recovery with a large window (sans-I/O, JSON out).

One client -> server bulk transfer per buffer size over :class:`SimNetwork` (virtual time,
deterministic, both hosts in this process): 1,408-byte segments, 5 ms one-way delay, no
bandwidth limit, so the flight grows to what the receive buffer and congestion control
allow (with 8 MiB buffers about 5,800 segments). A loss filter drops ``--burst``
consecutive data segments every ``--every`` MiB of data sent, as when a window's burst
overflows the receiver's UDP socket (a burst ends early when the sender enters loss
recovery: what it sends then gets through): each loss episode then runs with thousands of
segments on the scoreboard and SACK blocks that cover most of them.

What is timed is the sender alone: ``time.process_time`` around every call the network
makes into the sending host (a datagram received, the datagrams to send, its timer), and
separately the part of it spent while the sender was in loss recovery, with the ACKs it
received meanwhile. Per buffer size: megabytes moved, the sender's CPU seconds (best of
``--repeat`` runs) and CPU seconds per MB, the recovery CPU and microseconds per ACK
received in recovery, the sender's retransmissions, the virtual time at the end, and
``trace_sha256`` (a SHA-256 over every datagram event: virtual time, addresses, fate,
bytes; the same digest means the same packets at the same times). The received bytes are
checked by SHA-256.

If loss recovery's cost per ACK grew with the window, the recovery figures would grow with
the buffer size; they should not.

Run: ``python benchmarks/recovery_bench.py [--buffers 1,2,4,8] [--mb 32] [--burst 300]
[--every 8] [--repeat 3] [--out FILE]``.
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
from pyserval.sal.inet import Address
from pyserval.testing import LinkConfig, SimNetwork
from pyserval.transport.config import StreamConfig
from pyserval.transport.connection import Connection
from report import emit
from transport_cpu_bench import open_bulk

A = ("10.0.0.1", 54324)
B = ("10.0.0.2", 54325)
MSS = 1408
# A data segment on the wire is at least this long (headers and MSS bytes of payload);
# ACKs and control packets are far shorter, so the filter tells them apart by length.
DATA_MIN = MSS


class TimedSender:
    """The sending host as the network sees it, with the CPU of each call counted (and
    counted apart while its connection is in loss recovery)."""

    def __init__(self, host: HostCore) -> None:
        self.host = host
        self.conn: Connection | None = None
        self.cpu = 0.0
        self.recovery_cpu = 0.0
        self.recovery_acks = 0

    def _in_recovery(self) -> bool:
        conn = self.conn
        return conn is not None and conn.primary.recovery.in_recovery

    def receive_datagram(self, data: bytes, src: Address, dst: Address, now: float) -> None:
        """Forward an ACK to the host, timed."""
        rec = self._in_recovery()
        t = time.process_time()
        self.host.receive_datagram(data, src, dst, now)
        t = time.process_time() - t
        self.cpu += t
        if rec:
            self.recovery_cpu += t
            self.recovery_acks += 1

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Address, Address]]:
        """The host's output, timed."""
        rec = self._in_recovery()
        t = time.process_time()
        out = self.host.datagrams_to_send(now)
        t = time.process_time() - t
        self.cpu += t
        if rec:
            self.recovery_cpu += t
        return out

    def next_deadline(self) -> float | None:
        """The host's next timer (not timed: no protocol work)."""
        return self.host.next_deadline()

    def handle_timer(self, now: float) -> None:
        """The host's timers, timed."""
        rec = self._in_recovery()
        t = time.process_time()
        self.host.handle_timer(now)
        t = time.process_time() - t
        self.cpu += t
        if rec:
            self.recovery_cpu += t


def transfer(buffers: int, size: int, burst: int, every: int, seed: int) -> dict[str, Any]:
    """One transfer with ``buffers`` bytes of send and receive buffer; the sender's CPU."""
    trace = hashlib.sha256()

    def tap(now: float, data: bytes, src: Any, dst: Any, fate: str) -> None:
        trace.update(f"{now!r}|{src}|{dst}|{fate}|".encode())
        trace.update(data)

    sent = {"data": 0, "drop_left": 0, "next_burst": every}
    conns: list[Connection] = []

    def loss_filter(data: bytes, src: Address, dst: Address) -> bool:
        if src != A or len(data) < DATA_MIN:
            return False
        sent["data"] += 1
        if conns and conns[0].primary.recovery.in_recovery:
            # A burst ends when the sender notices it: what it resends then gets through
            # (dropping the retransmissions too would measure timeouts, not recovery).
            sent["drop_left"] = 0
        elif sent["drop_left"]:
            sent["drop_left"] -= 1
            return True
        if sent["data"] * MSS >= sent["next_burst"]:
            sent["next_burst"] += every
            sent["drop_left"] = burst - 1
            return True
        return False

    net = SimNetwork(
        seed=seed, default_link=LinkConfig(delay=0.005), tap=tap, loss_filter=loss_filter
    )
    cfg = StreamConfig(mss=MSS, send_buffer=buffers, receive_buffer=buffers)
    a = HostCore([A], rng=random.Random(seed), config=cfg)
    b = HostCore([B], rng=random.Random(seed + 1000), config=cfg)
    sender = TimedSender(a)
    net.attach(sender, A)
    net.attach(b, B)
    client, server = open_bulk(net, a, b, sender)
    sender.conn = client
    conns.append(client)
    data = random.Random(seed).randbytes(size)
    got = hashlib.sha256()
    state = {"sent": 0, "received": 0}
    sender.cpu = sender.recovery_cpu = 0.0
    sender.recovery_acks = 0

    def done() -> bool:
        if state["sent"] < size:
            state["sent"] += client.write(data[state["sent"] : state["sent"] + (1 << 20)])
            net.kick(sender)
        chunk = server.read()
        got.update(chunk)
        state["received"] += len(chunk)
        return state["received"] >= size

    if not net.run_until(done, 3600):
        raise RuntimeError(f"transfer incomplete: {state['received']} of {size} bytes")
    if got.digest() != hashlib.sha256(data).digest():
        raise RuntimeError("data corrupted")
    return {
        "sender_cpu_s": sender.cpu,
        "recovery_cpu_s": sender.recovery_cpu,
        "recovery_acks": sender.recovery_acks,
        "retransmissions": client.primary.retransmissions,
        "virtual_s": net.now,
        "trace": trace.hexdigest(),
    }


def main(argv: list[str] | None = None) -> int:
    """Run every buffer size and print (and optionally write) the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--buffers", default="1,2,4,8", help="comma-separated MiB")
    parser.add_argument("--mb", type=int, default=32, help="MiB per transfer")
    parser.add_argument("--burst", type=int, default=300, help="segments dropped per burst")
    parser.add_argument("--every", type=int, default=8, help="MiB sent between bursts")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3, help="runs per size (best kept)")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    size = args.mb << 20
    results: dict[str, Any] = {}
    for mib in (int(x) for x in args.buffers.split(",")):
        runs = [
            transfer(mib << 20, size, args.burst, args.every << 20, args.seed)
            for _ in range(args.repeat)
        ]
        if len({r["trace"] for r in runs}) != 1:
            raise RuntimeError("runs of the same transfer sent different packets")
        best = min(runs, key=lambda r: r["sender_cpu_s"])
        mb = size / 1e6
        acks = best["recovery_acks"]
        results[f"{mib}MiB"] = {
            "mb": round(mb, 3),
            "sender_cpu_s": round(best["sender_cpu_s"], 3),
            "sender_cpu_s_per_mb": round(best["sender_cpu_s"] / mb, 5),
            "recovery_cpu_s": round(best["recovery_cpu_s"], 3),
            "recovery_acks": acks,
            "recovery_us_per_ack": round(best["recovery_cpu_s"] / acks * 1e6, 1) if acks else None,
            "retransmissions": best["retransmissions"],
            "virtual_s": round(best["virtual_s"], 6),
            "trace_sha256": best["trace"],
        }
    report = {
        "benchmark": "recovery",
        "mss": MSS,
        "burst": args.burst,
        "every_mib": args.every,
        "seed": args.seed,
        "repeat": args.repeat,
        "data_checked": "sha256",
        "python": sys.version.split()[0],
        "sizes": results,
    }
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

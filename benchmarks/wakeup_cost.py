"""What a datagram that wakes another process costs on this machine (JSON out).

    python benchmarks/wakeup_cost.py [--rounds 3000] [--out FILE]

No pyserval here: two processes ping-pong one 32-byte UDP datagram on loopback over
blocking sockets and ``epoll``, as the two hosts of a connect cycle do, and each times its
own ``sendto``. Three placements: ``free`` (the kernel's choice), ``split`` (pinned to two
different CPUs, so every datagram wakes a process on the other CPU) and ``same`` (both
pinned to one CPU, so nothing runs in parallel). The figures per placement (medians):

* ``initiator_sendto_us``: the sender's system call when the receiver has just gone to
  sleep;
* ``responder_sendto_us``: the answer's system call, by the process that was woken;
* ``round_trip_us``: from the initiator's send to its read of the answer;
* ``ok``: every answer was the datagram sent.

On a loopback send the kernel delivers the datagram and wakes the receiver inside the
sender's ``sendto``, so the call's cost shows what the wake-up costs the sender; the round
trip shows what it costs the receiver. ``connect_timeline.py`` reports the same split for
the cycle's eight datagrams; this shows which part of that is the machine's.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import select
import socket
import statistics
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import emit

HOST = "127.0.0.1"
PAYLOAD = bytes(32)  # the size of a connect cycle's FIN or SAL control packet
PLACEMENTS = ("free", "split", "same")


def _pin(cpu: int | None) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})


def _responder(pipe: Connection, rounds: int, cpu: int | None) -> None:
    """Answer each datagram at once; report the median of its own sendto calls."""
    _pin(cpu)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((HOST, 0))
    poller = select.epoll()
    poller.register(sock.fileno(), select.EPOLLIN)
    pipe.send(sock.getsockname()[1])
    clock = time.perf_counter_ns
    sends: list[int] = []
    for _ in range(rounds):
        poller.poll()
        data, addr = sock.recvfrom(2048)
        t0 = clock()
        sock.sendto(data, addr)
        sends.append(clock() - t0)
    pipe.send(statistics.median(sends) / 1000)
    sock.close()


def measure(placement: str, rounds: int) -> dict[str, Any]:
    """One placement: the initiator is this process, the responder a forked one."""
    saved = os.sched_getaffinity(0)
    cpus = sorted(saved)
    if placement == "split" and len(cpus) < 2:
        return {"placement": placement, "skipped": "one CPU only"}
    first, second = cpus[0], cpus[-1]
    mine, theirs = {"free": (None, None), "split": (first, second), "same": (first, first)}[
        placement
    ]
    parent_end, child_end = multiprocessing.Pipe()
    ctx = multiprocessing.get_context("fork")
    proc = ctx.Process(target=_responder, args=(child_end, rounds, theirs), daemon=True)
    proc.start()
    try:
        _pin(mine)
        port = parent_end.recv()
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((HOST, 0))
        poller = select.epoll()
        poller.register(sock.fileno(), select.EPOLLIN)
        clock = time.perf_counter_ns
        sends: list[int] = []
        trips: list[int] = []
        wrong = 0  # answers that are not the datagram sent
        target = (HOST, port)
        for _ in range(rounds):
            t0 = clock()
            sock.sendto(PAYLOAD, target)
            t1 = clock()
            poller.poll()
            answer, _ = sock.recvfrom(2048)
            trips.append(clock() - t0)
            sends.append(t1 - t0)
            wrong += answer != PAYLOAD
        answer_send = parent_end.recv()
        sock.close()
    finally:
        os.sched_setaffinity(0, saved)
        proc.join(10)
    return {
        "placement": placement,
        "rounds": rounds,
        "initiator_sendto_us": round(statistics.median(sends) / 1000, 1),
        "responder_sendto_us": round(answer_send, 1),
        "round_trip_us": round(statistics.median(trips) / 1000, 1),
        "ok": wrong == 0,
    }


def main(argv: list[str] | None = None) -> int:
    """Measure every placement and print the JSON."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3000)
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    placements = [measure(p, args.rounds) for p in PLACEMENTS]
    report: dict[str, Any] = {
        "case": "wakeup_cost",
        "cpus": len(os.sched_getaffinity(0)),
        "load_average": os.getloadavg()[0],
        "placements": placements,
    }
    report["ok"] = all(p.get("ok", True) for p in placements)
    emit(report, args.out)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""The closed-loop SYN tester that ``router_bench.py`` and ``scaling.py`` drive a router with.

One process, two sockets on 127.0.0.1: ``tx`` sends pre-built SYNs to the device under
test (a router, or a bare relay to compare it with), ``rx`` (the sink the DUT forwards to)
counts what comes back. The loop is *closed*: exactly ``window`` SYNs are kept in flight,
and one more goes for each that reaches the sink, so the DUT always has work queued but no
backlog builds up in the kernel and nothing is lost; the rate is what the DUT sustains (an
open-loop UDP blast mostly measures the drops). SYNs in flight that make no progress for
``STALL`` seconds are written off as lost and the window refilled. Counted after
``WARMUP`` seconds, over ``params["seconds"]``.

The SYNs go in GSO trains (one system call for up to 64, when they are all the same size
and ``params.get("tester_gso", True)``); a DUT socket with UDP GRO off then reads every
SYN on its own, as from separate clients, and the cheap sender keeps the tester from being
the bottleneck even for a bare relay. The sink reads with GRO on (the DUTs send their
batches with GSO) and splits what it reads.

What it does not do: build the SYNs (the caller's ``make_syns`` does, given the tester's
source address: ``router_bench.py`` through the host core, ``scaling.py`` through the
public SAL codec), or judge the forwarded packets (it keeps a sample of them, and their
sizes, for the caller to check). Standard library only, so that ``suite.py`` can run it
against any source tree.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

HOST = "127.0.0.1"
WARMUP = 0.5  # seconds of forwarding before counting starts
DRAIN = 0.2  # seconds the tester waits for SYNs in flight after it stops sending
STALL = 0.25  # seconds without progress after which the SYNs in flight count as lost
BUFFER = 4 * 1024 * 1024
GSO_SEGMENTS = 64
SAMPLE = 256  # forwarded SYNs kept for the caller to decode and check

_UDP_SEGMENT = 103  # Linux; not exported by the socket module of Python 3.11
_UDP_GRO = 104
_GRO_CMSG_SPACE = socket.CMSG_SPACE(4)
_NATIVE_INT = struct.Struct("=i")

Address = tuple[str, int]


async def closed_loop(
    params: dict[str, Any], dut: Address, make_syns: Callable[[Address], list[bytes]]
) -> dict[str, Any]:
    """Keep ``params["window"]`` SYNs in flight through ``dut``; count at ``params["sink"]``.

    ``make_syns(source)`` gives the SYNs to send (in turn, round and round) from the
    tester's own address. Returns the counting window on the ``perf_counter`` clock (the
    DUT samples its CPU against it), the rate, the tester's own CPU share, totals, stalls,
    and ``forwarded_sample`` / ``forwarded_bytes``: the first ``SAMPLE`` packets that
    reached the sink and the set of their sizes.
    """
    loop = asyncio.get_running_loop()
    window: int = params["window"]
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for sock in (tx, rx):
        sock.setblocking(False)
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            sock.setsockopt(socket.SOL_SOCKET, option, BUFFER)
    tx.bind((HOST, 0))
    tx.connect(dut)
    rx.bind(tuple(params["sink"]))
    # The DUTs send their batches with GSO: with GRO one read takes a whole batch.
    with contextlib.suppress(OSError):
        rx.setsockopt(socket.SOL_UDP, _UDP_GRO, 1)
    syns = make_syns(tx.getsockname())
    nsyns = len(syns)
    send = tx.send
    sendmsg = tx.sendmsg
    recvmsg = rx.recvmsg
    # A GSO train needs segments of one size (a shorter last one aside).
    gso = [bool(params.get("tester_gso", True)) and len({len(s) for s in syns}) == 1]
    segment = [(socket.SOL_UDP, _UDP_SEGMENT, struct.pack("=H", len(syns[0])))]
    st = {"sent": 0, "received": 0, "written_off": 0, "next": 0, "stalls": 0, "send_errors": 0}
    sizes: set[int] = set()
    sample: list[bytes] = []
    sending = [True]

    def pump() -> None:
        inflight = st["sent"] - st["received"] - st["written_off"]
        if inflight < 0:  # SYNs written off as lost arrived after all
            st["written_off"] += inflight
            inflight = 0
        if not sending[0]:
            return
        i = st["next"]
        want = window - inflight
        sent = 0
        try:
            while sent < want:
                n = min(GSO_SEGMENTS, want - sent, nsyns - i)
                if n > 1 and gso[0]:
                    try:
                        sendmsg(syns[i : i + n], segment)
                    except BlockingIOError:
                        raise
                    except OSError:
                        st["send_errors"] += 1
                        gso[0] = False
                        continue
                else:
                    n = 1
                    send(syns[i])
                i += n
                if i == nsyns:
                    i = 0
                sent += n
        except BlockingIOError:
            pass
        except OSError:
            st["send_errors"] += 1
        st["next"] = i
        st["sent"] += sent

    def on_readable() -> None:
        n = 0
        for _ in range(4096):
            try:
                data, ancdata, _flags, _addr = recvmsg(65536, _GRO_CMSG_SPACE)
            except BlockingIOError:
                break
            size = len(data)
            gro_size = 0
            for level, kind, value in ancdata:
                if level == socket.SOL_UDP and kind == _UDP_GRO:
                    gro_size = _NATIVE_INT.unpack_from(value)[0]
            if 0 < gro_size < size:
                n += -(-size // gro_size)
                sizes.add(gro_size)
                if len(sample) < SAMPLE:
                    sample.extend(data[o : o + gro_size] for o in range(0, size, gro_size))
            else:
                n += 1
                sizes.add(size)
                if len(sample) < SAMPLE:
                    sample.append(data)
        st["received"] += n
        pump()

    marks: list[tuple[float, float, int]] = []

    def mark() -> None:
        marks.append((time.perf_counter(), time.process_time(), st["received"]))

    last = [-1]

    def watchdog() -> None:
        if sending[0] and st["received"] == last[0]:
            inflight = st["sent"] - st["received"] - st["written_off"]
            if inflight > 0:
                st["stalls"] += 1
                st["written_off"] += inflight
            pump()
        last[0] = st["received"]
        loop.call_later(STALL, watchdog)

    loop.add_reader(rx.fileno(), on_readable)
    try:
        loop.call_later(WARMUP, mark)
        loop.call_later(STALL, watchdog)
        pump()
        await asyncio.sleep(WARMUP + params["seconds"])
        mark()
        sending[0] = False
        await asyncio.sleep(DRAIN)
    finally:
        loop.remove_reader(rx.fileno())
        tx.close()
        rx.close()
    (t0, c0, r0), (t1, c1, r1) = marks
    seconds = t1 - t0
    return {
        "window_start": t0,
        "window_end": t1,
        "received": r1 - r0,
        "seconds": seconds,
        "per_s": (r1 - r0) / seconds,
        "cpu_share": (c1 - c0) / seconds,
        "sent_total": st["sent"],
        "received_total": st["received"],
        "lost": st["sent"] - st["received"],
        "stalls": st["stalls"],
        "send_errors": st["send_errors"],
        "syn_bytes": len(syns[0]),
        "gso": gso[0],
        "forwarded_bytes": sorted(sizes),
        "forwarded_sample": sample[:SAMPLE],
    }

"""The floor under a pyserval connection's cost: its datagrams with no protocol at all.

    python benchmarks/connect_floor.py [--seconds 3] [--udp endpoint|raw|both]
        [--cycle compact|spec] [--out FILE]

A pyserval connect cycle (connect, the server accepts and closes, the client reads end of
stream and closes) is a fixed run of datagrams in strict alternation: eight in the
spec's order (``../shared/spec/sal-wire.md``: the SAL FIN only after the TCP FIN's ACK;
the default), six when both ends ask for the compact close (each SAL FIN rides on its
TCP FIN). ``CYCLES`` below lists both
with the sizes a simulated cycle sends. Each datagram wakes the process it reaches: a
read (and the read that finds the socket empty), an epoll wait, a send, a loop pass.
asyncio TCP's cycle leaves its handshake and most of its close to the kernel.

This benchmark moves exactly those datagrams between two processes, and wakes the
two programs where pyserval's API wakes them (the client's
``connect`` when the SYN-ACK arrives, its read of end of stream at the server's FIN, after
which its ``aclose`` sends the FIN and returns at once, as ours does, so the rest of the
close overlaps the next cycle; the server's ``accept`` at the third ACK, whose close sends
the FIN), with nothing else: no decoding, no state, no timers. Its CPU time per cycle is
what any stack with this wire format, on asyncio, spends before doing any protocol work,
so ``asyncio TCP's CPU per connection / this floor`` is the best ratio to asyncio TCP such
a stack could reach (issue 14's third row asks for 0.6).

The datagrams go through one of two UDP layers (``--udp``): ``endpoint``, the one
pyserval's runtime uses (:class:`pyserval.runtime.udp.UdpEndpoint`: GRO reads, batched
sends, error counting); ``raw``, the least asyncio allows (``loop.add_reader`` and a
``recvfrom`` loop until the socket is empty, ``sendto``). ``raw`` is the floor; the gap
between the two is our UDP layer's own cost.

Each datagram carries its index in its first byte; the server checks the order and the
client checks every reply, and a cycle that sees anything else fails the run
(``ok: false``). Output: one JSON object (cycles per second, CPU microseconds per cycle
of both processes, latency).
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

sys.path.insert(0, str(Path(__file__).resolve().parent))
import treepath
from report import emit

SRC = treepath.pin()

import baselines  # noqa: E402
import scaling  # noqa: E402
from baselines import HOST, Control, Params, Result, run_pair  # noqa: E402

# (sender, size) of each datagram of one cycle, as pyserval's hosts send them on sockets
# (``tests/test_connect_floor.py`` checks them against a real cycle's capture; the SYN
# carries a RELAY extension there, 16 bytes that a simulated cycle's SYN has not).
# "spec": the close in the spec's order (a peer that does not agree to the compact close):
# SYN (with the service extension), SYN-ACK, the ACK (with the service extension), the
# server's TCP FIN, the client's TCP FIN, the server's SAL FIN, the client's SAL ACK+FIN,
# the server's SAL ACK (the default). "compact": both ends ask for it: SYN and SYN-ACK with
# the compact-close option, the ACK, the server's TCP FIN with its SAL FIN, the client's
# with its SAL FIN and both ACKs, the server's TCP and SAL ACK in one.
CYCLES = {
    "spec": (
        ("client", 116),
        ("server", 64),
        ("client", 88),
        ("server", 32),
        ("client", 32),
        ("server", 52),
        ("client", 32),
        ("server", 32),
    ),
    "compact": (
        ("client", 120),
        ("server", 68),
        ("client", 88),
        ("server", 52),
        ("client", 52),
        ("server", 52),
    ),
}
# Where a program (not the stack's receive path) acts: the server's accept returns at the
# third ACK and its close sends datagram 3; the client's connect returns at datagram 1,
# its read of end of stream at datagram 3, and then its close sends datagram 4 and returns
# (the rest of the close goes on in the receive path, as pyserval's aclose leaves it).
SERVER_APP_STEP = 2
CLIENT_WAKES = (1, 3)
# What the client's receive path answers by itself: the third ACK, and in the spec's
# cycle the SAL ACK+FIN.
CLIENT_SENDS = {"spec": (1, 5), "compact": (1,)}


def datagrams(cycle: str) -> list[bytes]:
    """The cycle's datagrams: each its index, then zeros to its size."""
    return [bytes([i]) + bytes(size - 1) for i, (_who, size) in enumerate(CYCLES[cycle])]


Address = tuple[str, int]
OnDatagrams = Callable[[list[tuple[bytes, Address]]], None]


class Udp(Protocol):
    """What the two sides need of a UDP layer."""

    address: Address

    def send_many(self, items: Sequence[tuple[bytes, Address]]) -> None: ...

    def close(self) -> None: ...


class RawUdp:
    """The least asyncio allows: a reader callback that reads until the socket is empty,
    and ``sendto``."""

    def __init__(self, on_datagrams: OnDatagrams) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind((HOST, 0))
        self._sock.setblocking(False)
        self.address: Address = self._sock.getsockname()[:2]
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._sock.fileno(), self._on_readable, on_datagrams)

    def _on_readable(self, on_datagrams: OnDatagrams) -> None:
        recvfrom = self._sock.recvfrom
        batch = []
        while True:
            try:
                batch.append(recvfrom(65536))
            except BlockingIOError:
                break
        if batch:
            on_datagrams(batch)

    def send_many(self, items: Sequence[tuple[bytes, Address]]) -> None:
        """Send each datagram (loopback: the kernel takes them all)."""
        for data, remote in items:
            self._sock.sendto(data, remote)

    def close(self) -> None:
        """Stop reading and close the socket."""
        self._loop.remove_reader(self._sock.fileno())
        self._sock.close()


async def open_udp(kind: str, on_datagrams: OnDatagrams) -> Udp:
    """A bound UDP socket on ``HOST`` of the given kind (``endpoint`` or ``raw``)."""
    if kind == "raw":
        return RawUdp(on_datagrams)
    from pyserval.runtime.udp import UdpEndpoint

    endpoint: Udp = await UdpEndpoint.open((HOST, 0), on_datagrams)
    return endpoint


async def floor_server(ctl: Control, params: Params) -> Result:
    """Answer each client datagram with the cycle's next one; datagram 2 goes to the
    program (an accept), which sends datagram 3 (its close)."""
    accepted = asyncio.Queue[Address]()
    counts = {"accepted": 0, "out_of_order": 0}
    cycle = CYCLES[params["cycle"]]
    dgrams = datagrams(params["cycle"])
    mine = range(0, len(cycle), 2)  # the client's datagrams: the server answers them

    def on_datagrams(batch: list[tuple[bytes, Address]]) -> None:
        for data, src in batch:
            step = data[0] if data else -1
            if step not in mine or len(data) != cycle[step][1]:
                counts["out_of_order"] += 1
            elif step == SERVER_APP_STEP:
                accepted.put_nowait(src)
            else:
                udp.send_many([(dgrams[step + 1], src)])

    async def serve() -> None:
        while True:
            src = await accepted.get()
            counts["accepted"] += 1
            udp.send_many([(dgrams[SERVER_APP_STEP + 1], src)])

    udp = await open_udp(params["udp"], on_datagrams)
    try:
        ctl.announce(udp.address)
        task = asyncio.ensure_future(serve())
        samples = await scaling._sample_cpu(ctl)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    finally:
        udp.close()
    return {**counts, "samples": samples}


async def floor_client(ctl: Control, params: Params) -> Result:
    """Run cycles one at a time for ``seconds``; the program awaits where pyserval's API
    would return (``CLIENT_WAKES``)."""
    loop = asyncio.get_running_loop()
    ip, port = params["address"]
    server: Address = (ip, port)
    waiting: list[asyncio.Future[int]] = []
    bad = 0
    closed = 0  # cycles whose last datagram (the SAL ACK) arrived
    cycle = CYCLES[params["cycle"]]
    dgrams = datagrams(params["cycle"])
    sends = CLIENT_SENDS[params["cycle"]]
    theirs = range(1, len(cycle), 2)  # the server's datagrams

    def on_datagrams(batch: list[tuple[bytes, Address]]) -> None:
        nonlocal bad, closed
        for data, _src in batch:
            step = data[0] if data else -1
            if step not in theirs or len(data) != cycle[step][1]:
                bad += 1
            else:
                if step in sends:
                    udp.send_many([(dgrams[step + 1], server)])
                if step in CLIENT_WAKES and waiting:
                    waiting.pop().set_result(step)
                closed += step == len(cycle) - 1

    async def wake() -> int:
        fut: asyncio.Future[int] = loop.create_future()
        waiting.append(fut)
        return await fut

    udp = await open_udp(params["udp"], on_datagrams)
    durations: list[float] = []
    checked = True
    try:
        cpu0 = time.process_time()
        start = time.perf_counter()
        end = start + params["seconds"]
        now = start
        while now < end:
            udp.send_many([(dgrams[0], server)])
            got = [await wake()]  # connect returns (the third ACK went out first)
            got.append(await wake())  # the read of end of stream returns
            udp.send_many([(dgrams[4], server)])  # aclose
            checked = checked and got == list(CLIENT_WAKES)
            t = time.perf_counter()
            durations.append(t - now)
            now = t
        cpu = time.process_time() - cpu0
        await asyncio.sleep(0.05)  # the last cycle's close, still in flight
    finally:
        udp.close()
    return {
        "durations": durations,
        "seconds": now - start,
        "window": [start, now],
        "cpu": cpu,
        "bad": bad,
        "closed": closed,
        "checked": checked,
    }


def floor_rate(seconds: float, udp: str = "raw", cycle: str = "spec") -> Result:
    """Cycles per second and CPU per cycle (both processes) of the bare exchange of
    ``cycle`` (``compact`` or ``spec``) over the ``udp`` layer (``raw`` or ``endpoint``)."""
    params = {"seconds": seconds, "udp": udp, "cycle": cycle}
    server, client = run_pair(floor_server, floor_client, params)
    server_cpu = scaling.cpu_in_window(server.pop("samples"), *client["window"])
    summary = baselines.connect_summary(server, client)
    summary["cpu_us_per_cycle"] = round(
        (client["cpu"] + server_cpu) / max(summary["connections"], 1) * 1e6, 1
    )
    summary["ok"] = (
        client["checked"]
        and client["bad"] == 0
        and client["closed"] == summary["connections"]
        and server["out_of_order"] == 0
        and server["accepted"] >= summary["connections"] > 0
    )
    summary["datagrams_per_cycle"] = len(CYCLES[cycle])
    summary["udp"] = udp
    summary["cycle"] = cycle
    return summary


def main(argv: list[str] | None = None) -> int:
    """Run the bare exchange once; print (and with ``--out`` write) its JSON."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--udp", choices=("raw", "endpoint", "both"), default="both")
    parser.add_argument(
        "--cycle", choices=tuple(CYCLES), default="spec", help="which close (see CYCLES)"
    )
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    out: Result = {"case": "connect_floor", "pyserval_src": str(SRC), "cycle": args.cycle}
    kinds = ("raw", "endpoint") if args.udp == "both" else (args.udp,)
    for kind in kinds:
        out[kind] = floor_rate(args.seconds, kind, args.cycle)
    out["ok"] = all(out[kind]["ok"] for kind in kinds)
    emit(out, args.out)
    return 0 if out["ok"] is True else 1


if __name__ == "__main__":
    sys.exit(main())

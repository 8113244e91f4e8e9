"""The connect cycle with both hosts in one process: CPU per connection without wake-ups.

    python benchmarks/connect_inproc.py [--connections 2000] [--warmup 200] [--out FILE]
        [--stack pyserval|tcp]

``suite_cases.py connect`` runs the client and the server in two processes, as users do,
and its CPU figure includes what each wake-up of a sleeping process costs. Here both
:class:`pyserval.Host` s share one asyncio loop and real UDP sockets on loopback, so the
figure is the stack's own work per connection (system calls included) with warm caches,
and the run is short enough for ``valgrind --tool=callgrind``, whose instruction counts do
not move with load on the machine (take the difference of two runs of different
``--connections`` to leave out start-up). For such counts run it with
``--virtual-clock`` and ``OPENBLAS_NUM_THREADS=1``: the clock then stands still within a
cycle and moves 1 ms between cycles, so the timer work per cycle does not depend on how
fast valgrind happens to run, and numpy's idle BLAS threads (numpy is imported for the
checksums) do not spin under the count; repeat runs then agree within about 0.3%.

    OPENBLAS_NUM_THREADS=1 PYTHONHASHSEED=0 setarch -R valgrind --tool=callgrind \
        python benchmarks/connect_inproc.py --virtual-clock --warmup 50 --connections N

The cycle is ``suite_cases.py``'s: connect, the server accepts and closes, the client reads
end of stream and closes. The JSON gives connections per second, CPU microseconds per
connection (``time.process_time``), how much of it was user space and how much the kernel
(``getrusage``: the split is sampled at the scheduler's ticks), and ``ok``: every
connection was accepted and every client read end of stream with no data. ``--stack tcp``
runs asyncio TCP's same cycle in one process instead (``open_connection``, the server's
callback closes, ``read`` to EOF, close), and ``--stack both`` the two in turns
(``--reps`` pairs, with pyserval's ratio to it by rate and by CPU): the two stacks' own
work side by side, without the wake-ups that ``connect_slices.py``'s figures include.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import treepath
from report import emit

SRC = treepath.pin()

import anyio  # noqa: E402

import pyserval  # noqa: E402

SERVICE = "inproc-connect"


class Counts:
    """What :func:`serve` and :func:`cycle` saw: streams accepted, clean ends read."""

    def __init__(self) -> None:
        self.accepted = 0
        self.clean_ends = 0


async def serve(listener: Any, counts: Counts) -> None:
    """The server's side of the cycle: accept each stream and close it at once."""
    async for stream in listener:
        counts.accepted += 1
        await stream.aclose()


async def cycle(host: pyserval.Host, counts: Counts, service: str = SERVICE) -> None:
    """The client's side: connect, read end of stream (counted when clean), close."""
    stream = await host.connect(service)
    try:
        await stream.receive()
    except anyio.EndOfStream:
        counts.clean_ends += 1
    await stream.aclose()


# The virtual clock: time.monotonic replaced by a C callable reading this cell (a Python
# function would add a frame to every reading), so asyncio's loop and the hosts read it.
_VIRTUAL_NOW = [1000.0]


class Meter:
    """CPU and wall time over the timed cycles."""

    def start(self) -> None:
        self.cpu0 = time.process_time()
        self.usage0 = resource.getrusage(resource.RUSAGE_SELF)
        self.wall0 = time.perf_counter()

    def figures(self, connections: int) -> dict[str, Any]:
        wall = time.perf_counter() - self.wall0
        cpu = time.process_time() - self.cpu0
        usage = resource.getrusage(resource.RUSAGE_SELF)
        user = usage.ru_utime - self.usage0.ru_utime
        kernel = usage.ru_stime - self.usage0.ru_stime
        return {
            "connections": connections,
            "per_s": round(connections / wall),
            "cpu_us_per_connection": round(cpu / connections * 1e6, 1),
            "user_us_per_connection": round(user / connections * 1e6, 1),
            "kernel_us_per_connection": round(kernel / connections * 1e6, 1),
        }


async def run_tcp(connections: int, warmup: int) -> dict[str, Any]:
    """asyncio TCP's cycle, both ends in this process: ``warmup`` cycles, then
    ``connections`` timed ones."""
    counts = Counts()

    async def handle(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        counts.accepted += 1
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=1024)
    host, port = server.sockets[0].getsockname()[:2]
    meter = Meter()
    async with server:
        for i in range(warmup + connections):
            if i == warmup:
                meter.start()
            reader, writer = await asyncio.open_connection(host, port)
            if await reader.read() == b"":
                counts.clean_ends += 1
            writer.close()
            await writer.wait_closed()
        figures = meter.figures(connections)
        await asyncio.sleep(0.05)  # the last accept's callback
    total = warmup + connections
    return {**figures, "ok": counts.accepted == total and counts.clean_ends == total}


async def run(connections: int, warmup: int, virtual_clock: bool = False) -> dict[str, Any]:
    """``warmup`` cycles, then ``connections`` timed ones; the figures. ``virtual_clock``:
    the hosts' clock moves 1 ms per cycle and not within one (see the module docstring)."""
    counts = Counts()
    if virtual_clock:
        time.monotonic = functools.partial(_VIRTUAL_NOW.__getitem__, 0)
    step = 0.001 if virtual_clock else 0.0
    config = pyserval.StreamConfig(time_wait=1.0)  # as suite_cases' client
    async with (
        pyserval.Host(["127.0.0.1:0"]) as server,
        pyserval.Host(["127.0.0.1:0"], stream_config=config) as client,
    ):
        listener = await server.listen(SERVICE, backlog=1024)
        task = asyncio.ensure_future(serve(listener, counts))
        ip, port = server.addresses[0]
        client.add_route(SERVICE, f"{ip}:{port}")
        for _ in range(warmup):
            await cycle(client, counts)
            _VIRTUAL_NOW[0] += step
        meter = Meter()
        meter.start()
        for _ in range(connections):
            await cycle(client, counts)
            _VIRTUAL_NOW[0] += step
        figures = meter.figures(connections)
        if virtual_clock:
            for _ in range(5):
                await asyncio.sleep(0)  # the last accept (no timer fires on a still clock)
        else:
            await asyncio.sleep(0.05)  # the last accept
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    total = warmup + connections
    return {**figures, "ok": counts.accepted == total and counts.clean_ends == total}


def both(connections: int, warmup: int, reps: int) -> dict[str, Any]:
    """pyserval and asyncio TCP in turns, ``reps`` pairs (ABBA), each on a fresh loop in
    this process; per pair pyserval's rate and CPU over asyncio TCP's, and the medians."""
    runs: list[dict[str, Any]] = []
    by_rate: list[float] = []
    by_cpu: list[float] = []
    for rep in range(reps):
        # Which stack goes first turns with each pair, so neither always runs on the
        # machine the other left (caches, frequency, the allocator's arenas).
        if rep % 2 == 0:
            ours = asyncio.run(run(connections, warmup))
            theirs = asyncio.run(run_tcp(connections, warmup))
        else:
            theirs = asyncio.run(run_tcp(connections, warmup))
            ours = asyncio.run(run(connections, warmup))
        by_rate.append(ours["per_s"] / theirs["per_s"])
        by_cpu.append(theirs["cpu_us_per_connection"] / ours["cpu_us_per_connection"])
        runs += [{"rep": rep, "stack": "pyserval", **ours}, {"rep": rep, "stack": "tcp", **theirs}]
    return {
        "runs": runs,
        "ratio_median": round(statistics.median(by_rate), 3),
        "ratios": [round(r, 3) for r in by_rate],
        "cpu_ratio_median": round(statistics.median(by_cpu), 3),
        "ok": all(r["ok"] for r in runs),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the cycles and print the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument(
        "--virtual-clock", action="store_true", help="for instruction counts (see above)"
    )
    parser.add_argument("--stack", choices=["pyserval", "tcp", "both"], default="pyserval")
    parser.add_argument("--reps", type=int, default=3, help="pairs, with --stack both")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.stack == "both":
        result = both(args.connections, args.warmup, args.reps)
    elif args.stack == "tcp":
        result = asyncio.run(run_tcp(args.connections, args.warmup))
    else:
        result = asyncio.run(run(args.connections, args.warmup, args.virtual_clock))
    case = {"case": "connect_inproc", "stack": args.stack, "pyserval_src": str(SRC)}
    emit({**case, **result}, args.out)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

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

What a wake-up costs beyond that work: ``--sweep MB`` reads one byte of every 64-byte line
of an MB-MiB buffer after each loop pass that found events (:class:`Evictor`), so every
pass starts with cold caches and TLB, as a process woken after the other one (and other
guests) ran on its CPU does; the sweeps' own CPU and wall time are taken off the figures, and
``cold_passes_per_connection`` says how many passes paid. ``--pages`` adds the memory one
cycle touches (both ends): the pages referenced (``/proc/self/clear_refs``, then
``smaps``), by kind: the interpreter's machine code, other libraries, and the Python heap
(objects, code objects, dicts; pymalloc's arenas and malloc's heap). A cold pass costs in
proportion to what it touches, not to the instructions it runs (see the README,
eleventh session).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import re
import resource
import selectors
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
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
    """What :func:`serve` and :func:`cycle` saw: cycles begun, streams accepted, clean
    ends read."""

    def __init__(self) -> None:
        self.started = 0
        self.accepted = 0
        self.clean_ends = 0

    def all_clean(self) -> bool:
        """Every cycle begun was accepted and read a clean end of stream."""
        return self.accepted == self.started == self.clean_ends


async def serve(listener: Any, counts: Counts) -> None:
    """The server's side of the cycle: accept each stream and close it at once."""
    async for stream in listener:
        counts.accepted += 1
        await stream.aclose()


async def cycle(host: pyserval.Host, counts: Counts, service: str = SERVICE) -> None:
    """The client's side: connect, read end of stream (counted when clean), close."""
    counts.started += 1
    stream = await host.connect(service)
    try:
        await stream.receive()
    except anyio.EndOfStream:
        counts.clean_ends += 1
    await stream.aclose()


# The virtual clock: time.monotonic replaced by a C callable reading this cell (a Python
# function would add a frame to every reading), so asyncio's loop and the hosts read it.
_VIRTUAL_NOW = [1000.0]


class Evictor:
    """Cold caches on demand: :meth:`sweep` reads one byte every ``stride`` bytes of a
    buffer of ``mb`` MiB. With the default stride (a cache line) it pushes out of the
    caches and the TLB what was there before (on this machine: 1 MiB of L2 per core, 32
    MiB of L3, a 2,048-entry TLB: 4 KiB pages past 8 MiB); with a stride of 4096 it
    touches one line per page, which empties the TLB but leaves most of the L3 alone. It
    keeps the CPU and wall time its sweeps took, for the figures to leave out; ``paused``
    skips them (while :func:`pages_of` looks at what the cycle itself touches)."""

    def __init__(self, mb: float, stride: int = 64) -> None:
        if not 0 < mb < 4096:
            raise ValueError(f"a sweep of {mb!r} MiB: give a size above 0 and below 4 GiB")
        if not 1 <= stride <= 1 << 20:
            raise ValueError(f"a sweep stride of {stride!r} bytes: give 1 to 1 MiB")
        self.mb = mb
        self.stride = stride
        # Written, not just allocated: untouched pages all read the kernel's one zero page,
        # which would evict nothing.
        self._touch = memoryview(bytearray(b"\x5a") * int(mb * (1 << 20)))[::stride]
        self.spent = 0.0  # CPU seconds
        self.spent_wall = 0.0  # wall seconds (more than the CPU when the hypervisor steals)
        self.sweeps = 0
        self.paused = False

    def sweep(self) -> None:
        """Touch the buffer once every ``stride`` bytes (a strided copy, in C)."""
        if self.paused:
            return
        start, start_wall = time.process_time(), time.perf_counter()
        self._touch.tobytes()
        self.spent += time.process_time() - start
        self.spent_wall += time.perf_counter() - start_wall
        self.sweeps += 1


class SweepingSelector(selectors.DefaultSelector):
    """The default selector, sweeping ``evictor`` after each select that found events: the
    loop pass that follows starts cold."""

    def __init__(self, evictor: Evictor) -> None:
        super().__init__()
        self.evictor = evictor

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        """Ready keys, as the default selector's; a sweep when there are any."""
        ready: list[tuple[selectors.SelectorKey, int]] = super().select(timeout)
        if ready:
            self.evictor.sweep()
        return ready


def run_on_loop(
    make: Callable[[], Awaitable[dict[str, Any]]], evictor: Evictor | None
) -> dict[str, Any]:
    """``make()`` run to the end on a fresh loop: asyncio's own, or with ``evictor`` one
    whose every pass with events starts cold (:class:`SweepingSelector`)."""

    async def main() -> dict[str, Any]:
        return await make()

    if evictor is None:
        return asyncio.run(main())
    selector = SweepingSelector(evictor)
    with asyncio.Runner(loop_factory=lambda: asyncio.SelectorEventLoop(selector)) as runner:
        return runner.run(main())


class Meter:
    """CPU and wall time over the timed cycles (less the sweeps of ``evictor``, if any: the
    one the loop's :class:`SweepingSelector` holds)."""

    def __init__(self, evictor: Evictor | None = None) -> None:
        self.evictor = evictor

    def start(self) -> None:
        self.spent0 = self.evictor.spent if self.evictor else 0.0
        self.wall_spent0 = self.evictor.spent_wall if self.evictor else 0.0
        self.sweeps0 = self.evictor.sweeps if self.evictor else 0
        self.cpu0 = time.process_time()
        self.usage0 = resource.getrusage(resource.RUSAGE_SELF)
        self.wall0 = time.perf_counter()

    def figures(self, connections: int) -> dict[str, Any]:
        wall = time.perf_counter() - self.wall0
        cpu = time.process_time() - self.cpu0
        usage = resource.getrusage(resource.RUSAGE_SELF)
        user = usage.ru_utime - self.usage0.ru_utime
        kernel = usage.ru_stime - self.usage0.ru_stime
        figures: dict[str, Any] = {"connections": connections}
        if self.evictor is not None:
            # A sweep is user-space CPU of this process: out of both CPU figures, and its
            # wall time out of the wall time the rate is worked out from.
            swept = self.evictor.spent - self.spent0
            cpu -= swept
            user -= swept
            wall -= self.evictor.spent_wall - self.wall_spent0
            figures["sweep_mb"] = self.evictor.mb
            figures["sweep_stride"] = self.evictor.stride
            figures["cold_passes_per_connection"] = round(
                (self.evictor.sweeps - self.sweeps0) / connections, 2
            )
        return {
            **figures,
            "per_s": round(connections / wall),
            "cpu_us_per_connection": round(cpu / connections * 1e6, 1),
            "user_us_per_connection": round(user / connections * 1e6, 1),
            "kernel_us_per_connection": round(kernel / connections * 1e6, 1),
        }


PAGE_SAMPLES = 5
"""Cycles :func:`pages_of` looks at (the median of their figures is reported)."""

_MAPPING = re.compile(r"^[0-9a-f]+-[0-9a-f]+ \S+ \S+ \S+ \S+\s*(.*)$")


def _kind(path: str) -> str:
    """Which part of the process a mapping holds: the interpreter, another library, the
    Python heap (anonymous memory and malloc's heap), or the rest (stack, vdso, files)."""
    name = path.rsplit("/", 1)[-1]
    if name.startswith("libpython") or name.startswith("python"):
        return "interpreter_kb"
    if ".so" in name:
        return "libraries_kb"
    if path == "" or path == "[heap]":
        return "python_heap_kb"
    return "other_kb"


def referenced_kb() -> dict[str, int] | None:
    """KiB of this process's memory referenced since the last :func:`clear_referenced`, by
    :func:`_kind`; None where Linux does not say (no ``/proc/self/smaps``)."""
    try:
        text = Path("/proc/self/smaps").read_text()
    except OSError:
        return None
    totals = dict.fromkeys(("interpreter_kb", "libraries_kb", "python_heap_kb", "other_kb"), 0)
    kind = "other_kb"
    for line in text.splitlines():
        mapping = _MAPPING.match(line)
        if mapping is not None:
            kind = _kind(mapping.group(1).strip())
        elif line.startswith("Referenced:"):
            totals[kind] += int(line.split()[1])
    return totals


def clear_referenced() -> bool:
    """Clear the referenced bits of this process's pages; False where that is refused."""
    try:
        Path("/proc/self/clear_refs").write_text("1")
    except OSError:
        return False
    return True


async def pages_of(
    one_cycle: Callable[[], Awaitable[None]],
    evictor: Evictor | None = None,
    samples: int = PAGE_SAMPLES,
) -> dict[str, int] | None:
    """The memory one cycle references, by kind (the median of ``samples`` cycles' each, by
    total; ``evictor``'s sweeps paused meanwhile); None where the kernel does not tell."""
    seen: list[dict[str, int]] = []
    try:
        if evictor is not None:
            evictor.paused = True
        for _ in range(samples):
            if not clear_referenced():
                return None
            await one_cycle()
            kb = referenced_kb()
            if kb is None:
                return None
            seen.append({**kb, "total_kb": sum(kb.values())})
    finally:
        if evictor is not None:
            evictor.paused = False
    return sorted(seen, key=lambda kb: kb["total_kb"])[samples // 2]


async def run_tcp(
    connections: int, warmup: int, pages: bool = False, evictor: Evictor | None = None
) -> dict[str, Any]:
    """asyncio TCP's cycle, both ends in this process: ``warmup`` cycles, then
    ``connections`` timed ones (then, with ``pages``, the memory a cycle touches).
    ``evictor``: the one the loop sweeps (see :func:`run_on_loop`), left out of the figures."""
    counts = Counts()

    async def handle(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        counts.accepted += 1
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=1024)
    host, port = server.sockets[0].getsockname()[:2]

    async def one_cycle() -> None:
        counts.started += 1
        reader, writer = await asyncio.open_connection(host, port)
        if await reader.read() == b"":
            counts.clean_ends += 1
        writer.close()
        await writer.wait_closed()

    meter = Meter(evictor)
    extra: dict[str, Any] = {}
    async with server:
        for i in range(warmup + connections):
            if i == warmup:
                meter.start()
            await one_cycle()
        figures = meter.figures(connections)
        if pages:
            extra["pages_per_cycle"] = await pages_of(one_cycle, evictor)
        await asyncio.sleep(0.05)  # the last accept's callback
    return {**figures, **extra, "ok": counts.all_clean() and counts.started >= warmup + connections}


async def run(
    connections: int,
    warmup: int,
    virtual_clock: bool = False,
    pages: bool = False,
    evictor: Evictor | None = None,
) -> dict[str, Any]:
    """``warmup`` cycles, then ``connections`` timed ones; the figures. ``virtual_clock``:
    the hosts' clock moves 1 ms per cycle and not within one (see the module docstring).
    ``pages``: then the memory a cycle touches. ``evictor``: as :func:`run_tcp`'s."""
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
        meter = Meter(evictor)
        meter.start()
        for _ in range(connections):
            await cycle(client, counts)
            _VIRTUAL_NOW[0] += step
        figures = meter.figures(connections)
        if pages:
            one_cycle = functools.partial(cycle, client, counts)
            figures["pages_per_cycle"] = await pages_of(one_cycle, evictor)
        if virtual_clock:
            for _ in range(5):
                await asyncio.sleep(0)  # the last accept (no timer fires on a still clock)
        else:
            await asyncio.sleep(0.05)  # the last accept
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    return {**figures, "ok": counts.all_clean() and counts.started >= warmup + connections}


def both(
    connections: int,
    warmup: int,
    reps: int,
    evictor: Evictor | None = None,
    pages: bool = False,
) -> dict[str, Any]:
    """pyserval and asyncio TCP in turns, ``reps`` pairs (ABBA), each on a fresh loop in
    this process (sweeping ``evictor`` after every pass with events, when given); per pair
    pyserval's rate and CPU over asyncio TCP's, and the medians."""
    runs: list[dict[str, Any]] = []
    by_rate: list[float] = []
    by_cpu: list[float] = []
    for rep in range(reps):
        # Which stack goes first turns with each pair, so neither always runs on the
        # machine the other left (caches, frequency, the allocator's arenas).
        def ours_run() -> dict[str, Any]:
            return run_on_loop(
                lambda: run(connections, warmup, pages=pages, evictor=evictor), evictor
            )

        def theirs_run() -> dict[str, Any]:
            return run_on_loop(lambda: run_tcp(connections, warmup, pages, evictor), evictor)

        if rep % 2 == 0:
            ours = ours_run()
            theirs = theirs_run()
        else:
            theirs = theirs_run()
            ours = ours_run()
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
    parser.add_argument(
        "--sweep",
        type=float,
        default=None,
        metavar="MB",
        help="start every loop pass with events cold: sweep MB MiB first (its CPU left out)",
    )
    parser.add_argument(
        "--sweep-stride",
        type=int,
        default=64,
        metavar="BYTES",
        help="touch one byte every BYTES (64: every cache line; 4096: one line a page)",
    )
    parser.add_argument(
        "--pages", action="store_true", help="also the memory one cycle touches, by kind"
    )
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    evictor = Evictor(args.sweep, args.sweep_stride) if args.sweep is not None else None
    if args.stack == "both":
        result = both(args.connections, args.warmup, args.reps, evictor, args.pages)
    elif args.stack == "tcp":
        result = run_on_loop(
            lambda: run_tcp(args.connections, args.warmup, args.pages, evictor), evictor
        )
    else:
        result = run_on_loop(
            lambda: run(args.connections, args.warmup, args.virtual_clock, args.pages, evictor),
            evictor,
        )
    case = {"case": "connect_inproc", "stack": args.stack, "pyserval_src": str(SRC)}
    emit({**case, **result}, args.out)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

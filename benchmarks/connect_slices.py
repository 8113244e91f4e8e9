"""Issue 14's sequential-connections row in short interleaved slices (JSON out).

    python benchmarks/connect_slices.py [--slices 20] [--seconds 0.5] [--warmup 0.5]
        [--out FILE]
    python benchmarks/connect_slices.py --tree before=/old/checkout --tree after=src ...

``suite_cases.py connect_vs_tcp`` starts two fresh processes for every run of each stack,
so a pair of runs is some seconds apart, and on a shared 2-vCPU machine the speed of the
machine itself drifts by 15 to 40% over that much time (the row has read 0.49 and 0.76 in
runs of one hour). Here all four processes (pyserval's server and client, asyncio TCP's
server and client) start once and stay; the parent then runs the two stacks' same cycle
(connect, the server accepts and closes, the client reads end of stream and closes) in
slices of ``--seconds``, alternating which stack goes first (ABBA), so the two slices of a
pair are a fraction of a second apart and see the same machine. The idle stack's
processes sleep in ``epoll`` meanwhile.

The JSON names the machine's idle settings (``machine``, with the share of the run's CPU
time the hypervisor gave to other guests, ``steal_share``): on a VM whose idle vCPUs halt at
once, each datagram that wakes the other process costs tens of microseconds, and
pyserval's cycle wakes it at each of its eight datagrams where asyncio TCP's does so less
often (the kernel answers the SYN and the client's FIN).

Reported per slice: connections per second, and CPU per connection of both processes (the
client's own, the server's read before and after the slice through its command pipe, so
the server's idle time and the pipe are outside it), and how much of it was spent in the
kernel (system calls, the loopback's delivery to the other socket, wake-ups), and how
many times the two processes went to sleep per connection (voluntary context switches:
each is a wake-up, dear on a VM whose idle vCPUs halt). Per pair:
pyserval's rate over asyncio TCP's. Summary: the median ratio, its quartiles, how many
pairs reach the issue's 0.6, the median ratio by CPU, medians of CPU and kernel time per
connection, and ``ok``: every connection a client completed was accepted by its server
(the servers' counts at the end).

``--stacks pyserval,floor,tcp`` adds ``connect_floor.py``'s cycle (the same eight datagrams
with no protocol behind them: the floor under any faster per-packet path) in rounds of
three slices whose order turns, with each pair's ratio; ``--layers`` samples each
process's user CPU by layer (``layer_sampler.py``: pyserval's core, its runtime, asyncio).

``--delay ROLE:KIND:US`` finds the cycle's critical path (``delay_probe.py``): the first
stack's server or client spins US microseconds on each read that brings a datagram of KIND
(``syn``, ``synack``, ``fin``, ``control``, ``ack``). With ``--tree base=src --tree
delayed=src`` the ratio says how much of the spin the rate felt: about a cycle's worth
(1 / (1 + US x rate)) for a step on the critical path, none for a step the other process
waits through anyway.

With two ``--tree NAME=PATH`` (a checkout or its ``src/``) the two stacks are pyserval
from each tree instead, and the ratio is the second tree's rate over the first's: an A/B of
a change whose effect is smaller than the drift between ``suite.py``'s runs. Each process
imports pyserval from its tree (checked, and reported).

The sides are the existing benchmarks' (``suite_cases.accept_server`` and
``connect_client``, ``baselines.tcp_accept_server`` and ``tcp_connect_client``), driven
through a command pipe instead of one run each, and imported in the child only, after its
tree is put first on ``sys.path``. ``PYSERVAL_BENCH_LOOP`` (``baselines``) picks the event
loop of all four processes.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import multiprocessing
import os
import resource
import statistics
import sys
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
# The pyserval the default run measures, found as treepath.pin() would (PYTHONPATH's or the
# installed one first, this checkout's only as the fallback) and before baselines puts this
# checkout's src/ first on the path where it is not on it yet (a worktree, say). Each child
# gets it as its tree, explicitly.
_SPEC = importlib.util.find_spec("pyserval")
DEFAULT_SRC = str(
    Path(_SPEC.origin).parents[1] if _SPEC is not None and _SPEC.origin else HERE.parent / "src"
)
sys.path.insert(0, str(HERE))
# Nothing here imports pyserval at module level (baselines does not either): a spawned
# child imports this module first, and imports pyserval only once its tree is first on
# sys.path (_sides).
import baselines  # noqa: E402
import delay_probe  # noqa: E402
from baselines import Control, Params, Result, expect  # noqa: E402
from layer_sampler import LayerSampler, growth, shares  # noqa: E402
from report import emit  # noqa: E402

GOAL = 0.6
PYSERVAL = "pyserval"
TCP = "asyncio TCP"
FLOOR = "floor"
# --stacks' stacks by kind: (name, kind, src); pyserval's src is the default run's.
KINDS: dict[str, tuple[str, str, str | None]] = {
    "pyserval": (PYSERVAL, "pyserval", DEFAULT_SRC),
    "tcp": (TCP, "tcp", None),
    "floor": (FLOOR, "floor", None),
}


def _sides(kind: str, src: str | None) -> tuple[Any, Any]:
    """(server side, client side) of ``kind`` ("pyserval", "tcp" or "floor"), pyserval
    imported from ``src`` when given (this checkout's, or PYTHONPATH's, otherwise)."""
    if kind == "floor":  # (raw UDP: pyserval is imported, and not run)
        import connect_floor

        return connect_floor.floor_server, connect_floor.floor_client
    if src is not None:
        sys.path.insert(0, src)
    import suite_cases  # (its treepath.pin() imports pyserval from the first entry)

    if src is not None:
        import pyserval

        imported = Path(pyserval.__file__).resolve()
        if Path(src).resolve() not in imported.parents:
            raise RuntimeError(f"pyserval came from {imported}, not from the tree {src}")
    if kind == "tcp":
        return baselines.tcp_accept_server, baselines.tcp_connect_client
    return suite_cases.accept_server, suite_cases.connect_client


# This child's sampler of user CPU by layer (--layers), None when not asked for.
_SAMPLER: LayerSampler | None = None


def _start_delay(params: Params, role: str) -> None:
    """--delay: this process spins as delay_probe says, if it is the role named."""
    delay = params.get("delay")
    if delay and delay[0] == role:
        from pyserval.runtime.udp import UdpEndpoint

        delay_probe.install(UdpEndpoint, delay[1], delay[2])


def _start_sampler(params: Params) -> None:
    global _SAMPLER
    if params.get("layers"):
        _SAMPLER = LayerSampler()
        _SAMPLER.start()


def _samples() -> dict[str, int]:
    return _SAMPLER.counts() if _SAMPLER is not None else {}


def _usage() -> tuple[float, float, int]:
    """This process's CPU seconds so far, in user space and in the kernel (getrusage:
    the sum is exact, the split sampled at the scheduler's ticks), and how many times it
    went to sleep (voluntary context switches: each is a wake-up to come)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime, usage.ru_nvcsw


def _split_by_layer(
    user: float, client: dict[str, int], server0: dict[str, int], server1: dict[str, int]
) -> Result:
    """Both processes' samples in a slice (the client's, the server's growth from 0 to 1):
    each layer's share of their user CPU per connection, and the number of samples it
    rests on. A short slice under load can hold no sample at all: its split is unknown,
    not zero, so it is left empty and the medians pass over it."""
    samples = Counter(client)
    samples.update(growth(server0, server1))
    split = {k: round(user * share, 1) for k, share in sorted(shares({}, samples).items())}
    return {"layer_samples": sum(samples.values()), "user_us_by_layer": split}


class Commands(Control):
    """The ``ctl`` the reused sides get: for a server, ``stopped`` answers the parent's
    CPU queries until it is told to stop."""

    async def stopped(self) -> None:
        """Answer ``("cpu",)`` with this process's CPU seconds (user, kernel), its sleeps
        and its samples by layer until ``("stop",)``."""
        while (await self.next())[0] != "stop":
            self.send("cpu", (*_usage(), _samples()))


async def slice_server(ctl: Control, params: Params) -> Result:
    """The stack's server (``params["kind"]``, ``params["src"]``), until stopped."""
    server, _client = _sides(params["kind"], params["src"])
    _start_delay(params, "server")
    _start_sampler(params)
    result: Result = await server(ctl, params)
    return result


async def slice_client(ctl: Control, params: Params) -> Result:
    """Run one slice per ``("run", seconds)`` until ``("stop",)``; each slice's result
    (the side's own, with this process's CPU seconds over it) goes back at once."""
    _server, client = _sides(params["kind"], params["src"])
    _start_delay(params, "client")
    _start_sampler(params)
    slices = 0
    while True:
        command = await ctl.next()
        if command[0] == "stop":
            return {"slices": slices}
        user0, kernel0, sleeps0 = _usage()
        samples0 = _samples()
        result = await client(ctl, {**params, "seconds": command[1]})
        user1, kernel1, sleeps1 = _usage()
        samples1 = _samples()
        result["samples"] = growth(samples0, samples1)
        # pyserval's client reports the CPU of its loop alone (its host's start and stop
        # are outside it); asyncio TCP's has nothing around its loop. Its sleeps are
        # counted over the whole call (a host's start and stop sleep a handful of times).
        result.setdefault("cpu_user", user1 - user0)
        result.setdefault("cpu_sys", kernel1 - kernel0)
        result["sleeps"] = sleeps1 - sleeps0
        ctl.send("slice", result)
        slices += 1


class _Stack(baselines.LivePair):
    """One stack's two processes and their pipes."""

    def __init__(
        self,
        ctx: Any,
        name: str,
        kind: str,
        src: str | None,
        layers: bool = False,
        delay: Delay | None = None,
    ) -> None:
        self.layers = layers
        self.faults = 0  # slices where the floor's client saw a reply out of place or missing
        # (udp, cycle: the floor's, its raw UDP and the spec's close, as connect_vs_tcp's)
        params: Params = {"kind": kind, "src": src, "layers": layers, "udp": "raw", "cycle": "spec"}
        if delay is not None:
            params["delay"] = delay
        super().__init__(ctx, name, slice_server, slice_client, params, Commands)

    def server_usage(self) -> tuple[float, float, int, dict[str, int]]:
        self.server_pipe.send(("cpu",))
        user, kernel, sleeps, samples = expect(self.server_pipe, "cpu", f"{self.name} server")
        return user, kernel, sleeps, samples

    def slice(self, seconds: float) -> Result:
        """One slice: rate and CPU per connection of both processes, and how much of
        that CPU was the kernel's (system calls, the loopback's delivery, wake-ups)."""
        user0, kernel0, sleeps0, samples0 = self.server_usage()
        self.client_pipe.send(("run", seconds))
        r = expect(self.client_pipe, "slice", f"{self.name} client")
        user1, kernel1, sleeps1, samples1 = self.server_usage()
        n = len(r["durations"])
        # The floor's own checks: every reply in its place, every cycle's close complete.
        if r.get("bad") or r.get("checked") is False or r.get("closed", n) != n:
            self.faults += 1
        user = (user1 - user0 + r["cpu_user"]) / max(n, 1) * 1e6
        kernel = (kernel1 - kernel0 + r["cpu_sys"]) / max(n, 1) * 1e6
        # (the server's count includes its sleep while the parent's query is on its way)
        sleeps = (sleeps1 - sleeps0 + r["sleeps"]) / max(n, 1)
        client_sleeps = r["sleeps"] / max(n, 1)
        out: Result = {
            "stack": self.name,
            "connections": n,
            "per_s": round(n / r["seconds"], 1) if r["seconds"] else 0.0,
            "cpu_us_per_connection": round(user + kernel, 1),
            "kernel_us_per_connection": round(kernel, 1),
            "sleeps_per_connection": round(sleeps, 2),
            "client_sleeps_per_connection": round(client_sleeps, 2),
        }
        if self.layers:
            out.update(_split_by_layer(user, r["samples"], samples0, samples1))
        return out

    def accepted(self) -> int:
        """Stop both processes; how many connections the server accepted."""
        server, _client = self.stop()
        accepted: int = server["accepted"]
        return accepted


def machine() -> Result:
    """What decides the cost of a wake-up here: the CPU count, the idle driver and the
    guest's halt polling (KVM's ``haltpoll``: an idle vCPU polls this long, in ns, before
    it halts; 0, as on this Firecracker VM, halts at once, so every datagram that wakes a
    sleeping process waits for the hypervisor); and the load average (None where a file
    does not exist)."""

    def read(path: str) -> str | None:
        try:
            return Path(path).read_text().strip()
        except OSError:
            return None

    return {
        "cpus": os.cpu_count(),
        "cpuidle_driver": read("/sys/devices/system/cpu/cpuidle/current_driver"),
        "guest_halt_poll_ns": read("/sys/module/haltpoll/parameters/guest_halt_poll_ns"),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def _steal_ticks() -> tuple[int, int] | None:
    """(ticks stolen by the hypervisor, all ticks) of the machine so far (/proc/stat's
    first line), None where there is no such file."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    ticks = [int(f) for f in fields]
    # user nice system idle iowait irq softirq steal (guest time is inside user already)
    return ticks[7], sum(ticks[:8])


def _medians(runs: list[Result], names: list[str], field: str, digits: int) -> Result:
    """Per stack, the median over the pairs of a per-slice ``field``."""
    return {
        n: round(statistics.median(r[f"{field}_{n}"] for r in runs), digits or None) for n in names
    }


def _quartiles(values: list[float]) -> list[float]:
    if len(values) < 2:
        return [round(v, 3) for v in values]
    return [round(q, 3) for q in statistics.quantiles(values, n=4, method="inclusive")]


# (name, kind, src): the stack measured (the ratio's numerator), then its reference.
StackSpec = tuple[str, str, str | None]
DEFAULT_STACKS: tuple[StackSpec, StackSpec] = (KINDS["pyserval"], KINDS["tcp"])
# --delay: (role, kind, us): delay_probe's spin in the first stack's server or client.
Delay = tuple[str, str, float]


def _layer_medians(runs: list[Result], names: list[str]) -> Result:
    """Per stack and layer, the median over the sampled pairs of user CPU us per
    connection (a pair whose slice held no sample has no split to count)."""
    out: Result = {}
    for n in names:
        per = [p for r in runs if (p := r.get(f"user_us_by_layer_{n}"))]
        layers = sorted({k for p in per for k in p})
        out[n] = {k: round(statistics.median(p.get(k, 0.0) for p in per), 1) for k in layers}
    return out


def run(
    slices: int,
    seconds: float,
    warmup: float,
    stacks: tuple[StackSpec, ...] = DEFAULT_STACKS,
    layers: bool = False,
    delay: Delay | None = None,
) -> Result:
    """``slices`` rounds of one slice of ``seconds`` per stack, after one ``warmup`` slice
    per stack; the ratio is the first stack's over the last's (with three stacks, each
    pair's is reported too). ``layers``: each process samples its user CPU by layer
    (layer_sampler.py), and each slice says how it splits. ``delay``: (role, kind, us):
    the first stack's server or client spins ``us`` microseconds on each read that brings
    a datagram of ``kind`` (delay_probe.py), to see whether that step holds up the rate."""
    if delay is not None and stacks[0][1] != "pyserval":
        raise ValueError("a delay is for a pyserval stack, given first")
    ctx = multiprocessing.get_context("spawn")
    before = machine()  # (the load average before this run adds its own)
    steal0 = _steal_ticks()
    started: list[_Stack] = []
    try:
        for i, (name, kind, src) in enumerate(stacks):
            started.append(_Stack(ctx, name, kind, src, layers, delay if i == 0 else None))
        mine, peer = started[0], started[-1]
        if warmup > 0:
            for stack in started:
                stack.slice(warmup)
        runs: list[Result] = []
        ratios: list[float] = []
        cpu_ratios: list[float] = []
        for i in range(slices):
            # The order turns by one each round (two stacks: ABBA), so each stack takes
            # each place in a round equally often.
            turn = i % len(started)
            order = started[turn:] + started[:turn]
            got = {s.name: s.slice(seconds) for s in order}
            ours, theirs = got[mine.name], got[peer.name]
            ratio = ours["per_s"] / theirs["per_s"] if theirs["per_s"] else 0.0
            by_cpu = theirs["cpu_us_per_connection"] / ours["cpu_us_per_connection"]
            ratios.append(ratio)
            cpu_ratios.append(by_cpu)
            pair: Result = {"pair": i, "first": order[0].name}
            for name, r in got.items():
                pair.update({f"{k}_{name}": v for k, v in r.items() if k != "stack"})
            pair.update(
                {
                    f"ratio_{a.name}/{b.name}": round(
                        got[a.name]["per_s"] / got[b.name]["per_s"], 3
                    )
                    for a, b in itertools.combinations(started, 2)
                    if got[b.name]["per_s"]
                }
            )
            runs.append({**pair, "ratio": round(ratio, 3), "cpu_ratio": round(by_cpu, 3)})
        names = [s.name for s in started]
        connections = {n: sum(r[f"connections_{n}"] for r in runs) for n in names}
        accepted = {s.name: s.accepted() for s in started}
    finally:
        for s in started:
            s.kill()
    steal1 = _steal_ticks()
    if steal0 is not None and steal1 is not None and steal1[1] > steal0[1]:
        # How much of the run's CPU time the hypervisor gave to others: a noisy host.
        before["steal_share"] = round((steal1[0] - steal0[0]) / (steal1[1] - steal0[1]), 4)
    # A warm-up slice's connections count at the server too: accepted >= completed.
    ok = all(accepted[n] >= connections[n] > 0 for n in names) and not any(
        s.faults for s in started
    )
    # Issue 14's goal is for this pair as users run it: not with a delay put in, and not
    # on the busy-poll loop, which trades CPU for the wake-ups (README, ninth session).
    loop = os.environ.get(baselines.LOOP_ENV, "asyncio")
    the_row = (
        mine.name == PYSERVAL
        and peer.name == TCP
        and delay is None
        and loop in ("asyncio", "uvloop")
    )
    return {
        "figure": f"connections/s, {mine.name} over {peer.name}, in pairs of slices",
        "stacks": [{"name": n, "kind": k, "src": src} for n, k, src in stacks],
        "delay": None
        if delay is None
        else {"stack": mine.name, "role": delay[0], "kind": delay[1], "us": delay[2]},
        "machine": before,
        "loop": loop,
        "slices": slices,
        "seconds": seconds,
        "runs": runs,
        "ratio_median": round(statistics.median(ratios), 3),
        "ratios_median": {
            f"{a}/{b}": round(statistics.median(r[f"ratio_{a}/{b}"] for r in runs), 3)
            for a, b in itertools.combinations(names, 2)
        },
        "ratio_quartiles": _quartiles(ratios),
        "pairs_at_goal": sum(r >= GOAL for r in ratios) if the_row else None,
        "cpu_ratio_median": round(statistics.median(cpu_ratios), 3),
        "cpu_ratio_quartiles": _quartiles(cpu_ratios),
        "per_s_median": _medians(runs, names, "per_s", 0),
        "cpu_us_median": _medians(runs, names, "cpu_us_per_connection", 1),
        "kernel_us_median": _medians(runs, names, "kernel_us_per_connection", 1),
        "sleeps_median": _medians(runs, names, "sleeps_per_connection", 2),
        "client_sleeps_median": _medians(runs, names, "client_sleeps_per_connection", 2),
        **({"user_us_by_layer_median": _layer_medians(runs, names)} if layers else {}),
        "connections": connections,
        "accepted": accepted,
        "goal": f"pyserval >= {GOAL} of asyncio TCP (issue 14)" if the_row else None,
        "ok": ok,
    }


def _tree_src(path: str) -> str:
    """The ``src/`` of a checkout given as itself or as its ``src/``."""
    p = Path(path).expanduser().resolve()
    for src in (p, p / "src"):
        if (src / "pyserval" / "__init__.py").is_file():
            return str(src)
    raise SystemExit(f"no pyserval package under {path} (give a checkout or its src/)")


def main(argv: list[str] | None = None) -> int:
    """Run the slices and print the JSON summary."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=20, help="pairs of slices")
    ap.add_argument("--seconds", type=float, default=0.5, help="length of one slice")
    ap.add_argument("--warmup", type=float, default=0.5, help="one slice per stack, not counted")
    ap.add_argument(
        "--tree",
        action="append",
        metavar="NAME=PATH",
        help="twice: pyserval from two trees (the ratio: the second over the first)",
    )
    ap.add_argument(
        "--stacks",
        default="pyserval,tcp",
        help="two or three of pyserval, tcp and floor (connect_floor.py: the cycle's "
        "datagrams with no protocol behind them), in rounds; the ratio: the first's rate "
        "over the last's, and each pair's",
    )
    ap.add_argument(
        "--layers",
        action="store_true",
        help="sample each process's user CPU by layer (core, runtime, asyncio, ...)",
    )
    ap.add_argument(
        "--delay",
        metavar="ROLE:KIND:US",
        help="the first stack's server or client spins US microseconds on each read that "
        f"brings a datagram of KIND ({', '.join(delay_probe.KINDS)}): does that step hold "
        "up the rate? (with --tree: the second tree's)",
    )
    ap.add_argument(
        "--loop",
        type=baselines.loop_name,
        default=None,
        help="the event loop of every process, both stacks: asyncio, uvloop, or "
        "busypoll[:US] (asyncio's with pyserval.BusyPollSelector, polling US "
        "microseconds, 100 by default, before it sleeps); default: PYSERVAL_BENCH_LOOP's",
    )
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args(argv)
    if args.loop is not None:
        baselines.use_loop(args.loop)
    kinds = args.stacks.split(",")
    if not 2 <= len(kinds) <= 3 or len(set(kinds)) != len(kinds) or not set(kinds) <= set(KINDS):
        ap.error(f"--stacks wants two or three of {', '.join(KINDS)}, given {args.stacks!r}")
    stacks: tuple[StackSpec, ...] = tuple(KINDS[k] for k in kinds)
    if args.tree:
        if len(args.tree) != 2 or not all("=" in t for t in args.tree):
            ap.error("--tree wants NAME=PATH, given twice")
        (a, pa), (b, pb) = (t.split("=", 1) for t in args.tree)
        if a == b:
            ap.error(f"tree name {a!r} given twice")
        stacks = ((b, "pyserval", _tree_src(pb)), (a, "pyserval", _tree_src(pa)))
    delay: Delay | None = None
    if args.delay:
        role, _, rest = args.delay.partition(":")
        kind, _, us = rest.partition(":")
        try:
            delay = (role, kind, float(us))
        except ValueError:
            delay = None
        if (
            delay is None
            or role not in ("server", "client")
            or kind not in delay_probe.KINDS
            or not delay[2] > 0
        ):
            ap.error(f"--delay wants server|client:KIND:US, given {args.delay!r}")
        if stacks[0][1] != "pyserval":
            ap.error("--delay is for a pyserval stack, given first")
    result = run(args.slices, args.seconds, args.warmup, stacks, args.layers, delay)
    emit(result, args.out)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""Flow migration: the gap in delivered data around a move, and throughput over time.

    python benchmarks/migration_bench.py [--scenarios NAME,...] [--out FILE] [--png PATH]
        [--seed N] [--loopback-seconds 3]

One bulk stream runs while its client moves it between two interfaces; the receiving
application's in-order bytes are recorded over time. Scenarios (``--scenarios``, default
all; see :data:`SCENARIOS`):

* ``sim_move``: the simulated network (:class:`pyserval.testing.SimNetwork`, virtual clock,
  deterministic). The client has two interfaces on two paths to the server: path 1, 20 ms
  RTT and 40 Mbit/s; path 2, 60 ms RTT and 20 Mbit/s (each a FIFO bottleneck holding one
  bandwidth-delay product). The flow starts on path 1, moves to path 2 at 2 s and back at
  5 s, and ends at 8 s. Both interfaces stay up (what was in flight on the old path still
  arrives).
* ``sim_move_loss1``: the same with 1% random loss in both directions on both paths.
* ``sim_handoff``: the paper's case: the old interface goes down the moment the move
  starts (the old path is cut both ways, packets in flight on it are lost; it comes back
  up just before the move back, when the other one goes down).
* ``loopback``: real UDP sockets, client and server in two processes: the client host has
  127.0.0.2 and 127.0.0.3, the server 127.0.0.1; ``--loopback-seconds`` of bulk data,
  ``await stream.migrate(...)`` to 127.0.0.3 after a third of it, and back after two thirds.

A multipath scenario is one more :class:`Scenario` in :data:`SCENARIOS`: a function
``(args) -> result dict`` with ``seconds``, ``series`` (Mbit/s per 10 ms bin), ``intact``
and ``migrations`` (each with ``at_s``, ``to`` and the gap fields); the analysis
(:class:`Delivery`, :func:`migration_figures`) and the plot take it as it is, one panel
per scenario.

Figures, for each migration (all times from the ``migrate`` call):

* ``gap_ms``: the longest interval with no new in-order data delivered to the receiving
  application, among the intervals that end after the call and start less than 1 s after
  it (or before the next migration); ``gap_from_s``/``gap_to_s`` place it;
  ``reference_gap_ms`` is the longest spacing of deliveries in the second before the call
  (what is ordinary at that rate), for comparison;
* ``switch_gap_ms``: the same, but only up to the delivery that ends the move's own break:
  simulated, the first in-order delivery once data sent from the new interface reached the
  server (``first_new_path_data_ms``); loopback, the first delivery after the server's
  ``FlowMigrated``. ``gap_ms`` also catches later stalls, such as loss recovery on the new
  path;
* ``client_migrated_ms`` / ``server_migrated_ms``: to the ``FlowMigrated`` event on each
  side (loopback: also ``migrate_returned_ms``, when ``await stream.migrate`` returned);
* ``recovery_ms``: from the call to the first moment after the break at which the goodput
  over the trailing 100 ms reaches 90% of the new path's rate: simulated, its ceiling
  (``ceiling_mbps``: bottleneck rate times the payload share of a full datagram; None if
  never reached before the next move); loopback, the goodput of the 0.5 s before the call.
  ``recovery_steady_ms``: the same against ``steady_mbps``, the mean goodput over the
  second half of the time spent on the new path. ``rate_before_mbps``/``rate_after_mbps``:
  mean goodput over the 200 ms before and after the call;
* simulated runs also count, over the second after the call, the data segments the client
  sent again (``resent_segments``), the deliveries of segments the server already had
  (``spurious_deliveries``), the drops on the links by reason, the RSYN and RSYN+ACK
  packets sent, and the client's congestion window just before the call and just after
  its commit.

All times are virtual in the simulation (exact: the application acts at the instant of
each packet) and ``CLOCK_MONOTONIC`` on loopback (shared by the two processes).

Throughput is binned every 10 ms (Mbit/s of application bytes, 10**6 bits). The summary
is printed as JSON; ``--out FILE`` writes it with the 10 ms series added. The picture
(``--png``, default ``benchmarks/results/migration.png``) needs matplotlib, a
benchmark-only dependency (``pip install matplotlib``); without it the plot is skipped and
the JSON says so.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import itertools
import json
import random
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyserval.sal.inet import Address

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import anyio

from baselines import Control, Params, Result, run_pair
from pyserval.core.host import HostCore
from pyserval.runtime.host import Host
from pyserval.sal import ControlFlags, Rule, decode_packet
from pyserval.testing import LinkConfig, SimNetwork
from pyserval.transport.config import StreamConfig
from pyserval.transport.connection import Connection, State
from pyserval.transport.events import Event, FlowMigrated

BIN = 0.010  # seconds per throughput bin
RATE_WINDOW = 0.100  # trailing window of the recovery criterion
RECOVERED = 0.9  # fraction of the steady rate that counts as recovered
AFTER = 1.0  # seconds after a migration that its figures look at
MASK32 = 0xFFFFFFFF
RESULTS = Path(__file__).resolve().parent / "results"

# -- delivery traces and their figures -------------------------------------------------------


@dataclass
class Delivery:
    """In-order bytes handed to the receiving application: when, and how many in total."""

    times: list[float] = field(default_factory=list)
    cumulative: list[int] = field(default_factory=list)

    def add(self, t: float, n: int) -> None:
        """``n`` more bytes at time ``t`` (times never go back)."""
        self.times.append(t)
        self.cumulative.append((self.cumulative[-1] if self.cumulative else 0) + n)

    @property
    def total(self) -> int:
        return self.cumulative[-1] if self.cumulative else 0

    def bytes_by(self, t: float) -> int:
        """Bytes delivered up to and including time ``t``."""
        i = bisect.bisect_right(self.times, t)
        return self.cumulative[i - 1] if i else 0

    def mbps(self, t0: float, t1: float) -> float:
        """Mean goodput over [t0, t1] in Mbit/s."""
        if t1 <= t0:
            return 0.0
        return (self.bytes_by(t1) - self.bytes_by(t0)) * 8 / (t1 - t0) / 1e6

    def series(self, end: float, width: float = BIN) -> list[float]:
        """Mbit/s in consecutive bins of ``width`` seconds from 0 to ``end``."""
        out = []
        for k in range(round(end / width)):
            lo, hi = k * width, (k + 1) * width
            out.append(round((self.bytes_by(hi) - self.bytes_by(lo)) * 8 / width / 1e6, 3))
        return out

    def longest_gap(self, lo: float, hi: float) -> tuple[float, float]:
        """The longest interval between consecutive deliveries that ends after ``lo`` and
        starts before ``hi`` (an interval still open at ``hi`` counts up to ``hi``)."""
        times = self.times
        i = max(bisect.bisect_right(times, lo) - 1, 0)
        best = (lo, lo)
        prev = times[i] if times else lo
        for t in times[i + 1 :]:
            if prev >= hi:
                break
            if t - prev > best[1] - best[0]:
                best = (prev, t)
            prev = t
        if prev < hi and hi - prev > best[1] - best[0]:
            best = (prev, hi)
        return best

    def reference_gap(self, lo: float, hi: float) -> float:
        """The longest spacing of deliveries that lies wholly within [lo, hi]."""
        times = self.times[bisect.bisect_left(self.times, lo) : bisect.bisect_right(self.times, hi)]
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)

    def recovery(self, start: float, target_mbps: float, limit: float) -> float | None:
        """The first time from ``start`` (in 1 ms steps, up to ``limit``) at which the
        goodput over the trailing :data:`RATE_WINDOW` reaches ``target_mbps``."""
        t = start
        while t <= limit:
            if self.mbps(t - RATE_WINDOW, t) >= target_mbps:
                return t
            t += 0.001
        return None


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def migration_figures(
    got: Delivery,
    at: float,
    segment_end: float,
    switched: float | None,
    targets: dict[str, float],
) -> dict[str, Any]:
    """The figures of a migration called at ``at`` (the flow stays on the new path until
    ``segment_end``; ``switched``: the first in-order delivery that ends the move's own
    break, if known). ``targets`` maps a result key to a goodput (Mbit/s): the time from
    the call to reaching 90% of it (trailing 100 ms, from the end of the break on)."""
    g0, g1 = got.longest_gap(at, min(at + AFTER, segment_end))
    mid = at + (segment_end - at) / 2
    steady = got.mbps(mid, segment_end)
    out: dict[str, Any] = {
        "gap_ms": ms(g1 - g0),
        "gap_from_s": round(g0, 4),
        "gap_to_s": round(g1, 4),
        "reference_gap_ms": ms(got.reference_gap(max(at - 1.0, 0.0), at)),
    }
    start = at
    if switched is not None:
        s0, s1 = got.longest_gap(at, switched)
        out["switch_gap_ms"] = ms(s1 - s0)
        start = s1
    out["rate_before_mbps"] = round(got.mbps(at - 0.2, at), 2)
    out["rate_after_mbps"] = round(got.mbps(at, at + 0.2), 2)
    out["steady_mbps"] = round(steady, 2)
    for key, rate in {**targets, "recovery_steady_ms": steady}.items():
        rec = got.recovery(start, RECOVERED * rate, segment_end)
        out[key] = ms(None if rec is None else rec - at)
    return out


# -- the simulated network ------------------------------------------------------------------


@dataclass(frozen=True)
class PathSpec:
    """One client interface's path to the server (symmetric)."""

    name: str
    rtt: float  # seconds
    mbit: float  # bottleneck, Mbit/s
    loss: float = 0.0

    def link(self) -> LinkConfig:
        rate = self.mbit * 1e6 / 8
        return LinkConfig(
            delay=self.rtt / 2, loss=self.loss, bandwidth=rate, queue_limit=int(rate * self.rtt)
        )

    def describe(self) -> dict[str, Any]:
        return {
            "rtt_ms": self.rtt * 1000,
            "mbit_s": self.mbit,
            "loss": self.loss,
            "queue_bytes": int(self.mbit * 1e6 / 8 * self.rtt),
        }


CLIENT_1: Address = ("10.0.1.1", 40000)
CLIENT_2: Address = ("10.0.2.1", 40000)
SERVER: Address = ("10.0.0.2", 54325)
SIM_CONFIG = StreamConfig(send_buffer=4 << 20, receive_buffer=4 << 20)
SIM_MOVES = ((2.0, 2), (5.0, 1))  # (seconds after the start, interface to move to)
SIM_END = 8.0
PATTERN = random.Random(6).randbytes((1 << 20) + 7)  # odd length: never segment-aligned
PATTERN2 = memoryview(PATTERN + PATTERN)


class App:
    """A sans-I/O node around a :class:`HostCore` that acts as its application at the
    exact virtual time of every packet and timer: it takes the core's events and runs a
    hook (read what arrived, or top the send buffer up)."""

    def __init__(self, core: HostCore) -> None:
        self.core = core
        self.hook: Callable[[float], None] | None = None
        self.migrated: list[tuple[float, FlowMigrated]] = []

    def receive_datagram(self, data: bytes, src: Address, dst: Address, now: float) -> None:
        self.core.receive_datagram(data, src, dst, now)
        self._after(now)

    def handle_timer(self, now: float) -> None:
        self.core.handle_timer(now)
        self._after(now)

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Address, Address]]:
        return self.core.datagrams_to_send(now)

    def next_deadline(self) -> float | None:
        return self.core.next_deadline()

    def _after(self, now: float) -> None:
        for event in self.core.events():
            if isinstance(event, FlowMigrated):
                self.migrated.append((now, event))
        if self.hook is not None:
            self.hook(now)


class Sender:
    """Keeps the connection's send buffer full of the repeating pattern."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.sent = 0

    def __call__(self, now: float) -> None:
        period = len(PATTERN)
        while True:
            o = self.sent % period
            n = self.conn.write(PATTERN2[o : o + period])
            self.sent += n
            if n < period:
                return


class Receiver:
    """Reads everything at once and checks it against the pattern (in order, once)."""

    def __init__(self, conn: Connection, t0: float) -> None:
        self.conn = conn
        self.t0 = t0
        self.got = Delivery()
        self.intact = True

    def __call__(self, now: float) -> None:
        data = self.conn.read()
        if not data:
            return
        period = len(PATTERN)
        done, view = self.got.total, memoryview(data)
        while view:
            o = done % period
            piece = view[: period - o]
            if piece != PATTERN2[o : o + len(piece)]:
                self.intact = False
            done += len(piece)
            view = view[len(piece) :]
        self.got.add(now - self.t0, len(data))


@dataclass
class Wire:
    """What the client sent and the server got, from the network's tap (times from t0)."""

    t0: float
    iss: int
    client_ips: frozenset[str]
    high: int = 0  # highest data offset sent + 1
    full_size: int = SIM_CONFIG.mss  # datagram bytes of a full-sized data segment
    resent: list[float] = field(default_factory=list)
    delivered: set[int] = field(default_factory=set)
    duplicates: list[float] = field(default_factory=list)
    drops: list[tuple[float, str]] = field(default_factory=list)
    control: list[tuple[float, str]] = field(default_factory=list)
    arrivals: dict[str, list[float]] = field(default_factory=dict)  # data, by client IP

    def __call__(self, t: float, data: bytes, src: Address, dst: Address, fate: str) -> None:
        t -= self.t0
        if fate not in ("sent", "delivered", "duplicated"):
            self.drops.append((t, fate))
            return
        if fate == "duplicated":
            return
        pkt = decode_packet(data, verify=False)
        ctl = pkt.control
        if fate == "sent" and ctl is not None and ctl.flags & ControlFlags.RSYN:
            self.control.append((t, "rsynack" if ctl.flags & ControlFlags.ACK else "rsyn"))
        tcp = pkt.tcp
        if tcp is None or not pkt.payload or src[0] not in self.client_ips:
            return
        if len(pkt.payload) == SIM_CONFIG.mss:
            self.full_size = len(data)
        offset = (tcp.seq - self.iss - 1) & MASK32
        if fate == "sent":
            if offset < self.high:
                self.resent.append(t)
            else:
                self.high = offset + len(pkt.payload)
        else:
            self.arrivals.setdefault(src[0], []).append(t)
            if offset in self.delivered:
                self.duplicates.append(t)
            else:
                self.delivered.add(offset)


def _count(times: list[float], lo: float, hi: float) -> int:
    return bisect.bisect_left(times, hi) - bisect.bisect_left(times, lo)


def run_sim(args: argparse.Namespace, *, loss: float = 0.0, handoff: bool = False) -> Result:
    """The simulated scenario (see the module docstring)."""
    paths = {
        1: PathSpec("path 1", 0.020, 40.0, loss),
        2: PathSpec("path 2", 0.060, 20.0, loss),
    }
    local = {1: CLIENT_1, 2: CLIENT_2}
    net = SimNetwork(seed=args.seed)
    for i, spec in paths.items():
        net.set_path(local[i][0], SERVER[0], spec.link())
    client = App(HostCore([CLIENT_1, CLIENT_2], rng=random.Random(args.seed), config=SIM_CONFIG))
    server = App(HostCore([SERVER], rng=random.Random(args.seed + 1), config=SIM_CONFIG))
    net.attach(client, CLIENT_1, CLIENT_2, name="client")
    net.attach(server, SERVER, name="server")
    client.core.service_table.add("bulk", Rule.forward(SERVER))
    listener = server.core.listen("bulk")
    conn = client.core.connect("bulk", net.now)
    net.kick(client)
    accepted: list[Connection] = []

    def ready() -> bool:
        c = listener.accept()
        if c is not None:
            accepted.append(c)
        return bool(accepted) and conn.state is State.ESTABLISHED

    if not net.run_until(ready, 30.0):
        raise RuntimeError("the simulated handshake did not complete")
    t0 = net.now
    receiver = Receiver(accepted[0], t0)
    server.hook = receiver
    sender = Sender(conn)
    client.hook = sender
    sf = conn.primary
    wire = Wire(t0, sf.iss, frozenset({CLIENT_1[0], CLIENT_2[0]}))
    net.tap = wire
    cwnd: list[tuple[float, int]] = []

    commits: list[int] = []  # the client's window right after each of its commits

    def sample_cwnd(now: float) -> None:
        sender(now)
        if len(commits) < len(client.migrated):
            commits.append(conn.primary.cc.cwnd)
        if not cwnd or now - t0 - cwnd[-1][0] >= 0.001:
            cwnd.append((now - t0, conn.primary.cc.cwnd))

    client.hook = sample_cwnd
    sender(net.now)
    net.kick(client)

    moves: list[dict[str, Any]] = []
    on = 1
    for at, to in SIM_MOVES:
        net.run(t0 + at)
        before = conn.primary.cc.cwnd
        if handoff:
            net.restore(local[to][0], SERVER[0])
        if not client.core.migrate(conn, local[to], net.now):
            raise RuntimeError("the migration could not start")
        net.kick(client)
        if handoff:
            net.cut(local[on][0], SERVER[0])
        moves.append(
            {
                "at_s": at,
                "from": paths[on].name,
                "to": paths[to].name,
                "cwnd_before_kB": round(before / 1000, 1),
            }
        )
        on = to
    net.run(t0 + SIM_END)

    got = receiver.got
    ends = [m["at_s"] for m in moves[1:]] + [SIM_END]
    for m, end in zip(moves, ends, strict=True):
        at = m["at_s"]
        mine = [(t - t0, e) for t, e in client.migrated if t - t0 >= at]
        theirs = [(t - t0, e) for t, e in server.migrated if t - t0 >= at]
        c_at = mine[0][0] if mine and mine[0][0] < end else None
        s_at = theirs[0][0] if theirs and theirs[0][0] < end else None
        m["client_migrated_ms"] = ms(None if c_at is None else c_at - at)
        m["server_migrated_ms"] = ms(None if s_at is None else s_at - at)
        # The break of the move itself lasts until the first in-order delivery once data
        # sent from the new interface reaches the server.
        new = paths[2] if m["to"] == paths[2].name else paths[1]
        arrivals = wire.arrivals.get(local[2 if new is paths[2] else 1][0], [])
        first_new = next((t for t in arrivals if t >= at), None)
        i = len(got.times) if first_new is None else bisect.bisect_left(got.times, first_new)
        switched = got.times[i] if i < len(got.times) else None
        ceiling = new.mbit * SIM_CONFIG.mss / wire.full_size
        m["ceiling_mbps"] = round(ceiling, 2)
        m["first_new_path_data_ms"] = ms(None if first_new is None else first_new - at)
        m.update(migration_figures(got, at, end, switched, {"recovery_ms": ceiling}))
        hi = min(at + AFTER, end)
        m["resent_segments"] = _count(wire.resent, at, hi)
        m["spurious_deliveries"] = _count(wire.duplicates, at, hi)
        m["drops"] = dict(Counter(f for t, f in wire.drops if at <= t < hi))
        m["rsyn_sent"] = sum(1 for t, kind in wire.control if at <= t < hi and kind == "rsyn")
        m["rsynack_sent"] = sum(1 for t, kind in wire.control if at <= t < hi and kind == "rsynack")
        if c_at is not None:
            m["cwnd_after_commit_kB"] = round(commits[len(mine) - len(client.migrated)] / 1000, 1)
    sf = conn.primary
    return {
        "kind": "simulated",
        "paths": {spec.name: spec.describe() for spec in paths.values()},
        "handoff": handoff,
        "mss": SIM_CONFIG.mss,
        "seconds": SIM_END,
        "bytes": got.total,
        "goodput_mbps": round(got.mbps(0.0, SIM_END), 2),
        "intact": receiver.intact and conn.state is State.ESTABLISHED,
        "final_path": f"{sf.local_addr[0]} -> {sf.remote_addr[0] if sf.remote_addr else '?'}",
        "migrations": moves,
        "client_counters": {**dict(client.core.drops), **dict(client.core.stats)},
        "server_counters": {**dict(server.core.drops), **dict(server.core.stats)},
        "series": got.series(SIM_END),
        "capacity_mbps": _capacity(paths, [(m["at_s"], m["to"]) for m in moves]),
    }


def _capacity(paths: dict[int, PathSpec], moves: list[tuple[float, str]]) -> list[list[Any]]:
    """The bottleneck rate of the path in use, as [from_s, Mbit/s] steps (for the plot)."""
    by_name = {p.name: p.mbit for p in paths.values()}
    return [[0.0, paths[1].mbit]] + [[at, by_name[name]] for at, name in moves]


# -- real loopback sockets --------------------------------------------------------------------

LOOP_CONFIG = StreamConfig(mss=8192, send_buffer=4 << 20, receive_buffer=4 << 20)


def _clock() -> float:
    """A clock both processes share (CLOCK_MONOTONIC is system-wide)."""
    return time.clock_gettime(time.CLOCK_MONOTONIC)


async def loop_receiver(ctl: Control, params: Params) -> Result:
    """Server on 127.0.0.1: read one stream to its end, timing every read."""
    events: list[tuple[float, str]] = []
    reads: list[tuple[float, int]] = []

    def hook(event: Event) -> None:
        if isinstance(event, FlowMigrated):
            events.append((_clock(), f"{event.reason} {event.remote[0]}"))

    async with Host(["127.0.0.1:0"], stream_config=LOOP_CONFIG) as host:
        host.add_event_hook(hook)
        listener = await host.listen("bulk")
        ctl.announce(host.addresses[0])
        stream = await listener.accept()
        with contextlib.suppress(anyio.EndOfStream):
            while True:
                data = await stream.receive(1 << 20)
                reads.append((_clock(), len(data)))
    await ctl.stopped()
    return {"reads": reads, "events": events}


async def loop_sender(ctl: Control, params: Params) -> Result:
    """Client on 127.0.0.2 (+127.0.0.3): send for ``seconds``, moving at 1/3 and 2/3."""
    seconds = params["seconds"]
    events: list[tuple[float, str]] = []

    def hook(event: Event) -> None:
        if isinstance(event, FlowMigrated):
            events.append((_clock(), f"{event.reason} {event.local[0]}"))

    async with Host(["127.0.0.2:0"], stream_config=LOOP_CONFIG) as host:
        host.add_event_hook(hook)
        first = host.addresses[0]
        second = host.add_interface("127.0.0.3:0")
        host.add_route("bulk", "{}:{}".format(*params["address"]))
        stream = await host.connect("bulk")
        start = _clock()
        moves: list[dict[str, Any]] = []

        async def mover() -> None:
            for k, (frac, to) in enumerate(((1 / 3, second), (2 / 3, first))):
                await asyncio.sleep(max(start + frac * seconds - _clock(), 0.0))
                called = _clock()
                await stream.migrate(f"{to[0]}:{to[1]}")
                moves.append(
                    {
                        "called": called,
                        "returned": _clock(),
                        "to": to[0],
                        "from": (first if k == 0 else second)[0],
                    }
                )

        moving = asyncio.ensure_future(mover())
        chunk = bytes(1 << 20)
        sent = 0
        while _clock() < start + seconds:
            await stream.send(chunk)
            sent += len(chunk)
        await moving
        await stream.send_eof()
        conn = stream.connection
        sf = conn.primary
        await host.wait(conn, lambda: sf.snd_una >= sf.snd_max or conn.closed)
        paths = stream.paths
    return {
        "start": start,
        "bytes": sent,
        "moves": moves,
        "events": events,
        "final_local": paths[0][0][0],
    }


def run_loopback(args: argparse.Namespace) -> Result:
    """The loopback scenario (see the module docstring)."""
    seconds = args.loopback_seconds
    received, sent = run_pair(loop_receiver, loop_sender, {"seconds": seconds, "grace": 0.1})
    start = sent["start"]
    got = Delivery()
    for t, n in received["reads"]:
        got.add(t - start, n)
    end = got.times[-1] if got.times else seconds
    moves = []
    calls = [m["called"] - start for m in sent["moves"]]
    ends = [*calls[1:], seconds]
    for m, at, seg_end in zip(sent["moves"], calls, ends, strict=True):
        c_at = next((t - start for t, _ in sent["events"] if t - start >= at), None)
        s_at = next((t - start for t, _ in received["events"] if t - start >= at), None)
        row: dict[str, Any] = {
            "at_s": round(at, 4),
            "from": m["from"],
            "to": m["to"],
            "migrate_returned_ms": ms(m["returned"] - m["called"]),
            "client_migrated_ms": ms(None if c_at is None else c_at - at),
            "server_migrated_ms": ms(None if s_at is None else s_at - at),
        }
        i = len(got.times) if s_at is None else bisect.bisect_right(got.times, s_at)
        switched = got.times[i] if i < len(got.times) else None
        before = got.mbps(at - 0.5, at)
        row.update(migration_figures(got, at, seg_end, switched, {"recovery_ms": before}))
        moves.append(row)
    return {
        "kind": "loopback",
        "mss": LOOP_CONFIG.mss,
        "seconds": seconds,
        "bytes": got.total,
        "intact": got.total == sent["bytes"],
        "goodput_mbps": round(got.mbps(0.0, seconds), 1),
        "final_path": sent["final_local"],
        "migrations": moves,
        "cpu_s": {"receiver": received["cpu_s"], "sender": sent["cpu_s"]},
        "series": got.series(max(end, seconds)),
    }


# -- scenarios and the picture ----------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    """One measurement: ``run(args)`` returns its result dict (``seconds``, ``series``,
    ``intact``, ``migrations``; optionally ``capacity_mbps`` steps); ``title`` heads its
    panel of the plot."""

    run: Callable[[argparse.Namespace], Result]
    title: str


SCENARIOS: dict[str, Scenario] = {
    "sim_move": Scenario(run_sim, "Simulated, no loss: move between interfaces, both stay up"),
    "sim_handoff": Scenario(
        lambda a: run_sim(a, handoff=True),
        "Simulated, no loss: hand-off, the old interface goes down at the move "
        "(its packets in flight are lost)",
    ),
    "sim_move_loss1": Scenario(
        lambda a: run_sim(a, loss=0.01),
        "Simulated, 1% loss each way: move between interfaces, both stay up",
    ),
    "loopback": Scenario(
        run_loopback,
        "Real UDP sockets on loopback, two processes: move 127.0.0.2 -> 127.0.0.3 -> back",
    ),
}
"""Every scenario, in run and plot order."""


def _smooth(values: list[float], n: int) -> list[float]:
    """A centred moving average over ``n`` bins."""
    out = []
    half = n // 2
    for i in range(len(values)):
        win = values[max(i - half, 0) : i + half + 1]
        out.append(sum(win) / len(win))
    return out


def plot(results: dict[str, Result], path: Path) -> dict[str, Any]:
    """Throughput over time, one panel per scenario, markers at the migrations."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {"skipped": "matplotlib is not installed (pip install matplotlib)"}
    n = len(results)
    fig, axes = plt.subplots(n, 1, figsize=(12, 2.9 * n + 0.6), squeeze=False)
    for ax, (name, res) in zip(axes[:, 0], results.items(), strict=True):
        series = res["series"]
        xs = [(i + 0.5) * BIN for i in range(len(series))]
        smooth = _smooth(series, round(0.1 / BIN))
        ax.plot(
            xs, series, color="tab:blue", lw=0.6, alpha=0.3, label="10 ms bins (bursts cut off)"
        )
        ax.plot(xs, smooth, color="tab:blue", lw=1.8, label="100 ms moving average")
        top = 1.35 * max(smooth, default=1.0)
        if "capacity_mbps" in res:
            steps = res["capacity_mbps"]
            sx = [st[0] for st in steps] + [res["seconds"]]
            sy = [st[1] for st in steps] + [steps[-1][1]]
            ax.step(
                sx,
                sy,
                where="post",
                color="black",
                ls=":",
                lw=1.4,
                label="bottleneck of the path in use",
            )
            top = 1.6 * max(sy)  # a path's rate is the scale: bursts are cut off
        for k, m in enumerate(res["migrations"]):
            ax.axvline(
                m["at_s"],
                color="tab:red",
                ls="--",
                lw=1.2,
                label="migrate() called" if k == 0 else None,
            )
            ax.axvspan(
                m["gap_from_s"],
                m["gap_to_s"],
                color="tab:orange",
                alpha=0.3,
                lw=0,
                label="longest delivery gap after the call" if k == 0 else None,
            )
            note = f"to {m['to']}\ngap {m['gap_ms']:.0f} ms"
            if m.get("switch_gap_ms") is not None:
                note += f" (switch {m['switch_gap_ms']:.0f} ms)"
            ax.annotate(
                note,
                (m["at_s"], 1.0),
                xycoords=("data", "axes fraction"),
                xytext=(4, -4),
                textcoords="offset points",
                va="top",
                fontsize=8.5,
            )
        ax.set_title(SCENARIOS[name].title, fontsize=10.5)
        ax.set_ylabel("throughput (Mbit/s)")
        ax.set_xlim(0, res["seconds"])
        # A bin in which a burst of held-back data was handed over at once (a hole filled)
        # can be far above the link rate: such bins are cut off.
        ax.set_ylim(0, top)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8.5)
    axes[-1, 0].set_xlabel("time since the transfer started (s)")
    fig.suptitle(
        "pyserval: goodput of one bulk flow migrating between interfaces "
        "(application bytes at the receiver)",
        fontsize=12,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return {"png": str(path)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated, from: {', '.join(SCENARIOS)}",
    )
    parser.add_argument("--seed", type=int, default=1, help="simulation seed")
    parser.add_argument("--loopback-seconds", type=float, default=3.0)
    parser.add_argument("--out", type=Path, help="also write the JSON (with series) here")
    parser.add_argument("--png", type=Path, default=RESULTS / "migration.png")
    args = parser.parse_args(argv)
    names = [n for n in args.scenarios.split(",") if n]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(unknown)}")
    results: dict[str, Result] = {}
    for name in names:
        began = time.perf_counter()
        results[name] = SCENARIOS[name].run(args)
        results[name]["wall_s"] = round(time.perf_counter() - began, 1)
    doc: dict[str, Any] = {
        "benchmark": "migration",
        "bin_s": BIN,
        "seed": args.seed,
        "scenarios": results,
        "plot": plot(results, args.png),
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=1) + "\n")
    summary = {
        **doc,
        "scenarios": {
            n: {k: v for k, v in r.items() if k not in ("series", "capacity_mbps")}
            for n, r in results.items()
        },
    }
    print(json.dumps(summary, indent=1))
    return 0 if all(r["intact"] for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""A connection's timer run before anything is due sends nothing and changes nothing.

``Connection.on_timer`` (and the datagram flow's) says it runs "every timer that is due";
a driver may call it early (the asyncio driver keeps an earlier loop timer rather than
re-create it, and a host that let a deadline move later without re-arming would rely on
it). Here, in scenarios that arm every kind of timer (retransmission, tail loss probe,
persist, delayed ACK, keepalive, SYN and SAL FIN retransmission, TIME_WAIT, the RSYN+ACK
and address-check timers of a migration, a JOIN nobody answers, a datagram flow's idle
timeout), every connection whose deadline is still ahead is given ``on_timer`` at the
current time between steps of the simulation: it must send nothing, and the whole host
(every object reachable from it, compared as a snapshot) must be unchanged.
"""

from __future__ import annotations

import enum
import itertools
import random
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from types import BuiltinFunctionType, FunctionType, MethodType, ModuleType
from typing import Any

from pyserval.core.host import HostCore
from pyserval.sal import Rule
from pyserval.sal.packet import SalPacket
from pyserval.testing import LinkConfig, SimNetwork
from pyserval.transport.config import StreamConfig
from pyserval.transport.connection import Connection, State
from pyserval.transport.datagram_flow import DatagramConnection

from .simhelpers import Flow

A1, A2 = ("10.0.1.1", 40000), ("10.0.2.1", 40000)
B1, B2 = ("10.0.1.2", 54325), ("10.0.2.2", 54325)

_PLAIN = (type(None), bool, int, float, complex, str, bytes, enum.Enum)
_CODE = (FunctionType, MethodType, BuiltinFunctionType, ModuleType, type)


def snapshot(obj: object, memo: dict[int, str] | None = None, path: str = "") -> Any:
    """Everything reachable from ``obj`` as plain nested values (shared objects and cycles
    as references to the first path that reached them): equal snapshots, equal state."""
    if isinstance(obj, _PLAIN):
        return obj
    if isinstance(obj, weakref.ProxyTypes):
        return ("proxy",)
    if isinstance(obj, _CODE):
        return ("code",)
    memo = {} if memo is None else memo
    key = id(obj)
    if key in memo:
        return ("ref", memo[key])
    memo[key] = path
    if isinstance(obj, weakref.ref):
        return ("weakref", obj() is None)
    if isinstance(obj, (bytearray, memoryview)):
        return ("bytes", bytes(obj))
    if isinstance(obj, random.Random):
        return ("random", obj.getstate())
    if isinstance(obj, itertools.count):
        return ("count", repr(obj))
    if isinstance(obj, (list, tuple, deque)):
        return [snapshot(x, memo, f"{path}[{i}]") for i, x in enumerate(obj)]
    if isinstance(obj, dict):
        return [
            (snapshot(k, memo, f"{path}<k{i}>"), snapshot(v, memo, f"{path}[{i}]"))
            for i, (k, v) in enumerate(obj.items())
        ]
    if isinstance(obj, (set, frozenset)):
        return ("set", sorted(repr(snapshot(x, {}, "")) for x in obj))
    fields: dict[str, Any] = {}
    names = list(getattr(obj, "__dict__", {}))
    for cls in type(obj).__mro__:
        slots = cls.__dict__.get("__slots__", ())
        names += [slots] if isinstance(slots, str) else list(slots)
    for name in names:
        if name in ("__dict__", "__weakref__") or name in fields:
            continue
        try:
            value = getattr(obj, name)
        except AttributeError:
            continue
        fields[name] = snapshot(value, memo, f"{path}.{name}")
    return (type(obj).__qualname__, fields)


def kinds(conn: Connection) -> Iterator[str]:
    """The timers ``conn`` has armed (what the scenarios must cover)."""
    if conn.state is State.TIME_WAIT:
        yield "time_wait"
    if conn.state is State.SYN_SENT:
        yield "syn"
    if conn.delack_deadline is not None:
        yield "delack"
    if conn.state is State.ESTABLISHED:
        yield "liveness"
    for sf in conn.subflows:
        for name in ("rto_deadline", "pto_deadline", "persist_deadline"):
            if getattr(sf, name, None) is not None:
                yield name
        if sf.control.deadline is not None:
            yield "control"
            if sf.join_state == "syn_sent":
                yield "join"
        if sf.mig is not None and sf.mig.rsynack_deadline is not None:
            yield "rsynack"
        if sf.challenge is not None:
            yield "challenge"


class Early:
    """Runs ``on_timer`` early on every connection of ``hosts`` and checks that nothing
    happened; ``seen`` collects the kinds of timer that were armed at the time."""

    def __init__(self, net: SimNetwork, *hosts: HostCore) -> None:
        self.net, self.hosts = net, hosts
        self.seen: set[str] = set()
        self.checked = 0

    def check(self) -> None:
        now = self.net.now
        for host in self.hosts:
            for conn in list(host.connections.values()):
                deadline = conn.next_deadline()
                if deadline is None or deadline <= now:
                    continue
                armed = set(kinds(conn))
                before = snapshot(host)
                out: list[SalPacket] = []
                conn.on_timer(now, out)
                assert out == [], f"{conn!r} sent {out} at {now}, due only at {deadline}"
                assert snapshot(host) == before, f"{sorted(armed)}: state changed at {now}"
                self.seen |= armed
                self.checked += 1

    def run(self, seconds: float, until: Callable[[], bool] = lambda: False) -> None:
        """Step the simulation by 5 ms for ``seconds`` (or until ``until()``), checking
        between steps."""
        end = self.net.now + seconds
        while self.net.now < end and not until():
            self.check()
            self.net.run_for(0.005)
        self.check()


def _hosts(
    link: LinkConfig, client: StreamConfig | None = None, server: StreamConfig | None = None
) -> tuple[SimNetwork, HostCore, HostCore]:
    net = SimNetwork(seed=3, default_link=link)
    # Whole connections in TIME_WAIT (not records), so that their timer is checked too.
    a = HostCore([A1, A2], rng=random.Random(3), config=client, compact_time_wait=False)
    b = HostCore([B1, B2], rng=random.Random(4), config=server, compact_time_wait=False)
    net.attach(a, A1, A2)
    net.attach(b, B1, B2)
    a.service_table.add("svc", Rule.forward(B1))
    return net, a, b


def _accept(early: Early, listener: Any, client: Connection) -> Connection:
    got: list[Connection] = []

    def ready() -> bool:
        if not got and (c := listener.accept()) is not None:
            got.append(c)
        return bool(got) and client.state is State.ESTABLISHED

    early.run(30.0, ready)
    assert got and client.state is State.ESTABLISHED
    return got[0]


def test_an_early_timer_on_a_lossy_stream_with_a_stalled_reader_does_nothing() -> None:
    cfg = StreamConfig(time_wait=0.5, tail_loss_probe=True)
    slow_reader = StreamConfig(time_wait=0.5, receive_buffer=16384)
    net, a, b = _hosts(LinkConfig(delay=0.01, loss=0.05), cfg, slow_reader)
    early = Early(net, a, b)
    listener = b.listen("svc")
    client = a.connect("svc", net.now)
    net.kick(a)
    server = _accept(early, listener, client)
    flow = Flow(client, server, random.Random(1).randbytes(300_000))
    while not flow.done and net.now < 120.0:
        if not 0.1 < net.now % 1.0 < 0.6:  # else the reader stalls: the window closes
            flow.step()
        net.kick(a, b)
        early.run(0.05)
    assert bytes(flow.got) == flow.data  # and the client has shut down (Flow.step)
    server.shutdown()
    net.kick(b)
    early.run(3.0, lambda: client.closed and server.closed)
    assert client.closed and server.closed
    assert {"rto_deadline", "pto_deadline", "persist_deadline", "delack", "liveness"} <= early.seen
    assert {"syn", "control", "time_wait"} <= early.seen


def test_an_early_timer_during_a_move_and_a_nat_rebinding_does_nothing() -> None:
    net, a, b = _hosts(LinkConfig(delay=0.01, loss=0.1))
    nat = net.add_nat([A1[0], A2[0]], "192.0.2.1")
    early = Early(net, a, b)
    listener = b.listen("svc")
    client = a.connect("svc", net.now)
    net.kick(a)
    flow = Flow(client, _accept(early, listener, client), random.Random(2).randbytes(60_000))
    moved = rebound = False
    while not flow.done and net.now < 120.0:
        flow.step()
        if not moved and len(flow.got) > 10_000:
            moved = a.migrate(client, A2, net.now)
        elif moved and not rebound and len(flow.got) > 40_000:
            nat.rebind()
            rebound = True
        net.kick(a, b)
        early.run(0.02)
    assert bytes(flow.got) == flow.data
    assert {"rsynack", "challenge"} <= early.seen


def test_an_early_timer_with_a_join_nobody_answers_does_nothing() -> None:
    cfg = StreamConfig(multipath=True)
    net, a, b = _hosts(LinkConfig(delay=0.01), cfg, cfg)
    net.set_path(A2[0], B2[0], LinkConfig(down=True))
    early = Early(net, a, b)
    listener = b.listen("svc")
    client = a.connect("svc", net.now)
    net.kick(a)
    _accept(early, listener, client)
    a.add_path(client, A2, B2, net.now)
    net.kick(a)
    early.run(5.0)
    assert "join" in early.seen


def test_an_early_timer_on_a_datagram_flow_does_nothing() -> None:
    cfg = StreamConfig(idle_timeout=2.0, time_wait=0.5)
    net, a, b = _hosts(LinkConfig(delay=0.01, loss=0.2), cfg, cfg)
    early = Early(net, a, b)
    listener = b.listen("svc", datagram=True)
    client = a.connect("svc", net.now, datagram=True)
    assert isinstance(client, DatagramConnection)
    net.kick(a)
    server = _accept(early, listener, client)
    for i in range(20):
        client.send_datagram(b"x%d" % i)
        net.kick(a)
        early.run(0.05)
    server.shutdown()
    net.kick(b)
    early.run(5.0, lambda: client.closed and server.closed)
    assert {"syn", "liveness", "control"} <= early.seen

"""The simulated network: timing, impairments, NAT, timers, statistics, determinism."""

from __future__ import annotations

import re

import pytest

from pyserval.testing import (
    Address,
    LinkConfig,
    SansIONode,
    SimNetwork,
    SimulationError,
    TraceEvent,
)

A: Address = ("10.0.0.1", 1000)
B: Address = ("10.0.0.2", 2000)


class Sink:
    """Records what it receives; sends whatever the test queues with :meth:`send`."""

    def __init__(self) -> None:
        self.received: list[tuple[float, bytes, Address, Address]] = []
        self.outbox: list[tuple[bytes, Address, Address]] = []

    def send(self, data: bytes, src: Address, dst: Address) -> None:
        self.outbox.append((data, src, dst))

    def receive_datagram(self, data: bytes, src: Address, dst: Address, now: float) -> None:
        self.received.append((now, data, src, dst))

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Address, Address]]:
        out, self.outbox = self.outbox, []
        return out

    def next_deadline(self) -> float | None:
        return None

    def handle_timer(self, now: float) -> None:
        raise AssertionError("a sink has no timer")

    @property
    def payloads(self) -> list[bytes]:
        return [d for _, d, _, _ in self.received]

    @property
    def times(self) -> list[float]:
        return [t for t, _, _, _ in self.received]


class Echo(Sink):
    """Sends every datagram back to where it came from, from the address it arrived on."""

    def receive_datagram(self, data: bytes, src: Address, dst: Address, now: float) -> None:
        super().receive_datagram(data, src, dst, now)
        self.send(data, dst, src)


class Pinger(Sink):
    """Sends ``count`` numbered pings to ``peer``, one every ``interval`` seconds."""

    def __init__(self, local: Address, peer: Address, interval: float, count: int) -> None:
        super().__init__()
        self.local, self.peer, self.interval, self.count = local, peer, interval, count
        self.sent = 0
        self.deadline: float | None = 0.0
        self.fired: list[float] = []

    def next_deadline(self) -> float | None:
        return self.deadline

    def handle_timer(self, now: float) -> None:
        assert self.deadline is not None and now >= self.deadline
        self.fired.append(now)
        self.send(b"ping %d" % self.sent, self.local, self.peer)
        self.sent += 1
        self.deadline = now + self.interval if self.sent < self.count else None


def burst(node: Sink, n: int, size: int, src: Address, dst: Address) -> None:
    for i in range(n):
        node.send(i.to_bytes(4, "big") + bytes(size - 4), src, dst)


def seqnos(node: Sink) -> list[int]:
    return [int.from_bytes(d[:4], "big") for d in node.payloads]


def pair(net: SimNetwork) -> tuple[Sink, Sink]:
    a, b = Sink(), Sink()
    net.attach(a, A)
    net.attach(b, B)
    return a, b


def test_protocol_is_satisfied_by_the_dummies() -> None:
    nodes: list[SansIONode] = [Sink(), Echo(), Pinger(A, B, 1.0, 1)]
    assert len(nodes) == 3


def test_delay_and_echo_round_trip() -> None:
    net = SimNetwork(default_link=LinkConfig(delay=0.025))
    a, e = Sink(), Echo()
    net.attach(a, A)
    net.attach(e, B)
    a.send(b"hello", A, B)
    net.kick(a)
    assert net.now == 0.0 and not net.idle()
    net.run(1.0)
    assert e.received == [(0.025, b"hello", A, B)]
    assert a.received == [(0.05, b"hello", B, A)]
    assert net.now == 1.0 and net.idle()
    assert net.stats.total.sent_packets == 2 and net.stats.total.delivered_bytes == 10


def test_bandwidth_spreads_a_burst_by_serialisation_delay() -> None:
    net = SimNetwork(default_link=LinkConfig(delay=0.010, bandwidth=1_000_000))
    a, b = pair(net)
    burst(a, 10, 1000, A, B)
    net.kick(a)
    net.run(1.0)
    assert seqnos(b) == list(range(10))
    assert b.times == pytest.approx([0.010 + 0.001 * (k + 1) for k in range(10)])
    # the bottleneck is idle again later: a new packet takes only its own serialisation time
    a.send(bytes(500), A, B)
    net.kick(a)
    net.run(2.0)
    assert b.times[-1] == pytest.approx(1.0 + 0.0005 + 0.010)


def test_fifo_without_reorder_or_jitter() -> None:
    net = SimNetwork(default_link=LinkConfig(delay=0.003))
    a, b = pair(net)
    burst(a, 300, 100, A, B)
    net.kick(a)
    net.run_for(0.5)
    burst(a, 300, 100, A, B)
    net.kick(a)
    net.run_for(0.5)
    assert seqnos(b) == list(range(300)) * 2


def test_random_loss_rate_within_bounds() -> None:
    net = SimNetwork(seed=7, default_link=LinkConfig(loss=0.1))
    a, b = pair(net)
    burst(a, 3000, 20, A, B)
    net.kick(a)
    net.run(1.0)
    s = net.link_stats(A[0], B[0])
    assert s.sent_packets == 3000
    assert 2550 <= s.delivered_packets <= 2850
    assert s.dropped == {"loss": 3000 - s.delivered_packets}
    assert s.dropped_packets == s.dropped["loss"]
    assert len(b.received) == s.delivered_packets


def test_duplication() -> None:
    net = SimNetwork(default_link=LinkConfig(duplicate=1.0))
    a, b = pair(net)
    burst(a, 5, 10, A, B)
    net.kick(a)
    net.run(1.0)
    assert sorted(seqnos(b)) == sorted(list(range(5)) * 2)
    s = net.stats.total
    assert s.sent_packets == 5 and s.duplicated == 5 and s.delivered_packets == 10

    net = SimNetwork(seed=3, default_link=LinkConfig(duplicate=0.2))
    a, b = pair(net)
    burst(a, 1000, 10, A, B)
    net.kick(a)
    net.run(1.0)
    s = net.stats.total
    assert 130 <= s.duplicated <= 270 and len(b.received) == 1000 + s.duplicated


def test_reordering_reorders_but_loses_nothing() -> None:
    net = SimNetwork(seed=1, default_link=LinkConfig(delay=0.010, reorder=0.3))
    a = Pinger(A, B, interval=0.002, count=200)
    b = Sink()
    net.attach(b, B)
    net.attach(a, A)
    net.run(2.0)
    got = [int(p.split()[1]) for p in b.payloads]
    assert sorted(got) == list(range(200)) and got != list(range(200))
    # the default reorder_delay is 3 * delay: nothing is later than delay + 3 * delay
    assert LinkConfig(delay=0.010).effective_reorder_delay == pytest.approx(0.030)
    latency = [t - a.fired[i] for t, i in zip(b.times, got, strict=True)]
    assert min(latency) == pytest.approx(0.010) and max(latency) < 0.040
    assert sum(x > 0.0100001 for x in latency) in range(30, 90)


def test_jitter_bounds() -> None:
    net = SimNetwork(seed=2, default_link=LinkConfig(delay=0.010, jitter=0.005))
    a, b = pair(net)
    burst(a, 50, 10, A, B)
    net.kick(a)
    net.run(1.0)
    assert all(0.010 <= t < 0.015 for t in b.times) and len(set(b.times)) > 40
    assert sorted(seqnos(b)) == list(range(50)) and seqnos(b) != list(range(50))


def test_queue_limit_tail_drops() -> None:
    cfg = LinkConfig(delay=0.001, bandwidth=100_000, queue_limit=5000)
    net = SimNetwork(default_link=cfg)
    a, b = pair(net)
    burst(a, 20, 1000, A, B)
    net.kick(a)
    net.run(1.0)
    assert seqnos(b) == [0, 1, 2, 3, 4]
    assert net.link_stats(A[0], B[0]).dropped == {"queue": 15}
    # once the queue has drained there is room again
    burst(a, 3, 1000, A, B)
    net.kick(a)
    net.run(2.0)
    assert len(b.received) == 8


def test_queue_drains_with_time() -> None:
    net = SimNetwork(default_link=LinkConfig(delay=0.0, bandwidth=1000, queue_limit=2000))
    a, b = pair(net)
    burst(a, 2, 1000, A, B)  # fills the queue: 2 s of work
    net.kick(a)
    net.run(1.0)  # one packet is out
    burst(a, 2, 1000, A, B)  # room for one more
    net.kick(a)
    net.run(10.0)
    assert seqnos(b) == [0, 1, 0] and b.times == pytest.approx([1.0, 2.0, 3.0])


def test_links_are_directional_and_default_applies() -> None:
    net = SimNetwork(default_link=LinkConfig(delay=0.5))
    a, b = pair(net)
    net.set_link(A[0], B[0], LinkConfig(delay=0.1))
    a.send(b"ab", A, B)
    b.send(b"ba", B, A)
    net.kick(a, b)
    net.run(1.0)
    assert b.times == [0.1] and a.times == [0.5]
    net.set_path(A[0], B[0], LinkConfig(delay=0.2))
    assert net.link_config(B[0], A[0]).delay == 0.2
    net.clear_link(B[0], A[0])
    assert net.link_config(B[0], A[0]).delay == 0.5
    net.default_link = LinkConfig(delay=0.3)
    b.send(b"ba", B, A)
    net.kick(b)
    net.run(2.0)
    assert a.times == [0.5, 1.3]


def test_cut_and_restore_drop_in_flight_packets() -> None:
    net = SimNetwork(default_link=LinkConfig(delay=0.1, jitter=0.0))
    a, b = pair(net)
    a.send(b"in flight", A, B)
    net.kick(a)
    net.run(0.05)
    net.cut(A[0], B[0])
    a.send(b"while down", A, B)
    b.send(b"back", B, A)
    net.kick(a, b)
    net.run(1.0)
    assert b.received == [] and a.received == []
    assert net.link_stats(A[0], B[0]).dropped == {"down": 2}
    net.restore(A[0], B[0])
    assert net.link_config(A[0], B[0]).delay == 0.1
    a.send(b"up again", A, B)
    net.kick(a)
    net.run(2.0)
    assert b.payloads == [b"up again"]


def test_loss_filter_drops_chosen_packets() -> None:
    seen: list[bytes] = []

    def drop_first_synack(data: bytes, src: Address, dst: Address) -> bool:
        if data.startswith(b"SYNACK") and not seen:
            seen.append(data)
            return True
        return False

    net = SimNetwork(loss_filter=drop_first_synack)
    a, b = pair(net)
    for msg in (b"SYN", b"SYNACK 1", b"SYNACK 2", b"ACK"):
        a.send(msg, A, B)
    net.kick(a)
    net.run(1.0)
    assert b.payloads == [b"SYN", b"SYNACK 2", b"ACK"] and seen == [b"SYNACK 1"]
    assert net.stats.total.dropped == {"filtered": 1}


def test_nat_translates_both_ways_and_rebinds() -> None:
    inside: Address = ("192.168.1.10", 5000)
    neighbour: Address = ("192.168.1.11", 6000)
    server: Address = ("198.51.100.7", 7)
    net = SimNetwork(trace=True)
    nat = net.add_nat(["192.168.1.10", "192.168.1.11"], "203.0.113.1")
    c, n, s = Sink(), Sink(), Echo()
    net.attach(c, inside)
    net.attach(n, neighbour)
    net.attach(s, server)

    c.send(b"one", inside, server)
    net.kick(c)
    net.run(1.0)
    assert s.received[0][2] == ("203.0.113.1", 40000)
    assert c.received[0][1:] == (b"one", server, inside)
    assert c.received[0][0] == pytest.approx(0.002)
    assert nat.public_address(inside) == ("203.0.113.1", 40000)
    assert nat.inside_address(40000) == inside and nat.mappings == {inside: ("203.0.113.1", 40000)}
    # the link is named by the endpoint IPs, in both directions
    assert net.link_stats(inside[0], server[0]).delivered_packets == 1
    assert net.link_stats(server[0], inside[0]).delivered_packets == 1

    # the same inside address keeps its mapping; another port gets another one
    c.send(b"two", inside, server)
    net.kick(c)
    net.run(2.0)
    assert s.received[1][2] == ("203.0.113.1", 40000)

    # rebinding: the next packet leaves from a fresh port, and the old port is dead
    nat.rebind()
    assert nat.mappings == {}
    s.send(b"stale", server, ("203.0.113.1", 40000))
    net.kick(s)
    c.send(b"three", inside, server)
    net.kick(c)
    net.run(3.0)
    assert s.received[2][2] == ("203.0.113.1", 40001)
    assert c.payloads == [b"one", b"two", b"three"]
    assert nat.dropped == 1 and net.stats.total.dropped == {"nat": 1}
    assert any(ev.fate == "nat" and ev.data == b"stale" for ev in net.trace)

    # inside-to-inside traffic is not translated
    c.send(b"hi neighbour", inside, neighbour)
    net.kick(c)
    net.run(4.0)
    assert [r[1:] for r in n.received] == [(b"hi neighbour", inside, neighbour)]
    assert n.times == pytest.approx([3.001])

    # rebinding one mapping only
    n.send(b"out", neighbour, server)
    net.kick(n)
    net.run(5.0)
    assert nat.public_address(neighbour) == ("203.0.113.1", 40002)
    nat.rebind(neighbour)
    assert nat.public_address(neighbour) is None
    assert nat.public_address(inside) == ("203.0.113.1", 40001)

    with pytest.raises(ValueError, match="already behind"):
        net.add_nat(["192.168.1.10"], "203.0.113.2")


def test_two_nats_can_talk_through_mapped_ports() -> None:
    net = SimNetwork()
    nat1 = net.add_nat(["10.1.0.1"], "198.51.100.1")
    nat2 = net.add_nat(["10.2.0.1"], "198.51.100.2")
    x, y = Sink(), Sink()
    x_addr, y_addr = ("10.1.0.1", 1), ("10.2.0.1", 2)
    net.attach(x, x_addr)
    net.attach(y, y_addr)
    # y opens its mapping first (the packet to x's public IP is dropped: unmapped)
    y.send(b"punch", y_addr, ("198.51.100.1", 40000))
    net.kick(y)
    net.run(1.0)
    assert nat1.dropped == 1 and nat2.public_address(y_addr) == ("198.51.100.2", 40000)
    x.send(b"hello", x_addr, ("198.51.100.2", 40000))
    net.kick(x)
    net.run(2.0)
    assert [r[1:] for r in y.received] == [(b"hello", ("198.51.100.1", 40000), y_addr)]
    assert y.times == pytest.approx([1.001])


def test_address_removal_and_addition() -> None:
    net = SimNetwork()
    a, b = pair(net)
    b2: Address = ("10.0.0.3", 2000)
    a.send(b"1", A, B)
    net.kick(a)
    net.run(1.0)
    net.detach_address(B)
    assert net.owner(B) is None and net.addresses(b) == []
    a.send(b"2", A, B)
    net.kick(a)
    net.run(2.0)
    assert b.payloads == [b"1"]
    assert net.link_stats(A[0], B[0]).dropped == {"no_route": 1}
    # a node sending from an address it no longer owns: dropped as no_source
    b.send(b"from old", B, A)
    net.kick(b)
    net.add_address(b, b2)
    assert net.owner(b2) is b and net.addresses(b) == [b2]
    a.send(b"3", A, b2)
    b.send(b"from new", b2, A)
    net.kick(a, b)
    net.run(3.0)
    assert b.payloads == [b"1", b"3"] and a.payloads == [b"from new"]
    assert net.link_stats(B[0], A[0]).dropped == {"no_source": 1}
    with pytest.raises(KeyError):
        net.detach_address(B)
    with pytest.raises(ValueError, match="already belongs"):
        net.add_address(a, b2)
    net.detach(b)
    with pytest.raises(KeyError):
        net.kick(b)


def test_one_timer_per_node_rearmed_after_each_firing() -> None:
    net = SimNetwork(default_link=LinkConfig(delay=0.01))
    p = Pinger(A, B, interval=0.1, count=5)
    b = Sink()
    net.attach(b, B)
    net.attach(p, A)
    assert net.timer(p) == 0.0 and net.timer(b) is None
    net.step()  # the first firing
    assert p.fired == [0.0] and net.timer(p) == 0.1
    net.run(1.0)
    assert p.fired == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    assert b.times == pytest.approx([0.01, 0.11, 0.21, 0.31, 0.41])
    assert net.timer(p) is None and net.idle() and not net.step()


def test_moved_deadline_supersedes_the_old_timer() -> None:
    net = SimNetwork()
    p = Pinger(A, B, interval=1.0, count=3)
    net.attach(Sink(), B)
    p.deadline = 5.0
    net.attach(p, A)
    assert net.timer(p) == 5.0
    p.deadline = 2.0  # an API call brought the timer forward ...
    net.kick(p)  # ... and the test tells the sim
    assert net.timer(p) == 2.0
    p.deadline = 3.0  # moved back without a kick: the timer at 2.0 finds nothing due
    net.run(10.0)
    assert p.fired == [3.0, 4.0, 5.0]
    assert net.next_event_time() is None and net.idle()


def test_kick_fires_an_overdue_timer_now() -> None:
    net = SimNetwork()
    p = Pinger(A, B, interval=1.0, count=2)
    net.attach(Sink(), B)
    p.deadline = None
    net.attach(p, A)
    net.run(5.0)
    p.deadline = 1.0  # in the past
    net.kick(p)
    assert net.timer(p) == 5.0
    net.run(7.0)
    assert p.fired == [5.0, 6.0]


class Stuck(Sink):
    def next_deadline(self) -> float | None:
        return 0.5

    def handle_timer(self, now: float) -> None:
        pass


def test_runaway_timer_raises_naming_the_node() -> None:
    net = SimNetwork(timer_fire_limit=100)
    net.attach(Stuck(), A, name="stuck-host")
    with pytest.raises(SimulationError, match="stuck-host"):
        net.run(1.0)
    net = SimNetwork()
    net.attach(Stuck(), A)
    with pytest.raises(SimulationError, match=re.escape("Stuck@10.0.0.1:1000")):
        net.run(1.0)


def test_run_until_and_step() -> None:
    net = SimNetwork(default_link=LinkConfig(delay=0.2))
    a, b = pair(net)
    a.send(b"x", A, B)
    net.kick(a)
    assert net.next_event_time() == pytest.approx(0.2)
    assert net.run_until(lambda: bool(b.received), timeout=1.0)
    assert net.now == pytest.approx(0.2)
    assert not net.run_until(lambda: len(b.received) > 1, timeout=1.0)
    assert net.now == pytest.approx(1.2)
    assert net.run_until(lambda: True, timeout=0.0) and net.now == pytest.approx(1.2)
    a.send(b"y", A, B)
    net.kick(a)
    assert net.step() and net.now == pytest.approx(1.4) and not net.step()
    with pytest.raises(ValueError, match="backwards"):
        net.run(1.0)


def test_tap_and_trace_see_every_fate() -> None:
    events: list[tuple[float, bytes, Address, Address, str]] = []
    net = SimNetwork(trace=True, tap=lambda *ev: events.append(ev))
    a, b = pair(net)
    net.set_link(A[0], B[0], LinkConfig(loss=1.0))
    a.send(b"lost", A, B)
    b.send(b"ok", B, A)
    net.kick(a, b)
    net.run(1.0)
    assert [(ev.fate, ev.data) for ev in net.trace] == [
        ("sent", b"lost"),
        ("lost", b"lost"),
        ("sent", b"ok"),
        ("delivered", b"ok"),
    ]
    assert [(t, d, s, dst, f) for t, f, s, dst, d in net.trace] == events
    assert net.trace[-1] == TraceEvent(0.001, "delivered", B, A, b"ok")


def test_delivered_data_is_an_immutable_copy() -> None:
    net = SimNetwork()
    a, b = pair(net)
    buf = bytearray(b"abc")
    a.outbox.append((buf, A, B))  # type: ignore[arg-type]  # a sloppy node
    net.kick(a)
    buf[0] = ord("X")
    net.run(1.0)
    assert b.payloads == [b"abc"] and type(b.payloads[0]) is bytes


def _lossy_run(seed: int) -> list[TraceEvent]:
    cfg = LinkConfig(delay=0.01, jitter=0.004, loss=0.1, duplicate=0.05, reorder=0.1)
    net = SimNetwork(seed=seed, default_link=cfg, trace=True)
    p, e = Pinger(A, B, interval=0.001, count=300), Echo()
    net.attach(e, B)
    net.attach(p, A)
    net.run(2.0)
    return net.trace


def test_same_seed_same_trace() -> None:
    first = _lossy_run(11)
    assert first == _lossy_run(11)
    assert first != _lossy_run(12)
    assert {ev.fate for ev in first} >= {"sent", "delivered", "lost", "duplicated"}


def test_stats_snapshot_and_reset() -> None:
    net = SimNetwork()
    a, _ = pair(net)
    a.send(b"12345", A, B)
    net.kick(a)
    net.run(1.0)
    snap = net.stats
    assert snap.links[(A[0], B[0])].sent_bytes == 5 and snap.total.delivered_packets == 1
    net.reset_stats()
    assert net.stats.total.sent_packets == 0 and snap.total.sent_packets == 1
    assert net.link_stats("1.1.1.1", "2.2.2.2").sent_packets == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"delay": -1.0},
        {"loss": 1.5},
        {"duplicate": -0.1},
        {"bandwidth": 0.0},
        {"queue_limit": -1},
        {"reorder_delay": -1.0},
    ],
)
def test_link_config_validation(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        LinkConfig(**kwargs)  # type: ignore[arg-type]


def test_bulk_transfer_is_fast_enough() -> None:
    """5 MB in 1,400-byte packets over a 10 MB/s bottleneck, acknowledged by an echo."""
    net = SimNetwork(default_link=LinkConfig(delay=0.005, bandwidth=10_000_000))
    a, e = Sink(), Echo()
    net.attach(a, A)
    net.attach(e, B)
    n = 5_000_000 // 1400
    burst(a, n, 1400, A, B)
    net.kick(a)
    net.run(10.0)
    assert len(a.received) == n and seqnos(a) == list(range(n))
    assert e.times[-1] == pytest.approx(0.005 + n * 1400 / 10_000_000)


# -- GSO and GRO batches ------------------------------------------------------------------


class BatchSink(Sink):
    """A sink that records how its datagrams were handed over: one list per call."""

    def __init__(self, batches: bool) -> None:
        super().__init__()
        self.calls: list[list[bytes]] = []
        if batches:
            self.receive_datagrams = self._receive_batch

    def _receive_batch(self, batch: list[tuple[bytes, Address]], dst: Address, now: float) -> None:
        self.calls.append([data for data, _ in batch])

    def receive_datagram(self, data: bytes, src: Address, dst: Address, now: float) -> None:
        self.calls.append([data])


def _burst(net: SimNetwork, receiver: BatchSink, count: int) -> list[bytes]:
    """``count`` datagrams sent A -> B at once; what was sent."""
    sender = Sink()
    net.attach(sender, A)
    net.attach(receiver, B)
    sent = [b"datagram %d" % i for i in range(count)]
    for data in sent:
        sender.send(data, A, B)
    net.kick(sender)
    net.run_for(1.0)
    return sent


def test_datagrams_arriving_at_one_instant_are_handed_over_in_one_call_in_order() -> None:
    receiver = BatchSink(True)
    sent = _burst(SimNetwork(gro=True), receiver, 5)
    assert receiver.calls == [sent]


def test_a_batch_holds_at_most_max_batch_datagrams() -> None:
    receiver = BatchSink(True)
    sent = _burst(SimNetwork(gro=True, max_batch=2), receiver, 5)
    assert receiver.calls == [sent[0:2], sent[2:4], sent[4:5]]


@pytest.mark.parametrize(("gro", "batches"), [(False, True), (True, False)])
def test_without_gro_or_a_batch_method_datagrams_come_one_by_one(gro: bool, batches: bool) -> None:
    receiver = BatchSink(batches)
    sent = _burst(SimNetwork(gro=gro), receiver, 3)
    assert receiver.calls == [[d] for d in sent]


def test_datagrams_arriving_at_different_instants_are_not_merged() -> None:
    receiver = BatchSink(True)
    # Jitter spreads the arrivals: no two at the same instant, so no batch of two.
    link = LinkConfig(delay=0.01, jitter=0.005)
    sent = _burst(SimNetwork(gro=True, default_link=link), receiver, 4)
    assert sorted(c[0] for c in receiver.calls) == sorted(sent)
    assert all(len(c) == 1 for c in receiver.calls)


def test_max_batch_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_batch"):
        SimNetwork(max_batch=0)


def test_the_environment_variable_turns_both_modes_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYSERVAL_SIM_BATCHES", "1")
    net = SimNetwork()
    assert net.gso and net.gro
    assert not SimNetwork(gso=False).gso
    monkeypatch.delenv("PYSERVAL_SIM_BATCHES")
    net = SimNetwork()
    assert not net.gso and not net.gro

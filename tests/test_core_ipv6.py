"""Dual-stack hosts on the simulated network: moves from IPv4 to IPv6 (with losses), ADD_ADDR6,
and what a move across families needs."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from pyserval.core.host import HostCore, Listener
from pyserval.sal import AddAddrExt, ControlFlags, Rule, decode_packet
from pyserval.testing import LinkConfig, SimNetwork
from pyserval.transport.config import StreamConfig
from pyserval.transport.connection import Connection, State
from pyserval.transport.events import FlowMigrated

A4 = ("10.0.1.1", 40000)
A6 = ("fd00:1::1", 40000)
B4 = ("10.0.0.2", 54325)
B6 = ("fd00:2::2", 54325)
Addr = tuple[str, int]
DATA = random.Random(6).randbytes(2_000_000)


class DualStack:
    def __init__(self, seed: int = 1, loss: float = 0.0, multipath: bool = False) -> None:
        link = LinkConfig(delay=0.01, loss=loss, bandwidth=2e6, queue_limit=256 << 10)
        self.net = SimNetwork(seed=seed, default_link=link)
        cfg = StreamConfig(send_buffer=4 << 20, receive_buffer=4 << 20, multipath=multipath)
        self.a = HostCore([A4, A6], rng=random.Random(seed), config=cfg)
        self.b = HostCore([B4, B6], rng=random.Random(seed + 7), config=cfg)
        self.net.attach(self.a, A4, A6)
        self.net.attach(self.b, B4, B6)
        self.a.service_table.add("svc", Rule.forward(B4))
        self.listener: Listener = self.b.listen("svc")
        self.client = self.a.connect("svc", self.net.now)
        self.net.kick(self.a)
        got: list[Connection] = []

        def ready() -> bool:
            c = self.listener.accept()
            if c is not None:
                got.append(c)
            return bool(got) and self.client.state is State.ESTABLISHED

        assert self.net.run_until(ready, 30)
        self.server = got[0]
        self.moved: list[FlowMigrated] = []

    def pump(self, until: float, on_time: dict[float, Callable[[], object]]) -> bytes:
        net = self.net
        start = net.now
        actions = {start + t: f for t, f in on_time.items()}
        sent = 0
        got = bytearray()
        while len(got) < len(DATA) and net.now < start + until:
            for t in [t for t in actions if t <= net.now]:
                actions.pop(t)()
            if sent < len(DATA):
                sent += self.client.write(DATA[sent : sent + 262144])
                net.kick(self.a)
            net.run_for(0.005)
            got += self.server.read()
            for host in (self.a, self.b):
                self.moved += [e for e in host.events() if isinstance(e, FlowMigrated)]
        assert self.client.state is State.ESTABLISHED, self.client.error
        assert not actions
        return bytes(got)


@pytest.mark.parametrize("loss", [0.0, 0.02])
def test_a_move_from_ipv4_to_ipv6_mid_transfer_delivers_every_byte(loss: float) -> None:
    s = DualStack(loss=loss)
    assert s.client.primary.local_addr == A4 and s.server.primary.local_addr == B4

    def move() -> None:
        assert s.a.migrate(s.client, A6, s.net.now, remote=B6)
        s.net.kick(s.a)

    got = s.pump(60.0, {0.5: move, 0.8: lambda: s.net.detach_address(A4)})
    assert got == DATA
    assert (s.client.primary.local_addr, s.client.primary.remote_addr) == (A6, B6)
    assert (s.server.primary.local_addr, s.server.primary.remote_addr) == (B6, A6)
    assert {(m.local, m.remote, m.reason) for m in s.moved} == {
        (A6, B6, "migrated"),
        (B6, A6, "peer_moved"),
    }


def test_lost_rsyn_and_rsynack_across_families_are_repaired() -> None:
    s = DualStack()
    lost: list[tuple[int, Addr]] = []

    def lose_first(data: bytes, src: Addr, dst: Addr) -> bool:
        ctl = decode_packet(data).control
        if ctl is None or not ctl.flags & ControlFlags.RSYN:
            return False
        key = (ctl.flags & ControlFlags.ACK, src)
        if key not in lost:
            lost.append(key)
            return True
        return False

    s.net.loss_filter = lose_first

    def move() -> None:
        s.a.migrate(s.client, A6, s.net.now, remote=B6)
        s.net.kick(s.a)

    assert s.pump(60.0, {0.3: move}) == DATA
    assert lost == [(0, A6), (ControlFlags.ACK, B6)]  # the RSYN and the RSYN+ACK, once each
    assert s.server.primary.local_addr == B6 and s.client.primary.remote_addr == B6


def test_a_move_to_the_other_family_needs_a_peer_address_there() -> None:
    s = DualStack()
    with pytest.raises(ValueError, match="family"):
        s.a.migrate(s.client, A6, s.net.now)
    assert s.client.primary.local_addr == A4 and s.client.primary.mig is None
    # The interface goes: with no IPv6 address of the peer known, nothing starts.
    assert s.a.remove_address(A4, s.net.now) == []


def test_multipath_peer_advertises_its_ipv6_address_and_a_lost_interface_moves_there() -> None:
    s = DualStack(multipath=True)
    mp = s.client.mp
    assert mp is not None
    s.net.run_for(0.5)  # the first ACKs carry ADD_ADDR / ADD_ADDR6
    assert B6 in mp.peer_addresses

    def drop_ipv4() -> None:
        s.a.remove_address(A4, s.net.now)
        s.net.kick(s.a)

    got = s.pump(60.0, {0.3: drop_ipv4})
    assert got == DATA
    assert (s.client.primary.local_addr, s.client.primary.remote_addr) == (A6, B6)


def test_add_addr_carries_both_families_as_one_extension_class() -> None:
    v6 = AddAddrExt(B6).encode()
    v4 = AddAddrExt(B4).encode()
    assert v4[0] >> 4 == 9 and len(v4) == 8
    assert v6[0] >> 4 == 15 and v6[2] == 2 and len(v6) == 24

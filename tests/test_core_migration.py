"""Flow migration (RSYN), NAT rebinding and its security, on the simulated network."""

from __future__ import annotations

import random

import pytest

from pyserval.core.host import HostCore, Listener
from pyserval.sal import (
    ControlExt,
    ControlFlags,
    Rule,
    SalPacket,
    TcpFlags,
    TcpHeader,
    decode_packet,
)
from pyserval.testing import LinkConfig, SimNetwork
from pyserval.transport.config import StreamConfig
from pyserval.transport.connection import Connection, State
from pyserval.transport.events import FlowMigrated

A1 = ("10.0.1.1", 40000)
A2 = ("10.0.2.1", 40000)
B1 = ("10.0.0.2", 54325)
B2 = ("10.0.3.2", 54325)
EVIL = ("10.6.6.6", 666)

Addr = tuple[str, int]


class Setup:
    def __init__(
        self, seed: int = 1, loss: float = 0.0, nat: bool = False, compact_close: bool = False
    ) -> None:
        link = LinkConfig(delay=0.01, loss=loss, bandwidth=2e6, queue_limit=256 << 10)
        self.net = SimNetwork(seed=seed, default_link=link)
        cfg = StreamConfig(send_buffer=4 << 20, receive_buffer=4 << 20, compact_close=compact_close)
        self.a = HostCore([A1, A2], rng=random.Random(seed), config=cfg)
        self.b = HostCore([B1, B2], rng=random.Random(seed + 7), config=cfg)
        self.net.attach(self.a, A1, A2)
        self.net.attach(self.b, B1, B2)
        self.nat = self.net.add_nat([A1[0], A2[0]], "192.0.2.1") if nat else None
        self.a.service_table.add("svc", Rule.forward(B1))
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
        self.events: dict[str, list[object]] = {"a": [], "b": []}

    def pump(self, data: bytes, until: float, on_time: dict[float, object] | None = None) -> bytes:
        """Send ``data`` a -> b, calling each action ``on_time`` seconds after the start;
        return what b read by ``until`` seconds of virtual time."""
        net = self.net
        start = net.now  # action times count from here (the handshake may have taken long)
        actions = {start + t: f for t, f in sorted((on_time or {}).items())}
        sent = 0
        got = bytearray()
        while len(got) < len(data) and net.now < start + until:
            for t in [t for t in actions if t <= net.now]:
                actions.pop(t)()  # type: ignore[operator]
            if sent < len(data):
                sent += self.client.write(data[sent : sent + 262144])
                net.kick(self.a)
            net.run_for(0.005)
            got += self.server.read()
            self.events["a"] += self.a.events()
            self.events["b"] += self.b.events()
        assert self.client.state is State.ESTABLISHED, self.client.error
        assert not actions, f"the transfer ended before {sorted(actions)}"
        return bytes(got)

    def migrations(self, who: str) -> list[FlowMigrated]:
        return [e for e in self.events[who] if isinstance(e, FlowMigrated)]


DATA = bytes(random.Random(5).randbytes(3_000_000))


@pytest.mark.parametrize("loss", [0.0, 0.02])
def test_client_migrates_mid_transfer_and_every_byte_arrives_once(loss: float) -> None:
    s = Setup(loss=loss)

    def move() -> None:
        assert s.a.migrate(s.client, A2, s.net.now)
        s.net.kick(s.a)

    got = s.pump(DATA, 60.0, {1.0: move, 1.3: lambda: s.net.detach_address(A1)})
    assert got == DATA
    assert s.client.primary.local_addr == A2 and s.server.primary.remote_addr == A2
    (ma,) = s.migrations("a")
    (mb,) = s.migrations("b")
    assert (ma.local, ma.reason) == (A2, "migrated")
    assert (mb.remote, mb.reason) == (A2, "peer_moved")


def test_both_ends_migrate_at_once() -> None:
    s = Setup(loss=0.01)

    def both() -> None:
        s.a.migrate(s.client, A2, s.net.now)
        s.b.migrate(s.server, B2, s.net.now)
        s.net.kick(s.a, s.b)

    def drop_old() -> None:
        s.net.detach_address(A1)
        s.net.detach_address(B1)

    got = s.pump(DATA, 60.0, {1.0: both, 1.5: drop_old})
    assert got == DATA
    assert s.client.primary.local_addr == A2 and s.client.primary.remote_addr == B2
    assert s.server.primary.local_addr == B2 and s.server.primary.remote_addr == A2


def test_lost_rsyn_rsynack_and_ack_are_retransmitted() -> None:
    s = Setup()
    dropped: list[int] = []

    def lose_first_of_each(data: bytes, src: Addr, dst: Addr) -> bool:
        pkt = decode_packet(data)
        ctl = pkt.control
        if ctl is None:
            return False
        kind = ctl.flags & (ControlFlags.RSYN | ControlFlags.ACK)
        ours = ctl.flags & ControlFlags.RSYN or (kind == ControlFlags.ACK and src == A2)
        if ours and kind not in dropped:
            dropped.append(kind)
            return True
        return False

    s.net.loss_filter = lose_first_of_each

    def move() -> None:
        s.a.migrate(s.client, A2, s.net.now)
        s.net.kick(s.a)

    got = s.pump(DATA, 60.0, {0.5: move, 0.6: lambda: s.net.detach_address(A1)})
    assert got == DATA
    assert len(dropped) == 3  # one RSYN, one RSYN+ACK, one ACK were lost and repaired
    assert s.migrations("a") and s.migrations("b")


def test_nat_rebinding_is_checked_then_followed() -> None:
    s = Setup(nat=True, loss=0.01)
    assert s.nat is not None
    old_public = s.server.primary.remote_addr
    got = s.pump(DATA, 60.0, {1.0: s.nat.rebind})
    assert got == DATA
    new_public = s.server.primary.remote_addr
    assert new_public != old_public and new_public == s.nat.public_address(A1)
    (mb,) = s.migrations("b")
    assert mb.reason == "rebinding"
    assert s.b.stats["rebinding_challenge"] >= 1


def test_off_path_host_cannot_move_or_kill_a_flow() -> None:
    s = Setup()
    s.net.attach(evil := HostCore([EVIL]), EVIL)
    sf = s.server.primary
    flows = (sf.remote_flowid, sf.local_flowid)  # the attacker even guessed both flowIDs
    wrong = bytes(8)
    forged = [
        ControlExt(ControlFlags.RSYN, 0, 0, wrong),
        ControlExt(ControlFlags.RST, 0, 0, wrong),
        ControlExt(ControlFlags.FIN, 0, 0, wrong),
    ]

    def attack() -> None:
        for ctl in forged:
            pkt = SalPacket(flows[0], flows[1], 6, [ctl])
            evil._out.append((pkt.encode(), EVIL, B1))  # sent from the attacker's own address
        s.net.kick(evil)

    before = s.b.drops["bad_nonce"]
    got = s.pump(DATA[:1_000_000], 60.0, {0.3: attack})
    assert got == DATA[:1_000_000]
    assert s.server.state is State.ESTABLISHED and sf.remote_addr == A1
    assert s.b.drops["bad_nonce"] - before >= 1
    assert not s.migrations("b")


def test_spoofed_data_from_elsewhere_starts_a_challenge_that_fails_harmlessly() -> None:
    s = Setup()
    sf = s.server.primary
    sent_to_evil: list[bytes] = []
    from_evil: list[int] = []

    def tap(t: float, data: bytes, src: Addr, dst: Addr, fate: str) -> None:
        if dst == EVIL and fate == "sent":
            sent_to_evil.append(data)
        elif src == EVIL and dst == B1 and fate == "delivered":
            from_evil.append(len(data))

    s.net.tap = tap
    s.net.attach(evil := HostCore([EVIL]), EVIL)

    def spoof() -> None:
        # Both flowIDs and numbers inside the window (as if seen on the path): only such a
        # packet may start an address check (see test_core_hardening's off-path tests).
        seq = (sf.irs + 1 + s.server.recv.rcv_nxt) & 0xFFFFFFFF
        tcp = TcpHeader(seq=seq, ack=sf.wire_seq(sf.snd_una), flags=TcpFlags.ACK)
        ack = SalPacket(sf.remote_flowid, sf.local_flowid, 6, [], tcp)
        evil._out.append((ack.encode(), EVIL, B1))
        s.net.kick(evil)

    got = s.pump(DATA[:2_000_000], 60.0, {0.3: spoof})
    assert got == DATA[:2_000_000]
    s.net.run_for(20.0)  # the challenge gives up
    assert sf.remote_addr == A1 and sf.mig is None  # the flow never moved
    assert s.b.stats["rebinding_challenge"] == 1
    # Anti-amplification: at most three times what came from there (the spoofed packet,
    # and the attacker host's RSTs answering the challenges).
    assert 0 < sum(map(len, sent_to_evil)) <= 3 * sum(from_evil)
    # Nothing sent there lets the receiver act on the flow: no nonce, no control number.
    for data in sent_to_evil:
        ctl = decode_packet(data).control
        assert ctl is not None and ctl.nonce == bytes(8)
        assert ctl.nonce != s.b.connections[sf.local_flowid].primary.control.local_nonce


def test_a_change_of_mind_and_a_late_rsyn_leave_the_flow_where_the_mover_is() -> None:
    s = Setup()
    s.net.set_link(A2[0], B1[0], LinkConfig(delay=0.3, bandwidth=2e6))  # a slow second path
    s.a.migrate(s.client, A2, s.net.now)
    s.net.kick(s.a)
    s.a.migrate(s.client, A1, s.net.now)  # back at once: the RSYN from A2 arrives last
    s.net.kick(s.a)
    s.net.run_for(1.0)
    assert s.server.primary.remote_addr == A1 and not s.server.primary.frozen
    got = s.pump(DATA[:500_000], 30.0)
    assert got == DATA[:500_000]


def test_a_duplicated_rsyn_after_the_move_changes_nothing() -> None:
    s = Setup()
    rsyns: list[tuple[bytes, Addr, Addr]] = []

    def tap(t: float, data: bytes, src: Addr, dst: Addr, fate: str) -> None:
        ctl = decode_packet(data).control
        if fate == "sent" and ctl is not None and ctl.flags == ControlFlags.RSYN:
            rsyns.append((data, src, dst))

    s.net.tap = tap

    def move() -> None:
        s.a.migrate(s.client, A2, s.net.now)
        s.net.kick(s.a)

    def replay() -> None:
        data, src, dst = rsyns[0]
        s.b.receive_datagram(data, src, dst, s.net.now)
        s.net.kick(s.b)

    got = s.pump(DATA, 60.0, {0.5: move, 1.0: replay})
    assert got == DATA
    assert len(s.migrations("b")) == 1 and not s.server.primary.frozen


def test_closing_during_a_move_still_closes_both_ends() -> None:
    s = Setup()
    s.net.set_path(A2[0], B1[0], LinkConfig(delay=0.2, bandwidth=2e6))
    s.client.write(b"last words")
    s.client.shutdown()
    s.net.kick(s.a)
    s.a.migrate(s.client, A2, s.net.now)  # before the FIN is acknowledged
    s.net.kick(s.a)
    s.net.run_for(1.0)
    assert s.server.read() == b"last words"
    s.server.shutdown()
    s.net.kick(s.b)
    s.net.run_for(60.0)
    assert s.client.state is State.CLOSED and s.server.state in (State.CLOSED, State.TIME_WAIT)


def test_a_stray_packet_then_a_lossy_close_ends_cleanly() -> None:
    """A challenge in progress when the flow closes must not leave a timer spinning."""
    s = Setup()
    sf = s.server.primary
    s.net.attach(evil := HostCore([EVIL]), EVIL)
    evil.receive_datagram = lambda *a: None  # type: ignore[method-assign]
    stray = SalPacket(sf.remote_flowid, sf.local_flowid, 6, [])
    evil._out.append((stray.encode(), EVIL, B1))
    s.net.kick(evil)
    s.net.run_for(0.05)
    s.server.write(b"bye")
    s.server.shutdown()
    s.client.shutdown()
    s.net.kick(s.a, s.b)
    lost = [0]

    def lose_fins(data: bytes, src: Addr, dst: Addr) -> bool:
        ctl = decode_packet(data).control
        if src == B1 and ctl is not None and ctl.flags & ControlFlags.FIN and lost[0] < 4:
            lost[0] += 1
            return True
        return False

    s.net.loss_filter = lose_fins
    s.net.run_for(120.0)  # a timer that never moves on raises SimulationError here
    assert s.client.state is State.CLOSED and s.server.state is State.CLOSED

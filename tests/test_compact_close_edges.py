"""Edge cases of the compact close and of the spec's close it falls back to.

An adversarial review on the simulated network: simultaneous closes, loss, duplication and
reordering on both directions, half-closes with a megabyte the other way, a close during a
migration, forged control packets, one end without the option, and TIME_WAIT answers.

The expectations come from outside the code under test: RFC 9293's close (whoever sends
the last ACK must be there to send it again, so a FIN is never answered by a RST; every
segment after the SYN carries the ACK), the wire spec's numbering (``shared/spec/
sal-wire.md``: a FIN consumes a verno, ackno is the next verno expected; control packets
without the peer's nonce are dropped), and conservation of bytes (what one side wrote is
what the other read, in order, once).
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

import pytest

from pyserval.sal import ControlExt, ControlFlags, decode_packet
from pyserval.sal.packet import SalPacket
from pyserval.sal.transport_headers import TcpFlags, TcpHeader
from pyserval.testing import LinkConfig
from pyserval.transport.close_state import Stage
from pyserval.transport.config import StreamConfig
from pyserval.transport.connection import Connection, State

from .simhelpers import A, B, Pair
from .simhelpers import make_compact_pair as make_pair  # both ends ask for it

Addr = tuple[str, int]
ENDED = (State.CLOSED, State.TIME_WAIT)


@dataclass
class Wire:
    """Every datagram the network saw sent, decoded, in order."""

    sent: list[tuple[float, Addr, SalPacket]] = field(default_factory=list)

    def rsts(self) -> list[tuple[float, Addr]]:
        return [
            (t, src) for t, src, pkt in self.sent
            if pkt.control is not None and pkt.control.flags & ControlFlags.RST
        ]  # fmt: skip

    def from_(self, src: Addr) -> list[SalPacket]:
        return [pkt for _, s, pkt in self.sent if s == src]


def watch(p: Pair) -> Wire:
    wire = Wire()

    def tap(t: float, data: bytes, src: Addr, dst: Addr, fate: str) -> None:
        if fate == "sent":
            wire.sent.append((t, src, decode_packet(data)))

    p.net.tap = tap
    return wire


def connected(p: Pair) -> tuple[Wire, Connection, Connection]:
    """Watch ``p``'s network, connect, and return the wire and both ends."""
    wire = watch(p)
    p.connect()
    c, s = p.client, p.server
    assert c is not None and s is not None
    return wire, c, s


def sal_fin(pkt: SalPacket) -> bool:
    return pkt.control is not None and bool(pkt.control.flags & ControlFlags.FIN)


def tcp_fin(pkt: SalPacket) -> bool:
    return pkt.tcp is not None and bool(pkt.tcp.flags & TcpFlags.FIN)


def ended_cleanly(c: Connection) -> bool:
    """Closed without error, both directions through both levels (not cut by a RST)."""
    return (
        c.state in ENDED
        and c.error is None
        and c.close.local is Stage.DONE
        and c.close.remote is Stage.DONE
    )


def _ack_of_server_sal_fin(p: Pair) -> list[SalPacket]:
    """Drop the client's first packet whose CONTROL acknowledges the server's SAL FIN
    (a control ACK: the client sends it alone, not on its own SAL FIN)."""
    dropped: list[SalPacket] = []

    def loss(data: bytes, src: Addr, dst: Addr) -> bool:
        pkt = decode_packet(data)
        ctl = pkt.control
        if (
            not dropped
            and src == A
            and ctl is not None
            and ctl.flags == ControlFlags.ACK
            and p.server is not None
            and p.server.close.local is not Stage.OPEN
        ):
            dropped.append(pkt)
            return True
        return False

    p.net.loss_filter = loss
    return dropped


@pytest.mark.parametrize(
    "compact",
    [
        True,
        pytest.param(
            False,
            marks=pytest.mark.xfail(
                strict=True,
                reason="the spec's close: our SAL FIN stays a plain FIN as the reference's "
                "is, and the side that closed second does not wait, so a lost control ACK "
                "of the first closer's SAL FIN ends that side on a RST (clean, no TIME_WAIT)",
            ),
        ),
    ],
)
def test_a_sal_fin_sent_after_the_peers_carries_its_ack(compact: bool) -> None:
    # No delayed ACK: the client acknowledges the server's FIN and SAL FIN at once, and
    # that packet is lost. The client's own SAL FIN, sent later, must carry the ACK (its
    # ackno already says so): every segment after the SYN carries the ACK (RFC 9293
    # 3.10.7.4). Without the flag the server never learns its SAL FIN arrived, the client
    # (which closed second) forgets the flow, and the server's next copy meets a RST.
    cfg = StreamConfig(delayed_ack=0.0, compact_close=compact)
    p = make_pair(seed=21, config=cfg)
    wire, c, s = connected(p)
    dropped = _ack_of_server_sal_fin(p)
    s.shutdown()
    p.net.kick(p.b)
    assert p.net.run_until(lambda: c.close.remote is Stage.DONE, 10)
    p.net.run_for(0.05)
    assert len(dropped) == 1
    c.shutdown()
    p.net.kick(p.a)
    assert p.net.run_until(lambda: c.state in ENDED and s.state in ENDED, 30)
    p.net.run_for(5.0)
    assert wire.rsts() == []
    assert ended_cleanly(c) and ended_cleanly(s)
    client_sal_fins = [pkt for pkt in wire.from_(A) if sal_fin(pkt)]
    server_sal_fin = next(pkt for pkt in wire.from_(B) if sal_fin(pkt))
    assert server_sal_fin.control is not None
    for pkt in client_sal_fins:
        assert pkt.control is not None
        assert pkt.control.flags & ControlFlags.ACK
        assert pkt.control.ackno == (server_sal_fin.control.verno + 1) & 0xFFFFFFFF


def test_a_side_that_closed_second_but_acked_the_last_sal_fin_waits_to_ack_it_again() -> None:
    # The server writes and closes; a data segment before its FIN is lost, so its SAL FIN
    # arrives before the TCP FIN is in and is dropped (the spec: the SAL FIN follows the
    # FIN). The client reads to the end and closes (second): its own FIN and SAL FIN leave
    # before the server's SAL FIN comes again. When it does, the client's ACK of it is its
    # last packet; that ACK is lost. RFC 9293's rule for the last ACK: its sender must be
    # there to send it again (TIME_WAIT), or the peer's next FIN meets a RST.
    p = make_pair(seed=22)
    wire, c, s = connected(p)
    lost: list[str] = []

    def loss(data: bytes, src: Addr, dst: Addr) -> bool:
        pkt = decode_packet(data)
        if src == B and "data" not in lost and len(pkt.payload) == 1408:
            lost.append("data")
            return True
        ctl = pkt.control
        if (
            src == A
            and "ack" not in lost
            and ctl is not None
            and ctl.flags == ControlFlags.ACK
            and c.close.local is Stage.DONE
        ):
            lost.append("ack")
            return True
        return False

    p.net.loss_filter = loss
    data = random.Random(22).randbytes(3000)
    assert s.write(data) == len(data)
    s.shutdown()
    p.net.kick(p.b)
    got = bytearray()

    def eof() -> bool:
        got.extend(c.read())
        return c.at_eof

    assert p.net.run_until(eof, 10)
    assert bytes(got) == data
    assert c.close.remote is Stage.FIN_RECEIVED  # the SAL FIN is not in yet
    c.shutdown()
    p.net.kick(p.a)
    assert p.net.run_until(lambda: c.state in ENDED and s.state in ENDED, 30)
    p.net.run_for(10.0)
    assert lost == ["data", "ack"]
    assert wire.rsts() == []
    assert ended_cleanly(c) and ended_cleanly(s)
    assert p.a.stats.get("rst_sent", 0) == 0 and p.b.drops.get("unknown_flow", 0) == 0


# -- a close under an unreliable network, many seeds ------------------------------------
CLIENT_FIRST, SERVER_FIRST, SIMULTANEOUS = "client first", "server first", "simultaneous"


@dataclass
class Outcome:
    """What one close did: retransmitted close packets per side, RSTs on the wire."""

    fin_copies: dict[Addr, int]
    sal_fin_copies: dict[Addr, int]
    rsts: int
    took: float
    cut_by_rst: int  # ends that finished on a RST (the spec's close only)


def close_under(
    seed: int,
    link: LinkConfig,
    order: str,
    up: int = 0,
    down: int = 0,
    config: StreamConfig | None = None,
    server_config: StreamConfig | None = None,
    bound: float = 60.0,
) -> Outcome:
    """Connect, send ``up`` bytes client -> server and ``down`` back, close in ``order``
    (the first closer as soon as its own data is written, the other once it has written
    its own and read the end of stream; simultaneous: both in the same instant once
    everything is written), and check the
    independent expectations: every byte once and in order, both ends through both levels
    of the close without error within ``bound`` seconds."""
    p = make_pair(seed=seed, link=link, config=config, server_config=server_config)
    wire, c, s = connected(p)
    rng = random.Random(seed)
    data = {c: rng.randbytes(up), s: rng.randbytes(down)}
    written = {c: 0, s: 0}
    got = {c: bytearray(), s: bytearray()}
    first = {CLIENT_FIRST: c, SERVER_FIRST: s}.get(order)
    start = p.net.now
    while p.net.now - start < bound:
        for end in (c, s):
            if written[end] < len(data[end]):
                written[end] += end.write(data[end][written[end] : written[end] + 65536])
            if end.readable:
                got[end].extend(end.read())
        all_written = all(written[e] == len(data[e]) for e in (c, s))
        for end in (c, s):
            if end.fin_offset is not None or written[end] < len(data[end]):
                continue
            if all_written if first is None else end is first or end.at_eof:
                end.shutdown()
        p.net.kick(p.a, p.b)
        if c.state in ENDED and s.state in ENDED:
            break
        p.net.run_for(0.01)
    took = p.net.now - start
    assert c.state in ENDED and s.state in ENDED, (c.close, s.close, c.error, s.error)
    assert bytes(got[s]) == data[c] and bytes(got[c]) == data[s]
    assert c.error is None and s.error is None
    cut = [e for e in (c, s) if not ended_cleanly(e)]
    if c.compact_close:
        assert not cut, (c.close, s.close)
    else:
        # The spec's close keeps one hole (test_a_sal_fin_sent_after_the_peers_carries_
        # its_ack[False]): the side that closed first may end on the peer's RST, after
        # both TCP closes (nothing lost, no error: a RST-ended close, no TIME_WAIT).
        assert all(e.fin_acked and e.peer_fin_received for e in cut), (c.close, s.close)
    p.net.run_for(5.0)  # late copies and duplicates meet TIME_WAIT or a closed flow
    fins: Counter[Addr] = Counter()
    sal_fins: Counter[Addr] = Counter()
    for pkt, src in ((pkt, src) for _, src, pkt in wire.sent):
        fins[src] += tcp_fin(pkt)
        sal_fins[src] += sal_fin(pkt)
    return Outcome(dict(fins), dict(sal_fins), len(wire.rsts()), took, len(cut))


LOSSY = LinkConfig(delay=0.005, jitter=0.002, loss=0.1, duplicate=0.1, reorder=0.2)


@pytest.mark.parametrize("order", [SIMULTANEOUS, CLIENT_FIRST, SERVER_FIRST])
def test_simultaneous_and_ordered_closes_on_a_clean_path(order: str) -> None:
    out = close_under(31, LinkConfig(delay=0.005), order, up=5000, down=7000)
    # Nothing lost: each side sends its FIN and its SAL FIN once, and together (compact).
    assert out.fin_copies == {A: 1, B: 1} and out.sal_fin_copies == {A: 1, B: 1}
    assert out.rsts == 0


def test_a_simultaneous_close_packet_by_packet() -> None:
    # Both ends shut down in the same instant: each FIN + SAL FIN crosses the other's,
    # both closed first (RFC 9293 3.6, "simultaneous close": both wait in TIME_WAIT).
    p = make_pair(seed=32)
    wire, c, s = connected(p)
    c.shutdown()
    s.shutdown()
    p.net.kick(p.a, p.b)
    assert p.net.run_until(lambda: c.state in ENDED and s.state in ENDED, 5)
    assert ended_cleanly(c) and ended_cleanly(s)
    assert (len(p.a.time_wait), len(p.b.time_wait)) == (1, 1)
    close = [(src, pkt) for _, src, pkt in wire.sent][3:]
    # Each side: one FIN + SAL FIN (no ACK of a SAL FIN not yet seen), then one packet
    # with both ACKs; nothing else, and nothing answered twice.
    assert len(close) == 4
    for side in (A, B):
        fin, ack = [pkt for src, pkt in close if src == side]
        assert fin.control is not None and fin.control.flags == ControlFlags.FIN
        assert tcp_fin(fin)
        assert ack.control is not None and ack.control.flags == ControlFlags.ACK
        assert ack.tcp is not None and not tcp_fin(ack)
    for side, other in ((A, B), (B, A)):
        (fin,) = [pkt for src, pkt in close if src == other and tcp_fin(pkt)]
        ack = [pkt for src, pkt in close if src == side][1]
        assert fin.tcp is not None and ack.tcp is not None and fin.control is not None
        assert ack.tcp.ack == (fin.tcp.seq + 1) & 0xFFFFFFFF
        assert ack.control is not None
        assert ack.control.ackno == (fin.control.verno + 1) & 0xFFFFFFFF


@pytest.mark.parametrize("seed", range(12))
def test_a_lossy_simultaneous_close_ends_cleanly(seed: int) -> None:
    close_under(seed, LinkConfig(delay=0.005, loss=0.25), SIMULTANEOUS)


ORDERS = (SIMULTANEOUS, CLIENT_FIRST, SERVER_FIRST)


def _chaos_case(seed: int) -> dict[str, object]:
    """Seed -> order, sizes and who offers the compact close (both, or one side not)."""
    off = StreamConfig(compact_close=False)
    return {
        "order": ORDERS[seed % 3],
        "up": (seed % 4) * 3000,
        "down": (seed % 5) * 5000,
        "config": off if seed % 7 == 5 else None,
        "server_config": off if seed % 7 == 6 else None,
    }


@pytest.mark.parametrize("block", range(4))
def test_closes_under_loss_duplication_and_reordering(block: int) -> None:
    # Loss, duplicates and reordering on both directions, every order of close, data
    # both ways or none, one end without the compact close now and then.
    for seed in range(block * 15, block * 15 + 15):
        close_under(seed, LOSSY, **_chaos_case(seed))  # type: ignore[arg-type]


@pytest.mark.parametrize("block", range(2))
def test_closes_without_delayed_acks(block: int) -> None:
    for seed in range(block * 15, block * 15 + 15):
        cfg = StreamConfig(delayed_ack=0.0, ack_every=1 + seed % 3, compact_close=True)
        link = LinkConfig(delay=0.005, loss=0.05 * (seed % 3), duplicate=0.05, reorder=0.1)
        close_under(seed, link, ORDERS[seed % 3], (seed % 4) * 3000, (seed % 5) * 5000, cfg)


# -- forged, stale and aborting packets at each close stage -----------------------------
def _inject(p: Pair, pkt: SalPacket, src: Addr, dst: Addr) -> None:
    host = p.b if dst == B else p.a
    host.receive_datagram(pkt.encode(src[0], dst[0]), src, dst, p.net.now)
    p.net.kick(host)


def _from(c: Connection, flags: int, nonce: bytes | None = None, tcp_flags: int = 0,
          seq_shift: int = 0) -> SalPacket:  # fmt: skip
    """A packet as ``c`` would send it now: CONTROL ``flags`` (with ``nonce`` instead of
    its own if given), and a TCP header with ``tcp_flags`` at its next sequence number
    moved by ``seq_shift`` (none if ``tcp_flags`` is 0)."""
    sf = c.primary
    ext = sf.control.ext(flags)
    if nonce is not None:
        ext = ControlExt(ext.flags, ext.verno, ext.ackno, nonce)
    tcp = None
    if tcp_flags:
        tcp = sf.ack_header(tcp_flags | TcpFlags.ACK)
        tcp.seq = (tcp.seq + seq_shift) & 0xFFFFFFFF
    return SalPacket(sf.local_flowid, sf.remote_flowid, 6, [ext], tcp)


def _stage_of(s: Connection) -> tuple[State, Stage, Stage, bool]:
    return (s.state, s.close.local, s.close.remote, s.at_eof)


STAGES = ("open", "client fins sent", "server fins sent", "server waiting")


def _reach(p: Pair, stage: str) -> None:
    """Drive the pair to ``stage`` (the client's packets to the server are held where
    the stage needs it, so the server stays there)."""
    c, s = p.client, p.server
    assert c is not None and s is not None
    if stage == "open":
        return
    if stage == "client fins sent":
        p.net.loss_filter = lambda data, src, dst: src == A  # the client's close is lost
        c.shutdown()
        p.net.kick(p.a)
        p.net.run_for(0.02)
        assert c.close.local is Stage.FINS_SENT
        return
    s.shutdown()
    p.net.kick(p.b)
    if stage == "server fins sent":
        p.net.run_for(0.002)  # in flight
        assert s.close.local is Stage.FINS_SENT
        return
    assert p.net.run_until(lambda: c.at_eof, 5)
    p.net.loss_filter = lambda data, src, dst: src == A  # the client's answers are lost
    p.net.run_for(0.1)
    assert s.close.local is Stage.FINS_SENT


@pytest.mark.parametrize("stage", STAGES)
def test_sal_fins_with_a_wrong_nonce_or_an_out_of_window_fin_change_nothing(stage: str) -> None:
    p = make_pair(seed=41)
    _, c, s = connected(p)
    _reach(p, stage)
    before = _stage_of(s)
    dropped = p.b.drops["bad_nonce"]
    wrong = bytes(8)
    forged = [
        # An off-path guess: FIN + SAL FIN with a wrong nonce (a RST too).
        _from(c, ControlFlags.FIN, wrong, TcpFlags.FIN),
        _from(c, ControlFlags.FIN | ControlFlags.ACK, wrong, TcpFlags.FIN),
        _from(c, ControlFlags.RST, wrong),
        _from(c, ControlFlags.FIN, wrong),
    ]
    for pkt in forged:
        _inject(p, pkt, A, B)
    assert p.b.drops["bad_nonce"] == dropped + len(forged)
    assert _stage_of(s) == before
    # The right nonce, but its TCP FIN far outside the window (RFC 9293 3.10.7.4: not
    # acceptable, answered by an ACK at most): the SAL FIN riding on it must not count.
    # Ignored before the client's TCP FIN is in, it is counted as ignored on the flow.
    ignored = s.primary.control.ignored
    remote_open = s.close.remote is Stage.OPEN
    _inject(p, _from(c, ControlFlags.FIN, None, TcpFlags.FIN, seq_shift=1 << 30), A, B)
    _inject(p, _from(c, ControlFlags.FIN, None, TcpFlags.FIN, seq_shift=-(1 << 30)), A, B)
    assert _stage_of(s) == before
    assert s.primary.control.ignored == ignored + (2 if remote_open else 0)
    # And the close still ends cleanly once the path works again.
    p.net.loss_filter = None
    if c.fin_offset is None:
        if stage != "open":
            assert p.net.run_until(lambda: c.at_eof, 10)
        c.shutdown()
        p.net.kick(p.a)
    if s.fin_offset is None:
        assert p.net.run_until(lambda: s.at_eof, 10)
        s.shutdown()
        p.net.kick(p.b)
    assert p.net.run_until(lambda: c.state in ENDED and s.state in ENDED, 30)
    assert ended_cleanly(c) and ended_cleanly(s)


@pytest.mark.parametrize("stage", STAGES)
def test_a_genuine_rst_at_each_close_stage(stage: str) -> None:
    # RFC 9293 3.10.7: a RST in the window ends the connection. Its user hears of a reset
    # unless both directions were already through their TCP close (nothing lost then).
    p = make_pair(seed=42)
    _, c, s = connected(p)
    _reach(p, stage)
    both_tcp_closed = s.fin_acked and s.peer_fin_received
    _inject(p, _from(c, ControlFlags.RST), A, B)
    assert s.state is State.CLOSED
    assert (s.error is None) is both_tcp_closed
    p.net.loss_filter = None
    p.net.run_for(60.0)  # the client gets on with it, meets a RST or times out; no crash
    assert c.state in ENDED
    assert p.b.connections == {} and p.a.connections == {}


# -- TIME_WAIT answering repeated compact FINs, and the host's counters -----------------
def _compact_cycle(p: Pair) -> Wire:
    wire, c, s = connected(p)
    s.shutdown()
    p.net.kick(p.b)
    assert p.net.run_until(lambda: c.at_eof, 5)
    c.shutdown()
    p.net.kick(p.a)
    assert p.net.run_until(lambda: c.state in ENDED and s.state in ENDED, 5)
    assert ended_cleanly(c) and ended_cleanly(s)
    return wire


@pytest.mark.parametrize("record", [True, False])
def test_time_wait_answers_every_repeated_compact_fin_and_counts_the_rest(record: bool) -> None:
    p = make_pair(seed=51)
    p.b.compact_time_wait = record  # a small record, or the connection itself
    wire = _compact_cycle(p)
    assert len(p.b.time_wait) == (1 if record else 0)
    (client_fin,) = [pkt for pkt in wire.from_(A) if tcp_fin(pkt)]
    assert sal_fin(client_fin)
    last = wire.from_(B)[-1]  # the server's answer: both ACKs
    mark = len(wire.sent)
    answered = p.b.stats["time_wait_answered"]
    for _ in range(5):  # the client's FIN + SAL FIN again (its ACKs were lost, say)
        _inject(p, client_fin, A, B)
        p.net.run_for(0.001)
    p.net.run_for(0.5)
    answers = [pkt for _, src, pkt in wire.sent[mark:] if src == B]
    assert len(answers) == 5  # every copy answered, once each
    for pkt in answers:  # ... by the very ACKs it answered first: TCP and control
        assert pkt.encode(B[0], A[0]) == last.encode(B[0], A[0])
    if record:
        assert p.b.stats["time_wait_answered"] == answered + 5
    # The client forgot the flow (it closed second): each answer meets its RST (the
    # spec: a packet for an unknown flow is answered with RST), which TIME_WAIT drops.
    assert p.a.stats["rst_sent"] == 5 and ended_cleanly(p.server)  # type: ignore[arg-type]
    drops = Counter(p.b.drops)
    # Forged copies (a wrong nonce), a RST (RFC 1337: it must not end TIME_WAIT) and a
    # pure ACK (never answered: two TIME_WAITs would answer each other forever) are
    # dropped, each counted once under its own reason; nothing goes back.
    mark = len(wire.sent)
    forged = SalPacket(
        client_fin.src_flowid,
        client_fin.dst_flowid,
        6,
        [ControlExt(ControlFlags.FIN, 0, 0, bytes(8))],
        client_fin.tcp,
    )
    assert client_fin.control is not None
    rst = SalPacket(
        client_fin.src_flowid,
        client_fin.dst_flowid,
        6,
        [ControlExt(ControlFlags.RST, 0, 0, client_fin.control.nonce)],
    )
    assert client_fin.tcp is not None
    pure_ack = SalPacket(
        client_fin.src_flowid,
        client_fin.dst_flowid,
        6,
        [],
        TcpHeader(
            seq=(client_fin.tcp.seq + 1) & 0xFFFFFFFF,
            ack=client_fin.tcp.ack,
            flags=TcpFlags.ACK,
            window=client_fin.tcp.window,
        ),
    )
    for pkt in (forged, rst, pure_ack):
        _inject(p, pkt, A, B)
    p.net.run_for(0.5)
    assert [pkt for _, src, pkt in wire.sent[mark:] if src == B] == []
    s = p.server
    assert s is not None and ended_cleanly(s)  # the RST ended nothing
    if record:
        new = Counter(p.b.drops) - drops
        assert new == Counter(bad_nonce=1, time_wait_rst=1, time_wait_quiet=1)
    assert p.b.stats.get("rst_sent", 0) == 0
    p.net.run_for(40.0)  # TIME_WAIT ends: the flow is forgotten, and then a FIN meets a RST
    assert len(p.b.time_wait) == 0 and p.b.connections == {}
    _inject(p, client_fin, A, B)
    p.net.run_for(0.1)
    assert p.b.stats["rst_sent"] == 1


# -- a close during or right after a migration ------------------------------------------
class Moving:
    """A pair whose hosts have two addresses each (tests/test_core_migration.py's)."""

    def __init__(self, seed: int) -> None:
        from .test_core_migration import Setup

        self.s = Setup(seed=seed, compact_close=True)
        self.net, self.a, self.b = self.s.net, self.s.a, self.s.b
        self.client, self.server = self.s.client, self.s.server

    def finish(self, timeout: float = 30.0) -> None:
        c, s = self.client, self.server
        deadline = self.net.now + timeout
        while self.net.now < deadline and not (c.state in ENDED and s.state in ENDED):
            for end, host in ((c, self.a), (s, self.b)):
                end.read()
                if end.at_eof and end.fin_offset is None and end.state is State.ESTABLISHED:
                    end.shutdown()
                    self.net.kick(host)
            self.net.run_for(0.01)
        assert ended_cleanly(c) and ended_cleanly(s), (c.close, s.close, c.error, s.error)


def test_a_close_right_after_a_move_is_compact_from_the_new_address() -> None:
    from .test_core_migration import A1, A2

    m = Moving(61)
    assert m.a.migrate(m.client, A2, m.net.now)
    m.net.kick(m.a)
    assert m.net.run_until(lambda: m.server.primary.remote_addr == A2, 5)
    m.net.run_for(0.1)
    m.net.detach_address(A1)
    m.client.shutdown()
    m.net.kick(m.a)
    m.finish()
    assert m.client.primary.local_addr == A2


@pytest.mark.parametrize("mover", ["client", "server"])
def test_a_close_while_the_rsyn_is_outstanding(mover: str) -> None:
    # The move starts first (its RSYN takes the control channel), the client closes in
    # the same instant, and the mover's old address is gone at once: the SAL FIN cannot
    # ride on the FIN (one control exchange at a time), so the close falls back to the
    # spec's order, and still ends cleanly from the new address.
    from .test_core_migration import A1, A2, B1, B2

    m = Moving(62)
    host, conn, new, old = (m.a, m.client, A2, A1) if mover == "client" else (m.b, m.server, B2, B1)
    assert host.migrate(conn, new, m.net.now)
    m.net.kick(host)
    m.client.shutdown()
    m.net.kick(m.a)
    m.net.detach_address(old)
    m.finish()
    assert conn.primary.local_addr == new


def test_a_move_is_refused_while_a_compact_sal_fin_is_out_and_the_close_ends() -> None:
    # Host.migrate's contract: False while the connection is closing (its control channel
    # carries the SAL FIN, one exchange at a time). On a compact close that is from the
    # FIN's first transmission. The old address still works: the close ends there.
    from .test_core_migration import A1, A2

    m = Moving(63)
    m.client.shutdown()
    m.net.kick(m.a)
    assert m.client.close.local is Stage.FINS_SENT
    assert not m.a.migrate(m.client, A2, m.net.now)
    m.finish()
    assert m.client.primary.local_addr == A1


@pytest.mark.xfail(
    strict=True,
    reason="a move is refused while a SAL FIN is outstanding (the spec's close has the same "
    "window, from the FIN's ACK to the SAL FIN's); if the old address vanishes there, "
    "both ends time out",
)
def test_an_address_lost_during_fins_sent_still_lets_the_close_end() -> None:
    from .test_core_migration import A1, A2

    m = Moving(64)
    m.client.shutdown()
    m.net.kick(m.a)
    assert m.client.close.local is Stage.FINS_SENT
    m.a.migrate(m.client, A2, m.net.now)
    m.net.kick(m.a)
    m.net.detach_address(A1)
    m.finish(timeout=90.0)


# -- half-closes with a megabyte the other way; data + FIN in segment trains ------------
@pytest.mark.parametrize("order", [CLIENT_FIRST, SERVER_FIRST])
@pytest.mark.parametrize("loss", [0.0, 0.02])
def test_a_half_close_then_a_megabyte_the_other_way(order: str, loss: float) -> None:
    # The first closer shuts down at once (its FIN + SAL FIN leave first, both acked); the
    # other side then sends 1 MB into the half-closed stream and closes after it.
    mb = 1_000_000
    up, down = (0, mb) if order == CLIENT_FIRST else (mb, 0)
    out = close_under(71, LinkConfig(delay=0.005, loss=loss), order, up, down)
    if loss == 0.0:
        assert out.fin_copies == {A: 1, B: 1} and out.sal_fin_copies == {A: 1, B: 1}
    assert out.rsts == 0


@pytest.mark.parametrize("gso", [False, True])
@pytest.mark.parametrize("loss", [0.0, 0.05])
def test_large_writes_then_shutdown_end_trains_with_a_compact_fin(gso: bool, loss: float) -> None:
    # Both ends write 200 kB and shut down in the same call: the FIN ends a segment
    # train, and leaves in a packet of its own carrying the SAL FIN (a train's segments
    # cannot carry a CONTROL). Every byte arrives once, each side's FIN is sent once
    # without loss, and the segment with the FIN is the last of the data.
    p = make_pair(seed=72, link=LinkConfig(delay=0.005, loss=loss), gso=gso, gro=gso)
    wire, c, s = connected(p)
    rng = random.Random(72)
    up, down = rng.randbytes(200_000), rng.randbytes(200_000)
    assert c.write(up) == len(up) and s.write(down) == len(down)
    c.shutdown()
    s.shutdown()
    p.net.kick(p.a, p.b)
    got_up, got_down = bytearray(), bytearray()

    def done() -> bool:
        got_up.extend(s.read())
        got_down.extend(c.read())
        return c.state in ENDED and s.state in ENDED

    assert p.net.run_until(done, 60)
    assert bytes(got_up) == up and bytes(got_down) == down
    assert ended_cleanly(c) and ended_cleanly(s)
    assert wire.rsts() == []
    for side, data in ((A, up), (B, down)):
        fins = [pkt for pkt in wire.from_(side) if tcp_fin(pkt)]
        assert fins and all(sal_fin(pkt) for pkt in fins)  # always together (compact)
        if loss == 0.0:
            assert len(fins) == 1
        for fin in fins:
            assert fin.tcp is not None
            first_seq = next(
                pkt.tcp.seq for pkt in wire.from_(side) if pkt.tcp is not None and pkt.payload
            )
            # The FIN's sequence number is right after the last byte (RFC 9293 3.4).
            assert (fin.tcp.seq + len(fin.payload) - first_seq) & 0xFFFFFFFF == len(data)


def test_four_hundred_unreliable_closes_end_cleanly() -> None:
    # The seed loop at length: heavier loss, duplication and reordering, every order,
    # data or none, sometimes one end without the compact close. Each close must end
    # within the bound with every byte delivered and both ends through both levels (the
    # spec's close: after both TCP closes at least), whatever had to be sent again.
    link = LinkConfig(delay=0.005, jitter=0.003, loss=0.15, duplicate=0.1, reorder=0.25)
    resent = Counter[str]()
    for seed in range(400):
        case = _chaos_case(seed)
        out = close_under(seed, link, bound=120.0, **case)  # type: ignore[arg-type]
        for side, name in ((A, "client"), (B, "server")):
            resent[f"{name} FIN resent"] += out.fin_copies.get(side, 0) > 1
            resent[f"{name} SAL FIN resent"] += out.sal_fin_copies.get(side, 0) > 1
        resent["cut by RST (spec's close)"] += out.cut_by_rst > 0
        resent["RST on the wire"] += out.rsts > 0
    print(dict(resent))  # shown with -s: how often each side had to repair its close
    # (At 17611dc+fixes, of 400: a FIN resent by the client in 94, the server 107; a SAL
    # FIN in 214 and 223; RSTs on the wire in 47, all but the spec's 7 answering a late
    # duplicate ACK at a side that had forgotten the flow, dropped by TIME_WAIT.)


# -- a compact FIN standing in for a lost third ACK -------------------------------------
@pytest.mark.parametrize("data", [b"", b"hello"])
@pytest.mark.parametrize("compact", [True, False])
def test_a_fin_right_after_a_lost_third_ack_completes_the_handshake(
    data: bytes, compact: bool
) -> None:
    # The client connects, writes (or not) and shuts down at once; its third ACK is lost.
    # RFC 9293 3.10.7.4: in SYN-RECEIVED a segment with an acceptable ACK moves the
    # server to ESTABLISHED "and continue processing" (its data and FIN too). So the next
    # packet, the client's data + FIN (+ SAL FIN when compact), completes the handshake,
    # and the close costs no retransmission timeout of either side.
    p = make_pair(seed=81, config=StreamConfig(compact_close=compact))
    wire = watch(p)
    lost: list[SalPacket] = []

    def third_ack(raw: bytes, src: Addr, dst: Addr) -> bool:
        pkt = decode_packet(raw)
        tcp = pkt.tcp
        # The third ACK: the client's packet with a SERVICE and a TCP header, not the SYN.
        third = src == A and pkt.service is not None and tcp is not None
        if third and not lost and tcp is not None and not tcp.flags & TcpFlags.SYN:
            lost.append(pkt)
            return True
        return False

    p.net.loss_filter = third_ack
    c = p.a.connect("echo", p.net.now)
    p.net.kick(p.a)
    assert p.net.run_until(lambda: c.state is State.ESTABLISHED, 1)
    assert c.write(data) == len(data)
    c.shutdown()
    p.net.kick(p.a)
    got = bytearray()
    server: list[Connection] = []

    def closed() -> bool:
        if not server and (s := p.listener.accept()) is not None:
            server.append(s)
        for s in server:
            got.extend(s.read())
            if s.at_eof and s.fin_offset is None:
                s.shutdown()
                p.net.kick(p.b)
        return bool(server) and c.state in ENDED and server[0].state in ENDED

    start = p.net.now
    assert p.net.run_until(closed, 10)
    assert len(lost) == 1 and bytes(got) == data
    assert ended_cleanly(c) and ended_cleanly(server[0])
    # Compact: FIN + SAL FIN, both ACKs with the server's FIN + SAL FIN, the last ACKs:
    # 3 one-way delays of 5 ms. The spec's close: 6 (FIN, FIN+ACK, SAL FIN, FIN+ACK,
    # ACK ... as test_compact_close counts them).
    assert p.net.now - start < 0.05
    assert p.b.drops.get("unexpected_packet", 0) == 0
    assert not [pkt for pkt in wire.from_(A) if tcp_fin(pkt)][1:]  # the FIN went once


def test_the_ack_of_a_compact_sal_fin_is_enough_when_no_tcp_ack_comes() -> None:
    # A simultaneous close where every server packet with a TCP header is lost after the
    # server's FIN: the client hears only control ACKs from the server's TIME_WAIT (its
    # answer to the SAL FIN copies that travel alone). The peer takes a SAL FIN only once
    # it has the TCP FIN and every byte before it (the spec's order, which the compact
    # close keeps at the receiver), so that ACK says the stream arrived whole: the client
    # is done, and must not go on sending its FIN until the server's TIME_WAIT is over
    # and it meets a RST ("reset by peer" although nothing was lost).
    cfg = StreamConfig(time_wait=2.0, compact_close=True)
    p = make_pair(seed=91, config=cfg)
    wire, c, s = connected(p)

    def server_tcp_after_its_fin(data: bytes, src: Addr, dst: Addr) -> bool:
        pkt = decode_packet(data)
        return src == B and pkt.tcp is not None and not tcp_fin(pkt)

    p.net.loss_filter = server_tcp_after_its_fin
    c.shutdown()
    s.shutdown()
    p.net.kick(p.a, p.b)
    assert p.net.run_until(lambda: c.state in ENDED and s.state in ENDED, 120)
    p.net.run_for(30.0)
    assert c.error is None and s.error is None
    assert ended_cleanly(c) and ended_cleanly(s)
    assert wire.rsts() == []


@pytest.mark.parametrize("when", ["before the close", "client fins sent", "server fin in flight"])
def test_a_nat_rebinding_during_the_close_is_checked_and_the_close_ends(when: str) -> None:
    # The client's NAT gives it a new public port around the close: the server sees the
    # close packets from an address it has not verified, checks it (an address challenge,
    # holding what came from there), then takes them. Both ends finish cleanly.
    from .test_core_migration import Setup

    m = Setup(seed=65, nat=True, compact_close=True)
    assert m.nat is not None
    c, s = m.client, m.server
    if when == "before the close":
        m.nat.rebind()
        c.shutdown()
        m.net.kick(m.a)
    elif when == "client fins sent":
        c.shutdown()
        m.net.kick(m.a)
        m.net.run_for(0.001)
        assert c.close.local is Stage.FINS_SENT
        m.nat.rebind()
    else:
        s.shutdown()
        m.net.kick(m.b)
        m.net.run_for(0.015)
        m.nat.rebind()
    deadline = m.net.now + 30.0
    while m.net.now < deadline and not (c.state in ENDED and s.state in ENDED):
        for end, host in ((c, m.a), (s, m.b)):
            if end.at_eof and end.fin_offset is None and end.state is State.ESTABLISHED:
                end.shutdown()
                m.net.kick(host)
        m.net.run_for(0.01)
    assert ended_cleanly(c) and ended_cleanly(s)
    assert m.b.stats["rebinding_challenge"] == 1 and m.b.stats["held_replayed"] >= 1


@pytest.mark.parametrize("stage", STAGES)
def test_an_abort_at_each_close_stage_resets_the_peer(stage: str) -> None:
    # RFC 9293 3.10.4 ABORT: a RST goes to the peer (except from TIME-WAIT), which drops
    # the connection; its user hears of a reset unless both TCP closes were done.
    p = make_pair(seed=43)
    _, c, s = connected(p)
    _reach(p, stage)
    p.net.loss_filter = None
    peer_done = c.fin_acked and c.peer_fin_received
    s.abort()
    p.net.kick(p.b)
    assert p.net.run_until(lambda: c.state is State.CLOSED, 2)
    assert s.state is State.CLOSED and s.error == "aborted locally"
    assert (c.error is None) is peer_done
    p.net.run_for(60.0)
    assert p.a.connections == {} and p.b.connections == {}

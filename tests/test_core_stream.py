"""Serval TCP streams over the simulated network: reliability, layout, congestion control."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyserval.sal import (
    PROTO_TCP,
    ControlFlags,
    SalPacket,
    TcpFlags,
    TcpHeader,
    TcpOption,
    decode_packet,
)
from pyserval.testing import LinkConfig
from pyserval.transport.config import StreamConfig
from pyserval.transport.connection import State

from .simhelpers import A, B, exchange, make_pair


def _assert_clean(pair) -> None:  # type: ignore[no-untyped-def]
    assert pair.a.internal_errors == [] and pair.b.internal_errors == []


@settings(max_examples=60)
@given(
    up_size=st.integers(0, 3_000_000),
    down_size=st.integers(0, 1_000_000),
    loss=st.floats(0.0, 0.3),
    duplicate=st.floats(0.0, 0.2),
    reorder=st.floats(0.0, 0.3),
    seed=st.integers(0, 2**16),
    congestion=st.sampled_from(["cubic", "newreno"]),
    sack=st.booleans(),
)
def test_stream_survives_loss_duplication_reordering(
    up_size: int,
    down_size: int,
    loss: float,
    duplicate: float,
    reorder: float,
    seed: int,
    congestion: str,
    sack: bool,
) -> None:
    link = LinkConfig(delay=0.01, jitter=0.002, loss=loss, duplicate=duplicate, reorder=reorder)
    cfg = StreamConfig(congestion=congestion, sack=sack, time_wait=5.0)
    # The handshake on a clean link: a server gives half-open state up after about a minute
    # (issue 11), which at 30% loss each way a handshake can outlast; lossy handshakes are
    # tested in test_core_handshake.py. Everything after it runs on the lossy link.
    pair = make_pair(seed=seed, link=LinkConfig(delay=0.01), config=cfg)
    pair.connect()
    pair.net.default_link = link
    rng = random.Random(seed)
    up, down = rng.randbytes(up_size), rng.randbytes(down_size)
    exchange(pair, up, down)
    client, server = pair.client, pair.server
    assert client is not None and server is not None
    assert pair.net.run_until(
        lambda: client.state is not State.ESTABLISHED and server.state is State.CLOSED,
        3600,
    ), "close did not complete"
    assert client.state in (State.TIME_WAIT, State.CLOSED)
    assert client.error is None and server.error is None
    _assert_clean(pair)


@pytest.mark.slow
@pytest.mark.parametrize("loss", [0.0, 0.05, 0.3])
def test_several_megabytes_both_ways(loss: float) -> None:
    link = LinkConfig(delay=0.01, loss=loss, duplicate=0.02, reorder=0.05)
    pair = make_pair(seed=7, link=link, config=StreamConfig(receive_buffer=4 << 20))
    pair.connect()
    rng = random.Random(7)
    size = 4_000_000 if loss < 0.3 else 1_000_000
    exchange(pair, rng.randbytes(size), rng.randbytes(size // 2), timeout=36_000)
    _assert_clean(pair)


def test_packets_have_the_reference_layout() -> None:
    seen: list[tuple[bytes, tuple[str, int], tuple[str, int]]] = []
    pair = make_pair(seed=2)
    pair.net.tap = lambda t, data, src, dst, fate: (
        seen.append((data, src, dst)) if fate == "delivered" else None
    )
    pair.connect()
    exchange(pair, b"hello serval" * 500, b"")
    pair.net.run_for(60)
    packets = [(decode_packet(d), s, t) for d, s, t in seen]
    for p, src, dst in packets:
        assert p.verify_transport_checksum(src[0], dst[0])
        assert p.encode() == p.encode()  # encodable as decoded
    kinds = []
    for p, _, _ in packets:
        c = p.control
        names = [type(e).__name__ for e in p.extensions]
        if c is None:
            assert p.shl == 3 and names == [] and p.tcp is not None  # data / pure ACK
            kinds.append("tcp")
        elif c.flags == ControlFlags.SYN:
            assert names == ["ControlExt", "ServiceExt"] and p.dst_flowid == 0 and p.shl == 17
            assert p.tcp is not None and p.tcp.flags == TcpFlags.SYN and p.tcp.mss == 1408
            kinds.append("syn")
        elif c.flags == ControlFlags.SYN | ControlFlags.ACK:
            assert names == ["ControlExt"] and p.tcp is not None
            assert p.tcp.flags == TcpFlags.SYN | TcpFlags.ACK
            kinds.append("synack")
        elif c.flags == ControlFlags.ACK and p.service is not None:
            assert names == ["ControlExt", "ServiceExt"] and p.tcp is not None
            kinds.append("third_ack")
        elif c.flags == ControlFlags.FIN:
            assert names == ["ControlExt"] and p.transport is None and p.shl == 8
            kinds.append("sal_fin")
        elif c.flags == ControlFlags.ACK:
            assert names == ["ControlExt"] and p.transport is None
            kinds.append("sal_ack")
    assert kinds[:3] == ["syn", "synack", "third_ack"]
    assert kinds.count("sal_fin") == 2 and kinds.count("sal_ack") == 2
    # Control numbers: SYN verno = ISS; SYN-ACK acks ISS+1; third ACK verno ISS+1.
    syn, synack, third = (p for p, _, _ in packets[:3])
    assert syn.control and synack.control and third.control
    assert synack.control.ackno == (syn.control.verno + 1) & 0xFFFFFFFF
    assert third.control.verno == (syn.control.verno + 1) & 0xFFFFFFFF
    assert third.control.ackno == (synack.control.verno + 1) & 0xFFFFFFFF
    assert third.control.nonce == syn.control.nonce
    # Transport FIN comes before the SAL FIN in each direction.
    tcp_fin_at = [i for i, (p, _, _) in enumerate(packets) if p.tcp and p.tcp.flags & TcpFlags.FIN]
    sal_fin_at = [i for i, k in enumerate(kinds) if k == "sal_fin"]
    assert tcp_fin_at and min(tcp_fin_at) < min(sal_fin_at)
    _assert_clean(pair)


def test_slow_reader_slows_the_sender() -> None:
    cfg = StreamConfig(receive_buffer=32 * 1024, send_buffer=64 * 1024)
    pair = make_pair(seed=4, config=cfg)
    pair.connect()
    client, server = pair.client, pair.server
    assert client is not None and server is not None
    data = random.Random(1).randbytes(1_000_000)
    sent = client.write(data)
    pair.net.kick(pair.a)
    pair.net.run_for(5)
    # Nobody reads: the receiver holds at most its buffer, the sender at most its own.
    assert server.readable <= 32 * 1024
    assert sent <= 64 * 1024
    got = bytearray()
    while len(got) < len(data):
        got += server.read()
        sent += client.write(data[sent:])
        pair.net.kick(pair.a, pair.b)
        pair.net.run_for(0.05)
        assert server.readable <= 32 * 1024
    assert bytes(got) == data
    _assert_clean(pair)


@pytest.mark.parametrize("congestion", ["cubic", "newreno"])
def test_congestion_control_converges_on_a_bottleneck(congestion: str) -> None:
    rate = 1_000_000  # bytes/s
    link = LinkConfig(delay=0.02, bandwidth=rate, queue_limit=64 * 1024)
    cfg = StreamConfig(receive_buffer=4 << 20, congestion=congestion)
    pair = make_pair(seed=5, link=link, config=cfg)
    pair.connect()
    client, server = pair.client, pair.server
    assert client is not None and server is not None
    data = bytes(6_000_000)
    sent = got = 0
    start = pair.net.now
    marks: list[tuple[float, int]] = []
    while got < len(data):
        sent += client.write(data[sent : sent + 1 << 20])
        got += len(server.read())
        pair.net.kick(pair.a, pair.b)
        pair.net.run_for(0.1)
        marks.append((pair.net.now - start, got))
    elapsed = pair.net.now - start
    # Steady state: the second half of the transfer runs near the link rate.
    t_half = next(t for t, g in marks if g >= len(data) // 2)
    steady = (len(data) - len(data) // 2) / (elapsed - t_half)
    stats = pair.net.link_stats(A[0], B[0])
    loss_rate = stats.dropped.get("queue", 0) / max(1, stats.sent_packets)
    print(f"{congestion}: steady {steady / rate:.2%} of link rate, loss {loss_rate:.2%}")
    assert steady > 0.8 * rate
    assert loss_rate < 0.05
    _assert_clean(pair)


def test_connection_through_a_nat() -> None:
    """The responder answers to the address the SYN came from, so flows cross a NAT."""
    pair = make_pair(seed=9)
    nat = pair.net.add_nat([A[0]], "192.0.2.1")
    pair.connect()
    assert pair.server is not None and pair.server.primary.remote_addr is not None
    assert pair.server.primary.remote_addr[0] == "192.0.2.1"
    rng = random.Random(9)
    exchange(pair, rng.randbytes(300_000), rng.randbytes(100_000))
    assert nat.mappings
    _assert_clean(pair)


def test_slow_start_overshoot_is_repaired_without_a_retransmission_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Slow start overflows a one-BDP queue; lost retransmissions must be caught by the
    SACK scoreboard (RACK's rule), not by the timer: before it, 4 MB took 1.4 s and 2 RTOs."""
    from pyserval.transport import connection

    rtos = [0]
    original = connection.Subflow._on_rto

    def counting(self: connection.Subflow, now: float) -> None:
        rtos[0] += 1
        original(self, now)

    monkeypatch.setattr(connection.Subflow, "_on_rto", counting)
    cfg = StreamConfig(send_buffer=4 << 20, receive_buffer=4 << 20)
    p = make_pair(
        seed=1, link=LinkConfig(delay=0.01, bandwidth=5e6, queue_limit=100_000), config=cfg
    )
    p.connect()
    assert p.client is not None and p.server is not None
    data = random.Random(1).randbytes(4_000_000)
    start = p.net.now
    sent, got = 0, bytearray()
    while len(got) < len(data) and p.net.now < start + 60:
        if sent < len(data):
            sent += p.client.write(data[sent : sent + 262144])
            p.net.kick(p.a)
        p.net.run_for(0.005)
        got += p.server.read()
    assert bytes(got) == data
    assert rtos[0] == 0 and p.net.now - start < 1.1


def test_a_peer_acknowledging_part_of_a_resent_segment_does_not_kill_the_sender() -> None:
    """A peer's ACKs that pass every check the sender makes: one moves the left edge a byte
    into a resent segment and SACKs a later resend (so RACK finds the rest lost again),
    the next, read with it, acknowledges everything. Before the fix the rest was queued
    twice for resending, the second ACK left one entry behind, and the KeyError it caused
    aborted the connection as an internal error."""
    mss = StreamConfig().mss
    p = make_pair(seed=1)
    p.connect()
    client, server = p.client, p.server
    assert client is not None and server is not None
    c = client.primary
    # The server's own ACKs are lost; the peer's ACKs below stand in for them.
    p.net.loss_filter = lambda data, src, dst: src == B
    data = random.Random(1).randbytes(10 * mss)
    client.write(data)
    p.net.kick(p.a)
    p.net.run_for(0.01)

    def ack(offset: int, *blocks: tuple[int, int]) -> bytes:
        wire = [(c.wire_seq(lo), c.wire_seq(hi)) for lo, hi in blocks]
        tcp = TcpHeader(
            seq=(c.irs + 1 + client.recv.rcv_nxt) & 0xFFFFFFFF,
            ack=c.wire_seq(offset),
            flags=TcpFlags.ACK,
            window=0xFFFF,
            options=[TcpOption.sack(wire)] if wire else [],
        )
        pkt = SalPacket(c.remote_flowid, c.local_flowid, PROTO_TCP, [], tcp)
        return pkt.encode(B[0], A[0])

    def step(seconds: float, *datagrams: bytes) -> None:
        p.a.receive_datagrams([(d, B) for d in datagrams], A, p.net.now)
        p.net.kick(p.a)
        p.net.run_for(seconds)

    segs = c.recovery.segments
    step(0.005, ack(0, (3 * mss, 10 * mss)))  # the first three lost: two resent at once
    first_resend = segs[0].sent_at
    assert c.recovery.in_recovery and segs[mss].sent_at == first_resend
    step(0.015, ack(0, (mss, 2 * mss), (3 * mss, 10 * mss)))  # room for the third
    min_rtt = c.rtt.min_rtt
    assert min_rtt is not None and segs[2 * mss].sent_at > first_resend + min_rtt / 4
    step(0.0, ack(1, (mss, 10 * mss)), ack(10 * mss))
    p.net.loss_filter = None
    assert p.a.internal_errors == [] and client.error is None
    assert client.state is State.ESTABLISHED and c.snd_una == 10 * mss
    more = random.Random(2).randbytes(5 * mss)  # and the connection still carries data
    client.write(more)
    p.net.kick(p.a)
    got = bytearray()

    def arrived() -> bool:
        got.extend(server.read())
        return len(got) >= len(data) + len(more)

    assert p.net.run_until(arrived, 10.0)
    assert bytes(got) == data + more
    _assert_clean(p)

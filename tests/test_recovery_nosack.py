"""Loss recovery against peers without SACK (the reference Serval TCP ignores
SACK-permitted): fast retransmit, NewReno partial ACKs (RFC 6582), limited transmit
(RFC 3042), and the receiver's one duplicate ACK per out-of-order segment (RFC 5681 4.2)."""

from __future__ import annotations

import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyserval.sal import decode_packet
from pyserval.transport.config import StreamConfig

from .nosackhelpers import MSS, transfer
from .simhelpers import A, B, make_pair

MIB = 1 << 20
SACK_ENDS = [
    pytest.param(True, False, id="server-no-sack"),
    pytest.param(False, True, id="client-no-sack"),
    pytest.param(False, False, id="no-sack"),
]


@pytest.mark.parametrize(("client_sack", "server_sack"), SACK_ENDS)
@pytest.mark.parametrize("congestion", ["cubic", "newreno"])
def test_isolated_single_losses_cause_no_timeout(
    client_sack: bool, server_sack: bool, congestion: str
) -> None:
    # Every 37th segment lost once, the last one excepted (with nothing after it, no
    # duplicate ACK can report it): each is resent once, by fast retransmit.
    segments = -(-MIB // MSS)
    victims = {i * MSS for i in range(5, segments - 1, 37)}
    r = transfer(
        MIB,
        client_sack=client_sack,
        server_sack=server_sack,
        congestion=congestion,
        drop=lambda offset, nth: nth == 1 and offset in victims,
    )
    assert sorted(r.dropped) == sorted(victims)
    assert r.timeouts == 0
    assert {o: n for o, n in r.sends.items() if n > 1} == dict.fromkeys(victims, 2)


@pytest.mark.parametrize(("client_sack", "server_sack"), SACK_ENDS)
def test_a_loss_near_the_end_is_resent_without_a_timeout(
    client_sack: bool, server_sack: bool
) -> None:
    # The second-to-last segment: only one duplicate ACK can come (early retransmit).
    size = 50 * MSS
    victim = 48 * MSS
    r = transfer(
        size,
        client_sack=client_sack,
        server_sack=server_sack,
        drop=lambda offset, nth: nth == 1 and offset == victim,
    )
    assert r.dropped == [victim] and r.timeouts == 0


@pytest.mark.parametrize("burst", [2, 5, 12])
def test_a_burst_is_repaired_by_partial_acks_without_a_timeout(burst: int) -> None:
    # RFC 6582: each partial ACK resends the next hole; one RTT per hole, well within the RTO.
    first = 200 * MSS
    victims = {first + i * MSS for i in range(burst)}
    r = transfer(MIB, drop=lambda offset, nth: nth == 1 and offset in victims)
    assert r.timeouts == 0
    assert {o: n for o, n in r.sends.items() if n > 1} == dict.fromkeys(victims, 2)


def test_a_lost_retransmission_is_repaired_by_the_timeout() -> None:
    # Without SACK nothing tells the sender that its retransmission was lost too: the RTO
    # does, once, and the segment goes a third time.
    victim = 300 * MSS
    r = transfer(MIB, drop=lambda offset, nth: offset == victim and nth <= 2)
    assert r.dropped == [victim, victim]
    assert r.timeouts == 1
    assert r.sends[victim] == 3


def test_losses_in_successive_windows_each_recover_fast() -> None:
    # A segment sent during one recovery lost as well: a second fast recovery, no timeout.
    victims = {100 * MSS, 100 * MSS + 40 * MSS, 100 * MSS + 90 * MSS}
    r = transfer(MIB, drop=lambda offset, nth: nth == 1 and offset in victims)
    assert r.timeouts == 0
    assert {o: n for o, n in r.sends.items() if n > 1} == dict.fromkeys(victims, 2)


def test_one_percent_loss_without_sack_is_within_1_5x_of_sack() -> None:
    # The acceptance figure: medians over 20 seeds of the virtual transfer time of
    # 1 MiB at 1% random loss (both directions), SACK disabled at the receiver vs enabled.
    with_sack = [transfer(MIB, seed=s, loss=0.01, server_sack=True).seconds for s in range(20)]
    without = [transfer(MIB, seed=s, loss=0.01, server_sack=False).seconds for s in range(20)]
    assert statistics.median(without) <= 1.5 * statistics.median(with_sack)


@settings(max_examples=100, deadline=None)
@given(
    losses=st.dictionaries(st.integers(0, 140), st.integers(1, 3), max_size=12),
    ends=st.sampled_from([(True, False), (False, True), (False, False)]),
    congestion=st.sampled_from(["cubic", "newreno"]),
    size=st.integers(1, 140 * MSS),
    random_loss=st.sampled_from([0.0, 0.02, 0.1]),
    seed=st.integers(0, 1000),
)
def test_transfers_stay_byte_exact_under_any_loss_pattern(
    losses: dict[int, int],
    ends: tuple[bool, bool],
    congestion: str,
    size: int,
    random_loss: float,
    seed: int,
) -> None:
    # losses: segment index -> how many of its first sendings are lost; random_loss hits
    # every packet (ACKs too) on top.
    client_sack, server_sack = ends
    r = transfer(
        size,
        seed=seed,
        loss=random_loss,
        client_sack=client_sack,
        server_sack=server_sack,
        congestion=congestion,
        drop=lambda offset, nth: nth <= losses.get(offset // MSS, 0),
    )
    for offset in r.dropped:  # every loss was repaired (transfer() checked the bytes)
        assert r.sends[offset] > r.dropped.count(offset)


def _held_segments(n: int) -> tuple[object, list[bytes]]:
    """A connected pair whose client sent ``n`` + 1 data segments that the network held."""
    pair = make_pair(
        seed=3,
        config=StreamConfig(sack=False),
        server_config=StreamConfig(sack=False),
    )
    pair.connect()
    assert pair.client is not None
    held: list[bytes] = []

    def hold(data: bytes, src: tuple[str, int], dst: tuple[str, int]) -> bool:
        if src == A and decode_packet(data).payload:
            held.append(data)
            return True
        return False

    pair.net.loss_filter = hold
    pair.client.write(bytes((n + 1) * MSS))
    pair.net.kick(pair.a)
    assert len(held) == n + 1
    return pair, held


def _acks(out: list[tuple[bytes, tuple[str, int], tuple[str, int]]]) -> list[int]:
    acks = []
    for data, _, _ in out:
        pkt = decode_packet(data)
        if pkt.tcp is not None and not pkt.payload:
            acks.append(pkt.tcp.ack)
    return acks


@pytest.mark.parametrize("n", [1, 3, 8])
def test_each_out_of_order_segment_gets_its_own_duplicate_ack(n: int) -> None:
    pair, held = _held_segments(n)
    core = pair.b  # type: ignore[attr-defined]
    now = pair.net.now  # type: ignore[attr-defined]
    # One receive batch: the first segment is missing, the n after it arrive together.
    for data in held[1:]:
        core.receive_datagram(data, A, B, now)
    acks = _acks(core.datagrams_to_send(now))
    first_seq = decode_packet(held[0]).tcp.seq  # type: ignore[union-attr]
    assert acks == [first_seq] * n  # all duplicates, naming the hole


def test_in_order_segments_in_one_batch_share_an_ack() -> None:
    pair, held = _held_segments(3)
    core = pair.b  # type: ignore[attr-defined]
    now = pair.net.now  # type: ignore[attr-defined]
    for data in held:
        core.receive_datagram(data, A, B, now)
    last = decode_packet(held[-1])
    assert last.tcp is not None
    # Delayed ACKs for in-order data: one cumulative ACK for the batch (every second
    # segment is owed one, and one is enough).
    assert _acks(core.datagrams_to_send(now)) == [(last.tcp.seq + MSS) & 0xFFFFFFFF]

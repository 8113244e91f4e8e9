"""Hosts driven by the simulated network as the UDP adapter drives them on Linux: segment
trains cut into datagrams (GSO) and what arrives at one instant handed over in one batch
(GRO; the sim's own side of it is tested in test_netsim.py).

The batches must change which code paths run, not what the protocol does: the same
datagrams on the wire for GSO, and for GRO one ACK per run of in-order data but still one
immediate ACK per out-of-order segment (RFC 5681 section 4.2), which a sender without SACK
needs to repair a loss without a timeout.
"""

from __future__ import annotations

import random

import pytest

from pyserval.sal import decode_packet, train
from pyserval.testing import LinkConfig
from pyserval.testing.netsim import TraceEvent
from pyserval.transport.config import StreamConfig

from .nosackhelpers import MSS, transfer
from .simhelpers import A, B, Pair, exchange, make_pair

Address = tuple[str, int]


LOSSY = LinkConfig(delay=0.005, jitter=0.002, loss=0.02, reorder=0.05, duplicate=0.01)
BOTTLENECK = LinkConfig(delay=0.002, bandwidth=5e6, queue_limit=60_000)


def _exchange(seed: int, link: LinkConfig, gso: bool, gro: bool) -> tuple[list[TraceEvent], Pair]:
    """A traced exchange of 300 kB each way at once (SACK on); ``exchange`` checks that
    every byte arrived intact."""
    pair = make_pair(seed=seed, link=link, trace=True, gso=gso, gro=gro)
    pair.connect()
    rng = random.Random(seed)
    exchange(pair, rng.randbytes(300_000), rng.randbytes(300_000))
    return pair.net.trace, pair


@pytest.mark.parametrize("vector", [True, False], ids=["numpy", "pure"])
@pytest.mark.parametrize("link", [LinkConfig(delay=0.005), LOSSY], ids=["clean", "lossy"])
def test_trains_cut_by_the_sim_put_the_same_datagrams_on_the_wire(
    link: LinkConfig, vector: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not vector:
        monkeypatch.setattr(train, "vector_module", lambda: None)
    per_packet, _ = _exchange(3, link, gso=False, gro=False)
    trained, _ = _exchange(3, link, gso=True, gro=False)
    assert len(trained) > 1000  # a real transfer (with losses on the lossy link)
    assert trained == per_packet  # the same times, fates, addresses and bytes


@pytest.mark.parametrize("link", [LOSSY, BOTTLENECK], ids=["lossy", "bottleneck"])
def test_exchanges_over_trains_and_batches_deliver_every_byte(link: LinkConfig) -> None:
    trace, pair = _exchange(11, link, gso=True, gro=True)
    assert sum(1 for ev in trace if ev.fate == "sent") > 400
    # Nothing went wrong inside a host on the batch paths (an exception there is caught,
    # counted and the packet dropped: the exchange would still finish by retransmission).
    for host in (pair.a, pair.b):
        assert host.stats["internal_error"] == 0 and not host.internal_errors


def _data_and_acks(trace: list[TraceEvent]) -> tuple[list[tuple[int, int]], list[int]]:
    """What the server was delivered (time index, client data sequence number) and the
    acknowledgment numbers of the pure ACKs it delivered back, in order."""
    data: list[tuple[int, int]] = []
    acks: list[int] = []
    for n, ev in enumerate(trace):
        if ev.fate != "delivered":
            continue
        pkt = decode_packet(ev.data)
        tcp = pkt.tcp
        if tcp is None:
            continue
        if ev.src == A and pkt.payload:
            # (The last segment may carry the SAL FIN as well: the compact close.)
            data.append((n, tcp.seq))
        elif ev.src == B and not pkt.payload and pkt.control is None:
            acks.append(tcp.ack)
    return data, acks


def _one_way(gro: bool, size: int, drop_index: int | None = None) -> tuple[Pair, list[TraceEvent]]:
    """``size`` bytes client -> server without SACK, the ``drop_index``-th data segment
    the client sends lost once; GSO and GRO as ``gro`` says."""
    cfg = StreamConfig(sack=False, send_buffer=size, receive_buffer=size)
    pair = make_pair(seed=5, config=cfg, server_config=cfg, trace=True, gso=gro, gro=gro)
    seen: list[int] = []

    def lose(data: bytes, src: Address, dst: Address) -> bool:
        if src != A:
            return False
        pkt = decode_packet(data)
        if pkt.tcp is None or not pkt.payload or pkt.tcp.seq in seen:
            return False
        seen.append(pkt.tcp.seq)
        return len(seen) - 1 == drop_index

    pair.net.loss_filter = lose
    pair.connect()
    exchange(pair, random.Random(5).randbytes(size), b"")
    return pair, pair.net.trace


def test_under_gro_a_run_of_in_order_data_is_acknowledged_once() -> None:
    size = 1 << 20
    segments = -(-size // MSS)
    _, per_packet = _one_way(False, size)
    _, batched = _one_way(True, size)
    per_packet_acks = _data_and_acks(per_packet)[1]
    data, gro_acks = _data_and_acks(batched)
    assert len(data) == segments
    # Datagram by datagram: an ACK at least every second segment (RFC 5681 4.2).
    assert len(per_packet_acks) >= segments // 2
    # Under GRO the flights came as runs, each acknowledged once: far fewer ACKs.
    assert len(gro_acks) < len(per_packet_acks) // 4


@pytest.mark.parametrize(
    ("client_sack", "server_sack"),
    [(True, False), (False, True), (False, False)],
    ids=["server-no-sack", "client-no-sack", "no-sack"],
)
def test_under_gro_a_loss_near_the_end_is_resent_without_a_timeout(
    client_sack: bool, server_sack: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The second-to-last segment lost: the last one's duplicate ACK is the only signal
    # (early retransmit), and it must not be folded into the ACK of the run before it.
    monkeypatch.setenv("PYSERVAL_SIM_BATCHES", "1")
    r = transfer(
        50 * MSS,
        client_sack=client_sack,
        server_sack=server_sack,
        drop=lambda offset, nth: nth == 1 and offset == 48 * MSS,
    )
    assert r.dropped == [48 * MSS] and r.timeouts == 0


def test_under_gro_every_out_of_order_segment_gets_its_own_duplicate_ack() -> None:
    _, trace = _one_way(True, 200 * MSS, drop_index=100)
    data, acks = _data_and_acks(trace)
    seqs = [seq for _, seq in data]
    # The lost segment is the one whose sequence number is delivered only after a later one.
    first = seqs[0]
    offsets = [(seq - first) & 0xFFFFFFFF for seq in seqs]
    lost = next(o for i, o in enumerate(offsets) if i and o < offsets[i - 1])
    filled = offsets.index(lost)
    above = sum(1 for o in offsets[:filled] if o > lost)
    assert above >= 3  # enough for fast retransmit
    # The server's ACKs naming the hole: one per segment above it (RFC 5681 4.2), and one
    # more for the run that ended at the hole.
    naming = sum(1 for a in acks if (a - first) & 0xFFFFFFFF == lost)
    assert naming == above + 1

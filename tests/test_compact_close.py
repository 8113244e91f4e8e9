"""The compact close (``StreamConfig.compact_close``, transport/close_state.py).

Two pyserval ends agree on it in the handshake (RFC 6994's experimental TCP option, kind
253, with our ExID "SV"), and each side's SAL FIN then travels in the packet of its TCP
FIN. The expectations are written from that design and the wire spec's numbering rules
(``shared/spec/sal-wire.md``: SYN and FIN consume a verno, ackno is the next verno
expected), not read from the code: a connect-and-close cycle is six packets, each close
packet carries what its position says, a peer that does not offer the option gets the
spec's own close (the SAL FIN only after the TCP FIN's ACK), and a lost close packet is
repaired.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from pyserval.core.time_wait import TimeWait
from pyserval.sal import ControlFlags, decode_packet
from pyserval.sal.packet import SalPacket
from pyserval.sal.transport_headers import TcpFlags
from pyserval.transport.config import StreamConfig
from pyserval.transport.connection import Connection, State

from . import simhelpers
from .simhelpers import COMPACT, A, B, Pair
from .simhelpers import make_compact_pair as make_pair  # both ends ask for it

# RFC 6994: kind 253, length 4, then the 16-bit ExID ("SV").
OFFER = bytes([253, 4, 0x53, 0x56])

Sent = list[tuple[tuple[str, int], bytes]]  # (source, datagram), in the order sent


def _watch(p: Pair) -> Sent:
    sent: Sent = []

    def tap(t: float, data: bytes, src: tuple[str, int], dst: tuple[str, int], fate: str) -> None:
        if fate == "sent":
            sent.append((src, data))

    p.net.tap = tap
    return sent


def _cycle(p: Pair, timeout: float = 120.0) -> tuple[Connection, Connection]:
    """Connect; the server closes at once; the client reads the end of stream, closes."""
    p.connect()
    c, s = p.client, p.server
    assert c is not None and s is not None
    s.shutdown()
    p.net.kick(p.b)
    assert p.net.run_until(lambda: c.at_eof, timeout)
    c.shutdown()
    p.net.kick(p.a)
    assert p.net.run_until(
        lambda: c.state is State.CLOSED and s.state in (State.TIME_WAIT, State.CLOSED), timeout
    )
    return c, s


def _flags(pkt: SalPacket) -> tuple[int, int]:
    ctl, tcp = pkt.control, pkt.tcp
    return (ctl.flags if ctl is not None else -1, tcp.flags if tcp is not None else -1)


def _control_fin_with_tcp_fin(pkt: SalPacket) -> bool:
    ctl, tcp = pkt.control, pkt.tcp
    return (
        ctl is not None
        and bool(ctl.flags & ControlFlags.FIN)
        and tcp is not None
        and bool(tcp.flags & TcpFlags.FIN)
    )


def test_two_pyserval_ends_agree_and_close_in_three_packets() -> None:
    p = make_pair(seed=3)
    sent = _watch(p)
    c, s = _cycle(p)
    assert c.error is None and s.error is None
    # The server closed first: it waits (as a TIME_WAIT record); the client does not.
    assert (len(p.b.time_wait), len(p.a.time_wait)) == (1, 0)
    assert [src for src, _ in sent] == [A, B, A, B, A, B]
    syn, synack, third, s_fin, c_fin, last = (decode_packet(d) for _, d in sent)
    # The offer and the agreement, and nowhere else.
    assert [OFFER in d for _, d in sent] == [True, True, False, False, False, False]
    F, K = ControlFlags.FIN, ControlFlags.ACK
    assert _flags(s_fin) == (F, TcpFlags.FIN | TcpFlags.ACK)
    assert _flags(c_fin) == (F | K, TcpFlags.FIN | TcpFlags.ACK)
    assert _flags(last) == (K, TcpFlags.ACK)
    ctl = {n: pkt.control for n, pkt in enumerate((syn, synack, third, s_fin, c_fin, last))}
    # Control numbers (spec): the SYN consumed each side's first verno, so each SAL FIN
    # takes the next; every ACK asks for the verno after the one it answers.
    assert ctl[0] is not None and ctl[1] is not None
    assert ctl[3] is not None and ctl[3].verno == (ctl[1].verno + 1) & 0xFFFFFFFF
    assert ctl[4] is not None and ctl[4].verno == (ctl[0].verno + 1) & 0xFFFFFFFF
    assert ctl[4].ackno == (ctl[3].verno + 1) & 0xFFFFFFFF
    assert ctl[5] is not None and ctl[5].ackno == (ctl[4].verno + 1) & 0xFFFFFFFF
    # TCP numbers (RFC 9293): a FIN takes one sequence number, and its ACK is past it.
    assert s_fin.tcp is not None and c_fin.tcp is not None and last.tcp is not None
    assert c_fin.tcp.ack == (s_fin.tcp.seq + 1) & 0xFFFFFFFF
    assert last.tcp.ack == (c_fin.tcp.seq + 1) & 0xFFFFFFFF
    assert not bytes(s_fin.payload) and not bytes(c_fin.payload)


@pytest.mark.parametrize("side_without", ["client", "server"])
def test_an_end_without_it_gets_the_specs_close(side_without: str) -> None:
    off = StreamConfig(compact_close=False)
    p = (
        make_pair(seed=4, config=off, server_config=COMPACT)
        if side_without == "client"
        else make_pair(seed=4, server_config=off)
    )
    sent = _watch(p)
    c, s = _cycle(p)
    assert c.error is None and s.error is None
    assert not c.compact_close and not s.compact_close
    assert OFFER not in sent[1][1]  # no agreement in the SYN-ACK
    assert (OFFER in sent[0][1]) is (side_without == "server")  # the offer, if made
    packets = [(src, decode_packet(d)) for src, d in sent]
    assert len(packets) == 8
    assert not any(_control_fin_with_tcp_fin(pkt) for _, pkt in packets)
    # Each side's SAL FIN leaves only after the peer acknowledged its TCP FIN.
    for me, peer in ((A, B), (B, A)):
        fin_at = next(
            i for i, (src, pkt) in enumerate(packets)
            if src == me and pkt.tcp is not None and pkt.tcp.flags & TcpFlags.FIN
        )  # fmt: skip
        fin_seq = packets[fin_at][1].tcp.seq  # type: ignore[union-attr]
        acked_at = next(
            i for i, (src, pkt) in enumerate(packets)
            if src == peer and i > fin_at and pkt.tcp is not None
            and pkt.tcp.ack == (fin_seq + 1) & 0xFFFFFFFF
        )  # fmt: skip
        sal_fin_at = next(
            i for i, (src, pkt) in enumerate(packets)
            if src == me and pkt.control is not None and pkt.control.flags & ControlFlags.FIN
        )  # fmt: skip
        assert sal_fin_at > acked_at


def _lose(p: Pair, which: Callable[[SalPacket, tuple[str, int]], bool]) -> list[SalPacket]:
    """Drop the first packet ``which`` picks; returns what was dropped."""
    dropped: list[SalPacket] = []

    def loss(data: bytes, src: tuple[str, int], dst: tuple[str, int]) -> bool:
        pkt = decode_packet(data)
        if not dropped and which(pkt, src):
            dropped.append(pkt)
            return True
        return False

    p.net.loss_filter = loss
    return dropped


CLOSE_PACKETS: dict[str, Callable[[SalPacket, tuple[str, int]], bool]] = {
    "server FIN": lambda pkt, src: src == B and _control_fin_with_tcp_fin(pkt),
    "client FIN": lambda pkt, src: src == A and _control_fin_with_tcp_fin(pkt),
    "last ACK": lambda pkt, src: (
        src == B and _flags(pkt) == (ControlFlags.ACK, TcpFlags.ACK) and pkt.service is None
    ),
}


@pytest.mark.parametrize("lost", sorted(CLOSE_PACKETS))
def test_a_lost_close_packet_is_sent_again_and_both_ends_close_cleanly(lost: str) -> None:
    p = make_pair(seed=5)
    sent = _watch(p)
    dropped = _lose(p, CLOSE_PACKETS[lost])
    c, s = _cycle(p)
    assert len(dropped) == 1
    assert c.error is None and s.error is None
    assert (len(p.b.time_wait), len(p.a.time_wait)) == (1, 0)
    assert p.a.stats.get("rst_sent", 0) == 0 and p.b.stats.get("rst_sent", 0) == 0
    if lost == "last ACK":
        # The client sent its FIN and SAL FIN again; the server, in TIME_WAIT, answered
        # both in one packet (as its first answer was).
        answers = [decode_packet(d) for src, d in sent if src == B][-1:]
        assert answers and _flags(answers[0]) == (ControlFlags.ACK, TcpFlags.ACK)


def test_time_wait_answers_a_repeated_compact_fin_with_both_acks_in_one_packet() -> None:
    p = make_pair(seed=6)
    sent = _watch(p)
    _cycle(p)
    records = [r for r in p.b.time_wait if isinstance(r, TimeWait)]
    assert len(records) == 1
    client_fin = next(
        d for src, d in sent if src == A and _control_fin_with_tcp_fin(decode_packet(d))
    )
    answer, dropped = records[0].answer(decode_packet(client_fin), A)
    assert dropped is None and answer is not None
    pkt = decode_packet(answer)
    assert _flags(pkt) == (ControlFlags.ACK, TcpFlags.ACK)
    last = decode_packet([d for src, d in sent if src == B][-1])
    assert answer == [d for src, d in sent if src == B][-1]  # the very packet it sent first
    assert pkt.tcp is not None and last.tcp is not None and pkt.tcp.ack == last.tcp.ack


def test_a_half_closed_stream_still_delivers_everything_the_other_way() -> None:
    p = make_pair(seed=7)
    p.connect()
    c, s = p.client, p.server
    assert c is not None and s is not None
    c.shutdown()  # the client is done sending at once: FIN and SAL FIN go together
    p.net.kick(p.a)
    p.net.run_for(1.0)
    assert s.at_eof and c.close.local.value == "done"
    data = random.Random(7).randbytes(300_000)
    got = bytearray()
    view = memoryview(data)
    while view or not c.at_eof:
        if view:
            n = s.write(view)
            view = view[n:]
            if not view:
                s.shutdown()
            p.net.kick(p.b)
        p.net.run_for(0.05)
        got += c.read()
    assert bytes(got) == data
    assert p.net.run_until(
        lambda: s.state is State.CLOSED and c.state in (State.TIME_WAIT, State.CLOSED), 60
    )
    assert c.error is None and s.error is None
    assert (len(p.a.time_wait), len(p.b.time_wait)) == (1, 0)  # the client closed first


def test_a_multipath_offer_leaves_the_compact_close_out() -> None:
    p = make_pair(seed=8, config=StreamConfig(multipath=True, compact_close=True))
    sent = _watch(p)
    p.connect()
    assert OFFER not in sent[0][1]
    assert p.client is not None and not p.client.compact_close


def test_a_syn_cookie_answer_leaves_it_out() -> None:
    # The stateless answer keeps no record of the offer: both ends close as the spec says.
    p = make_pair(seed=9, server_config=StreamConfig(max_half_open=0, compact_close=True))
    sent = _watch(p)
    c, s = _cycle(p)
    assert p.b.stats["syn_cookie_accepted"] == 1
    assert OFFER in sent[0][1] and OFFER not in sent[1][1]
    assert not c.compact_close and not s.compact_close
    assert c.error is None and s.error is None
    assert len(sent) == 8


@pytest.mark.parametrize("server_compact", [True, False])
def test_a_fin_that_leaves_with_data_takes_the_sal_fin_along(server_compact: bool) -> None:
    # The server writes and closes at once: its FIN ends the data's segment train. Agreed,
    # the last segment leaves as a packet of its own carrying the SAL FIN too.
    p = make_pair(seed=10, server_config=StreamConfig(compact_close=server_compact))
    sent = _watch(p)
    p.connect()
    c, s = p.client, p.server
    assert c is not None and s is not None
    data = random.Random(10).randbytes(5000)  # four segments of 1,408 bytes or less
    s.write(data)
    s.shutdown()
    p.net.kick(p.b)
    got = bytearray()

    def read_to_eof() -> bool:
        got.extend(c.read())
        return c.at_eof

    assert p.net.run_until(read_to_eof, 10)
    assert bytes(got) == data
    c.shutdown()
    p.net.kick(p.a)
    start = p.net.now
    assert p.net.run_until(
        lambda: c.state is State.CLOSED and s.state in (State.TIME_WAIT, State.CLOSED), 10
    )
    # One-way delays of 5 ms each, no retransmission: compact, two (the client's FIN and
    # SAL FIN; the server's two ACKs); the spec's close, four (the client's SAL FIN waits
    # for its FIN's ACK, and the server's last ACK answers it).
    assert p.net.now - start == pytest.approx(0.010 if server_compact else 0.020)
    assert c.error is None and s.error is None
    server_data = [decode_packet(d) for src, d in sent if src == B and len(d) > 100]
    assert sum(len(pkt.payload) for pkt in server_data) == len(data)
    last = server_data[-1]
    assert last.tcp is not None and last.tcp.flags & TcpFlags.FIN
    assert len(last.payload) == len(data) % 1408
    assert _control_fin_with_tcp_fin(last) is server_compact


def test_a_side_that_closed_second_acknowledges_a_late_sal_fin() -> None:
    # The spec's close, the client closing first and the server a while later; the
    # client's first SAL FIN is lost. The server's own SAL FIN is acknowledged before the
    # client's comes again, so the server finishes on a SAL FIN that it must still
    # acknowledge, and stay to acknowledge again (close_state's linger); else the client
    # sends it into a flow the server forgot and ends on a RST, a control RTO later.
    off = StreamConfig(compact_close=False)
    p = make_pair(seed=11, config=off)
    sent = _watch(p)
    dropped = _lose(
        p,
        lambda pkt, src: (
            src == A and pkt.control is not None and bool(pkt.control.flags & ControlFlags.FIN)
        ),
    )
    p.connect()
    c, s = p.client, p.server
    assert c is not None and s is not None
    c.shutdown()
    p.net.kick(p.a)
    p.net.run_for(0.1)
    assert len(dropped) == 1 and s.at_eof
    s.shutdown()
    p.net.kick(p.b)
    ended = (State.TIME_WAIT, State.CLOSED)
    assert p.net.run_until(lambda: s.state in ended and c.state in ended, 30)
    assert p.net.run_until(lambda: False, 5.0) is False
    assert c.error is None and s.error is None
    # Both wait: the server's SAL FIN left before the client's came again, so its ACK of
    # that one is the last packet, and the server stays to send it again if it is lost.
    assert (len(p.a.time_wait), len(p.b.time_wait)) == (1, 1)
    packets = [(src, decode_packet(d)) for src, d in sent]
    assert not any(
        pkt.control is not None and pkt.control.flags & ControlFlags.RST for _, pkt in packets
    )
    sal_fins = [
        pkt for src, pkt in packets
        if src == A and pkt.control is not None and pkt.control.flags & ControlFlags.FIN
    ]  # fmt: skip
    assert len(sal_fins) == 2  # the lost one and the one the server acknowledged
    # The server's last packet is that acknowledgement: a control ACK of the second copy.
    last = next(pkt for src, pkt in reversed(packets) if src == B)
    assert last.control is not None and last.control.flags == ControlFlags.ACK
    assert last.control.ackno == (sal_fins[-1].control.verno + 1) & 0xFFFFFFFF  # type: ignore[union-attr]


def test_the_compact_close_is_off_by_default() -> None:
    # Two ends with the default configuration: no offer in the SYN, the spec's close.
    p = simhelpers.make_pair(seed=12)
    sent = _watch(p)
    c, s = _cycle(p)
    assert not c.compact_close and not s.compact_close
    assert not any(OFFER in d for _, d in sent)
    assert len(sent) == 8
    assert not any(_control_fin_with_tcp_fin(decode_packet(d)) for _, d in sent)

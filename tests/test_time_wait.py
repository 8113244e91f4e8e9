"""TIME_WAIT as a small record (core.time_wait) behaves exactly as the whole connection did.

The expectation is the host keeping whole connections in TIME_WAIT (``compact_time_wait``
off), run from the same seeds: every packet a peer could still send draws the same bytes,
or the same silence, from both.
"""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import Callable

import pytest

from pyserval.sal import ControlExt, ControlFlags, SalPacket, TcpFlags, TcpHeader
from pyserval.sal.control import MASK32
from pyserval.transport.config import StreamConfig
from pyserval.transport.connection import Connection, State, Subflow

from .simhelpers import A, B, Pair, make_pair


def _closed_pair(compact: bool, seed: int = 3) -> Pair:
    """The client closes first and ends in TIME_WAIT; the server is CLOSED."""
    p = make_pair(seed=seed)
    p.a.compact_time_wait = compact
    p.connect()
    c, s = p.client, p.server
    assert c is not None and s is not None
    c.write(b"hello")
    c.shutdown()
    p.net.kick(p.a)
    got = bytearray()

    def all_read() -> bool:
        got.extend(s.read())
        return s.at_eof

    assert p.net.run_until(all_read, 5)
    assert got == b"hello"
    s.write(b"bye")
    s.shutdown()
    p.net.kick(p.b)
    assert p.net.run_until(lambda: c.state is State.TIME_WAIT and s.state is State.CLOSED, 5)
    p.net.run_for(0.5)
    return p


def _sal_fin(s: Subflow, nonce: bytes | None = None) -> SalPacket:
    cc = s.control
    ext = ControlExt(
        ControlFlags.FIN, (cc.snd_verno - 1) & MASK32, cc.rcv_ackno, nonce or cc.local_nonce
    )
    return s.control_packet(ext)


def _tcp(s: Subflow, flags: int, payload: bytes = b"") -> SalPacket:
    tcp = TcpHeader(seq=s.wire_seq(s.snd_una - 1), ack=s.wire_ack(), flags=flags)
    return SalPacket(s.local_flowid, s.remote_flowid, 6, [], tcp, payload)


STIMULI: dict[str, Callable[[Subflow], tuple[SalPacket, tuple[str, int]]]] = {
    "sal_fin_again": lambda s: (_sal_fin(s), B),
    "tcp_fin_again": lambda s: (_tcp(s, TcpFlags.FIN | TcpFlags.ACK), B),
    "data_again": lambda s: (_tcp(s, TcpFlags.ACK, b"bye"), B),
    "pure_ack": lambda s: (_tcp(s, TcpFlags.ACK), B),
    "sal_fin_wrong_nonce": lambda s: (_sal_fin(s, b"\x07" * 8), B),
    "rst_with_nonce": lambda s: (
        s.control_packet(ControlExt(ControlFlags.RST, 0, 0, s.control.local_nonce)),
        B,
    ),
    "fin_from_elsewhere": lambda s: (_tcp(s, TcpFlags.FIN | TcpFlags.ACK), ("10.9.9.9", 9)),
}


@pytest.mark.parametrize("name", sorted(STIMULI))
def test_a_time_wait_record_answers_as_the_whole_connection_did(name: str) -> None:
    answers = []
    for compact in (False, True):
        p = _closed_pair(compact)
        assert p.server is not None and p.client is not None
        assert (len(p.a.time_wait) == 1) is compact
        pkt, src = STIMULI[name](p.server.primary)
        for _ in range(2):  # twice: the second time may differ (it does not)
            p.a.receive_datagram(pkt.encode(src[0], A[0]), src, A, p.net.now)
            answers.append((compact, p.a.datagrams_to_send(p.net.now)))
        assert p.client.state is State.TIME_WAIT  # nothing ends it early (RFC 1337)
    full = [out for compact, out in answers if not compact]
    small = [out for compact, out in answers if compact]
    assert small == full
    if name in ("sal_fin_again", "tcp_fin_again", "data_again"):
        assert all(len(out) == 1 for out in small)  # each is answered


def test_the_record_ends_when_the_wait_does() -> None:
    p = _closed_pair(True)
    c = p.client
    assert c is not None
    assert p.a.connections == {} and len(p.a.flows) == 1  # only the record
    p.net.run_for(StreamConfig().time_wait + 1)
    assert len(p.a.flows) == 0 and len(p.a.time_wait) == 0
    assert c.state is State.CLOSED  # told, since the application still holds it


def test_a_full_flow_table_ends_the_oldest_time_wait_for_a_new_flow() -> None:
    p = make_pair(seed=4)
    p.a.flows.max_flows = 2
    closed: list[Connection] = []
    for _ in range(3):
        p.client = p.server = None
        p.connect()
        c, s = p.client, p.server
        assert c is not None and s is not None
        c.shutdown()
        s.shutdown()
        p.net.kick(p.a, p.b)
        assert p.net.run_until(lambda c=c: c.state in (State.TIME_WAIT, State.CLOSED), 5)
        closed.append(c)
    assert p.a.stats["time_wait_evicted"] == 1 and len(p.a.time_wait) == 2
    assert closed[0].state is State.CLOSED and closed[2].state is State.TIME_WAIT


def _bytes_per_time_wait(compact: bool, n: int = 200) -> float:
    """Memory held per flow in TIME_WAIT once the application dropped its objects:
    traced allocations with ``n`` of them, less the same host after they ended."""
    p = make_pair(seed=5, config=StreamConfig(time_wait=1000.0))
    p.a.compact_time_wait = compact
    tracemalloc.start()
    try:
        for _ in range(n):
            p.client = p.server = None
            p.connect()
            c, s = p.client, p.server
            assert c is not None and s is not None
            c.shutdown()
            s.shutdown()
            p.net.kick(p.a, p.b)
            assert p.net.run_until(lambda c=c: c.state is State.TIME_WAIT, 5)
            p.a.events()
            p.b.events()
        del c, s
        p.client = p.server = None
        gc.collect()
        with_waits = tracemalloc.get_traced_memory()[0]
        for conn in list(p.a.connections.values()):
            conn.abort()
            p.a._forget(conn)
        p.a.end_time_waits()
        p.a.datagrams_to_send(p.net.now)  # (an abort queues the connection for a flush)
        p.a.events()
        gc.collect()
        without = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    return (with_waits - without) / n


def test_a_time_wait_record_holds_under_a_kilobyte() -> None:
    small = _bytes_per_time_wait(True)
    full = _bytes_per_time_wait(False)
    assert 0 < small <= 1024, small
    assert full > 4 * small, (full, small)

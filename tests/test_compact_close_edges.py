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

from dataclasses import dataclass, field

import pytest

from pyserval.sal import ControlFlags, decode_packet
from pyserval.sal.packet import SalPacket
from pyserval.sal.transport_headers import TcpFlags
from pyserval.transport.close_state import Stage
from pyserval.transport.config import StreamConfig
from pyserval.transport.connection import Connection, State

from .simhelpers import A, B, Pair, make_pair

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


@pytest.mark.parametrize("compact", [True, False])
def test_a_sal_fin_sent_after_the_peers_carries_its_ack(compact: bool) -> None:
    # No delayed ACK: the client acknowledges the server's FIN and SAL FIN at once, and
    # that packet is lost. The client's own SAL FIN, sent later, must carry the ACK (its
    # ackno already says so): every segment after the SYN carries the ACK (RFC 9293
    # 3.10.7.4). Without the flag the server never learns its SAL FIN arrived, the client
    # (which closed second) forgets the flow, and the server's next copy meets a RST.
    cfg = StreamConfig(delayed_ack=0.0, compact_close=compact)
    p = make_pair(seed=21, config=cfg)
    wire = watch(p)
    p.connect()
    c, s = p.client, p.server
    assert c is not None and s is not None
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

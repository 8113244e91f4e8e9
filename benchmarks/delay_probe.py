"""Which steps of the connect cycle hold up the rate (``connect_slices.py --delay``).

A causal probe in the manner of a virtual slowdown: one process (the server or the client
of one pyserval stack) spends ``us`` microseconds of CPU time, spinning, each time a read brings
it a datagram of one kind, before the stack sees the batch. If the rate falls by about what
``us`` adds to a cycle, that step's work is on the cycle's critical path and making it
cheaper would pay as much; if the rate holds, the step runs while the other process is busy
anyway, and cutting it buys nothing on the clock (only CPU).

Kinds come from the wire header alone (``../shared/spec/sal-wire.md``: the SAL header's
length in words at byte 8, its protocol at byte 9, the TCP flags at byte 13 of the TCP
header that follows): ``syn``, ``synack``, ``fin`` (a TCP FIN), ``control`` (SAL header
only: a control packet with no transport header), ``ack`` (any other TCP packet), and
``other``. The probe reads the batch after ``UdpEndpoint`` filled it (its private
``_read_gro``/``_read_plain``), so it costs nothing but a header check per datagram.

A limit to read its figures with: it delays a read, not a step. A read can bring
datagrams of two kinds (two hosts' answers that crossed: in one process, a client's reads
bring the peer's ACK with its SAL FIN together with the next SYN-ACK), and the spin then
holds up both; a kind that never comes alone shows the cost of the read it shares.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

KINDS = ("syn", "synack", "fin", "control", "ack", "other")
_PROTO_TCP = 6
_SYN, _ACK, _FIN = 0x02, 0x10, 0x01


def kind_of(datagram: bytes) -> str:
    """The kind of one SAL datagram, from its header bytes."""
    if len(datagram) < 12:
        return "other"
    header = datagram[8] * 4
    if len(datagram) <= header:
        return "control"
    if datagram[9] != _PROTO_TCP or len(datagram) < header + 20:
        return "other"
    flags = datagram[header + 13]
    if flags & _SYN:
        return "synack" if flags & _ACK else "syn"
    return "fin" if flags & _FIN else "ack"


def spin(us: float) -> None:
    """Spend ``us`` microseconds of CPU (a busy wait on the process's CPU clock: the process
    stays on its CPU, as it would doing the work this stands for, and on a loaded machine
    takes longer to get through it, as that work would)."""
    end = time.process_time() + us / 1e6
    while time.process_time() < end:
        pass


def install(endpoint_class: Any, kind: str, us: float) -> None:
    """Make every read of ``endpoint_class`` (pyserval's ``UdpEndpoint``) that brings a
    datagram of ``kind`` spin ``us`` microseconds before the stack sees the batch."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; known: {', '.join(KINDS)}")
    for name in ("_read_gro", "_read_plain"):
        original: Callable[..., tuple[int, bool]] = getattr(endpoint_class, name)

        def read(
            self: Any,
            sock: Any,
            batch: list[tuple[bytes, Any]],
            _original: Callable[..., tuple[int, bool]] = original,
        ) -> tuple[int, bool]:
            start = len(batch)
            got = _original(self, sock, batch)
            for i in range(start, len(batch)):
                if kind_of(batch[i][0]) == kind:
                    spin(us)
                    break
            return got

        setattr(endpoint_class, name, read)

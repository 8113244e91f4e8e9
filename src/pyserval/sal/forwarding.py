"""Forwarding a SYN or unconnected datagram one hop on (sans-I/O, pure functions).

A forwarder records the path in the SOURCE extension (the reference's: IPv4 addresses,
original source first) and in pyserval's SOURCE_PORTS (the UDP port of each, which UDP
encapsulation needs to answer the original source directly). The first forwarder writes
``[original source, itself]``; later ones append themselves. A forwarder that finds the next
hop, or itself, already on the path drops the packet (a loop), as does one that would make
the path longer than SOURCE can hold.

Only the SAL header is rebuilt: the transport header and payload are copied unchanged, so
the forwarded bytes are what the original sender wrote apart from the path.
"""

from __future__ import annotations

from .checksum import BytesLike
from .extensions import SOURCE_MAX, PadExt, SourceExt, SourcePortsExt
from .packet import SalPacket

__all__ = ["ForwardRefused", "forward_packet"]

Address = tuple[str, int]


class ForwardRefused(Exception):
    """The packet must not be forwarded; ``reason`` is a drop-counter name."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def forward_packet(
    data: BytesLike, pkt: SalPacket, came_from: Address, me: Address, next_hop: Address
) -> bytes:
    """The bytes to send to ``next_hop`` for ``pkt`` (decoded from ``data``).

    ``came_from`` is the address the packet arrived from, ``me`` the local address it
    arrived on. Raises :class:`ForwardRefused` ("loop", "path_too_long", "not_ipv4").
    """
    path = pkt.source_path()
    if path is None:
        path = [came_from]
    if me in path or next_hop in path:
        raise ForwardRefused("loop", f"{next_hop[0]}:{next_hop[1]} already on the path")
    if len(path) + 1 > SOURCE_MAX:
        raise ForwardRefused("path_too_long", f"{len(path)} hops")
    path.append(me)
    kept = [e for e in pkt.extensions if type(e) not in (SourceExt, SourcePortsExt, PadExt)]
    kept.append(SourceExt(tuple(ip for ip, _ in path)))
    kept.append(SourcePortsExt(tuple(port for _, port in path)))
    try:
        header = SalPacket(pkt.src_flowid, pkt.dst_flowid, pkt.protocol, kept).encode()
    except ValueError as exc:  # an IPv6 or otherwise unencodable address on the path
        raise ForwardRefused("not_ipv4", str(exc)) from None
    view = memoryview(data)
    return header + bytes(view[view[8] * 4 :])

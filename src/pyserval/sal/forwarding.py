"""Forwarding a SYN or unconnected datagram one hop on (sans-I/O, pure functions).

A forwarder records the path in the SOURCE extension (the reference's: IPv4 addresses,
original source first) and in pyserval's SOURCE_PORTS (the UDP port of each, which UDP
encapsulation needs to answer the original source directly). The first forwarder writes
``[original source, itself]``; later ones append themselves. A forwarder that finds the next
hop, or itself, already on the path drops the packet (a loop), as does one that would make
the path longer than SOURCE can hold.

Only the SAL header is rebuilt: the transport header and payload are copied unchanged, so
the forwarded bytes are what the original sender wrote apart from the path (and a RELAY
marker, which the first forwarder fills in with the sender's address and its tag).

A path with any IPv6 hop (the sender, a forwarder, or the next hop) is written as
pyserval's SOURCE6 instead (addresses and ports in one extension, at most 13 hops); an
IPv4-only path keeps the reference's SOURCE and the bytes it always had.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable
from typing import Final

from .checksum import BytesLike
from .extensions import (
    SOURCE6_MAX,
    SOURCE_MAX,
    ExtType,
    PadExt,
    RelayExt,
    Source6Ext,
    SourceExt,
    SourcePortsExt,
)
from .inet import WILDCARDS, Address
from .packet import SalPacket

__all__ = [
    "FAST_DATAGRAM",
    "FAST_SYN",
    "ForwardRefused",
    "fill_relay_marker",
    "first_hop_bytes",
    "forward_packet",
    "relay_marker_at",
    "scan_for_forwarding",
]

FAST_SYN: Final = 1
FAST_DATAGRAM: Final = 2
_BASE: Final = struct.Struct("!4xIBBH")  # dst_flowid, shl, protocol, check
_PORTS: Final = struct.Struct("!BBBBHH")
_SOURCE_HEAD: Final = bytes((ExtType.SOURCE << 4, 12, 0, 0))
_ADDED_WORDS: Final = 5  # SOURCE with two addresses (12 bytes) + SOURCE_PORTS with two (8)
_ADDED_WORDS6: Final = 10  # SOURCE6 with two hops (40 bytes)
_SYN, _ACK = 0x80, 0x20  # CONTROL flags as plain ints (IntFlag operators are slow)
_suffix_cache: dict[tuple[Address, Address, bool], tuple[bytes, int, int]] = {}
_NO_RELAY: Final = bytes(14)  # a RELAY marker's body: no address, no tag
_RELAY_HEAD: Final = ExtType.RELAY << 4


class ForwardRefused(Exception):
    """The packet must not be forwarded; ``reason`` is a drop-counter name."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def forward_packet(
    data: BytesLike,
    pkt: SalPacket,
    came_from: Address,
    me: Address,
    next_hop: Address,
    relay_tag: Callable[[Address], bytes] | None = None,
) -> bytes:
    """The bytes to send to ``next_hop`` for ``pkt`` (decoded from ``data``).

    ``came_from`` is the address the packet arrived from, ``me`` the local address it
    arrived on. On the first hop, ``relay_tag`` (the forwarder's MAC of an address) fills
    in a RELAY marker. Raises :class:`ForwardRefused` ("loop", "path_too_long", "bad_address").
    """
    path = pkt.source_path()
    first_hop = path is None
    if path is None:
        path = [came_from]
    # A forwarder bound to the wildcard address cannot name itself: it is recorded as it
    # is, but never compared (two such routers would look like one).
    if next_hop in path or (me[0] not in WILDCARDS and me in path):
        raise ForwardRefused("loop", f"{next_hop[0]}:{next_hop[1]} already on the path")
    path.append(me)
    # The next hop is not written down, but an IPv6 one means the path leaves IPv4.
    v6 = any(":" in ip for ip, _ in path) or ":" in next_hop[0]
    if len(path) > (SOURCE6_MAX if v6 else SOURCE_MAX):
        raise ForwardRefused("path_too_long", f"{len(path) - 1} hops")
    drop = (SourceExt, SourcePortsExt, Source6Ext, PadExt)
    kept = [e for e in pkt.extensions if type(e) not in drop]
    if first_hop and ":" not in came_from[0]:  # RELAY carries IPv4 only: else left bare
        for i, e in enumerate(kept):
            if type(e) is RelayExt and e.is_marker:
                kept[i] = RelayExt(came_from, relay_tag(came_from)) if relay_tag is not None else e
    if v6:
        kept.append(Source6Ext(tuple(path)))
    else:
        kept.append(SourceExt(tuple(ip for ip, _ in path)))
        kept.append(SourcePortsExt(tuple(port for _, port in path)))
    try:
        header = SalPacket(pkt.src_flowid, pkt.dst_flowid, pkt.protocol, kept).encode()
    except ValueError as exc:  # an unencodable address on the path (a name, a bad text)
        raise ForwardRefused("bad_address", str(exc)) from None
    view = memoryview(data)
    return header + bytes(view[view[8] * 4 :])


def scan_for_forwarding(data: bytes) -> tuple[int, int, int] | None:
    """The first-hop fast path of a router: ``(kind, serviceID as int, SAL header length)``
    for a SYN (:data:`FAST_SYN`) or unconnected datagram (:data:`FAST_DATAGRAM`) that no
    forwarder has touched yet, with a good SAL checksum and well-formed extensions.

    None means "use the full decoder": anything unusual, already forwarded, or malformed
    (the decoder then counts it by reason). Reads only the SAL header, never the transport
    header: forwarding does not need it, and the receiver checks it.
    """
    n = len(data)
    if n < 16:
        return None
    dst, shl, protocol, _ = _BASE.unpack_from(data)
    hlen = shl * 4
    if dst or hlen <= 12 or hlen > n or shl > 255 - _ADDED_WORDS6:
        return None
    check = int.from_bytes(data[:hlen], "big")
    if not check or check % 0xFFFF:
        return None
    # The layouts every SAL stack sends (spec: SYN = CONTROL, SERVICE; unconnected
    # datagram = SERVICE, SERVICE) are recognised by their fixed offsets.
    if hlen == 68 and data[12] == 0x10 and data[13] == 20 and data[32] == 0x20 and data[33] == 36:
        flags = data[14]
        if protocol == 6 and flags & _SYN and not flags & _ACK:
            return FAST_SYN, int.from_bytes(data[36:68], "big"), hlen
        return None
    if hlen == 84 and data[12] == 0x20 and data[13] == 36 and data[48] == 0x20 and data[49] == 36:
        return (FAST_DATAGRAM, int.from_bytes(data[16:48], "big"), hlen) if protocol == 17 else None
    return _scan_extensions(data, hlen, protocol)


def _scan_extensions(data: bytes, hlen: int, protocol: int) -> tuple[int, int, int] | None:
    """:func:`scan_for_forwarding` for any other layout (PAD, more extensions)."""
    flags = -1
    service = -1
    count = 0
    i = 12
    while i < hlen:
        head = data[i]
        if head == 0:  # PAD
            i += 1
            continue
        if head & 0x0F or i + 2 > hlen:
            return None
        length = data[i + 1]
        if length < 2 or i + length > hlen:
            return None
        ext_type = head >> 4
        count += 1
        if ext_type == ExtType.CONTROL:
            if length != 20:
                return None
            if flags < 0:  # the first CONTROL decides, as in the full decoder
                flags = data[i + 2]
        elif ext_type == ExtType.SERVICE:
            if length != 36:
                return None
            if service < 0:
                service = int.from_bytes(data[i + 4 : i + 36], "big")
        elif ext_type in (ExtType.SOURCE, ExtType.SOURCE_PORTS, ExtType.IP6):
            return None  # a later hop (or an IPv6 form): the general path handles it
        elif ext_type == ExtType.RELAY and (length != 16 or data[i + 2 : i + 16] != _NO_RELAY):
            return None  # malformed, or not a bare marker: the general path decides
        i += length
    if service < 0 or count > 8:
        return None
    if flags >= 0:
        if protocol == 6 and flags & _SYN and not flags & _ACK:
            return FAST_SYN, service, hlen
        return None
    return (FAST_DATAGRAM, service, hlen) if protocol == 17 else None


def _path_suffix(came_from: Address, me: Address, next_hop: Address) -> tuple[bytes, int, int]:
    """SOURCE ``[came_from, me]`` + SOURCE_PORTS (SOURCE6 when a hop is IPv6), what they
    add to the header's ones'-complement sum (with the shl change), and the words added;
    cached per address triple."""
    key = (came_from, me, ":" in next_hop[0])
    hit = _suffix_cache.get(key)
    if hit is None:
        if key[2] or ":" in came_from[0] or ":" in me[0]:
            try:
                suffix = Source6Ext((came_from, me)).encode()
            except ValueError as exc:
                raise OSError(str(exc)) from None
            words = _ADDED_WORDS6
        else:
            suffix = (
                _SOURCE_HEAD
                + socket.inet_aton(came_from[0])  # OSError for names
                + socket.inet_aton(me[0])
                + _PORTS.pack(ExtType.SOURCE_PORTS << 4, 8, 2, 0, came_from[1], me[1])
            )
            words = _ADDED_WORDS
        added = (words << 8) + sum(
            int.from_bytes(suffix[i : i + 2], "big") for i in range(0, len(suffix), 2)
        )
        hit = (suffix, added, words)
        if len(_suffix_cache) >= 4096:
            _suffix_cache.clear()  # many clients: start again rather than grow
        _suffix_cache[key] = hit
    return hit


def first_hop_bytes(
    data: bytes, hlen: int, came_from: Address, me: Address, next_hop: Address | None = None
) -> bytes:
    """``data`` (a packet :func:`scan_for_forwarding` accepted) with SOURCE
    ``[came_from, me]`` and SOURCE_PORTS appended to its SAL header (SOURCE6 instead when
    ``came_from``, ``me`` or ``next_hop`` is IPv6).

    The checksum is updated incrementally (RFC 1624): the old header's sum, plus the shl
    change, plus the appended words. Raises OSError when an address is not IP text.
    """
    suffix, added, words = _path_suffix(came_from, me, next_hop or came_from)
    old = (data[10] << 8) | data[11]
    total = (0xFFFF - old) + added
    total = (total & 0xFFFF) + (total >> 16)
    total = (total & 0xFFFF) + (total >> 16)
    check = 0xFFFF - total
    return b"".join(
        (
            data[:8],
            bytes((data[8] + words, data[9], check >> 8, check & 0xFF)),
            data[12:hlen],
            suffix,
            data[hlen:],
        )
    )


def relay_marker_at(data: bytes, hlen: int) -> int:
    """The offset of a bare RELAY marker in the SAL header ``data[:hlen]`` (well-formed, as
    :func:`scan_for_forwarding` checked), or -1."""
    i = 12
    while i < hlen:
        head = data[i]
        if head == 0:
            i += 1
            continue
        length = data[i + 1]
        if head == _RELAY_HEAD and length == 16 and data[i + 2 : i + 16] == _NO_RELAY:
            return i
        i += length
    return -1


def fill_relay_marker(data: bytes, at: int, came_from: Address, tag: bytes) -> bytes:
    """``data`` with the RELAY marker at ``at`` filled in (the sender's address as this
    first forwarder sees it, and its tag), the SAL header checksum updated incrementally
    (RFC 1624: the marker's body was zero, so the new body's words are simply added).
    Raises OSError when the address is not IPv4 text."""
    body = came_from[1].to_bytes(2, "big") + socket.inet_aton(came_from[0]) + tag
    start = at + 2
    # Whole 16-bit words from the header's start: an odd start shares its first word.
    words = (b"\0" + body) if start & 1 else body
    if len(words) & 1:
        words += b"\0"
    added = int.from_bytes(words, "big") % 0xFFFF  # 2**16 = 1 (mod 0xFFFF): the word sum
    old = (data[10] << 8) | data[11]
    total = (0xFFFF - old) + added
    total = (total & 0xFFFF) + (total >> 16)
    total = (total & 0xFFFF) + (total >> 16)
    check = 0xFFFF - total
    return b"".join(
        (data[:10], bytes((check >> 8, check & 0xFF)), data[12:start], body, data[start + 14 :])
    )

"""A router's first hop for a whole batch read: the usual SYN forwarded in one loop.

:func:`~pyserval.sal.forwarding.scan_for_forwarding` and
:func:`~pyserval.sal.forwarding.first_hop_bytes` forward a first-hop SYN from its SAL header
alone, packet by packet. Under load what that costs is mostly the Python calls around each
packet, so :func:`forward_first_hops` does the same for a batch in one loop, for the layout
every SAL stack gives a SYN (CONTROL at byte 12, SERVICE at 32, nothing else): the header
checked and parsed inline, the service table looked up, the path suffix (SOURCE and
SOURCE_PORTS, or SOURCE6) and the loop and broadcast checks made once per sender and next
hop, the checksum updated incrementally (RFC 1624). The bytes are exactly
:func:`~pyserval.sal.forwarding.first_hop_bytes`'s.

Anything else (other layouts, datagrams, packets a forwarder already touched, bad
checksums, no FORWARD target) is handed back to the caller in batch order. It does not
decode packets, hold state between batches, or decide policy: the caller supplies the
lookup, the broadcast targets and the local address to send from.
"""

from __future__ import annotations

import struct
from collections import Counter
from collections.abc import Callable, Collection, Iterable
from typing import Final

from .forwarding import _path_suffix
from .inet import Address
from .service_table import Resolution

__all__ = ["forward_first_hops"]

# A first-hop SYN's fixed header: dst flowID, shl, protocol, checksum, the first extension's
# type and length, the CONTROL flags, the second extension's type and length (one unpack).
_SYN_HEAD: Final = struct.Struct("!4xIBBHBBB17xBB")
_SYN_SHL: Final = 17  # 68 bytes: base header (12), CONTROL (20), SERVICE (36)
_SYN_ACK_MASK: Final = 0xA0  # CONTROL flags SYN | ACK
_SYN: Final = 0x80


def forward_first_hops(
    batch: Iterable[tuple[bytes, Address]],
    me: Address,
    lookup: Callable[[int], Resolution | None],
    broadcast: Collection[Address],
    local_for: Callable[[Address, Address], Address],
    out: list[tuple[bytes, Address, Address]],
    declined: Callable[[bytes, Address], None],
    other: Callable[[bytes, Address], None],
    on_error: Callable[[Exception], None],
    drops: Counter[str],
) -> tuple[int, int]:
    """Forward the first-hop SYNs of a batch read on local address ``me``.

    Each datagram of ``batch``, in order, either goes on here, appended to ``out`` as
    ``(bytes, local_for(hop, me), hop)``; or is dropped here and counted in ``drops``
    (``no_rebroadcast``: the FORWARD target is in ``broadcast``; ``loop``: it is the sender
    or ``me``); or goes to ``declined(data, source)`` (a SYN of the usual layout looked up
    without a FORWARD target, whose hit is taken back since the caller's general path
    counts it again, or whose addresses are not IP text); or to ``other(data, source)``
    (everything else, untouched). ``lookup`` is :meth:`ServiceTable.lookup_int`. An
    exception in one packet goes to ``on_error`` and the batch goes on. Returns (SYNs
    forwarded, datagrams handled here: forwarded, dropped or failed).
    """
    append = out.append
    unpack = _SYN_HEAD.unpack_from
    from_bytes = int.from_bytes
    syns = taken = 0
    last_hop: Address | None = None
    last_src: Address | None = None
    local = me
    suffix = head = b""
    added = 0
    for data, src in batch:
        try:
            if len(data) < 68:
                other(data, src)
                continue
            dst_flowid, shl, protocol, check, e1, len1, flags, e2, len2 = unpack(data)
            if not (
                shl == _SYN_SHL
                and e1 == 0x10  # CONTROL
                and len1 == 20
                and e2 == 0x20  # SERVICE
                and len2 == 36
                and not dst_flowid
                and protocol == 6
                and flags & _SYN_ACK_MASK == _SYN
            ):
                other(data, src)
                continue
            total = from_bytes(data[:68], "big")
            if not total or total % 0xFFFF:  # a bad SAL checksum: the decoder counts it
                other(data, src)
                continue
            res = lookup(from_bytes(data[36:68], "big"))
            if res is None:
                declined(data, src)
                continue
            target = res.target
            if target is None:
                res.entry.hits -= 1  # the general path looks it up (and counts it) again
                declined(data, src)
                continue
            hop = target.address
            if hop is not last_hop or src != last_src:
                # A new sender or next hop: the checks and the path suffix, once.
                if hop in broadcast:
                    drops["no_rebroadcast"] += 1
                    taken += 1
                    continue
                if hop in (src, me):
                    drops["loop"] += 1
                    taken += 1
                    continue
                last_src = None  # until the suffix is made
                try:
                    suffix, added, words = _path_suffix(src, me, hop)
                except OSError:  # not IP text: the general path refuses it
                    res.entry.hits -= 1
                    declined(data, src)
                    continue
                head = bytes((_SYN_SHL + words, 6))  # the new shl, the protocol
                if hop is not last_hop:
                    local = local_for(hop, me)
                    last_hop = hop
                last_src = src
            # RFC 1624: the old header's sum, plus the shl change and the added words.
            total = (0xFFFF - check) + added
            total = (total & 0xFFFF) + (total >> 16)
            check = 0xFFFF - ((total & 0xFFFF) + (total >> 16))
            append(
                (
                    b"".join(
                        (data[:8], head, check.to_bytes(2, "big"), data[12:68], suffix, data[68:])
                    ),
                    local,
                    hop,
                )
            )
            syns += 1
            taken += 1
        except Exception as exc:  # never let a packet take the router down
            taken += 1
            on_error(exc)
    return syns, taken

"""A router's first hop for a whole batch read: the usual SYN forwarded in one loop.

:func:`~pyserval.sal.forwarding.scan_for_forwarding` and
:func:`~pyserval.sal.forwarding.first_hop_bytes` forward a first-hop SYN from its SAL header
alone, packet by packet. Under load what that costs is mostly the Python calls around each
packet, so :func:`forward_first_hops` does the same for a batch in one loop, for the layout
every SAL stack gives a SYN (CONTROL at byte 12, SERVICE at 32, nothing else): the header
checked as one int against a mask, the service table looked up once per run of SYNs from
one sender to one serviceID, the path suffix (SOURCE and SOURCE_PORTS, or SOURCE6) and the
loop and broadcast checks made once per sender and next hop, the checksum updated
incrementally (RFC 1624). The bytes are exactly
:func:`~pyserval.sal.forwarding.first_hop_bytes`'s.

Anything else (other layouts, datagrams, packets a forwarder already touched, bad
checksums, no FORWARD target) is handed back to the caller in batch order. It does not
decode packets, hold state between batches, or decide policy: the caller supplies the
lookup, the broadcast targets and the local address to send from.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Collection, Iterable
from typing import Final

from .forwarding import _path_suffix
from .inet import Address
from .service_table import Entry, Resolution

__all__ = ["forward_first_hops"]

# A first-hop SYN's SAL header (68 bytes) is read as one big-endian int: a mask and the
# value its set bits must have check the layout in one operation, and the serviceID is its
# low 256 bits (a struct unpack, nine comparisons and a second int.from_bytes took about
# twice as long for the same, timed on one SYN).
_SYN_LEN: Final = 68
_SYN_SHL: Final = 17  # 68 bytes: base header (12), CONTROL (20), SERVICE (36)
_SID_MASK: Final = (1 << 256) - 1


def _layout() -> tuple[int, int]:
    """(mask, value) over the header's int: byte offset -> (bits checked, their value)."""
    fields = {
        4: (0xFF, 0),  # dst flowID 0: no flow yet
        5: (0xFF, 0),
        6: (0xFF, 0),
        7: (0xFF, 0),
        8: (0xFF, _SYN_SHL),
        9: (0xFF, 6),  # TCP
        12: (0xFF, 0x10),  # CONTROL, 20 bytes
        13: (0xFF, 20),
        14: (0xA0, 0x80),  # CONTROL flags: SYN set, ACK clear
        32: (0xFF, 0x20),  # SERVICE, 36 bytes
        33: (0xFF, 36),
    }
    mask = value = 0
    for offset, (bits, want) in fields.items():
        shift = 8 * (_SYN_LEN - 1 - offset)
        mask |= bits << shift
        value |= want << shift
    return mask, value


_SYN_MASK, _SYN_WANT = _layout()


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

    A run of SYNs from one sender to one serviceID is looked up once when the answer
    needs no draw (an entry that is its own resolution): the rest of the run reuses it,
    and the entry's hits still count every SYN. Any call out of the loop (``declined``,
    ``other``, ``on_error``) ends the run, since the general path may change the table.
    """
    append = out.append
    from_bytes = int.from_bytes
    layout_mask, layout_want, sid_mask = _SYN_MASK, _SYN_WANT, _SID_MASK  # locals: cheaper
    syns = 0
    taken = 0  # dropped or failed here
    last_hop: Address | None = None
    last_src: Address | None = None
    local = me
    suffix = head = b""
    base = 0
    # The run: its serviceID and sender (None: no run), the entry, hits not yet counted.
    run_sid: int | None = None
    run_src: Address | None = None
    run_entry: Entry | None = None
    pending = 0
    for data, src in batch:
        try:
            if len(data) < 68:
                run_sid = None
                other(data, src)
                continue
            total = from_bytes(data[:68], "big")
            # The layout, then the SAL checksum: a bad one goes to the decoder, which
            # counts it. (A header that passes the mask is never all zero.)
            if total & layout_mask != layout_want or total % 0xFFFF:
                run_sid = None
                other(data, src)
                continue
            sid = total & sid_mask
            if sid != run_sid or src != run_src:
                if pending:
                    assert run_entry is not None
                    run_entry.hits += pending
                    pending = 0
                run_sid = None
                res = lookup(sid)
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
                    base = 0xFFFE + added  # added > 0: the shl grows
                    if hop is not last_hop:
                        local = local_for(hop, me)
                        last_hop = hop
                    last_src = src
                if type(res) is Entry:  # its own answer, no draw: it holds for the run
                    run_sid, run_src, run_entry = sid, src, res
            else:
                pending += 1  # the run's SYN: ``hop`` and the suffix are the run's
            # RFC 1624: the new checksum is ~(~old + added), with end-around carries;
            # for a positive sum the ones'-complement fold is ((x - 1) % 0xFFFF) + 1,
            # hence one modulo (``base`` is 0xFFFE + added, set with the suffix).
            check = 0xFFFE - (base - ((data[10] << 8) | data[11])) % 0xFFFF
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
        except Exception as exc:  # never let a packet take the router down
            run_sid = None
            taken += 1
            on_error(exc)
    if pending:
        assert run_entry is not None
        run_entry.hits += pending
    return syns, syns + taken

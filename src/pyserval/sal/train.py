"""Segment trains: a run of consecutive TCP data segments of one flow, encoded at once.

Linux's TSO hands the device one large segment that the hardware cuts into MSS-size wire
segments, copying one header and stamping each copy's sequence number and checksum. A
:class:`SegmentTrain` is the same idea in the SAL's encoder: the transport describes a run
of segments once (both flowIDs, one TCP header template, the contiguous payload, the segment
size) and :meth:`SegmentTrain.wire` produces the wire datagrams, each byte-identical to what
encoding its own :class:`~pyserval.sal.packet.SalPacket` would give, grouped into
:class:`SuperDatagram` s that the UDP adapter hands the kernel with one GSO call each
(:meth:`SegmentTrain.datagrams` gives them one by one). What is shared is
computed once per train rather than per segment:

* the SAL base header (its checksum covers only the header, which is the same for every
  segment of a flow: no extensions);
* the TCP header's fixed fields, the options (SACK blocks), and their part of the checksum;
* the pseudo-header's address part (cached per address pair, see :mod:`.checksum`).

Per segment what is left is the part that differs: the sequence number, the length in the
pseudo-header, the sum over the payload and one ``struct.pack``. The payload sums of the
whole train are taken in one call (:func:`.checksum.segment_sums`: one vector sum with the
``[accel]`` extra, else ``int.from_bytes`` of each memoryview slice, in C). The payload is
sliced, never copied before the final join.

Only data segments without SAL extensions go in trains (a multipath segment carries its own
DSS mapping); every segment of a train carries ACK and PSH, the last one FIN as well when the
train ends the stream. What a train does not do: decide what to send (the transport's
``Subflow.output`` does), or send (the host hands its super-datagrams to the adapter).
"""

from __future__ import annotations

import struct
from dataclasses import replace
from types import ModuleType
from typing import Final

from .checksum import BytesLike, address_sum, internet_checksum, segment_sums, vector_module
from .packet import BASE_HEADER, SalPacket
from .transport_headers import PROTO_TCP, TCP_MIN_HEADER, TcpFlags, TcpHeader

__all__ = ["SUPER_MAX_BYTES", "SUPER_MAX_SEGMENTS", "SegmentTrain", "SuperDatagram"]

_MOD: Final = 0xFFFF
_SAL: Final = struct.Struct("!IIBBH")
# The SAL base header (the same bytes for every segment of a flow) and a TCP header without
# options: ports, seq, ack, offset+flags (one 16-bit word), window, checksum, urgent pointer.
_HEADERS: Final = struct.Struct("!12sHHIIHHHH")
_TCP_FIXED: Final = struct.Struct("!HHIIHHHH")
# Where the per-segment fields sit in a datagram: the TCP sequence number and checksum.
_SEQ_AT: Final = 16
_CHECK_AT: Final = 28
# Trains of fewer full segments are stamped one by one: numpy's fixed cost (about 35 us a
# train) beats about 4.5 us a segment only from here (measured: 36.7 against 42.7 us at 8).
_VECTOR_MIN_SEGMENTS: Final = 8

SUPER_MAX_SEGMENTS: Final = 64
"""Datagrams per super-datagram: the kernel's UDP_MAX_SEGMENTS on older kernels (newer
allow 128)."""
SUPER_MAX_BYTES: Final = 65000
"""Bytes per super-datagram: the whole of it must fit one IP packet length (IPv4's 65,535
with its header; IPv6's payload length field counts the UDP header too)."""


class SuperDatagram:
    """Datagrams to one destination back to back in one buffer, every one ``segment``
    bytes but the last, which may be shorter: what Linux's UDP GSO (``UDP_SEGMENT``)
    sends with one ``sendmsg``, cutting it where ``segment`` says. The core hands trains
    out this way; an adapter without GSO sends :meth:`split` instead."""

    __slots__ = ("data", "segment")

    def __init__(self, data: bytes | memoryview, segment: int) -> None:
        if segment < 1:
            raise ValueError(f"segment size must be positive: {segment}")
        self.data = data
        self.segment = segment

    @property
    def count(self) -> int:
        """How many datagrams it holds."""
        return -(-len(self.data) // self.segment)

    def split(self) -> list[bytes]:
        """The datagrams it holds."""
        data = self.data
        size = self.segment
        return [bytes(data[i : i + size]) for i in range(0, len(data), size)]

    def __repr__(self) -> str:
        return f"<SuperDatagram {len(self.data)} bytes in {self.count} of {self.segment}>"


class SegmentTrain(SalPacket):
    """Consecutive data segments [seq, seq + len(payload)) of one flow: every one ``mss``
    bytes but the last, which may be shorter (and carries FIN when ``fin``).

    ``transport`` is the header template: its sequence number is the first segment's, its
    ACK, window, options and flags (ACK | PSH) are every segment's. A train is a
    :class:`SalPacket` so that it travels through the same lists as single packets; it is
    several datagrams, so :meth:`encode` refuses and :meth:`datagrams` gives them.
    """

    __slots__ = ("mss", "fin")

    def __init__(
        self,
        src_flowid: int,
        dst_flowid: int,
        tcp: TcpHeader,
        payload: BytesLike,
        mss: int,
        fin: bool = False,
    ) -> None:
        if mss < 1:
            raise ValueError(f"segment size must be positive: {mss}")
        if not payload:
            raise ValueError("a segment train carries data")
        super().__init__(src_flowid, dst_flowid, PROTO_TCP, [], tcp, payload)
        self.mss = mss
        self.fin = fin

    @property
    def count(self) -> int:
        """How many wire segments the train is."""
        return -(-len(self.payload) // self.mss)

    def encode(self, src_ip: str | bytes | None = None, dst_ip: str | bytes | None = None) -> bytes:
        """Not one datagram: use :meth:`datagrams`."""
        raise TypeError("a SegmentTrain is several datagrams: use datagrams()")

    def packets(self) -> list[SalPacket]:
        """The train as single packets (what it stands for; slow, for tests and tools)."""
        t = self.transport
        assert type(t) is TcpHeader
        view = memoryview(self.payload)
        out: list[SalPacket] = []
        total = len(view)
        for lo in range(0, total, self.mss):
            hi = min(lo + self.mss, total)
            flags = t.flags | (TcpFlags.FIN if self.fin and hi == total else 0)
            tcp = TcpHeader(
                seq=(t.seq + lo) & 0xFFFFFFFF,
                ack=t.ack,
                flags=flags,
                window=t.window,
                options=list(t.options),
            )
            out.append(SalPacket(self.src_flowid, self.dst_flowid, PROTO_TCP, [], tcp, view[lo:hi]))
        return out

    def _constants(
        self, src_ip: str | bytes, dst_ip: str | bytes
    ) -> tuple[bytes, bytes, int, int, int, int]:
        """What every segment shares: the SAL header (checksum stamped), the TCP options,
        the offset-and-flags word, ACK, window, and the part of the TCP checksum that is
        the same for each full segment (the pseudo-header's addresses, protocol and
        length, and the header words but sequence number and checksum)."""
        t = self.transport
        assert type(t) is TcpHeader
        shl = BASE_HEADER // 4
        sal_check = internet_checksum(
            _SAL.pack(self.src_flowid, self.dst_flowid, shl, PROTO_TCP, 0)
        )
        sal = _SAL.pack(self.src_flowid, self.dst_flowid, shl, PROTO_TCP, sal_check)
        opts = t.encode(0)[TCP_MIN_HEADER:]
        hlen = TCP_MIN_HEADER + len(opts)
        off_flags = ((hlen // 4) << 12) | (t.flags & 0x0FFF)
        ack = t.ack & 0xFFFFFFFF
        window = t.window
        base = (
            address_sum(src_ip, dst_ip, PROTO_TCP)
            + (ack >> 16)
            + (ack & 0xFFFF)
            + off_flags
            + window
            + (int.from_bytes(opts, "big") if opts else 0)
            + hlen
            + self.mss
        )
        return sal, opts, off_flags, ack, window, base

    def _headers(
        self, consts: tuple[bytes, bytes, int, int, int, int], first: int = 0
    ) -> list[bytes]:
        """The SAL and TCP headers (options included) of each segment from number
        ``first`` on, checksums stamped: the TCP checksum over the pseudo-header of the
        addresses ``consts`` (:meth:`_constants`) were worked out for, as
        :meth:`SalPacket.encode` computes it."""
        sal, opts, off_flags, ack, window, base = consts
        mss = self.mss
        view = memoryview(self.payload)[first * mss :]
        total = len(view)
        pack = _HEADERS.pack
        t = self.transport
        assert type(t) is TcpHeader
        seq0 = (t.seq + first * mss) & 0xFFFFFFFF
        sums = segment_sums(view, mss)
        heads: list[bytes] = []
        append = heads.append
        lo = 0
        for part in sums:
            seq = (seq0 + lo) & 0xFFFFFFFF
            s = (base + (seq >> 16) + (seq & 0xFFFF) + part) % _MOD
            append(pack(sal, 0, 0, seq, ack, off_flags, window, (~(s or _MOD)) & 0xFFFF, 0))
            lo += mss
        if total % mss or self.fin:
            # The last segment: its own length, and the FIN flag when it ends the stream.
            lo -= mss
            seq = (seq0 + lo) & 0xFFFFFFFF
            flags = off_flags | (TcpFlags.FIN if self.fin else 0)
            s = base - mss - off_flags + (total - lo) + flags + (seq >> 16) + (seq & 0xFFFF)
            s = (s + sums[-1]) % _MOD
            heads[-1] = pack(sal, 0, 0, seq, ack, flags, window, (~(s or _MOD)) & 0xFFFF, 0)
        if opts:
            heads = [h + opts for h in heads]
        return heads

    def _single(self, src_ip: str | bytes, dst_ip: str | bytes) -> bytes:
        """The train's one segment, by the general encoder: for a single segment it is
        cheaper than the train's shared set-up (4.7 against 16.4 us for 64 bytes), which
        pays only from the second segment on. A request or an answer is one segment."""
        if not self.fin:
            return SalPacket.encode(self, src_ip, dst_ip)
        t = self.transport
        assert type(t) is TcpHeader
        tcp = replace(t, flags=t.flags | TcpFlags.FIN, options=list(t.options))
        single = SalPacket(self.src_flowid, self.dst_flowid, PROTO_TCP, [], tcp, self.payload)
        return single.encode(src_ip, dst_ip)

    def datagrams(self, src_ip: str | bytes, dst_ip: str | bytes) -> list[bytes]:
        """The wire datagrams, with the TCP checksum over the pseudo-header of these
        addresses (as :meth:`SalPacket.encode` computes it)."""
        if len(self.payload) <= self.mss:
            return [self._single(src_ip, dst_ip)]
        view = memoryview(self.payload)
        mss = self.mss
        join = b"".join
        return [
            join((head, view[lo : lo + mss]))
            for head, lo in zip(
                self._headers(self._constants(src_ip, dst_ip)),
                range(0, len(view), mss),
                strict=True,
            )
        ]

    def wire(
        self,
        src_ip: str | bytes,
        dst_ip: str | bytes,
        max_bytes: int = SUPER_MAX_BYTES,
        max_segments: int = SUPER_MAX_SEGMENTS,
    ) -> list[bytes | SuperDatagram]:
        """The wire datagrams as :class:`SuperDatagram` s of at most ``max_bytes`` and
        ``max_segments`` each (a group of one is plain ``bytes``): what one UDP GSO call
        takes, built with one copy of the payload per group.

        With numpy (the ``[accel]`` extra) the full segments are stamped at once: one
        array of datagrams, the header template broadcast into every row, the sequence
        numbers and checksums worked out as vectors, the payload copied in as one block;
        the last segment, when it is short or carries FIN, is stamped on its own.
        """
        mss = self.mss
        total = len(self.payload)
        if total <= mss:
            return [self._single(src_ip, dst_ip)]
        full = total // mss
        if self.fin and full * mss == total:
            full -= 1  # the FIN goes in a segment stamped on its own
        consts = self._constants(src_ip, dst_ip)
        np = vector_module()
        if np is not None and full >= _VECTOR_MIN_SEGMENTS and mss % 4 == 0:
            vector = self._wire_vector(np, consts, full, max_bytes, max_segments)
            if vector is not None:
                return vector
        heads = self._headers(consts)
        view = memoryview(self.payload)
        size = len(heads[0]) + mss  # every datagram's but maybe the last's
        per = min(max_segments, max_bytes // size)
        pieces: list[bytes | memoryview] = []
        extend = pieces.extend
        lo = 0
        for head in heads:
            extend((head, view[lo : lo + mss]))
            lo += mss
        if per <= 1:
            return [b"".join(pieces[i : i + 2]) for i in range(0, len(pieces), 2)]
        join = b"".join
        out: list[bytes | SuperDatagram] = []
        step = 2 * per
        for i in range(0, len(pieces), step):
            data = join(pieces[i : i + step])
            out.append(SuperDatagram(data, size) if len(data) > size else data)
        return out

    def _wire_vector(
        self,
        np: ModuleType,
        consts: tuple[bytes, bytes, int, int, int, int],
        full: int,
        max_bytes: int,
        max_segments: int,
    ) -> list[bytes | SuperDatagram] | None:
        """:meth:`wire` with the first ``full`` segments (``mss`` bytes each, no FIN)
        stamped by numpy; None when groups of one datagram are all the bounds allow."""
        sal, opts, off_flags, ack, window, base = consts
        mss = self.mss
        hl = len(sal) + TCP_MIN_HEADER + len(opts)
        size = hl + mss
        per = min(max_segments, max_bytes // size)
        if per <= 1:
            return None
        t = self.transport
        assert type(t) is TcpHeader
        u64 = np.uint64
        words = np.frombuffer(self.payload, dtype="<u4", count=full * mss // 4)
        sums = words.reshape(full, mss // 4).sum(axis=1, dtype=u64)
        seqs = (u64(t.seq) + np.arange(full, dtype=u64) * u64(mss)) & u64(0xFFFFFFFF)
        # The sum of little-endian words is the byte-swapped sum: times 0x100 modulo 0xFFFF
        # (see .checksum). The field is the complement of the folded sum, +0 for none:
        # 0xFFFF - s modulo 0xFFFF.
        s = u64(base % _MOD) + (seqs >> u64(16)) + (seqs & u64(0xFFFF))
        s = (s + (sums << u64(8))) % u64(_MOD)
        check = (u64(_MOD) - s) % u64(_MOD)
        rows = np.empty((full, size), dtype=np.uint8)
        template = sal + _TCP_FIXED.pack(0, 0, 0, ack, off_flags, window, 0, 0) + opts
        rows[:, :hl] = np.frombuffer(template, dtype=np.uint8)
        rows[:, _SEQ_AT : _SEQ_AT + 4] = seqs.astype(">u4").view(np.uint8).reshape(full, 4)
        rows[:, _CHECK_AT : _CHECK_AT + 2] = check.astype(">u2").view(np.uint8).reshape(full, 2)
        rows[:, hl:] = np.frombuffer(self.payload, dtype=np.uint8, count=full * mss).reshape(
            full, mss
        )
        flat = memoryview(rows).cast("B")
        out: list[bytes | SuperDatagram] = []
        step = per * size
        for i in range(0, full * size, step):
            chunk = flat[i : i + step]
            out.append(SuperDatagram(chunk, size) if len(chunk) > size else bytes(chunk))
        if full * mss < len(self.payload):
            (head,) = self._headers(consts, full)
            out.append(b"".join((head, memoryview(self.payload)[full * mss :])))
        return out

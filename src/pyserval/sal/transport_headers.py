"""The TCP and UDP headers that ride inside the SAL (ports are 0: demux is by flowID).

TCP options are kept in wire order, NOP and EOL included, and any bytes after an EOL are
kept as ``option_padding``, so a decoded header re-encodes to the same bytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from functools import lru_cache
from operator import attrgetter
from typing import Final, TypeVar

from .checksum import BytesLike, transport_checksum, verify_transport_checksum
from .errors import MalformedPacket, Reason

__all__ = [
    "PROTO_TCP",
    "PROTO_UDP",
    "TcpFlags",
    "TcpHeader",
    "TcpOption",
    "UdpHeader",
    "OPT_EOL",
    "OPT_NOP",
    "OPT_MSS",
    "OPT_WSCALE",
    "OPT_SACK_PERMITTED",
    "OPT_SACK",
    "OPT_TIMESTAMPS",
    "OPT_EXPERIMENT",
    "COMPACT_CLOSE_EXID",
    "decode_tcp",
]

PROTO_TCP: Final = 6
PROTO_UDP: Final = 17

OPT_EOL: Final = 0
OPT_NOP: Final = 1
OPT_MSS: Final = 2
OPT_WSCALE: Final = 3
OPT_SACK_PERMITTED: Final = 4
OPT_SACK: Final = 5
OPT_TIMESTAMPS: Final = 8
# RFC 6994's shared experimental option (kind 253, a 16-bit ExID after the length). Ours
# offers the compact close between two pyserval ends (transport.close_state): a stack
# that does not know it ignores it (RFC 9293 3.2) and closes as the reference does.
OPT_EXPERIMENT: Final = 253
COMPACT_CLOSE_EXID: Final = 0x5356  # "SV"; experimental, not registered with IANA
_COMPACT_CLOSE_DATA: Final = COMPACT_CLOSE_EXID.to_bytes(2, "big")

# Option kind -> the only lengths it may have (SACK: 2 + 8n, n = 1..4).
_OPTION_LENGTHS: Final[dict[int, frozenset[int]]] = {
    OPT_MSS: frozenset({4}),
    OPT_WSCALE: frozenset({3}),
    OPT_SACK_PERMITTED: frozenset({2}),
    OPT_SACK: frozenset({10, 18, 26, 34}),
    OPT_TIMESTAMPS: frozenset({10}),
}

_TCP: Final = struct.Struct("!HHIIBBHHH")
_ONE_BYTE_OPTIONS: Final = {OPT_EOL: bytes((OPT_EOL,)), OPT_NOP: bytes((OPT_NOP,))}
_UDP: Final = struct.Struct("!HHHH")
_V = TypeVar("_V")
TCP_MIN_HEADER: Final = 20
UDP_HEADER: Final = 8


class TcpFlags:
    """TCP flag bits (low byte of the flags field)."""

    FIN: Final = 0x01
    SYN: Final = 0x02
    RST: Final = 0x04
    PSH: Final = 0x08
    ACK: Final = 0x10
    URG: Final = 0x20
    ECE: Final = 0x40
    CWR: Final = 0x80


@dataclass(frozen=True, slots=True)
class TcpOption:
    """One TCP option: ``kind`` and its data bytes (empty for NOP, EOL, SACK-permitted)."""

    kind: int
    data: bytes = b""

    @property
    def length(self) -> int:
        """Encoded length: 1 for NOP/EOL, else 2 + data."""
        return 1 if self.kind in (OPT_EOL, OPT_NOP) else 2 + len(self.data)

    def encode(self) -> bytes:
        """Wire bytes."""
        if self.kind in (OPT_EOL, OPT_NOP):
            return bytes((self.kind,))
        return bytes((self.kind, 2 + len(self.data))) + self.data

    # Typed constructors for the options the stack uses. Those of a handshake give the
    # shared instances the decoder gives (see _shared_option): so every list of them is
    # one that _WIRES and _SYNS know after its first time.
    @classmethod
    def nop(cls) -> TcpOption:
        """No-operation (alignment)."""
        return _NOP_OPTION

    @classmethod
    def eol(cls) -> TcpOption:
        """End of option list."""
        return _EOL_OPTION

    @classmethod
    def mss(cls, value: int) -> TcpOption:
        """Maximum segment size."""
        return _shared_option(OPT_MSS, value.to_bytes(2, "big"))

    @classmethod
    def window_scale(cls, shift: int) -> TcpOption:
        """Window scale shift count (RFC 7323)."""
        return _shared_option(OPT_WSCALE, bytes((shift,)))

    @classmethod
    def sack_permitted(cls) -> TcpOption:
        """SACK permitted (RFC 2018)."""
        return _shared_option(OPT_SACK_PERMITTED, b"")

    @classmethod
    def sack(cls, blocks: list[tuple[int, int]] | tuple[tuple[int, int], ...]) -> TcpOption:
        """SACK blocks (left edge, right edge), 1..4 of them."""
        if not 1 <= len(blocks) <= 4:
            raise ValueError(f"a SACK option holds 1..4 blocks, got {len(blocks)}")
        return cls(OPT_SACK, b"".join(struct.pack("!II", a, b) for a, b in blocks))

    @classmethod
    def compact_close(cls) -> TcpOption:
        """The compact-close offer (a SYN) or agreement (a SYN-ACK): RFC 6994's
        experimental option with our ExID."""
        return _shared_option(OPT_EXPERIMENT, _COMPACT_CLOSE_DATA)

    @classmethod
    def timestamps(cls, tsval: int, tsecr: int) -> TcpOption:
        """Timestamps (RFC 7323)."""
        return cls(OPT_TIMESTAMPS, struct.pack("!II", tsval, tsecr))


# Options are immutable, so a decoder may hand out shared instances: the one-byte ones
# and those of a SYN or SYN-ACK (MSS, window scale, SACK-permitted: a few values per
# host), which saves building six frozen objects per handshake packet. SACK blocks and
# timestamps differ in every segment and are built each time.
_EOL_OPTION: Final = TcpOption(OPT_EOL)
_NOP_OPTION: Final = TcpOption(OPT_NOP)
_SHARED_KINDS: Final = frozenset({OPT_MSS, OPT_WSCALE, OPT_SACK_PERMITTED, OPT_EXPERIMENT})


@lru_cache(maxsize=256)
def _shared_option(kind: int, data: bytes) -> TcpOption:
    return TcpOption(kind, data)


def _decode_options(data: memoryview) -> tuple[list[TcpOption], bytes]:
    options: list[TcpOption] = []
    i, n = 0, len(data)
    while i < n:
        kind = data[i]
        if kind == OPT_EOL:
            options.append(_EOL_OPTION)
            return options, bytes(data[i + 1 :])
        if kind == OPT_NOP:
            options.append(_NOP_OPTION)
            i += 1
            continue
        if i + 1 >= n:
            raise MalformedPacket(Reason.TCP_OPTION, f"option {kind} has no length byte")
        length = data[i + 1]
        if length < 2 or i + length > n:
            raise MalformedPacket(Reason.TCP_OPTION, f"option {kind} has bad length {length}")
        allowed = _OPTION_LENGTHS.get(kind)
        if allowed is not None and length not in allowed:
            raise MalformedPacket(Reason.TCP_OPTION, f"option {kind} cannot be {length} bytes")
        body = bytes(data[i + 2 : i + length])
        options.append(
            _shared_option(kind, body) if kind in _SHARED_KINDS else TcpOption(kind, body)
        )
        i += length
    return options, b""


# Option areas seen before -> what they decode to. A SYN's and SYN-ACK's options are the
# same few bytes on every connection between two stacks, and their options are the shared
# immutable instances anyway, so an area made only of those (no SACK blocks or
# timestamps, which differ per segment) is decoded once and its list copied after that.
# Bounded: cleared when full, so junk cannot grow it.
_AREAS: Final[dict[bytes, tuple[tuple[TcpOption, ...], bytes]]] = {}
_AREAS_MAX: Final = 64
_AREA_KINDS: Final = _SHARED_KINDS | {OPT_EOL, OPT_NOP}

# Option lists seen before -> their wire bytes (and those read as one number: their share
# of the checksum), and -> what a SYN reads in them (TcpHeader.syn_options). A
# handshake's options are the shared instances (the decoder's, the typed constructors'),
# so the same few lists of the same objects come with every connection: each is encoded
# and read once. Keyed by the options' identities, which is sound because an entry holds
# the options themselves: while it is there they live, so no other object can have their
# ids, and a list with those ids holds exactly those (immutable) options. Only lists of
# handshake kinds are kept (SACK blocks and timestamps are new objects in every segment),
# and each table is cleared when full, so junk cannot grow it (a peer's SYN of options
# never seen costs the parse it cost before).
_WIRES: Final[dict[tuple[int, ...], tuple[tuple[TcpOption, ...], bytes, int]]] = {}
_SynOptions = tuple[int | None, int | None, bool, bool]
_SYNS: Final[dict[tuple[int, ...], tuple[tuple[TcpOption, ...], _SynOptions]]] = {}
_KNOWN_MAX: Final = 64
_kind: Final = attrgetter("kind")


def _remember(table: dict[tuple[int, ...], _V], key: tuple[int, ...], value: _V) -> None:
    """Keep ``value`` under ``key`` in one of the tables above (cleared when full)."""
    if len(table) >= _KNOWN_MAX:
        table.clear()
    table[key] = value


def _decode_option_area(area: bytes) -> tuple[list[TcpOption], bytes]:
    """:func:`_decode_options` of ``area``, from :data:`_AREAS` when it was seen before."""
    known = _AREAS.get(area)
    if known is not None:
        return list(known[0]), known[1]
    options, padding = _decode_options(memoryview(area))
    if all(o.kind in _AREA_KINDS for o in options):
        if len(_AREAS) >= _AREAS_MAX:
            _AREAS.clear()
        _AREAS[area] = (tuple(options), padding)
    return options, padding


def decode_tcp(data: bytes | memoryview, at: int) -> tuple[TcpHeader, int]:
    """The TCP header that starts at offset ``at`` of ``data`` (the rest of the datagram
    from there is the segment), and its length. (:meth:`TcpHeader.decode` is this at 0;
    ``decode_packet`` calls it on the datagram's bytes, so no view of the segment is made.)
    """
    left = len(data) - at
    if left < TCP_MIN_HEADER:
        raise MalformedPacket(Reason.TCP_TRUNCATED, f"{left} bytes left for TCP")
    sport, dport, seq, ack, off_byte, flag_byte, window, check, urgent = _TCP.unpack_from(data, at)
    hlen = (off_byte >> 4) * 4
    if hlen < TCP_MIN_HEADER or hlen > left:
        raise MalformedPacket(Reason.TCP_DATA_OFFSET, f"data offset {hlen} with {left} bytes")
    flags = ((off_byte & 0x0F) << 8) | flag_byte
    if hlen == TCP_MIN_HEADER:
        return TcpHeader(seq, ack, flags, window, check, urgent, sport, dport), hlen
    options, padding = _decode_option_area(bytes(data[at + TCP_MIN_HEADER : at + hlen]))
    return TcpHeader(seq, ack, flags, window, check, urgent, sport, dport, options, padding), hlen


@dataclass(slots=True)
class TcpHeader:
    """A TCP header. ``flags`` holds the 12 bits after the data offset (reserved + flags)."""

    seq: int = 0
    ack: int = 0
    flags: int = 0
    window: int = 0
    checksum: int = 0
    urgent: int = 0
    src_port: int = 0
    dst_port: int = 0
    options: list[TcpOption] = field(default_factory=list)
    option_padding: bytes = b""

    @classmethod
    def decode(cls, data: memoryview) -> tuple[TcpHeader, int]:
        """Decode the header at the start of ``data``; returns it and its length."""
        return decode_tcp(data, 0)

    def options_wire(self) -> tuple[bytes, int]:
        """The options' wire bytes (``option_padding`` included, zero-filled to a whole
        word), and those bytes read as one big-endian number: their share of the
        checksum (a number is congruent modulo 0xFFFF to the sum of its 16-bit words).
        ValueError past 40 bytes."""
        options = self.options
        key = tuple(map(id, options))
        known = _WIRES.get(key)
        if known is not None and not self.option_padding:
            return known[1], known[2]
        # TcpOption.encode written out (no call per option): a SYN carries six.
        parts = []
        for o in options:
            kind = o.kind
            if kind in _ONE_BYTE_OPTIONS:
                parts.append(_ONE_BYTE_OPTIONS[kind])
            else:
                parts.append(bytes((kind, 2 + len(o.data))) + o.data)
        raw = b"".join(parts) + self.option_padding
        if len(raw) % 4:
            raw += bytes(4 - len(raw) % 4)  # zeros: EOL then padding
        if len(raw) > 40:
            raise ValueError(f"TCP options are {len(raw)} bytes, more than 40")
        wire = raw, int.from_bytes(raw, "big")
        if not self.option_padding and _AREA_KINDS.issuperset(map(_kind, options)):
            _remember(_WIRES, key, (tuple(options), *wire))
        return wire

    def encode(self, checksum: int | None = None) -> bytes:
        """Wire bytes, with ``checksum`` (default: the stored one) in place."""
        opts = self.options_wire()[0] if (self.options or self.option_padding) else b""
        hlen = TCP_MIN_HEADER + len(opts)
        return (
            _TCP.pack(
                self.src_port,
                self.dst_port,
                self.seq & 0xFFFFFFFF,
                self.ack & 0xFFFFFFFF,
                ((hlen // 4) << 4) | ((self.flags >> 8) & 0x0F),
                self.flags & 0xFF,
                self.window,
                self.checksum if checksum is None else checksum,
                self.urgent,
            )
            + opts
        )

    @property
    def header_length(self) -> int:
        """Encoded length in bytes."""
        return len(self.encode())

    def compute_checksum(self, src_ip: str | bytes, dst_ip: str | bytes, payload: BytesLike) -> int:
        """The checksum for this header and ``payload`` between these addresses (IPv4 or
        IPv6 pseudo-header by family)."""
        return transport_checksum(src_ip, dst_ip, PROTO_TCP, self.encode(0), payload)

    def verify_checksum(self, src_ip: str | bytes, dst_ip: str | bytes, payload: BytesLike) -> bool:
        """Whether the stored checksum is right for these addresses."""
        hdr = self.encode()
        return verify_transport_checksum(src_ip, dst_ip, PROTO_TCP, hdr + bytes(payload))

    # -- flag and option views ----------------------------------------------------------
    def has(self, flag: int) -> bool:
        """Whether a flag bit (``TcpFlags.*``) is set."""
        return bool(self.flags & flag)

    def _option(self, kind: int) -> TcpOption | None:
        for o in self.options:
            if o.kind == kind:
                return o
        return None

    def syn_options(self) -> tuple[int | None, int | None, bool, bool]:
        """``(mss, window_scale, sack_permitted, compact_close)`` read in one pass over the
        options: what a SYN or SYN-ACK offers (each as its property gives it: the first
        such option)."""
        options = self.options
        key = tuple(map(id, options))
        known = _SYNS.get(key)
        if known is not None:
            return known[1]
        mss: int | None = None
        wscale: int | None = None
        sack = compact = False
        for o in options:
            kind = o.kind
            if kind == OPT_MSS:
                if mss is None:
                    mss = int.from_bytes(o.data, "big")
            elif kind == OPT_WSCALE:
                if wscale is None:
                    wscale = o.data[0]
            elif kind == OPT_SACK_PERMITTED:
                sack = True
            elif kind == OPT_EXPERIMENT and o.data == _COMPACT_CLOSE_DATA:
                compact = True
        if _AREA_KINDS.issuperset(map(_kind, options)):
            _remember(_SYNS, key, (tuple(options), (mss, wscale, sack, compact)))
        return mss, wscale, sack, compact

    @property
    def mss(self) -> int | None:
        """The MSS option value, if present."""
        o = self._option(OPT_MSS)
        return int.from_bytes(o.data, "big") if o else None

    @property
    def window_scale(self) -> int | None:
        """The window-scale shift, if present."""
        o = self._option(OPT_WSCALE)
        return o.data[0] if o else None

    @property
    def sack_permitted(self) -> bool:
        """Whether SACK-permitted is present."""
        return self._option(OPT_SACK_PERMITTED) is not None

    @property
    def compact_close(self) -> bool:
        """Whether the compact-close option (RFC 6994 kind 253, our ExID) is present."""
        return any(o.kind == OPT_EXPERIMENT and o.data == _COMPACT_CLOSE_DATA for o in self.options)

    @property
    def sack_blocks(self) -> list[tuple[int, int]]:
        """SACK blocks as (left, right) pairs."""
        o = self._option(OPT_SACK)
        if o is None:
            return []
        return [struct.unpack_from("!II", o.data, 8 * i) for i in range(len(o.data) // 8)]

    @property
    def timestamps(self) -> tuple[int, int] | None:
        """(TSval, TSecr), if present."""
        o = self._option(OPT_TIMESTAMPS)
        if o is None:
            return None
        tsval, tsecr = struct.unpack("!II", o.data)
        return tsval, tsecr


@dataclass(slots=True)
class UdpHeader:
    """A UDP header; ``length`` covers header and payload, checksum 0 means none."""

    length: int = UDP_HEADER
    checksum: int = 0
    src_port: int = 0
    dst_port: int = 0

    @classmethod
    def decode(cls, data: bytes | memoryview) -> tuple[UdpHeader, int]:
        """Decode the header at the start of ``data``; its length field must match."""
        if len(data) < UDP_HEADER:
            raise MalformedPacket(Reason.UDP_TRUNCATED, f"{len(data)} bytes left for UDP")
        sport, dport, length, check = _UDP.unpack_from(data)
        if length != len(data):
            raise MalformedPacket(
                Reason.UDP_LENGTH, f"UDP length {length} but {len(data)} bytes present"
            )
        return cls(length, check, sport, dport), UDP_HEADER

    def encode(self, checksum: int | None = None) -> bytes:
        """Wire bytes, with ``checksum`` (default: the stored one) in place."""
        return _UDP.pack(
            self.src_port,
            self.dst_port,
            self.length,
            self.checksum if checksum is None else checksum,
        )

    @property
    def header_length(self) -> int:
        """Always 8."""
        return UDP_HEADER

    def compute_checksum(self, src_ip: str | bytes, dst_ip: str | bytes, payload: BytesLike) -> int:
        """The checksum for this header and payload (0 is sent as 0xFFFF, RFC 768)."""
        c = transport_checksum(src_ip, dst_ip, PROTO_UDP, self.encode(0), payload)
        return c or 0xFFFF

    def verify_checksum(self, src_ip: str | bytes, dst_ip: str | bytes, payload: BytesLike) -> bool:
        """Whether the stored checksum is right (0: no checksum, always right)."""
        if self.checksum == 0:
            return True
        return verify_transport_checksum(src_ip, dst_ip, PROTO_UDP, self.encode() + bytes(payload))

"""A whole SAL packet: base header, extensions, transport header and payload.

``decode_packet`` takes one UDP payload and returns a :class:`SalPacket` whose ``encode()``
gives the same bytes back. The payload is a view into the caller's buffer (no copy). Any
malformed input raises :class:`MalformedPacket` and nothing else.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Final, TypeVar

from .checksum import BytesLike, address_sum, words_sum
from .errors import MalformedPacket, Reason
from .extensions import (
    MAX_EXTENSIONS,
    NONCE_BYTES,
    AddAddrExt,
    AddressExt,
    ControlExt,
    DssExt,
    Extension,
    ExtType,
    JoinExt,
    MpCapableExt,
    PadExt,
    RelayExt,
    ServiceExt,
    Source6Ext,
    SourceExt,
    SourcePortsExt,
    UnknownExt,
    control_ext,
    decode_ip6,
)
from .inet import Address
from .transport_headers import PROTO_TCP, PROTO_UDP, TcpHeader, UdpHeader, decode_tcp

__all__ = ["BASE_HEADER", "SalPacket", "decode_packet"]

BASE_HEADER: Final = 12
REFERENCE_CLIENT_PORT: Final = 54324
_BASE: Final = struct.Struct("!IIBBH")
_TCP: Final = struct.Struct("!HHIIBBHHH")  # as sal.transport_headers packs it
_MOD: Final = 0xFFFF
_PAD: Final = PadExt()

# Extension type -> decoder of exactly that extension's bytes (dispatch table).
_EXT_DECODERS: Final[dict[int, Callable[[memoryview], Extension]]] = {
    ExtType.CONTROL: ControlExt.decode,
    ExtType.SERVICE: ServiceExt.decode,
    ExtType.ADDRESS: AddressExt.decode,
    ExtType.SOURCE: SourceExt.decode,
    ExtType.SOURCE_PORTS: SourcePortsExt.decode,
    ExtType.MP_CAPABLE: MpCapableExt.decode,
    ExtType.DSS: DssExt.decode,
    ExtType.JOIN: JoinExt.decode,
    ExtType.ADD_ADDR: AddAddrExt.decode,
    ExtType.IP6: decode_ip6,
    ExtType.RELAY: RelayExt.decode,
}

Transport = TcpHeader | UdpHeader
_E = TypeVar("_E", bound=Extension)
# The payload of a packet that has none: one shared empty view (a payload is a view into
# the datagram, never a copy; an empty one needs no view of its own).
_NO_PAYLOAD: Final = memoryview(b"")
# The shapes _encode_bare and decode_packet take in one struct call: the base header with
# a TCP header without options; with CONTROL; with CONTROL and a TCP header without options.
_BARE_TCP: Final = struct.Struct("!IIBBHHHIIBBHHH")
_BARE_CONTROL: Final = struct.Struct("!IIBBHBBBBII8s")
_BARE_CONTROL_TCP: Final = struct.Struct("!IIBBHBBBBII8sHHIIBBHHH")
# The CONTROL extension's first two bytes (type in the high nibble, length 20) as one word.
_CONTROL_WORD: Final = (int(ExtType.CONTROL) << 12) | ControlExt.LENGTH


class SalPacket:
    """One SAL packet. ``extensions`` keep wire order; ``payload`` is the transport data."""

    __slots__ = ("src_flowid", "dst_flowid", "protocol", "extensions", "transport", "payload")

    def __init__(
        self,
        src_flowid: int,
        dst_flowid: int,
        protocol: int = PROTO_TCP,
        extensions: list[Extension] | None = None,
        transport: Transport | None = None,
        payload: BytesLike = b"",
    ) -> None:
        self.src_flowid = src_flowid
        self.dst_flowid = dst_flowid
        self.protocol = protocol
        self.extensions: list[Extension] = extensions if extensions is not None else []
        self.transport = transport
        self.payload = payload

    # -- views --------------------------------------------------------------------------
    @property
    def control(self) -> ControlExt | None:
        """The first CONTROL extension, if any."""
        exts = self.extensions
        if exts and type(exts[0]) is ControlExt:
            return exts[0]  # where every control packet has it: no loop to set up
        for e in exts:
            if type(e) is ControlExt:
                return e
        return None

    @property
    def services(self) -> list[ServiceExt]:
        """SERVICE extensions in order (the first is the destination)."""
        return [e for e in self.extensions if type(e) is ServiceExt]

    @property
    def service(self) -> ServiceExt | None:
        """The first SERVICE extension: what a receiver resolves on."""
        for e in self.extensions:
            if type(e) is ServiceExt:
                return e
        return None

    @property
    def source(self) -> SourceExt | None:
        """The SOURCE extension of a forwarded packet, if any."""
        for e in self.extensions:
            if type(e) is SourceExt:
                return e
        return None

    def find(self, ext_type: type[_E]) -> _E | None:
        """The first extension of this class, if any."""
        for e in self.extensions:
            if type(e) is ext_type:
                return e
        return None

    @property
    def source_ports(self) -> SourcePortsExt | None:
        """pyserval's SOURCE_PORTS extension (the UDP port of each SOURCE address), if any."""
        for e in self.extensions:
            if type(e) is SourcePortsExt:
                return e
        return None

    def source_path(self) -> list[Address] | None:
        """The (IP, UDP port) path of a forwarded packet, original source first; ports a
        peer did not send (a reference forwarder) are the reference client port 54324.
        A path with IPv6 hops comes from SOURCE6 (which a forwarder writes instead)."""
        source = self.source
        if source is None:
            for e in self.extensions:
                if type(e) is Source6Ext:
                    return list(e.path)
            return None
        ports_ext = self.source_ports
        ports: tuple[int, ...] = ports_ext.ports if ports_ext is not None else ()
        return [
            (ip, ports[i] if i < len(ports) else REFERENCE_CLIENT_PORT)
            for i, ip in enumerate(source.addresses)
        ]

    @property
    def tcp(self) -> TcpHeader | None:
        """The TCP header, if the transport is TCP and present."""
        t = self.transport
        return t if type(t) is TcpHeader else None

    @property
    def udp(self) -> UdpHeader | None:
        """The UDP header, if the transport is UDP and present."""
        t = self.transport
        return t if type(t) is UdpHeader else None

    @property
    def shl(self) -> int:
        """SAL header length in 32-bit words, as it will be encoded."""
        return len(self._sal_header(0)) // 4

    # -- encoding -----------------------------------------------------------------------
    def _extension_bytes(self) -> bytes:
        exts = self.extensions
        # One extension (a control packet's CONTROL) needs no list and no join.
        raw = exts[0].encode() if len(exts) == 1 else b"".join([e.encode() for e in exts])
        if len(raw) % 4:
            raw += bytes(4 - len(raw) % 4)  # PAD bytes to a whole word
        return raw

    def _sal_header(self, check: int) -> bytes:
        ext = self._extension_bytes() if self.extensions else b""
        shl = (BASE_HEADER + len(ext)) // 4
        if shl > 255:
            raise ValueError(f"SAL header of {shl * 4} bytes does not fit shl")
        return _BASE.pack(self.src_flowid, self.dst_flowid, shl, self.protocol, check) + ext

    def encode(self, src_ip: str | bytes | None = None, dst_ip: str | bytes | None = None) -> bytes:
        """Wire bytes. With ``src_ip`` and ``dst_ip`` the transport checksum is (re)computed
        over the IPv4 pseudo-header, as the reference does (IPv6 addresses: the IPv6
        pseudo-header); otherwise the stored one is used.
        """
        exts = self.extensions
        t = self.transport
        # (len, not truth: a payload of None raises TypeError here as on the general path)
        if len(self.payload) == 0 and (
            t is None
            or (
                type(t) is TcpHeader
                and src_ip is not None
                and dst_ip is not None
                and not t.options
                and not t.option_padding
            )
        ):
            # A packet of a connection's set-up or close but the SYNs (pure ACK, FIN, SAL
            # FIN or ACK, SAL FIN with a TCP ACK) in one pack, if it has that shape.
            bare = _encode_bare(self, t, src_ip, dst_ip)
            if bare is not None:
                return bare
        if exts:
            # One or two extensions (CONTROL; CONTROL and SERVICE: a SYN, a third ACK)
            # need no list and no join.
            n = len(exts)
            if n == 1:
                ext = exts[0].encode()
            elif n == 2:
                ext = exts[0].encode() + exts[1].encode()
            else:
                ext = b"".join([e.encode() for e in exts])
            if len(ext) % 4:
                ext += bytes(4 - len(ext) % 4)  # PAD bytes to a whole word
            shl = 3 + len(ext) // 4
            if shl > 255:
                raise ValueError(f"SAL header of {shl * 4} bytes does not fit shl")
            ext_sum = int.from_bytes(ext, "big")
        else:
            ext, shl, ext_sum = b"", 3, 0
        src, dst, protocol = self.src_flowid, self.dst_flowid, self.protocol
        # The header checksum worked out rather than over packed bytes: a big-endian
        # number is congruent modulo 0xFFFF to the sum of its 16-bit words (2**16 = 1),
        # so the base header's words sum to src + dst + (shl, protocol) and the
        # extensions' to their bytes read as one number. The header is never all zero
        # (shl >= 3): a sum of 0 is ones' complement -0, whose field is 0 (RFC 1071).
        total = (src + dst + ((shl << 8) | protocol) + ext_sum) % _MOD
        header = _BASE.pack(src, dst, shl, protocol, _MOD - total if total else 0) + ext
        if t is None:
            if self.payload:
                raise ValueError("a payload needs a transport header")
            return header
        payload = self.payload
        if type(t) is TcpHeader:
            if src_ip is None or dst_ip is None:
                return b"".join((header, t.encode(), payload))
            # The TCP header packed once, its checksum worked out from the field values
            # the same way (sal.checksum.transport_checksum's sum: the pseudo-header's
            # addresses (cached) and length, the header with the checksum field zero, the
            # payload: words_sum, zero-padded when odd, a vector sum with the [accel] extra).
            opts, opts_sum = t.options_wire() if (t.options or t.option_padding) else (b"", 0)
            hlen = 20 + len(opts)
            flags = t.flags
            offset = ((hlen // 4) << 4) | ((flags >> 8) & 0x0F)
            seq = t.seq & 0xFFFFFFFF
            ack = t.ack & 0xFFFFFFFF
            total = (
                address_sum(src_ip, dst_ip, PROTO_TCP)
                + hlen
                + len(payload)
                + t.src_port
                + t.dst_port
                + seq
                + ack
                + ((offset << 8) | (flags & 0xFF))
                + t.window
                + t.urgent
            )
            if opts:
                total += opts_sum
            if payload:
                total += words_sum(payload)
            check = 0xFFFF - (total % 0xFFFF or 0xFFFF)  # ones' complement, never +0
            raw = _TCP.pack(
                t.src_port, t.dst_port, seq, ack, offset, flags & 0xFF, t.window, check, t.urgent
            )
            t.checksum = check
            return b"".join((header, raw, opts, payload))
        if type(t) is UdpHeader:
            t.length = 8 + len(payload)
        if src_ip is not None and dst_ip is not None:
            t.checksum = t.compute_checksum(src_ip, dst_ip, payload)
        return b"".join((header, t.encode(), payload))

    def verify_transport_checksum(self, src_ip: str | bytes, dst_ip: str | bytes) -> bool:
        """Whether the transport checksum is right for these addresses (IPv4 or IPv6).

        Over UDP encapsulation a mismatch is not a reason to drop (NATs rewrite addresses).
        """
        t = self.transport
        return True if t is None else t.verify_checksum(src_ip, dst_ip, self.payload)

    def __repr__(self) -> str:
        return (
            f"SalPacket(src_flowid={self.src_flowid:#x}, dst_flowid={self.dst_flowid:#x}, "
            f"protocol={self.protocol}, extensions={self.extensions!r}, "
            f"transport={self.transport!r}, payload={len(self.payload)} bytes)"
        )


def _encode_bare(
    pkt: SalPacket, t: Transport | None, src_ip: str | bytes | None, dst_ip: str | bytes | None
) -> bytes | None:
    """:meth:`SalPacket.encode` of a packet with no payload whose transport is None or a
    TCP header without options (and the addresses given), when its extensions are none
    (TCP only) or CONTROL alone: the base header, CONTROL and the TCP header packed at
    once. None for any other packet (the general path encodes it).

    Both checksums are worked out from the field values as the general path does (a
    number is congruent modulo 0xFFFF to the sum of its 16-bit words), CONTROL's from its
    fields rather than its packed bytes: its first word, flags and reserved byte, the two
    32-bit numbers and the nonce. The bytes are the general path's (a property test)."""
    exts = pkt.extensions
    src, dst, protocol = pkt.src_flowid, pkt.dst_flowid, pkt.protocol
    if exts:
        if len(exts) != 1:
            return None
        c = exts[0]
        if type(c) is not ControlExt:
            return None
        flags, reserved, verno, ackno, nonce = c.flags, c.reserved, c.verno, c.ackno, c.nonce
        if len(nonce) != NONCE_BYTES:
            return None  # (packed cut or padded to eight bytes: summed from those)
        total = (
            src
            + dst
            + (0x800 | protocol)  # shl 8: the base header and CONTROL's 20 bytes
            + _CONTROL_WORD
            + ((flags << 8) | reserved)
            + verno
            + ackno
            + int.from_bytes(nonce, "big")
        ) % _MOD
        sal_check = _MOD - total if total else 0
        if t is None:
            return _BARE_CONTROL.pack(
                src, dst, 8, protocol, sal_check, _CONTROL_HEAD[0], 20, flags, reserved,
                verno, ackno, nonce,
            )  # fmt: skip
    elif t is None:
        return None  # the base header alone
    else:
        total = (src + dst + (0x300 | protocol)) % _MOD
        sal_check = _MOD - total if total else 0
    assert type(t) is TcpHeader and src_ip is not None and dst_ip is not None
    tcp_flags = t.flags
    offset = 0x50 | ((tcp_flags >> 8) & 0x0F)  # data offset 5: no options
    low = tcp_flags & 0xFF
    seq = t.seq & 0xFFFFFFFF
    ack = t.ack & 0xFFFFFFFF
    sport, dport, window, urgent = t.src_port, t.dst_port, t.window, t.urgent
    tcp_total = (
        address_sum(src_ip, dst_ip, PROTO_TCP)
        + 20
        + sport
        + dport
        + seq
        + ack
        + ((offset << 8) | low)
        + window
        + urgent
    )
    check = 0xFFFF - (tcp_total % 0xFFFF or 0xFFFF)  # ones' complement, never +0
    if exts:
        wire = _BARE_CONTROL_TCP.pack(
            src, dst, 8, protocol, sal_check, _CONTROL_HEAD[0], 20, flags, reserved,
            verno, ackno, nonce, sport, dport, seq, ack, offset, low, window, check, urgent,
        )  # fmt: skip
    else:
        wire = _BARE_TCP.pack(
            src, dst, 3, protocol, sal_check, sport, dport, seq, ack, offset, low, window,
            check, urgent,
        )  # fmt: skip
    # Only once the fields packed: a field out of range raises with the header as it was,
    # as the general path leaves it.
    t.checksum = check
    return wire


def _decode_bare(data: bytes, total: int, verify: bool) -> SalPacket | None:
    """:func:`decode_packet` of a datagram of up to 92 bytes of a connection's set-up
    and close: the base header with a TCP header without options, CONTROL alone, or
    CONTROL with a TCP header (a SYN-ACK's has options), unpacked at once; None for
    anything else, a header checksum that does not verify included (the general path
    then decodes it, or refuses it for its reason)."""
    shl = data[8]
    if shl == 3:
        if total != 32:
            return None
        (src, dst, _, protocol, _, sport, dport, seq, ack, off, low, window, check, urgent) = (
            _BARE_TCP.unpack(data)
        )
        if protocol != PROTO_TCP or off >> 4 != 5:
            return None
        if verify:
            n = int.from_bytes(data[:12], "big")
            if n % _MOD or not n:
                return None
        tcp = TcpHeader(seq, ack, ((off & 0x0F) << 8) | low, window, check, urgent, sport, dport)
        return SalPacket(src, dst, PROTO_TCP, [], tcp, _NO_PAYLOAD)
    if shl != 8 or data[12] != _CONTROL_HEAD[0] or data[13] != _CONTROL_HEAD[1]:
        return None
    if verify:
        n = int.from_bytes(data[:32], "big")
        if n % _MOD or not n:
            return None
    if total == 32:
        (src, dst, _, protocol, _, _, _, flags, reserved, verno, ackno, nonce) = (
            _BARE_CONTROL.unpack(data)
        )
        if protocol != PROTO_TCP and protocol != PROTO_UDP:
            return None
        ctl = control_ext(flags, verno, ackno, nonce, reserved)
        return SalPacket(src, dst, protocol, [ctl], None, b"")
    if total != 52:
        # A TCP header with options after CONTROL (a SYN-ACK): decoded as the general
        # path decodes it, by decode_tcp on the same bytes (so a malformed one is refused
        # for the same reason), when it fills the rest of the datagram.
        (src, dst, _, protocol, _, _, _, flags, reserved, verno, ackno, nonce) = (
            _BARE_CONTROL.unpack_from(data)
        )
        if protocol != PROTO_TCP:
            return None
        tcp, tlen = decode_tcp(data, 32)
        if tlen != total - 32:
            return None
    else:
        (
            src, dst, _, protocol, _, _, _, flags, reserved, verno, ackno, nonce,
            sport, dport, seq, ack, off, low, window, check, urgent,
        ) = _BARE_CONTROL_TCP.unpack(data)  # fmt: skip
        if protocol != PROTO_TCP or off >> 4 != 5:
            return None
        tcp = TcpHeader(seq, ack, ((off & 0x0F) << 8) | low, window, check, urgent, sport, dport)
    ctl = control_ext(flags, verno, ackno, nonce, reserved)
    return SalPacket(src, dst, PROTO_TCP, [ctl], tcp, _NO_PAYLOAD)


# The first two bytes (type in the high nibble, then length) of the extensions of the
# fast layouts below.
_CONTROL_HEAD: Final = (int(ExtType.CONTROL) << 4, ControlExt.LENGTH)
_SERVICE_HEAD: Final = (int(ExtType.SERVICE) << 4, ServiceExt.LENGTH)
_RELAY_HEAD: Final = (int(ExtType.RELAY) << 4, 16)


def _decode_extensions(view: bytes | memoryview) -> list[Extension]:
    """The extensions in ``view`` (the SAL header after its 12 base bytes; a copy of them
    as bytes from :func:`decode_packet`, which reads cheaper than a view).

    Every packet of a connection's set-up and close but data carries CONTROL alone
    (SYN-ACK, SAL FIN, control ACK), CONTROL then SERVICE (third ACK) or CONTROL,
    SERVICE and RELAY (a client's SYN asks for a relayed answer): those layouts are
    recognised by their length and heads and decoded without the general loop, with the
    same decoders on the same bytes (:func:`_decode_extensions_general` gives the same
    list, or the same error, for any input).
    """
    n = len(view)
    if n >= 20 and view[0] == _CONTROL_HEAD[0] and view[1] == _CONTROL_HEAD[1]:
        if n == 20:
            return [ControlExt.decode(view)]
        if n >= 56 and view[20] == _SERVICE_HEAD[0] and view[21] == _SERVICE_HEAD[1]:
            if n == 56:
                return [ControlExt.decode(view[:20]), ServiceExt.decode(view[20:])]
            if n == 72 and view[56] == _RELAY_HEAD[0] and view[57] == _RELAY_HEAD[1]:
                return [
                    ControlExt.decode(view[:20]),
                    ServiceExt.decode(view[20:56]),
                    RelayExt.decode(view[56:]),
                ]
    return _decode_extensions_general(view if isinstance(view, memoryview) else memoryview(view))


def _decode_extensions_general(view: memoryview) -> list[Extension]:
    """The extensions in ``view``, any layout (PAD, unknown types, limits checked)."""
    extensions: list[Extension] = []
    i, n, counted = 0, len(view), 0
    while i < n:
        head = view[i]
        ext_type = head >> 4
        if ext_type == ExtType.PAD:
            if head:
                raise MalformedPacket(Reason.EXTENSION_RESERVED, f"PAD byte {head:#04x}")
            extensions.append(_PAD)
            i += 1
            continue
        if head & 0x0F:
            raise MalformedPacket(
                Reason.EXTENSION_RESERVED, f"extension type {ext_type} has reserved bits set"
            )
        counted += 1
        if counted > MAX_EXTENSIONS:
            raise MalformedPacket(Reason.TOO_MANY_EXTENSIONS, f"more than {MAX_EXTENSIONS}")
        if i + 2 > n:
            raise MalformedPacket(Reason.EXTENSION_TRUNCATED, f"type {ext_type} has no length")
        length = view[i + 1]
        if length < 2:
            raise MalformedPacket(Reason.EXTENSION_LENGTH, f"type {ext_type} length {length}")
        if i + length > n:
            raise MalformedPacket(
                Reason.EXTENSION_TRUNCATED, f"type {ext_type} of {length} bytes runs past shl"
            )
        body = view[i : i + length]
        decoder = _EXT_DECODERS.get(ext_type)
        extensions.append(decoder(body) if decoder else UnknownExt(ext_type, bytes(body)))
        i += length
    return extensions


def decode_packet(data: BytesLike, *, verify: bool = True) -> SalPacket:
    """Decode one UDP payload (SAL header, extensions, transport header, payload).

    ``verify``: check the SAL header checksum (on by default). The transport checksum is not
    checked here (it needs addresses): see :meth:`SalPacket.verify_transport_checksum`.
    Raises :class:`MalformedPacket` (with ``.reason``) for anything malformed, and nothing else.
    """
    view: memoryview | None
    buf: bytes | memoryview
    if type(data) is bytes:
        # Headers are read from the bytes themselves (struct and slices of a few dozen
        # bytes cost less than through a view); only the payload is a view into them.
        total = len(data)
        if total == 32 or total == 52 or (56 <= total <= 92 and data[8] == 8):
            # Most packets of a connection's set-up and close: see _decode_bare.
            bare = _decode_bare(data, total, verify)
            if bare is not None:
                return bare
        buf, view = data, None
    else:
        try:
            view = data if isinstance(data, memoryview) else memoryview(data)
            if view.ndim != 1 or view.itemsize != 1:
                view = view.cast("B")
        except (TypeError, ValueError) as exc:
            raise MalformedPacket(Reason.SHORT_HEADER, f"not a byte buffer: {exc}") from None
        buf = view
    total = len(buf)
    if total < BASE_HEADER:
        raise MalformedPacket(Reason.SHORT_HEADER, f"{total} bytes, need 12")
    src, dst, shl, protocol, _check = _BASE.unpack_from(buf)
    hlen = shl * 4
    if hlen < BASE_HEADER:
        raise MalformedPacket(Reason.BAD_SHL, f"shl {shl} is less than the base header")
    if hlen > total:
        raise MalformedPacket(Reason.SHL_PAST_END, f"shl {shl} ({hlen} bytes) past {total} bytes")
    if verify:
        n = int.from_bytes(buf[:hlen], "big")
        if n % _MOD or not n:
            raise MalformedPacket(Reason.BAD_CHECKSUM, "SAL header checksum does not verify")
    if protocol != PROTO_TCP and protocol != PROTO_UDP:
        raise MalformedPacket(Reason.BAD_PROTOCOL, f"unknown transport protocol {protocol}")
    extensions = _decode_extensions(buf[BASE_HEADER:hlen]) if hlen > BASE_HEADER else []
    if hlen == total:
        return SalPacket(src, dst, protocol, extensions, None, b"")
    transport: Transport
    if protocol == PROTO_TCP:
        transport, tlen = decode_tcp(buf, hlen)
    else:
        if view is None:
            view = memoryview(data)  # (a bytes slice would copy the whole payload)
        transport, tlen = UdpHeader.decode(view[hlen:])
    end = hlen + tlen
    if end == total:
        return SalPacket(src, dst, protocol, extensions, transport, _NO_PAYLOAD)
    if view is None:
        view = memoryview(data)
    return SalPacket(src, dst, protocol, extensions, transport, view[end:])

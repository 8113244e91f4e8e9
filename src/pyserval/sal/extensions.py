"""SAL header extensions: PAD, CONTROL, SERVICE, ADDRESS, SOURCE, and unknown types.

Each extension but PAD starts with two bytes: the type in the high nibble of byte 0 (low
nibble reserved, zero) and the total length in bytes. PAD is a single zero byte. Decoders
here are given a view of exactly one extension and raise :class:`MalformedPacket` only.

The reference's address-carrying extensions (ADDRESS, SOURCE) hold IPv4 only. pyserval's
type 15 (IP6) carries the IPv6 forms, one kind per third byte: SOURCE6 (a forwarding path
with ports), ADD_ADDR6 and ADDRESS6. One type number for all three, the last of the nibble,
keeps 10-14 free for later. An IPv4-only exchange never contains it, so its bytes are what
they were before IPv6 support.
"""

from __future__ import annotations

import enum
import socket
import struct
from typing import ClassVar, Final

from ..naming.service_id import ServiceID
from .errors import MalformedPacket, Reason
from .inet import Address, packed_ip16, unpack_ip16

__all__ = [
    "AddressExt",
    "ControlExt",
    "ControlFlags",
    "control_ext",
    "ExtType",
    "Extension",
    "PadExt",
    "ServiceExt",
    "SourceExt",
    "SourcePortsExt",
    "MpCapableExt",
    "DssExt",
    "JoinExt",
    "AddAddrExt",
    "RelayExt",
    "UnknownExt",
    "Address6Ext",
    "Source6Ext",
    "Ip6Kind",
    "decode_ip6",
    "MAX_EXTENSIONS",
    "NONCE_BYTES",
]

MAX_EXTENSIONS: Final = 10
NONCE_BYTES: Final = 8
SOURCE_MIN: Final = 2
SOURCE_MAX: Final = 20
SOURCE6_MAX: Final = 13
"""Most hops in SOURCE6: 4 + 18 * 13 bytes (padded to 240) fit the one-byte length."""
ADDRESS6_MAX: Final = 15


class ExtType(enum.IntEnum):
    """Extension type numbers (high nibble of the first byte)."""

    PAD = 0
    CONTROL = 1
    SERVICE = 2
    ADDRESS = 3
    SOURCE = 4
    SOURCE_PORTS = 5  # pyserval's own: the UDP port of each SOURCE address
    MP_CAPABLE = 6  # pyserval's own, multipath: a key offered in SYN / SYN-ACK
    DSS = 7  # pyserval's own, multipath: data sequence number and data ACK
    JOIN = 8  # pyserval's own, multipath: a new subflow of an existing connection
    ADD_ADDR = 9  # pyserval's own, multipath: another address of the sender
    RELAY = 12  # pyserval's own, NATs: an answer relayed by the router the client used
    IP6 = 15  # pyserval's own: IPv6 forms of SOURCE, ADD_ADDR and ADDRESS (see Ip6Kind)


class Ip6Kind(enum.IntEnum):
    """Third byte of an IP6 extension (type 15): which IPv6 form it carries."""

    SOURCE6 = 1
    ADD_ADDR6 = 2
    ADDRESS6 = 3


class ControlFlags:
    """CONTROL flags, most significant bit first; the two low bits are reserved.

    Plain ints, not an ``enum.IntFlag``: every control packet tests them, and IntFlag's
    operators run Python code on each ``&`` (``names`` gives the readable form).
    """

    SYN: Final = 0x80
    RSYN: Final = 0x40
    ACK: Final = 0x20
    NACK: Final = 0x10
    RST: Final = 0x08
    FIN: Final = 0x04

    @staticmethod
    def names(flags: int) -> str:
        """``"SYN+ACK"`` style text of ``flags`` (``"-"`` for none)."""
        bits = (("SYN", 0x80), ("RSYN", 0x40), ("ACK", 0x20), ("NACK", 0x10), ("RST", 0x08))
        out = [name for name, bit in (*bits, ("FIN", 0x04)) if flags & bit]
        return "+".join(out) or "-"


_CONTROL: Final = struct.Struct("!BBBBII8s")
# First bytes of CONTROL and SERVICE as plain ints: every handshake packet encodes them,
# and an enum member read off its class costs more than the pack itself.
_CONTROL_TYPE_BYTE: Final = int(ExtType.CONTROL) << 4
_SERVICE_TYPE_BYTE: Final = int(ExtType.SERVICE) << 4
_SERVICE_HEAD: Final = struct.Struct("!BBH")
_ADDRESS_HEAD: Final = struct.Struct("!BBHII")


def _ips(data: memoryview | bytes, count: int) -> tuple[str, ...]:
    return tuple(socket.inet_ntoa(bytes(data[4 * i : 4 * i + 4])) for i in range(count))


def _ip_bytes(addresses: tuple[str, ...]) -> bytes:
    try:
        return b"".join(socket.inet_aton(a) for a in addresses)
    except OSError as exc:
        raise ValueError(f"bad IPv4 address in {addresses!r}") from exc


def _ip16_bytes(addresses: tuple[str, ...]) -> bytes:
    try:
        return b"".join(packed_ip16(a) for a in addresses)
    except ValueError as exc:
        raise ValueError(f"bad IP address in {addresses!r}") from exc


class Extension:
    """Base of all extensions: ``type`` and ``encode()``."""

    __slots__ = ()
    type: ClassVar[int]

    @property
    def length(self) -> int:
        """Encoded length in bytes."""
        return len(self.encode())

    def encode(self) -> bytes:
        """Wire bytes of this extension."""
        raise NotImplementedError

    def __eq__(self, other: object) -> bool:
        if type(other) is type(self):
            return self.encode() == other.encode()
        return NotImplemented

    def __hash__(self) -> int:
        return hash((type(self), self.encode()))


class PadExt(Extension):
    """One byte of padding (type 0)."""

    __slots__ = ()
    type = ExtType.PAD
    _BYTES: ClassVar[bytes] = b"\x00"

    @property
    def length(self) -> int:
        return 1

    def encode(self) -> bytes:
        return self._BYTES

    def __repr__(self) -> str:
        return "PadExt()"


class ControlExt(Extension):
    """CONTROL: flags, control sequence numbers and the sender's nonce (exactly 20 bytes)."""

    __slots__ = ("flags", "verno", "ackno", "nonce", "reserved")
    type = ExtType.CONTROL
    LENGTH: ClassVar[int] = 20

    def __init__(
        self, flags: int, verno: int = 0, ackno: int = 0, nonce: bytes = bytes(8), reserved: int = 0
    ) -> None:
        if len(nonce) != NONCE_BYTES:
            raise ValueError(f"a nonce is {NONCE_BYTES} bytes, got {len(nonce)}")
        self.flags = flags
        self.verno = verno
        self.ackno = ackno
        self.nonce = bytes(nonce)
        self.reserved = reserved

    @classmethod
    def decode(cls, data: bytes | memoryview) -> ControlExt:
        if len(data) != cls.LENGTH:
            raise MalformedPacket(Reason.CONTROL_LENGTH, f"CONTROL is {len(data)} bytes, not 20")
        _, _, flags, reserved, verno, ackno, nonce = _CONTROL.unpack(data)
        return control_ext(flags, verno, ackno, nonce, reserved)

    def encode(self) -> bytes:
        return _CONTROL.pack(
            _CONTROL_TYPE_BYTE, 20, self.flags, self.reserved, self.verno, self.ackno, self.nonce
        )

    def has(self, flag: int) -> bool:
        """Whether ``flag`` is set."""
        return bool(self.flags & flag)

    def __repr__(self) -> str:
        return (
            f"ControlExt(flags={ControlFlags.names(self.flags)}, verno={self.verno:#010x}, "
            f"ackno={self.ackno:#010x}, nonce={self.nonce.hex()})"
        )


_new: Final = object.__new__


def control_ext(flags: int, verno: int, ackno: int, nonce: bytes, reserved: int = 0) -> ControlExt:
    """``ControlExt(flags, verno, ackno, nonce, reserved)`` for a ``nonce`` known to be
    eight bytes (a decoder's, a control channel's own): without the constructor's check
    and copy, in half its time (every control packet sent or received makes one)."""
    ext: ControlExt = _new(ControlExt)
    ext.flags = flags
    ext.verno = verno
    ext.ackno = ackno
    ext.nonce = nonce
    ext.reserved = reserved
    return ext


class ServiceExt(Extension):
    """SERVICE: one serviceID (exactly 36 bytes)."""

    __slots__ = ("service_id", "reserved")
    type = ExtType.SERVICE
    LENGTH: ClassVar[int] = 36

    def __init__(self, service_id: ServiceID, reserved: int = 0) -> None:
        self.service_id = service_id
        self.reserved = reserved

    @classmethod
    def decode(cls, data: bytes | memoryview) -> ServiceExt:
        if len(data) != cls.LENGTH:
            raise MalformedPacket(Reason.SERVICE_LENGTH, f"SERVICE is {len(data)} bytes, not 36")
        reserved = (data[2] << 8) | data[3]
        return cls(ServiceID._of(int.from_bytes(data[4:36], "big")), reserved)

    def encode(self) -> bytes:
        return (
            _SERVICE_HEAD.pack(_SERVICE_TYPE_BYTE, 36, self.reserved) + self.service_id.to_bytes()
        )

    def __repr__(self) -> str:
        return f"ServiceExt({self.service_id.hex})"


class AddressExt(Extension):
    """ADDRESS: verno, ackno and n IPv4 addresses (12 + 4n bytes)."""

    __slots__ = ("verno", "ackno", "addresses", "reserved")
    type = ExtType.ADDRESS

    def __init__(
        self, verno: int, ackno: int, addresses: tuple[str, ...] = (), reserved: int = 0
    ) -> None:
        self.verno = verno
        self.ackno = ackno
        self.addresses = tuple(addresses)
        self.reserved = reserved

    @classmethod
    def decode(cls, data: memoryview) -> AddressExt:
        n = len(data)
        if n < 12 or (n - 12) % 4:
            raise MalformedPacket(Reason.ADDRESS_LENGTH, f"ADDRESS of {n} bytes is not 12 + 4n")
        _, _, reserved, verno, ackno = _ADDRESS_HEAD.unpack_from(data)
        return cls(verno, ackno, _ips(data[12:], (n - 12) // 4), reserved)

    def encode(self) -> bytes:
        body = _ip_bytes(self.addresses)
        length = 12 + len(body)
        if length > 255:
            raise ValueError("too many addresses for one ADDRESS extension")
        return (
            _ADDRESS_HEAD.pack(ExtType.ADDRESS << 4, length, self.reserved, self.verno, self.ackno)
            + body
        )

    def __repr__(self) -> str:
        return f"AddressExt(verno={self.verno:#x}, ackno={self.ackno:#x}, {self.addresses})"


class SourceExt(Extension):
    """SOURCE: the path a forwarded packet took, original source first (2..20 addresses)."""

    __slots__ = ("addresses", "reserved")
    type = ExtType.SOURCE

    def __init__(self, addresses: tuple[str, ...], reserved: int = 0) -> None:
        self.addresses = tuple(addresses)
        self.reserved = reserved

    @classmethod
    def decode(cls, data: memoryview) -> SourceExt:
        n = len(data)
        count, rem = divmod(n - 4, 4)
        if n < 4 or rem or not SOURCE_MIN <= count <= SOURCE_MAX:
            raise MalformedPacket(
                Reason.SOURCE_LENGTH, f"SOURCE of {n} bytes is not 4 + 4n with 2 <= n <= 20"
            )
        reserved = (data[2] << 8) | data[3]
        return cls(_ips(data[4:], count), reserved)

    def encode(self) -> bytes:
        if not SOURCE_MIN <= len(self.addresses) <= SOURCE_MAX:
            raise ValueError(f"SOURCE holds 2..20 addresses, got {len(self.addresses)}")
        body = _ip_bytes(self.addresses)
        return _SERVICE_HEAD.pack(ExtType.SOURCE << 4, 4 + len(body), self.reserved) + body

    def __repr__(self) -> str:
        return f"SourceExt({self.addresses})"


class SourcePortsExt(Extension):
    """SOURCE_PORTS (type 5, pyserval's own): the UDP port of each SOURCE address, in order.

    The reference SAL ran on raw IP, where an address was enough to answer a forwarded SYN;
    over UDP encapsulation the responder also needs the client's port (which a NAT may have
    chosen). Layout: head (type, length), count u8, reserved u8, ``count`` u16 ports, then
    zero bytes to a whole word. A receiver that finds no SOURCE_PORTS answers the reference
    client port 54324.
    """

    __slots__ = ("ports",)
    type = ExtType.SOURCE_PORTS

    def __init__(self, ports: tuple[int, ...]) -> None:
        self.ports = tuple(ports)

    @classmethod
    def decode(cls, data: memoryview) -> SourcePortsExt:
        n = len(data)
        count = data[2] if n >= 4 else -1
        if count < SOURCE_MIN or count > SOURCE_MAX or n != _ports_length(count) or data[3]:
            raise MalformedPacket(
                Reason.SOURCE_PORTS_LENGTH,
                f"SOURCE_PORTS of {n} bytes does not hold 2..20 ports in whole words",
            )
        return cls(struct.unpack_from(f"!{count}H", data, 4))

    def encode(self) -> bytes:
        count = len(self.ports)
        if not SOURCE_MIN <= count <= SOURCE_MAX:
            raise ValueError(f"SOURCE_PORTS holds 2..20 ports, got {count}")
        length = _ports_length(count)
        body = struct.pack(f"!{count}H", *self.ports)
        return bytes((ExtType.SOURCE_PORTS << 4, length, count, 0)) + body.ljust(length - 4, b"\0")

    def __repr__(self) -> str:
        return f"SourcePortsExt({self.ports})"


def _ports_length(count: int) -> int:
    return 4 + (2 * count + 3) // 4 * 4


class MpCapableExt(Extension):
    """MP_CAPABLE (type 6): head, reserved u16, the sender's 64-bit key (12 bytes)."""

    __slots__ = ("key", "reserved")
    type = ExtType.MP_CAPABLE

    def __init__(self, key: int, reserved: int = 0) -> None:
        self.key = key
        self.reserved = reserved  # kept, so that what decodes encodes to the same bytes

    @classmethod
    def decode(cls, data: memoryview) -> MpCapableExt:
        if len(data) != 12:
            raise MalformedPacket(Reason.MULTIPATH_LENGTH, f"MP_CAPABLE of {len(data)} bytes")
        return cls(int.from_bytes(data[4:12], "big"), (data[2] << 8) | data[3])

    def encode(self) -> bytes:
        head = bytes((ExtType.MP_CAPABLE << 4, 12)) + self.reserved.to_bytes(2, "big")
        return head + self.key.to_bytes(8, "big")

    def __repr__(self) -> str:
        return f"MpCapableExt(key={self.key:#018x})"


class DssExt(Extension):
    """DSS (type 7): head, flags u8, reserved u8, DSN u64 of the first payload byte (or of
    the DATA_FIN), cumulative data ACK u64 (20 bytes). Flags: 0x01 the DSN is valid,
    0x02 DATA_FIN."""

    __slots__ = ("flags", "dsn", "data_ack", "reserved")
    type = ExtType.DSS
    HAS_DSN: Final = 0x01
    DATA_FIN: Final = 0x02

    def __init__(self, flags: int, dsn: int, data_ack: int, reserved: int = 0) -> None:
        self.flags = flags
        self.dsn = dsn
        self.data_ack = data_ack
        self.reserved = reserved

    @classmethod
    def decode(cls, data: memoryview) -> DssExt:
        if len(data) != 20:
            raise MalformedPacket(Reason.MULTIPATH_LENGTH, f"DSS of {len(data)} bytes")
        flags, reserved, dsn, ack = _DSS.unpack_from(data, 2)
        return cls(flags, dsn, ack, reserved)

    def encode(self) -> bytes:
        body = _DSS.pack(self.flags, self.reserved, self.dsn, self.data_ack)
        return bytes((ExtType.DSS << 4, 20)) + body

    def __repr__(self) -> str:
        return f"DssExt(flags={self.flags:#x}, dsn={self.dsn}, data_ack={self.data_ack})"


class JoinExt(Extension):
    """JOIN (type 8): head, reserved u16, the server's token u32, an 8-byte proof (16)."""

    __slots__ = ("token", "proof", "reserved")
    type = ExtType.JOIN

    def __init__(self, token: int, proof: bytes, reserved: int = 0) -> None:
        self.token = token
        self.proof = bytes(proof)
        self.reserved = reserved

    @classmethod
    def decode(cls, data: memoryview) -> JoinExt:
        if len(data) != 16:
            raise MalformedPacket(Reason.MULTIPATH_LENGTH, f"JOIN of {len(data)} bytes")
        reserved = (data[2] << 8) | data[3]
        return cls(int.from_bytes(data[4:8], "big"), bytes(data[8:16]), reserved)

    def encode(self) -> bytes:
        head = bytes((ExtType.JOIN << 4, 16)) + self.reserved.to_bytes(2, "big")
        return head + self.token.to_bytes(4, "big") + self.proof

    def __repr__(self) -> str:
        return f"JoinExt(token={self.token:#010x})"


class AddAddrExt(Extension):
    """ADD_ADDR: another (IP, UDP port) of the sender, of either family.

    IPv4 travels as type 9 (8 bytes: head, UDP port u16, IPv4 address); IPv6 as the IP6
    extension's ADD_ADDR6 form (24 bytes: head, kind 2, reserved u8, UDP port u16,
    reserved u16, IPv6 address). Both decode to this class, so a receiver handles one.
    """

    __slots__ = ("address",)
    type = ExtType.ADD_ADDR

    def __init__(self, address: Address) -> None:
        self.address = address

    @classmethod
    def decode(cls, data: memoryview) -> AddAddrExt:
        if len(data) != 8:
            raise MalformedPacket(Reason.MULTIPATH_LENGTH, f"ADD_ADDR of {len(data)} bytes")
        port = (data[2] << 8) | data[3]
        return cls((_ips(data[4:8], 1)[0], port))

    def encode(self) -> bytes:
        ip, port = self.address
        if ":" in ip:
            head = bytes((ExtType.IP6 << 4, 24, Ip6Kind.ADD_ADDR6, 0))
            return head + port.to_bytes(2, "big") + bytes(2) + _ip16_bytes((ip,))
        return bytes((ExtType.ADD_ADDR << 4, 8)) + port.to_bytes(2, "big") + _ip_bytes((ip,))

    def __repr__(self) -> str:
        ip, port = self.address
        return f"AddAddrExt([{ip}]:{port})" if ":" in ip else f"AddAddrExt({ip}:{port})"


class Source6Ext(Extension):
    """SOURCE6 (type 15, kind 1): the path a forwarded packet took when any hop is IPv6.

    Head, kind 1, count u8 (2..13), then ``count`` entries of a 16-byte address (an IPv4
    hop IPv4-mapped) and its UDP port u16, original source first, zero-padded to a whole
    word. It replaces SOURCE + SOURCE_PORTS in such a packet (an IPv4-only path keeps them).
    """

    __slots__ = ("path",)
    type = ExtType.IP6

    def __init__(self, path: tuple[Address, ...]) -> None:
        self.path = tuple(path)

    @classmethod
    def decode(cls, data: memoryview) -> Source6Ext:
        n = len(data)
        count = data[3] if n >= 4 else -1
        if not SOURCE_MIN <= count <= SOURCE6_MAX or n != _source6_length(count):
            raise MalformedPacket(
                Reason.IP6_LENGTH, f"SOURCE6 of {n} bytes does not hold 2..13 whole entries"
            )
        end = 4 + 18 * count
        if any(data[end:n]):
            raise MalformedPacket(Reason.EXTENSION_RESERVED, "SOURCE6 padding is not zero")
        path = tuple(
            (unpack_ip16(data[i : i + 16]), (data[i + 16] << 8) | data[i + 17])
            for i in range(4, end, 18)
        )
        return cls(path)

    def encode(self) -> bytes:
        count = len(self.path)
        if not SOURCE_MIN <= count <= SOURCE6_MAX:
            raise ValueError(f"SOURCE6 holds 2..13 hops, got {count}")
        length = _source6_length(count)
        body = b"".join(_ip16_bytes((ip,)) + port.to_bytes(2, "big") for ip, port in self.path)
        head = bytes((ExtType.IP6 << 4, length, Ip6Kind.SOURCE6, count))
        return head + body.ljust(length - 4, b"\0")

    def __repr__(self) -> str:
        return f"Source6Ext({self.path})"


def _source6_length(count: int) -> int:
    return 4 + (18 * count + 3) // 4 * 4


class Address6Ext(Extension):
    """ADDRESS6 (type 15, kind 3): ADDRESS with IPv6 addresses (12 + 16n bytes, n <= 15).

    Head, kind 3, reserved u8, verno u32, ackno u32, n 16-byte addresses. Like the
    reference's ADDRESS it is parsed and not acted on.
    """

    __slots__ = ("verno", "ackno", "addresses")
    type = ExtType.IP6

    def __init__(self, verno: int, ackno: int, addresses: tuple[str, ...] = ()) -> None:
        self.verno = verno
        self.ackno = ackno
        self.addresses = tuple(addresses)

    @classmethod
    def decode(cls, data: memoryview) -> Address6Ext:
        n = len(data)
        if n < 12 or (n - 12) % 16:
            raise MalformedPacket(Reason.IP6_LENGTH, f"ADDRESS6 of {n} bytes is not 12 + 16n")
        if data[3]:
            raise MalformedPacket(Reason.EXTENSION_RESERVED, "ADDRESS6 reserved byte set")
        verno, ackno = struct.unpack_from("!II", data, 4)
        return cls(verno, ackno, tuple(unpack_ip16(data[i : i + 16]) for i in range(12, n, 16)))

    def encode(self) -> bytes:
        if len(self.addresses) > ADDRESS6_MAX:
            raise ValueError("too many addresses for one ADDRESS6 extension")
        body = _ip16_bytes(self.addresses)
        head = bytes((ExtType.IP6 << 4, 12 + len(body), Ip6Kind.ADDRESS6, 0))
        return head + struct.pack("!II", self.verno, self.ackno) + body

    def __repr__(self) -> str:
        return f"Address6Ext(verno={self.verno:#x}, ackno={self.ackno:#x}, {self.addresses})"


def _decode_add_addr6(data: memoryview) -> AddAddrExt:
    if len(data) != 24:
        raise MalformedPacket(Reason.IP6_LENGTH, f"ADD_ADDR6 of {len(data)} bytes, not 24")
    if data[3] or data[6] or data[7]:
        raise MalformedPacket(Reason.EXTENSION_RESERVED, "ADD_ADDR6 reserved bytes set")
    ip = unpack_ip16(data[8:24])
    if ":" not in ip:
        # An IPv4 address goes in ADD_ADDR (type 9): one form per address keeps the
        # encoding unique.
        raise MalformedPacket(Reason.IP6_LENGTH, "ADD_ADDR6 holds an IPv4-mapped address")
    return AddAddrExt((ip, (data[4] << 8) | data[5]))


def decode_ip6(data: memoryview) -> Extension:
    """An IP6 extension (type 15) by its kind byte; an unknown kind is kept whole (a later
    version's form, ignored here as any unknown extension is)."""
    if len(data) < 4:
        raise MalformedPacket(Reason.IP6_LENGTH, f"IP6 extension of {len(data)} bytes")
    kind = data[2]
    if kind == Ip6Kind.SOURCE6:
        return Source6Ext.decode(data)
    if kind == Ip6Kind.ADD_ADDR6:
        return _decode_add_addr6(data)
    if kind == Ip6Kind.ADDRESS6:
        return Address6Ext.decode(data)
    return UnknownExt(ExtType.IP6, bytes(data))


RELAY_TAG_BYTES: Final = 8
_NO_TAG: Final = bytes(RELAY_TAG_BYTES)


class RelayExt(Extension):
    """RELAY (type 12, 16 bytes): head, UDP port u16, IPv4 address, tag (8 bytes).

    pyserval's NAT traversal through a service router (README "NATs"). Its meaning is
    told by which fields are zero:

    * marker (address 0.0.0.0:0, zero tag), in a client's SYN or datagram: "an answer
      may come back relayed by the router I sent this to";
    * filled in by that first router (the client's address as it saw it, its tag: a MAC
      of that address under a secret of the router's own);
    * relay request (tag set, no SOURCE), from the answering instance to that router:
      "send this on to the address", which the router does only if the tag is its own;
    * relayed (an address, zero tag), from the router to the client: "this came from the
      instance at the address", so the client goes there directly.
    """

    __slots__ = ("address", "tag")
    type = ExtType.RELAY

    def __init__(self, address: Address = ("0.0.0.0", 0), tag: bytes = _NO_TAG) -> None:
        if len(tag) != RELAY_TAG_BYTES:
            raise ValueError(f"a RELAY tag is {RELAY_TAG_BYTES} bytes: {len(tag)}")
        self.address = address
        self.tag = bytes(tag)

    @property
    def is_marker(self) -> bool:
        """A client's "relayed answers welcome", not yet filled in by a router."""
        return self.address[1] == 0 and self.tag == _NO_TAG

    @property
    def is_request(self) -> bool:
        """Carries a router's tag (a forwarded marker, or an instance's relay request)."""
        return self.tag != _NO_TAG

    @property
    def is_relayed(self) -> bool:
        """A router relayed this packet: ``address`` is where it really came from."""
        return self.address[1] != 0 and self.tag == _NO_TAG

    @classmethod
    def decode(cls, data: bytes | memoryview) -> RelayExt:
        if len(data) != 16:
            raise MalformedPacket(Reason.RELAY_LENGTH, f"RELAY of {len(data)} bytes")
        port = (data[2] << 8) | data[3]
        return cls((_ips(data[4:8], 1)[0], port), bytes(data[8:16]))

    def encode(self) -> bytes:
        ip, port = self.address
        head = bytes((ExtType.RELAY << 4, 16)) + port.to_bytes(2, "big")
        return head + _ip_bytes((ip,)) + self.tag

    def __repr__(self) -> str:
        return f"RelayExt({self.address[0]}:{self.address[1]}, tag={self.tag.hex()})"


_DSS: Final = struct.Struct("!BBQQ")


class UnknownExt(Extension):
    """An extension of a type this version does not know: kept whole for re-encoding."""

    __slots__ = ("ext_type", "raw")
    type = -1

    def __init__(self, ext_type: int, raw: bytes) -> None:
        self.ext_type = ext_type
        self.raw = bytes(raw)

    def encode(self) -> bytes:
        return self.raw

    def __repr__(self) -> str:
        return f"UnknownExt(type={self.ext_type}, raw={self.raw.hex()})"

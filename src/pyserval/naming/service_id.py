"""Service identifiers (256-bit serviceIDs) and prefixes of them.

A serviceID names a *service* (a group of processes with the same function), not a host.
IDs are compared most significant bit first (bit 0 is the MSB of byte 0), which is the
order the service table matches prefixes in.

Text forms accepted everywhere the API takes a serviceID:

* 64 hex digits: the ID itself;
* ``<hex>/<len>``: a prefix; the hex digits are the *leading* bits (left aligned, padded
  with zeros on the right), so ``00004001/32`` is the block whose first 32 bits are
  0x00004001;
* anything else: a human name, turned into an ID by :meth:`ServiceID.from_name`.
"""

from __future__ import annotations

import functools
import hashlib
import string
from typing import Final

__all__ = [
    "SERVICE_ID_BITS",
    "SERVICE_ID_BYTES",
    "InvalidServiceID",
    "ServiceID",
    "ServicePrefix",
    "ServiceLike",
    "PrefixLike",
    "as_service_id",
    "as_service_prefix",
    "parse_service",
]

SERVICE_ID_BITS: Final = 256
SERVICE_ID_BYTES: Final = 32
_MAX: Final = (1 << SERVICE_ID_BITS) - 1
_HEX_DIGITS: Final = frozenset(string.hexdigits)
# Domain separation so a name can never collide with an ID derived some other way.
_NAME_DOMAIN: Final = b"pyserval/service-name/v1\x00"


class InvalidServiceID(ValueError):
    """A serviceID or prefix given by the caller is not valid (the message names it)."""


class ServiceID:
    """An immutable 256-bit service identifier.

    Build one with :meth:`from_bytes`, :meth:`from_int`, :meth:`from_hex`,
    :meth:`from_name` or :meth:`parse`; ``ServiceID(x)`` accepts an int, 32 bytes or text.
    """

    __slots__ = ("_value",)
    _value: int

    def __init__(self, value: int | bytes | bytearray | memoryview | str | ServiceID) -> None:
        if isinstance(value, ServiceID):
            v = value._value
        elif isinstance(value, bool):
            raise InvalidServiceID(f"serviceID must be int, bytes or text, not bool: {value!r}")
        elif isinstance(value, int):
            if not 0 <= value <= _MAX:
                raise InvalidServiceID(f"serviceID integer out of range 0..2**256-1: {value!r}")
            v = value
        elif isinstance(value, (bytes, bytearray, memoryview)):
            raw = bytes(value)
            if len(raw) != SERVICE_ID_BYTES:
                raise InvalidServiceID(
                    f"serviceID must be exactly 32 bytes, got {len(raw)}: {raw.hex()!r}"
                )
            v = int.from_bytes(raw, "big")
        elif isinstance(value, str):
            v = ServiceID.parse(value)._value
        else:
            raise InvalidServiceID(
                f"cannot make a serviceID from {type(value).__name__}: {value!r}"
            )
        object.__setattr__(self, "_value", v)

    # -- construction -------------------------------------------------------------------
    @classmethod
    def _of(cls, value: int) -> ServiceID:
        """Trusted fast constructor (no checks): for internal use on valid ints."""
        sid = object.__new__(cls)
        object.__setattr__(sid, "_value", value)
        return sid

    @classmethod
    def from_int(cls, value: int) -> ServiceID:
        """The ID with this integer value (0 .. 2**256-1)."""
        return cls(value)

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> ServiceID:
        """The ID from its 32-byte big-endian wire form."""
        if len(data) != SERVICE_ID_BYTES:
            raise InvalidServiceID(f"serviceID must be exactly 32 bytes, got {len(data)}")
        return cls._of(int.from_bytes(data, "big"))

    @classmethod
    def from_hex(cls, text: str) -> ServiceID:
        """The ID from exactly 64 hex digits."""
        t = text.strip()
        if len(t) != 64 or not _HEX_DIGITS.issuperset(t):
            raise InvalidServiceID(f"a serviceID in hex must be exactly 64 hex digits: {text!r}")
        return cls._of(int(t, 16))

    @classmethod
    def from_name(cls, name: str) -> ServiceID:
        """A stable ID derived from a human-readable name (SHA-256 of the name).

        The same name gives the same ID on every host and every version of pyserval.
        """
        if not isinstance(name, str) or not name:
            raise InvalidServiceID(f"a service name must be a non-empty string: {name!r}")
        digest = hashlib.sha256(_NAME_DOMAIN + name.encode("utf-8")).digest()
        return cls._of(int.from_bytes(digest, "big"))

    @classmethod
    def parse(cls, text: str) -> ServiceID:
        """Text to ID: 64 hex digits is the ID itself, anything else is a name.

        Prefix text (``<hex>/<len>``) is refused here: use :func:`parse_service`.
        """
        t = text.strip()
        if len(t) == 64 and _HEX_DIGITS.issuperset(t):
            return cls._of(int(t, 16))
        if "/" in t and _looks_like_prefix(t):
            raise InvalidServiceID(f"expected a serviceID, got a prefix: {text!r}")
        return cls.from_name(t)

    # -- accessors ----------------------------------------------------------------------
    @property
    def value(self) -> int:
        """The ID as an integer."""
        return self._value

    def __int__(self) -> int:
        return self._value

    def __index__(self) -> int:
        return self._value

    def to_bytes(self) -> bytes:
        """The 32-byte big-endian wire form."""
        return self._value.to_bytes(SERVICE_ID_BYTES, "big")

    def __bytes__(self) -> bytes:
        return self.to_bytes()

    @property
    def hex(self) -> str:
        """The 64-hex-digit text form."""
        return format(self._value, "064x")

    def bit(self, index: int) -> int:
        """Bit ``index`` counted from the most significant (bit 0 = MSB of byte 0)."""
        if not 0 <= index < SERVICE_ID_BITS:
            raise IndexError(f"bit index out of range 0..255: {index}")
        return (self._value >> (SERVICE_ID_BITS - 1 - index)) & 1

    def prefix(self, length: int) -> ServicePrefix:
        """The prefix of the first ``length`` bits of this ID."""
        return ServicePrefix(self, length)

    def has_prefix(self, prefix: ServicePrefix) -> bool:
        """Whether this ID lies inside ``prefix``."""
        return prefix.contains(self)

    def common_prefix_length(self, other: ServiceID) -> int:
        """How many leading bits this ID shares with ``other``."""
        return SERVICE_ID_BITS - (self._value ^ other._value).bit_length()

    # -- value semantics ----------------------------------------------------------------
    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("ServiceID is immutable")

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ServiceID):
            return self._value == other._value
        return NotImplemented

    def __lt__(self, other: ServiceID) -> bool:
        if not isinstance(other, ServiceID):
            return NotImplemented
        return self._value < other._value

    def __le__(self, other: ServiceID) -> bool:
        if not isinstance(other, ServiceID):
            return NotImplemented
        return self._value <= other._value

    def __gt__(self, other: ServiceID) -> bool:
        if not isinstance(other, ServiceID):
            return NotImplemented
        return self._value > other._value

    def __ge__(self, other: ServiceID) -> bool:
        if not isinstance(other, ServiceID):
            return NotImplemented
        return self._value >= other._value

    def __hash__(self) -> int:
        return hash((ServiceID, self._value))

    def __repr__(self) -> str:
        return f"ServiceID('{self.hex}')"

    def __str__(self) -> str:
        return self.hex

    def __reduce__(self) -> tuple[type[ServiceID], tuple[int]]:
        return (ServiceID, (self._value,))


class ServicePrefix:
    """A block of serviceIDs: the first ``length`` bits (0..256) of ``service_id``.

    Bits past ``length`` are cleared (normalised), so two prefixes naming the same block are
    equal. ``ServicePrefix(ServiceID(0), 0)`` is the default rule, matching every ID.
    """

    __slots__ = ("_value", "_length")
    _value: int
    _length: int

    def __init__(self, service_id: ServiceID | int | bytes | str, length: int) -> None:
        if isinstance(length, bool) or not isinstance(length, int):
            raise InvalidServiceID(f"prefix length must be an int: {length!r}")
        if not 0 <= length <= SERVICE_ID_BITS:
            raise InvalidServiceID(f"prefix length must be 0..256: {length}")
        sid = service_id if isinstance(service_id, ServiceID) else ServiceID(service_id)
        object.__setattr__(self, "_value", sid.value & _mask(length))
        object.__setattr__(self, "_length", length)

    @classmethod
    def _of(cls, value: int, length: int) -> ServicePrefix:
        p = object.__new__(cls)
        object.__setattr__(p, "_value", value & _mask(length))
        object.__setattr__(p, "_length", length)
        return p

    @classmethod
    def default(cls) -> ServicePrefix:
        """The /0 prefix (the default rule)."""
        return cls._of(0, 0)

    @classmethod
    def parse(cls, text: str) -> ServicePrefix:
        """Parse ``<hex>/<len>``; the hex digits are the leading bits (left aligned)."""
        t = text.strip()
        hex_part, sep, len_part = t.partition("/")
        if not sep:
            raise InvalidServiceID(f"a service prefix is written <hex>/<len>: {text!r}")
        if not len_part.isdigit():
            raise InvalidServiceID(f"bad prefix length in {text!r}")
        length = int(len_part)
        if length > SERVICE_ID_BITS:
            raise InvalidServiceID(f"prefix length must be 0..256 in {text!r}")
        if len(hex_part) > 64 or not _HEX_DIGITS.issuperset(hex_part):
            raise InvalidServiceID(f"bad hex digits in service prefix {text!r}")
        value = int(hex_part, 16) << (4 * (64 - len(hex_part))) if hex_part else 0
        if value & ~_mask(length):
            raise InvalidServiceID(f"service prefix {text!r} has bits set past its length {length}")
        return cls._of(value, length)

    @property
    def service_id(self) -> ServiceID:
        """The normalised ID of the block (bits past the length are zero)."""
        return ServiceID._of(self._value)

    @property
    def value(self) -> int:
        """The normalised block as an integer."""
        return self._value

    @property
    def length(self) -> int:
        """How many leading bits the prefix fixes."""
        return self._length

    def contains(self, item: ServiceID | ServicePrefix) -> bool:
        """Whether an ID, or every ID of a longer prefix, lies inside this prefix."""
        if isinstance(item, ServicePrefix):
            if item._length < self._length:
                return False
            value = item._value
        else:
            value = item.value
        return (value & _mask(self._length)) == self._value

    __contains__ = contains

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("ServicePrefix is immutable")

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ServicePrefix):
            return self._value == other._value and self._length == other._length
        return NotImplemented

    def __lt__(self, other: ServicePrefix) -> bool:
        if not isinstance(other, ServicePrefix):
            return NotImplemented
        return (self._value, self._length) < (other._value, other._length)

    def __hash__(self) -> int:
        return hash((ServicePrefix, self._value, self._length))

    def __str__(self) -> str:
        return f"{self._value:064x}/{self._length}"

    def __repr__(self) -> str:
        return f"ServicePrefix('{self}')"

    def __reduce__(self) -> tuple[type[ServicePrefix], tuple[ServiceID, int]]:
        return (ServicePrefix, (self.service_id, self._length))


def _mask(length: int) -> int:
    """Mask of the first ``length`` bits of a 256-bit value."""
    return _MAX ^ ((1 << (SERVICE_ID_BITS - length)) - 1)


def _looks_like_prefix(text: str) -> bool:
    hex_part, _, len_part = text.partition("/")
    return len_part.isdigit() and _HEX_DIGITS.issuperset(hex_part)


ServiceLike = ServiceID | str | bytes | int
PrefixLike = ServicePrefix | ServiceID | str


def as_service_id(value: ServiceLike) -> ServiceID:
    """Coerce an API argument to a :class:`ServiceID` (text: hex ID or name)."""
    if isinstance(value, ServiceID):
        return value
    if type(value) is str:
        return _parsed_text(value)
    return ServiceID(value)


@functools.lru_cache(maxsize=256)
def _parsed_text(text: str) -> ServiceID:
    # An application names the same few services in every connect: hashing a name is
    # a SHA-256 and some string work each time. A ServiceID is immutable, so one object
    # may be shared; bad text raises and is not cached.
    return ServiceID.parse(text)


def parse_service(text: str) -> ServiceID | ServicePrefix:
    """Text as the API reads it: ``<hex>/<len>`` is a prefix, 64 hex an ID, else a name."""
    t = text.strip()
    if "/" in t and _looks_like_prefix(t):
        return ServicePrefix.parse(t)
    return ServiceID.parse(t)


def as_service_prefix(value: PrefixLike) -> ServicePrefix:
    """Coerce an API argument to a prefix; a bare ID or name is its /256 prefix."""
    if isinstance(value, ServicePrefix):
        return value
    if isinstance(value, ServiceID):
        return ServicePrefix._of(value.value, SERVICE_ID_BITS)
    if isinstance(value, str):
        parsed = parse_service(value)
        if isinstance(parsed, ServicePrefix):
            return parsed
        return ServicePrefix._of(parsed.value, SERVICE_ID_BITS)
    raise InvalidServiceID(f"cannot make a service prefix from {type(value).__name__}: {value!r}")

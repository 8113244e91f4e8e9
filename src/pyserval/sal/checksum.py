"""The Internet checksum (RFC 1071) and the pseudo-header sums (IPv4, and IPv6 per RFC 8200 8.1).

The ones'-complement sum of 16-bit big-endian words is congruent, modulo 0xFFFF, to the
buffer read as one big integer (because 0x10000 = 1 mod 0xFFFF). ``int.from_bytes`` and one
modulo run in C, which makes this far faster than summing words in a Python loop.
"""

from __future__ import annotations

import socket
from functools import lru_cache
from typing import Final

from .inet import packed_ip16

__all__ = [
    "address_sum",
    "internet_checksum",
    "ipv4_bytes",
    "pseudo_header_sum",
    "transport_checksum",
    "verify_transport_checksum",
    "words_sum",
]

_MOD: Final = 0xFFFF

BytesLike = bytes | bytearray | memoryview


def words_sum(data: BytesLike) -> int:
    """A partial sum of ``data`` as 16-bit words, modulo 0xFFFF (odd length: zero-padded).

    Partial sums of even-length pieces simply add up.
    """
    n = int.from_bytes(data, "big")
    if len(data) & 1:
        n <<= 8
    return n % _MOD


def _fold(total: int, nonzero: bool) -> int:
    """Checksum field value from a partial sum (``nonzero``: any word was non-zero)."""
    s = total % _MOD
    if s == 0 and nonzero:
        s = _MOD  # ones'-complement arithmetic never gives +0 for non-zero input
    return (~s) & 0xFFFF


def internet_checksum(data: BytesLike) -> int:
    """The checksum of ``data`` (compute it with the checksum field set to zero)."""
    n = int.from_bytes(data, "big")
    if len(data) & 1:
        n <<= 8
    return _fold(n % _MOD, n != 0)


def ipv4_bytes(address: str | bytes) -> bytes:
    """Four bytes of an IPv4 address given as text or bytes."""
    if isinstance(address, bytes):
        if len(address) != 4:
            raise ValueError(f"an IPv4 address is 4 bytes: {address!r}")
        return address
    return socket.inet_aton(address)


def _is_v6(address: str | bytes) -> bool:
    return len(address) == 16 if isinstance(address, bytes) else ":" in address


@lru_cache(maxsize=4096)
def address_sum(src: str | bytes, dst: str | bytes, protocol: int) -> int:
    """The pseudo-header's partial sum without its length field: the addresses and the
    protocol (IPv4's when both addresses are IPv4, else IPv6's with IPv4-mapped addresses).

    Cached: a flow sends every segment between the same two addresses, and the address
    parsing costs more than the rest of a small segment's checksum. The length adds on as
    a plain number (a 16-bit word for IPv4; for IPv6's 32-bit field its two words are
    congruent to the number itself modulo 0xFFFF).
    """
    if _is_v6(src) or _is_v6(dst):
        return words_sum(packed_ip16(src) + packed_ip16(dst)) + protocol
    return words_sum(ipv4_bytes(src) + ipv4_bytes(dst)) + protocol


def pseudo_header_sum(src: str | bytes, dst: str | bytes, protocol: int, length: int) -> int:
    """Partial sum of the pseudo-header: IPv4's (source, destination, 0, protocol, length)
    when both addresses are IPv4, else IPv6's (RFC 8200 8.1: source, destination, 32-bit
    length, three zero bytes, next header), an IPv4 one written IPv4-mapped."""
    return (address_sum(src, dst, protocol) + length) % _MOD


def transport_checksum(
    src: str | bytes, dst: str | bytes, protocol: int, header: BytesLike, payload: BytesLike
) -> int:
    """TCP/UDP checksum over pseudo-header + header (checksum field zero) + payload.

    ``header`` must have even length (TCP and UDP headers always do).
    """
    length = len(header) + len(payload)
    total = pseudo_header_sum(src, dst, protocol, length) + words_sum(header) + words_sum(payload)
    return _fold(total, True)


def verify_transport_checksum(
    src: str | bytes, dst: str | bytes, protocol: int, segment: BytesLike
) -> bool:
    """Whether a whole TCP/UDP segment (checksum in place) verifies for these addresses."""
    total = pseudo_header_sum(src, dst, protocol, len(segment)) + words_sum(segment)
    return total % _MOD == 0

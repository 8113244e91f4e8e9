"""The Internet checksum (RFC 1071) and the pseudo-header sums (IPv4, and IPv6 per RFC 8200 8.1).

The ones'-complement sum of 16-bit big-endian words is congruent, modulo 0xFFFF, to the
buffer read as one big integer (because 0x10000 = 1 mod 0xFFFF). ``int.from_bytes`` and one
modulo run in C, which makes this far faster than summing words in a Python loop.

``int.from_bytes`` still walks the buffer a byte at a time (about 2.4 us per KiB), and the
sender of every TCP segment pays it (``sal-wire.md``: the checksum is required even over
UDP). With numpy installed (the optional ``[accel]`` extra) sums over 2 KiB and more are
taken as vector sums of little-endian 32-bit words instead, about 30 times faster per byte:
a 32-bit word is congruent to the sum of its two 16-bit halves modulo 0xFFFF, and the sum
of byte-swapped words is the byte-swapped sum (RFC 1071 2(B)), which modulo 0xFFFF is the
sum times 0x100. Below 2 KiB numpy's fixed cost per call (about 4 us) outweighs it.
``PYSERVAL_PURE_PYTHON=1`` in the environment keeps numpy out (to compare the two).
"""

from __future__ import annotations

import os
import socket
from functools import lru_cache
from types import ModuleType
from typing import Final

from .inet import packed_ip16

__all__ = [
    "address_sum",
    "internet_checksum",
    "ipv4_bytes",
    "pseudo_header_sum",
    "segment_sums",
    "segment_sums_pure",
    "transport_checksum",
    "vector_module",
    "verify_transport_checksum",
    "words_sum",
]

_MOD: Final = 0xFFFF

BytesLike = bytes | bytearray | memoryview

_numpy: ModuleType | None = None
if not os.environ.get("PYSERVAL_PURE_PYTHON"):  # set: measure or debug without numpy
    try:
        import numpy as _numpy
    except ImportError:  # the optional [accel] extra is not installed: pure Python it is
        _numpy = None

ACCELERATED: Final = _numpy is not None
"""Whether long sums use numpy (the ``[accel]`` extra); the results are the same."""

# From this many bytes a numpy sum beats int.from_bytes (measured crossover: about 2 KiB).
_VECTOR_MIN: Final = 2048
# A segment's vector sum is shifted by 8 bits in uint64: at most 2**24 words of 32 bits.
_VECTOR_MAX_SEGMENT: Final = 1 << 26


def vector_module() -> ModuleType | None:
    """numpy when the ``[accel]`` extra is installed and allowed, else None (for callers
    that vectorize more than the sums, such as :meth:`SegmentTrain.wire`)."""
    return _numpy


def _words_sum_pure(data: BytesLike) -> int:
    n = int.from_bytes(data, "big")
    if len(data) & 1:
        n <<= 8
    return n % _MOD


def _words_sum_vector(data: BytesLike) -> int:
    np = _numpy
    assert np is not None
    head = len(data) & ~3
    if head > _VECTOR_MAX_SEGMENT:
        return _words_sum_pure(data)
    words = np.frombuffer(data, dtype="<u4", count=head // 4)
    s = int(words.sum(dtype=np.uint64))
    # The tail (0 to 3 bytes) starts at an even offset, so its words add as they are.
    return ((s << 8) + _words_sum_pure(memoryview(data)[head:])) % _MOD


def words_sum(data: BytesLike) -> int:
    """A partial sum of ``data`` as 16-bit words, modulo 0xFFFF (odd length: zero-padded).

    Partial sums of even-length pieces simply add up.
    """
    if len(data) >= _VECTOR_MIN and _numpy is not None:
        return _words_sum_vector(data)
    return _words_sum_pure(data)


def segment_sums_pure(data: BytesLike, size: int) -> list[int]:
    """:func:`segment_sums` in pure Python (what it falls back to; tests compare both)."""
    view = memoryview(data)
    from_bytes = int.from_bytes
    out: list[int] = []
    append = out.append
    for lo in range(0, len(view), size):
        chunk = view[lo : lo + size]
        n = from_bytes(chunk, "big")
        if len(chunk) & 1:
            n <<= 8
        append(n % _MOD)
    return out


def segment_sums(data: BytesLike, size: int) -> list[int]:
    """The :func:`words_sum` of each consecutive ``size``-byte piece of ``data`` (the last
    piece may be shorter): the payload sums of a segment train, in one vector operation
    when numpy is installed and the train is long enough to gain from it."""
    if size < 1:
        raise ValueError(f"segment size must be positive: {size}")
    np = _numpy
    total = len(data)
    if np is None or total < _VECTOR_MIN or size & 1 or size > _VECTOR_MAX_SEGMENT:
        return segment_sums_pure(data, size)
    full = total // size
    width = 4 if size & 3 == 0 else 2
    words = np.frombuffer(data, dtype="<u4" if width == 4 else "<u2", count=full * size // width)
    sums = words.reshape(full, size // width).sum(axis=1, dtype=np.uint64)
    out: list[int] = ((sums << np.uint64(8)) % np.uint64(_MOD)).tolist()
    if full * size < total:
        out.append(_words_sum_pure(memoryview(data)[full * size :]))
    return out


def _fold(total: int, nonzero: bool) -> int:
    """Checksum field value from a partial sum (``nonzero``: any word was non-zero)."""
    s = total % _MOD
    if s == 0 and nonzero:
        s = _MOD  # ones'-complement arithmetic never gives +0 for non-zero input
    return (~s) & 0xFFFF


def internet_checksum(data: BytesLike) -> int:
    """The checksum of ``data`` (compute it with the checksum field set to zero).

    Pure Python: it serves headers (a few dozen bytes), where numpy would only cost."""
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

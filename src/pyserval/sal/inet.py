"""IP address text of both families: which family, packed bytes, canonical text, printing.

Addresses travel through pyserval as ``(ip text, UDP port)`` tuples and are compared as
tuples, so one address must have one text: IPv4 in dotted quad, IPv6 as ``inet_ntop``
writes it (the form the kernel's ``recvfrom`` gives back, RFC 5952 compression). A zone
(``fe80::1%eth0``) stays on the text for the socket layer but is never packed into a packet.

This module does no I/O and resolves no names: a host name is not an address here.
"""

from __future__ import annotations

import socket
from typing import Final, TypeAlias

__all__ = [
    "Address",
    "IPV4_MAPPED",
    "WILDCARDS",
    "canonical_ip",
    "format_address",
    "is_ipv6",
    "packed_ip",
    "packed_ip16",
    "same_family",
    "unpack_ip16",
]

Address: TypeAlias = tuple[str, int]
"""An endpoint as pyserval passes it around: ``(ip text, UDP port)``, the IP in the one
canonical text :func:`canonical_ip` gives. The one definition of it in the package: the SAL
is the lowest layer that handles addresses (naming has serviceIDs and flowIDs only)."""

IPV4_MAPPED: Final = bytes(10) + b"\xff\xff"
"""The first 12 bytes of an IPv4-mapped IPv6 address (RFC 4291 2.5.5.2)."""

WILDCARDS: Final = frozenset({"0.0.0.0", "::", ""})
"""Texts of "any address" (a socket bound there cannot name itself)."""


def is_ipv6(ip: str) -> bool:
    """Whether the text is an IPv6 address (only IPv6 text holds a colon)."""
    return ":" in ip


def same_family(a: str, b: str) -> bool:
    """Whether two address texts are of the same family."""
    return (":" in a) == (":" in b)


def packed_ip(ip: str | bytes) -> bytes:
    """4 bytes for IPv4 text, 16 for IPv6 text (a zone is dropped); bytes of length 4 or 16
    pass through. Raises ValueError for anything else."""
    if isinstance(ip, bytes):
        if len(ip) not in (4, 16):
            raise ValueError(f"an IP address is 4 or 16 bytes: {ip!r}")
        return ip
    try:
        if ":" in ip:
            return socket.inet_pton(socket.AF_INET6, ip.partition("%")[0])
        return socket.inet_aton(ip) if ip.count(".") == 3 else _bad(ip)
    except OSError:
        raise ValueError(f"not an IP address: {ip!r}") from None


def _bad(ip: str) -> bytes:
    # inet_aton takes "1" or "1.2" as IPv4: only the dotted quad is an address here.
    raise ValueError(f"not an IP address: {ip!r}")


def packed_ip16(ip: str | bytes) -> bytes:
    """16 bytes: IPv6 as it is, IPv4 as an IPv4-mapped IPv6 address."""
    raw = packed_ip(ip)
    return raw if len(raw) == 16 else IPV4_MAPPED + raw


def unpack_ip16(raw: bytes | memoryview) -> str:
    """The text of 16 address bytes; an IPv4-mapped address gives its IPv4 dotted quad."""
    raw = bytes(raw)
    if raw[:12] == IPV4_MAPPED:
        return socket.inet_ntoa(raw[12:])
    return socket.inet_ntop(socket.AF_INET6, raw)


def canonical_ip(ip: str) -> str:
    """The one text of an IP address (IPv6 as ``inet_ntop`` writes it, zone kept).

    Raises ValueError for anything that is not an IP literal.
    """
    if ":" in ip:
        addr, sep, zone = ip.partition("%")
        text = socket.inet_ntop(socket.AF_INET6, packed_ip(addr))
        return f"{text}%{zone}" if sep and zone else text
    return socket.inet_ntoa(packed_ip(ip))


def format_address(address: tuple[str, int]) -> str:
    """``IP:PORT``, or ``[IP]:PORT`` for IPv6 (what the parsers read back)."""
    ip, port = address
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"

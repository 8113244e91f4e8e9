"""The segment size a host's interfaces allow (Linux; a safe default elsewhere).

TCP sizes its segments from the interface MTU; so does a host here when the application
did not choose a ``StreamConfig``: on loopback (MTU 65,536) segments of 32 KiB cost far
less Python per byte than the reference's 1,408, and on a 1,500-byte Ethernet MTU the
result is the reference's size again.
"""

from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct
from pathlib import Path
from typing import Final

__all__ = ["MAX_AUTO_MSS", "OVERHEAD", "OVERHEAD6", "interface_mtu", "mss_for"]

# IPv4 20 + UDP 8 + SAL base 12 + TCP 20 + room for SACK options 28.
OVERHEAD: Final = 88
# IPv6's header is 40 bytes, not 20 (and a forwarded SYN's SOURCE6 is larger, but a SYN
# carries no data).
OVERHEAD6: Final = OVERHEAD + 20
MAX_AUTO_MSS: Final = 32768  # larger buys little and makes each loss cost more
_SIOCGIFADDR: Final = 0x8915
_SIOCGIFMTU: Final = 0x8921


def _sysfs_mtu(name: str) -> int | None:
    try:
        return int(Path(f"/sys/class/net/{name}/mtu").read_text())
    except (OSError, ValueError):
        return None


def _ioctl(sock: socket.socket, request: int, name: str) -> bytes | None:
    try:
        return fcntl.ioctl(sock.fileno(), request, struct.pack("256s", name.encode()[:15]))
    except OSError:
        return None


def _ipv6_interface(addr: ipaddress.IPv6Address) -> str | None:
    """The name of the interface holding an IPv6 address (Linux ``/proc/net/if_inet6``)."""
    try:
        lines = Path("/proc/net/if_inet6").read_text().splitlines()
    except OSError:
        return None
    want = addr.packed.hex()
    for line in lines:
        fields = line.split()
        if len(fields) >= 6 and fields[0] == want:
            return fields[5]
    return None


def interface_mtu(ip: str) -> int | None:
    """The MTU of the interface that holds ``ip`` (IPv4 or IPv6), or None when unknown (a
    wildcard address, another platform, an address no interface holds)."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return None
    if addr.is_unspecified:
        return None  # any interface: the smallest MTU would be the safe answer
    if addr.is_loopback:
        return _sysfs_mtu("lo")
    if isinstance(addr, ipaddress.IPv6Address):
        name = _ipv6_interface(addr)
        return _sysfs_mtu(name) if name is not None else None
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        return None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for name in names:
            raw = _ioctl(sock, _SIOCGIFADDR, name)
            if raw is not None and socket.inet_ntoa(raw[20:24]) == ip:
                mtu = _ioctl(sock, _SIOCGIFMTU, name)
                return struct.unpack_from("i", mtu, 16)[0] if mtu is not None else None
    return None


def mss_for(ips: list[str], default: int) -> int:
    """The segment size every one of ``ips`` allows (``default`` if any is unknown)."""
    mtus = [interface_mtu(ip) for ip in ips]
    if not mtus or any(m is None for m in mtus):
        return default
    pairs = zip(mtus, ips, strict=True)
    room = min(m - (OVERHEAD6 if ":" in ip else OVERHEAD) for m, ip in pairs if m is not None)
    return max(min(room, MAX_AUTO_MSS), 536)

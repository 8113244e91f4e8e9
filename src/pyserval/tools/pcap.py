"""Classic pcap files of SAL-over-UDP datagrams, for Wireshark and tshark.

:class:`PcapWriter` writes each datagram as an IPv4/UDP frame (``LINKTYPE_RAW``: the frame
starts at the IPv4 header) in the classic libpcap format, so the shipped dissector
(:func:`dissector_path`) decodes it as SAL. The host (``Host(pcap=...)``, ``--pcap FILE``) and
the simulated network (:class:`SimPcapTap`, a ``SimNetwork`` tap) use it.

What it does not do: capture from the kernel (it records what pyserval itself sent and
received, not what other programs put on the wire), pcapng, IPv6, IP fragmentation (a
datagram longer than an IPv4 packet can carry is truncated to the snap length and its
lengths say so), or UDP checksums (0: "none", legal for IPv4 and ignored by Wireshark).

Bounded: past ``max_bytes`` of file the writer stops recording and counts what it left out
(:attr:`PcapWriter.dropped`). Flushed: the host calls :meth:`PcapWriter.flush` once per batch
of datagrams, so a killed process loses at most the batch in progress.
"""

from __future__ import annotations

import functools
import os
import socket
import struct
import time
from importlib import resources
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Final

from ..sal.inet import Address

__all__ = [
    "LINKTYPE_RAW",
    "PcapWriter",
    "SimPcapTap",
    "dissector_path",
    "ipv4_udp_frame",
]

LINKTYPE_RAW: Final = 101
"""pcap link type: the frame is an IP packet with no link-layer header."""

PCAP_MAGIC: Final = 0xA1B2C3D4  # microsecond timestamps
DEFAULT_SNAPLEN: Final = 65535
DEFAULT_MAX_BYTES: Final = 256 * 1024 * 1024

_FILE_HEADER: Final = struct.Struct("<IHHiIII")
_RECORD_HEADER: Final = struct.Struct("<IIII")
_IP_UDP_HEAD: Final = struct.Struct("!BBHHHBBH4s4sHHHH")  # IPv4 (20 bytes), UDP (8)
_IP_UDP: Final = 17
_TTL: Final = 64


def _ip_bytes(ip: str) -> bytes:
    try:
        return socket.inet_aton(ip)
    except OSError:
        return bytes(4)  # not IPv4 text: recorded as 0.0.0.0 rather than failing the host


_FIXED_WORDS: Final = 0x4500 + 0x4000 + ((_TTL << 8) | _IP_UDP)  # version/IHL, DF, TTL/proto


@functools.lru_cache(maxsize=1024)
def _addresses(src_ip: str, dst_ip: str) -> tuple[bytes, bytes, int]:
    """Both addresses packed, and their part of the header checksum (cached: a capture
    sees few address pairs, and this is most of a frame's cost)."""
    src, dst = _ip_bytes(src_ip), _ip_bytes(dst_ip)
    return src, dst, sum(struct.unpack("!4H", src + dst)) + _FIXED_WORDS


def ipv4_udp_frame(payload: bytes, src: Address, dst: Address, ident: int = 0) -> bytes:
    """An IPv4 header, a UDP header and ``payload``: what a raw-IP capture would show.

    Lengths that do not fit 16 bits are clamped (the payload is then longer than the headers
    say; Wireshark flags such a frame). The IPv4 header checksum is computed; the UDP
    checksum is 0 (none).
    """
    udp_len = min(8 + len(payload), 0xFFFF)
    total = min(20 + udp_len, 0xFFFF)
    ident &= 0xFFFF
    src_ip, dst_ip, partial = _addresses(src[0], dst[0])
    check = partial + total + ident
    check = (check & 0xFFFF) + (check >> 16)
    check = ~((check & 0xFFFF) + (check >> 16)) & 0xFFFF
    head = _IP_UDP_HEAD.pack(
        0x45, 0, total, ident, 0x4000, _TTL, _IP_UDP, check, src_ip, dst_ip,
        src[1] & 0xFFFF, dst[1] & 0xFFFF, udp_len, 0,
    )  # fmt: skip
    return head + payload


class PcapWriter:
    """Write SAL/UDP datagrams to a classic pcap file (see the module docstring).

    ``PcapWriter(path)`` opens (truncates) the file and writes the file header at once;
    :meth:`write` records one datagram; :meth:`close` (or ``with``) flushes and closes.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        snaplen: int = DEFAULT_SNAPLEN,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        if snaplen < 28:
            raise ValueError("snaplen must hold at least the IPv4 and UDP headers (28 bytes)")
        self.path = Path(path)
        self.snaplen = snaplen
        self.max_bytes = max_bytes
        self.written = 0
        """Datagrams recorded."""
        self.dropped = 0
        """Datagrams left out because the file reached ``max_bytes``."""
        self._file: BinaryIO | None = open(self.path, "wb")  # noqa: SIM115 (closed in close())
        header = _FILE_HEADER.pack(PCAP_MAGIC, 2, 4, 0, 0, snaplen, LINKTYPE_RAW)
        self._file.write(header)
        self._size = len(header)
        self._ident = 0

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._file is None

    def write(
        self, data: bytes, src: Address, dst: Address, timestamp: float | None = None
    ) -> None:
        """Record one datagram ``src -> dst`` (wall-clock time unless ``timestamp``)."""
        f = self._file
        if f is None:
            return
        frame = ipv4_udp_frame(data, src, dst, self._ident)
        self._ident += 1
        cap = frame[: self.snaplen]
        if self._size + 16 + len(cap) > self.max_bytes:
            self.dropped += 1
            return
        ts = time.time() if timestamp is None else timestamp
        sec = int(ts)
        usec = min(int((ts - sec) * 1_000_000), 999_999)
        f.write(_RECORD_HEADER.pack(sec, usec, len(cap), len(frame)) + cap)
        self._size += 16 + len(cap)
        self.written += 1

    def flush(self) -> None:
        """Hand what was written to the operating system."""
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        """Flush and close the file (later writes are ignored)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> PcapWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class SimPcapTap:
    """A :class:`~pyserval.testing.SimNetwork` tap that records datagrams in a pcap file.

    ``net.tap = SimPcapTap(writer)``. ``fates`` picks which trace events become frames:
    ``"sent"`` (default: what each node put on the wire, including what the network then
    lost) and/or ``"delivered"`` (what receivers got, after NAT). Timestamps are the virtual
    clock's seconds.
    """

    def __init__(self, writer: PcapWriter, fates: tuple[str, ...] = ("sent",)) -> None:
        self.writer = writer
        self.fates = frozenset(fates)

    def __call__(self, now: float, data: bytes, src: Address, dst: Address, fate: str) -> None:
        if fate in self.fates:
            self.writer.write(data, src, dst, timestamp=now)


def dissector_path() -> Path:
    """Where the shipped Wireshark Lua dissector for SAL (``sal.lua``) is installed."""
    return Path(str(resources.files("pyserval.data").joinpath("sal.lua")))

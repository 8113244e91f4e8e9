"""Data shipped with pyserval: packets captured from the reference Serval implementation."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

__all__ = ["CapturedPacket", "reference_capture"]


@dataclass(frozen=True, slots=True)
class CapturedPacket:
    """One captured packet: its index in the capture, IPv4 addresses and UDP payload."""

    index: int
    src_ip: str
    dst_ip: str
    payload: bytes


def parse_capture(text: str) -> list[CapturedPacket]:
    """Parse the capture format: ``index src dst hex`` lines, ``#`` comments."""
    packets = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        index, src, dst, payload = line.split()
        packets.append(CapturedPacket(int(index), src, dst, bytes.fromhex(payload)))
    return packets


def reference_capture() -> list[CapturedPacket]:
    """The packets of ``reference-capture.txt`` (a copy of shared/vectors)."""
    text = resources.files(__name__).joinpath("reference-capture.txt").read_text()
    return parse_capture(text)

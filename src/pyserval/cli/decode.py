"""``pyserval decode``: print SAL packets given as hex (arguments or standard input)."""

from __future__ import annotations

import argparse
import sys

from ..sal import MalformedPacket, SalPacket, decode_packet
from ..sal.extensions import ControlFlags
from ..sal.transport_headers import TcpFlags

__all__ = ["add_arguments", "describe", "run"]

_TCP_FLAG_NAMES = [
    (TcpFlags.SYN, "SYN"),
    (TcpFlags.ACK, "ACK"),
    (TcpFlags.FIN, "FIN"),
    (TcpFlags.RST, "RST"),
    (TcpFlags.PSH, "PSH"),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``pyserval decode``."""
    parser.add_argument("hex", nargs="*", help="packets in hex (default: one per stdin line)")


def describe(packet: SalPacket) -> str:
    """A one-line human description of a packet."""
    parts = [f"flow {packet.src_flowid:#x}->{packet.dst_flowid:#x}", f"shl={packet.shl}"]
    for ext in packet.extensions:
        name = type(ext).__name__.removesuffix("Ext").upper()
        if name == "CONTROL":
            c = packet.control
            assert c is not None
            flags = ControlFlags.names(c.flags)
            parts.append(f"CONTROL({flags} verno={c.verno:#010x} ackno={c.ackno:#010x})")
        elif name == "SERVICE":
            s = packet.service
            assert s is not None
            parts.append(f"SERVICE({s.service_id.hex[:16]}...)")
        else:
            parts.append(name)
    tcp = packet.tcp
    if tcp is not None:
        flags = "+".join(n for bit, n in _TCP_FLAG_NAMES if tcp.flags & bit)
        opts = []
        if tcp.mss is not None:
            opts.append(f"mss={tcp.mss}")
        if tcp.window_scale is not None:
            opts.append(f"wscale={tcp.window_scale}")
        if tcp.compact_close:
            opts.append("compact-close")
        parts.append(
            f"TCP({flags} seq={tcp.seq:#010x} ack={tcp.ack:#010x} win={tcp.window}"
            + (" " + " ".join(opts) if opts else "")
            + ")"
        )
    if packet.payload:
        parts.append(f"{len(packet.payload)} bytes of data")
    return " ".join(parts)


def run(args: argparse.Namespace) -> int:
    """Decode each packet; malformed ones are reported with their reason."""
    lines = args.hex or [line.strip() for line in sys.stdin if line.strip()]
    bad = 0
    for text in lines:
        try:
            print(describe(decode_packet(bytes.fromhex(text))))
        except ValueError as exc:  # MalformedPacket is a ValueError, so is bad hex
            reason = exc.reason if isinstance(exc, MalformedPacket) else "bad hex"
            print(f"malformed ({reason}): {exc}")
            bad += 1
    return 1 if bad else 0

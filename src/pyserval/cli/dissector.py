"""``pyserval dissector``: where the shipped Wireshark dissector for SAL is installed."""

from __future__ import annotations

import argparse

from ..tools.pcap import dissector_path

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``pyserval dissector`` (none)."""
    parser.epilog = (
        "use it as: tshark -X lua_script:$(pyserval dissector) -r capture.pcap, or copy it "
        "into Wireshark's personal Lua plugins folder"
    )


def run(args: argparse.Namespace) -> int:
    """Print the path of ``sal.lua``."""
    print(dissector_path())
    return 0

"""Names a connection, its subflows and the segment builders all use.

They live apart so that ``connection.py`` and ``subflow.py`` need not import each other at
run time; ``connection.py`` re-exports them under their old import path. Nothing here has
state or does I/O.

Offsets: stream data byte *k* has offset *k*; on the wire its sequence number is
``ISS + 1 + k`` (mod 2**32). Only :func:`unwrap` and the segment builders
(``transport.packets``) see 32-bit numbers.
"""

from __future__ import annotations

import enum
from typing import Final

from ..sal.inet import Address

__all__ = ["HALF32", "MASK32", "Address", "Role", "unwrap"]

MASK32: Final = 0xFFFFFFFF
HALF32: Final = 0x80000000


def unwrap(wire: int, base: int, ref: int) -> int:
    """The absolute offset of 32-bit ``wire`` (offset 0 = ``base``) nearest to ``ref``."""
    delta = (wire - base - ref) & MASK32
    if delta >= HALF32:
        delta -= 1 << 32
    return ref + delta


class Role(enum.Enum):
    """Which side opened the connection."""

    CLIENT = "client"
    SERVER = "server"

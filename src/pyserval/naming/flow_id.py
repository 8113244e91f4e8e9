"""Flow identifiers: 32-bit, host-local, never zero.

A flowID names one end of a flow and is the demultiplexing key; it does not change when an
address does. IDs are drawn at random (not from a counter) so they reveal nothing about how
many flows a host has and an off-path host cannot guess the next one.
"""

from __future__ import annotations

import random
from collections.abc import Container
from typing import Final

__all__ = ["FLOW_ID_MAX", "FlowID", "FlowIDsExhausted", "InvalidFlowID", "allocate_flow_id"]

FLOW_ID_MAX: Final = 0xFFFFFFFF
# Flow tables are bounded far below 2**32 (65,536 flows by default), so a random draw almost
# always hits a free ID: even with half the space in use, 64 misses in a row happen with
# probability 2**-64. Giving up then keeps allocation O(1) instead of scanning 4 billion IDs.
_RANDOM_TRIES: Final = 64


class InvalidFlowID(ValueError):
    """A flowID outside 1 .. 2**32-1."""


class FlowIDsExhausted(RuntimeError):
    """No free flowID is left."""


class FlowID(int):
    """A 32-bit flowID (an ``int`` in 1 .. 2**32-1)."""

    __slots__ = ()

    def __new__(cls, value: int) -> FlowID:
        # A plain int is the common case (a random draw, a decoded header): tested first.
        if type(value) is not int and (isinstance(value, bool) or not isinstance(value, int)):
            raise InvalidFlowID(f"flowID must be an int: {value!r}")
        if not 0 < value <= FLOW_ID_MAX:
            raise InvalidFlowID(f"flowID must be in 1..{FLOW_ID_MAX}: {value}")
        return int.__new__(cls, value)

    def __repr__(self) -> str:
        return f"FlowID({int(self)})"

    def __str__(self) -> str:
        return f"{int(self):08x}"


def allocate_flow_id(in_use: Container[int], rng: random.Random | None = None) -> FlowID:
    """A random flowID not in ``in_use``; :class:`FlowIDsExhausted` when none is free."""
    getrandbits = (rng if rng is not None else _SYSTEM_RNG).getrandbits
    for _ in range(_RANDOM_TRIES):
        # randint(1, FLOW_ID_MAX) as random.Random draws it (a 32-bit draw, again while it
        # is FLOW_ID_MAX or more: the same numbers from a seeded generator), without its
        # two layers of argument checks; in range by construction, so no FlowID checks.
        # Always through getrandbits: a subclass that overrides only random() (which
        # randint would then draw through) gets other, equally uniform, numbers.
        candidate = getrandbits(32)
        while candidate >= FLOW_ID_MAX:
            candidate = getrandbits(32)
        candidate += 1
        if candidate not in in_use:
            return _new_int(FlowID, candidate)
    raise FlowIDsExhausted(f"no free flowID found in {_RANDOM_TRIES} random draws")


_SYSTEM_RNG: Final = random.SystemRandom()
_new_int: Final = int.__new__

"""Helpers for testing programs built on pyserval (and pyserval itself).

:mod:`pyserval.testing.netsim` is a deterministic in-memory network with a virtual clock that
connects sans-I/O hosts.
"""

from .netsim import (
    DROP_REASONS,
    NAT_BEHAVIOURS,
    Address,
    LinkConfig,
    LinkStats,
    Nat,
    NatBehaviour,
    NetStats,
    SansIONode,
    SimNetwork,
    SimulationError,
    Tap,
    TraceEvent,
)

__all__ = [
    "DROP_REASONS",
    "Address",
    "LinkConfig",
    "LinkStats",
    "NAT_BEHAVIOURS",
    "Nat",
    "NatBehaviour",
    "NetStats",
    "SansIONode",
    "SimNetwork",
    "SimulationError",
    "Tap",
    "TraceEvent",
]

"""Helpers for testing programs built on pyserval (and pyserval itself).

:mod:`pyserval.testing.netsim` is a deterministic in-memory network with a virtual clock that
connects sans-I/O hosts.
"""

from .netsim import (
    DROP_REASONS,
    Address,
    LinkConfig,
    LinkStats,
    Nat,
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
    "Nat",
    "NetStats",
    "SansIONode",
    "SimNetwork",
    "SimulationError",
    "Tap",
    "TraceEvent",
]

"""The flow table: flowID -> flow, with random allocation of unused flowIDs.

Bounded: a host that runs out of room says so clearly instead of growing without limit.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Generic, TypeVar

from ..errors import FlowTableFull
from ..naming.flow_id import FlowID, allocate_flow_id

__all__ = ["DEFAULT_MAX_FLOWS", "FlowTable", "FlowTableFull"]

DEFAULT_MAX_FLOWS = 65536

F = TypeVar("F")


class FlowTable(Generic[F]):
    """Maps flowIDs to flow objects; allocation draws random unused flowIDs."""

    __slots__ = ("_flows", "_rng", "max_flows")

    def __init__(
        self, max_flows: int = DEFAULT_MAX_FLOWS, rng: random.Random | None = None
    ) -> None:
        if max_flows < 1:
            raise ValueError(f"max_flows must be at least 1: {max_flows}")
        self._flows: dict[int, F] = {}
        self._rng = rng
        self.max_flows = max_flows

    def _check_room(self) -> None:
        if len(self._flows) >= self.max_flows:
            raise FlowTableFull(
                f"flow table full: {len(self._flows)} flows in use (max_flows={self.max_flows})"
            )

    def allocate(self) -> FlowID:
        """A random flowID that is not in use (not reserved: call :meth:`insert`)."""
        self._check_room()
        return allocate_flow_id(self._flows, self._rng)

    def add(self, flow: F) -> FlowID:
        """Allocate a flowID and store ``flow`` under it."""
        fid = self.allocate()
        self._flows[fid] = flow
        return fid

    def insert(self, flow_id: int, flow: F) -> None:
        """Store ``flow`` under a given flowID (which must be free)."""
        fid = flow_id if type(flow_id) is FlowID else FlowID(flow_id)  # (checked when made)
        if fid in self._flows:
            raise KeyError(f"flowID {fid} is already in use")
        self._check_room()
        self._flows[fid] = flow

    def get(self, flow_id: int) -> F | None:
        """The flow with this ID, or None (the per-packet demux path)."""
        return self._flows.get(flow_id)

    def __getitem__(self, flow_id: int) -> F:
        try:
            return self._flows[flow_id]
        except KeyError:
            raise KeyError(f"no flow with flowID {flow_id:#010x}") from None

    def remove(self, flow_id: int) -> F | None:
        """Remove and return the flow with this ID (None if absent)."""
        return self._flows.pop(flow_id, None)

    def __contains__(self, flow_id: object) -> bool:
        return flow_id in self._flows

    def __len__(self) -> int:
        return len(self._flows)

    def __iter__(self) -> Iterator[int]:
        return iter(self._flows)

    def items(self) -> Iterator[tuple[int, F]]:
        """(flowID, flow) pairs."""
        return iter(self._flows.items())

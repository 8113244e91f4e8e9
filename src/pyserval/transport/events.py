"""Typed events the sans-I/O core reports to the layer above (the asyncio runtime)."""

from __future__ import annotations

from dataclasses import dataclass

from ..naming.service_id import ServiceID
from ..sal.inet import Address
from .reasons import CloseReason, MigrationReason, close_reason

__all__ = [
    "ConnectionClosed",
    "ConnectionEstablished",
    "ConnectionFailed",
    "ConnectionReset",
    "ConnectionTimedOut",
    "DataReceived",
    "DatagramReceived",
    "DatagramRefused",
    "Event",
    "FlowMigrated",
    "PathAdded",
    "PathFailed",
    "IncomingConnection",
    "SendSpaceAvailable",
    "StreamEnded",
]


@dataclass(frozen=True, slots=True)
class Event:
    """Base of all events; ``conn_id`` names the connection (or socket) concerned."""

    conn_id: int


@dataclass(frozen=True, slots=True)
class ConnectionEstablished(Event):
    """The handshake completed (client side: ``connect`` succeeded)."""


@dataclass(frozen=True, slots=True)
class IncomingConnection(Event):
    """A listener has a new established connection waiting in its accept queue."""

    listener_id: int


@dataclass(frozen=True, slots=True)
class DataReceived(Event):
    """In-order bytes are ready to read."""

    readable: int


@dataclass(frozen=True, slots=True)
class SendSpaceAvailable(Event):
    """The send buffer has room again after being full."""

    free: int


@dataclass(frozen=True, slots=True)
class StreamEnded(Event):
    """The peer finished sending (its FIN arrived after all its data): end of stream."""


@dataclass(frozen=True, slots=True)
class ConnectionClosed(Event):
    """Both directions finished cleanly; the connection is gone."""


@dataclass(frozen=True, slots=True)
class ConnectionReset(Event):
    """The connection was reset (by the peer, or locally because the peer broke the rules)."""

    reason: str  # the connection's error text: a CloseReason's value, maybe with details

    @property
    def close_reason(self) -> CloseReason | None:
        """``reason`` as a :class:`CloseReason` (decide by this, not by the text)."""
        return close_reason(self.reason)


@dataclass(frozen=True, slots=True)
class ConnectionTimedOut(Event):
    """Retransmissions went unanswered (handshake, data or close)."""

    reason: str  # what went unanswered ("idle", "data retransmissions unanswered", ...)

    @property
    def close_reason(self) -> CloseReason:
        """Always :attr:`CloseReason.TIMED_OUT` (``reason`` says which timer)."""
        return CloseReason.TIMED_OUT


@dataclass(frozen=True, slots=True)
class ConnectionFailed(Event):
    """A connect could not start or finish for a reason other than a timeout."""

    reason: str  # the connection's error text: a CloseReason's value, maybe with details

    @property
    def close_reason(self) -> CloseReason | None:
        """``reason`` as a :class:`CloseReason` (decide by this, not by the text)."""
        return close_reason(self.reason)


@dataclass(frozen=True, slots=True)
class DatagramReceived(Event):
    """An unconnected datagram arrived for a bound datagram socket."""

    data: bytes
    source_service: ServiceID | None  # the sender's serviceID, None when it sent none
    address: Address  # the sender (the SOURCE path's first address if forwarded)
    via: Address | None = None  # the UDP source it came from, when different


@dataclass(frozen=True, slots=True)
class DatagramRefused(Event):
    """A host answered an unconnected datagram of a bound socket with a RST (no such
    service there): ``address`` is where the refusal came from."""

    reason: str
    address: Address


@dataclass(frozen=True, slots=True)
class FlowMigrated(Event):
    """A flow of the connection now runs between new addresses (RSYN committed)."""

    local: Address
    remote: Address
    reason: MigrationReason


@dataclass(frozen=True, slots=True)
class PathAdded(Event):
    """A multipath connection has a new subflow between these addresses."""

    local: Address
    remote: Address


@dataclass(frozen=True, slots=True)
class PathFailed(Event):
    """A subflow of a multipath connection was given up; its data goes on the others."""

    local: Address
    remote: Address

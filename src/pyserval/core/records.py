"""What the host's modules share: its records (listeners, bound datagram endpoints, held
SYNs) and the limits they are built with. No behaviour here beyond the records' own."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Final

from ..errors import NoRoute as NoRoute
from ..naming.service_id import ServiceID
from ..sal.inet import Address as Address
from ..transport.connection import Connection

MAX_DATAGRAM: Final = 65507 - 12 - 72 - 8  # UDP payload limit less SAL and UDP headers
ZERO_NONCE: Final = bytes(8)
MAX_HELD_SYN: Final = 2048  # bytes: 1,024 held SYNs stay within 2 MiB
CONTROL_EXT_BYTES: Final = 20  # bytes of a CONTROL extension: what a RST may add to its cause
# A half-open flow retransmits its SYN-ACK for at most about this long: a flood of SYNs
# from addresses that never answer cannot hold the table for longer.
HALF_OPEN_LIFETIME: Final = 64.0
# Address checks (a challenge sent to where a flow's peer seems to be now) a connection may
# start: a few at once, then one per 5 s. Only the flow's own peer can start them (the
# packet must carry both flowIDs and plausible numbers), but an attacker that owns a
# connection could otherwise aim a challenge (and its retransmissions) at any address per
# packet it sends. A host-wide bucket bounds what many such connections can do together.
CHECK_BURST: Final = 3
CHECK_RATE: Final = 0.2
# RFC 5961 challenge ACKs: at most one per connection per half second (Linux's
# tcp_invalid_ratelimit), so spoofed segments cannot drain the host-wide budget through one
# victim flow, and that budget is jittered (see JitteredBudget).
CHALLENGE_ACK_INTERVAL: Final = 0.5


def retries_within(initial_rto: float, lifetime: float) -> int:
    """How many doubling retransmissions fit before giving up within ``lifetime``."""
    n = 0  # n retransmissions give up after initial_rto * (2 ** (n + 1) - 1) seconds
    while n < 15 and initial_rto * (2 ** (n + 2) - 1) <= lifetime:
        n += 1
    return n


RELAY_BYTES: Final = 16
RELAY_KEY_LIFETIME: Final = 120.0  # s: a router's relay tags stay good for 2 to 4 minutes
MAX_DATAGRAM_RELAYS: Final = 4096  # clients whose datagram answers go back via a router


def first_router(path: list[Address], last_hop: Address) -> Address:
    """The router a client sent to: the path's second entry, unless that forwarder was
    bound to the wildcard address and could not name itself (then the hop we know).

    Anyone can write a SOURCE path, but the answer already goes to its first entry; this
    adds one packet of the same size to its second, which relays only with its own tag."""
    if len(path) >= 2 and path[1][0] != "0.0.0.0":
        return path[1]
    return last_hop


@dataclass(eq=False)
class Listener:
    """A service this host accepts connections for."""

    listener_id: int
    service_id: ServiceID
    backlog: int
    half_open: dict[tuple[Address, int], Connection] = field(default_factory=dict)
    accept_queue: deque[Connection] = field(default_factory=deque)
    closed: bool = False
    datagram: bool = False  # connected datagram flows (SYNs with protocol 17), not streams

    def accept(self) -> Connection | None:
        """The oldest established connection not yet taken, or None."""
        return self.accept_queue.popleft() if self.accept_queue else None


@dataclass(eq=False, slots=True)
class Delayed:
    """A SYN held by a DELAY rule until the controller's verdict."""

    service_id: ServiceID
    data: bytes
    src: Address
    dst: Address
    since: float


@dataclass(eq=False)
class DatagramEndpoint:
    """A bound datagram socket: sends to and receives from serviceIDs."""

    flowid: int
    service_id: ServiceID

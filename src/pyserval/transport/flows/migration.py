"""Flow migration (RSYN) and address checks of one subflow (sans-I/O state).

The exchange (``shared/spec/sal-wire.md``): the moving side sends CONTROL(RSYN) from its new
address (RSYN consumes a control number); the peer checks the nonce, stops transport output
and answers CONTROL(RSYN+ACK) to the address the RSYN came from; the moving side switches
and sends CONTROL(ACK), on which the peer commits and resumes. RSYN+ACK consumes no number:
it only acknowledges, which keeps the one-outstanding control channel free and lets both
ends migrate at once (each answers the other's RSYN while its own is outstanding). The
peer takes the final ACK from whichever address it comes (nonce checked) as the new one, so
a late or duplicated RSYN cannot leave it pointing at an address the mover has left.

Lost packets: the RSYN is retransmitted by the control channel; the peer retransmits its
RSYN+ACK on its own timer until the ACK comes; a duplicate RSYN+ACK after commit is answered
with the ACK again, a duplicate RSYN with the RSYN+ACK again (and no change of state).

Address check (a NAT rebinding): the side that stays sends a CHALLENGE to the candidate
address, a pyserval CONTROL(RSYN+CHALLENGE) whose number fields hold a fresh random token
and whose nonce field is zero: nothing in it lets whoever receives it act on the flow. The
peer answers a challenge that reaches it from its verified peer address with
RSYN+ACK+CHALLENGE echoing the token under its own nonce, from wherever it now is; only
that answer, arriving from the candidate, moves the flow there. Data keeps flowing on the
verified path meanwhile, and what goes to the candidate is limited to three times what
came from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

from ...sal.inet import Address
from ..reasons import MigrationReason

__all__ = [
    "AMPLIFICATION_LIMIT",
    "CHALLENGE",
    "CHALLENGE_TRIES",
    "HELD_BYTES",
    "HELD_PACKETS",
    "Challenge",
    "MigrationState",
]

AMPLIFICATION_LIMIT: Final = 3  # bytes sent to an unverified address per byte received
CHALLENGE_TRIES: Final = 4  # challenges sent to a candidate address before giving up on it
CHALLENGE: Final = 0x02  # CONTROL flag (a reserved bit in the reference): an address check


@dataclass(slots=True)
class MigrationState:
    """An RSYN exchange in progress on one subflow."""

    own_rsyn: bool = False  # our RSYN is outstanding
    awaiting_ack: bool = False  # we answered the peer's RSYN and wait for its ACK
    reason: MigrationReason = MigrationReason.MIGRATED
    rsynack_deadline: float | None = None
    rsynack_rto: float = 0.0
    rsynack_tries: int = 0

    @property
    def busy(self) -> bool:
        """The exchange is not finished: transport output waits."""
        return self.own_rsyn or self.awaiting_ack


HELD_PACKETS: Final = 32
HELD_BYTES: Final = 65536  # what a flow keeps from an unverified address, at most


@dataclass(slots=True)
class Challenge:
    """A check that the peer is reachable at ``candidate`` (it was seen there)."""

    candidate: Address
    token: int  # 64 random bits, echoed by the peer
    deadline: float
    rto: float
    tries: int = 1
    rx: int = 0  # bytes received from the candidate
    tx: int = 0  # bytes sent to it
    # Packets from the candidate, held unprocessed until it proves to be the peer (they
    # change nothing before that), then taken in order: at most HELD_PACKETS of them.
    held: list[Any] = field(default_factory=list)
    held_bytes: int = 0

    def may_send(self, size: int) -> bool:
        """Anti-amplification: whether ``size`` more bytes may go to the candidate."""
        if self.tx + size > AMPLIFICATION_LIMIT * self.rx:
            return False
        self.tx += size
        return True

"""Flow migration (RSYN) state of one subflow (sans-I/O).

The exchange (``shared/spec/sal-wire.md``): the moving side sends CONTROL(RSYN) from its new
address (RSYN consumes a control number); the peer checks the nonce, stops transport output
and answers CONTROL(RSYN+ACK) to the address the RSYN came from; the moving side switches
and sends CONTROL(ACK), on which the peer commits and resumes. RSYN+ACK consumes no number:
it only acknowledges, which keeps the one-outstanding control channel free and lets both
ends migrate at once (each answers the other's RSYN while its own is outstanding).

Lost packets: the RSYN is retransmitted by the control channel; the peer retransmits its
RSYN+ACK on its own timer until the ACK comes; a duplicate RSYN+ACK after commit is answered
with the ACK again.

The same exchange, started by the side that stays, checks a peer seen at a new address (a
NAT rebinding): the RSYN goes to the candidate address while data keeps flowing on the
verified path; only an RSYN+ACK carrying the peer's nonce from the candidate moves the flow
there, and what is sent to the candidate is limited to three times what came from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

__all__ = ["AMPLIFICATION_LIMIT", "CHALLENGE_TRIES", "MigrationState"]

Address = tuple[str, int]
AMPLIFICATION_LIMIT: Final = 3  # bytes sent to an unverified address per byte received
CHALLENGE_TRIES: Final = 4  # RSYNs sent to a candidate address before giving up on it


@dataclass(slots=True)
class MigrationState:
    """What one subflow is doing about its addresses."""

    own_rsyn: bool = False  # our RSYN is outstanding
    awaiting_ack: bool = False  # we answered the peer's RSYN and wait for its ACK
    challenge_to: Address | None = None  # our RSYN checks this candidate peer address
    reason: str = "migrated"
    rsynack_deadline: float | None = None
    rsynack_rto: float = 0.0
    rsynack_tries: int = 0
    rx: int = 0  # bytes received from the candidate address
    tx: int = 0  # bytes sent to it

    @property
    def frozen(self) -> bool:
        """Transport output waits: the path is changing (a challenge does not freeze)."""
        return self.awaiting_ack or (self.own_rsyn and self.challenge_to is None)

    @property
    def busy(self) -> bool:
        """Anything still in progress."""
        return self.own_rsyn or self.awaiting_ack

    def may_send(self, size: int) -> bool:
        """Anti-amplification: whether ``size`` more bytes may go to the candidate."""
        if self.tx + size > AMPLIFICATION_LIMIT * self.rx:
            return False
        self.tx += size
        return True

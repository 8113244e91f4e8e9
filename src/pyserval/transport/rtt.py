"""Round-trip time estimation and the retransmission timeout (RFC 6298)."""

from __future__ import annotations

from typing import Final

__all__ = ["RttEstimator"]

_ALPHA: Final = 1 / 8
_BETA: Final = 1 / 4
_K: Final = 4


class RttEstimator:
    """SRTT/RTTVAR and RTO with RFC 6298's rules (clock granularity ``granularity``)."""

    __slots__ = ("srtt", "rttvar", "rto", "min_rtt", "latest", "min_rto", "max_rto", "granularity")

    def __init__(
        self,
        initial_rto: float = 1.0,
        min_rto: float = 0.2,
        max_rto: float = 60.0,
        granularity: float = 0.001,
    ) -> None:
        self.srtt: float | None = None
        self.rttvar = 0.0
        self.rto = initial_rto
        self.min_rtt: float | None = None
        self.latest: float | None = None
        self.min_rto = min_rto
        self.max_rto = max_rto
        self.granularity = granularity

    def sample(self, rtt: float) -> None:
        """Take one RTT measurement (never from a retransmitted segment: Karn)."""
        rtt = max(rtt, 0.0)
        self.latest = rtt
        self.min_rtt = rtt if self.min_rtt is None else min(self.min_rtt, rtt)
        if self.srtt is None:
            self.srtt = rtt
            self.rttvar = rtt / 2
        else:
            self.rttvar = (1 - _BETA) * self.rttvar + _BETA * abs(self.srtt - rtt)
            self.srtt = (1 - _ALPHA) * self.srtt + _ALPHA * rtt
        rto = self.srtt + max(self.granularity, _K * self.rttvar)
        self.rto = min(max(rto, self.min_rto), self.max_rto)

    def backoff(self) -> None:
        """Double the RTO after a timeout (5.5), capped at ``max_rto``."""
        self.rto = min(self.rto * 2, self.max_rto)

    def reset(self, initial_rto: float = 1.0) -> None:
        """Forget the path (after migration to a new one)."""
        self.srtt = None
        self.rttvar = 0.0
        self.rto = initial_rto
        self.min_rtt = None

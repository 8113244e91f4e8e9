"""Round-trip time estimation and the retransmission timeout (RFC 6298)."""

from __future__ import annotations

from typing import Final

__all__ = ["RttEstimator"]

_ALPHA: Final = 1 / 8
_BETA: Final = 1 / 4
_K: Final = 4
_MAX_BACKOFF: Final = 16


class RttEstimator:
    """SRTT/RTTVAR and the RTO with RFC 6298's rules (clock granularity ``granularity``).

    The timeout is the base RTO (from samples) doubled once per unanswered timeout. The
    doubling is undone by :meth:`clear_backoff` as soon as new data is acknowledged: the
    path works again. Waiting for a Karn-clean sample instead (never one from a
    retransmitted segment) can leave the RTO at its maximum for minutes on a lossy path.
    """

    __slots__ = (
        "srtt",
        "rttvar",
        "base_rto",
        "backoffs",
        "min_rtt",
        "latest",
        "min_rto",
        "max_rto",
        "granularity",
    )

    def __init__(
        self,
        initial_rto: float = 1.0,
        min_rto: float = 0.2,
        max_rto: float = 60.0,
        granularity: float = 0.001,
    ) -> None:
        self.srtt: float | None = None
        self.rttvar = 0.0
        self.base_rto = initial_rto
        self.backoffs = 0
        self.min_rtt: float | None = None
        self.latest: float | None = None
        self.min_rto = min_rto
        self.max_rto = max_rto
        self.granularity = granularity

    @property
    def rto(self) -> float:
        """The current retransmission timeout, backoff included."""
        return min(self.base_rto * (1 << self.backoffs), self.max_rto)

    def sample(self, rtt: float) -> None:
        """Take one RTT measurement (never from a retransmitted segment: Karn)."""
        # Comparisons written out rather than min() and max() (each a builtin call; every
        # handshake takes a sample), picking the same operand min() and max() would.
        if rtt < 0.0:
            rtt = 0.0
        self.latest = rtt
        low = self.min_rtt
        if low is None or rtt < low:
            self.min_rtt = rtt
        srtt = self.srtt
        if srtt is None:
            srtt = self.srtt = rtt
            self.rttvar = rtt / 2
        else:
            self.rttvar = (1 - _BETA) * self.rttvar + _BETA * abs(srtt - rtt)
            srtt = self.srtt = (1 - _ALPHA) * srtt + _ALPHA * rtt
        var = _K * self.rttvar
        rto = srtt + (var if var > self.granularity else self.granularity)
        if self.min_rto > rto:
            rto = self.min_rto
        if self.max_rto < rto:
            rto = self.max_rto
        self.base_rto = rto
        self.backoffs = 0

    def backoff(self) -> None:
        """Double the RTO after a timeout (RFC 6298 5.5), up to ``max_rto``."""
        if self.rto < self.max_rto:
            self.backoffs = min(self.backoffs + 1, _MAX_BACKOFF)

    def clear_backoff(self) -> None:
        """New data was acknowledged: return to the RTO the samples give."""
        self.backoffs = 0

    def reset(self, initial_rto: float = 1.0) -> None:
        """Forget the path (after migration to a new one)."""
        self.srtt = None
        self.rttvar = 0.0
        self.base_rto = initial_rto
        self.backoffs = 0
        self.min_rtt = None

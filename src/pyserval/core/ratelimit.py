"""A token bucket: how many answers a host may give per second (RSTs, challenge ACKs).

Sans-I/O like the rest of the core: :meth:`TokenBucket.take` is given ``now``. One bucket per
host and kind of answer (not per peer): what it bounds is what the host sends to anyone in
answer to packets it did not ask for, so a flood of junk cannot be turned into a flood of
answers (reflection), whatever addresses the junk claims to come from.
"""

from __future__ import annotations

__all__ = ["TokenBucket"]


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up; each answer takes one."""

    __slots__ = ("burst", "denied", "granted", "rate", "_stamp", "_tokens")

    def __init__(self, rate: float, burst: float) -> None:
        if rate < 0 or burst < 1:
            raise ValueError(f"need rate >= 0 and burst >= 1: rate={rate}, burst={burst}")
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._stamp: float | None = None
        self.granted = 0
        self.denied = 0

    def take(self, now: float) -> bool:
        """Whether one more answer may go now (and count it either way)."""
        stamp = self._stamp
        if stamp is not None and now > stamp:
            self._tokens = min(self.burst, self._tokens + (now - stamp) * self.rate)
        if stamp is None or now > stamp:
            self._stamp = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            self.granted += 1
            return True
        self.denied += 1
        return False

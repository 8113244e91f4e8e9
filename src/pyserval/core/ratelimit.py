"""A token bucket: how many answers a host may give per second (RSTs, challenge ACKs).

Sans-I/O like the rest of the core: :meth:`TokenBucket.take` is given ``now``. One bucket per
host and kind of answer (not per peer): what it bounds is what the host sends to anyone in
answer to packets it did not ask for, so a flood of junk cannot be turned into a flood of
answers (reflection), whatever addresses the junk claims to come from.
"""

from __future__ import annotations

import random

__all__ = ["JitteredBudget", "TokenBucket"]


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


class JitteredBudget:
    """At most about ``rate`` answers per one-second window, the exact budget of each window
    drawn at random from [rate/2, 3*rate/2).

    For challenge ACKs (RFC 5961), a host-wide budget with a fixed refill is a side channel
    (CVE-2016-5696): an attacker that owns a connection counts how many of its own challenge
    ACKs come back in a second and learns whether its guesses at a victim flow's numbers drew
    challenge ACKs there. A budget the attacker cannot know, and a per-connection limit that
    leaves the victim flow spending at most a couple a second (see ``HostCore``), hide that.
    ``rng`` is the host's (the OS CSPRNG unless a simulation seeds it).
    """

    __slots__ = ("denied", "granted", "rate", "_left", "_rng", "_window")

    def __init__(self, rate: float, rng: random.Random) -> None:
        if rate < 1:
            raise ValueError(f"need rate >= 1: rate={rate}")
        self.rate = rate
        self._rng = rng
        self._window: int | None = None
        self._left = 0
        self.granted = 0
        self.denied = 0

    def take(self, now: float) -> bool:
        """Whether one more answer may go now (and count it either way)."""
        window = int(now)
        if window != self._window:
            self._window = window
            half = max(1, int(self.rate) // 2)
            self._left = half + self._rng.randrange(max(1, int(self.rate)))
        if self._left > 0:
            self._left -= 1
            self.granted += 1
            return True
        self.denied += 1
        return False

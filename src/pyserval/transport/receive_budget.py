"""A host's budget for the data in flight to it: how much all its connections' advertised
windows may promise at once.

Over UDP encapsulation every connection of a host on one interface shares one socket, and
so one kernel receive buffer. When the windows the connections advertise add up to more
than that buffer holds, a burst from many senders overflows it and the kernel drops
datagrams: with 100 streams of 1 MiB windows against a 4 MiB buffer, 255 drops in one
second, and each stream that lost its tail waited for a 200 ms retransmission timeout.
Linux TCP has no such shared queue (each socket has its own buffer).

The budget divides the buffer among the connections that are *receiving*: each
advertises at most its share, and at least two segments, so that none falls to one
segment per round trip (a thousand connections of two 32 KiB segments each still promise
more than any socket buffer holds: the budget cannot help there). A connection never
pulls back the right edge of a window it has already advertised (RFC 9293 section
3.8.6.2.2: a receiver should not shrink the window); it advertises its smaller share as
the data it was promised arrives.

Who is receiving is counted per epoch (:attr:`ReceiveBudget.interval`, 100 ms): a
connection that took data since its last advertisement counts once in the epoch it
advertises in, and an accepted connection counts from its SYN-ACK (a thousand handshakes
at once would otherwise each promise 64 KiB before any data came). The share is the total
divided by the larger of this epoch's count so far and the last epoch's, so it shrinks as
soon as more connections start receiving, and an idle connection costs the busy ones
nothing after an epoch.

Sans-I/O: the host passes the time in (:meth:`ReceiveBudget.tick`); nothing here reads a
clock or does I/O. A host without a budget (the default; the simulated network) lets each
connection advertise its whole free buffer.
"""

from __future__ import annotations

from typing import Final, Protocol

__all__ = ["DEFAULT_EPOCH", "ReceiveBudget", "budget_for"]

DEFAULT_EPOCH: Final = 0.1
"""Seconds per counting epoch: several round trips on most paths, short enough that a
connection gone idle frees its share quickly."""


def budget_for(rcvbuf: int) -> int:
    """The budget for a socket whose receive buffer the kernel reports as ``rcvbuf``.

    Linux reports twice the size asked for and charges each queued datagram for its
    whole allocation, not only its payload, so the payload that fits is less. Five
    eighths of the reported size is what measured best on loopback with 100 streams and
    the 4 MiB buffer the runtime asks for (``benchmarks/scaling.py --quick --streams 100``,
    one run each on a loaded machine: four eighths 221 MB/s, five eighths 263 MB/s, both
    without a drop; without a budget 165 MB/s and 210 to 300 datagrams dropped)."""
    return max(1, rcvbuf * 5 // 8)


class _Counted(Protocol):
    budget_epoch: int


class ReceiveBudget:
    """Bytes the peers of all a host's connections may have in flight to it at once (see
    the module docstring)."""

    __slots__ = ("total", "share", "epoch", "receiving", "previous", "interval", "_epoch_end")

    def __init__(self, total: int, interval: float = DEFAULT_EPOCH) -> None:
        if total < 1:
            raise ValueError(f"a receive budget must be positive: {total}")
        if not interval > 0:
            raise ValueError(f"the counting epoch must be positive: {interval}")
        self.total = total
        """The bytes shared out (the socket's receive buffer)."""
        self.share = total
        """What one receiving connection may advertise now (before the two-segment floor)."""
        self.epoch = 1
        """The current counting epoch (connections start at 0: not yet counted)."""
        self.receiving = 0
        """Connections counted as receiving in this epoch so far."""
        self.previous = 0
        """... and in the last epoch."""
        self.interval = interval
        self._epoch_end: float | None = None

    def tick(self, now: float) -> None:
        """Start a new epoch when the current one is over (the host calls this as
        datagrams arrive)."""
        end = self._epoch_end
        if end is None:
            self._epoch_end = now + self.interval
        elif now >= end:
            self.previous = self.receiving
            self.receiving = 0
            self.epoch += 1
            self._epoch_end = now + self.interval
            self.share = self.total // max(1, self.previous)

    def count(self, conn: _Counted) -> None:
        """``conn`` took data since it last advertised a window: count it once in this
        epoch, and shrink the share at once if it is one more than the last epoch had."""
        if conn.budget_epoch != self.epoch:
            conn.budget_epoch = self.epoch
            self.receiving += 1
            if self.receiving > self.previous:
                self.share = self.total // self.receiving

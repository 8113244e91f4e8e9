"""Multipath: several subflows under one connection (sans-I/O parts).

Design (RFC 8684, MPTCP, is the reference; the wire elements are pyserval's own SAL
extensions, documented in the README):

* Negotiation: a client whose ``StreamConfig.multipath`` is set puts MP_CAPABLE (its 64-bit
  key) in its SYN; a server that accepts answers with its own key in the SYN-ACK. Without
  both, the connection is the plain single-path one, byte for byte the reference's.
* Each subflow is a SAL flow with its own flowIDs, control channel, TCP sequence space and
  congestion control. A connection-level data sequence number (DSN) maps bytes onto
  subflows: every data segment carries DSS (its DSN, and the cumulative data ACK), the
  receiver places the bytes in the connection's reassembly buffer by DSN and acknowledges
  each subflow's own sequence space (ACK, SACK) on that subflow.
* JOIN: the client opens another subflow with a SYN carrying JOIN (the server's token and a
  proof derived from both keys) from any of its addresses to any of the server's.
* The sender frees data once the data ACK covers it. A subflow that must retransmit bytes
  already delivered over another path sends zeros in their place: the receiver drops data
  below what it has.
* A subflow that stops answering (three retransmission timeouts in a row) or loses its
  interface is abandoned: its unacknowledged data is sent again on the others.
* Congestion control is coupled (RFC 6356 LIA): together the subflows take no more than one
  TCP would on a shared bottleneck. Schedulers: lowest RTT first (default) and redundant.
"""

from __future__ import annotations

import hashlib
import os
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from sortedcontainers import SortedDict

from ...sal.inet import Address
from ..congestion import CongestionControl

if TYPE_CHECKING:
    from ..connection import Subflow

__all__ = [
    "DEAD_AFTER_RTOS",
    "SCHEDULERS",
    "RedundantScheduler",
    "Scheduler",
    "get_scheduler",
    "register_scheduler",
    "Lia",
    "LiaGroup",
    "MultipathState",
    "SeqTracker",
    "join_ack_proof",
    "join_proof",
    "token_of",
]

DEAD_AFTER_RTOS: Final = 3  # consecutive RTOs after which a subflow (not the last) is dropped
MAX_SUBFLOWS: Final = 8
MAX_HALF_OPEN_JOINS: Final = 2  # JOINs answered but not yet proven, per connection
JOIN_RETRIES: Final = 3  # a JOIN's SYN or SYN-ACK is sent at most this many times again
_MAX_OOO: Final = 1024


def token_of(key: int) -> int:
    """The 32-bit token that names a connection by its owner's key (as in MPTCP)."""
    return int.from_bytes(hashlib.sha256(key.to_bytes(8, "big")).digest()[:4], "big")


def join_proof(client_key: int, server_key: int) -> bytes:
    """What a JOIN carries to prove it belongs to the connection (both keys known)."""
    raw = client_key.to_bytes(8, "big") + server_key.to_bytes(8, "big") + b"pyserval-join"
    return hashlib.sha256(raw).digest()[:8]


def join_ack_proof(
    client_key: int, server_key: int, client_nonce: bytes, server_nonce: bytes
) -> bytes:
    """What the third ACK of a JOIN carries: it binds both keys to both subflow nonces, so
    a JOIN SYN seen on the wire and replayed elsewhere cannot complete (RFC 8684 3.2's
    HMAC exchange, simplified to one proof)."""
    raw = b"".join(
        (
            client_key.to_bytes(8, "big"),
            server_key.to_bytes(8, "big"),
            bytes(client_nonce),
            bytes(server_nonce),
            b"pyserval-join-ack",
        )
    )
    return hashlib.sha256(raw).digest()[:8]


def new_key() -> int:
    """A fresh random 64-bit key."""
    return int.from_bytes(os.urandom(8), "big")


@dataclass(slots=True)
class MultipathState:
    """The connection-level state of a multipath connection."""

    local_key: int
    peer_key: int = 0
    scheduler: Scheduler = field(default_factory=lambda: SCHEDULERS["lowest_rtt"])
    snd_nxt: int = 0  # next DSN not yet given to any subflow
    data_ack: int = 0  # the peer's cumulative data ACK
    snd_right: int = 0  # the peer's window's right edge in DSN (data ACK + window)
    reinject: deque[tuple[int, int]] = field(default_factory=deque)  # DSN ranges to resend
    peer_addresses: list[Address] = field(default_factory=list)  # advertised by the peer
    advertise: list[Address] = field(default_factory=list)  # ours, to tell the peer
    advertise_rounds: int = 3  # packets left to carry them
    group: LiaGroup = field(default_factory=lambda: LiaGroup())
    failed: int = 0  # subflows abandoned

    @property
    def local_token(self) -> int:
        """Our token (the peer's JOINs name it)."""
        return token_of(self.local_key)

    @property
    def peer_token(self) -> int:
        """The peer's token (our JOINs name it)."""
        return token_of(self.peer_key)


class SeqTracker:
    """A subflow's receive-side sequence bookkeeping without the data (multipath: the
    bytes go to the connection's buffer by DSN): the cumulative point and SACK ranges."""

    __slots__ = ("rcv_nxt", "_ooo", "_recent")

    def __init__(self) -> None:
        self.rcv_nxt = 0
        self._ooo: SortedDict = SortedDict()  # start -> end, disjoint, above rcv_nxt
        self._recent: int | None = None

    def add(self, start: int, end: int) -> bool:
        """Record [start, end) as received; False if it was all old (a duplicate)."""
        if end <= self.rcv_nxt:
            return False
        start = max(start, self.rcv_nxt)
        ooo = self._ooo
        if start == self.rcv_nxt:
            self.rcv_nxt = end
            while ooo:
                s, e = ooo.peekitem(0)
                if s > self.rcv_nxt:
                    break
                del ooo[s]
                self.rcv_nxt = max(self.rcv_nxt, e)
            return True
        # Merge with overlapping or adjacent ranges.
        i = ooo.bisect_right(start)
        if i:
            s, e = ooo.peekitem(i - 1)
            if e >= start:
                start = s
                end = max(end, e)
                del ooo[s]
        while True:
            j = ooo.bisect_left(start)
            if j >= len(ooo):
                break
            s, e = ooo.peekitem(j)
            if s > end:
                break
            end = max(end, e)
            del ooo[s]
        if len(ooo) >= _MAX_OOO:
            return False  # too fragmented: drop it, the sender will send again
        ooo[start] = end
        self._recent = start
        return True

    @property
    def has_holes(self) -> bool:
        """Whether anything above ``rcv_nxt`` was received (a hole below it)."""
        return bool(self._ooo)

    def sack_blocks(self, limit: int) -> list[tuple[int, int]]:
        """Up to ``limit`` received ranges above ``rcv_nxt``, the most recent first."""
        ooo = self._ooo
        out: list[tuple[int, int]] = []
        recent = self._recent
        if recent is not None and recent in ooo:
            out.append((recent, ooo[recent]))
        for s in ooo:
            if len(out) >= limit:
                break
            if s != recent:
                out.append((s, ooo[s]))
        return out


class LiaGroup:
    """The subflows' congestion controllers coupled by RFC 6356's Linked Increases."""

    def __init__(self) -> None:
        self.members: list[Lia] = []

    def alpha(self) -> float:
        """RFC 6356 section 3: how aggressive the whole may be."""
        total = sum(m.cwnd for m in self.members)
        best = 0.0
        denom = 0.0
        for m in self.members:
            rtt = m.srtt or 0.1
            best = max(best, m.cwnd / (rtt * rtt))
            denom += m.cwnd / rtt
        if denom <= 0:
            return 1.0
        return total * best / (denom * denom)

    def total_cwnd(self) -> int:
        """The sum of the subflows' windows."""
        return sum(m.cwnd for m in self.members)


class Lia(CongestionControl):
    """NewReno-like loss response; the congestion-avoidance increase is coupled."""

    def __init__(self, mss: int, group: LiaGroup, initial_window: int | None = None) -> None:
        super().__init__(mss, initial_window)
        self.group = group
        self.srtt: float | None = None
        group.members.append(self)

    def leave(self) -> None:
        """This subflow is gone: stop counting it."""
        if self in self.group.members:
            self.group.members.remove(self)

    def on_ack(self, acked_bytes: int, now: float, rtt: float | None, bytes_in_flight: int) -> None:
        if rtt is not None:
            self.srtt = rtt if self.srtt is None else 0.875 * self.srtt + 0.125 * rtt
        super().on_ack(acked_bytes, now, rtt, bytes_in_flight)

    def _ca_increase(self, acked_bytes: int, now: float, rtt: float | None) -> None:
        # RFC 6356: per ACK, min(alpha * acked * mss / cwnd_total, acked * mss / cwnd_i).
        total = max(self.group.total_cwnd(), 1)
        coupled = self.group.alpha() * acked_bytes * self.mss / total
        alone = acked_bytes * self.mss / max(self.cwnd, 1)
        self._grow_cwnd(min(coupled, alone))

    def _loss_ssthresh(self, bytes_in_flight: int) -> int:
        return max(bytes_in_flight // 2, 2 * self.mss)


class Scheduler:
    """Decides which subflow sends what (subclass and :func:`register_scheduler` to plug
    in another). Data to resend from a failed subflow always goes first, whatever the
    scheduler; :meth:`take` is asked only for new data."""

    name = "lowest_rtt"

    def order(self, subflows: list[Subflow]) -> list[Subflow]:
        """The order in which subflows fill their congestion windows: lowest smoothed RTT
        first (those without a sample last)."""
        return sorted(subflows, key=lambda sf: sf.rtt.srtt if sf.rtt.srtt is not None else 1e9)

    def take(
        self, mp: MultipathState, sf: Subflow, send_end: int, max_len: int, limit: int
    ) -> tuple[int, int] | None:
        """The next new DSN range (start, length) for ``sf``, below ``send_end`` (what the
        application wrote) and ``limit`` (the peer's window), or None. This one gives each
        byte to exactly one subflow."""
        nxt = mp.snd_nxt
        n = min(max_len, send_end - nxt, limit - nxt)
        if n <= 0:
            return None
        mp.snd_nxt = nxt + n
        return nxt, n


class RedundantScheduler(Scheduler):
    """Every byte on every subflow: the fastest path delivers, the others insure."""

    name = "redundant"

    def take(
        self, mp: MultipathState, sf: Subflow, send_end: int, max_len: int, limit: int
    ) -> tuple[int, int] | None:
        nxt = max(sf.redundant_next, mp.data_ack)
        n = min(max_len, send_end - nxt, limit - nxt)
        if n <= 0:
            return None
        sf.redundant_next = nxt + n
        mp.snd_nxt = max(mp.snd_nxt, nxt + n)
        return nxt, n


SCHEDULERS: dict[str, Scheduler] = {"lowest_rtt": Scheduler(), "redundant": RedundantScheduler()}


def register_scheduler(scheduler: Scheduler) -> None:
    """Make ``scheduler`` available as ``StreamConfig(scheduler=scheduler.name)``."""
    SCHEDULERS[scheduler.name] = scheduler


def get_scheduler(name: str) -> Scheduler:
    """The scheduler registered as ``name``; ValueError naming the known ones."""
    try:
        return SCHEDULERS[name]
    except KeyError:
        known = ", ".join(sorted(SCHEDULERS))
        raise ValueError(f"unknown multipath scheduler {name!r} (known: {known})") from None

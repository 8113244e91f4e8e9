"""Loss recovery for one subflow's send side: what is in flight, what was lost, what to resend.

A :class:`Recovery` belongs to one :class:`~pyserval.transport.subflow.Subflow` and keeps,
in the subflow's send offsets (never 32-bit wire numbers):

* the **scoreboard**: ``segments``, a sorted map from the start offset of every
  transmitted, unacknowledged range to its :class:`SentSegment` record (end, send time,
  SACKed, lost, retransmitted, and the DSN of its first byte on a multipath connection);
  ``lost``, the sorted starts of segments declared lost and not yet sent again;
* the **loss rules**: RFC 6675 ``IsLost`` (more than ``(DupThresh - 1) * SMSS`` bytes
  SACKed above a segment), a RACK-like rule for lost retransmissions (RFC 8985 6.2: one
  sent well before something already SACKed was lost again), and for peers without SACK
  duplicate ACKs: fast retransmit (RFC 5681), NewReno partial ACKs (RFC 6582), limited
  transmit (RFC 3042) and early retransmit (RFC 5827);
* **pipe**, RFC 6675's estimate of the bytes in the network (``pipe``);
* the **RTT estimate and RTO** (RFC 6298, :class:`~pyserval.transport.rtt.RttEstimator`),
  sampled by Karn's rule as segments are acknowledged.

Costs: the scoreboard is a :class:`~pyserval.transport.scoreboard.Scoreboard` (adding a
segment at the right end and removing acknowledged ones from the left are O(1); an ACK
with nothing SACKed or lost removes what it covers as one slice); ``pipe`` outside
recovery is O(1) and in recovery a scan of the scoreboard, done once per output round by
the caller.

What it does not do: send anything, read a clock (every call takes ``now``), arm timers
(the subflow owns ``rto_deadline``), change the congestion window (the subflow tells its
:class:`~pyserval.transport.congestion.CongestionControl` when recovery starts or ends), or
see wire sequence numbers (the subflow unwraps SACK blocks before handing them in).

The interface, in the order a subflow uses it: :meth:`Recovery.on_sent` for each new
segment; per ACK :meth:`on_sack`, then :meth:`on_ack` (the left edge moved) or
:meth:`on_duplicate_ack`, then :meth:`first_lost` / :meth:`dup_thresh` to decide on
:meth:`enter_recovery`, or :meth:`mark_lost` while in it; :meth:`take_lost` when sending;
:meth:`on_timeout` at the retransmission timeout; :meth:`on_path_change` after a move.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from sortedcontainers import SortedList

from .rtt import RttEstimator
from .scoreboard import Scoreboard

__all__ = ["DUP_THRESH", "Recovery", "SentSegment"]

DUP_THRESH: Final = 3  # RFC 5681 / RFC 6675 DupThresh


class SentSegment:
    """One transmitted range [start, end) of a subflow's sequence space (the start is its
    key in :attr:`Recovery.segments`)."""

    __slots__ = ("end", "sent_at", "retransmitted", "resent", "sacked", "lost", "fin", "dsn")

    def __init__(self, end: int, sent_at: float, fin: bool, dsn: int = -1) -> None:
        self.end = end
        self.dsn = dsn  # multipath: the data sequence number of its first byte (else -1)
        self.sent_at = sent_at
        self.retransmitted = False  # sent again in this loss episode (counts in pipe)
        self.resent = False  # ever sent more than once (Karn: never an RTT sample)
        self.sacked = False
        self.lost = False
        self.fin = fin


class Recovery:
    """The scoreboard, loss rules, pipe and RTT estimate of one subflow (see the module
    docstring). ``mss`` and ``sack_ok`` are set again by :meth:`set_peer` once the
    handshake tells what the peer takes."""

    __slots__ = (
        "segments",
        "lost",
        "rtt",
        "mss",
        "sack_ok",
        "rack_time",
        "sacked_bytes",
        "dupacks",
        "dup_segments",
        "rexmit_now",
        "in_recovery",
        "recovery_after_rto",
        "recovery_point",
    )

    def __init__(self, rtt: RttEstimator, mss: int, sack_ok: bool = False) -> None:
        self.segments: Scoreboard[SentSegment] = Scoreboard()  # start offset -> segment
        self.lost: SortedList = SortedList()  # starts of lost segments awaiting resend
        self.rtt = rtt
        self.mss = mss
        self.sack_ok = sack_ok
        # The newest send time of anything SACKed (RACK, RFC 8985): a retransmission sent
        # well before it and still not SACKed was lost too.
        self.rack_time = 0.0
        self.sacked_bytes = 0
        self.dupacks = 0
        # Without SACK: segments the duplicate ACKs say have left the network (each one
        # was caused by a segment arriving above the hole), kept through a recovery episode
        # and taken off the pipe, as Linux does for Reno; with SACK the scoreboard knows.
        self.dup_segments = 0
        # Without SACK: the next retransmission of the lost head goes out whatever the pipe
        # (the fast retransmit on the third duplicate ACK, RFC 5681 3.2 step 2, and the
        # retransmission on a partial ACK, RFC 6582 3.2 step 3).
        self.rexmit_now = False
        self.in_recovery = False
        self.recovery_after_rto = False  # this episode began with a timeout
        self.recovery_point = 0  # recovery ends when the left edge reaches it

    def set_peer(self, mss: int, sack_ok: bool) -> None:
        """The handshake settled the segment size and whether the peer SACKs."""
        self.mss = mss
        self.sack_ok = sack_ok

    # -- sending --------------------------------------------------------------------------
    def on_sent(self, start: int, end: int, fin: bool, now: float, dsn: int = -1) -> None:
        """A new segment [start, end) went out (``end`` counts a FIN)."""
        self.segments[start] = SentSegment(end, now, fin, dsn)

    def on_sent_run(self, start: int, end: int, mss: int, fin: bool, now: float) -> None:
        """New segments of ``mss`` bytes from ``start`` went out, the last one ending at
        ``end`` (maybe shorter) and carrying a FIN when ``fin`` (it then ends at end + 1):
        :meth:`on_sent` for each, in one step."""
        starts = range(start, end, mss)
        segs = [SentSegment(s + mss, now, False) for s in starts]
        last = segs[-1]
        if fin:
            last.end = end + 1
            last.fin = True
        else:
            last.end = end
        self.segments.extend(starts, segs)

    def take_lost(self, pipe: int, cwnd: int, now: float) -> int | None:
        """The start of the next lost segment to send again, marked as sent at ``now``;
        None when none is due: either nothing is lost any more (:attr:`lost` is empty:
        new data may go) or the window has no room for it (:attr:`lost` is not)."""
        lost = self.lost
        segs = self.segments
        while lost:
            start: int = lost[0]
            seg = segs[start]
            if seg.retransmitted or seg.sacked:
                lost.discard(start)
                continue
            if pipe > 0 and pipe + (seg.end - start) > cwnd and not self.rexmit_now:
                return None
            self.rexmit_now = False
            seg.retransmitted = True
            seg.resent = True
            seg.sent_at = now
            lost.discard(start)
            return start
        return None

    def pipe(self, snd_una: int, snd_max: int) -> int:
        """Bytes in the network by RFC 6675's pipe (outside recovery: unSACKed bytes).

        Without SACK each duplicate ACK stands for one segment that left the network, so
        the pipe shrinks by a segment per duplicate ACK: outside recovery that is limited
        transmit (RFC 3042: one new segment on each of the first two), in recovery it does
        what RFC 5681's window inflation does, and a partial ACK takes back the duplicates
        of the segments it covers (RFC 6582's deflation).
        """
        if not self.in_recovery:
            pipe = snd_max - snd_una - self.sacked_bytes
        else:
            pipe = 0
            for start, seg in self.segments.items():
                if seg.sacked:
                    continue
                n = seg.end - start
                if not seg.lost:
                    pipe += n
                if seg.retransmitted and seg.lost:
                    pipe += n
        if self.dup_segments:
            pipe = max(pipe - self.dup_segments * self.mss, 0)
        return pipe

    # -- acknowledgements ---------------------------------------------------------------
    def on_sack(
        self, blocks: Iterable[tuple[int, int]], snd_una: int, snd_max: int, now: float
    ) -> int:
        """SACK blocks [left, right) in send offsets; returns the bytes newly SACKed.
        Blocks outside [snd_una, snd_max] are stale or bogus and ignored; only segments
        wholly inside a block count as SACKed."""
        segs = self.segments
        before = self.sacked_bytes
        for left, right in blocks:
            if right <= left or left < snd_una or right > snd_max:
                continue
            for start in segs.irange(left, right):
                seg = segs[start]
                if seg.end <= right and not seg.sacked:
                    seg.sacked = True
                    self.sacked_bytes += seg.end - start
                    # RFC 8985 6.2: a resent segment SACKed within a min RTT of its
                    # resending was the original arriving late: its time says nothing.
                    min_rtt = self.rtt.min_rtt
                    if seg.sent_at > self.rack_time and not (
                        seg.resent and (min_rtt is None or now - seg.sent_at < min_rtt)
                    ):
                        self.rack_time = seg.sent_at
                    if seg.lost:
                        self.lost.discard(start)
        return self.sacked_bytes - before

    def on_ack(self, ack: int, now: float) -> float | None:
        """The cumulative ACK moved the left edge to ``ack`` (above the old one).

        Forgets what it covers, takes an RTT sample by Karn's rule, ends recovery when
        ``ack`` reaches the recovery point or (without SACK) treats it as a NewReno partial
        ACK. Returns the time since the newest covered segment was sent (None when every
        covered one was resent), which congestion control takes even when Karn's rule kept
        it from the RTT estimate (an ACK that also covers a retransmission).
        """
        rtt_sample: float | None = None
        karn = False
        segs = self.segments
        covered = 0  # segments acknowledged whole
        if not self.sacked_bytes and not self.lost:
            # The common case: nothing SACKed or queued for resending, so the segments
            # below ``ack`` go as one slice unless the last of them is cut by it.
            last = segs.last_key_below(ack)
            if last is not None and segs[last].end <= ack:
                for seg in segs.pop_through(ack):
                    covered += 1
                    if seg.resent:
                        karn = True
                    else:
                        rtt_sample = now - seg.sent_at
        while segs:
            start, seg = segs.peekitem(0)
            if start >= ack:
                break
            del segs[start]
            if seg.lost:
                self.lost.discard(start)
            if seg.end > ack:
                # Partially acknowledged: keep the rest as its own segment.
                rest = SentSegment(
                    seg.end, seg.sent_at, seg.fin, seg.dsn + (ack - start) if seg.dsn >= 0 else -1
                )
                rest.retransmitted, rest.lost, rest.resent = seg.retransmitted, seg.lost, seg.resent
                segs[ack] = rest
                if rest.lost:
                    self.lost.add(ack)
                if seg.sacked:
                    self.sacked_bytes -= ack - start
                    rest.sacked = True
                break
            covered += 1
            if seg.sacked:
                self.sacked_bytes -= seg.end - start
            if seg.resent:
                karn = True
            else:
                rtt_sample = now - seg.sent_at  # the newest: least inflated by holes
        if rtt_sample is not None and not karn:
            # Karn, extended as Linux does: no sample from an ACK that also covers a
            # retransmission (it would time the wait for the hole to be filled).
            self.rtt.sample(rtt_sample)
        else:
            self.rtt.clear_backoff()
        self.dupacks = 0
        if self.dup_segments:
            # All but the first segment this ACK covers had each caused a duplicate ACK; the
            # rest came from segments above the new left edge (Linux's tcp_remove_reno_sacks).
            left = max(min(self.dup_segments - covered + 1, len(segs) - 1), 0)
            if self.in_recovery and ack < self.recovery_point:
                self.dup_segments = left  # a partial ACK
            elif self.in_recovery and not self.recovery_after_rto and left >= DUP_THRESH:
                # Recovery ends, but the receiver already holds at least three segments
                # above the new left edge: a segment sent during recovery was lost (a new
                # congestion event). Retransmit it now; its duplicate ACKs came while we
                # counted them for the old hole, and no more will come if the sender has
                # nothing new to send.
                self.dup_segments = left
                self.dupacks = left
            else:
                self.dup_segments = 0
        if self.in_recovery:
            if ack >= self.recovery_point:
                self.in_recovery = False
                self.recovery_after_rto = False
                for start in self.lost:
                    segs[start].lost = False
                self.lost.clear()
                self.rexmit_now = False
            elif not self.sack_ok and segs:
                # NewReno partial ACK (RFC 6582): the next hole is lost too, and is resent
                # at once.
                start, seg = segs.peekitem(0)
                if not seg.lost:
                    seg.lost = True
                    seg.retransmitted = False
                    self.lost.add(start)
                    self.rexmit_now = not self.recovery_after_rto
        return rtt_sample

    def on_duplicate_ack(self) -> None:
        """An ACK that did not move the left edge and counts as a duplicate (RFC 5681
        section 2; with SACK only one that SACKed new data, RFC 6675 section 2)."""
        self.dupacks += 1
        if not self.sack_ok and not self.recovery_after_rto:
            # Never more than the segments above the first: that one is the hole.
            self.dup_segments = min(self.dup_segments + 1, max(len(self.segments) - 1, 0))

    # -- loss detection -----------------------------------------------------------------
    def dup_thresh(self, can_send_new: bool) -> int:
        """Duplicate ACKs that start a fast retransmit: three, or fewer without SACK when
        fewer than four segments are outstanding and nothing new can be sent (Early
        Retransmit, RFC 5827: at most ``oseg - 1`` duplicates can come then).
        ``can_send_new``: new data is waiting and the peer's window has room for it."""
        if self.sack_ok:
            return DUP_THRESH
        oseg = len(self.segments)
        if oseg > DUP_THRESH or oseg < 2 or can_send_new:
            return DUP_THRESH
        return oseg - 1

    def first_lost(self) -> bool:
        """RFC 6675 IsLost for the first unacknowledged segment."""
        if not self.segments or self.sacked_bytes == 0:
            return False
        seg = self.segments.peekitem(0)[1]
        if seg.sacked:
            return False
        return self.sacked_bytes > (DUP_THRESH - 1) * self.mss

    def enter_recovery(self, snd_max: int) -> None:
        """Start a fast recovery episode that lasts until ``snd_max`` is acknowledged; the
        caller tells congestion control (a congestion event)."""
        self.in_recovery = True
        self.recovery_after_rto = False
        self.recovery_point = snd_max
        self.mark_lost()
        if not self.lost and self.segments:  # dupacks without SACK: the first one is lost
            start, seg = self.segments.peekitem(0)
            seg.lost = True
            self.lost.add(start)
        self.rexmit_now = not self.sack_ok

    def mark_lost(self) -> None:
        """Mark unSACKed segments with enough SACKed data above them as lost (without SACK:
        the first segment)."""
        if not self.sack_ok:
            if self.segments:
                start, seg = self.segments.peekitem(0)
                if not seg.lost and not seg.sacked:
                    seg.lost = True
                    self.lost.add(start)
            return
        above = 0
        threshold = (DUP_THRESH - 1) * self.mss
        segs = self.segments
        # A retransmission older than something already SACKed (by more than a reordering
        # window of a quarter of the minimum RTT) was lost as well: send it again rather
        # than wait for the retransmission timer (RACK's rule, RFC 8985 6.2).
        min_rtt = self.rtt.min_rtt
        rack = self.rack_time - min_rtt / 4 if min_rtt is not None else -1.0
        for start in reversed(segs):
            seg = segs[start]
            if seg.sacked:
                above += seg.end - start
            elif seg.retransmitted:
                if seg.sent_at < rack and seg.lost:
                    seg.retransmitted = False  # lost again: back in the queue to resend
                    self.lost.add(start)
            elif above > threshold and not seg.lost:
                seg.lost = True
                self.lost.add(start)

    # -- timeouts and moves -------------------------------------------------------------
    def on_timeout(self, snd_max: int) -> None:
        """The retransmission timer expired: back off the RTO and presume everything lost,
        to be resent in order from the window start.

        SACKed data is included: the receiver may have reneged on it (RFC 2018 section 8,
        RFC 6675 section 5.1), and the segment at the left edge must go again in any case.
        """
        self.rtt.backoff()
        self.lost.clear()
        for start, seg in self.segments.items():
            seg.sacked = False
            seg.lost = True
            seg.retransmitted = False
            self.lost.add(start)
        self.sacked_bytes = 0
        self.in_recovery = True
        self.recovery_after_rto = True
        self.recovery_point = snd_max
        self.dupacks = 0
        self.dup_segments = 0
        self.rexmit_now = False

    def on_path_change(self, snd_max: int) -> None:
        """The flow moved to a new path: what was in flight on the old one (and not SACKed)
        is resent as after a timeout, without a backed-off RTO."""
        self.rtt.clear_backoff()
        self.dupacks = 0
        self.dup_segments = 0
        self.rexmit_now = False
        if self.segments:
            self.lost.clear()
            for start, seg in self.segments.items():
                if not seg.sacked:
                    seg.lost = True
                    seg.retransmitted = False
                    self.lost.add(start)
            self.in_recovery = True
            self.recovery_after_rto = True
            self.recovery_point = snd_max

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
  sampled by Karn's rule as segments are acknowledged;
* the **tail loss probe** episode (RFC 8985 section 7, TLP): the probe timeout
  (:meth:`Recovery.probe_timeout`), which segment a probe sends again, and what the answer
  to a probe means (:meth:`probe_answered`, :meth:`enter_recovery_after_probe`,
  :meth:`probe_acked`). The subflow owns the timer and sends the probe.

Costs: the scoreboard is a :class:`~pyserval.transport.scoreboard.Scoreboard` (adding a
segment at the right end and removing acknowledged ones from the left are O(1); an ACK
with nothing SACKed or lost removes what it covers as one slice). No ACK walks the window
again: each one costs what it newly tells (segments SACKed, marked lost, acknowledged), so
that a loss episode in an 8 MiB window (about 5,800 segments) costs per ACK what one in a
small window costs, as in Linux:

* ``pipe`` is O(1) in and out of recovery, from running counts: ``sacked_bytes`` and
  ``lost_bytes`` (marked lost and not yet sent again; Linux's ``lost_out`` less what of it
  is retransmitted);
* :meth:`Recovery.on_sack` visits only the segments a block newly covers: the runs of
  adjacent SACKed segments are kept as ranges (``scoreboard.SackedRuns``), and a block
  jumps over them;
* :meth:`Recovery.mark_lost` resumes where it stopped (Linux's lost hint): IsLost holds for
  every segment below some point, a point that only moves up while SACKs arrive, so the
  segments below it are passed once per episode; RACK's rule takes the retransmissions
  from a heap ordered by their send time, oldest first, and stops at the first one that
  is recent enough.

A timeout and a path change still touch every segment (they mark the whole window lost),
once per event.

What it does not do: send anything, read a clock (every call takes ``now``), arm timers
(the subflow owns ``rto_deadline`` and ``pto_deadline``), change the congestion window (the
subflow tells its :class:`~pyserval.transport.congestion.CongestionControl` when recovery
starts or ends), or see wire sequence numbers (the subflow unwraps SACK blocks before
handing them in).

The interface, in the order a subflow uses it: :meth:`Recovery.on_sent` for each new
segment; per ACK :meth:`on_sack`, then :meth:`on_ack` (the left edge moved) or
:meth:`on_duplicate_ack`, then :meth:`first_lost` / :meth:`dup_thresh` to decide on
:meth:`enter_recovery`, or :meth:`mark_lost` while in it; :meth:`take_lost` when sending;
:meth:`on_timeout` at the retransmission timeout; :meth:`on_path_change` after a move;
:meth:`forget` when the subflow is given up.
"""

from __future__ import annotations

from collections.abc import Iterable
from heapq import heapify, heappop, heappush
from typing import Final

from sortedcontainers import SortedList

from .rtt import RttEstimator
from .scoreboard import SackedRuns, Scoreboard

__all__ = ["DUP_THRESH", "MIN_PTO", "Recovery", "SentSegment"]

DUP_THRESH: Final = 3  # RFC 5681 / RFC 6675 DupThresh
# The shortest probe timeout (Linux's floor for TLP): with a tiny smoothed RTT, twice it
# is no margin at all over the jitter of the host's own timers and ACK batching.
MIN_PTO: Final = 0.01

# The heap of retransmissions (RACK's candidates) is rebuilt from the scoreboard once it
# holds this many entries more than twice the segments: entries of segments acknowledged
# or SACKed meanwhile leave it only when they reach its top, which may take long.
_RESENT_SLACK: Final = 64


class _NothingLost(SortedList):  # type: ignore[misc]  # (SortedList is untyped)
    """The lost-segment list every :class:`Recovery` starts with, one for all, always
    empty: most connections never lose a segment, and a SortedList of their own costs
    about 1.5 us to build and free. ``Recovery._lost()`` swaps in a real one before the
    first :meth:`add`; everything else a SortedList does is a no-op on an empty one."""

    def add(self, value: object) -> None:
        raise AssertionError("the shared empty lost list was added to: use Recovery._lost()")

    def update(self, iterable: object) -> None:
        raise AssertionError("the shared empty lost list was added to: use Recovery._lost()")


class _NoSackedRuns(SackedRuns):
    """The same for the SACKed runs (``Recovery._sacked_runs()``): a sender whose peer
    never SACKs anything never needs its own."""

    __slots__ = ()

    def add(self, start: int, end: int) -> None:
        raise AssertionError("the shared empty runs were added to: use Recovery._sacked_runs()")


_NOTHING_LOST: Final = _NothingLost()
_NO_SACKED_RUNS: Final = _NoSackedRuns()


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
    handshake tells what the peer takes.

    The segments are expected as a subflow sends them: each new one above all the others,
    none overlapping, together covering [snd_una, snd_max) (``pipe`` counts from these
    two).
    """

    __slots__ = (
        "segments",
        "lost",
        "rtt",
        "mss",
        "sack_ok",
        "rack_time",
        "sacked_bytes",
        "lost_bytes",
        "dupacks",
        "dup_segments",
        "rexmit_now",
        "in_recovery",
        "recovery_after_rto",
        "recovery_point",
        "probe_end",
        "probe_start",
        "probe_resent",
        "probe_sent_at",
        "probe_partial",
        "_runs",
        "_hint",
        "_sacked_below_hint",
        "_resent",
    )

    def __init__(self, rtt: RttEstimator, mss: int, sack_ok: bool = False) -> None:
        self.segments: Scoreboard[SentSegment] = Scoreboard()  # start offset -> segment
        # Starts of lost segments awaiting resend: the shared empty list until the first
        # loss (add through _lost()).
        self.lost: SortedList = _NOTHING_LOST
        self.rtt = rtt
        self.mss = mss
        self.sack_ok = sack_ok
        # The newest send time of anything SACKed (RACK, RFC 8985): a retransmission sent
        # well before it and still not SACKed was lost too.
        self.rack_time = 0.0
        self.sacked_bytes = 0
        # Bytes of the segments marked lost and not sent again since (nor SACKed): what
        # RFC 6675's pipe leaves out in recovery. Every such segment is in ``lost``.
        self.lost_bytes = 0
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
        # The tail loss probe episode (RFC 8985's TLP.end_seq and TLP.is_retrans): None
        # while no probe is outstanding; else snd_max just after the probe went, the start
        # of the probe's segment, and whether the probe sent old data again.
        self.probe_end: int | None = None
        self.probe_start = 0
        self.probe_resent = False
        self.probe_sent_at = 0.0
        # Without SACK: an ACK moved the left edge, but not past the probe, a min RTT or
        # more after the probe went (so it may answer it): the probe arrived above a hole.
        self.probe_partial = False
        # Every SACKed segment lies in one of these runs and nothing else does: a SACK
        # block skips them instead of visiting its old segments again on every ACK.
        self._runs: SackedRuns = _NO_SACKED_RUNS  # (shared until the first SACK: _sacked_runs)
        # The lost hint: every segment below it was passed by IsLost (SACKed, or lost, or
        # resent, none of which IsLost changes) and need not be seen again; the SACKed
        # bytes below it are counted, so the SACKed bytes above a segment are known.
        self._hint = 0
        self._sacked_below_hint = 0
        # (send time, start) of every retransmission that is lost, not SACKed and not
        # marked for resending again (RACK's candidates), oldest first; entries whose
        # segment has changed since are skipped when they come up.
        self._resent: list[tuple[float, int]] = []

    def set_peer(self, mss: int, sack_ok: bool) -> None:
        """The handshake settled the segment size and whether the peer SACKs."""
        self.mss = mss
        self.sack_ok = sack_ok
        self._reset_hint()
        if self._resent or self.segments:  # else the rebuilt heap is empty as this one is
            self._rebuild_resent()

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
            if seg.lost:
                self.lost_bytes -= seg.end - start  # in the network again
            seg.retransmitted = True
            seg.resent = True
            seg.sent_at = now
            lost.discard(start)
            self._watch_resent(start, seg)
            return start
        return None

    def pipe(self, snd_una: int, snd_max: int) -> int:
        """Bytes in the network by RFC 6675's pipe (outside recovery: unSACKed bytes).

        In recovery, SetPipe's count of every unSACKed segment that is not lost or was sent
        again: the unSACKed bytes less ``lost_bytes``.

        Without SACK each duplicate ACK stands for one segment that left the network, so
        the pipe shrinks by a segment per duplicate ACK: outside recovery that is limited
        transmit (RFC 3042: one new segment on each of the first two), in recovery it does
        what RFC 5681's window inflation does, and a partial ACK takes back the duplicates
        of the segments it covers (RFC 6582's deflation).
        """
        pipe = snd_max - snd_una - self.sacked_bytes
        if self.in_recovery:
            pipe -= self.lost_bytes
        if self.dup_segments:
            pipe = max(pipe - self.dup_segments * self.mss, 0)
        return pipe

    # -- acknowledgements ---------------------------------------------------------------
    def on_sack(
        self, blocks: Iterable[tuple[int, int]], snd_una: int, snd_max: int, now: float
    ) -> int:
        """SACK blocks [left, right) in send offsets; returns the bytes newly SACKed.
        Blocks outside [snd_una, snd_max] are stale or bogus and ignored; only segments
        wholly inside a block count as SACKed.

        A block is walked from its left edge, jumping over each run of segments already
        SACKed (a receiver repeats its blocks, grown, on every ACK), so what it costs is
        the segments it newly covers, not its size.
        """
        segs = self.segments
        runs = self._sacked_runs()
        before = self.sacked_bytes
        min_rtt = self.rtt.min_rtt
        for left, right in blocks:
            if right <= left or left < snd_una or right > snd_max:
                continue
            at = left
            while True:
                at = runs.skip(at)
                start = at if at in segs else segs.first_key_from(at)
                if start is None or start >= right:
                    break
                seg = segs[start]
                end = seg.end
                if seg.sacked:
                    # The first segment of a run that begins above ``at``.
                    at = max(runs.skip(start), end)
                    continue
                if end > right:
                    break  # not wholly inside, and the next segment starts past the block
                seg.sacked = True
                n = end - start
                self.sacked_bytes += n
                runs.add(start, end)
                if start < self._hint:
                    self._sacked_below_hint += n
                # RFC 8985 6.2: a resent segment SACKed within a min RTT of its
                # resending was the original arriving late: its time says nothing.
                if seg.sent_at > self.rack_time and not (
                    seg.resent and (min_rtt is None or now - seg.sent_at < min_rtt)
                ):
                    self.rack_time = seg.sent_at
                if seg.lost:
                    self.lost.discard(start)
                    if not seg.retransmitted:
                        self.lost_bytes -= n
                at = end
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
        sacked_before = self.sacked_bytes
        walk = True
        # (The shared empty list tested first: a SortedList's truth value costs a call.)
        if not sacked_before and (self.lost is _NOTHING_LOST or not self.lost):
            # The common case: nothing SACKed or queued for resending (so nothing counted
            # in ``lost_bytes`` either), so the segments below ``ack`` go as one slice
            # unless the last of them is cut by it.
            last = segs.last_key_below(ack)
            if last is not None and segs[last].end <= ack:
                for seg in segs.pop_through(ack):
                    covered += 1
                    if seg.resent:
                        karn = True
                    else:
                        rtt_sample = now - seg.sent_at
                walk = False  # nothing below ``ack`` is left for the walk below
        while walk and segs:
            start, seg = segs.peekitem(0)
            if start >= ack:
                break
            del segs[start]
            if seg.lost:
                self.lost.discard(start)
                if not seg.retransmitted and not seg.sacked:
                    self.lost_bytes -= min(seg.end, ack) - start
            if seg.end > ack:
                # Partially acknowledged: keep the rest as its own segment.
                rest = SentSegment(
                    seg.end, seg.sent_at, seg.fin, seg.dsn + (ack - start) if seg.dsn >= 0 else -1
                )
                rest.retransmitted, rest.lost, rest.resent = seg.retransmitted, seg.lost, seg.resent
                segs[ack] = rest
                if rest.lost and not rest.retransmitted and not seg.sacked:
                    # Queued only while it awaits its resend (its bytes stay in
                    # ``lost_bytes`` above), as the whole one was: ``take_lost`` took a
                    # resent one out, and RACK's rule (``mark_lost``) queues it again when
                    # it finds it lost, so it must not be queued already (of two entries
                    # an ACK takes out one; the other names a segment that is gone).
                    self._lost().add(ack)
                if seg.sacked:
                    self.sacked_bytes -= ack - start
                    rest.sacked = True
                if rest.retransmitted:
                    self._watch_resent(ack, rest)  # under its new start
                break
            covered += 1
            if seg.sacked:
                self.sacked_bytes -= seg.end - start
            if seg.resent:
                karn = True
            else:
                rtt_sample = now - seg.sent_at  # the newest: least inflated by holes
        if sacked_before:
            self._runs.cut_below(ack)
        if ack < self._hint:
            self._sacked_below_hint -= sacked_before - self.sacked_bytes
        else:
            self._sacked_below_hint = 0  # nothing below the hint is left
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
        end = self.probe_end
        if end is not None and ack < end and not self.sack_ok:
            min_rtt = self.rtt.min_rtt
            # Sent after the probe arrived (within the clock's granularity): an ACK the
            # receiver sent before would have come back sooner.
            if min_rtt is not None and now - self.probe_sent_at >= min_rtt - self.rtt.granularity:
                self.probe_partial = True
        if self.in_recovery:
            if ack >= self.recovery_point:
                self.in_recovery = False
                self.recovery_after_rto = False
                for start in self.lost:
                    seg = segs[start]
                    if seg.lost and not seg.retransmitted and not seg.sacked:
                        self.lost_bytes -= seg.end - start
                    seg.lost = False
                self.lost.clear()
                self.rexmit_now = False
                # Segments below the hint may be neither lost nor SACKed now: the next
                # episode's IsLost starts from the left edge.
                self._reset_hint()
            elif not self.sack_ok and segs:
                # NewReno partial ACK (RFC 6582): the next hole is lost too, and is resent
                # at once.
                start, seg = segs.peekitem(0)
                if not seg.lost:
                    seg.lost = True
                    seg.retransmitted = False
                    if not seg.sacked:
                        self.lost_bytes += seg.end - start
                    self._lost().add(start)
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
        self.probe_end = None  # the loss is being repaired: the probe's episode is over
        self.mark_lost()
        if not self.lost and self.segments:  # dupacks without SACK: the first one is lost
            start, seg = self.segments.peekitem(0)
            self._mark_first_lost(start, seg)
            self._lost().add(start)
        self.rexmit_now = not self.sack_ok

    def mark_lost(self) -> None:
        """Mark unSACKed segments with enough SACKed data above them as lost (without SACK:
        the first segment)."""
        segs = self.segments
        if not self.sack_ok:
            if segs:
                start, seg = segs.peekitem(0)
                if not seg.lost and not seg.sacked:
                    self._mark_first_lost(start, seg)
                    self._lost().add(start)
            return
        lost = self._lost()
        # A retransmission older than something already SACKed (by more than a reordering
        # window of a quarter of the minimum RTT) was lost as well: send it again rather
        # than wait for the retransmission timer (RACK's rule, RFC 8985 6.2). The heap
        # gives the oldest first; the first one recent enough ends the search.
        min_rtt = self.rtt.min_rtt
        rack = self.rack_time - min_rtt / 4 if min_rtt is not None else -1.0
        resent = self._resent
        while resent and resent[0][0] < rack:
            sent_at, start = heappop(resent)
            cand = segs.get(start)
            if (
                cand is not None
                and cand.retransmitted
                and cand.lost
                and not cand.sacked
                and cand.sent_at == sent_at
            ):
                cand.retransmitted = False  # lost again: back in the queue to resend
                self.lost_bytes += cand.end - start
                lost.add(start)
        # IsLost (RFC 6675): more than (DupThresh - 1) * SMSS bytes SACKed above a segment,
        # that is fewer than ``budget`` SACKed below it. That holds for every segment
        # below some point, and the point only moves up as SACKs come (acknowledged
        # segments take their SACKed bytes away from below and above alike); the walk
        # resumes at the hint and stops at the first unSACKed segment it does not hold for.
        budget = self.sacked_bytes - (DUP_THRESH - 1) * self.mss
        below = self._sacked_below_hint
        if below >= budget:
            return
        hint = self._hint
        for start, seg in segs.items_from(hint):
            if seg.sacked:
                below += seg.end - start
            elif below >= budget:
                hint = start
                break
            elif not seg.retransmitted and not seg.lost:
                seg.lost = True
                self.lost_bytes += seg.end - start
                lost.add(start)
            hint = start + 1
        self._hint = hint
        self._sacked_below_hint = below

    def _mark_first_lost(self, start: int, seg: SentSegment) -> None:
        """Mark ``seg`` (the first segment) lost as the duplicate-ACK rules do, keeping its
        other flags; the caller queues it."""
        if not seg.lost:
            seg.lost = True
            if seg.retransmitted:
                self._watch_resent(start, seg)  # a retransmission now RACK may judge
            elif not seg.sacked:
                self.lost_bytes += seg.end - start

    # -- the tail loss probe (RFC 8985 section 7) -----------------------------------------
    def probe_timeout(self, one_segment: bool, delayed_ack: float) -> float:
        """The probe timeout (RFC 8985 7.2): twice the smoothed RTT (the initial RTO
        before any sample), at least :data:`MIN_PTO`; when one segment is in flight, plus
        ``delayed_ack``: its receiver may hold the ACK that long waiting for a second one.
        The caller keeps it from ending after the retransmission timeout."""
        srtt = self.rtt.srtt
        pto = self.rtt.base_rto if srtt is None else max(2 * srtt, MIN_PTO)
        if one_segment:
            pto += delayed_ack
        return pto

    def take_probe_resend(self, now: float) -> int | None:
        """The probe sends old data again: the start of the highest segment not SACKed
        (RFC 8985 7.3 resends the highest; one the receiver has already SACKed would tell
        nothing new), marked as sent again at ``now`` (Karn: never an RTT sample). None
        when every segment is SACKed.

        Outside recovery it is not ``retransmitted`` (nothing counts that outside an
        episode), so a later recovery's IsLost may still find it lost."""
        for start in reversed(self.segments):
            seg = self.segments[start]
            if not seg.sacked:
                seg.resent = True
                seg.sent_at = now
                return start
        return None

    def start_probe(self, start: int, snd_max: int, resent: bool, now: float) -> None:
        """A probe went at ``now`` (its segment starts at ``start``; ``snd_max`` after
        it): the episode lasts until an ACK reaches ``snd_max``, recovery starts, or the
        RTO fires."""
        self.probe_end = snd_max
        self.probe_start = start
        self.probe_resent = resent
        self.probe_sent_at = now
        self.probe_partial = False

    def probe_answered(self) -> bool:
        """Whether the answer to the probe shows a hole below it (the left edge did not
        reach it; the caller checks that).

        With SACK: the probe's segment is SACKed, so the receiver holds the newest data
        and lacks older: each unSACKed segment below it was sent a probe timeout (two
        round trips) or more before the probe, and its ACK is overdue by more than RACK's
        reordering window (RFC 8985 6.2).

        Without SACK: a duplicate ACK, or an ACK that moved the left edge (a receiver that
        held a delayed ACK sends it at once when a segment arrives out of order) a min RTT
        or more after the probe went. Nothing else sent then could have caused either:
        the episode began because no ACK came for a probe timeout."""
        if self.probe_end is None:
            return False
        if not self.sack_ok:
            return self.dupacks > 0 or self.probe_partial
        seg = self.segments.get(self.probe_start)
        return seg is not None and seg.sacked

    def enter_recovery_after_probe(self, snd_max: int) -> None:
        """The answer to a probe shows a hole below it: start fast recovery (the caller
        tells congestion control) with every unSACKed segment below the probe's marked lost
        (without SACK the duplicate ACK only tells of the first: NewReno's partial ACKs
        find the others). What RACK's time rule would conclude here: they were sent well
        before the probe that got through. Walks the segments below the probe once."""
        limit = self.probe_start
        self.enter_recovery(snd_max)
        if not self.sack_ok:
            return
        lost = self._lost()
        for start, seg in self.segments.items():
            if start >= limit:
                break
            if not seg.sacked and not seg.lost and not seg.retransmitted:
                seg.lost = True
                self.lost_bytes += seg.end - start
                lost.add(start)

    def probe_acked(self, ack: int) -> bool:
        """The cumulative ACK moved to ``ack``: end the probe's episode when it covers
        the probe. Returns True when the probe sent old data again and so (without DSACK,
        which our receivers do not send) either the original or the probe was lost: RFC
        8985 7.4 wants congestion control told of a loss then."""
        end = self.probe_end
        if end is None or ack < end:
            return False
        self.probe_end = None
        return self.probe_resent

    # -- timeouts and moves -------------------------------------------------------------
    def on_timeout(self, snd_max: int) -> None:
        """The retransmission timer expired: back off the RTO and presume everything lost,
        to be resent in order from the window start.

        SACKed data is included: the receiver may have reneged on it (RFC 2018 section 8,
        RFC 6675 section 5.1), and the segment at the left edge must go again in any case.
        """
        self.rtt.backoff()
        lost = self._lost()
        lost.clear()
        lost_bytes = 0
        for start, seg in self.segments.items():
            seg.sacked = False
            seg.lost = True
            seg.retransmitted = False
            lost_bytes += seg.end - start
            lost.add(start)
        self.sacked_bytes = 0
        self.lost_bytes = lost_bytes
        self._runs.clear()
        self._resent.clear()
        self._reset_hint()
        self.in_recovery = True
        self.recovery_after_rto = True
        self.recovery_point = snd_max
        self.probe_end = None  # the timeout took over from the probe
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
        self.probe_end = None  # what the old path's probe would tell is moot
        if self.segments:
            lost = self._lost()
            lost.clear()
            lost_bytes = 0
            for start, seg in self.segments.items():
                if not seg.sacked:
                    seg.lost = True
                    seg.retransmitted = False
                    lost_bytes += seg.end - start
                    lost.add(start)
            self.lost_bytes = lost_bytes
            # What is still resent is SACKed as well: no RACK candidate is left.
            self._resent.clear()
            self._reset_hint()
            self.in_recovery = True
            self.recovery_after_rto = True
            self.recovery_point = snd_max

    def forget(self) -> None:
        """Drop every segment (the subflow was given up and its data went elsewhere)."""
        self.segments.clear()
        self.lost.clear()
        self.sacked_bytes = 0
        self.lost_bytes = 0
        self.probe_end = None
        self._runs.clear()
        self._resent.clear()
        self._reset_hint()

    # -- the incremental state ----------------------------------------------------------
    def _lost(self) -> SortedList:
        """The lost-segment list, made on the first loss (until then the shared empty one,
        which must never be added to)."""
        lost = self.lost
        if lost is _NOTHING_LOST:
            lost = self.lost = SortedList()
        return lost

    def _sacked_runs(self) -> SackedRuns:
        """The SACKed runs, made on the first SACK (as :meth:`_lost`)."""
        runs = self._runs
        if runs is _NO_SACKED_RUNS:
            runs = self._runs = SackedRuns()
        return runs

    def _reset_hint(self) -> None:
        """IsLost starts again from the left edge."""
        self._hint = 0
        self._sacked_below_hint = 0

    def _watch_resent(self, start: int, seg: SentSegment) -> None:
        """``seg`` (at ``start``) was resent or became lost while resent: RACK may find it
        lost again. Only with SACK, the only case in which :meth:`mark_lost` looks."""
        if not self.sack_ok:
            return
        resent = self._resent
        heappush(resent, (seg.sent_at, start))
        if len(resent) > 2 * len(self.segments) + _RESENT_SLACK:
            self._rebuild_resent()

    def _rebuild_resent(self) -> None:
        """The heap of RACK's candidates from the scoreboard (O(window), amortised over
        the entries pushed since the last rebuild)."""
        if not self.sack_ok or not self.segments:  # (nothing sent yet: the handshake's call)
            self._resent = []
            return
        self._resent = resent = [
            (seg.sent_at, start)
            for start, seg in self.segments.items()
            if seg.retransmitted and seg.lost and not seg.sacked
        ]
        heapify(resent)

    def _check(self, snd_una: int, snd_max: int) -> None:
        """Recompute every running count and structure by scanning the scoreboard and raise
        AssertionError where they differ (for tests; O(window))."""
        items = self.segments.items()
        assert sum(seg.end - s for s, seg in items) == snd_max - snd_una
        assert self.sacked_bytes == sum(seg.end - s for s, seg in items if seg.sacked)
        pending = [s for s, seg in items if seg.lost and not seg.retransmitted and not seg.sacked]
        assert self.lost_bytes == sum(self.segments[s].end - s for s in pending)
        queued = list(self.lost)
        assert set(pending) <= set(queued)
        # Each start once, and only while its segment is here: an ACK that removes a
        # segment takes out one entry.
        assert len(set(queued)) == len(queued)
        assert all(s in self.segments for s in queued)
        if self.sack_ok:
            # RACK's rule queues a resent segment again, so none may be queued still.
            # (Without SACK the duplicate-ACK rules may queue a resent first segment:
            # ``take_lost`` passes over it, and nothing queues it a second time.)
            assert not any(self.segments[s].retransmitted for s in queued)
        runs: list[tuple[int, int]] = []
        for s, seg in items:
            if seg.sacked:
                if runs and runs[-1][1] == s:
                    runs[-1] = (runs[-1][0], seg.end)
                else:
                    runs.append((s, seg.end))
        assert self._runs.ranges() == runs
        assert self._sacked_below_hint == sum(
            seg.end - s for s, seg in items if seg.sacked and s < self._hint
        )
        for s, seg in items:
            if s >= self._hint:
                break
            assert seg.sacked or seg.lost or seg.retransmitted
        if self.sack_ok:
            entries = set(self._resent)
            for s, seg in items:
                if seg.retransmitted and seg.lost and not seg.sacked:
                    assert (seg.sent_at, s) in entries

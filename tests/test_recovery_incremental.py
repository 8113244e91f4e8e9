"""Loss recovery's running counts and hints against a brute-force model that scans.

:class:`~pyserval.transport.recovery.Recovery` keeps what RFC 6675 defines by scanning the
scoreboard (pipe, IsLost, the segments a SACK block covers, RACK's lost retransmissions)
as running counts, a resume point and a heap, so that an ACK costs what it newly tells.
The model here is the definition written out plainly: a list of segments, every rule a
scan over the whole list on every call. Random sequences of sends, SACK blocks,
cumulative and duplicate ACKs, loss episodes, retransmissions, timeouts and path changes
drive both, and after every step every segment's flags, the resend queue, the counts and
every answer must be equal; ``Recovery._check`` also recomputes its own structures.

Plus the pieces on their own: :class:`~pyserval.transport.scoreboard.SackedRuns` against a
set of offsets, and a window of 5,800 segments where an ACK must not visit the SACKed ones
again (counted, not timed).
"""

from __future__ import annotations

from bisect import insort

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyserval.transport.recovery import Recovery, SentSegment
from pyserval.transport.rtt import RttEstimator
from pyserval.transport.scoreboard import SackedRuns

MSS = 1000
THRESH = 3  # RFC 6675 DupThresh, written out again rather than imported


class Seg:
    """One segment of the model."""

    def __init__(self, start: int, end: int, sent_at: float) -> None:
        self.start = start
        self.end = end
        self.sent_at = sent_at
        self.retransmitted = False
        self.resent = False
        self.sacked = False
        self.lost = False

    def row(self) -> tuple[int, int, float, bool, bool, bool, bool]:
        return (
            self.start,
            self.end,
            self.sent_at,
            self.sacked,
            self.lost,
            self.retransmitted,
            self.resent,
        )


class Model:
    """RFC 6675 loss recovery (with the RACK rule, Karn and the duplicate-ACK rules as the
    sender implements them) by scanning a plain list on every call."""

    def __init__(self, sack_ok: bool) -> None:
        self.sack_ok = sack_ok
        self.segs: list[Seg] = []
        self.lost: list[int] = []  # sorted, as the SortedList is
        self.rtt = RttEstimator(1.0, 0.2, 60.0)
        self.una = 0
        self.snd_max = 0
        self.rack_time = 0.0
        self.dupacks = 0
        self.dup_segments = 0
        self.rexmit_now = False
        self.in_recovery = False
        self.after_rto = False
        self.point = 0

    def find(self, start: int) -> Seg:
        return next(s for s in self.segs if s.start == start)

    def drop(self, start: int) -> None:
        if start in self.lost:
            self.lost.remove(start)

    def sacked_bytes(self) -> int:
        return sum(s.end - s.start for s in self.segs if s.sacked)

    def pipe(self) -> int:
        if not self.in_recovery:
            pipe = self.snd_max - self.una - self.sacked_bytes()
        else:
            pipe = 0
            for s in self.segs:
                if not s.sacked and (not s.lost or s.retransmitted):
                    pipe += s.end - s.start
        if self.dup_segments:
            pipe = max(pipe - self.dup_segments * MSS, 0)
        return pipe

    def send(self, n: int, now: float) -> None:
        self.segs.append(Seg(self.snd_max, self.snd_max + n, now))
        self.snd_max += n

    def sack(self, blocks: list[tuple[int, int]], now: float) -> int:
        before = self.sacked_bytes()
        min_rtt = self.rtt.min_rtt
        for left, right in blocks:
            if right <= left or left < self.una or right > self.snd_max:
                continue
            for s in self.segs:
                if left <= s.start < right and s.end <= right and not s.sacked:
                    s.sacked = True
                    late = s.resent and (min_rtt is None or now - s.sent_at < min_rtt)
                    if s.sent_at > self.rack_time and not late:
                        self.rack_time = s.sent_at
                    if s.lost:
                        self.drop(s.start)
        return self.sacked_bytes() - before

    def ack(self, ack: int, now: float) -> float | None:
        sample: float | None = None
        karn = False
        covered = 0
        kept: list[Seg] = []
        for s in self.segs:
            if s.start >= ack:
                kept.append(s)
                continue
            if s.lost:
                self.drop(s.start)
            if s.end > ack:
                rest = Seg(ack, s.end, s.sent_at)
                rest.retransmitted, rest.lost, rest.resent = s.retransmitted, s.lost, s.resent
                rest.sacked = s.sacked
                if rest.lost and not rest.retransmitted and not rest.sacked:
                    insort(self.lost, ack)  # awaiting its resend, as the whole one was
                kept.append(rest)
                continue
            covered += 1
            if s.resent:
                karn = True
            else:
                sample = now - s.sent_at
        self.segs = kept
        self.una = ack
        if sample is not None and not karn:
            self.rtt.sample(sample)
        else:
            self.rtt.clear_backoff()
        self.dupacks = 0
        if self.dup_segments:
            left = max(min(self.dup_segments - covered + 1, len(self.segs) - 1), 0)
            if self.in_recovery and ack < self.point:
                self.dup_segments = left
            elif self.in_recovery and not self.after_rto and left >= THRESH:
                self.dup_segments = left
                self.dupacks = left
            else:
                self.dup_segments = 0
        if self.in_recovery:
            if ack >= self.point:
                self.in_recovery = False
                self.after_rto = False
                for start in self.lost:
                    self.find(start).lost = False
                self.lost = []
                self.rexmit_now = False
            elif not self.sack_ok and self.segs:
                first = self.segs[0]
                if not first.lost:
                    first.lost = True
                    first.retransmitted = False
                    insort(self.lost, first.start)
                    self.rexmit_now = not self.after_rto
        return sample

    def duplicate_ack(self) -> None:
        self.dupacks += 1
        if not self.sack_ok and not self.after_rto:
            self.dup_segments = min(self.dup_segments + 1, max(len(self.segs) - 1, 0))

    def dup_thresh(self, can_send_new: bool) -> int:
        oseg = len(self.segs)
        if self.sack_ok or oseg > THRESH or oseg < 2 or can_send_new:
            return THRESH
        return oseg - 1

    def first_lost(self) -> bool:
        if not self.segs or self.segs[0].sacked:
            return False
        total = self.sacked_bytes()
        return total > 0 and total > (THRESH - 1) * MSS

    def enter_recovery(self) -> None:
        self.in_recovery = True
        self.after_rto = False
        self.point = self.snd_max
        self.mark_lost()
        if not self.lost and self.segs:
            self.segs[0].lost = True
            insort(self.lost, self.segs[0].start)
        self.rexmit_now = not self.sack_ok

    def mark_lost(self) -> None:
        if not self.sack_ok:
            if self.segs:
                first = self.segs[0]
                if not first.lost and not first.sacked:
                    first.lost = True
                    insort(self.lost, first.start)
            return
        min_rtt = self.rtt.min_rtt
        rack = self.rack_time - min_rtt / 4 if min_rtt is not None else -1.0
        for s in self.segs:
            above = sum(o.end - o.start for o in self.segs if o.sacked and o.start > s.start)
            if s.sacked:
                continue
            if s.retransmitted:
                if s.sent_at < rack and s.lost:
                    s.retransmitted = False
                    insort(self.lost, s.start)
            elif above > (THRESH - 1) * MSS and not s.lost:
                s.lost = True
                insort(self.lost, s.start)

    def take_lost(self, pipe: int, cwnd: int, now: float) -> int | None:
        while self.lost:
            start = self.lost[0]
            s = self.find(start)
            if s.retransmitted or s.sacked:
                self.lost.pop(0)
                continue
            if pipe > 0 and pipe + (s.end - start) > cwnd and not self.rexmit_now:
                return None
            self.rexmit_now = False
            s.retransmitted = True
            s.resent = True
            s.sent_at = now
            self.lost.pop(0)
            return start
        return None

    def timeout(self) -> None:
        self.rtt.backoff()
        for s in self.segs:
            s.sacked = False
            s.lost = True
            s.retransmitted = False
        self.lost = [s.start for s in self.segs]
        self.in_recovery = True
        self.after_rto = True
        self.point = self.snd_max
        self.dupacks = self.dup_segments = 0
        self.rexmit_now = False

    def path_change(self) -> None:
        self.rtt.clear_backoff()
        self.dupacks = self.dup_segments = 0
        self.rexmit_now = False
        if self.segs:
            for s in self.segs:
                if not s.sacked:
                    s.lost = True
                    s.retransmitted = False
            self.lost = [s.start for s in self.segs if not s.sacked]
            self.in_recovery = True
            self.after_rto = True
            self.point = self.snd_max


def same(rec: Recovery, model: Model) -> None:
    """Everything the model defines, compared; and the recovery's own consistency check."""
    got = [
        (s, seg.end, seg.sent_at, seg.sacked, seg.lost, seg.retransmitted, seg.resent)
        for s, seg in rec.segments.items()
    ]
    assert got == [s.row() for s in model.segs]
    assert list(rec.lost) == model.lost
    assert rec.sacked_bytes == model.sacked_bytes()
    assert rec.lost_bytes == sum(
        s.end - s.start for s in model.segs if s.lost and not s.retransmitted and not s.sacked
    )
    assert rec.pipe(model.una, model.snd_max) == model.pipe()
    assert rec.first_lost() == model.first_lost()
    for flag in (False, True):
        assert rec.dup_thresh(flag) == model.dup_thresh(flag)
    assert rec.rack_time == model.rack_time
    assert (rec.dupacks, rec.dup_segments, rec.rexmit_now) == (
        model.dupacks,
        model.dup_segments,
        model.rexmit_now,
    )
    assert (rec.in_recovery, rec.recovery_after_rto) == (model.in_recovery, model.after_rto)
    if rec.in_recovery:
        assert rec.recovery_point == model.point
    assert (rec.rtt.srtt, rec.rtt.min_rtt, rec.rtt.rto) == (
        model.rtt.srtt,
        model.rtt.min_rtt,
        model.rtt.rto,
    )
    rec._check(model.una, model.snd_max)


OPS = ("send", "send", "send", "ack", "ack", "ack", "ack", "rexmit", "rexmit", "tick", "tick")
RARE = ("sack", "cut", "part", "dup", "mark", "rto", "move", "reset_rtt")
step = st.tuples(
    st.sampled_from(OPS + RARE),
    st.integers(0, 1 << 30),
    st.integers(0, 1 << 30),
    st.integers(0, 1 << 30),
)


def offset(model: Model, pick: int, exact: bool) -> int:
    """A sequence offset in [una, snd_max]: a segment boundary, or any byte when not
    ``exact``."""
    if not exact:
        return model.una + pick % (model.snd_max - model.una + 1)
    bounds = [s.start for s in model.segs] + [model.snd_max]
    return bounds[pick % len(bounds)]


class Receiver:
    """What the peer holds, as merged byte ranges; it answers with the cumulative ACK
    and SACK blocks for the ranges above it."""

    def __init__(self) -> None:
        self.ranges: list[list[int]] = []

    def deliver(self, start: int, end: int) -> None:
        self.ranges.append([start, end])
        self.ranges.sort()
        merged: list[list[int]] = []
        for s, e in self.ranges:
            if merged and s <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], e)
            else:
                merged.append([s, e])
        self.ranges = merged

    def answer(self, pick: int) -> tuple[int, list[tuple[int, int]]]:
        """The cumulative ACK and up to three blocks above it, chosen and ordered by
        ``pick``."""
        ack = self.ranges[0][1] if self.ranges and self.ranges[0][0] == 0 else 0
        above = [(s, e) for s, e in self.ranges if s > ack]
        blocks: list[tuple[int, int]] = []
        while above and len(blocks) < 3:
            blocks.append(above.pop(pick % len(above)))
            pick //= 7
        return ack, blocks


def handle_ack(
    rec: Recovery, model: Model, ack: int, blocks: list[tuple[int, int]], now: float
) -> None:
    """One ACK with SACK blocks, handled as :meth:`Subflow._on_ack` does."""
    sack_ok = model.sack_ok
    newly = 0
    if sack_ok:
        newly = rec.on_sack(blocks, model.una, model.snd_max, now)
        assert newly == model.sack(blocks, now)
    if ack > model.una:
        assert rec.on_ack(ack, now) == model.ack(ack, now)
    elif ack == model.una and model.snd_max > model.una and (not sack_ok or newly > 0):
        rec.on_duplicate_ack()
        model.duplicate_ack()
    if model.snd_max > model.una and not model.in_recovery:
        if (model.dupacks and model.dupacks >= model.dup_thresh(False)) or (
            sack_ok and model.first_lost()
        ):
            rec.enter_recovery(model.snd_max)
            model.enter_recovery()
    elif model.in_recovery and sack_ok:
        rec.mark_lost()
        model.mark_lost()


def run(sack_ok: bool, steps: list[tuple[str, int, int, int]]) -> Recovery:
    """Drive a recovery and the model by ``steps``, comparing them after each; returns the
    recovery."""
    rec = Recovery(RttEstimator(1.0, 0.2, 60.0), MSS, sack_ok)
    model = Model(sack_ok)
    peer = Receiver()
    now = 0.0
    for op, a, b, c in steps:
        if op == "send":  # as a subflow sends: a run of full segments, the last maybe short
            count = 1 + a % 12
            short = b % 3 == 0
            end = model.snd_max + count * MSS - (c % MSS if short else 0)
            rec.on_sent_run(model.snd_max, end, MSS, False, now)
            for i, start in enumerate(range(model.snd_max, end, MSS)):
                model.send(min(MSS, end - start), now)
                if (b >> 2 + 2 * i) % 4:  # a quarter of them are lost on the way
                    peer.deliver(start, min(start + MSS, end))
        elif op == "tick":
            now += (a % 50) / 1000
        elif model.snd_max == model.una:
            continue
        elif op == "ack":  # the peer's answer to what it holds
            now += (a % 5) / 1000
            ack, blocks = peer.answer(b)
            handle_ack(rec, model, min(ack, model.snd_max), blocks, now)
        elif op == "rexmit":  # the send path: resend while the window has room
            cwnd = (a % 40) * MSS
            for i in range(1 + b % 4):
                pipe = model.pipe()
                assert rec.pipe(model.una, model.snd_max) == pipe
                got = rec.take_lost(pipe, cwnd, now)
                assert got == model.take_lost(pipe, cwnd, now)
                if got is None:
                    break
                if (c >> 2 * i) % 4:  # a quarter of the retransmissions are lost too
                    seg = model.find(got)
                    peer.deliver(seg.start, seg.end)
        elif op == "sack":  # blocks anywhere: unaligned, reversed, overlapping, stale
            blocks = []
            for i in range(1 + c % 3):
                exact = (b >> i) % 4 != 0
                x = offset(model, a >> (8 * i), exact)
                y = offset(model, b >> (8 * i), exact)
                blocks.append((min(x, y), max(x, y)) if (c >> 4 + i) % 8 else (y, x))
            if (c >> 8) % 4 == 0:
                blocks.append((model.una - 500, model.una + 500))  # stale: ignored
            now += 0.001
            handle_ack(rec, model, model.una, blocks, now)
        elif op == "cut":  # a cumulative ACK anywhere, inside a segment too
            ack = offset(model, a, b % 3 != 0)
            if ack > model.una:
                now += 0.001
                assert rec.on_ack(ack, now) == model.ack(ack, now)
        elif op == "part":  # a cumulative ACK inside the first segment
            first = model.segs[0]
            if first.end - first.start > 1:
                ack = first.start + 1 + a % (first.end - first.start - 1)
                now += 0.001
                assert rec.on_ack(ack, now) == model.ack(ack, now)
        elif op == "dup":
            rec.on_duplicate_ack()
            model.duplicate_ack()
            if not model.in_recovery and model.dupacks >= model.dup_thresh(a % 2 == 0):
                rec.enter_recovery(model.snd_max)
                model.enter_recovery()
        elif op == "mark":
            rec.mark_lost()
            model.mark_lost()
        elif op == "rto":
            rec.on_timeout(model.snd_max)
            model.timeout()
        elif op == "move":
            rec.on_path_change(model.snd_max)
            model.path_change()
        elif op == "reset_rtt":  # a migration forgets the path's RTT, min RTT included
            rec.rtt.reset()
            model.rtt.reset()
        same(rec, model)
    return rec


@settings(max_examples=400, deadline=None)
@given(st.booleans(), st.lists(step, min_size=10, max_size=100))
def test_running_counts_and_hints_match_a_model_that_scans(
    sack_ok: bool, steps: list[tuple[str, int, int, int]]
) -> None:
    run(sack_ok, steps)


def test_a_loss_episode_with_a_lost_retransmission_matches_the_model() -> None:
    # A fixed sequence through RACK's rule: a burst lost, its retransmissions lost again
    # and found by the SACKs of data sent after them.
    delivered = sum(1 << (2 + 2 * i) for i in range(12))  # every segment of a send arrives
    first5_lost = sum(1 << (2 + 2 * i) for i in range(5, 12))
    steps: list[tuple[str, int, int, int]] = [
        ("send", 0, delivered, 0),
        ("tick", 10, 0, 0),
        ("ack", 0, 0, 0),  # an RTT sample: min RTT 10 ms, reordering window 2.5 ms
        ("send", 11, first5_lost, 0),
        ("send", 11, delivered, 0),
        ("tick", 10, 0, 0),
        ("ack", 0, 0, 0),
        ("ack", 0, 0, 0),  # enough SACKed: the five are lost
        ("rexmit", 39, 3, 0),  # four resent, each lost again (c = 0)
        ("part", 499, 0, 0),  # half of the first one acknowledged: the rest is resent
        ("tick", 20, 0, 0),
        ("send", 2, delivered, 0),
        ("ack", 0, 0, 0),  # SACKs data sent 20 ms after the resends: RACK
        ("rexmit", 39, 3, 0),  # resent again at 40 ms
    ]
    rec = run(True, steps)
    # Only RACK's rule sends a retransmission again before the timer: the four went twice
    # (the first one's second half, what the cumulative ACK left of it).
    assert rec.segments.first_key_from(0) == 1500
    starts = [1500, 2000, 3000, 4000]
    # 10 + 10 + 20 ms of ticks and 1 ms for the partial ACK.
    assert [rec.segments[k].sent_at for k in starts] == [pytest.approx(0.041)] * 4


# -- SackedRuns on its own ---------------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 40), st.integers(1, 4)), max_size=60))
def test_sacked_runs_hold_exactly_the_ranges_added(ops: list[tuple[bool, int, int]]) -> None:
    runs = SackedRuns()
    covered: set[int] = set()
    for add, at, n in ops:
        if add:
            span = set(range(at, at + n))
            if span & covered:
                continue  # the caller adds only what no run holds
            runs.add(at, at + n)
            covered |= span
        else:
            runs.cut_below(at)
            covered = {x for x in covered if x >= at}
        # Maximal runs of the covered offsets, worked out from the set.
        want: list[tuple[int, int]] = []
        for x in sorted(covered):
            if want and want[-1][1] == x:
                want[-1] = (want[-1][0], x + 1)
            else:
                want.append((x, x + 1))
        assert runs.ranges() == want
        for x in range(0, 50):
            end = next((e for s, e in want if s <= x < e), x)
            assert runs.skip(x) == end


# -- what an ACK costs --------------------------------------------------------------------
class CountingSegment(SentSegment):
    """A segment that counts how often its SACKed flag is read."""

    reads = 0

    @property
    def sacked(self) -> bool:
        CountingSegment.reads += 1
        return self._sacked

    @sacked.setter
    def sacked(self, value: bool) -> None:
        self._sacked = value

    __slots__ = ("_sacked",)


@pytest.mark.parametrize("window", [500, 5800])
def test_an_ack_in_recovery_does_not_revisit_the_window(window: int) -> None:
    # 8 MiB of 1,408-byte segments is about 5,800: the first 300 lost, the rest SACKed one
    # ACK at a time. The flags read per ACK must not grow with the window (before the
    # running counts, pipe, IsLost and each SACK block read every segment on every ACK).
    rec = Recovery(RttEstimator(1.0, 0.2, 60.0), MSS, True)
    for i in range(window):
        rec.segments[i * MSS] = CountingSegment((i + 1) * MSS, 0.0, False)
    snd_max = window * MSS
    reads = []
    for top in range(301, window + 1):
        CountingSegment.reads = 0
        rec.on_sack([(300 * MSS, top * MSS)], 0, snd_max, now=0.1)
        if rec.in_recovery:
            rec.mark_lost()
        elif rec.first_lost():
            rec.enter_recovery(snd_max)
        rec.pipe(0, snd_max)
        reads.append(CountingSegment.reads)
    rec._check(0, snd_max)
    assert rec.lost_bytes == 300 * MSS and list(rec.lost) == [i * MSS for i in range(300)]
    # The first ACKs after the hole pass the lost segments once; from then on a few reads
    # per ACK, whatever the window.
    assert max(reads[10:]) <= 8
    assert sum(reads) <= 3 * window + 600

"""Loss recovery on its own (``transport.recovery``): made-up segments and ACKs, no
connection. Expectations come from the RFCs worked by hand (RFC 6298's RTO, RFC 6675's
IsLost and pipe, RFC 6582's partial ACKs, RFC 3042 and RFC 5827) and, for the scoreboard,
from a brute-force model that tracks every segment in a plain list."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyserval.transport.recovery import DUP_THRESH, Recovery
from pyserval.transport.rtt import RttEstimator

MSS = 1000


def make(sack: bool = True, *, min_rto: float = 0.2, max_rto: float = 60.0) -> Recovery:
    """A recovery with 1000-byte segments and a 1 s initial RTO."""
    return Recovery(RttEstimator(1.0, min_rto, max_rto), MSS, sack)


def send(rec: Recovery, n: int, now: float = 0.0, first: int = 0) -> int:
    """Send ``n`` full segments from offset ``first``; returns the new snd_max."""
    for i in range(n):
        start = first + i * MSS
        rec.on_sent(start, start + MSS, False, now)
    return first + n * MSS


def lost_starts(rec: Recovery) -> list[int]:
    return list(rec.lost)


# -- RTT and RTO (RFC 6298) -------------------------------------------------------------
def test_first_rtt_sample_sets_srtt_rttvar_and_rto_as_rfc6298_2_2() -> None:
    rec = make()
    send(rec, 1, now=0.0)
    assert rec.rtt.rto == 1.0  # 2.1: the initial RTO before any sample
    rec.on_ack(MSS, now=0.1)
    # SRTT = R = 0.1, RTTVAR = R/2 = 0.05, RTO = SRTT + max(G, 4 * RTTVAR) = 0.3
    assert rec.rtt.srtt == pytest.approx(0.1)
    assert rec.rtt.rttvar == pytest.approx(0.05)
    assert rec.rtt.rto == pytest.approx(0.3)


def test_second_rtt_sample_follows_rfc6298_2_3() -> None:
    rec = make()
    send(rec, 1, now=0.0)
    rec.on_ack(MSS, now=0.1)
    send(rec, 1, now=0.1, first=MSS)
    rec.on_ack(2 * MSS, now=0.3)  # R' = 0.2
    # RTTVAR = 3/4 * 0.05 + 1/4 * |0.1 - 0.2| = 0.0625; SRTT = 7/8 * 0.1 + 1/8 * 0.2 = 0.1125
    # RTO = 0.1125 + 4 * 0.0625 = 0.3625
    assert rec.rtt.rttvar == pytest.approx(0.0625)
    assert rec.rtt.srtt == pytest.approx(0.1125)
    assert rec.rtt.rto == pytest.approx(0.3625)


@settings(max_examples=300)
@given(
    st.lists(st.floats(-0.01, 5.0, allow_nan=False), min_size=1, max_size=12),
    st.floats(0.01, 1.0),
    st.floats(1.0, 120.0),
)
def test_rtt_samples_follow_rfc6298_exactly(
    samples: list[float], min_rto: float, max_rto: float
) -> None:
    # RFC 6298 2.2 and 2.3 written as the RFC states them (max, min), sample by sample:
    # the estimator (which compares instead of calling min() and max()) gives the very
    # same floats.
    est = RttEstimator(1.0, min_rto, max_rto)
    srtt: float | None = None
    rttvar = 0.0
    low: float | None = None
    for r in samples:
        est.sample(r)
        r = max(r, 0.0)
        low = r if low is None else min(low, r)
        if srtt is None:
            srtt, rttvar = r, r / 2
        else:
            rttvar = 3 / 4 * rttvar + 1 / 4 * abs(srtt - r)
            srtt = 7 / 8 * srtt + 1 / 8 * r
        rto = min(max(srtt + max(0.001, 4 * rttvar), min_rto), max_rto)
        assert (est.srtt, est.rttvar, est.min_rtt, est.latest) == (srtt, rttvar, low, r)
        assert est.base_rto == rto and est.rto == rto


def test_rto_is_never_below_the_configured_minimum() -> None:
    rec = make(min_rto=0.2)
    send(rec, 1, now=0.0)
    rec.on_ack(MSS, now=0.001)  # 0.001 + max(0.001, 0.002) = 0.003: raised to 0.2 (2.4)
    assert rec.rtt.rto == pytest.approx(0.2)


def test_timeouts_double_the_rto_up_to_the_maximum_and_an_ack_undoes_it() -> None:
    rec = make(max_rto=1.0)
    send(rec, 2, now=0.0)
    rec.on_ack(MSS, now=0.1)  # RTO 0.3
    rec.on_timeout(2 * MSS)
    assert rec.rtt.rto == pytest.approx(0.6)  # 5.5: back off the timer
    rec.on_timeout(2 * MSS)
    assert rec.rtt.rto == pytest.approx(1.0)  # 1.2, held at the maximum
    start = rec.take_lost(0, 10 * MSS, now=5.0)
    assert start == MSS
    rec.on_ack(2 * MSS, now=5.1)  # acknowledges the retransmission: no sample (Karn)
    assert rec.rtt.srtt == pytest.approx(0.1)
    assert rec.rtt.rto == pytest.approx(0.3)  # but the backoff is gone


def test_karn_no_sample_from_an_ack_that_covers_a_retransmission() -> None:
    rec = make()
    snd_max = send(rec, 3, now=0.0)
    rec.on_timeout(snd_max)
    assert rec.take_lost(0, 10 * MSS, now=2.0) == 0  # resent at 2.0
    rec.on_sent(snd_max, snd_max + MSS, False, 2.5)  # new data, sent once
    # Covers the resent segment and (not yet) nothing else: no sample, no value.
    assert rec.on_ack(MSS, now=2.1) is None
    assert rec.rtt.srtt is None
    # Covers resent segments and the fresh one: still no RTT sample (Karn, as Linux
    # extends it), but congestion control gets the fresh segment's time.
    for _ in range(2):
        rec.take_lost(0, 10 * MSS, now=3.0)
    assert rec.on_ack(snd_max + MSS, now=3.0) == pytest.approx(0.5)
    assert rec.rtt.srtt is None


# -- SACK: the scoreboard, IsLost and pipe (RFC 6675) ---------------------------------------
def test_a_block_sacks_only_the_segments_wholly_inside_it() -> None:
    rec = make()
    snd_max = send(rec, 4)
    assert rec.on_sack([(1500, 3000)], 0, snd_max, now=0.1) == MSS
    assert [s for s, seg in rec.segments.items() if seg.sacked] == [2000]
    assert rec.sacked_bytes == MSS
    assert rec.on_sack([(1500, 3000)], 0, snd_max, now=0.1) == 0  # nothing new


def test_a_partial_ack_of_a_sacked_segment_keeps_the_rest_sacked() -> None:
    rec = make()
    rec.on_sent(0, 1000, False, 0.0)
    rec.on_sent(1000, 3000, False, 0.0)  # one 2000-byte segment
    rec.on_sack([(1000, 3000)], 0, 3000, now=0.1)
    rec.on_ack(1500, now=0.2)  # the ACK ends inside it
    assert [(s, seg.end, seg.sacked) for s, seg in rec.segments.items()] == [(1500, 3000, True)]
    assert rec.sacked_bytes == 1500


@pytest.mark.parametrize(
    "block",
    [(0, 0), (2000, 1000), (0 - MSS, 2000), (2000, 5000)],
    ids=["empty", "reversed", "below_snd_una", "above_snd_max"],
)
def test_stale_or_bogus_blocks_change_nothing(block: tuple[int, int]) -> None:
    rec = make()
    snd_max = send(rec, 4)
    assert rec.on_sack([block], 0, snd_max, now=0.1) == 0
    assert rec.sacked_bytes == 0


def test_is_lost_needs_more_than_dupthresh_minus_one_segments_sacked_above() -> None:
    rec = make()
    snd_max = send(rec, 10)
    rec.on_sack([(1000, 3000)], 0, snd_max, now=0.1)  # 2 * SMSS above: not yet
    assert not rec.first_lost()
    rec.on_sack([(1000, 4000)], 0, snd_max, now=0.1)  # 3 * SMSS > (3 - 1) * SMSS
    assert rec.first_lost()


def test_entering_recovery_marks_exactly_the_segments_rfc6675_calls_lost() -> None:
    # Ten segments; the receiver holds the 4th, 6th, 8th and 10th. SACKed bytes above each
    # hole: 0-2: 4000, 4: 3000, 6: 2000, 8: 1000. IsLost: more than 2000 above.
    rec = make()
    snd_max = send(rec, 10)
    blocks = [(3000, 4000), (5000, 6000), (7000, 8000), (9000, 10000)]
    rec.on_sack(blocks, 0, snd_max, now=0.1)
    assert rec.pipe(0, snd_max) == 6000  # outside recovery: 10 segments - 4 SACKed
    rec.enter_recovery(snd_max)
    assert lost_starts(rec) == [0, 1000, 2000, 4000]
    assert not rec.rexmit_now  # with SACK, retransmissions wait for room in the window
    # SetPipe: unSACKed and not lost (6000, 8000) count once; lost ones not until resent.
    assert rec.pipe(0, snd_max) == 2000
    assert rec.take_lost(2000, 2500, now=0.2) is None  # 2000 + 1000 > cwnd 2500
    assert rec.take_lost(2000, 3000, now=0.2) == 0
    assert rec.pipe(0, snd_max) == 3000  # a retransmitted segment counts again
    assert lost_starts(rec) == [1000, 2000, 4000]


def test_a_sacked_lost_segment_leaves_the_resend_queue() -> None:
    rec = make()
    snd_max = send(rec, 6)
    rec.on_sack([(1000, 6000)], 0, snd_max, now=0.1)
    rec.enter_recovery(snd_max)
    assert lost_starts(rec) == [0]
    rec.on_sack([(0, 1000)], 0, snd_max, now=0.2)
    assert lost_starts(rec) == []
    assert rec.take_lost(0, 100 * MSS, now=0.3) is None


def test_recovery_ends_when_the_recovery_point_is_acknowledged() -> None:
    rec = make()
    snd_max = send(rec, 6)
    rec.on_sack([(1000, 5000)], 0, snd_max, now=0.1)
    rec.enter_recovery(snd_max)
    send(rec, 2, first=snd_max)  # sent during recovery: beyond the recovery point
    rec.on_ack(5000, now=0.3)
    assert rec.in_recovery  # below the point (6000)
    rec.on_ack(snd_max, now=0.4)
    assert not rec.in_recovery
    assert lost_starts(rec) == [] and not any(seg.lost for seg in rec.segments.values())


def test_a_resent_segment_older_than_a_sacked_one_is_lost_again() -> None:
    # RACK (RFC 8985 6.2): a retransmission sent more than a reordering window (a quarter of
    # the minimum RTT) before a segment that was SACKed since was lost too.
    def scenario(new_sent_at: float) -> list[int]:
        rec = make()
        send(rec, 1, now=0.0)
        rec.on_ack(MSS, now=0.1)  # min RTT 0.1: reordering window 0.025
        snd_max = send(rec, 5, now=0.2, first=MSS)
        rec.on_sack([(2000, 6000)], MSS, snd_max, now=0.3)
        rec.enter_recovery(snd_max)
        assert rec.take_lost(0, 100 * MSS, now=1.0) == MSS  # resent at 1.0
        rec.on_sent(snd_max, snd_max + MSS, False, new_sent_at)
        rec.on_sack([(2000, snd_max + MSS)], MSS, snd_max + MSS, now=new_sent_at + 0.1)
        rec.mark_lost()
        return lost_starts(rec)

    assert scenario(1.1) == [MSS]  # sent 0.1 after the resend, SACKed: resend it again
    assert scenario(1.02) == []  # within the reordering window: wait


@pytest.mark.parametrize("last_ack", [2000, 3000])
def test_an_ack_inside_a_resent_segment_queues_its_rest_once(last_ack: int) -> None:
    # Found by the model test: a cumulative ACK inside a segment already resent kept the
    # rest in the resend queue, and RACK's rule, finding the rest lost again on the same
    # ACK, queued it a second time. The ACK that then covered the rest took out one entry:
    # the other named a segment no longer in the scoreboard, a KeyError when the recovery
    # point was reached (on_ack) or when the queue was next read (take_lost). The peer's
    # ACKs, fed in as a subflow does: on_sack, on_ack, mark_lost.
    rec = make()
    send(rec, 1, now=0.0)
    rec.on_ack(MSS, now=0.1)  # min RTT 0.1: reordering window 0.025
    snd_max = send(rec, 2, now=0.2, first=MSS)
    rec.on_timeout(snd_max)
    assert rec.take_lost(0, 10 * MSS, now=1.0) == 1000
    assert rec.take_lost(MSS, 10 * MSS, now=1.1) == 2000
    # One ACK: the left edge one byte into the first resend, the second resend SACKed (a
    # min RTT after it went: its send time counts, RFC 8985 6.2).
    rec.on_sack([(2000, 3000)], MSS, snd_max, now=1.3)
    rec.on_ack(1001, now=1.3)
    rec.mark_lost()
    # [1001, 2000) went at 1.0, more than the reordering window before the SACKed 1.1:
    # lost again, and awaiting its resend once.
    assert lost_starts(rec) == [1001]
    assert rec.lost_bytes == 999
    rec._check(1001, snd_max)
    # The peer acknowledges the rest after all: nothing is left to resend, and at the
    # recovery point (3000) the episode is over.
    rec.on_ack(last_ack, now=1.4)
    rec._check(last_ack, snd_max)
    assert lost_starts(rec) == [] and rec.lost_bytes == 0
    assert rec.take_lost(0, 10 * MSS, now=1.5) is None
    assert rec.in_recovery == (last_ack < snd_max)


def test_timeout_presumes_everything_lost_sacked_data_included() -> None:
    rec = make()
    snd_max = send(rec, 5)
    rec.on_sack([(2000, 4000)], 0, snd_max, now=0.1)
    rec.on_timeout(snd_max)
    assert rec.sacked_bytes == 0  # the receiver may renege (RFC 2018 section 8)
    assert lost_starts(rec) == [0, 1000, 2000, 3000, 4000]
    assert rec.in_recovery and rec.recovery_after_rto
    assert rec.take_lost(0, MSS, now=1.0) == 0  # in order from the left edge
    assert rec.take_lost(MSS, MSS, now=1.0) is None  # then the window is full


def test_a_path_change_resends_what_was_not_sacked_without_backoff() -> None:
    rec = make()
    snd_max = send(rec, 4)
    rec.on_sack([(1000, 2000)], 0, snd_max, now=0.1)
    rec.on_timeout(snd_max)
    rec.on_sack([(1000, 2000)], 0, snd_max, now=0.2)
    assert rec.rtt.backoffs == 1
    rec.on_path_change(snd_max)
    assert rec.rtt.backoffs == 0
    assert lost_starts(rec) == [0, 2000, 3000]
    assert rec.in_recovery and rec.recovery_after_rto and rec.recovery_point == snd_max


# -- without SACK: duplicate ACKs (RFC 5681, 3042, 6582, 5827) ---------------------------
def test_limited_transmit_each_of_the_first_two_dupacks_frees_one_segment() -> None:
    rec = make(sack=False)
    snd_max = send(rec, 10)
    assert rec.pipe(0, snd_max) == 10 * MSS
    rec.on_duplicate_ack()
    assert rec.pipe(0, snd_max) == 9 * MSS
    rec.on_duplicate_ack()
    assert rec.pipe(0, snd_max) == 8 * MSS
    assert rec.dupacks == 2 < rec.dup_thresh(can_send_new=True)


def test_dupacks_never_count_more_segments_than_sit_above_the_hole() -> None:
    rec = make(sack=False)
    snd_max = send(rec, 3)
    for _ in range(10):
        rec.on_duplicate_ack()
    assert rec.pipe(0, snd_max) == MSS  # the hole itself is still in the network


def test_third_dupack_retransmits_the_first_segment_whatever_the_window() -> None:
    rec = make(sack=False)
    snd_max = send(rec, 10)
    for _ in range(DUP_THRESH):
        rec.on_duplicate_ack()
    assert rec.dupacks >= rec.dup_thresh(can_send_new=True)
    rec.enter_recovery(snd_max)
    assert lost_starts(rec) == [0] and rec.rexmit_now
    assert rec.take_lost(7 * MSS, 1 * MSS, now=0.1) == 0  # RFC 5681 3.2 step 2
    assert not rec.rexmit_now


def test_newreno_partial_ack_resends_the_next_hole_at_once() -> None:
    rec = make(sack=False)
    snd_max = send(rec, 10)
    for _ in range(DUP_THRESH):
        rec.on_duplicate_ack()
    rec.enter_recovery(snd_max)
    assert rec.take_lost(0, 10 * MSS, now=0.1) == 0
    rec.on_ack(3000, now=0.2)  # partial: below the recovery point (RFC 6582 3.2 step 3)
    assert rec.in_recovery
    assert lost_starts(rec) == [3000] and rec.rexmit_now
    assert rec.take_lost(9 * MSS, 1 * MSS, now=0.2) == 3000  # goes whatever the pipe
    rec.on_ack(snd_max, now=0.3)  # full acknowledgement: recovery ends
    assert not rec.in_recovery and lost_starts(rec) == []


@pytest.mark.parametrize(
    ("outstanding", "can_send_new", "expected"),
    [
        (1, False, 3),  # nothing can come: the timer's case
        (2, False, 1),  # RFC 5827: oseg - 1
        (3, False, 2),
        (4, False, 3),  # four or more: the usual three
        (3, True, 3),  # new data can go out and bring its own duplicates
    ],
)
def test_early_retransmit_lowers_dupthresh_for_small_windows(
    outstanding: int, can_send_new: bool, expected: int
) -> None:
    rec = make(sack=False)
    send(rec, outstanding)
    assert rec.dup_thresh(can_send_new) == expected
    sack = make(sack=True)
    send(sack, outstanding)
    assert sack.dup_thresh(can_send_new) == 3  # with SACK the scoreboard decides


# -- the scoreboard against a brute-force model --------------------------------------------
class Model:
    """Every segment as [start, end, sacked] in a list; RFC 6675's rules applied literally."""

    def __init__(self) -> None:
        self.segs: list[list[int]] = []  # [start, end, sacked]
        self.una = 0
        self.snd_max = 0

    def send(self, n: int) -> None:
        self.segs.append([self.snd_max, self.snd_max + n, 0])
        self.snd_max += n

    def sack(self, left: int, right: int) -> None:
        if right <= left or left < self.una or right > self.snd_max:
            return
        for seg in self.segs:
            if left <= seg[0] < right and seg[1] <= right:
                seg[2] = 1

    def ack(self, ack: int) -> None:
        kept = []
        for start, end, sacked in self.segs:
            if end <= ack:
                continue
            kept.append([max(start, ack), end, sacked])
        self.segs = kept
        self.una = ack

    def sacked_above(self, start: int) -> int:
        return sum(e - s for s, e, k in self.segs if k and s > start)

    def is_lost(self, seg: list[int]) -> bool:
        return not seg[2] and self.sacked_above(seg[0]) > (DUP_THRESH - 1) * MSS


ops = st.lists(
    st.one_of(
        st.tuples(st.just("send"), st.integers(1, 2500), st.just(0)),
        st.tuples(st.just("sack"), st.integers(-500, 30_000), st.integers(-500, 30_000)),
        st.tuples(st.just("ack"), st.floats(0, 1), st.just(0)),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(ops)
def test_scoreboard_matches_a_brute_force_model(steps: list[tuple[str, float, int]]) -> None:
    rec = make()
    model = Model()
    now = 0.0
    for op, a, b in steps:
        now += 0.01
        if op == "send":
            rec.on_sent(model.snd_max, model.snd_max + int(a), False, now)
            model.send(int(a))
        elif op == "sack":
            left, right = int(a), int(a) + b  # b: the length (may be zero or negative)
            rec.on_sack([(left, right)], model.una, model.snd_max, now)
            model.sack(left, right)
        else:
            ack = model.una + int(a * (model.snd_max - model.una))
            if ack > model.una:
                rec.on_ack(ack, now)
                model.ack(ack)
        got = [[s, seg.end, int(seg.sacked)] for s, seg in rec.segments.items()]
        assert got == model.segs
        sacked = sum(e - s for s, e, k in model.segs if k)
        assert rec.sacked_bytes == sacked
        assert rec.pipe(model.una, model.snd_max) == model.snd_max - model.una - sacked
        first = model.segs[0] if model.segs else None
        assert rec.first_lost() == (first is not None and model.is_lost(first))
    rec.enter_recovery(model.snd_max)
    expected = [s for s, e, k in model.segs if model.is_lost([s, e, k])]
    if not expected and model.segs:
        expected = [model.segs[0][0]]  # duplicate ACKs alone: the first segment
    assert lost_starts(rec) == expected
    # SetPipe with nothing retransmitted yet: every unSACKed byte not marked lost.
    assert rec.pipe(model.una, model.snd_max) == sum(
        e - s for s, e, k in model.segs if not k and s not in expected
    )

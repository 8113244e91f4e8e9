"""Congestion control: NewReno and CUBIC window arithmetic, driven by simulated ACK rounds."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyserval.transport.congestion import (
    CONGESTION_CONTROLS,
    DEFAULT_CONGESTION_CONTROL,
    SSTHRESH_INFINITE,
    CongestionControl,
    Cubic,
    NewReno,
    initial_window,
    make_congestion_control,
)

MSS = 1000
ALGORITHMS = [NewReno, Cubic]


def ack_round(cc: CongestionControl, now: float, rtt: float, per_ack: int = 1) -> float:
    """Acknowledge one full window, ``per_ack`` segments per ACK, spread over one RTT.

    The simulated sender keeps the pipe full (flight = cwnd when each ACK arrives), so it is
    always cwnd-limited. Returns the time at the end of the round.
    """
    acks = -(-cc.cwnd // (cc.mss * per_ack))  # the last ACK may cover a partial segment
    for i in range(acks):
        cc.on_ack(per_ack * cc.mss, now + rtt * (i + 1) / acks, rtt, cc.cwnd)
    return now + rtt


def after_loss(cls: type[CongestionControl], segments: int) -> CongestionControl:
    """An instance that had ``segments`` MSS in flight, lost one, and finished recovery."""
    cc = cls(MSS, initial_window=segments * MSS)
    cc.on_congestion_event(0.0, segments * MSS)
    cc.on_recovery_exit(0.0)
    return cc


# -- initial window and MSS ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mss", "expected"),
    [(536, 5360), (1000, 10000), (1460, 14600), (4000, 14600), (9000, 18000)],
)
@pytest.mark.parametrize("cls", ALGORITHMS)
def test_initial_window_rfc6928(cls: type[CongestionControl], mss: int, expected: int) -> None:
    cc = cls(mss)
    assert initial_window(mss) == expected
    assert cc.cwnd == expected
    assert cc.ssthresh == SSTHRESH_INFINITE
    assert cc.in_slow_start
    assert cc.describe()["ssthresh"] == math.inf


@pytest.mark.parametrize("cls", ALGORITHMS)
def test_explicit_initial_window_and_validation(cls: type[CongestionControl]) -> None:
    assert cls(MSS, initial_window=4000).cwnd == 4000
    assert cls(MSS, initial_window=10).cwnd == MSS  # never below one segment
    with pytest.raises(ValueError):
        cls(0)
    with pytest.raises(ValueError):
        cls(MSS, initial_window=0)
    with pytest.raises(ValueError):
        cls(MSS).on_ack(-1, 0.0, None, 0)


@pytest.mark.parametrize("cls", ALGORITHMS)
def test_set_mss_rescales_iw_only_before_use(cls: type[CongestionControl]) -> None:
    cc = cls(536)
    cc.set_mss(1460)
    assert (cc.mss, cc.cwnd) == (1460, 14600)

    cc.on_ack(1460, 0.1, 0.1, 14600)
    grown = cc.cwnd
    cc.set_mss(1000)
    assert cc.cwnd == grown  # in use: keeps its byte value
    cc.set_mss(64000)
    assert cc.cwnd == 64000  # but is never below one segment
    with pytest.raises(ValueError):
        cc.set_mss(-5)


# -- slow start ------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", ALGORITHMS)
@pytest.mark.parametrize("per_ack", [1, 2])
def test_slow_start_doubles_per_rtt(cls: type[CongestionControl], per_ack: int) -> None:
    cc = cls(MSS)
    now = 0.0
    for expected in (20, 40, 80, 160):
        now = ack_round(cc, now, 0.05, per_ack)
        assert cc.cwnd == expected * MSS
    assert cc.in_slow_start


def test_abc_limits_stretch_acks_to_two_segments() -> None:
    cc = NewReno(MSS)
    cc.on_ack(8 * MSS, 0.1, 0.1, cc.cwnd)
    assert cc.cwnd == 12 * MSS


def test_slow_start_stops_at_ssthresh_and_hands_over_the_rest() -> None:
    cc = NewReno(MSS)
    cc.ssthresh = 11 * MSS
    cc.on_ack(2 * MSS, 0.1, 0.1, cc.cwnd)
    assert cc.cwnd == 11 * MSS
    assert not cc.in_slow_start
    assert cc.describe()["ca_bytes_acked"] == MSS


# -- congestion avoidance --------------------------------------------------------------------


@pytest.mark.parametrize("per_ack", [1, 2])
def test_newreno_ca_adds_one_mss_per_rtt(per_ack: int) -> None:
    cc = after_loss(NewReno, 100)
    assert cc.cwnd == 50 * MSS
    now = 0.0
    for rounds in range(1, 11):
        now = ack_round(cc, now, 0.1, per_ack)
        assert cc.cwnd == (50 + rounds) * MSS


def test_ca_hook_is_only_used_in_congestion_avoidance() -> None:
    calls: list[int] = []

    class Recording(NewReno):
        def _ca_increase(self, acked_bytes: int, now: float, rtt: float | None) -> None:
            calls.append(acked_bytes)

    cc = Recording(MSS)
    ack_round(cc, 0.0, 0.1)
    assert calls == []
    cc.on_congestion_event(0.1, cc.cwnd)
    cc.on_recovery_exit(0.2)
    cc.on_ack(MSS, 0.3, 0.1, cc.cwnd)
    assert calls == [MSS]


# -- reductions ------------------------------------------------------------------------------


def test_newreno_congestion_event_halves_flight() -> None:
    cc = NewReno(MSS, initial_window=40 * MSS)
    cc.on_congestion_event(1.0, 40 * MSS)
    assert (cc.ssthresh, cc.cwnd) == (20 * MSS, 20 * MSS)
    assert not cc.in_slow_start

    small = NewReno(MSS, initial_window=40 * MSS)
    small.on_congestion_event(1.0, 3 * MSS)
    assert (small.ssthresh, small.cwnd) == (2 * MSS, 2 * MSS)


def test_cubic_congestion_event_uses_beta_and_fast_convergence() -> None:
    cc = Cubic(MSS, initial_window=100 * MSS)
    cc.on_congestion_event(1.0, 100 * MSS)
    assert (cc.ssthresh, cc.cwnd) == (70 * MSS, 70 * MSS)
    assert cc.describe()["w_max"] == 100 * MSS
    # A second loss below the previous maximum: W_max is pulled down to (1 + beta) / 2.
    cc.on_congestion_event(2.0, 70 * MSS)
    assert cc.cwnd == 49 * MSS
    assert cc.describe()["w_max"] == pytest.approx(70 * MSS * 0.85)


@pytest.mark.parametrize(("cls", "factor"), [(NewReno, 0.5), (Cubic, 0.7)])
def test_retransmission_timeout_gives_loss_window(
    cls: type[CongestionControl], factor: float
) -> None:
    cc = cls(MSS, initial_window=40 * MSS)
    cc.on_retransmission_timeout(1.0, 40 * MSS)
    assert cc.cwnd == MSS
    assert cc.ssthresh == int(40 * MSS * factor)
    assert cc.in_slow_start
    # The same segment times out again: ssthresh is held, not computed from a tiny flight.
    cc.on_retransmission_timeout(3.0, MSS)
    assert (cc.cwnd, cc.ssthresh) == (MSS, int(40 * MSS * factor))
    # After new data is acknowledged, a later timeout is a fresh loss.
    cc.on_ack(MSS, 3.5, None, MSS)
    cc.on_retransmission_timeout(5.0, 6 * MSS)
    assert (cc.cwnd, cc.ssthresh) == (MSS, int(6 * MSS * factor))


@pytest.mark.parametrize("cls", ALGORITHMS)
def test_recovery_exit_deflates_but_keeps_a_timeout_loss_window(
    cls: type[CongestionControl],
) -> None:
    cc = cls(MSS, initial_window=40 * MSS)
    cc.on_congestion_event(1.0, 40 * MSS)
    cc.cwnd += 3 * MSS  # a sender doing RFC 6582 inflation itself
    cc.on_recovery_exit(1.5)
    assert cc.cwnd == cc.ssthresh

    cc.on_congestion_event(2.0, cc.cwnd)
    cc.on_retransmission_timeout(3.0, cc.cwnd)
    cc.on_recovery_exit(3.5)
    assert cc.cwnd == MSS


@pytest.mark.parametrize("cls", ALGORITHMS)
def test_path_change_restarts_without_a_reduction(cls: type[CongestionControl]) -> None:
    cc = cls(MSS)
    now = ack_round(cc, 0.0, 0.1)
    cc.on_congestion_event(now, cc.cwnd)
    cc.on_recovery_exit(now + 0.1)
    ack_round(cc, now + 0.1, 0.1)
    cc.on_path_change(1.0)
    assert cc.cwnd == initial_window(MSS)
    assert cc.ssthresh == SSTHRESH_INFINITE
    assert cc.in_slow_start
    cc.set_mss(1460)  # the new path's MSS: the window was not used yet, so IW rescales
    assert cc.cwnd == 14600
    if isinstance(cc, Cubic):
        stats = cc.describe()
        assert stats["w_max"] == 0.0
        assert stats["min_rtt"] == 0.0


# -- window validation -----------------------------------------------------------------------


@pytest.mark.parametrize("cls", ALGORITHMS)
def test_no_growth_when_not_cwnd_limited(cls: type[CongestionControl]) -> None:
    cc = cls(MSS)
    for i in range(50):
        cc.on_ack(MSS, 0.01 * i, 0.1, 2 * MSS)  # 2 of 10 segments in flight
    assert cc.cwnd == 10 * MSS
    cc.on_ack(MSS, 1.0, 0.1, 5 * MSS)  # half the window is enough
    assert cc.cwnd == 11 * MSS

    ca = after_loss(cls, 40)
    before = ca.cwnd
    for i in range(500):
        ca.on_ack(MSS, 0.1 * i, 0.1, MSS)
    assert ca.cwnd == before


def test_cubic_epoch_pauses_while_app_limited() -> None:
    def run(idle: bool) -> int:
        cc = after_loss(Cubic, 100)
        cc.on_ack(MSS, 0.0, 0.1, cc.cwnd)  # starts the epoch
        now = 0.0
        while now < 10.0:  # busy, or sending one segment at a time, for 10 s
            if idle:
                now += 0.1
                cc.on_ack(MSS, now, 0.1, MSS)
            else:
                now = ack_round(cc, now, 0.1)
        ack_round(cc, now, 0.1)
        return cc.cwnd

    # Idle: the curve resumes where it stopped, just past its start (W_cubic(0.2 s) ~ 74).
    assert run(idle=True) < 76 * MSS
    # Busy for the same time, it went well past W_max (K ~ 4.2 s).
    assert run(idle=False) > 130 * MSS


# -- CUBIC shape -----------------------------------------------------------------------------


def test_cubic_grows_back_along_the_cubic() -> None:
    # A large window (BDP) keeps CUBIC out of the Reno-friendly region; 10-segment ACKs
    # keep the simulation short.
    cc = after_loss(Cubic, 1000)
    assert cc.cwnd == 700 * MSS
    k = math.cbrt(300 / 0.4)  # (W_max - cwnd_epoch) / C, in segments: ~9.1 s
    rtt = 0.1
    now = 0.0
    trace: list[tuple[float, int]] = []
    while now < 16.0:
        now = ack_round(cc, now, rtt, per_ack=10)
        trace.append((now, cc.cwnd))
        assert cc.describe()["w_est"] < cc.cwnd
    assert cc.describe()["k"] == pytest.approx(k)

    def w_cubic(t: float) -> float:
        return (0.4 * (t - k) ** 3 + 1000) * MSS

    for t, cwnd in trace:
        # The target is W_cubic one RTT ahead; cwnd closes most of the gap every round.
        assert w_cubic(t - rtt) - MSS <= cwnd <= w_cubic(t + rtt) + MSS

    increments = [b - a for (_, a), (_, b) in itertools.pairwise(trace)]
    times = [t for t, _ in trace[1:]]

    def growth_near(when: float) -> float:
        near = [inc for t, inc in zip(times, increments, strict=True) if abs(t - when) <= 0.35]
        return sum(near) / len(near)

    # Concave: fast at first, slowing as it nears W_max; the plateau around K; then convex.
    assert growth_near(1.0) > 2 * growth_near(6.0) > 2 * growth_near(k)
    assert growth_near(15.0) > 2 * growth_near(12.0) > 2 * growth_near(k)
    at_k = min(trace, key=lambda point: abs(point[0] - k))[1]
    assert at_k == pytest.approx(1000 * MSS, rel=0.01)


def test_cubic_reno_friendly_region_on_short_rtt() -> None:
    cc = after_loss(Cubic, 10)
    assert cc.cwnd == 7 * MSS
    now = 0.0
    while now < 1.0:
        now = ack_round(cc, now, 0.01)
    # The cubic alone would still be below W_max (10 segments) after 1 s; Reno grows by
    # ~0.53 segments per RTT to the old window, then 1 per RTT: ~100 RTTs give ~100 segments.
    stats = cc.describe()
    assert cc.cwnd > 80 * MSS
    assert cc.cwnd == pytest.approx(stats["w_est"], abs=MSS)


def test_cubic_after_timeout_starts_convex_from_its_window() -> None:
    cc = Cubic(MSS, initial_window=40 * MSS)
    cc.on_retransmission_timeout(0.0, 40 * MSS)
    now = 0.0
    while cc.in_slow_start:
        now = ack_round(cc, now, 0.1)
    cc.on_ack(MSS, now + 0.01, 0.1, cc.cwnd)  # first CA ACK: the epoch begins
    stats = cc.describe()
    assert stats["k"] == 0.0
    assert stats["w_max"] == 28 * MSS


# -- registry --------------------------------------------------------------------------------


def test_registry() -> None:
    assert dict(CONGESTION_CONTROLS) == {"newreno": NewReno, "cubic": Cubic}
    assert DEFAULT_CONGESTION_CONTROL in CONGESTION_CONTROLS
    for name, cls in CONGESTION_CONTROLS.items():
        assert cls.name == name
        cc = make_congestion_control(name, 1460)
        assert type(cc) is cls
        assert cc.mss == 1460
    assert isinstance(make_congestion_control("NewReno", MSS), NewReno)
    with pytest.raises(ValueError, match=r"'bbr'.*cubic, newreno"):
        make_congestion_control("bbr", MSS)
    with pytest.raises(TypeError):
        CongestionControl(MSS)  # type: ignore[abstract]


# -- properties ------------------------------------------------------------------------------

_events = st.one_of(
    st.tuples(
        st.just("ack"),
        st.integers(1, 4 * MSS),
        st.floats(0.0, 2.0),
        st.floats(0.0, 0.5),
        st.none() | st.floats(0.001, 1.0),
    ),
    st.tuples(st.just("loss"), st.floats(0.0, 2.0)),
    st.tuples(st.just("rto"), st.floats(0.0, 2.0)),
    st.tuples(st.just("exit")),
    st.tuples(st.just("path")),
    st.tuples(st.just("mss"), st.integers(100, 9000)),
)


@given(cls=st.sampled_from(ALGORITHMS), events=st.lists(_events, max_size=60))
def test_window_stays_sane(cls: type[CongestionControl], events: list[tuple[object, ...]]) -> None:
    cc = cls(MSS)
    now = 0.0
    for event in events:
        match event:
            case ("ack", int(acked), float(load), float(dt), rtt):
                now += dt
                assert rtt is None or isinstance(rtt, float)
                cc.on_ack(acked, now, rtt, int(load * cc.cwnd))
            case ("loss", float(load)):
                cc.on_congestion_event(now, int(load * cc.cwnd))
                assert cc.cwnd >= 2 * cc.mss
                assert cc.cwnd == cc.ssthresh
            case ("rto", float(load)):
                cc.on_retransmission_timeout(now, int(load * cc.cwnd))
                assert cc.cwnd == cc.mss
            case ("exit",):
                cc.on_recovery_exit(now)
            case ("path",):
                cc.on_path_change(now)
                assert cc.in_slow_start
            case ("mss", int(mss)):
                cc.set_mss(mss)
            case _:
                raise AssertionError(f"unmatched event {event!r}")
        assert isinstance(cc.cwnd, int)
        assert isinstance(cc.ssthresh, int)
        assert cc.cwnd >= cc.mss > 0
        assert cc.ssthresh >= 2 * cc.mss
        assert all(math.isfinite(v) or v == math.inf for v in cc.describe().values())

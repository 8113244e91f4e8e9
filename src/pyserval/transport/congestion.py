"""Pluggable congestion control for Serval TCP: NewReno (RFC 5681/6582) and CUBIC (RFC 9438).

Sans-I/O and clock-free: the TCP sender reports ACKs, losses, timeouts and path changes,
passing the current time as ``now`` (float seconds), and reads back ``cwnd``/``ssthresh``
(bytes). Loss recovery itself (which segments to retransmit, the RFC 6675 pipe) belongs to
the sender; these classes only decide how big the window is.

Conventions shared by every algorithm:

* ``on_ack`` is called only for new data cumulatively acknowledged *outside* loss recovery,
  with ``bytes_in_flight`` as it was just before that ACK was processed (so it still counts
  the bytes the ACK covers).
* Window validation (in the spirit of RFC 7661): the window only grows when the sender was
  using at least half of it, i.e. when ``2 * bytes_in_flight >= cwnd``. An application-limited
  sender therefore keeps its window instead of inflating one it never tested, and slow start
  can never push ``cwnd`` past twice what was really in flight.
* Slow start uses Appropriate Byte Counting (RFC 3465) with L = 2*MSS.
* ``cwnd`` never drops below 1 MSS (the loss window after a timeout) and, after a congestion
  event, never below 2 MSS.

A coupled algorithm (RFC 6356 LIA across the subflows of one connection) can subclass an
algorithm here and override only :meth:`CongestionControl._ca_increase`.
"""

from __future__ import annotations

import abc
import math
from typing import ClassVar, Final

__all__ = [
    "CONGESTION_CONTROLS",
    "DEFAULT_CONGESTION_CONTROL",
    "SSTHRESH_INFINITE",
    "CongestionControl",
    "Cubic",
    "NewReno",
    "initial_window",
    "make_congestion_control",
]

SSTHRESH_INFINITE: Final = 1 << 62
"""The initial ssthresh: "arbitrarily high" (RFC 5681 3.1), so the first slow start runs
until the first loss."""

_ABC_LIMIT_SEGMENTS: Final = 2  # RFC 3465's L: at most 2*MSS of growth per ACK in slow start
_INF: Final = math.inf  # (a global, not an attribute of a module, for the constructor)


def initial_window(mss: int) -> int:
    """The RFC 6928 initial window in bytes: ``min(10*MSS, max(2*MSS, 14600))``."""
    # (conditional expressions: no builtin calls, for every connection's constructor)
    floor = 2 * mss if 2 * mss > 14600 else 14600
    return 10 * mss if 10 * mss < floor else floor


def _check_mss(mss: int) -> int:
    if mss <= 0:
        raise ValueError(f"MSS must be positive, got {mss}")
    return mss


class CongestionControl(abc.ABC):
    """The interface the TCP sender drives, plus the machinery all algorithms share.

    Subclasses implement :meth:`_ca_increase` (growth in congestion avoidance) and
    :meth:`_loss_ssthresh` (the multiplicative decrease); the rest is common: slow start,
    window validation, recovery exit, the timeout loss window and path changes.
    """

    # Slots: every connection makes one (its subflow's); without them each instance also
    # allocates a dict of some twenty entries, which the constructor fills and the close
    # frees. A subclass without slots of its own still gets a ``__dict__``.
    __slots__ = (
        "mss",
        "cwnd",
        "ssthresh",
        "_explicit_iw",
        "_cwnd_frac",
        "_timeout_backoff",
        "_pristine",
    )

    name: ClassVar[str]
    """Registry key of the algorithm (``"newreno"``, ``"cubic"``)."""

    cwnd: int
    """Congestion window in bytes."""
    ssthresh: int
    """Slow-start threshold in bytes (:data:`SSTHRESH_INFINITE` until the first loss)."""
    mss: int
    """Sender maximum segment size in bytes."""

    def __init__(self, mss: int, initial_window: int | None = None) -> None:
        self.mss = _check_mss(mss)
        if initial_window is not None and initial_window <= 0:
            raise ValueError(f"initial window must be positive, got {initial_window}")
        self._explicit_iw = initial_window
        # cwnd, ssthresh, _cwnd_frac, _timeout_backoff and _pristine: _reset_window's.
        self._reset_window()

    # -- shared helpers ------------------------------------------------------------------

    def _initial_window(self) -> int:
        iw = self._explicit_iw
        mss = self.mss
        if iw is not None:
            # An explicit IW is in bytes, but a window smaller than one segment would stall.
            return iw if iw > mss else mss
        return initial_window(mss)

    def _reset_window(self) -> None:
        """Back to the state of a fresh connection (IW, infinite ssthresh); keeps the MSS."""
        self._set_cwnd(self._initial_window())
        self.ssthresh = SSTHRESH_INFINITE
        self._timeout_backoff = False
        self._pristine = True

    def _set_cwnd(self, value: int) -> None:
        """Set ``cwnd`` outright, dropping any fractional growth not yet applied."""
        mss = self.mss
        self.cwnd = value if value > mss else mss
        self._cwnd_frac = 0.0

    def _grow_cwnd(self, delta: float) -> None:
        """Add ``delta`` bytes (possibly fractional) to ``cwnd``.

        Fractions are carried over so that many tiny per-ACK increments still add up; rounding
        each one down would stall growth once ``cwnd`` is large.
        """
        if delta <= 0:
            return
        self._cwnd_frac += delta
        whole = int(self._cwnd_frac)
        self.cwnd += whole
        self._cwnd_frac -= whole

    def _is_cwnd_limited(self, bytes_in_flight: int) -> bool:
        """The window-validation rule from the module docstring: using at least half of it."""
        return 2 * bytes_in_flight >= self.cwnd

    def _slow_start(self, acked_bytes: int) -> int:
        """Grow ``cwnd`` by ABC (L = 2*MSS), stopping at ``ssthresh``.

        Returns the acked bytes left over once ``cwnd`` reached ``ssthresh``; those belong to
        congestion avoidance (so an ACK straddling the threshold is not counted twice).
        """
        room = self.ssthresh - self.cwnd
        increase = min(acked_bytes, _ABC_LIMIT_SEGMENTS * self.mss)
        if increase < room:
            self._grow_cwnd(increase)
            return 0
        self._set_cwnd(self.ssthresh)
        return acked_bytes - room

    # -- the interface the sender calls --------------------------------------------------

    @property
    def in_slow_start(self) -> bool:
        """True while ``cwnd < ssthresh`` (RFC 5681: slow start below the threshold)."""
        return self.cwnd < self.ssthresh

    def set_mss(self, mss: int) -> None:
        """Adopt a new MSS (after negotiation, or a path MTU change).

        If nothing has been acknowledged, lost or timed out since the start (or since the last
        path change), the connection has not used its window yet, so the default initial window
        is recomputed for the new MSS. Otherwise ``cwnd`` keeps its byte value, clamped so it is
        at least one segment and ``ssthresh`` at least two.
        """
        self.mss = _check_mss(mss)
        if self._pristine:
            self._set_cwnd(self._initial_window())
        else:
            self.cwnd = max(self.cwnd, self.mss)
            self.ssthresh = max(self.ssthresh, 2 * self.mss)

    def on_ack(self, acked_bytes: int, now: float, rtt: float | None, bytes_in_flight: int) -> None:
        """New data was cumulatively acknowledged outside loss recovery: maybe grow ``cwnd``.

        ``bytes_in_flight`` is the amount outstanding just before this ACK (it includes
        ``acked_bytes``); ``rtt`` is this ACK's RTT sample, or None if it gave none (Karn).
        Nothing grows unless ``2 * bytes_in_flight >= cwnd`` (window validation).
        """
        if acked_bytes < 0 or bytes_in_flight < 0:
            raise ValueError(
                f"negative acked_bytes ({acked_bytes}) or bytes_in_flight ({bytes_in_flight})"
            )
        self._pristine = False
        if acked_bytes == 0:
            return
        # New data got through, so the next timeout is a fresh loss, not a repeated one.
        self._timeout_backoff = False
        if not self._is_cwnd_limited(bytes_in_flight):
            return
        if self.in_slow_start:
            acked_bytes = self._slow_start(acked_bytes)
        if acked_bytes > 0:
            self._ca_increase(acked_bytes, now, rtt)

    def on_congestion_event(self, now: float, bytes_in_flight: int) -> None:
        """Loss detected by duplicate ACKs or SACK (the caller reports it once per window).

        Sets ``ssthresh`` by the algorithm's multiplicative decrease (never below 2*MSS) and
        ``cwnd`` to it. There is no RFC 5681 "+3 MSS" inflation: the sender's recovery counts
        the pipe itself (RFC 6675), and :meth:`on_recovery_exit` undoes any inflation it did.
        """
        self._pristine = False
        self.ssthresh = self._loss_ssthresh(bytes_in_flight)
        self._set_cwnd(self.ssthresh)

    def on_recovery_exit(self, now: float) -> None:
        """Loss recovery finished (the cumulative ACK passed the recovery point).

        RFC 6582's full deflation, ``cwnd = ssthresh``. It is written as ``min`` because this
        class never grows ``cwnd`` during recovery: the only way ``cwnd`` is below ``ssthresh``
        here is a timeout during recovery, and its loss window must not be undone.
        """
        if self.cwnd > self.ssthresh:
            self._set_cwnd(self.ssthresh)

    def on_retransmission_timeout(self, now: float, bytes_in_flight: int) -> None:
        """The retransmission timer fired: ``ssthresh`` from the flight, ``cwnd`` = 1 MSS.

        When the timer fires again before any new data was acknowledged (the same segment
        timed out twice), ``ssthresh`` is held (RFC 5681 3.1): the flight then only holds the
        retransmission and would collapse ``ssthresh`` for no new evidence.
        """
        self._pristine = False
        if not self._timeout_backoff:
            self.ssthresh = self._loss_ssthresh(bytes_in_flight)
        self._timeout_backoff = True
        self._set_cwnd(self.mss)

    def on_path_change(self, now: float) -> None:
        """The subflow migrated to a new path: start over from the initial window.

        What was learned about the old path says nothing about the new one, so ``ssthresh`` is
        reset as well; this is not congestion, so no multiplicative decrease is recorded.
        """
        self._reset_window()

    def describe(self) -> dict[str, float]:
        """A snapshot for statistics and debugging (an infinite ssthresh reads ``inf``)."""
        return {
            "cwnd": float(self.cwnd),
            "ssthresh": math.inf if self.ssthresh >= SSTHRESH_INFINITE else float(self.ssthresh),
            "mss": float(self.mss),
            "cwnd_segments": self.cwnd / self.mss,
            "in_slow_start": float(self.in_slow_start),
        }

    # -- what an algorithm defines -------------------------------------------------------

    @abc.abstractmethod
    def _ca_increase(self, acked_bytes: int, now: float, rtt: float | None) -> None:
        """Congestion-avoidance growth for ``acked_bytes`` newly acknowledged bytes.

        Called only when the sender was cwnd-limited and ``cwnd >= ssthresh``. The hook a
        coupled multipath algorithm (RFC 6356) overrides.
        """

    @abc.abstractmethod
    def _loss_ssthresh(self, bytes_in_flight: int) -> int:
        """The new ``ssthresh`` after a loss with ``bytes_in_flight`` outstanding (>= 2*MSS)."""


class NewReno(CongestionControl):
    """Reno/NewReno window management (RFC 5681, RFC 6582).

    Congestion avoidance adds exactly one MSS per window of acknowledged bytes: the
    byte-counting form RFC 5681 (3.1) and RFC 3465 recommend over the per-ACK
    ``MSS*MSS/cwnd`` approximation, which undercounts as ``cwnd`` grows within the RTT and
    overcounts with delayed ACKs.
    """

    __slots__ = ("_ca_acked",)

    name: ClassVar[str] = "newreno"

    def __init__(self, mss: int, initial_window: int | None = None) -> None:
        self._ca_acked = 0
        super().__init__(mss, initial_window)

    def _set_cwnd(self, value: int) -> None:
        super()._set_cwnd(value)
        # The byte counter measures progress through the current window; a new window
        # starts the count again.
        self._ca_acked = 0

    def _ca_increase(self, acked_bytes: int, now: float, rtt: float | None) -> None:
        """One MSS each time a full ``cwnd`` of bytes has been acknowledged."""
        self._ca_acked += acked_bytes
        while self._ca_acked >= self.cwnd:
            self._ca_acked -= self.cwnd
            self.cwnd += self.mss

    def _loss_ssthresh(self, bytes_in_flight: int) -> int:
        """RFC 5681 equation (4): ``max(FlightSize / 2, 2*SMSS)``."""
        return max(bytes_in_flight // 2, 2 * self.mss)

    def describe(self) -> dict[str, float]:
        """The common snapshot plus the congestion-avoidance byte counter."""
        stats = super().describe()
        stats["ca_bytes_acked"] = float(self._ca_acked)
        return stats


class Cubic(CongestionControl):
    """CUBIC (RFC 9438): ``W_cubic(t) = C*(t-K)^3 + W_max`` with the Reno-friendly region.

    Windows are kept in bytes and converted to segments (with the current MSS) only inside
    the cubic, whose constant C is in segments per second cubed. ``t`` runs from the start of
    the congestion-avoidance epoch (the first CA ACK after a reduction) and is paused while
    the sender is application-limited, so an idle period does not make the curve jump ahead.
    The target is ``W_cubic(t + min_rtt)``, clamped to ``[cwnd, 1.5*cwnd]``.

    Slow start ends early on a rise in delay, as in HyStart++ (RFC 9406; rounds are timed
    by the minimum RTT): once a round's smallest RTT (of at least 8 samples) exceeds the
    previous round's by an eighth (4 to 16 ms), the queue may be filling, and slow start goes
    on at a quarter of its pace (conservative slow start) for up to 5 rounds: back to normal
    if the delay falls below where it rose (jitter, not a queue), else ssthresh becomes cwnd.
    """

    __slots__ = (
        "_w_max",
        "_cwnd_prior",
        "_k",
        "_w_est",
        "_epoch_start",
        "_last_ack_time",
        "_min_rtt",
        "_round_end",
        "_round_min",
        "_round_samples",
        "_last_round_min",
        "_css_rounds",
        "_css_base",
    )

    name: ClassVar[str] = "cubic"

    C: ClassVar[float] = 0.4
    """Aggressiveness, in segments / s^3."""
    BETA: ClassVar[float] = 0.7
    """Multiplicative decrease factor."""
    FAST_CONVERGENCE: ClassVar[bool] = True
    """Release bandwidth early when ``W_max`` keeps shrinking (RFC 9438 4.7)."""
    ALPHA: ClassVar[float] = 3 * (1 - BETA) / (1 + BETA)
    """Reno-friendly additive increase (segments per RTT) until ``W_est`` reaches
    ``cwnd_prior``: the same average rate as Reno's AIMD(1, 0.5). Derived from BETA here, so
    a subclass changing BETA must set ALPHA too."""

    # Its state, set by _reset_window (which the base constructor calls: set here as well,
    # it was set twice per connection).
    _w_max: float  # bytes; 0: no loss to return to, the next epoch starts at cwnd
    _cwnd_prior: float  # bytes: cwnd when ssthresh was last set
    _k: float  # seconds from the epoch start to the plateau at W_max
    _w_est: float  # bytes: what Reno would have by now (Reno-friendly region)
    _epoch_start: float | None
    _last_ack_time: float | None
    _min_rtt: float | None
    # HyStart: the current round's end, smallest RTT and sample count; the last round's.
    _round_end: float | None
    _round_min: float
    _round_samples: int
    _last_round_min: float
    _css_rounds: int | None  # rounds spent in conservative slow start
    _css_base: float  # the round minimum RTT when it began

    def _reset_window(self) -> None:
        # The base class named, not super(): zero-argument super() builds an object per
        # call, and every connection's constructor comes here.
        CongestionControl._reset_window(self)
        self._w_max = 0.0
        self._cwnd_prior = 0.0
        self._k = 0.0
        self._w_est = 0.0
        self._epoch_start = None
        self._last_ack_time = None
        # A new path has its own propagation delay.
        self._min_rtt = None
        self._round_end = None
        self._round_min = _INF
        self._round_samples = 0
        self._last_round_min = _INF
        self._css_rounds = None
        self._css_base = _INF

    def _w_cubic(self, t: float) -> float:
        """The cubic window in bytes, ``t`` seconds into the epoch (RFC 9438 eq. 1)."""
        return (self.C * (t - self._k) ** 3) * self.mss + self._w_max

    def _start_epoch(self, now: float) -> None:
        """Begin a congestion-avoidance epoch at the current ``cwnd`` (RFC 9438 4.2)."""
        cwnd_epoch = float(self.cwnd)
        # Above the old maximum (or with none, e.g. after a timeout: RFC 9438 4.8) the curve
        # starts at its plateau: K = 0 and W_max = cwnd_epoch.
        self._w_max = max(self._w_max, cwnd_epoch)
        self._k = math.cbrt((self._w_max - cwnd_epoch) / self.mss / self.C)
        self._w_est = cwnd_epoch
        self._epoch_start = now

    def set_mss(self, mss: int) -> None:
        """Adopt a new MSS; a running epoch restarts, since K was computed in old segments."""
        super().set_mss(mss)
        self._epoch_start = None

    def on_ack(self, acked_bytes: int, now: float, rtt: float | None, bytes_in_flight: int) -> None:
        """Track the minimum RTT and pause the epoch clock while app-limited, then grow."""
        if rtt is not None and rtt > 0:
            self._min_rtt = rtt if self._min_rtt is None else min(self._min_rtt, rtt)
            if self.cwnd < self.ssthresh:
                self._hystart(rtt, now)
        if (
            self._epoch_start is not None
            and self._last_ack_time is not None
            and not self._is_cwnd_limited(bytes_in_flight)
        ):
            # The window was not being tested since the last ACK; shifting the epoch start
            # keeps t at the time actually spent probing.
            self._epoch_start += max(now - self._last_ack_time, 0.0)
        self._last_ack_time = now
        CongestionControl.on_ack(self, acked_bytes, now, rtt, bytes_in_flight)  # (as above)

    def _slow_start(self, acked_bytes: int) -> int:
        if self._css_rounds is not None:
            acked_bytes = max(acked_bytes // 4, 1)  # conservative slow start: a quarter pace
        return super()._slow_start(acked_bytes)

    def _hystart(self, rtt: float, now: float) -> None:
        """Slow start: on a rise in delay go on gently, and leave it if the rise lasts."""
        if self._round_end is None or now >= self._round_end:
            self._last_round_min = self._round_min
            self._round_min = math.inf
            self._round_samples = 0
            self._round_end = now + (self._min_rtt or rtt)
            if self._css_rounds is not None:
                self._css_rounds += 1
                if self._css_rounds >= 5:  # the delay stayed up: the queue is real
                    self._css_rounds = None
                    self.ssthresh = self.cwnd
                    return
        self._round_samples += 1
        self._round_min = min(self._round_min, rtt)
        last = self._last_round_min
        if self._round_samples < 8 or last == math.inf:
            return
        if self._css_rounds is not None:
            if self._round_min < self._css_base:
                self._css_rounds = None  # it was jitter: back to full slow start
            return
        eta = min(max(last / 8, 0.004), 0.016)
        if self._round_min >= last + eta and self.cwnd >= 16 * self.mss:
            self._css_rounds = 0
            self._css_base = self._round_min

    def _ca_increase(self, acked_bytes: int, now: float, rtt: float | None) -> None:
        """RFC 9438 4.2-4.4: follow the cubic, or W_est where Reno would be faster."""
        epoch_start = self._epoch_start
        if epoch_start is None:
            self._start_epoch(now)
            epoch_start = now
        t = max(now - epoch_start, 0.0)
        delay = self._min_rtt if self._min_rtt is not None else (rtt or 0.0)
        cwnd = self.cwnd + self._cwnd_frac
        mss = self.mss

        # Reno-friendly estimate: alpha segments per window of ACKed bytes, and Reno's own
        # 1 segment once it has regained the window it had before the last reduction.
        alpha = 1.0 if self._w_est >= self._cwnd_prior else self.ALPHA
        self._w_est += alpha * mss * acked_bytes / cwnd

        if self._w_cubic(t) < self._w_est:
            self._grow_cwnd(self._w_est - cwnd)
            return
        target = min(max(self._w_cubic(t + delay), cwnd), 1.5 * cwnd)
        # (target - cwnd) / cwnd segments per segment ACKed, so cwnd reaches the target
        # within about one RTT.
        self._grow_cwnd((target - cwnd) * acked_bytes / cwnd)

    def _loss_ssthresh(self, bytes_in_flight: int) -> int:
        """RFC 9438 4.6: ``max(flight_size * beta, 2*MSS)``."""
        return max(int(bytes_in_flight * self.BETA), 2 * self.mss)

    def on_congestion_event(self, now: float, bytes_in_flight: int) -> None:
        """Record W_max (with fast convergence), then reduce by beta and end the epoch."""
        cwnd = float(self.cwnd)
        if self.FAST_CONVERGENCE and cwnd < self._w_max:
            # Lost below the last maximum: the available share is shrinking, so aim lower.
            self._w_max = cwnd * (1 + self.BETA) / 2
        else:
            self._w_max = cwnd
        self._cwnd_prior = cwnd
        self._epoch_start = None
        self._css_rounds = None
        super().on_congestion_event(now, bytes_in_flight)

    def on_retransmission_timeout(self, now: float, bytes_in_flight: int) -> None:
        """Loss window; the next epoch starts with K = 0 from the window it has then (4.8)."""
        if not self._timeout_backoff:
            self._cwnd_prior = float(self.cwnd)
        self._w_max = 0.0
        self._epoch_start = None
        super().on_retransmission_timeout(now, bytes_in_flight)

    def describe(self) -> dict[str, float]:
        """The common snapshot plus CUBIC state (``min_rtt`` 0 means no sample yet)."""
        stats = super().describe()
        stats.update(
            w_max=self._w_max,
            k=self._k,
            w_est=self._w_est,
            cwnd_prior=self._cwnd_prior,
            min_rtt=self._min_rtt or 0.0,
        )
        return stats


CONGESTION_CONTROLS: dict[str, type[CongestionControl]] = {"newreno": NewReno, "cubic": Cubic}
"""Algorithms by name, for configuration."""

DEFAULT_CONGESTION_CONTROL: Final = "cubic"
"""The algorithm used when none is configured."""


def make_congestion_control(
    name: str, mss: int, initial_window: int | None = None
) -> CongestionControl:
    """A fresh instance of the algorithm registered as ``name`` (case-insensitive)."""
    cls = CONGESTION_CONTROLS.get(name)  # (the name as configured: no lower() per subflow)
    if cls is None:
        cls = CONGESTION_CONTROLS.get(name.lower())
        if cls is None:
            known = ", ".join(sorted(CONGESTION_CONTROLS))
            raise ValueError(f"unknown congestion control {name!r}; known: {known}")
    return cls(mss, initial_window)

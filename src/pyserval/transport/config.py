"""Settings of Serval TCP streams (one frozen object shared by many connections).

A :mod:`pyserval.config` dataclass: checked once when built (pydantic), read per packet as
a plain slotted dataclass.
"""

from __future__ import annotations

from pydantic import Field
from pydantic.dataclasses import dataclass

from ..config import CONFIG
from ..sal.control import ControlTimers

__all__ = ["StreamConfig"]


@dataclass(frozen=True, slots=True, config=CONFIG)
class StreamConfig:
    """Per-connection settings. Sizes in bytes, times in seconds."""

    mss: int = 1408  # the reference sent 1408-byte segments
    send_buffer: int = 1 << 20
    receive_buffer: int = 1 << 20
    congestion: str = "cubic"
    sack: bool = True
    delayed_ack: float = Field(default=0.04, ge=0.0)
    ack_every: int = Field(default=2, ge=1)  # full-sized segments per ACK when in order
    initial_rto: float = Field(default=1.0, gt=0.0)
    min_rto: float = Field(default=0.2, gt=0.0)
    max_rto: float = Field(default=60.0, gt=0.0)
    # consecutive data RTOs before the connection times out
    max_retransmissions: int = Field(default=15, ge=0)
    # A tail loss probe (RACK-TLP, RFC 8985 section 7): when the ACKs of a flight stop
    # coming for about two round trips (plus our delayed-ACK time when one segment is
    # out), one segment goes again, so that a lost tail is repaired by SACK or duplicate
    # ACK recovery instead of waiting for the retransmission timeout. Off by default:
    # where ACKs are late without any loss (100 streams into one loopback host: 194 to 332
    # probes a run and no drop) a resent probe cannot be told from a repair without DSACK,
    # which our receivers do not send, so it counts as a loss (RFC 8985 7.4) and the
    # window shrinks: 194-262 MB/s against 266-298 with it off. For lossy paths with a
    # steady RTT, turn it on.
    tail_loss_probe: bool = False
    time_wait: float = Field(default=30.0, ge=0.0)
    # The compact close (transport.close_state): offered in our SYN and agreed in the
    # SYN-ACK when both ends are pyserval and both ask for it; each side's SAL FIN then
    # rides on its TCP FIN, and a connection closes in 3 packets instead of 5 (a
    # connect-and-close cycle is 6, not 8). A peer that does not know the option (the
    # reference) closes as the spec says. Single-path connections only. Off by default:
    # it saves packets and CPU (8.7% of the instructions of a connect-and-close cycle),
    # but on the 2-vCPU VM we measure on, a strict one-at-a-time connect loop between two
    # processes on two CPUs ran 14% slower with it (README "Benchmarks", sixth session).
    compact_close: bool = False
    idle_timeout: float | None = None  # abort after this long without hearing from the peer
    # Liveness, on by default (README "NATs"), as Linux's TCP_KEEPIDLE/KEEPINTVL/KEEPCNT:
    # with nothing heard from the peer for `keepalive` seconds a probe goes out, then one
    # every `keepalive_interval` seconds while the silence lasts; when `keepalive_probes`
    # probes went unanswered (one interval after the last) the peer is taken for dead.
    # 15 s keeps UDP NAT mappings open (common timeouts are 30 s and more); with 9 probes
    # 5 s apart a dead peer is found 60 s after it was last heard, and a live one behind
    # heavy loss is not (each probe and its answer is another chance). None: no probes.
    keepalive: float | None = 15.0
    keepalive_interval: float = 5.0
    keepalive_probes: int = 9
    # RFC 5482's user timeout: give up when data sent stays unacknowledged this long (a
    # peer that stopped answering), whatever the retransmission backoff. None: only
    # `max_retransmissions` ends it.
    user_timeout: float | None = 60.0
    control: ControlTimers = Field(default_factory=ControlTimers)
    max_half_open: int = Field(default=500, ge=0)  # per listener, SYNs answered, not completed
    # Multipath: offer it in our SYNs (client), accept it when offered (server), and the
    # scheduler of a multipath connection ("lowest_rtt", "redundant", or one registered
    # with transport.multipath.register_scheduler).
    multipath: bool = False
    accept_multipath: bool = True
    scheduler: str = "lowest_rtt"

    def __post_init__(self) -> None:
        if not 64 <= self.mss <= 65000:
            raise ValueError(f"mss must be 64..65000: {self.mss}")
        if self.send_buffer < self.mss or self.receive_buffer < self.mss:
            raise ValueError("send and receive buffers must hold at least one segment")
        from .multipath import get_scheduler  # here: multipath needs this module's users

        get_scheduler(self.scheduler)  # an unknown name fails here, naming the known ones
        if self.keepalive is not None and not self.keepalive > 0:
            raise ValueError(f"keepalive must be positive seconds or None: {self.keepalive}")
        if not self.keepalive_interval > 0:
            raise ValueError(f"keepalive_interval must be positive: {self.keepalive_interval}")
        if self.keepalive_probes < 1:
            raise ValueError(f"keepalive_probes must be at least 1: {self.keepalive_probes}")
        if self.user_timeout is not None and not self.user_timeout > 0:
            raise ValueError(f"user_timeout must be positive seconds or None: {self.user_timeout}")
        if self.idle_timeout is not None and not self.idle_timeout > 0:
            raise ValueError(f"idle_timeout must be positive seconds or None: {self.idle_timeout}")
        if self.receive_buffer > 0x3FFFFFFF:
            raise ValueError("receive_buffer must be below 1 GiB (window scale limit)")
        if self.min_rto > self.max_rto:
            raise ValueError(f"min_rto must not exceed max_rto: {self.min_rto} > {self.max_rto}")

    @property
    def window_scale(self) -> int:
        """The smallest shift that lets the 16-bit window field cover the receive buffer."""
        # buffer >> shift <= 0xFFFF exactly when the buffer has at most 16 + shift bits
        # (read by every new subflow: no loop).
        return (self.receive_buffer >> 16).bit_length()

"""Settings of Serval TCP streams (one frozen object shared by many connections)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..sal.control import ControlTimers

__all__ = ["StreamConfig"]


@dataclass(frozen=True, slots=True)
class StreamConfig:
    """Per-connection settings. Sizes in bytes, times in seconds."""

    mss: int = 1408  # the reference sent 1408-byte segments
    send_buffer: int = 1 << 20
    receive_buffer: int = 1 << 20
    congestion: str = "cubic"
    sack: bool = True
    delayed_ack: float = 0.04
    ack_every: int = 2  # full-sized segments per ACK when in order
    initial_rto: float = 1.0
    min_rto: float = 0.2
    max_rto: float = 60.0
    max_retransmissions: int = 15  # consecutive data RTOs before the connection times out
    time_wait: float = 30.0
    idle_timeout: float | None = None  # abort after this long without hearing from the peer
    keepalive: float | None = None  # probe after this long idle (needs idle_timeout to end)
    control: ControlTimers = field(default_factory=ControlTimers)
    max_half_open: int = 500  # per listener, SYNs answered but not yet completed
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
        if self.receive_buffer > 0x3FFFFFFF:
            raise ValueError("receive_buffer must be below 1 GiB (window scale limit)")

    @property
    def window_scale(self) -> int:
        """The smallest shift that lets the 16-bit window field cover the receive buffer."""
        shift = 0
        while (self.receive_buffer >> shift) > 0xFFFF:
            shift += 1
        return shift

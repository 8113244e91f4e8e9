"""The SAL control plane of one flow: nonces, control sequence numbers, retransmission.

Sans-I/O: methods take ``now`` and return what to send; nothing here reads a clock.

Control numbers follow ``shared/spec/sal-wire.md``: each side picks a random initial verno;
SYN, FIN and RSYN consume one number each, pure ACKs none; ackno is the next verno expected
from the peer. Control packets are sent stop-and-wait (one outstanding) and retransmitted
with an RTO that starts at 1 s (RFC 6298's initial RTO; the reference used 3 s, RFC 1122's),
doubles per retry within [200 ms, 120 s], and gives up after 15 retries.
"""

from __future__ import annotations

import random
from typing import Final

from pydantic import Field
from pydantic.dataclasses import dataclass

from ..config import CONFIG
from .extensions import NONCE_BYTES, ControlExt, ControlFlags, control_ext

__all__ = ["ControlChannel", "ControlTimers", "ControlTimeout"]

MASK32: Final = 0xFFFFFFFF


@dataclass(frozen=True, slots=True, config=CONFIG)
class ControlTimers:
    """Control retransmission settings (seconds): a :mod:`pyserval.config` dataclass."""

    # 1 s as RFC 6298 (2.1) recommends: a SYN sent to a replica that just died is retried
    # (and resolved again, so it reaches a live one) after 1 s, not the reference's 3 s.
    initial_rto: float = Field(default=1.0, gt=0.0)
    min_rto: float = Field(default=0.2, gt=0.0)
    max_rto: float = 120.0
    max_retries: int = Field(default=15, ge=0)

    def __post_init__(self) -> None:
        if not 0 < self.min_rto <= self.max_rto:
            raise ValueError("need 0 < min_rto <= max_rto")
        if self.max_retries < 0:
            raise ValueError("max_retries must be >= 0")


class ControlTimeout(Exception):
    """A control packet was retransmitted ``max_retries`` times without an answer."""


class ControlChannel:
    """Control state of one SAL flow.

    ``outstanding`` is the one control packet awaiting acknowledgement, as the flags it was
    sent with; the owner rebuilds the whole packet (it may carry a transport header) when
    :meth:`due` says it is time to retransmit.
    """

    __slots__ = (
        "local_nonce",
        "peer_nonce",
        "snd_verno",
        "rcv_ackno",
        "outstanding",
        "outstanding_verno",
        "retries",
        "rto",
        "deadline",
        "timers",
        "ignored",
        "max_retries",
    )

    def __init__(self, rng: random.Random, timers: ControlTimers | None = None) -> None:
        self.timers = timers = timers or ControlTimers()
        self.local_nonce: bytes = rng.getrandbits(64).to_bytes(NONCE_BYTES, "big")
        self.peer_nonce: bytes | None = None
        self.snd_verno: int = rng.getrandbits(32)  # next verno this side will consume
        self.rcv_ackno: int = 0  # next verno expected from the peer
        self.outstanding: int | None = None  # flags of the unacknowledged control packet
        self.outstanding_verno = 0
        self.retries = 0
        self.rto = timers.initial_rto
        self.deadline: float | None = None
        self.ignored = 0  # control packets dropped for a wrong nonce or stale numbers
        self.max_retries = timers.max_retries  # lowered for answers to strangers

    # -- building -----------------------------------------------------------------------
    def ext(self, flags: int, verno: int | None = None) -> ControlExt:
        """A CONTROL extension with our nonce and the current numbers."""
        # Our nonce is eight bytes by construction: the constructor's check is not needed.
        return control_ext(
            flags, self.snd_verno if verno is None else verno, self.rcv_ackno, self.local_nonce
        )

    def send_reliable(self, flags: int, now: float) -> ControlExt:
        """Start a control exchange that consumes a number (SYN, FIN, RSYN, SYN+ACK)."""
        verno = self.snd_verno
        self.snd_verno = (verno + 1) & MASK32
        self.outstanding = flags
        self.outstanding_verno = verno
        self.retries = 0
        self.deadline = now + self.rto
        return self.ext(flags, verno)

    def resend(self) -> ControlExt:
        """The outstanding control extension again (same numbers)."""
        assert self.outstanding is not None
        return self.ext(self.outstanding, self.outstanding_verno)

    def due(self, now: float) -> bool:
        """Whether the outstanding control packet must be retransmitted now.

        Raises :class:`ControlTimeout` once the retries are used up.
        """
        if self.outstanding is None or self.deadline is None or now < self.deadline:
            return False
        if self.retries >= self.max_retries:
            self.deadline = None
            raise ControlTimeout(f"no answer after {self.retries} retransmissions")
        self.retries += 1
        self.rto = min(max(self.rto * 2, self.timers.min_rto), self.timers.max_rto)
        self.deadline = now + self.rto
        return True

    # -- receiving ----------------------------------------------------------------------
    def nonce_ok(self, ext: ControlExt) -> bool:
        """Whether ``ext`` carries the nonce the peer announced (counted when not)."""
        if self.peer_nonce is not None and ext.nonce == self.peer_nonce:
            return True
        self.ignored += 1
        return False

    def acked(self, ext: ControlExt) -> bool:
        """Whether ``ext`` (with ACK) acknowledges our outstanding control packet."""
        if self.outstanding is None or not ext.flags & ControlFlags.ACK:
            return False
        return ext.ackno == ((self.outstanding_verno + 1) & MASK32)

    def complete(self) -> None:
        """The outstanding exchange was acknowledged: stop retransmitting, reset the RTO."""
        self.outstanding = None
        self.deadline = None
        self.retries = 0
        self.rto = self.timers.initial_rto

    def peer_consumed(self, verno: int) -> bool:
        """Record a number-consuming control packet from the peer (SYN, FIN, RSYN).

        Returns False for a duplicate (already seen: answer it again, change nothing).
        """
        expected = self.rcv_ackno
        if verno == ((expected - 1) & MASK32):
            return False
        self.rcv_ackno = (verno + 1) & MASK32
        return True

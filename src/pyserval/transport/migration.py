"""Moved to :mod:`pyserval.transport.flows.migration`; this name stays for old imports."""

from .flows.migration import (
    AMPLIFICATION_LIMIT,
    CHALLENGE,
    CHALLENGE_TRIES,
    HELD_BYTES,
    HELD_PACKETS,
    Challenge,
    MigrationState,
)

__all__ = [
    "AMPLIFICATION_LIMIT",
    "CHALLENGE",
    "CHALLENGE_TRIES",
    "HELD_BYTES",
    "HELD_PACKETS",
    "Challenge",
    "MigrationState",
]

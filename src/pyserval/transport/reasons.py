"""Why a connection ended or moved, as enums instead of free text.

The values are the strings pyserval logged before these enums existed, so log lines and
metrics labels keep their spelling, and a ``StrEnum`` still compares equal to its string.
A connection's ``error`` text may carry details after the reason ("timed out: idle",
"protocol violation: window beyond the buffer"): :func:`close_reason` finds the reason
those details belong to, so code above decides by the enum, never by matching text.

What this module does not do: decide anything. The connection and the host core set the
texts; the runtime maps a :class:`CloseReason` to the exception a user sees.
"""

from __future__ import annotations

import enum

from ..errors import (
    ServalConnectError,
    ServalConnectRefused,
    ServalConnectTimeout,
    ServalConnectUnreachable,
)

__all__ = ["CloseReason", "MigrationReason", "close_reason", "connect_error_class"]


class CloseReason(enum.StrEnum):
    """Why a connection closed without a clean FIN exchange (the start of its ``error``)."""

    RESET_BY_PEER = "reset by peer"
    """The peer sent a RST (during the handshake: the connection was refused)."""
    ABORTED_LOCALLY = "aborted locally"
    """The application aborted it."""
    LISTENER_CLOSED = "listener closed"
    """Its listener closed before the application accepted it."""
    SYN_COOKIE_MISMATCH = "SYN cookie mismatch"
    """The handshake's SYN cookie did not check out."""
    PROTOCOL_VIOLATION = "protocol violation"
    """The peer broke the protocol; we reset it."""
    INTERNAL_ERROR = "internal error"
    """A bug in pyserval closed the connection instead of crashing the host."""
    TIMED_OUT = "timed out"
    """Retransmissions, keepalives or the user/idle timeout ran out."""
    NO_ROUTE = "no route to service"
    """No service table rule leads to the service (a SYN could not go out)."""
    SERVICE_UNREACHABLE = "service unreachable"
    """The network answered that the service is unreachable where the SYN went."""


_BY_LENGTH = sorted(CloseReason, key=lambda r: -len(r.value))


def close_reason(error: str | None) -> CloseReason | None:
    """The :class:`CloseReason` a connection's ``error`` text starts with (None for a
    connection without an error, or a text that starts with none of them)."""
    if not error:
        return None
    for reason in _BY_LENGTH:
        if error.startswith(reason.value):
            return reason
    return None


_CONNECT_ERRORS: dict[CloseReason | None, type[ServalConnectError]] = {
    CloseReason.RESET_BY_PEER: ServalConnectRefused,
    CloseReason.TIMED_OUT: ServalConnectTimeout,
    CloseReason.NO_ROUTE: ServalConnectUnreachable,
    CloseReason.SERVICE_UNREACHABLE: ServalConnectUnreachable,
}


def connect_error_class(error: str | None) -> type[ServalConnectError]:
    """The exception a failed connect raises for the connection's ``error`` text: refused
    (reset), timed out, unreachable (no route, bounced), else :class:`ServalConnectError`."""
    return _CONNECT_ERRORS.get(close_reason(error), ServalConnectError)


class MigrationReason(enum.StrEnum):
    """Why a flow moved to new addresses (``FlowMigrated.reason``)."""

    MIGRATED = "migrated"
    """We moved (the application called ``migrate``)."""
    PEER_MOVED = "peer_moved"
    """The peer moved (its RSYN came from a new address)."""
    REBINDING = "rebinding"
    """The peer was seen behind a NAT at a new address (a rebinding, no RSYN)."""

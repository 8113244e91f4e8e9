"""The exceptions pyserval raises, as one small hierarchy.

Everything pyserval raises on purpose is a :class:`ServalError`, and where a standard
exception says the same thing it is that too, so code written for sockets keeps working::

    ServalError
    +-- ServalConnectError (ConnectionError)         connect() failed
    |   +-- ServalConnectUnreachable                 no route, no instance, bounced
    |   +-- ServalConnectRefused (ConnectionRefusedError)   reset by the peer
    |   +-- ServalConnectTimeout (TimeoutError)      no answer within the timeout
    |   +-- ServalSecurityError (runtime.secure)     the peer did not prove the serviceID
    +-- ServalMigrationError                         migrate()/add_path() failed
    +-- ConnectionStateError                         a sans-I/O Connection used in the wrong
    |                                                state (write after shutdown, ...)
    +-- NoRoute                                      datagram: no rule leads to the service
    +-- DatagramTooLarge (ValueError)                datagram: above the size limit
    +-- FlowTableFull (RuntimeError)                 no flowID left (``max_flows``)
    +-- HostClosed (RuntimeError)                    a closed Host cannot run again
    +-- SocketClosed (OSError)                       ServalSocket closed or in the wrong state

Streams (``ServalStream``, ``ServalDatagramStream``) raise anyio's exceptions instead, as
``anyio.abc.ByteStream`` promises: ``anyio.ClosedResourceError`` after our own ``aclose``
or ``send_eof``, ``anyio.BrokenResourceError`` once the connection was lost (reset, timed
out), ``anyio.EndOfStream`` when the peer finished.

This module imports nothing from pyserval, so every layer (``sal`` up to ``cli``) can raise
these without importing upward. The old homes of these names (``pyserval.core.host.NoRoute``,
``pyserval.transport.connection.ConnectionError_``, ...) re-export them. Errors of one
component that never reach a user of the package (malformed packets, control-message
parsing, etcd) stay in their modules.
"""

from __future__ import annotations

__all__ = [
    "ConnectionStateError",
    "DatagramTooLarge",
    "FlowTableFull",
    "HostClosed",
    "NoRoute",
    "ServalConnectError",
    "ServalConnectRefused",
    "ServalConnectTimeout",
    "ServalConnectUnreachable",
    "ServalError",
    "ServalMigrationError",
    "SocketClosed",
]


class ServalError(Exception):
    """Base of every exception pyserval raises on purpose."""


class ServalConnectError(ServalError, ConnectionError):
    """A connection to a service could not be set up. The subclasses say why; one that is
    none of them (a protocol violation, an internal error) is this class itself."""


class ServalConnectUnreachable(ServalConnectError):
    """No instance of the service could be reached: no service table rule leads to it, or
    the network answered that it is unreachable (a router or host without the service)."""


class ServalConnectRefused(ServalConnectError, ConnectionRefusedError):
    """The peer reset the handshake (as a TCP RST to a SYN: connection refused)."""


class ServalConnectTimeout(ServalConnectError, TimeoutError):
    """``connect`` got no answer within its ``timeout`` (or the handshake's retransmissions
    ran out): a :class:`ServalConnectError` and a :class:`TimeoutError`."""


class ServalMigrationError(ServalError):
    """A connection could not move to another address (or open another path)."""


class ConnectionStateError(ServalError):
    """A sans-I/O connection was used in a state that does not allow it: writing after
    shutdown, using a closed one, adding a path to one that is not multipath. Streams turn
    it into anyio's exceptions; it reaches users of the sans-I/O layer only."""


class NoRoute(ServalError):
    """An unconnected datagram: no service table rule leads to the service."""


class DatagramTooLarge(ServalError, ValueError):
    """A datagram is larger than one SAL datagram can carry."""


class FlowTableFull(ServalError, RuntimeError):
    """No room for another flow (the flow table's ``max_flows`` is reached)."""


class HostClosed(ServalError, RuntimeError):
    """The host was closed: it does not run again (create a new ``Host``)."""


class SocketClosed(ServalError, OSError):
    """An operation on a closed ``ServalSocket`` (or one in the wrong state for it)."""

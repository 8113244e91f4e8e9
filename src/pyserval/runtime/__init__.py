"""The asyncio runtime: UDP encapsulation endpoints, the host, sockets and streams."""

from .api import connect, default_host, listen, open_connection, start_server
from .busy_poll import BusyPollSelector, busy_poll_loop
from .datagram_streams import ServalDatagramListener, ServalDatagramStream
from .host import Host, HostClosed, HostConfig, parse_address
from .install import Installation, install
from .socket import DatagramError, ServalSocket, SocketClosed
from .streams import (
    ServalConnectError,
    ServalConnectRefused,
    ServalConnectTimeout,
    ServalConnectUnreachable,
    ServalListener,
    ServalMigrationError,
    ServalStream,
)

__all__ = [
    "BusyPollSelector",
    "busy_poll_loop",
    "DatagramError",
    "Host",
    "HostClosed",
    "HostConfig",
    "Installation",
    "ServalConnectError",
    "ServalConnectRefused",
    "ServalConnectTimeout",
    "ServalConnectUnreachable",
    "ServalDatagramListener",
    "ServalDatagramStream",
    "ServalMigrationError",
    "ServalListener",
    "ServalSocket",
    "ServalStream",
    "SocketClosed",
    "connect",
    "default_host",
    "install",
    "listen",
    "open_connection",
    "parse_address",
    "start_server",
]

"""pyserval: service-centric networking (Serval) for asyncio programs.

Programs talk to *services* named by 256-bit serviceIDs, not to hosts; flows are named by
host-local flowIDs and survive address changes::

    import pyserval
    stream = await pyserval.connect("echo")       # late-bound by serviceID
    await stream.send(b"hello"); reply = await stream.receive()
"""

import importlib
import logging as _logging
from typing import Any

from .control import (
    HostServiceController,
    Router,
    fetch_table,
    format_table,
)
from .errors import (
    ConnectionStateError,
    DatagramTooLarge,
    FlowTableFull,
    HostClosed,
    NoRoute,
    ServalConnectError,
    ServalConnectRefused,
    ServalConnectTimeout,
    ServalConnectUnreachable,
    ServalError,
    ServalMigrationError,
    SocketClosed,
)
from .naming import FlowID, ServiceID, ServiceKey, ServicePrefix, ServicePublicKey
from .naming.delegation import Delegation
from .runtime import (
    BusyPollSelector,
    DatagramError,
    Host,
    HostConfig,
    Installation,
    ServalDatagramListener,
    ServalDatagramStream,
    ServalListener,
    ServalSocket,
    ServalStream,
    busy_poll_loop,
    connect,
    default_host,
    install,
    listen,
    open_connection,
    start_server,
)
from .runtime.secure import SecureListener, SecureStream, SecurityReason, ServalSecurityError
from .runtime.service_events import ServiceEvent, ServiceEventKind
from .sal.inet import Address
from .tools.pcap import PcapWriter
from .translator import Translator
from .transport.config import StreamConfig
from .transport.reasons import CloseReason, MigrationReason

# A library logs, the application decides where to: silent unless logging is configured
# (loggers: pyserval.host, pyserval.router, pyserval.controller, pyserval.translator).
_logging.getLogger("pyserval").addHandler(_logging.NullHandler())

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # ``pyserval.http`` (httpx transport, ASGI server) needs the optional [http] extra: it is
    # imported on first use, so ``import pyserval`` works without httpx and h11.
    if name == "http":
        return importlib.import_module(".http", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "HostServiceController",
    "BusyPollSelector",
    "busy_poll_loop",
    "Address",
    "CloseReason",
    "ConnectionStateError",
    "DatagramTooLarge",
    "FlowTableFull",
    "MigrationReason",
    "NoRoute",
    "ServalConnectRefused",
    "ServalConnectUnreachable",
    "ServalError",
    "DatagramError",
    "Delegation",
    "FlowID",
    "Host",
    "HostClosed",
    "HostConfig",
    "Installation",
    "PcapWriter",
    "Router",
    "ServalConnectError",
    "ServalConnectTimeout",
    "ServalDatagramListener",
    "ServalDatagramStream",
    "ServalMigrationError",
    "ServalSecurityError",
    "SecureListener",
    "SecureStream",
    "SecurityReason",
    "ServalListener",
    "ServalSocket",
    "ServalStream",
    "StreamConfig",
    "SocketClosed",
    "Translator",
    "ServiceID",
    "ServiceKey",
    "ServicePrefix",
    "ServiceEvent",
    "ServiceEventKind",
    "ServicePublicKey",
    "__version__",
    "connect",
    "default_host",
    "fetch_table",
    "format_table",
    "install",
    "listen",
    "open_connection",
    "start_server",
]

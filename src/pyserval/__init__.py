"""pyserval: service-centric networking (Serval) for asyncio programs.

Programs talk to *services* named by 256-bit serviceIDs, not to hosts; flows are named by
host-local flowIDs and survive address changes::

    import pyserval
    stream = await pyserval.connect("echo")       # late-bound by serviceID
    await stream.send(b"hello"); reply = await stream.receive()
"""

from .naming import FlowID, ServiceID, ServiceKey, ServicePrefix, ServicePublicKey
from .runtime import (
    Host,
    HostConfig,
    ServalConnectError,
    ServalListener,
    ServalSocket,
    ServalStream,
    SocketClosed,
    connect,
    default_host,
    listen,
    open_connection,
    start_server,
)

__version__ = "0.1.0"

__all__ = [
    "FlowID",
    "Host",
    "HostConfig",
    "ServalConnectError",
    "ServalListener",
    "ServalSocket",
    "ServalStream",
    "SocketClosed",
    "ServiceID",
    "ServiceKey",
    "ServicePrefix",
    "ServicePublicKey",
    "__version__",
    "connect",
    "default_host",
    "listen",
    "open_connection",
    "start_server",
]

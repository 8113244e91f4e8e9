"""pyserval: service-centric networking (Serval) for asyncio programs.

Programs talk to *services* named by 256-bit serviceIDs, not to hosts; flows are named by
host-local flowIDs and survive address changes::

    import pyserval
    stream = await pyserval.connect("echo")       # late-bound by serviceID
    await stream.send(b"hello"); reply = await stream.receive()
"""

from .control import (
    HostServiceController,
    Router,
    fetch_table,
    format_table,
)
from .naming import FlowID, ServiceID, ServiceKey, ServicePrefix, ServicePublicKey
from .runtime import (
    Host,
    HostConfig,
    Installation,
    ServalConnectError,
    ServalDatagramListener,
    ServalDatagramStream,
    ServalListener,
    ServalMigrationError,
    ServalSocket,
    ServalStream,
    SocketClosed,
    connect,
    default_host,
    install,
    listen,
    open_connection,
    start_server,
)
from .runtime.host import install_controller_factory
from .runtime.service_events import ServiceEvent, ServiceEventKind
from .translator import Translator
from .transport.config import StreamConfig

# The control plane sits above the runtime: the package root wires it in.
install_controller_factory(HostServiceController)

__version__ = "0.1.0"

__all__ = [
    "FlowID",
    "Host",
    "HostConfig",
    "Installation",
    "Router",
    "ServalConnectError",
    "ServalDatagramListener",
    "ServalDatagramStream",
    "ServalMigrationError",
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

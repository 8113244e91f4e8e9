"""pyserval: service-centric networking (Serval) for asyncio programs.

Programs talk to *services* named by 256-bit serviceIDs, not to hosts; flows are named by
host-local flowIDs and survive address changes.
"""

from .naming import FlowID, ServiceID, ServiceKey, ServicePrefix, ServicePublicKey

__version__ = "0.1.0"

__all__ = ["FlowID", "ServiceID", "ServiceKey", "ServicePrefix", "ServicePublicKey", "__version__"]

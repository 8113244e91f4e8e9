"""The TCP <-> Serval translator: legacy TCP clients and servers on either side of Serval.

``Translator("tcp:127.0.0.1:8080", "service:web", router=...)`` turns each TCP connection
into a Serval stream (inbound); ``Translator("service:web", "tcp:127.0.0.1:80", router=...)``
turns each Serval stream into a TCP connection (outbound). ``pyserval translate`` is the
command-line form.
"""

from .relay import DEFAULT_CHUNK, Relay, TcpPipe
from .translator import (
    Endpoint,
    ServiceEndpoint,
    TcpEndpoint,
    TranslatedConnection,
    Translator,
    TranslatorStats,
    parse_endpoint,
)

__all__ = [
    "DEFAULT_CHUNK",
    "Endpoint",
    "Relay",
    "ServiceEndpoint",
    "TcpEndpoint",
    "TcpPipe",
    "TranslatedConnection",
    "Translator",
    "TranslatorStats",
    "parse_endpoint",
]

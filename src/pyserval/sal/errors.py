"""The one error a decoder raises, with a machine-readable reason."""

from __future__ import annotations

import enum

__all__ = ["MalformedPacket", "Reason"]


class Reason(enum.StrEnum):
    """Why a packet was rejected; hosts count drops by these values."""

    SHORT_HEADER = "short_header"
    BAD_SHL = "bad_shl"
    SHL_PAST_END = "shl_past_end"
    BAD_CHECKSUM = "bad_checksum"
    BAD_PROTOCOL = "bad_protocol"
    EXTENSION_TRUNCATED = "extension_truncated"
    EXTENSION_LENGTH = "extension_length"
    EXTENSION_RESERVED = "extension_reserved"
    TOO_MANY_EXTENSIONS = "too_many_extensions"
    CONTROL_LENGTH = "control_length"
    SERVICE_LENGTH = "service_length"
    ADDRESS_LENGTH = "address_length"
    SOURCE_LENGTH = "source_length"
    SOURCE_PORTS_LENGTH = "source_ports_length"
    MULTIPATH_LENGTH = "multipath_length"
    IP6_LENGTH = "ip6_length"
    TCP_TRUNCATED = "tcp_truncated"
    TCP_DATA_OFFSET = "tcp_data_offset"
    TCP_OPTION = "tcp_option"
    UDP_TRUNCATED = "udp_truncated"
    UDP_LENGTH = "udp_length"
    TRANSPORT_TRUNCATED = "transport_truncated"


class MalformedPacket(ValueError):
    """A packet that does not follow the SAL wire format.

    ``reason`` is a :class:`Reason` (a ``str``), suitable as a counter key; the message adds
    the detail a person needs.
    """

    def __init__(self, reason: Reason, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason.value}: {detail}" if detail else reason.value)

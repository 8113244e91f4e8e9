"""The Service Access Layer: wire format, service table, flow table.

Nothing here does I/O or reads a clock.
"""

from .checksum import internet_checksum, transport_checksum
from .errors import MalformedPacket, Reason
from .extensions import (
    AddAddrExt,
    Address6Ext,
    AddressExt,
    ControlExt,
    ControlFlags,
    DssExt,
    Extension,
    ExtType,
    JoinExt,
    MpCapableExt,
    PadExt,
    ServiceExt,
    Source6Ext,
    SourceExt,
    SourcePortsExt,
    UnknownExt,
)
from .flow_table import FlowTable, FlowTableFull
from .packet import SalPacket, decode_packet
from .service_table import (
    Action,
    Entry,
    NoSuchEntry,
    Resolution,
    Rule,
    ServiceTable,
    ServiceTableFull,
    Target,
)
from .transport_headers import PROTO_TCP, PROTO_UDP, TcpFlags, TcpHeader, TcpOption, UdpHeader

__all__ = [
    "PROTO_TCP",
    "PROTO_UDP",
    "Action",
    "Address6Ext",
    "AddressExt",
    "ControlExt",
    "ControlFlags",
    "Entry",
    "ExtType",
    "Extension",
    "FlowTable",
    "FlowTableFull",
    "MalformedPacket",
    "NoSuchEntry",
    "PadExt",
    "Reason",
    "Resolution",
    "Rule",
    "SalPacket",
    "ServiceExt",
    "ServiceTable",
    "ServiceTableFull",
    "Source6Ext",
    "SourceExt",
    "SourcePortsExt",
    "MpCapableExt",
    "DssExt",
    "JoinExt",
    "AddAddrExt",
    "TcpFlags",
    "TcpHeader",
    "TcpOption",
    "Target",
    "UdpHeader",
    "UnknownExt",
    "decode_packet",
    "internet_checksum",
    "transport_checksum",
]

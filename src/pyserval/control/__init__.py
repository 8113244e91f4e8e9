"""The control plane: service controllers, service routers and their messages.

The messages, the router's checks (``security``), the host's controller logic
(``ControllerCore``) and the router's registry are sans-I/O: they take the time as an
argument. ``HostServiceController`` and ``Router`` put them on the asyncio runtime.
"""

from .controller import ControllerCore, HostServiceController
from .flows import FlowsService, fetch_flows, flow_infos, format_flows
from .inspection import TableService, enable_inspection
from .messages import (
    CONTROL_SERVICE,
    MAX_MESSAGE_BYTES,
    MAX_REGISTRATIONS,
    MAX_TARGETS,
    PROTOCOL_VERSION,
    TABLE_PAGE,
    AckMessage,
    BadControlMessage,
    ControlMessage,
    FlowInfo,
    FlowsReply,
    FlowsRequest,
    MessageKind,
    MessageTooLarge,
    PathInfo,
    RegisterMessage,
    Registration,
    RegistrationResult,
    TableEntryInfo,
    TableReply,
    TableRequest,
    TargetInfo,
    UnregisterMessage,
    decode_message,
    encode_message,
    format_instance_address,
    parse_instance_address,
)
from .registry import Instance, Registry
from .router import DEFAULT_ROUTER_PORT, Router, TableDump, fetch_table, format_table
from .security import REFUSAL_REASONS, RegistrationGuard, RegistrationRefused

__all__ = [
    "CONTROL_SERVICE",
    "DEFAULT_ROUTER_PORT",
    "ControllerCore",
    "HostServiceController",
    "Instance",
    "Registry",
    "Router",
    "TableDump",
    "TableService",
    "enable_inspection",
    "fetch_flows",
    "flow_infos",
    "format_flows",
    "FlowsService",
    "fetch_table",
    "format_table",
    "MAX_MESSAGE_BYTES",
    "MAX_REGISTRATIONS",
    "MAX_TARGETS",
    "PROTOCOL_VERSION",
    "REFUSAL_REASONS",
    "TABLE_PAGE",
    "AckMessage",
    "BadControlMessage",
    "ControlMessage",
    "FlowInfo",
    "FlowsReply",
    "FlowsRequest",
    "PathInfo",
    "MessageKind",
    "MessageTooLarge",
    "RegisterMessage",
    "Registration",
    "RegistrationGuard",
    "RegistrationRefused",
    "RegistrationResult",
    "TableEntryInfo",
    "TableReply",
    "TableRequest",
    "TargetInfo",
    "UnregisterMessage",
    "decode_message",
    "encode_message",
    "format_instance_address",
    "parse_instance_address",
]

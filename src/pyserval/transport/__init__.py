"""Serval transports: TCP streams, datagrams, congestion control (sans-I/O)."""

from .config import StreamConfig
from .congestion import (
    CONGESTION_CONTROLS,
    DEFAULT_CONGESTION_CONTROL,
    CongestionControl,
    Cubic,
    NewReno,
    make_congestion_control,
)
from .connection import Connection, ConnectionError_, ConnectionStateError, Role, State, Subflow
from .datagram_flow import DatagramConnection, DatagramTooLarge
from .events import (
    ConnectionClosed,
    ConnectionEstablished,
    ConnectionFailed,
    ConnectionReset,
    ConnectionTimedOut,
    DatagramReceived,
    DataReceived,
    Event,
    FlowMigrated,
    IncomingConnection,
    SendSpaceAvailable,
    StreamEnded,
)
from .reasons import CloseReason, MigrationReason

__all__ = [
    "CONGESTION_CONTROLS",
    "DEFAULT_CONGESTION_CONTROL",
    "CongestionControl",
    "Connection",
    "ConnectionClosed",
    "ConnectionError_",
    "ConnectionStateError",
    "CloseReason",
    "MigrationReason",
    "ConnectionEstablished",
    "ConnectionFailed",
    "ConnectionReset",
    "ConnectionTimedOut",
    "Cubic",
    "DataReceived",
    "DatagramConnection",
    "DatagramTooLarge",
    "DatagramReceived",
    "Event",
    "FlowMigrated",
    "IncomingConnection",
    "NewReno",
    "Role",
    "SendSpaceAvailable",
    "State",
    "StreamConfig",
    "StreamEnded",
    "Subflow",
    "make_congestion_control",
]

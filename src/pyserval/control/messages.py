"""Control-plane messages: service registration and table inspection (sans-I/O).

Control messages travel as the payload of SAL datagrams sent to :data:`CONTROL_SERVICE`;
replies go back to the address the request came from. Each message is one datagram::

    b"SV" | version (1 byte) | kind (1 byte) | body: compact UTF-8 JSON of the model

The body is the pydantic model of the kind (``model_dump_json``). Every model is frozen,
forbids unknown fields and is validated strictly (no ``"1"`` for ``1``, no ``1.0`` for an
int, no NaN or infinity), so anything :func:`decode_message` returns has every field within
its documented bounds. ``docs/control-protocol.md`` is the reference for the wire format.

A :class:`Registration` may be signed with the Ed25519 key that certifies its serviceID
(see :mod:`pyserval.naming.keys`); the signed bytes bind the operation (register or
unregister) so one cannot be replayed as the other.
"""

from __future__ import annotations

import ipaddress
import json
import string
from enum import IntEnum
from typing import Annotated, ClassVar, Final, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from ..naming.keys import ServiceKey, ServicePublicKey
from ..naming.service_id import SERVICE_ID_BITS, PrefixLike, ServiceID, ServicePrefix
from ..naming.service_id import as_service_prefix as _as_service_prefix
from ..sal.inet import Address

__all__ = [
    "CONTROL_SERVICE",
    "FLOWS_PAGE",
    "MAGIC",
    "MAX_COUNTERS",
    "MAX_MESSAGE_BYTES",
    "MAX_PATHS",
    "MAX_REGISTRATIONS",
    "MAX_TARGETS",
    "PROTOCOL_VERSION",
    "SIGNING_DOMAIN",
    "TABLE_PAGE",
    "AckMessage",
    "BadControlMessage",
    "ControlMessage",
    "FlowInfo",
    "FlowsReply",
    "FlowsRequest",
    "MessageKind",
    "MessageTooLarge",
    "PathInfo",
    "RegisterMessage",
    "Registration",
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

CONTROL_SERVICE: Final = ServiceID.from_name("pyserval.control")
"""The well-known serviceID of a router's control service."""

PROTOCOL_VERSION: Final = 1
MAGIC: Final = b"SV"
HEADER_BYTES: Final = 4
MAX_MESSAGE_BYTES: Final = 60_000
"""Largest encoded message (envelope included): fits one UDP datagram with SAL headers."""

MAX_REGISTRATIONS: Final = 64
"""Most registrations in one REGISTER or UNREGISTER message."""

TABLE_PAGE: Final = 100
"""Most entries in one TABLE_REPLY."""

MAX_TARGETS: Final = 256
"""Most targets listed for one entry of a TABLE_REPLY."""

MAX_COUNTERS: Final = 256
"""Most counters in one TABLE_REPLY."""

FLOWS_PAGE: Final = 50
"""Most connections in one FLOWS_REPLY."""

MAX_PATHS: Final = 16
"""Most paths (subflows) listed for one connection of a FLOWS_REPLY."""

SIGNING_DOMAIN: Final = b"pyserval/registration/v1\x00"

_SEQ_LIMIT: Final = 1 << 63
_INT64_MAX: Final = _SEQ_LIMIT - 1
_MAX_TIMESTAMP: Final = 1e11  # unix seconds, year ~5138: below the exponent form of repr()
_NONCE_BYTES: Final = 16
_HEX: Final = frozenset(string.hexdigits)


class MessageKind(IntEnum):
    """The kind byte of the envelope."""

    REGISTER = 1
    UNREGISTER = 2
    ACK = 3
    TABLE_REQUEST = 4
    TABLE_REPLY = 5
    FLOWS_REQUEST = 6
    FLOWS_REPLY = 7


class BadControlMessage(ValueError):
    """Bytes that are not a valid control message.

    ``reason`` is a short code for counters: ``too_short``, ``too_big``, ``bad_magic``,
    ``bad_version``, ``unknown_kind``, ``bad_json`` or ``invalid``; the message says more.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class MessageTooLarge(ValueError):
    """An encoded message would exceed :data:`MAX_MESSAGE_BYTES` (send fewer items)."""


# -- field helpers ----------------------------------------------------------------------------


def _hex_field(value: str, digits: int, what: str) -> str:
    if len(value) != digits or not _HEX.issuperset(value):
        raise ValueError(f"{what} must be exactly {digits} hex digits, got {value!r}")
    return value.lower()


def _canonical_prefix(value: str) -> str:
    # ServicePrefix.parse raises InvalidServiceID (a ValueError) naming the text.
    if not value.isascii():
        raise ValueError(f"a service prefix is ASCII <hex>/<len>: {value!r}")
    return str(ServicePrefix.parse(value))


_ADDRESS_CHARS: Final = frozenset(string.hexdigits + ".:%" + string.ascii_letters + "_-")
_SCOPE_CHARS: Final = frozenset(string.ascii_letters + string.digits + "._-")


def parse_instance_address(text: str) -> Address:
    """``"IP:PORT"`` (IPv6 as ``"[IP]:PORT"``) to ``(ip, port)``; port 1..65535.

    The IP is returned in its canonical text form (as :mod:`ipaddress` writes it).
    Raises :class:`ValueError` naming the text.
    """
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isascii() or not port_text.isdigit() or len(port_text) > 5:
        raise ValueError(f"expected an address as IP:PORT, got {text!r}")
    port = int(port_text)
    if not 1 <= port <= 0xFFFF:
        raise ValueError(f"port must be 1..65535 in address {text!r}")
    bracketed = host.startswith("[") and host.endswith("]")
    if bracketed:
        host = host[1:-1]
    _, _, scope = host.partition("%")
    if not _ADDRESS_CHARS.issuperset(host) or not _SCOPE_CHARS.issuperset(scope):
        raise ValueError(f"expected an IP literal in address {text!r}")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"expected an IP literal in address {text!r}") from None
    if (ip.version == 6) != bracketed:
        raise ValueError(f"an IPv6 address is written [IP]:PORT, an IPv4 one IP:PORT: {text!r}")
    return str(ip), port


def format_instance_address(address: Address) -> str:
    """``(ip, port)`` to the canonical text :func:`parse_instance_address` reads."""
    ip = ipaddress.ip_address(address[0])
    text = f"[{ip}]" if ip.version == 6 else str(ip)
    return f"{text}:{address[1]}"


def _canonical_address(value: str) -> str:
    return format_instance_address(parse_instance_address(value))


_HOSTNAME_CHARS: Final = frozenset(string.ascii_letters + string.digits + ".-_")


def _canonical_target(value: str) -> str:
    """A table target: an instance address, or ``host:port`` for a statically routed name."""
    host, _, port_text = value.rpartition(":")
    if host and _HOSTNAME_CHARS.issuperset(host) and not host.replace(".", "").isdigit():
        # A host name (an IPv4 literal is all digits and dots and is parsed below).
        if not (port_text.isascii() and port_text.isdigit() and len(port_text) <= 5):
            raise ValueError(f"expected an address as HOST:PORT, got {value!r}")
        if not 1 <= int(port_text) <= 0xFFFF:
            raise ValueError(f"port must be 1..65535 in address {value!r}")
        return f"{host.lower()}:{int(port_text)}"
    return _canonical_address(value)


# -- models -----------------------------------------------------------------------------------


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


_Seq = Annotated[int, Field(ge=0, lt=_SEQ_LIMIT)]
_Count = Annotated[int, Field(ge=0, le=_INT64_MAX)]


class Registration(_Model):
    """One service instance (un)registering a prefix at a router.

    ``address`` None means "the address you see me at". ``ttl`` is how long the router
    keeps the registration without a refresh. ``nonce`` (16 random bytes, hex) makes each
    registration unique; ``timestamp`` is when it was made (unix seconds). ``public_key``
    and ``signature`` are present together on a signed registration (:meth:`make`).
    """

    service: str = Field(min_length=2, max_length=80)
    address: str | None = Field(default=None, max_length=64)
    weight: int = Field(default=1, ge=1, le=0xFFFF)
    priority: int = Field(default=0, ge=-1000, le=1000)
    ttl: float = Field(default=1.0, ge=0.05, le=86400.0, allow_inf_nan=False)
    timestamp: float = Field(ge=0.0, le=_MAX_TIMESTAMP, allow_inf_nan=False)
    nonce: str = Field(min_length=32, max_length=32)
    public_key: str | None = Field(default=None, min_length=64, max_length=64)
    signature: str | None = Field(default=None, min_length=128, max_length=128)

    @field_validator("service")
    @classmethod
    def _check_service(cls, value: str) -> str:
        return _canonical_prefix(value)

    @field_validator("address")
    @classmethod
    def _check_address(cls, value: str | None) -> str | None:
        return None if value is None else _canonical_address(value)

    @field_validator("nonce")
    @classmethod
    def _check_nonce(cls, value: str) -> str:
        return _hex_field(value, 2 * _NONCE_BYTES, "nonce")

    @field_validator("public_key")
    @classmethod
    def _check_public_key(cls, value: str | None) -> str | None:
        return None if value is None else _hex_field(value, 64, "public_key")

    @field_validator("signature")
    @classmethod
    def _check_signature(cls, value: str | None) -> str | None:
        return None if value is None else _hex_field(value, 128, "signature")

    @model_validator(mode="after")
    def _signature_needs_key(self) -> Registration:
        if self.signature is not None and self.public_key is None:
            raise ValueError("a registration with a signature must carry its public_key")
        return self

    # -- derived views ------------------------------------------------------------------------
    @property
    def prefix(self) -> ServicePrefix:
        """The registered prefix (a full serviceID is its /256)."""
        return ServicePrefix.parse(self.service)

    @property
    def instance_address(self) -> Address | None:
        """``address`` as ``(ip, port)``, or None."""
        return None if self.address is None else parse_instance_address(self.address)

    @property
    def key(self) -> ServicePublicKey | None:
        """The public key, or None; raises ValueError if it is not a usable Ed25519 key."""
        return None if self.public_key is None else ServicePublicKey(bytes.fromhex(self.public_key))

    # -- signing ------------------------------------------------------------------------------
    def signed_bytes(self, op: MessageKind) -> bytes:
        """What the signature covers: domain, the op byte, canonical JSON sans signature."""
        body = self.model_dump(mode="json", exclude={"signature"})
        canonical = json.dumps(
            body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
        )
        return SIGNING_DOMAIN + bytes([int(op)]) + canonical.encode("ascii")

    def verify_signature(self, op: MessageKind) -> bool:
        """Whether the registration is signed for ``op`` by its ``public_key``.

        Only the signature is checked, not that the key certifies the serviceID.
        """
        if self.signature is None or self.public_key is None:
            return False
        try:
            key = ServicePublicKey(bytes.fromhex(self.public_key))
        except ValueError:
            return False
        return key.verify_signature(self.signed_bytes(op), bytes.fromhex(self.signature))

    @classmethod
    def make(
        cls,
        service: PrefixLike,
        *,
        address: str | None = None,
        weight: int = 1,
        priority: int = 0,
        ttl: float = 1.0,
        now: float,
        nonce: bytes,
        key: ServiceKey | None = None,
        op: MessageKind = MessageKind.REGISTER,
    ) -> Registration:
        """Build a registration, signed for ``op`` when ``key`` is given.

        With a key, ``service`` must be a full (/256) serviceID that the key certifies.
        Raises ValueError (or pydantic's ValidationError, a ValueError) naming the problem.
        """
        if len(nonce) != _NONCE_BYTES:
            raise ValueError(f"a nonce is {_NONCE_BYTES} random bytes, got {len(nonce)}")
        if op not in (MessageKind.REGISTER, MessageKind.UNREGISTER):
            raise ValueError(f"a registration is signed for REGISTER or UNREGISTER, not {op!r}")
        prefix = _as_service_prefix(service)
        public_key = None
        if key is not None:
            if prefix.length != SERVICE_ID_BITS:
                raise ValueError(
                    f"a signed registration names a full /256 serviceID, got prefix {prefix}"
                )
            if not key.verify(prefix.service_id):
                raise ValueError(
                    f"serviceID {prefix.service_id.hex} is not certified by the key "
                    f"{key.public_key.raw.hex()}"
                )
            public_key = key.public_key.raw.hex()
        reg = cls(
            service=str(prefix),
            address=address,
            weight=weight,
            priority=priority,
            ttl=float(ttl),
            timestamp=float(now),
            nonce=nonce.hex(),
            public_key=public_key,
        )
        if key is None:
            return reg
        signature = key.sign_for(prefix.service_id, reg.signed_bytes(op))
        return reg.model_copy(update={"signature": signature.hex()})


class _RegistrationsMessage(_Model):
    seq: _Seq
    registrations: list[Registration] = Field(min_length=1, max_length=MAX_REGISTRATIONS)


class RegisterMessage(_RegistrationsMessage):
    """Register (or refresh) one or more service instances."""

    kind: ClassVar[MessageKind] = MessageKind.REGISTER


class UnregisterMessage(_RegistrationsMessage):
    """Withdraw registrations (signed with ``op=UNREGISTER`` when signed)."""

    kind: ClassVar[MessageKind] = MessageKind.UNREGISTER


class RegistrationResult(_Model):
    """The router's verdict on one registration; ``reason`` is empty when ``ok``."""

    ok: bool
    reason: str = Field(default="", max_length=200)


class AckMessage(_Model):
    """Answer to REGISTER/UNREGISTER ``seq``: one result per registration, in order."""

    kind: ClassVar[MessageKind] = MessageKind.ACK

    seq: _Seq
    results: list[RegistrationResult] = Field(default_factory=list, max_length=MAX_REGISTRATIONS)


class TableRequest(_Model):
    """Ask for a page of the router's service table, starting at entry ``offset``."""

    kind: ClassVar[MessageKind] = MessageKind.TABLE_REQUEST

    seq: _Seq
    offset: _Count = 0
    # Padding the router's answer may be three times as large as: a table page cannot be
    # aimed at a third party as an amplified reflection.
    pad: str = Field(default="", max_length=30_000)


class TargetInfo(_Model):
    """One forwarding target of a table entry; ``expires_in`` None means static.

    ``address`` is an instance address (``IP:PORT``, ``[IPv6]:PORT``) or, for a static
    route to a name, ``HOST:PORT``.
    """

    address: str = Field(min_length=3, max_length=64)
    weight: int = Field(ge=1, le=0xFFFFFFFF)
    priority: int = Field(ge=-(1 << 31), lt=1 << 31)
    expires_in: float | None = Field(default=None, ge=0.0, le=1e7, allow_inf_nan=False)

    @field_validator("address")
    @classmethod
    def _check_address(cls, value: str) -> str:
        return _canonical_target(value)


class TableEntryInfo(_Model):
    """One entry of the service table, as the router reports it."""

    prefix: str = Field(min_length=2, max_length=80)
    action: Literal["forward", "demux", "delay", "drop"]
    targets: list[TargetInfo] = Field(default_factory=list, max_length=MAX_TARGETS)
    hits: _Count = 0

    @field_validator("prefix")
    @classmethod
    def _check_prefix(cls, value: str) -> str:
        return _canonical_prefix(value)


_CounterName = Annotated[str, Field(min_length=1, max_length=64)]


class TableReply(_Model):
    """A page of the service table: entries ``offset`` .. ``offset+len(entries)-1`` of
    ``total``, plus the router's counters."""

    kind: ClassVar[MessageKind] = MessageKind.TABLE_REPLY

    seq: _Seq
    offset: _Count = 0
    total: _Count = 0
    entries: list[TableEntryInfo] = Field(default_factory=list, max_length=TABLE_PAGE)
    counters: dict[_CounterName, _Count] = Field(default_factory=dict, max_length=MAX_COUNTERS)


class FlowsRequest(_Model):
    """Ask a host for a page of its live connections, starting at connection ``offset``."""

    kind: ClassVar[MessageKind] = MessageKind.FLOWS_REQUEST

    seq: _Seq
    offset: _Count = 0
    pad: str = Field(default="", max_length=30_000)  # as TableRequest's: bounds the answer


_Seconds = Annotated[float, Field(ge=0.0, le=1e7, allow_inf_nan=False)]
_FlowIDValue = Annotated[int, Field(ge=0, le=0xFFFFFFFF)]


class PathInfo(_Model):
    """One path (subflow) of a connection: its addresses and transport state.

    ``rtt`` is the smoothed round-trip time (None before the first sample); byte counts
    are of the subflow's sequence space (the SYN and FIN count one each).
    """

    local: str = Field(min_length=3, max_length=64)
    remote: str | None = Field(default=None, min_length=3, max_length=64)
    local_flowid: _FlowIDValue
    remote_flowid: _FlowIDValue
    rtt: _Seconds | None = None
    rttvar: _Seconds = 0.0
    rto: _Seconds = 0.0
    cwnd: _Count = 0
    in_flight: _Count = 0
    bytes_sent: _Count = 0
    bytes_acked: _Count = 0
    retransmissions: _Count = 0

    @field_validator("local", "remote")
    @classmethod
    def _check_address(cls, value: str | None) -> str | None:
        return None if value is None else _canonical_target(value)


class FlowInfo(_Model):
    """One live connection of a host, as ``pyserval flows`` shows it."""

    service: str = Field(min_length=64, max_length=64)
    kind: Literal["stream", "datagram"]
    role: Literal["client", "server"]
    state: Literal["syn_sent", "syn_received", "established", "time_wait", "closed"]
    bytes_received: _Count = 0
    paths: list[PathInfo] = Field(default_factory=list, max_length=MAX_PATHS)
    error: str = Field(default="", max_length=200)

    @field_validator("service")
    @classmethod
    def _check_service(cls, value: str) -> str:
        return _hex_field(value, 64, "service")


class FlowsReply(_Model):
    """A page of a host's connections: ``offset`` .. ``offset+len(flows)-1`` of ``total``."""

    kind: ClassVar[MessageKind] = MessageKind.FLOWS_REPLY

    seq: _Seq
    offset: _Count = 0
    total: _Count = 0
    flows: list[FlowInfo] = Field(default_factory=list, max_length=FLOWS_PAGE)


ControlMessage = (
    RegisterMessage
    | UnregisterMessage
    | AckMessage
    | TableRequest
    | TableReply
    | FlowsRequest
    | FlowsReply
)

_MODELS: Final[dict[MessageKind, type[ControlMessage]]] = {
    model.kind: model
    for model in (
        RegisterMessage,
        UnregisterMessage,
        AckMessage,
        TableRequest,
        TableReply,
        FlowsRequest,
        FlowsReply,
    )
}


# -- envelope ---------------------------------------------------------------------------------


def encode_message(msg: ControlMessage) -> bytes:
    """The datagram payload for ``msg``; :class:`MessageTooLarge` past the size limit."""
    body = msg.model_dump_json().encode("utf-8")
    data = MAGIC + bytes((PROTOCOL_VERSION, int(msg.kind))) + body
    if len(data) > MAX_MESSAGE_BYTES:
        raise MessageTooLarge(
            f"{type(msg).__name__} encodes to {len(data)} bytes, more than the "
            f"{MAX_MESSAGE_BYTES} a control datagram may carry: send fewer items"
        )
    return data


def decode_message(data: bytes | bytearray | memoryview) -> ControlMessage:
    """Parse one datagram payload; :class:`BadControlMessage` (only) for anything wrong."""
    raw = bytes(data)
    if len(raw) > MAX_MESSAGE_BYTES:
        raise BadControlMessage(
            "too_big", f"control message of {len(raw)} bytes exceeds {MAX_MESSAGE_BYTES}"
        )
    if len(raw) < HEADER_BYTES:
        raise BadControlMessage(
            "too_short", f"control message of {len(raw)} bytes is shorter than its header"
        )
    if raw[:2] != MAGIC:
        raise BadControlMessage("bad_magic", f"bad magic {raw[:2].hex()} (expected 5356, 'SV')")
    version = raw[2]
    if version != PROTOCOL_VERSION:
        raise BadControlMessage(
            "bad_version",
            f"unsupported control protocol version {version} (this receiver speaks "
            f"{PROTOCOL_VERSION})",
        )
    try:
        kind = MessageKind(raw[3])
    except ValueError:
        raise BadControlMessage("unknown_kind", f"unknown message kind {raw[3]}") from None
    model = _MODELS[kind]
    body = raw[HEADER_BYTES:]
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadControlMessage(
            "bad_json", f"{kind.name} body is not UTF-8 (byte {exc.start})"
        ) from None
    try:
        return model.model_validate_json(text)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        if any(e["type"] == "json_invalid" for e in errors):
            raise BadControlMessage(
                "bad_json", f"{kind.name} body is not valid JSON: {errors[0]['msg']}"
            ) from None
        raise BadControlMessage("invalid", f"invalid {kind.name}: {_describe(errors)}") from None
    except ValueError as exc:  # defensive: a validator error that escaped pydantic
        raise BadControlMessage("invalid", f"invalid {kind.name}: {exc}") from None


def _describe(errors: list[ErrorDetails]) -> str:
    parts = []
    for err in errors[:3]:
        where = ".".join(str(p) for p in err["loc"]) or "body"
        parts.append(f"{where}: {err['msg']}")
    if len(errors) > 3:
        parts.append(f"... and {len(errors) - 3} more")
    return "; ".join(parts)

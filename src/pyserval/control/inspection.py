"""Answering TABLE_REQUESTs: a router's (or any host's) service table and counters; a
host's FLOWS_REQUESTs (its live connections) are answered by ``control.flows``.

A page is at most three times the size of the (padded) request and at most ``rate``
requests are answered a second, because each answer walks the whole table: inspection must
not become an amplifier or a way to burn the host's CPU.
"""

from __future__ import annotations

from typing import Final

from ..core.host import DatagramEndpoint
from ..runtime.host import Host
from ..transport.events import DatagramReceived, Event
from .flows import FlowsService
from .messages import (
    CONTROL_SERVICE,
    TABLE_PAGE,
    BadControlMessage,
    FlowsRequest,
    MessageTooLarge,
    TableEntryInfo,
    TableReply,
    TableRequest,
    TargetInfo,
    decode_message,
    encode_message,
    format_instance_address,
)
from .registry import Registry

__all__ = ["TableService", "enable_inspection"]

_MAX_COUNTERS: Final = 200
_AMPLIFICATION: Final = 3


class TableService:
    """The table and counters of ``host`` (with a router's ``registry`` when it has one)."""

    def __init__(self, host: Host, registry: Registry | None = None, rate: float = 50.0) -> None:
        self.host = host
        self.registry = registry
        self.rate = rate
        self.limited = 0  # requests not answered for the rate limit
        self._tokens = rate
        self._tokens_at = 0.0

    def entries(self) -> list[TableEntryInfo]:
        """Every entry, with each target's weight, priority and time to expiry."""
        now = self.host.loop.time()
        registry = self.registry
        out: list[TableEntryInfo] = []
        for entry in self.host.service_table:
            registered = registry.instances.get(entry.prefix, {}) if registry else {}
            targets: list[TargetInfo] = []
            for rule in entry.rules:
                for t in rule.targets:
                    inst = registered.get(t.address)
                    targets.append(
                        TargetInfo(
                            address=format_instance_address(t.address),
                            weight=t.weight,
                            priority=rule.priority,
                            expires_in=None if inst is None else max(0.0, inst.expires - now),
                        )
                    )
            out.append(
                TableEntryInfo(
                    prefix=str(entry.prefix),
                    action=entry.action.value,
                    targets=targets[:256],
                    hits=entry.hits,
                )
            )
        return out

    def counters(self) -> dict[str, int]:
        """Packets received and forwarded, drops by reason, registrations and refusals."""
        core = self.host.core
        merged: dict[str, int] = {}
        if core is not None:
            merged.update({f"packets_{k}": v for k, v in core.stats.items()})
            merged["packets_received"] = core.received
            merged.update({f"drops_{k}": v for k, v in core.drops.items()})
        if self.registry is not None:
            merged.update({f"registry_{k}": v for k, v in self.registry.stats.items()})
            merged.update({f"guard_{k}": v for k, v in self.registry.guard.stats.items()})
            merged["instances"] = len(self.registry)
        if self.limited:
            merged["table_requests_limited"] = self.limited
        return dict(sorted(merged.items())[:_MAX_COUNTERS])

    def answer(self, req: TableRequest, request_size: int) -> bytes | None:
        """The page to send back, or None when over the rate limit."""
        now = self.host.loop.time()
        self._tokens = min(self.rate, self._tokens + (now - self._tokens_at) * self.rate)
        self._tokens_at = now
        if self._tokens < 1:
            self.limited += 1
            return None
        self._tokens -= 1
        return self._page(req, _AMPLIFICATION * request_size)

    def _page(self, req: TableRequest, limit: int) -> bytes:
        entries = self.entries()
        counters = self.counters()
        page = TABLE_PAGE
        while True:
            chunk = entries[req.offset : req.offset + page] if page else []
            reply = TableReply(
                seq=req.seq,
                offset=req.offset,
                total=len(entries),
                entries=chunk,
                counters=counters if page else {},
            )
            try:
                data = encode_message(reply)
            except MessageTooLarge:
                data = b""
            if (data and len(data) <= limit) or page == 0:
                return data
            page //= 2


def enable_inspection(host: Host) -> TableService:
    """Let ``pyserval table --host IP:PORT`` read ``host``'s table and ``pyserval flows
    --host IP:PORT`` its connections (a running host)."""
    service = TableService(host)
    flows = FlowsService(host)
    endpoint: DatagramEndpoint = host.bind_datagram(CONTROL_SERVICE, register=False)

    def on_event(event: Event) -> None:
        if not isinstance(event, DatagramReceived) or event.via is not None:
            return
        try:
            msg = decode_message(event.data)
        except BadControlMessage:
            return
        page: bytes | None = None
        if isinstance(msg, TableRequest) and host.core is not None:
            page = service.answer(msg, len(event.data))
        elif isinstance(msg, FlowsRequest) and host.core is not None:
            page = flows.answer(msg, len(event.data))
        if page is not None:
            source = event.source_service
            to = source if source is not None else CONTROL_SERVICE
            host.send_datagram(endpoint, to, page, to=event.address)

    host.watch(endpoint.flowid, on_event)
    return service

"""A host's live connections, as ``ss -ti`` shows TCP: ``pyserval flows --host IP:PORT``.

:func:`flow_infos` reads the host's connections (service, flowIDs, state, and per path the
addresses, RTT, congestion window, bytes each way and retransmissions) into
:class:`~pyserval.control.messages.FlowInfo` records; :class:`FlowsService` answers
FLOWS_REQUESTs with pages of them under the same limits as the table inspection (an answer
at most three times the padded request, a rate limit), and :func:`fetch_flows` asks a host
for all of them. The host must answer inspection (``enable_inspection``, ``pyserval echo
--inspect``). This module changes no connection; it only reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import Final

from ..naming.service_id import ServiceID
from ..runtime.host import Host, parse_address
from ..sal.inet import Address
from ..transport.connection import Connection, Role
from ..transport.datagram_flow import DatagramConnection
from ..transport.events import DatagramReceived, Event
from .messages import (
    CONTROL_SERVICE,
    FLOWS_PAGE,
    MAX_PATHS,
    BadControlMessage,
    FlowInfo,
    FlowsReply,
    FlowsRequest,
    MessageTooLarge,
    PathInfo,
    decode_message,
    encode_message,
    format_instance_address,
)

__all__ = ["FlowsService", "fetch_flows", "flow_info", "flow_infos", "format_flows"]

_AMPLIFICATION: Final = 3
_FLOWS_PAD: Final = 8000  # bytes fetch_flows pads its requests to (answers: 3x that)


def flow_info(conn: Connection) -> FlowInfo:
    """What ``pyserval flows`` shows of one connection."""
    paths: list[PathInfo] = []
    for sf in conn.subflows[:MAX_PATHS]:
        rtt = sf.rtt
        paths.append(
            PathInfo(
                local=format_instance_address(sf.local_addr),
                remote=None if sf.remote_addr is None else format_instance_address(sf.remote_addr),
                local_flowid=int(sf.local_flowid),
                remote_flowid=int(sf.remote_flowid),
                rtt=rtt.srtt,
                rttvar=rtt.rttvar,
                rto=rtt.rto,
                cwnd=max(0, int(sf.cc.cwnd)),
                in_flight=max(0, sf.snd_max - sf.snd_una),
                bytes_sent=max(0, sf.snd_max),
                bytes_acked=max(0, sf.snd_una),
                retransmissions=sf.retransmissions,
            )
        )
    return FlowInfo(
        service=conn.service_id.hex,
        kind="datagram" if isinstance(conn, DatagramConnection) else "stream",
        role="client" if conn.role is Role.CLIENT else "server",
        state=conn.state.value,
        bytes_received=max(0, conn.recv.rcv_nxt),
        paths=paths,
        error=(conn.error or "")[:200],
    )


def flow_infos(host: Host) -> list[FlowInfo]:
    """Every connection of ``host`` (ordered by our first flowID)."""
    core = host.core
    if core is None:
        return []
    conns = sorted(core.connections.values(), key=lambda c: c.conn_id)
    return [flow_info(c) for c in conns]


class FlowsService:
    """Answers FLOWS_REQUESTs about ``host`` (at most ``rate`` a second)."""

    def __init__(self, host: Host, rate: float = 50.0) -> None:
        self.host = host
        self.rate = rate
        self.limited = 0
        self._tokens = rate
        self._tokens_at = 0.0

    def answer(self, req: FlowsRequest, request_size: int) -> bytes | None:
        """The page to send back, or None when over the rate limit."""
        now = self.host.loop.time()
        self._tokens = min(self.rate, self._tokens + (now - self._tokens_at) * self.rate)
        self._tokens_at = now
        if self._tokens < 1:
            self.limited += 1
            return None
        self._tokens -= 1
        flows = flow_infos(self.host)
        limit = _AMPLIFICATION * request_size
        page = FLOWS_PAGE
        while True:
            chunk = flows[req.offset : req.offset + page]
            reply = FlowsReply(seq=req.seq, offset=req.offset, total=len(flows), flows=chunk)
            try:
                data = encode_message(reply)
            except MessageTooLarge:
                data = b""
            if (data and len(data) <= limit) or page == 0:
                return data or None
            page //= 2


def _identity(flow: FlowInfo) -> tuple[str, str, str, int]:
    """What tells one connection of a listing from its neighbours: its service, kind, role
    and first path's flowID (the host lists them in flowID order). A connection with no
    path left is told by the rest alone: two such neighbours of one service and role
    could hide a shift by one (the listing then may skip one of them)."""
    first = flow.paths[0].local_flowid if flow.paths else -1
    return (flow.service, flow.kind, flow.role, first)


async def fetch_flows(host_address: str | Address, *, timeout: float = 2.0) -> list[FlowInfo]:
    """Ask the host at ``host_address`` (answering inspection) for all its connections;
    ``TimeoutError`` when it does not answer within ``timeout`` seconds.

    As :func:`~pyserval.control.router.fetch_table` does, each page after the first is
    asked to start at the last connection already read, and the listing is read again
    from the start when that one is not there (connections before it opened or closed
    meanwhile): a connection open for the whole read is listed exactly once."""
    addr = parse_address(host_address) if isinstance(host_address, str) else host_address
    probe = Host(["0.0.0.0:0"])
    async with probe:
        ep = probe.bind_datagram(ServiceID(int.from_bytes(os.urandom(32), "big")), register=False)
        replies: asyncio.Queue[FlowsReply] = asyncio.Queue(maxsize=16)

        def on_event(event: Event) -> None:
            if isinstance(event, DatagramReceived) and event.address == addr:
                with contextlib.suppress(BadControlMessage, asyncio.QueueFull):
                    msg = decode_message(event.data)
                    if isinstance(msg, FlowsReply):
                        replies.put_nowait(msg)

        probe.watch(ep.flowid, on_event)
        flows: list[FlowInfo] = []
        seq = int.from_bytes(os.urandom(4), "big")
        async with asyncio.timeout(timeout):
            while True:
                seq += 1
                offset = max(len(flows) - 1, 0)  # one connection of overlap
                req = FlowsRequest(seq=seq, offset=offset, pad=" " * _FLOWS_PAD)
                data = encode_message(req)
                reply = None
                while reply is None:  # sent again until answered (lost, or rate-limited)
                    probe.send_datagram(ep, CONTROL_SERVICE, data, to=addr)
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(0.25):
                            reply = await replies.get()
                            while reply.seq != seq:
                                reply = await replies.get()
                fresh = reply.flows
                if flows:
                    if not fresh or _identity(fresh[0]) != _identity(flows[-1]):
                        flows.clear()  # the listing shifted under us: read it again
                        continue
                    fresh = fresh[1:]
                flows.extend(fresh)
                if not fresh or len(flows) >= reply.total:
                    return flows


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}ms"


def format_flows(flows: list[FlowInfo], names: dict[str, str] | None = None) -> str:
    """Readable text of a host's connections (what ``pyserval flows`` prints), one block
    per connection like ``ss -ti``: the flow line, then one indented line per path."""
    labels = {ServiceID.parse(k).hex: v for k, v in (names or {}).items()}
    if not flows:
        return "no connections"
    head = f"{'state':<13} {'kind':<8} {'role':<6} {'service':<24} {'received':>10}"
    lines = [head]
    for f in flows:
        service = labels.get(f.service, f.service[:16] + "...")
        lines.append(
            f"{f.state:<13} {f.kind:<8} {f.role:<6} {service:<24} {f.bytes_received:>10}"
            + (f"  error: {f.error}" if f.error else "")
        )
        for p in f.paths:
            lines.append(
                f"    {p.local} -> {p.remote or '?'}"
                f" flow {p.local_flowid:#010x}->{p.remote_flowid:#010x}"
                f" rtt:{_ms(p.rtt)}/{_ms(p.rttvar)} rto:{_ms(p.rto)} cwnd:{p.cwnd}"
                f" in_flight:{p.in_flight} sent:{p.bytes_sent} acked:{p.bytes_acked}"
                f" retrans:{p.retransmissions}"
            )
    return "\n".join(lines)

"""Unconnected datagrams: bound endpoints, sending to a serviceID, and receiving.

A datagram with ``dst_flowid == 0`` and a SERVICE extension is resolved like a SYN: one
for a service we do not serve is answered with RST; one reaching a listening datagram-flow
socket with CONTROL(ACK+RST) and zero numbers, as the reference does. Functions of a
``HostCore`` (passed in).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..naming.service_id import ServiceLike, as_service_id
from ..sal.checksum import BytesLike
from ..sal.extensions import (
    ControlFlags,
    Extension,
    JoinExt,
    RelayExt,
    ServiceExt,
)
from ..sal.packet import SalPacket
from ..sal.service_table import Action, Rule
from ..sal.transport_headers import (
    PROTO_UDP,
    UdpHeader,
)
from ..transport.datagram_flow import DatagramTooLarge, refuse_unconnected
from ..transport.events import (
    DatagramReceived,
)
from . import demux, handshake, relaying
from .records import (
    MAX_DATAGRAM,
    RELAY_BYTES,
    Address,
    DatagramEndpoint,
    Listener,
    NoRoute,
)

if TYPE_CHECKING:
    from .host import HostCore


def bind_datagram(host: HostCore, service: ServiceLike) -> DatagramEndpoint:
    """``HostCore.bind_datagram`` (documented there)."""
    sid = as_service_id(service)
    if sid in host.datagram_endpoints:
        raise ValueError(f"a datagram socket is already bound to {sid.hex}")
    host.flow_room()
    flowid = host.flows.allocate()
    ep = DatagramEndpoint(flowid, sid)
    host.flows.insert(flowid, ep)
    host.datagram_endpoints[sid] = ep
    host.service_table.add(sid, Rule.demux(ep))
    return ep


def unbind_datagram(host: HostCore, ep: DatagramEndpoint) -> None:
    """``HostCore.unbind_datagram`` (documented there)."""
    if host.datagram_endpoints.pop(ep.service_id, None) is None:
        return
    host.flows.remove(ep.flowid)
    entry = host.service_table.get(ep.service_id)
    if entry is not None:
        for rule in entry.rules:
            if rule.listener is ep:
                host.service_table.remove(ep.service_id, rule)


def send_datagram(
    host: HostCore,
    ep: DatagramEndpoint,
    service: ServiceLike,
    data: bytes,
    to: Address | None = None,
) -> None:
    """``HostCore.send_datagram`` (documented there)."""
    if len(data) > MAX_DATAGRAM:
        raise DatagramTooLarge(
            f"datagram of {len(data)} bytes exceeds the limit of {MAX_DATAGRAM} bytes"
        )
    dst = as_service_id(service)
    remote = host._resolve(dst) if to is None else to
    if remote is None:
        raise NoRoute(f"no route to service {dst.hex}")
    exts: list[Extension] = [ServiceExt(dst), ServiceExt(ep.service_id)]
    relay = host._datagram_relays.get(remote) if to is not None else None
    if relay is not None and len(data) <= MAX_DATAGRAM - RELAY_BYTES:
        # Heard only through a router so far: its NAT may let only the router in.
        exts.append(RelayExt(remote, relay[1]))
        remote = relay[0]
        host.stats["datagram_relay_requests"] += 1
    elif relaying.wants_relay(host, remote) and len(data) <= MAX_DATAGRAM - RELAY_BYTES:
        exts.append(RelayExt())  # an answer may come back through the router
    pkt = SalPacket(ep.flowid, 0, PROTO_UDP, exts, UdpHeader(), data)
    host._send(pkt, host.local_for(remote, host.addresses[0]), remote)


def on_unconnected(
    host: HostCore, pkt: SalPacket, data: BytesLike, src: Address, dst: Address, now: float
) -> None:
    ctl = pkt.control
    if ctl is not None and ctl.flags & ControlFlags.SYN and not ctl.flags & ControlFlags.ACK:
        join = pkt.find(JoinExt)
        if join is not None:
            handshake.on_join(host, pkt, ctl, join, src, dst, now)
        else:
            handshake.on_syn(host, pkt, ctl, data, src, dst, now)
    elif pkt.protocol == PROTO_UDP and pkt.service is not None and pkt.udp is not None:
        on_datagram(host, pkt, data, src, dst, now)
    elif ctl is not None and ctl.flags & ControlFlags.RST:
        host.drops["rst_no_flow"] += 1
    else:
        host.drops["no_flow"] += 1


def on_datagram(
    host: HostCore, pkt: SalPacket, data: BytesLike, src: Address, dst: Address, now: float
) -> None:
    svc = pkt.service
    assert svc is not None
    res = host.service_table.lookup(svc.service_id)
    forward = res is not None and res.action is Action.FORWARD and res.target is not None
    if forward and host.forwarding:
        assert res is not None and res.target is not None
        relaying.forward(host, pkt, data, src, dst, res.target.address, "datagram")
        return
    via = src
    path = pkt.source_path()
    if path is not None:
        src = path[0]  # forwarded: the original sender
    src = relaying.datagram_relay_source(host, pkt, path, via, src)
    if res is not None and isinstance(res.listener, Listener) and res.listener.datagram:
        # A listening connected-mode datagram socket takes only SYNs (spec).
        host.drops["datagram_to_listener"] += 1
        if not host.rst_limit.take(now):
            host.stats["rst_rate_limited"] += 1  # an answer nobody asked for, as a RST
            return
        host.stats["rst_sent"] += 1
        host._send(refuse_unconnected(pkt), host.local_for(src, dst), src)
        return
    if res is None or not isinstance(res.listener, DatagramEndpoint):
        host.drops["datagram_no_service"] += 1
        demux.send_stateless_rst(host, pkt, None, len(data), host.local_for(src, dst), src, now)
        return
    services = pkt.services
    source = services[1].service_id if len(services) > 1 else None
    ep = res.listener
    host._emit(
        DatagramReceived(ep.flowid, bytes(pkt.payload), source, src, None if via == src else via)
    )

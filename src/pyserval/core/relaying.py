"""What a router does with packets that are not for it: forwarding, relaying, DELAY.

FORWARD sends a SYN or datagram one hop on with the path recorded (only on a host with
``forwarding`` on); the fast path does it from the SAL header alone. DELAY holds a SYN
(bounded) and asks the controller (``delay_requests``/``release_delayed``).

NAT traversal through a router (README "NATs"): a client's SYN or datagram carries a RELAY
marker, which the first router fills in with the client's address and a tag (a MAC under
the router's rotating secret). An instance answering a SYN forwarded by a trusted forwarder
sends its SYN-ACK to the client directly and a copy with the RELAY to that forwarder; a
router relays a packet only to an address its own tag names, and the client, told by the
relayed copy where the instance is, sends its third ACK there directly (which opens its
NAT). Datagram answers to a client heard only through a router go back through it until
the client is heard directly. Functions of a ``HostCore`` (passed in).
"""

from __future__ import annotations

import hashlib
import secrets
from collections import deque
from typing import TYPE_CHECKING

from ..naming.service_id import ServiceID, ServiceLike, as_service_id
from ..sal.checksum import BytesLike
from ..sal.errors import MalformedPacket
from ..sal.extensions import (
    ControlFlags,
    RelayExt,
)
from ..sal.forwarding import (
    FAST_SYN,
    ForwardRefused,
    fill_relay_marker,
    first_hop_bytes,
    forward_packet,
    relay_marker_at,
    scan_for_forwarding,
)
from ..sal.packet import SalPacket, decode_packet
from ..sal.transport_headers import (
    PROTO_UDP,
)
from ..transport.connection import State
from .records import (
    MAX_DATAGRAM_RELAYS,
    MAX_HELD_SYN,
    RELAY_KEY_LIFETIME,
    Address,
    Delayed,
    first_router,
)

if TYPE_CHECKING:
    from .host import HostCore


def forward(
    host: HostCore,
    pkt: SalPacket,
    data: BytesLike,
    src: Address,
    dst: Address,
    hop: Address,
    kind: str,
) -> None:
    """Send a SYN or datagram one hop on, recording the path (routers only)."""
    if not host.forwarding:
        host.drops[f"{kind}_no_service"] += 1
        return
    if hop in host.broadcast:
        # Only the original sender broadcasts (its own SYNs): a forwarder never
        # re-broadcasts, so one unresolved SYN cannot flood the local network.
        host.drops["no_rebroadcast"] += 1
        return
    try:
        out = forward_packet(data, pkt, src, dst, hop, host._relay_tag)
    except ForwardRefused as exc:
        host.drops[exc.reason] += 1
        return
    host._out.append((out, host.local_for(hop, dst), hop))
    host.stats[f"forwarded_{kind}"] += 1


def fast_forward(host: HostCore, data: bytes, src: Address, dst: Address) -> bool:
    """A router's first hop without decoding the packet; False: take the full path."""
    scan = scan_for_forwarding(data)
    if scan is None:
        return False
    kind, service, hlen = scan
    res = host.service_table.lookup_int(service)
    if res is None or res.target is None:
        if res is not None:
            res.entry.hits -= 1  # the full path looks it up (and counts it) again
        return False
    hop = res.target.address
    if hop in host.broadcast:
        host.drops["no_rebroadcast"] += 1
    elif hop in (src, dst):
        host.drops["loop"] += 1
    else:
        try:
            out = first_hop_bytes(data, hlen, src, dst, hop)
            if hlen != 68 and (kind == FAST_SYN or hlen != 84):  # not a plain layout
                at = relay_marker_at(out, hlen)
                if at >= 0:
                    out = fill_relay_marker(out, at, src, relay_tag(host, src))
        except OSError:  # not IP text: the general path refuses it properly
            res.entry.hits -= 1
            return False
        host._out.append((out, host.local_for(hop, dst), hop))
        host.stats["forwarded_syn" if kind == FAST_SYN else "forwarded_datagram"] += 1
    return True


def wants_relay(host: HostCore, hop: Address | None) -> bool:
    """Whether a SYN or datagram to ``hop`` carries the RELAY marker: only to a
    forwarder we trust (our router, a static route's target), so what goes straight
    to a peer keeps the reference's layout."""
    return (
        host.nat_relay
        and hop is not None
        and ":" not in hop[0]  # RELAY carries IPv4 only
        and hop in host.trusted_forwarders
    )


def relay_tag(host: HostCore, address: Address, key: bytes | None = None) -> bytes:
    """``HostCore._relay_tag`` (documented there)."""
    if key is None:
        tag = host._relay_tags.get(address)
        if tag is None:
            if len(host._relay_tags) >= 4096:
                host._relay_tags.clear()  # many clients: start again rather than grow
            tag = relay_tag(host, address, host._relay_keys[0])
            host._relay_tags[address] = tag
        return tag
    msg = f"{address[0]}:{address[1]}".encode()
    return hashlib.blake2b(msg, digest_size=8, key=key).digest()


def relay_tag_ok(host: HostCore, address: Address, tag: bytes) -> bool:
    return any(secrets.compare_digest(relay_tag(host, address, k), tag) for k in host._relay_keys)


def rotate_relay_keys(host: HostCore, now: float) -> None:
    at = host._relay_rotate_at
    if at is None:
        host._relay_rotate_at = now + RELAY_KEY_LIFETIME
    elif now >= at:
        host._relay_keys = (secrets.token_bytes(16), host._relay_keys[0])
        host._relay_tags.clear()
        host._relay_rotate_at = now + RELAY_KEY_LIFETIME


def relay(host: HostCore, pkt: SalPacket, relay: RelayExt, src: Address, dst: Address) -> None:
    """A router: an instance's answer to a client behind a NAT, sent on to the client
    from the address the client sent to, naming the instance (``src``)."""
    if not relay_tag_ok(host, relay.address, relay.tag):
        host.drops["relay_bad_tag"] += 1
        return
    ctl = pkt.control
    if pkt.dst_flowid:
        want = ControlFlags.SYN | ControlFlags.ACK
        if ctl is None or ctl.flags & want != want or ctl.flags & ControlFlags.RST:
            host.drops["relay_not_synack"] += 1  # only handshake answers go this way
            return
    elif pkt.protocol != PROTO_UDP or pkt.udp is None:
        host.drops["relay_not_datagram"] += 1
        return
    exts = [RelayExt(src) if e is relay else e for e in pkt.extensions]
    out = SalPacket(pkt.src_flowid, pkt.dst_flowid, pkt.protocol, exts, pkt.transport, pkt.payload)
    try:
        host._send(out, dst, relay.address)
    except ValueError:  # RELAY names IPv4 addresses only
        host.drops["relay_not_ipv4"] += 1
        return
    host.stats["relayed"] += 1


def send_relayed(
    host: HostCore, pkt: SalPacket, local: Address, via: Address, relay: RelayExt
) -> None:
    """A copy of ``pkt`` to the forwarder ``via``, asking it to relay it."""
    pkt.extensions.append(relay)
    try:
        host._send(pkt, local, via)
    except ValueError:  # RELAY names IPv4 addresses only: the direct answer stands
        host.drops["relay_not_ipv4"] += 1
        return
    finally:
        pkt.extensions.pop()
    host.stats["relay_requests"] += 1


def datagram_relay_source(
    host: HostCore, pkt: SalPacket, path: list[Address] | None, via: Address, src: Address
) -> Address:
    """NATs (README): remember how to answer a datagram's sender, and name the sender
    of an answer our router relayed. Returns the sender's address."""
    relay = pkt.find(RelayExt) if len(pkt.extensions) > 2 else None
    if path is not None:
        if (
            relay is not None
            and relay.is_request
            and via in host.trusted_forwarders
            and relay.address == src
        ):
            # Answers go back through the first router on the path (the one the sender
            # sent to, whose tag it is) until the sender is heard directly.
            relays = host._datagram_relays
            relays[src] = (first_router(path, via), relay.tag)
            relays.move_to_end(src)
            if len(relays) > MAX_DATAGRAM_RELAYS:
                relays.popitem(last=False)
    elif relay is not None and relay.is_relayed and via in host.trusted_forwarders:
        return relay.address  # our router relayed an instance's answer
    elif host._datagram_relays:
        host._datagram_relays.pop(src, None)  # heard directly: answer directly
    return src


def ask(host: HostCore, sid: ServiceID) -> None:
    if sid not in host._asking:
        host._asking.add(sid)
        host.delay_requests.append(sid)


def hold(
    host: HostCore, sid: ServiceID, data: BytesLike, src: Address, dst: Address, now: float
) -> None:
    held = host.delayed
    while held and held[0].since + host.delay_timeout <= now:
        held.popleft()  # the controller never answered: the client has retried by now
        host.drops["delay_expired"] += 1
    if len(held) >= host.max_delayed:
        host.drops["delay_queue_full"] += 1
        return
    if len(data) > MAX_HELD_SYN:
        host.drops["delay_syn_too_big"] += 1  # a SYN is small: bound what we hold
        return
    held.append(Delayed(sid, bytes(data), src, dst, now))
    host.stats["delayed"] += 1
    ask(host, sid)


def take_delay_requests(host: HostCore) -> list[ServiceID]:
    """``HostCore.take_delay_requests`` (documented there)."""
    out, host.delay_requests = host.delay_requests, []
    return out


def release_delayed(host: HostCore, service: ServiceLike, hop: Address | None, now: float) -> int:
    """``HostCore.release_delayed`` (documented there)."""
    sid = as_service_id(service)
    host._asking.discard(sid)
    keep: deque[Delayed] = deque()
    released = 0
    for item in host.delayed:
        if item.service_id != sid:
            keep.append(item)
            continue
        released += 1
        if hop is None:
            host.drops["delay_verdict_drop"] += 1
            continue
        try:
            pkt = decode_packet(item.data)
        except MalformedPacket:  # cannot happen: it decoded when it arrived
            continue
        host.stats["delay_verdict_forward"] += 1
        saved, host.forwarding = host.forwarding, True  # the verdict is the controller's
        try:
            forward(host, pkt, item.data, item.src, item.dst, hop, "syn")
        finally:
            host.forwarding = saved
    host.delayed = keep
    if hop is not None:
        for conn in host.connections.values():
            if conn.state is State.SYN_SENT and conn.service_id == sid:
                conn.primary.remote_addr = hop
                conn.syn_due = True
                host._wake(conn)
    return released

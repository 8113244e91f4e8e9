"""The sans-I/O Serval host: demultiplexing, listeners, connections, datagrams, timers.

``HostCore`` takes datagrams (``receive_datagram``), returns datagrams to send
(``datagrams_to_send``), reports events (``next_event``/``events``) and one timer deadline for
the whole host (``next_deadline``/``handle_timer``). It never does I/O and never reads a
clock: the asyncio runtime and the simulated network (``pyserval.testing``) drive it.

Receive path, by packet kind (a dispatch on state, never an exception out of here):

* ``dst_flowid == 0`` and CONTROL(SYN): a connection request, resolved in the service table.
  DEMUX names a local listener, which answers the original source (SOURCE path[0] when the
  SYN was forwarded). FORWARD sends it one hop on with the path recorded (only on a host
  with ``forwarding`` on: a router). DELAY holds it (bounded) and asks the controller
  (``delay_requests``/``release_delayed``). A SYN for a service we do not serve is dropped
  and counted, never answered with RST (the client retries and may reach another instance).
  Protocol 6 asks for a stream, protocol 17 for a connected datagram flow
  (``transport.datagram_flow``); each kind reaches only a listener of that kind.
* ``dst_flowid == 0``, UDP and SERVICE extensions: an unconnected datagram, resolved the same
  way. One for a service we do not serve is answered with RST; one reaching a listening
  datagram-flow socket with CONTROL(ACK+RST) and zero numbers, as the reference does.
* otherwise the flow table names the subflow; a packet for an unknown flow gets RST (unless
  it is itself a RST).

NAT traversal through a router (README "NATs"): a client's SYN or datagram carries a RELAY
marker, which the first router fills in with the client's address and a tag (a MAC under
the router's rotating secret). An instance answering a SYN forwarded by a trusted forwarder
sends its SYN-ACK to the client directly and a copy with the RELAY to that forwarder; a
router relays a packet only to an address its own tag names, and the client, told by the
relayed copy where the instance is, sends its third ACK there directly (which opens its
NAT). Datagram answers to a client heard only through a router go back through it until
the client is heard directly.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import random
import secrets
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from typing import Final

from ..errors import NoRoute
from ..naming.entropy import SecureRandom
from ..naming.service_id import ServiceID, ServiceLike, as_service_id
from ..sal.checksum import BytesLike
from ..sal.control import MASK32
from ..sal.errors import MalformedPacket
from ..sal.extensions import (
    AddAddrExt,
    ControlExt,
    ControlFlags,
    DssExt,
    Extension,
    JoinExt,
    RelayExt,
    ServiceExt,
)
from ..sal.first_hop import forward_first_hops
from ..sal.flow_table import FlowTable
from ..sal.forwarding import (
    FAST_SYN,
    ForwardRefused,
    fill_relay_marker,
    first_hop_bytes,
    forward_packet,
    relay_marker_at,
    scan_for_forwarding,
)
from ..sal.inet import WILDCARDS, Address
from ..sal.packet import SalPacket, decode_packet
from ..sal.service_table import Action, Rule, ServiceTable
from ..sal.transport_headers import (
    PROTO_TCP,
    PROTO_UDP,
    TcpFlags,
    TcpHeader,
    TcpOption,
    UdpHeader,
)
from ..transport.config import StreamConfig
from ..transport.connection import Connection, Role, State, Subflow, unwrap
from ..transport.datagram_flow import DatagramConnection, DatagramTooLarge, refuse_unconnected
from ..transport.events import (
    ConnectionFailed,
    DatagramReceived,
    DatagramRefused,
    DataReceived,
    Event,
    IncomingConnection,
    SendSpaceAvailable,
)
from ..transport.migration import CHALLENGE, HELD_BYTES, HELD_PACKETS
from ..transport.multipath import MAX_HALF_OPEN_JOINS, MAX_SUBFLOWS, join_proof, new_key
from .ratelimit import TokenBucket
from .syncookies import Cookie, SynCookies

__all__ = ["DatagramEndpoint", "DatagramTooLarge", "HostCore", "Listener", "NoRoute"]

MAX_DATAGRAM: Final = 65507 - 12 - 72 - 8  # UDP payload limit less SAL and UDP headers
_ZERO_NONCE: Final = bytes(8)
_MAX_HELD_SYN: Final = 2048  # bytes: 1,024 held SYNs stay within 2 MiB
_CONTROL_EXT: Final = 20  # bytes of a CONTROL extension: what a RST may add to its cause
# A half-open flow retransmits its SYN-ACK for at most about this long: a flood of SYNs
# from addresses that never answer cannot hold the table for longer.
HALF_OPEN_LIFETIME: Final = 64.0


def _retries_within(initial_rto: float, lifetime: float) -> int:
    """How many doubling retransmissions fit before giving up within ``lifetime``."""
    n = 0  # n retransmissions give up after initial_rto * (2 ** (n + 1) - 1) seconds
    while n < 15 and initial_rto * (2 ** (n + 2) - 1) <= lifetime:
        n += 1
    return n


_RELAY_BYTES: Final = 16
RELAY_KEY_LIFETIME: Final = 120.0  # s: a router's relay tags stay good for 2 to 4 minutes
MAX_DATAGRAM_RELAYS: Final = 4096  # clients whose datagram answers go back via a router


def _first_router(path: list[Address], last_hop: Address) -> Address:
    """The router a client sent to: the path's second entry, unless that forwarder was
    bound to the wildcard address and could not name itself (then the hop we know).

    Anyone can write a SOURCE path, but the answer already goes to its first entry; this
    adds one packet of the same size to its second, which relays only with its own tag."""
    if len(path) >= 2 and path[1][0] != "0.0.0.0":
        return path[1]
    return last_hop


@dataclass(eq=False)
class Listener:
    """A service this host accepts connections for."""

    listener_id: int
    service_id: ServiceID
    backlog: int
    half_open: dict[tuple[Address, int], Connection] = field(default_factory=dict)
    accept_queue: deque[Connection] = field(default_factory=deque)
    closed: bool = False
    datagram: bool = False  # connected datagram flows (SYNs with protocol 17), not streams

    def accept(self) -> Connection | None:
        """The oldest established connection not yet taken, or None."""
        return self.accept_queue.popleft() if self.accept_queue else None


@dataclass(eq=False, slots=True)
class _Delayed:
    """A SYN held by a DELAY rule until the controller's verdict."""

    service_id: ServiceID
    data: bytes
    src: Address
    dst: Address
    since: float


@dataclass(eq=False)
class DatagramEndpoint:
    """A bound datagram socket: sends to and receives from serviceIDs."""

    flowid: int
    service_id: ServiceID


class HostCore:
    """One Serval end host with no I/O (see the module docstring)."""

    def __init__(
        self,
        addresses: list[Address],
        *,
        config: StreamConfig | None = None,
        rng: random.Random | None = None,
        service_table: ServiceTable | None = None,
        max_flows: int = 65536,
        max_events: int = 100_000,
        forwarding: bool = False,
        max_delayed: int = 1024,
        delay_timeout: float = 10.0,
        rst_rate: float = 100.0,
        rst_burst: int = 200,
        challenge_ack_rate: float = 100.0,
        nat_relay: bool = True,
    ) -> None:
        if not addresses:
            raise ValueError("a host needs at least one address")
        self.addresses = list(addresses)
        self.config = config or StreamConfig()
        # Every unguessable value (flowIDs, nonces, ISS, tokens) comes from the OS CSPRNG;
        # a seeded random.Random is only for the simulated network's determinism.
        self.rng = rng if rng is not None else SecureRandom()
        self.service_table = ServiceTable(rng=self.rng) if service_table is None else service_table
        self.flows: FlowTable[Subflow | DatagramEndpoint] = FlowTable(max_flows, self.rng)
        self.connections: dict[int, Connection] = {}
        self.listeners: dict[ServiceID, Listener] = {}
        self.datagram_endpoints: dict[ServiceID, DatagramEndpoint] = {}
        self.drops: Counter[str] = Counter()  # dropped datagrams by reason
        self.stats: Counter[str] = Counter()
        self.internal_errors: list[BaseException] = []
        self.received = 0  # datagrams taken, of any kind
        self._events: deque[Event] = deque()
        self._max_events = max_events
        self._out: list[tuple[bytes, Address, Address]] = []
        self._dirty: dict[int, Connection] = {}  # insertion-ordered set of connections
        self._timers: list[tuple[float, int, Connection]] = []
        self._tiebreak = itertools.count()
        self._listener_ids = itertools.count(1)
        # (peer address, peer flowID) -> server connection: recognises duplicate SYNs.
        self._peer_flows: dict[tuple[Address, int], Connection] = {}
        self._listener_by_id: dict[int, Listener] = {}
        self.mp_tokens: dict[int, Connection] = {}  # multipath: our token -> connection
        # Forwarding (routers): SYNs and datagrams that FORWARD rules send one hop on.
        self.forwarding = forwarding
        self.broadcast: set[Address] = set()  # targets that are broadcasts: never re-sent
        # Forwarders whose SOURCE paths are believed (see _on_syn); the runtime adds the
        # host's router and static routes' targets.
        self.trusted_forwarders: set[Address] = set()
        # DELAY: held SYNs (oldest first, bounded) and the services to ask the controller
        # about; the runtime takes delay_requests and answers with release_delayed.
        self.delayed: deque[_Delayed] = deque()
        self.max_delayed = max_delayed
        self.delay_timeout = delay_timeout
        self.delay_requests: list[ServiceID] = []
        self._asking: set[ServiceID] = set()
        # Answers to packets nobody asked for (stateless RSTs, SYN-cookie reminders) and
        # challenge ACKs (RFC 5961) are rate-limited per host: junk is never turned into a
        # flood of answers. The counts are in ``stats`` (rst_sent, rst_rate_limited, ...).
        self.rst_limit = TokenBucket(rst_rate, rst_burst)
        self.challenge_ack_limit = TokenBucket(challenge_ack_rate, max(1.0, challenge_ack_rate))
        self.syn_cookies = SynCookies(self.rng)
        self._synack_retries = _retries_within(self.config.control.initial_rto, HALF_OPEN_LIFETIME)
        # NATs (see the module docstring): whether our SYNs and datagrams to a service carry
        # the RELAY marker (off only for a peer that refuses unknown extensions); a router's
        # two tag secrets (current, previous), rotated every RELAY_KEY_LIFETIME seconds;
        # the relayed copies of our half-open SYN-ACKs (conn_id -> forwarder, RELAY); where
        # datagram answers to a client heard only through a router go (LRU-bounded).
        self.nat_relay = nat_relay
        self._relay_keys = (secrets.token_bytes(16), secrets.token_bytes(16))
        self._relay_rotate_at: float | None = None
        self._relay_tags: dict[Address, bytes] = {}  # address -> tag under the current key
        self._synack_relays: dict[int, tuple[Address, RelayExt]] = {}
        self._datagram_relays: OrderedDict[Address, tuple[Address, bytes]] = OrderedDict()

    # -- events -------------------------------------------------------------------------
    def _emit(self, event: Event) -> None:
        if len(self._events) >= self._max_events and isinstance(
            event, DataReceived | SendSpaceAvailable
        ):
            # Bounded for an application that never takes events. Only these can go: the
            # state they report is still there to read (readable bytes, free space);
            # establishment, end of stream, close and reset are never dropped.
            self.stats["events_dropped"] += 1
            return
        self._events.append(event)

    def next_event(self) -> Event | None:
        """The oldest event not yet taken, or None."""
        return self._events.popleft() if self._events else None

    def events(self) -> list[Event]:
        """Take every pending event."""
        out = list(self._events)
        self._events.clear()
        return out

    # -- application API ----------------------------------------------------------------
    def listen(
        self, service: ServiceLike, backlog: int = 128, *, datagram: bool = False
    ) -> Listener:
        """Accept connections to ``service``: adds a DEMUX rule to the service table.
        ``datagram``: accept connected datagram flows (protocol 17) instead of streams."""
        sid = as_service_id(service)
        if sid in self.listeners:
            raise ValueError(f"already listening on service {sid.hex}")
        if backlog < 1:
            raise ValueError(f"backlog must be at least 1: {backlog}")
        listener = Listener(next(self._listener_ids), sid, backlog, datagram=datagram)
        self.listeners[sid] = listener
        self._listener_by_id[listener.listener_id] = listener
        self.service_table.add(sid, Rule.demux(listener))
        return listener

    def close_listener(self, listener: Listener, now: float) -> None:
        """Stop listening; half-open requests are reset, queued connections stay usable."""
        if listener.closed:
            return
        listener.closed = True
        self.listeners.pop(listener.service_id, None)
        self._listener_by_id.pop(listener.listener_id, None)
        entry = self.service_table.get(listener.service_id)
        if entry is not None:
            for rule in entry.rules:
                if rule.listener is listener:
                    self.service_table.remove(listener.service_id, rule)
        for conn in list(listener.half_open.values()):
            conn.abort_with("listener closed", send_rst=True)
            self._wake(conn)
        listener.half_open.clear()

    def connect(self, service: ServiceLike, now: float, *, datagram: bool = False) -> Connection:
        """Open a connection to ``service`` (late-bound: resolved when the SYN goes out);
        ``datagram``: a connected datagram flow (a :class:`DatagramConnection`).

        The connection's events tell how it ends: ConnectionEstablished, or
        ConnectionTimedOut / ConnectionFailed / ConnectionReset.
        """
        sid = as_service_id(service)
        flowid = self.flows.allocate()
        conn, sf = self._new_flow(flowid, Role.CLIENT, sid, self.addresses[0], None, datagram)
        self.flows.insert(flowid, sf)
        self.connections[flowid] = conn
        conn.syn_due = True
        conn.syn_first = True
        self._wake(conn)
        return conn

    def _new_flow(
        self,
        flowid: int,
        role: Role,
        sid: ServiceID,
        local: Address,
        remote: Address | None,
        datagram: bool,
    ) -> tuple[Connection, Subflow]:
        """A connection (stream or datagram flow) with its first subflow."""
        if datagram:
            conn, sf = DatagramConnection.create(
                flowid, role, sid, self.config, self._emit, local, remote, self.rng
            )
            conn.wake = self._wake
            return conn, sf
        stream = Connection(flowid, role, sid, self.config, self._emit)
        stream.wake = self._wake
        first = Subflow(stream, flowid, local, remote, self.rng)
        stream.subflows.append(first)
        return stream, first

    def bind_datagram(self, service: ServiceLike) -> DatagramEndpoint:
        """A datagram socket bound to ``service`` (receives what is sent to it)."""
        sid = as_service_id(service)
        if sid in self.datagram_endpoints:
            raise ValueError(f"a datagram socket is already bound to {sid.hex}")
        flowid = self.flows.allocate()
        ep = DatagramEndpoint(flowid, sid)
        self.flows.insert(flowid, ep)
        self.datagram_endpoints[sid] = ep
        self.service_table.add(sid, Rule.demux(ep))
        return ep

    def unbind_datagram(self, ep: DatagramEndpoint) -> None:
        """Close a datagram socket."""
        if self.datagram_endpoints.pop(ep.service_id, None) is None:
            return
        self.flows.remove(ep.flowid)
        entry = self.service_table.get(ep.service_id)
        if entry is not None:
            for rule in entry.rules:
                if rule.listener is ep:
                    self.service_table.remove(ep.service_id, rule)

    def send_datagram(
        self,
        ep: DatagramEndpoint,
        service: ServiceLike,
        data: bytes,
        to: Address | None = None,
    ) -> None:
        """Send one unconnected datagram to ``service`` (via the service table, or straight
        to the address ``to``); raises NoRoute or DatagramTooLarge."""
        if len(data) > MAX_DATAGRAM:
            raise DatagramTooLarge(
                f"datagram of {len(data)} bytes exceeds the limit of {MAX_DATAGRAM} bytes"
            )
        dst = as_service_id(service)
        remote = self._resolve(dst) if to is None else to
        if remote is None:
            raise NoRoute(f"no route to service {dst.hex}")
        exts: list[Extension] = [ServiceExt(dst), ServiceExt(ep.service_id)]
        relay = self._datagram_relays.get(remote) if to is not None else None
        if relay is not None and len(data) <= MAX_DATAGRAM - _RELAY_BYTES:
            # Heard only through a router so far: its NAT may let only the router in.
            exts.append(RelayExt(remote, relay[1]))
            remote = relay[0]
            self.stats["datagram_relay_requests"] += 1
        elif self._wants_relay(remote) and len(data) <= MAX_DATAGRAM - _RELAY_BYTES:
            exts.append(RelayExt())  # an answer may come back through the router
        pkt = SalPacket(ep.flowid, 0, PROTO_UDP, exts, UdpHeader(), data)
        self._send(pkt, self.local_for(remote, self.addresses[0]), remote)

    # -- routing ------------------------------------------------------------------------
    def _resolve(self, sid: ServiceID) -> Address | None:
        """Where a SYN or datagram for ``sid`` goes: a FORWARD target, or ourselves (DEMUX)."""
        res = self.service_table.lookup(sid)
        if res is None:
            return None
        if res.action is Action.FORWARD and res.target is not None:
            return res.target.address
        if res.action is Action.DEMUX:
            return self.addresses[0]
        return None  # DROP; DELAY waits for the controller (release_delayed)

    def local_for(self, remote: Address, prefer: Address) -> Address:
        """The local address to reach ``remote`` from: ``prefer`` when it is of the same
        family, else this host's first address of that family (a dual-stack host answers
        IPv6 from IPv6); ``prefer`` when it has none (the send then fails, counted)."""
        v6 = ":" in remote[0]
        if (":" in prefer[0]) == v6:
            return prefer
        for a in self.addresses:
            if (":" in a[0]) == v6:
                return a
        return prefer

    def _forward(
        self, pkt: SalPacket, data: BytesLike, src: Address, dst: Address, hop: Address, kind: str
    ) -> None:
        """Send a SYN or datagram one hop on, recording the path (routers only)."""
        if not self.forwarding:
            self.drops[f"{kind}_no_service"] += 1
            return
        if hop in self.broadcast:
            # Only the original sender broadcasts (its own SYNs): a forwarder never
            # re-broadcasts, so one unresolved SYN cannot flood the local network.
            self.drops["no_rebroadcast"] += 1
            return
        try:
            out = forward_packet(data, pkt, src, dst, hop, self._relay_tag)
        except ForwardRefused as exc:
            self.drops[exc.reason] += 1
            return
        self._out.append((out, self.local_for(hop, dst), hop))
        self.stats[f"forwarded_{kind}"] += 1

    def _fast_forward(self, data: bytes, src: Address, dst: Address) -> bool:
        """A router's first hop without decoding the packet; False: take the full path."""
        scan = scan_for_forwarding(data)
        if scan is None:
            return False
        kind, service, hlen = scan
        res = self.service_table.lookup_int(service)
        if res is None or res.target is None:
            if res is not None:
                res.entry.hits -= 1  # the full path looks it up (and counts it) again
            return False
        hop = res.target.address
        if hop in self.broadcast:
            self.drops["no_rebroadcast"] += 1
        elif hop in (src, dst):
            self.drops["loop"] += 1
        else:
            try:
                out = first_hop_bytes(data, hlen, src, dst, hop)
                if hlen != 68 and (kind == FAST_SYN or hlen != 84):  # not a plain layout
                    at = relay_marker_at(out, hlen)
                    if at >= 0:
                        out = fill_relay_marker(out, at, src, self._relay_tag(src))
            except OSError:  # not IP text: the general path refuses it properly
                res.entry.hits -= 1
                return False
            self._out.append((out, self.local_for(hop, dst), hop))
            self.stats["forwarded_syn" if kind == FAST_SYN else "forwarded_datagram"] += 1
        return True

    # -- NAT relay ----------------------------------------------------------------------
    def _wants_relay(self, hop: Address | None) -> bool:
        """Whether a SYN or datagram to ``hop`` carries the RELAY marker: only to a
        forwarder we trust (our router, a static route's target), so what goes straight
        to a peer keeps the reference's layout."""
        return (
            self.nat_relay
            and hop is not None
            and ":" not in hop[0]  # RELAY carries IPv4 only
            and hop in self.trusted_forwarders
        )

    def _relay_tag(self, address: Address, key: bytes | None = None) -> bytes:
        """A router's tag for ``address``: only this router can make it, and it names
        the address (so a relay request cannot send anything anywhere else)."""
        if key is None:
            tag = self._relay_tags.get(address)
            if tag is None:
                if len(self._relay_tags) >= 4096:
                    self._relay_tags.clear()  # many clients: start again rather than grow
                tag = self._relay_tag(address, self._relay_keys[0])
                self._relay_tags[address] = tag
            return tag
        msg = f"{address[0]}:{address[1]}".encode()
        return hashlib.blake2b(msg, digest_size=8, key=key).digest()

    def _relay_tag_ok(self, address: Address, tag: bytes) -> bool:
        return any(
            secrets.compare_digest(self._relay_tag(address, k), tag) for k in self._relay_keys
        )

    def _rotate_relay_keys(self, now: float) -> None:
        at = self._relay_rotate_at
        if at is None:
            self._relay_rotate_at = now + RELAY_KEY_LIFETIME
        elif now >= at:
            self._relay_keys = (secrets.token_bytes(16), self._relay_keys[0])
            self._relay_tags.clear()
            self._relay_rotate_at = now + RELAY_KEY_LIFETIME

    def _relay(self, pkt: SalPacket, relay: RelayExt, src: Address, dst: Address) -> None:
        """A router: an instance's answer to a client behind a NAT, sent on to the client
        from the address the client sent to, naming the instance (``src``)."""
        if not self._relay_tag_ok(relay.address, relay.tag):
            self.drops["relay_bad_tag"] += 1
            return
        ctl = pkt.control
        if pkt.dst_flowid:
            want = ControlFlags.SYN | ControlFlags.ACK
            if ctl is None or ctl.flags & want != want or ctl.flags & ControlFlags.RST:
                self.drops["relay_not_synack"] += 1  # only handshake answers go this way
                return
        elif pkt.protocol != PROTO_UDP or pkt.udp is None:
            self.drops["relay_not_datagram"] += 1
            return
        exts = [RelayExt(src) if e is relay else e for e in pkt.extensions]
        out = SalPacket(
            pkt.src_flowid, pkt.dst_flowid, pkt.protocol, exts, pkt.transport, pkt.payload
        )
        try:
            self._send(out, dst, relay.address)
        except ValueError:  # RELAY names IPv4 addresses only
            self.drops["relay_not_ipv4"] += 1
            return
        self.stats["relayed"] += 1

    def _send_relayed(self, pkt: SalPacket, local: Address, via: Address, relay: RelayExt) -> None:
        """A copy of ``pkt`` to the forwarder ``via``, asking it to relay it."""
        pkt.extensions.append(relay)
        try:
            self._send(pkt, local, via)
        except ValueError:  # RELAY names IPv4 addresses only: the direct answer stands
            self.drops["relay_not_ipv4"] += 1
            return
        finally:
            pkt.extensions.pop()
        self.stats["relay_requests"] += 1

    def _datagram_relay_source(
        self, pkt: SalPacket, path: list[Address] | None, via: Address, src: Address
    ) -> Address:
        """NATs (README): remember how to answer a datagram's sender, and name the sender
        of an answer our router relayed. Returns the sender's address."""
        relay = pkt.find(RelayExt) if len(pkt.extensions) > 2 else None
        if path is not None:
            if (
                relay is not None
                and relay.is_request
                and via in self.trusted_forwarders
                and relay.address == src
            ):
                # Answers go back through the first router on the path (the one the sender
                # sent to, whose tag it is) until the sender is heard directly.
                relays = self._datagram_relays
                relays[src] = (_first_router(path, via), relay.tag)
                relays.move_to_end(src)
                if len(relays) > MAX_DATAGRAM_RELAYS:
                    relays.popitem(last=False)
        elif relay is not None and relay.is_relayed and via in self.trusted_forwarders:
            return relay.address  # our router relayed an instance's answer
        elif self._datagram_relays:
            self._datagram_relays.pop(src, None)  # heard directly: answer directly
        return src

    # -- DELAY --------------------------------------------------------------------------
    def _ask(self, sid: ServiceID) -> None:
        if sid not in self._asking:
            self._asking.add(sid)
            self.delay_requests.append(sid)

    def _hold(
        self, sid: ServiceID, data: BytesLike, src: Address, dst: Address, now: float
    ) -> None:
        held = self.delayed
        while held and held[0].since + self.delay_timeout <= now:
            held.popleft()  # the controller never answered: the client has retried by now
            self.drops["delay_expired"] += 1
        if len(held) >= self.max_delayed:
            self.drops["delay_queue_full"] += 1
            return
        if len(data) > _MAX_HELD_SYN:
            self.drops["delay_syn_too_big"] += 1  # a SYN is small: bound what we hold
            return
        held.append(_Delayed(sid, bytes(data), src, dst, now))
        self.stats["delayed"] += 1
        self._ask(sid)

    def take_delay_requests(self) -> list[ServiceID]:
        """Services with SYNs held by a DELAY rule that the controller has not answered."""
        out, self.delay_requests = self.delay_requests, []
        return out

    def release_delayed(self, service: ServiceLike, hop: Address | None, now: float) -> int:
        """The controller's verdict for ``service``: forward its held SYNs to ``hop``, or drop
        them (``hop`` None). Local connections waiting on the DELAY rule go to ``hop`` too.
        Returns how many SYNs were released."""
        sid = as_service_id(service)
        self._asking.discard(sid)
        keep: deque[_Delayed] = deque()
        released = 0
        for item in self.delayed:
            if item.service_id != sid:
                keep.append(item)
                continue
            released += 1
            if hop is None:
                self.drops["delay_verdict_drop"] += 1
                continue
            try:
                pkt = decode_packet(item.data)
            except MalformedPacket:  # cannot happen: it decoded when it arrived
                continue
            self.stats["delay_verdict_forward"] += 1
            saved, self.forwarding = self.forwarding, True  # the verdict is the controller's
            try:
                self._forward(pkt, item.data, item.src, item.dst, hop, "syn")
            finally:
                self.forwarding = saved
        self.delayed = keep
        if hop is not None:
            for conn in self.connections.values():
                if conn.state is State.SYN_SENT and conn.service_id == sid:
                    conn.primary.remote_addr = hop
                    conn.syn_due = True
                    self._wake(conn)
        return released

    # -- driving ------------------------------------------------------------------------
    def _wake(self, conn: Connection) -> None:
        self._dirty[conn.conn_id] = conn

    def _send(self, pkt: SalPacket, local: Address, remote: Address) -> None:
        self._out.append((pkt.encode(local[0], remote[0]), local, remote))

    def _send_all(self, conn: Connection, pkts: list[SalPacket]) -> None:
        if not pkts or not conn.subflows:
            return
        if self._synack_relays and conn.state is State.SYN_RECEIVED:
            relay = self._synack_relays.get(conn.conn_id)
            if relay is not None:  # a retransmitted SYN-ACK goes both ways again
                for p in pkts:
                    ctl = p.control
                    if ctl is not None and ctl.flags & ControlFlags.SYN:
                        self._send_relayed(p, conn.primary.local_addr, *relay)
        if len(conn.subflows) > 1:
            self._send_multipath(conn, pkts)
            return
        sf = conn.primary
        remote = sf.remote_addr
        if remote is None:
            return  # never resolved: nothing was ever sent to the peer
        if sf.challenge is not None:
            self._send_challenging(sf, pkts, remote)
            return
        for p in pkts:
            self._send(p, sf.local_addr, remote)

    def _send_multipath(self, conn: Connection, pkts: list[SalPacket]) -> None:
        """Each packet on the addresses of the subflow it belongs to."""
        by_flow = {sf.local_flowid: sf for sf in conn.subflows}
        for p in pkts:
            sf = by_flow.get(p.src_flowid)
            if sf is None or sf.remote_addr is None:
                continue  # a subflow given up meanwhile
            if sf.challenge is not None:
                self._send_challenging(sf, [p], sf.remote_addr)
            else:
                self._send(p, sf.local_addr, sf.remote_addr)

    def _send_challenging(self, sf: Subflow, pkts: list[SalPacket], remote: Address) -> None:
        """While a candidate peer address is checked, the challenge goes there (within the
        anti-amplification budget) and everything else on the verified path."""
        ch = sf.challenge
        assert ch is not None
        for p in pkts:
            ctl = p.control
            if ctl is not None and ctl.flags & CHALLENGE and not ctl.flags & ControlFlags.ACK:
                data = p.encode(sf.local_addr[0], ch.candidate[0])
                if ch.may_send(len(data)):
                    self._out.append((data, sf.local_addr, ch.candidate))
                else:
                    self.drops["amplification_limit"] += 1
            else:
                self._send(p, sf.local_addr, remote)

    # -- migration ----------------------------------------------------------------------
    def migrate(
        self, conn: Connection, local: Address, now: float, remote: Address | None = None
    ) -> bool:
        """Move ``conn`` to this host's address ``local`` (RSYN exchange); its
        FlowMigrated event tells when the move is done. False if it cannot start now
        (the connection is closing).

        ``remote``: the peer's address to move to as well, which a move to the other IP
        family needs (None: the current one, or one the peer advertised of that family).
        """
        if local not in self.addresses:
            raise ValueError(f"{local[0]}:{local[1]} is not one of this host's addresses")
        if not conn.subflows or conn.state is not State.ESTABLISHED:
            raise ValueError(f"connection {conn.conn_id:#x} is not established")
        sf = conn.primary
        if remote is None:
            remote = self._peer_address_for(conn, local)
            if remote is None:
                raise ValueError(
                    f"no address of the peer is known in the family of {local[0]}: name one"
                )
        if sf.local_addr == local and sf.remote_addr == remote and sf.mig is None:
            return True  # already there
        self._retarget(sf, remote, now)
        started = conn.start_migration(sf, now, local)
        self._wake(conn)
        return started

    def add_address(self, address: Address) -> None:
        """A new local address (interface) the host can use."""
        if address not in self.addresses:
            self.addresses.append(address)

    def remove_address(self, address: Address, now: float) -> list[Connection]:
        """The local ``address`` is gone: move every flow on it to the first remaining
        address of its family (else the first remaining one). Returns the connections
        moved."""
        if address in self.addresses:
            self.addresses.remove(address)
        if not self.addresses:
            return []
        # Stay in the family where there is a choice (the peer's address then still fits).
        same = [a for a in self.addresses if (":" in a[0]) == (":" in address[0])]
        return self._move_flows(address, (same or self.addresses)[0], now)

    def set_address(self, old: Address, new: Address, now: float) -> list[Connection]:
        """The local address ``old`` changed to ``new``: every flow on it migrates."""
        if old in self.addresses:
            self.addresses[self.addresses.index(old)] = new
        elif new not in self.addresses:
            self.addresses.append(new)
        return self._move_flows(old, new, now)

    def _peer_address_for(self, conn: Connection, local: Address) -> Address | None:
        """Where the peer of ``conn`` is reached from ``local``: its current address when
        of the same family, else the first it advertised (ADD_ADDR) of that family."""
        remote = conn.primary.remote_addr
        v6 = ":" in local[0]
        if remote is not None and (":" in remote[0]) == v6:
            return remote
        mp = conn.mp
        for a in mp.peer_addresses if mp is not None else ():
            if (":" in a[0]) == v6:
                return a
        return None

    def _move_flows(self, old: Address, new: Address, now: float) -> list[Connection]:
        moved = []
        for conn in list(self.connections.values()):
            for sf in list(conn.subflows):
                if sf.local_addr != old:
                    continue
                others = [x for x in conn.live_subflows() if x.local_addr != old]
                remote = self._peer_address_for(conn, new) if conn.subflows else None
                if conn.mp is not None and others:
                    conn.subflow_failed(sf, now)  # multipath: the other paths carry on
                elif (
                    sf is conn.primary
                    and conn.state is State.ESTABLISHED
                    and remote is not None
                    and self._retarget(sf, remote, now)
                    and conn.start_migration(sf, now, new)
                ):
                    moved.append(conn)
                else:
                    sf.local_addr = new  # closing, a handshake or TIME_WAIT: send from there
            self._wake(conn)
        return moved

    @staticmethod
    def _retarget(sf: Subflow, remote: Address, now: float) -> bool:
        """Point ``sf`` at the peer's ``remote`` before a move (a change of IP family);
        late packets from its old address are taken for a while, as after the peer's move.
        Returns True (so it can sit in a condition)."""
        if remote != sf.remote_addr:
            sf.prev_remote, sf.remote_addr = sf.remote_addr, remote
            sf.prev_remote_until = now + 2 * sf.rtt.rto
        return True

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Address, Address]]:
        """Every datagram to send now, as (payload, local address, remote address)."""
        dirty = self._dirty
        while dirty:
            _, conn = dirty.popitem()
            self._flush(conn, now)
        out, self._out = self._out, []
        return out

    def _flush(self, conn: Connection, now: float) -> None:
        pkts: list[SalPacket] = []
        if conn.challenge_ack_due:
            conn.challenge_ack_due = False
            if self.challenge_ack_limit.take(now):
                conn.ack_now = True
            else:
                self.stats["challenge_ack_rate_limited"] += 1
        try:
            if conn.syn_due and conn.state is State.SYN_SENT:
                self._send_syn(conn, now)
            conn.output(now, pkts)
        except Exception as exc:  # a bug must not take the host down: count and keep it
            self._internal_error(exc)
            conn.abort_with(f"internal error: {exc!r}", send_rst=False)
        self._send_all(conn, pkts)
        if conn.dead_subflows:
            for sf in conn.dead_subflows:
                self.flows.remove(sf.local_flowid)
                if sf.peer_key is not None:
                    self._peer_flows.pop(sf.peer_key, None)
            conn.dead_subflows.clear()
        if conn.state is State.CLOSED:
            self._forget(conn)
        else:
            self._schedule(conn)

    def _send_syn(self, conn: Connection, now: float) -> None:
        conn.syn_due = False
        sf = conn.primary
        first = conn.syn_first
        conn.syn_first = False
        pkt = conn.syn_packet(now, first)  # starts (or keeps) the control retransmission
        remote = self._resolve(conn.service_id)
        if remote is None:
            entry = self.service_table.match(conn.service_id)
            if entry is not None and entry.action is Action.DELAY:
                remote = sf.remote_addr  # the controller's verdict, once it came
                if remote is None:
                    self._ask(conn.service_id)
        if remote is None:
            self.stats["syn_no_route"] += 1
            if first and self.service_table.match(conn.service_id) is None:
                conn.state = State.CLOSED
                conn.error = f"no route to service {conn.service_id.hex}"
                conn.emit(ConnectionFailed(conn.conn_id, conn.error))
            return  # a DELAY/DROP rule now may change: retransmissions try again
        sf.remote_addr = remote
        sf.local_addr = self.local_for(remote, sf.local_addr)
        if self._wants_relay(remote):
            pkt.extensions.append(RelayExt())  # the router may relay the SYN-ACK back
        self._send(pkt, sf.local_addr, remote)

    def _schedule(self, conn: Connection) -> None:
        d = conn.next_deadline()
        if d is not None and d != conn.scheduled:
            heapq.heappush(self._timers, (d, next(self._tiebreak), conn))
        conn.scheduled = d

    def _forget(self, conn: Connection) -> None:
        """Remove a closed connection from the host's tables (the object stays readable)."""
        if self.connections.pop(conn.conn_id, None) is None:
            return
        # Kept so that a count of retransmissions survives the flows it was made on.
        resent = sum(sf.retransmissions for sf in conn.subflows)
        if resent:
            self.stats["retransmissions_ended"] += resent
        for sf in conn.subflows:
            self.flows.remove(sf.local_flowid)
            if sf.peer_key is not None:
                self._peer_flows.pop(sf.peer_key, None)
        if conn.mp is not None and self.mp_tokens.get(conn.mp.local_token) is conn:
            self.mp_tokens.pop(conn.mp.local_token, None)
        conn.scheduled = None
        self._synack_relays.pop(conn.conn_id, None)
        key = conn.peer_key
        if key is not None:
            self._peer_flows.pop(key, None)
            listener = self._listener_by_id.get(conn.listener_id or 0)
            if listener is not None:
                listener.half_open.pop(key, None)

    def next_deadline(self) -> float | None:
        """When :meth:`handle_timer` must run next (one timer for the whole host)."""
        timers = self._timers
        while timers:
            d, _, conn = timers[0]
            if conn.scheduled == d and conn.conn_id in self.connections:
                return d
            heapq.heappop(timers)  # stale: the connection re-armed or went away
        return None

    def handle_timer(self, now: float) -> None:
        """Run every connection timer that is due."""
        timers = self._timers
        while timers and timers[0][0] <= now:
            d, _, conn = heapq.heappop(timers)
            if conn.scheduled != d or conn.conn_id not in self.connections:
                continue
            conn.scheduled = None
            pkts: list[SalPacket] = []
            try:
                conn.on_timer(now, pkts)
            except Exception as exc:
                self._internal_error(exc)
                conn.abort_with(f"internal error: {exc!r}", send_rst=False)
            self._send_all(conn, pkts)
            self._wake(conn)

    def on_unreachable(self, remote: Address, now: float, reason: str = "unreachable") -> None:
        """The network said ``remote`` cannot be reached (ICMP port/host unreachable).

        A connection still in SYN_SENT towards it fails at once (like ECONNREFUSED). For an
        established one it is a soft error, as Linux TCP and QUIC take it: a NAT whose
        mapping expired answers this way, and the peer's next packet (from a new port,
        adopted through the address challenge) saves the flow, so it is counted and left
        to the keepalive and user timeouts. A flow that is migrating ignores them.
        """
        self.stats["icmp_unreachable"] += 1
        for conn in list(self.connections.values()):
            if not conn.subflows or conn.primary.remote_addr != remote:
                continue
            if conn.primary.mig is not None:
                continue  # the path is changing: errors from the old one are expected
            if conn.state is State.SYN_SENT:
                conn.state = State.CLOSED
                conn.error = f"service unreachable: {reason} from {remote[0]}:{remote[1]}"
                conn.emit(ConnectionFailed(conn.conn_id, conn.error))
            elif conn.state is State.ESTABLISHED:
                conn.unreachable_count += 1
                self.stats["icmp_soft_error"] += 1
            self._wake(conn)

    def _internal_error(self, exc: BaseException) -> None:
        self.stats["internal_error"] += 1
        if len(self.internal_errors) < 100:
            self.internal_errors.append(exc)

    # -- receive path -------------------------------------------------------------------
    def receive_datagrams(
        self, batch: list[tuple[bytes, Address]], dst: Address, now: float
    ) -> None:
        """:meth:`receive_datagram` for each ``(payload, source)`` of a batch read on local
        address ``dst``, in order.

        The same outcome packet for packet. A router forwards the batch's first-hop SYNs of
        the usual layout in one loop (:func:`~pyserval.sal.first_hop.forward_first_hops`:
        what :meth:`_fast_forward` does, without the calls per packet); the rest goes
        packet by packet.
        """
        receive = self.receive_datagram
        if not self.forwarding:
            for data, src in batch:
                receive(data, src, dst, now)
            return

        def declined(data: bytes, src: Address) -> None:
            receive(data, src, dst, now, fast=False)  # looked up already: the general path

        def other(data: bytes, src: Address) -> None:
            receive(data, src, dst, now)

        syns, taken = forward_first_hops(
            batch,
            dst,
            self.service_table.lookup_int,
            self.broadcast,
            self.local_for,
            self._out,
            declined,
            other,
            self._fast_path_error,
            self.drops,
        )
        self.received += taken
        if syns:
            self.stats["forwarded_syn"] += syns

    def _fast_path_error(self, exc: Exception) -> None:
        self._internal_error(exc)
        self.drops["internal_error"] += 1

    def receive_datagram(
        self, data: bytes, src: Address, dst: Address, now: float, *, fast: bool = True
    ) -> None:
        """Take one UDP payload that arrived on local address ``dst`` from ``src``.

        ``fast=False``: the first-hop fast path has already declined it (see
        :meth:`receive_datagrams`)."""
        self.received += 1
        try:
            # A router first tries forwarding from the SAL header alone.
            if fast and self.forwarding and self._fast_forward(data, src, dst):
                return
            pkt = decode_packet(data)
        except MalformedPacket as exc:
            self.drops[exc.reason.value] += 1
            return
        except Exception as exc:  # never let a packet take the host down
            self._internal_error(exc)
            self.drops["internal_error"] += 1
            return
        try:
            if self.forwarding:
                self._rotate_relay_keys(now)
                relay = pkt.find(RelayExt)
                if relay is not None and relay.is_request and pkt.source is None:
                    self._relay(pkt, relay, src, dst)
                    return
            if pkt.dst_flowid == 0:
                self._on_unconnected(pkt, data, src, dst, now)
            else:
                self._on_flow_packet(pkt, src, dst, now, len(data))
        except Exception as exc:  # never let a packet take the host down
            self._internal_error(exc)
            self.drops["internal_error"] += 1

    def _on_unconnected(
        self, pkt: SalPacket, data: BytesLike, src: Address, dst: Address, now: float
    ) -> None:
        ctl = pkt.control
        if ctl is not None and ctl.flags & ControlFlags.SYN and not ctl.flags & ControlFlags.ACK:
            join = pkt.find(JoinExt)
            if join is not None:
                self._on_join(pkt, ctl, join, src, dst, now)
            else:
                self._on_syn(pkt, ctl, data, src, dst, now)
        elif pkt.protocol == PROTO_UDP and pkt.service is not None and pkt.udp is not None:
            self._on_datagram(pkt, data, src, dst, now)
        elif ctl is not None and ctl.flags & ControlFlags.RST:
            self.drops["rst_no_flow"] += 1
        else:
            self.drops["no_flow"] += 1

    def _on_syn(
        self,
        pkt: SalPacket,
        ctl: ControlExt,
        data: BytesLike,
        src: Address,
        dst: Address,
        now: float,
    ) -> None:
        svc, tcp = pkt.service, pkt.tcp
        datagram = pkt.protocol == PROTO_UDP  # a connected datagram flow (spec)
        if svc is None or (pkt.udp is None if datagram else tcp is None):
            self.drops["bad_syn"] += 1
            return
        res = self.service_table.lookup(svc.service_id)
        if res is None or not isinstance(res.listener, Listener):
            if res is not None and res.action is Action.FORWARD and res.target is not None:
                self._forward(pkt, data, src, dst, res.target.address, "syn")
            elif res is not None and res.action is Action.DELAY:
                self._hold(svc.service_id, data, src, dst, now)
            else:
                self.drops["syn_no_service"] += 1  # never RST a SYN
            return
        listener = res.listener
        if listener.datagram != datagram:
            self.drops["syn_wrong_protocol"] += 1  # a stream SYN to a datagram socket, or back
            return
        path = pkt.source_path()
        untrusted_path = False
        hop = src
        if path is not None:
            # A forwarded SYN: answer the client directly, not the forwarder. Anyone can
            # write a SOURCE path, so for one not from a known forwarder (our router or a
            # static route's target) the SYN-ACK is sent once and never retransmitted:
            # this host cannot be made to reflect more than it receives.
            untrusted_path = src not in self.trusted_forwarders
            src = path[0]
        key = (src, pkt.src_flowid)
        existing = self._peer_flows.get(key)
        if existing is not None:
            # A retransmitted or duplicated SYN: answer a half-open one again (our SYN-ACK
            # was lost); never make a second flow for the same peer flow.
            sf = existing.primary
            if existing.state is State.SYN_RECEIVED:
                sf.handshake_sent_at = None  # two SYN-ACKs out: no RTT sample (Karn)
                synack = sf.synack_packet(sf.control.resend())
                self._send(synack, sf.local_addr, src)
                relay = self._synack_relays.get(existing.conn_id)
                if relay is not None:
                    self._send_relayed(synack, sf.local_addr, *relay)
            self.stats["duplicate_syn"] += 1
            return
        if len(listener.accept_queue) >= listener.backlog:
            self.drops["accept_queue_full"] += 1
            return
        if len(listener.half_open) >= self.config.max_half_open:
            if tcp is None:
                # A connected datagram flow: its third ACK echoes no TCP numbers, so there is
                # no cookie to build from it; past the table's bound such SYNs are dropped.
                self.drops["half_open_full"] += 1
                return
            # A SYN flood, or a burst larger than the table: answer without keeping state
            # (and through the client's router as well when it may be behind a NAT).
            marker = pkt.find(RelayExt) if path is not None and not untrusted_path else None
            relay = None
            if path is not None and marker is not None and marker.is_request and self.nat_relay:
                relay = (_first_router(path, hop), RelayExt(marker.address, marker.tag))
            self._send_cookie_synack(pkt, ctl, tcp, src, self.local_for(src, dst), now, relay)
            return
        if len(self.flows) >= self.flows.max_flows:
            self.drops["flow_table_full"] += 1  # (allocate would raise FlowTableFull)
            return
        flowid = self.flows.allocate()
        # A forwarded SYN may come from an IPv6 client over IPv4 (or the reverse).
        here = self.local_for(src, dst)
        conn, sf = self._new_flow(flowid, Role.SERVER, svc.service_id, here, src, datagram)
        conn.listener_id = listener.listener_id
        conn.peer_key = key
        self.flows.insert(flowid, sf)
        self.connections[flowid] = conn
        listener.half_open[key] = conn
        self._peer_flows[key] = conn
        synack = conn.accept_syn(sf, pkt, now)
        if conn.mp is not None:
            if conn.mp.local_token in self.mp_tokens:  # a token in use: pick another key
                while conn.mp.local_token in self.mp_tokens:
                    conn.mp.local_key = new_key()
                synack = sf.synack_packet(sf.control.resend())
            self.mp_tokens[conn.mp.local_token] = conn
            conn.mp.advertise = [a for a in self.addresses if a != here and a[0] not in WILDCARDS]
        # Half-open state lives about a minute at most (see HALF_OPEN_LIFETIME).
        sf.control.max_retries = min(sf.control.max_retries, self._synack_retries)
        if untrusted_path:
            sf.control.max_retries = 0
            self.stats["syn_untrusted_path"] += 1
        self._send(synack, here, src)
        marker = pkt.find(RelayExt) if path is not None and not untrusted_path else None
        if path is not None and marker is not None and marker.is_request and self.nat_relay:
            # The client may be behind a NAT that lets in only the router it sent to: a
            # copy goes back through that router, the first on the path (whose tag it is).
            entry = (_first_router(path, hop), RelayExt(marker.address, marker.tag))
            self._synack_relays[conn.conn_id] = entry
            self._send_relayed(synack, here, *entry)
        self._schedule(conn)

    # -- SYN cookies ----------------------------------------------------------------------
    def _send_cookie_synack(
        self,
        pkt: SalPacket,
        ctl: ControlExt,
        tcp: TcpHeader,
        src: Address,
        dst: Address,
        now: float,
        relay: tuple[Address, RelayExt] | None = None,
    ) -> None:
        """Answer a SYN statelessly: the SYN-ACK's numbers encode the flow (core.syncookies);
        ``relay``: a copy goes back through the client's router too (see NATs)."""
        cfg = self.config
        sack = cfg.sack and tcp.sack_permitted
        cookie = self.syn_cookies.make(now, src, pkt.src_flowid, tcp.mss, tcp.window_scale, sack)
        if cookie.flowid in self.flows:
            self.drops["syn_cookie_collision"] += 1  # its retransmission may fall elsewhere
            return
        opts = [TcpOption.mss(cfg.mss)]
        if tcp.window_scale is not None:
            opts += [TcpOption.nop(), TcpOption.window_scale(cfg.window_scale)]
        if sack:
            opts += [TcpOption.nop(), TcpOption.nop(), TcpOption.sack_permitted()]
        synack = SalPacket(
            cookie.flowid,
            pkt.src_flowid,
            PROTO_TCP,
            [
                ControlExt(
                    ControlFlags.SYN | ControlFlags.ACK,
                    cookie.verno,
                    (ctl.verno + 1) & MASK32,
                    cookie.nonce,
                )
            ],
            TcpHeader(
                seq=cookie.iss,
                ack=(tcp.seq + 1) & MASK32,
                flags=TcpFlags.SYN | TcpFlags.ACK,
                window=min(cfg.receive_buffer, 0xFFFF),
                options=opts,
            ),
        )
        self.stats["syn_cookie_sent"] += 1
        self._send(synack, dst, src)
        if relay is not None:
            self._send_relayed(synack, dst, *relay)

    def _on_cookie_ack(self, pkt: SalPacket, src: Address, dst: Address, now: float) -> bool:
        """A packet for an unknown flow that may be the third ACK of a SYN answered with a
        cookie. True when it was one (taken, or answered); False: treat as unknown."""
        tcp, ctl = pkt.tcp, pkt.control
        if tcp is None or tcp.flags & (TcpFlags.SYN | TcpFlags.RST) or not tcp.flags & TcpFlags.ACK:
            return False
        if ctl is not None and (
            not ctl.flags & ControlFlags.ACK
            or ctl.flags & (ControlFlags.SYN | ControlFlags.RST | ControlFlags.RSYN)
        ):
            return False
        cookie = self.syn_cookies.check(
            now,
            src,
            pkt.src_flowid,
            pkt.dst_flowid,
            (tcp.ack - 1) & MASK32,
            None if ctl is None else (ctl.ackno - 1) & MASK32,
        )
        if cookie is None:
            return False
        svc = pkt.service
        if ctl is None or svc is None:
            # Data before the third ACK (which was lost): ask for it again with a SYN-ACK,
            # which the client answers with its third ACK. Rate-limited as RSTs are.
            if self.rst_limit.take(now):
                self.stats["syn_cookie_reminder"] += 1
                remind = SalPacket(
                    cookie.flowid,
                    pkt.src_flowid,
                    PROTO_TCP,
                    [
                        ControlExt(
                            ControlFlags.SYN | ControlFlags.ACK, cookie.verno, 0, cookie.nonce
                        )
                    ],
                    TcpHeader(seq=cookie.iss, ack=tcp.seq, flags=TcpFlags.SYN | TcpFlags.ACK),
                )
                self._send(remind, dst, src)
            return True
        res = self.service_table.lookup(svc.service_id)
        listener = res.listener if res is not None else None
        # The cookie does not name the service: a stream made from it must not land in a
        # connected datagram listener's queue (only stream listeners ever send cookies).
        if not isinstance(listener, Listener) or listener.closed or listener.datagram:
            return False
        if len(listener.accept_queue) >= listener.backlog:
            self.drops["accept_queue_full"] += 1  # the client's next ACK may find room
            return True
        self._establish_from_cookie(listener, cookie, pkt, ctl, tcp, svc.service_id, src, dst, now)
        return True

    def _establish_from_cookie(
        self,
        listener: Listener,
        cookie: Cookie,
        pkt: SalPacket,
        ctl: ControlExt,
        tcp: TcpHeader,
        sid: ServiceID,
        src: Address,
        dst: Address,
        now: float,
    ) -> None:
        """Build the server connection a valid cookie third ACK stands for."""
        flowid = cookie.flowid
        if len(self.flows) >= self.flows.max_flows or flowid in self.flows:
            self.drops["syn_cookie_no_room"] += 1
            return
        conn = Connection(flowid, Role.SERVER, sid, self.config, self._emit)
        conn.wake = self._wake
        conn.listener_id = listener.listener_id
        key = (src, pkt.src_flowid)
        conn.peer_key = key
        sf = Subflow(conn, flowid, dst, src, self.rng)
        sf.iss = cookie.iss
        sf.control.local_nonce = cookie.nonce
        sf.control.snd_verno = cookie.verno
        # The client's SYN as the cookie remembers it: its numbers are the third ACK's less
        # one, its options the cookie's summary.
        opts = [TcpOption.mss(cookie.mss)]
        if cookie.window_scale is not None:
            opts.append(TcpOption.window_scale(cookie.window_scale))
        if cookie.sack:
            opts.append(TcpOption.sack_permitted())
        syn = SalPacket(
            pkt.src_flowid,
            0,
            PROTO_TCP,
            [ControlExt(ControlFlags.SYN, (ctl.verno - 1) & MASK32, 0, ctl.nonce), ServiceExt(sid)],
            TcpHeader(
                seq=(tcp.seq - 1) & MASK32, flags=TcpFlags.SYN, window=tcp.window, options=opts
            ),
        )
        conn.subflows.append(sf)
        self.flows.insert(flowid, sf)
        self.connections[flowid] = conn
        self._peer_flows[key] = conn
        conn.accept_syn(sf, syn, now)  # the SYN-ACK it returns went out as the cookie
        sf.handshake_sent_at = None  # no RTT sample: we do not know when the SYN came
        if not conn.on_handshake_ack(sf, pkt, now):  # cannot fail: the cookie matched
            conn.abort_with("SYN cookie mismatch", send_rst=False)
            self._forget(conn)
            return
        self.stats["syn_cookie_accepted"] += 1
        self._established_server(conn)
        if conn.state is State.ESTABLISHED:
            sf.on_tcp(tcp, pkt.payload, now)
        self._wake(conn)

    def _on_join(
        self, pkt: SalPacket, ctl: ControlExt, join: JoinExt, src: Address, dst: Address, now: float
    ) -> None:
        """A SYN opening another subflow of a multipath connection of ours."""
        conn = self.mp_tokens.get(join.token)
        mp = conn.mp if conn is not None else None
        if conn is None or mp is None or pkt.tcp is None or conn.state is not State.ESTABLISHED:
            self.drops["join_unknown"] += 1
            return
        if join.proof != join_proof(mp.peer_key, mp.local_key):
            self.drops["join_bad_proof"] += 1
            return
        key = (src, pkt.src_flowid)
        existing = self._peer_flows.get(key)
        if existing is not None:
            for sf in existing.subflows:  # a retransmitted JOIN: answer it again
                if sf.remote_flowid == pkt.src_flowid and sf.join_state == "syn_received":
                    self._send(sf.synack_packet(sf.control.resend()), sf.local_addr, src)
            return
        half_open = sum(x.join_state == "syn_received" for x in conn.subflows)
        if len(conn.subflows) >= MAX_SUBFLOWS or half_open >= MAX_HALF_OPEN_JOINS:
            self.drops["join_too_many"] += 1
            return
        if len(self.flows) >= self.flows.max_flows:
            self.drops["flow_table_full"] += 1
            return
        flowid = self.flows.allocate()
        sf = Subflow(conn, flowid, dst, src, self.rng)
        sf.peer_key = key
        self.flows.insert(flowid, sf)
        self._peer_flows[key] = conn
        synack = conn.accept_join(sf, pkt, now)
        self._send(synack, dst, src)
        self.stats["joined"] += 1
        self._schedule(conn)

    def add_path(self, conn: Connection, local: Address, remote: Address, now: float) -> Subflow:
        """Open another subflow of multipath ``conn`` from our ``local`` address to the
        peer's ``remote`` one; PathAdded tells when it carries data."""
        if local not in self.addresses:
            raise ValueError(f"{local[0]}:{local[1]} is not one of this host's addresses")
        for sf in conn.subflows:
            if sf.local_addr == local and sf.remote_addr == remote:
                raise ValueError(f"there is already a path {local} -> {remote}")
        if len(conn.subflows) >= MAX_SUBFLOWS:
            raise ValueError(f"a connection has at most {MAX_SUBFLOWS} subflows")
        flowid = self.flows.allocate()
        sf = Subflow(conn, flowid, local, remote, self.rng)
        conn.add_subflow(sf, now)  # raises if the connection is not multipath
        self.flows.insert(flowid, sf)
        self._wake(conn)
        return sf

    def _on_datagram(
        self, pkt: SalPacket, data: BytesLike, src: Address, dst: Address, now: float
    ) -> None:
        svc = pkt.service
        assert svc is not None
        res = self.service_table.lookup(svc.service_id)
        forward = res is not None and res.action is Action.FORWARD and res.target is not None
        if forward and self.forwarding:
            assert res is not None and res.target is not None
            self._forward(pkt, data, src, dst, res.target.address, "datagram")
            return
        via = src
        path = pkt.source_path()
        if path is not None:
            src = path[0]  # forwarded: the original sender
        src = self._datagram_relay_source(pkt, path, via, src)
        if res is not None and isinstance(res.listener, Listener) and res.listener.datagram:
            # A listening connected-mode datagram socket takes only SYNs (spec).
            self.drops["datagram_to_listener"] += 1
            if not self.rst_limit.take(now):
                self.stats["rst_rate_limited"] += 1  # an answer nobody asked for, as a RST
                return
            self.stats["rst_sent"] += 1
            self._send(refuse_unconnected(pkt), self.local_for(src, dst), src)
            return
        if res is None or not isinstance(res.listener, DatagramEndpoint):
            self.drops["datagram_no_service"] += 1
            self._send_stateless_rst(pkt, None, len(data), self.local_for(src, dst), src, now)
            return
        services = pkt.services
        source = services[1].service_id if len(services) > 1 else None
        ep = res.listener
        self._emit(
            DatagramReceived(
                ep.flowid, bytes(pkt.payload), source, src, None if via == src else via
            )
        )

    def _on_flow_packet(
        self, pkt: SalPacket, src: Address, dst: Address, now: float, size: int
    ) -> None:
        target = self.flows.get(pkt.dst_flowid)
        if target is None:
            ctl = pkt.control
            if ctl is not None and ctl.flags & ControlFlags.RST:
                self.drops["rst_unknown_flow"] += 1
            elif not self._on_cookie_ack(pkt, src, dst, now):
                self.drops["unknown_flow"] += 1
                self._send_stateless_rst(pkt, ctl, size, dst, src, now)
            return
        if isinstance(target, DatagramEndpoint):
            ctl = pkt.control
            if ctl is not None and ctl.flags & ControlFlags.RST:
                self._emit(
                    DatagramRefused(target.flowid, "datagram refused: no such service", src)
                )
            return
        sf = target
        conn = sf.conn
        state = conn.state
        ctl = pkt.control
        # Data segments carry no CONTROL: the cheap test first, the set lookup only for the
        # few SYN-ACKs (this runs for every packet of every flow).
        synack = ControlFlags.SYN | ControlFlags.ACK
        if (
            ctl is not None
            and ctl.flags & synack == synack
            and state is not State.SYN_RECEIVED
            and src in self.trusted_forwarders
        ):
            relay = pkt.find(RelayExt)
            if relay is not None and relay.is_relayed:
                # A SYN-ACK our router relayed: the instance is at relay.address (the
                # handshake's numbers prove the SYN-ACK answers our SYN); the third ACK
                # goes there directly and opens our NAT towards it. Only from our router:
                # nobody else may make us answer a third address.
                src = relay.address
                self.stats["relayed_synack"] += 1
        if state is State.SYN_SENT:
            if not conn.on_synack(sf, pkt, src, now):
                self._maybe_reset(conn, sf, pkt, src)
        elif state is State.SYN_RECEIVED:
            listener = self._listener_by_id.get(conn.listener_id or 0)
            ctl = pkt.control
            if pkt.src_flowid != sf.remote_flowid and not (
                pkt.src_flowid == 0 and ctl is not None and ctl.flags & ControlFlags.RST
            ):
                self.drops["wrong_peer_flow"] += 1  # (a stateless RST has no flowID)
            elif (
                listener is not None
                and len(listener.accept_queue) >= listener.backlog
                and not (pkt.control is not None and pkt.control.flags & ControlFlags.RST)
            ):
                # Accept queue full: leave the flow half-open and drop the packet, as Linux
                # does by default; the client's retransmission or our SYN-ACK's completes
                # the handshake once the application has accepted.
                self.drops["accept_queue_full"] += 1
                sf.handshake_sent_at = None  # its eventual answer will not time the path
            elif conn.on_handshake_ack(sf, pkt, now):
                self._established_server(conn)
                self._synack_relays.pop(conn.conn_id, None)
                if src != sf.remote_addr and conn.state is State.ESTABLISHED:
                    # The third ACK of a client behind a NAT that maps each destination to
                    # its own port (symmetric): the address challenge adopts the new port.
                    self._from_elsewhere(conn, sf, pkt, src, now)
                tcp = pkt.tcp
                if tcp is not None and conn.state is State.ESTABLISHED:
                    dss = pkt.find(DssExt) if conn.mp is not None else None
                    sf.on_tcp(tcp, pkt.payload, now, dss)
            else:
                self._maybe_reset(conn, sf, pkt, src)
        elif state is State.CLOSED:
            self.drops["closed_flow"] += 1  # closed, not yet forgotten: nothing to deliver
        else:
            self._on_established(conn, sf, pkt, now, src)
            if src == sf.remote_addr and (":" in dst[0]) != (":" in sf.local_addr[0]):
                # The peer moved to another family (an RSYN it proved, reaching us on our
                # interface of that family): answer from there, the only place that can.
                sf.local_addr = dst
        self._wake(conn)

    def _established_server(self, conn: Connection) -> None:
        # The SYN-ACK's retries were cut for half-open state (a minute at most, none for an
        # unproven path); the proven flow gets the full budget back.
        for sf in conn.subflows:
            sf.control.max_retries = sf.control.timers.max_retries
        listener = self._listener_by_id.get(conn.listener_id or 0)
        if listener is None or listener.closed:
            conn.abort_with("listener closed", send_rst=True)
            return
        if conn.peer_key is not None:
            listener.half_open.pop(conn.peer_key, None)
        listener.accept_queue.append(conn)  # bounded: checked before the handshake completes
        self._emit(IncomingConnection(conn.conn_id, listener.listener_id))

    def _on_established(
        self, conn: Connection, sf: Subflow, pkt: SalPacket, now: float, src: Address
    ) -> None:
        ctl = pkt.control
        if sf.join_state == "syn_sent":
            if not conn.on_join_synack(sf, pkt, src, now):
                self.drops["join_bad_synack"] += 1
            return
        if (
            ctl is not None
            and ctl.flags & ControlFlags.SYN
            and (pkt.src_flowid != sf.remote_flowid or src != sf.remote_addr)
        ):
            # Another instance answered a broadcast or retransmitted SYN too late: the
            # first answer won. Reset the loser so it does not hold a half-open flow; the
            # RST echoes the loser's own nonce (ours must never go to a stranger).
            self.stats["losing_synack"] += 1
            if not self.rst_limit.take(now):
                # Anyone who knows one of our flowIDs (its own connection's) can send these
                # from forged addresses: the answer is rate-limited like any stateless RST.
                self.stats["rst_rate_limited"] += 1
                return
            self.stats["rst_sent"] += 1
            rst = ControlExt(ControlFlags.RST, ctl.verno, 0, ctl.nonce)  # echoes its SYN-ACK
            loser = SalPacket(sf.local_flowid, pkt.src_flowid, pkt.protocol, [rst])
            self._send(loser, sf.local_addr, src)
            return
        if pkt.src_flowid != sf.remote_flowid and not (
            pkt.src_flowid == 0 and ctl is not None and ctl.flags & ControlFlags.RST
        ):
            # Only the peer's flow speaks on this flow (a stateless RST has no flowID).
            self.drops["wrong_peer_flow"] += 1
            return
        if src != sf.remote_addr and not self._from_elsewhere(conn, sf, pkt, src, now):
            return
        if sf.join_state == "syn_received" and ctl is not None and not ctl.flags & ControlFlags.RST:
            if (
                ctl.flags & ControlFlags.ACK
                and sf.control.nonce_ok(ctl)
                and sf.control.acked(ctl)
                and conn.join_proven(sf, pkt.find(JoinExt))
            ):
                conn.join_established(sf)
            else:
                self.drops["join_unproven"] += 1
            return
        if ctl is not None:
            if ctl.flags & ControlFlags.RST:
                self._maybe_reset(conn, sf, pkt, src)
                return
            if ctl.flags & CHALLENGE and not ctl.flags & ControlFlags.ACK:
                # The peer checks where we are (it carries a token, not a nonce).
                conn.on_control(sf, ctl, now, src)
                return
            if not sf.control.nonce_ok(ctl):
                self.drops["bad_nonce"] += 1
                return
            if ctl.flags & CHALLENGE and src != sf.remote_addr:
                # The answer to our address check: once it proves the candidate, the
                # packets held from there are taken, in the order they came.
                ch = sf.challenge
                held = ch.held if ch is not None and ch.candidate == src else []
                conn.on_control(sf, ctl, now, src)
                if held and sf.remote_addr == src:
                    self.stats["held_replayed"] += len(held)
                    for old in held:
                        if conn.state is State.CLOSED or sf.remote_addr != src:
                            break  # a held packet ended the flow or moved it: stop there
                        self._on_established(conn, sf, old, now, src)
                return
            if conn.mp is not None:
                for ext in pkt.extensions:
                    if type(ext) is AddAddrExt:
                        conn.on_add_addr(ext.address)
            if ctl.flags & ControlFlags.SYN:
                if sf is not conn.primary:
                    sf.join_third_ack = True  # a JOIN's third ACK was lost
                else:
                    conn.third_ack_pending = conn.role is Role.CLIENT  # our third ACK was lost
                return
            conn.on_control(sf, ctl, now, src)
            if conn.state is State.CLOSED:
                return
        tcp = pkt.tcp
        if isinstance(conn, DatagramConnection):
            conn.on_datagram(pkt, now)
        elif tcp is not None:
            if conn.state is State.TIME_WAIT:
                # A retransmitted FIN or data: acknowledge again. Never answer a pure ACK:
                # two ends in TIME_WAIT (simultaneous close) would ACK each other forever.
                if pkt.payload or tcp.flags & TcpFlags.FIN:
                    conn.ack_now = True
            else:
                if sf.join_state == "syn_received":
                    return  # nothing is taken on a JOIN before its proven third ACK
                dss = pkt.find(DssExt) if conn.mp is not None else None
                sf.on_tcp(tcp, pkt.payload, now, dss)

    def _from_elsewhere(
        self, conn: Connection, sf: Subflow, pkt: SalPacket, src: Address, now: float
    ) -> bool:
        """A packet of an established flow from an address that is not the peer's.

        An RSYN (the peer moving) and packets from the peer's previous address (late ones)
        are taken as usual. Anything else may be the peer behind a NAT that rebound: the
        packet is taken (TCP checks its numbers), but nothing is sent there until an RSYN
        challenge comes back with the peer's nonce. Returns whether to process the packet.
        """
        ctl = pkt.control
        size = len(pkt.payload) + 32
        ch = sf.challenge
        if ch is not None and ch.candidate == src:
            ch.rx += size  # also the answer to our challenge: it counts for the budget
        if ctl is not None and ctl.flags & ControlFlags.RSYN:
            return True  # RSYN, RSYN+ACK or a challenge answer: nonce and exchange decide
        if src == sf.prev_remote and now < sf.prev_remote_until:
            return True  # late packets from where the (verified) peer just was
        if conn.state is not State.ESTABLISHED:
            self.drops["not_peer_address"] += 1
            return False
        if ctl is not None and ctl.flags & ControlFlags.RST:
            self.drops["rst_from_elsewhere"] += 1
            return False
        mig = sf.mig
        if (ch is None or ch.candidate != src) and (mig is None or not mig.busy):
            conn.check_address(sf, src, self.rng.getrandbits(64), now)
            ch = sf.challenge
            assert ch is not None
            ch.rx = size
            self.stats["rebinding_challenge"] += 1
        if (
            ch is not None
            and ch.candidate == src
            and len(ch.held) < HELD_PACKETS
            and ch.held_bytes + size <= HELD_BYTES
        ):
            # Nothing from an unverified address changes the flow: the packet waits for the
            # address check (one round trip) and is taken only if the check succeeds.
            pkt.payload = bytes(pkt.payload)  # it was a view into the receive buffer
            ch.held.append(pkt)
            ch.held_bytes += size
            self.stats["held_unverified"] += 1
        else:
            self.drops["not_peer_address"] += 1
        return False

    def _maybe_reset(
        self, conn: Connection, sf: Subflow, pkt: SalPacket, src: Address | None = None
    ) -> None:
        """Act on a CONTROL(RST) only if it proves it comes from the peer."""
        ctl = pkt.control
        if ctl is None or not ctl.flags & ControlFlags.RST:
            self.drops["unexpected_packet"] += 1
            return
        cc = sf.control
        genuine = cc.peer_nonce is not None and ctl.nonce == cc.peer_nonce
        if not genuine and ctl.nonce == cc.local_nonce:
            # A stateless reset echoing our own nonce answers one of our control packets:
            # it must also echo that packet's number (the outstanding one, or the one our
            # ACKs carry), which nobody who did not see the packet knows.
            echoed = ctl.verno
            genuine = echoed == cc.snd_verno or (
                cc.outstanding is not None and echoed == cc.outstanding_verno
            )
        if not genuine and ctl.nonce == _ZERO_NONCE and src == sf.remote_addr:
            # A stateless reset answering a data segment echoes that segment's sequence
            # number in verno: it must come from the peer's address and name the exact
            # start of a segment we have in flight (RFC 5961's exact-sequence rule). One
            # inside what we have in flight but not exact gets a challenge ACK.
            echoed = unwrap(ctl.verno, sf.iss + 1, sf.snd_una)
            genuine = echoed in sf.segments
            if not genuine and sf.snd_una <= echoed < sf.snd_max:
                self._challenge_ack(conn, "rst")
        if not genuine:
            self.drops["bad_nonce"] += 1
            return
        if conn.mp is not None and len(conn.subflows) > 1:
            conn.subflow_failed(sf, 0.0)  # one path reset: the others carry on
            return
        conn.on_reset()

    def _send_stateless_rst(
        self,
        pkt: SalPacket,
        ctl: ControlExt | None,
        size: int,
        local: Address,
        remote: Address,
        now: float,
    ) -> None:
        """Answer ``pkt`` (``size`` bytes, for no flow or service of ours) with a RST, within
        the host's rate limit and never larger than the packet plus a CONTROL extension."""
        rst = self._rst_for(pkt, ctl).encode(local[0], remote[0])
        if len(rst) > size + _CONTROL_EXT:
            self.stats["rst_too_large"] += 1
            return
        if not self.rst_limit.take(now):
            self.stats["rst_rate_limited"] += 1
            return
        self.stats["rst_sent"] += 1
        self._out.append((rst, local, remote))

    def _challenge_ack(self, conn: Connection, why: str) -> None:
        """RFC 5961: answer a doubtful segment with an ACK (so a genuine peer resyncs)
        instead of acting on it; at most ``challenge_ack_rate`` a second per host."""
        conn.challenge_ack_due = True
        self.stats[f"challenge_ack_{why}"] += 1
        self._wake(conn)

    def _rst_for(self, pkt: SalPacket, ctl: ControlExt | None) -> SalPacket:
        """A stateless RST answering ``pkt`` (for an unknown flow or service)."""
        tcp = pkt.tcp
        if ctl is not None:
            nonce, echo = ctl.nonce, ctl.verno
        else:
            nonce, echo = _ZERO_NONCE, (tcp.seq if tcp is not None else 0) & MASK32
        rst = ControlExt(ControlFlags.RST, echo, 0, nonce)
        return SalPacket(0, pkt.src_flowid, pkt.protocol, [rst])

"""The sans-I/O Serval host: demultiplexing, listeners, connections, datagrams, timers.

``HostCore`` takes datagrams (``receive_datagram``, ``receive_datagrams`` for a batch),
returns datagrams to send (``datagrams_to_send``; ``wire_to_send`` keeps a segment train's
datagrams together for one UDP GSO call), reports events (``next_event``/``events``) and
one timer deadline for the whole host (``next_deadline``/``handle_timer``). It never does
I/O and never reads a clock: the asyncio runtime and the simulated network
(``pyserval.testing``) drive it.

Where each concern lives (all functions of this ``HostCore``, which stays the one object):
``handshake`` (SYNs to our listeners, SYN cookies, JOINs, our SYNs), ``demux`` (packets of
flows we have, and the off-path checks), ``datagrams`` (unconnected datagrams),
``relaying`` (forwarding, NAT relaying, DELAY: what routers do), ``paths`` (addresses,
migration, subflows, ICMP), ``records`` (listeners and limits), ``syncookies`` and
``ratelimit``.
"""

from __future__ import annotations

import heapq
import itertools
import random
import secrets
from collections import Counter, OrderedDict, deque
from typing import Final, cast

from ..errors import NoRoute
from ..naming.entropy import SecureRandom
from ..naming.service_id import ServiceID, ServiceLike, as_service_id
from ..sal.errors import MalformedPacket
from ..sal.extensions import (
    ControlFlags,
    RelayExt,
)
from ..sal.first_hop import forward_first_hops
from ..sal.flow_table import FlowTable
from ..sal.packet import SalPacket, decode_packet
from ..sal.service_table import Action, Rule, ServiceTable
from ..sal.train import SegmentTrain, SuperDatagram
from ..transport.config import StreamConfig
from ..transport.connection import Connection, Role, State, Subflow
from ..transport.datagram_flow import DatagramConnection, DatagramTooLarge
from ..transport.events import (
    DataReceived,
    Event,
    SendSpaceAvailable,
)
from ..transport.receive_budget import ReceiveBudget
from . import datagrams, demux, handshake, paths, relaying
from .ratelimit import JitteredBudget, TokenBucket
from .records import (
    CHALLENGE_ACK_INTERVAL,
    CHECK_BURST,
    HALF_OPEN_LIFETIME,
    MAX_DATAGRAM,
    Address,
    DatagramEndpoint,
    Delayed,
    Listener,
    retries_within,
)
from .syncookies import SynCookies
from .time_wait import TimeWait, TimeWaitTable

__all__ = [
    "CHECK_BURST",
    "HALF_OPEN_LIFETIME",
    "MAX_DATAGRAM",
    "DatagramEndpoint",
    "DatagramTooLarge",
    "HostCore",
    "Listener",
    "NoRoute",
]

# Bound once: an Enum member read off its class is slow in Python 3.11 (see
# transport.connection), and these are tested per packet.
_SYN_SENT: Final = State.SYN_SENT
_SYN_RECEIVED: Final = State.SYN_RECEIVED
_TIME_WAIT: Final = State.TIME_WAIT
_CLOSED: Final = State.CLOSED
_CLIENT: Final = Role.CLIENT
_FORWARD: Final = Action.FORWARD  # (resolved for every SYN we send)
_DEMUX: Final = Action.DEMUX


class HostCore:
    """One Serval end host with no I/O (see the module docstring)."""

    # Slots, as transport.connection's Connection has them: some fifty attributes, read on
    # every packet, are past what CPython 3.11 keeps in its shared-key layout. __dict__
    # stays, so a driver or test may still hang its own attributes (or methods) on a host.
    __slots__ = (
        "_asking",
        "_challenge_ack_at",
        "_check_limits",
        "_datagram_relays",
        "_dirty",
        "_emit_hook",
        "_events",
        "_listener_by_id",
        "_listener_ids",
        "_max_events",
        "_out",
        "_peer_flows",
        "_relay_keys",
        "_relay_rotate_at",
        "_relay_tags",
        "_supers",
        "_synack_relays",
        "_synack_retries",
        "_tiebreak",
        "_timers",
        "_wake_hook",
        "_woken",
        "addresses",
        "broadcast",
        "challenge_ack_limit",
        "check_limit",
        "compact_time_wait",
        "config",
        "connections",
        "datagram_endpoints",
        "delay_requests",
        "delay_timeout",
        "delayed",
        "drops",
        "flows",
        "forwarding",
        "internal_errors",
        "listeners",
        "max_delayed",
        "mp_tokens",
        "nat_relay",
        "receive_budget",
        "received",
        "rng",
        "rst_limit",
        "service_table",
        "stats",
        "syn_cookies",
        "time_wait",
        "trusted_forwarders",
        "__dict__",
        "__weakref__",
    )

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
        check_rate: float = 50.0,
        check_burst: int = 100,
        nat_relay: bool = True,
        compact_time_wait: bool = True,
    ) -> None:
        if not addresses:
            raise ValueError("a host needs at least one address")
        self.addresses = list(addresses)
        self.config = config or StreamConfig()
        # Every unguessable value (flowIDs, nonces, ISS, tokens) comes from the OS CSPRNG;
        # a seeded random.Random is only for the simulated network's determinism.
        self.rng = rng if rng is not None else SecureRandom()
        self.service_table = ServiceTable(rng=self.rng) if service_table is None else service_table
        self.flows: FlowTable[Subflow | DatagramEndpoint | TimeWait] = FlowTable(
            max_flows, self.rng
        )
        # Flows in TIME_WAIT, as small records (core.time_wait) unless compact_time_wait
        # is off (then the whole connection waits, as before).
        self.time_wait = TimeWaitTable()
        self.compact_time_wait = compact_time_wait
        self.connections: dict[int, Connection] = {}
        self.listeners: dict[ServiceID, Listener] = {}
        self.datagram_endpoints: dict[ServiceID, DatagramEndpoint] = {}
        self.drops: Counter[str] = Counter()  # dropped datagrams by reason
        self.stats: Counter[str] = Counter()
        self.internal_errors: list[BaseException] = []
        self.received = 0  # datagrams taken, of any kind
        self._events: deque[Event] = deque()
        self._max_events = max_events
        # What to send: datagrams, and a segment train's datagrams as super-datagrams
        # (see wire_to_send); _supers is set when one is queued.
        self._out: list[tuple[bytes | SuperDatagram, Address, Address]] = []
        self._supers = False
        self.receive_budget: ReceiveBudget | None = None
        """What the windows of all connections may promise at once (see
        :mod:`pyserval.transport.receive_budget`); None: each its whole free buffer. The
        runtime sets it to its UDP socket's receive buffer; set it before connecting."""
        self._dirty: dict[int, Connection] = {}  # insertion-ordered set of connections
        # The two hooks every connection is given, bound once: each read of self._emit or
        # self._wake makes a new bound-method object, which a connection would keep (and
        # free) as its own.
        self._emit_hook = self._emit
        self._wake_hook = self._wake
        # The connection the last packet woke (see receive_datagrams: an ACK due at once
        # is sent before the batch's next packet is taken).
        self._woken: Connection | None = None
        # (deadline, tiebreak, conn_id): by id, so that a stale entry holds no connection
        # alive after the host let it go (a flow in TIME_WAIT becomes a small record).
        self._timers: list[tuple[float, int, int]] = []
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
        self.delayed: deque[Delayed] = deque()
        self.max_delayed = max_delayed
        self.delay_timeout = delay_timeout
        self.delay_requests: list[ServiceID] = []
        self._asking: set[ServiceID] = set()
        # Answers to packets nobody asked for (stateless RSTs, SYN-cookie reminders) and
        # challenge ACKs (RFC 5961) are rate-limited per host: junk is never turned into a
        # flood of answers. The counts are in ``stats`` (rst_sent, rst_rate_limited, ...).
        self.rst_limit = TokenBucket(rst_rate, rst_burst)
        self.challenge_ack_limit = JitteredBudget(max(1.0, challenge_ack_rate), self.rng)
        self._challenge_ack_at: dict[int, float] = {}  # conn_id -> when it last sent one
        # Address checks: per connection (conn_id -> bucket, made on its first check) and
        # for the whole host (see CHECK_BURST).
        self.check_limit = TokenBucket(check_rate, check_burst)
        self._check_limits: dict[int, TokenBucket] = {}
        self.syn_cookies = SynCookies(self.rng)
        self._synack_retries = retries_within(self.config.control.initial_rto, HALF_OPEN_LIFETIME)
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
        self.flow_room()
        flowid = self.flows.allocate()
        conn, sf = self._new_flow(flowid, _CLIENT, sid, self.addresses[0], None, datagram)
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
                flowid, role, sid, self.config, self._emit_hook, local, remote, self.rng
            )
            conn.wake = self._wake_hook
            return conn, sf
        stream = Connection(flowid, role, sid, self.config, self._emit_hook)
        stream.wake = self._wake_hook
        stream.budget = self.receive_budget
        first = Subflow(stream, flowid, local, remote, self.rng)
        stream.subflows.append(first)
        return stream, first

    def bind_datagram(self, service: ServiceLike) -> DatagramEndpoint:
        """A datagram socket bound to ``service`` (receives what is sent to it)."""
        return datagrams.bind_datagram(self, service)

    def unbind_datagram(self, ep: DatagramEndpoint) -> None:
        """Close a datagram socket."""
        return datagrams.unbind_datagram(self, ep)

    def send_datagram(
        self,
        ep: DatagramEndpoint,
        service: ServiceLike,
        data: bytes,
        to: Address | None = None,
    ) -> None:
        """Send one unconnected datagram to ``service`` (via the service table, or straight
        to the address ``to``); raises NoRoute or DatagramTooLarge."""
        return datagrams.send_datagram(self, ep, service, data, to)

    # -- routing ------------------------------------------------------------------------
    def _resolve(self, sid: ServiceID) -> Address | None:
        """Where a SYN or datagram for ``sid`` goes: a FORWARD target, or ourselves (DEMUX)."""
        res = self.service_table.lookup(sid)
        if res is None:
            return None
        action = res.action
        if action is _FORWARD and res.target is not None:
            return res.target.address
        if action is _DEMUX:
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

    # -- NAT relay ----------------------------------------------------------------------

    def _relay_tag(self, address: Address, key: bytes | None = None) -> bytes:
        """A router's tag for ``address``: only this router can make it, and it names
        the address (so a relay request cannot send anything anywhere else)."""
        return relaying.relay_tag(self, address, key)

    def _relay_tag_ok(self, address: Address, tag: bytes) -> bool:
        return relaying.relay_tag_ok(self, address, tag)

    # -- DELAY --------------------------------------------------------------------------

    def take_delay_requests(self) -> list[ServiceID]:
        """Services with SYNs held by a DELAY rule that the controller has not answered."""
        return relaying.take_delay_requests(self)

    def release_delayed(self, service: ServiceLike, hop: Address | None, now: float) -> int:
        """The controller's verdict for ``service``: forward its held SYNs to ``hop``, or drop
        them (``hop`` None). Local connections waiting on the DELAY rule go to ``hop`` too.
        Returns how many SYNs were released."""
        return relaying.release_delayed(self, service, hop, now)

    # -- driving ------------------------------------------------------------------------
    def _wake(self, conn: Connection) -> None:
        self._dirty[conn.conn_id] = conn
        self._woken = conn

    def _send(self, pkt: SalPacket, local: Address, remote: Address) -> None:
        self._queue((pkt,), local, remote)

    def _queue(
        self, pkts: list[SalPacket] | tuple[SalPacket, ...], local: Address, remote: Address
    ) -> None:
        """Encode ``pkts`` for the wire from ``local`` to ``remote`` and queue them (a
        segment train as its datagrams, kept together for GSO: see wire_to_send)."""
        lip = local[0]
        rip = remote[0]
        out = self._out
        for p in pkts:
            if type(p) is SegmentTrain:
                out.extend([(d, local, remote) for d in p.wire(lip, rip)])
                self._supers = True
            else:
                out.append((p.encode(lip, rip), local, remote))

    def _send_all(self, conn: Connection, pkts: list[SalPacket]) -> None:
        if not pkts or not conn.subflows:
            return
        if self._synack_relays and conn.state is _SYN_RECEIVED:
            relay = self._synack_relays.get(conn.conn_id)
            if relay is not None:  # a retransmitted SYN-ACK goes both ways again
                for p in pkts:
                    ctl = p.control
                    if ctl is not None and ctl.flags & ControlFlags.SYN:
                        relaying.send_relayed(self, p, conn.primary.local_addr, *relay)
        subflows = conn.subflows
        if len(subflows) > 1:
            self._send_multipath(conn, pkts)
            return
        sf = subflows[0]
        remote = sf.remote_addr
        if remote is None:
            return  # never resolved: nothing was ever sent to the peer
        if sf.challenge is not None:
            paths.send_challenging(self, sf, pkts, remote)
            return
        self._queue(pkts, sf.local_addr, remote)  # (one call for the flush's packets)

    def _send_multipath(self, conn: Connection, pkts: list[SalPacket]) -> None:
        """Each packet on the addresses of the subflow it belongs to."""
        by_flow = {sf.local_flowid: sf for sf in conn.subflows}
        for p in pkts:
            sf = by_flow.get(p.src_flowid)
            if sf is None or sf.remote_addr is None:
                continue  # a subflow given up meanwhile
            if sf.challenge is not None:
                paths.send_challenging(self, sf, [p], sf.remote_addr)
            else:
                self._send(p, sf.local_addr, sf.remote_addr)

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
        return paths.migrate(self, conn, local, now, remote)

    def add_address(self, address: Address) -> None:
        """A new local address (interface) the host can use."""
        return paths.add_address(self, address)

    def remove_address(self, address: Address, now: float) -> list[Connection]:
        """The local ``address`` is gone: move every flow on it to the first remaining
        address of its family (else the first remaining one). Returns the connections
        moved."""
        return paths.remove_address(self, address, now)

    def set_address(self, old: Address, new: Address, now: float) -> list[Connection]:
        """The local address ``old`` changed to ``new``: every flow on it migrates."""
        return paths.set_address(self, old, new, now)

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Address, Address]]:
        """Every datagram to send now, as (payload, local address, remote address)."""
        out = self.wire_to_send(now)
        if not self._supers:
            return out  # type: ignore[return-value]  # no SuperDatagram among them
        self._supers = False
        flat: list[tuple[bytes, Address, Address]] = []
        for data, local, remote in out:
            if isinstance(data, SuperDatagram):
                flat.extend([(d, local, remote) for d in data.split()])
            else:
                flat.append((data, local, remote))
        return flat

    def wire_to_send(self, now: float) -> list[tuple[bytes | SuperDatagram, Address, Address]]:
        """:meth:`datagrams_to_send` with the datagrams of a segment train still
        together as :class:`~pyserval.sal.train.SuperDatagram` s, for an adapter that
        sends each with one UDP GSO call (and splits them where it cannot)."""
        # Every connection with something to send is flushed; what is queued is taken.
        # _supers stays set (only datagrams_to_send, which splits them, clears it): an
        # adapter on this method never reads it, and a stale True costs that one a scan.
        self._woken = None
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
            last = self._challenge_ack_at.get(conn.conn_id)
            if (last is None or now - last >= CHALLENGE_ACK_INTERVAL) and (
                self.challenge_ack_limit.take(now)
            ):
                self._challenge_ack_at[conn.conn_id] = now
                conn.ack_now = True
            else:
                self.stats["challenge_ack_rate_limited"] += 1
        try:
            if conn.syn_due and conn.state is _SYN_SENT:
                handshake.send_syn(self, conn, now)
            conn.output(now, pkts)
        except Exception as exc:  # a bug must not take the host down: count and keep it
            self._internal_error(exc)
            conn.abort_with(f"internal error: {exc!r}", send_rst=False)
        if pkts:
            self._send_all(conn, pkts)
        if conn.dead_subflows:
            for sf in conn.dead_subflows:
                self.flows.remove(sf.local_flowid)
                if sf.peer_key is not None:
                    self._peer_flows.pop(sf.peer_key, None)
            conn.dead_subflows = ()
        state = conn.state
        if state is _CLOSED:
            self._forget(conn)
        elif state is _TIME_WAIT and self.compact_time_wait and self._retire(conn):
            pass
        else:
            self._schedule(conn)

    def _retire(self, conn: Connection) -> bool:
        """Replace a connection in TIME_WAIT by its record (core.time_wait); False when it
        keeps the whole object (multipath)."""
        if conn.mp is not None or len(conn.subflows) != 1:
            return False
        record = TimeWait.of(conn, conn.primary, isinstance(conn, DatagramConnection))
        if record is None:
            return False
        self._forget(conn)
        self.flows.insert(record.flowid, record)
        self.time_wait.add(record)
        self.stats["time_wait_records"] += 1
        return True

    def flow_room(self) -> bool:
        """Whether the flow table has room for one more flow, making it by ending the
        oldest TIME_WAIT record when it is full (see core.time_wait)."""
        flows = self.flows
        if len(flows) < flows.max_flows:
            return True
        record = self.time_wait.oldest()
        if record is None:
            return False
        self._end_time_wait(record)
        self.stats["time_wait_evicted"] += 1
        return True

    def end_time_waits(self) -> None:
        """End every TIME_WAIT at once, sending nothing (the host is closing)."""
        while (record := self.time_wait.oldest()) is not None:
            self._end_time_wait(record)

    def _end_time_wait(self, record: TimeWait) -> None:
        self.flows.remove(record.flowid)
        conn = record.conn() if record.conn is not None else None
        if conn is not None and conn.state is _TIME_WAIT:
            conn.state = _CLOSED  # for an application still holding the object

    def _schedule(self, conn: Connection) -> None:
        d = conn.next_deadline()
        if d is not None and d != conn.scheduled:
            if len(self._timers) > 2 * len(self.connections) + 64:
                self._drop_stale_timers()
            heapq.heappush(self._timers, (d, next(self._tiebreak), conn.conn_id))
        conn.scheduled = d

    def _drop_stale_timers(self) -> None:
        """Keep only the live entries of the timer heap. A stale one (its connection
        re-armed or went away) is otherwise dropped only when it comes to the top, and a
        short connection leaves one 15 s ahead (its keepalive's) behind every entry of the
        connections after it: a host making connections one after another grew its heap by
        two a connection, and each push and pop by a level per doubling. The order in
        which entries come off is (deadline, tiebreak) either way."""
        connections = self.connections
        timers = self._timers  # (in place: a loop of next_deadline or handle_timer holds it)
        timers[:] = [
            entry
            for entry in timers
            if (conn := connections.get(entry[2])) is not None and conn.scheduled == entry[0]
        ]
        heapq.heapify(timers)

    def _forget(self, conn: Connection) -> None:
        """Remove a closed connection from the host's tables (the object stays readable)."""
        if self.connections.pop(conn.conn_id, None) is None:
            return
        # Kept so that a count of retransmissions survives the flows it was made on.
        resent = 0
        for sf in conn.subflows:
            resent += sf.retransmissions
            self.flows.remove(sf.local_flowid)
            if sf.peer_key is not None:
                self._peer_flows.pop(sf.peer_key, None)
        if resent:
            self.stats["retransmissions_ended"] += resent
        if conn.mp is not None and self.mp_tokens.get(conn.mp.local_token) is conn:
            self.mp_tokens.pop(conn.mp.local_token, None)
        conn.scheduled = None
        # Tables of the rare cases (a relayed SYN-ACK, challenge ACKs, address checks):
        # most closes find them empty, and a test costs less than a pop's method call.
        if self._synack_relays:
            self._synack_relays.pop(conn.conn_id, None)
        if self._challenge_ack_at:
            self._challenge_ack_at.pop(conn.conn_id, None)
        if self._check_limits:
            self._check_limits.pop(conn.conn_id, None)
        key = conn.peer_key
        if key is not None:
            self._peer_flows.pop(key, None)
            listener = self._listener_by_id.get(conn.listener_id or 0)
            if listener is not None:
                listener.half_open.pop(key, None)
        # No cycle left for the garbage collector: freed when the application drops it.
        conn.unlink_parts()

    def next_deadline(self) -> float | None:
        """When :meth:`handle_timer` must run next (one timer for the whole host)."""
        timers = self._timers
        waits = self.time_wait.next_deadline()
        connections = self.connections
        while timers:
            d, _, conn_id = timers[0]
            conn = connections.get(conn_id)
            if conn is not None and conn.scheduled == d:
                return d if waits is None or d < waits else waits
            heapq.heappop(timers)  # stale: the connection re-armed or went away
        return waits

    def handle_timer(self, now: float) -> None:
        """Run every connection timer that is due."""
        if self.time_wait:
            for record in self.time_wait.expire(now):
                self._end_time_wait(record)
        timers = self._timers
        while timers and timers[0][0] <= now:
            d, _, conn_id = heapq.heappop(timers)
            conn = self.connections.get(conn_id)
            if conn is None or conn.scheduled != d:
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
        return paths.on_unreachable(self, remote, now, reason)

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
        if self.receive_budget is not None:
            self.receive_budget.tick(now)
        if not self.forwarding:
            # Runs of in-order data of one flow (a train, as GRO delivers them) go by
            # header prediction, with one DataReceived per run rather than per segment.
            predict = demux.predicted
            follow = demux.predicted_run
            run: Connection | None = None
            i = 0
            n = len(batch)
            while i < n:
                data, src = batch[i]
                i += 1
                try:
                    conn = predict(self, data, src, dst, now)
                    if conn is not None:
                        # The datagrams that continue it (a GRO train), by header alone.
                        end = follow(conn, batch, i)
                        self.received += end - i + 1
                        i = end
                except Exception as exc:  # never let a packet take the host down
                    self._internal_error(exc)
                    conn = None
                if conn is not None:
                    if conn is not run:
                        if run is not None:
                            self._end_run(run)
                        run = conn
                    continue
                # An ACK due now (out of order, a hole filled, every second segment) goes
                # before the next packet is taken, as it would had the packets come one
                # per read: a sender without SACK counts on one duplicate ACK per segment
                # after a loss (RFC 5681 3.2, 4.2), and on the run's own ACK before them.
                if run is not None:
                    self._end_run(run)
                    if run.ack_now:
                        self._flush_now(run, now)
                    run = None
                self._woken = None
                self.received += 1
                self._decode_and_take(data, src, dst, now)
                woken = self._woken
                self._woken = None  # no reference kept to a connection closing meanwhile
                if woken is not None and woken.ack_now:
                    self._flush_now(woken, now)
            if run is not None:
                self._end_run(run)
            return
        receive = self.receive_datagram

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
            # It appends plain datagrams only, which the list holds too.
            cast("list[tuple[bytes, Address, Address]]", self._out),
            declined,
            other,
            self._fast_path_error,
            self.drops,
        )
        self.received += taken
        if syns:
            self.stats["forwarded_syn"] += syns

    def _flush_now(self, conn: Connection, now: float) -> None:
        """Queue what ``conn`` has to send now rather than at the end of the batch."""
        self._dirty.pop(conn.conn_id, None)
        self._flush(conn, now)

    def _end_run(self, conn: Connection) -> None:
        """Report data taken by header prediction (see :meth:`receive_datagrams`)."""
        conn.emit(DataReceived(conn.conn_id, conn.recv.readable))
        self._dirty[conn.conn_id] = conn

    def _fast_path_error(self, exc: Exception) -> None:
        self._internal_error(exc)
        self.drops["internal_error"] += 1

    def _drop(self, exc: Exception) -> None:
        """Count a datagram its path refused: a malformed one by its reason, anything
        else as an internal error (kept for inspection)."""
        if isinstance(exc, MalformedPacket):
            self.drops[exc.reason.value] += 1
        else:
            self._fast_path_error(exc)

    def receive_datagram(
        self,
        data: bytes,
        src: Address,
        dst: Address,
        now: float,
        *,
        fast: bool = True,
        predict: bool = True,
    ) -> None:
        """Take one UDP payload that arrived on local address ``dst`` from ``src``.

        ``fast=False``: the first-hop fast path has already declined it; ``predict=False``:
        header prediction has (see :meth:`receive_datagrams`)."""
        self.received += 1
        if self.receive_budget is not None and predict:
            self.receive_budget.tick(now)  # (receive_datagrams did, for its batch)
        try:
            if predict and not self.forwarding:
                conn = demux.predicted(self, data, src, dst, now)
                if conn is not None:
                    self._end_run(conn)
                    return
            # A router first tries forwarding from the SAL header alone.
            if fast and self.forwarding and relaying.fast_forward(self, data, src, dst):
                return
        except Exception as exc:  # never let a packet take the host down
            self._drop(exc)
            return
        self._decode_and_take(data, src, dst, now)

    def _decode_and_take(self, data: bytes, src: Address, dst: Address, now: float) -> None:
        """Decode one datagram the fast paths declined and hand it on: a router's relay
        request to the relay, the rest to its flow or the unconnected path. A malformed
        one is dropped and counted by reason; nothing raises out of here."""
        try:
            pkt = decode_packet(data)
        except Exception as exc:  # never let a packet take the host down
            self._drop(exc)
            return
        try:
            if self.forwarding:
                relaying.rotate_relay_keys(self, now)
                relay = pkt.find(RelayExt)
                if relay is not None and relay.is_request and pkt.source is None:
                    relaying.relay(self, pkt, relay, src, dst)
                    return
            if pkt.dst_flowid == 0:
                datagrams.on_unconnected(self, pkt, data, src, dst, now)
            else:
                demux.on_flow_packet(self, pkt, src, dst, now, len(data))
        except Exception as exc:  # never let a packet take the host down
            self._internal_error(exc)
            self.drops["internal_error"] += 1

    # -- SYN cookies ----------------------------------------------------------------------

    def add_path(self, conn: Connection, local: Address, remote: Address, now: float) -> Subflow:
        """Open another subflow of multipath ``conn`` from our ``local`` address to the
        peer's ``remote`` one; PathAdded tells when it carries data."""
        return paths.add_path(self, conn, local, remote, now)

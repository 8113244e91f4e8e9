"""A deterministic in-memory network with a virtual clock, for testing sans-I/O hosts.

:class:`SimNetwork` connects any number of *nodes* (objects that follow the
:class:`SansIONode` protocol: they never do I/O or read a clock themselves) through simulated
directional links with delay, jitter, loss, duplication, reordering, a bandwidth bottleneck
with a bounded FIFO queue, and NAT boxes. Time is virtual: nothing sleeps, and a run with the
same seed and the same inputs produces the same events in the same order.

Example::

    net = SimNetwork(seed=1, default_link=LinkConfig(delay=0.010))
    net.attach(client, ("10.0.0.1", 5000))
    net.attach(server, ("192.0.2.1", 7000))
    client.connect(...)          # an API call on the node ...
    net.kick(client)             # ... so the sim drains its outbox and re-arms its timer
    assert net.run_until(lambda: client.connected, timeout=5.0)

How the sim drives a node: after the node receives a datagram or handles its timer (or after
:meth:`SimNetwork.kick`), the sim calls ``datagrams_to_send(now)`` and sends every item, then
re-reads ``next_deadline()`` and (re)schedules the node's single timer.

The sim can also drive a node as the UDP adapter does on Linux. With ``gso=True`` it takes
the node's output through ``wire_to_send(now)`` when the node has it and cuts each
super-datagram (a segment train in one buffer) into its datagrams, as the kernel does: the
same datagrams travel, built by the train's code. With ``gro=True`` the datagrams that
arrive at one address at the same instant (at most ``max_batch``, in arrival order) go to
``receive_datagrams(batch, dst, now)`` in one call, and the node is serviced once after
them: what one read of a GRO socket hands over, so header-predicted runs and their one ACK
decision per run are exercised. Both default to the environment variable
``PYSERVAL_SIM_BATCHES`` (``1``: on), so a whole test suite can be run both ways.

Links are keyed by the *endpoint* IPs ``(source IP, destination IP)``; for a host behind a NAT
that is its inside IP (the public IP of a NAT never names a link). Unconfigured pairs use the
network's ``default_link``.
"""

from __future__ import annotations

import heapq
import os
import random
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Final, Literal, NamedTuple, Protocol

from pydantic.dataclasses import dataclass as pydantic_dataclass

from ..config import CONFIG
from ..sal.inet import Address
from ..tools.pcap import PcapWriter, SimPcapTap

__all__ = [
    "DROP_REASONS",
    "Address",
    "LinkConfig",
    "LinkStats",
    "NAT_BEHAVIOURS",
    "Nat",
    "NatBehaviour",
    "NetStats",
    "SansIONode",
    "SimNetwork",
    "SimulationError",
    "Tap",
    "TraceEvent",
]

"""An (IPv4 text, UDP port) pair."""

Tap = Callable[[float, bytes, Address, Address, str], None]
"""A trace hook: ``tap(time, data, src, dst, fate)``; see :class:`TraceEvent` for fates."""

DROP_REASONS: Final = ("loss", "filtered", "queue", "down", "no_route", "nat", "no_source")
"""Why a packet was dropped (the keys of :attr:`LinkStats.dropped`).

``loss``: random loss; ``filtered``: the network's ``loss_filter`` said so; ``queue``: tail
drop at a full bottleneck queue; ``down``: the link was down when the packet was sent or when
it would have arrived; ``no_route``: nobody owns the destination address (at arrival time);
``nat``: arrived at a NAT's public address with no mapping for its port; ``no_source``: the
sending node does not own the source address it used.
"""

# the tap/trace fate of each drop reason (random loss reads better as "lost")
_FATE: Final = {reason: reason for reason in DROP_REASONS} | {"loss": "lost"}

DEFAULT_TIMER_FIRE_LIMIT: Final = 10_000
# As many datagrams as the UDP adapter hands over per wake-up (runtime.udp.DEFAULT_MAX_BATCH;
# the sim sits below the runtime and does not import it).
DEFAULT_MAX_BATCH: Final = 256


class SansIONode(Protocol):
    """What the simulator needs from a host: datagrams in and out, and one timer."""

    def receive_datagram(self, data: bytes, src: Address, dst: Address, now: float) -> None:
        """Handle a datagram from ``src`` that arrived on the node's own address ``dst``."""
        ...

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Address, Address]]:
        """Drain the outbox: ``(data, local_src_address, remote_dst_address)`` items."""
        ...

    def next_deadline(self) -> float | None:
        """The absolute (virtual) time of the node's next timer, or None if none is due."""
        ...

    def handle_timer(self, now: float) -> None:
        """Run whatever timers are due at ``now``."""
        ...


class SimulationError(RuntimeError):
    """The simulation cannot make progress (e.g. a node's timer fires forever at one instant)."""


@pydantic_dataclass(frozen=True, slots=True, config=CONFIG)
class LinkConfig:
    """The behaviour of one direction of a link. All times are in (virtual) seconds. A
    :mod:`pyserval.config` dataclass: out-of-range values are refused when it is built.

    A packet that is sent at ``t`` first waits for the bottleneck (if ``bandwidth`` is set:
    FIFO behind the packets before it, then ``len(data) / bandwidth`` of serialisation), then
    takes ``delay`` plus a uniform random ``[0, jitter)``, plus, with probability ``reorder``,
    a uniform random ``[0, reorder_delay)`` (which lets later packets overtake it).
    """

    delay: float = 0.001
    """One-way propagation delay."""
    jitter: float = 0.0
    """Upper bound of a uniform random extra delay, drawn per packet."""
    loss: float = 0.0
    """Probability that a packet is lost."""
    duplicate: float = 0.0
    """Probability that a packet is delivered twice (each copy travels on its own)."""
    reorder: float = 0.0
    """Probability that a packet is held back by an extra random delay."""
    reorder_delay: float | None = None
    """Upper bound of the reordering delay; None means ``3 * delay``."""
    bandwidth: float | None = None
    """Bottleneck rate in bytes per second; None means infinitely fast."""
    queue_limit: int | None = None
    """Bytes the bottleneck may hold (being sent or waiting); more is tail-dropped.

    A packet that finds the bottleneck idle is always accepted. Only meaningful with
    ``bandwidth``.
    """
    down: bool = False
    """Drop everything (including packets in flight when they would arrive)."""

    def __post_init__(self) -> None:
        for name in ("delay", "jitter"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative: {getattr(self, name)}")
        for name in ("loss", "duplicate", "reorder"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1]: {getattr(self, name)}")
        if self.reorder_delay is not None and self.reorder_delay < 0:
            raise ValueError(f"reorder_delay must not be negative: {self.reorder_delay}")
        if self.bandwidth is not None and not self.bandwidth > 0:
            raise ValueError(f"bandwidth must be positive: {self.bandwidth}")
        if self.queue_limit is not None and self.queue_limit < 0:
            raise ValueError(f"queue_limit must not be negative: {self.queue_limit}")

    @property
    def effective_reorder_delay(self) -> float:
        """``reorder_delay``, or ``3 * delay`` when it is None."""
        return 3 * self.delay if self.reorder_delay is None else self.reorder_delay


@dataclass(slots=True)
class LinkStats:
    """Counters of one directional link (or, in :attr:`NetStats.total`, of all of them).

    ``sent_*`` counts the datagrams nodes handed to the network; ``delivered_*`` counts
    deliveries (duplicates included, so it may exceed ``sent_packets``); ``dropped`` counts
    packets by reason (see :data:`DROP_REASONS`; absent keys are zero).
    """

    sent_packets: int = 0
    sent_bytes: int = 0
    delivered_packets: int = 0
    delivered_bytes: int = 0
    duplicated: int = 0
    dropped: dict[str, int] = field(default_factory=dict)

    @property
    def dropped_packets(self) -> int:
        """All drops, whatever the reason."""
        return sum(self.dropped.values())

    def copy(self) -> LinkStats:
        """An independent snapshot."""
        return replace(self, dropped=dict(self.dropped))

    def add(self, other: LinkStats) -> None:
        """Add ``other``'s counters to this one's."""
        self.sent_packets += other.sent_packets
        self.sent_bytes += other.sent_bytes
        self.delivered_packets += other.delivered_packets
        self.delivered_bytes += other.delivered_bytes
        self.duplicated += other.duplicated
        for reason, n in other.dropped.items():
            self.dropped[reason] = self.dropped.get(reason, 0) + n


@dataclass(frozen=True, slots=True)
class NetStats:
    """A snapshot of the network's counters: per ``(src IP, dst IP)`` link and in total."""

    links: dict[tuple[str, str], LinkStats]
    total: LinkStats


class TraceEvent(NamedTuple):
    """One traced datagram event.

    ``fate`` is ``"sent"`` (a node handed it over; addresses as the node gave them),
    ``"duplicated"`` (the link made a second copy), ``"delivered"`` (addresses as the receiver
    sees them, after NAT), ``"lost"`` (random loss) or another drop reason of
    :data:`DROP_REASONS`. Packets in flight carry their on-the-wire (post-NAT) addresses.
    """

    time: float
    fate: str
    src: Address
    dst: Address
    data: bytes


NatBehaviour = Literal["endpoint-independent", "address-dependent", "address-and-port-dependent"]
"""RFC 4787's mapping and filtering behaviours (sections 4.1 and 5)."""

NAT_BEHAVIOURS: Final[tuple[NatBehaviour, ...]] = (
    "endpoint-independent",
    "address-dependent",
    "address-and-port-dependent",
)


class _Mapping:
    """One NAT binding: an inside address, its public port, and whom it let out to."""

    __slots__ = ("inside", "key", "last_out", "peers", "port")

    def __init__(self, inside: Address, key: tuple[object, ...], port: int, now: float) -> None:
        self.inside = inside
        self.key = key
        self.port = port
        self.last_out = now
        self.peers: set[object] = set()  # what filtering compares: IPs or (IP, port)s


class Nat:
    """A NAT box with RFC 4787's mapping and filtering behaviours.

    Created by :meth:`SimNetwork.add_nat`. Packets from an inside address to an outside one
    leave from ``(public_ip, port)``, ports allocated upwards from ``first_port``:

    * ``mapping``: ``"endpoint-independent"`` reuses one public port per inside ``(ip,
      port)`` for every destination; ``"address-dependent"`` one per destination IP;
      ``"address-and-port-dependent"`` one per destination address (a "symmetric" NAT).
    * ``filtering``: which outside sources may send in through a mapping: anyone
      (``"endpoint-independent"``, with EIM a "full cone"), only IPs the inside host sent
      to through it (``"address-dependent"``), or only the exact addresses
      (``"address-and-port-dependent"``: "port-restricted", the common Linux masquerade).
    * ``timeout``: a mapping not used by an outgoing packet for this long is forgotten
      (incoming packets do not refresh it, RFC 4787 REQ-6 allows either); None: never.
    * ``icmp``: a packet it drops (no mapping, or filtered) is answered with an ICMP port
      unreachable, delivered to the sender's ``on_unreachable(address, now)`` if it has one.

    The defaults are the full cone the sim always had. Dropped packets count in
    :attr:`dropped` (reason ``"nat"``); :attr:`filtered` counts those a mapping existed for.
    """

    __slots__ = (
        "_by_inside",
        "_by_port",
        "_next_port",
        "dropped",
        "filtered",
        "filtering",
        "icmp",
        "inside_ips",
        "mapping",
        "public_ip",
        "timeout",
    )

    def __init__(
        self,
        inside_ips: Iterable[str],
        public_ip: str,
        first_port: int = 40000,
        *,
        mapping: NatBehaviour = "endpoint-independent",
        filtering: NatBehaviour = "endpoint-independent",
        timeout: float | None = None,
        icmp: bool = False,
    ) -> None:
        if mapping not in NAT_BEHAVIOURS or filtering not in NAT_BEHAVIOURS:
            raise ValueError(f"mapping and filtering are one of {NAT_BEHAVIOURS}")
        if timeout is not None and not timeout > 0:
            raise ValueError(f"a NAT mapping timeout must be positive: {timeout}")
        self.inside_ips: frozenset[str] = frozenset(inside_ips)
        self.public_ip = public_ip
        self.mapping: NatBehaviour = mapping
        self.filtering: NatBehaviour = filtering
        self.timeout = timeout
        self.icmp = icmp
        self.dropped = 0
        """Packets dropped at the public address (no mapping for the port, or filtered)."""
        self.filtered = 0
        """Of those, packets dropped by filtering (a mapping existed, not for that sender)."""
        self._by_inside: dict[tuple[Address, tuple[object, ...]], _Mapping] = {}
        self._by_port: dict[int, _Mapping] = {}
        self._next_port = first_port

    def __repr__(self) -> str:
        return f"Nat({sorted(self.inside_ips)!r}, {self.public_ip!r})"

    def _key(self, dst: Address) -> tuple[object, ...]:
        if self.mapping == "endpoint-independent":
            return ()
        return (dst[0],) if self.mapping == "address-dependent" else (dst,)

    def _peer(self, remote: Address) -> object:
        return remote[0] if self.filtering == "address-dependent" else remote

    def _expired(self, m: _Mapping, now: float) -> bool:
        if self.timeout is None or now - m.last_out < self.timeout:
            return False
        self._by_inside.pop((m.inside, m.key), None)
        self._by_port.pop(m.port, None)
        return True

    def _map(self, inside: Address, dst: Address, now: float) -> Address:
        """The public source of a packet from ``inside`` to ``dst`` (creating a mapping)."""
        key = self._key(dst)
        m = self._by_inside.get((inside, key))
        if m is None or self._expired(m, now):
            port = self._next_port
            if port > 0xFFFF:
                raise SimulationError(f"{self!r} ran out of public ports")
            self._next_port = port + 1
            m = _Mapping(inside, key, port, now)
            self._by_inside[(inside, key)] = m
            self._by_port[port] = m
        m.last_out = now
        if self.filtering != "endpoint-independent":
            m.peers.add(self._peer(dst))
        return (self.public_ip, m.port)

    def _lookup(self, public_port: int, now: float) -> _Mapping | None:
        m = self._by_port.get(public_port)
        if m is None or self._expired(m, now):
            return None
        return m

    def _admit(self, public_port: int, src: Address, now: float) -> Address | None:
        """The inside destination of a packet from ``src`` to our ``public_port``, or None
        (dropped: no live mapping, or filtered)."""
        m = self._lookup(public_port, now)
        if m is None:
            return None
        if self.filtering != "endpoint-independent" and self._peer(src) not in m.peers:
            self.filtered += 1
            return None
        return m.inside

    def rebind(self, inside: Address | None = None) -> None:
        """Forget the mappings of ``inside`` (default: all mappings).

        The next outgoing packet gets a fresh public port, and packets to the old one are
        dropped: this models a NAT rebinding (a mapping timing out).
        """
        if inside is None:
            self._by_inside.clear()
            self._by_port.clear()
            return
        for key, m in list(self._by_inside.items()):
            if m.inside == inside:
                del self._by_inside[key]
                del self._by_port[m.port]

    def public_address(self, inside: Address) -> Address | None:
        """The public address ``inside`` was last mapped to, if any (expiry not checked)."""
        best = None
        for m in self._by_inside.values():
            if m.inside == inside and (best is None or m.last_out >= best.last_out):
                best = m
        return None if best is None else (self.public_ip, best.port)

    def inside_address(self, public_port: int) -> Address | None:
        """The inside address the public port is currently mapped to, if any."""
        m = self._by_port.get(public_port)
        return None if m is None else m.inside

    @property
    def mappings(self) -> dict[Address, Address]:
        """A copy of the current mappings, inside address -> (latest) public address."""
        out: dict[Address, Address] = {}
        for m in sorted(self._by_inside.values(), key=lambda m: m.last_out):
            out[m.inside] = (self.public_ip, m.port)
        return out


class _Node:
    __slots__ = (
        "addresses",
        "armed",
        "fire_count",
        "gen",
        "last_fire",
        "name",
        "node",
        "timer_at",
    )

    def __init__(self, node: SansIONode, name: str) -> None:
        self.node = node
        self.name = name
        self.addresses: set[Address] = set()
        self.armed = False
        self.gen = 0
        self.timer_at = 0.0
        self.last_fire = -1.0
        self.fire_count = 0


class _Link:
    __slots__ = ("backlog", "backlog_bytes", "busy_until", "cfg", "explicit", "stats")

    def __init__(self, cfg: LinkConfig, explicit: bool) -> None:
        self.cfg = cfg
        self.explicit = explicit
        self.stats = LinkStats()
        self.busy_until = 0.0
        self.backlog: deque[tuple[float, int]] = deque()  # (finish time, size) at the bottleneck
        self.backlog_bytes = 0


_Packet = tuple[bytes, Address, Address, _Link]
# heap entries: (time, sequence number, payload, timer generation)
_Event = tuple[float, int, _Node | _Packet, int]


class SimNetwork:
    """A deterministic simulated network with a virtual clock; see the module docstring.

    ``seed`` seeds the one :class:`random.Random` all randomness comes from. With
    ``trace=True`` every datagram event is appended to :attr:`trace`; ``tap`` (if given) is
    called for every event as well. ``timer_fire_limit`` bounds how often one node's timer may
    fire at the same instant before :class:`SimulationError` is raised. ``gso``, ``gro`` and
    ``max_batch``: drive nodes as the UDP adapter does with GSO and GRO (see the module
    docstring).
    """

    def __init__(
        self,
        seed: int = 0,
        default_link: LinkConfig | None = None,
        *,
        trace: bool = False,
        tap: Tap | None = None,
        loss_filter: Callable[[bytes, Address, Address], bool] | None = None,
        timer_fire_limit: int = DEFAULT_TIMER_FIRE_LIMIT,
        gso: bool | None = None,
        gro: bool | None = None,
        max_batch: int = DEFAULT_MAX_BATCH,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, not {max_batch}")
        batches = os.environ.get("PYSERVAL_SIM_BATCHES") == "1"
        self.gso = batches if gso is None else gso
        """Take nodes' output as super-datagrams (see the module docstring)."""
        self.gro = batches if gro is None else gro
        """Hand nodes what arrives at one instant in one batch (see the module docstring)."""
        self.max_batch = max_batch
        """The most datagrams handed to a node in one ``receive_datagrams`` call."""
        self._rng = random.Random(seed)
        self._now = 0.0
        self._seq = 0
        self._heap: list[_Event] = []
        self._in_flight = 0
        self._armed = 0
        self._nodes: dict[int, _Node] = {}
        self._owners: dict[Address, _Node] = {}
        self._default_link = default_link if default_link is not None else LinkConfig()
        self._link_cfgs: dict[tuple[str, str], LinkConfig] = {}
        self._links: dict[tuple[str, str], _Link] = {}
        self._nat_by_inside: dict[str, Nat] = {}
        self._nat_by_public: dict[str, Nat] = {}
        self._tap = tap
        self._tracing = trace
        self._observed = trace or tap is not None
        self.trace: list[TraceEvent] = []
        """Every datagram event, in order, when the network was created with ``trace=True``."""
        self.loss_filter = loss_filter
        """``loss_filter(data, src, dst) -> bool``: drop a packet the moment it is sent when
        it returns True (reason ``"filtered"``); src and dst are as the node gave them."""
        self.timer_fire_limit = timer_fire_limit

    # ------------------------------------------------------------------ clock and running

    @property
    def now(self) -> float:
        """The virtual time in seconds (starts at 0.0)."""
        return self._now

    @property
    def tap(self) -> Tap | None:
        """The trace hook called for every datagram event (settable)."""
        return self._tap

    @tap.setter
    def tap(self, tap: Tap | None) -> None:
        self._tap = tap
        self._observed = self._tracing or tap is not None

    def capture(
        self, path: str | os.PathLike[str], fates: tuple[str, ...] = ("sent",)
    ) -> PcapWriter:
        """Record datagram events in a pcap file at ``path`` (for Wireshark/tshark).

        ``fates`` as in :class:`~pyserval.tools.pcap.SimPcapTap`; any tap already set keeps
        being called. Close the returned writer (or use ``with``) to finish the file.
        """
        writer = PcapWriter(path)
        pcap_tap = SimPcapTap(writer, fates)
        previous = self._tap
        if previous is None:
            self.tap = pcap_tap
        else:

            def both(now: float, data: bytes, src: Address, dst: Address, fate: str) -> None:
                previous(now, data, src, dst, fate)
                pcap_tap(now, data, src, dst, fate)

            self.tap = both
        return writer

    def idle(self) -> bool:
        """True when no datagram is in flight and no node has a timer armed."""
        return self._in_flight == 0 and self._armed == 0

    def next_event_time(self) -> float | None:
        """The time of the next scheduled event, or None when idle."""
        heap = self._heap
        while heap:
            _, _, payload, gen = heap[0]
            if isinstance(payload, _Node) and gen != payload.gen:
                heapq.heappop(heap)  # a stale timer
                continue
            return heap[0][0]
        return None

    def step(self) -> bool:
        """Process one event (a delivery or a timer); False if there was none."""
        heap = self._heap
        while heap:
            if self._process(heapq.heappop(heap)):
                return True
        return False

    def run(self, until: float) -> None:
        """Process every event up to and including time ``until``; then the clock reads it."""
        if until < self._now:
            raise ValueError(f"cannot run backwards: until={until} < now={self._now}")
        heap = self._heap
        process = self._process
        while heap and heap[0][0] <= until:
            process(heapq.heappop(heap))
        self._now = until

    def run_for(self, seconds: float) -> None:
        """Run for ``seconds`` of virtual time."""
        self.run(self._now + seconds)

    def run_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Run until ``predicate()`` holds (checked first and after every event).

        Returns False if ``timeout`` seconds of virtual time pass first; the clock then reads
        the start time plus ``timeout``.
        """
        if predicate():
            return True
        deadline = self._now + timeout
        heap = self._heap
        process = self._process
        while heap and heap[0][0] <= deadline:
            if process(heapq.heappop(heap)) and predicate():
                return True
        self._now = max(self._now, deadline)
        return False

    def _process(self, event: _Event) -> bool:
        t, _, payload, gen = event
        if isinstance(payload, _Node):
            if gen != payload.gen:
                return False  # superseded by a later (re)arming
            self._now = t
            self._fire(payload)
        elif self.gro:
            self._now = t
            self._deliver_batch(t, payload)
        else:
            self._now = t
            self._deliver(*payload)
        return True

    # ------------------------------------------------------------------ nodes and addresses

    def attach(self, node: SansIONode, *addresses: Address, name: str | None = None) -> None:
        """Connect ``node``, which owns ``addresses`` (one per interface; more may follow).

        Attaching a node again adds addresses. The node is polled right away (as by
        :meth:`kick`). ``name`` is used in error messages.
        """
        st = self._nodes.get(id(node))
        if st is None:
            if name is None:
                first = f"@{addresses[0][0]}:{addresses[0][1]}" if addresses else ""
                name = f"{type(node).__name__}{first}"
            st = _Node(node, name)
            self._nodes[id(node)] = st
        elif name is not None:
            st.name = name
        for addr in addresses:
            self._add_address(st, addr)
        self._service(st)

    def detach(self, node: SansIONode) -> None:
        """Disconnect ``node``: drop its addresses and cancel its timer."""
        st = self._node(node)
        for addr in list(st.addresses):
            del self._owners[addr]
        st.addresses.clear()
        self._disarm(st)
        del self._nodes[id(node)]

    def add_address(self, node: SansIONode, address: Address) -> None:
        """Give an attached node one more address (e.g. a new interface)."""
        self._add_address(self._node(node), address)

    def detach_address(self, address: Address) -> None:
        """Take an address away from its node; later packets to it are dropped (no_route)."""
        st = self._owners.pop(address, None)
        if st is None:
            raise KeyError(f"address {address} is not attached")
        st.addresses.discard(address)

    def owner(self, address: Address) -> SansIONode | None:
        """The node that owns ``address``, if any."""
        st = self._owners.get(address)
        return None if st is None else st.node

    def addresses(self, node: SansIONode) -> list[Address]:
        """The addresses ``node`` owns, sorted."""
        return sorted(self._node(node).addresses)

    def timer(self, node: SansIONode) -> float | None:
        """When ``node``'s (single) timer is armed to fire, or None."""
        st = self._node(node)
        return st.timer_at if st.armed else None

    def kick(self, *nodes: SansIONode) -> None:
        """Poll nodes after the test called an API method on them.

        Drains each node's outbox (sending at the current time) and re-arms its timer.
        """
        for node in nodes:
            self._service(self._node(node))

    def _node(self, node: SansIONode) -> _Node:
        st = self._nodes.get(id(node))
        if st is None:
            raise KeyError(f"node {node!r} is not attached")
        return st

    def _add_address(self, st: _Node, addr: Address) -> None:
        holder = self._owners.get(addr)
        if holder is not None and holder is not st:
            raise ValueError(f"address {addr} already belongs to {holder.name}")
        self._owners[addr] = st
        st.addresses.add(addr)

    # ------------------------------------------------------------------ links

    @property
    def default_link(self) -> LinkConfig:
        """The configuration of every link not set explicitly (settable)."""
        return self._default_link

    @default_link.setter
    def default_link(self, cfg: LinkConfig) -> None:
        self._default_link = cfg
        for link in self._links.values():
            if not link.explicit:
                link.cfg = cfg

    def link_config(self, src_ip: str, dst_ip: str) -> LinkConfig:
        """The configuration of the link from ``src_ip`` to ``dst_ip``."""
        return self._link_cfgs.get((src_ip, dst_ip), self._default_link)

    def set_link(self, src_ip: str, dst_ip: str, cfg: LinkConfig) -> None:
        """Configure one direction of a link (packets already in flight keep their timing)."""
        self._link_cfgs[(src_ip, dst_ip)] = cfg
        link = self._links.get((src_ip, dst_ip))
        if link is not None:
            link.cfg = cfg
            link.explicit = True

    def set_path(self, ip_a: str, ip_b: str, cfg: LinkConfig) -> None:
        """Configure both directions between two IPs."""
        self.set_link(ip_a, ip_b, cfg)
        self.set_link(ip_b, ip_a, cfg)

    def clear_link(self, src_ip: str, dst_ip: str) -> None:
        """Make one direction use the default configuration again."""
        self._link_cfgs.pop((src_ip, dst_ip), None)
        link = self._links.get((src_ip, dst_ip))
        if link is not None:
            link.cfg = self._default_link
            link.explicit = False

    def cut(self, ip_a: str, ip_b: str, *, both_ways: bool = True) -> None:
        """Take the link down (from ``ip_a`` to ``ip_b``, and back unless ``both_ways=False``).

        Packets in flight are dropped when they would arrive.
        """
        self.set_link(ip_a, ip_b, replace(self.link_config(ip_a, ip_b), down=True))
        if both_ways:
            self.set_link(ip_b, ip_a, replace(self.link_config(ip_b, ip_a), down=True))

    def restore(self, ip_a: str, ip_b: str, *, both_ways: bool = True) -> None:
        """Bring a link that was :meth:`cut` back up (its other settings are kept)."""
        self.set_link(ip_a, ip_b, replace(self.link_config(ip_a, ip_b), down=False))
        if both_ways:
            self.set_link(ip_b, ip_a, replace(self.link_config(ip_b, ip_a), down=False))

    def _link(self, key: tuple[str, str]) -> _Link:
        link = self._links.get(key)
        if link is None:
            cfg = self._link_cfgs.get(key)
            link = _Link(cfg if cfg is not None else self._default_link, cfg is not None)
            self._links[key] = link
        return link

    # ------------------------------------------------------------------ NAT

    def add_nat(
        self,
        inside_ips: Iterable[str],
        public_ip: str,
        *,
        mapping: NatBehaviour = "endpoint-independent",
        filtering: NatBehaviour = "endpoint-independent",
        timeout: float | None = None,
        icmp: bool = False,
    ) -> Nat:
        """Put the hosts with ``inside_ips`` behind a NAT whose outside address is ``public_ip``
        (behaviours as :class:`Nat`; the default is a full cone with no timeout).

        Traffic between inside IPs of the same NAT is not translated. An IP may be inside at
        most one NAT, and a public IP belongs to one NAT.
        """
        nat = Nat(
            inside_ips, public_ip, mapping=mapping, filtering=filtering, timeout=timeout, icmp=icmp
        )
        if public_ip in self._nat_by_public:
            raise ValueError(f"{public_ip} is already the public IP of a NAT")
        if public_ip in nat.inside_ips:
            raise ValueError(f"the public IP {public_ip} cannot be inside its own NAT")
        for ip in nat.inside_ips:
            if ip in self._nat_by_inside:
                raise ValueError(f"{ip} is already behind {self._nat_by_inside[ip]!r}")
        for ip in nat.inside_ips:
            self._nat_by_inside[ip] = nat
        self._nat_by_public[public_ip] = nat
        return nat

    # ------------------------------------------------------------------ statistics

    @property
    def stats(self) -> NetStats:
        """A snapshot of all counters (per directional link and in total)."""
        links = {key: link.stats.copy() for key, link in self._links.items()}
        total = LinkStats()
        for s in links.values():
            total.add(s)
        return NetStats(links, total)

    def link_stats(self, src_ip: str, dst_ip: str) -> LinkStats:
        """A snapshot of one directional link's counters (zeros if it carried nothing)."""
        link = self._links.get((src_ip, dst_ip))
        return LinkStats() if link is None else link.stats.copy()

    def reset_stats(self) -> None:
        """Zero all counters (the trace is kept)."""
        for link in self._links.values():
            link.stats = LinkStats()

    # ------------------------------------------------------------------ the datapath

    def _emit(self, data: bytes, src: Address, dst: Address, fate: str) -> None:
        if self._tracing:
            self.trace.append(TraceEvent(self._now, fate, src, dst, data))
        if self._tap is not None:
            self._tap(self._now, data, src, dst, fate)

    def _drop(self, link: _Link, reason: str, data: bytes, src: Address, dst: Address) -> None:
        dropped = link.stats.dropped
        dropped[reason] = dropped.get(reason, 0) + 1
        if self._observed:
            self._emit(data, src, dst, _FATE[reason])

    def _service(self, st: _Node) -> None:
        node = st.node
        wire = getattr(node, "wire_to_send", None) if self.gso else None
        if wire is None:
            for data, src, dst in node.datagrams_to_send(self._now):
                self._send(st, data, src, dst)
        else:
            for item, src, dst in wire(self._now):
                if isinstance(item, (bytes, bytearray, memoryview)):
                    self._send(st, item, src, dst)
                else:  # a super-datagram: the kernel cuts it into its datagrams (GSO)
                    for data in item.split():
                        self._send(st, data, src, dst)
        self._arm(st, node.next_deadline())

    def _arm(self, st: _Node, deadline: float | None) -> None:
        if deadline is None:
            self._disarm(st)
            return
        t = deadline if deadline > self._now else self._now
        if st.armed:
            if st.timer_at == t:
                return
        else:
            st.armed = True
            self._armed += 1
        st.gen += 1
        st.timer_at = t
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, st, st.gen))

    def _disarm(self, st: _Node) -> None:
        if st.armed:
            st.armed = False
            st.gen += 1
            self._armed -= 1

    def _fire(self, st: _Node) -> None:
        st.armed = False
        self._armed -= 1
        now = self._now
        node = st.node
        deadline = node.next_deadline()
        if deadline is not None and deadline <= now:
            if now == st.last_fire:
                st.fire_count += 1
                if st.fire_count > self.timer_fire_limit:
                    raise SimulationError(
                        f"node {st.name}: timer fired {self.timer_fire_limit} times at "
                        f"t={now} without its deadline moving past now ({deadline})"
                    )
            else:
                st.last_fire = now
                st.fire_count = 1
            node.handle_timer(now)
        self._service(st)

    def _send(
        self, st: _Node, data: bytes | bytearray | memoryview, src: Address, dst: Address
    ) -> None:
        data = bytes(data)  # a no-op for bytes; copies a bytearray/memoryview
        now = self._now
        src_ip = src[0]
        dst_ip = dst[0]
        # the link is named by the endpoint IPs: look through the destination's NAT, if any
        nat = self._nat_by_public.get(dst_ip)
        if nat is not None:
            m = nat._by_port.get(dst[1])
            if m is not None:
                dst_ip = m.inside[0]
        key = (src_ip, dst_ip)
        link = self._links.get(key)
        if link is None:
            link = self._link(key)
        stats = link.stats
        stats.sent_packets += 1
        stats.sent_bytes += len(data)
        if self._observed:
            self._emit(data, src, dst, "sent")
        if self._owners.get(src) is not st:
            self._drop(link, "no_source", data, src, dst)
            return
        wire_src = src
        nat = self._nat_by_inside.get(src_ip)
        if nat is not None and dst[0] not in nat.inside_ips:
            wire_src = nat._map(src, dst, now)
        loss_filter = self.loss_filter
        if loss_filter is not None and loss_filter(data, src, dst):
            self._drop(link, "filtered", data, src, dst)
            return
        cfg = link.cfg
        if cfg.down:
            self._drop(link, "down", data, wire_src, dst)
            return
        rng = self._rng
        if cfg.loss and rng.random() < cfg.loss:
            self._drop(link, "loss", data, wire_src, dst)
            return
        copies = 1
        if cfg.duplicate and rng.random() < cfg.duplicate:
            copies = 2
            stats.duplicated += 1
            if self._observed:
                self._emit(data, wire_src, dst, "duplicated")
        bandwidth = cfg.bandwidth
        for _ in range(copies):
            t = now
            if bandwidth is not None:
                size = len(data)
                backlog = link.backlog
                while backlog and backlog[0][0] <= now:
                    link.backlog_bytes -= backlog.popleft()[1]
                limit = cfg.queue_limit
                if limit is not None and link.backlog_bytes and link.backlog_bytes + size > limit:
                    self._drop(link, "queue", data, wire_src, dst)
                    continue
                start = link.busy_until
                if start < now:
                    start = now
                t = start + size / bandwidth
                link.busy_until = t
                backlog.append((t, size))
                link.backlog_bytes += size
            t += cfg.delay
            if cfg.jitter:
                t += rng.random() * cfg.jitter
            if cfg.reorder and rng.random() < cfg.reorder:
                t += rng.random() * cfg.effective_reorder_delay
            self._seq += 1
            self._in_flight += 1
            heapq.heappush(self._heap, (t, self._seq, (data, wire_src, dst, link), 0))

    def _icmp_unreachable(self, src: Address, dst: Address) -> None:
        """A NAT's ICMP port unreachable for a packet from ``src`` to ``dst``: the sender
        (through its own NAT's mapping, if it is behind one) hears ``on_unreachable(dst)``."""
        sender = self._owners.get(src)
        back = self._nat_by_public.get(src[0])
        if back is not None:
            m = back._by_port.get(src[1])
            sender = None if m is None else self._owners.get(m.inside)
        if sender is None:
            return
        hook = getattr(sender.node, "on_unreachable", None)
        if hook is None:
            return
        hook(dst, self._now)
        self._service(sender)

    def _deliver_batch(self, t: float, first: _Packet) -> None:
        """Deliver ``first`` and the datagrams that arrive right after it at the same
        instant and address, as one GRO read would hand them over."""
        wire_dst = first[2]
        packets = [first]
        heap = self._heap
        limit = self.max_batch
        while len(packets) < limit and heap:
            at, _, payload, _ = heap[0]
            if at != t or isinstance(payload, _Node) or payload[2] != wire_dst:
                break
            heapq.heappop(heap)
            packets.append(payload)
        # Consecutive datagrams for the same node and address go together (a NAT may
        # turn one public address into several inside ones).
        batch: list[tuple[bytes, Address]] = []
        into: tuple[_Node, Address] | None = None
        for data, src, dst, link in packets:
            arrived = self._arrive(data, src, dst, link)
            if arrived is None:
                continue
            if into is not None and arrived != into:
                self._hand_over(*into, batch)
                batch = []
            into = arrived
            batch.append((data, src))
        if into is not None and batch:
            self._hand_over(*into, batch)

    def _hand_over(self, st: _Node, dst: Address, batch: list[tuple[bytes, Address]]) -> None:
        node = st.node
        receive = getattr(node, "receive_datagrams", None)
        if receive is None:
            for data, src in batch:
                node.receive_datagram(data, src, dst, self._now)
        else:
            receive(batch, dst, self._now)
        self._service(st)

    def _arrive(
        self, data: bytes, src: Address, dst: Address, link: _Link
    ) -> tuple[_Node, Address] | None:
        """A datagram reaches the end of its link: the node and address it is for, or
        None when it is dropped on the way in (counted)."""
        self._in_flight -= 1
        if link.cfg.down:
            self._drop(link, "down", data, src, dst)
            return None
        nat = self._nat_by_public.get(dst[0])
        if nat is not None:
            inside = nat._admit(dst[1], src, self._now)
            if inside is not None:
                dst = inside
            elif dst not in self._owners:
                nat.dropped += 1
                self._drop(link, "nat", data, src, dst)
                if nat.icmp:
                    self._icmp_unreachable(src, dst)
                return None
        st = self._owners.get(dst)
        if st is None:
            self._drop(link, "no_route", data, src, dst)
            return None
        stats = link.stats
        stats.delivered_packets += 1
        stats.delivered_bytes += len(data)
        if self._observed:
            self._emit(data, src, dst, "delivered")
        return st, dst

    def _deliver(self, data: bytes, src: Address, dst: Address, link: _Link) -> None:
        arrived = self._arrive(data, src, dst, link)
        if arrived is not None:
            st, local = arrived
            st.node.receive_datagram(data, src, local, self._now)
            self._service(st)

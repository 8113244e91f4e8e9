"""The service router: resolves SYNs by serviceID and learns where services are.

A :class:`Router` is a forwarding :class:`~pyserval.Host` plus a :class:`Registry`:

* Data plane: SYNs and unconnected datagrams are forwarded by longest-prefix match to a
  registered instance (weighted, highest priority first), with the path recorded in the
  SOURCE extension; the instance answers the client directly, so nothing after the SYN
  passes through the router.
* Control plane: REGISTER/UNREGISTER messages (datagrams to :data:`CONTROL_SERVICE`) are
  checked (signatures, replay, claimed address) and acknowledged; registrations expire
  without refreshes; an address the network reports unreachable is dropped at once.
* Hierarchy: with ``upstream``, the router announces its ``announce`` prefixes there (as a
  host registers its services) and sends what it cannot resolve upstream.
* DELAY: SYNs to a ``delay`` prefix are held (bounded) while the verdict is awaited; the
  default verdict waits up to ``delay_timeout`` for an instance to register.
* Inspection: TABLE_REQUEST pages through the table and counters (``pyserval table``).
* Cluster: with ``etcd`` and ``cluster``, the registry is shared with the cluster's other
  routers through etcd (:mod:`pyserval.control.cluster`; needs the ``[cluster]`` extra).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Final

from ..core.host import DatagramEndpoint
from ..naming.service_id import PrefixLike, ServiceID, as_service_prefix
from ..runtime.host import DelayHandler, Host, HostConfig, parse_address
from ..runtime.service_events import ServiceEvent, ServiceEventKind
from ..sal.inet import Address, format_address
from ..sal.service_table import Action, Rule
from ..transport.events import DatagramReceived, Event
from .controller import HostServiceController
from .inspection import TableService
from .messages import (
    CONTROL_SERVICE,
    BadControlMessage,
    RegisterMessage,
    TableEntryInfo,
    TableReply,
    TableRequest,
    UnregisterMessage,
    decode_message,
    encode_message,
)
from .registry import Registry
from .security import RegistrationGuard

LOGGER = logging.getLogger("pyserval.router")

if TYPE_CHECKING:
    from .cluster import ClusterSync

__all__ = ["DEFAULT_ROUTER_PORT", "Router", "TableDump", "fetch_table", "format_table"]

DEFAULT_ROUTER_PORT: Final = 54326
_DEFAULT_PREFIX: Final = "0" * 64 + "/0"
_TABLE_PAD: Final = 8000  # bytes fetch_table pads its requests to (answers: 3x that)


class Router:
    """A service router on asyncio (see the module docstring).

    ``async with Router("127.0.0.1:54326") as router:``; ``router.address`` is where hosts
    point ``Host(router=...)``.
    """

    def __init__(
        self,
        listen: str = f"0.0.0.0:{DEFAULT_ROUTER_PORT}",
        *,
        upstream: str | None = None,
        announce: Iterable[PrefixLike] = (),
        delay: Iterable[PrefixLike] = (),
        certified_prefixes: Iterable[PrefixLike] = (),
        delay_handler: DelayHandler | None = None,
        delay_timeout: float = 5.0,
        max_ttl: float = 3600.0,
        max_nonces: int = 100_000,
        pcap: str | os.PathLike[str] | None = None,
        etcd: str | Sequence[str] | None = None,
        cluster: str | None = None,
        lease_ttl: float = 3.0,
    ) -> None:
        self.host = Host(
            [listen],
            config=HostConfig(forwarding=True, delay_timeout=delay_timeout),
            pcap=pcap,  # every datagram through the router, for Wireshark (None: off)
        )
        self.upstream = parse_address(upstream) if upstream else None
        self.announce = [as_service_prefix(p) for p in announce]
        self.delay = [as_service_prefix(p) for p in delay]
        guard = RegistrationGuard(certified_prefixes=certified_prefixes, max_nonces=max_nonces)
        self.registry = Registry(self.host.service_table, guard, max_ttl=max_ttl)
        self.cluster: ClusterSync | None = None
        self._cluster_args: tuple[list[str], str, float] | None = None
        if etcd is not None or cluster is not None:
            if etcd is None or cluster is None:
                raise ValueError("a cluster router needs both etcd (URLs) and cluster (a name)")
            urls = [u for e in ([etcd] if isinstance(etcd, str) else etcd) for u in e.split(",")]
            self._cluster_args = ([u.strip() for u in urls if u.strip()], cluster, lease_ttl)
        self.delay_handler = delay_handler
        self.delay_timeout = delay_timeout
        self._endpoint: DatagramEndpoint | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._changed = asyncio.Event()
        self._upstream_controller: HostServiceController | None = None
        self._seen_changes = 0
        self.inspection = TableService(self.host, self.registry)
        self.last_change = 0.0  # loop time the table last changed through the registry

    @property
    def address(self) -> Address:
        """The router's UDP address."""
        return self.host.addresses[0]

    @property
    def address_text(self) -> str:
        """The router's address as ``IP:PORT`` or ``[IPv6]:PORT`` (for ``Host(router=...)``)."""
        return format_address(self.address)

    # -- life cycle ---------------------------------------------------------------------
    async def start(self) -> Router:
        """Open the interface, bind the control service, announce upstream."""
        host = self.host
        await host.start()
        if self._cluster_args is not None:
            await self._start_cluster(*self._cluster_args)
        self._endpoint = host.bind_datagram(CONTROL_SERVICE, register=False)
        host.watch(self._endpoint.flowid, self._on_event)
        host.add_unreachable_hook(self._on_unreachable)
        for prefix in self.delay:
            host.service_table.add(prefix, Rule.delay())
        host.delay_handler = self.delay_handler or self._default_verdict
        if self.upstream is not None:
            host.service_table.add(_DEFAULT_PREFIX, Rule.forward(self.upstream, priority=-1))
            ctl = HostServiceController(host, self.upstream)
            await ctl.start()
            now = host.loop.time()
            for prefix in self.announce:
                ctl.core.on_service_event(ServiceEvent(ServiceEventKind.REGISTER, prefix), now)
            ctl.pump()
            self._upstream_controller = ctl
        return self

    async def _start_cluster(self, urls: list[str], name: str, lease_ttl: float) -> None:
        # Imported here: the single-router mode needs none of the [cluster] extra.
        from .cluster import (
            ClusterRegistry,
            ClusterSync,
            ClusterTableService,
            check_lease_ttl,
            cluster_root,
            new_router_id,
        )

        old = self.registry
        self.registry = ClusterRegistry(
            self.host.service_table,
            old.guard,
            root=cluster_root(name),
            router_id=new_router_id(),
            address=self.address_text,
            max_ttl=old.max_ttl,
        )
        self.cluster = ClusterSync(
            self, self.registry, urls, name, lease_ttl=check_lease_ttl(lease_ttl)
        )
        self.inspection = ClusterTableService(self, self.cluster)
        await self.cluster.start()

    async def close(self) -> None:
        """Withdraw announcements and stop."""
        if self.cluster is not None:
            await self.cluster.close()
        ctl = self._upstream_controller
        if ctl is not None:
            now = self.host.loop.time()
            for prefix in self.announce:
                ctl.core.on_service_event(ServiceEvent(ServiceEventKind.UNREGISTER, prefix), now)
            ctl.pump()
            await ctl.close()
        if self._timer is not None:
            self._timer.cancel()
        await self.host.close(timeout=0)

    async def __aenter__(self) -> Router:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def serve_forever(self) -> None:
        """Run until cancelled."""
        await asyncio.Event().wait()

    # -- control messages -----------------------------------------------------------------
    def _on_event(self, event: Event) -> None:
        if not isinstance(event, DatagramReceived):
            return
        stats = self.registry.stats
        if event.via is not None:
            # Control messages come straight from their sender: a SOURCE path is written
            # by whoever sends, so a forwarded one could claim any address.
            stats["control_forwarded_dropped"] += 1
            return
        try:
            msg = decode_message(event.data)
        except BadControlMessage as exc:
            stats[f"bad_message_{exc.reason}"] += 1
            return
        if isinstance(msg, RegisterMessage | UnregisterMessage):
            now = self.host.loop.time()
            self.registry.expire(now)
            ack = self.registry.handle(msg, event.address, now, time.time())
            if LOGGER.isEnabledFor(logging.INFO):
                what = "register" if isinstance(msg, RegisterMessage) else "unregister"
                for reg, result in zip(msg.registrations, ack.results, strict=False):
                    LOGGER.log(
                        logging.DEBUG if result.ok else logging.INFO,
                        "%s %s from %s:%d: %s",
                        what,
                        reg.prefix,
                        *event.address,
                        "ok" if result.ok else f"refused ({result.reason})",
                    )
            self._reply(event, encode_message(ack))
            self._after_change()
        elif isinstance(msg, TableRequest):
            page = self.inspection.answer(msg, len(event.data))
            if page is not None:
                self._reply(event, page)
        else:
            stats["unexpected_message"] += 1

    def _reply(self, event: DatagramReceived, data: bytes) -> None:
        if self.host.core is None or self.host.closed or self._endpoint is None:
            return
        source = event.source_service
        to_service = source if source is not None else CONTROL_SERVICE
        self.host.send_datagram(self._endpoint, to_service, data, to=event.address)

    def _after_change(self) -> None:
        """Wake verdicts waiting for a registration; re-arm the expiry timer."""
        if self.registry.changes != self._seen_changes:
            self._seen_changes = self.registry.changes
            self.last_change = self.host.loop.time()
        self._changed.set()
        self._changed = asyncio.Event()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        deadline = self.registry.next_deadline()
        if deadline is not None:
            self._timer = self.host.loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self.registry.expire(self.host.loop.time()):
            self.host.schedule_flush()
        self._after_change()

    def _on_unreachable(self, address: Address) -> None:
        if self.registry.remove_address(address):
            if self.cluster is not None:
                self.cluster.hide_unreachable(address)
            self._after_change()

    # -- DELAY --------------------------------------------------------------------------
    async def _default_verdict(self, sid: ServiceID) -> Address | None:
        """Hold SYNs until an instance registers for ``sid`` (bounded by delay_timeout)."""
        deadline = self.host.loop.time() + self.delay_timeout
        while True:
            res = self.host.service_table.lookup(sid)
            if res is not None and res.action is Action.FORWARD and res.target is not None:
                return res.target.address
            remaining = deadline - self.host.loop.time()
            if remaining <= 0:
                return None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._changed.wait()

    # -- inspection ---------------------------------------------------------------------
    def table_entries(self) -> list[TableEntryInfo]:
        """The service table as the router reports it."""
        return self.inspection.entries()

    def counters(self) -> dict[str, int]:
        """Packet and registration counters (forwarded, dropped by reason, refused...)."""
        return self.inspection.counters()


class TableDump:
    """A router's table and counters, as fetched by :func:`fetch_table`."""

    def __init__(self, entries: list[TableEntryInfo], counters: dict[str, int]) -> None:
        self.entries = entries
        self.counters = counters


async def fetch_table(router: str | Address, *, timeout: float = 2.0) -> TableDump:
    """Ask the router at ``router`` for its whole service table and counters.

    The table comes in pages, in prefix order. Each page after the first is asked to
    start at the last entry already read: if that entry is not there, entries before it
    were registered or expired meanwhile and everything after it moved, so the table is
    read again from the start. An entry present for the whole read is thus listed
    exactly once (whether one that came or went during it is listed depends on when).
    The check needs nothing new from the router (any version answers such a page). A
    table whose start keeps changing for ``timeout`` raises TimeoutError."""
    addr = parse_address(router) if isinstance(router, str) else router
    host = Host(["[::]:0" if ":" in addr[0] else "0.0.0.0:0"])
    async with host:
        ep = host.bind_datagram(ServiceID(int.from_bytes(os.urandom(32), "big")), register=False)
        replies: asyncio.Queue[TableReply] = asyncio.Queue(maxsize=16)

        def on_event(event: Event) -> None:
            if isinstance(event, DatagramReceived) and event.address == addr:
                with contextlib.suppress(BadControlMessage, asyncio.QueueFull):
                    msg = decode_message(event.data)
                    if isinstance(msg, TableReply):
                        replies.put_nowait(msg)

        host.watch(ep.flowid, on_event)
        entries: list[TableEntryInfo] = []
        counters: dict[str, int] = {}
        seq = int.from_bytes(os.urandom(4), "big")
        async with asyncio.timeout(timeout):
            while True:
                seq += 1
                # One entry of overlap: the page must start with the last entry we have.
                offset = max(len(entries) - 1, 0)
                req = TableRequest(seq=seq, offset=offset, pad=" " * _TABLE_PAD)
                data = encode_message(req)
                reply = None
                while reply is None:  # sent again until answered (lost, or rate-limited)
                    host.send_datagram(ep, CONTROL_SERVICE, data, to=addr)
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(0.25):
                            reply = await replies.get()
                            while reply.seq != seq:
                                reply = await replies.get()
                fresh = reply.entries
                if entries:
                    if not fresh or fresh[0].prefix != entries[-1].prefix:
                        # Entries before our last one came or went: what follows it moved
                        # across the page boundary and could be read twice or not at all.
                        # Read the table again from the start (within the timeout).
                        entries.clear()
                        continue
                    fresh = fresh[1:]
                entries.extend(fresh)
                counters = dict(reply.counters)
                # (With the overlap checked, entries no longer there that we hold were
                # replaced by as many before the boundary: reaching the total is the end.)
                if not fresh or len(entries) >= reply.total:
                    return TableDump(entries, counters)


def format_table(dump: TableDump, names: dict[str, str] | None = None) -> str:
    """Readable text of a table dump (what ``pyserval table`` prints); ``names`` maps
    service names (or prefixes) to labels shown beside their entries."""
    labels = {str(as_service_prefix(k)): v for k, v in (names or {}).items()}
    lines = [f"{'prefix':<72} {'action':<8} {'hits':>8}  targets"]
    for e in dump.entries:
        label = labels.get(e.prefix)
        if label:
            lines.append(f"# {label}")
        targets = ", ".join(
            f"{t.address} w={t.weight} p={t.priority}"
            + ("" if t.expires_in is None else f" ttl={t.expires_in:.2f}s")
            for t in e.targets
        )
        lines.append(f"{e.prefix:<72} {e.action:<8} {e.hits:>8}  {targets}")
    cluster = {k: v for k, v in dump.counters.items() if k.startswith(("cluster[", "router["))}
    if cluster:
        lines += _format_cluster(cluster)
    rest = {k: v for k, v in dump.counters.items() if k not in cluster}
    if rest:
        lines.append("counters:")
        lines += [f"  {k} = {v}" for k, v in rest.items()]
    return "\n".join(lines)


def _format_cluster(counters: dict[str, int]) -> list[str]:
    """The cluster counters (``cluster[NAME]_x``, ``router[ID@ADDR]_x``) as a section."""
    lines: list[str] = []
    for key, value in counters.items():
        if key.startswith("cluster["):
            name, _, field = key[len("cluster[") :].partition("]_")
            if not lines:
                lines.append(f"cluster {name}:")
            shown = ("yes" if value else "NO (etcd unreachable)") if field == "connected" else value
            lines.append(f"  {field} = {shown}")
    routers: dict[str, dict[str, int]] = {}
    for key, value in counters.items():
        if key.startswith("router["):
            rid, _, field = key[len("router[") :].partition("]_")
            routers.setdefault(rid, {})[field] = value
    for rid, fields in routers.items():
        lease = fields.get("lease", 0)
        lines.append(f"  router {rid}: lease {lease:x} ttl={fields.get('ttl', 0)}s")
    return lines

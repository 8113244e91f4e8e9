"""The asyncio host: a :class:`~pyserval.core.HostCore` on real UDP sockets.

A thin adapter. Datagrams read in batches from each interface go to the core, and what the
core wants to send goes out once per batch (and once per loop pass after application calls,
coalesced). One ``loop.call_at`` timer serves the whole host, re-armed only when the core's
next deadline changes. Core events wake the tasks waiting on the connection they name.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import functools
import ipaddress
import logging
import os
import socket
import ssl
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any

from pydantic import Field, field_validator
from pydantic.dataclasses import dataclass as pydantic_dataclass

from ..config import CONFIG
from ..core.host import DatagramEndpoint, HostCore, Listener
from ..errors import (
    ConnectionStateError,
    HostClosed,
    ServalConnectTimeout,
    ServalMigrationError,
)
from ..naming.delegation import Delegation
from ..naming.keys import ServiceKey
from ..naming.service_id import ServiceID, ServiceLike, as_service_id, as_service_prefix
from ..sal.inet import WILDCARDS, Address, canonical_ip, format_address
from ..sal.service_table import Rule, ServiceTable
from ..tools.pcap import PcapWriter
from ..transport.config import StreamConfig
from ..transport.connection import Connection, State
from ..transport.datagram_flow import DatagramConnection
from ..transport.events import (
    ConnectionClosed,
    ConnectionFailed,
    ConnectionReset,
    ConnectionTimedOut,
    Event,
    IncomingConnection,
)
from ..transport.reasons import CloseReason, close_reason, connect_error_class
from .mtu import mss_for
from .service_events import HostController, ServiceEvent, ServiceEventKind, ServiceEventListener
from .udp import UdpEndpoint

_FINAL_EVENTS = (ConnectionClosed, ConnectionReset, ConnectionTimedOut, ConnectionFailed)

__all__ = [
    "REFERENCE_PORTS",
    "DelayHandler",
    "Host",
    "HostClosed",
    "HostConfig",
    "install_controller_factory",
    "parse_address",
]

REFERENCE_PORTS = (54325, 54324)

DelayHandler = Callable[[ServiceID], Awaitable[Address | None]]
"""The controller's verdict for SYNs held by a DELAY rule: where to forward them, or None."""

ControllerFactory = Callable[["Host", Address], HostController]
_controller_factory: ControllerFactory | None = None


def install_controller_factory(factory: ControllerFactory) -> None:
    """Set what a host with a ``router`` uses as its service controller.

    The control plane sits above this layer, so ``pyserval`` installs it at import time
    rather than this module importing it.
    """
    global _controller_factory
    _controller_factory = factory


def parse_address(text: str) -> Address:
    """``"IP:PORT"`` (IPv4) or ``"[IP]:PORT"`` (IPv6) to ``(ip, port)``, with a clear error
    naming the text. An IPv6 address comes back in the text the kernel writes (so it
    compares equal to the addresses datagrams arrive from)."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected an address as IP:PORT or [IPv6]:PORT, got {text!r}")
    bracketed = len(host) > 2 and host[0] == "[" and host[-1] == "]"
    if bracketed:
        host = host[1:-1]
    try:
        # The SAL carries IP addresses (checksums, SOURCE paths): names are not resolved
        # here, so that a lookup can never stall the event loop.
        version = ipaddress.ip_address(host).version
    except ValueError:
        raise ValueError(f"expected an IP address in IP:PORT, got {text!r}") from None
    if (version == 6) != bracketed:
        raise ValueError(f"an IPv6 address is written [IP]:PORT, an IPv4 one IP:PORT: {text!r}")
    return (canonical_ip(host) if bracketed else host), int(port)


LOGGER = logging.getLogger("pyserval.host")


@pydantic_dataclass(frozen=True, slots=True, config=CONFIG)
class HostConfig:
    """Configuration of a :class:`Host` (also read from ``PYSERVAL_*`` variables): a
    :mod:`pyserval.config` dataclass, checked when built."""

    # Empty: the reference ports where free (54325, else 54324, else any) on all interfaces.
    listen: list[str] = Field(default_factory=list)
    routes: dict[str, str] = Field(default_factory=dict)  # service (name/ID/prefix) -> IP:PORT
    connect_timeout: float = Field(default=30.0, gt=0.0)
    # The service router this host registers its services with and sends unresolved SYNs
    # to (IP:PORT); None: static routes only. Several, comma-separated (a list is joined):
    # routers of one cluster, the first used until it stops answering, then the next.
    router: str | None = None
    # Seconds a registration lives at the router without a refresh (refreshed 4 times per
    # period), so a dead instance stops getting clients within this time.
    registration_ttl: float = Field(default=1.0, gt=0.0)
    # Ad hoc discovery without a router: unresolved SYNs go to this broadcast IP:PORT.
    broadcast: str | None = None
    # Forward SYNs and datagrams that FORWARD rules send elsewhere (routers do).
    forwarding: bool = False
    # Seconds between checks that each interface's IP still exists; when one is gone and
    # another remains, its flows migrate there by themselves (0 turns the check off).
    interface_check: float = Field(default=0.5, ge=0.0)
    # How long a DELAY verdict may take before the held SYNs are dropped.
    delay_timeout: float = Field(default=5.0, gt=0.0)
    # How long close() waits for every stream to deliver its data and FIN before resetting
    # what is left.
    close_timeout: float = Field(default=2.0, ge=0.0)

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: list[str]) -> list[str]:
        for text in value:
            parse_address(text)
        return value

    @field_validator("router", mode="before")
    @classmethod
    def _check_routers(cls, value: object) -> object:
        if isinstance(value, list | tuple):
            value = ",".join(str(v) for v in value)
        if isinstance(value, str):
            items = [t.strip() for t in value.split(",") if t.strip()]
            if not items:
                raise ValueError(f"expected one or more routers as IP:PORT, got {value!r}")
            for text in items:
                parse_address(text)
            return ",".join(items)
        return value

    @field_validator("broadcast")
    @classmethod
    def _check_address(cls, value: str | None) -> str | None:
        if value is not None:
            parse_address(value)
        return value

    @property
    def routers(self) -> list[Address]:
        """The routers of ``router`` as addresses, in order of preference."""
        return [parse_address(t) for t in self.router.split(",")] if self.router else []

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> HostConfig:
        """Read ``PYSERVAL_LISTEN`` (comma-separated), ``PYSERVAL_ROUTES``
        (``name=IP:PORT,...``), ``PYSERVAL_ROUTER`` and ``PYSERVAL_BROADCAST`` (IP:PORT)."""
        env = os.environ if environ is None else environ
        data: dict[str, Any] = {}
        if env.get("PYSERVAL_LISTEN"):
            data["listen"] = [a.strip() for a in env["PYSERVAL_LISTEN"].split(",") if a.strip()]
        if env.get("PYSERVAL_ROUTER"):
            data["router"] = env["PYSERVAL_ROUTER"].strip()
        if env.get("PYSERVAL_BROADCAST"):
            data["broadcast"] = env["PYSERVAL_BROADCAST"].strip()
        if env.get("PYSERVAL_ROUTES"):
            routes = {}
            for item in env["PYSERVAL_ROUTES"].split(","):
                name, sep, addr = item.strip().partition("=")
                if not sep:
                    raise ValueError(f"PYSERVAL_ROUTES items are SERVICE=IP:PORT, got {item!r}")
                routes[name.strip()] = addr.strip()
            data["routes"] = routes
        return cls(**data)


def _ip_present(ip: str) -> bool:
    """Whether this machine still has the address ``ip`` (binding to it is allowed)."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    probe = socket.socket(family, socket.SOCK_DGRAM)
    try:
        probe.bind((ip, 0))
    except OSError as exc:
        return exc.errno != errno.EADDRNOTAVAIL
    finally:
        probe.close()
    return True


def _left_syn_sent(conn: Connection) -> bool:
    return conn.state is not State.SYN_SENT


def _datagram_kind(kind: str) -> bool:
    """Whether ``kind`` names connected datagram flows (else streams); ValueError if neither."""
    if kind not in ("stream", "datagram"):
        raise ValueError(f"kind must be 'stream' or 'datagram', not {kind!r}")
    return kind == "datagram"


class _Waiters:
    """One asyncio.Event per connection: set on every core event that names it."""

    def __init__(self) -> None:
        self.events: dict[int, asyncio.Event] = defaultdict(asyncio.Event)

    def wake(self, conn_id: int, final: bool = False) -> None:
        # A final event (closed, reset, timed out, failed) wakes the waiters and forgets
        # the entry, so the table does not grow with every connection ever made; a later
        # wait_for finds its condition already true.
        ev = self.events.pop(conn_id, None) if final else self.events.get(conn_id)
        if ev is not None:
            ev.set()

    async def wait_for(self, conn_id: int, ready: Callable[[], bool]) -> None:
        if ready():
            return  # no entry for a wait that never blocks
        ev = self.events[conn_id]
        while not ready():
            ev.clear()
            if ready():
                return
            await ev.wait()


class Host:
    """One Serval end host in this process (see the module docstring).

    ``Host(listen=["127.0.0.1:0"])``; then ``async with host:`` (or ``await host.start()``
    and ``await host.close()``). ``pcap`` (a path or a
    :class:`~pyserval.tools.pcap.PcapWriter`) records every datagram the host sends and
    receives, for Wireshark; off by default.
    """

    def __init__(
        self,
        listen: list[str] | None = None,
        *,
        routes: dict[str, str] | None = None,
        router: str | list[str] | None = None,
        broadcast: str | None = None,
        config: HostConfig | None = None,
        stream_config: StreamConfig | None = None,
        pcap: str | os.PathLike[str] | PcapWriter | None = None,
    ) -> None:
        base = config or HostConfig()
        updates: dict[str, Any] = {}
        if listen is not None:
            updates["listen"] = listen
        if routes is not None:
            updates["routes"] = {**base.routes, **routes}
        if router is not None:
            updates["router"] = router if isinstance(router, str) else ",".join(router)
        if broadcast is not None:
            updates["broadcast"] = broadcast
        self.config = dataclasses.replace(base, **updates)
        # None: sized from the interfaces' MTU when the host starts (see runtime.mtu).
        self._auto_mss = stream_config is None
        self.stream_config = stream_config or StreamConfig()
        self.service_table = ServiceTable()
        self.core: HostCore | None = None
        self.endpoints: list[UdpEndpoint] = []
        self._by_address: dict[Address, UdpEndpoint] = {}
        self._waiters = _Waiters()
        self._listener_waiters: dict[int, asyncio.Event] = {}
        self._flush_pending = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._event_hooks: list[Callable[[Event], None]] = []
        self._conn_hooks: dict[int, Callable[[Event], None]] = {}
        self._service_listeners: list[ServiceEventListener] = []
        self._registered: dict[object, ServiceEvent] = {}  # listener/endpoint -> REGISTER
        self._unreachable_hooks: list[Callable[[Address], None]] = []
        self.controller: HostController | None = None
        self.delay_handler: DelayHandler | None = None
        self._verdicts: set[asyncio.Task[None]] = set()
        self._watchdog: asyncio.Task[None] | None = None
        self.auto_removed: list[Address] = []  # interfaces the check found gone
        # Every datagram sent and received, as IPv4/UDP frames (None: off, and the datapath
        # pays one attribute test per batch). A path is opened when the host starts.
        self._pcap_spec = pcap
        self.pcap: PcapWriter | None = None
        for service, address in self.config.routes.items():
            self.add_route(service, address)

    # -- life cycle ---------------------------------------------------------------------
    @property
    def addresses(self) -> list[Address]:
        """The bound addresses of the host's interfaces."""
        return [ep.address for ep in self.endpoints]

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called (a closed host does not start again)."""
        return self._closed

    async def start(self) -> Host:
        """Open the interfaces and start the core.

        A host runs once: after :meth:`close` it cannot start again (its flowIDs, nonces
        and registrations are gone); ``start`` then raises :class:`HostClosed`. Create a
        new ``Host`` with the same configuration instead.
        """
        if self._closed:
            raise HostClosed("this host was closed and cannot be restarted: create a new Host")
        if self.core is not None:
            return self
        self._loop = asyncio.get_running_loop()
        spec = self._pcap_spec
        if spec is not None and self.pcap is None:
            self.pcap = spec if isinstance(spec, PcapWriter) else PcapWriter(spec)
        if self.config.listen:
            for text in self.config.listen:
                await self._open_interface(parse_address(text))
        else:
            await self._open_reference_interface()
        cfg = self.config
        if self._auto_mss:
            mss = mss_for([ip for ip, _ in self.addresses], self.stream_config.mss)
            self.stream_config = dataclasses.replace(self.stream_config, mss=mss)
        self.core = HostCore(
            self.addresses,
            config=self.stream_config,
            service_table=self.service_table,
            forwarding=cfg.forwarding,
            delay_timeout=cfg.delay_timeout * 2,
        )
        if cfg.interface_check > 0:
            self._watchdog = asyncio.ensure_future(self._watch_interfaces(cfg.interface_check))
        for entry in self.service_table:  # static routes given before start
            for rule in entry.rules:
                self.core.trusted_forwarders.update(t.address for t in rule.targets)
        default = "0" * 64 + "/0"
        if cfg.broadcast is not None and cfg.router is None:
            target = parse_address(cfg.broadcast)
            self.core.broadcast.add(target)
            self.service_table.add(default, Rule.forward(target, priority=-1))
        if cfg.router is not None:
            router = cfg.routers[0]  # the controller moves to the next when it stops answering
            self.service_table.add(default, Rule.forward(router, priority=-1))
            if _controller_factory is None:
                raise RuntimeError("no service controller installed: import pyserval first")
            self.core.trusted_forwarders.update(cfg.routers)
            self.controller = _controller_factory(self, router)
            await self.controller.start()
        LOGGER.info(
            "host up on %s (router %s)",
            ", ".join(f"{ip}:{port}" for ip, port in self.addresses),
            cfg.router or "none",
        )
        return self

    async def _open_interface(self, local: Address) -> UdpEndpoint:
        return self._open_interface_now(local)

    def _open_interface_now(self, local: Address) -> UdpEndpoint:
        holder: list[UdpEndpoint] = []
        # UdpEndpoint.open does no waiting: driving its coroutine once binds and registers
        # the socket on the running loop, so interfaces can be added from plain calls.
        coro = UdpEndpoint.open(local, self._reader_for(holder), on_icmp_error=self._on_icmp)
        try:
            coro.send(None)
        except StopIteration as done:
            ep: UdpEndpoint = done.value
        else:  # pragma: no cover - open() never suspends
            coro.close()
            raise RuntimeError("UdpEndpoint.open suspended")
        holder.append(ep)
        self.endpoints.append(ep)
        self._by_address[ep.address] = ep
        return ep

    # -- interfaces and migration ---------------------------------------------------------
    def add_interface(self, address: str | Address) -> Address:
        """Open another interface (UDP address, ``"IP:PORT"``; port 0 picks one); returns
        its bound address. New flows still start on the first interface; streams can
        :meth:`~pyserval.ServalStream.migrate` to it."""
        core = self._require_core()
        local = parse_address(address) if isinstance(address, str) else address
        ep = self._open_interface_now(local)
        core.add_address(ep.address)
        self._service_event(ServiceEvent(ServiceEventKind.ADDRESS_CHANGED, None))
        return ep.address

    async def remove_interface(self, address: str | Address, *, timeout: float = 2.0) -> None:
        """Take an interface away: every flow on it migrates to the first remaining one of
        its IP family (else the first remaining one)
        (waiting up to ``timeout`` for the moves to complete), then its socket closes."""
        core = self._require_core()
        local = self._known_interface(address)
        if len(self.endpoints) < 2:
            raise ValueError("cannot remove the host's last interface")
        moved = core.remove_address(local, self._now())
        self._flush()
        await self._settle(moved, timeout)
        self._close_interface(local)
        self._service_event(ServiceEvent(ServiceEventKind.ADDRESS_CHANGED, None))

    async def set_address(
        self, interface: str | Address, new_address: str | Address, *, timeout: float = 2.0
    ) -> Address:
        """The interface's address changed (or should): open ``new_address``, move every
        flow there (RSYN), close the old socket. Returns the new bound address."""
        core = self._require_core()
        old = self._known_interface(interface)
        new = parse_address(new_address) if isinstance(new_address, str) else new_address
        ep = self._open_interface_now(new)
        moved = core.set_address(old, ep.address, self._now())
        self._flush()
        await self._settle(moved, timeout)
        self._close_interface(old)
        self._service_event(ServiceEvent(ServiceEventKind.ADDRESS_CHANGED, None))
        return ep.address

    async def _watch_interfaces(self, interval: float) -> None:
        """Migrate the flows of an interface whose IP disappeared (while another remains)."""
        while not self._closed:
            await asyncio.sleep(interval)
            if len(self.endpoints) < 2:
                continue
            for local in [a for a in self.addresses if a[0] not in WILDCARDS]:
                if len(self.endpoints) >= 2 and not _ip_present(local[0]):
                    self.auto_removed.append(local)
                    # ValueError: removed meanwhile; RuntimeError: the host is closing.
                    with contextlib.suppress(ValueError, RuntimeError):
                        await self.remove_interface(local)

    def _known_interface(self, address: str | Address) -> Address:
        local = parse_address(address) if isinstance(address, str) else address
        if local not in self._by_address:
            known = ", ".join(format_address(a) for a in self.addresses)
            raise ValueError(f"{format_address(local)} is not an interface of this host ({known})")
        return local

    def _close_interface(self, local: Address) -> None:
        ep = self._by_address.pop(local, None)
        if ep is not None:
            self.endpoints.remove(ep)
            ep.close()

    async def _settle(self, moved: list[Connection], timeout: float) -> None:
        """Wait (bounded) until the given connections finished migrating."""

        def settled(conn: Connection) -> bool:
            return conn.closed or all(sf.mig is None for sf in conn.subflows)

        deadline = self._now() + timeout
        for conn in moved:
            remaining = deadline - self._now()
            if remaining <= 0:
                return
            try:
                async with asyncio.timeout(remaining):
                    await self._waiters.wait_for(conn.conn_id, functools.partial(settled, conn))
            except TimeoutError:
                return

    async def add_path(
        self, conn: Connection, local: str | Address, remote: str | Address, timeout: float
    ) -> None:
        """Open another subflow of multipath ``conn``; wait until it carries data."""
        core = self._require_core()
        try:
            here = self._known_interface(local)
            there = parse_address(remote) if isinstance(remote, str) else remote
            sf = core.add_path(conn, here, there, self._now())
        except (ValueError, ConnectionStateError) as exc:
            raise ServalMigrationError(f"cannot add a path: {exc}") from None
        self.schedule_flush()
        try:
            async with asyncio.timeout(timeout):
                await self._waiters.wait_for(
                    conn.conn_id, lambda: conn.closed or sf.join_state is None
                )
        except TimeoutError:
            raise ServalMigrationError(
                f"the peer did not answer the new path {here} -> {there} in {timeout} s"
            ) from None
        if conn.closed:
            raise ServalMigrationError(f"the connection closed: {conn.error or 'closed'}")

    async def migrate(
        self,
        conn: Connection,
        local: str | Address,
        timeout: float,
        remote: str | Address | None = None,
    ) -> None:
        """Move ``conn`` to the interface ``local`` (and the peer's address ``remote``, which
        a move to the other IP family needs unless the peer advertised one) and wait until
        the peer confirmed."""
        core = self._require_core()
        try:
            target = self._known_interface(local)
            there = parse_address(remote) if isinstance(remote, str) else remote
            started = core.migrate(conn, target, self._now(), there)
        except (ValueError, ConnectionStateError) as exc:
            raise ServalMigrationError(str(exc)) from None
        if not started:
            raise ServalMigrationError("the connection is closing: it cannot migrate now")
        self.schedule_flush()

        def done() -> bool:
            sf = conn.primary
            return conn.closed or (sf.mig is None and sf.local_addr == target)

        try:
            async with asyncio.timeout(timeout):
                await self._waiters.wait_for(conn.conn_id, done)
        except TimeoutError:
            raise ServalMigrationError(
                f"the peer did not confirm the move to {format_address(target)} in {timeout} s"
            ) from None
        if conn.closed:
            raise ServalMigrationError(f"the connection closed: {conn.error or 'closed'}")

    async def _open_reference_interface(self) -> UdpEndpoint:
        """The reference ports where free: 54325 (where services are reached), else 54324
        (the reference client's), else one the kernel picks."""
        for port in REFERENCE_PORTS:
            try:
                return await self._open_interface(("0.0.0.0", port))
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
        return await self._open_interface(("0.0.0.0", 0))

    def _reader_for(
        self, holder: list[UdpEndpoint]
    ) -> Callable[[list[tuple[bytes, Address]]], None]:
        def on_datagrams(batch: list[tuple[bytes, Address]]) -> None:
            self._on_batch(holder[0], batch)

        return on_datagrams

    def _on_icmp(self, remote: Address, errno_: int) -> None:
        """ICMP error for a datagram we sent: tell the core, send what follows."""
        if self.core is not None:
            self.core.on_unreachable(remote, self._now(), os.strerror(errno_).lower())
            for hook in list(self._unreachable_hooks):
                hook(remote)
            self._flush()

    def add_unreachable_hook(self, hook: Callable[[Address], None]) -> None:
        """Call ``hook(address)`` when the network reports ``address`` unreachable."""
        self._unreachable_hooks.append(hook)

    def _on_batch(self, ep: UdpEndpoint, batch: list[tuple[bytes, Address]]) -> None:
        """A batch of datagrams read on one interface: all to the core, then one flush."""
        core = self.core
        if core is None:
            return
        now = self._now()
        local = ep.address
        pcap = self.pcap
        if pcap is not None:
            for data, src in batch:
                pcap.write(data, src, local)
        core.receive_datagrams(batch, local, now)
        self._flush()

    async def close(self, timeout: float | None = None) -> None:
        """Close every flow gracefully, then the interfaces.

        Streams still open are shut down (FIN after the data already queued) and given
        ``timeout`` seconds (default ``close_timeout``) for the peer to acknowledge all of it;
        half-open handshakes and whatever is still unacknowledged after that are reset.
        """
        if self._closed:
            return
        LOGGER.info("host on %s closing", ", ".join(f"{ip}:{p}" for ip, p in self.addresses))
        core = self.core
        if core is not None:
            limit = self.config.close_timeout if timeout is None else timeout
            await self._drain_connections(core, limit)
            for owner in list(self._registered):
                if isinstance(owner, DatagramEndpoint):
                    self.unbind_datagram(owner)
        if self.controller is not None:
            await self.controller.close()
        self._closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
        for task in list(self._verdicts):
            task.cancel()
        if core is not None:
            for conn in list(core.connections.values()):
                conn.abort()
            self._flush()
        if self._timer is not None:
            self._timer.cancel()
        for udp in self.endpoints:
            udp.close()
        if self.pcap is not None:
            self.pcap.close()
        for ev in self._waiters.events.values():
            ev.set()
        for ev in self._listener_waiters.values():
            ev.set()

    async def _drain_connections(self, core: HostCore, limit: float) -> None:
        """Shut down every established stream and wait (bounded) until each FIN is acked."""
        for listener in list(core.listeners.values()):
            self.close_listener(listener)
        pending: list[Connection] = []
        for conn in list(core.connections.values()):
            if conn.state is State.ESTABLISHED:
                if conn.fin_offset is None:
                    conn.shutdown()
                pending.append(conn)
            elif conn.state is not State.TIME_WAIT:
                conn.abort()  # a handshake in progress: nothing to deliver
        self._flush()
        if not pending or limit <= 0:
            return

        def delivered(conn: Connection) -> bool:
            return conn.fin_acked or conn.state is State.CLOSED or conn.state is State.TIME_WAIT

        # Polled: an acknowledged FIN raises no event, and this runs once, at shutdown.
        deadline = self._now() + limit
        while not all(delivered(c) for c in pending) and self._now() < deadline:
            await asyncio.sleep(0.005)

    async def __aenter__(self) -> Host:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- routes -------------------------------------------------------------------------
    def add_route(self, service: ServiceLike | str, address: str | Address) -> None:
        """Static FORWARD rule: ``service`` (name, ID or ``<hex>/<len>``) to ``IP:PORT``."""
        addr = parse_address(address) if isinstance(address, str) else address
        prefix = as_service_prefix(
            service if not isinstance(service, bytes | int) else str(service)
        )
        self.service_table.add(prefix, Rule.forward(addr))
        if self.core is not None:
            self.core.trusted_forwarders.add(addr)

    # -- core driving -------------------------------------------------------------------
    def _now(self) -> float:
        assert self._loop is not None
        return self._loop.time()

    def _require_core(self) -> HostCore:
        if self._closed:
            raise HostClosed("the host is closed (a closed host cannot be restarted)")
        if self.core is None:
            raise RuntimeError("the host is not running: use 'async with host' or start()")
        return self.core

    def schedule_flush(self) -> None:
        """Send what the core has, once, at the end of this loop pass."""
        if not self._flush_pending and self._loop is not None:
            self._flush_pending = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_pending = False
        core = self.core
        if core is None:
            return
        out = core.datagrams_to_send(self._now())
        if out:
            by_ep: dict[Address, list[tuple[bytes, Address]]] = {}
            pcap = self.pcap
            if pcap is None and len(self.endpoints) == 1:
                # One interface takes everything (see the lookup below): no grouping.
                by_ep[self.endpoints[0].address] = [(data, remote) for data, _, remote in out]
            else:
                for data, local, remote in out:
                    by_ep.setdefault(local, []).append((data, remote))
                    if pcap is not None:
                        pcap.write(data, local, remote)
            for local, items in by_ep.items():
                ep = self._by_address.get(local) or self.endpoints[0]
                if not ep.closed:
                    ep.send_many(items)
        if self.pcap is not None:
            self.pcap.flush()  # once per batch: a killed process loses at most this batch
        for event in core.events():
            self._dispatch(event)
        if core.delay_requests:
            for sid in core.take_delay_requests():
                self._ask_delay(sid)
        self._arm_timer(core.next_deadline())

    def _dispatch(self, event: Event) -> None:
        if isinstance(event, IncomingConnection):
            ev = self._listener_waiters.get(event.listener_id)
            if ev is not None:
                ev.set()
        self._waiters.wake(event.conn_id, final=isinstance(event, _FINAL_EVENTS))
        hooks = list(self._event_hooks)
        conn_hook = self._conn_hooks.get(event.conn_id)
        if conn_hook is not None:
            hooks.insert(0, conn_hook)
        for hook in hooks:
            try:
                hook(event)
            except Exception as exc:  # application code must not break the receive path
                self.loop.call_exception_handler(
                    {"message": f"pyserval event hook failed on {event!r}", "exception": exc}
                )

    def _arm_timer(self, deadline: float | None) -> None:
        if deadline == self._timer_at:
            return
        at = self._timer_at
        if self._timer is not None and at is not None and (deadline is None or deadline > at):
            # An earlier timer is armed: let it fire (the core re-arms from its deadline
            # then) rather than cancel and re-create one at every flush of a busy host.
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = deadline
        if deadline is not None and self._loop is not None and not self._closed:
            # Never a sub-millisecond busy timer: round up to the next millisecond.
            self._timer = self._loop.call_at(max(deadline, self._now() + 0.001), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        core = self.core
        if core is None:
            return
        core.handle_timer(self._now())
        self._flush()

    def _ask_delay(self, sid: ServiceID) -> None:
        """SYNs for ``sid`` are held by a DELAY rule: ask the delay handler for a verdict."""
        handler = self.delay_handler
        if handler is None:
            self._release(sid, None)  # nobody to ask: drop them
            return

        async def verdict() -> None:
            hop: Address | None = None
            try:
                async with asyncio.timeout(self.config.delay_timeout):
                    hop = await handler(sid)
            except TimeoutError:
                hop = None
            except Exception as exc:  # the handler is application code
                self.loop.call_exception_handler(
                    {"message": f"pyserval delay handler failed for {sid.hex}", "exception": exc}
                )
            self._release(sid, hop)

        task = asyncio.ensure_future(verdict())
        self._verdicts.add(task)
        task.add_done_callback(self._verdicts.discard)

    def _release(self, sid: ServiceID, hop: Address | None) -> None:
        if self.core is not None and not self._closed:
            self.core.release_delayed(sid, hop, self._now())
            self.schedule_flush()

    # -- service events -----------------------------------------------------------------
    def subscribe(self, listener: ServiceEventListener) -> Callable[[], None]:
        """Call ``listener`` with every service event (REGISTER on bind/listen, UNREGISTER on
        close, ADDRESS_CHANGED); returns a function that unsubscribes. A new subscriber first
        hears a REGISTER for each service already registered."""
        self._service_listeners.append(listener)
        for event in list(self._registered.values()):
            listener(event)

        def unsubscribe() -> None:
            if listener in self._service_listeners:
                self._service_listeners.remove(listener)

        return unsubscribe

    @property
    def registered_services(self) -> list[ServiceEvent]:
        """The REGISTER events of the services bound or listened on now."""
        return list(self._registered.values())

    def _service_event(self, event: ServiceEvent) -> None:
        for listener in list(self._service_listeners):
            try:
                listener(event)
            except Exception as exc:  # application code must not break bind/close
                self.loop.call_exception_handler(
                    {
                        "message": f"pyserval service event listener failed on {event!r}",
                        "exception": exc,
                    }
                )

    def _register(
        self, owner: object, sid: ServiceID, weight: int, priority: int, key: ServiceKey | None
    ) -> None:
        if key is not None and not key.verify(sid):
            raise ValueError(f"key {key.public_key.raw.hex()} does not certify {sid.hex}")
        if not 1 <= weight <= 65535:
            raise ValueError(f"weight must be 1..65535, got {weight}")
        event = ServiceEvent(
            ServiceEventKind.REGISTER, as_service_prefix(sid), weight, priority, key
        )
        self._registered[owner] = event
        self._service_event(event)

    def _unregister(self, owner: object) -> None:
        event = self._registered.pop(owner, None)
        if event is not None:
            self._service_event(
                ServiceEvent(
                    ServiceEventKind.UNREGISTER,
                    event.prefix,
                    event.weight,
                    event.priority,
                    event.key,
                )
            )

    def bind_datagram(
        self,
        service: ServiceLike,
        *,
        weight: int = 1,
        priority: int = 0,
        key: ServiceKey | None = None,
        register: bool = True,
    ) -> DatagramEndpoint:
        """Bind a datagram socket to ``service`` (raises REGISTER unless ``register`` is
        False, as for the host's own control socket)."""
        core = self._require_core()
        ep = core.bind_datagram(service)
        if register:
            try:
                self._register(ep, ep.service_id, weight, priority, key)
            except ValueError:
                core.unbind_datagram(ep)
                raise
        return ep

    def send_datagram(
        self,
        ep: DatagramEndpoint,
        service: ServiceLike,
        data: bytes,
        *,
        to: Address | None = None,
    ) -> None:
        """Send one unconnected datagram from ``ep`` to ``service``: through the service
        table, or straight to the address ``to`` (a reply to where a datagram came from).
        Raises ``NoRoute`` or ``DatagramTooLarge`` at once."""
        self._require_core().send_datagram(ep, service, data, to=to)
        self.schedule_flush()

    def unbind_datagram(self, ep: DatagramEndpoint) -> None:
        """Close a datagram socket (raises UNREGISTER)."""
        if self.core is not None:
            self.core.unbind_datagram(ep)
        self._unregister(ep)

    async def wait(self, conn: Connection, ready: Callable[[], bool]) -> None:
        """Wait until ``ready()`` holds for ``conn`` (re-checked at each of its events)."""
        await self._waiters.wait_for(conn.conn_id, lambda: ready() or self._closed)

    # -- application API ----------------------------------------------------------------
    async def connect(
        self,
        service: ServiceLike,
        *,
        timeout: float | None = None,
        kind: str = "stream",
        secure: bool = False,
        ssl_context: ssl.SSLContext | None = None,
    ) -> Any:
        """Open a stream to ``service`` (late-bound by serviceID through the service table).

        ``kind="datagram"``: a connected datagram flow instead, returned as a
        :class:`~pyserval.runtime.datagram_streams.ServalDatagramStream`.

        ``secure=True``: a TLS 1.3 :class:`~pyserval.runtime.secure.SecureStream`, returned
        only once the server proved ``service`` (a self-certifying ID) with its key or a
        delegation; else :class:`~pyserval.runtime.secure.ServalSecurityError`. With
        ``ssl_context`` too, that context's own checks (your PKI) replace the serviceID
        check. ``timeout`` covers the handshake.
        """
        from .streams import ServalStream

        datagram = _datagram_kind(kind)
        core = self._require_core()
        sid: ServiceID | None = None
        if ssl_context is not None and not secure:
            raise ValueError("ssl_context= is for secure=True")
        if secure and datagram:
            raise ValueError("secure=True is for streams, not kind='datagram'")
        if secure:
            from .secure import check_securable

            sid = as_service_id(service) if ssl_context is not None else check_securable(service)
        start = self._now()
        limit = self.config.connect_timeout if timeout is None else timeout
        routers = self.config.routers
        # With several routers, a SYN the network bounced off a dead one is sent again
        # through the next (the controller has moved there by the time we resume).
        for attempt in range(max(1, len(routers))):
            conn = core.connect(service, self._now(), datagram=datagram)
            self.schedule_flush()
            answered = functools.partial(_left_syn_sent, conn)
            try:
                async with asyncio.timeout(limit):
                    await self.wait(conn, answered)
            except TimeoutError:
                conn.abort()
                self.schedule_flush()
                raise ServalConnectTimeout(
                    f"connecting to service {service!s} timed out after {limit} s"
                ) from None
            except BaseException:
                # Cancelled (or interrupted): nothing may be left behind. The connection is
                # aborted, so no more SYNs go out; a SYN-ACK that still comes finds no flow
                # and is answered with a RST, which ends the server's half of it.
                conn.abort()
                self.schedule_flush()
                raise
            if conn.state is State.ESTABLISHED:
                break
            via = conn.primary.remote_addr if conn.subflows else None
            bounced = close_reason(conn.error) is CloseReason.SERVICE_UNREACHABLE
            if not (bounced and via in routers and attempt + 1 < len(routers)):
                raise connect_error_class(conn.error)(
                    f"cannot connect to service {service!s}: {conn.error or 'closed'}"
                )
        if isinstance(conn, DatagramConnection):
            from .datagram_streams import ServalDatagramStream

            return ServalDatagramStream(self, conn)
        stream = ServalStream(self, conn)
        if sid is None:
            return stream
        from .secure import secure_client

        left = max(limit - (self._now() - start), 0.001)
        return await secure_client(stream, sid, ssl_context=ssl_context, timeout=left)

    async def listen(
        self,
        service: ServiceLike,
        backlog: int = 128,
        *,
        weight: int = 1,
        priority: int = 0,
        key: ServiceKey | None = None,
        kind: str = "stream",
        secure: bool = False,
        delegation: Delegation | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> Any:
        """Accept streams to ``service``: returns a listener to ``async for`` or ``serve``.

        With a router, the service is registered there with this instance's ``weight`` and
        ``priority``; ``key`` signs the registration of a self-certifying serviceID.
        ``kind="datagram"``: accept connected datagram flows instead (a
        :class:`~pyserval.runtime.datagram_streams.ServalDatagramListener`).

        ``secure=True``: TLS 1.3 (a :class:`~pyserval.runtime.secure.SecureListener`) with
        a certificate for ``key``, the service key. A replica without the service key passes
        its own instance key as ``key`` and the service key's ``delegation`` of it (its
        registration then goes unsigned: routers cannot check delegations yet). With
        ``ssl_context`` too, that context (your own certificates) is served instead.
        """
        from .streams import ServalListener

        datagram = _datagram_kind(kind)
        core = self._require_core()
        sid = as_service_id(service)
        if (delegation is not None or ssl_context is not None) and not secure:
            raise ValueError("delegation= and ssl_context= are for secure=True")
        if secure and datagram:
            raise ValueError("secure=True is for streams, not kind='datagram'")
        register_key = key if delegation is None else None
        if register_key is not None and not register_key.verify(sid):
            raise ValueError(f"key {register_key.public_key.raw.hex()} does not certify {sid.hex}")
        context = ssl_context
        if secure and context is None:
            from .secure import server_context

            if key is None:
                raise ValueError(
                    "secure=True needs key= (the service key, or an instance key "
                    "with delegation=), or ssl_context="
                )
            if delegation is not None:
                delegation.check(sid, key.public_key, time.time())  # refuse a stale one now
            context = server_context(key, delegation)
        listener = core.listen(sid, backlog, datagram=datagram)
        self._listener_waiters[listener.listener_id] = asyncio.Event()
        try:
            self._register(listener, sid, weight, priority, register_key)
        except ValueError:
            core.close_listener(listener, self._now())
            raise
        if datagram:
            from .datagram_streams import ServalDatagramListener

            return ServalDatagramListener(self, listener)
        if context is None:
            return ServalListener(self, listener)
        from .secure import SecureListener

        return SecureListener(ServalListener(self, listener), context, backlog=backlog)

    async def wait_incoming(self, listener: Listener) -> Connection | None:
        """The next established connection of ``listener`` (None once closed)."""
        ev = self._listener_waiters[listener.listener_id]
        while True:
            conn = listener.accept()
            if conn is not None:
                return conn
            if listener.closed or self._closed:
                return None
            ev.clear()
            await ev.wait()

    def close_listener(self, listener: Listener) -> None:
        """Stop accepting on ``listener``."""
        if self.core is not None:
            self.core.close_listener(listener, self._now())
        self._unregister(listener)
        ev = self._listener_waiters.get(listener.listener_id)
        if ev is not None:
            ev.set()
        self.schedule_flush()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop the host runs on."""
        if self._loop is None:
            raise RuntimeError("the host is not running")
        return self._loop

    def watch(self, conn: Connection | int, callback: Callable[[Event], None]) -> None:
        """Call ``callback`` with every event of ``conn`` (a connection or a datagram
        socket's flowID; one watcher each)."""
        self._conn_hooks[conn if isinstance(conn, int) else conn.conn_id] = callback

    def unwatch(self, conn: Connection | int) -> None:
        """Stop calling the watcher of ``conn``."""
        self._conn_hooks.pop(conn if isinstance(conn, int) else conn.conn_id, None)

    def socket(self, kind: str = "stream") -> Any:
        """A BSD-style :class:`~pyserval.runtime.socket.ServalSocket` on this host."""
        from .socket import ServalSocket

        return ServalSocket(kind, host=self)

    def add_event_hook(self, hook: Callable[[Event], None]) -> None:
        """Call ``hook`` with every core event (for logging and inspection)."""
        self._event_hooks.append(hook)

"""The asyncio host: one Serval end host in this process, a facade over its parts.

:class:`Host` puts together the :class:`~pyserval.runtime.driver.Driver` (the sans-I/O
:class:`~pyserval.core.HostCore` on UDP sockets: pump, flush, one timer, waiters), its
:class:`~pyserval.runtime.interfaces.Interfaces` (addresses, migration) and
:class:`~pyserval.runtime.services.Services` (registrations, service events, DELAY
verdicts), and offers the application API on them: ``connect``, ``listen``, ``socket``,
datagrams. A host with a ``router`` runs a service controller, passed in as ``controller``
(by default the control plane's ``HostServiceController``, loaded when the host starts).

What it does not do: any protocol work (the core does), or any I/O of its own (the driver
does).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import importlib
import logging
import os
import ssl
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, Literal, overload

from pydantic import Field, field_validator
from pydantic.dataclasses import dataclass as pydantic_dataclass

from ..config import CONFIG
from ..core.host import DatagramEndpoint, HostCore, Listener
from ..errors import (
    HostClosed,
    ServalConnectTimeout,
)
from ..naming.delegation import Delegation
from ..naming.keys import ServiceKey
from ..naming.service_id import ServiceID, ServiceLike, as_service_id, as_service_prefix
from ..sal.service_table import Rule, ServiceTable
from ..tools.pcap import PcapWriter
from ..transport.config import StreamConfig
from ..transport.connection import Connection, State
from ..transport.datagram_flow import DatagramConnection
from ..transport.events import (
    Event,
)
from ..transport.reasons import CloseReason, close_reason, connect_error_class
from ..transport.receive_budget import ReceiveBudget, budget_for
from .datagram_streams import ServalDatagramListener, ServalDatagramStream
from .driver import Address, Driver, _Waiters
from .interfaces import REFERENCE_PORTS, Interfaces, parse_address
from .mtu import mss_for
from .secure import (
    SecureListener,
    SecureStream,
    check_securable,
    secure_client,
    server_context,
)
from .service_events import HostController, ServiceEvent, ServiceEventListener
from .services import DelayHandler, Services
from .socket import ServalSocket
from .streams import ServalListener, ServalStream
from .udp import UdpEndpoint

__all__ = [
    "DEFAULT_CONTROLLER",
    "REFERENCE_PORTS",
    "ControllerFactory",
    "DelayHandler",
    "Host",
    "HostClosed",
    "HostConfig",
    "parse_address",
]

ControllerFactory = Callable[["Host", Address], HostController]
"""Makes the service controller of a host that has a router: ``factory(host, router)``."""

DEFAULT_CONTROLLER = "pyserval.control:HostServiceController"
"""The controller factory a host with a router uses when none is passed (``module:name``).
Named rather than imported: the control plane sits above this layer."""

LOGGER = logging.getLogger("pyserval.host")

StreamKind = Literal["stream", "datagram"]


def default_controller() -> ControllerFactory:
    """The factory :data:`DEFAULT_CONTROLLER` names (imported on first use)."""
    module, _, name = DEFAULT_CONTROLLER.partition(":")
    factory: ControllerFactory = getattr(importlib.import_module(module), name)
    return factory


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


def _left_syn_sent(conn: Connection) -> bool:
    return conn.state is not State.SYN_SENT


def _datagram_kind(kind: str) -> bool:
    """Whether ``kind`` names connected datagram flows (else streams); ValueError if neither."""
    if kind not in ("stream", "datagram"):
        raise ValueError(f"kind must be 'stream' or 'datagram', not {kind!r}")
    return kind == "datagram"


class Host:
    """One Serval end host in this process (see the module docstring).

    ``Host(listen=["127.0.0.1:0"])``; then ``async with host:`` (or ``await host.start()``
    and ``await host.close()``). ``pcap`` (a path or a
    :class:`~pyserval.tools.pcap.PcapWriter`) records every datagram the host sends and
    receives, for Wireshark; off by default. ``controller`` makes the service controller
    when the host has a ``router`` (default: :data:`DEFAULT_CONTROLLER`).
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
        controller: ControllerFactory | None = None,
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
        self._driver = Driver()
        self._driver.on_batch = self._deliver_batch
        self._services = Services(self._driver, self.config.delay_timeout)
        self._interfaces = Interfaces(self._driver, self._services.announce)
        self._controller_factory = controller
        self.controller: HostController | None = None
        # Every datagram sent and received, as IPv4/UDP frames (None: off, and the datapath
        # pays one attribute test per batch). A path is opened when the host starts.
        self._pcap_spec = pcap
        for service, address in self.config.routes.items():
            self.add_route(service, address)

    # -- the parts ------------------------------------------------------------------------
    @property
    def core(self) -> HostCore | None:
        """The sans-I/O core (None until the host starts)."""
        return self._driver.core

    @property
    def driver(self) -> Driver:
        """The driver: the core on UDP sockets, its timer and waiters."""
        return self._driver

    @property
    def _waiters(self) -> _Waiters:
        # The driver's table of per-connection waiters (a test checks that it stays small).
        return self._driver.waiters

    @property
    def endpoints(self) -> list[UdpEndpoint]:
        """The UDP sockets of the host's interfaces."""
        return self._driver.endpoints

    @property
    def pcap(self) -> PcapWriter | None:
        """Where every datagram is recorded (None: off)."""
        return self._driver.pcap

    @property
    def auto_removed(self) -> list[Address]:
        """Interfaces the interface check found gone (their flows moved away)."""
        return self._interfaces.auto_removed

    @property
    def delay_handler(self) -> DelayHandler | None:
        """Gives the verdict for SYNs a DELAY rule holds (None: they are dropped)."""
        return self._services.delay_handler

    @delay_handler.setter
    def delay_handler(self, handler: DelayHandler | None) -> None:
        self._services.delay_handler = handler

    @property
    def addresses(self) -> list[Address]:
        """The bound addresses of the host's interfaces."""
        return self._driver.addresses

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called (a closed host does not start again)."""
        return self._driver.closed

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop the host runs on."""
        return self._driver.loop

    # -- life cycle ---------------------------------------------------------------------
    async def start(self) -> Host:
        """Open the interfaces and start the core.

        A host runs once: after :meth:`close` it cannot start again (its flowIDs, nonces
        and registrations are gone); ``start`` then raises :class:`HostClosed`. Create a
        new ``Host`` with the same configuration instead.
        """
        driver = self._driver
        if driver.closed:
            raise HostClosed("this host was closed and cannot be restarted: create a new Host")
        if driver.core is not None:
            return self
        driver.bind_loop()
        spec = self._pcap_spec
        if spec is not None and driver.pcap is None:
            driver.pcap = spec if isinstance(spec, PcapWriter) else PcapWriter(spec)
        cfg = self.config
        await self._interfaces.open(cfg.listen)
        if self._auto_mss:
            mss = mss_for([ip for ip, _ in self.addresses], self.stream_config.mss)
            self.stream_config = dataclasses.replace(self.stream_config, mss=mss)
        core = driver.core = HostCore(
            self.addresses,
            config=self.stream_config,
            service_table=self.service_table,
            forwarding=cfg.forwarding,
            delay_timeout=cfg.delay_timeout * 2,
        )
        # What the windows of all flows promise at once stays within what a socket's
        # receive buffer holds (transport.receive_budget): the smallest interface's, as
        # flows spread over them.
        buffers = [ep.rcvbuf for ep in driver.endpoints]
        if buffers and min(buffers) > 0:
            core.receive_budget = ReceiveBudget(budget_for(min(buffers)))
        self._interfaces.start_watch(cfg.interface_check)
        for entry in self.service_table:  # static routes given before start
            for rule in entry.rules:
                core.trusted_forwarders.update(t.address for t in rule.targets)
        default = "0" * 64 + "/0"
        if cfg.broadcast is not None and cfg.router is None:
            target = parse_address(cfg.broadcast)
            core.broadcast.add(target)
            self.service_table.add(default, Rule.forward(target, priority=-1))
        if cfg.router is not None:
            router = cfg.routers[0]  # the controller moves to the next when it stops answering
            self.service_table.add(default, Rule.forward(router, priority=-1))
            core.trusted_forwarders.update(cfg.routers)
            factory = self._controller_factory or default_controller()
            self.controller = factory(self, router)
            await self.controller.start()
        LOGGER.info(
            "host up on %s (router %s)",
            ", ".join(f"{ip}:{port}" for ip, port in self.addresses),
            cfg.router or "none",
        )
        return self

    async def close(self, timeout: float | None = None) -> None:
        """Close every flow gracefully, then the interfaces.

        Streams still open are shut down (FIN after the data already queued) and given
        ``timeout`` seconds (default ``close_timeout``) for the peer to acknowledge all of it;
        half-open handshakes and whatever is still unacknowledged after that are reset.
        """
        if self._driver.closed:
            return
        LOGGER.info("host on %s closing", ", ".join(f"{ip}:{p}" for ip, p in self.addresses))
        core = self.core
        if core is not None:
            limit = self.config.close_timeout if timeout is None else timeout
            await self._drain_connections(core, limit)
            for owner in self._services.owners():
                if isinstance(owner, DatagramEndpoint):
                    self.unbind_datagram(owner)
        if self.controller is not None:
            await self.controller.close()
        self._interfaces.stop_watch()
        self._services.cancel_verdicts()
        self._driver.shut_down()

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
        self._driver.flush()
        if not pending or limit <= 0:
            return

        def delivered(conn: Connection) -> bool:
            return conn.fin_acked or conn.state is State.CLOSED or conn.state is State.TIME_WAIT

        # Polled: an acknowledged FIN raises no event, and this runs once, at shutdown.
        deadline = self._driver.now() + limit
        while not all(delivered(c) for c in pending) and self._driver.now() < deadline:
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

    # -- interfaces and migration ---------------------------------------------------------
    def add_interface(self, address: str | Address) -> Address:
        """Open another interface (UDP address, ``"IP:PORT"``; port 0 picks one); returns
        its bound address. New flows still start on the first interface; streams can
        :meth:`~pyserval.ServalStream.migrate` to it."""
        return self._interfaces.add(address)

    async def remove_interface(self, address: str | Address, *, timeout: float = 2.0) -> None:
        """Take an interface away: every flow on it migrates to the first remaining one of
        its IP family (else the first remaining one)
        (waiting up to ``timeout`` for the moves to complete), then its socket closes."""
        await self._interfaces.remove(address, timeout)

    async def set_address(
        self, interface: str | Address, new_address: str | Address, *, timeout: float = 2.0
    ) -> Address:
        """The interface's address changed (or should): open ``new_address``, move every
        flow there (RSYN), close the old socket. Returns the new bound address."""
        return await self._interfaces.set_address(interface, new_address, timeout)

    async def add_path(
        self, conn: Connection, local: str | Address, remote: str | Address, timeout: float
    ) -> None:
        """Open another subflow of multipath ``conn``; wait until it carries data."""
        await self._interfaces.add_path(conn, local, remote, timeout)

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
        await self._interfaces.migrate(conn, local, timeout, remote)

    # -- the driver -----------------------------------------------------------------------
    def _deliver_batch(self, ep: UdpEndpoint, batch: list[tuple[bytes, Address]]) -> None:
        # Looked up on the instance at every batch, so a test can tap ``_on_batch``.
        self._on_batch(ep, batch)

    def _on_batch(self, ep: UdpEndpoint, batch: list[tuple[bytes, Address]]) -> None:
        """A batch of datagrams read on one interface: all to the core, then one flush."""
        self._driver.receive_batch(ep, batch)

    def schedule_flush(self) -> None:
        """Send what the core has, once, at the end of this loop pass."""
        self._driver.schedule_flush()

    def send_now(self) -> None:
        """Send what the core has at once (a SYN, FIN or RST an application call caused)."""
        self._driver.send_now()

    async def wait(self, conn: Connection, ready: Callable[[], bool]) -> None:
        """Wait until ``ready()`` holds for ``conn`` (re-checked at each of its events)."""
        driver = self._driver
        await driver.wait(conn, lambda: ready() or driver.closed)

    def watch(self, conn: Connection | int, callback: Callable[[Event], None]) -> None:
        """Call ``callback`` with every event of ``conn`` (a connection or a datagram
        socket's flowID; one watcher each)."""
        self._driver.watch(conn if isinstance(conn, int) else conn.conn_id, callback)

    def unwatch(self, conn: Connection | int) -> None:
        """Stop calling the watcher of ``conn``."""
        self._driver.unwatch(conn if isinstance(conn, int) else conn.conn_id)

    def add_event_hook(self, hook: Callable[[Event], None]) -> None:
        """Call ``hook`` with every core event (for logging and inspection)."""
        self._driver.add_event_hook(hook)

    def add_unreachable_hook(self, hook: Callable[[Address], None]) -> None:
        """Call ``hook(address)`` when the network reports ``address`` unreachable."""
        self._driver.add_unreachable_hook(hook)

    # -- service events -----------------------------------------------------------------
    def subscribe(self, listener: ServiceEventListener) -> Callable[[], None]:
        """Call ``listener`` with every service event (REGISTER on bind/listen, UNREGISTER on
        close, ADDRESS_CHANGED); returns a function that unsubscribes. A new subscriber first
        hears a REGISTER for each service already registered."""
        return self._services.subscribe(listener)

    @property
    def registered_services(self) -> list[ServiceEvent]:
        """The REGISTER events of the services bound or listened on now."""
        return self._services.registered

    # -- datagrams ------------------------------------------------------------------------
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
        return self._services.bind_datagram(
            service, weight=weight, priority=priority, key=key, register=register
        )

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
        It leaves at the end of this loop pass, with whatever else the host sends then.
        Raises ``NoRoute`` or ``DatagramTooLarge`` at once. The control plane sends its
        messages this way."""
        self._driver.send_datagram(ep, service, data, to)

    def unbind_datagram(self, ep: DatagramEndpoint) -> None:
        """Close a datagram socket (raises UNREGISTER)."""
        self._services.unbind_datagram(ep)

    # -- application API ----------------------------------------------------------------
    @overload
    async def connect(
        self,
        service: ServiceLike,
        *,
        timeout: float | None = None,
        kind: Literal["stream"] = "stream",
        secure: Literal[False] = False,
        ssl_context: None = None,
    ) -> ServalStream: ...

    @overload
    async def connect(
        self,
        service: ServiceLike,
        *,
        timeout: float | None = None,
        kind: Literal["stream"] = "stream",
        secure: Literal[True],
        ssl_context: ssl.SSLContext | None = None,
    ) -> SecureStream: ...

    @overload
    async def connect(
        self,
        service: ServiceLike,
        *,
        timeout: float | None = None,
        kind: Literal["stream"] = "stream",
        secure: bool,
        ssl_context: ssl.SSLContext | None = None,
    ) -> ServalStream | SecureStream: ...

    @overload
    async def connect(
        self,
        service: ServiceLike,
        *,
        timeout: float | None = None,
        kind: Literal["datagram"],
        secure: Literal[False] = False,
        ssl_context: None = None,
    ) -> ServalDatagramStream: ...

    @overload
    async def connect(
        self,
        service: ServiceLike,
        *,
        timeout: float | None = None,
        kind: StreamKind,
        secure: bool = False,
        ssl_context: ssl.SSLContext | None = None,
    ) -> ServalStream | SecureStream | ServalDatagramStream: ...

    async def connect(
        self,
        service: ServiceLike,
        *,
        timeout: float | None = None,
        kind: StreamKind = "stream",
        secure: bool = False,
        ssl_context: ssl.SSLContext | None = None,
    ) -> ServalStream | SecureStream | ServalDatagramStream:
        """Open a stream to ``service`` (late-bound by serviceID through the service table).

        ``kind="datagram"``: a connected datagram flow instead, returned as a
        :class:`~pyserval.runtime.datagram_streams.ServalDatagramStream`.

        ``secure=True``: a TLS 1.3 :class:`~pyserval.runtime.secure.SecureStream`, returned
        only once the server proved ``service`` (a self-certifying ID) with its key or a
        delegation; else :class:`~pyserval.runtime.secure.ServalSecurityError`. With
        ``ssl_context`` too, that context's own checks (your PKI) replace the serviceID
        check. ``timeout`` covers the handshake.
        """
        datagram = _datagram_kind(kind)
        driver = self._driver
        core = driver.require_core()
        sid: ServiceID | None = None
        if ssl_context is not None and not secure:
            raise ValueError("ssl_context= is for secure=True")
        if secure and datagram:
            raise ValueError("secure=True is for streams, not kind='datagram'")
        if secure:
            sid = as_service_id(service) if ssl_context is not None else check_securable(service)
        start = now = driver.now()
        limit = self.config.connect_timeout if timeout is None else timeout
        routers = self.config.routers
        # With several routers, a SYN the network bounced off a dead one is sent again
        # through the next (the controller has moved there by the time we resume).
        for attempt in range(max(1, len(routers))):
            if attempt:
                now = driver.now()
            conn = core.connect(service, now, datagram=datagram)
            driver.send_now()
            answered = functools.partial(_left_syn_sent, conn)
            try:
                # The driver's timer ends the wait (no timer object per connect).
                in_time = await driver.wait_until(conn, answered, now + limit)
            except BaseException:
                # Cancelled (or interrupted): nothing may be left behind. The connection is
                # aborted, so no more SYNs go out; a SYN-ACK that still comes finds no flow
                # and is answered with a RST, which ends the server's half of it.
                conn.abort()
                driver.schedule_flush()
                raise
            if not in_time:
                conn.abort()
                driver.schedule_flush()
                raise ServalConnectTimeout(
                    f"connecting to service {service!s} timed out after {limit} s"
                )
            if conn.state is State.ESTABLISHED:
                break
            via = conn.primary.remote_addr if conn.subflows else None
            bounced = close_reason(conn.error) is CloseReason.SERVICE_UNREACHABLE
            if not (bounced and via in routers and attempt + 1 < len(routers)):
                raise connect_error_class(conn.error)(
                    f"cannot connect to service {service!s}: {conn.error or 'closed'}"
                )
        if isinstance(conn, DatagramConnection):
            return ServalDatagramStream(self, conn)
        stream = ServalStream(self, conn)
        if sid is None:
            return stream
        left = max(limit - (driver.now() - start), 0.001)
        return await secure_client(stream, sid, ssl_context=ssl_context, timeout=left)

    @overload
    async def listen(
        self,
        service: ServiceLike,
        backlog: int = 128,
        *,
        weight: int = 1,
        priority: int = 0,
        key: ServiceKey | None = None,
        kind: Literal["stream"] = "stream",
        secure: Literal[False] = False,
        delegation: None = None,
        ssl_context: None = None,
    ) -> ServalListener: ...

    @overload
    async def listen(
        self,
        service: ServiceLike,
        backlog: int = 128,
        *,
        weight: int = 1,
        priority: int = 0,
        key: ServiceKey | None = None,
        kind: Literal["stream"] = "stream",
        secure: Literal[True],
        delegation: Delegation | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> SecureListener: ...

    @overload
    async def listen(
        self,
        service: ServiceLike,
        backlog: int = 128,
        *,
        weight: int = 1,
        priority: int = 0,
        key: ServiceKey | None = None,
        kind: Literal["stream"] = "stream",
        secure: bool,
        delegation: Delegation | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> ServalListener | SecureListener: ...

    @overload
    async def listen(
        self,
        service: ServiceLike,
        backlog: int = 128,
        *,
        weight: int = 1,
        priority: int = 0,
        key: ServiceKey | None = None,
        kind: Literal["datagram"],
        secure: Literal[False] = False,
        delegation: None = None,
        ssl_context: None = None,
    ) -> ServalDatagramListener: ...

    @overload
    async def listen(
        self,
        service: ServiceLike,
        backlog: int = 128,
        *,
        weight: int = 1,
        priority: int = 0,
        key: ServiceKey | None = None,
        kind: StreamKind,
        secure: bool = False,
        delegation: Delegation | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> ServalListener | SecureListener | ServalDatagramListener: ...

    async def listen(
        self,
        service: ServiceLike,
        backlog: int = 128,
        *,
        weight: int = 1,
        priority: int = 0,
        key: ServiceKey | None = None,
        kind: StreamKind = "stream",
        secure: bool = False,
        delegation: Delegation | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> ServalListener | SecureListener | ServalDatagramListener:
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
        datagram = _datagram_kind(kind)
        core = self._driver.require_core()
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
            if key is None:
                raise ValueError(
                    "secure=True needs key= (the service key, or an instance key "
                    "with delegation=), or ssl_context="
                )
            if delegation is not None:
                delegation.check(sid, key.public_key, time.time())  # refuse a stale one now
            context = server_context(key, delegation)
        listener = core.listen(sid, backlog, datagram=datagram)
        self._driver.add_listener(listener)
        try:
            self._services.register(listener, sid, weight, priority, register_key)
        except ValueError:
            core.close_listener(listener, self._driver.now())
            raise
        if datagram:
            return ServalDatagramListener(self, listener)
        if context is None:
            return ServalListener(self, listener)
        return SecureListener(ServalListener(self, listener), context, backlog=backlog)

    async def wait_incoming(self, listener: Listener) -> Connection | None:
        """The next established connection of ``listener`` (None once closed)."""
        return await self._driver.wait_incoming(listener)

    def close_listener(self, listener: Listener) -> None:
        """Stop accepting on ``listener``."""
        driver = self._driver
        if driver.core is not None:
            driver.core.close_listener(listener, driver.now())
        self._services.unregister(listener)
        driver.wake_listener(listener)
        driver.schedule_flush()

    def socket(self, kind: StreamKind = "stream") -> ServalSocket:
        """A BSD-style :class:`~pyserval.runtime.socket.ServalSocket` on this host."""
        return ServalSocket(kind, host=self)

"""A host's interfaces: which UDP addresses it has, and moving flows between them.

Opening the configured (or reference) addresses, adding and removing interfaces, changing
an interface's address (every flow on it migrates, RSYN), the watch that notices an IP gone
from the machine, and the per-connection moves streams ask for (``migrate``, ``add_path``).
Each change of the address set is announced as an ADDRESS_CHANGED service event.

What it does not do: read or send datagrams (the :class:`~pyserval.runtime.driver.Driver`
does), or decide where a flow should go (the core and the application do).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import ipaddress
import socket
from collections.abc import Callable

from ..sal.inet import WILDCARDS, canonical_ip, format_address
from ..transport.connection import Connection, ConnectionError_
from .driver import Address, Driver
from .service_events import ServiceEvent, ServiceEventKind
from .streams import ServalMigrationError
from .udp import UdpEndpoint

__all__ = ["REFERENCE_PORTS", "Interfaces", "parse_address"]

REFERENCE_PORTS = (54325, 54324)


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


def _as_address(address: str | Address) -> Address:
    return parse_address(address) if isinstance(address, str) else address


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


def _settled(conn: Connection) -> bool:
    return conn.closed or all(sf.mig is None for sf in conn.subflows)


class Interfaces:
    """The interfaces of one host, on its ``driver``; ``announce`` hears ADDRESS_CHANGED."""

    def __init__(self, driver: Driver, announce: Callable[[ServiceEvent], None]) -> None:
        self._driver = driver
        self._announce = announce
        self._watchdog: asyncio.Task[None] | None = None
        self.auto_removed: list[Address] = []  # interfaces the check found gone

    async def open(self, listen: list[str]) -> None:
        """Open the configured addresses; none: the reference ports where free (54325,
        where services are reached, else 54324, the reference client's, else any)."""
        if listen:
            for text in listen:
                self._driver.open_endpoint(parse_address(text))
            return
        for port in REFERENCE_PORTS:
            try:
                self._driver.open_endpoint(("0.0.0.0", port))
                return
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
        self._driver.open_endpoint(("0.0.0.0", 0))

    def known(self, address: str | Address) -> Address:
        """``address`` as an interface of this host; ValueError naming them if it is not."""
        local = _as_address(address)
        if local not in self._driver.by_address:
            known = ", ".join(format_address(a) for a in self._driver.addresses)
            raise ValueError(f"{format_address(local)} is not an interface of this host ({known})")
        return local

    def add(self, address: str | Address) -> Address:
        """Open another interface; returns its bound address."""
        core = self._driver.require_core()
        ep = self._driver.open_endpoint(_as_address(address))
        core.add_address(ep.address)
        self._announce(ServiceEvent(ServiceEventKind.ADDRESS_CHANGED, None))
        return ep.address

    async def remove(self, address: str | Address, timeout: float) -> None:
        """Move every flow off ``address`` (bounded wait), then close its socket."""
        driver = self._driver
        core = driver.require_core()
        local = self.known(address)
        if len(driver.endpoints) < 2:
            raise ValueError("cannot remove the host's last interface")
        moved = core.remove_address(local, driver.now())
        driver.flush()
        await self._settle(moved, timeout)
        driver.close_endpoint(local)
        self._announce(ServiceEvent(ServiceEventKind.ADDRESS_CHANGED, None))

    async def set_address(
        self, interface: str | Address, new_address: str | Address, timeout: float
    ) -> Address:
        """Open ``new_address``, move every flow of ``interface`` there, close the old one."""
        driver = self._driver
        core = driver.require_core()
        old = self.known(interface)
        ep: UdpEndpoint = driver.open_endpoint(_as_address(new_address))
        moved = core.set_address(old, ep.address, driver.now())
        driver.flush()
        await self._settle(moved, timeout)
        driver.close_endpoint(old)
        self._announce(ServiceEvent(ServiceEventKind.ADDRESS_CHANGED, None))
        return ep.address

    async def _settle(self, moved: list[Connection], timeout: float) -> None:
        """Wait (bounded) until the given connections finished migrating."""
        deadline = self._driver.now() + timeout
        for conn in moved:
            remaining = deadline - self._driver.now()
            if remaining <= 0:
                return
            try:
                async with asyncio.timeout(remaining):
                    await self._driver.wait(conn, functools.partial(_settled, conn))
            except TimeoutError:
                return

    # -- the watch ------------------------------------------------------------------------
    def start_watch(self, interval: float) -> None:
        """Check every ``interval`` seconds that each interface's IP still exists."""
        if interval > 0:
            self._watchdog = asyncio.ensure_future(self._watch(interval))

    def stop_watch(self) -> None:
        """Stop the check (the host is closing)."""
        if self._watchdog is not None:
            self._watchdog.cancel()

    async def _watch(self, interval: float) -> None:
        """Migrate the flows of an interface whose IP disappeared (while another remains)."""
        driver = self._driver
        while not driver.closed:
            await asyncio.sleep(interval)
            if len(driver.endpoints) < 2:
                continue
            for local in [a for a in driver.addresses if a[0] not in WILDCARDS]:
                if len(driver.endpoints) >= 2 and not _ip_present(local[0]):
                    self.auto_removed.append(local)
                    # ValueError: removed meanwhile; RuntimeError: the host is closing.
                    with contextlib.suppress(ValueError, RuntimeError):
                        await self.remove(local, 2.0)

    # -- moving one connection ------------------------------------------------------------
    async def add_path(
        self, conn: Connection, local: str | Address, remote: str | Address, timeout: float
    ) -> None:
        """Open another subflow of multipath ``conn``; wait until it carries data."""
        driver = self._driver
        core = driver.require_core()
        try:
            here = self.known(local)
            there = _as_address(remote)
            sf = core.add_path(conn, here, there, driver.now())
        except (ValueError, ConnectionError_) as exc:
            raise ServalMigrationError(f"cannot add a path: {exc}") from None
        driver.schedule_flush()
        try:
            async with asyncio.timeout(timeout):
                await driver.wait(conn, lambda: conn.closed or sf.join_state is None)
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
        """Move ``conn`` to the interface ``local`` (and the peer's ``remote``) and wait until
        the peer confirmed."""
        driver = self._driver
        core = driver.require_core()
        try:
            target = self.known(local)
            there = None if remote is None else _as_address(remote)
            started = core.migrate(conn, target, driver.now(), there)
        except ValueError as exc:
            raise ServalMigrationError(str(exc)) from None
        if not started:
            raise ServalMigrationError("the connection is closing: it cannot migrate now")
        driver.schedule_flush()

        def done() -> bool:
            sf = conn.primary
            return conn.closed or (sf.mig is None and sf.local_addr == target)

        try:
            async with asyncio.timeout(timeout):
                await driver.wait(conn, done)
        except TimeoutError:
            raise ServalMigrationError(
                f"the peer did not confirm the move to {format_address(target)} in {timeout} s"
            ) from None
        if conn.closed:
            raise ServalMigrationError(f"the connection closed: {conn.error or 'closed'}")

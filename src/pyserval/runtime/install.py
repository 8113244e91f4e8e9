"""Zero-line porting: the running asyncio loop resolves ``NAME.serval`` as the service NAME.

``pyserval.install(host)`` replaces two methods on one event loop *instance*
(``create_connection`` and ``create_server``). A call whose host name ends in the reserved
suffix (``.serval``; a trailing dot is allowed) goes to Serval; every other call goes to the
loop's own method, unchanged::

    pyserval.install(host)                      # or: with pyserval.install(host): ...
    reader, writer = await asyncio.open_connection("echo.serval", 0)   # a Serval stream
    server = await asyncio.start_server(handle, "echo.serval", 0)      # listens on "echo"

So ``asyncio.open_connection``/``start_server`` and every library that connects or listens
through the loop's methods (redis-py, aiomcache, websockets, asyncssh, the aiohttp server)
run on Serval without a changed line. The transport is the porting helpers'
:class:`~pyserval.runtime.stdio.ServalTransport`: writes beyond the high-water mark pause the
protocol until the peer acknowledged data, ``pause_reading`` closes the advertised window.
``get_extra_info`` answers ``peername``/``sockname`` as ``(ip, port)`` tuples (the UDP
addresses of the first subflow, the shape TCP libraries unpack), ``socket`` as None (there is
no kernel socket to tune), and ``serviceid``, ``service``, ``local_flowid``,
``remote_flowid`` and ``serval_connection``.

Covered: ``create_connection(factory, "NAME.serval", port, ssl=...)`` (TLS runs on top of the
Serval stream, ``server_hostname`` defaults to the host name as in asyncio), and
``create_server(factory, "NAME.serval" or a list of such names, port, ssl=..., backlog=...,
start_serving=...)``. The port is ignored: a service is named by its serviceID alone.

Not covered, on purpose (each goes to the loop unchanged, or is refused where it would
silently do the wrong thing):

- ``sock=`` passed in by the caller: the socket is already connected or bound, so the call
  goes to the loop as it is;
- ``local_addr=`` with a Serval name: refused (``ValueError``); a Serval flow leaves from the
  host's interfaces, chosen by the host;
- a host list mixing Serval names and other names in ``create_server``: refused
  (``ValueError``), the two kinds have nothing to share;
- ``create_datagram_endpoint``, ``create_unix_connection``, ``sock_connect`` and
  ``getaddrinfo``: not replaced. A library that resolves the name itself and then connects to
  the address it got (the aiohttp *client*, through aiohappyeyeballs) does not see Serval:
  it gets a resolver error for ``NAME.serval``; give it a connector instead (a few lines,
  ``examples/ports/aiohttp_client.py``);
- event loops whose instances take no attributes (uvloop): ``install`` raises
  ``TypeError``; use :func:`pyserval.open_connection` there.
"""

from __future__ import annotations

import asyncio
import logging
import ssl as ssl_module
from asyncio import sslproto
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

import anyio

from ..transport.connection import Connection
from .host import Host
from .stdio import ServalTransport
from .streams import ServalListener, StreamHost

__all__ = [
    "SUFFIX",
    "Installation",
    "ServiceServer",
    "ServiceTransport",
    "install",
    "install_on_new_loops",
    "service_name",
]

SUFFIX = ".serval"
LOGGER = logging.getLogger("pyserval.install")
_PATCHED = ("create_connection", "create_server")
_MISSING = object()

ProtocolFactory = Callable[[], asyncio.BaseProtocol]


def service_name(host: object, suffix: str = SUFFIX) -> str | None:
    """The service named by ``host`` (``"echo.serval"`` -> ``"echo"``), or None."""
    if not isinstance(host, str):
        return None
    name = host[:-1] if host.endswith(".") else host
    if len(name) > len(suffix) and name.lower().endswith(suffix.lower()):
        return name[: -len(suffix)]
    return None


class ServiceTransport(ServalTransport):
    """:class:`ServalTransport` with the extra info TCP libraries ask for (module docstring)."""

    # loop.start_tls() accepts only transports that say so: TLS layers on a stream as on TCP.
    _start_tls_compatible = True

    def __init__(
        self, host: StreamHost, conn: Connection, protocol: asyncio.BaseProtocol, service: str
    ) -> None:
        self._service = service
        super().__init__(host, conn, protocol)

    def _force_close(self, exc: BaseException | None) -> None:
        # asyncio's TLS layer calls this on a fatal error (a failed handshake): reset the
        # stream and report the error to the protocol, as its own transports do.
        if self._lost:
            return
        self._closing = True
        self._conn.abort()
        self._host.schedule_flush()
        self._connection_lost(exc if isinstance(exc, Exception) else None)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "socket":
            return default
        if name == "service":
            return self._service
        if name in ("peername", "sockname"):
            sf = self._conn.primary
            address = sf.remote_addr if name == "peername" else sf.local_addr
            return default if address is None else (str(address[0]), int(address[1]))
        return super().get_extra_info(name, default)


def _ssl_context(ssl: Any, server_side: bool) -> ssl_module.SSLContext | None:
    if ssl is None or ssl is False:
        return None
    if isinstance(ssl, ssl_module.SSLContext):
        return ssl
    if ssl is True and not server_side:
        return ssl_module.create_default_context()
    raise ValueError(f"ssl must be an SSLContext (or True on the client side), not {ssl!r}")


class ServiceServer(asyncio.AbstractServer):
    """What ``loop.create_server`` returns for Serval names: accepts on each service."""

    def __init__(
        self,
        installation: Installation,
        host: StreamHost,
        listeners: list[tuple[str, ServalListener]],
        factory: ProtocolFactory,
        sslcontext: ssl_module.SSLContext | None,
        ssl_handshake_timeout: float | None,
        ssl_shutdown_timeout: float | None,
    ) -> None:
        self._installation = installation
        self._host = host
        self._listeners = listeners
        self._factory = factory
        self._ssl = sslcontext
        self._ssl_timeouts = (ssl_handshake_timeout, ssl_shutdown_timeout)
        self._tasks: list[asyncio.Task[None]] = []
        self._closing: set[asyncio.Future[None]] = set()
        self._closed = asyncio.Event()

    @property
    def services(self) -> list[str]:
        """The service names accepted on."""
        return [name for name, _ in self._listeners]

    def _accept_on(self, name: str, listener: ServalListener) -> None:
        self._tasks.append(asyncio.ensure_future(self._accept_loop(name, listener)))

    async def _accept_loop(self, name: str, listener: ServalListener) -> None:
        while True:
            try:
                stream = await listener.accept()
            except anyio.ClosedResourceError:
                return
            try:
                self._installation.attach(
                    self._host,
                    stream.connection,
                    self._factory(),
                    name,
                    self._ssl,
                    server_side=True,
                    server_hostname=None,
                    timeouts=self._ssl_timeouts,
                )
            except Exception:
                # Like asyncio's servers: a failing protocol factory costs one connection.
                LOGGER.exception("protocol factory failed for service %s", name)
                stream.connection.abort()
                self._host.schedule_flush()

    def close(self) -> None:
        if self._closed.is_set():
            return
        for task in self._tasks:
            task.cancel()
        self._tasks.clear()
        for _, listener in self._listeners:
            # aclose() only tells the host, at once; it is async for anyio's sake.
            closing = asyncio.ensure_future(listener.aclose())
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)
        self._closed.set()

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._host.loop

    def is_serving(self) -> bool:
        return bool(self._tasks)

    async def start_serving(self) -> None:
        if not self._tasks and not self._closed.is_set():
            for name, listener in self._listeners:
                self._accept_on(name, listener)

    async def serve_forever(self) -> None:
        await self.start_serving()
        try:
            await self._closed.wait()
        finally:
            self.close()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    @property
    def sockets(self) -> tuple[Any, ...]:
        """No kernel sockets: a service is not bound to a port (empty, as libraries expect)."""
        return ()


class Installation:
    """One loop's Serval names (see the module docstring); a context manager that undoes
    itself. Made by :func:`install`."""

    def __init__(
        self,
        host: Host | None,
        loop: asyncio.AbstractEventLoop,
        suffix: str = SUFFIX,
        connect_timeout: float | None = None,
        *,
        connect: bool = True,
        serve: bool = True,
    ) -> None:
        if not suffix.startswith(".") or len(suffix) < 2:
            raise ValueError(f"the suffix must look like '.serval', not {suffix!r}")
        self.loop = loop
        self.suffix = suffix.lower()
        self.connect_timeout = connect_timeout
        self.connect = connect
        self.serve = serve
        self._host = host
        self._saved: dict[str, object] = {}
        self._original: dict[str, Callable[..., Any]] = {}
        self._installed = False

    # -- installing ---------------------------------------------------------------------
    def _apply(self) -> None:
        loop = self.loop
        for name in _PATCHED:
            own = getattr(loop, "__dict__", {})
            self._saved[name] = own.get(name, _MISSING)
            self._original[name] = getattr(loop, name)
        try:
            loop.create_connection = self._create_connection  # type: ignore[method-assign,assignment]
            loop.create_server = self._create_server  # type: ignore[method-assign,assignment]
        except AttributeError as exc:
            raise TypeError(
                f"cannot install on {type(loop).__name__}: its methods cannot be replaced "
                f"(use pyserval.open_connection and pyserval.start_server)"
            ) from exc
        self._installed = True

    def uninstall(self) -> None:
        """Give the loop the methods it had before :func:`install` (installations on one loop
        stack: undo them in reverse order, as nested ``with`` blocks do)."""
        if not self._installed:
            return
        self._installed = False
        for name, saved in self._saved.items():
            if saved is _MISSING:
                vars(self.loop).pop(name, None)
            else:
                setattr(self.loop, name, saved)

    @property
    def installed(self) -> bool:
        """Whether the loop resolves Serval names now."""
        return self._installed

    def __enter__(self) -> Installation:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.uninstall()

    async def __aenter__(self) -> Installation:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.uninstall()

    async def host(self) -> Host:
        """The host Serval names go through (the process-wide default one if none given)."""
        if self._host is None:
            from .api import default_host

            self._host = await default_host()
        return self._host

    # -- the transport ------------------------------------------------------------------
    def attach(
        self,
        host: StreamHost,
        conn: Connection,
        protocol: asyncio.BaseProtocol,
        service: str,
        sslcontext: ssl_module.SSLContext | None,
        *,
        server_side: bool,
        server_hostname: str | None,
        timeouts: tuple[float | None, float | None],
    ) -> tuple[asyncio.Transport, asyncio.Future[None] | None]:
        """Put ``protocol`` on ``conn`` (through TLS when ``sslcontext``); returns the
        application's transport and, with TLS, the handshake's future."""
        if sslcontext is None:
            return ServiceTransport(host, conn, protocol, service), None
        waiter: asyncio.Future[None] = self.loop.create_future()
        tls = sslproto.SSLProtocol(
            self.loop,
            protocol,
            sslcontext,
            waiter,
            server_side,
            server_hostname,
            ssl_handshake_timeout=timeouts[0],  # type: ignore[arg-type]
            ssl_shutdown_timeout=timeouts[1],
        )
        ServiceTransport(host, conn, tls, service)
        app: asyncio.Transport = tls._app_transport
        return app, waiter

    # -- the replaced loop methods ------------------------------------------------------
    async def _create_connection(
        self,
        protocol_factory: ProtocolFactory,
        host: str | None = None,
        port: int | None = None,
        **kwargs: Any,
    ) -> tuple[asyncio.Transport, asyncio.BaseProtocol]:
        name = service_name(host, self.suffix) if self.connect else None
        if name is None or kwargs.get("sock") is not None:
            result: tuple[asyncio.Transport, asyncio.BaseProtocol] = await self._original[
                "create_connection"
            ](protocol_factory, host, port, **kwargs)
            return result
        if kwargs.get("local_addr") is not None:
            raise ValueError(f"local_addr is not supported for the Serval name {host!r}")
        sslcontext = _ssl_context(kwargs.get("ssl"), server_side=False)
        server_hostname = kwargs.get("server_hostname")
        if sslcontext is not None and server_hostname is None:
            server_hostname = host
        h = await self.host()
        stream = await h.connect(name, timeout=self.connect_timeout)
        protocol = protocol_factory()
        transport, waiter = self.attach(
            h,
            stream.connection,
            protocol,
            name,
            sslcontext,
            server_side=False,
            server_hostname=server_hostname,
            timeouts=(kwargs.get("ssl_handshake_timeout"), kwargs.get("ssl_shutdown_timeout")),
        )
        if waiter is not None:
            try:
                await waiter
            except BaseException:
                transport.abort()
                raise
        return transport, protocol

    async def _create_server(
        self,
        protocol_factory: ProtocolFactory,
        host: str | Sequence[str] | None = None,
        port: int | None = None,
        **kwargs: Any,
    ) -> asyncio.AbstractServer:
        hosts = [host] if isinstance(host, str) or host is None else list(host)
        names = [service_name(h, self.suffix) if self.serve else None for h in hosts]
        if kwargs.get("sock") is not None or all(n is None for n in names):
            result: asyncio.AbstractServer = await self._original["create_server"](
                protocol_factory, host, port, **kwargs
            )
            return result
        if any(n is None for n in names):
            raise ValueError(f"cannot mix Serval names and other hosts: {hosts!r}")
        sslcontext = _ssl_context(kwargs.get("ssl"), server_side=True)
        h = await self.host()
        backlog = int(kwargs.get("backlog") or 100)
        listeners: list[tuple[str, ServalListener]] = []
        try:
            for n in names:
                assert n is not None
                listeners.append((n, await h.listen(n, backlog)))
        except BaseException:
            for _, listener in listeners:
                await listener.aclose()
            raise
        server = ServiceServer(
            self,
            h,
            listeners,
            protocol_factory,
            sslcontext,
            kwargs.get("ssl_handshake_timeout"),
            kwargs.get("ssl_shutdown_timeout"),
        )
        if kwargs.get("start_serving", True):
            await server.start_serving()
        return server


class _InstallingPolicy(asyncio.DefaultEventLoopPolicy):
    """Every new event loop resolves Serval names (the default host, made on first use)."""

    def __init__(self, suffix: str) -> None:
        super().__init__()
        self._suffix = suffix

    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        loop = super().new_event_loop()
        Installation(None, loop, self._suffix)._apply()
        return loop


def install_on_new_loops(suffix: str = SUFFIX) -> None:
    """Install on every event loop made from now on (``asyncio.run`` included), each with the
    process-wide default host; what ``python -m pyserval.launch`` does before it runs an
    unchanged program. Replaces the event loop policy."""
    asyncio.set_event_loop_policy(_InstallingPolicy(suffix))


def install(
    host: Host | None = None,
    *,
    loop: asyncio.AbstractEventLoop | None = None,
    suffix: str = SUFFIX,
    connect_timeout: float | None = None,
    connect: bool = True,
    serve: bool = True,
) -> Installation:
    """Make ``loop`` (the running one by default) open Serval streams for ``NAME.serval``.

    ``host``: the Serval host to use (the process-wide default host, made on first use, if
    None). Returns the :class:`Installation`, which is also a context manager (``with`` or
    ``async with``) that uninstalls at exit. See the module docstring for what is covered.

    ``connect=False`` or ``serve=False`` leave that side to whatever the loop did before:
    two hosts on one loop (a test, a proxy) install one to serve and one to connect.
    """
    if loop is None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            if host is None:
                raise
            loop = host.loop  # a started host outside its loop: install on the host's loop
    installation = Installation(host, loop, suffix, connect_timeout, connect=connect, serve=serve)
    installation._apply()
    return installation

"""The TCP <-> Serval translator: unmodified TCP programs on either side of Serval.

Two directions, chosen by the endpoints:

* inbound, ``tcp:HOST:PORT -> service:NAME``: listen on a TCP address; each accepted TCP
  connection becomes a Serval stream to the service, late-bound through the host's service
  table (a router, or static routes), so it is load-balanced and fails over like any Serval
  client;
* outbound, ``service:NAME -> tcp:HOST:PORT``: listen on the serviceID (registered with the
  router if there is one); each accepted Serval stream becomes a TCP connection to the
  address.

Chained, legacy client -> inbound -> Serval -> outbound -> legacy server, neither program
changes. Each pair is moved by a :class:`~pyserval.translator.relay.Relay` (byte-exact,
bounded buffers, half-close and resets carried across). Every connection is logged on the
``pyserval.translator`` logger: one line when it opens, one when it closes (bytes each way
and how it ended); a refusal or a failed connect is one line on its own.

When the outbound side cannot reach its TCP server, the Serval stream is reset at once and,
if the host has a router, the translator stops listening on the service (the router drops the
instance, so new clients go to the others) and probes the server until it answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import ssl
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from ..naming.delegation import Delegation
from ..naming.keys import ServiceKey
from ..naming.service_id import ServiceID, as_service_id
from ..runtime.host import Host
from ..runtime.secure import SecureListener, SecureStream, check_securable
from ..runtime.streams import ServalConnectError, ServalListener, ServalStream
from ..sal.inet import Address
from ..transport.config import StreamConfig
from .relay import DEFAULT_CHUNK, Relay, TcpPipe

__all__ = [
    "Endpoint",
    "ServiceEndpoint",
    "TcpEndpoint",
    "TranslatedConnection",
    "Translator",
    "TranslatorStats",
    "parse_endpoint",
]

LOGGER = logging.getLogger("pyserval.translator")


@dataclass(frozen=True)
class TcpEndpoint:
    """``tcp:HOST:PORT``."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"


@dataclass(frozen=True)
class ServiceEndpoint:
    """``service:NAME`` (a name, or a serviceID in hex)."""

    name: str

    @property
    def service_id(self) -> ServiceID:
        """The serviceID the name stands for."""
        return as_service_id(self.name)

    def __str__(self) -> str:
        return f"service:{self.name}"


Endpoint = TcpEndpoint | ServiceEndpoint


def parse_endpoint(text: str) -> Endpoint:
    """``tcp:HOST:PORT`` or ``service:NAME`` to an endpoint (``ValueError`` naming the text)."""
    kind, sep, rest = text.strip().partition(":")
    if sep and kind == "tcp":
        host, colon, port = rest.rpartition(":")
        host = host.removeprefix("[").removesuffix("]")
        if colon and host and port.isdigit() and 0 <= int(port) <= 65535:
            return TcpEndpoint(host, int(port))
    elif sep and kind == "service" and rest:
        as_service_id(rest)  # reject what cannot name a service now, not at first use
        return ServiceEndpoint(rest)
    raise ValueError(f"expected tcp:HOST:PORT or service:NAME, got {text!r}")


@dataclass
class TranslatorStats:
    """Counters of a translator (connections by how they ended, bytes each way)."""

    accepted: int = 0  # connections taken on (not refused)
    refused: int = 0  # turned away at the connection limit
    failed: int = 0  # the other side could not be reached
    closed: int = 0  # ended by both sides finishing
    reset: int = 0  # ended by a reset or error on either side (or by closing the translator)
    tcp_to_serval: int = 0  # bytes, over connections that ended
    serval_to_tcp: int = 0
    withdrawals: int = 0  # times the outbound side stopped listening (TCP server down)


@dataclass
class TranslatedConnection:
    """One connection being translated (see :attr:`Translator.connections`)."""

    number: int
    tcp_peer: Address
    started: float = field(default_factory=time.monotonic)
    relay: Relay | None = None  # set once both sides are connected

    @property
    def buffered(self) -> int:
        """Bytes the translator holds for this connection now."""
        return self.relay.buffered if self.relay is not None else 0


def _fmt(address: Address | None) -> str:
    return "?" if address is None else f"{address[0]}:{address[1]}"


class Translator:
    """Translate between TCP and Serval in one direction (see the module docstring).

    ``Translator("tcp:127.0.0.1:8080", "service:web", router="127.0.0.1:54326")`` is the
    inbound side, ``Translator("service:web", "tcp:127.0.0.1:80", router=...)`` the
    outbound one. Use ``async with translator:`` (or :meth:`start` and :meth:`close`).

    - ``listen``: the UDP address of the translator's own Serval interface (port 0: any);
      ``router`` and ``routes`` as for :class:`~pyserval.Host`; or pass ``host`` (started
      or not) to share one; it is then not closed with the translator.
    - ``max_connections``: past it, inbound accepts the TCP connection and resets it at
      once; outbound accepts the Serval stream and resets it at once. Both are logged.
    - ``mss`` and ``syn_rto`` adjust ``stream_config`` (the segment size; how soon an
      unanswered SYN is sent again, re-resolved by the router: 1 s rather than the
      reference's 3 s, so a SYN lost to an instance that just went away is retried soon).
      These three, like ``listen``, ``router`` and ``routes``, set up the host the
      translator makes; a ``host`` passed in keeps its own settings.
    - ``chunk``: the largest read on either side; each TCP socket also buffers at most about
      this much each way, and each Serval stream its ``send_buffer``/``receive_buffer``.
    - ``connect_timeout``: for the Serval connect (inbound) or the TCP connect (outbound).
    - outbound only: ``weight``/``priority`` of the registration; ``probe_interval``: how
      often a TCP server found down is tried again; ``health_interval`` > 0 also checks it
      that often while it is up (a TCP connect, closed at once), to withdraw before a
      client is turned away.
    - ``secure``: the Serval hop is TLS 1.3 that proves the serviceID (a self-certifying
      ID in hex; see :mod:`pyserval.runtime.secure`). Inbound, the translator is the
      client and checks the proof; outbound it serves with ``key`` (the service key, or an
      instance key with ``delegation``), or with ``ssl_context`` (either side: your PKI).
      ``key`` without ``secure`` only signs the outbound registration.
    """

    def __init__(
        self,
        source: str | Endpoint,
        target: str | Endpoint,
        *,
        router: str | None = None,
        listen: str = "127.0.0.1:0",
        routes: dict[str, str] | None = None,
        host: Host | None = None,
        max_connections: int = 1024,
        mss: int | None = None,
        syn_rto: float | None = 1.0,
        stream_config: StreamConfig | None = None,
        chunk: int = DEFAULT_CHUNK,
        connect_timeout: float = 10.0,
        weight: int = 1,
        priority: int = 0,
        probe_interval: float = 0.5,
        health_interval: float = 0.0,
        logger: logging.Logger | None = None,
        secure: bool = False,
        key: ServiceKey | None = None,
        delegation: Delegation | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.source = parse_endpoint(source) if isinstance(source, str) else source
        self.target = parse_endpoint(target) if isinstance(target, str) else target
        if isinstance(self.source, TcpEndpoint) and isinstance(self.target, ServiceEndpoint):
            self.direction = "inbound"
        elif isinstance(self.source, ServiceEndpoint) and isinstance(self.target, TcpEndpoint):
            self.direction = "outbound"
        else:
            raise ValueError(
                f"translate tcp:HOST:PORT -> service:NAME or service:NAME -> tcp:HOST:PORT, "
                f"not {self.source} -> {self.target}"
            )
        if secure and ssl_context is None:
            service = self.target if self.direction == "inbound" else self.source
            assert isinstance(service, ServiceEndpoint)
            check_securable(service.name)  # a name cannot be proved: say so now
            if self.direction == "outbound" and key is None:
                raise ValueError("a secure outbound translator needs key= (or ssl_context=)")
        self.secure = secure
        self.key = key
        self.delegation = delegation
        self.ssl_context = ssl_context
        if max_connections < 1:
            raise ValueError(f"max_connections must be at least 1: {max_connections}")
        if chunk < 1024:
            raise ValueError(f"chunk must be at least 1024 bytes: {chunk}")
        config = stream_config or StreamConfig()
        if mss is not None:
            config = dataclasses.replace(config, mss=mss)
        if syn_rto is not None:
            config = dataclasses.replace(
                config, control=dataclasses.replace(config.control, initial_rto=syn_rto)
            )
        self._owns_host = host is None
        self.host = host or Host([listen], router=router, routes=routes, stream_config=config)
        self.max_connections = max_connections
        self.chunk = chunk
        self.connect_timeout = connect_timeout
        self.weight = weight
        self.priority = priority
        self.probe_interval = probe_interval
        self.health_interval = health_interval
        self.log = logger or LOGGER
        self.stats = TranslatorStats()
        self._numbers = itertools.count(1)
        self._active: dict[int, TranslatedConnection] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self._tcp_address: Address | None = None
        self._listener: ServalListener | SecureListener | None = None
        self._withdrawn = asyncio.Event()
        self._watcher: asyncio.Task[None] | None = None
        self._started = False
        self._closing = False
        self._done = asyncio.Event()

    # -- life cycle ---------------------------------------------------------------------
    @property
    def tcp_address(self) -> Address | None:
        """Inbound: the TCP address actually listened on (None before start)."""
        return self._tcp_address

    @property
    def serval_addresses(self) -> list[Address]:
        """The UDP addresses of the translator's Serval interfaces."""
        return self.host.addresses

    @property
    def connections(self) -> list[TranslatedConnection]:
        """The connections being translated now."""
        return list(self._active.values())

    @property
    def active(self) -> int:
        """How many connections are being translated now."""
        return len(self._active)

    @property
    def listening(self) -> bool:
        """Outbound: whether the service is listened on (False while withdrawn)."""
        return self._listener is not None

    @property
    def buffered(self) -> int:
        """Bytes held for all connections now (TCP-side and Serval stream buffers)."""
        return sum(c.buffered for c in self._active.values())

    def describe(self) -> str:
        """``FROM -> TO``, with the TCP port actually bound for an inbound translator."""
        source = self.source
        if isinstance(source, TcpEndpoint) and self._tcp_address is not None:
            source = TcpEndpoint(source.host, self._tcp_address[1])
        return f"{source} -> {self.target}"

    async def start(self) -> Translator:
        """Start the host (if not running) and begin accepting connections."""
        if self._started:
            return self
        self._started = True
        try:
            if self.host.core is None:
                await self.host.start()
            if isinstance(self.source, TcpEndpoint):
                self._server = await asyncio.get_running_loop().create_server(
                    lambda: TcpPipe(self.chunk, self._on_tcp_accepted),
                    self.source.host,
                    self.source.port,
                    backlog=min(self.max_connections, 4096),
                )
                name = self._server.sockets[0].getsockname()
                self._tcp_address = (str(name[0]), int(name[1]))
            else:
                await self._listen()
                if self.host.config.router is not None:
                    self._watcher = asyncio.ensure_future(self._watch_target())
        except BaseException:
            await self.close(timeout=0)  # e.g. the TCP address is taken: leave nothing open
            raise
        self.log.info(
            "%s translating %s: serval interface %s, router %s, limit %d connections",
            self.direction,
            self.describe(),
            ", ".join(_fmt(a) for a in self.serval_addresses),
            self.host.config.router or "none",
            self.max_connections,
        )
        return self

    async def serve_forever(self) -> None:
        """Wait until the translator is closed."""
        await self._done.wait()

    async def close(self, timeout: float = 2.0) -> None:
        """Stop accepting; give the connections in progress ``timeout`` seconds to end by
        themselves, then reset what is left (both sides); close the host if it is ours."""
        if self._closing:
            await self._done.wait()
            return
        self._closing = True
        if self._server is not None:
            self._server.close()
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        if self._listener is not None:
            listener, self._listener = self._listener, None
            await listener.aclose()
        tasks = set(self._tasks)
        if tasks and timeout > 0:
            await asyncio.wait(tasks, timeout=timeout)
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
        if self._owns_host:
            await self.host.close()
        self._done.set()

    async def __aenter__(self) -> Translator:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- bookkeeping --------------------------------------------------------------------
    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _over_limit(self) -> str | None:
        if self._closing:
            return "the translator is closing"
        if len(self._active) >= self.max_connections:
            return f"{len(self._active)} connections active (limit {self.max_connections})"
        return None

    async def _relay(self, session: TranslatedConnection, relay: Relay) -> None:
        """Run one relay to its end, then log and count how it ended."""
        session.relay = relay
        ended = "?"
        try:
            ended = await relay.run()
        except Exception as exc:  # a bug: log it here, where the connection is known
            ended = f"internal error: {exc!r}"
            self.log.exception("%s #%d: relay failed", self.direction, session.number)
        finally:
            ended = relay.ended or ended
            self.stats.tcp_to_serval += relay.tcp_to_serval
            self.stats.serval_to_tcp += relay.serval_to_tcp
            if ended == "closed by both sides":
                self.stats.closed += 1
            else:
                self.stats.reset += 1
            self.log.info(
                "%s #%d close after %.3f s: tcp->serval %d B, serval->tcp %d B, ended: %s",
                self.direction,
                session.number,
                time.monotonic() - session.started,
                relay.tcp_to_serval,
                relay.serval_to_tcp,
                ended,
            )

    # -- inbound: TCP -> Serval ----------------------------------------------------------
    def _on_tcp_accepted(self, pipe: TcpPipe) -> None:
        number = next(self._numbers)
        why = self._over_limit()
        if why is not None:
            # Accepted by the kernel already: reset it at once, so the client sees a clear
            # refusal rather than an empty reply that could pass for a finished response.
            pipe.reset()
            self.stats.refused += 1
            self.log.warning(
                "%s #%d refused: tcp %s -> %s: %s",
                self.direction,
                number,
                _fmt(pipe.peer),
                self.target,
                why,
            )
            return
        session = TranslatedConnection(number, pipe.peer)
        self._active[number] = session
        self.stats.accepted += 1
        self._spawn(self._inbound(session, pipe))

    async def _inbound(self, session: TranslatedConnection, pipe: TcpPipe) -> None:
        target = self.target
        assert isinstance(target, ServiceEndpoint)
        try:
            try:
                stream: ServalStream | SecureStream = await self.host.connect(
                    target.service_id,
                    timeout=self.connect_timeout,
                    secure=self.secure,
                    ssl_context=self.ssl_context,
                )
            except (ServalConnectError, RuntimeError) as exc:
                pipe.reset()
                self.stats.failed += 1
                self.log.warning(
                    "%s #%d failed: tcp %s -> %s: %s",
                    self.direction,
                    session.number,
                    _fmt(pipe.peer),
                    target,
                    exc,
                )
                return
            except BaseException:
                pipe.reset()
                raise
            self.log.info(
                "%s #%d open: tcp %s -> %s at %s (flow %#x -> %#x)",
                self.direction,
                session.number,
                _fmt(pipe.peer),
                target,
                _fmt(stream.remote_address),
                stream.local_flowid,
                stream.remote_flowid,
            )
            await self._relay(session, Relay(pipe, stream, self.host, chunk=self.chunk))
        finally:
            self._active.pop(session.number, None)

    # -- outbound: Serval -> TCP ---------------------------------------------------------
    async def _listen(self) -> None:
        source = self.source
        assert isinstance(source, ServiceEndpoint)
        listener: ServalListener | SecureListener = await self.host.listen(
            source.service_id,
            weight=self.weight,
            priority=self.priority,
            key=self.key,
            secure=self.secure,
            delegation=self.delegation,
            ssl_context=self.ssl_context,
        )
        self._listener = listener
        self._withdrawn.clear()
        self._spawn(self._accept(listener))

    async def _accept(self, listener: ServalListener | SecureListener) -> None:
        # Ends once the listener is closed and the streams it had queued are taken.
        async for stream in listener:
            number = next(self._numbers)
            why = self._over_limit()
            if why is not None:
                await stream.abort()
                self.stats.refused += 1
                self.log.warning(
                    "%s #%d refused: %s from %s -> %s: %s",
                    self.direction,
                    number,
                    self.source,
                    _fmt(stream.remote_address),
                    self.target,
                    why,
                )
                continue
            peer = stream.remote_address or ("?", 0)
            session = TranslatedConnection(number, peer)
            self._active[number] = session
            self.stats.accepted += 1
            self._spawn(self._outbound(session, stream))

    async def _outbound(
        self, session: TranslatedConnection, stream: ServalStream | SecureStream
    ) -> None:
        target = self.target
        assert isinstance(target, TcpEndpoint)
        loop = asyncio.get_running_loop()
        try:
            try:
                async with asyncio.timeout(self.connect_timeout):
                    _, pipe = await loop.create_connection(
                        lambda: TcpPipe(self.chunk), target.host, target.port
                    )
            except (OSError, TimeoutError) as exc:
                reason = str(exc) or "timed out"
                await stream.abort()
                self.stats.failed += 1
                self.log.warning(
                    "%s #%d failed: %s from %s -> %s: %s",
                    self.direction,
                    session.number,
                    self.source,
                    _fmt(session.tcp_peer),
                    target,
                    reason,
                )
                await self._withdraw(f"cannot connect to {target}: {reason}")
                return
            except BaseException:
                await stream.abort()
                raise
            session.tcp_peer = pipe.peer
            self.log.info(
                "%s #%d open: %s from %s (flow %#x) -> %s",
                self.direction,
                session.number,
                self.source,
                _fmt(stream.remote_address),
                stream.local_flowid,
                target,
            )
            await self._relay(session, Relay(pipe, stream, self.host, chunk=self.chunk))
        finally:
            self._active.pop(session.number, None)

    async def _withdraw(self, why: str) -> None:
        """Stop listening on the service, so the router drops this instance."""
        if self._listener is None or self._closing or self.host.config.router is None:
            return
        listener, self._listener = self._listener, None
        self.stats.withdrawals += 1
        await listener.aclose()
        self._withdrawn.set()
        self.log.warning(
            "%s %s withdrawn from the router: %s; trying it every %.2f s",
            self.direction,
            self.describe(),
            why,
            self.probe_interval,
        )

    async def _probe(self) -> str | None:
        """Try a TCP connect to the target (closed at once); None if it answered."""
        target = self.target
        assert isinstance(target, TcpEndpoint)
        try:
            async with asyncio.timeout(min(self.connect_timeout, 2.0)):
                _, writer = await asyncio.open_connection(target.host, target.port)
        except (OSError, TimeoutError) as exc:
            return str(exc) or "timed out"
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return None

    async def _watch_target(self) -> None:
        """Outbound with a router: bring the service back once the TCP server answers
        again; with ``health_interval``, also withdraw when it stops answering."""
        while not self._closing:
            if self._listener is not None:
                if self.health_interval <= 0:
                    await self._withdrawn.wait()
                    continue
                await asyncio.sleep(self.health_interval)
                problem = await self._probe()
                if problem is not None:
                    await self._withdraw(f"health check: {problem}")
            else:
                await asyncio.sleep(self.probe_interval)
                if self._listener is None and not self._closing and await self._probe() is None:
                    try:
                        await self._listen()
                    except (RuntimeError, ValueError) as exc:  # e.g. the host was closed
                        self.log.warning("%s cannot listen again: %s", self.direction, exc)
                        return
                    self.log.warning(
                        "%s %s restored: the TCP server answers again",
                        self.direction,
                        self.describe(),
                    )

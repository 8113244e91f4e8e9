"""Any ASGI application (Starlette, FastAPI, a plain callable) served over Serval streams.

:class:`AsgiServer` speaks HTTP/1.1 on each accepted :class:`~pyserval.runtime.ServalStream`
and calls the application once per request (ASGI 3, ``http`` scope, keep-alive);
:func:`serve_asgi` listens on a serviceID (registered with the host's router, so several
replicas share the load) and runs the ASGI ``lifespan`` protocol around it.

Why h11 and not uvicorn or hypercorn: the parsing, framing (Content-Length, chunked,
keep-alive, pipelining rules) and protocol errors are h11's, the maintained HTTP/1.1 state
machine uvicorn itself can run on. It is sans-I/O, so it drives a Serval stream directly; the
servers want a kernel socket or asyncio transport, which a Serval stream is not, and serving
them one would need their private APIs or a loopback relay. What this module adds is the ASGI
glue: a scope per request, ``receive`` that reads the body from the stream only when the
application asks (so a slow application slows the client: backpressure end to end), and
``send`` that waits while the stream's send buffer is full.

What it does not do: HTTP/2, WebSocket (an upgrade is answered 501 by the application's
absence of support: the ``websocket`` scope is never produced), TLS, ``Expect: 100-continue``
(the body is simply read), trailers, or a request body larger than the application reads
(after the response, at most ``drain_limit`` unread body bytes are skipped to keep the
connection; more closes it).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Final
from urllib.parse import unquote

import anyio
import h11

from ..naming.keys import ServiceKey
from ..naming.service_id import ServiceLike
from ..runtime.host import Host
from ..runtime.streams import ServalStream

__all__ = ["ASGIApp", "AsgiServer", "LifespanError", "serve_asgi"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
"""An ASGI 3 application: ``await app(scope, receive, send)``."""

log = logging.getLogger("pyserval.http")

READ_CHUNK: Final = 65536
MAX_HEADER_BYTES: Final = 64 * 1024
DEFAULT_DRAIN_LIMIT: Final = 1024 * 1024
DEFAULT_HEAD_TIMEOUT: Final = 5.0


class LifespanError(RuntimeError):
    """The application's lifespan startup failed."""


class _ClientGone(Exception):
    """The client closed or reset the stream."""


class _Exchange:
    """One request/response on a connection: the ASGI ``receive`` and ``send``."""

    def __init__(self, conn: _HttpConnection, request: h11.Request) -> None:
        self.conn = conn
        self.request = request
        self.body_done = False
        self.response_started = False
        self.response_done = False
        self.disconnected = False
        self._status = 200
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_sent = False
        # HEAD: the headers say what GET would send, but no body goes out (h11 refuses one)
        self._no_body = request.method == b"HEAD"
        self._finished = anyio.Event()

    async def receive(self) -> Message:
        if self.disconnected:
            return {"type": "http.disconnect"}
        if not self.body_done:
            try:
                event = await self.conn.next_event()
            except _ClientGone:
                self.disconnected = True
                return {"type": "http.disconnect"}
            if isinstance(event, h11.Data):
                return {"type": "http.request", "body": bytes(event.data), "more_body": True}
            # EndOfMessage (h11 raises on anything else in this state)
            self.body_done = True
            return {"type": "http.request", "body": b"", "more_body": False}
        # The body was all read: the next thing to report is the end of the exchange.
        await self._finished.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if self.disconnected:
            return  # ASGI: sends after the client left are ignored
        if kind == "http.response.start":
            if self.response_started:
                raise RuntimeError("http.response.start sent twice")
            self.response_started = True
            self._status = int(message["status"])
            self._headers = [(bytes(k), bytes(v)) for k, v in message.get("headers", [])]
            return
        if kind != "http.response.body":
            raise RuntimeError(f"unexpected ASGI message {kind!r}")
        if not self.response_started:
            raise RuntimeError("http.response.body before http.response.start")
        if self.response_done:
            raise RuntimeError("http.response.body after the response ended")
        try:
            if not self._head_sent:
                self._head_sent = True
                await self.conn.send(h11.Response(status_code=self._status, headers=self._headers))
            body = bytes(message.get("body", b""))
            if body and not self._no_body:
                await self.conn.send(h11.Data(data=body))
            if not message.get("more_body", False):
                self.response_done = True
                await self.conn.send(h11.EndOfMessage())
                self._finished.set()
        except _ClientGone:
            self.disconnected = True
            self._finished.set()

    def finish(self) -> None:
        self._finished.set()


class _HttpConnection:
    """h11 on one Serval stream."""

    def __init__(self, stream: ServalStream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)

    async def next_event(self) -> Any:
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            try:
                data = await self.stream.receive(READ_CHUNK)
            except anyio.EndOfStream:
                data = b""
            except (anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
                raise _ClientGone from exc
            self.h11.receive_data(data)

    async def send(self, event: Any) -> None:
        data = self.h11.send(event)
        if data:
            try:
                await self.stream.send(data)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
                raise _ClientGone from exc


class AsgiServer:
    """Serve ``app`` on Serval streams: ``await listener.serve(server.handle)``.

    ``state`` is the lifespan state (copied into each request's scope); ``drain_limit`` the
    unread request body skipped after a response to keep a connection alive;
    ``head_timeout`` the seconds a connection may take to send a whole request head, the
    first or the next on a kept-alive connection (then it is closed: idle connections and
    clients that dribble their headers do not hold a task for ever).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        root_path: str = "",
        drain_limit: int = DEFAULT_DRAIN_LIMIT,
        head_timeout: float = DEFAULT_HEAD_TIMEOUT,
        state: dict[str, Any] | None = None,
    ) -> None:
        self.app = app
        self.root_path = root_path
        self.drain_limit = drain_limit
        self.head_timeout = head_timeout
        self.state: dict[str, Any] = {} if state is None else state
        self.requests = 0
        """Requests handed to the application."""
        self.errors = 0
        """Requests whose application raised."""

    async def handle(self, stream: ServalStream) -> None:
        """Serve HTTP/1.1 requests on ``stream`` until either side closes it. Never raises."""
        conn = _HttpConnection(stream)
        try:
            await self._serve(conn)
        except _ClientGone:
            pass
        except h11.ProtocolError as exc:
            log.debug("HTTP protocol error from %s: %s", stream.remote_address, exc)
            await self._refuse(conn, exc)
        except Exception:  # an application or server bug must not end the listener
            log.exception("serving a connection failed")
        finally:
            with contextlib.suppress(Exception):
                await stream.aclose()

    async def _refuse(self, conn: _HttpConnection, exc: h11.ProtocolError) -> None:
        if conn.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        status = getattr(exc, "error_status_hint", 400)
        with contextlib.suppress(Exception):
            await conn.send(
                h11.Response(
                    status_code=status,
                    headers=[(b"content-length", b"0"), (b"connection", b"close")],
                )
            )
            await conn.send(h11.EndOfMessage())

    async def _serve(self, conn: _HttpConnection) -> None:
        while True:
            event = None
            with anyio.move_on_after(self.head_timeout):
                event = await conn.next_event()
            if event is None:
                return  # idle (or too slow) for head_timeout: close
            if isinstance(event, h11.ConnectionClosed):
                return
            if not isinstance(event, h11.Request):  # h11 allows nothing else here
                return
            exchange = _Exchange(conn, event)
            await self._run_app(conn, exchange)
            if exchange.disconnected:
                return
            if not await self._drain(conn):
                return
            if conn.h11.our_state is h11.MUST_CLOSE or conn.h11.their_state is h11.MUST_CLOSE:
                return
            try:
                conn.h11.start_next_cycle()
            except h11.LocalProtocolError:
                return

    async def _drain(self, conn: _HttpConnection) -> bool:
        """Skip what the application left of the request body (up to the limit)."""
        skipped = 0
        while conn.h11.their_state is h11.SEND_BODY:
            event = await conn.next_event()
            if isinstance(event, h11.Data):
                skipped += len(event.data)
                if skipped > self.drain_limit:
                    return False
        return conn.h11.their_state is h11.DONE

    def _scope(self, stream: ServalStream, request: h11.Request) -> Scope:
        target = bytes(request.target)
        raw_path, _, query = target.partition(b"?")
        return {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": request.http_version.decode("ascii"),
            "method": request.method.decode("ascii"),
            "scheme": "http",
            "path": unquote(raw_path.decode("latin-1")),
            "raw_path": raw_path,
            "query_string": query,
            "root_path": self.root_path,
            "headers": [(bytes(k), bytes(v)) for k, v in request.headers],
            "client": stream.remote_address,
            "server": stream.local_address,
            "state": dict(self.state),
            "extensions": {
                "serval": {
                    "service_id": stream.service_id.hex,
                    "local_flowid": stream.local_flowid,
                    "remote_flowid": stream.remote_flowid,
                }
            },
        }

    async def _run_app(self, conn: _HttpConnection, exchange: _Exchange) -> None:
        self.requests += 1
        try:
            await self.app(
                self._scope(conn.stream, exchange.request), exchange.receive, exchange.send
            )
        except _ClientGone:
            exchange.disconnected = True
        except Exception:
            self.errors += 1
            log.exception("the ASGI application raised")
            if not exchange.response_started:
                await exchange.send(
                    {
                        "type": "http.response.start",
                        "status": 500,
                        "headers": [(b"content-type", b"text/plain"), (b"connection", b"close")],
                    }
                )
                await exchange.send(
                    {"type": "http.response.body", "body": b"Internal Server Error"}
                )
            elif not exchange.response_done:
                exchange.disconnected = True  # half a response: only a reset tells the client
                await conn.stream.abort()
        else:
            if not exchange.response_started:
                self.errors += 1
                await exchange.send(
                    {
                        "type": "http.response.start",
                        "status": 500,
                        "headers": [(b"content-length", b"0")],
                    }
                )
                await exchange.send({"type": "http.response.body", "body": b""})
            elif not exchange.response_done and not exchange.disconnected:
                await exchange.send({"type": "http.response.body", "body": b""})
        finally:
            exchange.finish()


class _Lifespan:
    """The ASGI lifespan protocol: startup before serving, shutdown after."""

    def __init__(self, app: ASGIApp, state: dict[str, Any]) -> None:
        self.app = app
        self.state = state
        self.supported = True
        self._to_app: list[Message] = []
        self._wake_app = anyio.Event()
        self._answer: Message | None = None
        self._answered = anyio.Event()
        self._done = anyio.Event()

    async def run(self) -> None:
        scope: Scope = {
            "type": "lifespan",
            "asgi": {"version": "3.0", "spec_version": "2.0"},
            "state": self.state,
        }
        try:
            await self.app(scope, self._receive, self._send)
        except Exception:
            # An application without lifespan support raises on the unknown scope type.
            if self._answer is None:
                self.supported = False
                log.debug("the application does not support lifespan")
            else:
                log.exception("the ASGI application's lifespan raised")
        finally:
            self._done.set()
            self._answered.set()

    async def _receive(self) -> Message:
        while not self._to_app:
            self._wake_app = anyio.Event()
            await self._wake_app.wait()
        return self._to_app.pop(0)

    async def _send(self, message: Message) -> None:
        self._answer = message
        self._answered.set()

    async def _ask(self, kind: str) -> Message | None:
        self._answer = None
        self._answered = anyio.Event()
        self._to_app.append({"type": f"lifespan.{kind}"})
        self._wake_app.set()
        await self._answered.wait()
        return self._answer

    async def startup(self) -> None:
        answer = await self._ask("startup")
        if answer is None or not self.supported:
            return
        if answer["type"] == "lifespan.startup.failed":
            raise LifespanError(answer.get("message", "lifespan startup failed"))

    async def shutdown(self) -> None:
        if self.supported and not self._done.is_set():
            await self._ask("shutdown")


async def serve_asgi(
    app: ASGIApp,
    host: Host,
    service: ServiceLike,
    *,
    weight: int = 1,
    priority: int = 0,
    key: ServiceKey | None = None,
    lifespan: bool = True,
    ready: Callable[[], object] | None = None,
    server: AsgiServer | None = None,
) -> None:
    """Serve ``app`` on ``service`` of a running ``host`` until cancelled.

    With ``lifespan`` the application's startup runs before the service is listened on (so no
    request arrives before it) and its shutdown after. ``ready()`` is called once listening.
    """
    server = server or AsgiServer(app)
    failed: LifespanError | None = None
    async with anyio.create_task_group() as tg:
        life = _Lifespan(app, server.state)
        if lifespan:
            tg.start_soon(life.run)
            try:
                await life.startup()
            except LifespanError as exc:
                failed = exc  # raised below, outside the task group (not in an ExceptionGroup)
                tg.cancel_scope.cancel()
        if failed is None:
            listener = await host.listen(service, weight=weight, priority=priority, key=key)
            try:
                if ready is not None:
                    ready()
                await listener.serve(server.handle)
            finally:
                await listener.aclose()
                if lifespan:
                    with anyio.CancelScope(shield=True):
                        await life.shutdown()
                tg.cancel_scope.cancel()
    if failed is not None:
        raise failed

"""httpx over Serval: an ``httpcore`` network backend that connects by serviceID.

``httpx.AsyncClient(transport=AsyncServalTransport(host))`` sends ``http://echo.serval/path``
to the service ``echo``: the host name minus ``.serval`` is the service (a name, or 64 hex
digits for a serviceID), resolved by the host's service table like any ``host.connect``, so
requests are late-bound, load-balanced by a router and fail over like any Serval stream.

httpcore (the HTTP/1.1 client under httpx) does the HTTP: connection pooling, keep-alive,
request and response framing, retries of failed connects. This module only supplies the
byte streams: :class:`ServalNetworkBackend` opens a :class:`~pyserval.runtime.ServalStream`
where httpcore would open a TCP socket.

What it does not do: TLS (``https://`` is refused: Serval has no TLS layer here), HTTP/2,
proxies, or retries of requests that failed after they were sent (httpx never does; the
caller decides, since only it knows whether a request is idempotent).
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import Any, Final

import anyio
import httpcore
import httpx

from ..naming.service_id import ServiceID
from ..runtime.host import Host
from ..runtime.streams import ServalConnectError, ServalStream

__all__ = [
    "SERVAL_SUFFIX",
    "AsyncServalTransport",
    "ServalNetworkBackend",
    "ServalNetworkStream",
    "resolve_serval_host",
]

SERVAL_SUFFIX: Final = ".serval"

Resolver = Callable[[str, int], str | ServiceID]
"""``resolve(host name, port) -> service`` (a name, hex ID or :class:`ServiceID`)."""


def resolve_serval_host(hostname: str, port: int) -> str | ServiceID:
    """``"echo.serval"`` -> ``"echo"`` (the port is ignored: a service has no port).

    Any other host name is refused with :class:`httpcore.ConnectError`, so a client with
    this transport never reaches an IP address by mistake.
    """
    name = hostname.lower().rstrip(".")
    if not name.endswith(SERVAL_SUFFIX) or len(name) == len(SERVAL_SUFFIX):
        raise httpcore.ConnectError(
            f"{hostname!r} is not a Serval service name (expected NAME{SERVAL_SUFFIX})"
        )
    return name[: -len(SERVAL_SUFFIX)]


@contextlib.contextmanager
def _deadline(timeout: float | None, error: type[Exception]) -> Iterator[None]:
    if timeout is None:
        yield
        return
    try:
        with anyio.fail_after(timeout):
            yield
    except TimeoutError as exc:
        raise error(f"timed out after {timeout} s") from exc


class ServalNetworkStream(httpcore.AsyncNetworkStream):
    """httpcore's view of one :class:`ServalStream`."""

    def __init__(self, stream: ServalStream) -> None:
        self.stream = stream

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        """Up to ``max_bytes``; ``b""`` at end of stream (what httpcore expects)."""
        with _deadline(timeout, httpcore.ReadTimeout):
            try:
                return await self.stream.receive(max_bytes)
            except anyio.EndOfStream:
                return b""
            except (anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
                raise httpcore.ReadError(str(exc)) from exc

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        """All of ``buffer`` (waits while the send buffer is full: backpressure)."""
        if not buffer:
            return
        with _deadline(timeout, httpcore.WriteTimeout):
            try:
                await self.stream.send(buffer)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
                raise httpcore.WriteError(str(exc)) from exc

    async def aclose(self) -> None:
        """Close the stream (FIN after what was sent)."""
        await self.stream.aclose()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.AsyncNetworkStream:
        """Refused: there is no TLS over Serval here."""
        raise httpcore.ConnectError("TLS (https) over Serval is not supported")

    def get_extra_info(self, info: str) -> Any:
        """``is_readable`` (the pool's check for a server that closed an idle connection),
        ``serval_stream``, ``server_addr`` and ``client_addr``; None for the rest."""
        conn = self.stream.connection
        if info == "is_readable":
            return conn.readable > 0 or conn.peer_fin_received or conn.closed
        if info == "serval_stream":
            return self.stream
        if info == "server_addr":
            return self.stream.remote_address
        if info == "client_addr":
            return self.stream.local_address
        return None


class ServalNetworkBackend(httpcore.AsyncNetworkBackend):
    """Opens Serval streams where httpcore would open TCP connections."""

    def __init__(self, host: Host, resolve: Resolver = resolve_serval_host) -> None:
        self.host = host
        self.resolve = resolve

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        """Connect to the service ``resolve(host, port)`` names."""
        service = self.resolve(host, port)
        try:
            stream = await self.host.connect(service, timeout=timeout)
        except TimeoutError as exc:  # a connect timeout may be raised as a TimeoutError
            raise httpcore.ConnectTimeout(str(exc)) from exc
        except ServalConnectError as exc:
            if "timed out" in str(exc):
                raise httpcore.ConnectTimeout(str(exc)) from exc
            raise httpcore.ConnectError(str(exc)) from exc
        except (ValueError, RuntimeError) as exc:  # a bad name; a host not running
            raise httpcore.ConnectError(str(exc)) from exc
        return ServalNetworkStream(stream)

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        """Refused: a Serval transport reaches services, not Unix sockets."""
        raise httpcore.ConnectError("Unix sockets are not reachable over Serval")

    async def sleep(self, seconds: float) -> None:
        """Wait (httpcore's back-off between connect retries)."""
        await anyio.sleep(seconds)


# httpcore's exceptions and httpx's of the same meaning, most specific first.
_ERRORS: Final[tuple[tuple[type[Exception], type[httpx.TransportError]], ...]] = (
    (httpcore.ConnectTimeout, httpx.ConnectTimeout),
    (httpcore.ReadTimeout, httpx.ReadTimeout),
    (httpcore.WriteTimeout, httpx.WriteTimeout),
    (httpcore.PoolTimeout, httpx.PoolTimeout),
    (httpcore.TimeoutException, httpx.TimeoutException),
    (httpcore.ConnectError, httpx.ConnectError),
    (httpcore.ReadError, httpx.ReadError),
    (httpcore.WriteError, httpx.WriteError),
    (httpcore.NetworkError, httpx.NetworkError),
    (httpcore.RemoteProtocolError, httpx.RemoteProtocolError),
    (httpcore.LocalProtocolError, httpx.LocalProtocolError),
    (httpcore.ProtocolError, httpx.ProtocolError),
    (httpcore.UnsupportedProtocol, httpx.UnsupportedProtocol),
)


@contextlib.contextmanager
def _httpx_errors(request: httpx.Request) -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        for core_error, httpx_error in _ERRORS:
            if isinstance(exc, core_error):
                raise httpx_error(str(exc), request=request) from exc
        raise


class _ResponseStream(httpx.AsyncByteStream):
    def __init__(self, stream: Any, request: httpx.Request) -> None:
        self._stream = stream
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _httpx_errors(self._request):
            async for chunk in self._stream:
                yield chunk

    async def aclose(self) -> None:
        if hasattr(self._stream, "aclose"):
            await self._stream.aclose()


class AsyncServalTransport(httpx.AsyncBaseTransport):
    """An httpx transport that sends requests over Serval streams (see the module docstring).

    ``retries``: how often httpcore retries a failed *connect* (never a sent request).
    The limits are httpcore's connection pool's: at most ``max_connections`` streams, of
    which ``max_keepalive_connections`` stay open idle for ``keepalive_expiry`` seconds
    (``max_keepalive_connections=0``: a new connection, so a new late binding, for every
    request). The expiry is below the server's 5 s idle close, so the client lets go first.
    """

    def __init__(
        self,
        host: Host,
        *,
        resolve: Resolver = resolve_serval_host,
        retries: int = 0,
        max_connections: int = 100,
        max_keepalive_connections: int = 20,
        keepalive_expiry: float = 4.0,
    ) -> None:
        self.backend = ServalNetworkBackend(host, resolve)
        self._pool = httpcore.AsyncConnectionPool(
            max_connections=max_connections,
            max_keepalive_connections=max_keepalive_connections,
            keepalive_expiry=keepalive_expiry,
            http1=True,
            http2=False,
            retries=retries,
            network_backend=self.backend,
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` through httpcore's pool and hand back the streamed response."""
        if request.url.scheme != "http":
            raise httpx.UnsupportedProtocol(
                f"only http:// reaches Serval services, not {request.url.scheme}://",
                request=request,
            )
        assert isinstance(request.stream, httpx.AsyncByteStream)
        core_request = httpcore.Request(
            method=request.method,
            url=httpcore.URL(
                scheme=request.url.raw_scheme,
                host=request.url.raw_host,
                port=request.url.port,
                target=request.url.raw_path,
            ),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        )
        with _httpx_errors(request):
            response = await self._pool.handle_async_request(core_request)
        return httpx.Response(
            status_code=response.status,
            headers=response.headers,
            stream=_ResponseStream(response.stream, request),
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        """Close every pooled stream."""
        await self._pool.aclose()

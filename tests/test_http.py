"""HTTP over Serval: httpx through AsyncServalTransport, ASGI apps served by serve_asgi.

In process: a server Host and a client Host on loopback UDP, the application of
``tests/helpers/http_app.py``. Across processes: a router and two ``pyserval serve-asgi``
replicas, load balancing and a replica's SIGKILL. Bodies are checked by SHA-256 of content
the test generates itself; backpressure by how much the far side produced while this side
was not reading.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import anyio
import pytest

pytest.importorskip("httpx")
pytest.importorskip("httpcore")
pytest.importorskip("h11")

# Imported again by name (present, or the module was skipped above) so mypy knows them.
import httpcore
import httpx

import pyserval
from pyserval.http import AsyncServalTransport, resolve_serval_host, serve_asgi
from pyserval.runtime.host import parse_address

from .helpers import http_app
from .helpers.processes import Peer

pytestmark = pytest.mark.timeout(90)

STARTUP = 20.0
MiB = 1024 * 1024


async def with_server(
    body: Callable[[httpx.AsyncClient, pyserval.Host], Awaitable[None]],
    **transport: Any,
) -> None:
    """Serve the test app on service ``web`` of one host; run ``body`` with a client."""
    server = pyserval.Host(["127.0.0.1:0"])
    async with server:
        ready = asyncio.Event()
        task = asyncio.create_task(serve_asgi(http_app.app, server, "web", ready=ready.set))
        try:
            await asyncio.wait_for(ready.wait(), 10)
            route = "{}:{}".format(*server.addresses[0])
            client = pyserval.Host(["127.0.0.1:0"], routes={"web": route})
            async with client:
                t = AsyncServalTransport(client, **transport)
                async with httpx.AsyncClient(transport=t, timeout=20) as http:
                    await body(http, client)
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task


def run(body: Callable[[httpx.AsyncClient, pyserval.Host], Awaitable[None]], **kw: Any) -> None:
    asyncio.run(with_server(body, **kw))


# -- in process -------------------------------------------------------------------------------


def test_get_reaches_the_service_named_in_the_host() -> None:
    async def body(http: httpx.AsyncClient, _: pyserval.Host) -> None:
        r = await http.get("http://web.serval/whoami?x=1&y=%20")
        assert r.status_code == 200
        assert r.headers["content-type"] == "application/json"
        data = r.json()
        assert data["pid"] == os.getpid() and data["query"] == "x=1&y=%20"
        assert r.http_version == "HTTP/1.1"
        missing = await http.get("http://web.serval/nothing-here")
        assert missing.status_code == 404

    run(body)


def test_keep_alive_reuses_one_stream_and_zero_keepalive_opens_one_per_request() -> None:
    async def reuse(http: httpx.AsyncClient, _: pyserval.Host) -> None:
        flows = {(await http.get("http://web.serval/whoami")).json()["flowid"] for _ in range(3)}
        assert len(flows) == 1

    async def fresh(http: httpx.AsyncClient, _: pyserval.Host) -> None:
        flows = {(await http.get("http://web.serval/whoami")).json()["flowid"] for _ in range(3)}
        assert len(flows) == 3

    run(reuse)
    run(fresh, max_keepalive_connections=0)


def test_application_error_is_a_500_and_the_server_keeps_serving() -> None:
    async def body(http: httpx.AsyncClient, _: pyserval.Host) -> None:
        r = await http.get("http://web.serval/boom")
        assert r.status_code == 500 and r.text == "Internal Server Error"
        # half a response: the stream is reset, never ended as if the body were complete
        with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
            await http.get("http://web.serval/halfboom")
        assert (await http.get("http://web.serval/whoami")).status_code == 200

    run(body)


def test_lifespan_startup_runs_before_requests_and_its_state_reaches_them() -> None:
    async def body(http: httpx.AsyncClient, _: pyserval.Host) -> None:
        assert (await http.get("http://web.serval/state")).json() == {"started_by": "lifespan"}

    run(body)


def test_a_failed_lifespan_startup_raises_and_never_listens() -> None:
    async def refusing(scope: Any, receive: Any, send: Any) -> None:
        assert scope["type"] == "lifespan"
        await receive()
        await send({"type": "lifespan.startup.failed", "message": "no database"})

    async def plain(scope: Any, receive: Any, send: Any) -> None:  # no lifespan support
        if scope["type"] != "http":
            raise ValueError("only http")
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def main() -> None:
        host = pyserval.Host(["127.0.0.1:0"])
        async with host:
            with pytest.raises(pyserval.http.LifespanError, match="no database"):
                await asyncio.wait_for(serve_asgi(refusing, host, "web"), 10)
            assert host.core is not None and not host.core.listeners
            ready = asyncio.Event()
            task = asyncio.create_task(serve_asgi(plain, host, "web2", ready=ready.set))
            await asyncio.wait_for(ready.wait(), 10)
            route = "{}:{}".format(*host.addresses[0])
            async with pyserval.Host(["127.0.0.1:0"], routes={"web2": route}) as client:
                transport = AsyncServalTransport(client)
                async with httpx.AsyncClient(transport=transport) as http:
                    assert (await http.get("http://web2.serval/")).status_code == 204
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(main())


def test_head_gets_the_headers_without_a_body() -> None:
    async def body(http: httpx.AsyncClient, _: pyserval.Host) -> None:
        r = await http.head("http://web.serval/whoami")
        assert r.status_code == 200 and r.content == b""
        assert int(r.headers["content-length"]) > 0  # what a GET would have carried
        assert (await http.get("http://web.serval/whoami")).status_code == 200

    run(body)


def test_names_that_are_not_serval_services_and_https_are_refused() -> None:
    assert resolve_serval_host("Echo.Serval.", 80) == "echo"
    for name in ("example.com", "127.0.0.1", ".serval"):
        with pytest.raises(httpcore.ConnectError, match="not a Serval"):
            resolve_serval_host(name, 80)

    async def body(http: httpx.AsyncClient, _: pyserval.Host) -> None:
        with pytest.raises(httpx.ConnectError, match="not a Serval service name"):
            await http.get("http://127.0.0.1/")
        with pytest.raises(httpx.UnsupportedProtocol):
            await http.get("https://web.serval/")
        with pytest.raises(httpx.ConnectError):
            await http.get("http://nobody-serves-this.serval/", timeout=5)

    run(body)


def test_malformed_requests_get_h11s_error_status_and_the_listener_lives() -> None:
    async def raw(client: pyserval.Host, request: bytes) -> bytes:
        stream = await client.connect("web", timeout=10)
        await stream.send(request)
        got = b""
        with contextlib.suppress(Exception):
            async with asyncio.timeout(10):
                while True:
                    got += await stream.receive()
        await stream.aclose()
        return got

    async def body(http: httpx.AsyncClient, client: pyserval.Host) -> None:
        garbage = await raw(client, b"NOT HTTP AT ALL\r\n\r\n")
        assert garbage.startswith(b"HTTP/1.1 400 "), garbage
        huge = await raw(client, b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n")
        assert huge.startswith(b"HTTP/1.1 431 "), huge  # headers past 64 KiB
        assert (await http.get("http://web.serval/whoami")).status_code == 200

    run(body)


def test_idle_connections_are_closed_after_the_head_timeout() -> None:
    async def main() -> float:
        server = pyserval.Host(["127.0.0.1:0"])
        async with server:
            ready = asyncio.Event()
            asgi = pyserval.http.AsgiServer(http_app.app, head_timeout=0.3)
            task = asyncio.create_task(
                serve_asgi(http_app.app, server, "web", ready=ready.set, server=asgi)
            )
            await asyncio.wait_for(ready.wait(), 10)
            route = "{}:{}".format(*server.addresses[0])
            async with pyserval.Host(["127.0.0.1:0"], routes={"web": route}) as client:
                stream = await client.connect("web", timeout=10)
                started = time.monotonic()
                await stream.send(b"GET / HTTP/1.1\r\n")  # and never the rest of the head
                async with asyncio.timeout(10):
                    with pytest.raises(anyio.EndOfStream):
                        await stream.receive()
                waited = time.monotonic() - started
                await stream.aclose()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return waited

    waited = asyncio.run(main())
    assert 0.25 < waited < 5


def test_streamed_download_is_paced_by_the_reader_and_arrives_intact() -> None:
    size = 32 * MiB
    expected = hashlib.sha256(b"".join(http_app.pattern(i) for i in range(size // 65536)))

    async def body(http: httpx.AsyncClient, _: pyserval.Host) -> None:
        http_app.probe.produced = 0
        digest, got = hashlib.sha256(), 0
        async with http.stream("GET", f"http://web.serval/download?n={size}") as r:
            chunks = r.aiter_raw()
            first = await chunks.__anext__()
            digest.update(first)
            got += len(first)
            await asyncio.sleep(0.5)  # not reading: the application must stall
            stalled_at = http_app.probe.produced
            await asyncio.sleep(0.3)
            assert http_app.probe.produced == stalled_at
            async for chunk in chunks:
                digest.update(chunk)
                got += len(chunk)
        # send and receive buffers (1 MiB each by default) and a read or two in flight
        assert stalled_at < 4 * MiB, f"the app produced {stalled_at} bytes ahead of the reader"
        assert got == size and digest.hexdigest() == expected.hexdigest()

    run(body)


def test_streamed_upload_is_paced_by_the_application_and_arrives_intact() -> None:
    size = 32 * MiB
    produced = 0

    def chunk(i: int) -> bytes:
        return hashlib.sha256(b"up" + i.to_bytes(4, "big")).digest() * 2048

    expected = hashlib.sha256(b"".join(chunk(i) for i in range(size // 65536))).hexdigest()

    async def upload() -> AsyncIterator[bytes]:
        nonlocal produced
        for i in range(size // 65536):
            data = chunk(i)
            produced += len(data)
            yield data

    async def body(http: httpx.AsyncClient, _: pyserval.Host) -> None:
        http_app.probe.upload_started = asyncio.Event()
        release = http_app.probe.release_upload = asyncio.Event()
        try:
            request = asyncio.create_task(http.post("http://web.serval/sha256", content=upload()))
            await asyncio.wait_for(http_app.probe.upload_started.wait(), 10)
            await asyncio.sleep(0.5)  # the application holds its first chunk
            stalled_at = produced
            await asyncio.sleep(0.3)
            assert produced == stalled_at
            assert stalled_at < 4 * MiB, f"the client produced {stalled_at} bytes unread"
            release.set()
            r = await request
        finally:
            http_app.probe.release_upload = None
        assert r.json() == {"bytes": size, "sha256": expected}

    run(body)


# -- across processes: a router, two replicas -------------------------------------------------


class Replicas:
    """A router and ``pyserval serve-asgi`` replicas as child processes."""

    def __init__(self) -> None:
        self.peers: list[Peer] = []

    def router(self) -> Peer:
        peer = Peer(["-m", "pyserval", "router", "--listen", "127.0.0.1:0"])
        self.peers.append(peer)
        line = peer.wait_for(r"^router listening on ", STARTUP)
        peer.address = parse_address(line.rsplit(" ", 1)[1])
        return peer

    def replica(self, router: Peer, name: str) -> Peer:
        from .helpers.processes import child_env

        argv = ["-m", "pyserval", "serve-asgi", "tests.helpers.http_app:app"]
        argv += ["--service", "web", "--router", router.route]
        peer = Peer(argv, env=child_env(HTTP_APP_REPLICA=name))
        self.peers.append(peer)
        line = peer.wait_for(r"^serving .* on service web at ", STARTUP)
        peer.address = parse_address(line.rsplit(" at ", 1)[1])
        return peer

    def close(self) -> None:
        """SIGTERM what still runs (replicas first); fail if one exits badly on it."""
        terminated = []
        for peer in reversed(self.peers):
            if peer.proc.poll() is None:
                peer.proc.send_signal(signal.SIGTERM)
                terminated.append(peer)
        for peer in self.peers:
            with contextlib.suppress(subprocess.TimeoutExpired):
                peer.proc.wait(5)
            peer.__exit__(None, None, None)
        for peer in terminated:
            assert peer.proc.returncode == 0 and "Traceback" not in peer.stderr, (
                f"{peer.argv[1:5]} exited {peer.proc.returncode} on SIGTERM:\n{peer.stderr}"
            )


@pytest.fixture
def replicas() -> Iterator[Replicas]:
    cluster = Replicas()
    try:
        yield cluster
    finally:
        cluster.close()


async def fetch_with_retries(
    http: httpx.AsyncClient, url: str, tries: int = 5
) -> tuple[httpx.Response, int]:
    """GET ``url``, retrying on transport errors; the response and how many tries failed."""
    failures = 0
    while True:
        try:
            r = await http.get(url)
            r.raise_for_status()
            return r, failures
        except (httpx.TransportError, httpx.HTTPStatusError):
            failures += 1
            if failures >= tries:
                raise
            await asyncio.sleep(0.1)


async def wait_until_both_serve(http: httpx.AsyncClient, timeout: float = 15.0) -> None:
    """The router knows both replicas once requests reach both (registrations race startup)."""
    seen: set[str] = set()
    deadline = time.monotonic() + timeout
    while seen != {"a", "b"}:
        assert time.monotonic() < deadline, f"only {seen} answered within {timeout} s"
        r, _ = await fetch_with_retries(http, "http://web.serval/whoami")
        seen.add(r.json()["replica"])


def test_requests_are_load_balanced_and_survive_a_replica_sigkill(
    replicas: Replicas, capsys: pytest.CaptureFixture[str]
) -> None:
    router = replicas.router()
    a = replicas.replica(router, "a")
    replicas.replica(router, "b")

    async def main() -> tuple[Counter[str], Counter[str], int, float]:
        host = pyserval.Host(["127.0.0.1:0"], router=router.route)
        async with host:
            # a new stream, so a new late binding at the router, for every request
            transport = AsyncServalTransport(host, max_keepalive_connections=0, retries=2)
            async with httpx.AsyncClient(transport=transport, timeout=10) as http:
                await wait_until_both_serve(http)
                before: Counter[str] = Counter()
                for _ in range(40):
                    r, _ = await fetch_with_retries(http, "http://web.serval/whoami")
                    before[r.json()["replica"]] += 1
                a.proc.send_signal(signal.SIGKILL)
                a.proc.wait(5)
                after: Counter[str] = Counter()
                failures, slowest = 0, 0.0
                for _ in range(40):
                    started = time.monotonic()
                    r, failed = await fetch_with_retries(http, "http://web.serval/whoami")
                    slowest = max(slowest, time.monotonic() - started)
                    failures += failed
                    after[r.json()["replica"]] += 1
                return before, after, failures, slowest

    before, after, failures, slowest = asyncio.run(main())
    with capsys.disabled():
        print(
            f"\nbefore the kill {dict(before)}, after {dict(after)}, "
            f"failed tries {failures}, slowest request after it {slowest:.2f} s"
        )
    assert before["a"] >= 5 and before["b"] >= 5, before  # equal weights: about 20 each
    assert after == Counter(b=40), after
    assert failures <= 3, f"{failures} failed tries after the kill"


def test_large_upload_and_download_through_a_router_by_sha256(replicas: Replicas) -> None:
    router = replicas.router()
    replicas.replica(router, "a")
    size = 8 * MiB
    payload = b"".join(hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(size // 32))
    expected_download = hashlib.sha256(
        b"".join(http_app.pattern(i) for i in range(size // 65536))
    ).hexdigest()

    async def main() -> None:
        host = pyserval.Host(["127.0.0.1:0"], router=router.route)
        async with host:
            transport = AsyncServalTransport(host, retries=2)
            async with httpx.AsyncClient(transport=transport, timeout=20) as http:
                r = await http.post("http://web.serval/sha256", content=payload)
                assert r.json() == {"bytes": size, "sha256": hashlib.sha256(payload).hexdigest()}
                digest = hashlib.sha256()
                async with http.stream("GET", f"http://web.serval/download?n={size}") as resp:
                    async for chunk in resp.aiter_bytes():
                        digest.update(chunk)
                assert digest.hexdigest() == expected_download

    asyncio.run(main())

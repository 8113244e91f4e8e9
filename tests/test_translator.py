"""The translator in one process: asyncio TCP peers and pyserval hosts on loopback.

Inbound (TCP client -> translator -> Serval service), outbound (Serval client -> translator
-> TCP server) and the full chain: bytes arrive exactly (SHA-256 over megabytes, both ways at
once), a stalled reader on either side stalls the sender and the translator's buffers stay
within what was configured, a half-close crosses in both directions, a reset crosses in both
directions, the connection limit refuses clearly, and every connection is logged when it
opens and when it closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import pytest

from pyserval import Router
from pyserval.runtime.host import Host
from pyserval.runtime.streams import ServalStream
from pyserval.sal.inet import Address
from pyserval.translator import (
    ServiceEndpoint,
    TcpEndpoint,
    Translator,
    parse_endpoint,
)
from pyserval.transport.config import StreamConfig

pytestmark = pytest.mark.timeout(60)

ServalHandler = Callable[[ServalStream], Awaitable[None]]
TcpHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

MB = 1 << 20
STEP = 5.0  # seconds any single step may take before the test fails


def text(address: Address) -> str:
    return f"{address[0]}:{address[1]}"


def sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def check_clean(*hosts: Host) -> None:
    """No host's core hit an internal error."""
    for host in hosts:
        assert host.core is not None and host.core.internal_errors == []


@contextlib.asynccontextmanager
async def serval_service(
    handler: ServalHandler, name: str = "svc", **kw: Any
) -> AsyncIterator[Host]:
    """A pyserval host serving ``name`` with ``handler`` (one task per stream)."""
    host = Host(["127.0.0.1:0"], **kw)
    async with host:
        listener = await host.listen(name)

        async def run(stream: ServalStream) -> None:
            try:
                await handler(stream)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass  # a reset: the tests that expect one check for it themselves
            finally:
                await stream.aclose()

        async def accept() -> None:
            async with asyncio.TaskGroup() as tg:
                async for stream in listener:
                    tg.create_task(run(stream))

        task = asyncio.ensure_future(accept())
        try:
            yield host
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


@contextlib.asynccontextmanager
async def tcp_server(handler: TcpHandler) -> AsyncIterator[Address]:
    """An asyncio TCP server on loopback; yields its address."""
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    async with server:
        yield server.sockets[0].getsockname()[:2]


async def read_all(reader: asyncio.StreamReader) -> bytes:
    out = bytearray()
    while chunk := await reader.read(1 << 18):
        out += chunk
    return bytes(out)


async def receive_all(stream: ServalStream) -> bytes:
    out = bytearray()
    with contextlib.suppress(anyio.EndOfStream):
        while True:
            out += await stream.receive(1 << 18)
    return bytes(out)


def rst_close(writer: asyncio.StreamWriter) -> None:
    """Close a TCP connection with a RST (SO_LINGER 0)."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def inbound(service_host: Host, **kw: Any) -> Translator:
    """An inbound translator with a static route to ``service_host``."""
    routes = {"svc": text(service_host.addresses[0])}
    return Translator("tcp:127.0.0.1:0", "service:svc", routes=routes, **kw)


def outbound(address: Address, **kw: Any) -> Translator:
    return Translator("service:svc", f"tcp:{text(address)}", **kw)


async def wait_until(ok: Callable[[], bool], timeout: float = STEP) -> None:
    """Poll ``ok()`` every 10 ms; fail after ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        while not ok():
            await asyncio.sleep(0.01)


async def serval_client(translator: Translator) -> Host:
    host = Host(["127.0.0.1:0"], routes={"svc": text(translator.serval_addresses[0])})
    return await host.start()


# -- parsing ---------------------------------------------------------------------------------------


def test_endpoints_parse_and_direction_is_checked() -> None:
    assert parse_endpoint("tcp:127.0.0.1:80") == TcpEndpoint("127.0.0.1", 80)
    assert parse_endpoint("tcp:[::1]:8080") == TcpEndpoint("::1", 8080)
    assert str(parse_endpoint("tcp:[::1]:8080")) == "tcp:[::1]:8080"
    assert parse_endpoint("service:web") == ServiceEndpoint("web")
    for bad in ("tcp:80", "tcp:host:99999", "udp:1.2.3.4:5", "service:", "web"):
        with pytest.raises(ValueError, match="tcp:HOST:PORT or service:NAME"):
            parse_endpoint(bad)
    with pytest.raises(ValueError, match=r"not tcp:127\.0\.0\.1:1 -> tcp:127\.0\.0\.1:2"):
        Translator("tcp:127.0.0.1:1", "tcp:127.0.0.1:2")
    with pytest.raises(ValueError):
        Translator("service:a", "service:b")
    assert Translator("tcp:127.0.0.1:0", "service:x").direction == "inbound"
    assert Translator("service:x", "tcp:127.0.0.1:1").direction == "outbound"


# -- byte-exact, both ways at once -----------------------------------------------------------------


def test_inbound_relays_megabytes_exactly_both_ways() -> None:
    up, down = os.urandom(6 * MB), os.urandom(5 * MB)
    got: dict[str, bytes] = {}

    async def service(stream: ServalStream) -> None:
        async def receive() -> None:
            got["up"] = await receive_all(stream)

        async with asyncio.TaskGroup() as tg:
            tg.create_task(receive())
            await stream.send(down)
            await stream.send_eof()

    async def main() -> None:
        async with serval_service(service) as svc, inbound(svc) as tr:
            assert tr.tcp_address is not None
            reader, writer = await asyncio.open_connection(*tr.tcp_address)

            async def send() -> None:
                writer.write(up)
                await writer.drain()
                writer.write_eof()

            async with asyncio.timeout(30):
                _, got["down"] = await asyncio.gather(send(), read_all(reader))
            writer.close()
            await wait_until(lambda: tr.active == 0)
            assert tr.stats.closed == 1 and tr.stats.reset == 0
            assert (tr.stats.tcp_to_serval, tr.stats.serval_to_tcp) == (len(up), len(down))
            check_clean(svc, tr.host)

    asyncio.run(main())
    assert sha(got["up"]) == sha(up) and sha(got["down"]) == sha(down)


def test_outbound_relays_megabytes_exactly_both_ways() -> None:
    up, down = os.urandom(5 * MB), os.urandom(6 * MB)
    got: dict[str, bytes] = {}

    async def server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def send() -> None:
            writer.write(down)
            await writer.drain()
            writer.write_eof()

        _, got["up"] = await asyncio.gather(send(), read_all(reader))
        writer.close()

    async def main() -> None:
        async with tcp_server(server) as address, outbound(address) as tr:
            client = await serval_client(tr)
            try:
                stream = await client.connect("svc", timeout=STEP)

                async def send() -> None:
                    await stream.send(up)
                    await stream.send_eof()

                async with asyncio.timeout(30):
                    _, got["down"] = await asyncio.gather(send(), receive_all(stream))
                await stream.aclose()
                await wait_until(lambda: tr.active == 0)
                assert tr.stats.closed == 1
                check_clean(client, tr.host)
            finally:
                await client.close()

    asyncio.run(main())
    assert sha(got["up"]) == sha(up) and sha(got["down"]) == sha(down)


def test_chain_tcp_to_tcp_through_a_router_is_byte_exact() -> None:
    """TCP client -> inbound -> (router resolves the SYN) -> outbound -> TCP server."""
    up, down = os.urandom(4 * MB), os.urandom(4 * MB)
    got: dict[str, bytes] = {}

    async def server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got["up"] = await read_all(reader)  # the request in full (the client half-closed)
        writer.write(down)
        await writer.drain()
        writer.close()

    async def main() -> None:
        async with (
            Router("127.0.0.1:0") as router,
            tcp_server(server) as address,
            outbound(address, router=router.address_text) as out,
            Translator("tcp:127.0.0.1:0", "service:svc", router=router.address_text) as inb,
        ):
            await wait_until(lambda: len(router.registry) == 1)
            assert inb.tcp_address is not None
            reader, writer = await asyncio.open_connection(*inb.tcp_address)
            writer.write(up)
            writer.write_eof()
            async with asyncio.timeout(30):
                got["down"] = await read_all(reader)
            writer.close()
            await wait_until(lambda: inb.active == 0 and out.active == 0)
            assert inb.stats.closed == out.stats.closed == 1
            check_clean(inb.host, out.host)

    asyncio.run(main())
    assert sha(got["up"]) == sha(up) and sha(got["down"]) == sha(down)


# -- backpressure ----------------------------------------------------------------------------------

SMALL = StreamConfig(send_buffer=256 * 1024, receive_buffer=256 * 1024)
CHUNK = 64 * 1024
# What the translator may hold for one connection with SMALL and CHUNK: its Serval stream's
# send and receive buffers, and on the TCP side a read buffer of CHUNK plus one kernel read
# (256 KiB at most) and a write buffer of CHUNK plus one chunk written past it.
BOUND = SMALL.send_buffer + SMALL.receive_buffer + 4 * CHUNK + 256 * 1024


def test_a_tcp_client_that_stops_reading_stalls_the_serval_sender() -> None:
    total = 24 * MB
    sent = [0]
    block = os.urandom(CHUNK)

    async def service(stream: ServalStream) -> None:
        while sent[0] < total:
            await stream.send(block)
            sent[0] += len(block)
        await stream.send_eof()

    async def main() -> None:
        async with (
            serval_service(service) as svc,
            inbound(svc, stream_config=SMALL, chunk=CHUNK) as tr,
        ):
            assert tr.tcp_address is not None
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            sock.connect(tr.tcp_address)
            sock.setblocking(False)
            reader, writer = await asyncio.open_connection(sock=sock)
            # The client reads nothing: the service's sends must stop.
            await wait_until(lambda: sent[0] > 0)
            stalled = sent[0]
            for _ in range(50):  # stalled: no progress for 0.3 s
                await asyncio.sleep(0.3)
                if sent[0] == stalled:
                    break
                stalled = sent[0]
            assert sent[0] == stalled < total / 2, (sent[0], total)
            held = tr.buffered
            print(f"\nservice stalled after {stalled} B; translator holds {held} B (<= {BOUND})")
            assert 0 < held <= BOUND
            # Reading again lets everything through, exactly.
            async with asyncio.timeout(30):
                data = await read_all(reader)
            assert len(data) == total and data == block * (total // len(block))
            # The client's FIN still crosses (its read side waited all along, unwoken by
            # the write side's waits), and the relay ends cleanly.
            writer.write_eof()
            await wait_until(lambda: tr.active == 0)
            assert tr.stats.closed == 1 and tr.stats.reset == 0
            writer.close()

    asyncio.run(main())


def test_a_serval_service_that_stops_reading_stalls_the_tcp_client() -> None:
    total = 24 * MB
    go = asyncio.Event()
    got: dict[str, bytes] = {}
    data = os.urandom(total)

    async def service(stream: ServalStream) -> None:
        await go.wait()  # read nothing until told
        got["up"] = await receive_all(stream)

    async def main() -> None:
        async with (
            serval_service(service) as svc,
            inbound(svc, stream_config=SMALL, chunk=CHUNK) as tr,
        ):
            assert tr.tcp_address is not None
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
            sock.connect(tr.tcp_address)
            sock.setblocking(False)
            written = 0
            loop = asyncio.get_running_loop()
            view = memoryview(data)
            idle = 0
            # Non-blocking sends until the socket takes nothing for 0.3 s.
            while idle < 30:
                try:
                    n = sock.send(view[written : written + CHUNK])
                    written += n
                    idle = 0
                except BlockingIOError:
                    idle += 1
                    await asyncio.sleep(0.01)
            assert written < total / 2, written
            held = tr.buffered
            print(f"\nclient stalled after {written} B; translator holds {held} B (<= {BOUND})")
            assert 0 < held <= BOUND
            go.set()
            async with asyncio.timeout(30):
                await loop.sock_sendall(sock, view[written:])
                sock.shutdown(socket.SHUT_WR)
                await wait_until(lambda: "up" in got, 30)
            await wait_until(lambda: tr.stats.closed == 1)
            sock.close()

    asyncio.run(main())
    assert sha(got["up"]) == sha(data)


# -- half-close ------------------------------------------------------------------------------------


def test_half_close_crosses_inbound_both_ways() -> None:
    """Client FIN -> Serval end of stream (the service then answers); and the service's end
    of stream -> client FIN while the client still sends."""
    request = os.urandom(300_000)

    async def service(stream: ServalStream) -> None:
        first = await receive_all(stream)  # to the client's FIN
        if first == b"":  # second connection: we finish first, then read
            await stream.send(b"bye early")
            await stream.send_eof()
            late = b""
            with contextlib.suppress(anyio.EndOfStream):
                while True:
                    late += await stream.receive()
            return
        await stream.send(sha(first) + b" reply after your FIN")
        await stream.send_eof()

    async def main() -> None:
        async with serval_service(service) as svc, inbound(svc) as tr:
            assert tr.tcp_address is not None
            reader, writer = await asyncio.open_connection(*tr.tcp_address)
            writer.write(request)
            writer.write_eof()
            async with asyncio.timeout(STEP):
                reply = await read_all(reader)
            assert reply == sha(request) + b" reply after your FIN"
            writer.close()
            await wait_until(lambda: tr.stats.closed == 1)

    asyncio.run(main())


def test_half_close_crosses_outbound_and_service_fin_reaches_the_tcp_client() -> None:
    request = os.urandom(300_000)

    async def server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        body = await read_all(reader)  # until the FIN carried across from Serval
        writer.write(sha(body))
        writer.write_eof()  # ... and ours goes back as Serval end of stream
        await writer.drain()
        writer.close()

    async def main() -> None:
        async with tcp_server(server) as address, outbound(address) as tr:
            client = await serval_client(tr)
            try:
                stream = await client.connect("svc", timeout=STEP)
                await stream.send(request)
                await stream.send_eof()
                async with asyncio.timeout(STEP):
                    assert await receive_all(stream) == sha(request)
                await stream.aclose()
                await wait_until(lambda: tr.stats.closed == 1)
            finally:
                await client.close()

    asyncio.run(main())


def test_a_service_that_finishes_first_still_hears_the_client() -> None:
    """The Serval side half-closes first: the TCP client reads EOF, then still sends."""
    heard: list[bytes] = []

    async def service(stream: ServalStream) -> None:
        await stream.send(b"greeting, then my FIN")
        await stream.send_eof()
        heard.append(await receive_all(stream))

    async def main() -> None:
        async with serval_service(service) as svc, inbound(svc) as tr:
            assert tr.tcp_address is not None
            reader, writer = await asyncio.open_connection(*tr.tcp_address)
            async with asyncio.timeout(STEP):
                assert await read_all(reader) == b"greeting, then my FIN"
                writer.write(b"sent after your FIN")
                writer.write_eof()
                await wait_until(lambda: bool(heard))
            assert heard == [b"sent after your FIN"]
            writer.close()

    asyncio.run(main())


# -- resets ----------------------------------------------------------------------------------------


def test_resets_cross_inbound_both_ways(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pyserval.translator")
    outcomes: list[str] = []

    async def service(stream: ServalStream) -> None:
        first = await stream.receive()
        if first == b"abort please":
            await stream.abort()
            return
        try:
            while True:
                await stream.receive()
        except anyio.BrokenResourceError as exc:
            outcomes.append(f"service saw reset: {exc}")
        except anyio.EndOfStream:
            outcomes.append("service saw a clean end")

    async def main() -> None:
        async with serval_service(service) as svc, inbound(svc) as tr:
            assert tr.tcp_address is not None
            # TCP RST -> Serval reset.
            reader, writer = await asyncio.open_connection(*tr.tcp_address)
            writer.write(b"hello")
            await wait_until(lambda: tr.stats.accepted == 1 and tr.active == 1)
            await asyncio.sleep(0.05)
            rst_close(writer)
            await wait_until(lambda: bool(outcomes))
            assert outcomes[0].startswith("service saw reset"), outcomes
            # Serval reset -> TCP RST (not a FIN that would look like a complete reply).
            reader, writer = await asyncio.open_connection(*tr.tcp_address)
            writer.write(b"abort please")
            with pytest.raises(ConnectionResetError):
                async with asyncio.timeout(STEP):
                    await reader.read()
            writer.close()
            await wait_until(lambda: tr.stats.reset == 2)

    asyncio.run(main())
    ends = [r.getMessage() for r in caplog.records if " close after " in r.getMessage()]
    assert any("ended: tcp reset by peer" in line for line in ends), ends
    assert any("ended: serval connection lost: reset by peer" in line for line in ends), ends


def test_resets_cross_outbound_both_ways() -> None:
    seen: list[str] = []

    async def server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first = await reader.read(100)
        if first == b"reset me":
            rst_close(writer)
            return
        try:
            while await reader.read(1000):
                pass
            seen.append("server saw a clean end")
        except ConnectionResetError:
            seen.append("server saw reset")

    async def main() -> None:
        async with tcp_server(server) as address, outbound(address) as tr:
            client = await serval_client(tr)
            try:
                # TCP RST -> Serval reset.
                stream = await client.connect("svc", timeout=STEP)
                await stream.send(b"reset me")
                with pytest.raises(anyio.BrokenResourceError):
                    async with asyncio.timeout(STEP):
                        await stream.receive()
                # Serval reset -> TCP RST.
                stream = await client.connect("svc", timeout=STEP)
                await stream.send(b"hello")
                await wait_until(lambda: tr.active == 1)
                await asyncio.sleep(0.05)
                await stream.abort()
                await wait_until(lambda: bool(seen))
                assert seen == ["server saw reset"]
                await wait_until(lambda: tr.stats.reset == 2)
            finally:
                await client.close()

    asyncio.run(main())


def test_a_reset_is_noticed_while_the_other_side_is_stalled() -> None:
    """A reset crosses at once even when the pumps are blocked on the other side: a TCP RST
    while the Serval peer reads nothing, a Serval reset while the TCP client reads nothing."""
    block = os.urandom(CHUNK)
    streams: list[ServalStream] = []
    abort = asyncio.Event()

    async def service(stream: ServalStream) -> None:
        streams.append(stream)
        if len(streams) == 1:
            await asyncio.sleep(3600)  # reads nothing: the translator's sends block
        with contextlib.suppress(anyio.BrokenResourceError):
            while not abort.is_set():  # the client reads nothing: these block
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.05):
                        await stream.send(block)
        await stream.abort()

    async def main() -> None:
        async with (
            serval_service(service) as svc,
            inbound(svc, stream_config=SMALL, chunk=CHUNK) as tr,
        ):
            assert tr.tcp_address is not None
            loop = asyncio.get_running_loop()
            # 1. The client fills everything up to the stalled service, then resets.
            reader, writer = await asyncio.open_connection(*tr.tcp_address)
            writer.transport.set_write_buffer_limits(high=4 * MB)
            for _ in range(64):
                writer.write(block)
            await wait_until(lambda: tr.buffered >= SMALL.send_buffer)
            await asyncio.sleep(0.2)
            start = loop.time()
            rst_close(writer)
            await wait_until(lambda: tr.stats.reset == 1)
            assert loop.time() - start < 1.0
            await wait_until(lambda: streams[0].connection.closed)
            assert streams[0].connection.error == "reset by peer"
            # 2. The service fills everything up to the client that reads nothing, then
            # resets: the client gets a RST.
            reader, writer = await asyncio.open_connection(*tr.tcp_address)
            transport = writer.transport
            assert isinstance(transport, asyncio.Transport)  # a socket's: it reads too
            transport.pause_reading()
            await wait_until(lambda: len(streams) == 2)
            await wait_until(lambda: tr.buffered >= SMALL.receive_buffer)
            start = loop.time()
            abort.set()
            await wait_until(lambda: tr.stats.reset == 2)
            assert loop.time() - start < 1.0
            transport.resume_reading()
            with pytest.raises(ConnectionResetError):
                async with asyncio.timeout(STEP):
                    await read_all(reader)
            writer.close()

    asyncio.run(main())


def test_closing_the_translator_resets_what_is_still_open() -> None:
    async def service(stream: ServalStream) -> None:
        await receive_all(stream)

    async def main() -> None:
        async with serval_service(service) as svc:
            tr = await inbound(svc).start()
            assert tr.tcp_address is not None
            reader, writer = await asyncio.open_connection(*tr.tcp_address)
            writer.write(b"x")
            await wait_until(lambda: tr.active == 1 and tr.connections[0].relay is not None)
            await tr.close(timeout=0.1)
            with pytest.raises(ConnectionResetError):
                async with asyncio.timeout(STEP):
                    await reader.read()
            writer.close()
            assert tr.stats.reset == 1

    asyncio.run(main())


# -- the connection limit --------------------------------------------------------------------------


def test_inbound_refuses_past_the_limit(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pyserval.translator")

    async def service(stream: ServalStream) -> None:
        await stream.send(await stream.receive())  # one echo, then wait for the end
        await receive_all(stream)

    async def main() -> None:
        async with serval_service(service) as svc, inbound(svc, max_connections=2) as tr:
            assert tr.tcp_address is not None
            held = []
            for i in range(2):
                reader, writer = await asyncio.open_connection(*tr.tcp_address)
                writer.write(b"hi %d" % i)
                assert await asyncio.wait_for(reader.read(10), STEP) == b"hi %d" % i
                held.append((reader, writer))
            reader, writer = await asyncio.open_connection(*tr.tcp_address)
            with pytest.raises(ConnectionResetError):
                async with asyncio.timeout(STEP):
                    await reader.read()
            writer.close()
            assert tr.stats.refused == 1 and tr.active == 2
            # One ends: there is room again.
            held[0][1].write_eof()
            assert await asyncio.wait_for(read_all(held[0][0]), STEP) == b""
            held[0][1].close()
            await wait_until(lambda: tr.active == 1)
            reader, writer = await asyncio.open_connection(*tr.tcp_address)
            writer.write(b"again")
            assert await asyncio.wait_for(reader.read(10), STEP) == b"again"
            for _, w in [*held[1:], (reader, writer)]:
                w.close()

    asyncio.run(main())
    refused = [r for r in caplog.records if " refused: " in r.getMessage()]
    assert len(refused) == 1 and refused[0].levelno == logging.WARNING
    assert "2 connections active (limit 2)" in refused[0].getMessage()


def test_outbound_refuses_past_the_limit() -> None:
    async def server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(1000):
            writer.write(data)
        writer.close()

    async def main() -> None:
        async with tcp_server(server) as address, outbound(address, max_connections=1) as tr:
            client = await serval_client(tr)
            try:
                first = await client.connect("svc", timeout=STEP)
                await first.send(b"one")
                assert await asyncio.wait_for(first.receive(), STEP) == b"one"
                second = await client.connect("svc", timeout=STEP)
                with pytest.raises(anyio.BrokenResourceError):
                    async with asyncio.timeout(STEP):
                        await second.receive()
                assert tr.stats.refused == 1
                await first.aclose()
            finally:
                await client.close()

    asyncio.run(main())


# -- logs ------------------------------------------------------------------------------------------


def test_each_connection_is_logged_at_open_and_close(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pyserval.translator")

    async def service(stream: ServalStream) -> None:
        request = await receive_all(stream)
        await stream.send(b"x" * (2 * len(request)))

    async def main() -> None:
        async with serval_service(service) as svc, inbound(svc) as tr:
            assert tr.tcp_address is not None
            for size in (10, 1000):
                reader, writer = await asyncio.open_connection(*tr.tcp_address)
                writer.write(b"r" * size)
                writer.write_eof()
                assert len(await asyncio.wait_for(read_all(reader), STEP)) == 2 * size
                writer.close()
            await wait_until(lambda: tr.stats.closed == 2)

    asyncio.run(main())
    lines = [r.getMessage() for r in caplog.records if r.name == "pyserval.translator"]
    opens = [line for line in lines if " open: " in line]
    closes = [line for line in lines if " close after " in line]
    assert len(opens) == len(closes) == 2, lines
    assert opens[0].startswith("inbound #1 open: tcp 127.0.0.1:")
    assert "-> service:svc at 127.0.0.1:" in opens[0]
    assert "tcp->serval 10 B, serval->tcp 20 B, ended: closed by both sides" in closes[0]
    assert "tcp->serval 1000 B, serval->tcp 2000 B, ended: closed by both sides" in closes[1]


# -- an unreachable TCP server ---------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_outbound_with_its_server_down_resets_at_once_and_withdraws() -> None:
    """No router: the Serval stream is reset at once. With a router: the translator also
    stops listening (the router drops it) and comes back once the server answers."""
    port = free_port()

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.read(100))
        writer.close()

    async def main() -> None:
        async with Router("127.0.0.1:0") as router:
            r = router.address_text
            async with outbound(("127.0.0.1", port), router=r, probe_interval=0.1) as tr:
                await wait_until(lambda: len(router.registry) == 1)
                client = await Host(["127.0.0.1:0"], router=r).start()
                try:
                    stream = await client.connect("svc", timeout=STEP)
                    loop = asyncio.get_running_loop()
                    start = loop.time()
                    with pytest.raises(anyio.BrokenResourceError):
                        async with asyncio.timeout(STEP):
                            await stream.receive()
                    reset_after = loop.time() - start
                    assert reset_after < 0.5, reset_after
                    await wait_until(lambda: len(router.registry) == 0, 2)
                    assert not tr.listening and tr.stats.withdrawals == 1
                    # The server comes up: the translator listens and registers again.
                    server = await asyncio.start_server(echo, "127.0.0.1", port)
                    async with server:
                        await wait_until(lambda: len(router.registry) == 1, 3)
                        stream = await client.connect("svc", timeout=STEP)
                        await stream.send(b"back")
                        assert await asyncio.wait_for(stream.receive(), STEP) == b"back"
                        await stream.aclose()
                finally:
                    await client.close()

    asyncio.run(main())


def test_a_reset_after_the_clients_fin_reaches_the_service() -> None:
    """After a FIN asyncio stops watching the socket; a RST that follows must still cross."""

    async def main() -> None:
        seen: list[float | None] = []

        async def slow(stream: ServalStream) -> None:
            with contextlib.suppress(anyio.EndOfStream):
                while True:
                    await stream.receive()
            t0 = time.monotonic()
            for _ in range(50):  # a slow service, up to 5 s
                if stream.connection.closed:
                    seen.append(time.monotonic() - t0)
                    return
                await asyncio.sleep(0.1)
            seen.append(None)

        async with serval_service(slow) as svc, inbound(svc) as tr:
            assert tr.tcp_address is not None
            _, w = await asyncio.open_connection(*tr.tcp_address)
            w.write(b"GET / HTTP/1.0\r\n\r\n")
            await w.drain()
            w.write_eof()
            await asyncio.sleep(0.3)
            sock = w.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            w.transport.abort()
            await wait_until(lambda: bool(seen), 5.0)
        assert seen and seen[0] is not None and seen[0] < 2.0

    asyncio.run(main())

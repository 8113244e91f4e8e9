"""``pyserval.install``: the loop's own ``create_connection``/``create_server`` reach Serval
services for ``NAME.serval`` and nothing else changes (real hosts on loopback UDP)."""

from __future__ import annotations

import asyncio
import datetime
import socket
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

import pyserval
from pyserval import Host, ServiceID
from pyserval.runtime.install import service_name
from pyserval.transport.config import StreamConfig

pytestmark = pytest.mark.timeout(60)


@asynccontextmanager
async def pair(
    *services: str, config: StreamConfig | None = None
) -> AsyncIterator[tuple[Host, Host]]:
    """A server host and a client host that routes ``services`` to it."""
    cfg = config or StreamConfig()
    async with (
        Host(["127.0.0.1:0"], stream_config=cfg) as server,
        Host(["127.0.0.1:0"], stream_config=cfg) as client,
    ):
        for name in services:
            client.add_route(name, "{}:{}".format(*server.addresses[0]))
        yield server, client


async def upper(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while line := await reader.readline():
        writer.write(line.upper())
        await writer.drain()
    writer.close()


def test_service_names_are_the_reserved_suffix_only() -> None:
    assert service_name("echo.serval") == "echo"
    assert service_name("echo.serval.") == "echo"  # a fully qualified name
    assert service_name("a.b.SERVAL") == "a.b"
    assert service_name("serval") is None
    assert service_name(".serval") is None
    assert service_name("echo.serval.example") is None
    assert service_name("127.0.0.1") is None
    assert service_name(None) is None
    assert service_name("web.svc", suffix=".svc") == "web"


def test_asyncio_streams_reach_a_service_with_no_changed_line() -> None:
    async def main() -> None:
        async with pair("upper") as (server, client):
            with pyserval.install(server, connect=False), pyserval.install(client, serve=False):
                # Both hosts share this loop: one installation serves, the other connects.
                srv = await asyncio.start_server(upper, "upper.serval", 8080)
                reader, writer = await asyncio.open_connection("upper.serval", 8080)
                writer.write(b"hello\nserval\n")
                await writer.drain()
                assert await reader.readline() == b"HELLO\n"
                assert await reader.readline() == b"SERVAL\n"
                tr = writer.transport
                assert tr.get_extra_info("serviceid") == ServiceID.from_name("upper")
                assert tr.get_extra_info("service") == "upper"
                assert tr.get_extra_info("socket") is None
                peer = tr.get_extra_info("peername")
                assert peer == tuple(server.addresses[0]) and isinstance(peer, tuple)
                assert tr.get_extra_info("sockname") == tuple(client.addresses[0])
                assert tr.get_extra_info("local_flowid") > 0
                assert tr.get_extra_info("remote_flowid") > 0
                writer.write_eof()
                assert await reader.read() == b""
                writer.close()
                await writer.wait_closed()
                srv.close()
                await srv.wait_closed()

    asyncio.run(main())


def test_other_names_go_to_the_loop_and_uninstall_restores_it() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        own = loop.create_connection
        async with pair("upper") as (_server, client):
            tcp = await asyncio.start_server(upper, "127.0.0.1", 0)
            port = tcp.sockets[0].getsockname()[1]
            async with pyserval.install(client) as inst:
                assert inst.installed
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"tcp\n")
                assert await reader.readline() == b"TCP\n"
                assert writer.transport.get_extra_info("socket") is not None  # real TCP
                writer.close()
                # A caller's own socket goes to the loop too, whatever the name.
                with socket.create_connection(("127.0.0.1", port)) as sock:
                    sock.setblocking(False)
                    r2, w2 = await asyncio.open_connection(sock=sock)
                    w2.write(b"sock\n")
                    assert await r2.readline() == b"SOCK\n"
                    w2.close()
                with pytest.raises(ValueError, match="local_addr"):
                    await asyncio.open_connection("upper.serval", 0, local_addr=("127.0.0.1", 0))
                with pytest.raises(ValueError, match="mix"):
                    await asyncio.start_server(upper, ["upper.serval", "127.0.0.1"], 0)
            assert not inst.installed
            assert loop.create_connection == own
            assert "create_connection" not in vars(loop)
            with pytest.raises(OSError):  # the name is a DNS name again: it does not resolve
                await asyncio.open_connection("upper.serval", 80)
            tcp.close()

    asyncio.run(main())


def test_connect_to_a_missing_service_is_an_oserror() -> None:
    async def main() -> None:
        async with pair() as (_server, client):
            with pyserval.install(client), pytest.raises(ConnectionError, match="no route"):
                await asyncio.open_connection("nobody.serval", 1)

    asyncio.run(main())


def test_drain_waits_for_the_peer_and_pause_writing_is_called() -> None:
    async def main() -> None:
        cfg = StreamConfig(send_buffer=64 * 1024, receive_buffer=64 * 1024)
        async with pair("sink", config=cfg) as (server, client):
            transports: asyncio.Queue[asyncio.Transport] = asyncio.Queue()
            received = bytearray()
            ended = asyncio.Event()

            class Sink(asyncio.Protocol):
                def connection_made(self, transport: asyncio.BaseTransport) -> None:
                    assert isinstance(transport, asyncio.Transport)
                    transport.pause_reading()  # hold the window shut from the start
                    transports.put_nowait(transport)

                def data_received(self, data: bytes) -> None:
                    received.extend(data)

                def eof_received(self) -> bool:
                    ended.set()
                    return False

            events: list[str] = []

            class Source(asyncio.Protocol):
                def pause_writing(self) -> None:
                    events.append("pause")

                def resume_writing(self) -> None:
                    events.append("resume")

            loop = asyncio.get_running_loop()
            with pyserval.install(server, connect=False), pyserval.install(client, serve=False):
                srv = await loop.create_server(Sink, "sink.serval", 0)
                transport, _ = await loop.create_connection(Source, "sink.serval", 0)
                far = await transports.get()
                data = bytes(range(256)) * 4096  # 1 MiB
                transport.write(data)
                transport.write_eof()
                assert events == ["pause"]
                await asyncio.sleep(0.5)
                # Nothing read: at most the two buffers and the window left the sender.
                assert transport.get_write_buffer_size() >= len(data) - 3 * 64 * 1024
                assert events == ["pause"] and not received
                far.resume_reading()
                async with asyncio.timeout(20):
                    await ended.wait()
                assert bytes(received) == data
                assert events == ["pause", "resume"]
                srv.close()

    asyncio.run(main())


def _certificate(tmp: Path, name: str) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_tls_runs_on_top_and_checks_the_service_name(tmp_path: Path) -> None:
    cert, key = _certificate(tmp_path, "upper.serval")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(cert))

    async def main() -> None:
        async with pair("upper", "other") as (server, client):
            with pyserval.install(server, connect=False), pyserval.install(client, serve=False):
                srv = await asyncio.start_server(
                    upper, ["upper.serval", "other.serval"], 443, ssl=server_ctx
                )
                reader, writer = await asyncio.open_connection("upper.serval", 443, ssl=client_ctx)
                writer.write(b"secret\n")
                await writer.drain()
                assert await reader.readline() == b"SECRET\n"
                peercert = writer.get_extra_info("peercert")
                assert ("DNS", "upper.serval") in peercert["subjectAltName"]
                writer.close()
                # The same certificate does not name "other": the client refuses it.
                with pytest.raises(ssl.SSLCertVerificationError):
                    await asyncio.open_connection("other.serval", 443, ssl=client_ctx)
                srv.close()

    asyncio.run(main())


def test_install_on_new_loops_covers_asyncio_run() -> None:
    from pyserval.runtime.install import install_on_new_loops

    async def main() -> bool:
        loop = asyncio.get_running_loop()
        return "create_connection" in vars(loop) and "create_server" in vars(loop)

    assert not asyncio.run(main())
    install_on_new_loops()
    try:
        assert asyncio.run(main())
    finally:
        asyncio.set_event_loop_policy(None)
    assert not asyncio.run(main())


def test_starttls_upgrades_a_serval_stream_in_place(tmp_path: Path) -> None:
    cert, key = _certificate(tmp_path, "upper.serval")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(cert))

    async def starttls(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert await reader.readline() == b"STARTTLS\n"
        writer.write(b"GO\n")
        await writer.drain()
        await writer.start_tls(server_ctx)
        await upper(reader, writer)

    async def main() -> None:
        async with pair("upper") as (server, client):
            with pyserval.install(server, connect=False), pyserval.install(client, serve=False):
                srv = await asyncio.start_server(starttls, "upper.serval", 0)
                reader, writer = await asyncio.open_connection("upper.serval", 0)
                writer.write(b"STARTTLS\n")
                assert await reader.readline() == b"GO\n"
                await writer.start_tls(client_ctx, server_hostname="upper.serval")
                writer.write(b"now private\n")
                assert await reader.readline() == b"NOW PRIVATE\n"
                assert writer.get_extra_info("peercert") is not None
                writer.close()
                srv.close()

    asyncio.run(main())

"""The asyncio host on real loopback UDP sockets (one process, two hosts)."""

from __future__ import annotations

import asyncio
import hashlib

import anyio
import pytest

from pyserval.runtime.host import Host, HostConfig, parse_address
from pyserval.runtime.streams import ServalConnectError, ServalStream
from pyserval.transport.config import StreamConfig


async def _echo(stream: ServalStream) -> None:
    try:
        while True:
            await stream.send(await stream.receive())
    except anyio.EndOfStream:
        await stream.send_eof()


def test_echo_and_bulk_transfer_over_loopback() -> None:
    async def main() -> None:
        cfg = StreamConfig(mss=8192, send_buffer=2 << 20, receive_buffer=2 << 20)
        async with (
            Host(["127.0.0.1:0"], stream_config=cfg) as server,
            Host(["127.0.0.1:0"], stream_config=cfg) as client,
        ):
            listener = await server.listen("echo")
            client.add_route("echo", "{}:{}".format(*server.addresses[0]))
            serving = asyncio.ensure_future(listener.serve(_echo))
            stream = await client.connect("echo")
            await stream.send(b"hello")
            assert await stream.receive() == b"hello"
            data = bytes(range(256)) * 20_000  # 5 MB
            received = hashlib.sha256()
            count = 0

            async def reader() -> None:
                nonlocal count
                while count < len(data):
                    chunk = await stream.receive(1 << 20)
                    received.update(chunk)
                    count += len(chunk)

            read_task = asyncio.ensure_future(reader())
            await stream.send(data)
            await read_task
            assert received.digest() == hashlib.sha256(data).digest()
            await stream.send_eof()
            with pytest.raises(anyio.EndOfStream):
                await stream.receive()
            assert client.core is not None and server.core is not None
            assert client.core.internal_errors == [] and server.core.internal_errors == []
            serving.cancel()

    asyncio.run(main())


def test_connect_errors_are_clear() -> None:
    async def main() -> None:
        async with Host(["127.0.0.1:0"]) as client:
            with pytest.raises(ServalConnectError, match="no route"):
                await client.connect("nobody")
            import socket

            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as hole:
                hole.bind(("127.0.0.1", 0))  # bound but never read: no answer, no ICMP
                client.add_route("silent", "{}:{}".format(*hole.getsockname()))
                with pytest.raises(ServalConnectError, match="timed out"):
                    await client.connect("silent", timeout=0.5)

    asyncio.run(main())


def test_config_and_addresses() -> None:
    assert parse_address("10.0.0.2:54325") == ("10.0.0.2", 54325)
    with pytest.raises(ValueError, match="nonsense"):
        parse_address("nonsense")
    cfg = HostConfig.from_env(
        {"PYSERVAL_LISTEN": "127.0.0.1:0", "PYSERVAL_ROUTES": "echo=127.0.0.1:54325,db=10.0.0.2:1"}
    )
    assert cfg.listen == ["127.0.0.1:0"] and cfg.routes["db"] == "10.0.0.2:1"
    with pytest.raises(ValueError):
        HostConfig.from_env({"PYSERVAL_ROUTES": "broken"})


def test_asyncio_streams_port_by_changing_one_call() -> None:
    import pyserval

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            writer.write(line.upper())
            await writer.drain()
        writer.close()

    async def main() -> None:
        async with Host(["127.0.0.1:0"]) as server, Host(["127.0.0.1:0"]) as client:
            srv = await pyserval.start_server(handle, "upper", host=server)
            client.add_route("upper", "{}:{}".format(*server.addresses[0]))
            reader, writer = await pyserval.open_connection("upper", host=client)
            writer.write(b"hello\nserval\n")
            await writer.drain()
            assert await reader.readline() == b"HELLO\n"
            assert await reader.readline() == b"SERVAL\n"
            writer.write_eof()  # half-close: the server sees EOF and closes its side
            assert await reader.read() == b""
            writer.close()
            await writer.wait_closed()
            srv.close()

    asyncio.run(main())


def test_drain_waits_while_the_peer_does_not_read() -> None:
    import pyserval

    async def main() -> None:
        cfg = StreamConfig(send_buffer=64 * 1024, receive_buffer=64 * 1024)
        async with (
            Host(["127.0.0.1:0"], stream_config=cfg) as server,
            Host(["127.0.0.1:0"], stream_config=cfg) as client,
        ):
            accepted: asyncio.Queue[asyncio.StreamReader] = asyncio.Queue()

            async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                await accepted.put(reader)

            await pyserval.start_server(hold, "sink", host=server)
            client.add_route("sink", "{}:{}".format(*server.addresses[0]))
            _reader, writer = await pyserval.open_connection("sink", host=client)
            server_reader = await accepted.get()
            server_reader._transport.pause_reading()  # type: ignore[attr-defined]
            writer.write(bytes(1 << 20))
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.5):
                    await writer.drain()  # 1 MB cannot fit: the peer holds its window shut
            server_reader._transport.resume_reading()  # type: ignore[attr-defined]
            got = 0
            while got < 1 << 20:
                got += len(await server_reader.read(1 << 20))
            await writer.drain()

    asyncio.run(main())


def test_serval_socket_stream_and_datagram() -> None:
    from pyserval.runtime.socket import SocketClosed

    async def main() -> None:
        async with Host(["127.0.0.1:0"]) as server, Host(["127.0.0.1:0"]) as client:
            client.add_route("echo", "{}:{}".format(*server.addresses[0]))
            client.add_route("dgram", "{}:{}".format(*server.addresses[0]))
            lsock = server.socket()
            lsock.bind("echo")
            await lsock.listen()
            csock = client.socket()
            accept = asyncio.ensure_future(lsock.accept())
            await csock.connect("echo")
            conn, peer = await accept
            assert peer == client.addresses[0]
            assert csock.peer_service == conn.local_service
            assert csock.local_flowid == conn.remote_flowid
            await csock.send(b"ping")
            assert await conn.recv() == b"ping"
            await csock.shutdown()
            assert await conn.recv() == b""  # end of stream
            await conn.close()
            await csock.close()
            with pytest.raises(SocketClosed, match="closed"):
                await csock.send(b"x")

            dserver = server.socket("datagram")
            dserver.bind("dgram")
            recv = asyncio.ensure_future(dserver.recvfrom())
            await asyncio.sleep(0)
            dclient = client.socket("datagram")
            dclient.bind("sender")
            await dclient.sendto(b"hi", "dgram")
            data, (source, address) = await recv
            assert data == b"hi" and source == dclient.local_service
            assert address == client.addresses[0]
            await dserver.close()
            await dclient.close()

    asyncio.run(main())


def test_connect_to_a_dead_port_fails_fast() -> None:
    async def main() -> None:
        async with Host(["127.0.0.1:0"]) as client:
            import socket

            probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            probe.bind(("127.0.0.1", 0))
            dead = probe.getsockname()
            probe.close()  # nothing listens there now: the kernel answers port unreachable
            client.add_route("gone", "{}:{}".format(*dead))
            loop = asyncio.get_running_loop()
            start = loop.time()
            with pytest.raises(ServalConnectError, match="unreachable"):
                await client.connect("gone", timeout=10)
            assert loop.time() - start < 2.0

    asyncio.run(main())


def test_default_interface_uses_a_reference_port_where_free() -> None:
    async def main() -> None:
        async with Host() as first, Host() as second:
            ports = {first.addresses[0][1], second.addresses[0][1]}
            # Both reference ports, or one of them and a kernel-chosen one when another
            # process on this machine holds a reference port already.
            assert ports & {54325, 54324} or len(ports) == 2

    asyncio.run(main())


def test_anyio_tls_works_on_a_serval_stream(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import datetime
    import ssl

    from anyio.streams.tls import TLSStream
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "echo.serval")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("echo.serval")]), False)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert_file, key_file)
    client_ctx = ssl.create_default_context(cafile=str(cert_file))

    async def main() -> None:
        async with Host(["127.0.0.1:0"]) as server, Host(["127.0.0.1:0"]) as client:
            listener = await server.listen("echo")
            client.add_route("echo", "{}:{}".format(*server.addresses[0]))

            async def serve_one() -> None:
                raw = await listener.accept()
                tls = await TLSStream.wrap(raw, server_side=True, ssl_context=server_ctx)
                await tls.send((await tls.receive()).upper())
                await tls.aclose()

            task = asyncio.ensure_future(serve_one())
            raw = await client.connect("echo")
            tls = await TLSStream.wrap(raw, hostname="echo.serval", ssl_context=client_ctx)
            await tls.send(b"secret")
            assert await tls.receive() == b"SECRET"
            async with asyncio.timeout(10):
                await asyncio.gather(tls.aclose(), task)  # close_notify both ways

    asyncio.run(main())


def test_finished_connections_leave_no_waiter_entries() -> None:
    async def main() -> None:
        async with Host(["127.0.0.1:0"]) as server, Host(["127.0.0.1:0"]) as client:
            listener = await server.listen("echo")
            serving = asyncio.ensure_future(listener.serve(_echo))
            client.add_route("echo", "{}:{}".format(*server.addresses[0]))
            for _ in range(20):
                stream = await client.connect("echo")
                await stream.send(b"x")
                assert await stream.receive() == b"x"
                await stream.send_eof()
                with pytest.raises(anyio.EndOfStream):
                    await stream.receive()
                await stream.aclose()
            await asyncio.sleep(0.2)
            assert len(server._waiters.events) <= 1
            serving.cancel()

    asyncio.run(main())


def test_host_close_delivers_queued_data_then_fin() -> None:
    """Closing a host shuts its streams down gracefully: the peer reads every byte, then EOF."""

    async def main() -> None:
        cfg = StreamConfig(mss=8192, send_buffer=4 << 20, receive_buffer=4 << 20)
        data = bytes(range(256)) * 8192  # 2 MB, fits the send buffer: send() returns at once
        async with Host(["127.0.0.1:0"], stream_config=cfg) as client:
            server = await Host(["127.0.0.1:0"], stream_config=cfg).start()
            listener = await server.listen("bulk")
            client.add_route("bulk", "{}:{}".format(*server.addresses[0]))
            accepted: asyncio.Future[ServalStream] = asyncio.get_running_loop().create_future()

            async def take(s: ServalStream) -> None:
                accepted.set_result(s)
                await asyncio.sleep(3600)  # keep the stream: the host's close must end it

            serving = asyncio.ensure_future(listener.serve(take))
            stream = await client.connect("bulk")
            server_stream = await accepted
            await server_stream.send(data)
            closing = asyncio.ensure_future(server.close(timeout=5.0))
            got = bytearray()
            with pytest.raises(anyio.EndOfStream):
                while True:
                    got += await stream.receive(1 << 20)
            await closing
            assert bytes(got) == data
            serving.cancel()

    asyncio.run(main())


def test_segment_size_follows_the_interface_mtu_unless_configured() -> None:
    from pyserval.runtime.mtu import MAX_AUTO_MSS, interface_mtu, mss_for

    assert mss_for(["0.0.0.0"], 1408) == 1408  # any interface: keep the reference's size
    assert mss_for(["203.0.113.77"], 1408) == 1408  # no interface holds it
    lo = interface_mtu("127.0.0.1")
    if lo is None:
        pytest.skip("no loopback MTU readable here")
    assert mss_for(["127.0.0.1"], 1408) == min(lo - 88, MAX_AUTO_MSS)

    async def main() -> None:
        async with (
            Host(["127.0.0.1:0"]) as auto,
            Host(["127.0.0.1:0"], stream_config=StreamConfig(mss=1408)) as fixed,
        ):
            assert auto.stream_config.mss == mss_for(["127.0.0.1"], 1408)
            assert fixed.stream_config.mss == 1408

    asyncio.run(main())

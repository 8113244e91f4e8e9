"""Secure channels on real loopback sockets: who may complete the handshake and who may not.

Accepted: the service key itself, an instance key with a valid delegation, two replicas
behind a router each with its own delegated key, a stream that migrates mid-transfer.
Refused, with the reason the error names: another key, an expired or forged delegation, a
delegation by another service, a man in the middle that terminates TLS with its own key
(and never sees a byte of the client's), a plaintext peer either way round, a name. Data is
checked by SHA-256 end to end.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import anyio.streams.tls
import pytest

from pyserval import Router
from pyserval.naming import ServiceID, ServiceKey
from pyserval.runtime.host import Host
from pyserval.runtime.secure import (
    HandshakeFailure,
    SecureListener,
    SecureStream,
    SecurityReason,
    ServalSecurityError,
    server_context,
)
from pyserval.runtime.stdio import open_connection_on, start_server_on
from pyserval.runtime.streams import ServalListener, ServalStream
from pyserval.transport.config import StreamConfig

pytestmark = pytest.mark.timeout(60)

STEP = 5.0
Stream = ServalStream | SecureStream


def text(address: tuple[str, int]) -> str:
    return f"{address[0]}:{address[1]}"


async def echo(stream: Stream) -> None:
    """Echo to end of stream, then end ours."""
    try:
        while True:
            await stream.send(await stream.receive())
    except anyio.EndOfStream:
        await stream.send_eof()
    except (anyio.BrokenResourceError, anyio.ClosedResourceError):
        pass


async def exchange(stream: Stream, data: bytes) -> bytes:
    """Send ``data`` and end our side while reading the echo to its end."""
    got = bytearray()

    async def reader() -> None:
        with contextlib.suppress(anyio.EndOfStream):
            while True:
                got.extend(await stream.receive())

    task = asyncio.ensure_future(reader())
    await stream.send(data)
    await stream.send_eof()  # half-close: the echo keeps coming after it
    await asyncio.wait_for(task, STEP)
    return bytes(got)


@contextlib.asynccontextmanager
async def hosts(n: int, **kw: Any) -> AsyncIterator[list[Host]]:
    made = [await Host(["127.0.0.1:0"], **kw).start() for _ in range(n)]
    try:
        yield made
    finally:
        for h in made:
            await h.close()


@contextlib.asynccontextmanager
async def serving(
    listener: SecureListener | ServalListener, handler: Callable[[Any], Awaitable[None]] = echo
) -> AsyncIterator[None]:
    task = asyncio.ensure_future(listener.serve(handler))
    try:
        yield
    finally:
        await listener.aclose()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def refused(client: Host, sid: ServiceID) -> ServalSecurityError:
    with pytest.raises(ServalSecurityError) as info:
        await client.connect(sid, secure=True, timeout=STEP)
    return info.value


def test_the_service_key_proves_its_id_and_data_crosses_both_ways() -> None:
    async def main() -> None:
        key = ServiceKey.generate()
        sid = key.service_id("0a0b/16")
        async with hosts(2) as (server, client):
            client.add_route(sid.hex, text(server.addresses[0]))
            listener = await server.listen(sid, key=key, secure=True)
            assert isinstance(listener, SecureListener)
            async with serving(listener):
                stream = await client.connect(sid, secure=True, timeout=STEP)
                assert isinstance(stream, SecureStream) and isinstance(stream, anyio.abc.ByteStream)
                assert stream.peer is not None and stream.peer.key == key.public_key
                assert stream.peer.delegation is None
                assert stream.extra(anyio.streams.tls.TLSAttribute.tls_version) == "TLSv1.3"
                data = bytes(range(256)) * 4096  # 1 MiB
                got = await exchange(stream, data)
                assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
                await stream.aclose()

    asyncio.run(main())


def test_an_instance_key_with_a_valid_delegation_proves_the_id() -> None:
    async def main() -> None:
        service, instance = ServiceKey.generate(), ServiceKey.generate()
        sid = service.service_id("0a0b/16")
        delegation = service.delegate(instance.public_key, valid_for=300)
        async with hosts(2) as (server, client):
            client.add_route(sid.hex, text(server.addresses[0]))
            listener = await server.listen(sid, key=instance, delegation=delegation, secure=True)
            async with serving(listener):
                stream = await client.connect(sid.hex, secure=True, timeout=STEP)
                assert stream.peer is not None
                assert stream.peer.key == instance.public_key
                assert stream.peer.delegation == delegation
                assert await exchange(stream, b"through a delegate") == b"through a delegate"

    asyncio.run(main())


def _attacker(server: Host, sid: ServiceID, context: Any) -> Awaitable[SecureListener]:
    """A listener on ``sid`` presenting whatever ``context`` holds (what Host.listen refuses
    to set up for an honest server)."""

    async def make() -> SecureListener:
        return SecureListener(await server.listen(sid), context)

    return make()


def test_wrong_keys_and_bad_delegations_are_refused_with_their_reason() -> None:
    async def main() -> None:
        service, instance, other = (ServiceKey.generate() for _ in range(3))
        sid = service.service_id("0a0b/16")
        now = time.time()
        expired = service.delegate(instance, valid_for=60, now=now - 3600)
        forged = dataclasses.replace(
            other.delegate(instance, valid_for=600), service_key=service.public_key
        )
        elsewhere = other.delegate(instance, valid_for=600)  # valid, for other's IDs
        cases = [
            (server_context(other), SecurityReason.WRONG_KEY),
            (server_context(instance, expired), SecurityReason.DELEGATION_EXPIRED),
            (server_context(instance, forged), SecurityReason.DELEGATION_FORGED),
            (server_context(instance, elsewhere), SecurityReason.DELEGATION_WRONG_SERVICE),
        ]
        async with hosts(2) as (server, client):
            client.add_route(sid.hex, text(server.addresses[0]))
            for context, reason in cases:
                got: list[bytes] = []

                async def record(stream: SecureStream, got: list[bytes] = got) -> None:
                    with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
                        got.append(await stream.receive())

                async with serving(await _attacker(server, sid, context), record):
                    error = await refused(client, sid)
                    assert error.reason is reason, error
                    await asyncio.sleep(0.05)
                assert got == []  # the client sent nothing to a peer that failed the check
            # An honest server refuses to start with what the client would refuse.
            with pytest.raises(ValueError, match="expired"):
                await server.listen(sid, key=instance, delegation=expired, secure=True)
            with pytest.raises(ValueError, match="does not certify"):
                await server.listen(sid, key=other, secure=True)
            with pytest.raises(ValueError, match="needs key"):
                await server.listen(sid, secure=True)

    asyncio.run(main())


def test_a_man_in_the_middle_with_its_own_key_is_refused_and_learns_nothing() -> None:
    async def main() -> None:
        key, mitm_key = ServiceKey.generate(), ServiceKey.generate()
        sid = key.service_id("0a0b/16")
        async with hosts(4) as (server, mitm, mitm_out, client):
            real = await server.listen(sid, key=key, secure=True)
            seen_by_server: list[bytes] = []

            async def record(stream: SecureStream) -> None:
                with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
                    while True:
                        seen_by_server.append(await stream.receive())

            # The relay terminates TLS with its own key and connects on, itself securely,
            # to the real service: it can read and change everything, if the client lets it.
            mitm_out.add_route(sid.hex, text(server.addresses[0]))
            relayed: list[bytes] = []

            async def relay(stream: SecureStream) -> None:
                onward = await mitm_out.connect(sid, secure=True, timeout=STEP)
                with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
                    while True:
                        data = await stream.receive()
                        relayed.append(data)
                        await onward.send(data)

            client.add_route(sid.hex, text(mitm.addresses[0]))
            async with (
                serving(real, record),
                serving(await _attacker(mitm, sid, server_context(mitm_key)), relay),
            ):
                error = await refused(client, sid)
                assert error.reason is SecurityReason.WRONG_KEY
                assert mitm_key.public_key.raw.hex() in str(error)
                await asyncio.sleep(0.1)
            assert relayed == [] and seen_by_server == []

    asyncio.run(main())


def test_a_relay_that_only_forwards_records_sees_ciphertext() -> None:
    async def main() -> None:
        key = ServiceKey.generate()
        sid = key.service_id("0a0b/16")
        secret = b"the secret payload " * 100
        async with hosts(4) as (server, relay_host, onward_host, client):
            listener = await server.listen(sid, key=key, secure=True)
            # The relay accepts on one host and connects on from another (a host delivers
            # its own connects to its own listener).
            onward_host.add_route(sid.hex, text(server.addresses[0]))
            wire: list[bytes] = []

            async def pump(a: ServalStream, b: ServalStream) -> None:
                with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
                    while True:
                        data = await a.receive()
                        wire.append(data)
                        await b.send(data)
                with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                    await b.send_eof()

            async def forward(stream: ServalStream) -> None:
                onward = await onward_host.connect(sid, timeout=STEP)  # plain: bytes only
                await asyncio.gather(pump(stream, onward), pump(onward, stream))

            client.add_route(sid.hex, text(relay_host.addresses[0]))
            plain = await relay_host.listen(sid)
            async with serving(listener), serving(plain, forward):
                stream = await client.connect(sid, secure=True, timeout=STEP)
                assert await exchange(stream, secret) == secret
            seen = b"".join(wire)
            assert len(seen) > 2 * len(secret) and b"secret payload" not in seen

    asyncio.run(main())


def test_plaintext_peers_are_refused_either_way_round() -> None:
    async def main() -> None:
        key = ServiceKey.generate()
        sid, plain_sid = key.service_id("0a/8"), key.service_id("0b/8")
        async with hosts(2) as (server, client):
            for s in (sid, plain_sid):
                client.add_route(s.hex, text(server.addresses[0]))
            secure = await server.listen(sid, key=key, secure=True)
            plain = await server.listen(plain_sid)
            async with serving(secure), serving(plain):
                # A secure client and a plaintext echo: the echoed ClientHello is no
                # ServerHello.
                error = await refused(client, plain_sid)
                assert error.reason is SecurityReason.HANDSHAKE_FAILED
                assert "plaintext" in str(error)
                # A plaintext client and a secure server: no TLS, no data, a reset.
                stream = await client.connect(sid, timeout=STEP)
                await stream.send(b"GET / HTTP/1.0\r\n\r\n" * 20)
                with pytest.raises((anyio.BrokenResourceError, anyio.EndOfStream)):
                    async with asyncio.timeout(STEP):
                        while True:
                            reply = await stream.receive()
                            assert b"GET" not in reply
                await asyncio.sleep(0.05)
                assert secure.failures == {HandshakeFailure.TLS_ERROR: 1}
            # A name: refused before any packet goes out.
            with pytest.raises(ServalSecurityError) as info:
                await client.connect("echo", secure=True)
            assert info.value.reason is SecurityReason.NOT_SELF_CERTIFYING

    asyncio.run(main())


def test_two_replicas_behind_a_router_each_prove_the_id_with_their_own_delegation() -> None:
    async def main() -> None:
        service = ServiceKey.generate()
        sid = service.service_id("0a0b/16")
        instances = [ServiceKey.generate(), ServiceKey.generate()]
        async with Router("127.0.0.1:0") as router:
            r = router.address_text
            async with hosts(2, router=r) as replicas, hosts(1, router=r) as (client,):
                listeners = []
                for host, inst in zip(replicas, instances, strict=True):
                    d = service.delegate(inst.public_key, valid_for=600)
                    listeners.append(await host.listen(sid, key=inst, delegation=d, secure=True))
                async with serving(listeners[0]), serving(listeners[1]):
                    async with asyncio.timeout(STEP):
                        while len(router.registry) < 2:
                            await asyncio.sleep(0.01)
                    seen: dict[bytes, int] = {}
                    for i in range(40):
                        stream = await client.connect(sid, secure=True, timeout=STEP)
                        assert stream.peer is not None and stream.peer.delegation is not None
                        assert stream.peer.delegation.service_key == service.public_key
                        raw = stream.peer.key.raw
                        seen[raw] = seen.get(raw, 0) + 1
                        msg = f"request {i}".encode()
                        assert await exchange(stream, msg) == msg
                        await stream.aclose()
                        if len(seen) == 2 and i >= 3:
                            break
                    assert set(seen) == {k.public_key.raw for k in instances}

    asyncio.run(main())


def test_a_secure_stream_migrates_mid_transfer_and_keeps_its_session() -> None:
    async def main() -> None:
        key = ServiceKey.generate()
        sid = key.service_id("0a0b/16")
        cfg = StreamConfig(mss=8192, send_buffer=2 << 20, receive_buffer=2 << 20)
        data = bytes(range(256)) * 16_384  # 4 MiB
        server = await Host(["127.0.0.1:0"], stream_config=cfg).start()
        client = await Host(["127.0.0.2:0"], stream_config=cfg).start()
        try:
            digest: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()

            async def sink(stream: SecureStream) -> None:
                h, n = hashlib.sha256(), 0
                with contextlib.suppress(anyio.EndOfStream):
                    while True:
                        chunk = await stream.receive(1 << 20)
                        h.update(chunk)
                        n += len(chunk)
                digest.set_result((n, h.digest()))

            client.add_route(sid.hex, text(server.addresses[0]))
            second = client.add_interface("127.0.0.3:0")
            async with serving(await server.listen(sid, key=key, secure=True), sink):
                stream = await client.connect(sid, secure=True, timeout=STEP)
                chunk = len(data) // 16
                mover = None
                for i in range(16):
                    if i == 8:
                        mover = asyncio.ensure_future(stream.migrate(text(second)))
                    await stream.send(data[i * chunk : (i + 1) * chunk])
                await stream.send_eof()
                assert mover is not None
                await mover
                n, got = await asyncio.wait_for(digest, 30)
                assert n == len(data) and got == hashlib.sha256(data).digest()
                assert stream.local_address == second
        finally:
            await client.close()
            await server.close()

    asyncio.run(main())


def test_open_connection_and_start_server_secure() -> None:
    async def main() -> None:
        key = ServiceKey.generate()
        sid = key.service_id("0a0b/16")

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            data = await reader.read()  # to the client's write_eof
            writer.write(hashlib.sha256(data).digest() + data[:16])
            await writer.drain()
            writer.close()

        async with hosts(2) as (server_host, client):
            client.add_route(sid.hex, text(server_host.addresses[0]))
            server = await start_server_on(server_host, handle, sid, key=key, secure=True)
            try:
                reader, writer = await open_connection_on(client, sid, secure=True, timeout=STEP)
                peer = writer.get_extra_info("peer_identity")
                assert peer is not None and peer.key == key.public_key
                payload = bytes(range(256)) * 2000
                writer.write(payload)
                await writer.drain()
                writer.write_eof()
                reply = await asyncio.wait_for(reader.read(), STEP)
                assert reply == hashlib.sha256(payload).digest() + payload[:16]
                writer.close()
            finally:
                server.close()

    asyncio.run(main())


def test_renewing_the_delegation_serves_the_new_one_to_new_clients() -> None:
    async def main() -> None:
        service, instance = ServiceKey.generate(), ServiceKey.generate()
        sid = service.service_id("0a0b/16")
        first = service.delegate(instance, valid_for=600)
        second = service.delegate(instance, valid_for=7200)
        async with hosts(2) as (server, client):
            client.add_route(sid.hex, text(server.addresses[0]))
            listener = await server.listen(sid, key=instance, delegation=first, secure=True)
            async with serving(listener):
                stream = await client.connect(sid, secure=True, timeout=STEP)
                assert stream.peer is not None and stream.peer.delegation == first
                listener.renew(instance, second)
                again = await client.connect(sid, secure=True, timeout=STEP)
                assert again.peer is not None and again.peer.delegation == second
                assert await exchange(stream, b"old") == b"old"  # the first session goes on

    asyncio.run(main())


def test_secure_without_a_check_is_an_error_and_a_custom_context_is_used_as_given() -> None:
    async def main() -> None:
        key = ServiceKey.generate()
        name_sid = ServiceID.from_name("own-pki")
        async with hosts(2) as (server, client):
            client.add_route("own-pki", text(server.addresses[0]))
            with pytest.raises(ValueError, match="secure=True"):
                await client.connect(
                    "own-pki",
                    ssl_context=server_context(key),  # type: ignore[call-overload]
                )
            # Your own PKI: here a context that trusts exactly this certificate.
            import ssl

            from cryptography.hazmat.primitives.serialization import Encoding

            from pyserval.runtime.secure import certificate_for

            listener = await server.listen("own-pki", secure=True, ssl_context=server_context(key))
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            async with serving(listener):
                # The served certificate is a fresh one each context: trusting another
                # certificate for the same key must fail under the context's own checks.
                ctx.load_verify_locations(
                    cadata=certificate_for(ServiceKey.generate())
                    .public_bytes(Encoding.PEM)
                    .decode()
                )
                with pytest.raises(ServalSecurityError) as info:
                    await client.connect(name_sid, secure=True, ssl_context=ctx, timeout=STEP)
                assert info.value.reason is SecurityReason.HANDSHAKE_FAILED
                assert "CERTIFICATE_VERIFY_FAILED" in str(info.value)

    asyncio.run(main())


def test_a_stream_cut_without_close_notify_reads_as_broken_not_complete() -> None:
    """A Serval FIN is not authenticated: an end of stream without the peer's close_notify
    must not pass a truncated stream off as complete."""

    async def main() -> None:
        key = ServiceKey.generate()
        sid = key.service_id("0a0b/16")

        async def cut(stream: SecureStream) -> None:
            await stream.send(b"partial")
            await stream.serval.send_eof()  # the FIN alone, as an attacker could inject

        async with hosts(2) as (server, client):
            client.add_route(sid.hex, text(server.addresses[0]))
            async with serving(await server.listen(sid, key=key, secure=True), cut):
                stream = await client.connect(sid, secure=True, timeout=STEP)
                assert await stream.receive() == b"partial"
                with pytest.raises(anyio.BrokenResourceError):
                    await asyncio.wait_for(stream.receive(), STEP)

    asyncio.run(main())

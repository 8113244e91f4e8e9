"""IPv6 on real loopback sockets: an IPv6-only pair, a dual-stack server, a move from an
IPv4 to an IPv6 interface mid-transfer, a service router on ``::1``, ICMPv6 errors.

Skipped when the machine has no IPv6 loopback (``net.ipv6.conf.lo.disable_ipv6=1``).
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import socket

import pytest

from pyserval.control import Router
from pyserval.control.router import fetch_table
from pyserval.runtime.host import Host, HostConfig, parse_address
from pyserval.runtime.streams import ServalMigrationError, ServalStream
from pyserval.runtime.udp import UdpEndpoint
from pyserval.sal import Source6Ext, decode_packet
from pyserval.sal.inet import format_address
from pyserval.transport.config import StreamConfig
from pyserval.transport.events import Event, FlowMigrated

from .helpers.sinks import digest_sink


def _have_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


pytestmark = pytest.mark.skipif(not _have_ipv6_loopback(), reason="no IPv6 on loopback")

CFG = StreamConfig(mss=8192, send_buffer=2 << 20, receive_buffer=2 << 20)
MIB = bytes(range(256)) * 4096  # 1 MiB
MIB_SHA256 = hashlib.sha256(MIB).hexdigest()


async def _serve(server: Host, service: str) -> asyncio.Future[tuple[int, str]]:
    listener = await server.listen(service)
    digest: asyncio.Future[tuple[int, str]] = asyncio.get_running_loop().create_future()
    serving = asyncio.ensure_future(listener.serve(lambda s: digest_sink(s, digest)))
    digest.add_done_callback(lambda _: serving.cancel())
    return digest


async def _upload(stream: ServalStream, data: bytes) -> None:
    for i in range(0, len(data), 65536):
        await stream.send(data[i : i + 65536])
    await stream.send_eof()


def test_parse_address_takes_bracketed_ipv6_in_the_kernels_text() -> None:
    assert parse_address("[::1]:54325") == ("::1", 54325)
    assert parse_address("[FD00:0:0::0001]:0") == ("fd00::1", 0)
    assert parse_address("127.0.0.1:9") == ("127.0.0.1", 9)
    for bad in ("::1:5", "[127.0.0.1]:5", "[::1]", "[::1]:x", "[::1]:70000", "[host]:1"):
        with pytest.raises(ValueError):
            parse_address(bad)
    cfg = HostConfig.from_env(
        {"PYSERVAL_LISTEN": "127.0.0.1:0, [::1]:0", "PYSERVAL_ROUTER": "[::1]:54326"}
    )
    assert cfg.listen == ["127.0.0.1:0", "[::1]:0"] and cfg.router == "[::1]:54326"
    assert format_address(("::1", 5)) == "[::1]:5"
    assert format_address(("10.0.0.1", 5)) == "10.0.0.1:5"


def test_one_mib_over_ipv6_loopback_is_byte_exact() -> None:
    async def main() -> None:
        async with (
            Host(["[::1]:0"], stream_config=CFG) as server,
            Host(["[::1]:0"], stream_config=CFG) as client,
        ):
            digest = await _serve(server, "bulk6")
            client.add_route("bulk6", format_address(server.addresses[0]))
            stream = await client.connect("bulk6", timeout=5)
            assert stream.local_address[0] == "::1" and stream.local_address == client.addresses[0]
            await _upload(stream, MIB)
            assert await asyncio.wait_for(digest, 30) == (len(MIB), MIB_SHA256)
            await stream.aclose()
            assert client.endpoints[0].stats.datagrams_received > 0

    asyncio.run(main())


def test_dual_stack_server_takes_an_ipv4_and_an_ipv6_client() -> None:
    async def main() -> None:
        async with Host(["127.0.0.1:0", "[::1]:0"], stream_config=CFG) as server:
            v4, v6 = server.addresses
            assert v4[0] == "127.0.0.1" and v6[0] == "::1"
            listener = await server.listen("dual")
            peers: list[tuple[str, int] | None] = []

            async def echo(stream: ServalStream) -> None:
                peers.append(stream.remote_address)
                data = await stream.receive()
                await stream.send(data.upper())
                await stream.send_eof()

            serving = asyncio.ensure_future(listener.serve(echo))
            for local, route in (("127.0.0.1:0", v4), ("[::1]:0", v6)):
                async with Host([local], stream_config=CFG) as client:
                    client.add_route("dual", format_address(route))
                    stream = await client.connect("dual", timeout=5)
                    await stream.send(b"hello " + local.encode())
                    assert await stream.receive() == b"HELLO " + local.upper().encode()
                    assert stream.remote_address == route
                    await stream.aclose()
            serving.cancel()
            assert [p[0] for p in peers if p is not None] == ["127.0.0.1", "::1"]

    asyncio.run(main())


def test_a_stream_moves_from_an_ipv4_to_an_ipv6_interface_mid_transfer() -> None:
    data = MIB * 4

    async def main() -> None:
        async with (
            Host(["127.0.0.1:0", "[::1]:0"], stream_config=CFG) as server,
            Host(["127.0.0.1:0"], stream_config=CFG) as client,
        ):
            seen: list[Event] = []
            server.add_event_hook(seen.append)
            digest = await _serve(server, "move46")
            client.add_route("move46", format_address(server.addresses[0]))
            stream = await client.connect("move46", timeout=5)
            v6 = client.add_interface("[::1]:0")
            half = len(data) // 2
            await stream.send(data[:half])
            # Without the peer's IPv6 address the move cannot start (nothing is sent).
            with pytest.raises(ServalMigrationError, match="family"):
                await stream.migrate(v6, timeout=5)
            mover = asyncio.ensure_future(
                stream.migrate(v6, remote=format_address(server.addresses[1]), timeout=10)
            )
            await _upload(stream, data[half:])
            await mover
            n, hexdigest = await asyncio.wait_for(digest, 30)
            assert n == len(data) and hexdigest == hashlib.sha256(data).hexdigest()
            assert stream.local_address == v6
            assert stream.paths == [(v6, server.addresses[1])]
            moved = [e for e in seen if isinstance(e, FlowMigrated)]
            assert moved and moved[0].remote == v6 and moved[0].local == server.addresses[1]

    asyncio.run(main())


def test_router_on_ipv6_forwards_to_an_ipv6_instance() -> None:
    async def main() -> None:
        async with Router("[::1]:0") as router:
            assert router.address[0] == "::1" and router.address_text.startswith("[::1]:")
            async with (
                Host(["[::1]:0"], router=router.address_text, stream_config=CFG) as server,
                Host(["[::1]:0"], router=router.address_text, stream_config=CFG) as client,
            ):
                digest = await _serve(server, "routed6")
                sources: list[Source6Ext] = []
                original = server._on_batch

                def tap(ep: UdpEndpoint, batch: list[tuple[bytes, tuple[str, int]]]) -> None:
                    for data, _ in batch:
                        try:
                            ext = decode_packet(data).find(Source6Ext)
                        except ValueError:
                            continue
                        if ext is not None:
                            sources.append(ext)
                    original(ep, batch)

                server._on_batch = tap  # type: ignore[method-assign]
                for _ in range(100):  # the registration reaches the router
                    if router.registry.instances:
                        break
                    await asyncio.sleep(0.02)
                instances = [a for g in router.registry.instances.values() for a in g]
                assert instances == [server.addresses[0]]
                stream = await client.connect("routed6", timeout=5)
                await _upload(stream, MIB)
                assert await asyncio.wait_for(digest, 30) == (len(MIB), MIB_SHA256)
                # The SYN came through the router, its path in SOURCE6: client, router.
                assert sources and sources[0].path == (client.addresses[0], router.address)
                assert stream.remote_address == server.addresses[0]  # answered directly
                dump = await fetch_table(router.address_text)  # the inspection over IPv6
                targets = [t.address for e in dump.entries for t in e.targets]
                assert format_address(server.addresses[0]) in targets

    asyncio.run(main())


def test_the_interface_check_sees_ipv6_addresses_come_and_go() -> None:
    from pyserval.runtime.interfaces import _ip_present

    assert _ip_present("::1") and _ip_present("127.0.0.1")
    assert not _ip_present("fd00:dead:beef::1")  # no interface holds it


def test_icmpv6_port_unreachable_is_reported_for_the_remote() -> None:
    async def main() -> None:
        errors: list[tuple[tuple[str, int], int]] = []
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as closed:
            closed.bind(("::1", 0))
            gone = closed.getsockname()[:2]
        ep = await UdpEndpoint.open(
            ("::1", 0), lambda batch: None, on_icmp_error=lambda a, e: errors.append((a, e))
        )
        try:
            for _ in range(50):
                ep.send(b"x", gone)
                await asyncio.sleep(0.01)
                if errors:
                    break
            assert errors and errors[0] == (gone, errno.ECONNREFUSED)
            assert ep.errors["icmp:ECONNREFUSED"] >= 1
        finally:
            ep.close()

    asyncio.run(main())


def test_gso_batches_reach_an_ipv6_endpoint_as_sent() -> None:
    async def main() -> None:
        got: list[tuple[bytes, tuple[str, int]]] = []
        rx = await UdpEndpoint.open(("::1", 0), got.extend)
        tx = await UdpEndpoint.open(("::1", 0), lambda batch: None)
        try:
            sent = [bytes([i]) * 1200 for i in range(40)] + [b"tail"]
            tx.send_many([(d, rx.address) for d in sent])
            for _ in range(100):
                if len(got) >= len(sent):
                    break
                await asyncio.sleep(0.01)
            assert [d for d, _ in got] == sent
            assert {a for _, a in got} == {tx.address}  # (ip, port): no flow info or scope
            assert tx.address[0] == "::1" and len(tx.address) == 2
        finally:
            rx.close()
            tx.close()

    asyncio.run(main())


def test_sending_across_families_is_counted_never_raised() -> None:
    async def main() -> None:
        v4 = await UdpEndpoint.open(("127.0.0.1", 0), lambda batch: None)
        v6 = await UdpEndpoint.open(("::1", 0), lambda batch: None)
        try:
            v4.send(b"x", ("::1", 9))  # an IPv4 socket cannot reach an IPv6 address
            v6.send(b"x", ("127.0.0.1", 9))  # nor an IPv6-only socket an IPv4 one
            v4.send_many([(b"y" * 100, ("::1", 9))] * 3)
            # Each datagram counted once as a failed send (a GSO attempt first, for the batch).
            assert v4.errors["send:-9"] == 4 and v6.errors["send:-9"] == 1
            assert v4.stats.datagrams_sent == 0 and v6.stats.datagrams_sent == 0
        finally:
            v4.close()
            v6.close()

    asyncio.run(main())

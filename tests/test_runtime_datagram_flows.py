"""Connected datagram flows through the public API, on real UDP sockets on loopback."""

from __future__ import annotations

import asyncio
import socket
import struct

import anyio
import anyio.abc
import pytest

import pyserval
from pyserval.runtime.host import Host
from pyserval.sal import ControlFlags, decode_packet


def _route(client: Host, server: Host, service: str) -> None:
    client.add_route(service, "{}:{}".format(*server.addresses[0]))


def test_high_level_connect_listen_send_receive_close() -> None:
    async def main() -> None:
        async with Host(["127.0.0.1:0"]) as server, Host(["127.0.0.1:0"]) as client:
            listener = await server.listen("dg-echo", kind="datagram")
            assert isinstance(listener, pyserval.ServalDatagramListener)
            _route(client, server, "dg-echo")

            async def echo(flow: pyserval.ServalDatagramStream) -> None:
                try:
                    while True:
                        await flow.send(b"echo:" + await flow.receive())
                except anyio.EndOfStream:
                    pass

            serving = asyncio.ensure_future(listener.serve(echo))
            flow = await client.connect("dg-echo", kind="datagram")
            assert isinstance(flow, anyio.abc.UnreliableObjectStream)
            assert isinstance(flow, pyserval.ServalDatagramStream)
            for i in range(50):
                msg = b"m%d" % i * (i + 1)
                await flow.send(msg)
                assert await asyncio.wait_for(flow.receive(), 5) == b"echo:" + msg
            big = bytes(range(256)) * 200  # one 51,200-byte datagram, one packet on loopback
            await flow.send(big)
            assert await asyncio.wait_for(flow.receive(), 5) == b"echo:" + big
            largest = bytes(range(251)) * (65487 // 251) + bytes(65487 % 251)
            listener_side_limit = 65487 - len(b"echo:")
            await flow.send(largest[:listener_side_limit])  # the echo adds 5 bytes
            reply = await asyncio.wait_for(flow.receive(), 5)
            assert reply == b"echo:" + largest[:listener_side_limit] and len(reply) == 65487
            with pytest.raises(pyserval.transport.DatagramTooLarge):
                await flow.send(bytes(70_000))
            await flow.aclose()
            with pytest.raises(anyio.ClosedResourceError):
                await flow.receive()
            assert client.core is not None and server.core is not None
            # The server's handler saw end of stream and closed its side: both flows end.
            for _ in range(500):
                if not server.core.connections:
                    break
                await asyncio.sleep(0.01)
            assert not server.core.connections  # the passive closer is gone at once
            # The active closer waits, as a TIME_WAIT record (the connection object is gone).
            assert not client.core.connections and len(client.core.time_wait) == 1
            assert client.core.internal_errors == [] and server.core.internal_errors == []
            serving.cancel()

    asyncio.run(main())


def test_socket_api_connect_bind_listen_accept() -> None:
    async def main() -> None:
        async with Host(["127.0.0.1:0"]) as server, Host(["127.0.0.1:0"]) as client:
            lsock = server.socket("datagram")
            lsock.bind("dg-sock")
            await lsock.listen()
            _route(client, server, "dg-sock")
            socks = [client.socket("datagram") for _ in range(3)]
            for s in socks:
                await s.connect("dg-sock")
            accepted = [await asyncio.wait_for(lsock.accept(), 5) for _ in socks]
            # One socket per client flow; each knows its peer.
            peers = {a.remote_flowid for a, _ in accepted}
            assert peers == {s.local_flowid for s in socks}
            by_flow = {a.remote_flowid: a for a, _ in accepted}
            for i, s in enumerate(socks):
                assert s.peer_service == pyserval.ServiceID.parse("dg-sock")
                assert await s.send(b"from %d" % i) == 6
            for i, s in enumerate(socks):
                a = by_flow[s.local_flowid]
                assert await asyncio.wait_for(a.recv(), 5) == b"from %d" % i
                assert a.peer_address == client.addresses[0]
                await a.send(b"back %d" % i)
                assert await asyncio.wait_for(s.recv(3), 5) == b"bac"  # truncated, as recv
            # Closing a client socket: the server's socket reads end of stream (b"").
            await socks[0].close()
            first = by_flow[socks[0].local_flowid]
            assert await asyncio.wait_for(first.recv(), 5) == b""
            # Unconnected datagram sockets keep working alongside on the same hosts.
            plain = server.socket("datagram")
            plain.bind("dg-plain")
            _route(client, server, "dg-plain")
            sender = client.socket("datagram")
            await sender.sendto(b"unconnected", "dg-plain")
            data, (_, addr) = await asyncio.wait_for(plain.recvfrom(), 5)
            assert data == b"unconnected" and addr == client.addresses[0]
            for s in [*socks, lsock, plain, sender, *(a for a, _ in accepted)]:
                await s.close()

    asyncio.run(main())


def test_connect_errors_are_reported_on_the_socket() -> None:
    async def main() -> None:
        async with Host(["127.0.0.1:0"]) as server, Host(["127.0.0.1:0"]) as client:
            s = client.socket("datagram")
            with pytest.raises(pyserval.ServalConnectError):
                await s.connect("nowhere")  # no route
            lsock = server.socket("datagram")
            lsock.bind("dg-reset")
            await lsock.listen()
            _route(client, server, "dg-reset")
            c = client.socket("datagram")
            await c.connect("dg-reset")
            a, _ = await asyncio.wait_for(lsock.accept(), 5)
            assert server.core is not None
            for conn in server.core.connections.values():
                conn.abort()  # the server resets the flow
            server.schedule_flush()
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(c.recv(), 5)
            with pytest.raises(ConnectionResetError):
                await c.send(b"x")
            for x in (s, c, lsock, a):
                await x.close()

    asyncio.run(main())


def test_listening_socket_answers_raw_unconnected_datagram_with_ack_rst() -> None:
    """A plain UDP socket plays a reference sender: its datagram (no flowID) reaches a
    listening connected-mode socket and must get CONTROL(ACK+RST), verno/ackno/nonce 0."""

    async def main() -> None:
        async with Host(["127.0.0.1:0"]) as server:
            listener = await server.listen("dg-only-syns", kind="datagram")
            sid = pyserval.ServiceID.parse("dg-only-syns").to_bytes()
            src = pyserval.ServiceID.parse("raw").to_bytes()
            exts = b"\x20\x24\0\0" + sid + b"\x20\x24\0\0" + src
            head = struct.pack("!IIBBH", 0x1234, 0, 21, 17, 0) + exts
            total = sum(struct.unpack("!42H", head))
            while total >> 16:
                total = (total & 0xFFFF) + (total >> 16)
            head = head[:10] + struct.pack("!H", ~total & 0xFFFF) + head[12:]
            pkt = head + struct.pack("!HHHH", 0, 0, 12, 0) + b"ping"
            raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            raw.bind(("127.0.0.1", 0))
            raw.setblocking(False)
            try:
                loop = asyncio.get_running_loop()
                await loop.sock_sendto(raw, pkt, server.addresses[0])
                answer = await asyncio.wait_for(loop.sock_recv(raw, 2048), 5)
            finally:
                raw.close()
            reply = decode_packet(answer)
            ctl = reply.control
            assert ctl is not None
            assert (reply.dst_flowid, reply.protocol) == (0x1234, 17)
            assert ctl.flags == ControlFlags.ACK | ControlFlags.RST
            assert (ctl.verno, ctl.ackno, ctl.nonce) == (0, 0, bytes(8))
            assert len(answer) == 32
            await listener.aclose()

    asyncio.run(main())


def test_migration_of_a_datagram_flow_on_loopback() -> None:
    async def main() -> None:
        async with Host(["127.0.0.1:0"]) as server, Host(["127.0.0.1:0"]) as client:
            listener = await server.listen("dg-move", kind="datagram")
            _route(client, server, "dg-move")
            flow = await client.connect("dg-move", kind="datagram")
            peer = await asyncio.wait_for(listener.accept(), 5)
            second = client.add_interface("127.0.0.1:0")
            await flow.migrate(second)
            assert flow.local_address == second
            await flow.send(b"from the new interface")
            assert await asyncio.wait_for(peer.receive(), 5) == b"from the new interface"
            assert peer.remote_address == second
            await peer.send(b"reply")
            assert await asyncio.wait_for(flow.receive(), 5) == b"reply"
            # The interface goes away: the flow moves by itself to the one that remains.
            await client.remove_interface(second)
            assert flow.local_address == client.addresses[0] != second
            await flow.send(b"after removal")
            assert await asyncio.wait_for(peer.receive(), 5) == b"after removal"
            assert peer.remote_address == client.addresses[0]
            await flow.aclose()
            await peer.aclose()

    asyncio.run(main())


def test_host_close_ends_open_flows_with_sal_fin() -> None:
    async def main() -> None:
        async with Host(["127.0.0.1:0"]) as server:
            listener = await server.listen("dg-bye", kind="datagram")
            client = Host(["127.0.0.1:0"])
            await client.start()
            _route(client, server, "dg-bye")
            flow = await client.connect("dg-bye", kind="datagram")
            peer = await asyncio.wait_for(listener.accept(), 5)
            await flow.send(b"before close")
            closing = asyncio.ensure_future(client.close(timeout=5))
            assert await asyncio.wait_for(peer.receive(), 5) == b"before close"
            with pytest.raises(anyio.EndOfStream):
                await asyncio.wait_for(peer.receive(), 5)
            await peer.aclose()
            await asyncio.wait_for(closing, 6)
            assert flow.connection.fin_acked  # the close waited for the SAL FIN's ACK

    asyncio.run(main())


def test_a_burst_larger_than_the_queue_is_not_dropped_locally() -> None:
    async def main() -> None:
        async with Host(["127.0.0.1:0"]) as server, Host(["127.0.0.1:0"]) as client:
            listener = await server.listen("dg-burst", kind="datagram")
            _route(client, server, "dg-burst")
            flow = await client.connect("dg-burst", kind="datagram")
            peer = await asyncio.wait_for(listener.accept(), 5)
            for i in range(3000):  # three times the queue, with no pause of our own
                await flow.send(b"%d" % i)
            await asyncio.sleep(0.01)  # the last flush
            assert flow.dropped == 0 and flow.connection.sent == 3000
            got: list[bytes] = []
            with pytest.raises(TimeoutError):
                while True:
                    got.append(await asyncio.wait_for(peer.receive(), 0.5))
            # The receiver read nothing meanwhile: its queue kept the first 1,024 that
            # reached it (and a few still in the socket buffer once reading made room) and
            # counted the rest; the loopback socket buffer may drop some too.
            assert peer.connection.received == len(got) >= 1024
            assert got == sorted(got, key=int) and len(set(got)) == len(got)
            assert len(got) + peer.dropped <= 3000 and peer.dropped > 0
            s = client.socket("datagram")
            await s.connect("dg-burst")
            with pytest.raises(pyserval.SocketClosed):
                await s.sendto(b"x", "dg-burst")  # connected: send, not sendto
            await s.close()

    asyncio.run(main())

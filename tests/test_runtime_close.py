"""Closing a host on real loopback sockets: what it still sends to its peers."""

from __future__ import annotations

import asyncio
from typing import cast

import anyio
import pytest

from pyserval.runtime.host import Host
from pyserval.runtime.streams import ServalStream
from pyserval.sal import ControlFlags, decode_packet
from pyserval.sal.inet import Address
from pyserval.transport.connection import State


class _Relay(asyncio.DatagramProtocol):
    """A UDP relay on loopback between one client and one server that records what the
    client sends (the bytes as they left the client's socket)."""

    def __init__(self, server: Address) -> None:
        self.server = server
        self.client: Address | None = None
        self.from_client: list[bytes] = []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Address) -> None:
        assert self.transport is not None
        if addr == self.server:
            if self.client is not None:
                self.transport.sendto(data, self.client)
            return
        self.client = addr
        self.from_client.append(data)
        self.transport.sendto(data, self.server)


async def _echo(stream: ServalStream) -> None:
    try:
        while True:
            await stream.send(await stream.receive())
    except anyio.EndOfStream:
        await stream.send_eof()


def test_host_close_sends_nothing_to_a_flow_in_time_wait() -> None:
    async def main() -> None:
        async with Host(["127.0.0.1:0"]) as server:
            listener = await server.listen("echo")
            serving = asyncio.ensure_future(listener.serve(_echo))
            loop = asyncio.get_running_loop()
            transport, relay = await loop.create_datagram_endpoint(
                lambda: _Relay(server.addresses[0]), local_addr=("127.0.0.1", 0)
            )
            try:
                client = await Host(["127.0.0.1:0"]).start()
                client.add_route("echo", "{}:{}".format(*transport.get_extra_info("sockname")))
                stream = await client.connect("echo")
                await stream.send(b"ping")
                assert await stream.receive() == b"ping"
                await stream.send_eof()  # we close first: our side ends in TIME_WAIT
                with pytest.raises(anyio.EndOfStream):
                    await stream.receive()
                conn = stream.connection
                for _ in range(400):
                    if conn.state is State.TIME_WAIT:
                        break
                    await asyncio.sleep(0.005)
                assert conn.state is State.TIME_WAIT
                await asyncio.sleep(0.05)  # anything the close itself still owed has gone
                seen = len(relay.from_client)
                await client.close()
                await asyncio.sleep(0.2)
                late = [decode_packet(d) for d in relay.from_client[seen:]]
                assert late == [], [(p.control.flags if p.control else None, p.tcp) for p in late]
                # The capture did see the flow's own packets, its SAL FIN among them.
                flags = [decode_packet(d).control for d in relay.from_client[:seen]]
                assert any(c is not None and c.flags & ControlFlags.FIN for c in flags)
                assert conn.closed  # TIME_WAIT ended with the host
            finally:
                transport.close()
                serving.cancel()

    asyncio.run(main())


async def _pair(server: Host, client: Host) -> asyncio.Future[ServalStream]:
    """Listen on ``server`` for "at-once" and route the client there; the future is the
    server's side of the next stream."""
    listener = await server.listen("at-once")
    ip, port = server.addresses[0]
    client.add_route("at-once", f"{ip}:{port}")
    return asyncio.ensure_future(listener.accept())


@pytest.mark.parametrize("how", ["aclose", "send_eof", "abort"])
def test_a_close_leaves_within_the_call_that_causes_it(how: str) -> None:
    """The FIN (or RST) of aclose, send_eof and abort is on the wire when the call returns,
    not at the end of the loop pass: the peer starts on it at once (a sequential connect
    loop ran about 30% more connections per second that way)."""

    async def main() -> None:
        async with Host(["127.0.0.1:0"]) as server, Host(["127.0.0.1:0"]) as client:
            accepted = await _pair(server, client)
            stream = await client.connect("at-once")
            await accepted
            await asyncio.sleep(0.05)  # the handshake's last ACK has gone and been read
            sent = client.endpoints[0].stats
            before = sent.datagrams_sent
            await getattr(stream, how)()
            # exactly the one datagram, and no loop pass in between
            assert sent.datagrams_sent == before + 1

    asyncio.run(main())


def test_a_connect_sends_its_syn_before_it_first_waits() -> None:
    """connect's SYN leaves in the same loop step that creates the connection, before the
    call waits for the answer (not one pass later)."""

    async def main() -> None:
        async with Host(["127.0.0.1:0"]) as server, Host(["127.0.0.1:0"]) as client:
            accepted = await _pair(server, client)
            sent = client.endpoints[0].stats
            before = sent.datagrams_sent
            connecting = asyncio.ensure_future(client.connect("at-once"))
            # One step: the connect task runs up to its first wait (it was scheduled
            # before this task's own next step); the pass that would run an end-of-pass
            # flush comes after this check.
            await asyncio.sleep(0)
            assert sent.datagrams_sent == before + 1
            stream = await connecting
            await accepted
            await stream.aclose()

    asyncio.run(main())

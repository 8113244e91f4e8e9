"""Multipath on real loopback sockets: the client (127.0.0.2, 127.0.0.3) adds a path to the
address the server (127.0.0.1, 127.0.0.4) advertised, and loses an interface mid-transfer."""

from __future__ import annotations

import asyncio
import hashlib

import pytest

from pyserval.runtime.host import Host
from pyserval.runtime.streams import ServalMigrationError
from pyserval.transport.config import StreamConfig
from pyserval.transport.events import Event, PathAdded, PathFailed

from .helpers.sinks import digest_sink

CFG = StreamConfig(mss=8192, send_buffer=2 << 20, receive_buffer=2 << 20, multipath=True)
DATA = bytes(range(256)) * 40_000  # 10 MB


def test_a_second_path_to_an_advertised_address_then_an_interface_lost() -> None:
    async def main() -> None:
        server = await Host(["127.0.0.1:0", "127.0.0.4:0"], stream_config=CFG).start()
        client = await Host(["127.0.0.2:0", "127.0.0.3:0"], stream_config=CFG).start()
        events: list[Event] = []
        client.add_event_hook(events.append)
        listener = await server.listen("bulk")
        client.add_route("bulk", "{}:{}".format(*server.addresses[0]))
        digest: asyncio.Future[tuple[int, str]] = asyncio.get_running_loop().create_future()
        serving = asyncio.ensure_future(listener.serve(lambda s: digest_sink(s, digest)))
        stream = await client.connect("bulk")
        assert stream.multipath
        for _ in range(100):  # the server's ADD_ADDR comes with its first ACKs
            if stream.peer_addresses:
                break
            await asyncio.sleep(0.01)
        assert stream.peer_addresses == [server.addresses[1]]
        first, second = client.addresses
        await stream.add_path(second, stream.peer_addresses[0])
        assert stream.paths == [
            (first, server.addresses[0]),
            (second, server.addresses[1]),
        ]
        chunk = len(DATA) // 20
        for i in range(20):
            if i == 10:  # half sent: the first interface goes away
                await client.remove_interface(first)
            await stream.send(DATA[i * chunk : (i + 1) * chunk])
        await stream.send_eof()
        n, hexdigest = await asyncio.wait_for(digest, 30)
        assert n == len(DATA) and hexdigest == hashlib.sha256(DATA).hexdigest()
        assert stream.paths == [(second, server.addresses[1])]
        assert any(isinstance(e, PathAdded) for e in events)
        assert any(isinstance(e, PathFailed) for e in events)
        with pytest.raises(ServalMigrationError, match="not an interface"):
            await stream.add_path("127.0.0.9:1", server.addresses[0])
        serving.cancel()
        await client.close()
        await server.close()

    asyncio.run(main())


def test_add_path_on_a_single_path_connection_says_why_not() -> None:
    async def main() -> None:
        plain = StreamConfig(mss=8192)
        async with (
            Host(["127.0.0.1:0"], stream_config=plain) as server,
            Host(["127.0.0.2:0", "127.0.0.3:0"], stream_config=plain) as client,
        ):
            listener = await server.listen("x")
            client.add_route("x", "{}:{}".format(*server.addresses[0]))
            serving = asyncio.ensure_future(listener.serve(lambda s: asyncio.sleep(1)))
            stream = await client.connect("x")
            assert not stream.multipath
            with pytest.raises(ServalMigrationError, match="not multipath"):
                await stream.add_path(client.addresses[1], server.addresses[0])
            serving.cancel()

    asyncio.run(main())

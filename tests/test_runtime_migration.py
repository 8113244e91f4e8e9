"""Migration on real loopback sockets: one client host with two addresses (127.0.0.2 and
127.0.0.3) moves a stream between them in the middle of a transfer."""

from __future__ import annotations

import asyncio
import hashlib

import pytest

from pyserval.runtime.host import Host
from pyserval.runtime.streams import ServalMigrationError, ServalStream
from pyserval.transport.config import StreamConfig
from pyserval.transport.events import Event, FlowMigrated

from .helpers.sinks import digest_sink

CFG = StreamConfig(mss=8192, send_buffer=2 << 20, receive_buffer=2 << 20)
DATA = bytes(range(256)) * 40_000  # 10 MB


async def _setup() -> tuple[Host, Host, ServalStream, asyncio.Future[tuple[int, str]]]:
    server = await Host(["127.0.0.1:0"], stream_config=CFG).start()
    client = await Host(["127.0.0.2:0"], stream_config=CFG).start()
    listener = await server.listen("bulk")
    client.add_route("bulk", "{}:{}".format(*server.addresses[0]))
    digest: asyncio.Future[tuple[int, str]] = asyncio.get_running_loop().create_future()
    serving = asyncio.ensure_future(listener.serve(lambda s: digest_sink(s, digest)))
    digest.add_done_callback(lambda _: serving.cancel())
    stream = await client.connect("bulk")
    return server, client, stream, digest


def test_stream_migrates_between_two_loopback_addresses_mid_transfer() -> None:
    async def main() -> None:
        server, client, stream, digest = await _setup()
        seen: list[Event] = []
        server.add_event_hook(seen.append)
        second = client.add_interface("127.0.0.3:0")
        assert second[0] == "127.0.0.3"

        chunk = len(DATA) // 20
        mover = None
        for i in range(20):
            if i == 10:  # half sent, the rest queued behind data in flight: move now
                mover = asyncio.ensure_future(stream.migrate(f"{second[0]}:{second[1]}"))
            await stream.send(DATA[i * chunk : (i + 1) * chunk])
        await stream.send_eof()
        assert mover is not None
        await mover
        n, hexdigest = await asyncio.wait_for(digest, 30)
        assert n == len(DATA) and hexdigest == hashlib.sha256(DATA).hexdigest()
        assert stream.local_address == second and stream.paths == [(second, server.addresses[0])]
        moved = [e for e in seen if isinstance(e, FlowMigrated)]
        assert moved and moved[0].remote == second and moved[0].reason == "peer_moved"
        await client.close()
        await server.close()

    asyncio.run(main())


def test_removing_an_interface_moves_its_flows_and_set_address_too() -> None:
    async def main() -> None:
        server, client, stream, digest = await _setup()
        first = client.addresses[0]
        second = client.add_interface("127.0.0.3:0")
        sending = asyncio.ensure_future(stream.send(DATA))
        await asyncio.sleep(0)  # the first window is on its way
        await client.remove_interface(f"{first[0]}:{first[1]}")
        assert client.addresses == [second] and stream.local_address == second
        third = await client.set_address(second, "127.0.0.2:0")
        assert client.addresses == [third] and stream.local_address == third
        await sending
        await stream.send_eof()
        n, hexdigest = await asyncio.wait_for(digest, 30)
        assert n == len(DATA) and hexdigest == hashlib.sha256(DATA).hexdigest()
        with pytest.raises(ValueError, match="last interface"):
            await client.remove_interface(third)
        with pytest.raises(ServalMigrationError, match="not an interface"):
            await stream.migrate("127.0.0.9:1")
        await client.close()
        await server.close()

    asyncio.run(main())

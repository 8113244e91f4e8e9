"""Ported programs keep working while the client host moves to another address mid-transfer.

Each test runs one library's client and server (or the real server behind an in-process
outbound translator) on one event loop, through ``pyserval.install``: the server host serves
``NAME.serval``, the client host connects. The client host has two loopback addresses; in the
middle of a transfer its first interface is taken away (``Host.remove_interface``), which
migrates every flow on it (RSYN) to the second. The program is not told: its data must come
through byte-exact (checked by SHA-256 or the server's own state), and the server host must
have seen each flow move (``FlowMigrated`` events, ``peer_moved``).
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

import pyserval
from pyserval import Host
from pyserval.translator import Translator
from pyserval.transport.config import StreamConfig
from pyserval.transport.events import Event, FlowMigrated

from .test_translator_programs import Cluster, free_port, needs, program

pytestmark = pytest.mark.timeout(90)

CFG = StreamConfig(send_buffer=1 << 20, receive_buffer=1 << 20)
Move = Callable[[], Awaitable[None]]


def library(name: str) -> pytest.MarkDecorator:
    missing = importlib.util.find_spec(name) is None
    return pytest.mark.skipif(missing, reason=f"python package not installed: {name}")


class Moving:
    """A server host and a two-address client host, both installed on the running loop."""

    def __init__(self, server: Host, client: Host) -> None:
        self.server = server
        self.client = client
        self.migrated: list[FlowMigrated] = []
        self.moves = 0
        self.progress = 0  # how far the workload is (its own unit), set by the workload
        self.progress_at_move = -1  # ... when the move was confirmed
        self._mover: asyncio.Task[None] | None = None
        server.add_event_hook(self._on_event)

    def _on_event(self, event: Event) -> None:
        if isinstance(event, FlowMigrated):
            self.migrated.append(event)

    def move_soon(self) -> None:
        """Take the client's first interface away, in the background (once)."""
        if self._mover is None:
            self._mover = asyncio.ensure_future(self._move())

    async def _move(self) -> None:
        first = self.client.addresses[0]
        await self.client.remove_interface(f"{first[0]}:{first[1]}", timeout=10)
        self.progress_at_move = self.progress
        self.moves += 1

    async def finish(self, total: int) -> None:
        """Wait for the move; check it completed before the workload did (``total``, in
        the workload's unit) and the server saw the client's flows arrive from the second
        address."""
        assert self._mover is not None, "the workload never moved the client"
        await self._mover
        assert 0 <= self.progress_at_move < total, (self.progress_at_move, total)
        second = self.client.addresses[0]
        assert second[0] == "127.0.0.3"
        assert self.migrated, "the server saw no flow move"
        assert {e.remote for e in self.migrated} == {second}
        assert {e.reason for e in self.migrated} == {"peer_moved"}


@asynccontextmanager
async def moving(*services: str) -> AsyncIterator[Moving]:
    async with (
        Host(["127.0.0.1:0"], stream_config=CFG) as server,
        Host(["127.0.0.2:0"], stream_config=CFG) as client,
    ):
        client.add_interface("127.0.0.3:0")
        for name in services:
            client.add_route(name, "{}:{}".format(*server.addresses[0]))
        with (
            pyserval.install(server, connect=False),
            pyserval.install(client, serve=False),
        ):
            yield Moving(server, client)


@library("websockets")
def test_websockets_echo_of_1mb_messages_survives_a_client_move() -> None:
    from websockets.asyncio.client import connect
    from websockets.asyncio.server import ServerConnection, serve

    async def echo(ws: ServerConnection) -> None:
        async for message in ws:
            await ws.send(message)

    async def main() -> None:
        async with moving("echo") as m, serve(echo, "echo.serval", 0, max_size=2**21):
            async with connect("ws://echo.serval/", max_size=2**21) as ws:
                for i in range(8):
                    message = os.urandom(1_000_000)
                    await ws.send(message)
                    if i == 3:
                        m.move_soon()  # while this message is on its way out and back
                    back = await ws.recv()
                    m.progress = i + 1
                    assert hashlib.sha256(back).digest() == hashlib.sha256(message).digest()  # type: ignore[arg-type]
                assert ws.local_address[0] == "127.0.0.3"
            await m.finish(8)

    asyncio.run(main())


@library("aiohttp")
def test_aiohttp_streamed_get_survives_a_client_move() -> None:
    import aiohttp
    from aiohttp import web

    body = os.urandom(20_000_000)

    async def data(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_length = len(body)
        await response.prepare(request)
        for i in range(0, len(body), 1 << 16):
            await response.write(body[i : i + (1 << 16)])
        await response.write_eof()
        return response

    class ServalConnector(aiohttp.BaseConnector):
        async def _create_connection(self, req: Any, traces: Any, timeout: Any) -> Any:
            _, protocol = await self._loop.create_connection(self._factory, req.host, req.port)
            return protocol

    async def main() -> None:
        async with moving("web") as m:
            app = web.Application()
            app.add_routes([web.get("/data", data)])
            runner = web.AppRunner(app)
            await runner.setup()
            await web.TCPSite(runner, "web.serval", 80).start()
            got, n = hashlib.sha256(), 0
            async with (
                aiohttp.ClientSession(connector=ServalConnector()) as session,
                session.get("http://web.serval/data") as resp,
            ):
                async for chunk in resp.content.iter_chunked(1 << 16):
                    got.update(chunk)
                    n += len(chunk)
                    m.progress = n
                    if n >= len(body) // 4:
                        m.move_soon()
            assert n == len(body) and got.digest() == hashlib.sha256(body).digest()
            await m.finish(len(body))
            await runner.cleanup()

    asyncio.run(main())


@library("asyncssh")
def test_asyncssh_sftp_upload_survives_a_client_move(tmp_path: Path) -> None:
    import asyncssh

    payload = os.urandom(10_000_000)
    (tmp_path / "root").mkdir()
    (tmp_path / "up.bin").write_bytes(payload)
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    client_key = asyncssh.generate_private_key("ssh-ed25519")

    async def main() -> None:
        async with moving("ssh") as m:
            server = await asyncssh.listen(
                "ssh.serval",
                22,
                server_host_keys=[host_key],
                authorized_client_keys=asyncssh.import_authorized_keys(
                    client_key.export_public_key().decode()
                ),
                sftp_factory=lambda chan: asyncssh.SFTPServer(
                    chan, chroot=os.fsencode(tmp_path / "root")
                ),
            )

            def progress(src: bytes, dst: bytes, copied: int, total: int) -> None:
                m.progress = copied
                if copied >= total // 4:
                    m.move_soon()

            async with (
                asyncssh.connect(
                    "ssh.serval",
                    22,
                    username="serval",
                    client_keys=[client_key],
                    known_hosts=([host_key.convert_to_public()], [], []),
                ) as conn,
                conn.start_sftp_client() as sftp,
            ):
                await sftp.put(str(tmp_path / "up.bin"), "copy.bin", progress_handler=progress)
            copy = (tmp_path / "root" / "copy.bin").read_bytes()
            assert hashlib.sha256(copy).digest() == hashlib.sha256(payload).digest()
            await m.finish(len(payload))
            server.close()

    asyncio.run(main())


@pytest.fixture
def cluster(tmp_path: Path) -> Any:
    processes = Cluster(tmp_path)
    try:
        yield processes
    finally:
        processes.close()


@needs("redis-server")
@library("redis")
def test_redis_py_set_get_survives_a_client_move(cluster: Cluster) -> None:
    import redis.asyncio as redis

    port = free_port()
    argv = [str(program("redis-server")), "--port", str(port), "--bind", "127.0.0.1"]
    cluster.server([*argv, "--save", "", "--appendonly", "no", "--dir", str(cluster.tmp)], port)

    async def main() -> None:
        async with moving("redis") as m:
            target = f"tcp:127.0.0.1:{port}"
            async with Translator("service:redis", target, host=m.server):
                client = redis.Redis(host="redis.serval", port=6379)
                for i in range(3000):
                    if i == 1000:
                        m.move_soon()
                    await client.set(f"key:{i}", f"value:{i}")
                    assert await client.get(f"key:{i}") == f"value:{i}".encode()
                    m.progress = i + 1
                await m.finish(3000)
                await client.aclose()
        direct = redis.Redis(host="127.0.0.1", port=port)
        assert await direct.dbsize() == 3000
        assert await direct.get("key:2999") == b"value:2999"
        await direct.aclose()

    asyncio.run(main())


@needs("memcached")
@library("aiomcache")
def test_aiomcache_set_get_survives_a_client_move(cluster: Cluster) -> None:
    import aiomcache

    port = free_port()
    argv = [str(program("memcached")), "-l", "127.0.0.1", "-p", str(port), "-U", "0"]
    cluster.server([*argv, "-u", "nobody"], port)

    async def main() -> None:
        async with moving("memcached") as m:
            target = f"tcp:127.0.0.1:{port}"
            async with Translator("service:memcached", target, host=m.server):
                client = aiomcache.Client("memcached.serval", 11211, pool_size=1)
                for i in range(1000):
                    if i == 300:
                        m.move_soon()
                    await client.set(b"key:%d" % i, b"value:%d" % i)
                    assert await client.get(b"key:%d" % i) == b"value:%d" % i
                    m.progress = i + 1
                got = await client.multi_get(b"key:0", b"key:999")
                assert got == (b"value:0", b"value:999")
                await m.finish(1000)
                await client.close()

    asyncio.run(main())

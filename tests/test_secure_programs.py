"""``secure=True`` where programs meet it: the translator (an unmodified TCP client and
server with an authenticated, encrypted hop across Serval, half-close included), and the
command line (``pyserval key`` files, ``pyserval echo --secure`` in a child process,
clear refusals of names)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from pyserval.naming import ServiceKey
from pyserval.runtime.host import Host
from pyserval.runtime.secure import SecureStream, ServalSecurityError
from pyserval.translator import Translator

from .helpers.processes import Peer, child_env

pytestmark = pytest.mark.timeout(60)

STEP = 5.0
MB = 1 << 20


def text(address: tuple[str, int]) -> str:
    return f"{address[0]}:{address[1]}"


async def read_all(reader: asyncio.StreamReader) -> bytes:
    return await reader.read()


@contextlib.asynccontextmanager
async def tcp_echo_hash() -> AsyncIterator[tuple[str, int]]:
    """A TCP server that reads to end of stream, then sends back SHA-256 + the length."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read()
        writer.write(hashlib.sha256(data).digest() + len(data).to_bytes(8, "big"))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        name = server.sockets[0].getsockname()
        yield (name[0], name[1])
    finally:
        server.close()


def test_translators_carry_tcp_across_a_secure_hop_exactly() -> None:
    async def main() -> None:
        service, instance = ServiceKey.generate(), ServiceKey.generate()
        sid = service.service_id("0a0b/16")
        delegation = service.delegate(instance, valid_for=600)
        payload = os.urandom(3 * MB)
        async with tcp_echo_hash() as tcp:
            out = Translator(
                f"service:{sid.hex}",
                f"tcp:{text(tcp)}",
                secure=True,
                key=instance,
                delegation=delegation,
            )
            async with out:
                inb = Translator(
                    "tcp:127.0.0.1:0",
                    f"service:{sid.hex}",
                    routes={sid.hex: text(out.serval_addresses[0])},
                    secure=True,
                )
                async with inb:
                    assert inb.tcp_address is not None
                    reader, writer = await asyncio.open_connection(*inb.tcp_address)
                    writer.write(payload)
                    await writer.drain()
                    writer.write_eof()  # the half-close crosses the TLS hop
                    reply = await asyncio.wait_for(read_all(reader), 30)
                    writer.close()
                    assert reply == hashlib.sha256(payload).digest() + len(payload).to_bytes(
                        8, "big"
                    )
                    async with asyncio.timeout(STEP):
                        while inb.active or out.active:
                            await asyncio.sleep(0.01)
                    assert inb.stats.closed == 1 and out.stats.closed == 1
                    assert inb.stats.tcp_to_serval == len(payload)

    asyncio.run(main())


def test_a_secure_inbound_translator_refuses_a_plaintext_service(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        key = ServiceKey.generate()
        sid = key.service_id("0a0b/16")

        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await reader.read(65536):
                    writer.write(data)  # a TLS ClientHello comes back as it went
            writer.close()

        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        tcp = server.sockets[0].getsockname()
        async with (
            server,
            Translator(f"service:{sid.hex}", f"tcp:{text(tcp)}") as plain_out,
        ):
            inb = Translator(
                "tcp:127.0.0.1:0",
                f"service:{sid.hex}",
                routes={sid.hex: text(plain_out.serval_addresses[0])},
                secure=True,
            )
            async with inb:
                assert inb.tcp_address is not None
                reader, writer = await asyncio.open_connection(*inb.tcp_address)
                writer.write(b"not for a plaintext service")
                with contextlib.suppress(ConnectionResetError):
                    assert await asyncio.wait_for(reader.read(), STEP) == b""
                writer.close()
                assert inb.stats.failed == 1

    with caplog.at_level(logging.WARNING, logger="pyserval.translator"):
        asyncio.run(main())
    assert any("no TLS 1.3 handshake" in r.getMessage() for r in caplog.records)


def test_a_secure_translator_for_a_name_says_why_not() -> None:
    with pytest.raises(ServalSecurityError, match="is a name"):
        Translator("tcp:127.0.0.1:0", "service:web", secure=True)
    sid = ServiceKey.generate().service_id()
    with pytest.raises(ValueError, match="needs key"):
        Translator(f"service:{sid.hex}", "tcp:127.0.0.1:1", secure=True)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pyserval", *args],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_cli_keys_and_a_secure_echo_with_a_delegated_key(tmp_path: os.PathLike[str]) -> None:
    service_file = os.path.join(tmp_path, "service.key")
    instance_file = os.path.join(tmp_path, "instance.key")
    delegation_file = os.path.join(tmp_path, "instance.delegation")
    made = _cli("key", "new", service_file, "--prefix", "0a0b/16")
    assert made.returncode == 0, made.stderr
    sid_hex = made.stdout.strip()
    assert os.stat(service_file).st_mode & 0o777 == 0o600
    service = ServiceKey.from_private_bytes(bytes.fromhex(Path(service_file).read_text()))
    assert service.service_id("0a0b/16").hex == sid_hex  # the file holds the printed ID's key
    assert _cli("key", "new", instance_file).returncode == 0
    done = _cli(
        "key",
        "delegate",
        "--service-key",
        service_file,
        "--instance-key",
        instance_file,
        "--valid-for",
        "600",
        "--out",
        delegation_file,
    )
    assert done.returncode == 0, done.stderr
    instance = ServiceKey.from_private_bytes(bytes.fromhex(Path(instance_file).read_text()))

    refused = _cli("echo", "--secure", "--key-file", service_file)  # --service defaults to a name
    assert refused.returncode == 2 and "is a name" in refused.stderr
    refused = _cli("echo", "--secure", "--key-file", instance_file, "--service", sid_hex)
    assert refused.returncode == 2 and "needs --delegation-file" in refused.stderr
    refused = _cli("translate", "--secure", "--from", "tcp:127.0.0.1:0", "--to", "service:web")
    assert refused.returncode == 2 and "is a name" in refused.stderr

    argv = ["-m", "pyserval", "echo", "--service", sid_hex, "--secure"]
    argv += ["--key-file", instance_file, "--delegation-file", delegation_file]
    with Peer(argv) as echo:
        line = echo.wait_for(r"serving .* at [\d.]+:\d+ \(secure\)", 15)
        m = re.search(r"at ([\d.]+):(\d+)", line)
        assert m is not None

        async def main() -> None:
            async with Host(["127.0.0.1:0"]) as client:
                client.add_route(sid_hex, f"{m[1]}:{m[2]}")
                stream = await client.connect(sid_hex, secure=True, timeout=STEP)
                assert isinstance(stream, SecureStream) and stream.peer is not None
                assert stream.peer.key == instance.public_key
                await stream.send(b"over TLS")
                assert await stream.receive() == b"over TLS"
                await stream.send_eof()
                with pytest.raises(anyio.EndOfStream):
                    await stream.receive()

        asyncio.run(main())

"""A dual-stack Serval peer for the IPv6 namespace tests: one server or client per process.

Run as a script (``PYTHONPATH`` must reach ``src``)::

    python tests/helpers/ipv6_peer.py serve --listen 10.0.0.1:54325,[fd00::1]:54325
    python tests/helpers/ipv6_peer.py upload --listen 10.0.0.2:0,[fd00::2]:0 \\
        --route 10.0.0.1:54325 --bytes 4000000 --move-remote [fd00::1]:54325

``serve`` prints ``READY {json}`` (its bound addresses) once listening and answers each
stream, after the client's EOF, with ``<sha256 hex> <byte count>\\n``. ``upload`` prints
``SENDING`` once connected and sends ``--bytes`` pseudo-random bytes; with
``--move-remote`` it moves the stream, halfway, to its last interface and the server's
address given there (an RSYN across IP families). It prints ``RESULT {json}`` and exits 0
when the digest matched.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import random
import signal
import sys

import anyio

import pyserval
from pyserval.transport.config import StreamConfig

CFG = StreamConfig(mss=8192, send_buffer=2 << 20, receive_buffer=2 << 20)
SERVICE = "v6test"


async def _digest(stream: pyserval.ServalStream) -> None:
    h = hashlib.sha256()
    n = 0
    with contextlib.suppress(anyio.EndOfStream):
        while True:
            chunk = await stream.receive(1 << 20)
            h.update(chunk)
            n += len(chunk)
    await stream.send(f"{h.hexdigest()} {n}\n".encode())
    await stream.aclose()


async def serve(args: argparse.Namespace) -> None:
    async with pyserval.Host(args.listen.split(","), stream_config=CFG) as host:
        listener = await host.listen(SERVICE)
        print("READY " + json.dumps(host.addresses), flush=True)
        await listener.serve(_digest)


async def upload(args: argparse.Namespace) -> int:
    data = random.Random(1).randbytes(args.bytes)
    async with pyserval.Host(args.listen.split(","), stream_config=CFG) as host:
        host.add_route(SERVICE, args.route)
        stream = await host.connect(SERVICE, timeout=10)
        first = stream.local_address
        print("SENDING", flush=True)
        half = len(data) // 2
        await stream.send(data[:half])
        if args.move_remote:
            await stream.migrate(host.addresses[-1], remote=args.move_remote, timeout=10)
        await stream.send(data[half:])
        await stream.send_eof()
        reply = b""
        with contextlib.suppress(anyio.EndOfStream):
            while True:
                reply += await stream.receive()
        digest, _, count = reply.decode().strip().partition(" ")
        ok = digest == hashlib.sha256(data).hexdigest() and count == str(len(data))
        print(
            "RESULT "
            + json.dumps(
                {
                    "ok": ok,
                    "first_local": first,
                    "local": stream.local_address,
                    "remote": stream.remote_address,
                    "auto_removed": host.auto_removed,
                    "reply": reply.decode().strip(),
                }
            ),
            flush=True,
        )
        await stream.aclose()
        return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--listen", required=True)
    c = sub.add_parser("upload")
    c.add_argument("--listen", required=True)
    c.add_argument("--route", required=True)
    c.add_argument("--bytes", type=int, default=4_000_000)
    c.add_argument("--move-remote")
    args = parser.parse_args(argv)
    if args.command == "serve":

        async def run() -> None:
            task = asyncio.current_task()
            assert task is not None
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, task.cancel)
            with contextlib.suppress(asyncio.CancelledError):
                await serve(args)

        asyncio.run(run())
        return 0
    return asyncio.run(upload(args))


if __name__ == "__main__":
    sys.exit(main())

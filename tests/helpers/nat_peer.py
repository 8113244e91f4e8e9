"""Instances and clients for the NAT tests in network namespaces (tests/test_netns_nat.py).

Run as a script (``PYTHONPATH`` must reach ``src``), each in its own namespace::

    python tests/helpers/nat_peer.py instance --router 192.0.2.1:7000 --listen 192.0.2.10:0
    python tests/helpers/nat_peer.py client CASE --router 192.0.2.1:7000 --listen 10.200.1.2:0

``instance`` (``--no-relay``: answer directly only, as before the RELAY extension)
registers with the router: ``nat-echo`` (echo until EOF), ``nat-digest`` (read to
EOF, answer ``<sha256 hex> <count>``), ``nat-late`` (read a line ``N``, wait N seconds with
nothing sent, then send ``late news``) and the datagram service ``nat-dgram`` (answers every
datagram with ``pong <data>`` to the address it came from). It prints ``READY`` and, when
stopped with SIGTERM, ``STATS {json}`` (its host's counters).

Clients print ``RESULT {json}`` and exit 0: ``connects`` (``--count`` connections one after
another, each echoing a message; connect times), ``upload`` (``--bytes`` to ``nat-digest``,
printing ``TRANSFERRING`` once a quarter is sent, then waiting ``--pause`` seconds so the
test can change the NAT; with ``--migrate-to IP`` it moves the stream there instead),
``late`` (asks ``nat-late`` for data after ``--wait`` idle seconds and reports when it came)
and ``datagrams`` (``--count`` datagrams to ``nat-dgram``, counting the answers).
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
import time
from typing import Any

import anyio

import pyserval
from pyserval.transport.config import StreamConfig
from pyserval.transport.events import DatagramReceived, Event

CHUNK = 1 << 16


def result(**fields: Any) -> None:
    print("RESULT " + json.dumps(fields), flush=True)


def config(args: argparse.Namespace) -> StreamConfig:
    if args.keepalive is None:
        return StreamConfig()
    return StreamConfig(keepalive=args.keepalive, keepalive_interval=args.keepalive)


async def _echo(stream: pyserval.ServalStream) -> None:
    with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
        while True:
            await stream.send(await stream.receive())


async def _digest(stream: pyserval.ServalStream) -> None:
    digest = hashlib.sha256()
    count = 0
    with contextlib.suppress(anyio.EndOfStream):
        while True:
            chunk = await stream.receive()
            digest.update(chunk)
            count += len(chunk)
    await stream.send(f"{digest.hexdigest()} {count}\n".encode())


async def _late(stream: pyserval.ServalStream) -> None:
    wait = float((await stream.receive()).decode())
    await asyncio.sleep(wait)
    await stream.send(b"late news")
    with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
        await stream.receive()


async def instance(args: argparse.Namespace) -> int:
    host = pyserval.Host(listen=[args.listen], router=args.router, stream_config=config(args))
    async with host:
        core = host.core
        assert core is not None
        core.nat_relay = not args.no_relay
        ep = host.bind_datagram("nat-dgram")

        def on_datagram(event: Event) -> None:
            if isinstance(event, DatagramReceived):
                # Back to the address it came from (what recvfrom/sendto do).
                source = event.source_service
                assert source is not None  # our clients' sockets are bound to a serviceID
                core.send_datagram(ep, source, b"pong " + event.data, event.address)
                host.schedule_flush()

        host.watch(ep.flowid, on_datagram)
        handlers = {"nat-echo": _echo, "nat-digest": _digest, "nat-late": _late}
        listeners = [await host.listen(name) for name in handlers]
        await asyncio.sleep(0.5)  # the registrations reach the router
        print("READY", flush=True)
        try:
            async with anyio.create_task_group() as tg:
                for listener, handler in zip(listeners, handlers.values(), strict=True):
                    tg.start_soon(listener.serve, handler)
        finally:
            stats = {
                "stats": dict(core.stats),
                "drops": dict(core.drops),
                "internal_errors": [repr(e) for e in core.internal_errors],
            }
            print("STATS " + json.dumps(stats), flush=True)
    return 0


async def connects(host: pyserval.Host, args: argparse.Namespace) -> int:
    times, failures = [], []
    for i in range(args.count):
        message = f"hello {i} through the NAT".encode()
        start = time.perf_counter()
        try:
            stream = await host.connect("nat-echo", timeout=args.connect_timeout)
            times.append(time.perf_counter() - start)
            await stream.send(message)
            got = b""
            while len(got) < len(message):
                got += await stream.receive()
            await stream.aclose()
            if got != message:
                failures.append(f"{i}: {got!r}")
        except Exception as exc:
            failures.append(f"{i}: {exc!r}")
    result(ok=args.count - len(failures), failures=failures, connect_s=times)
    return 0


async def upload(host: pyserval.Host, args: argparse.Namespace) -> int:
    data = random.Random(7).randbytes(args.bytes)
    started = time.perf_counter()
    stream = await host.connect("nat-digest", timeout=10)
    quarter = len(data) // 4
    await stream.send(data[:quarter])
    print("TRANSFERRING", flush=True)
    moved_in = None
    if args.migrate_to:
        local = host.add_interface(f"{args.migrate_to}:0")
        start = time.perf_counter()
        await stream.migrate(f"{local[0]}:{local[1]}")
        moved_in = time.perf_counter() - start
    else:
        await asyncio.sleep(args.pause)
    for i in range(quarter, len(data), CHUNK):
        await stream.send(data[i : i + CHUNK])
    await stream.send_eof()
    reply = b""
    with contextlib.suppress(anyio.EndOfStream):
        while True:
            reply += await stream.receive()
    seconds = time.perf_counter() - started - (0.0 if args.migrate_to else args.pause)
    want = f"{hashlib.sha256(data).hexdigest()} {len(data)}\n".encode()
    sf = stream.connection.primary
    result(
        ok=reply == want,
        seconds=seconds,
        mb_per_s=len(data) / seconds / 1e6,
        reply=reply.decode(errors="replace"),
        migrated_s=moved_in,
        local=list(sf.local_addr),
        remote=list(sf.remote_addr or ("", 0)),
    )
    return 0


async def late(host: pyserval.Host, args: argparse.Namespace) -> int:
    stream = await host.connect("nat-late", timeout=10)
    asked = time.perf_counter()
    await stream.send(str(args.wait).encode())
    got = await stream.receive()
    took = time.perf_counter() - asked
    await stream.aclose()
    result(ok=got == b"late news", after_s=took, error=stream.connection.error)
    return 0


async def datagrams(host: pyserval.Host, args: argparse.Namespace) -> int:
    core = host.core
    assert core is not None
    ep = host.bind_datagram("nat-client", register=False)
    answers: list[tuple[bytes, Any, Any]] = []
    host.watch(
        ep.flowid,
        lambda e: (
            answers.append((e.data, e.address, e.via)) if isinstance(e, DatagramReceived) else None
        ),
    )
    for i in range(args.count):
        core.send_datagram(ep, "nat-dgram", b"ping %d" % i)
        host.schedule_flush()
        await asyncio.sleep(0.005)
    deadline = time.monotonic() + 5
    while len(answers) < args.count and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    want = {b"pong ping %d" % i for i in range(args.count)}
    result(
        ok=len({a[0] for a in answers} & want),
        sources=sorted({f"{a[1][0]}:{a[1][1]} via {a[2]}" for a in answers}),
    )
    return 0


CASES = {"connects": connects, "upload": upload, "late": late, "datagrams": datagrams}


async def client(args: argparse.Namespace) -> int:
    host = pyserval.Host(listen=[args.listen], router=args.router, stream_config=config(args))
    async with host:
        return await CASES[args.case](host, args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("instance", "client"):
        p = sub.add_parser(name)
        p.add_argument("--router", required=True)
        p.add_argument("--listen", required=True)
        p.add_argument("--keepalive", type=float)
        if name == "client":
            p.add_argument("case", choices=sorted(CASES))
            p.add_argument("--count", type=int, default=20)
            p.add_argument("--bytes", type=int, default=10 << 20)
            p.add_argument("--pause", type=float, default=1.0)
            p.add_argument("--migrate-to")
            p.add_argument("--wait", type=float, default=5.0)
            p.add_argument("--connect-timeout", type=float, default=10.0)
        else:
            p.add_argument("--no-relay", action="store_true", help="answer SYNs directly only")
    args = parser.parse_args(argv)

    async def run() -> int:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
        try:
            return await (instance(args) if args.command == "instance" else client(args))
        except asyncio.CancelledError:
            return 0

    return asyncio.run(run())


if __name__ == "__main__":
    sys.exit(main())

"""A Serval peer for the multi-process tests: one server or client per process.

Run as a script (``PYTHONPATH`` must reach ``src``)::

    python tests/helpers/serval_peer.py serve --listen 127.0.0.1:0 --mode digest
    python tests/helpers/serval_peer.py upload --route 127.0.0.1:PORT --bytes 50000000

``serve`` prints ``listening on IP:PORT service <hex>`` once ready (flushed) and, when it is
stopped with SIGTERM or SIGINT, one line ``STATS {json}`` with the host's drop counters and
internal errors. Its modes:

- ``echo``: send back every chunk until the client's EOF, then close;
- ``digest``: read everything until EOF, then reply ``<sha256 hex> <byte count>\\n`` (a reply
  that exists only after the half-close);
- ``reverse``: read everything until EOF, then reply with the bytes reversed;
- ``source``: send pseudo-random bytes without end (the client reads);
- ``hold``: send one line, then nothing (``until-error --direction idle`` waits in receive).

Clients print one line ``RESULT {json}`` and exit 0 on success:

- ``upload``: send ``--bytes`` pseudo-random bytes to a ``digest`` server, half-close, check
  the digest; reports seconds and throughput;
- ``many``: open ``--count`` connections at once from one host to an ``echo`` server, each
  echoing a small message;
- ``until-error``: transfer (``--direction up`` to a ``digest`` server, ``down`` from a
  ``source`` server) and print ``TRANSFERRING`` once data flows; then keep going until the
  library raises, and report which error and when (``time.time()``). Exit 3 when nothing
  was raised within ``--deadline`` seconds (a hang).

Stream settings (``--mss``, ``--buffer``, ``--max-retransmissions``, ``--max-rto``,
``--idle-timeout``, ``--keepalive``, ``--keepalive-interval``, ``--keepalive-probes``,
``--user-timeout``) apply to both sides' ``StreamConfig``.
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
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

import pyserval
from pyserval.transport.config import StreamConfig

CHUNK = 1 << 20


def stream_config(args: argparse.Namespace) -> StreamConfig:
    """The StreamConfig the command line asks for (defaults where it says nothing)."""
    fields: dict[str, Any] = {}
    if args.mss is not None:
        fields["mss"] = args.mss
    if args.buffer is not None:
        fields["send_buffer"] = fields["receive_buffer"] = args.buffer
    if args.max_retransmissions is not None:
        fields["max_retransmissions"] = args.max_retransmissions
    if args.max_rto is not None:
        fields["max_rto"] = args.max_rto
    if args.idle_timeout is not None:
        fields["idle_timeout"] = args.idle_timeout
    if args.keepalive is not None:
        fields["keepalive"] = args.keepalive if args.keepalive > 0 else None
    if args.keepalive_interval is not None:
        fields["keepalive_interval"] = args.keepalive_interval
    if args.keepalive_probes is not None:
        fields["keepalive_probes"] = args.keepalive_probes
    if args.user_timeout is not None:
        fields["user_timeout"] = args.user_timeout if args.user_timeout > 0 else None
    return StreamConfig(**fields)


def payload(n: int, seed: int = 1) -> bytes:
    """``n`` deterministic pseudo-random bytes."""
    return random.Random(seed).randbytes(n)


async def read_all(stream: pyserval.ServalStream) -> bytes:
    """Everything until the peer's EOF."""
    parts = []
    with contextlib.suppress(anyio.EndOfStream):
        while True:
            parts.append(await stream.receive(CHUNK))
    return b"".join(parts)


# -- server ------------------------------------------------------------------------------


async def handle_echo(stream: pyserval.ServalStream) -> None:
    with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
        while True:
            await stream.send(await stream.receive(CHUNK))


async def handle_digest(stream: pyserval.ServalStream) -> None:
    digest = hashlib.sha256()
    count = 0
    with contextlib.suppress(anyio.EndOfStream):
        while True:
            chunk = await stream.receive(CHUNK)
            digest.update(chunk)
            count += len(chunk)
    await stream.send(f"{digest.hexdigest()} {count}\n".encode())


async def handle_reverse(stream: pyserval.ServalStream) -> None:
    data = await read_all(stream)
    await stream.send(data[::-1])


async def handle_source(stream: pyserval.ServalStream) -> None:
    block = payload(CHUNK)
    with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
        while True:
            await stream.send(block)


async def handle_hold(stream: pyserval.ServalStream) -> None:
    """Say one line, then send nothing (the client waits in receive: an idle reader)."""
    await stream.send(b"held\n")
    with contextlib.suppress(anyio.BrokenResourceError, anyio.EndOfStream):
        await stream.receive()


HANDLERS: dict[str, Callable[[pyserval.ServalStream], Awaitable[None]]] = {
    "echo": handle_echo,
    "digest": handle_digest,
    "reverse": handle_reverse,
    "source": handle_source,
    "hold": handle_hold,
}


async def serve(args: argparse.Namespace) -> None:
    host = pyserval.Host(listen=[args.listen], stream_config=stream_config(args))
    async with host:
        listener = await host.listen(args.service, args.backlog)
        ip, port = host.addresses[0]
        print(f"listening on {ip}:{port} service {listener.service_id.hex}", flush=True)
        try:
            await listener.serve(HANDLERS[args.mode])
        finally:
            core = host.core
            assert core is not None
            stats = {
                "drops": dict(core.drops),
                "internal_errors": [repr(e) for e in core.internal_errors],
                "udp_errors": {k: v for ep in host.endpoints for k, v in ep.errors.items()},
            }
            print("STATS " + json.dumps(stats), flush=True)


def run_server(args: argparse.Namespace) -> int:
    async def main() -> None:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await serve(args)

    asyncio.run(main())
    return 0


# -- clients -----------------------------------------------------------------------------


def result(**fields: Any) -> None:
    print("RESULT " + json.dumps(fields), flush=True)


async def upload(host: pyserval.Host, args: argparse.Namespace) -> int:
    data = payload(args.bytes)
    expected = hashlib.sha256(data).hexdigest()
    view = memoryview(data)
    stream = await host.connect(args.service, timeout=10)
    start = time.perf_counter()
    for i in range(0, len(data), CHUNK):
        await stream.send(bytes(view[i : i + CHUNK]))
        if i == 2 * CHUNK:
            print("TRANSFERRING", flush=True)  # data flows: a test may now act mid-transfer
    await stream.send_eof()
    reply = (await read_all(stream)).decode()
    seconds = time.perf_counter() - start
    await stream.aclose()
    digest, _, count = reply.strip().partition(" ")
    ok = digest == expected and int(count or -1) == len(data)
    result(
        ok=ok,
        local_address=list(stream.local_address),
        auto_removed=[list(a) for a in host.auto_removed],
        bytes=len(data),
        seconds=round(seconds, 3),
        mbit_per_s=round(len(data) * 8 / seconds / 1e6, 1),
        reply=reply.strip(),
        expected=expected,
    )
    return 0 if ok else 1


async def many(host: pyserval.Host, args: argparse.Namespace) -> int:
    failures: list[str] = []

    async def one(i: int) -> None:
        message = f"message {i} ".encode() * 4
        try:
            stream = await host.connect(args.service, timeout=20)
            await stream.send(message)
            await stream.send_eof()
            reply = await read_all(stream)
            await stream.aclose()
            if reply != message:
                failures.append(f"{i}: wrong reply {reply[:40]!r}")
        except Exception as exc:
            failures.append(f"{i}: {exc!r}")

    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(args.count)))
    core = host.core
    assert core is not None
    result(
        ok=args.count - len(failures),
        failures=failures[:20],
        seconds=round(time.perf_counter() - start, 3),
        internal_errors=[repr(e) for e in core.internal_errors],
    )
    return 0 if not failures and not core.internal_errors else 1


async def until_error(host: pyserval.Host, args: argparse.Namespace) -> int:
    stream = await host.connect(args.service, timeout=10)
    moved = 0
    announced = False
    block = payload(CHUNK)
    try:
        async with asyncio.timeout(args.deadline):
            while True:
                if args.direction == "up":
                    await stream.send(block)
                    moved += len(block)
                elif args.direction == "idle":
                    moved += len(await stream.receive(CHUNK))  # "held", then nothing more
                    moved += args.announce_after
                else:
                    moved += len(await stream.receive(CHUNK))
                if not announced and moved >= args.announce_after:
                    announced = True
                    print("TRANSFERRING", flush=True)
    except TimeoutError:
        result(error=None, moved=moved, at=time.time())
        return 3
    except (anyio.BrokenResourceError, anyio.EndOfStream, ConnectionError) as exc:
        result(
            error=type(exc).__name__,
            message=str(exc),
            moved=moved,
            announced=announced,
            at=time.time(),
            conn_error=stream.connection.error,
        )
        return 0


CLIENTS = {"upload": upload, "many": many, "until-error": until_error}


def run_client(args: argparse.Namespace) -> int:
    async def main() -> int:
        listen = [a.strip() for a in args.listen.split(",")]  # several: a multihomed host
        host = pyserval.Host(listen=listen, stream_config=stream_config(args))
        async with host:
            host.add_route(args.service, args.route)
            return await CLIENTS[args.command](host, args)

    return asyncio.run(main())


def parse(argv: list[str] | None) -> argparse.Namespace:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--service", default="echo")
    common.add_argument("--mss", type=int)
    common.add_argument("--buffer", type=int)
    common.add_argument("--max-retransmissions", type=int)
    common.add_argument("--max-rto", type=float)
    common.add_argument("--idle-timeout", type=float)
    common.add_argument("--keepalive", type=float, help="seconds; 0 turns it off")
    common.add_argument("--keepalive-interval", type=float)
    common.add_argument("--keepalive-probes", type=int)
    common.add_argument("--user-timeout", type=float, help="seconds; 0 turns it off")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", parents=[common])
    s.add_argument("--listen", default="127.0.0.1:0")
    s.add_argument("--mode", choices=sorted(HANDLERS), default="echo")
    s.add_argument("--backlog", type=int, default=128)
    for name in CLIENTS:
        c = sub.add_parser(name, parents=[common])
        c.add_argument("--route", required=True, help="IP:PORT of the server host")
        c.add_argument("--listen", default="127.0.0.1:0")
        c.add_argument("--bytes", type=int, default=50_000_000)
        c.add_argument("--count", type=int, default=200)
        c.add_argument("--direction", choices=["up", "down", "idle"], default="up")
        c.add_argument("--announce-after", type=int, default=4 * CHUNK)
        c.add_argument("--deadline", type=float, default=60.0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    return run_server(args) if args.command == "serve" else run_client(args)


if __name__ == "__main__":
    sys.exit(main())

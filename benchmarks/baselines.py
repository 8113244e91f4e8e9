"""Baselines on loopback: the ceilings the Serval stack is compared against.

    python benchmarks/baselines.py [--seconds 3] [--out FILE] [--only tcp,udp,connect,quic]

Every measurement runs a receiver and a sender in two separate processes (spawned, so the
parent's state never leaks into them) and prints one JSON document:

* ``tcp_throughput``: plain asyncio streams, ``writer.write`` + ``await drain()`` of 64 KiB
  chunks; the receiver ``await reader.read()``s, counts and hashes (SHA-256, checked
  against the sender's, as the pyserval stream benchmarks check theirs). MB/s (10**6
  bytes).
* ``udp_blast``: :class:`pyserval.runtime.udp.UdpEndpoint` in both processes; the sender
  calls ``send_many`` with batches of 64 datagrams as fast as it can (no pacing), the
  receiver reads batches and counts. For 1,400- and 8,000-byte datagrams, with plain
  ``sendto``, with GSO, and with GSO plus receive-side GRO. MB/s received and loss %.
* ``tcp_connect``: sequential asyncio ``open_connection`` -> the server accepts and closes
  -> the client reads EOF and closes; connections per second and set-up latency.
* ``quic_throughput``: aioquic (the optional ``[bench]`` extra; skipped, with the reason,
  without it) on both sides, a self-signed certificate made at run time, one bidirectional
  stream: the client writes 64 KiB chunks for ``--seconds`` with at most 2 MiB
  unacknowledged, then ends the stream; the server counts and hashes what arrives, checked
  against what was sent (count and SHA-256). MB/s as the receiver saw it, 1,452-byte
  datagrams (about 1,408 bytes of stream data each, as pyserval's MSS 1,408 figure).

For a later benchmark (``benchmarks/host_bench.py``) to run its own pairs in the same
run and the same way, the building blocks are public: :func:`run_pair` with
:class:`Control`, and one function per baseline (:func:`tcp_throughput`,
:func:`udp_blast`, :func:`tcp_connect_rate`, :func:`quic_throughput`, :func:`run_all`);
:func:`run_chain` runs more than two processes in a row (client, router, server)::

    sys.path.insert(0, "benchmarks")
    import baselines
    ceilings = baselines.run_all(seconds=3)
    mine = baselines.run_pair(my_receiver, my_sender, {"seconds": 3})
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import math
import multiprocessing
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Coroutine
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from report import emit

SRC = Path(__file__).resolve().parents[1] / "src"
if str(SRC) not in sys.path:
    # Spawned children inherit sys.path, so they find pyserval (and this module) too.
    sys.path.insert(0, str(SRC))
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

MB = 1_000_000
TCP_CHUNK = 64 * 1024
UDP_BATCH = 64
UDP_SIZES = (1400, 8000)
UDP_MODES: dict[str, tuple[bool, bool]] = {
    # name: (sender GSO, receiver GRO)
    "plain": (False, False),
    "gso": (True, False),
    "gso+gro": (True, True),
}
HOST = "127.0.0.1"
# Generous: a child that has not answered by then is hung; the run fails instead.
_CHILD_TIMEOUT = 60.0

Params = dict[str, Any]
Result = dict[str, Any]
Side = Callable[["Control", Params], Coroutine[Any, Any, Result]]


class Control:
    """A child's link to the parent: announce an address, wait to be stopped."""

    def __init__(self, conn: Connection) -> None:
        """Wrap the child's end of the pipe."""
        self._conn = conn

    def announce(self, address: tuple[str, int]) -> None:
        """Tell the parent where the receiver listens (call once, receivers only)."""
        self.send("address", address)

    def send(self, kind: str, value: Any) -> None:
        """Send the parent a message of ``kind`` (what :func:`expect` waits for)."""
        self._conn.send((kind, value))

    async def next(self) -> Any:
        """The parent's next message, waited for in the event loop (not blocking it)."""
        conn = self._conn
        if not conn.poll():
            loop = asyncio.get_running_loop()
            ready = loop.create_future()

            def on_readable() -> None:
                if conn.poll() and not ready.done():
                    ready.set_result(None)

            fd = conn.fileno()
            loop.add_reader(fd, on_readable)
            try:
                await ready
            finally:
                loop.remove_reader(fd)
        return conn.recv()

    async def stopped(self) -> None:
        """Wait until the parent says the sender has finished."""
        await self.next()


# Which event loop the child processes run: "asyncio" (the default) or "uvloop" (the
# optional [uvloop] extra). An environment variable, so that spawned children see it;
# set with use_loop() (the benchmarks' --loop option).
LOOP_ENV = "PYSERVAL_BENCH_LOOP"
# A directory: each child process then runs under cProfile and writes <side>.prof there
# (for finding where the per-packet time goes; the figures of such a run are not comparable).
PROFILE_ENV = "PYSERVAL_BENCH_PROFILE"


def use_loop(name: str) -> None:
    """Run the benchmark's child processes on this event loop ("asyncio", "uvloop", or
    "busypoll[:US]": asyncio's with pyserval's BusyPollSelector, polling US microseconds
    (100 by default) before it sleeps)."""
    _busy_poll_spin(name)  # (a bad value fails here, in the parent)
    if name == "uvloop":
        import uvloop  # type: ignore[import-not-found,unused-ignore]  # noqa: F401  (fail here, in the parent, when it is not installed)
    os.environ[LOOP_ENV] = name


def loop_name(name: str) -> str:
    """``name`` if it names a loop :func:`use_loop` knows (an argparse ``type``)."""
    try:
        _busy_poll_spin(name)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return name


def _busy_poll_spin(name: str) -> float | None:
    """The spin in seconds a "busypoll[:US]" loop name asks for; None for another loop."""
    kind, _, us = name.partition(":")
    if kind != "busypoll":
        if us or kind not in ("asyncio", "uvloop"):
            raise ValueError(f"unknown loop {name!r}: asyncio, uvloop or busypoll[:US]")
        return None
    spin = float(us) / 1e6 if us else 100e-6
    if not 0 <= spin < math.inf:
        raise ValueError(f"a busy poll of {us!r} us")
    return spin


def _run(main: Coroutine[Any, Any, Result]) -> Result:
    name = os.environ.get(LOOP_ENV, "asyncio")
    if name == "uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(main)
    spin = _busy_poll_spin(name)
    if spin is not None:
        # (imported here: the child's pyserval is its tree's, first on sys.path by now)
        from pyserval.runtime.busy_poll import busy_poll_loop

        with asyncio.Runner(loop_factory=busy_poll_loop(spin)) as runner:
            return runner.run(main)
    return asyncio.run(main)


def child(
    side: Side, conn: Connection, params: Params, control: type[Control] | None = None
) -> None:
    """A spawned process's body: run ``side`` on the chosen event loop with ``control``
    (:class:`Control` unless given) around the pipe, and send back its result (with the
    process's CPU seconds) or its error."""
    try:
        # CPU time of the run itself (the interpreter start and imports are excluded).
        cpu0 = time.process_time()
        profile_dir = os.environ.get(PROFILE_ENV)
        if profile_dir:
            import cProfile

            profiler = cProfile.Profile()
            result = profiler.runcall(_run, side((control or Control)(conn), params))
            profiler.dump_stats(os.path.join(profile_dir, f"{side.__name__}.prof"))
        else:
            result = _run(side((control or Control)(conn), params))
        result["cpu_s"] = round(time.process_time() - cpu0, 3)
        conn.send(("result", result))
    except BaseException as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        raise
    finally:
        conn.close()


def expect(conn: Connection, kind: str, who: str) -> Any:
    """The next message from a child: its value if it is of ``kind``; a child that failed,
    sent something else or is silent for a minute raises RuntimeError naming ``who``."""
    if not conn.poll(_CHILD_TIMEOUT):
        raise RuntimeError(f"{who} did not answer within {_CHILD_TIMEOUT} s")
    got_kind, value = conn.recv()
    if got_kind == "error":
        raise RuntimeError(f"{who} failed: {value}")
    if got_kind != kind:
        raise RuntimeError(f"{who} sent {got_kind!r}, expected {kind!r}")
    return value


class LivePair:
    """A server and a client process that stay up between commands (``run_pair`` starts
    a fresh pair per run): the server is started first and announces its address, which
    the client gets as ``params["address"]``; each has a command pipe that ``control``
    (a :class:`Control` subclass) reads in the child."""

    def __init__(
        self,
        ctx: Any,
        name: str,
        server: Side,
        client: Side,
        params: Params,
        control: type[Control] = Control,
    ) -> None:
        self.name = name
        self.server_pipe, end = ctx.Pipe()
        self.server = ctx.Process(target=child, args=(server, end, params, control), daemon=True)
        self.server.start()
        address = expect(self.server_pipe, "address", f"{name} server")
        self.client_pipe, end = ctx.Pipe()
        self.client = ctx.Process(
            target=child, args=(client, end, {**params, "address": address}, control), daemon=True
        )
        self.client.start()

    def stop(self) -> tuple[Result, Result]:
        """Stop the client, then the server; their results (server's, client's)."""
        self.client_pipe.send(("stop",))
        client_result: Result = expect(self.client_pipe, "result", f"{self.name} client")
        self.server_pipe.send(("stop",))
        server_result: Result = expect(self.server_pipe, "result", f"{self.name} server")
        return server_result, client_result

    def kill(self) -> None:
        """Wait a little for both processes to end, then end them."""
        for proc in (self.client, self.server):
            proc.join(5)
            if proc.is_alive():
                proc.terminate()
                proc.join()


def run_pair(receiver: Side, sender: Side, params: Params) -> tuple[Result, Result]:
    """Run ``receiver`` and ``sender`` in two fresh processes; return their results.

    The receiver must call ``ctl.announce(address)`` first; the sender then starts with
    ``params["address"]`` set to it. When the sender returns, the parent stops the
    receiver: its ``await ctl.stopped()`` returns (a receiver that knows when it is done,
    such as one reading a TCP stream to EOF, may return without waiting). Both functions
    must be importable module-level coroutine functions (they run in spawned processes);
    each result dict gets the child's CPU seconds as ``cpu_s``.
    """
    ctx = multiprocessing.get_context("spawn")
    rx_parent, rx_child = ctx.Pipe()
    tx_parent, tx_child = ctx.Pipe()
    rx = ctx.Process(target=child, args=(receiver, rx_child, params), daemon=True)
    tx: multiprocessing.process.BaseProcess | None = None
    rx.start()
    try:
        address = expect(rx_parent, "address", "receiver")
        tx = ctx.Process(
            target=child, args=(sender, tx_child, {**params, "address": address}), daemon=True
        )
        tx.start()
        sent = expect(tx_parent, "result", "sender")
        # Let datagrams still in flight or in socket buffers arrive before stopping.
        time.sleep(params.get("grace", 0.3))
        rx_parent.send("stop")
        received = expect(rx_parent, "result", "receiver")
        return received, sent
    finally:
        for proc in (rx, tx):
            if proc is None:
                continue
            proc.join(5)
            if proc.is_alive():
                proc.terminate()
                proc.join()


def run_chain(sides: list[Side], params: Params) -> list[Result]:
    """Run ``sides`` in fresh processes, started in order; return their results in order.

    For set-ups of more than two processes (a client, a server and a router between them).
    Every side but the last must call ``ctl.announce(address)`` first; the next side is
    started only then, with ``params["addresses"]`` the addresses announced so far (in
    order) and ``params["address"]`` the latest of them (as :func:`run_pair` gives its
    sender). When the last side returns, the others are stopped, newest first (their
    ``await ctl.stopped()`` returns). ``run_chain([receiver, sender], p)`` is
    ``run_pair(receiver, sender, p)`` with the results in start order.
    """
    ctx = multiprocessing.get_context("spawn")
    procs: list[multiprocessing.process.BaseProcess] = []
    pipes: list[Connection] = []
    addresses: list[tuple[str, int]] = []
    last = len(sides) - 1
    try:
        for i, side in enumerate(sides):
            parent, child_end = ctx.Pipe()
            mine: Params = {**params, "addresses": list(addresses)}
            if addresses:
                mine["address"] = addresses[-1]
            proc = ctx.Process(target=child, args=(side, child_end, mine), daemon=True)
            proc.start()
            procs.append(proc)
            pipes.append(parent)
            if i < last:
                addresses.append(expect(parent, "address", f"side {i} ({side.__name__})"))
        results: list[Result] = [{} for _ in sides]
        results[last] = expect(pipes[last], "result", f"side {last} ({sides[last].__name__})")
        time.sleep(params.get("grace", 0.3))
        for i in range(last - 1, -1, -1):
            pipes[i].send("stop")
            results[i] = expect(pipes[i], "result", f"side {i} ({sides[i].__name__})")
        return results
    finally:
        for started in reversed(procs):
            started.join(5)
            if started.is_alive():
                started.terminate()
                started.join()


# -- (a) TCP bulk throughput ------------------------------------------------------------


async def tcp_bulk_receiver(ctl: Control, params: Params) -> Result:
    """Accept one connection and read it to EOF with asyncio streams, hashing what arrives
    (SHA-256, as every throughput benchmark here checks its data)."""
    done: asyncio.Future[Result] = asyncio.get_running_loop().create_future()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        total = 0
        first = 0.0
        read = reader.read
        digest = hashlib.sha256()
        update = digest.update
        while True:
            data = await read(1 << 18)
            if not data:
                break
            if not total:
                first = time.perf_counter()
            total += len(data)
            update(data)
        last = time.perf_counter()
        writer.close()
        done.set_result({"bytes": total, "seconds": last - first, "sha256": digest.hexdigest()})

    server = await asyncio.start_server(handle, HOST, 0)
    ctl.announce(server.sockets[0].getsockname()[:2])
    async with server:
        result = await done
    await ctl.stopped()
    return result


async def tcp_bulk_sender(ctl: Control, params: Params) -> Result:
    """Write 64 KiB chunks (random bytes) and drain for ``params["seconds"]``, then close;
    the SHA-256 of what was sent is worked out afterwards, outside the timed part."""
    host, port = params["address"]
    _reader, writer = await asyncio.open_connection(host, port)
    chunk = random.Random(7).randbytes(params.get("chunk", TCP_CHUNK))
    write, drain = writer.write, writer.drain
    total = 0
    start = time.perf_counter()
    end = start + params["seconds"]
    while True:
        for _ in range(16):
            write(chunk)
            await drain()
        total += 16 * len(chunk)
        if time.perf_counter() >= end:
            break
    writer.close()
    await writer.wait_closed()
    seconds = time.perf_counter() - start
    digest = hashlib.sha256()
    for _ in range(total // len(chunk)):
        digest.update(chunk)
    return {"bytes": total, "seconds": seconds, "sha256": digest.hexdigest()}


def checked_bulk(received: Result, sent: Result) -> Result:
    """What every bulk baseline reports: MB/s as the receiver saw it, and whether what
    arrived is what was sent (byte count and SHA-256)."""
    sha_match = received["sha256"] == sent["sha256"]
    return {
        "mb_per_s": round(received["bytes"] / received["seconds"] / MB, 1),
        "bytes": received["bytes"],
        "bytes_sent": sent["bytes"],
        "seconds": round(received["seconds"], 3),
        "data_checked": "sha256",
        "sha256_match": sha_match,
        "ok": received["bytes"] == sent["bytes"] > 0 and sha_match,
        "cpu_s": {"receiver": received["cpu_s"], "sender": sent["cpu_s"]},
    }


def tcp_throughput(seconds: float) -> Result:
    """Plain asyncio TCP bulk transfer over loopback, in MB/s as the receiver saw it; the
    receiver hashes every byte as it reads (as pyserval's stream benchmarks do), and the
    count and SHA-256 are checked against the sender's."""
    received, sent = run_pair(tcp_bulk_receiver, tcp_bulk_sender, {"seconds": seconds})
    return {**checked_bulk(received, sent), "chunk_bytes": TCP_CHUNK}


# -- (b) UDP blast -----------------------------------------------------------------------


async def udp_blast_receiver(ctl: Control, params: Params) -> Result:
    """Count what a UdpEndpoint receives until stopped."""
    from pyserval.runtime.udp import UdpEndpoint

    times = [0.0, 0.0]

    def on_datagrams(batch: list[tuple[bytes, tuple[str, int]]]) -> None:
        now = time.perf_counter()
        if not times[0]:
            times[0] = now
        times[1] = now

    ep = await UdpEndpoint.open((HOST, 0), on_datagrams, gro=params["gro"])
    async with ep:
        ctl.announce(ep.address)
        await ctl.stopped()
        stats = ep.stats
        return {
            "datagrams": stats.datagrams_received,
            "bytes": stats.bytes_received,
            "seconds": times[1] - times[0],
            "batches": stats.batches,
            "gro": ep.gro,
            "gro_reads": stats.gro_reads,
            "rcvbuf": ep.rcvbuf,
            "errors": dict(ep.errors),
        }


async def udp_blast_sender(ctl: Control, params: Params) -> Result:
    """``send_many`` batches of equal datagrams as fast as possible for ``seconds``."""
    from pyserval.runtime.udp import UdpEndpoint

    host, port = params["address"]
    payload = bytes(params["size"])
    batch = [(payload, (host, port))] * params.get("batch", UDP_BATCH)
    ep = await UdpEndpoint.open((HOST, 0), lambda _batch: None, gso=params["gso"])
    async with ep:
        send_many = ep.send_many
        start = time.perf_counter()
        end = start + params["seconds"]
        while time.perf_counter() < end:
            for _ in range(8):
                send_many(batch)
            # Let the loop run, as a real program's would between batches.
            await asyncio.sleep(0)
        elapsed = time.perf_counter() - start
        stats = ep.stats
        return {
            "datagrams": stats.datagrams_sent,
            "bytes": stats.bytes_sent,
            "seconds": elapsed,
            "gso": ep.gso,
            "gso_calls": stats.gso_calls,
            "sndbuf": ep.sndbuf,
            "errors": dict(ep.errors),
        }


def udp_blast(seconds: float, size: int, gso: bool, gro: bool) -> Result:
    """One unpaced UDP blast over loopback: MB/s received, loss %, and the details."""
    received, sent = run_pair(
        udp_blast_receiver,
        udp_blast_sender,
        {"seconds": seconds, "size": size, "gso": gso, "gro": gro},
    )
    rx_seconds = received["seconds"] or float("nan")
    lost = sent["datagrams"] - received["datagrams"]
    return {
        "size": size,
        "gso": sent["gso"],
        "gro": received["gro"],
        "mb_per_s_received": round(received["bytes"] / rx_seconds / MB, 1),
        "mb_per_s_offered": round(sent["bytes"] / sent["seconds"] / MB, 1),
        "datagrams_per_s_received": round(received["datagrams"] / rx_seconds),
        "loss_percent": round(100 * lost / max(sent["datagrams"], 1), 2),
        "sent": sent["datagrams"],
        "received": received["datagrams"],
        "datagrams_per_batch": round(received["datagrams"] / max(received["batches"], 1), 1),
        "gso_calls": sent["gso_calls"],
        "gro_reads": received["gro_reads"],
        "rcvbuf": received["rcvbuf"],
        "cpu_s": {"receiver": received["cpu_s"], "sender": sent["cpu_s"]},
        "errors": {"receiver": received["errors"], "sender": sent["errors"]},
    }


# -- (c) TCP connection set-up rate ---------------------------------------------------------


async def tcp_accept_server(ctl: Control, params: Params) -> Result:
    """Accept connections and close each at once, until stopped."""
    accepted = 0

    async def handle(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        writer.close()

    server = await asyncio.start_server(handle, HOST, 0, backlog=1024)
    ctl.announce(server.sockets[0].getsockname()[:2])
    async with server:
        await ctl.stopped()
    return {"accepted": accepted}


async def tcp_connect_client(ctl: Control, params: Params) -> Result:
    """Connect, wait for the server's close (EOF), close; one at a time, for ``seconds``."""
    host, port = params["address"]
    durations: list[float] = []
    start = time.perf_counter()
    end = start + params["seconds"]
    now = start
    while now < end:
        reader, writer = await asyncio.open_connection(host, port)
        await reader.read()
        writer.close()
        await writer.wait_closed()
        t = time.perf_counter()
        durations.append(t - now)
        now = t
    return {"durations": durations, "seconds": now - start}


async def accept_and_close(ctl: Control, listener: Any) -> int:
    """Accept pyserval streams on ``listener`` and close each at once until the run is
    stopped; how many were accepted (the server side of the connection-rate runs)."""
    accepted = 0

    async def loop() -> None:
        nonlocal accepted
        async for stream in listener:
            accepted += 1
            await stream.aclose()

    task = asyncio.ensure_future(loop())
    await ctl.stopped()
    task.cancel()
    return accepted


def connect_summary(received: Result, sent: Result) -> Result:
    """Rate and latency of a sequential connect benchmark (any stack's client/server)."""
    durations = sorted(sent["durations"])
    n = len(durations)
    return {
        "per_s": round(n / sent["seconds"]),
        "connections": n,
        "accepted": received["accepted"],
        "latency_us": {
            "median": round(statistics.median(durations) * 1e6, 1),
            "p99": round(durations[min(n - 1, int(n * 0.99))] * 1e6, 1),
        },
        "cpu_s": {"server": received["cpu_s"], "client": sent["cpu_s"]},
    }


def tcp_connect_rate(seconds: float) -> Result:
    """Sequential asyncio TCP connection set-ups per second over loopback."""
    received, sent = run_pair(tcp_accept_server, tcp_connect_client, {"seconds": seconds})
    return {
        **connect_summary(received, sent),
        "cycle": "open_connection, server accepts and closes, client reads EOF, closes",
    }


# -- (d) QUIC bulk throughput (aioquic) ------------------------------------------------------

# The ALPN both sides offer: a name of our own (no HTTP/3, so no framing above the stream).
QUIC_ALPN = "pyserval-bench"
# UDP payload per datagram: 1,452 = 1,500 - 40 (IPv6) - 8 (UDP), so that one packet carries
# about 1,408 bytes of stream data (the MSS pyserval's figure is taken at); aioquic's
# default is 1,200. The receiver reports the stream bytes per datagram it saw.
QUIC_DATAGRAM = 1452
# The sender keeps at most this many bytes written but not yet acknowledged: enough to
# fill the receiver's flow-control window (aioquic's default, 1 MiB) with some to spare,
# bounded so the send buffer does not grow for as long as the run lasts.
QUIC_UNACKED = 2 << 20
QUIC_SERVER_NAME = "localhost"
# The pattern the sender's chunks are cut from is this much longer than a chunk: chunk j
# starts at its own offset, so a chunk delivered twice or in the wrong place changes the
# digest.
_QUIC_SLACK = 4096


def quic_available() -> str | None:
    """None when aioquic can be imported; otherwise why the QUIC baseline is skipped."""
    import importlib.util

    if importlib.util.find_spec("aioquic") is None:
        return "aioquic is not installed (pip install -e '.[bench]')"
    return None


def self_signed_pem(name: str = QUIC_SERVER_NAME) -> tuple[bytes, bytes]:
    """A fresh P-256 key and a one-day self-signed certificate for ``name`` (both PEM)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def _quic_chunk(j: int, pattern: bytes) -> bytes:
    """Chunk ``j`` the QUIC sender writes: a slice of the pattern at an offset of its own."""
    off = (j * 97) % _QUIC_SLACK
    return pattern[off : off + len(pattern) - _QUIC_SLACK]


async def quic_bulk_receiver(ctl: Control, params: Params) -> Result:
    """An aioquic server: read one stream to its end, counting bytes and hashing them."""
    from aioquic.asyncio.protocol import QuicConnectionProtocol
    from aioquic.asyncio.server import QuicServer
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.events import QuicEvent, StreamDataReceived
    from cryptography.hazmat.primitives.serialization import load_pem_private_key
    from cryptography.x509 import load_pem_x509_certificate

    loop = asyncio.get_running_loop()
    done: asyncio.Future[Result] = loop.create_future()
    digest = hashlib.sha256()
    state = {"bytes": 0, "first": 0.0, "datagrams": 0, "udp_bytes": 0}

    class Sink(QuicConnectionProtocol):
        def datagram_received(self, data: bytes | str, addr: Any) -> None:
            state["datagrams"] += 1
            state["udp_bytes"] += len(data)
            super().datagram_received(data, addr)

        def quic_event_received(self, event: QuicEvent) -> None:
            # Events are handled here rather than through aioquic's StreamReader adapter:
            # the data goes straight to the hash, as tcp_bulk_receiver's read loop does.
            if not isinstance(event, StreamDataReceived):
                return
            if event.data:
                if not state["bytes"]:
                    state["first"] = time.perf_counter()
                state["bytes"] += len(event.data)
                digest.update(event.data)
            if event.end_stream and not done.done():
                done.set_result(
                    {
                        "bytes": state["bytes"],
                        "seconds": time.perf_counter() - state["first"],
                        "sha256": digest.hexdigest(),
                        "stream_id": event.stream_id,
                    }
                )

    config = QuicConfiguration(
        is_client=False,
        alpn_protocols=[QUIC_ALPN],
        max_datagram_size=params["max_datagram_size"],
    )
    config.certificate = load_pem_x509_certificate(params["cert_pem"])
    config.private_key = load_pem_private_key(params["key_pem"], password=None)
    transport, _server = await loop.create_datagram_endpoint(
        lambda: QuicServer(configuration=config, create_protocol=Sink), local_addr=(HOST, 0)
    )
    try:
        ctl.announce(transport.get_extra_info("sockname")[:2])
        result = await done
        # Stay up (answering, acknowledging the FIN) until the sender has finished.
        await ctl.stopped()
    finally:
        transport.close()
    result.update(
        datagrams=state["datagrams"],
        stream_bytes_per_datagram=round(result["bytes"] / max(state["datagrams"], 1), 1),
        udp_bytes=state["udp_bytes"],
    )
    return result


async def quic_bulk_sender(ctl: Control, params: Params) -> Result:
    """An aioquic client: one bidirectional stream, 64 KiB writes for ``seconds`` with at
    most QUIC_UNACKED bytes unacknowledged, then the end of the stream; returns once the
    server has acknowledged everything (data and FIN)."""
    from aioquic.asyncio.client import connect
    from aioquic.asyncio.protocol import QuicConnectionProtocol
    from aioquic.quic.configuration import QuicConfiguration

    class Source(QuicConnectionProtocol):
        """Wakes the writer whenever a datagram (an ACK, a window update) came in."""

        waiter: asyncio.Future[None] | None = None

        def datagram_received(self, data: bytes | str, addr: Any) -> None:
            super().datagram_received(data, addr)
            waiter = self.waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

        async def progress(self, timeout: float) -> None:
            self.waiter = self._loop.create_future()
            try:
                await asyncio.wait_for(self.waiter, timeout)
            finally:
                self.waiter = None

    host, port = params["address"]
    chunk_bytes = params.get("chunk", TCP_CHUNK)
    pattern = random.Random(params.get("seed", 1)).randbytes(chunk_bytes + _QUIC_SLACK)
    config = QuicConfiguration(
        is_client=True,
        alpn_protocols=[QUIC_ALPN],
        server_name=QUIC_SERVER_NAME,
        max_datagram_size=params["max_datagram_size"],
    )
    # The server's certificate is verified: the handshake is QUIC's real one.
    config.load_verify_locations(cadata=params["cert_pem"])
    async with connect(host, port, configuration=config, create_protocol=Source) as proto:
        assert isinstance(proto, Source)
        quic = proto._quic  # aioquic's sans-I/O connection, as its own examples drive it
        stream_id = quic.get_next_available_stream_id()
        quic.send_stream_data(stream_id, b"")
        # aioquic's stream writer never pushes back (its transport never pauses), so the
        # unacknowledged amount is read from the stream's send buffer: bytes below
        # _buffer_start have been acknowledged and released. Private, hence checked here.
        sender = quic._streams[stream_id].sender
        if not hasattr(sender, "_buffer_start"):
            raise RuntimeError("this aioquic's QuicStreamSender has no _buffer_start")
        written = 0
        j = 0
        start = time.perf_counter()
        end = start + params["seconds"]
        while time.perf_counter() < end:
            if written - sender._buffer_start < QUIC_UNACKED:
                data = _quic_chunk(j, pattern)
                quic.send_stream_data(stream_id, data)
                written += len(data)
                j += 1
                proto.transmit()
            else:
                await proto.progress(_CHILD_TIMEOUT)
        sent_until = time.perf_counter()
        quic.send_stream_data(stream_id, b"", end_stream=True)
        proto.transmit()
        while not sender.is_finished:
            await proto.progress(_CHILD_TIMEOUT)
        acked = time.perf_counter()
    digest = hashlib.sha256()
    for i in range(j):
        digest.update(_quic_chunk(i, pattern))
    return {
        "bytes": written,
        "chunks": j,
        "sha256": digest.hexdigest(),
        "seconds": acked - start,
        "writing_seconds": sent_until - start,
    }


def quic_throughput(seconds: float, max_datagram_size: int = QUIC_DATAGRAM) -> Result:
    """aioquic bulk transfer over loopback (one stream), in MB/s as the receiver saw it,
    checked by byte count and SHA-256; ``{"skipped": reason}`` without aioquic."""
    missing = quic_available()
    if missing is not None:
        return {"skipped": missing}
    cert_pem, key_pem = self_signed_pem()
    params = {
        "seconds": seconds,
        "max_datagram_size": max_datagram_size,
        "cert_pem": cert_pem,
        "key_pem": key_pem,
    }
    received, sent = run_pair(quic_bulk_receiver, quic_bulk_sender, params)
    import aioquic

    return {
        **checked_bulk(received, sent),
        "chunk_bytes": TCP_CHUNK,
        "max_datagram_size": max_datagram_size,
        "datagrams_received": received["datagrams"],
        "stream_bytes_per_datagram": received["stream_bytes_per_datagram"],
        "max_unacked_bytes": QUIC_UNACKED,
        "aioquic": aioquic.__version__,
    }


# -- the whole set ---------------------------------------------------------------------------


def _sysctl(name: str) -> int | None:
    try:
        return int(Path("/proc/sys", *name.split(".")).read_text())
    except (OSError, ValueError):
        return None


def environment() -> Result:
    """Where the figures come from (they only compare within one machine and run)."""
    return {
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "kernel": platform.release(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "net.core.rmem_max": _sysctl("net.core.rmem_max"),
        "net.core.wmem_max": _sysctl("net.core.wmem_max"),
        # Other work on the machine competes with the two processes: say how much.
        "loadavg_1min_at_start": round(os.getloadavg()[0], 2),
        "event_loop": os.environ.get(LOOP_ENV, "asyncio"),
    }


def run_all(seconds: float, only: tuple[str, ...] = ("tcp", "udp", "connect", "quic")) -> Result:
    """Every baseline, each in its own pair of processes, as one JSON-ready dict."""
    report: Result = {
        "benchmark": "pyserval baselines (loopback, sender and receiver in separate processes)",
        "seconds_per_run": seconds,
        "environment": environment(),
        "units": "MB = 10**6 bytes; payload bytes only (no UDP/IP headers)",
    }
    if "tcp" in only:
        report["tcp_throughput"] = tcp_throughput(seconds)
    if "udp" in only:
        report["udp_blast"] = {
            f"{size}/{mode}": udp_blast(seconds, size, gso, gro)
            for size in UDP_SIZES
            for mode, (gso, gro) in UDP_MODES.items()
        }
        report["udp_blast_note"] = (
            f"unpaced: the sender calls send_many with {UDP_BATCH} datagrams at a time and"
            " yields to its loop every 8 calls; loss is what the receiver's socket buffer"
            " dropped. MB/s received = payload bytes / time between the first and the last"
            " batch the receiver saw"
        )
    if "connect" in only:
        report["tcp_connect"] = tcp_connect_rate(seconds)
    if "quic" in only:
        report["quic_throughput"] = quic_throughput(seconds)
    return report


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: run the baselines and print (and optionally save) the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each run")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    parser.add_argument(
        "--only",
        default="tcp,udp,connect,quic",
        help="comma-separated subset of tcp,udp,connect,quic",
    )
    args = parser.parse_args(argv)
    only = tuple(s.strip() for s in args.only.split(",") if s.strip())
    emit(run_all(args.seconds, only), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

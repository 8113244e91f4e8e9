"""Secure channels (``secure=True``) against plain Serval and TLS over asyncio TCP, in one run.

    python benchmarks/secure_bench.py [--seconds 3] [--mss 1408,0] [--out FILE]

Client and server run in separate processes (``baselines.run_pair``). Printed as JSON:

* ``bulk``: one stream, 1 MiB ``send`` calls for ``--seconds``, the receiver reads to end of
  stream; MB/s (10**6 bytes) as the receiver saw it. For each MSS (0: the host default,
  sized from the interface MTU), Serval plain and Serval secure; once, TLS 1.3 over asyncio
  TCP (``asyncio.start_server(ssl=...)``, the same Ed25519 certificate and cipher). Every
  chunk starts with its sequence number and both ends hash everything (SHA-256): the run
  fails unless the digests and byte counts match.
* ``connect``: sequential connection set-ups for ``--seconds``: connect (with the TLS
  handshake and the serviceID check when secure) -> the server accepts and closes -> the
  client reads end of stream and closes; per second and latency, for Serval plain, Serval
  secure and TLS over asyncio TCP (whose client checks the certificate the same way).
* ``ratios``: secure over plain Serval, and secure Serval over TLS on TCP.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import ssl
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import anyio

import baselines
import pyserval
from baselines import MB, Control, Params, Result, run_pair
from pyserval.runtime.secure import SecureListener, check_peer, client_context, server_context
from pyserval.runtime.streams import ServalListener
from pyserval.transport.config import StreamConfig
from report import emit

CHUNK = 1 << 20
PREFIX = "0a0b/16"


def _config(params: Params) -> StreamConfig | None:
    """mss 0: the host's defaults; else that MSS with 8 MiB buffers (as host_bench)."""
    if params.get("mss", 0) == 0:
        return None
    return StreamConfig(mss=params["mss"], send_buffer=8 << 20, receive_buffer=8 << 20)


def _key(params: Params) -> pyserval.ServiceKey:
    return pyserval.ServiceKey.from_private_bytes(bytes.fromhex(params["key"]))


def _chunks(seconds: float) -> Any:
    """1 MiB chunks, each starting with its number (so a lost or repeated chunk changes the
    digest), until ``seconds`` have passed."""
    block = bytearray(os.urandom(CHUNK))
    end = time.perf_counter() + seconds
    n = 0
    while time.perf_counter() < end:
        block[:8] = n.to_bytes(8, "big")
        n += 1
        yield bytes(block)


class _Sink:
    """Counts and hashes what arrives; times from the first byte to the last."""

    def __init__(self) -> None:
        self.hash = hashlib.sha256()
        self.total = 0
        self.first = 0.0
        self.last = 0.0

    def add(self, data: bytes) -> None:
        if not self.total:
            self.first = time.perf_counter()
        self.total += len(data)
        self.hash.update(data)

    def result(self) -> Result:
        self.last = self.last or time.perf_counter()
        return {
            "bytes": self.total,
            "seconds": self.last - self.first,
            "sha256": self.hash.hexdigest(),
        }


# -- bulk ------------------------------------------------------------------------------------
async def serval_bulk_receiver(ctl: Control, params: Params) -> Result:
    """Accept one (secure or plain) stream and read it to end of stream."""
    key = _key(params)
    sid = key.service_id(PREFIX)
    async with pyserval.Host(["127.0.0.1:0"], stream_config=_config(params)) as host:
        listener: SecureListener | ServalListener
        if params["secure"]:
            listener = await host.listen(sid, key=key, secure=True)
        else:
            listener = await host.listen(sid)
        ctl.announce(host.addresses[0])
        stream = await listener.accept()
        sink = _Sink()
        with contextlib.suppress(anyio.EndOfStream):
            while True:
                sink.add(await stream.receive(1 << 20))
        sink.last = time.perf_counter()
    await ctl.stopped()
    return sink.result()


async def serval_bulk_sender(ctl: Control, params: Params) -> Result:
    """Send 1 MiB chunks for ``seconds``, then end the stream and wait for the acks."""
    sid = _key(params).service_id(PREFIX)
    async with pyserval.Host(["127.0.0.1:0"], stream_config=_config(params)) as host:
        host.add_route(sid.hex, "{}:{}".format(*params["address"]))
        stream = await host.connect(sid, secure=params["secure"])
        digest, total = hashlib.sha256(), 0
        start = time.perf_counter()
        for chunk in _chunks(params["seconds"]):
            digest.update(chunk)
            await stream.send(chunk)
            total += len(chunk)
        await stream.send_eof()
        sf = stream.connection.primary
        await host.wait(stream.connection, lambda: sf.snd_una >= sf.snd_max)
        return {
            "bytes": total,
            "seconds": time.perf_counter() - start,
            "sha256": digest.hexdigest(),
        }


async def tls_tcp_bulk_receiver(ctl: Control, params: Params) -> Result:
    """TLS over asyncio TCP: accept one connection, read to end of stream."""
    done: asyncio.Future[Result] = asyncio.get_running_loop().create_future()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sink = _Sink()
        while data := await reader.read(1 << 18):
            sink.add(data)
        sink.last = time.perf_counter()
        writer.close()
        done.set_result(sink.result())

    server = await asyncio.start_server(handle, baselines.HOST, 0, ssl=server_context(_key(params)))
    ctl.announce(server.sockets[0].getsockname()[:2])
    async with server:
        result = await done
    await ctl.stopped()
    return result


async def tls_tcp_bulk_sender(ctl: Control, params: Params) -> Result:
    """TLS over asyncio TCP: write 1 MiB chunks and drain for ``seconds``, then close."""
    host, port = params["address"]
    _reader, writer = await asyncio.open_connection(host, port, ssl=client_context())
    digest, total = hashlib.sha256(), 0
    start = time.perf_counter()
    for chunk in _chunks(params["seconds"]):
        digest.update(chunk)
        writer.write(chunk)
        await writer.drain()
        total += len(chunk)
    writer.close()
    with contextlib.suppress(ssl.SSLError, ConnectionError):
        await writer.wait_closed()
    return {"bytes": total, "seconds": time.perf_counter() - start, "sha256": digest.hexdigest()}


def _bulk_summary(label: str, received: Result, sent: Result, **extra: Any) -> Result:
    if (received["bytes"], received["sha256"]) != (sent["bytes"], sent["sha256"]):
        raise RuntimeError(f"{label}: data differ: sent {sent}, received {received}")
    return {
        **extra,
        "mb_per_s": round(received["bytes"] / received["seconds"] / MB, 1),
        "bytes": received["bytes"],
        "seconds": round(received["seconds"], 3),
        "sha256_match": True,
        "cpu_s": {"receiver": received["cpu_s"], "sender": sent["cpu_s"]},
    }


def serval_bulk(seconds: float, mss: int, secure: bool, key: str) -> Result:
    """One Serval stream, plain or secure, at ``mss`` (0: host default)."""
    params = {"seconds": seconds, "mss": mss, "secure": secure, "key": key, "grace": 0.1}
    received, sent = run_pair(serval_bulk_receiver, serval_bulk_sender, params)
    label = f"serval {'secure' if secure else 'plain'} mss {mss}"
    return _bulk_summary(label, received, sent, mss=mss or "default")


def tls_tcp_bulk(seconds: float, key: str) -> Result:
    """TLS 1.3 over asyncio TCP on loopback, same certificate."""
    params = {"seconds": seconds, "key": key, "grace": 0.1}
    received, sent = run_pair(tls_tcp_bulk_receiver, tls_tcp_bulk_sender, params)
    return _bulk_summary("tls over tcp", received, sent)


# -- connection set-up -----------------------------------------------------------------------
async def serval_accept_server(ctl: Control, params: Params) -> Result:
    """Accept (secure or plain) streams and close each at once, until stopped."""
    key = _key(params)
    sid = key.service_id(PREFIX)
    async with pyserval.Host(["127.0.0.1:0"]) as host:
        listener: SecureListener | ServalListener
        if params["secure"]:
            listener = await host.listen(sid, key=key, secure=True, backlog=1024)
        else:
            listener = await host.listen(sid, backlog=1024)
        ctl.announce(host.addresses[0])
        return {"accepted": await baselines.accept_and_close(ctl, listener)}


async def serval_connect_client(ctl: Control, params: Params) -> Result:
    """Connect (secure: handshake and check), read end of stream, close; one at a time."""
    sid = _key(params).service_id(PREFIX)
    durations: list[float] = []
    async with pyserval.Host(["127.0.0.1:0"], stream_config=StreamConfig(time_wait=1.0)) as host:
        host.add_route(sid.hex, "{}:{}".format(*params["address"]))
        start = now = time.perf_counter()
        end = start + params["seconds"]
        while now < end:
            stream = await host.connect(sid, secure=params["secure"])
            with contextlib.suppress(anyio.EndOfStream):
                await stream.receive()
            await stream.aclose()
            t = time.perf_counter()
            durations.append(t - now)
            now = t
    return {"durations": durations, "seconds": now - start}


async def tls_tcp_accept_server(ctl: Control, params: Params) -> Result:
    """TLS over asyncio TCP: accept, close at once, until stopped."""
    accepted = 0

    async def handle(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        writer.close()

    ctx = server_context(_key(params))
    server = await asyncio.start_server(handle, baselines.HOST, 0, backlog=1024, ssl=ctx)
    ctl.announce(server.sockets[0].getsockname()[:2])
    async with server:
        await ctl.stopped()
    return {"accepted": accepted}


async def tls_tcp_connect_client(ctl: Control, params: Params) -> Result:
    """TLS over asyncio TCP: connect, check the certificate as secure=True does, read
    end of stream, close; one at a time."""
    host, port = params["address"]
    sid = _key(params).service_id(PREFIX)
    durations: list[float] = []
    start = now = time.perf_counter()
    end = start + params["seconds"]
    while now < end:
        reader, writer = await asyncio.open_connection(host, port, ssl=client_context())
        check_peer(writer.get_extra_info("ssl_object").getpeercert(True), sid, time.time())
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await reader.read()
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()
        t = time.perf_counter()
        durations.append(t - now)
        now = t
    return {"durations": durations, "seconds": now - start}


def connect_rate(seconds: float, key: str, kind: str) -> Result:
    """Sequential set-ups per second: ``kind`` serval, serval_secure or tls_tcp."""
    params = {"seconds": seconds, "key": key, "secure": kind == "serval_secure"}
    if kind == "tls_tcp":
        received, sent = run_pair(tls_tcp_accept_server, tls_tcp_connect_client, params)
    else:
        received, sent = run_pair(serval_accept_server, serval_connect_client, params)
    return baselines.connect_summary(received, sent)


def main(argv: list[str] | None = None) -> int:
    """Run everything and print (and optionally write) the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--mss", default="1408,0", help="segment sizes; 0: the host default")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    key = pyserval.ServiceKey.generate().private_bytes().hex()  # children get it in params
    out: dict[str, Any] = {"environment": baselines.environment()}
    out["environment"]["openssl"] = ssl.OPENSSL_VERSION
    bulk: dict[str, Any] = {"serval": [], "serval_secure": []}
    for mss in (int(m) for m in args.mss.split(",")):
        bulk["serval"].append(serval_bulk(args.seconds, mss, False, key))
        bulk["serval_secure"].append(serval_bulk(args.seconds, mss, True, key))
    bulk["tls_tcp"] = tls_tcp_bulk(args.seconds, key)
    out["bulk"] = bulk
    out["connect"] = {
        kind: connect_rate(args.seconds, key, kind)
        for kind in ("serval", "serval_secure", "tls_tcp")
    }
    ratios: dict[str, Any] = {}
    for plain, secure in zip(bulk["serval"], bulk["serval_secure"], strict=True):
        name = f"mss_{plain['mss']}"
        ratios[f"bulk_secure_vs_plain_{name}"] = round(secure["mb_per_s"] / plain["mb_per_s"], 3)
        ratios[f"bulk_secure_vs_tls_tcp_{name}"] = round(
            secure["mb_per_s"] / bulk["tls_tcp"]["mb_per_s"], 3
        )
    c = out["connect"]
    ratios["connect_secure_vs_plain"] = round(c["serval_secure"]["per_s"] / c["serval"]["per_s"], 3)
    ratios["connect_secure_vs_tls_tcp"] = round(
        c["serval_secure"]["per_s"] / c["tls_tcp"]["per_s"], 3
    )
    out["ratios"] = ratios
    emit(out, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark of HTTP over Serval and of pcap capture; prints one JSON document.

    python benchmarks/http_bench.py [--requests 2000] [--download-mib 64] [--out FILE]

- ``http``: an ASGI application (this module's ``app``) served by ``pyserval serve-asgi`` in
  a child process, and an ``httpx.AsyncClient`` on ``AsyncServalTransport`` here: sequential
  small GETs on one kept-alive stream, the same with a new stream per request (each a new
  SAL handshake), and one large streamed download whose SHA-256 is checked against the
  content the benchmark generates itself.
- ``pcap``: the cost per datagram of building an IPv4/UDP frame, and of writing it to a
  file, for 1,400-byte datagrams (what ``Host(pcap=...)`` adds per datagram when on).

Needs the [http] extra (httpx, httpcore, h11).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

from report import emit

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
CHUNK = 65536

Message = MutableMapping[str, Any]


def block(index: int) -> bytes:
    """The ``index``-th 64 KiB block of a download: SHA-256 of the index, repeated."""
    return hashlib.sha256(index.to_bytes(8, "big")).digest() * (CHUNK // 32)


async def app(
    scope: MutableMapping[str, Any],
    receive: Callable[[], Awaitable[Message]],
    send: Callable[[Message], Awaitable[None]],
) -> None:
    """``/small``: 13 bytes; ``/download?n=BYTES``: streamed :func:`block` content."""
    if scope["type"] != "http":
        return  # no lifespan
    if scope["path"] == "/small":
        body = b"hello, serval"
        headers = [(b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        return
    size = int(scope["query_string"].decode().partition("=")[2])
    await send({"type": "http.response.start", "status": 200, "headers": []})
    blocks = [block(i) for i in range(16)]  # precomputed: measure the transfer, not SHA-256
    index = 0
    while index * CHUNK < size:
        data = blocks[index % 16][: size - index * CHUNK]
        await send({"type": "http.response.body", "body": data, "more_body": True})
        index += 1
    await send({"type": "http.response.body", "body": b""})


def expected_digest(size: int) -> str:
    blocks = [block(i) for i in range(16)]
    digest = hashlib.sha256()
    index = 0
    while index * CHUNK < size:
        digest.update(blocks[index % 16][: size - index * CHUNK])
        index += 1
    return digest.hexdigest()


async def http_bench(route: str, requests: int, download: int) -> dict[str, Any]:
    import httpx

    import pyserval
    from pyserval.http import AsyncServalTransport

    out: dict[str, Any] = {}
    async with pyserval.Host(["127.0.0.1:0"], routes={"bench": route}) as host:
        for label, keepalive in (("keepalive", 20), ("new_stream_each", 0)):
            transport = AsyncServalTransport(host, max_keepalive_connections=keepalive)
            async with httpx.AsyncClient(transport=transport, timeout=30) as client:
                for _ in range(20):  # warm-up
                    (await client.get("http://bench.serval/small")).raise_for_status()
                t0 = time.perf_counter()
                for _ in range(requests):
                    r = await client.get("http://bench.serval/small")
                    assert r.content == b"hello, serval"
                elapsed = time.perf_counter() - t0
            out[f"small_get_{label}"] = {
                "requests": requests,
                "seconds": round(elapsed, 3),
                "requests_per_s": round(requests / elapsed, 1),
                "mean_latency_ms": round(elapsed / requests * 1000, 3),
            }
        transport = AsyncServalTransport(host)
        async with httpx.AsyncClient(transport=transport, timeout=60) as client:
            digest = hashlib.sha256()
            got = 0
            t0 = time.perf_counter()
            async with client.stream("GET", f"http://bench.serval/download?n={download}") as r:
                async for chunk in r.aiter_raw():
                    digest.update(chunk)
                    got += len(chunk)
            elapsed = time.perf_counter() - t0
        ok = got == download and digest.hexdigest() == expected_digest(download)
        out["download"] = {
            "bytes": download,
            "seconds": round(elapsed, 3),
            "mb_per_s": round(download / elapsed / 1e6, 1),
            "sha256_ok": ok,
        }
        if not ok:
            raise SystemExit("download corrupted: the figures are void")
    return out


def pcap_bench(count: int) -> dict[str, Any]:
    from pyserval.tools.pcap import PcapWriter, ipv4_udp_frame

    data = bytes(1400)
    src, dst = ("127.0.0.1", 54324), ("127.0.0.1", 54325)
    t0 = time.perf_counter()
    for i in range(count):
        ipv4_udp_frame(data, src, dst, i)
    frame_us = (time.perf_counter() - t0) / count * 1e6
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.pcap"
        writer = PcapWriter(path, max_bytes=1 << 40)
        t0 = time.perf_counter()
        for _ in range(count):
            writer.write(data, src, dst)
        writer.close()
        write_us = (time.perf_counter() - t0) / count * 1e6
        size = path.stat().st_size
    return {
        "datagrams": count,
        "datagram_bytes": len(data),
        "frame_us": round(frame_us, 2),
        "frame_and_write_us": round(write_us, 2),
        "file_bytes": size,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--download-mib", type=int, default=64)
    parser.add_argument("--pcap-datagrams", type=int, default=200_000)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    sys.path.insert(0, str(SRC))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(Path(__file__).parent)])}
    server = subprocess.Popen(
        [
            *(sys.executable, "-m", "pyserval", "serve-asgi", "http_bench:app"),
            *("--service", "bench", "--app-dir", str(Path(__file__).parent), "--no-lifespan"),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        match = re.search(r" at (\S+)$", line.strip())
        if match is None:
            raise SystemExit(f"server did not start: {line!r}")
        result = {
            "benchmark": "http_bench",
            "python": platform.python_version(),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "http": asyncio.run(
                http_bench(match.group(1), args.requests, args.download_mib * 1024 * 1024)
            ),
        }
    finally:
        server.terminate()
        server.wait(10)
    result["pcap"] = pcap_bench(args.pcap_datagrams)
    emit(result, args.out)


if __name__ == "__main__":
    main()

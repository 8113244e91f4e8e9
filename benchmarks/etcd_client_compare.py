"""Which etcd client for router clusters: aetcd (gRPC) or the v3 JSON gateway over httpx.

    pip install aetcd    # not a pyserval dependency: only this comparison uses it
    python benchmarks/etcd_client_compare.py [--seconds 5] [--out FILE]

Measures, against real etcd members on free loopback ports (one JSON document printed):

* ``keepalive_<client>``: lease keepalive round trips (one every 50 ms) with etcd idle, and
  while another client writes as fast as it can (transactions of 128 puts of 200 bytes):
  p50 and p99 ms. A cluster router sends one every third of its lease TTL (1 s).
* ``watch_member_kill_<client>``: a watch open on member 0 of three, member 0 SIGKILLed:
  how long until the client says so, and how (neither resumes the watch by itself, so a
  router needs its own resynchronisation either way).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

from tests.helpers.etcd import EtcdCluster  # noqa: E402

from pyserval.control.etcd import EtcdClient  # noqa: E402

try:
    import aetcd  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - only the gateway is measured then
    aetcd = None


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def load(urls: list[str], seconds: float) -> int:
    client = EtcdClient(urls)
    n = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        await client.txn([(b"/load/%d" % (n + i), b"x" * 200) for i in range(128)])
        n += 128
    await client.aclose()
    return n


async def keepalive_gateway(urls: list[str], seconds: float) -> list[float]:
    client = EtcdClient(urls)
    lease, _ = await client.grant(3)
    lat: list[float] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t0 = time.perf_counter()
        await client.keepalive(lease)
        lat.append((time.perf_counter() - t0) * 1000)
        await asyncio.sleep(0.05)
    await client.aclose()
    return lat


async def keepalive_aetcd(port: int, seconds: float) -> list[float]:
    client = aetcd.Client(host="127.0.0.1", port=port)
    lease = await client.lease(3)
    lat: list[float] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t0 = time.perf_counter()
        await lease.refresh()
        lat.append((time.perf_counter() - t0) * 1000)
        await asyncio.sleep(0.05)
    await client.close()
    return lat


async def watch_member_kill(etcd: EtcdCluster, which: str) -> dict[str, Any]:
    async def gateway() -> tuple[float, str]:
        client = EtcdClient(etcd.urls)
        try:
            async for _ in client.watch(b"/w/", 1):
                pass
        except Exception as exc:
            return time.monotonic(), type(exc).__name__
        finally:
            await client.aclose()
        return time.monotonic(), "ended"

    async def grpc() -> tuple[float, str]:
        client = aetcd.Client(host="127.0.0.1", port=etcd.client_ports[0])
        try:
            async for _ in await client.watch_prefix(b"/w/"):
                pass
        except Exception as exc:
            return time.monotonic(), type(exc).__name__
        return time.monotonic(), "ended"

    task = asyncio.ensure_future(gateway() if which == "gateway" else grpc())
    await asyncio.sleep(0.5)
    t0 = time.monotonic()
    etcd.kill(0)
    try:
        async with asyncio.timeout(5):
            t1, how = await task
    except TimeoutError:
        return {"noticed_after_ms": None, "how": "no sign within 5 s"}
    return {"noticed_after_ms": round((t1 - t0) * 1000, 1), "how": how, "resumed_by_itself": False}


async def main_async(seconds: float) -> dict[str, Any]:
    res: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as d, EtcdCluster(Path(d), 1) as etcd:
        runs: list[tuple[str, Callable[[], Awaitable[list[float]]]]] = [
            ("gateway", lambda: keepalive_gateway(etcd.urls, seconds))
        ]
        if aetcd is not None:
            runs.append(("aetcd", lambda: keepalive_aetcd(etcd.client_ports[0], seconds)))
        for name, measure in runs:
            idle = await measure()
            loaded, puts = await asyncio.gather(measure(), load(etcd.urls, seconds))
            res[f"keepalive_{name}"] = {
                "idle_p50_ms": round(statistics.median(idle), 2),
                "idle_p99_ms": round(pct(idle, 0.99), 2),
                "loaded_p50_ms": round(statistics.median(loaded), 2),
                "loaded_p99_ms": round(pct(loaded, 0.99), 2),
                "puts_meanwhile": puts,
            }
    for which in ("gateway", "aetcd") if aetcd is not None else ("gateway",):
        with tempfile.TemporaryDirectory() as d, EtcdCluster(Path(d), 3) as etcd:
            res[f"watch_member_kill_{which}"] = await watch_member_kill(etcd, which)
    return res


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--out")
    args = parser.parse_args()
    text = json.dumps(asyncio.run(main_async(args.seconds)), indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

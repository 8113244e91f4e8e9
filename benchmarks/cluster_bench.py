"""Router clusters on a real etcd: convergence, registration rate, a 100,000-service sync.

    python benchmarks/cluster_bench.py [--samples 200] [--services 100000] [--out FILE]

Starts one etcd member (``etcd`` from Debian's etcd-server) on free loopback ports in a
temporary directory and prints one JSON document (and writes it with ``--out``):

* ``convergence_ms``: a fresh service registered at router 1 (one REGISTER datagram from a
  host) until router 3's service table resolves it (polled every 0.2 ms): p50, p99, max
  over ``--samples``. The three routers share this process and its event loop (so the
  figure includes their scheduling, as on a busy machine), etcd is its own process.
* ``registrations``: ``--burst`` new instances (REGISTER messages of 64) sent to router 1
  as fast as it acknowledges them; per second until router 3 has them all.
* ``sync_100k``: ``--services`` instance keys written to etcd (as another router would),
  then a new router started: the time until its first full read is applied (keys in its
  table), its resident memory growth, and the SHA-256 of the (service, address) pairs it
  holds against those written (they must match).
* ``connect_rate``: sequential connections (connect, the server accepts and closes, the
  client reads end of stream and closes) through a standalone router and through a cluster
  router, client, server and router in this process, ``--connect-seconds`` each, alternated three
  times (medians): the
  ratio is the cost of being in a cluster on the connection path (none is expected: the
  SYN is forwarded from the same service table; etcd work happens on changes only).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

from tests.helpers.etcd import EtcdCluster  # noqa: E402

import pyserval  # noqa: E402
from pyserval.control import (  # noqa: E402
    CONTROL_SERVICE,
    RegisterMessage,
    Registration,
    Router,
    encode_message,
)
from pyserval.control.cluster import InstanceRecord, cluster_root  # noqa: E402
from pyserval.control.etcd import EtcdClient  # noqa: E402
from pyserval.naming import ServiceID  # noqa: E402
from pyserval.sal.service_table import Action  # noqa: E402
from report import emit  # noqa: E402


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def send_register(
    host: pyserval.Host, ep: Any, router: Router, sids: list[ServiceID]
) -> None:
    now = time.time()
    regs = [Registration.make(s, now=now, nonce=os.urandom(16), ttl=3600.0) for s in sids]
    data = encode_message(RegisterMessage(seq=1, registrations=regs))
    host.send_datagram(ep, CONTROL_SERVICE, data, to=router.address)


async def convergence(routers: list[Router], samples: int) -> dict[str, float]:
    first, last = routers[0], routers[-1]
    times: list[float] = []
    async with pyserval.Host(["127.0.0.1:0"]) as host:
        ep = host.bind_datagram(ServiceID(os.urandom(32)), register=False)
        for _ in range(samples):
            sid = ServiceID(os.urandom(32))
            t0 = time.perf_counter()
            await send_register(host, ep, first, [sid])
            while True:
                res = last.host.service_table.lookup(sid)
                if (
                    res is not None
                    and res.action is Action.FORWARD
                    and res.entry.prefix.length == 256
                ):
                    break
                await asyncio.sleep(0.0002)
            times.append((time.perf_counter() - t0) * 1000)
    return {
        "samples": samples,
        "p50_ms": round(statistics.median(times), 3),
        "p99_ms": round(pct(times, 0.99), 3),
        "max_ms": round(max(times), 3),
    }


async def registration_rate(routers: list[Router], burst: int) -> dict[str, float]:
    first, last = routers[0], routers[-1]
    before = last.registry.remote_count  # type: ignore[attr-defined]
    sids = [ServiceID(os.urandom(32)) for _ in range(burst)]
    async with pyserval.Host(["127.0.0.1:0"]) as host:
        ep = host.bind_datagram(ServiceID(os.urandom(32)), register=False)
        t0 = time.perf_counter()
        for i in range(0, burst, 64):
            await send_register(host, ep, first, sids[i : i + 64])
            await asyncio.sleep(0.001)  # paced: the router's socket buffer is not the test
        deadline = time.perf_counter() + 60
        while last.registry.remote_count - before < burst:  # type: ignore[attr-defined]
            if time.perf_counter() > deadline:
                raise RuntimeError("registrations did not all arrive within 60 s")
            await asyncio.sleep(0.001)
        elapsed = time.perf_counter() - t0
    return {
        "instances": burst,
        "seconds": round(elapsed, 3),
        "per_second": round(burst / elapsed, 1),
        "etcd_transactions_router1": first.cluster.stats["transactions"],  # type: ignore[union-attr]
    }


async def sync_100k(urls: list[str], services: int) -> dict[str, Any]:
    client = EtcdClient(urls, timeout=10)
    root = cluster_root("bench")
    pairs: list[str] = []
    ops: list[tuple[bytes, bytes | None]] = []
    for i in range(services):
        sid = ServiceID(i.to_bytes(4, "big") + os.urandom(28))
        address = f"127.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255 or 1}:{1000 + i % 60000}"
        rec = InstanceRecord(
            service=f"{sid.hex}/256", address=address, weight=1, priority=0, router="writer"
        )
        ops.append(
            (
                root + f"instances/writer/{address}/{rec.service}".encode(),
                rec.model_dump_json().encode(),
            )
        )
        pairs.append(f"{rec.service} {rec.address}")
    t0 = time.perf_counter()
    await client.txn(ops)
    write_s = time.perf_counter() - t0
    await client.aclose()
    written = hashlib.sha256("\n".join(sorted(pairs)).encode()).hexdigest()
    rss0 = rss_bytes()
    t0 = time.perf_counter()
    router = Router("127.0.0.1:0", etcd=urls, cluster="bench")
    async with router:
        assert router.cluster is not None
        await router.cluster.synced.wait()
        sync_s = time.perf_counter() - t0
        rss1 = rss_bytes()
        reg = router.registry
        held = [
            f"{prefix} {pyserval.control.format_instance_address(address)}"
            for prefix, address, _, _ in reg.remote_keys.values()  # type: ignore[attr-defined]
        ]
        table_entries = len(router.host.service_table)
        read_ms = router.cluster.stats["last_read_ms"]
        apply_ms = router.cluster.stats["last_apply_ms"]
    got = hashlib.sha256("\n".join(sorted(held)).encode()).hexdigest()
    return {
        "services": services,
        "etcd_write_seconds": round(write_s, 2),
        "router_sync_seconds": round(sync_s, 3),
        "of_which_etcd_read_seconds": read_ms / 1000,
        "of_which_apply_seconds": apply_ms / 1000,
        "router_rss_growth_mib": round((rss1 - rss0) / 2**20, 1),
        "bytes_per_service": round((rss1 - rss0) / services),
        "table_entries": table_entries,
        "sha256_written": written,
        "sha256_held": got,
        "match": written == got,
    }


async def connect_rate(router: Router, seconds: float) -> dict[str, float]:
    """Sequential connect -> accept and close -> end of stream -> close, through ``router``
    (client, server and router in this process)."""
    async with (
        pyserval.Host(["127.0.0.1:0"], router=router.address_text) as server,
        pyserval.Host(["127.0.0.1:0"], router=router.address_text) as client,
    ):
        listener = await server.listen("cr-echo")

        async def accept() -> None:
            async for stream in listener:
                await stream.aclose()

        task = asyncio.ensure_future(accept())
        while router.host.service_table.lookup(ServiceID.from_name("cr-echo")) is None:
            await asyncio.sleep(0.005)
        for _ in range(20):  # warm-up
            s = await client.connect("cr-echo")
            await s.aclose()
        n = 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            stream = await client.connect("cr-echo")
            with contextlib.suppress(anyio.EndOfStream):
                await stream.receive()
            await stream.aclose()
            n += 1
        elapsed = time.perf_counter() - t0
        task.cancel()
    return {"connections": n, "per_second": round(n / elapsed, 1)}


async def connect_rates(urls: list[str], seconds: float) -> dict[str, Any]:
    # Alternated, three rounds each, medians: the machine's load drifts between runs.
    runs: dict[str, list[float]] = {"standalone": [], "cluster": []}
    for _ in range(3):
        for name, kw in (("standalone", {}), ("cluster", {"etcd": urls, "cluster": "cr"})):
            async with Router("127.0.0.1:0", **kw) as router:  # type: ignore[arg-type]
                runs[name].append((await connect_rate(router, seconds))["per_second"])
    out: dict[str, Any] = {
        name: {"per_second_median": statistics.median(v), "runs": v} for name, v in runs.items()
    }
    out["cluster_vs_standalone"] = round(
        out["cluster"]["per_second_median"] / out["standalone"]["per_second_median"], 3
    )
    return out


async def main_async(args: argparse.Namespace, urls: list[str]) -> dict[str, Any]:
    routers = [Router("127.0.0.1:0", etcd=urls, cluster="dc1") for _ in range(3)]
    for r in routers:
        await r.start()
    try:
        conv = await convergence(routers, args.samples)
        rate = await registration_rate(routers, args.burst)
    finally:
        for r in routers:
            await r.close()
    rates = await connect_rates(urls, args.connect_seconds)
    big = await sync_100k(urls, args.services)
    return {"convergence_ms": conv, "registrations": rate, "connect_rate": rates, "sync_100k": big}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--burst", type=int, default=6400)
    parser.add_argument("--services", type=int, default=100_000)
    parser.add_argument("--connect-seconds", type=float, default=3.0)
    parser.add_argument("--out")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as d, EtcdCluster(Path(d), 1) as etcd:
        result = asyncio.run(main_async(args, etcd.urls))
    result["machine"] = {"cpus": os.cpu_count(), "python": sys.version.split()[0]}
    emit(result, args.out, indent=1)
    return 0 if result["sync_100k"]["match"] else 1


if __name__ == "__main__":
    sys.exit(main())

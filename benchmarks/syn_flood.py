"""A SYN flood against a listener, with legitimate clients during and after (issue 11).

Processes on loopback: an instance (``pyserval echo``), optionally behind a service router
(``pyserval router``), a flooder sending forged SYNs (random flowIDs, nonces and numbers)
as fast as the schedule says, and this process as the legitimate client: it connects and
echoes a random message (checked byte for byte) at a steady pace during the flood and a
batch right after. Prints one JSON object: how many legitimate connects succeeded during
and after, the instance's resident memory before and after, and the SYNs actually sent.

    python benchmarks/syn_flood.py [--syns 100000] [--seconds 5] [--via router]

The instance answers with SYN cookies once its half-open table is full, so the flood leaves
no state behind; without them the table fills and every new SYN is dropped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import treepath

# pyserval from PYTHONPATH when set (suite.py runs other trees so), else this checkout's.
SRC = treepath.pin()

import pyserval  # noqa: E402
from pyserval.naming.service_id import as_service_id  # noqa: E402
from pyserval.sal import (  # noqa: E402
    PROTO_TCP,
    ControlExt,
    ControlFlags,
    SalPacket,
    ServiceExt,
    TcpFlags,
    TcpHeader,
    TcpOption,
)

SERVICE = "flooded"


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYSERVAL_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _spawn(*argv: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "pyserval", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=_env(),
    )


def _ready(proc: subprocess.Popen[str], marker: str) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{proc.args!r} exited before {marker!r}")
        if marker in line:
            return line.strip().rsplit(" ", 1)[1]
    raise RuntimeError(f"{proc.args!r}: no {marker!r} in 30 s")


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def flood(target: tuple[str, int], syns: int, seconds: float, seed: int) -> int:
    """Send ``syns`` forged SYNs to ``target`` evenly over ``seconds`` (from this process)."""
    rng = random.Random(seed)
    sid = as_service_id(SERVICE)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    opts = [TcpOption.mss(1408), TcpOption.nop(), TcpOption.window_scale(5)]
    packets = []
    for _ in range(min(syns, 20_000)):  # a pool reused round-robin: the cost is in sending
        ctl = ControlExt(ControlFlags.SYN, rng.getrandbits(32), 0, rng.randbytes(8))
        tcp = TcpHeader(seq=rng.getrandbits(32), flags=TcpFlags.SYN, options=opts)
        pkt = SalPacket(rng.getrandbits(32) | 1, 0, PROTO_TCP, [ctl, ServiceExt(sid)], tcp)
        packets.append(pkt.encode("127.0.0.1", target[0]))
    sent = 0
    start = time.monotonic()
    while sent < syns:
        due = min(syns, int((time.monotonic() - start) / seconds * syns) + 1)
        while sent < due:
            try:
                sock.sendto(packets[sent % len(packets)], target)
            except BlockingIOError:
                break
            sent += 1
        time.sleep(0.0005)
    sock.close()
    return sent


async def _echo(host: pyserval.Host, timeout: float) -> bool:
    message = os.urandom(64)
    try:
        stream = await host.connect(SERVICE, timeout=timeout)
    except pyserval.ServalConnectError:
        return False
    try:
        await stream.send(message)
        got = b""
        async with asyncio.timeout(timeout):
            while len(got) < len(message):
                got += await stream.receive()
        return got == message
    except (TimeoutError, Exception):
        return False
    finally:
        await stream.aclose()


async def _clients(
    route: str | None, router: str | None, during: int, after: int, seconds: float, timeout: float
) -> tuple[int, int]:
    host = pyserval.Host(["127.0.0.1:0"], router=router)
    async with host:
        if route is not None:
            host.add_route(SERVICE, route)
        tasks = []
        for _ in range(during):  # steady pace across the flood
            tasks.append(asyncio.ensure_future(_echo(host, timeout)))
            await asyncio.sleep(seconds / during)
        ok_during = sum(await asyncio.gather(*tasks))
        ok_after = sum(await asyncio.gather(*(_echo(host, timeout) for _ in range(after))))
        return ok_during, ok_after


async def _counters(addr: str) -> dict[str, int]:
    from pyserval.control import fetch_table

    try:
        dump = await fetch_table(addr)
    except Exception:  # an instance without inspection (older versions) reports nothing
        return {}
    return dict(dump.counters)


def run(syns: int, seconds: float, via: str, during: int = 40, after: int = 20) -> dict[str, Any]:
    """The whole scenario; the figures as a dict."""
    procs: list[subprocess.Popen[str]] = []
    try:
        router_addr = None
        if via == "router":
            procs.append(_spawn("router", "--listen", "127.0.0.1:0"))
            router_addr = _ready(procs[-1], "router listening on")
        args = ["echo", "--service", SERVICE, "--listen", "127.0.0.1:0", "--inspect"]
        if router_addr is not None:
            args += ["--router", router_addr]
        procs.append(_spawn(*args))
        instance = procs[-1]
        addr = _ready(instance, f"serving {SERVICE} at")
        ip, port = addr.rsplit(":", 1)
        target_text = router_addr if router_addr is not None else addr
        tip, tport = target_text.rsplit(":", 1)
        time.sleep(1.0 if router_addr else 0.2)  # the registration reaches the router
        rss_before = _rss(instance.pid)
        flooder = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--flood-only",
                f"{tip}:{tport}",
                "--syns",
                str(syns),
                "--seconds",
                str(seconds),
            ],
            stdout=subprocess.PIPE,
            text=True,
            env=_env(),
        )
        procs.append(flooder)
        ok_during, ok_after = asyncio.run(
            _clients(None if router_addr else addr, router_addr, during, after, seconds, timeout=15)
        )
        out, _ = flooder.communicate(timeout=120)
        rss_after = _rss(instance.pid)
        counters = asyncio.run(_counters(addr))
        return {
            "via": via,
            "syns_sent": int(out.strip() or 0),
            "flood_seconds": seconds,
            "legit_during": during,
            "legit_during_ok": ok_during,
            "legit_after": after,
            "legit_after_ok": ok_after,
            "instance_rss_before": rss_before,
            "instance_rss_after": rss_after,
            "instance_rss_growth": rss_after - rss_before,
            "instance": f"{ip}:{port}",
            "instance_counters": {
                k: v
                for k, v in counters.items()
                if any(w in k for w in ("syn_cookie", "half_open", "rst_", "received"))
            },
        }
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--syns", type=int, default=100_000)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--via", choices=["direct", "router", "both"], default="both")
    parser.add_argument("--flood-only", metavar="IP:PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.flood_only:
        ip, port = args.flood_only.rsplit(":", 1)
        print(flood((ip, int(port)), args.syns, args.seconds, seed=os.getpid()))
        return 0
    vias = ["direct", "router"] if args.via == "both" else [args.via]
    print(json.dumps([run(args.syns, args.seconds, v) for v in vias], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

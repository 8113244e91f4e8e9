"""``pyserval demo``: a service router, two echo replicas and a client, live on loopback.

1. A router starts in this process; two replicas of the "echo" service start as separate
   processes (``pyserval echo``) with weights 1 and 3 and register with it.
2. The client connects by serviceID only. Each SYN goes to the router, which picks a replica
   by weight; the replica answers the client directly and the data never touches the router.
3. Replica B is killed (SIGKILL: no goodbye). The router drops it within a second (its
   registration stops being refreshed, or the network reports it unreachable) and new
   connections go to replica A.
The service table is printed before and after. The demo ends by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
from collections import Counter

from ..control import Router, fetch_table, format_table
from ..runtime import Host, ServalConnectError
from ..sal.control import ControlTimers
from ..transport.config import StreamConfig

__all__ = ["add_arguments", "run"]

SERVICE = "echo"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``pyserval demo``."""
    parser.add_argument("--connections", type=int, default=40, help="connections per phase")


def _title(text: str) -> None:
    print(f"\n== {text} " + "=" * max(0, 74 - len(text)), flush=True)


def _bar(count: int, total: int, width: int = 40) -> str:
    return "#" * round(width * count / max(total, 1))


async def _start_replica(name: str, weight: int, router: str) -> tuple[subprocess.Popen[str], str]:
    cmd = [sys.executable, "-m", "pyserval", "echo", "--service", SERVICE, "--router", router]
    cmd += ["--weight", str(weight), "--name", name]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    line = await asyncio.to_thread(proc.stdout.readline)
    if "serving" not in line:
        proc.kill()
        raise RuntimeError(f"replica {name} did not start: {line!r}")
    address = line.rsplit(" at ", 1)[1].strip()
    print(f"replica {name}: pid {proc.pid}, weight {weight}, at {address}", flush=True)
    return proc, address


async def _one(client: Host, names: dict[str, str]) -> str:
    stream = await client.connect(SERVICE, timeout=5.0)
    try:
        await stream.send(b"hello")
        reply = await stream.receive()
        assert reply == b"hello", reply
        peer = stream.remote_address
        return names.get(f"{peer[0]}:{peer[1]}", "?") if peer else "?"
    finally:
        await stream.aclose()


async def _phase(client: Host, names: dict[str, str], connections: int) -> Counter[str]:
    """``connections`` connections one after another, a letter printed for each."""
    seen: Counter[str] = Counter()
    for i in range(connections):
        try:
            who = await _one(client, names)
        except ServalConnectError:
            who = "x"
        seen[who] += 1
        print(who, end="" if (i + 1) % 50 else "\n" + " " * 39, flush=True)
        await asyncio.sleep(0.02)  # slow enough to watch
    print()
    return seen


async def _wait_instances(router: Router, count: int, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while len(router.registry) != count:
        if asyncio.get_running_loop().time() > deadline:
            raise RuntimeError(
                f"expected {count} registered instances, have {len(router.registry)}"
            )
        await asyncio.sleep(0.01)


async def _demo(connections: int) -> None:
    procs: list[subprocess.Popen[str]] = []
    async with Router("127.0.0.1:0") as router:
        r = router.address_text
        _title(f"router at {r}; starting two echo replicas")
        try:
            a_proc, a_addr = await _start_replica("A", 1, r)
            procs.append(a_proc)
            b_proc, b_addr = await _start_replica("B", 3, r)
            procs.append(b_proc)
            names = {a_addr: "A", b_addr: "B"}
            labels = {SERVICE: SERVICE, "pyserval.control": "control"}
            await _wait_instances(router, 2)
            _title("the router's service table (learned from registrations)")
            print(format_table(await fetch_table(r), labels), flush=True)

            # A quick SYN retry (0.5 s instead of the reference's 3 s) so a SYN that went to
            # the replica just killed is retried promptly.
            cfg = StreamConfig(control=ControlTimers(initial_rto=0.5))
            async with Host(["127.0.0.1:0"], router=r, stream_config=cfg) as client:
                _title(f"{connections} connections to '{SERVICE}' by serviceID (weights A=1, B=3)")
                print("  each letter is one connection, live: ", end="", flush=True)
                seen = await _phase(client, names, connections)
                for who in ("A", "B"):
                    n = seen[who]
                    print(
                        f"  replica {who}: {n:>3} ({n / connections:4.0%}) {_bar(n, connections)}"
                    )
                fwd = router.counters().get("packets_forwarded_syn", 0)
                print(
                    f"  packets through the router: {fwd} SYNs, nothing else: "
                    "replies and data went directly between client and replica"
                )

                _title("replica B killed with SIGKILL (it cannot unregister)")
                b_proc.send_signal(signal.SIGKILL)
                killed = asyncio.get_running_loop().time()
                await asyncio.to_thread(b_proc.wait)
                print("  each letter is one connection, live: ", end="", flush=True)
                seen = await _phase(client, names, connections)
                await _wait_instances(router, 1)
                gone_at = router.last_change - killed
                print(f"  the router dropped replica B {gone_at * 1000:.0f} ms after the kill")
                for who, n in sorted(seen.items()):
                    print(f"  replica {who}: {n:>3} {_bar(n, connections)}")
                how = router.counters()
                why = (
                    "the network reported it unreachable"
                    if how.get("registry_unreachable_removed")
                    else "its registration expired"
                )
                print(f"  ({why}; a SYN sent to it meanwhile was retried after 0.5 s)")
            _title("the service table after the failure")
            print(format_table(await fetch_table(r), labels), flush=True)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            for proc in procs:
                try:
                    await asyncio.to_thread(proc.wait, 5)
                except subprocess.TimeoutExpired:
                    proc.kill()
    _title("done")


def run(args: argparse.Namespace) -> int:
    """Run the demonstration (about ten seconds)."""
    asyncio.run(_demo(args.connections))
    return 0

"""Memory per flow in TIME_WAIT after a connect loop: the compact record against the whole
connection, each in a fresh process (JSON out).

    python benchmarks/time_wait_memory.py [--connections 10000] [--out FILE]

Issue 14's row: a connect loop left 10,000 flows in TIME_WAIT at about 9.3 KB each
(+93 MB); the goal is at most 1 KB each. Here both hosts share one asyncio loop on real
UDP sockets (as ``connect_inproc.py``); the cycle is ``suite_cases.py``'s (connect, the
server accepts and closes, the client reads end of stream and closes), so the server
closes first and keeps every flow in TIME_WAIT for its default 30 s, longer than the loop
runs. Each mode runs in a process of its own, so that neither inherits the other's heap:

* ``compact``: the host's default, a ``core.time_wait.TimeWait`` record per flow;
* ``whole``: ``HostCore.compact_time_wait = False``, the whole connection kept (as before
  the records existed).

A mode's figure is the growth of the process's resident set from just before the loop to
just after it (garbage collected and ``malloc_trim``: heap the loop freed is handed back
first) divided by the flows the server holds in TIME_WAIT at the end, which must be every
connection of the loop. That growth includes whatever else the loop left behind on either
host, so it is an upper bound for the record itself (``tests/test_time_wait.py`` measures
the record alone with tracemalloc). ``ok``: every connection was accepted, read a clean
end of stream, and is in TIME_WAIT on the server at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import treepath
from connect_inproc import Counts, cycle, serve
from report import emit
from service_table import malloc_trim, rss_bytes

SRC = treepath.pin()

import pyserval  # noqa: E402
from pyserval.core.host import HostCore  # noqa: E402
from pyserval.transport.connection import State  # noqa: E402

SERVICE = "time-wait-memory"
MODES = ("compact", "whole")
# The goal for one flow in TIME_WAIT.
GOAL_BYTES = 1024


def _in_time_wait(core: HostCore) -> int:
    """Flows ``core`` holds in TIME_WAIT: records, and whole connections in that state."""
    whole = sum(1 for c in core.connections.values() if c.state is State.TIME_WAIT)
    return len(core.time_wait) + whole


async def run(mode: str, connections: int, warmup: int) -> dict[str, Any]:
    """``warmup`` cycles, then ``connections`` measured ones; the server's TIME_WAIT memory."""
    counts = Counts()

    client_config = pyserval.StreamConfig(time_wait=1.0)  # (the client closes second)
    async with (
        pyserval.Host(["127.0.0.1:0"]) as server,
        pyserval.Host(["127.0.0.1:0"], stream_config=client_config) as client,
    ):
        core = server.core
        assert core is not None
        core.compact_time_wait = mode == "compact"
        hold = server.stream_config.time_wait
        listener = await server.listen(SERVICE, backlog=1024)
        task = asyncio.ensure_future(serve(listener, counts))
        ip, port = server.addresses[0]
        client.add_route(SERVICE, f"{ip}:{port}")
        for _ in range(warmup):
            await cycle(client, counts, SERVICE)
        await asyncio.sleep(0.05)  # the warm-up's last close
        gc.collect()
        malloc_trim()
        rss0 = rss_bytes()
        waits0 = _in_time_wait(core)
        start = time.perf_counter()
        for _ in range(connections):
            await cycle(client, counts, SERVICE)
        await asyncio.sleep(0.05)  # the last close: SAL FIN and its ACK
        elapsed = time.perf_counter() - start
        gc.collect()
        malloc_trim()
        rss1 = rss_bytes()
        waits1 = _in_time_wait(core)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    added = waits1 - waits0
    total = warmup + connections
    return {
        "mode": mode,
        "connections": connections,
        "seconds": round(elapsed, 2),
        "time_wait_hold_s": hold,
        "in_time_wait_added": added,
        "rss_growth_bytes": rss1 - rss0,
        "bytes_per_flow": round((rss1 - rss0) / added) if added > 0 else None,
        # Every connection of the loop must still be waiting (the loop ran for less than
        # the hold) for the division to mean memory per flow.
        "ok": counts.accepted == total and counts.clean_ends == total and added == connections,
    }


def _child(mode: str, connections: int, warmup: int) -> dict[str, Any]:
    """Run one mode in a fresh interpreter (the same tree) and return its JSON."""
    cmd = [sys.executable, __file__, "--child", mode]
    cmd += ["--connections", str(connections), "--warmup", str(warmup)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=600)
    if done.returncode not in (0, 1) or not done.stdout.strip():
        return {"mode": mode, "ok": False, "error": done.stderr.strip()[-2000:]}
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def main(argv: list[str] | None = None) -> int:
    """Measure both modes (or, with ``--child``, one) and print the JSON."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.child:
        result = asyncio.run(run(args.child, args.connections, args.warmup))
        print(json.dumps(result))
        return 0 if result["ok"] else 1
    runs = {mode: _child(mode, args.connections, args.warmup) for mode in MODES}
    compact = runs["compact"].get("bytes_per_flow")
    whole = runs["whole"].get("bytes_per_flow")
    report = {
        "case": "time_wait_memory",
        "pyserval_src": str(SRC),
        "goal_bytes_per_flow": GOAL_BYTES,
        "runs": runs,
        "compact_bytes_per_flow": compact,
        "whole_bytes_per_flow": whole,
        "whole_over_compact": round(whole / compact, 1) if compact and whole else None,
        "goal_met": compact is not None and compact <= GOAL_BYTES,
        "ok": all(bool(r.get("ok")) for r in runs.values()),
    }
    emit(report, args.out)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

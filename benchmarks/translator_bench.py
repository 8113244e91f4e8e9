"""The translator against direct TCP and native pyserval, in one run.

    python benchmarks/translator_bench.py [--seconds 3] [--mss 1408,8192] [--out FILE]

Each measurement is a bulk transfer in separate processes (``baselines.run_chain``); MB/s
(10**6 bytes) as the receiver saw it. Printed as JSON:

* ``tcp_direct``: asyncio TCP sender -> asyncio TCP receiver over loopback;
* ``serval_native``: one pyserval stream, sender -> receiver (two processes), with the stream
  settings the translators use (``StreamConfig()`` but for the MSS), for each MSS;
* ``translator_chain``: TCP sender -> inbound translator -> Serval -> outbound translator ->
  TCP receiver (four processes; a static route, as a router only sees the SYN), for each MSS;
* ``ratios``: chain / native for each MSS, and chain / direct TCP (each figure is the median
  of ``--repeat`` runs, the kinds interleaved, with every run's figure listed);
* ``profile``: the chain once more with cProfile (CPU time) running in both translators
  (slower, so its own throughput is given): where each translator's CPU time goes, by area
  of the code and by function.

Every process's CPU seconds are included: on a small machine the four processes of the chain
share the cores, which the native pair does not have to.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import anyio

import baselines
from baselines import MB, Control, Params, Result, run_chain, run_pair
from host_bench import serval_bulk_receiver, serval_bulk_sender
from pyserval.translator import Translator
from pyserval.transport.config import StreamConfig
from report import emit

SERVICE = "bench"
READ = 256 * 1024  # the translator's chunk size: the native receiver reads as much


def _config(params: Params) -> StreamConfig:
    return StreamConfig(mss=params["mss"])


# -- native pyserval ---------------------------------------------------------------------------


def serval_native(seconds: float, mss: int) -> Result:
    """One pyserval stream between two processes."""
    params = {
        "seconds": seconds,
        "mss": mss,
        "grace": 0.1,
        "read": READ,  # as the translator reads
        "chunk": baselines.TCP_CHUNK,  # as the TCP sender writes
        "buffer": 1 << 20,  # the default, as in the translators
    }
    received, sent = run_pair(serval_bulk_receiver, serval_bulk_sender, params)
    return {
        "mss": mss,
        "mb_per_s": round(received["bytes"] / received["seconds"] / MB, 1),
        "bytes": received["bytes"],
        "cpu_s": {"receiver": received["cpu_s"], "sender": sent["cpu_s"]},
    }


# -- the translator chain ----------------------------------------------------------------------


def _profile_summary(prof: cProfile.Profile, top: int = 15) -> Result:
    """Own time (tottime) by area of the code and the top functions."""
    stats = pstats.Stats(prof)
    rows: list[tuple[float, float, int, str, str]] = []
    areas: dict[str, float] = {}
    for (filename, line, func), (_cc, ncalls, tottime, cumtime, _callers) in (
        stats.stats.items()  # type: ignore[attr-defined]
    ):
        area = _area(filename, func)
        areas[area] = areas.get(area, 0.0) + tottime
        where = func if filename == "~" else f"{_short(filename)}:{line}({func})"
        rows.append((tottime, cumtime, ncalls, where, area))
    total = sum(areas.values()) or 1.0
    rows.sort(reverse=True)
    return {
        "total_s": round(total, 3),
        "by_area_percent": {
            k: round(100 * v / total, 1) for k, v in sorted(areas.items(), key=lambda kv: -kv[1])
        },
        "top_functions": [
            {
                "function": w,
                "area": a,
                "tottime_s": round(t, 3),
                "cumtime_s": round(c, 3),
                "calls": n,
            }
            for t, c, n, w, a in rows[:top]
        ],
    }


def _short(filename: str) -> str:
    for marker in ("/pyserval/", "/asyncio/", "/anyio/"):
        if marker in filename:
            return marker.strip("/") + "/" + filename.split(marker, 1)[1]
    return Path(filename).name


def _area(filename: str, func: str) -> str:
    if filename == "~":
        if any(s in func for s in ("send", "recv", "sendmsg", "recvmsg", "sendto", "recvfrom")):
            return "socket system calls"
        if "select" in func or "poll" in func:
            return "waiting in the event loop (epoll)"
        return "built-ins (copies, joins, dict/list work)"
    for part, name in (
        ("/pyserval/translator/", "translator (relay, TCP side)"),
        ("/sortedcontainers/", "sortedcontainers (segment and reassembly maps)"),
        ("/pyserval/runtime/udp", "pyserval UDP endpoint"),
        ("/pyserval/runtime/", "pyserval runtime (host, streams)"),
        ("/pyserval/transport/", "pyserval transport (Serval TCP)"),
        ("/pyserval/core/", "pyserval core (SAL, flows)"),
        ("/pyserval/sal/", "pyserval SAL codec"),
        ("/asyncio/", "asyncio (loop, transports)"),
        ("/anyio/", "anyio"),
    ):
        if part in filename:
            return name
    return "other (standard library)"


async def _translate(ctl: Control, params: Params, translator: Translator, announce: Any) -> Result:
    # CPU time, not wall time: waiting (for the peer, or for a core on a busy machine) is
    # not where the translator's work goes.
    prof = cProfile.Profile(time.process_time) if params.get("profile") else None
    if prof is not None:
        prof.enable()
    async with translator:
        ctl.announce(announce(translator))
        await ctl.stopped()
        # The sender has finished: let what is still in flight drain before closing.
        deadline = time.monotonic() + 30
        while translator.active and time.monotonic() < deadline:
            await anyio.sleep(0.01)
    if prof is not None:
        prof.disable()
    stats = translator.stats
    result: Result = {
        "closed": stats.closed,
        "reset": stats.reset,
        "tcp_to_serval": stats.tcp_to_serval,
    }
    if prof is not None:
        result["profile"] = _profile_summary(prof)
    return result


async def outbound_side(ctl: Control, params: Params) -> Result:
    """service:bench -> the TCP receiver; announces its Serval address."""
    target = "tcp:{}:{}".format(*params["address"])
    translator = Translator(f"service:{SERVICE}", target, stream_config=_config(params))
    return await _translate(ctl, params, translator, lambda t: t.serval_addresses[0])


async def inbound_side(ctl: Control, params: Params) -> Result:
    """TCP -> service:bench (static route to the outbound side); announces its TCP address."""
    route = "{}:{}".format(*params["address"])
    translator = Translator(
        "tcp:127.0.0.1:0",
        f"service:{SERVICE}",
        routes={SERVICE: route},
        stream_config=_config(params),
    )
    return await _translate(ctl, params, translator, lambda t: t.tcp_address)


def translator_chain(seconds: float, mss: int, profile: bool = False) -> Result:
    """TCP sender -> inbound -> Serval -> outbound -> TCP receiver."""
    receiver, outbound, inbound, sender = run_chain(
        [baselines.tcp_bulk_receiver, outbound_side, inbound_side, baselines.tcp_bulk_sender],
        {"seconds": seconds, "mss": mss, "profile": profile},
    )
    out: Result = {
        "mss": mss,
        "mb_per_s": round(receiver["bytes"] / receiver["seconds"] / MB, 1),
        "bytes": receiver["bytes"],
        "connections_closed_cleanly": min(inbound["closed"], outbound["closed"]),
        "cpu_s": {
            "tcp_sender": sender["cpu_s"],
            "inbound_translator": inbound["cpu_s"],
            "outbound_translator": outbound["cpu_s"],
            "tcp_receiver": receiver["cpu_s"],
        },
    }
    if profile:
        out["inbound_translator"] = inbound["profile"]
        out["outbound_translator"] = outbound["profile"]
    return out


def _median_run(runs: list[Result]) -> Result:
    """The run with the median throughput, with every run's figure beside it."""
    ranked = sorted(runs, key=lambda r: r["mb_per_s"])
    median = ranked[len(ranked) // 2]
    return {
        **median,
        "mbit_per_s": round(median["mb_per_s"] * 8, 1),  # the paper's unit
        "mb_per_s_runs": [r["mb_per_s"] for r in runs],
    }


def main(argv: list[str] | None = None) -> int:
    """Run everything and print (and optionally write) the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--mss", default="1408,8192")
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs of each (interleaved); the median is kept"
    )
    parser.add_argument("--no-profile", action="store_true", help="skip the profiled run")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    sizes = [int(m) for m in args.mss.split(",")]
    out: dict[str, Any] = {"environment": baselines.environment(), "repeat": args.repeat}
    tcp_runs = []
    native: dict[int, list[Result]] = {m: [] for m in sizes}
    chain: dict[int, list[Result]] = {m: [] for m in sizes}
    # Interleaved, so that load from elsewhere on the machine hits every kind alike.
    for _ in range(args.repeat):
        tcp_runs.append(baselines.tcp_throughput(args.seconds))
        for m in sizes:
            native[m].append(serval_native(args.seconds, m))
            chain[m].append(translator_chain(args.seconds, m))
    out["tcp_direct"] = _median_run(tcp_runs)
    out["serval_native"] = [_median_run(native[m]) for m in sizes]
    out["translator_chain"] = [_median_run(chain[m]) for m in sizes]
    tcp = out["tcp_direct"]["mb_per_s"]
    out["ratios"] = {
        f"mss_{m}": {
            "chain_vs_native": round(c["mb_per_s"] / n["mb_per_s"], 3),
            # Each round's chain against the native run just before it: steadier than the
            # ratio of medians when other load comes and goes during the benchmark.
            "chain_vs_native_per_round": [
                round(cr["mb_per_s"] / nr["mb_per_s"], 3)
                for nr, cr in zip(native[m], chain[m], strict=True)
            ],
            "chain_vs_tcp_direct": round(c["mb_per_s"] / tcp, 3),
            "native_vs_tcp_direct": round(n["mb_per_s"] / tcp, 3),
        }
        for m, n, c in zip(sizes, out["serval_native"], out["translator_chain"], strict=True)
    }
    if not args.no_profile:
        out["profile"] = translator_chain(args.seconds, sizes[0], profile=True)
    out["environment"]["loadavg_1min_at_end"] = round(os.getloadavg()[0], 2)
    emit(out, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

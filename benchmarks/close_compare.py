"""The connect cycle with the compact close agreed or not, in alternating pairs.

    python benchmarks/close_compare.py [--seconds 3] [--reps 3] [--clients 1]
        [--pin none|same|split] [--out FILE]

Each pair runs the same cycle twice (connect; the server accepts and closes; the client
reads end of stream and closes): once with the server agreeing to the compact close (six
datagrams per cycle), once with ``StreamConfig(compact_close=False)`` on the server, which
makes both ends close in the spec's order (eight). ``--clients`` runs that many cycles at
once from one client process; ``--pin`` places the two processes: ``same`` both on CPU 0,
``split`` the server on CPU 0 and the client on CPU 1, ``none`` where the scheduler puts
them. Output: one JSON object with each run's connections per second and CPU per
connection (both processes), the medians and the ratio compact / spec; a run whose
server accepted fewer connections than the client completed fails it (``ok: false``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import treepath
from report import emit

SRC = treepath.pin()

import anyio  # noqa: E402

import pyserval  # noqa: E402
import scaling  # noqa: E402
import suite_cases  # noqa: E402
from baselines import HOST, Control, Params, Result, run_pair  # noqa: E402

SERVICE = suite_cases.SERVICE  # the server is suite_cases' own
PINS = {"none": None, "same": (0, 0), "split": (0, 1)}


def _pin(params: Params, side: int) -> None:
    cpus = PINS[params["pin"]]
    if cpus is not None:
        os.sched_setaffinity(0, {cpus[side]})


async def compare_server(ctl: Control, params: Params) -> Result:
    """suite_cases' server (accept and close at once), pinned, with the compact close as
    ``params["compact"]`` says."""
    _pin(params, 0)
    return await suite_cases.accept_server(
        ctl, {**params, "stream_config": {"compact_close": params["compact"]}}
    )


async def compare_client(ctl: Control, params: Params) -> Result:
    """``params["clients"]`` loops of connect, read end of stream, close, for ``seconds``."""
    _pin(params, 1)
    ip, port = params["address"]
    config = pyserval.StreamConfig(time_wait=1.0)  # a short TIME_WAIT, as suite_cases'
    done = 0
    async with pyserval.Host([f"{HOST}:0"], stream_config=config) as host:
        host.add_route(SERVICE, f"{ip}:{port}")
        end = time.perf_counter() + params["seconds"]

        async def loop() -> None:
            nonlocal done
            while time.perf_counter() < end:
                stream = await host.connect(SERVICE)
                with contextlib.suppress(anyio.EndOfStream):
                    await stream.receive()
                await stream.aclose()
                done += 1

        cpu0, start = time.process_time(), time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(params["clients"])))
        now, cpu = time.perf_counter(), time.process_time() - cpu0
    return {"connections": done, "window": [start, now], "cpu": cpu}


def one_run(seconds: float, clients: int, pin: str, compact: bool) -> Result:
    """One run: connections per second and CPU per connection of both processes."""
    params = {"seconds": seconds, "clients": clients, "pin": pin, "compact": compact}
    server, client = run_pair(compare_server, compare_client, params)
    server_cpu = scaling.cpu_in_window(server.pop("samples"), *client["window"])
    n = client["connections"]
    start, end = client["window"]
    return {
        "compact": compact,
        "per_s": round(n / (end - start)),
        "cpu_us_per_connection": round((client["cpu"] + server_cpu) / max(n, 1) * 1e6, 1),
        "ok": server["accepted"] >= n > 0,
    }


def main(argv: list[str] | None = None) -> int:
    """Run the pairs; print (and with ``--out`` write) the JSON."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--reps", type=int, default=3, help="pairs (compact, then spec)")
    parser.add_argument("--clients", type=int, default=1, help="cycles at once")
    parser.add_argument("--pin", choices=tuple(PINS), default="none")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    runs = [
        one_run(args.seconds, args.clients, args.pin, compact)
        for _ in range(args.reps)
        for compact in (True, False)
    ]
    out: Result = {
        "case": "close_compare",
        "pyserval_src": str(SRC),
        "clients": args.clients,
        "pin": args.pin,
        "runs": runs,
    }
    for name, compact in (("compact", True), ("spec", False)):
        mine = [r for r in runs if r["compact"] is compact]
        out[name] = {
            "per_s_median": statistics.median(r["per_s"] for r in mine),
            "cpu_us_median": statistics.median(r["cpu_us_per_connection"] for r in mine),
        }
    pairs = zip(runs[::2], runs[1::2], strict=True)
    out["rate_ratios"] = [round(a["per_s"] / b["per_s"], 3) for a, b in pairs if b["per_s"]]
    out["compact_vs_spec_rate"] = round(
        out["compact"]["per_s_median"] / out["spec"]["per_s_median"], 3
    )
    out["compact_vs_spec_cpu"] = round(
        out["compact"]["cpu_us_median"] / out["spec"]["cpu_us_median"], 3
    )
    out["ok"] = all(r["ok"] for r in runs)
    emit(out, args.out)
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

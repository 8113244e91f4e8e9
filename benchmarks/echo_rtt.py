"""Request/response round trips on one stream: pyserval against asyncio TCP (JSON out).

    python benchmarks/echo_rtt.py [--rounds 10] [--exchanges 500] [--size 64]
        [--loop asyncio|uvloop|busypoll[:US]] [--out FILE]

Each stack runs an echo server and a client in processes of their own (four processes,
all up for the whole run). The client keeps one stream open and, per round, sends
``--size`` random bytes and waits for their echo, ``--exchanges`` times; the two stacks
take turns round by round (ABBA), so a pair of rounds sees the same machine. Every echo is
compared with what was sent (a round with one wrong byte is not ``ok``), and each round
reports the SHA-256 of all it sent and of all it got back.

Reported: each round's round-trip times (median, 99th percentile, mean, in us) and the
client's and server's CPU per exchange; the medians over the rounds; and ``rtt_ratio``,
pyserval's median round trip over asyncio TCP's in the same pair (above 1: ours is
longer). ``--loop`` puts all four processes on one event loop (``baselines.use_loop``):
with ``busypoll:US`` a loop that polls US microseconds before it sleeps
(``pyserval.busy_poll_loop``), which pays only when the answer comes within the spin.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import multiprocessing
import os
import random
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import baselines
from baselines import Control, Params, Result, expect
from report import emit

PYSERVAL = "pyserval"
TCP = "asyncio TCP"
SERVICE = "echo-rtt"


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Commands(Control):
    """A server answers ``("cpu",)`` with its CPU seconds until ``("stop",)``."""

    async def stopped(self) -> None:
        """Answer CPU queries until told to stop."""
        while (await self.next())[0] != "stop":
            self.send("cpu", _cpu())


async def pyserval_server(ctl: Control, params: Params) -> Result:
    """Echo every stream's bytes back, until stopped."""
    import pyserval

    async def echo(stream: pyserval.ServalStream) -> None:
        try:
            while True:
                await stream.send(await stream.receive())
        except Exception:  # the client's close (end of stream) or a lost stream
            pass

    async with pyserval.Host(["127.0.0.1:0"]) as host:
        listener = await host.listen(SERVICE)
        ctl.announce(host.addresses[0])
        tasks: set[asyncio.Task[None]] = set()

        async def accept() -> None:
            async for stream in listener:
                task = asyncio.ensure_future(echo(stream))
                tasks.add(task)
                task.add_done_callback(tasks.discard)

        acceptor = asyncio.ensure_future(accept())
        await ctl.stopped()
        acceptor.cancel()
    return {}


async def tcp_server(ctl: Control, params: Params) -> Result:
    """asyncio's echo server, until stopped."""

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
        writer.close()

    server = await asyncio.start_server(echo, baselines.HOST, 0)
    ctl.announce(server.sockets[0].getsockname()[:2])
    async with server:
        await ctl.stopped()
    return {}


async def _rounds(ctl: Control, params: Params, exchange: Any) -> Result:
    """Run a round per ``("run", seed)`` until ``("stop",)``."""
    size = params["size"]
    n = params["exchanges"]
    rounds = 0
    while (command := await ctl.next())[0] != "stop":
        rng = random.Random(command[1])
        sent, got = hashlib.sha256(), hashlib.sha256()
        rtts: list[float] = []
        ok = True
        cpu0 = _cpu()
        for _ in range(n):
            msg = rng.randbytes(size)
            start = time.perf_counter()
            answer = await exchange(msg)
            rtts.append((time.perf_counter() - start) * 1e6)
            sent.update(msg)
            got.update(answer)
            ok = ok and answer == msg
        ctl.send(
            "round",
            {
                "rtts": rtts,
                "ok": ok,
                "sha256_sent": sent.hexdigest(),
                "sha256_received": got.hexdigest(),
                "cpu_s": _cpu() - cpu0,
            },
        )
        rounds += 1
    return {"rounds": rounds}


async def pyserval_client(ctl: Control, params: Params) -> Result:
    """One stream; rounds of exchanges on it."""
    import anyio

    import pyserval

    async with pyserval.Host(["127.0.0.1:0"]) as host:
        host.add_route(SERVICE, "{}:{}".format(*params["address"]))
        stream = await host.connect(SERVICE)

        async def exchange(msg: bytes) -> bytes:
            await stream.send(msg)
            answer = b""
            while len(answer) < len(msg):
                try:
                    answer += await stream.receive()
                except anyio.EndOfStream:
                    break
            return answer

        try:
            return await _rounds(ctl, params, exchange)
        finally:
            await stream.aclose()


async def tcp_client(ctl: Control, params: Params) -> Result:
    """One TCP connection; rounds of exchanges on it."""
    reader, writer = await asyncio.open_connection(*params["address"])

    async def exchange(msg: bytes) -> bytes:
        writer.write(msg)
        try:
            return await reader.readexactly(len(msg))
        except asyncio.IncompleteReadError as exc:
            return exc.partial

    try:
        return await _rounds(ctl, params, exchange)
    finally:
        writer.close()


SIDES = {PYSERVAL: (pyserval_server, pyserval_client), TCP: (tcp_server, tcp_client)}


class _Stack(baselines.LivePair):
    """One stack's server and client processes and their pipes."""

    def __init__(self, ctx: Any, name: str, params: Params) -> None:
        super().__init__(ctx, name, *SIDES[name], params, Commands)

    def _server_cpu(self) -> float:
        self.server_pipe.send(("cpu",))
        cpu: float = expect(self.server_pipe, "cpu", f"{self.name} server")
        return cpu

    def round(self, seed: int, exchanges: int) -> Result:
        """One round: its round trips and CPU per exchange."""
        server0 = self._server_cpu()
        self.client_pipe.send(("run", seed))
        r = expect(self.client_pipe, "round", f"{self.name} client")
        server = self._server_cpu() - server0
        rtts = sorted(r["rtts"])
        return {
            "rtt_us_median": round(statistics.median(rtts), 1),
            "rtt_us_p99": round(rtts[min(len(rtts) - 1, int(len(rtts) * 0.99))], 1),
            "rtt_us_mean": round(statistics.fmean(rtts), 1),
            "client_cpu_us_per_exchange": round(r["cpu_s"] / exchanges * 1e6, 1),
            "server_cpu_us_per_exchange": round(server / exchanges * 1e6, 1),
            "ok": r["ok"] and r["sha256_sent"] == r["sha256_received"],
            "sha256": r["sha256_sent"],
        }


def run(rounds: int, exchanges: int, size: int) -> Result:
    """``rounds`` pairs of rounds, the stacks taking turns (ABBA)."""
    ctx = multiprocessing.get_context("spawn")
    params: Params = {"size": size, "exchanges": exchanges}
    stacks: list[_Stack] = []
    try:
        for name in (PYSERVAL, TCP):
            stacks.append(_Stack(ctx, name, params))
        for s in stacks:  # a warm-up round each, not counted
            s.round(0, exchanges)
        pairs: list[Result] = []
        for i in range(rounds):
            order = stacks if i % 2 == 0 else stacks[::-1]
            got = {s.name: s.round(i + 1, exchanges) for s in order}
            pair: Result = {"round": i, "first": order[0].name}
            for name, r in got.items():
                pair.update({f"{k}_{name}": v for k, v in r.items()})
            pair["rtt_ratio"] = round(got[PYSERVAL]["rtt_us_median"] / got[TCP]["rtt_us_median"], 3)
            pairs.append(pair)
        for s in stacks:
            s.stop()
    finally:
        for s in stacks:
            s.kill()

    def median(key: str) -> float:
        return round(float(statistics.median(p[key] for p in pairs)), 1)

    names = (PYSERVAL, TCP)
    return {
        "figure": "one stream's request/response round trip, pyserval against asyncio TCP",
        "loop": os.environ.get(baselines.LOOP_ENV, "asyncio"),
        "size": size,
        "exchanges_per_round": exchanges,
        "rounds": pairs,
        "rtt_us_median": {n: median(f"rtt_us_median_{n}") for n in names},
        "rtt_us_p99_median": {n: median(f"rtt_us_p99_{n}") for n in names},
        "cpu_us_per_exchange_median": {
            n: round(
                statistics.median(
                    p[f"client_cpu_us_per_exchange_{n}"] + p[f"server_cpu_us_per_exchange_{n}"]
                    for p in pairs
                ),
                1,
            )
            for n in names
        },
        "rtt_ratio_median": round(statistics.median(p["rtt_ratio"] for p in pairs), 3),
        "ok": all(p[f"ok_{n}"] for p in pairs for n in names),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the rounds and print the JSON summary."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10, help="pairs of rounds")
    ap.add_argument("--exchanges", type=int, default=500, help="round trips per round")
    ap.add_argument("--size", type=int, default=64, help="bytes per request (and answer)")
    ap.add_argument(
        "--loop",
        type=baselines.loop_name,
        default="asyncio",
        help="the event loop of all four processes: asyncio, uvloop or busypoll[:US]",
    )
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.exchanges < 1 or args.size < 1:
        ap.error("--rounds, --exchanges and --size must be positive")
    baselines.use_loop(args.loop)
    result = run(args.rounds, args.exchanges, args.size)
    emit(result, args.out)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

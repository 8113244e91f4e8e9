"""Service router forwarding rate and connection rate, against bare Python relays.

    python benchmarks/router_bench.py [--seconds 3] [--window 256] [--profile] [--out FILE]
        [--tester-send gso|plain] [--duts router,relay_batched,relay_simple] [--no-connect]

Every role runs in its own process (spawned, see ``baselines.run_pair``/``run_chain``), all
on 127.0.0.1; one JSON document is printed (and written with ``--out``):

* ``forwarding``: SYNs per second through one forwarding process, the *device under test*
  (DUT). A tester process sends pre-built SYNs (``--flows`` distinct source flowIDs, as
  from separate clients) to the DUT, whose static FORWARD rule sends them on to the
  tester's second socket (the sink), which counts them. The loop is *closed*: the tester
  keeps exactly ``--window`` SYNs in flight and sends a new one for each that comes back,
  so the DUT always has work queued but no backlog builds up in the kernel and nothing is
  lost; the rate is what the DUT sustains, not what the kernel drops (an
  open-loop UDP blast mostly measures the drops; the tester is ``syn_load.closed_loop``,
  shared with ``scaling.py``). Counted after a warm-up, over
  ``--seconds``. DUTs, in the same run:

  - ``router``: a :class:`pyserval.control.router.Router` (decodes each SYN, looks the
    serviceID up, adds SOURCE/SOURCE_PORTS, re-encodes, sends);
  - ``relay_batched``: a bare relay on the stack's own socket layer
    (:class:`pyserval.runtime.udp.UdpEndpoint`: batched reads, ``send_many``) that sends
    every datagram on unchanged: the ceiling for forwarding in Python;
  - ``relay_simple``: a plain asyncio ``DatagramProtocol`` relay (one datagram per loop
    pass, ``transport.sendto``), for context.

  The tester sends its SYNs in GSO trains (one system call for up to 64; ``--tester-send
  plain`` sends one each) and the DUTs' sockets have UDP GRO turned off, so the kernel
  splits the trains and a DUT reads every SYN on its own, exactly as from separate clients;
  the cheap sender keeps the tester from being the bottleneck even for the bare relay (with
  one ``send`` per SYN it is: on loopback the sender pays for the delivery). Each result
  says which process was busy (``bottleneck``), the DUT's CPU per packet and its share of a
  core over the counted window (sampled in the DUT against the same clock).

  ``ratios.router_vs_relay_batched`` is the headline (``..._by_cpu``: the same from CPU per
  packet); the kernel implementation of Serval forwarded at 37% of IP forwarding's packet
  rate.
* ``connect``: sequential connect -> the server accepts and closes -> the client reads end
  of stream and closes (``host_bench.serval_connect_rate``'s cycle), once with the SYN
  resolved by a Router process the server registered with (client and server both
  ``Host(router=...)``; three processes) and once straight to the server by a static route
  (two processes).
* ``router_profile`` (``--profile``): one more router run under cProfile (in the router
  process; the profiled rate is slower and not used for the ratios): the top functions by
  own time, also printed as a table on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import os
import pstats
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import baselines
import syn_load
from baselines import HOST, Control, Params, Result, run_chain, run_pair
from report import emit

FORWARD_SERVICE = "bench-forward"
CONNECT_SERVICE = "bench"  # host_bench's
KERNEL_RATIO = 0.37  # the kernel Serval's forwarding rate / IP forwarding's (packets/s)
BUFFER = 4 * 1024 * 1024
PROFILE_TOP = 25
SAMPLE = 0.1  # seconds between the DUT's CPU samples
BUSY = 0.9  # a process using this share of a core (or more) is the bottleneck

_UDP_GRO = 104

DUTS = ("router", "relay_batched", "relay_simple")


def _set_buffers(sock: socket.socket) -> None:
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        sock.setsockopt(socket.SOL_SOCKET, option, BUFFER)


def _gro_off(fd: int) -> None:
    """Turn UDP GRO off on the socket ``fd`` (a duplicate descriptor: the owner keeps its
    own), so the kernel splits the tester's GSO trains and every SYN is read on its own."""
    with socket.socket(fileno=os.dup(fd)) as sock, contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_UDP, _UDP_GRO, 0)


def _free_address() -> tuple[str, int]:
    """A UDP port free right now (for the sink, which both processes must know)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((HOST, 0))
        host, port = sock.getsockname()  # (typeshed gives Any: an address family's form)
        return str(host), int(port)


def build_syns(source: tuple[str, int], count: int) -> list[bytes]:
    """``count`` SYNs to FORWARD_SERVICE as a real client sends them, each with its own
    source flowID (the SAL header checksum recomputed for each)."""
    from pyserval.core.host import HostCore
    from pyserval.sal import Rule
    from pyserval.sal.packet import decode_packet

    core = HostCore([source])
    core.service_table.add(FORWARD_SERVICE, Rule.forward(source))  # where is irrelevant
    core.connect(FORWARD_SERVICE, 0.0)
    pkt = decode_packet(core.datagrams_to_send(0.0)[0][0])
    syns = []
    for flowid in range(1, count + 1):
        pkt.src_flowid = flowid
        syns.append(pkt.encode())
    return syns


# -- the tester: SYN generator and sink, closed loop (``syn_tester.closed_loop``) ----------


async def syn_tester(ctl: Control, params: Params) -> Result:
    """Keep ``window`` SYNs in flight through the DUT at ``address``; count at the sink."""
    out = await syn_load.closed_loop(
        params, tuple(params["address"]), lambda source: build_syns(source, params["flows"])
    )
    del out["forwarded_sample"]  # the sizes are what this benchmark reports
    return out


# -- the devices under test -----------------------------------------------------------------


def _profile_top(prof: cProfile.Profile, top: int) -> list[Result]:
    stats = pstats.Stats(prof)
    rows = []
    total = 0.0
    for (filename, line, func), (_cc, nc, tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        total += tt
        if filename == "~":
            where = func
        else:
            parts = Path(filename).parts
            short = (
                "/".join(parts[parts.index("pyserval") :])
                if "pyserval" in parts
                else Path(filename).name
            )
            where = f"{short}:{line}({func})"
        rows.append((tt, ct, nc, where))
    rows.sort(reverse=True)
    return [
        {
            "function": where,
            "calls": nc,
            "tottime_s": round(tt, 3),
            "cumtime_s": round(ct, 3),
            "share": round(tt / total, 3) if total else 0.0,
        }
        for tt, ct, nc, where in rows[:top]
    ]


async def _serve(ctl: Control, params: Params, handled: Callable[[], int]) -> Result:
    """Wait until stopped, sampling every SAMPLE seconds the clock the tester marks its
    window with (``perf_counter``: CLOCK_MONOTONIC, the same in every process), this
    process's CPU time and ``handled()`` (datagrams read so far).

    With ``params["profile"]``, cProfile runs from the first sample that saw traffic to the
    first one after that saw none (the idle wait for the tester is left out)."""
    loop = asyncio.get_running_loop()
    samples: list[tuple[float, float, int]] = []
    timer: list[asyncio.TimerHandle] = []
    prof = cProfile.Profile() if params.get("profile") else None
    profiling = [False, False]  # started, finished

    def sample() -> None:
        n = handled()
        if prof is not None and not profiling[1]:
            if not profiling[0] and n:
                prof.enable()
                profiling[0] = True
            elif profiling[0] and n == samples[-1][2]:
                prof.disable()
                profiling[1] = True
        samples.append((time.perf_counter(), time.process_time(), n))
        timer[:] = [loop.call_later(SAMPLE, sample)]

    sample()
    try:
        await ctl.stopped()
    finally:
        if prof is not None and profiling[0] and not profiling[1]:
            prof.disable()
            profiling[1] = True
        timer[0].cancel()
    sample()
    return {
        "samples": samples,
        "profile": None if prof is None else _profile_top(prof, PROFILE_TOP),
    }


def _in_window(samples: list[list[float]], t0: float, t1: float) -> tuple[float, float, int]:
    """(seconds, CPU seconds, datagrams) between the DUT's samples nearest to the tester's
    counting window [t0, t1] (inside it)."""
    inside = [x for x in samples if t0 <= x[0] <= t1] or samples
    (a, ca, na), (b, cb, nb) = inside[0], inside[-1]
    return b - a, cb - ca, int(nb - na)


def _endpoint_result(ep: Any) -> Result:
    s = ep.stats
    return {
        "datagrams_received": s.datagrams_received,
        "datagrams_sent": s.datagrams_sent,
        "datagrams_per_read_batch": round(s.datagrams_received / max(s.batches, 1), 1),
        "gso_calls": s.gso_calls,
        "gro_reads": s.gro_reads,
        "queued_total": s.queued_total,
        "errors": dict(ep.errors),
    }


async def router_dut(ctl: Control, params: Params) -> Result:
    """A Router with a static FORWARD rule for FORWARD_SERVICE to the sink."""
    from pyserval.control.router import Router
    from pyserval.sal import Rule

    async with Router(f"{HOST}:0") as router:
        router.host.service_table.add(FORWARD_SERVICE, Rule.forward(tuple(params["sink"])))
        _gro_off(router.host.endpoints[0].fileno())
        ctl.announce(router.address)
        ep = router.host.endpoints[0]
        served = await _serve(ctl, params, lambda: ep.stats.datagrams_received)
        return {**served, "counters": router.counters(), "udp": _endpoint_result(ep)}


async def relay_batched_dut(ctl: Control, params: Params) -> Result:
    """Every datagram on unchanged to the sink, with the stack's batched UdpEndpoint."""
    from pyserval.runtime.udp import UdpEndpoint

    sink = tuple(params["sink"])
    holder: list[UdpEndpoint] = []

    def on_datagrams(batch: list[tuple[bytes, tuple[str, int]]]) -> None:
        holder[0].send_many([(data, sink) for data, _src in batch])

    # The same socket set-up as the router's (GRO asked for, then turned off in the kernel),
    # so both read the same way.
    ep = await UdpEndpoint.open((HOST, 0), on_datagrams)
    holder.append(ep)
    _gro_off(ep.fileno())
    async with ep:
        ctl.announce(ep.address)
        served = await _serve(ctl, params, lambda: ep.stats.datagrams_received)
        return {**served, "udp": _endpoint_result(ep)}


class _SimpleRelay(asyncio.DatagramProtocol):
    def __init__(self, sink: tuple[str, int]) -> None:
        self.sink = sink
        self.count = 0
        self.errors = 0
        self.sendto: Any = None

    def connection_made(self, transport: Any) -> None:
        self.sendto = transport.sendto

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.sendto(data, self.sink)
        self.count += 1

    def error_received(self, exc: Exception) -> None:
        self.errors += 1


async def relay_simple_dut(ctl: Control, params: Params) -> Result:
    """A plain asyncio DatagramProtocol relay: one datagram per loop pass."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    _set_buffers(sock)
    sock.bind((HOST, 0))
    transport, proto = await loop.create_datagram_endpoint(
        lambda: _SimpleRelay(tuple(params["sink"])), sock=sock
    )
    try:
        ctl.announce(sock.getsockname())
        served = await _serve(ctl, params, lambda: proto.count)
    finally:
        transport.close()
    return {**served, "udp": {"datagrams_received": proto.count, "errors": proto.errors}}


_DUT_SIDES = {
    "router": router_dut,
    "relay_batched": relay_batched_dut,
    "relay_simple": relay_simple_dut,
}


def forwarding_rate(
    dut: str,
    seconds: float,
    window: int,
    flows: int,
    *,
    tester_gso: bool = True,
    profile: bool = False,
) -> Result:
    """SYNs per second through one ``dut`` process, closed loop with ``window`` in flight."""
    params = {
        "seconds": seconds,
        "window": window,
        "flows": flows,
        "sink": _free_address(),
        "profile": profile,
        "tester_gso": tester_gso,
        "grace": 0.05,
    }
    got, tester = run_pair(_DUT_SIDES[dut], syn_tester, params)
    span, cpu, handled = _in_window(got["samples"], tester["window_start"], tester["window_end"])
    us_per_packet = cpu / max(handled, 1) * 1e6
    dut_share = cpu / span if span > 0 else float("nan")
    if dut_share >= BUSY:
        bottleneck = "dut"
    elif tester["cpu_share"] >= BUSY:
        bottleneck = "tester"
    else:
        # Other load on the machine took the DUT's core part of the time (or the window is
        # too small to keep it busy): the rate is low, the CPU cost per packet still holds.
        bottleneck = "neither: the DUT got less than a core (other load, or a small window)"
    out: Result = {
        "per_s": round(tester["per_s"]),
        "forwarded": tester["received"],
        "seconds": round(tester["seconds"], 3),
        "mean_latency_us": round(window / tester["per_s"] * 1e6, 1),
        "dut_cpu_share": round(dut_share, 3),
        "dut_cpu_us_per_packet": round(us_per_packet, 2),
        "dut_capacity_per_s": round(1e6 / us_per_packet) if us_per_packet else None,
        "tester_cpu_share": round(tester["cpu_share"], 3),
        "bottleneck": bottleneck,
        "lost": tester["lost"],
        "stalls": tester["stalls"],
        "syn_bytes": tester["syn_bytes"],
        "forwarded_bytes": tester["forwarded_bytes"],
        "dut": got["udp"],
        "cpu_s": {"dut": got["cpu_s"], "tester": tester["cpu_s"]},
    }
    if "counters" in got:
        c = got["counters"]
        out["router_counters"] = {
            k: v for k, v in c.items() if v and (k.startswith(("packets_", "drops_")))
        }
    if got["profile"] is not None:
        out["profile"] = got["profile"]
    return out


# -- connection rate through a router ---------------------------------------------------------


async def connect_router_side(ctl: Control, params: Params) -> Result:
    """A Router for the connection benchmark (nothing static: the server registers)."""
    from pyserval.control.router import Router

    async with Router(f"{HOST}:0") as router:
        ctl.announce(router.address)
        await ctl.stopped()
        c = router.counters()
        return {"counters": {k: v for k, v in c.items() if v}}


async def connect_server_side(ctl: Control, params: Params) -> Result:
    """Listen with ``Host(router=...)``; announce once the router accepted the registration;
    then accept and close at once, until stopped."""
    import pyserval
    from pyserval.naming.service_id import as_service_prefix

    router = "{}:{}".format(*params["addresses"][0])
    async with pyserval.Host([f"{HOST}:0"], router=router) as host:
        listener = await host.listen(CONNECT_SERVICE, backlog=1024)
        controller = host.controller
        prefix = as_service_prefix(CONNECT_SERVICE)
        async with asyncio.timeout(10):
            while prefix not in controller.core.accepted:  # type: ignore[union-attr]
                await asyncio.sleep(0.005)
        ctl.announce(host.addresses[0])
        return {"accepted": await baselines.accept_and_close(ctl, listener)}


async def connect_client_side(ctl: Control, params: Params) -> Result:
    """Connect through the router (``Host(router=...)``, no route of its own), read end of
    stream, close; one at a time for ``seconds``."""
    import anyio

    import pyserval
    from pyserval.transport.config import StreamConfig

    router = "{}:{}".format(*params["addresses"][0])
    durations: list[float] = []
    config = StreamConfig(time_wait=1.0)
    async with pyserval.Host([f"{HOST}:0"], router=router, stream_config=config) as host:
        start = time.perf_counter()
        end = start + params["seconds"]
        now = start
        while now < end:
            stream = await host.connect(CONNECT_SERVICE)
            with contextlib.suppress(anyio.EndOfStream):
                await stream.receive()
            await stream.aclose()
            t = time.perf_counter()
            durations.append(t - now)
            now = t
    return {"durations": durations, "seconds": now - start}


def router_connect_rate(seconds: float) -> Result:
    """Sequential pyserval connection set-ups per second, SYNs resolved by a Router."""
    routed, server, client = run_chain(
        [connect_router_side, connect_server_side, connect_client_side], {"seconds": seconds}
    )
    summary = baselines.connect_summary(server, client)
    summary["cpu_s"]["router"] = routed["cpu_s"]
    c = routed["counters"]
    summary["router_counters"] = {
        k: v for k, v in c.items() if k.startswith(("packets_", "drops_", "registry_"))
    }
    summary["cycle"] = (
        "connect (SYN via the router), server accepts and closes, client reads end of"
        " stream, closes"
    )
    return summary


# -- the whole run ---------------------------------------------------------------------------


def _print_profile(rows: list[Result], per_s: int, file: Any) -> None:
    print(
        f"router profile (cProfile in the router process; {per_s} SYN/s while profiled),"
        " top functions by own time:",
        file=file,
    )
    print(f"{'share':>6} {'tottime':>8} {'cumtime':>8} {'calls':>9}  function", file=file)
    for r in rows:
        print(
            f"{r['share'] * 100:5.1f}% {r['tottime_s']:8.3f} {r['cumtime_s']:8.3f}"
            f" {r['calls']:>9}  {r['function']}",
            file=file,
        )


def run(args: argparse.Namespace) -> Result:
    """Everything the command line asks for, as one JSON-ready dict."""
    gso = args.tester_send == "gso"
    out: Result = {
        "benchmark": "pyserval router: SYN forwarding rate and connection rate (loopback)",
        "environment": baselines.environment(),
        "settings": {
            "seconds": args.seconds,
            "window": args.window,
            "flows": args.flows,
            "warmup_s": syn_load.WARMUP,
            "tester_send": args.tester_send,
            "method": (
                "closed loop: the tester keeps `window` SYNs in flight through the DUT and"
                " sends one more per SYN that reaches its sink; per_s = SYNs at the sink /"
                " seconds after the warm-up; every role in its own process. The DUT reads"
                " every SYN on its own (its socket's UDP GRO is off; with tester_send=gso the"
                " kernel splits the tester's trains before the DUT sees them)"
            ),
            "fields": {
                "dut_cpu_share": "DUT CPU time / wall time over the counted window",
                "dut_cpu_us_per_packet": "DUT CPU time per datagram it read, same window",
                "dut_capacity_per_s": "1e6 / dut_cpu_us_per_packet: the rate at one full core",
                "bottleneck": f"the process at >= {BUSY:.0%} of a core (the DUT: a fair rate)",
                "ratios.*_by_cpu": "the relay's CPU per packet / the router's: holds even"
                " when other load on the machine kept a DUT below a full core",
                "mean_latency_us": "window / per_s (Little's law): the in-flight SYNs' wait",
            },
        },
    }
    fwd: Result = {}
    for dut in args.duts:
        fwd[dut] = forwarding_rate(dut, args.seconds, args.window, args.flows, tester_gso=gso)
    out["forwarding"] = fwd
    ratios: Result = {}
    if "router" in fwd:
        r = fwd["router"]["per_s"]
        cost = fwd["router"]["dut_cpu_us_per_packet"]
        for other in ("relay_batched", "relay_simple"):
            if other in fwd:
                ratios[f"router_vs_{other}"] = round(r / fwd[other]["per_s"], 3)
                # The same from CPU cost per packet: independent of who was the bottleneck.
                ratios[f"router_vs_{other}_by_cpu"] = round(
                    fwd[other]["dut_cpu_us_per_packet"] / cost, 3
                )
        if "router_vs_relay_batched" in ratios:
            ratios["kernel_serval_vs_ip_forwarding"] = KERNEL_RATIO
            ratios["beats_kernel_ratio"] = {
                "measured": ratios["router_vs_relay_batched"] > KERNEL_RATIO,
                "by_cpu": ratios["router_vs_relay_batched_by_cpu"] > KERNEL_RATIO,
            }
    if not args.no_connect:
        import host_bench

        out["connect"] = {
            "via_router": router_connect_rate(args.seconds),
            "direct": host_bench.serval_connect_rate(args.seconds),
        }
        ratios["connect_via_router_vs_direct"] = round(
            out["connect"]["via_router"]["per_s"] / out["connect"]["direct"]["per_s"], 3
        )
    out["ratios"] = ratios
    if args.profile:
        prof = forwarding_rate(
            "router", args.seconds, args.window, args.flows, tester_gso=gso, profile=True
        )
        out["router_profile"] = {
            "per_s_while_profiled": prof["per_s"],
            "top_by_own_time": prof["profile"],
        }
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the JSON (and the profile table on stderr)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="counted time per run")
    parser.add_argument("--window", type=int, default=256, help="SYNs in flight (closed loop)")
    parser.add_argument("--flows", type=int, default=4096, help="distinct SYNs (flowIDs)")
    parser.add_argument(
        "--duts", default=",".join(DUTS), help=f"comma-separated subset of {','.join(DUTS)}"
    )
    parser.add_argument(
        "--tester-send",
        choices=("gso", "plain"),
        default="gso",
        help="the tester sends SYNs in GSO trains the DUT's kernel splits (default), or one"
        " sendto each (then the tester, not a bare relay, is the bottleneck)",
    )
    parser.add_argument("--no-connect", action="store_true", help="skip the connection rates")
    parser.add_argument("--profile", action="store_true", help="one more router run, profiled")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    parser.add_argument(
        "--loop",
        type=baselines.loop_name,
        default="asyncio",
        help="the event loop of every process: asyncio, uvloop (the optional [uvloop] "
        "extra) or busypoll[:US] (pyserval.busy_poll_loop, polling US microseconds)",
    )
    args = parser.parse_args(argv)
    baselines.use_loop(args.loop)
    args.duts = [d.strip() for d in args.duts.split(",") if d.strip()]
    unknown = set(args.duts) - set(DUTS)
    if unknown:
        parser.error(f"unknown DUT(s): {', '.join(sorted(unknown))}")
    report = run(args)
    emit(report, args.out)
    if "router_profile" in report:
        p = report["router_profile"]
        _print_profile(p["top_by_own_time"], p["per_s_while_profiled"], sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Scaling on loopback: many concurrent streams from one host, and a big router under SYN load.

    python benchmarks/scaling.py [--quick] [--streams 1,10,100,1000] [--rules 1000000]
        [--only streams,router] [--seconds 3] [--out FILE] [--loop asyncio|uvloop]

Every role runs in its own spawned process (``baselines.run_pair``) on 127.0.0.1, and one
JSON document is printed (and written with ``--out``):

* ``streams``: for each count N, a fresh client process and a fresh server process. The
  client host opens N streams to the server (at most 100 handshakes at a time), then sends
  on all N at once for ``--seconds``, each stream at most its share of 256 MiB (64 MiB
  with ``--quick``; with many streams the send buffers fill at once and draining them takes
  longer than the sending). Each stream carries its own byte sequence (rotating slices of
  a random pattern), ends it, and waits for the server's answer, the byte count and
  SHA-256 of what arrived on that stream, which must equal its own (recomputed after the
  clock stopped). Reported: aggregate MB/s (checked bytes / time from the first send to the
  last answer; the receiver's hashing is in it, about 0.6 ms per MB), the CPU time of both
  processes per MB over that time (steadier than MB/s on a busy machine), how many streams
  checked out, the round-trip times of a 64-byte request/response on one more stream
  (echoed and compared by the server) while the bulk runs (p50, p99, max) and before it,
  and RSS per connection of both processes (``/proc/PID/statm``): idle after the N
  handshakes, and at the peak during the bulk, each minus the process's RSS before.
* ``router``: a :class:`pyserval.Router` loaded with ``--rules`` prefixes (drawn as
  ``service_table.py`` draws them, all FORWARD to the tester's sink), and one with a single
  rule, in the same run. A tester process keeps ``--window`` SYNs in flight through the
  router (closed loop, ``syn_load.py``, as in ``router_bench.py``), each SYN to a serviceID
  under a random stored prefix (so lookups spread over the whole table); counted after a
  warm-up. Reported:
  SYNs/s, the router's CPU per SYN over the counted window, its RSS and load time, a check
  of a sample of the forwarded SYNs (decoded: each must carry the flowID and serviceID the
  tester sent), and the ratio of the big table's rate to the one-rule table's.

``--quick`` (under a minute): 1 s per stream count and router run, 100,000 rules.

Only the public API is used (``pyserval``, ``pyserval.sal``, ``pyserval.naming``; the bare
relay of ``suite_cases.py forwarding`` also ``pyserval.runtime.udp``), so the same script
measures other source trees (``PYTHONPATH=<tree>/src``, see ``suite.py``).
What it does not measure: streams across several client hosts, loss (loopback drops
nothing unless a socket buffer overflows), or the router's registry under churn.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import random
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import treepath
from report import emit

SRC = treepath.pin()

import anyio  # noqa: E402

import baselines  # noqa: E402
import pyserval  # noqa: E402
import syn_load  # noqa: E402
from baselines import HOST, MB, Control, Params, Result, run_pair  # noqa: E402
from pyserval.sal import checksum  # noqa: E402

BULK = "scale-bulk"
PING = "scale-ping"
FORWARD = "scale-forward"
CHUNK = 256 * 1024  # bytes per send() call at most
PATTERN_SLACK = 4096  # the pattern is this much longer than a chunk: slices rotate
CONNECT_AT_ONCE = 100  # handshakes in flight at a time while opening N streams
PING_BYTES = 64
PING_GAP = 0.005  # seconds between two small requests while the bulk runs
RSS_SAMPLE = 0.05  # seconds between RSS samples while the bulk runs
_UDP_GRO = 104  # Linux; not exported by the socket module of Python 3.11


def rss(pid: int | str = "self") -> int:
    """Resident set size of a process in bytes (Linux ``/proc/PID/statm``), 0 if unknown."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def _latency_us(samples: list[float]) -> Result:
    if not samples:
        return {"count": 0}
    return {
        "count": len(samples),
        "p50": round(statistics.median(samples) * 1e6, 1),
        "p99": round(_percentile(samples, 0.99) * 1e6, 1),
        "max": round(max(samples) * 1e6, 1),
    }


def _stream_config(params: Params) -> Any:
    """The hosts' stream settings: None (the host default) or ``StreamConfig(mss=...)``,
    with ``buffer`` bytes of send and receive buffer when given."""
    mss = params.get("mss", 0)
    if not mss:
        return None
    buffer = params.get("buffer")
    if buffer:
        return pyserval.StreamConfig(mss=mss, send_buffer=buffer, receive_buffer=buffer)
    return pyserval.StreamConfig(mss=mss)


def _chunk(index: int, j: int, pattern: bytes) -> bytes:
    """Chunk ``j`` of stream ``index``: a slice of the pattern at an offset of its own."""
    off = (index * 131 + j * 97) % PATTERN_SLACK
    return pattern[off : off + len(pattern) - PATTERN_SLACK]


def expected_digest(index: int, chunks: int, pattern: bytes) -> str:
    """SHA-256 (hex) of the first ``chunks`` chunks of stream ``index``, from the pattern."""
    h = hashlib.sha256()
    for j in range(chunks):
        h.update(_chunk(index, j, pattern))
    return h.hexdigest()


def chunk_size(streams: int) -> int:
    """Bytes per send() call: CHUNK, less with many streams (16 MiB in the calls at most)."""
    return max(4096, min(CHUNK, (16 << 20) // streams))


# -- concurrent streams -----------------------------------------------------------------


async def stream_server(ctl: Control, params: Params) -> Result:
    """Answer each bulk stream with ``b"<count> <sha256>\\n"`` of what it carried; echo the
    ping stream; until stopped."""
    stats: Result = {"bulk_streams": 0, "bytes": 0, "errors": []}
    tasks: set[asyncio.Task[None]] = set()

    async def serve_bulk(stream: Any) -> None:
        h = hashlib.sha256()
        n = 0
        try:
            with contextlib.suppress(anyio.EndOfStream):
                while True:
                    data = await stream.receive(1 << 20)
                    h.update(data)
                    n += len(data)
            await stream.send(f"{n} {h.hexdigest()}\n".encode())
            stats["bulk_streams"] += 1
            stats["bytes"] += n
        except Exception as exc:  # reported, not raised: the client counts the failures
            stats["errors"].append(f"{type(exc).__name__}: {exc}")
        finally:
            await stream.aclose()

    async def serve_ping(stream: Any) -> None:
        try:
            with contextlib.suppress(anyio.EndOfStream):
                while True:
                    await stream.send(await stream.receive())
        except Exception as exc:
            stats["errors"].append(f"ping: {type(exc).__name__}: {exc}")
        finally:
            await stream.aclose()

    async def accept(listener: Any, handler: Any) -> None:
        async for stream in listener:
            task = asyncio.ensure_future(handler(stream))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    async with pyserval.Host([f"{HOST}:0"], stream_config=_stream_config(params)) as host:
        bulk = await host.listen(BULK, backlog=4096)
        ping = await host.listen(PING, backlog=16)
        loops = [asyncio.ensure_future(accept(bulk, serve_bulk))]
        loops.append(asyncio.ensure_future(accept(ping, serve_ping)))
        ip, port = host.addresses[0]
        ctl.announce((ip, port, os.getpid()))  # type: ignore[arg-type]
        stats["samples"] = await _sample_cpu(ctl)
        stats["socket_drops"] = udp_socket_drops(port)
        for task in [*loops, *tasks]:
            task.cancel()
        await asyncio.gather(*loops, *tasks, return_exceptions=True)
    stats["errors"] = stats["errors"][:10]
    return stats


def udp_socket_drops(port: int) -> int | None:
    """Datagrams the kernel dropped at the IPv4 UDP socket bound to ``port`` (its receive
    buffer was full), from /proc/net/udp; None where that file does not exist."""
    try:
        lines = Path("/proc/net/udp").read_text().splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        # local_address is HEX_IP:HEX_PORT; drops is the last column.
        if int(fields[1].rsplit(":", 1)[1], 16) == port:
            return int(fields[-1])
    return None


async def _ping_once(stream: Any, rng: random.Random) -> float:
    message = rng.randbytes(PING_BYTES)
    t0 = time.perf_counter()
    await stream.send(message)
    got = b""
    while len(got) < len(message):
        got += await stream.receive()
    elapsed = time.perf_counter() - t0
    if got != message:
        raise RuntimeError("the ping stream echoed other bytes than it was sent")
    return elapsed


async def stream_client(ctl: Control, params: Params) -> Result:
    """Open N streams, send on all at once, check every answer; ping and sample RSS meanwhile."""
    ip, port, server_pid = params["address"]
    n: int = params["streams"]
    rng = random.Random(params.get("seed", 1))
    pattern = rng.randbytes(chunk_size(n) + PATTERN_SLACK)
    out: Result = {"streams": n, "chunk_bytes": chunk_size(n), "send_seconds": params["seconds"]}
    out["child_pyserval"] = pyserval.__file__  # the tree under test, also in this child
    # Whether the checksums ran on numpy (the [accel] extra; PYSERVAL_PURE_PYTHON=1: not).
    out["checksum_accelerated"] = getattr(checksum, "ACCELERATED", False)
    async with pyserval.Host([f"{HOST}:0"], stream_config=_stream_config(params)) as host:
        host.add_route(BULK, f"{ip}:{port}")
        host.add_route(PING, f"{ip}:{port}")
        pinging = params.get("ping", True)
        ping = await host.connect(PING) if pinging else None
        idle_rtts = [await _ping_once(ping, rng) for _ in range(20)] if pinging else []
        rss0 = {"client": rss(), "server": rss(server_pid)}

        gate = asyncio.Semaphore(CONNECT_AT_ONCE)
        connect_errors: list[str] = []

        async def open_one() -> Any:
            async with gate:
                try:
                    return await host.connect(BULK)
                except Exception as exc:
                    connect_errors.append(f"{type(exc).__name__}: {exc}")
                    return None

        t0 = time.perf_counter()
        opened = await asyncio.gather(*(open_one() for _ in range(n)))
        out["connect_s"] = round(time.perf_counter() - t0, 3)
        streams = [s for s in opened if s is not None]
        out["connected"] = len(streams)
        out["connect_errors"] = connect_errors[:10]
        await asyncio.sleep(0.3)  # the server accepts the last ones and starts their tasks
        rss1 = {"client": rss(), "server": rss(server_pid)}

        peak = dict(rss1)
        rtts: list[float] = []
        running = [True]

        async def sample() -> None:
            while running[0]:
                peak["client"] = max(peak["client"], rss())
                peak["server"] = max(peak["server"], rss(server_pid))
                await asyncio.sleep(RSS_SAMPLE)

        async def pinger() -> None:
            while running[0] and ping is not None:
                rtts.append(await _ping_once(ping, rng))
                await asyncio.sleep(PING_GAP)

        async def bulk(index: int, stream: Any) -> tuple[bytes, float, int]:
            j = 0
            while time.perf_counter() < deadline and j < cap:
                await stream.send(_chunk(index, j, pattern))
                j += 1
            await stream.send_eof()
            answer = b""
            with contextlib.suppress(anyio.EndOfStream):
                while True:
                    answer += await stream.receive()
            done = time.perf_counter()
            await stream.aclose()
            return answer, done, j

        helpers = [asyncio.ensure_future(sample()), asyncio.ensure_future(pinger())]
        cap = max(1, params.get("max_bytes", 1 << 62) // chunk_size(n))
        cpu0 = time.process_time()
        start = time.perf_counter()
        deadline = start + params["seconds"]
        answers = await asyncio.gather(
            *(bulk(i, s) for i, s in enumerate(streams)), return_exceptions=True
        )
        finished = time.perf_counter()
        cpu1 = time.process_time()
        running[0] = False
        await asyncio.gather(*helpers, return_exceptions=True)
        if ping is not None:
            await ping.aclose()
        core = host.core
        if core is not None:  # what the transport did meanwhile (for reading the figures)
            out["client_core"] = {
                "retransmissions": core.stats.get("retransmissions_ended", 0),
                "stats": dict(core.stats),
                "drops": dict(core.drops),
            }

    # Checked after the clock stopped: each answer against this stream's own bytes.
    ok = 0
    moved = 0
    size = chunk_size(n)
    failures: list[str] = []
    for i, answer in enumerate(answers):
        if isinstance(answer, BaseException):
            failures.append(f"stream {i}: {type(answer).__name__}: {answer}")
            continue
        chunks = answer[2]
        want = f"{chunks * size} {expected_digest(i, chunks, pattern)}\n".encode()
        if answer[0] == want:
            ok += 1
            moved += chunks * size
        else:
            failures.append(f"stream {i}: answer {answer[0][:80]!r}, expected {want!r}")
    seconds = finished - start
    conns = max(len(streams), 1)
    out.update(
        {
            "checked_ok": ok,
            "ok": ok == n,
            "failures": failures[:10],
            "seconds": round(seconds, 3),
            "window": [start, finished],
            "client_cpu_s": round(cpu1 - cpu0, 4),
            "bytes_checked": moved,
            "mb_per_s": round(moved / seconds / MB, 1),
            "last_stream_done_after_s": round(
                max((a[1] for a in answers if not isinstance(a, BaseException)), default=start)
                - start,
                3,
            ),
            "ping_rtt_us_during_bulk": _latency_us(rtts),
            "ping_rtt_us_idle": _latency_us(idle_rtts),
            "rss_bytes": {"before": rss0, "idle": rss1, "peak_during_bulk": peak},
            "rss_per_connection_bytes": {
                side: {
                    "idle": round((rss1[side] - rss0[side]) / conns),
                    "peak_during_bulk": round((peak[side] - rss0[side]) / conns),
                }
                for side in ("client", "server")
            },
        }
    )
    return out


def cpu_in_window(samples: list[list[float]], t0: float, t1: float) -> float:
    """CPU seconds a process spent in [t0, t1], from its ``_sample_cpu`` samples: its CPU
    share between the samples inside the window, times the window's length (a window
    shorter than two samples takes the nearest samples around it)."""
    inside = [x for x in samples if t0 <= x[0] <= t1]
    if len(inside) < 2:
        before = [x for x in samples if x[0] < t0][-1:]
        after = [x for x in samples if x[0] > t1][:1]
        inside = before + inside + after
    if len(inside) < 2 or inside[-1][0] <= inside[0][0]:
        return float("nan")
    share = (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0])
    return share * (t1 - t0)


def byte_cap(n: int, quick: bool) -> int:
    """Bytes one of ``n`` streams sends at most (see the module docstring)."""
    return max((64 << 20) // n, 64 << 10) if quick else max((256 << 20) // n, 256 << 10)


def streams_run(
    n: int,
    seconds: float,
    mss: int = 0,
    seed: int = 1,
    *,
    ping: bool = True,
    max_bytes: int | None = None,
    buffer: int | None = None,
) -> Result:
    """One client host with ``n`` concurrent streams to one server host, fresh processes;
    every stream sends for ``seconds`` (or ``max_bytes``); ``ping``: the small
    request/response meanwhile; ``buffer``: send and receive buffer bytes (with ``mss``).
    CPU per MB: both processes' CPU time over the bulk."""
    params = {
        "streams": n,
        "buffer": buffer,
        "max_bytes": max_bytes if max_bytes is not None else 1 << 62,
        "ping": ping,
        "seconds": seconds,
        "mss": mss,
        "seed": seed,
        "grace": 0.05,
    }
    server, client = run_pair(stream_server, stream_client, params)
    server_cpu = cpu_in_window(server.pop("samples"), *client.pop("window"))
    client_cpu = client.pop("client_cpu_s")
    client["cpu_in_bulk_s"] = {"client": client_cpu, "server": round(server_cpu, 4)}
    mb = client["bytes_checked"] / MB
    per_mb = (client_cpu + server_cpu) / mb * 1e6 if mb else float("nan")
    client["cpu_us_per_mb"] = round(per_mb, 1) if per_mb == per_mb else None  # NaN: unknown
    client["mss"] = mss or "host default"
    client["server"] = {
        k: server.get(k) for k in ("bulk_streams", "bytes", "errors", "socket_drops")
    }
    client["cpu_s"] = {"client": client["cpu_s"], "server": server["cpu_s"]}
    return client


# -- a router with many rules under SYN load --------------------------------------------


def _draw_prefixes(n: int, seed: int) -> list[tuple[int, int]]:
    """``n`` distinct (value, length) pairs, the distribution of ``service_table.py``."""
    import service_table

    return service_table._draw_prefixes(n, random.Random(seed))


async def router_side(ctl: Control, params: Params) -> Result:
    """A Router whose table holds ``rules`` prefixes, all forwarding to the tester's sink;
    announces its address and a serviceID under each of ``flows`` random stored prefixes."""
    from pyserval.naming.service_id import ServicePrefix

    sink = tuple(params["sink"])
    n_rules: int = params["rules"]
    rng = random.Random(params.get("seed", 1) + 1)
    pairs = _draw_prefixes(n_rules, params.get("seed", 1)) if n_rules > 1 else []
    if pairs:
        ids = []
        for _ in range(params["flows"]):
            value, length = pairs[rng.randrange(len(pairs))]
            ids.append(value | rng.getrandbits(256 - length) if length < 256 else value)
    else:
        ids = [pyserval.ServiceID.from_name(FORWARD).value] * params["flows"]
    async with pyserval.Router(f"{HOST}:0") as router:
        host = router.host
        rss0 = rss()
        t0 = time.perf_counter()
        if pairs:
            # A prefix object where add_route's type says name or ID: it takes prefixes as
            # text too, but parsing a million of them would dominate the load time.
            add_route: Any = host.add_route
            for value, length in pairs:
                add_route(ServicePrefix(value, length), sink)
        else:
            host.add_route(FORWARD, sink)
        load_s = time.perf_counter() - t0
        del pairs
        rss1 = rss()
        gro_off = False
        with contextlib.suppress(Exception):  # an internal; without it the kernel merges
            fd = host.endpoints[0].fileno()
            with socket.socket(fileno=os.dup(fd)) as sock:
                sock.setsockopt(socket.SOL_UDP, _UDP_GRO, 0)
                gro_off = True
        ip, port = router.address
        ctl.announce((ip, port, ids))  # type: ignore[arg-type]
        samples = await _sample_cpu(ctl)
        return {
            "child_pyserval": pyserval.__file__,
            "rules": n_rules,
            "load_s": round(load_s, 3),
            "rss_before_load": rss0,
            "rss_after_load": rss1,
            "rss_bytes_per_rule": round((rss1 - rss0) / n_rules, 1),
            "gro_off": gro_off,
            "samples": samples,
        }


async def relay_side(ctl: Control, params: Params) -> Result:
    """The bare relay to compare a router with (``router_bench.py``'s ``relay_batched``):
    every datagram on unchanged to the sink, with the batched reads and sends of the
    stack's own UDP layer (``pyserval.runtime.udp``, when the tree has it)."""
    from pyserval.runtime.udp import UdpEndpoint

    sink = tuple(params["sink"])
    holder: list[Any] = []

    def on_datagrams(batch: list[tuple[bytes, tuple[str, int]]]) -> None:
        holder[0].send_many([(data, sink) for data, _src in batch])

    ep = await UdpEndpoint.open((HOST, 0), on_datagrams)
    holder.append(ep)
    gro_off = False
    with contextlib.suppress(OSError), socket.socket(fileno=os.dup(ep.fileno())) as sock:
        sock.setsockopt(socket.SOL_UDP, _UDP_GRO, 0)
        gro_off = True
    ids = [pyserval.ServiceID.from_name(FORWARD).value] * params["flows"]
    async with ep:
        ip, port = ep.address
        ctl.announce((ip, port, ids))  # type: ignore[arg-type]
        samples = await _sample_cpu(ctl)
    return {"rules": 0, "gro_off": gro_off, "samples": samples}


async def _sample_cpu(ctl: Control) -> list[tuple[float, float]]:
    """(perf_counter, process CPU time) every 0.1 s until stopped: the tester's window is
    on the same clock, so the CPU spent inside it can be cut out."""
    loop = asyncio.get_running_loop()
    samples: list[tuple[float, float]] = []
    timer: list[asyncio.TimerHandle] = []

    def sample() -> None:
        samples.append((time.perf_counter(), time.process_time()))
        timer[:] = [loop.call_later(0.1, sample)]

    sample()
    try:
        await ctl.stopped()
    finally:
        timer[0].cancel()
    sample()
    return samples


def _build_syns(source: tuple[str, int], dest: tuple[str, int], ids: list[int]) -> list[bytes]:
    """One SYN per serviceID in ``ids`` (flowIDs 1, 2, ...), as a client sends them."""
    from pyserval.naming.service_id import ServiceID
    from pyserval.sal import (
        PROTO_TCP,
        ControlExt,
        ControlFlags,
        SalPacket,
        ServiceExt,
        TcpFlags,
        TcpHeader,
        TcpOption,
    )

    rng = random.Random(7)
    opts = [TcpOption.mss(1408), TcpOption.nop(), TcpOption.window_scale(5)]
    syns = []
    for flowid, value in enumerate(ids, start=1):
        ctl = ControlExt(ControlFlags.SYN, rng.getrandbits(32), 0, rng.randbytes(8))
        tcp = TcpHeader(seq=rng.getrandbits(32), flags=TcpFlags.SYN, options=opts)
        ext = [ctl, ServiceExt(ServiceID.from_int(value))]
        syns.append(SalPacket(flowid, 0, PROTO_TCP, ext, tcp).encode(source[0], dest[0]))
    return syns


def _check_forwarded(packets: list[bytes], ids: list[int]) -> Result:
    """Decode forwarded SYNs: each must carry a flowID the tester used and its serviceID."""
    from pyserval.sal.packet import decode_packet

    good = 0
    bad: list[str] = []
    for data in packets:
        try:
            pkt = decode_packet(data)
            ext = pkt.service
            flowid = pkt.src_flowid
            known = 1 <= flowid <= len(ids)
            if ext is not None and known and ext.service_id.value == ids[flowid - 1]:
                good += 1
            else:
                bad.append(f"flowID {flowid}: another serviceID")
        except Exception as exc:
            bad.append(f"{type(exc).__name__}: {exc}")
    return {"decoded": len(packets), "good": good, "bad": bad[:5]}


async def syn_tester(ctl: Control, params: Params) -> Result:
    """Keep ``window`` SYNs in flight through the router (``syn_load.closed_loop``); count
    what reaches the sink, and decode a sample of it."""
    ip, port, ids = params["address"]
    out = await syn_load.closed_loop(
        params, (ip, port), lambda source: _build_syns(source, (ip, port), ids)
    )
    out["check"] = _check_forwarded(out.pop("forwarded_sample"), ids)
    return out


def _free_address() -> tuple[str, int]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((HOST, 0))
        address: tuple[str, int] = sock.getsockname()
        return address


def router_run(
    rules: int, seconds: float, window: int = 256, flows: int = 4096, *, relay: bool = False
) -> Result:
    """SYNs per second through a router with ``rules`` FORWARD prefixes (closed loop);
    with ``relay``, through the bare relay instead (``rules`` is then ignored)."""
    params = {
        "rules": rules,
        "seconds": seconds,
        "window": window,
        "flows": flows,
        "sink": _free_address(),
        "grace": 0.05,
    }
    router, tester = run_pair(relay_side if relay else router_side, syn_tester, params)
    t0, t1 = tester["window_start"], tester["window_end"]
    inside = [s for s in router.pop("samples") if t0 <= s[0] <= t1]
    cpu = inside[-1][1] - inside[0][1] if len(inside) > 1 else float("nan")
    span = inside[-1][0] - inside[0][0] if len(inside) > 1 else float("nan")
    handled = tester["per_s"] * span
    check = tester["check"]
    return {
        **router,
        "per_s": round(tester["per_s"]),
        "forwarded": tester["received"],
        "dut": "relay" if relay else "router",
        "dut_cpu_share": round(cpu / span, 3) if span else None,
        "dut_cpu_us_per_syn": round(cpu / handled * 1e6, 2) if handled else None,
        "stalls": tester["stalls"],
        "tester_gso": tester["gso"],
        "forwarded_check": check,
        "ok": check["decoded"] > 0 and check["good"] == check["decoded"],
        "cpu_s": {"router": router["cpu_s"], "tester": tester["cpu_s"]},
    }


# -- the whole run ------------------------------------------------------------------------


def run(args: argparse.Namespace) -> Result:
    """Everything the command line asks for, as one JSON-ready dict."""
    out: Result = {
        "benchmark": "pyserval scaling: concurrent streams from one host; a big router"
        " under SYN load (loopback, every role in its own process)",
        "environment": {**baselines.environment(), "pyserval_src": str(SRC)},
        "settings": {
            "quick": args.quick,
            "mss": args.mss or "host default",
            "units": "MB = 10**6 bytes of checked payload; RSS from /proc/PID/statm",
        },
    }
    ok = True
    if "streams" in args.only:
        levels = []
        for n in args.streams:
            result = streams_run(
                n,
                args.seconds,
                mss=args.mss,
                ping=not args.no_ping,
                max_bytes=byte_cap(n, args.quick),
            )
            ok = ok and result["ok"]
            levels.append(result)
        out["streams"] = levels
        out["streams_summary"] = {
            str(r["streams"]): {
                "mb_per_s": r["mb_per_s"],
                "cpu_us_per_mb": r["cpu_us_per_mb"],
                "ping_p99_us": r["ping_rtt_us_during_bulk"].get("p99"),
                "retransmissions": r["client_core"]["retransmissions"],
                "server_socket_drops": r["server"]["socket_drops"],
                "rss_per_conn_client_idle": r["rss_per_connection_bytes"]["client"]["idle"],
                "rss_per_conn_server_idle": r["rss_per_connection_bytes"]["server"]["idle"],
                "ok": r["ok"],
            }
            for r in levels
        }
    if "router" in args.only:
        small = router_run(1, args.seconds, args.window)
        big = router_run(args.rules, args.seconds, args.window)
        ok = ok and small["ok"] and big["ok"]
        out["router"] = {"one_rule": small, "big_table": big}
        out["router_summary"] = {
            "rules": args.rules,
            "per_s_big": big["per_s"],
            "per_s_one_rule": small["per_s"],
            "big_vs_one_rule": round(big["per_s"] / small["per_s"], 3) if small["per_s"] else None,
            "cpu_us_per_syn_big": big["dut_cpu_us_per_syn"],
            "cpu_us_per_syn_one_rule": small["dut_cpu_us_per_syn"],
            "rss_bytes_per_rule": big["rss_bytes_per_rule"],
        }
    out["ok"] = ok
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the JSON; exit 1 if any data check failed."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a run of under a minute")
    parser.add_argument("--streams", default="1,10,100,1000", help="concurrent stream counts")
    parser.add_argument("--mss", type=int, default=0, help="segment size (0: host default)")
    parser.add_argument(
        "--no-ping", action="store_true", help="no small request/response during the bulk"
    )
    parser.add_argument("--rules", type=int, default=None, help="router table size")
    parser.add_argument(
        "--seconds", type=float, default=None, help="sending / counted seconds per run"
    )
    parser.add_argument("--window", type=int, default=256, help="router: SYNs in flight")
    parser.add_argument("--only", default="streams,router", help="subset of streams,router")
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
    args.streams = [int(s) for s in args.streams.split(",") if s.strip()]
    args.only = {s.strip() for s in args.only.split(",") if s.strip()}
    if args.rules is None:
        args.rules = 100_000 if args.quick else 1_000_000
    if args.seconds is None:
        args.seconds = 1.0 if args.quick else 3.0
    report = run(args)
    emit(report, args.out)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

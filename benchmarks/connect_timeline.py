"""Where a connect cycle's time goes, hop by hop: the wire and wake-ups against Python work.

    python benchmarks/connect_timeline.py [--seconds 3] [--out FILE]

``suite_cases.py connect_vs_tcp`` says how fast sequential connections go and how much CPU
they take; this says where the wall time of one cycle goes. The client and the server
(``suite_cases.py``'s ``connect`` cycle: connect, the server accepts and closes, the client
reads end of stream and closes) run in two processes, and each stamps, with the clock both
share (``time.perf_counter``, CLOCK_MONOTONIC):

* every wake-up of a UDP socket (``UdpEndpoint._on_readable``, before its reads) and the
  datagrams that wake-up read;
* every send (``UdpEndpoint._transmit`` and ``UdpEndpoint.send``, before and after the
  system call);
* the application's steps: ``connect`` called and returned, end of stream read, ``aclose``
  returned (client); ``accept`` returned and ``aclose`` returned (server).

After the run, each process decodes what it sent and read (never during it) and names each
datagram by its sender and kind: the cycle's eight are the client's SYN, third ACK, TCP FIN
and SAL FIN, and the server's SYN-ACK, TCP FIN, SAL FIN and SAL ACK
(``../shared/spec/sal-wire.md``), all keyed by the client's flowID. The parent joins the
two timelines into one per connection and reports, as medians over the cycles:

* ``steps``: every step in the order the cycle takes them, ``process`` (one process, from
  what woke it or the application's call to the send or the application's return) or
  ``wire`` (from the start of the sender's ``sendto`` to the start of the receiver's
  wake-up: the system call, the kernel's delivery, the wake-up of a sleeping process, and
  any work the receiver was still doing);
* ``datagrams``: for each of the eight, its send call (the sender's ``sendto``: on
  loopback it includes the kernel's delivery and, when the receiver sleeps, waking it),
  the time from its return to the receiver's wake-up, and how often the receiver had been
  idle;
* ``critical_path``: the steps one cycle cannot start the next without (connect to the
  client's FIN; the close's last four datagrams overlap the next cycle), summed by kind;
* ``wake_after_idle``: how long the ``wire`` steps take when the receiver had been idle
  (nothing stamped for ``IDLE_S`` before the send began: its CPU may have gone to sleep)
  against when it had been awake (then the datagram may wait for work in progress);
* ``server_busy_at_syn``: how often the SYN was sent while the server was still at the
  previous connection's close (between reading the client's TCP FIN, datagram 5, and
  sending its SAL FIN), so that it waited for that work.

The instrumentation costs about a microsecond a stamp; compare steps with each other, and
take rates from ``suite_cases.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import itertools
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import treepath
from report import emit

SRC = treepath.pin()

import anyio  # noqa: E402

import pyserval  # noqa: E402
from baselines import HOST, Control, Params, Result, run_pair  # noqa: E402

SERVICE = "timeline-connect"
# A stamp: (time, what, detail); what is "read" (a wake-up, detail = datagrams), "sent"
# (detail = (start, datagrams)) or an application step (detail = the client's flowID).
Stamp = tuple[float, str, Any]

# The cycle's datagrams in order: (sender, kind).
DATAGRAMS = (
    ("client", "SYN"),
    ("server", "SYN-ACK"),
    ("client", "third ACK"),
    ("server", "FIN"),
    ("client", "FIN"),
    ("server", "SAL FIN"),
    ("client", "SAL FIN"),
    ("server", "SAL ACK"),
)
# The cycle's steps, in order: (name, kind, from, to); an end point is ("app", step name)
# or ("send"|"read", datagram index).
STEPS = (
    ("client connect -> SYN sent", "process", ("app", "connect"), ("send", 0)),
    ("SYN on the wire", "wire", ("send", 0), ("read", 0)),
    ("server: SYN -> SYN-ACK sent", "process", ("read", 0), ("send", 1)),
    ("SYN-ACK on the wire", "wire", ("send", 1), ("read", 1)),
    ("client: SYN-ACK -> third ACK sent", "process", ("read", 1), ("send", 2)),
    ("client: third ACK sent -> connect returns", "process", ("send", 2), ("app", "connected")),
    ("third ACK on the wire", "wire", ("send", 2), ("read", 2)),
    ("server: third ACK -> accept returns", "process", ("read", 2), ("app", "accepted")),
    ("server: accept returns -> FIN sent", "process", ("app", "accepted"), ("send", 3)),
    ("FIN on the wire", "wire", ("send", 3), ("read", 3)),
    ("client: FIN -> end of stream read", "process", ("read", 3), ("app", "eof")),
    ("client: end of stream -> FIN sent", "process", ("app", "eof"), ("send", 4)),
    ("client: FIN sent -> aclose returns", "process", ("send", 4), ("app", "closed")),
    ("client FIN on the wire", "wire", ("send", 4), ("read", 4)),
    ("server: FIN -> SAL FIN sent", "process", ("read", 4), ("send", 5)),
    ("SAL FIN on the wire", "wire", ("send", 5), ("read", 5)),
    ("client: SAL FIN -> its SAL FIN sent", "process", ("read", 5), ("send", 6)),
    ("client SAL FIN on the wire", "wire", ("send", 6), ("read", 6)),
    ("server: SAL FIN -> SAL ACK sent", "process", ("read", 6), ("send", 7)),
)
# One cycle cannot start the next before these are done (the client's loop).
CRITICAL = (
    "client connect -> SYN sent",
    "SYN on the wire",
    "server: SYN -> SYN-ACK sent",
    "SYN-ACK on the wire",
    "client: SYN-ACK -> third ACK sent",
    "third ACK on the wire",
    "server: third ACK -> accept returns",
    "server: accept returns -> FIN sent",
    "FIN on the wire",
    "client: FIN -> end of stream read",
    "client: end of stream -> FIN sent",
    "client: FIN sent -> aclose returns",
)
# A receiver idle for longer than this before a datagram was sent counts as asleep.
IDLE_S = 150e-6


def _instrument(stamps: list[Stamp]) -> None:
    """Stamp the UDP layer's wake-ups, reads and sends (class attributes: every socket)."""
    from pyserval.runtime.driver import Driver
    from pyserval.runtime.udp import UdpEndpoint

    clock = time.perf_counter
    on_readable = UdpEndpoint._on_readable
    transmit = UdpEndpoint._transmit
    send = UdpEndpoint.send
    receive_batch = Driver.receive_batch
    woke = [0.0]

    def stamped_readable(self: UdpEndpoint) -> None:
        woke[0] = clock()
        on_readable(self)

    def stamped_batch(self: Driver, ep: UdpEndpoint, batch: list[tuple[bytes, Any]]) -> None:
        stamps.append((woke[0], "read", [data for data, _ in batch]))
        receive_batch(self, ep, batch)

    def stamped_transmit(self: UdpEndpoint, items: Any) -> int:
        start = clock()
        done = transmit(self, items)
        stamps.append((clock(), "sent", (start, [data for data, _ in items])))
        return done

    def stamped_send(self: UdpEndpoint, data: bytes, remote: Any) -> None:
        # A pass with one plain datagram goes out here, not through _transmit.
        start = clock()
        send(self, data, remote)
        stamps.append((clock(), "sent", (start, [data])))

    UdpEndpoint._on_readable = stamped_readable  # type: ignore[method-assign]
    UdpEndpoint._transmit = stamped_transmit  # type: ignore[method-assign]
    UdpEndpoint.send = stamped_send  # type: ignore[method-assign]
    Driver.receive_batch = stamped_batch  # type: ignore[method-assign]


def _kind(data: bytes) -> tuple[str, int, int] | None:
    """(kind, source flowID, destination flowID) of a cycle datagram; None for others."""
    from pyserval.sal.extensions import ControlFlags, ServiceExt
    from pyserval.sal.packet import decode_packet
    from pyserval.sal.transport_headers import TcpFlags

    try:
        pkt = decode_packet(bytes(data))
    except ValueError:
        return None
    ctl = pkt.control
    if ctl is not None:
        if ctl.flags & ControlFlags.SYN:
            kind = "SYN-ACK" if ctl.flags & ControlFlags.ACK else "SYN"
        elif ctl.flags & ControlFlags.FIN:
            kind = "SAL FIN"
        elif pkt.find(ServiceExt) is not None:
            kind = "third ACK"
        else:
            kind = "SAL ACK"
    elif pkt.tcp is not None and pkt.tcp.flags & TcpFlags.FIN:
        kind = "FIN"
    else:
        return None
    return kind, pkt.src_flowid, pkt.dst_flowid


def _datagrams(data: Any) -> list[bytes]:
    """The datagrams of one send item (a super-datagram is several)."""
    if isinstance(data, bytes | bytearray | memoryview):
        return [bytes(data)]
    return list(data.split())  # a SuperDatagram


def _events(stamps: list[Stamp], side: str) -> list[tuple[float, str, int]]:
    """(time, event, client flowID) from one process's stamps, decoded after the run:
    ``send i``/``read i`` for the cycle's datagram i, application steps as named."""
    index = {d: i for i, d in enumerate(DATAGRAMS)}
    other = "server" if side == "client" else "client"
    out: list[tuple[float, str, int]] = []
    for t, what, detail in stamps:
        if what == "app":
            continue
        if what == "read":
            items, sender, at = detail, other, t
        else:
            start, sent = detail
            items, sender, at = [d for item in sent for d in _datagrams(item)], side, start
        for data in items:
            got = _kind(data)
            if got is None:
                continue
            kind, src, dst = got
            i = index.get((sender, kind))
            if i is None:
                continue
            client_flow = src if sender == "client" else dst
            if what == "read":
                out.append((at, f"read {i}", client_flow))
            else:
                out.append((at, f"send {i}", client_flow))
                out.append((t, f"sent {i}", client_flow))  # the send call returned
    return out


async def timeline_server(ctl: Control, params: Params) -> Result:
    """Accept and close at once, stamping; hand back the stamps."""
    stamps: list[Stamp] = []
    _instrument(stamps)
    clock = time.perf_counter

    async def serve(listener: Any) -> None:
        async for stream in listener:
            stamps.append((clock(), "app", ("accepted", stream.remote_flowid)))
            await stream.aclose()
            stamps.append((clock(), "app", ("server closed", stream.remote_flowid)))

    async with pyserval.Host([f"{HOST}:0"]) as host:
        listener = await host.listen(SERVICE, backlog=1024)
        ctl.announce(host.addresses[0])
        task = asyncio.ensure_future(serve(listener))
        await ctl.stopped()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    return _summary(stamps, "server")


async def timeline_client(ctl: Control, params: Params) -> Result:
    """The connect cycle for ``seconds``, stamping; hand back the stamps."""
    stamps: list[Stamp] = []
    _instrument(stamps)
    clock = time.perf_counter
    ip, port = params["address"]
    config = pyserval.StreamConfig(time_wait=1.0)  # as suite_cases' client
    async with pyserval.Host([f"{HOST}:0"], stream_config=config) as host:
        host.add_route(SERVICE, f"{ip}:{port}")
        end = clock() + params["seconds"]
        while clock() < end:
            start = clock()
            stream = await host.connect(SERVICE)
            flow = stream.local_flowid
            stamps.append((start, "app", ("connect", flow)))
            stamps.append((clock(), "app", ("connected", flow)))
            with contextlib.suppress(anyio.EndOfStream):
                await stream.receive()
            stamps.append((clock(), "app", ("eof", flow)))
            await stream.aclose()
            stamps.append((clock(), "app", ("closed", flow)))
        await asyncio.sleep(0.2)  # the last close's datagrams
    return _summary(stamps, "client")


def _summary(stamps: list[Stamp], side: str) -> Result:
    """What the parent needs: events by flow, and when this process was last awake."""
    events = _events(stamps, side)
    apps = [(t, detail[0], detail[1]) for t, what, detail in stamps if what == "app"]
    # Moments the process was awake (wake-ups, send ends, application steps), sorted.
    awake = sorted(
        [t for t, what, _ in stamps if what in ("read", "sent", "app")]
        + [detail[0] for _, what, detail in stamps if what == "sent"]
    )
    return {"events": events + apps, "awake": awake}


def _last_awake_before(awake: list[float], t: float) -> float | None:
    i = bisect.bisect_left(awake, t)
    return awake[i - 1] if i > 0 else None


def analyse(client: Result, server: Result) -> Result:
    """Join the two processes' events into cycles; medians per step."""
    by_flow: dict[int, dict[str, float]] = defaultdict(dict)
    for side in (client, server):
        for t, name, flow in side["events"]:
            slot = by_flow[flow]
            # The first occurrence counts (a retransmission would come later).
            slot.setdefault(name, t)
    starts = sorted((ev["connect"], flow) for flow, ev in by_flow.items() if "connect" in ev)
    # Complete cycles only; the first and last few are warm-up and wind-down.
    flows = [flow for _, flow in starts][20:-5]
    cycle_times = [b[0] - a[0] for a, b in itertools.pairwise(starts[20:-4])]

    def point(ev: dict[str, float], end: tuple[str, Any]) -> float | None:
        kind, what = end
        if kind == "app":
            return ev.get(what)
        return ev.get(f"{kind} {what}")

    steps = []
    per_step: dict[str, list[float]] = {}
    for name, kind, a, b in STEPS:
        values = []
        for flow in flows:
            ev = by_flow[flow]
            ta, tb = point(ev, a), point(ev, b)
            if ta is not None and tb is not None:
                values.append((tb - ta) * 1e6)
        per_step[name] = values
        if values:
            values_sorted = sorted(values)
            steps.append(
                {
                    "step": name,
                    "kind": kind,
                    "median_us": round(statistics.median(values), 1),
                    "p90_us": round(values_sorted[int(0.9 * (len(values) - 1))], 1),
                    "n": len(values),
                }
            )
    critical = {"process": 0.0, "wire": 0.0}
    for name, kind, _a, _b in STEPS:
        if name in CRITICAL and per_step.get(name):
            critical[kind] += statistics.median(per_step[name])
    # Each datagram: its send call, then the time to the receiver's wake-up, split by
    # whether the receiver had been idle (asleep) when the send began.
    idle: dict[str, list[float]] = {"receiver idle": [], "receiver awake": []}
    datagrams = []
    for i, (sender, kind) in enumerate(DATAGRAMS):
        calls, waits, asleep = [], [], 0
        receiver = server if sender == "client" else client
        for flow in flows:
            ev = by_flow[flow]
            send, sent, read = ev.get(f"send {i}"), ev.get(f"sent {i}"), ev.get(f"read {i}")
            if send is None or sent is None or read is None:
                continue
            calls.append((sent - send) * 1e6)
            waits.append((read - sent) * 1e6)
            last = _last_awake_before(receiver["awake"], send)
            was_idle = last is None or send - last > IDLE_S
            asleep += was_idle
            idle["receiver idle" if was_idle else "receiver awake"].append((read - send) * 1e6)
        if calls:
            datagrams.append(
                {
                    "datagram": f"{sender} {kind}",
                    "send_call_us": round(statistics.median(calls), 1),
                    "then_to_wake_up_us": round(statistics.median(waits), 1),
                    "receiver_idle_share": round(asleep / len(calls), 3),
                }
            )
    # Did the SYN find the server still at the previous connection's client FIN?
    busy = 0
    counted = 0
    for prev, cur in itertools.pairwise(flows):
        a, b = by_flow[prev], by_flow[cur]
        fin_read, sal_fin_sent, syn_sent = a.get("read 4"), a.get("send 5"), b.get("send 0")
        if fin_read is None or sal_fin_sent is None or syn_sent is None:
            continue
        counted += 1
        if fin_read <= syn_sent < sal_fin_sent:
            busy += 1
    return {
        "cycles": len(flows),
        "cycle_us_median": round(statistics.median(cycle_times) * 1e6, 1) if cycle_times else None,
        "steps": steps,
        "datagrams": datagrams,
        "critical_path_us": {k: round(v, 1) for k, v in critical.items()},
        "wake_after_idle": {
            k: {"median_us": round(statistics.median(v), 1), "n": len(v)} if v else None
            for k, v in idle.items()
        },
        "idle_threshold_us": IDLE_S * 1e6,
        "server_busy_at_syn": round(busy / counted, 3) if counted else None,
    }


def main(argv: list[str] | None = None) -> int:
    """Run the two processes, join their timelines, print the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    server, client = run_pair(timeline_server, timeline_client, {"seconds": args.seconds})
    report = {"case": "connect_timeline", "pyserval_src": str(SRC), **analyse(client, server)}
    report["ok"] = bool(report["cycles"]) and len(report["steps"]) == len(STEPS)
    emit(report, args.out)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""Where a connect cycle's time goes, hop by hop: the wire and wake-ups against Python work.

    python benchmarks/connect_timeline.py [--seconds 3] [--cycle compact|spec] [--out FILE]

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
datagram by its sender and kind (``KINDS``: its CONTROL and TCP flags, and whether it
carries the service extension), all keyed by the client's flowID. ``--cycle`` picks the
close (the names are ``connect_floor.py``'s): ``spec``, the default, is the spec's eight
(``../shared/spec/sal-wire.md``: the server's and the client's TCP FINs, then the
server's SAL FIN, the client's SAL FIN+ACK, the server's SAL ACK); ``compact`` (both
hosts with ``StreamConfig(compact_close=True)``) is six datagrams (the client's SYN and
third ACK, the server's SYN-ACK, then each side's TCP FIN with its SAL FIN, the client's
carrying the SAL ACK too, and the server's TCP and SAL ACK in one).
``DATAGRAMS`` and ``STEPS`` write each cycle out; a cycle whose datagrams, in the order
sent, are not its ``DATAGRAMS`` (a retransmission aside) is counted in
``cycles_off_table`` and fails the run (``ok: false``). The parent joins the two
timelines into one per connection and reports, as medians over the cycles:

* ``steps``: every step in the order the cycle takes them, ``process`` (one process, from
  what woke it or the application's call to the send or the application's return) or
  ``wire`` (from the start of the sender's ``sendto`` to the start of the receiver's
  wake-up: the system call, the kernel's delivery, the wake-up of a sleeping process, and
  any work the receiver was still doing);
* ``datagrams``: for each of the cycle's datagrams, its send call (the sender's
  ``sendto``: on loopback it includes the kernel's delivery and, when the receiver sleeps,
  waking it), the time from its return to the receiver's wake-up, and how often the
  receiver had been idle;
* ``critical_path``: the steps one cycle cannot start the next without (connect to the
  client's ``aclose`` returning, at its FIN; the rest of the close overlaps the next
  cycle), summed by kind;
* ``wake_after_idle``: how long the ``wire`` steps take when the receiver had been idle
  (nothing stamped for ``IDLE_S`` before the send began: its CPU may have gone to sleep)
  against when it had been awake (then the datagram may wait for work in progress);
* ``server_busy_at_syn``: how often the SYN was sent while the server was still answering
  the previous connection's client FIN (``SERVER_CLOSE_STEP``: from reading it to sending
  the answer, the SAL FIN or the ACK + SAL ACK), so that it waited for that work.

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
from typing import Any, NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
import treepath
from report import emit

SRC = treepath.pin()

import anyio  # noqa: E402

import pyserval  # noqa: E402
from baselines import HOST, Control, Params, Result, run_pair  # noqa: E402
from pyserval.sal.extensions import ControlFlags, ServiceExt  # noqa: E402
from pyserval.sal.packet import decode_packet  # noqa: E402
from pyserval.sal.transport_headers import TcpFlags  # noqa: E402

SERVICE = "timeline-connect"
# A stamp: (time, what, detail); what is "read" (a wake-up, detail = datagrams), "sent"
# (detail = (start, datagrams)) or an application step (detail = the client's flowID).
Stamp = tuple[float, str, Any]

# A datagram's kind by (CONTROL flags, TCP flags, whether it has the service extension);
# None: it has no such header. Exact flags, so that a datagram carrying anything else is
# no kind of either cycle. The third ACK and the compact close's last ACK differ only in
# the service extension (only the handshake's packets carry it).
_C, _T = ControlFlags, TcpFlags
KINDS: dict[tuple[int | None, int | None, bool], str] = {
    (_C.SYN, _T.SYN, True): "SYN",
    (_C.SYN | _C.ACK, _T.SYN | _T.ACK, False): "SYN-ACK",
    (_C.ACK, _T.ACK, True): "third ACK",
    # The spec's close: each TCP FIN alone, then the SAL FINs (the server's with the TCP
    # ACK of the client's FIN).
    (None, _T.FIN | _T.ACK, False): "FIN",
    (_C.FIN, _T.ACK, False): "SAL FIN",
    (_C.FIN | _C.ACK, None, False): "SAL FIN+ACK",
    (_C.ACK, None, False): "SAL ACK",
    # The compact close: each SAL FIN on its TCP FIN, the last ACKs in one packet.
    (_C.FIN, _T.FIN | _T.ACK, False): "FIN + SAL FIN",
    (_C.FIN | _C.ACK, _T.FIN | _T.ACK, False): "FIN + SAL FIN+ACK",
    (_C.ACK, _T.ACK, False): "ACK + SAL ACK",
}
# Each cycle's datagrams in order: (sender, kind). The cycles are connect_floor.py's.
DATAGRAMS: dict[str, tuple[tuple[str, str], ...]] = {
    "spec": (
        ("client", "SYN"),
        ("server", "SYN-ACK"),
        ("client", "third ACK"),
        ("server", "FIN"),
        ("client", "FIN"),
        ("server", "SAL FIN"),
        ("client", "SAL FIN+ACK"),
        ("server", "SAL ACK"),
    ),
    "compact": (
        ("client", "SYN"),
        ("server", "SYN-ACK"),
        ("client", "third ACK"),
        ("server", "FIN + SAL FIN"),
        ("client", "FIN + SAL FIN+ACK"),
        ("server", "ACK + SAL ACK"),
    ),
}
# The StreamConfig fields of both hosts for each cycle (the client's also has time_wait).
CONFIG: dict[str, dict[str, Any]] = {
    "spec": {"compact_close": False},
    "compact": {"compact_close": True},
}


class Step(NamedTuple):
    """One step of a cycle, between two events: an application step ("connect",
    "accepted", ...) or "send i"/"read i" for the cycle's datagram i."""

    name: str
    kind: str  # "process" or "wire"
    start: str
    end: str
    critical: bool  # one cycle cannot start the next before it is done (the client's loop)


# The steps, in order; the handshake is the same in both cycles.
_HANDSHAKE = (
    Step("client connect -> SYN sent", "process", "connect", "send 0", True),
    Step("SYN on the wire", "wire", "send 0", "read 0", True),
    Step("server: SYN -> SYN-ACK sent", "process", "read 0", "send 1", True),
    Step("SYN-ACK on the wire", "wire", "send 1", "read 1", True),
    Step("client: SYN-ACK -> third ACK sent", "process", "read 1", "send 2", True),
    Step("client: third ACK sent -> connect returns", "process", "send 2", "connected", False),
    Step("third ACK on the wire", "wire", "send 2", "read 2", True),
    Step("server: third ACK -> accept returns", "process", "read 2", "accepted", True),
)
STEPS: dict[str, tuple[Step, ...]] = {
    "spec": (
        *_HANDSHAKE,
        Step("server: accept returns -> FIN sent", "process", "accepted", "send 3", True),
        Step("FIN on the wire", "wire", "send 3", "read 3", True),
        Step("client: FIN -> end of stream read", "process", "read 3", "eof", True),
        Step("client: end of stream -> FIN sent", "process", "eof", "send 4", True),
        Step("client: FIN sent -> aclose returns", "process", "send 4", "closed", True),
        Step("client FIN on the wire", "wire", "send 4", "read 4", False),
        Step("server: FIN -> SAL FIN sent", "process", "read 4", "send 5", False),
        Step("SAL FIN on the wire", "wire", "send 5", "read 5", False),
        Step("client: SAL FIN -> SAL FIN+ACK sent", "process", "read 5", "send 6", False),
        Step("SAL FIN+ACK on the wire", "wire", "send 6", "read 6", False),
        Step("server: SAL FIN+ACK -> SAL ACK sent", "process", "read 6", "send 7", False),
    ),
    "compact": (
        *_HANDSHAKE,
        Step("server: accept returns -> FIN + SAL FIN sent", "process", "accepted", "send 3", True),
        Step("FIN + SAL FIN on the wire", "wire", "send 3", "read 3", True),
        Step("client: FIN + SAL FIN -> end of stream read", "process", "read 3", "eof", True),
        Step("client: end of stream -> FIN + SAL FIN+ACK sent", "process", "eof", "send 4", True),
        Step(
            "client: FIN + SAL FIN+ACK sent -> aclose returns", "process", "send 4", "closed", True
        ),
        Step("FIN + SAL FIN+ACK on the wire", "wire", "send 4", "read 4", False),
        Step(
            "server: FIN + SAL FIN+ACK -> ACK + SAL ACK sent", "process", "read 4", "send 5", False
        ),
    ),
}
# The server's answer to the client's FIN: a SYN sent during it waits for that work.
SERVER_CLOSE_STEP = {
    "spec": "server: FIN -> SAL FIN sent",
    "compact": "server: FIN + SAL FIN+ACK -> ACK + SAL ACK sent",
}
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
    """(kind, source flowID, destination flowID) of a SAL datagram; None if it is not one.
    A kind not in ``KINDS`` is named by its flags, so that the cycle check reports it."""
    try:
        pkt = decode_packet(bytes(data))
    except ValueError:
        return None
    ctl, tcp = pkt.control, pkt.tcp
    key = (
        None if ctl is None else ctl.flags,
        None if tcp is None else tcp.flags,
        pkt.find(ServiceExt) is not None,
    )
    kind = KINDS.get(key, f"other (CONTROL {key[0]}, TCP {key[1]}, service {key[2]})")
    return kind, pkt.src_flowid, pkt.dst_flowid


def _datagrams(data: Any) -> list[bytes]:
    """The datagrams of one send item (a super-datagram is several)."""
    if isinstance(data, bytes | bytearray | memoryview):
        return [bytes(data)]
    return list(data.split())  # a SuperDatagram


def _events(
    stamps: list[Stamp], side: str, cycle: str
) -> tuple[list[tuple[float, str, int]], list[tuple[float, str, int]]]:
    """From one process's stamps, decoded after the run: (time, event, client flowID) with
    ``send i``/``sent i``/``read i`` for the cycle's datagram i, and (time, kind, client
    flowID) of every datagram this process sent, of the cycle or not."""
    index = {d: i for i, d in enumerate(DATAGRAMS[cycle])}
    other = "server" if side == "client" else "client"
    out: list[tuple[float, str, int]] = []
    sends: list[tuple[float, str, int]] = []
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
            client_flow = src if sender == "client" else dst
            if what == "sent":
                sends.append((at, kind, client_flow))
            i = index.get((sender, kind))
            if i is None:
                continue
            if what == "read":
                out.append((at, f"read {i}", client_flow))
            else:
                out.append((at, f"send {i}", client_flow))
                out.append((t, f"sent {i}", client_flow))  # the send call returned
    return out, sends


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

    # An explicit config in both cycles (it also turns off the loopback MSS guess, which
    # a cycle without data does not use), so that they differ in the close alone.
    config = pyserval.StreamConfig(**CONFIG[params["cycle"]])
    async with pyserval.Host([f"{HOST}:0"], stream_config=config) as host:
        listener = await host.listen(SERVICE, backlog=1024)
        ctl.announce(host.addresses[0])
        task = asyncio.ensure_future(serve(listener))
        await ctl.stopped()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    return _summary(stamps, "server", params["cycle"])


async def timeline_client(ctl: Control, params: Params) -> Result:
    """The connect cycle for ``seconds``, stamping; hand back the stamps."""
    stamps: list[Stamp] = []
    _instrument(stamps)
    clock = time.perf_counter
    ip, port = params["address"]
    # time_wait as suite_cases' client
    config = pyserval.StreamConfig(time_wait=1.0, **CONFIG[params["cycle"]])
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
    return _summary(stamps, "client", params["cycle"])


def _summary(stamps: list[Stamp], side: str, cycle: str) -> Result:
    """What the parent needs: events by flow, what it sent, and when it was awake."""
    events, sends = _events(stamps, side, cycle)
    apps = [(t, detail[0], detail[1]) for t, what, detail in stamps if what == "app"]
    # Moments the process was awake (wake-ups, send ends, application steps), sorted.
    awake = sorted(
        [t for t, what, _ in stamps if what in ("read", "sent", "app")]
        + [detail[0] for _, what, detail in stamps if what == "sent"]
    )
    return {"events": events + apps, "sends": sends, "awake": awake}


def _last_awake_before(awake: list[float], t: float) -> float | None:
    i = bisect.bisect_left(awake, t)
    return awake[i - 1] if i > 0 else None


def _off_table(
    client: Result, server: Result, flows: list[int], cycle: str
) -> tuple[int, int, list[str] | None]:
    """How many of ``flows`` sent other datagrams than the cycle's ``DATAGRAMS``, in its
    order (a datagram sent again counts once: a retransmission is no other datagram); how
    many were sent again; the first cycle off the table, as sent."""
    sent: dict[int, list[tuple[float, str, str]]] = defaultdict(list)
    for name, side in (("client", client), ("server", server)):
        for t, kind, flow in side["sends"]:
            sent[flow].append((t, name, kind))
    expected = list(DATAGRAMS[cycle])
    off, repeated, example = 0, 0, None
    for flow in flows:
        got = [(name, kind) for _t, name, kind in sorted(sent[flow])]
        firsts = list(dict.fromkeys(got))
        repeated += len(got) - len(firsts)
        if firsts != expected:
            off += 1
            example = example or [f"{name} {kind}" for name, kind in got]
    return off, repeated, example


def analyse(client: Result, server: Result, cycle: str) -> Result:
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

    steps = []
    per_step: dict[str, list[float]] = {}
    for step in STEPS[cycle]:
        values = []
        for flow in flows:
            ev = by_flow[flow]
            ta, tb = ev.get(step.start), ev.get(step.end)
            if ta is not None and tb is not None:
                values.append((tb - ta) * 1e6)
        per_step[step.name] = values
        if values:
            values_sorted = sorted(values)
            steps.append(
                {
                    "step": step.name,
                    "kind": step.kind,
                    "median_us": round(statistics.median(values), 1),
                    "p90_us": round(values_sorted[int(0.9 * (len(values) - 1))], 1),
                    "n": len(values),
                }
            )
    critical = {"process": 0.0, "wire": 0.0}
    for step in STEPS[cycle]:
        if step.critical and per_step[step.name]:
            critical[step.kind] += statistics.median(per_step[step.name])
    # Each datagram: its send call, then the time to the receiver's wake-up, split by
    # whether the receiver had been idle (asleep) when the send began.
    idle: dict[str, list[float]] = {"receiver idle": [], "receiver awake": []}
    datagrams = []
    for i, (sender, kind) in enumerate(DATAGRAMS[cycle]):
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
    # Did the SYN find the server still answering the previous connection's client FIN?
    busy_from, busy_to = next(
        (step.start, step.end) for step in STEPS[cycle] if step.name == SERVER_CLOSE_STEP[cycle]
    )
    busy = 0
    counted = 0
    for prev, cur in itertools.pairwise(flows):
        a, b = by_flow[prev], by_flow[cur]
        fin_read, answer_sent, syn_sent = a.get(busy_from), a.get(busy_to), b.get("send 0")
        if fin_read is None or answer_sent is None or syn_sent is None:
            continue
        counted += 1
        if fin_read <= syn_sent < answer_sent:
            busy += 1
    off, repeated, example = _off_table(client, server, flows, cycle)
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
        "cycles_off_table": off,
        "off_table_example": example,
        "datagrams_sent_again": repeated,
    }


def main(argv: list[str] | None = None) -> int:
    """Run the two processes, join their timelines, print the JSON."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument(
        "--cycle", choices=tuple(DATAGRAMS), default="spec", help="which close (see DATAGRAMS)"
    )
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    params = {"seconds": args.seconds, "cycle": args.cycle}
    server, client = run_pair(timeline_server, timeline_client, params)
    report = {
        "case": "connect_timeline",
        "pyserval_src": str(SRC),
        "cycle": args.cycle,
        **analyse(client, server, args.cycle),
    }
    report["ok"] = (
        bool(report["cycles"])
        and len(report["steps"]) == len(STEPS[args.cycle])
        and report["cycles_off_table"] == 0
    )
    emit(report, args.out)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

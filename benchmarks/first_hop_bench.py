"""CPU cost of a router's first-hop SYN forwarding alone, sans I/O (JSON out).

    python benchmarks/first_hop_bench.py [--passes 20] [--repeat 7] [--only CASES] [--out FILE]

``router_bench.py`` measures a router process on real sockets against a bare relay; there
the system calls and the socket layer, which both share, are most of the time, and other
load on the machine moves the figures. This one times only what a router does that a
relay does not: ``HostCore.receive_datagrams`` on batch reads of 256 first-hop SYNs (as
the runtime driver calls it) and ``datagrams_to_send``, in one process, in CPU time
(``time.process_time``). Cases:

* ``one_service``: every SYN from one sender to one serviceID with one FORWARD rule, each
  with its own flowID (``router_bench.py``'s load);
* ``many_services``: each SYN of a batch to another serviceID (4,096 exact rules, all
  forwarding to one next hop): a lookup per SYN, in a table small enough to stay in cache;
* ``relay``: what the bare relay does per batch in Python (a list of ``(data, sink)``), for
  scale.

Per case: microseconds of CPU per SYN, best and median of ``--repeat`` runs. The forwarded
bytes are checked: the SHA-256 of one pass over every batch must equal that of the same
SYNs fed one at a time to ``receive_datagram`` on a second router (the per-packet path),
and a sample is decoded (flowID, serviceID and the path as sent). It uses ``pyserval``'s
core and SAL codec from ``PYTHONPATH`` when set (``treepath``), so two trees compare.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import treepath
from report import emit

SRC = treepath.pin()

import baselines  # noqa: E402
from pyserval.core.host import HostCore  # noqa: E402
from pyserval.naming.service_id import ServiceID  # noqa: E402
from pyserval.sal import (  # noqa: E402
    PROTO_TCP,
    ControlExt,
    ControlFlags,
    Rule,
    SalPacket,
    ServiceExt,
    TcpFlags,
    TcpHeader,
    TcpOption,
    decode_packet,
)

ROUTER = ("10.0.0.9", 7000)
CLIENT = ("10.0.0.1", 40000)
SINK = ("10.0.0.2", 54325)
BATCH = 256
FLOWS = 4096
CASES = ("one_service", "many_services", "relay")

Addr = tuple[str, int]


def _syns(ids: list[int]) -> list[bytes]:
    """One SYN per serviceID in ``ids`` (flowIDs 1, 2, ...), as a client sends them."""
    rng = random.Random(7)
    opts = [TcpOption.mss(1408), TcpOption.nop(), TcpOption.window_scale(5)]
    out = []
    for flowid, value in enumerate(ids, start=1):
        ctl = ControlExt(ControlFlags.SYN, rng.getrandbits(32), 0, rng.randbytes(8))
        tcp = TcpHeader(seq=rng.getrandbits(32), flags=TcpFlags.SYN, options=opts)
        ext = [ctl, ServiceExt(ServiceID.from_int(value))]
        out.append(SalPacket(flowid, 0, PROTO_TCP, ext, tcp).encode(CLIENT[0], ROUTER[0]))
    return out


def _setup(case: str) -> tuple[list[int], list[list[tuple[bytes, Addr]]]]:
    if case == "many_services":
        ids = [random.Random(i).getrandbits(256) for i in range(FLOWS)]
    else:
        ids = [ServiceID.from_name("bench-forward").value] * FLOWS
    syns = _syns(ids)
    # A fresh source tuple per datagram, as a socket read gives (equal, not identical).
    batches = [
        [(syns[(b * BATCH + i) % FLOWS], (CLIENT[0], CLIENT[1])) for i in range(BATCH)]
        for b in range(FLOWS // BATCH)
    ]
    return ids, batches


def _router(ids: list[int]) -> HostCore:
    router = HostCore([ROUTER], rng=random.Random(1), forwarding=True)
    for value in set(ids):
        router.service_table.add(ServiceID.from_int(value), Rule.forward(SINK))
    return router


def _check(ids: list[int], batches: list[list[tuple[bytes, Addr]]]) -> dict[str, Any]:
    """The batch path's bytes against the per-packet path's, and a decoded sample."""
    fast, slow = _router(ids), _router(ids)
    h_fast, h_slow = hashlib.sha256(), hashlib.sha256()
    sample: list[bytes] = []
    for batch in batches:
        fast.receive_datagrams(batch, ROUTER, 0.0)
        for data, _local, hop in fast.datagrams_to_send(0.0):
            h_fast.update(data + repr(hop).encode())
            if len(sample) < 64:
                sample.append(data)
        for data, src in batch:
            slow.receive_datagram(data, src, ROUTER, 0.0)
        for data, _local, hop in slow.datagrams_to_send(0.0):
            h_slow.update(data + repr(hop).encode())
    good = 0
    for data in sample:
        pkt = decode_packet(data)
        ext = pkt.service
        ok_service = ext is not None and ext.service_id.value == ids[pkt.src_flowid - 1]
        if ok_service and pkt.source_path() == [CLIENT, ROUTER]:
            good += 1
    forwarded = fast.stats["forwarded_syn"]
    return {
        "sha256_batch": h_fast.hexdigest(),
        "sha256_per_packet": h_slow.hexdigest(),
        "forwarded": forwarded,
        "sample_decoded": len(sample),
        "sample_good": good,
        "ok": h_fast.digest() == h_slow.digest()
        and forwarded == len(batches) * BATCH
        and good == len(sample) > 0,
    }


def run_case(case: str, passes: int, repeat: int) -> dict[str, Any]:
    """CPU microseconds per SYN for ``case`` over ``passes`` passes of the batches."""
    ids, batches = _setup(case)
    router = _router(ids)
    receive = router.receive_datagrams
    to_send = router.datagrams_to_send
    per_syn: list[float] = []
    for _ in range(repeat):
        t0 = time.process_time()
        if case == "relay":
            for _ in range(passes):
                for batch in batches:
                    [(data, SINK) for data, _src in batch]
        else:
            for _ in range(passes):
                for batch in batches:
                    receive(batch, ROUTER, 0.0)
                    to_send(0.0)
        per_syn.append((time.process_time() - t0) / (passes * len(batches) * BATCH) * 1e6)
    out: dict[str, Any] = {
        "cpu_us_per_syn_best": round(min(per_syn), 3),
        "cpu_us_per_syn_median": round(statistics.median(per_syn), 3),
        "syns_per_run": passes * len(batches) * BATCH,
    }
    if case != "relay":
        out["check"] = _check(ids, batches)
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the cases; print the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", type=int, default=20, help="passes over 4,096 SYNs per run")
    parser.add_argument("--repeat", type=int, default=7, help="timed runs per case")
    parser.add_argument("--only", default=",".join(CASES), help=f"subset of {','.join(CASES)}")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    cases = [c for c in args.only.split(",") if c]
    unknown = set(cases) - set(CASES)
    if unknown:
        parser.error(f"unknown case(s): {', '.join(sorted(unknown))}")
    report: dict[str, Any] = {
        "benchmark": "pyserval router: first-hop SYN forwarding, sans I/O (CPU per SYN)",
        "environment": baselines.environment(),
        "src": str(SRC),
        "settings": {"batch": BATCH, "flows": FLOWS, "passes": args.passes, "repeat": args.repeat},
        "cases": {case: run_case(case, args.passes, args.repeat) for case in cases},
    }
    report["ok"] = all(c.get("check", {"ok": True})["ok"] for c in report["cases"].values())
    emit(report, args.out)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""Through NATs: connects via a service router, bulk transfers and datagram answers.

    python benchmarks/nat_bench.py [--connects 50] [--bytes 20971520] [--syns 50000]
        [--out FILE]

Two parts, one JSON document on stdout (and in ``--out``):

* ``sim``: the simulated network (virtual clock, deterministic): a client behind each of
  RFC 4787's NAT kinds (``pyserval.testing.netsim.Nat``) connects through a router to an
  instance, every link 10 ms one way. Per kind: when the client's connect returns and when
  the instance accepts, in one-way delays (a direct answer takes 3: client -> router ->
  instance -> client, and the third ACK one more; the relayed SYN-ACK one more), whether
  the instance's SYN-ACK reached the client directly, and how many packets passed the
  router for the connection and a 1 MB transfer (SHA-256 checked).
* ``router_cpu``: microseconds of CPU per SYN a router (``HostCore(forwarding=True)``, in
  this process) spends forwarding a client's first-hop SYN with and without the RELAY
  marker (the fast path fills it in), best of 5 runs of ``--syns`` each; the forwarded
  bytes are checked (SHA-256) against the general path's.
* ``netns`` (root only; skipped otherwise): real Linux NATs in network namespaces
  (``tests/helpers/nat_topology.py``: nftables masquerade, port-restricted; masquerade
  random, symmetric; and a client with no NAT) with a router and two instances
  (``tests/helpers/nat_peer.py``) in processes. Per client position: ``--connects``
  sequential connects via the router (each echoing a message; median, p90 and max connect
  time), an upload of ``--bytes`` (MB/s, checked by the instance's SHA-256), 100 datagrams
  answered by the instance; and, behind the port-restricted NAT, the same connects against
  instances that answer directly only (``--no-relay``), the case issue 19 reported.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

from pyserval.core.host import HostCore  # noqa: E402
from pyserval.sal import Rule  # noqa: E402
from pyserval.testing import LinkConfig, SimNetwork  # noqa: E402
from pyserval.testing.netsim import NatBehaviour  # noqa: E402
from pyserval.transport.connection import Connection, State  # noqa: E402
from report import emit  # noqa: E402

D = 0.010
KINDS: dict[str, tuple[NatBehaviour, NatBehaviour]] = {
    "none": ("endpoint-independent", "endpoint-independent"),
    "full-cone": ("endpoint-independent", "endpoint-independent"),
    "address-restricted": ("endpoint-independent", "address-dependent"),
    "port-restricted": ("endpoint-independent", "address-and-port-dependent"),
    "address-dependent-mapping": ("address-dependent", "address-dependent"),
    "symmetric": ("address-and-port-dependent", "address-and-port-dependent"),
}


def sim_kind(kind: str) -> dict[str, Any]:
    client_addr, router_addr, server_addr = (
        ("192.168.1.10", 40000),
        ("198.51.100.9", 7000),
        ("198.51.100.2", 54325),
    )
    net = SimNetwork(seed=1, default_link=LinkConfig(delay=D))
    client = HostCore([client_addr], rng=random.Random(1))
    router = HostCore([router_addr], rng=random.Random(2), forwarding=True)
    server = HostCore([server_addr], rng=random.Random(3))
    for host, addr in ((client, client_addr), (router, router_addr), (server, server_addr)):
        net.attach(host, addr)
    if kind != "none":
        mapping, filtering = KINDS[kind]
        net.add_nat([client_addr[0]], "203.0.113.1", mapping=mapping, filtering=filtering)
    client.service_table.add("svc", Rule.forward(router_addr))
    client.trusted_forwarders.add(router_addr)
    server.trusted_forwarders.add(router_addr)
    router.service_table.add("svc", Rule.forward(server_addr))
    listener = server.listen("svc")
    through_router = 0
    direct_synack = 0

    def tap(now: float, data: bytes, src: Any, dst: Any, fate: str) -> None:
        nonlocal through_router, direct_synack
        if fate != "delivered":
            return
        if router_addr in (src, dst):
            through_router += 1
        elif src == server_addr and data[14] & 0xA0 == 0xA0 and data[13] == 20:
            direct_synack += 1  # CONTROL(SYN+ACK) first: the SYN-ACK, straight through

    net.tap = tap
    conn = client.connect("svc", 0.0)
    net.kick(client)
    got: list[Connection] = []
    client_at: list[float] = []

    def ready() -> bool:
        c = listener.accept()
        if c is not None:
            got.append(c)
        if conn.state is State.ESTABLISHED and not client_at:
            client_at.append(net.now)
        return bool(got) and conn.state is State.ESTABLISHED

    assert net.run_until(ready, 30), kind
    accepted_delays = round(net.now / D, 3)
    data = random.Random(5).randbytes(1_000_000)
    sent, received = 0, bytearray()
    while len(received) < len(data) and net.now < 60:
        sent += conn.write(data[sent:])
        net.kick(client)
        net.run_for(0.01)
        received += got[0].read()
    return {
        "client_connected_one_way_delays": round(client_at[0] / D, 3),
        "server_accepted_one_way_delays": accepted_delays,
        "synack_reached_client_directly": direct_synack > 0,
        "packets_via_router": through_router,
        "transfer_sha256_ok": hashlib.sha256(received).digest() == hashlib.sha256(data).digest(),
        "address_challenges": server.stats["rebinding_challenge"],
    }


def router_cpu(args: argparse.Namespace) -> dict[str, Any]:
    from pyserval.sal.forwarding import forward_packet
    from pyserval.sal.packet import decode_packet

    client_addr, router_addr, server_addr = (
        ("192.0.2.50", 40000),
        ("192.0.2.1", 7000),
        ("192.0.2.10", 54325),
    )
    out: dict[str, Any] = {}
    for name, marker in (("plain_syn_us", False), ("marker_syn_us", True)):
        client = HostCore([client_addr], rng=random.Random(1))
        client.service_table.add("svc", Rule.forward(router_addr))
        if marker:
            client.trusted_forwarders.add(router_addr)
        client.connect("svc", 0.0)
        ((syn, _, _),) = client.datagrams_to_send(0.0)
        router = HostCore([router_addr], rng=random.Random(2), forwarding=True)
        router.service_table.add("svc", Rule.forward(server_addr))
        best = float("inf")
        for _ in range(5):
            start = time.process_time()
            for _ in range(args.syns):
                router.receive_datagram(syn, client_addr, router_addr, 1.0)
                router._out.clear()
            best = min(best, (time.process_time() - start) / args.syns)
        router.receive_datagram(syn, client_addr, router_addr, 1.0)
        ((fast, _, _),) = router.datagrams_to_send(1.0)
        general = forward_packet(
            syn, decode_packet(syn), client_addr, router_addr, server_addr, router._relay_tag
        )
        same = hashlib.sha256(fast).digest() == hashlib.sha256(general).digest()
        out[name] = round(best * 1e6, 2)
        out[name.replace("_us", "_same_bytes_as_general_path")] = same
    return out


def netns_part(args: argparse.Namespace) -> dict[str, Any]:
    from tests.helpers.nat_topology import (
        INSTANCES,
        ROUTER,
        UNNATTED,
        VIA_GW1,
        VIA_GW2,
        TopologyUnavailable,
        nat_topology,
    )
    from tests.helpers.processes import Peer

    peer = str(ROOT / "tests" / "helpers" / "nat_peer.py")
    out: dict[str, Any] = {}
    try:
        with nat_topology() as topo:

            def public(no_relay: bool) -> list[Peer]:
                prefix = topo.exec_in("p")
                peers = [Peer(["-m", "pyserval", "router", "--listen", ROUTER], prefix=prefix)]
                peers[0].wait_for("router listening", 15)
                for ip in INSTANCES:
                    argv = [peer, "instance", "--router", ROUTER, "--listen", f"{ip}:0"]
                    peers.append(Peer(argv + (["--no-relay"] if no_relay else []), prefix=prefix))
                for p in peers[1:]:
                    p.wait_for("^READY$", 15)
                return peers

            def client(role: str, listen: str, case: str, *extra: str) -> dict[str, Any]:
                argv = [peer, "client", case, "--router", ROUTER, "--listen", f"{listen}:0"]
                with Peer([*argv, *extra], prefix=topo.exec_in(role)) as c:
                    res = c.result(300)
                    c.finish(10)
                return res

            peers = public(no_relay=False)
            try:
                for name, role, listen in (
                    ("no NAT", "p", UNNATTED),
                    ("port-restricted (masquerade)", "c", VIA_GW1),
                    ("symmetric (masquerade random)", "c", VIA_GW2),
                ):
                    con = client(role, listen, "connects", "--count", str(args.connects))
                    ms = sorted(t * 1e3 for t in con["connect_s"])
                    up = client(role, listen, "upload", "--bytes", str(args.bytes), "--pause", "0")
                    dg = client(role, listen, "datagrams", "--count", "100")
                    out[name] = {
                        "connects_ok": f"{con['ok']} of {args.connects}",
                        "connect_ms_median": round(statistics.median(ms), 2) if ms else None,
                        "connect_ms_p90": round(ms[int(len(ms) * 0.9) - 1], 2) if ms else None,
                        "connect_ms_max": round(ms[-1], 2) if ms else None,
                        "upload_sha256_ok": up["ok"],
                        "upload_mb_per_s": round(up["mb_per_s"], 1),
                        "datagrams_answered": f"{dg['ok']} of 100",
                    }
            finally:
                for p in peers:
                    p.kill()
            peers = public(no_relay=True)
            try:
                con = client("c", VIA_GW1, "connects", "--count", "3", "--connect-timeout", "3")
                out["port-restricted, instances answering directly only"] = {
                    "connects_ok": f"{con['ok']} of 3 (3 s timeout each)"
                }
            finally:
                for p in peers:
                    p.kill()
    except TopologyUnavailable as exc:
        return {"skipped": str(exc)}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--connects", type=int, default=50)
    parser.add_argument("--bytes", type=int, default=20 << 20)
    parser.add_argument("--syns", type=int, default=50_000)
    parser.add_argument("--out")
    args = parser.parse_args()
    doc = {
        "sim": {"one_way_delay_ms": D * 1e3, **{k: sim_kind(k) for k in KINDS}},
        "router_cpu": router_cpu(args),
        "netns": netns_part(args),
    }
    emit(doc, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

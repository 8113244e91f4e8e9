"""Through real Linux NATs (nftables masquerade with conntrack) in network namespaces
(tests/helpers/nat_topology.py: a client behind a port-restricted and a symmetric NAT, a
public namespace with a router and two instances).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from .helpers.nat_topology import (
    INSTANCES,
    ROUTER,
    VIA_GW1,
    VIA_GW2,
    Topology,
    TopologyUnavailable,
    nat_topology,
)
from .helpers.processes import ROOT, Peer

pytestmark = [pytest.mark.netns, pytest.mark.timeout(120)]

NAT_PEER = ROOT / "tests" / "helpers" / "nat_peer.py"


@pytest.fixture
def topo() -> Iterator[Topology]:
    try:
        with nat_topology() as t:
            yield t
    except TopologyUnavailable as exc:
        pytest.skip(str(exc))


@dataclass
class Public:
    router: Peer
    instances: list[Peer]

    def stop(self) -> list[dict[str, Any]]:  # the helpers' STATS JSON
        stats = [i.stop() or {} for i in self.instances]
        self.router.stop()
        return stats


@pytest.fixture
def public(topo: Topology) -> Iterator[Public]:
    prefix = topo.exec_in("p")
    router = Peer(["-m", "pyserval", "router", "--listen", ROUTER], prefix=prefix)
    instances: list[Peer] = []
    try:
        router.wait_for("router listening", 15)
        for ip in INSTANCES:
            argv = [str(NAT_PEER), "instance", "--router", ROUTER, "--listen", f"{ip}:0"]
            instances.append(Peer(argv, prefix=prefix))
        for inst in instances:
            inst.wait_for("^READY$", 15)
        yield Public(router, instances)
    finally:
        for peer in (*instances, router):
            peer.kill()


def _client(topo: Topology, case: str, listen: str, *args: str) -> Peer:
    argv = [str(NAT_PEER), "client", case, "--router", ROUTER, "--listen", f"{listen}:0", *args]
    return Peer(argv, prefix=topo.exec_in("c"))


@pytest.mark.parametrize("via", [VIA_GW1, VIA_GW2], ids=["port-restricted", "symmetric"])
def test_twenty_of_twenty_connects_through_the_router(
    topo: Topology, public: Public, via: str
) -> None:
    with _client(topo, "connects", via, "--count", "20") as c:
        res = c.result(60)
        assert c.finish(10) == 0, c.stderr
    assert res["ok"] == 20, res
    times = sorted(res["connect_s"])
    print(f"\nconnects behind {via}: median {times[10] * 1e3:.1f} ms, max {times[-1] * 1e3:.1f} ms")
    assert times[-1] < 2.5, times  # never a SYN retransmission (its timeout is 3 s)
    stats = public.stop()
    assert all(s.get("internal_errors") == [] for s in stats), stats
    relayed = sum(int(s["stats"].get("relay_requests", 0)) for s in stats)
    assert relayed >= 20


def test_nat_rebinding_mid_transfer(topo: Topology, public: Public) -> None:
    with _client(topo, "upload", VIA_GW1, "--bytes", str(10 << 20), "--pause", "1.0") as c:
        c.wait_for("^TRANSFERRING$", 20)
        topo.remasquerade("g1", "ip protocol udp masquerade to :50000-50999")  # a new port
        res = c.result(60)
        assert c.finish(10) == 0, c.stderr
    assert res["ok"], res
    stats = public.stop()
    challenges = sum(int(s["stats"].get("rebinding_challenge", 0)) for s in stats)
    assert challenges >= 1, stats


def test_idle_past_the_conntrack_timeout_then_the_server_sends_first(
    topo: Topology, public: Public
) -> None:
    for name in ("nf_conntrack_udp_timeout", "nf_conntrack_udp_timeout_stream"):
        try:
            topo.run_in("g1", "sysctl", "-qw", f"net.netfilter.{name}=2")
        except subprocess.SubprocessError:
            pytest.skip("conntrack timeouts cannot be set in this namespace")
    # The client's keepalive (3 s) is longer than the NAT's 2 s: the mapping expires
    # 2 s after each probe and the next probe comes 1 s later, so the instance's answer
    # after 5.5 s idle finds it gone (probes at 3 s and 6 s).
    with _client(topo, "late", VIA_GW1, "--wait", "5.5", "--keepalive", "3") as c:
        res = c.result(40)
        assert c.finish(10) == 0, c.stderr
    assert res["ok"] and res["error"] is None, res
    print(f"\nlate news after {res['after_s']:.2f} s (sent after 5.5 s)")
    # It arrives once the client is heard again (its next probe, at most 3 s later), and
    # the NAT's ICMP errors (no mapping) did not reset the flow.
    assert 5.5 <= res["after_s"] < 5.5 + 3.0 + 1.0, res
    stats = public.stop()
    icmp = sum(int(s["stats"].get("icmp_soft_error", 0)) for s in stats)
    print(f"ICMP errors taken as soft: {icmp}")
    assert icmp >= 1, stats


def test_migration_from_one_nat_to_the_other(topo: Topology, public: Public) -> None:
    with _client(topo, "upload", VIA_GW1, "--bytes", str(8 << 20), "--migrate-to", VIA_GW2) as c:
        res = c.result(60)
        assert c.finish(10) == 0, c.stderr
    assert res["ok"], res
    assert res["local"][0] == VIA_GW2, res
    print(f"\nmoved from behind gw1 to behind gw2 in {res['migrated_s'] * 1e3:.1f} ms")


@pytest.mark.parametrize("via", [VIA_GW1, VIA_GW2], ids=["port-restricted", "symmetric"])
def test_datagrams_through_the_router(topo: Topology, public: Public, via: str) -> None:
    with _client(topo, "datagrams", via, "--count", "100") as c:
        res = c.result(30)
        assert c.finish(10) == 0, c.stderr
    assert res["ok"] == 100, res
    # The answers name the instance (relayed by the router), not the router.
    assert all(s.split(":")[0] in INSTANCES for s in res["sources"]), res

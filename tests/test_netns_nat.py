"""Through real Linux NATs (nftables masquerade with conntrack) in network namespaces.

Topology (every address lives only inside the namespaces made here)::

    client 10.200.1.2 -- 10.200.1.1 [gw1: masquerade, port-restricted] 192.0.2.2 --.
                                                                                   public
    client 10.200.2.2 -- 10.200.2.1 [gw2: masquerade random, symmetric] 198.51.100.2 -'

    public: router 192.0.2.1:7000, instances 192.0.2.10 and 192.0.2.11 (no route back to
    10.200/16: only the NATs' translations reach the client)

The client's second address leaves through gw2 (a policy route). Linux masquerade keeps one
outside port per inside socket while the conntrack entry lives and lets in only the exact
address and port it sent to (address-and-port-dependent filtering); ``masquerade random``
picks a new port per destination (address-and-port-dependent mapping: symmetric). Needs root,
``ip`` and ``nft``; skipped otherwise. The namespaces are always deleted.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from .helpers.processes import ROOT, Peer

pytestmark = [pytest.mark.netns, pytest.mark.timeout(120)]

NAT_PEER = ROOT / "tests" / "helpers" / "nat_peer.py"
ROUTER = "192.0.2.1:7000"
INSTANCES = ("192.0.2.10", "192.0.2.11")
VIA_GW1 = "10.200.1.2"  # leaves through the port-restricted NAT
VIA_GW2 = "10.200.2.2"  # leaves through the symmetric NAT


def _run(*argv: str, stdin: str | None = None) -> str:
    out = subprocess.run(
        list(argv), input=stdin, check=True, capture_output=True, text=True, timeout=10
    )
    return out.stdout


@dataclass
class Topology:
    tag: str
    created: list[str] = field(default_factory=list)

    def ns(self, role: str) -> str:
        return f"{self.tag}{role}"

    def exec_in(self, role: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns(role)]

    def run_in(self, role: str, *argv: str, stdin: str | None = None) -> str:
        return _run(*self.exec_in(role), *argv, stdin=stdin)

    def ip(self, role: str, *args: str) -> None:
        _run("ip", "-n", self.ns(role), *args)

    def veth(self, a: str, a_dev: str, a_addrs: list[str], b: str, b_dev: str, b_addrs: list[str]):
        _run(
            "ip", "link", "add", a_dev, "netns", self.ns(a),
            "type", "veth", "peer", "name", b_dev, "netns", self.ns(b),
        )  # fmt: skip
        for role, dev, addrs in ((a, a_dev, a_addrs), (b, b_dev, b_addrs)):
            for addr in addrs:
                self.ip(role, "addr", "add", addr, "dev", dev)
            self.ip(role, "link", "set", dev, "up")

    def masquerade(self, gw: str, options: str = "") -> None:
        rules = (
            "table ip nat {\n"
            "  chain post {\n"
            "    type nat hook postrouting priority srcnat;\n"
            f'    oifname "{self.tag}{gw}o" masquerade {options}\n'
            "  }\n"
            "}\n"
        )
        self.run_in(gw, "nft", "-f", "-", stdin=rules)

    def remasquerade(self, gw: str, options: str) -> None:
        """Change the NAT's rule and forget its mappings: the next packet gets a new port."""
        self.run_in(gw, "nft", "flush", "chain", "ip", "nat", "post")
        self.run_in(
            gw, "nft", "add", "rule", "ip", "nat", "post",
            "oifname", f"{self.tag}{gw}o", *options.split(),
        )  # fmt: skip
        subprocess.run([*self.exec_in(gw), "conntrack", "-F"], capture_output=True, timeout=10)


@pytest.fixture
def topo() -> Iterator[Topology]:
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is missing")
    t = Topology(f"pn{os.getpid() % 10000}")
    try:
        try:
            for role in ("c", "g1", "g2", "p"):
                _run("ip", "netns", "add", t.ns(role))
                t.created.append(t.ns(role))
                t.ip(role, "link", "set", "lo", "up")
            tag = t.tag
            t.veth("c", f"{tag}c1", ["10.200.1.2/24"], "g1", f"{tag}g1i", ["10.200.1.1/24"])
            t.veth("c", f"{tag}c2", ["10.200.2.2/24"], "g2", f"{tag}g2i", ["10.200.2.1/24"])
            public = ["192.0.2.1/24", *(f"{ip}/24" for ip in INSTANCES)]
            t.veth("g1", f"{tag}g1o", ["192.0.2.2/24"], "p", f"{tag}p1", public)
            t.veth("g2", f"{tag}g2o", ["198.51.100.2/24"], "p", f"{tag}p2", ["198.51.100.1/24"])
            t.ip("c", "route", "add", "default", "via", "10.200.1.1")
            t.ip("c", "rule", "add", "from", VIA_GW2, "table", "200")
            t.ip("c", "route", "add", "default", "via", "10.200.2.1", "table", "200")
            t.ip("g2", "route", "add", "192.0.2.0/24", "via", "198.51.100.1")
            for gw in ("g1", "g2"):
                t.run_in(gw, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            t.masquerade("g1")
            t.masquerade("g2", "random")
        except (OSError, subprocess.SubprocessError) as exc:
            detail = getattr(exc, "stderr", "") or exc
            pytest.skip(f"cannot set up the NAT namespaces: {detail}")
        yield t
    finally:
        for name in t.created:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)


@dataclass
class Public:
    router: Peer
    instances: list[Peer]

    def stop(self) -> list[dict[str, object]]:
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
    assert times[-1] < 1.0, times  # never a retransmission timeout
    stats = public.stop()
    assert all(s.get("internal_errors") == [] for s in stats), stats
    relayed = sum(int(s["stats"].get("relay_requests", 0)) for s in stats)  # type: ignore[union-attr]
    assert relayed >= 20


def test_nat_rebinding_mid_transfer(topo: Topology, public: Public) -> None:
    with _client(topo, "upload", VIA_GW1, "--bytes", str(10 << 20), "--pause", "1.0") as c:
        c.wait_for("^TRANSFERRING$", 20)
        topo.remasquerade("g1", "ip protocol udp masquerade to :50000-50999")  # a new port
        res = c.result(60)
        assert c.finish(10) == 0, c.stderr
    assert res["ok"], res
    stats = public.stop()
    challenges = sum(int(s["stats"].get("rebinding_challenge", 0)) for s in stats)  # type: ignore[union-attr]
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
    icmp = sum(int(s["stats"].get("icmp_soft_error", 0)) for s in stats)  # type: ignore[union-attr]
    print(f"ICMP errors taken as soft: {icmp}")
    assert icmp >= 1, stats


def test_migration_from_one_nat_to_the_other(topo: Topology, public: Public) -> None:
    with _client(
        topo, "upload", VIA_GW1, "--bytes", str(8 << 20), "--migrate-to", VIA_GW2
    ) as c:
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

"""The namespaces of the NAT tests and benchmark: a client behind two Linux NATs.

Topology (every address lives only inside the namespaces made here)::

    client 10.200.1.2 -- 10.200.1.1 [gw1: masquerade, port-restricted] 192.0.2.2 --.
                                                                                   public
    client 10.200.2.2 -- 10.200.2.1 [gw2: masquerade random, symmetric] 198.51.100.2 -'

    public: 192.0.2.1 (a router), 192.0.2.10 and 192.0.2.11 (instances), 192.0.2.20 (a
    client with no NAT); no route back to 10.200/16: only the NATs' translations reach
    the client

The client's second address leaves through gw2 (a policy route). Linux masquerade keeps one
outside port per inside socket while the conntrack entry lives and lets in only the exact
address and port it sent to (address-and-port-dependent filtering); ``masquerade random``
picks a new port per destination (address-and-port-dependent mapping: symmetric). Needs root,
``ip`` and ``nft``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field

ROUTER = "192.0.2.1:7000"
INSTANCES = ("192.0.2.10", "192.0.2.11")
UNNATTED = "192.0.2.20"  # a client in the public namespace: no NAT at all
VIA_GW1 = "10.200.1.2"  # leaves through the port-restricted NAT
VIA_GW2 = "10.200.2.2"  # leaves through the symmetric NAT


class TopologyUnavailable(Exception):
    """The namespaces cannot be made here (not root, a tool missing, no permission)."""


def _run(*argv: str, stdin: str | None = None) -> str:
    out = subprocess.run(
        list(argv), input=stdin, check=True, capture_output=True, text=True, timeout=10
    )
    return out.stdout


@dataclass
class Topology:
    """The four namespaces: client ``c``, gateways ``g1`` and ``g2``, public ``p``."""

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

    def veth(
        self, a: str, a_dev: str, a_addrs: list[str], b: str, b_dev: str, b_addrs: list[str]
    ) -> None:
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


@contextlib.contextmanager
def nat_topology() -> Iterator[Topology]:
    """Make the namespaces (deleted on exit); raises TopologyUnavailable if it cannot."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        raise TopologyUnavailable("network namespaces need root")
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            raise TopologyUnavailable(f"{tool} is missing")
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
            public = ["192.0.2.1/24", *(f"{ip}/24" for ip in (*INSTANCES, UNNATTED))]
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
            raise TopologyUnavailable(f"cannot set up the NAT namespaces: {detail}") from None
        yield t
    finally:
        for name in t.created:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)

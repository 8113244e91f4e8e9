"""A client host with two veth interfaces loses one address mid-transfer; its stream moves
to the other interface by itself (RSYN) and the transfer completes intact.

Client namespace: 10.215.1.2 on link 1 and 10.215.2.2 on link 2. Server namespace: the
service address 10.215.9.1 on lo, reached over either link (link 1 preferred). Each link is
rate-limited (tbf) so the transfer lasts long enough to be cut. Needs root; skipped
otherwise.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator

import pytest

from .helpers.processes import PEER, Peer

pytestmark = [pytest.mark.netns, pytest.mark.timeout(120)]

SERVICE_IP = "10.215.9.1"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=10)


def _tc(ns: str, *args: str) -> None:
    subprocess.run(
        ["ip", "netns", "exec", ns, "tc", *args], check=True, capture_output=True, timeout=10
    )


@pytest.fixture
def two_links() -> Iterator[tuple[str, str, str]]:
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if shutil.which("ip") is None or shutil.which("tc") is None:
        pytest.skip("ip and tc (iproute2) are needed")
    tag = f"pm{os.getpid() % 10000}"
    server, client = f"{tag}s", f"{tag}c"
    created: list[str] = []
    try:
        try:
            for ns in (server, client):
                _ip("netns", "add", ns)
                created.append(ns)
                _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", server, "addr", "add", f"{SERVICE_IP}/32", "dev", "lo")
            for link in (1, 2):
                c_dev, s_dev = f"{tag}c{link}", f"{tag}s{link}"
                _ip(
                    "link", "add", c_dev, "netns", client,
                    "type", "veth", "peer", "name", s_dev, "netns", server,
                )  # fmt: skip
                _ip("-n", client, "addr", "add", f"10.215.{link}.2/24", "dev", c_dev)
                _ip("-n", server, "addr", "add", f"10.215.{link}.1/24", "dev", s_dev)
                for ns, dev in ((client, c_dev), (server, s_dev)):
                    _ip("-n", ns, "link", "set", dev, "up")
                    _tc(ns, "qdisc", "add", "dev", dev, "root", "tbf",
                        "rate", "60mbit", "burst", "64kb", "latency", "100ms")  # fmt: skip
                _ip(
                    "-n", client, "route", "add", f"{SERVICE_IP}/32",
                    "via", f"10.215.{link}.1", "dev", c_dev, "metric", str(10 * link),
                )  # fmt: skip
        except (OSError, subprocess.SubprocessError) as exc:
            detail = getattr(exc, "stderr", "") or exc
            pytest.skip(f"cannot set up network namespaces: {detail}")
        yield server, client, f"{tag}c1"
    finally:
        for ns in created:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


@pytest.mark.serial
def test_address_removed_mid_transfer_and_the_flow_moves(two_links: tuple[str, str, str]) -> None:
    server_ns, client_ns, first_dev = two_links
    config = ["--service", "bulk", "--buffer", str(2 << 20)]
    server_argv = [str(PEER), "serve", "--listen", f"{SERVICE_IP}:54325", "--mode", "digest"]
    with Peer.server([*server_argv, *config], prefix=["ip", "netns", "exec", server_ns]):
        client_argv = [
            str(PEER),
            "upload",
            *("--route", f"{SERVICE_IP}:54325"),
            *("--listen", "10.215.1.2:0,10.215.2.2:0"),
            *("--bytes", str(20_000_000), *config),
        ]
        with Peer(client_argv, prefix=["ip", "netns", "exec", client_ns]) as client:
            time.sleep(1.2)  # connected, about a third of the way through
            _ip("-n", client_ns, "addr", "del", "10.215.1.2/24", "dev", first_dev)
            res = client.result(60)
            assert client.finish(10) == 0, client.stderr
    assert res["ok"], res
    assert res["local_address"][0] == "10.215.2.2", res
    assert [a[0] for a in res["auto_removed"]] == ["10.215.1.2"], res

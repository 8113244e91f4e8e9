"""Two Serval hosts in two Linux network namespaces joined by a veth pair.

The namespaces get 10.213.0.1/24 and 10.213.0.2/24; the echo server runs in one and the
client in the other (``ip netns exec``), so the packets cross a real (virtual) link with a
1500-byte MTU instead of loopback. Needs root and ``ip``; skipped otherwise, and when the
namespaces cannot be made (a container without CAP_SYS_ADMIN). The namespaces are always
deleted (the veth pair goes with them).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from .helpers.processes import EXAMPLES, PEER, Peer

pytestmark = [pytest.mark.netns, pytest.mark.timeout(60)]

SERVER_IP = "10.213.0.1"
CLIENT_IP = "10.213.0.2"


@dataclass(frozen=True)
class Namespaces:
    server: str
    client: str

    def exec_in(self, ns: str) -> list[str]:
        return ["ip", "netns", "exec", ns]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=10)


@pytest.fixture
def namespaces() -> Iterator[Namespaces]:
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if shutil.which("ip") is None:
        pytest.skip("the ip command (iproute2) is missing")
    tag = f"psv{os.getpid() % 100000}"
    ns = Namespaces(server=f"{tag}s", client=f"{tag}c")
    created: list[str] = []
    try:
        try:
            for name in (ns.server, ns.client):
                _ip("netns", "add", name)
                created.append(name)
            _ip(
                "link", "add", f"{tag}s", "netns", ns.server,
                "type", "veth", "peer", "name", f"{tag}c", "netns", ns.client,
            )  # fmt: skip
            for name, dev, addr in (
                (ns.server, f"{tag}s", SERVER_IP),
                (ns.client, f"{tag}c", CLIENT_IP),
            ):
                _ip("-n", name, "addr", "add", f"{addr}/24", "dev", dev)
                _ip("-n", name, "link", "set", dev, "up")
                _ip("-n", name, "link", "set", "lo", "up")
        except (OSError, subprocess.SubprocessError) as exc:
            detail = getattr(exc, "stderr", "") or exc
            pytest.skip(f"cannot set up network namespaces: {detail}")
        yield ns
    finally:
        for name in created:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)


def test_echo_between_two_namespaces(namespaces: Namespaces) -> None:
    server_argv = [str(EXAMPLES / "echo_server.py"), "--listen", f"{SERVER_IP}:54325"]
    with Peer.server(server_argv, prefix=namespaces.exec_in(namespaces.server)) as server:
        assert server.address == (SERVER_IP, 54325)
        messages = ["hello", "from another namespace", "x" * 5000]
        client_argv = [
            str(EXAMPLES / "echo_client.py"),
            *("--route", f"{SERVER_IP}:54325", "--listen", f"{CLIENT_IP}:0"),
            *messages,
        ]
        with Peer(client_argv, prefix=namespaces.exec_in(namespaces.client)) as client:
            assert client.finish(20) == 0, client.stderr
            assert client.seen == messages
        server.stop()


@pytest.mark.slow
@pytest.mark.parametrize("mss", [1408, 8192])  # fits the 1500-byte MTU; IP fragments
def test_upload_between_two_namespaces_arrives_intact(namespaces: Namespaces, mss: int) -> None:
    config = ["--service", "bulk", "--mss", str(mss), "--buffer", str(2 << 20)]
    server_argv = [str(PEER), "serve", "--listen", f"{SERVER_IP}:0", "--mode", "digest", *config]
    with Peer.server(server_argv, prefix=namespaces.exec_in(namespaces.server)) as server:
        client_argv = [
            str(PEER),
            "upload",
            *("--route", server.route, "--listen", f"{CLIENT_IP}:0"),
            *("--bytes", str(10_000_000), *config),
        ]
        with Peer(client_argv, prefix=namespaces.exec_in(namespaces.client)) as client:
            res = client.result(40)
            assert client.finish(10) == 0, client.stderr
        assert res["ok"], res
        print(f"\n10 MB across the veth pair, mss {mss}: {res['mbit_per_s']} Mbit/s")
        stats = server.stop()
        assert stats is not None and stats["internal_errors"] == []

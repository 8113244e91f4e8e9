"""IPv6 across a veth pair between two network namespaces, and a move from IPv4 to IPv6.

Server namespace: 10.216.0.1/24 and fd00:216::1/64; client namespace: 10.216.0.2/24 and
fd00:216::2/64, IPv6 addresses added ``nodad`` so they are usable at once. Each end runs
``tests/helpers/ipv6_peer.py`` in its namespace. Needs root and ``ip``; skipped otherwise,
and when the namespaces or IPv6 addresses cannot be made. The namespaces are always deleted.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .helpers.processes import Peer

pytestmark = [pytest.mark.netns, pytest.mark.timeout(90)]

HELPER = str(Path(__file__).resolve().parent / "helpers" / "ipv6_peer.py")
S4, C4 = "10.216.0.1", "10.216.0.2"
S6, C6 = "fd00:216::1", "fd00:216::2"
ENABLE_IPV6 = "net.ipv6.conf.all.disable_ipv6=0"
ENABLE_IPV6 = "net.ipv6.conf.all.disable_ipv6=0"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=10)


@pytest.fixture
def dual_stack_link() -> Iterator[tuple[list[str], list[str], str]]:
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if shutil.which("ip") is None:
        pytest.skip("the ip command (iproute2) is missing")
    tag = f"p6{os.getpid() % 100000}"
    server, client = f"{tag}s", f"{tag}c"
    created: list[str] = []
    try:
        try:
            for ns in (server, client):
                _ip("netns", "add", ns)
                created.append(ns)
                subprocess.run(
                    ["ip", "netns", "exec", ns, "sysctl", "-qw", ENABLE_IPV6],
                    check=True, capture_output=True, timeout=10,
                )  # fmt: skip
                _ip("-n", ns, "link", "set", "lo", "up")
            _ip(
                "link", "add", f"{tag}s", "netns", server,
                "type", "veth", "peer", "name", f"{tag}c", "netns", client,
            )  # fmt: skip
            for ns, dev, v4, v6 in ((server, f"{tag}s", S4, S6), (client, f"{tag}c", C4, C6)):
                _ip("-n", ns, "addr", "add", f"{v4}/24", "dev", dev)
                _ip("-n", ns, "-6", "addr", "add", f"{v6}/64", "dev", dev, "nodad")
                _ip("-n", ns, "link", "set", dev, "up")
        except (OSError, subprocess.SubprocessError) as exc:
            detail = getattr(exc, "stderr", "") or exc
            pytest.skip(f"cannot set up network namespaces with IPv6: {detail}")
        yield ["ip", "netns", "exec", server], ["ip", "netns", "exec", client], f"{tag}c"
    finally:
        for ns in created:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


def _run(
    prefixes: tuple[list[str], list[str]],
    server_listen: str,
    client_args: list[str],
    while_sending: Callable[[], None] | None = None,
) -> dict[str, Any]:
    in_server, in_client = prefixes
    with Peer([HELPER, "serve", "--listen", server_listen], prefix=in_server) as server:
        server.wait_for("^READY ", 15)
        with Peer([HELPER, "upload", *client_args], prefix=in_client) as client:
            if while_sending is not None:
                client.wait_for("^SENDING", 15)
                while_sending()
            res = client.result(60)
            assert client.finish(10) == 0, client.stderr
    return res


def test_ipv6_transfer_across_a_veth_pair(
    dual_stack_link: tuple[list[str], list[str], str],
) -> None:
    res = _run(
        dual_stack_link[:2],
        f"[{S6}]:54325",
        ["--listen", f"[{C6}]:0", "--route", f"[{S6}]:54325", "--bytes", "4000000"],
    )
    assert res["ok"], res
    assert res["remote"] == [S6, 54325] and res["local"][0] == C6


def test_a_stream_moves_from_ipv4_to_ipv6_between_namespaces(
    dual_stack_link: tuple[list[str], list[str], str],
) -> None:
    res = _run(
        dual_stack_link[:2],
        f"{S4}:54325,[{S6}]:54325",
        [
            *("--listen", f"{C4}:0,[{C6}]:0"),
            *("--route", f"{S4}:54325", "--bytes", "8000000"),
            *("--move-remote", f"[{S6}]:54325"),
        ],
    )
    assert res["ok"], res
    assert res["first_local"][0] == C4, res
    assert res["local"][0] == C6 and res["remote"] == [S6, 54325], res


def test_an_ipv6_address_removed_mid_transfer_moves_the_flow_to_the_other(
    dual_stack_link: tuple[list[str], list[str], str],
) -> None:
    """The interface check finds fd00:216::2 gone; the flow moves to fd00:216::3 by itself."""
    if shutil.which("tc") is None:
        pytest.skip("tc (iproute2) is needed to slow the link down")
    in_server, in_client, client_dev = dual_stack_link
    second = "fd00:216::3"
    _ip("-n", in_client[3], "-6", "addr", "add", f"{second}/64", "dev", client_dev, "nodad")
    subprocess.run(
        [*in_client, "tc", "qdisc", "add", "dev", client_dev, "root", "tbf",
         "rate", "60mbit", "burst", "64kb", "latency", "100ms"],
        check=True, capture_output=True, timeout=10,
    )  # fmt: skip

    def cut() -> None:
        time.sleep(0.8)  # a good part of the transfer in, much of it still to go
        _ip("-n", in_client[3], "-6", "addr", "del", f"{C6}/64", "dev", client_dev)

    res = _run(
        (in_server, in_client),
        f"[{S6}]:54325",
        [
            *("--listen", f"[{C6}]:0,[{second}]:0"),
            *("--route", f"[{S6}]:54325", "--bytes", "16000000"),
        ],
        while_sending=cut,
    )
    assert res["ok"], res
    assert res["first_local"][0] == C6 and res["local"][0] == second, res
    assert [a[0] for a in res["auto_removed"]] == [C6], res

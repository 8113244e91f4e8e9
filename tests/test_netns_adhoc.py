"""Ad hoc service discovery without a router, on a shared Linux bridge.

Three namespaces hang off one bridge (10.214.0.0/24; the bridge lives in a fourth namespace
so the host's own network is never touched). Two run echo instances on the reference port
54325; the third has no router and no route: its default rule broadcasts unresolved SYNs
to 10.214.0.255:54325, the first instance to answer wins, and the loser is reset. Needs
root; skipped otherwise.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator

import pytest

from .helpers.processes import EXAMPLES, Peer, child_env

pytestmark = [pytest.mark.netns, pytest.mark.timeout(90)]

NET = "10.214.0"
HOSTS = ("a", "b", "c")  # a, b: instances; c: the client


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=10)


@pytest.fixture
def bridge() -> Iterator[dict[str, str]]:
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if shutil.which("ip") is None:
        pytest.skip("the ip command (iproute2) is missing")
    tag = f"pab{os.getpid() % 10000}"
    sw = f"{tag}sw"
    names = {h: f"{tag}{h}" for h in HOSTS}
    created: list[str] = []
    try:
        try:
            for ns in (sw, *names.values()):
                _ip("netns", "add", ns)
                created.append(ns)
            _ip("-n", sw, "link", "add", "br0", "type", "bridge")
            _ip("-n", sw, "link", "set", "br0", "up")
            for i, (h, ns) in enumerate(names.items(), start=1):
                _ip(
                    "link", "add", f"{tag}{h}0", "netns", ns,
                    "type", "veth", "peer", "name", f"p{h}", "netns", sw,
                )  # fmt: skip
                _ip("-n", sw, "link", "set", f"p{h}", "master", "br0")
                _ip("-n", sw, "link", "set", f"p{h}", "up")
                _ip("-n", ns, "addr", "add", f"{NET}.{i}/24", "brd", f"{NET}.255",
                    "dev", f"{tag}{h}0")  # fmt: skip
                _ip("-n", ns, "link", "set", f"{tag}{h}0", "up")
                _ip("-n", ns, "link", "set", "lo", "up")
        except (OSError, subprocess.SubprocessError) as exc:
            detail = getattr(exc, "stderr", "") or exc
            pytest.skip(f"cannot set up network namespaces: {detail}")
        yield names
    finally:
        for ns in created:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


def _in(ns: str) -> list[str]:
    return ["ip", "netns", "exec", ns]


def test_broadcast_syn_first_instance_wins(bridge: dict[str, str]) -> None:
    echo = ["-m", "pyserval", "echo", "--service", "adhoc", "--listen", "0.0.0.0:54325"]
    with (
        Peer([*echo, "--name", "a"], prefix=_in(bridge["a"])) as a,
        Peer([*echo, "--name", "b"], prefix=_in(bridge["b"])) as b,
    ):
        a.wait_for("serving", 15)
        b.wait_for("serving", 15)
        env = child_env(PYSERVAL_BROADCAST=f"{NET}.255:54325", PYSERVAL_LISTEN="0.0.0.0:54324")
        for attempt in range(3):
            client_argv = [str(EXAMPLES / "echo_client.py"), "--service", "adhoc", f"hi {attempt}"]
            with Peer(client_argv, env=env, prefix=_in(bridge["c"])) as client:
                assert client.finish(20) == 0, client.stderr
                assert client.seen == [f"hi {attempt}"]
        assert a.proc.poll() is None and b.proc.poll() is None

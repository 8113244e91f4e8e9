"""The command line a new user meets (issue 16): ``--version``, defaults in the help, one
clear line for user errors, ``echo --router`` warning about a silent router, ``flows``.

The commands run as real processes (``python -m pyserval``) against real loopback sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import subprocess
import sys
import time

import anyio
import pytest

import pyserval
from pyserval.cli import _COMMANDS, main
from pyserval.control import Router, enable_inspection, fetch_flows, format_flows
from pyserval.runtime.host import Host
from pyserval.runtime.streams import ServalStream

from .helpers.processes import ROOT, Peer, child_env


def _cli(*argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pyserval", *argv],
        capture_output=True,
        text=True,
        env=child_env(),
        cwd=ROOT,
        timeout=timeout,
    )


def _closed_udp_port() -> int:
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 0))
    port = int(probe.getsockname()[1])
    probe.close()
    return port


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"pyserval {pyserval.__version__}"


@pytest.mark.parametrize("command", sorted(_COMMANDS))
def test_every_option_has_help_and_shows_its_default(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    options = text.split("options:", 1)[1]
    # One entry per option: "  --name VALUE   help text (default: x)", wrapped lines indented.
    entries = [e for e in re.split(r"\n  (?=-)", "\n" + options.strip("\n")) if e.strip()]
    for entry in entries:
        flag = entry.split()[0].rstrip(",")
        if flag in ("-h", "--help"):
            continue
        words = entry.split(None, 1)
        assert len(words) == 2 and len(words[1].split()) > 1, f"{command} {flag} has no help"
    # Every option with a non-empty default says it (argparse's own table of defaults).
    import argparse

    parser = argparse.ArgumentParser()
    _COMMANDS[command][0](parser)
    for action in parser._actions:
        default = action.default
        if not action.option_strings or default in (None, False, [], "", argparse.SUPPRESS):
            continue
        flag = action.option_strings[-1]
        entry = next(e for e in entries if e.split()[0].rstrip(",") in action.option_strings)
        assert f"(default: {default})" in " ".join(entry.split()), f"{command} {flag}"


@pytest.mark.parametrize(
    "argv",
    [
        ["echo", "--listen", "127.0.0.1"],
        ["echo", "--router", "localhost:54326"],
        ["table", "--host", "1.2.3.4.5:9"],
        ["flows", "--host", "127.0.0.1:99999"],
        ["router", "--listen", "nonsense"],
    ],
)
def test_a_malformed_address_is_one_line_and_exit_2(argv: list[str]) -> None:
    done = _cli(*argv)
    assert done.returncode == 2, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0] and "Traceback" not in done.stderr, lines


@pytest.mark.parametrize("command", ["echo", "router"])
def test_a_port_in_use_is_one_line_and_exit_1(command: str) -> None:
    taken = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    taken.bind(("127.0.0.1", 0))
    try:
        where = f"127.0.0.1:{taken.getsockname()[1]}"
        done = _cli(command, "--listen", where)
    finally:
        taken.close()
    assert done.returncode == 1, done
    (line,) = done.stderr.strip().splitlines()
    assert where in line and "in use" in line


@pytest.mark.parametrize("command", ["table", "flows"])
def test_an_unreachable_router_or_host_is_one_line_and_exit_1(command: str) -> None:
    where = f"127.0.0.1:{_closed_udp_port()}"
    done = _cli(command, "--host", where, "--timeout", "0.3")
    assert done.returncode == 1, done
    (line,) = done.stderr.strip().splitlines()
    assert f"no answer from {where}" in line or f"no answer from a router at {where}" in line


def test_echo_warns_when_the_router_never_acknowledges() -> None:
    router = f"127.0.0.1:{_closed_udp_port()}"

    async def main_() -> None:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "pyserval", "echo", "--router", router,
            "--register-timeout", "0.5",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env=child_env(), cwd=ROOT,
        )  # fmt: skip
        assert proc.stdout is not None and proc.stderr is not None
        try:
            assert b"serving echo" in await asyncio.wait_for(proc.stdout.readline(), 15)
            line = (await asyncio.wait_for(proc.stderr.readline(), 10)).decode()
        finally:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 10)
        assert line.startswith("pyserval echo: warning: "), line
        assert f"the router at {router} has not acknowledged the registration of 'echo'" in line
        assert proc.returncode == 0  # a warning, not a failure: it keeps serving until stopped

    asyncio.run(main_())


def test_echo_does_not_warn_when_the_router_acknowledges() -> None:
    with Peer(["-m", "pyserval", "router", "--listen", "127.0.0.1:0"]) as router:
        line = router.wait_for("router listening on", 15)
        where = line.rsplit(" ", 1)[1]
        argv = ["-m", "pyserval", "echo", "--router", where, "--register-timeout", "0.5"]
        with Peer(argv) as echo:
            echo.wait_for("serving echo", 15)
            time.sleep(1.5)
            echo.proc.terminate()
            echo.proc.wait(10)
            echo._err.join(10)
            assert "warning" not in echo.stderr, echo.stderr


async def _echo(stream: ServalStream) -> None:
    with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
        while True:
            await stream.send(await stream.receive())


def test_flows_shows_a_live_connection_like_ss() -> None:
    payload = b"x" * 50_000

    async def main_() -> None:
        async with Host(["127.0.0.1:0"]) as server, Host(["127.0.0.1:0"]) as client:
            enable_inspection(server)
            listener = await server.listen("flows-echo")
            serving = asyncio.ensure_future(listener.serve(_echo))
            client.add_route("flows-echo", "{}:{}".format(*server.addresses[0]))
            stream = await client.connect("flows-echo", timeout=5)
            await stream.send(payload)
            got = 0
            while got < len(payload):
                got += len(await stream.receive())
            await asyncio.sleep(0.3)  # the last ACKs
            where = "{}:{}".format(*server.addresses[0])
            flows = await fetch_flows(where)
            (flow,) = flows
            assert flow.service == pyserval.ServiceID.parse("flows-echo").hex
            assert (flow.kind, flow.role, flow.state) == ("stream", "server", "established")
            assert flow.bytes_received == len(payload)
            (path,) = flow.paths
            assert path.local == where
            assert path.remote == "{}:{}".format(*client.addresses[0])
            assert path.remote_flowid == stream.local_flowid
            assert path.local_flowid == stream.remote_flowid
            assert path.bytes_acked == len(payload)  # echoed back and acknowledged
            assert path.rtt is not None and 0 < path.rtt < 1.0
            assert path.cwnd > 0 and path.retransmissions == 0
            text = format_flows(flows, {"flows-echo": "flows-echo"})
            assert "established" in text and "flows-echo" in text and "rtt:" in text
            # The command line shows the same, from another process.
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "pyserval", "flows", "--host", where, "--name", "flows-echo",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                env=child_env(), cwd=ROOT,
            )  # fmt: skip
            out, err = await asyncio.wait_for(proc.communicate(), 30)
            assert proc.returncode == 0, err
            lines = out.decode().splitlines()
            assert lines[1].split()[:4] == ["established", "stream", "server", "flows-echo"]
            assert lines[1].split()[4] == str(len(payload))
            assert f"flow {path.local_flowid:#010x}->{path.remote_flowid:#010x}" in lines[2]
            await stream.aclose()
            serving.cancel()

    asyncio.run(main_())


def test_flows_of_a_router_started_host_answers_nothing_but_the_table() -> None:
    # A router is not an inspection host for flows: the command says so in one line.
    async def main_() -> None:
        async with Router("127.0.0.1:0") as router:
            with pytest.raises(TimeoutError):
                await fetch_flows(router.address_text, timeout=0.5)

    asyncio.run(main_())


def test_flows_listing_that_shifts_between_pages_is_read_again_without_a_skip(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A connection before the page boundary closes and one after it opens while the
    listing is read: every connection open all along is listed once (without the overlap
    check, the one that moved across the boundary was skipped)."""
    from pyserval.control import flows as flows_mod
    from pyserval.control.messages import FLOWS_PAGE, FlowInfo, PathInfo

    def fake(flowid: int) -> FlowInfo:
        path = PathInfo(local="127.0.0.1:1", local_flowid=flowid, remote_flowid=1)
        return FlowInfo(
            service="ab" * 32, kind="stream", role="server", state="established", paths=[path]
        )

    listing = [fake(10 * i) for i in range(2 * FLOWS_PAGE + 10)]
    throughout = {10 * i for i in range(2 * FLOWS_PAGE + 10)} - {30}
    calls = 0

    def shifting(host: Host) -> list[FlowInfo]:
        nonlocal calls, listing
        calls += 1
        if calls == 2:
            later = 10 * (FLOWS_PAGE + 50) + 5  # sorts after the first page's end
            listing = sorted(
                [f for f in listing if f.paths[0].local_flowid != 30] + [fake(later)],
                key=lambda f: f.paths[0].local_flowid,
            )
        return listing

    monkeypatch.setattr(flows_mod, "flow_infos", shifting)

    async def main_() -> None:
        async with Host(["127.0.0.1:0"]) as host:
            enable_inspection(host)
            got = [f.paths[0].local_flowid for f in await fetch_flows(host.addresses[0])]
            assert len(got) == len(set(got))  # none twice
            assert throughout <= set(got)  # none of those open all along missing
            assert calls > 3  # read again from the start

    asyncio.run(main_())

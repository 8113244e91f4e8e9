"""Unmodified TCP programs through ``pyserval translate`` chains (curl, nginx, redis, iperf3).

Every Serval piece is a separate process started through the command line: a service router
(``pyserval router``), outbound translators (``pyserval translate --from service:NAME --to
tcp:...``) in front of the real servers, and an inbound translator (``pyserval translate
--from tcp:... --to service:NAME``) that the real clients connect to::

    curl ──tcp──> inbound ──serval (SYN via the router)──> outbound A ──tcp──> nginx A
                                                       └──> outbound B ──tcp──> nginx B

The programs are installed by ``.ci/run``; a test is skipped when its program is missing.
Every wait is bounded and every process is stopped at the end (a translator must exit 0 on
SIGTERM without a traceback).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyserval.control import fetch_table
from pyserval.naming.service_id import as_service_prefix

from .helpers.processes import Peer

pytestmark = pytest.mark.timeout(60)

STARTUP = 20.0  # seconds a child may take to print its ready line (a loaded CI machine)


def program(name: str) -> str | None:
    """Where ``name`` is installed (servers often live in sbin, not on a user's PATH)."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/local/sbin"])
    return shutil.which(name, path=path)


def needs(*names: str) -> pytest.MarkDecorator:
    missing = [n for n in names if program(n) is None]
    return pytest.mark.skipif(bool(missing), reason=f"not installed: {', '.join(missing)}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_port(port: int, timeout: float = STARTUP) -> None:
    """Until something accepts TCP connections on 127.0.0.1:``port``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise AssertionError(f"nothing listens on port {port} after {timeout} s") from None
            time.sleep(0.02)


class Cluster:
    """The processes of one test; :meth:`close` stops whichever are still running."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.peers: list[Peer] = []
        self.servers: list[subprocess.Popen[bytes]] = []

    def router(self) -> str:
        peer = Peer(["-m", "pyserval", "router", "--listen", "127.0.0.1:0"])
        self.peers.append(peer)
        line = peer.wait_for(r"^router listening on ", STARTUP)
        return line.rsplit(" ", 1)[1]

    def translate(self, source: str, target: str, router: str, *extra: str) -> Peer:
        """A ``pyserval translate`` process, ready; an inbound one's TCP port is in
        ``.address``."""
        argv = ["-m", "pyserval", "translate", "--from", source, "--to", target]
        peer = Peer([*argv, "--router", router, *extra])
        self.peers.append(peer)
        line = peer.wait_for(r"^translating ", STARTUP)
        m = re.match(r"translating tcp:([\d.]+):(\d+) -> ", line)
        if m:
            peer.address = (m[1], int(m[2]))
        return peer

    def chain(self, service: str, port: int, *extra: str) -> int:
        """Router, outbound translator to ``port``, inbound translator: its TCP port."""
        router = self.router()
        self.translate(f"service:{service}", f"tcp:127.0.0.1:{port}", router, *extra)
        wait_registered(router, service, 1)
        inbound = self.translate("tcp:127.0.0.1:0", f"service:{service}", router, *extra)
        assert inbound.address is not None
        return inbound.address[1]

    def server(self, argv: list[str], port: int) -> subprocess.Popen[bytes]:
        """A real server program, once it accepts on ``port``."""
        proc = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL
        )
        self.servers.append(proc)
        try:
            wait_port(port)
        except AssertionError:
            proc.kill()
            _, err = proc.communicate(timeout=5)
            raise AssertionError(f"{argv[0]} did not start: {err.decode()[-2000:]}") from None
        return proc

    def close(self) -> None:
        for proc in self.servers:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.servers:
            try:
                proc.communicate(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate(timeout=5)
        problems: list[str] = []
        terminated: list[Peer] = []
        for peer in reversed(self.peers):  # translators first, the router last
            if peer.proc.poll() is not None:
                continue
            peer.proc.send_signal(signal.SIGTERM)
            try:
                peer.proc.wait(5)
                terminated.append(peer)
            except subprocess.TimeoutExpired:
                problems.append(f"{peer.argv[1:5]} ignored SIGTERM for 5 s")
        for peer in self.peers:
            peer.__exit__(None, None, None)
        for peer in terminated:
            if peer.proc.returncode != 0 or "Traceback" in peer.stderr:
                problems.append(
                    f"{peer.argv[1:5]} exited {peer.proc.returncode}; stderr:\n"
                    + peer.stderr[-3000:]
                )
        assert not problems, "\n".join(problems)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    processes = Cluster(tmp_path)
    try:
        yield processes
    finally:
        processes.close()


def instances(router: str, service: str) -> dict[str, int]:
    """The router's instances of ``service``: address -> weight."""
    dump = asyncio.run(fetch_table(router))
    prefix = str(as_service_prefix(service))
    for entry in dump.entries:
        if entry.prefix == prefix:
            return {t.address: t.weight for t in entry.targets}
    return {}


def wait_registered(router: str, service: str, count: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while len(instances(router, service)) != count:
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{service}: {instances(router, service)} at the router, wanted {count}"
            )
        time.sleep(0.02)


def run(argv: list[str], timeout: float = 20.0, stdin: bytes | None = None) -> tuple[bytes, str]:
    """Run a client program; its stdout (bytes) and stderr; fail on a non-zero exit."""
    argv = [program(argv[0]) or argv[0], *argv[1:]]
    done = subprocess.run(argv, input=stdin, capture_output=True, timeout=timeout)
    err = done.stderr.decode(errors="replace")
    assert done.returncode == 0, f"{argv} exited {done.returncode}: {err[-2000:]}"
    return done.stdout, err


# -- curl -> inbound -> router -> two outbound -> two nginx ---------------------------------------


def nginx(cluster: Cluster, name: str) -> tuple[list[str], int, bytes]:
    """Config and content of one nginx instance in its own directory: (argv, port, big)."""
    root = cluster.tmp / f"nginx-{name}"
    (root / "www").mkdir(parents=True)
    (root / "www" / "whoami.txt").write_text(f"nginx {name}\n")
    big = os.urandom(1_500_000)
    (root / "www" / "big.bin").write_bytes(big)
    port = free_port()
    temps = "\n".join(
        f"  {kind}_temp_path {root}/{kind};" for kind in ("client_body", "proxy", "fastcgi")
    )
    temps += f"\n  uwsgi_temp_path {root}/uwsgi;\n  scgi_temp_path {root}/scgi;"
    (root / "nginx.conf").write_text(
        f"""daemon off;
master_process off;
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/error.log;
events {{ worker_connections 256; }}
http {{
  access_log off;
  default_type application/octet-stream;
{temps}
  server {{
    listen 127.0.0.1:{port};
    root {root}/www;
  }}
}}
"""
    )
    argv = [str(program("nginx")), "-p", str(root), "-c", str(root / "nginx.conf")]
    return [*argv, "-e", str(root / "error.log")], port, big


CURL = ["curl", "--no-progress-meter", "--max-time", "10"]


@needs("nginx", "curl")
@pytest.mark.slow
def test_curl_through_a_chain_to_two_nginx_spreads_and_fails_over(cluster: Cluster) -> None:
    servers = {name: nginx(cluster, name) for name in "AB"}
    procs = {name: cluster.server(argv, port) for name, (argv, port, _) in servers.items()}
    router = cluster.router()
    for _, port, _ in servers.values():
        # --probe-interval: how soon a stopped nginx's translator notices it is back.
        extra = ["--probe-interval", "0.2"]
        cluster.translate("service:web", f"tcp:127.0.0.1:{port}", router, *extra)
    wait_registered(router, "web", 2)
    inbound = cluster.translate("tcp:127.0.0.1:0", "service:web", router)
    assert inbound.address is not None
    base = f"http://127.0.0.1:{inbound.address[1]}"

    # Responses are correct (1.5 MB, byte-exact) and requests spread over both instances.
    for name in servers:
        body, _ = run([*CURL, f"{base}/big.bin"])
        assert hashlib.sha256(body).digest() in {
            hashlib.sha256(b[2]).digest() for b in servers.values()
        }, name
    seen: Counter[str] = Counter()
    for _ in range(24):
        body, _ = run([*CURL, f"{base}/whoami.txt"])
        seen[body.decode().strip()] += 1
    print(f"\n24 requests through the chain: {dict(seen)}")
    assert set(seen) == {"nginx A", "nginx B"}, seen

    # nginx B stops. A request that reaches its translator is reset at once (the TCP connect
    # is refused) and that translator stops listening, so the router drops it: curl's retry
    # (or the next request) goes to A.
    procs["B"].terminate()
    procs["B"].wait(5)
    start = time.monotonic()
    after: Counter[str] = Counter()
    retries = 0
    retry = ["--retry", "3", "--retry-all-errors", "--retry-delay", "1"]
    for _ in range(24):
        body, err = run([*CURL, *retry, f"{base}/whoami.txt"])
        after[body.decode().strip()] += 1
        retries += err.count("Will retry")
    took = time.monotonic() - start
    print(f"with nginx B stopped: {dict(after)} in {took:.1f} s, {retries} curl retries")
    assert after == {"nginx A": 24}, after
    assert retries <= 1, retries  # only a request racing the withdrawal is retried
    wait_registered(router, "web", 1)

    # nginx B comes back: its translator notices and registers again.
    procs["B"] = cluster.server(servers["B"][0], servers["B"][1])
    wait_registered(router, "web", 2)
    back: Counter[str] = Counter()
    for _ in range(24):
        body, _ = run([*CURL, f"{base}/whoami.txt"])
        back[body.decode().strip()] += 1
    print(f"nginx B restarted: {dict(back)}")
    assert set(back) == {"nginx A", "nginx B"}, back


# -- redis --------------------------------------------------------------------------------------


def redis(cluster: Cluster) -> int:
    port = free_port()
    argv = [str(program("redis-server")), "--port", str(port), "--bind", "127.0.0.1"]
    argv += ["--save", "", "--appendonly", "no", "--dir", str(cluster.tmp)]
    cluster.server(argv, port)
    return port


@needs("redis-server", "redis-cli", "redis-benchmark")
def test_redis_cli_and_pipelined_benchmark_through_a_chain(cluster: Cluster) -> None:
    port = cluster.chain("redis", redis(cluster))
    cli = ["redis-cli", "-h", "127.0.0.1", "-p", str(port)]
    assert run([*cli, "PING"])[0] == b"PONG\n"
    assert run([*cli, "SET", "greeting", "hello serval"])[0] == b"OK\n"
    assert run([*cli, "GET", "greeting"])[0] == b"hello serval\n"
    value = os.urandom(600_000).hex().encode()  # 1.2 MB, both ways in one command each
    assert run([*cli, "-x", "SET", "big"], stdin=value)[0] == b"OK\n"
    assert run([*cli, "--no-raw", "STRLEN", "big"])[0] == b"(integer) %d\n" % len(value)
    assert run([*cli, "GET", "big"])[0] == value + b"\n"

    # Pipelining: 16 commands in flight per connection, 4 connections, every one counted.
    bench = ["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-n", "2000", "-P", "16"]
    out, _ = run([*bench, "-c", "4", "-t", "set,get,incr,lpush", "--csv"], timeout=40)
    rows = [line.split(",") for line in out.decode().splitlines() if line.strip()]
    rates = {
        row[0].strip('"'): float(row[1].strip('"'))
        for row in rows
        if row[0].strip('"') != "test"  # the header line (redis 7)
    }
    print(f"\nredis-benchmark -n 2000 -P 16 -c 4 through the chain (requests/s): {rates}")
    assert set(rates) >= {"SET", "GET", "INCR", "LPUSH"}, out
    assert all(r > 0 for r in rates.values())
    assert run([*cli, "GET", "counter:__rand_int__"])[0] == b"2000\n"
    assert run([*cli, "LLEN", "mylist"])[0] == b"2000\n"


# -- iperf3 -------------------------------------------------------------------------------------


@needs("iperf3")
@pytest.mark.slow
def test_iperf3_through_a_chain(cluster: Cluster) -> None:
    server_port = free_port()
    cluster.server(
        [str(program("iperf3")), "-s", "-B", "127.0.0.1", "-p", str(server_port)], server_port
    )
    port = cluster.chain("iperf", server_port, "--mss", "8192")
    results = {}
    for label, flags in (("client -> server", []), ("server -> client (-R)", ["-R"])):
        argv = ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", "2", "-J", *flags]
        out, _ = run(argv, timeout=30)
        report = json.loads(out)
        assert "error" not in report, report.get("error")
        received = report["end"]["sum_received"]
        assert received["bytes"] > 0
        results[label] = received["bits_per_second"] / 1e6
    print(
        "\niperf3 through tcp -> translator -> serval (mss 8192) -> translator -> tcp: "
        + ", ".join(f"{k} {v:.0f} Mbit/s" for k, v in results.items())
    )


# -- a client that half-closes ------------------------------------------------------------------


def test_a_half_closing_client_gets_the_full_reply_through_a_chain(cluster: Cluster) -> None:
    """The server answers only after the client's FIN: the FIN must cross both translators,
    and the reply (larger than every buffer on the way) must come back whole after it."""
    request = os.urandom(2_000_000)
    reply_size = 3_000_000

    async def main() -> tuple[bytes, bytes]:
        async def server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            got = hashlib.sha256()
            while chunk := await reader.read(1 << 16):
                got.update(chunk)
            reply = got.digest() * (reply_size // 32)
            writer.write(reply)
            await writer.drain()
            writer.close()

        srv = await asyncio.start_server(server, "127.0.0.1", 0)
        async with srv:
            port = await asyncio.to_thread(
                cluster.chain, "halfclose", srv.sockets[0].getsockname()[1]
            )

            def client() -> bytes:
                with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
                    sock.sendall(request)
                    sock.shutdown(socket.SHUT_WR)
                    out = bytearray()
                    while chunk := sock.recv(1 << 16):
                        out += chunk
                    return bytes(out)

            reply = await asyncio.to_thread(client)
            return reply, hashlib.sha256(request).digest()

    reply, digest = asyncio.run(main())
    assert len(reply) == reply_size // 32 * 32
    assert reply == digest * (reply_size // 32)

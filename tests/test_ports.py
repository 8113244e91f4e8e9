"""Real asyncio programs ported to Serval (``examples/ports/``), run against real servers.

Each program has two files: ``NAME_tcp.py`` (the library's plain-TCP usage) and
``NAME_serval.py`` (the port). The test runs the Serval one as a child process, its Serval
host configured from the environment (``PYSERVAL_ROUTER``), with the service behind a
``pyserval router`` process: redis-server and memcached behind ``pyserval translate``
processes, the Python servers (websockets, asyncssh, aiohttp) as ``NAME_serval.py serve``
processes. What the program printed is checked against an independent expectation (the
server's own state read over plain TCP, SHA-256 of what was sent), and the number of changed
lines is measured on the two files.

A test is skipped when its library (the ``ports`` extra) or server program is missing.
"""

from __future__ import annotations

import ast
import difflib
import hashlib
import importlib.util
import json
import os
import re
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .helpers.processes import ROOT, Peer, child_env
from .test_translator_programs import Cluster, free_port, needs, program, wait_registered

pytestmark = pytest.mark.timeout(120)

PORTS = ROOT / "examples" / "ports"
STARTUP = 20.0


def library(name: str) -> pytest.MarkDecorator:
    missing = importlib.util.find_spec(name) is None
    return pytest.mark.skipif(missing, reason=f"python package not installed: {name}")


def code_lines(path: Path) -> list[str]:
    """The non-blank lines of a program without its module docstring and comments."""
    source = path.read_text()
    tree = ast.parse(source)
    lines = source.splitlines()
    first = tree.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
        assert first.end_lineno is not None
        lines = lines[first.end_lineno :]
    return [ln for ln in lines if ln.strip() and not ln.strip().startswith("#")]


def lines_changed(name: str) -> int:
    """Lines added or changed from ``NAME_tcp.py`` to ``NAME_serval.py`` (code only)."""
    tcp, serval = code_lines(PORTS / f"{name}_tcp.py"), code_lines(PORTS / f"{name}_serval.py")
    return sum(1 for ln in difflib.ndiff(tcp, serval) if ln.startswith("+ "))


class Ports(Cluster):
    """The processes of one test: router, translators, servers, the program."""

    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp)
        self.python_servers: list[Peer] = []

    def close(self) -> None:
        for peer in self.python_servers:  # example servers: no SIGTERM handler of their own
            peer.kill()
            peer.__exit__(None, None, None)
        super().close()

    def program(self, argv: list[str], router: str, **env: str) -> Peer:
        env = {"PYSERVAL_ROUTER": router, "PYSERVAL_LISTEN": "127.0.0.1:0", **env}
        peer = Peer(argv, env=child_env(**env))
        self.peers.append(peer)
        return peer

    def serve(self, script: str, service: str, router: str, *extra: str) -> Peer:
        """A ``NAME_serval.py serve`` process, once it registered ``service``."""
        peer = self.program([str(PORTS / script), "serve", *extra], router)
        self.peers.remove(peer)
        self.python_servers.append(peer)
        peer.wait_for(r"^serving ", STARTUP)
        wait_registered(router, service, 1)
        return peer


@pytest.fixture
def ports(tmp_path: Path) -> Iterator[Ports]:
    processes = Ports(tmp_path)
    try:
        yield processes
    finally:
        processes.close()


def result(peer: Peer, timeout: float) -> dict[str, Any]:
    """The program's JSON line, once it exited 0."""
    line = peer.wait_for(r"^\{", timeout)
    assert peer.finish(timeout) == 0, peer.stderr[-3000:]
    data: dict[str, Any] = json.loads(line)
    return data


# -- redis ------------------------------------------------------------------------------------


def redis_server(ports: Ports) -> int:
    port = free_port()
    argv = [str(program("redis-server")), "--port", str(port), "--bind", "127.0.0.1"]
    argv += ["--save", "", "--appendonly", "no", "--dir", str(ports.tmp)]
    ports.server(argv, port)
    return port


@needs("redis-server")
@library("redis")
def test_redis_py_zero_line_keys_pipeline_pubsub(ports: Ports) -> None:
    import redis

    port = redis_server(ports)
    router = ports.router()
    ports.translate("service:redis", f"tcp:127.0.0.1:{port}", router)
    wait_registered(router, "redis", 1)
    peer = ports.program([str(PORTS / "redis_serval.py"), "redis.serval", "6379", "10000"], router)
    got = result(peer, 90)
    assert got["right"] == 10_000
    assert got["pipeline"] == ["0", "1", "42", "3", "[b'a', b'b', b'c']"]
    assert got["heard"] == ["item 0", "item 1", "item 2"]
    # The keys are really in redis-server, read over plain TCP past Serval.
    direct = redis.Redis(host="127.0.0.1", port=port)
    assert direct.dbsize() == 10_000 + 2  # the keys, "counter" and "list"
    assert direct.get("key:9999") == b"value:9999"
    assert direct.mget([f"key:{i}" for i in range(0, 10_000, 997)]) == [
        f"value:{i}".encode() for i in range(0, 10_000, 997)
    ]
    direct.close()
    assert lines_changed("redis") == 3


# -- aiomcache ----------------------------------------------------------------------------------


def memcached(ports: Ports) -> int:
    port = free_port()
    ports.server(
        [str(program("memcached")), "-l", "127.0.0.1", "-p", str(port), "-U", "0", "-u", "nobody"],
        port,
    )
    return port


def memcached_get(port: int, keys: list[str]) -> dict[str, str]:
    """``get`` over plain TCP, in memcached's text protocol: past Serval entirely."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(f"get {' '.join(keys)}\r\n".encode())
        reply = b""
        while not reply.endswith(b"END\r\n"):
            chunk = sock.recv(65536)
            assert chunk, reply
            reply += chunk
    found = re.findall(rb"VALUE (\S+) \d+ \d+\r\n(.*?)\r\n", reply)
    return {k.decode(): v.decode() for k, v in found}


@needs("memcached")
@library("aiomcache")
def test_aiomcache_zero_line_set_get_and_multi_get(ports: Ports) -> None:
    port = memcached(ports)
    router = ports.router()
    ports.translate("service:memcached", f"tcp:127.0.0.1:{port}", router)
    wait_registered(router, "memcached", 1)
    argv = [str(PORTS / "aiomcache_serval.py"), "memcached.serval", "11211", "1000"]
    got = result(ports.program(argv, router), 60)
    assert got["right"] == 1000
    assert got["multi_get"] == [f"value:{i}" for i in range(0, 1000, 20)] + [None]
    assert memcached_get(port, ["key:0", "key:999", "missing"]) == {
        "key:0": "value:0",
        "key:999": "value:999",
    }
    assert lines_changed("aiomcache") == 3


# -- websockets ---------------------------------------------------------------------------------


@library("websockets")
def test_websockets_zero_line_echo_1mb_and_close_codes(ports: Ports) -> None:
    router = ports.router()
    server = ports.serve("websockets_serval.py", "echo", router)
    got = result(ports.program([str(PORTS / "websockets_serval.py")], router), 60)
    assert got["text"] == "hello"
    assert got["echo_sha256"] == got["sent_sha256"]  # 1 MB out and back, byte-exact
    assert (got["close_code"], got["close_reason"]) == (4001, "asked to")
    # The server saw the first connection closed normally by the client, the second by itself.
    assert server.wait_for(r"^closed ", 10) == "closed 1000"
    assert server.wait_for(r"^closed ", 10) == "closed 4001"
    assert lines_changed("websockets") == 4


# -- aiohttp ------------------------------------------------------------------------------------


def served_content(size: int) -> bytes:
    """What ``GET /data?size=N`` of the aiohttp example serves: SHA-256(str(i)) repeated to
    fill each 64 KiB block i, cut at ``size``."""
    blocks = (hashlib.sha256(str(i).encode()).digest() * 2048 for i in range(size // 65536 + 1))
    return b"".join(blocks)[:size]


@library("aiohttp")
def test_aiohttp_server_zero_line_client_connector_streamed_bodies(ports: Ports) -> None:
    router = ports.router()
    ports.serve("aiohttp_serval.py", "web", router)
    size = 3_000_000 + 17  # not a whole number of blocks
    peer = ports.program([str(PORTS / "aiohttp_serval.py"), "web.serval", "80", str(size)], router)
    got = result(peer, 60)
    expected = hashlib.sha256(served_content(size)).hexdigest()
    assert (got["get_sha256"], got["get_bytes"]) == (expected, size)
    assert got["post"] == {"sha256": expected, "bytes": size}
    assert lines_changed("aiohttp") == 9


# -- asyncssh -----------------------------------------------------------------------------------


def ssh_keys(directory: Path) -> Path:
    """Host and client key pairs, made for this test."""
    import asyncssh

    directory.mkdir()
    for name in ("host_key", "client_key"):
        key = asyncssh.generate_private_key("ssh-ed25519")
        key.write_private_key(str(directory / name))
        key.write_public_key(str(directory / f"{name}.pub"))
    return directory


@library("asyncssh")
def test_asyncssh_zero_line_command_and_sftp_checked_by_sha256(ports: Ports) -> None:
    keys = ssh_keys(ports.tmp / "keys")
    payload = os.urandom(2_000_000)
    file = ports.tmp / "payload.bin"
    file.write_bytes(payload)
    router = ports.router()
    ports.serve("asyncssh_serval.py", "ssh", router, str(keys))
    peer = ports.program([str(PORTS / "asyncssh_serval.py"), str(keys), str(file)], router)
    got = result(peer, 60)
    assert got["output"] == "ran hello world as serval\n"
    sha = hashlib.sha256(payload).hexdigest()
    assert got["sent_sha256"] == got["back_sha256"] == sha
    # The copy the server wrote into its SFTP root is the file, byte for byte.
    assert hashlib.sha256((keys / "root" / "copy.bin").read_bytes()).hexdigest() == sha
    assert lines_changed("asyncssh") == 5


# -- python -m pyserval.launch: the plain-TCP programs themselves, unchanged ---------------------


@needs("redis-server")
@library("redis")
@library("websockets")
def test_launch_runs_the_unchanged_tcp_programs_on_serval(ports: Ports) -> None:
    port = redis_server(ports)
    router = ports.router()
    ports.translate("service:redis", f"tcp:127.0.0.1:{port}", router)
    wait_registered(router, "redis", 1)
    launch = ["-m", "pyserval.launch"]
    argv = [*launch, str(PORTS / "redis_tcp.py"), "redis.serval", "6379", "1000"]
    got = result(ports.program(argv, router), 60)
    assert got["right"] == 1000 and got["heard"] == ["item 0", "item 1", "item 2"]
    server = ports.program(
        [*launch, str(PORTS / "websockets_tcp.py"), "serve", "echo.serval"], router
    )
    ports.peers.remove(server)
    ports.python_servers.append(server)
    server.wait_for(r"^serving ", STARTUP)
    wait_registered(router, "echo", 1)
    got = result(
        ports.program([*launch, str(PORTS / "websockets_tcp.py"), "echo.serval"], router), 60
    )
    assert got["echo_sha256"] == got["sent_sha256"] and got["close_code"] == 4001
    assert server.wait_for(r"^closed ", 10) == "closed 1000"


# -- two replicas behind the router, one SIGKILLed mid-run ---------------------------------------


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.05)


@needs("redis-server")
@library("redis")
@pytest.mark.slow
def test_redis_py_rides_out_a_sigkilled_translator_replica(ports: Ports) -> None:
    import redis

    port = redis_server(ports)
    router = ports.router()
    # Two outbound translators (the replicas) in front of one redis-server.
    a, b = (
        ports.translate("service:redis", f"tcp:127.0.0.1:{port}", router, "--log-level", "INFO")
        for _ in "AB"
    )
    wait_registered(router, "redis", 2)
    peer = ports.program([str(PORTS / "redis_serval.py"), "redis.serval", "6379", "10000"], router)
    direct = redis.Redis(host="127.0.0.1", port=port)
    wait_until(lambda: int(direct.dbsize()) >= 2000, 60, "2,000 keys written")
    b.kill()  # SIGKILL, mid-run: its flows go silent, its UDP port answers ICMP unreachable
    b.__exit__(None, None, None)
    got = result(peer, 90)
    # What the program sees: nothing. redis-py's own retry (on ConnectionError) opens a new
    # connection, which the router sends to the replica left; every key is right.
    assert got["right"] == 10_000
    assert got["pipeline"] == ["0", "1", "42", "3", "[b'a', b'b', b'c']"]
    assert got["heard"] == ["item 0", "item 1", "item 2"]
    assert int(direct.dbsize()) == 10_000 + 2
    direct.close()
    wait_registered(router, "redis", 1)
    a.proc.terminate()
    a.__exit__(None, None, None)
    opened = {name: len(re.findall(r"#\d+ open:", t.stderr)) for name, t in (("A", a), ("B", b))}
    print(f"\nredis connections opened through each translator replica: {opened}")
    assert opened["B"] > 0  # the victim carried connections before it was killed
    assert opened["A"] > 0


def cpu_ticks(peer: Peer) -> int:
    """User plus system CPU time of a child so far (clock ticks, from /proc)."""
    fields = Path(f"/proc/{peer.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def busy_replica(replicas: dict[str, Peer], timeout: float) -> str:
    """The replica serving the transfer now: the one whose CPU time grows fastest."""
    before = {name: cpu_ticks(p) for name, p in replicas.items()}
    deadline = time.monotonic() + timeout
    while True:
        time.sleep(0.3)
        grown = {name: cpu_ticks(p) - before[name] for name, p in replicas.items()}
        name = max(grown, key=lambda n: grown[n])
        if grown[name] >= 10 or time.monotonic() > deadline:  # 0.1 s of CPU: it is moving data
            return name


PROGRAM_ERROR = re.compile(r"^(\w+(?:\.\w+)*(?:Error|Exception|Lost|Disconnected)\w*)", re.M)


@pytest.mark.slow
@pytest.mark.serial  # timeouts of real programs under a replica's death: load-sensitive
@pytest.mark.parametrize(
    "program_name",
    [
        # Flaky in a fresh-clone CI run: the aiohttp client sometimes exits 0 (its transfer
        # was not on the replica killed), sometimes outlasts its wait. Open in issue 18.
        pytest.param("aiohttp", marks=pytest.mark.xfail(strict=False, reason="flaky: #18")),
        "asyncssh",
        "websockets",
        "aiomcache",
    ],
)
def test_a_replica_sigkilled_mid_transfer(ports: Ports, program_name: str) -> None:
    """Two server replicas (for aiomcache: two outbound translators to one memcached); the
    one carrying the program's traffic is SIGKILLed in the middle. The program sees its
    library's own connection-lost error (no hang); run again, it is served by the replica
    left."""
    pytest.importorskip(program_name)
    router = ports.router()
    script = f"{program_name}_serval.py"
    service = {"aiohttp": "web", "asyncssh": "ssh", "websockets": "echo"}.get(
        program_name, "memcached"
    )
    size = 40_000_000
    serve_extra: list[str] = []
    if program_name == "aiohttp":
        client = [str(PORTS / script), "web.serval", "80", str(size)]
    elif program_name == "websockets":
        client = [str(PORTS / script), "echo.serval", "80", "60"]  # 60 messages of 1 MB
    elif program_name == "aiomcache":
        if program("memcached") is None:
            pytest.skip("not installed: memcached")
        client = [str(PORTS / script), "memcached.serval", "11211", "15000"]
    else:
        keys = ssh_keys(ports.tmp / "keys")
        serve_extra = [str(keys)]
        big = ports.tmp / "big.bin"
        big.write_bytes(os.urandom(size))  # the upload (put) is under way at the kill
        client = [str(PORTS / script), str(keys), str(big)]
    replicas = {}
    memcached_port = memcached(ports) if program_name == "aiomcache" else 0
    for name in "AB":
        if program_name == "aiomcache":
            target = f"tcp:127.0.0.1:{memcached_port}"
            replicas[name] = ports.translate("service:memcached", target, router)
            continue
        peer = ports.program([str(PORTS / script), "serve", *serve_extra], router)
        ports.peers.remove(peer)
        ports.python_servers.append(peer)
        peer.wait_for(r"^serving ", STARTUP)
        replicas[name] = peer
    wait_registered(router, service, 2)
    first = ports.program(client, router)
    victim = busy_replica(replicas, 20)
    replicas[victim].kill()
    first_rc = first.finish(90)
    seen = PROGRAM_ERROR.findall(first.stderr)
    print(
        f"\n{program_name}: replica {victim} killed mid-transfer; the program exited "
        f"{first_rc}, last error {seen[-1] if seen else None}"
    )
    assert first_rc != 0 and seen, first.stderr[-2000:]
    wait_registered(router, service, 1)
    again = result(ports.program(client, router), 60)
    if program_name == "aiohttp":
        assert again["get_bytes"] == size and again["post"]["bytes"] == size
    elif program_name == "websockets":
        assert again["echo_sha256"] == again["sent_sha256"]
    elif program_name == "aiomcache":
        assert again["right"] == 15000
    else:
        assert again["sent_sha256"] == again["back_sha256"]


def test_lines_changed_counts_code_not_docstrings(tmp_path: Path) -> None:
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text('"""Doc\none."""\n\nimport x\n\n# note\nx.run("h")\n')
    b.write_text('"""Doc\nchanged a lot."""\n\nimport x\nimport y\n\n# other\nx.run("s")\n')
    assert code_lines(b) == ["import x", "import y", 'x.run("s")']
    assert sum(1 for ln in difflib.ndiff(code_lines(a), code_lines(b)) if ln[:2] == "+ ") == 2

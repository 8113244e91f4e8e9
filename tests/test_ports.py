"""Real asyncio programs ported to Serval (``examples/ports/``), run against real servers.

Each program has two files: ``NAME_tcp.py`` (the library's plain-TCP usage) and
``NAME_serval.py`` (the port). The test runs the Serval one as a child process, its Serval
host configured from the environment (``PYSERVAL_ROUTER``), with the service behind a
``pyserval router`` process: redis-server and memcached behind ``pyserval translate``
processes, the Python servers (websockets, asyncssh, aiohttp) as ``NAME_serval.py serve``
processes. What the program printed is checked against an independent expectation (the
server's own state read over plain TCP, SHA-256 of what was sent), and the number of changed
lines is measured on the two files.

In the replica-SIGKILL tests each Python server replica runs through
``tests/helpers/port_replica.py`` (the example unchanged, its library's send path wrapped) and
says what it carries; the replica killed is the one that said so, mid-way through a transfer
too long to end first.

A test is skipped when its library (the ``ports`` extra) or server program is missing.
"""

from __future__ import annotations

import ast
import difflib
import hashlib
import importlib.util
import json
import os
import queue
import re
import shutil
import signal
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
REPLICA = ROOT / "tests" / "helpers" / "port_replica.py"
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


class StderrPeer(Peer):
    """A :class:`Peer` whose stderr lines a test can wait for too (a translator logs there)."""

    def __init__(self, argv: list[str], **kw: Any) -> None:
        self.err_lines: queue.Queue[str | None] = queue.Queue()
        self.err_seen: list[str] = []
        super().__init__(argv, **kw)

    def _pump_err(self) -> None:
        assert self.proc.stderr is not None
        lines = []
        for line in self.proc.stderr:
            lines.append(line)
            self.err_lines.put(line.rstrip("\n"))
        self.err_lines.put(None)
        self.stderr = "".join(lines)

    def logged_so_far(self) -> list[str]:
        """The stderr lines up to now, without waiting."""
        while True:
            try:
                line = self.err_lines.get_nowait()
            except queue.Empty:
                return list(self.err_seen)
            if line is not None:
                self.err_seen.append(line)


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

    def translator(self, service: str, target: str, router: str) -> StderrPeer:
        """An outbound ``pyserval translate`` whose connection log (stderr, INFO: a line
        per connection opened and closed) the test reads as it comes."""
        argv = ["-m", "pyserval", "translate", "--from", f"service:{service}", "--to", target]
        peer = StderrPeer([*argv, "--router", router, "--log-level", "INFO"])
        self.peers.append(peer)
        peer.wait_for(r"^translating ", STARTUP)
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
    a, b = (ports.translator("redis", f"tcp:127.0.0.1:{port}", router) for _ in "AB")
    wait_registered(router, "redis", 2)
    peer = ports.program([str(PORTS / "redis_serval.py"), "redis.serval", "6379", "10000"], router)
    direct = redis.Redis(host="127.0.0.1", port=port)
    wait_until(lambda: int(direct.dbsize()) >= 2000, 60, "2,000 keys written")
    b.kill()  # SIGKILL, mid-run: its flows go silent, its UDP port answers ICMP unreachable
    assert peer.proc.poll() is None, peer.stderr[-2000:]  # the program was still running
    b.finish(10)
    # B's own log, complete now: it had opened connections for the program and closed none,
    # so it carried live ones when it was killed (redis-py keeps its 16 busy throughout).
    assert re.search(r"#\d+ open: ", b.stderr), b.stderr[-2000:]
    assert " close after " not in b.stderr
    got = result(peer, 90)
    # What the program sees: nothing. redis-py's own retry (on ConnectionError) opens a new
    # connection, which the router sends to the replica left; every key is right.
    assert got["right"] == 10_000
    assert got["pipeline"] == ["0", "1", "42", "3", "[b'a', b'b', b'c']"]
    assert got["heard"] == ["item 0", "item 1", "item 2"]
    assert int(direct.dbsize()) == 10_000 + 2
    direct.close()
    wait_registered(router, "redis", 1, timeout=30)
    a.proc.terminate()
    assert a.finish(10) == 0
    opened = {name: len(re.findall(r"#\d+ open:", t.stderr)) for name, t in (("A", a), ("B", b))}
    print(f"\nredis connections opened through each translator replica: {opened}")
    assert opened["A"] > 0


def first_to_say(
    replicas: dict[str, Peer], pattern: str, timeout: float, *, stderr: bool = False
) -> str:
    """The name of the replica that printed a line matching ``pattern`` first (each replica's
    lines as its own process wrote them, through its pipe)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, peer in replicas.items():
            lines = peer.err_lines if isinstance(peer, StderrPeer) and stderr else peer.lines
            try:
                line = lines.get(timeout=0.02)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(f"replica {name} exited: {peer.stderr[-2000:]}")
            seen = peer.err_seen if isinstance(peer, StderrPeer) and stderr else peer.seen
            seen.append(line)
            if re.search(pattern, line):
                return name
    raise AssertionError(f"no replica said {pattern!r} within {timeout} s")


def said_so_far(peer: Peer) -> list[str]:
    """The stdout lines of a running ``peer`` up to now, without waiting."""
    while True:
        try:
            line = peer.lines.get_nowait()
        except queue.Empty:
            return list(peer.seen)
        if line is not None:
            peer.seen.append(line)


# The last exception a program's traceback names: the one it saw (a chained traceback ends
# with the outermost). Builtins have no module prefix.
FINAL_ERROR = re.compile(r"^((?:\w+\.)*\w*(?:Error|Exception|Lost|Closed)\w*)(?::|$)", re.M)

# Far more than any run here waits for: the first program's transfer is under way when its
# replica is killed, however slow the machine (the replica's own line says how far it got).
ENDLESS = 10**11
BIG_UPLOAD = 2**30  # asyncssh's upload: a real file


def memcached_items(port: int) -> int:
    """``curr_items`` of memcached, asked over plain TCP."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"stats\r\n")
        reply = b""
        while not reply.endswith(b"END\r\n"):
            chunk = sock.recv(65536)
            assert chunk, reply
            reply += chunk
    found = re.search(rb"STAT curr_items (\d+)", reply)
    assert found is not None, reply
    return int(found[1])


@pytest.mark.slow
@pytest.mark.serial  # the library timeouts of real programs under a replica's death
@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("program_name", "seen"),
    [
        ("aiohttp", "aiohttp.client_exceptions.SocketTimeoutError"),  # sock_read, mid-body
        ("asyncssh", "asyncssh.misc.ConnectionLost"),  # keepalive unanswered
        ("websockets", "websockets.exceptions.ConnectionClosedError"),  # ping unanswered
        ("aiomcache", "TimeoutError"),  # the program's own asyncio.timeout per command
    ],
)
def test_a_replica_sigkilled_mid_transfer(ports: Ports, program_name: str, seen: str) -> None:
    """Two server replicas (for aiomcache: two outbound translators to one memcached); the
    one carrying the program's transfer, by its own report, is SIGKILLed in the middle of
    it. The program sees its library's own error (no hang); run again, it is served by the
    replica left, every byte checked.

    The first run's transfer is endless (``ENDLESS`` bytes, keys or messages), so it is still
    under way at the kill whatever the load; the replicas report from their own processes
    what they carry (``tests/helpers/port_replica.py``; a translator's connection log)."""
    pytest.importorskip(program_name)
    if program_name == "aiomcache" and program("memcached") is None:
        pytest.skip("not installed: memcached")
    router = ports.router()
    script = str(PORTS / f"{program_name}_serval.py")
    service = {"aiohttp": "web", "asyncssh": "ssh", "websockets": "echo"}.get(
        program_name, "memcached"
    )
    replicas: dict[str, Peer] = {}
    memcached_port = memcached(ports) if program_name == "aiomcache" else 0
    keys: dict[str, Path] = {}
    if program_name == "asyncssh":
        made = ssh_keys(ports.tmp / "keys")
        for name in "AB":  # one key directory each: each replica its own SFTP root
            keys[name] = ports.tmp / f"keys-{name}"
            shutil.copytree(made, keys[name])
    for name in "AB":
        if program_name == "aiomcache":
            target = f"tcp:127.0.0.1:{memcached_port}"
            peer: Peer = ports.translator("memcached", target, router)
        else:
            extra = [str(keys[name])] if keys else []
            env = child_env(PYSERVAL_ROUTER=router, PYSERVAL_LISTEN="127.0.0.1:0")
            peer = Peer([str(REPLICA), program_name, "serve", *extra], env=env)
            ports.python_servers.append(peer)
            peer.wait_for(r"^serving ", STARTUP)
        replicas[name] = peer
    wait_registered(router, service, 2, timeout=30)

    # -- the first run, endless, and the kill of the replica carrying it --------------------
    if program_name == "aiohttp":
        first_argv = [script, "web.serval", "80", str(ENDLESS)]
    elif program_name == "websockets":
        first_argv = [script, "echo.serval", "80", str(ENDLESS)]  # 1 MB messages
    elif program_name == "aiomcache":
        first_argv = [script, "memcached.serval", "11211", str(ENDLESS)]
    else:
        # Not sparse (asyncssh copies only a sparse file's data) and not endless: 1 GiB,
        # half a minute of upload here against milliseconds to react to the replica's line.
        big = ports.tmp / "big.bin"
        block = os.urandom(2**20)
        with big.open("wb") as f:
            for _ in range(BIG_UPLOAD // len(block)):
                f.write(block)
        first_argv = [script, str(keys["A"]), str(big)]
    first = ports.program(first_argv, router)
    if program_name == "aiomcache":
        # The translator logs each connection it opens; memcached's own count says the
        # program's commands then went through (its pool takes its connections in turn).
        victim = first_to_say(replicas, r"#\d+ open: ", 60, stderr=True)
        wait_until(lambda: memcached_items(memcached_port) >= 2000, 60, "2,000 keys set")
    else:
        victim = first_to_say(replicas, r"^carrying \d+$", 60)
    survivor = "B" if victim == "A" else "A"
    assert first.proc.poll() is None, first.stderr[-2000:]  # the transfer is under way
    replicas[victim].kill()
    assert replicas[victim].proc.returncode == -signal.SIGKILL
    # What the other replica had carried by then: nothing of this program.
    other = replicas[survivor]
    if isinstance(other, StderrPeer):
        # aiomcache opens its pool of four connections at once and takes them in turn: the
        # router spreads them, so the other translator may carry some too (the victim's
        # commands hang all the same). Its connections so far, to tell the retry's apart:
        opened_before = sum(" open: " in ln for ln in other.logged_so_far())
    else:
        assert not any(ln.startswith("request ") for ln in said_so_far(replicas[survivor]))
    first_rc = first.finish(120)
    errors = FINAL_ERROR.findall(first.stderr)
    print(
        f"\n{program_name}: replica {victim} (carrying the transfer) killed; the program "
        f"exited {first_rc}, last error {errors[-1] if errors else None}"
    )
    assert first_rc != 0 and errors and errors[-1] == seen, first.stderr[-3000:]
    replicas[victim].finish(10)
    if program_name == "aiomcache":  # the victim's connection was open when it died
        assert re.search(r"#\d+ open: ", replicas[victim].stderr)
        assert " close after " not in replicas[victim].stderr
    else:  # it had said how far it got, and never that the transfer ended
        said = replicas[victim].seen
        assert any(ln.startswith("carrying ") for ln in said), said
        assert not any(ln.startswith("done ") for ln in said), said
    if program_name == "asyncssh":  # its SFTP root holds what reached it: part of the file
        partial = (keys[victim] / "root" / "copy.bin").stat().st_size
        assert 4 * 2**20 <= partial < BIG_UPLOAD
        big.unlink()  # pytest keeps the last runs' directories

    # -- run again: the replica left serves it, every byte checked ---------------------------
    wait_registered(router, service, 1, timeout=30)
    survivor_peer = replicas[survivor]
    if program_name == "aiohttp":
        size = 3_000_000 + 17
        again = result(ports.program([script, "web.serval", "80", str(size)], router), 90)
        expected = hashlib.sha256(served_content(size)).hexdigest()
        assert (again["get_sha256"], again["get_bytes"]) == (expected, size)
        assert again["post"] == {"sha256": expected, "bytes": size}
        survivor_peer.wait_for(rf"^done GET /data\?size={size} {size}$", 10)
        survivor_peer.wait_for(r"^done POST /sha256 ", 10)
    elif program_name == "websockets":
        again = result(ports.program([script, "echo.serval", "80", "3"], router), 90)
        assert again["echo_sha256"] == again["sent_sha256"]
        assert (again["close_code"], again["close_reason"]) == (4001, "asked to")
        survivor_peer.wait_for(r"^request websocket$", 10)
        assert survivor_peer.wait_for(r"^closed ", 10) == "closed 1000"
    elif program_name == "aiomcache":
        argv = [script, "memcached.serval", "11211", "1000"]
        again = result(ports.program(argv, router), 90)
        assert again["right"] == 1000
        assert memcached_get(memcached_port, ["key:999"]) == {"key:999": "value:999"}
        survivor_peer.proc.terminate()  # its log, complete: it carried the run
        assert survivor_peer.finish(10) == 0
        assert survivor_peer.stderr.count(" open: ") >= opened_before + 4
    else:
        payload = os.urandom(2_000_000)
        file = ports.tmp / "payload.bin"
        file.write_bytes(payload)
        again = result(ports.program([script, str(keys["A"]), str(file)], router), 90)
        sha = hashlib.sha256(payload).hexdigest()
        assert again["sent_sha256"] == again["back_sha256"] == sha
        # The copy the survivor wrote into its own SFTP root is the file, byte for byte.
        copy = keys[survivor] / "root" / "copy.bin"
        assert hashlib.sha256(copy.read_bytes()).hexdigest() == sha
        survivor_peer.wait_for(r"^done sftp copy.bin 2000000$", 10)


def test_lines_changed_counts_code_not_docstrings(tmp_path: Path) -> None:
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text('"""Doc\none."""\n\nimport x\n\n# note\nx.run("h")\n')
    b.write_text('"""Doc\nchanged a lot."""\n\nimport x\nimport y\n\n# other\nx.run("s")\n')
    assert code_lines(b) == ["import x", "import y", 'x.run("s")']
    assert sum(1 for ln in difflib.ndiff(code_lines(a), code_lines(b)) if ln[:2] == "+ ") == 2

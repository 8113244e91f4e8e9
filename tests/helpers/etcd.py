"""Real etcd members for tests and benchmarks: one or three, on free loopback ports.

:class:`EtcdCluster` starts ``etcd`` (Debian's etcd-server) with its data in a temporary
directory, waits until every member answers ``/health``, and can SIGKILL a member, all of
them, and start them again on the same ports and data (a restarted member rejoins). Every
wait is bounded; :meth:`close` kills whatever still runs.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from types import TracebackType

__all__ = ["ETCD", "EtcdCluster", "free_port"]

ETCD = shutil.which("etcd") or ("/usr/bin/etcd" if Path("/usr/bin/etcd").exists() else None)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EtcdCluster:
    """``members`` etcd processes forming one cluster (see the module docstring)."""

    def __init__(self, directory: Path, members: int = 1) -> None:
        if ETCD is None:
            raise RuntimeError("etcd is not installed (Debian: apt-get install etcd-server)")
        self.directory = directory
        self.names = [f"m{i}" for i in range(members)]
        self.client_ports = [free_port() for _ in self.names]
        self.peer_ports = [free_port() for _ in self.names]
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * members
        self.logs = [directory / f"{name}.log" for name in self.names]

    @property
    def urls(self) -> list[str]:
        """The members' client URLs."""
        return [f"http://127.0.0.1:{p}" for p in self.client_ports]

    def _argv(self, i: int) -> list[str]:
        assert ETCD is not None
        initial = ",".join(
            f"{n}=http://127.0.0.1:{p}" for n, p in zip(self.names, self.peer_ports, strict=True)
        )
        return [
            ETCD,
            "--name", self.names[i],
            "--data-dir", str(self.directory / self.names[i]),
            "--listen-client-urls", self.urls[i],
            "--advertise-client-urls", self.urls[i],
            "--listen-peer-urls", f"http://127.0.0.1:{self.peer_ports[i]}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.peer_ports[i]}",
            "--initial-cluster", initial,
            "--initial-cluster-token", f"pyserval-test-{self.client_ports[0]}",
            "--heartbeat-interval", "50",
            "--election-timeout", "500",
            "--log-level", "error",
        ]  # fmt: skip

    def start(self, *which: int, timeout: float = 20.0) -> EtcdCluster:
        """Start the given members (all by default) and wait until they are healthy."""
        for i in which or range(len(self.names)):
            if self.procs[i] is not None and self.procs[i].poll() is None:  # type: ignore[union-attr]
                continue
            log = self.logs[i].open("ab")
            self.procs[i] = subprocess.Popen(
                self._argv(i), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
            log.close()
        for i in which or range(len(self.names)):
            self.wait_healthy(i, timeout)
        return self

    def wait_healthy(self, i: int, timeout: float) -> None:
        """Wait until member ``i`` answers ``/health`` with true (a leader is known)."""
        deadline = time.monotonic() + timeout
        while True:
            proc = self.procs[i]
            if proc is not None and proc.poll() is not None:
                raise AssertionError(f"etcd {self.names[i]} exited: {self.log_tail(i)}")
            with (
                contextlib.suppress(OSError, ValueError),
                urllib.request.urlopen(self.urls[i] + "/health", timeout=1) as resp,
            ):
                if json.loads(resp.read()).get("health") == "true":
                    return
            if time.monotonic() > deadline:
                raise AssertionError(f"etcd {self.names[i]} not healthy: {self.log_tail(i)}")
            time.sleep(0.05)

    def log_tail(self, i: int) -> str:
        """The end of member ``i``'s log."""
        with contextlib.suppress(OSError):
            return self.logs[i].read_text(errors="replace")[-2000:]
        return ""

    def kill(self, *which: int) -> None:
        """SIGKILL the given members (all by default)."""
        for i in which or range(len(self.names)):
            proc = self.procs[i]
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)

    def close(self) -> None:
        """Kill every member."""
        self.kill()

    def __enter__(self) -> EtcdCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

"""Run Serval peers as child processes with bounded waits (never a hang in the test suite).

:class:`Peer` starts ``sys.executable`` with ``PYTHONPATH`` reaching the repository's ``src``,
reads the child's stdout in a thread and lets a test wait for a line with a timeout.
``Peer.server(...)`` waits for the ``listening on IP:PORT service <hex>`` line of
``examples/echo_server.py`` or ``tests/helpers/serval_peer.py serve``.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"
EXAMPLES = ROOT / "examples"
PEER = ROOT / "tests" / "helpers" / "serval_peer.py"

READY = re.compile(r"listening on (?P<ip>[\d.]+):(?P<port>\d+) service (?P<sid>[0-9a-f]{64})")


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a child: this one, without PYSERVAL_*, with ``src`` importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYSERVAL_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


class Peer:
    """One child process whose stdout lines a test can wait for."""

    def __init__(
        self, argv: Sequence[str], *, env: dict[str, str] | None = None, prefix: Sequence[str] = ()
    ) -> None:
        self.argv = [*prefix, sys.executable, *argv]
        self.proc = subprocess.Popen(
            self.argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env or child_env(),
            cwd=ROOT,
            text=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self.stderr = ""
        self._out = threading.Thread(target=self._pump, daemon=True)
        self._err = threading.Thread(target=self._pump_err, daemon=True)
        self._out.start()
        self._err.start()
        self.address: tuple[str, int] | None = None
        self.service_hex: str | None = None

    @classmethod
    def server(cls, argv: Sequence[str], *, timeout: float = 15, **kw: Any) -> Peer:
        """Start a server and wait for its ready line (its address is then ``.address``)."""
        peer = cls(argv, **kw)
        try:
            line = peer.wait_for(READY.pattern, timeout)
        except BaseException:
            peer.kill()
            raise
        m = READY.search(line)
        assert m is not None
        peer.address = (m["ip"], int(m["port"]))
        peer.service_hex = m["sid"]
        return peer

    @property
    def route(self) -> str:
        """``IP:PORT`` of a started server."""
        assert self.address is not None
        return "{}:{}".format(*self.address)

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def _pump_err(self) -> None:
        assert self.proc.stderr is not None
        self.stderr = self.proc.stderr.read()

    def wait_for(self, pattern: str, timeout: float) -> str:
        """The next stdout line matching ``pattern`` (regex); fail after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                line = self.lines.get(timeout=max(left, 0.001))
            except queue.Empty:
                raise AssertionError(
                    f"no line matching {pattern!r} from {self.argv} in {timeout} s; "
                    f"saw {self.seen[-5:]}"
                ) from None
            if line is None:
                self.proc.wait(5)
                self._err.join(5)
                raise AssertionError(
                    f"{self.argv} exited ({self.proc.returncode}) before {pattern!r}; "
                    f"stdout {self.seen[-5:]}; stderr:\n{self.stderr[-3000:]}"
                )
            self.seen.append(line)
            if re.search(pattern, line):
                return line

    def result(self, timeout: float, tag: str = "RESULT") -> dict[str, Any]:
        """The JSON of the child's ``TAG {json}`` line."""
        line = self.wait_for(rf"^{tag} ", timeout)
        data: dict[str, Any] = json.loads(line[len(tag) + 1 :])
        return data

    def finish(self, timeout: float) -> int:
        """Wait for the child to exit on its own; kill it and fail after ``timeout``."""
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.argv} still running after {timeout} s") from None
        self._out.join(5)
        self._err.join(5)
        while True:  # the lines nobody waited for
            try:
                line = self.lines.get_nowait()
            except queue.Empty:
                break
            if line is not None:
                self.seen.append(line)
        return rc

    def stop(self, timeout: float = 10) -> dict[str, Any] | None:
        """SIGTERM, wait for exit; the ``STATS`` JSON of a helper server if it printed one."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        rc = self.finish(timeout)
        assert rc == 0, f"{self.argv} exited {rc}; stderr:\n{self.stderr[-3000:]}"
        for line in reversed(self.seen):
            if line.startswith("STATS "):
                stats: dict[str, Any] = json.loads(line[6:])
                return stats
        return None

    def kill(self) -> None:
        """SIGKILL (no clean-up in the child) and reap."""
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)

    def __enter__(self) -> Peer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill()
        self._out.join(5)
        self._err.join(5)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()

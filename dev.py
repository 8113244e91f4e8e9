#!/usr/bin/env python3
"""Set up a virtual environment and run pyserval's demonstration or test suite.

Needs only python3 (3.11+):  ``python3 dev.py demo``  or  ``python3 dev.py test``.
The environment lives in ``.venv`` and is reinstalled when pyproject.toml changes.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / "python"
STAMP = VENV / ".pyserval-installed"


def ensure_env() -> None:
    """Create .venv and install pyserval with its dev extras, once per pyproject.toml."""
    if sys.version_info < (3, 11):  # noqa: UP036  (dev.py may be run by an older python3)
        sys.exit(f"pyserval needs Python 3.11 or newer, this is {sys.version.split()[0]}")
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if STAMP.exists() and STAMP.read_text() == digest and PY.exists():
        return
    if not PY.exists():
        print("creating .venv ...", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    print("installing pyserval and its dev tools into .venv ...", flush=True)
    quiet = [] if os.environ.get("PYSERVAL_VERBOSE_INSTALL") else ["-q"]
    subprocess.run([str(PY), "-m", "pip", "install", *quiet, "--upgrade", "pip"], check=True)
    subprocess.run([str(PY), "-m", "pip", "install", *quiet, "-e", f"{ROOT}[dev]"], check=True)
    STAMP.write_text(digest)


def run(args: list[str]) -> int:
    return subprocess.run(args, cwd=ROOT).returncode


def compile_sources() -> None:
    """Write the bytecode of pyserval, the benchmarks and the examples ahead of time.

    The install is editable, so nothing compiles ``src`` at install time, and where
    ``PYTHONDONTWRITEBYTECODE`` is set (as on our development machines) every process that imports
    pyserval compiles all of it again: about 0.17 s of CPU each, and the suite starts
    several hundred (hosts, routers, the CLI, benchmarks as subprocesses): about a minute
    of its CPU. Python still reads bytecode it finds up to date, whatever that variable
    says, and this is quick when nothing changed (it compares timestamps).
    """
    # A file that does not compile is reported here and again by the tests that import it.
    run([str(PY), "-m", "compileall", "-q", "src", "benchmarks", "examples"])


def main() -> int:
    cmd = sys.argv[1] if len(sys.argv) > 1 else "help"
    rest = sys.argv[2:]
    if cmd == "demo":
        ensure_env()
        compile_sources()
        return run([str(BIN / "pyserval"), "demo", *rest])
    if cmd == "test":
        ensure_env()
        compile_sources()
        if rest:
            return run([str(PY), "-m", "pytest", "-n", "2", *rest])
        # Load-sensitive scenarios (floods, address changes in namespaces) run alone after
        # the parallel suite: on two cores a neighbour test would be part of the scenario.
        rc = run([str(PY), "-m", "pytest", "-n", "2", "-m", "not serial"])
        rc2 = run([str(PY), "-m", "pytest", "-m", "serial"])
        # The simulated-network scenarios once more, the hosts driven as the UDP adapter
        # drives them on Linux (segment trains out, GRO batches in): the same protocol
        # outcomes must hold on those code paths too.
        batches = {**os.environ, "PYSERVAL_SIM_BATCHES": "1"}
        rc3 = subprocess.run(
            [str(PY), "-m", "pytest", "-n", "2", "-m", "sim and not serial"], cwd=ROOT, env=batches
        ).returncode
        return rc or (0 if rc2 == 5 else rc2) or rc3
    if cmd == "lint":
        ensure_env()
        rc = run([str(BIN / "ruff"), "check", "src", "tests", "benchmarks", "examples", "dev.py"])
        rc = rc or run([str(PY), "-m", "mypy", "--strict", "src"])
        rc = rc or run([str(PY), "-m", "mypy", "--strict", "tests"])
        return rc or run([str(PY), "-m", "mypy", "--strict", "benchmarks"])
    if cmd == "setup":
        ensure_env()
        return 0
    print(__doc__)
    print("commands: demo, test, lint, setup")
    return 0 if cmd == "help" else 2


if __name__ == "__main__":
    sys.exit(main())

"""A copy of this checkout's ``src/`` with the per-packet modules compiled by mypyc, for A/B.

    python benchmarks/mypyc_tree.py [--out build/mypyc] [--modules core|runtime]
    python benchmarks/suite.py --tree pure=src --tree mypyc=build/mypyc/src \\
        --only connect,stream_mss1408 --reps 5

Issue 14 asked whether compiling the per-packet modules with mypyc pays enough to be wired
in as an opt-in build. This script builds what was measured: it copies ``src/`` to
``--out`` and compiles the modules listed below there (type-checked with this checkout's
mypy settings), in place, so that each ``.so`` sits beside its ``.py`` and Python imports
it instead; it prints the ``PYTHONPATH`` to use. ``suite.py --tree`` then runs the same
benchmarks against both trees, interleaved. The result, and why it is not wired in, is in
README.md ("Compiling the per-packet modules with mypyc"). Nothing in this checkout's own
``src/`` changes; ``--out`` defaults to ``build/``, which git ignores.

Two sets: ``core`` (``sal/``, ``transport/``, ``core/``: the sans-I/O work of every
packet) and ``runtime`` (``core`` plus the asyncio adapter's driver and UDP endpoint). Left
out, each for a reason mypyc gives:

* ``transport/connection.py``: the host's TIME_WAIT records and the connection's parts
  (``Connection.unlink_parts``) refer to a forgotten connection weakly, and mypyc's native
  classes take no weak references; as a non-native class it may not have property setters.
  Kept interpreted, so the compiled modules see it as a plain object (a weak proxy in a
  part's ``conn`` passes too);
* ``transport/config.py``, ``runtime/host.py``: pydantic models (a ``Field`` is not the
  attribute's declared type);
* ``sal/service_table.py``: its errors derive from two builtin exceptions;
* ``transport/datagram_flow.py``: ``DatagramConnection`` derives from the interpreted
  ``Connection``, whose ``__slots__`` a compiled subclass may not have;
* ``runtime/streams.py``: mypyc fails on the anyio stream's async context manager;
* every ``__init__.py``: a compiled package hides its submodules.

The compiled modules' classes lose their ``__slots__`` in the copy (mypyc refuses them; a
native class has a fixed layout anyway).

Needs a C compiler, the Python headers and mypy (the ``dev`` extra); a build takes about
three minutes of CPU.

Status (1 December, seventh session): on this main the tree builds (the ``__slots__``
added to the per-packet classes since the measurement are dropped in the copy, the two
patches below, and ``recovery._NothingLost`` left interpreted: see
:data:`INTERPRETED_CLASSES`) and runs the connect cycle: ``connect_inproc.py
--connections 2000`` ok, no internal error in either core, and ``transport_cpu_bench.py``
gives the pure tree's four digests. The close used to fail in the server's core with
``SystemError: Objects/dictobject.c:1778: bad argument to internal function``:
``Subflow.output`` with the FIN in flight took ``len()`` of the shared empty lost list, a
native subclass of ``SortedList`` compiled without the base's instance ``__dict__``. It does not
pay any more: ``connect_slices.py --slices 20 --seconds 0.5 --tree pure=src --tree
mypyc=<out>/src`` (load average 0.65 and 0.93 before the runs) gave compiled over pure
0.995 (quartiles 0.90-1.07) and 1.025 (0.92-1.13) by rate, 0.99 and 1.01 by CPU; against
asyncio TCP (``PYTHONPATH=<out>/src connect_slices.py``) the compiled tree reads 0.578 and
the pure one 0.582 in the next run. The sans-I/O connect cycle (``core_stream_bench.py
--cases ""``, 3 runs each, interleaved; it imports the ``src/`` beside it, so run from a
copy of ``benchmarks/`` in ``<out>``) is 332-404 us compiled against 383-431 us pure,
about 1.1x where the README's measurement found 1.5x; ``transport_cpu_bench.py`` (4 runs
each, interleaved, load 1.2-1.8) gives medians of 15.7, 14.1, 14.4 and 13.0 MB per CPU
second compiled against 13.8, 12.4, 13.9 and 11.9 pure (1.04-1.14x, the README's 1.19-1.45x),
with runs of either tree spread by 20%. Both hosts in one process, the compiled tree does
less: 1.208M instructions per connection against 1.712M pure (callgrind, ``connect_inproc.py
--virtual-clock --warmup 50``, (I500 - I100) / 400), and 719-850 us of CPU against 828-908
(``connect_inproc.py --connections 3000 --warmup 300``, 3 runs each, interleaved, load
0.3-0.6); a line tracer over the cycle counts 1,496 interpreted lines per cycle instead
of 6,061 (615 of them ``connection.py``'s, left interpreted). The README's 1.1x for whole
connections in two processes is from the tree of that measurement and does not hold on
this main, where the slices cannot tell the trees apart.
"""

from __future__ import annotations

import argparse
import ast
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CORE = [
    "sal/packet.py",
    "sal/transport_headers.py",
    "sal/checksum.py",
    "sal/extensions.py",
    "sal/flow_table.py",
    "sal/first_hop.py",
    # SegmentTrain subclasses SalPacket: an interpreted class cannot subclass a compiled one.
    "sal/train.py",
    "transport/buffers.py",
    "transport/close_state.py",
    "transport/common.py",
    "transport/congestion.py",
    "transport/events.py",
    "transport/liveness.py",
    "transport/migration.py",
    "transport/multipath.py",
    "transport/packets.py",
    "transport/reasons.py",
    "transport/recovery.py",
    "transport/rtt.py",
    "transport/scoreboard.py",
    "transport/subflow.py",
    "transport/flows/manager.py",
    "transport/flows/migration.py",
    "transport/flows/multipath.py",
    "core/demux.py",
    "core/handshake.py",
    "core/host.py",
    "core/datagrams.py",
    "core/paths.py",
    "core/ratelimit.py",
    "core/records.py",
    "core/relaying.py",
    "core/syncookies.py",
    "core/time_wait.py",
]
RUNTIME = [
    *CORE,
    "runtime/driver.py",
    "runtime/udp.py",
    "runtime/api.py",
    "runtime/services.py",
    "runtime/service_events.py",
    "runtime/interfaces.py",
    "runtime/mtu.py",
]
SETS = {"core": CORE, "runtime": RUNTIME}

# What the compiled copy changes besides __slots__ ((module, (text, replacement))): a
# native class cannot be made by ``object.__new__`` (the interpreted fast constructor);
# mypy narrows ``self._woken`` to None after it is cleared, though the call in between
# sets it, and compiled code checks the narrowed type at run time.
PATCHES = [
    (
        "core/host.py",
        (
            "                woken = self._woken\n",
            "                woken: Connection | None = getattr(self, '_woken')\n",
        ),
    ),
    (
        "sal/extensions.py",
        (
            """    ext: ControlExt = _new(ControlExt)
    ext.flags = flags
    ext.verno = verno
    ext.ackno = ackno
    ext.nonce = nonce
    ext.reserved = reserved
    return ext
""",
            "    return ControlExt(flags, verno, ackno, nonce, reserved)\n",
        ),
    ),
]


# Classes of the compiled modules that stay interpreted ((module, class)): the source of
# the class is run by ``exec`` when the compiled module is imported. mypyc cannot compile
# a subclass of a class that mypy sees only as ``Any`` (an untyped package's): as a native
# class it gets a layout without the base's instance ``__dict__`` (``recovery``'s shared
# empty lost list then read ``self._len`` in ``SortedList.__len__`` through a bad dict
# pointer: ``SystemError`` from ``dictobject.c``, or a segfault), and as a non-native one
# (``mypyc_attr(native_class=False)``) it loses the base altogether (mypy records an
# ``Any`` base as ``object``), so ``len()`` fails on it.
INTERPRETED_CLASSES = [("transport/recovery.py", "_NothingLost")]


def _drop_slots(path: Path) -> None:
    """Take the ``__slots__`` declarations out of a module's classes, in the copy: mypyc
    refuses them ("mypyc classes can't have __slots__"), and its native classes have a
    fixed layout of their own, which is what the interpreted classes get from them."""
    lines = path.read_text().splitlines(keepends=True)
    spans = [
        (node.lineno, node.end_lineno or node.lineno)
        for cls in ast.walk(ast.parse("".join(lines)))
        if isinstance(cls, ast.ClassDef)
        for node in cls.body
        if isinstance(node, ast.Assign | ast.AnnAssign)
        and any(
            isinstance(t, ast.Name) and t.id == "__slots__"
            for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
        )
    ]
    for first, last in sorted(spans, reverse=True):
        indent = lines[first - 1][: len(lines[first - 1]) - len(lines[first - 1].lstrip())]
        lines[first - 1 : last] = [f"{indent}pass  # (__slots__ dropped for mypyc)\n"]
    path.write_text("".join(lines))


def _interpret_class(path: Path, name: str) -> None:
    """Replace the module-level class ``name`` in a module of the copy by an ``exec`` of its
    source in the module's namespace (see :data:`INTERPRETED_CLASSES`). The name is first
    bound to ``type`` for mypy and mypyc, which then read it from the module's dict at run
    time, where the ``exec`` has put the interpreted class."""
    lines = path.read_text().splitlines(keepends=True)
    (cls,) = [
        c for c in ast.parse("".join(lines)).body if isinstance(c, ast.ClassDef) and c.name == name
    ]
    first = min([cls.lineno, *(d.lineno for d in cls.decorator_list)])
    last = cls.end_lineno or cls.lineno
    source = "".join(lines[first - 1 : last])
    lines[first - 1 : last] = [
        f"{name}: type = object  # (left interpreted for mypyc: benchmarks/mypyc_tree.py)\n",
        f"exec({source!r}, globals())\n",
    ]
    path.write_text("".join(lines))


def build(out: Path, modules: list[str]) -> None:
    """Copy the checkout to ``out`` and compile ``modules`` (paths under src/pyserval)."""
    from mypyc.build import mypycify  # the dev extra's mypy
    from setuptools import setup  # type: ignore[import-untyped,unused-ignore]

    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(
        ROOT / "src", out / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
    )
    for m in modules:
        _drop_slots(out / "src" / "pyserval" / m)
    for m, (old, new) in PATCHES:
        if m in modules:
            path = out / "src" / "pyserval" / m
            text = path.read_text()
            if text.count(old) != 1:
                raise SystemExit(f"{m}: the text to patch for mypyc is not there once")
            path.write_text(text.replace(old, new))
    for m, name in INTERPRETED_CLASSES:
        if m in modules:
            _interpret_class(out / "src" / "pyserval" / m, name)
    os.chdir(out)  # the extensions land in src/ here
    # mypyc type-checks with the checkout's mypy settings (pyproject.toml).
    paths = ["--config-file", str(ROOT / "pyproject.toml")]
    paths += [f"src/pyserval/{m}" for m in modules]
    extensions = mypycify(paths, group_name="pyserval.mypyc", opt_level="3", target_dir="c")
    setup(
        name="pyserval-mypyc",
        ext_modules=extensions,
        package_dir={"": "src"},
        script_args=[
            *("-q", "build_ext", "--inplace"),
            *("--build-temp", "c/obj", "--build-lib", "c/lib"),
        ],
    )


def main(argv: list[str] | None = None) -> int:
    """Build the tree and print the PYTHONPATH that imports it."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "build" / "mypyc"))
    parser.add_argument("--modules", choices=sorted(SETS), default="core")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    start = time.monotonic()
    build(out, SETS[args.modules])
    built = sorted(p.relative_to(out / "src") for p in (out / "src").rglob("*.so"))
    print(f"{len(built)} extension modules in {time.monotonic() - start:.0f} s", file=sys.stderr)
    print(f"PYTHONPATH={out / 'src'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

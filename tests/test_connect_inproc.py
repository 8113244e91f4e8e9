"""``benchmarks/connect_inproc.py``: both stacks' connect cycle with both ends in one process.

Each stack must run the cycle it names (every connection accepted, every client reading a
clean end of stream) and report its CPU per connection with the user-space and kernel
parts adding up to the process's CPU time over the same cycles (``getrusage`` against
``time.process_time``, two clocks of the kernel's).
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from .helpers.processes import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import connect_inproc

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("stack", ["pyserval", "tcp"])
def test_each_stack_runs_its_cycle_and_splits_its_cpu(stack: str) -> None:
    runner = connect_inproc.run if stack == "pyserval" else connect_inproc.run_tcp
    r = asyncio.run(runner(40, 5))
    assert r["ok"] is True and r["connections"] == 40 and r["per_s"] > 0
    cpu, user, kernel = (
        r["cpu_us_per_connection"],
        r["user_us_per_connection"],
        r["kernel_us_per_connection"],
    )
    assert cpu > 0 and user > 0 and kernel >= 0
    # Two readings of the same CPU time: equal but for the calls between them and rounding.
    assert user + kernel == pytest.approx(cpu, rel=0.15, abs=30.0)


def test_both_stacks_in_turns_give_the_ratio_of_their_own_runs() -> None:
    r = connect_inproc.both(30, 5, reps=2)
    assert r["ok"] is True
    assert [x["stack"] for x in r["runs"]] == ["pyserval", "tcp", "pyserval", "tcp"]
    pairs = [(r["runs"][i], r["runs"][i + 1]) for i in (0, 2)]
    ratios = [ours["per_s"] / theirs["per_s"] for ours, theirs in pairs]
    assert r["ratios"] == [round(x, 3) for x in ratios]
    assert r["ratio_median"] == pytest.approx(sum(ratios) / 2, abs=1e-3)


# -- cold passes (--sweep) and the memory a cycle touches (--pages) ----------------------
@pytest.mark.parametrize("stack", ["pyserval", "tcp"])
def test_sweeps_start_each_pass_cold_and_are_left_out_of_the_figures(stack: str) -> None:
    # 32 MiB a sweep, several per cycle: the sweeps alone cost far more CPU than a cycle
    # does, so a figure that kept them would exceed what the evictor itself recorded.
    evictor = connect_inproc.Evictor(32.0)
    runner = connect_inproc.run if stack == "pyserval" else connect_inproc.run_tcp
    r = connect_inproc.run_on_loop(lambda: runner(12, 3, evictor=evictor), evictor)
    assert r["ok"] is True and r["sweep_mb"] == 32.0 and r["sweep_stride"] == 64
    # Each cycle needs at least two passes that find a datagram (the client's answer to
    # the handshake, the end of stream); the warm-up's sweeps are not in the figure.
    passes = r["cold_passes_per_connection"]
    assert 2 <= passes <= evictor.sweeps / 12
    swept_us = evictor.spent / evictor.sweeps * passes * 1e6
    assert r["cpu_us_per_connection"] < swept_us
    # The same for the rate: a connection's wall time without its sweeps' is the shorter.
    swept_wall_us = evictor.spent_wall / evictor.sweeps * passes * 1e6
    assert 1e6 / r["per_s"] < swept_wall_us


def test_a_paused_evictor_does_not_sweep() -> None:
    evictor = connect_inproc.Evictor(1.0, stride=4096)
    evictor.sweep()
    evictor.paused = True
    evictor.sweep()
    assert evictor.sweeps == 1


@pytest.mark.parametrize(("mb", "stride"), [(0.0, 64), (-1.0, 64), (1.0, 0), (4096.0, 64)])
def test_a_sweep_of_no_memory_or_no_stride_is_refused(mb: float, stride: int) -> None:
    with pytest.raises(ValueError, match="sweep"):
        connect_inproc.Evictor(mb, stride)


@pytest.mark.parametrize(
    ("path", "kind"),
    [
        ("/usr/lib/x86_64-linux-gnu/libpython3.11.so.1.0", "interpreter_kb"),
        ("/usr/bin/python3.11", "interpreter_kb"),
        ("/usr/lib/python3.11/lib-dynload/_socket.cpython-311-x86_64-linux-gnu.so", "libraries_kb"),
        ("", "python_heap_kb"),
        ("[heap]", "python_heap_kb"),
        ("[stack]", "other_kb"),
    ],
)
def test_each_mapping_is_counted_as_its_kind(path: str, kind: str) -> None:
    assert connect_inproc._kind(path) == kind


def _can_clear_referenced() -> bool:
    return connect_inproc.clear_referenced() and connect_inproc.referenced_kb() is not None


@pytest.mark.skipif(not _can_clear_referenced(), reason="no /proc/self/clear_refs here")
def test_memory_touched_after_clearing_is_what_was_referenced() -> None:
    # 16 MiB written after the bits were cleared must show as referenced heap; the same
    # memory left alone after a second clearing must not.
    block = bytearray(16 << 20)
    assert connect_inproc.clear_referenced()
    block[::4096] = b"\x01" * len(range(0, len(block), 4096))
    touched = connect_inproc.referenced_kb()
    assert connect_inproc.clear_referenced()
    idle = connect_inproc.referenced_kb()
    assert touched is not None and idle is not None
    assert touched["python_heap_kb"] >= 16 << 10
    assert idle["python_heap_kb"] < touched["python_heap_kb"] - (15 << 10)
    del block


@pytest.mark.skipif(not _can_clear_referenced(), reason="no /proc/self/clear_refs here")
@pytest.mark.parametrize("stack", ["pyserval", "tcp"])
def test_a_cycle_touches_the_interpreter_and_the_heap(stack: str) -> None:
    runner = connect_inproc.run if stack == "pyserval" else connect_inproc.run_tcp
    r = asyncio.run(runner(10, 3, pages=True))
    pages = r["pages_per_cycle"]
    assert r["ok"] is True
    assert pages["interpreter_kb"] > 0 and pages["python_heap_kb"] > 0
    parts = ("interpreter_kb", "libraries_kb", "python_heap_kb", "other_kb")
    assert pages["total_kb"] == sum(pages[k] for k in parts)


def _rollup_referenced_kb() -> int:
    """The kernel's own total of this process's referenced memory (``smaps_rollup``)."""
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Referenced:"):
            return int(line.split()[1])
    raise AssertionError("smaps_rollup has no Referenced line")


@pytest.mark.skipif(
    not _can_clear_referenced() or not Path("/proc/self/smaps_rollup").exists(),
    reason="no /proc/self/clear_refs or smaps_rollup here",
)
def test_the_kinds_add_up_to_the_kernels_own_total() -> None:
    # Every mapping counted once, under one kind: the sum lies between the kernel's total
    # read just before and just after (referenced memory only grows until the next clear;
    # reading smaps itself references a little more).
    block = bytearray(8 << 20)
    assert connect_inproc.clear_referenced()
    block[::4096] = b"\x01" * len(range(0, len(block), 4096))
    before = _rollup_referenced_kb()
    kb = connect_inproc.referenced_kb()
    after = _rollup_referenced_kb()
    assert kb is not None
    assert before <= sum(kb.values()) <= after
    del block

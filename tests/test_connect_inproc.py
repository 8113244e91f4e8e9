"""``benchmarks/connect_inproc.py``: both stacks' connect cycle with both ends in one process.

Each stack must run the cycle it names (every connection accepted, every client reading a
clean end of stream) and report its CPU per connection with the user-space and kernel
parts adding up to the process's CPU time over the same cycles (``getrusage`` against
``time.process_time``, two clocks of the kernel's).
"""

from __future__ import annotations

import asyncio
import sys

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

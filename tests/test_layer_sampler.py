"""``benchmarks/layer_sampler.py``: user CPU by layer, from ITIMER_VIRTUAL samples.

The expectation is where the test itself spends its CPU: busy loops whose code objects
carry the file names of the layers, run for known lengths of CPU time, and a sleep, which
must not be sampled at all.
"""

from __future__ import annotations

import sys
import time

import pytest

from .helpers.processes import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import layer_sampler as ls

pytestmark = pytest.mark.timeout(60)


def _busy_in(filename: str) -> object:
    """A function that spins for ``seconds`` of CPU, compiled as if from ``filename``."""
    source = (
        "def spin(seconds, clock):\n"
        "    end = clock() + seconds\n"
        "    while clock() < end:\n"
        "        for _ in range(2000):\n"
        "            pass\n"
    )
    namespace: dict[str, object] = {}
    exec(compile(source, filename, "exec"), namespace)
    return namespace["spin"]


@pytest.mark.parametrize(
    ("filename", "layer"),
    [
        ("/x/src/pyserval/runtime/udp.py", "runtime"),
        ("/x/src/pyserval/transport/subflow.py", "core"),
        ("/x/src/pyserval/sal/packet.py", "core"),
        ("<string>", "generated"),
        ("/usr/lib/python3.11/asyncio/base_events.py", "asyncio"),
        ("/usr/lib/python3.11/selectors.py", "asyncio"),
        ("/venv/site-packages/anyio/_core/_tasks.py", "anyio"),
        ("/work/benchmarks/connect_floor.py", "other"),
    ],
)
def test_each_file_belongs_to_its_layer(filename: str, layer: str) -> None:
    assert ls.layer_of(filename) == layer


def test_the_samples_split_as_the_cpu_was_spent_and_sleep_is_not_sampled() -> None:
    runtime = _busy_in("/x/src/pyserval/runtime/udp.py")
    core = _busy_in("/x/src/pyserval/sal/packet.py")
    sampler = ls.LayerSampler(interval=0.001)
    sampler.start()
    try:
        before = sampler.counts()
        # CPU time, so that other processes on the machine change nothing; read every
        # 2,000 turns, as it is a system call (kernel time, which is not sampled).
        runtime(0.2, time.process_time)  # type: ignore[operator]
        core(0.6, time.process_time)  # type: ignore[operator]
        time.sleep(0.3)  # no user CPU: no sample
        after = sampler.counts()
    finally:
        sampler.stop()
    shares = ls.shares(before, after)
    # 0.8 s of CPU (the clock's C code counts for the loop that called it),
    # sampled at one a millisecond or one a kernel tick where that is longer (100 to 1000 a
    # second): 80 to 800 samples, and none for the sleep.
    total = sum(after.values()) - sum(before.values())
    assert 60 <= total <= 850
    assert shares["core"] == pytest.approx(0.75, abs=0.08)
    assert shares["runtime"] == pytest.approx(0.25, abs=0.08)
    assert sum(shares.values()) == pytest.approx(1.0)


def test_no_samples_give_no_shares() -> None:
    assert ls.shares({"core": 3}, {"core": 3}) == {}

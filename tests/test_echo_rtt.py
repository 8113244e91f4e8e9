"""``benchmarks/echo_rtt.py``: request/response round trips, pyserval against asyncio TCP.

What it reports must follow from the rounds it ran: the stacks take turns (ABBA), each
round's answers are checked byte for byte and by SHA-256 (the same seed gives the same
bytes to both stacks, so their digests agree), each pair's ratio is the two medians'
quotient; and an echo server that answers wrongly makes the run not ``ok``.
"""

from __future__ import annotations

import hashlib
import random
import statistics
import sys
from typing import Any

import pytest

from .helpers.processes import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import echo_rtt

pytestmark = pytest.mark.timeout(120)


def test_rounds_take_turns_and_the_figures_follow_from_them() -> None:
    r = echo_rtt.run(rounds=3, exchanges=40, size=64)
    assert r["ok"] is True
    rounds = r["rounds"]
    assert [p["first"] for p in rounds] == [echo_rtt.PYSERVAL, echo_rtt.TCP, echo_rtt.PYSERVAL]
    for i, p in enumerate(rounds):
        # Round i sends the bytes of seed i + 1 (the warm-up has 0), whichever stack runs it.
        rng = random.Random(i + 1)
        expected = hashlib.sha256(b"".join(rng.randbytes(64) for _ in range(40))).hexdigest()
        assert p[f"sha256_{echo_rtt.PYSERVAL}"] == p[f"sha256_{echo_rtt.TCP}"] == expected
        ratio = p[f"rtt_us_median_{echo_rtt.PYSERVAL}"] / p[f"rtt_us_median_{echo_rtt.TCP}"]
        assert p["rtt_ratio"] == pytest.approx(ratio, abs=1e-3)
        for stack in (echo_rtt.PYSERVAL, echo_rtt.TCP):
            assert 0 < p[f"rtt_us_median_{stack}"] <= p[f"rtt_us_p99_{stack}"]
    assert r["rtt_ratio_median"] == pytest.approx(
        statistics.median(p["rtt_ratio"] for p in rounds), abs=1e-3
    )


class _Ctl:
    """Stands for the parent's pipe: one round of seed 7, then stop."""

    def __init__(self) -> None:
        self.commands: list[tuple[Any, ...]] = [("run", 7), ("stop",)]
        self.sent: list[tuple[str, Any]] = []

    async def next(self) -> tuple[Any, ...]:
        return self.commands.pop(0)

    def send(self, kind: str, value: Any) -> None:
        self.sent.append((kind, value))


@pytest.mark.parametrize(
    ("answer", "ok"),
    [(lambda m: m, True), (lambda m: m[:-1] + b"?", False), (lambda m: m[:3], False)],
)
def test_a_wrong_or_short_answer_is_not_ok(answer: Any, ok: bool) -> None:
    import asyncio

    async def exchange(msg: bytes) -> bytes:
        result: bytes = answer(msg)
        return result

    ctl = _Ctl()
    done = asyncio.run(echo_rtt._rounds(ctl, {"size": 16, "exchanges": 5}, exchange))  # type: ignore[arg-type]
    assert done == {"rounds": 1}
    ((kind, r),) = ctl.sent
    assert kind == "round" and r["ok"] is ok and len(r["rtts"]) == 5
    assert (r["sha256_sent"] == r["sha256_received"]) is ok

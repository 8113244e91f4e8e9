"""``benchmarks/connect_timeline.py``'s cycle tables against the wire.

The benchmark names each datagram of a connect cycle by its flags and joins the two
processes' timelines by the step tables. Here a simulated cycle's captured datagrams (the
same sans-I/O stack the benchmark runs on sockets) are run through its decoding: each
cycle must be six datagrams with the compact close and eight in the spec's order (the
design in ``transport/close_state.py``), in strict alternation from the client's SYN,
and a cycle that sends anything else must be reported, not measured as the table says.
"""

from __future__ import annotations

import itertools
import sys
from typing import Any

import pytest

from pyserval.transport.config import StreamConfig

from .helpers.processes import ROOT
from .simhelpers import A, make_pair
from .test_compact_close import _cycle, _watch

sys.path.insert(0, str(ROOT / "benchmarks"))
import connect_timeline as tl

# Datagrams per cycle, from the design: the compact close saves two of the spec's eight.
LENGTHS = {"compact": 6, "spec": 8}


def _captured(cycle: str) -> list[tuple[str, bytes]]:
    """(sender, datagram) of one simulated cycle, both ends configured as the benchmark's."""
    config = StreamConfig(**tl.CONFIG[cycle])
    p = make_pair(seed=7, config=config, server_config=config)
    sent = _watch(p)
    _cycle(p)
    return [("client" if src == A else "server", data) for src, data in sent]


def _stamps(captured: list[tuple[str, bytes]], side: str) -> list[tl.Stamp]:
    """What ``side``'s instrumentation would stamp: its sends, and reads of the other's."""
    stamps: list[tl.Stamp] = []
    for t, (sender, data) in enumerate(captured):
        if sender == side:
            stamps.append((t + 0.5, "sent", (float(t), [data])))
        else:
            stamps.append((t + 0.75, "read", [data]))
    return stamps


def _results(captured: list[tuple[str, bytes]], cycle: str) -> dict[str, Any]:
    """Each side's decoded events and sends, as its process hands them to the parent."""
    out = {}
    for side in ("client", "server"):
        events, sends = tl._events(_stamps(captured, side), side, cycle)
        out[side] = {"events": events, "sends": sends}
    return out


def test_the_cycles_are_the_benchmarks_names() -> None:
    assert set(tl.DATAGRAMS) == set(tl.STEPS) == set(tl.CONFIG) == set(LENGTHS)


@pytest.mark.parametrize("cycle", sorted(LENGTHS))
def test_a_simulated_cycle_is_its_table_and_every_step_finds_its_events(cycle: str) -> None:
    captured = _captured(cycle)
    n = LENGTHS[cycle]
    assert [sender for sender, _ in captured] == ["client", "server"] * (n // 2)
    kinds = [tl._kind(data) for _, data in captured]
    named = [(sender, k[0]) for (sender, _), k in zip(captured, kinds, strict=True) if k]
    assert named == list(tl.DATAGRAMS[cycle])
    syn = kinds[0]
    assert syn is not None
    flows = [syn[1]]  # the client's flowID: the benchmark keys a cycle by it
    results = _results(captured, cycle)
    for mine, side in enumerate(("client", "server")):
        events, sends = results[side]["events"], results[side]["sends"]
        assert {flow for _, _, flow in events + sends} == set(flows)
        # The client sends the even datagrams and reads the odd ones; the server the reverse.
        expected = {f"send {i}" for i in range(mine, n, 2)}
        expected |= {f"sent {i}" for i in range(mine, n, 2)}
        expected |= {f"read {i}" for i in range(1 - mine, n, 2)}
        assert {name for _, name, _ in events} == expected
    assert tl._off_table(results["client"], results["server"], flows, cycle) == (0, 0, None)
    # Every step's end points are events of the cycle (or the application's steps).
    apps = {"connect", "connected", "eof", "closed", "accepted"}
    names = {name for r in results.values() for _, name, _ in r["events"]}
    for step in tl.STEPS[cycle]:
        assert {step.start, step.end} <= names | apps, step


@pytest.mark.parametrize("cycle", sorted(LENGTHS))
def test_the_critical_path_is_one_chain_from_connect_to_aclose(cycle: str) -> None:
    # The client's loop: connect, read end of stream, aclose, connect again.
    chain = [step for step in tl.STEPS[cycle] if step.critical]
    assert chain[0].start == "connect" and chain[-1].end == "closed"
    for before, after in itertools.pairwise(chain):
        assert before.end == after.start, (before.name, after.name)
    server_close = [s for s in tl.STEPS[cycle] if s.name == tl.SERVER_CLOSE_STEP[cycle]]
    assert len(server_close) == 1 and not server_close[0].critical


@pytest.mark.parametrize("cycle", sorted(LENGTHS))
def test_a_cycle_off_its_table_is_counted_and_a_retransmission_is_not(cycle: str) -> None:
    captured = _captured(cycle)
    syn = tl._kind(captured[0][1])
    assert syn is not None
    flows = [syn[1]]
    # The other close's datagrams, read against this cycle's table.
    other = "spec" if cycle == "compact" else "compact"
    r = _results(_captured(other), cycle)
    off, again, example = tl._off_table(r["client"], r["server"], flows, cycle)
    assert (off, again) == (1, 0)
    assert example is not None and len(example) == LENGTHS[other]
    # The last datagram lost.
    r = _results(captured[:-1], cycle)
    assert tl._off_table(r["client"], r["server"], flows, cycle)[:2] == (1, 0)
    # The SYN-ACK sent again after the third ACK: the same datagrams, one twice.
    r = _results([*captured[:3], captured[1], *captured[3:]], cycle)
    assert tl._off_table(r["client"], r["server"], flows, cycle)[:2] == (0, 1)

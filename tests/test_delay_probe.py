"""``benchmarks/delay_probe.py``: the spin ``connect_slices.py --delay`` puts into one step
of the connect cycle to see whether that step holds up the rate.

The kinds are checked on the reference stack's own packets (``tests/data``'s copy of
``../shared/vectors/reference-capture.txt``, whose header names them: a handshake, data,
the TCP FIN exchange, then the SAL FIN exchange), the spin on reads that do and do not
bring the kind, and a run whose server spins two milliseconds a SYN.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from .helpers.processes import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import connect_slices as cs
import delay_probe

pytestmark = pytest.mark.timeout(120)

VECTORS = Path(__file__).resolve().parent / "data" / "reference-capture.txt"

# By capture index, from the capture's own description and the TCP flags it shows: the
# SYN, the SYN-ACK, the third ACK (with its SERVICE extension), two data segments and an
# ACK; then the FIN exchange (FIN, ACK, ... FIN, ACK) interleaved with the SAL FIN
# exchange, whose packets carry the SAL header alone.
EXPECTED = {
    0: "syn",
    1: "synack",
    2: "ack",
    3: "ack",
    4: "ack",
    5: "ack",
    8583: "fin",
    8584: "ack",
    8585: "control",
    8586: "control",
    8587: "fin",
    8588: "ack",
    8589: "control",
    8590: "control",
}


def _captured() -> dict[int, bytes]:
    out = {}
    for line in VECTORS.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        index, _src, _dst, payload = line.split()
        out[int(index)] = bytes.fromhex(payload)
    return out


def test_the_reference_stacks_packets_are_of_their_kinds() -> None:
    captured = _captured()
    assert set(captured) == set(EXPECTED)
    assert {i: delay_probe.kind_of(d) for i, d in captured.items()} == EXPECTED


@pytest.mark.parametrize("datagram", [b"", b"\x00" * 11, bytes(8) + b"\x03\x11" + bytes(22)])
def test_short_or_foreign_datagrams_are_other(datagram: bytes) -> None:
    # Under a whole SAL header, or a protocol that is not TCP (17: UDP) with a body.
    assert delay_probe.kind_of(datagram) == "other"


class _Endpoint:
    """Stands for UdpEndpoint: its two readers append what the socket held."""

    def __init__(self, datagrams: list[bytes]) -> None:
        self.datagrams = datagrams

    def _read_gro(self, sock: Any, batch: list[tuple[bytes, Any]]) -> tuple[int, bool]:
        batch.extend((d, ("127.0.0.1", 1)) for d in self.datagrams)
        return sum(map(len, self.datagrams)), False

    _read_plain = _read_gro


def test_a_read_spins_once_when_it_brings_the_kind(monkeypatch: pytest.MonkeyPatch) -> None:
    captured = _captured()
    spins: list[float] = []
    monkeypatch.setattr(delay_probe, "spin", spins.append)
    endpoint_class = type("E", (_Endpoint,), {})
    delay_probe.install(endpoint_class, "control", 250.0)
    # Two control packets in one read: one spin (a step, not a datagram, is delayed).
    both = endpoint_class([captured[8585], captured[8586]])
    batch: list[tuple[bytes, Any]] = []
    assert both._read_gro(None, batch) == (64, False)
    assert [d for d, _ in batch] == [captured[8585], captured[8586]]
    assert spins == [250.0]
    # A read with none: no spin, by either reader.
    endpoint_class([captured[0], captured[8583]])._read_plain(None, [])
    assert spins == [250.0]


def test_an_unknown_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown kind 'rst'"):
        delay_probe.install(type("E", (_Endpoint,), {}), "rst", 1.0)


def test_the_spin_is_a_busy_wait_until_its_end(monkeypatch: pytest.MonkeyPatch) -> None:
    # A CPU clock that moves 1 us per reading, and no sleeping allowed: a spin of 50 us
    # must keep reading it (it stays on its CPU, as work would) until 50 us have passed.
    readings: list[None] = []

    def clock() -> float:
        readings.append(None)
        return len(readings) * 1e-6

    def no_sleep(_seconds: float) -> None:
        raise AssertionError("the spin slept")

    monkeypatch.setattr(time, "process_time", clock)  # (the module delay_probe reads it from)
    monkeypatch.setattr(time, "sleep", no_sleep)
    delay_probe.spin(50)
    assert 50 <= len(readings) <= 52


def test_a_server_that_spins_on_each_syn_spends_that_much_more_cpu() -> None:
    # The same tree twice, the second (the ratio's numerator) delayed: its server spends
    # about 2 ms more CPU per connection, which no other change between them explains (a
    # loaded machine moves either stack's CPU per connection by some hundreds of us).
    src = str(ROOT / "src")
    stacks = (("delayed", "pyserval", src), ("base", "pyserval", src))
    r = cs.run(slices=2, seconds=0.2, warmup=0.0, stacks=stacks, delay=("server", "syn", 2000.0))
    assert r["ok"] is True
    assert r["delay"] == {"stack": "delayed", "role": "server", "kind": "syn", "us": 2000.0}
    assert r["goal"] is None and r["pairs_at_goal"] is None
    extra = [
        p["cpu_us_per_connection_delayed"] - p["cpu_us_per_connection_base"] for p in r["runs"]
    ]
    assert statistics.median(extra) >= 1000, extra
    assert r["ratio_median"] < 1.0


def test_a_delay_is_refused_for_a_stack_that_is_not_pyserval() -> None:
    with pytest.raises(ValueError, match="pyserval stack"):
        cs.run(
            slices=1,
            seconds=0.1,
            warmup=0.0,
            stacks=(cs.KINDS["tcp"], cs.KINDS["pyserval"]),
            delay=("server", "syn", 1.0),
        )
    with pytest.raises(SystemExit):
        cs.main(["--delay", "server:rst:10"])
    with pytest.raises(SystemExit):
        cs.main(["--delay", "server:syn:0"])
    with pytest.raises(SystemExit):
        cs.main(["--stacks", "tcp,pyserval", "--delay", "server:syn:10"])

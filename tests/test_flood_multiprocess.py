"""A SYN flood against a real listener process, directly and through a router (issue 11).

The scenario is ``benchmarks/syn_flood.py`` (processes on loopback, 100,000 forged SYNs in
5 s); the test holds it to the issue's targets: at least 90% of the legitimate connects made
during the flood succeed, all of those right after do, and the instance's memory grows by
less than 50 MB. Before SYN cookies, the same run let 7 of 40 through during the flood and
none after (the half-open table stayed full for minutes).
"""

from __future__ import annotations

import sys

import pytest

from .helpers.processes import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import syn_flood

pytestmark = [pytest.mark.slow, pytest.mark.serial, pytest.mark.timeout(120)]


@pytest.mark.parametrize("via", ["direct", "router"])
def test_syn_flood_does_not_lock_out_a_listener(via: str) -> None:
    r = syn_flood.run(100_000, 5.0, via, during=40, after=20)
    assert r["syns_sent"] == 100_000
    assert r["legit_during_ok"] >= 0.9 * r["legit_during"], r
    assert r["legit_after_ok"] == r["legit_after"], r
    assert r["instance_rss_growth"] < 50 * 2**20, r
    assert r["instance_counters"].get("packets_syn_cookie_sent", 0) > 50_000, r

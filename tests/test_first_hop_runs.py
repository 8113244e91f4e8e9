"""``sal.first_hop.forward_first_hops`` on runs of SYNs: one lookup per run, same bytes.

The batch loop looks a run of SYNs from one sender to one serviceID up once when the answer
needs no draw. The expectations here do not come from that loop: each forwarded SYN must be
byte for byte what the general forwarder (``forward_packet``: decode, add the path,
re-encode) makes of it for the hop its rule names; each entry's hits must be the number of
SYNs it answered; a weighted rule must draw once per SYN (a second table with the same seed,
drawn once per SYN, names the hops); anything else must reach the callbacks in batch order.
"""

from __future__ import annotations

import random
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from pyserval.naming.service_id import ServiceID
from pyserval.sal import (
    ControlExt,
    ControlFlags,
    Rule,
    SalPacket,
    ServiceExt,
    ServiceTable,
    Target,
    TcpHeader,
    decode_packet,
)
from pyserval.sal.first_hop import forward_first_hops
from pyserval.sal.forwarding import forward_packet

Addr = tuple[str, int]
ROUTER: Addr = ("10.0.0.9", 7000)
SERVER: Addr = ("10.0.0.2", 54325)
SERVER6: Addr = ("fd00::2", 54325)
BCAST: Addr = ("10.0.0.255", 54325)
SENDERS: tuple[Addr, ...] = (("10.0.0.1", 40000), ("10.0.0.1", 40001), ("fd00::1", 40000))
WEIGHTED = (Target(SERVER, 1), Target(("10.0.0.3", 1), 3))
# Service name -> rule (None: no entry at all).
RULES: dict[str, Rule | None] = {
    "fwd": Rule.forward(SERVER),
    "fwd6": Rule.forward(SERVER6),
    "weighted": Rule.forward(*WEIGHTED),
    "bcast": Rule.forward(BCAST),
    "dropped": Rule.drop(),
    "unknown": None,
}
NAMES = tuple(RULES)


def _table(seed: int) -> ServiceTable:
    table = ServiceTable(rng=random.Random(seed))
    for name, rule in RULES.items():
        if rule is not None:
            table.add(name, rule)
    return table


def _syn(service: str, flowid: int, payload: bytes) -> bytes:
    ctl = ControlExt(ControlFlags.SYN, flowid, 0, bytes(8))
    sid = ServiceID.from_name(service)
    return SalPacket(flowid, 0, 6, [ctl, ServiceExt(sid)], TcpHeader(), payload).encode()


class _Calls:
    """The callbacks, recording what reached them."""

    def __init__(self) -> None:
        self.declined: list[tuple[bytes, Addr]] = []
        self.other: list[tuple[bytes, Addr]] = []
        self.errors: list[Exception] = []
        self.drops: Counter[str] = Counter()
        self.out: list[tuple[bytes, Addr, Addr]] = []

    def run(self, batch: list[tuple[bytes, Addr]], table: ServiceTable) -> tuple[int, int]:
        return forward_first_hops(
            batch,
            ROUTER,
            table.lookup_int,
            {BCAST},
            lambda hop, me: ("fd00::9", 7000) if ":" in hop[0] else me,
            self.out,
            lambda data, src: self.declined.append((data, src)),
            lambda data, src: self.other.append((data, src)),
            self.errors.append,
            self.drops,
        )


syn_picks = st.lists(
    st.tuples(
        st.integers(0, len(NAMES) - 1),
        st.integers(0, len(SENDERS) - 1),
        st.integers(1, 2**32 - 1),
        st.binary(max_size=24),
        st.integers(1, 6),  # how many SYNs in a row (a run) with these
    ),
    max_size=10,
)


@settings(max_examples=150, deadline=None)
@given(syn_picks, st.integers(0, 2**16))
def test_runs_forward_what_the_general_forwarder_makes(
    picks: list[tuple[int, int, int, bytes, int]], seed: int
) -> None:
    batch: list[tuple[bytes, Addr]] = []
    for name_i, sender_i, flowid, payload, repeat in picks:
        for k in range(repeat):  # distinct flowIDs: as from separate connections
            data = _syn(NAMES[name_i], (flowid + k) % 2**32 or 1, payload)
            # A fresh tuple per datagram, as a socket read gives (equal, not identical).
            host, port = SENDERS[sender_i]
            batch.append((data, (host, port)))
    table = _table(seed)
    draws = _table(seed)  # the weighted rule's picks, one draw per SYN, in order
    calls = _Calls()
    syns, taken = calls.run(batch, table)

    expected_out: list[tuple[bytes, Addr]] = []
    expected_declined: list[tuple[bytes, Addr]] = []
    hits: Counter[str] = Counter()
    no_rebroadcast = 0
    for data, src in batch:
        name = NAMES[[ServiceID.from_name(n).value for n in NAMES].index(_sid(data))]
        rule = RULES[name]
        if rule is None or not rule.targets:
            expected_declined.append((data, src))  # the general path decides (and counts)
            continue
        hits[name] += 1
        if name == "weighted":
            res = draws.lookup(name)
            assert res is not None and res.target is not None
            hop = res.target.address
        else:
            hop = rule.targets[0].address
        if hop == BCAST:
            no_rebroadcast += 1
            continue
        expected_out.append((forward_packet(data, decode_packet(data), src, ROUTER, hop), hop))

    assert [(data, hop) for data, _, hop in calls.out] == expected_out
    assert calls.declined == expected_declined and calls.other == [] and calls.errors == []
    assert dict(calls.drops) == ({"no_rebroadcast": no_rebroadcast} if no_rebroadcast else {})
    assert (syns, taken) == (len(expected_out), len(expected_out) + no_rebroadcast)
    for name, rule in RULES.items():
        if rule is not None:
            entry = table.get(name)
            assert entry is not None and entry.hits == hits[name], name
    for data, _, _ in calls.out:
        decode_packet(data)  # the incrementally updated checksum verifies


def _sid(data: bytes) -> int:
    return int.from_bytes(data[36:68], "big")


def test_a_long_run_counts_every_hit_and_each_syn_keeps_its_own_bytes() -> None:
    table = _table(1)
    batch = [(_syn("fwd", i, b""), ("10.0.0.1", 40000)) for i in range(1, 301)]
    calls = _Calls()
    assert calls.run(batch, table) == (300, 300)
    entry = table.get("fwd")
    assert entry is not None and entry.hits == 300
    for (data, src), (out, local, hop) in zip(batch, calls.out, strict=True):
        assert (local, hop) == (ROUTER, SERVER)
        assert out == forward_packet(data, decode_packet(data), src, ROUTER, SERVER)


def test_a_call_out_of_the_loop_ends_the_run() -> None:
    """The general path may change the table: the SYN after it is looked up again."""
    table = _table(1)
    moved: Addr = ("10.0.0.4", 5000)
    sender: Addr = ("10.0.0.1", 40000)

    def other(data: bytes, src: Addr) -> None:
        table.replace("fwd", [Rule.forward(moved)])

    batch = [
        (_syn("fwd", 1, b""), sender),
        (_syn("fwd", 2, b""), sender),
        (b"not a SYN", sender),
        (_syn("fwd", 3, b""), sender),
    ]
    out: list[tuple[bytes, Addr, Addr]] = []
    forward_first_hops(
        batch, ROUTER, table.lookup_int, (), lambda h, m: m, out, other, other, print, Counter()
    )
    assert [hop for _, _, hop in out] == [SERVER, SERVER, moved]
    entry = table.get("fwd")
    assert entry is not None and entry.hits == 3  # replace() keeps the entry and its hits


def test_bad_layouts_and_checksums_go_to_the_general_path_in_order() -> None:
    table = _table(1)
    sender: Addr = ("10.0.0.1", 40000)
    good = _syn("fwd", 5, b"x")
    bad_check = good[:10] + bytes(2) + good[12:]
    ack = bytearray(good)
    ack[14] |= 0x20  # SYN+ACK: not a first-hop SYN
    batch = [
        (good[:67], sender),  # short
        (bad_check, sender),
        (bytes(ack), sender),
        (good, sender),
        (good[:9] + b"\x11" + good[10:], sender),  # protocol 17: not TCP
    ]
    calls = _Calls()
    assert calls.run(batch, table) == (1, 1)
    assert calls.other == [batch[0], batch[1], batch[2], batch[4]]
    entry = table.get("fwd")
    assert entry is not None and entry.hits == 1

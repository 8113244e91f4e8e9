"""A router's batched receive (``HostCore.receive_datagrams``) against the per-packet path.

The batch form forwards first-hop SYNs of the usual layout inline; everything else goes to the
per-packet path. The expectation is the per-packet path itself (``receive_datagram``, which
the other forwarding tests check against the spec): two routers built alike, one fed the
batch, one fed the same datagrams one at a time, must send the same bytes in the same
order and count the same things.
"""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from pyserval.core.host import HostCore, Listener
from pyserval.sal import Rule, Target, decode_packet

CLIENT = ("10.0.0.1", 40000)
CLIENT6 = ("fd00::1", 40000)
ROUTER = ("10.0.0.9", 7000)
ROUTER6 = ("fd00::9", 7000)
SERVER = ("10.0.0.2", 54325)
SERVER6 = ("fd00::2", 54325)
BCAST = ("10.0.0.255", 54325)
Addr = tuple[str, int]


def _router(seed: int) -> tuple[HostCore, Listener]:
    router = HostCore([ROUTER, ROUTER6], rng=random.Random(seed), forwarding=True)
    table = router.service_table
    table.add("fwd", Rule.forward(SERVER))
    table.add("fwd6", Rule.forward(SERVER6))
    table.add("weighted", Rule.forward(Target(SERVER, 1), Target(("10.0.0.3", 1), 3)))
    table.add("bcast", Rule.forward(BCAST))
    table.add("loop", Rule.forward(CLIENT))
    table.add("named", Rule.forward(("not-an-ip", 5000)))  # forwarded; the send fails
    table.add("dropped", Rule.drop())
    table.add("delayed", Rule.delay())
    router.broadcast.add(BCAST)
    listener = router.listen("local")
    return router, listener


def _syn(service: str, source: Addr = CLIENT, seed: int = 7) -> bytes:
    client = HostCore([source], rng=random.Random(seed))
    client.service_table.add(service, Rule.forward(ROUTER))
    client.connect(service, 0.0)
    ((data, _, _),) = client.datagrams_to_send(0.0)
    return data


def _datagram(service: str) -> bytes:
    client = HostCore([CLIENT], rng=random.Random(11))
    client.service_table.add(service, Rule.forward(ROUTER))
    mine = client.bind_datagram("me")
    client.send_datagram(mine, service, b"ping")
    ((data, _, _),) = client.datagrams_to_send(0.0)
    return data


def _mixed() -> list[tuple[bytes, Addr]]:
    services = ("fwd", "fwd6", "weighted", "bcast", "loop", "named", "dropped", "delayed")
    batch = [(_syn(s, seed=i), CLIENT) for i, s in enumerate(services)]
    batch.append((_syn("local"), CLIENT))  # DEMUX on the router itself: a SYN-ACK
    batch.append((_syn("fwd", CLIENT6), CLIENT6))  # an IPv6 sender: SOURCE6
    batch.append((_datagram("fwd"), CLIENT))
    batch.append((_syn("unknown"), CLIENT))  # no rule at all
    once, _ = _router(1)  # a SYN a forwarder already touched: the general path
    once.receive_datagram(_syn("fwd", seed=4), CLIENT, ROUTER, 0.0)
    ((touched, _, _),) = once.datagrams_to_send(0.0)
    batch.append((touched, ("10.0.0.7", 7000)))
    bad = _syn("fwd", seed=3)
    batch.append((bad[:10] + bytes(2) + bad[12:], CLIENT))  # a bad checksum
    batch.append((b"\x00" * 40, CLIENT))  # junk
    batch.append((b"", CLIENT))
    # The same again, so per-sender templates and hits are reused and counted twice.
    return batch + batch[:4]


def _outcome(router: HostCore) -> tuple[object, ...]:
    hits = {e.prefix: e.hits for e in router.service_table}
    return (
        router.datagrams_to_send(0.0),
        dict(router.stats),
        dict(router.drops),
        router.received,
        hits,
        len(router.delayed),
        [type(e).__name__ for e in router.internal_errors],
    )


def test_batch_matches_the_per_packet_path_on_a_mixed_batch() -> None:
    batch = _mixed()
    one, _ = _router(5)
    for data, src in batch:
        one.receive_datagram(data, src, ROUTER, 0.0)
    many, _ = _router(5)
    many.receive_datagrams(batch, ROUTER, 0.0)
    expected, got = _outcome(one), _outcome(many)
    assert got == expected
    stats = many.stats
    # The batch exercised each kind of outcome (else the comparison proves little).
    assert stats["forwarded_syn"] >= 6 and stats["forwarded_datagram"] == 1
    assert many.drops["no_rebroadcast"] == 2 and many.drops["loop"] == 2  # fast, general
    assert many.drops["syn_no_service"] == 2 and len(many.delayed) == 1
    assert many.drops["bad_checksum"] == 1 and many.drops["short_header"] == 1


def test_batch_forwarded_bytes_carry_the_path() -> None:
    router, _ = _router(1)
    router.receive_datagrams([(_syn("fwd"), CLIENT), (_syn("fwd6"), CLIENT)], ROUTER, 0.0)
    (out4, local4, hop4), (out6, local6, hop6) = router.datagrams_to_send(0.0)
    assert (local4, hop4) == (ROUTER, SERVER) and (local6, hop6) == (ROUTER6, SERVER6)
    assert decode_packet(out4).source_path() == [CLIENT, ROUTER]
    assert decode_packet(out6).source_path() == [CLIENT, ROUTER]


def test_a_host_that_does_not_forward_takes_batches_packet_by_packet() -> None:
    host = HostCore([SERVER], rng=random.Random(2))
    host.listen("fwd")
    host.receive_datagrams([(_syn("fwd"), CLIENT), (b"junk", CLIENT)], SERVER, 0.0)
    assert host.received == 2 and host.stats["forwarded_syn"] == 0
    assert len(host.datagrams_to_send(0.0)) == 1  # the SYN-ACK


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 15), st.integers(0, 99), st.integers(0, 255)), max_size=12)
)
def test_batch_matches_per_packet_for_mutated_packets(
    picks: list[tuple[int, int, int]],
) -> None:
    base = _mixed()
    batch = []
    for index, pos, value in picks:
        data, src = base[index % len(base)]
        if data:
            mutated = bytearray(data)
            mutated[pos % len(data)] = value
            data = bytes(mutated)
        batch.append((data, src))
    one, _ = _router(9)
    for data, src in batch:
        one.receive_datagram(data, src, ROUTER, 0.0)
    many, _ = _router(9)
    many.receive_datagrams(batch, ROUTER, 0.0)
    assert _outcome(many) == _outcome(one)
    assert many.internal_errors == []

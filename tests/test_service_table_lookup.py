"""The service table's per-packet path against a brute-force model written here.

``lookup_int`` walks a slot's trie, falls back to the short-prefix level, and draws
weighted targets of two to four from the shared state's slots (more: bisect over a tuple).
These tests check every lookup's entry, action, drawn target and hit count against a model
that knows nothing of tries or strides: the longest stored prefix by a linear scan, and the
weighted pick as ``random.choices`` defines it (``x = random() * total``; the first target
whose running total of weights exceeds ``x``), fed from a second generator with the same
seed. The tables go through removals and re-insertions first.
"""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from pyserval.naming.service_id import ServiceID, ServicePrefix
from pyserval.sal.service_table import Action, Entry, Rule, ServiceTable, Target

BITS = 256
ALL = (1 << BITS) - 1
HOPS = [Target((f"10.0.0.{i}", 4000 + i), weight=1 + i % 7) for i in range(1, 9)]


def _rule_for(kind: int, rng: random.Random) -> Rule:
    """One rule per prefix: weighted FORWARD to 2..6 targets (both draw paths), plain
    FORWARD, DEMUX, DELAY or DROP."""
    if kind == 0:
        return Rule.forward(*rng.sample(HOPS, rng.randint(2, 6)))
    if kind == 1:
        return Rule.forward(rng.choice(HOPS))
    if kind == 2:
        return Rule.demux(f"listener-{rng.randrange(4)}")
    return Rule.delay() if kind == 3 else Rule.drop()


def _longest(stored: dict[tuple[int, int], Rule], value: int) -> tuple[int, int] | None:
    """The longest stored prefix containing ``value``, by a scan of all of them."""
    best: tuple[int, int] | None = None
    for prefix_value, length in stored:
        inside = length == 0 or value >> (BITS - length) == prefix_value >> (BITS - length)
        if inside and (best is None or length > best[1]):
            best = (prefix_value, length)
    return best


def _expected_target(rule: Rule, model_rng: random.Random) -> Target:
    """random.choices' weighted pick, spelled out (consumes one draw, as the table does)."""
    x = model_rng.random() * sum(t.weight for t in rule.targets)
    running = 0
    for target in rule.targets:
        running += target.weight
        if x < running:
            return target
    return rule.targets[-1]


prefix_specs = st.lists(
    st.tuples(
        # Lengths around the strides (8 and up), short ones, word edges, exact IDs.
        st.sampled_from([0, 1, 5, 8, 9, 10, 11, 12, 16, 24, 31, 64, 100, 255, 256])
        | st.integers(0, BITS),
        st.integers(0, 2**20 - 1),  # value: one of a few clusters, then jitter
        st.integers(0, 4),  # rule kind
    ),
    min_size=1,
    max_size=120,
)
CLUSTERS = [0, ALL, 0xABCD << 240, 0x5A5A5A5A << 224]


@settings(max_examples=80, deadline=None)
@given(prefix_specs, st.integers(0, 2**32), st.integers(0, 2**32))
def test_lookups_match_a_brute_force_model_after_removals_and_reinsertions(
    specs: list[tuple[int, int, int]], seed: int, draw_seed: int
) -> None:
    rng = random.Random(seed)
    stored: dict[tuple[int, int], Rule] = {}
    table = ServiceTable(rng=random.Random(draw_seed))
    for length, jitter, kind in specs:
        base = CLUSTERS[jitter % 5] if jitter % 5 < 4 else rng.getrandbits(BITS)
        value = (base ^ (jitter << max(0, BITS - length - 20))) & ALL
        value = value >> (BITS - length) << (BITS - length) if length else 0
        rule = _rule_for(kind, rng)
        table.replace(ServicePrefix(ServiceID(value), length), [rule])
        stored[(value, length)] = rule
    # Remove about half, then put some back with other rules (and add their neighbours).
    removed = [key for key in sorted(stored) if rng.random() < 0.5]
    for key in removed:
        table.remove(ServicePrefix(ServiceID(key[0]), key[1]))
        del stored[key]
    for value, length in removed[::2]:
        rule = _rule_for(rng.randrange(5), rng)
        table.add(ServicePrefix(ServiceID(value), length), rule)
        stored[(value, length)] = rule
    table._check()
    for entry in table:
        entry.hits = 0

    probes = [rng.getrandbits(BITS) for _ in range(30)] + [0, ALL]
    for value, length in sorted(stored):
        free = BITS - length
        probes += [value, value | ((1 << free) - 1), value | rng.getrandbits(free)]
        if length:
            probes.append(value ^ (1 << free))  # just outside: the last prefix bit flipped
    model_rng = random.Random(draw_seed)
    hits: dict[tuple[int, int], int] = {}
    for value in probes:
        want = _longest(stored, value)
        res = table.lookup_int(value) if value & 1 else table.lookup(ServiceID(value))
        if want is None:
            assert res is None
            continue
        assert res is not None
        prefix = res.entry.prefix
        assert (prefix.value, prefix.length) == want, hex(value)
        hits[want] = hits.get(want, 0) + 1
        rule = stored[want]
        assert res.action is rule.action
        if rule.action is Action.FORWARD and len(rule.targets) > 1:
            assert type(res) is not Entry  # a draw: a resolution of its own
            assert res.target == _expected_target(rule, model_rng)
        else:
            assert res is res.entry  # the entry is its own answer
            assert res.target == (rule.targets[0] if rule.targets else None)
            assert res.listener == rule.listener
    for entry in table:
        prefix = entry.prefix
        assert entry.hits == hits.get((prefix.value, prefix.length), 0)


class _Fixed(random.Random):
    """A generator whose random() returns the given values in turn."""

    def __init__(self, values: list[float]) -> None:
        super().__init__(0)
        self._values = list(values)

    def random(self) -> float:
        return self._values.pop(0)


def test_weighted_draws_at_the_edges_of_each_weight() -> None:
    """random() just below and at each running total's share, for 2 to 6 targets (the
    inline slots and the bisect tuple): the first target whose running total exceeds x."""
    for n in range(2, 7):
        targets = [Target((f"10.1.0.{i}", 5000), weight=3 + 2 * i) for i in range(n)]
        total = sum(t.weight for t in targets)
        draws: list[float] = [0.0, 1.0 - 2**-53]  # the smallest and largest random() values
        running = 0
        for target in targets:
            running += target.weight
            draws += [(running - 1e-9) / total, running / total]
        draws = [r for r in draws if r < 1.0]
        bounds = list(zip(targets, _running(targets), strict=True))
        want = []
        for r in draws:
            x = r * total  # as the table scales it
            want.append(next((t for t, c in bounds if x < c), targets[-1]))
        # Every target is wanted at least once: the edges were hit on both sides.
        assert set(want) == set(targets)
        table = ServiceTable(rng=_Fixed(draws))
        table.add("ab/8", Rule.forward(*targets))
        got = []
        for _ in draws:
            res = table.lookup(ServiceID("ab".ljust(64, "f")))
            assert res is not None
            got.append(res.target)
        assert got == want, n
        # Entry.resolve draws the same way.
        entry = table.get("ab/8")
        assert entry is not None
        assert [entry.resolve(_Fixed([r])).target for r in draws] == want, n


def _running(targets: list[Target]) -> list[int]:
    out, running = [], 0
    for target in targets:
        running += target.weight
        out.append(running)
    return out

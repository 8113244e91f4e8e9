"""The service table: rules, precedence, longest-prefix match, counters, bounds."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyserval.naming.service_id import InvalidServiceID, ServiceID, ServicePrefix
from pyserval.sal.service_table import (
    Action,
    Entry,
    NoSuchEntry,
    NoSuchRule,
    Resolution,
    Rule,
    ServiceTable,
    ServiceTableError,
    ServiceTableFull,
    Target,
)

BITS = 256
ALL = (1 << BITS) - 1
A = ("10.0.0.1", 5000)
B = ("10.0.0.2", 5000)
C = ("10.0.0.3", 5000)


def prefix(value: int, length: int) -> ServicePrefix:
    """A prefix from an int whose leading `length` bits are kept."""
    return ServicePrefix(ServiceID(value & ALL), length)


def sid(hex_head: str) -> ServiceID:
    """An ID from its leading hex digits (zero padded on the right)."""
    return ServiceID(hex_head.ljust(64, "0"))


class Listener:
    """Stands in for a listening socket (opaque to the table)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"Listener({self.name})"


# -- Target and Rule validation ------------------------------------------------------------


def test_target_defaults_and_list_address() -> None:
    t = Target(A)
    assert t.address == A and t.weight == 1
    listed = Target(["10.0.0.1", 5000], 3)  # type: ignore[arg-type]
    assert listed.address == A and isinstance(listed.address, tuple)
    assert hash(Target(A, 2)) == hash(Target(A, 2))


@pytest.mark.parametrize("weight", [0, -1, True, 1.5, "2"])
def test_target_weight_must_be_positive_int(weight: object) -> None:
    with pytest.raises(ValueError, match="weight"):
        Target(A, weight)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "address",
    [
        ("10.0.0.1",),
        ("10.0.0.1", 5000, 1),
        ("", 5000),
        ("10.0.0.1", 70000),
        ("10.0.0.1", -1),
        ("10.0.0.1", "5000"),
        (1, 5000),
        ("10.0.0.1", True),
        "10.0.0.1:5000",
        None,
    ],
)
def test_target_address_is_checked(address: object) -> None:
    with pytest.raises(ValueError, match=r"address|port|host"):
        Target(address)  # type: ignore[arg-type]


def test_rule_constructors() -> None:
    fwd = Rule.forward(A, Target(B, 3), priority=2)
    assert fwd.action is Action.FORWARD and fwd.priority == 2
    assert fwd.targets == (Target(A), Target(B, 3)) and fwd.listener is None
    listener = Listener("l")
    dmx = Rule.demux(listener, priority=-1)
    assert dmx.action is Action.DEMUX and dmx.listener is listener and dmx.targets == ()
    assert Rule.delay().action is Action.DELAY and Rule.drop(priority=5).priority == 5
    assert Rule(Action.FORWARD, 0, [Target(A)]).targets == (Target(A),)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Rule(Action.FORWARD), "at least one target"),
        (lambda: Rule.forward(), "at least one target"),
        (lambda: Rule(Action.FORWARD, 0, (Target(A),), object()), "no listener"),
        (lambda: Rule(Action.DEMUX), "needs a listener"),
        (lambda: Rule(Action.DEMUX, 0, (Target(A),), object()), "no targets"),
        (lambda: Rule(Action.DROP, 0, (Target(A),)), "no targets"),
        (lambda: Rule(Action.DELAY, 0, (), object()), "no listener"),
        (lambda: Rule("forward", 0, (Target(A),)), "Action"),  # type: ignore[arg-type]
        (lambda: Rule(Action.DROP, True), "priority"),
        (lambda: Rule(Action.DROP, 1.0), "priority"),  # type: ignore[arg-type]
        (lambda: Rule(Action.FORWARD, 0, (A,)), "tuple of Target"),  # type: ignore[arg-type]
        (lambda: Rule.forward(("10.0.0.1", 99999)), "port"),
    ],
)
def test_rule_validation(make: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()  # type: ignore[operator]


def test_rules_are_frozen_values() -> None:
    rule = Rule.forward(A)
    with pytest.raises(AttributeError):
        rule.priority = 3  # type: ignore[misc]
    assert rule == Rule.forward(A) and rule != Rule.forward(A, priority=1)


# -- add / get / remove / replace ----------------------------------------------------------


def test_add_creates_entry_and_get_is_exact() -> None:
    table = ServiceTable()
    p = prefix(0xABCD << 240, 16)
    entry = table.add(p, Rule.forward(A))
    assert isinstance(entry, Entry)
    assert entry.prefix == p and entry.rules == (Rule.forward(A),) and entry.hits == 0
    assert table.get(p) is entry and table.get("abcd/16") is entry
    assert table.get(prefix(0xABCD << 240, 15)) is None
    assert table.get(prefix(0xABCD << 240, 17)) is None
    assert p in table and "abcd/17" not in table and 42 not in table
    assert len(table) == 1 and table.rule_count == 1 and bool(table)
    assert table.add(p, Rule.drop(priority=1)) is entry
    assert list(entry.rules) == [Rule.drop(priority=1), Rule.forward(A)]
    assert len(table) == 1 and table.rule_count == 2
    table._check()


def test_adding_an_equal_rule_twice_is_a_no_op() -> None:
    table = ServiceTable()
    table.add("abcd/16", Rule.forward(A))
    entry = table.add("abcd/16", Rule.forward(A))
    assert entry.rules == (Rule.forward(A),) and table.rule_count == 1


def test_add_refuses_non_rules_and_bad_prefixes() -> None:
    table = ServiceTable()
    with pytest.raises(TypeError, match="Rule"):
        table.add("abcd/16", Action.DROP)  # type: ignore[arg-type]
    with pytest.raises(InvalidServiceID):
        table.add("abcd/300", Rule.drop())
    with pytest.raises(InvalidServiceID):
        table.add(12, Rule.drop())  # type: ignore[arg-type]
    assert len(table) == 0


def test_text_forms_ids_and_names() -> None:
    table = ServiceTable()
    web = ServiceID.from_name("web")
    table.add("web", Rule.forward(A))  # a name is its /256 prefix
    table.add(web.hex[:8] + "/32", Rule.forward(B))
    assert table.get(web) is not None and table.get(ServicePrefix(web, 256)) is not None
    assert table.match("web") is table.get("web")
    assert table.match(web.hex) is table.get(web)
    assert table.match(web.value) is table.get(web)  # ints are IDs too
    assert table.match(web.to_bytes()) is table.get(web)
    other = ServiceID(web.value ^ 1)
    match = table.match(other)
    assert match is not None and match.prefix == ServicePrefix(web, 32)
    with pytest.raises(InvalidServiceID, match="prefix"):
        table.match("abcd/16")


def test_remove_rule_then_entry() -> None:
    table = ServiceTable()
    table.add("abcd/16", Rule.forward(A))
    table.add("abcd/16", Rule.drop())
    table.remove("abcd/16", Rule.drop())
    entry = table.get("abcd/16")
    assert entry is not None and entry.rules == (Rule.forward(A),) and table.rule_count == 1
    table.remove("abcd/16", Rule.forward(A))  # the last rule takes the entry with it
    assert table.get("abcd/16") is None and len(table) == 0 and table.rule_count == 0


def test_remove_whole_entry() -> None:
    table = ServiceTable()
    table.add("abcd/16", Rule.forward(A))
    table.add("abcd/16", Rule.forward(B, priority=2))
    table.remove("abcd/16")
    assert len(table) == 0 and table.rule_count == 0 and table.match(sid("abcd")) is None


def test_remove_missing_raises_no_such_entry() -> None:
    table = ServiceTable()
    table.add("abcd/16", Rule.forward(A))
    with pytest.raises(NoSuchEntry) as info:
        table.remove("abcd/17")
    assert isinstance(info.value, KeyError) and isinstance(info.value, ServiceTableError)
    assert str(info.value).startswith("no service table entry at abcd")
    assert str(info.value).endswith("/17")  # the message, not KeyError's quoted repr
    with pytest.raises(NoSuchRule, match="has no rule") as rule_info:
        table.remove("abcd/16", Rule.drop())
    assert isinstance(rule_info.value, NoSuchEntry)
    assert table.rule_count == 1


def test_replace_sets_rules() -> None:
    table = ServiceTable()
    entry = table.add("abcd/16", Rule.forward(A))
    same = table.replace("abcd/16", [Rule.drop(), Rule.delay(priority=3), Rule.drop()])
    assert same is entry
    assert entry.rules == (Rule.delay(priority=3), Rule.drop())  # sorted, deduplicated
    assert table.rule_count == 2
    res = table.lookup(sid("abcd"))
    assert res is not None and res.action is Action.DELAY
    created = table.replace("abce/16", (Rule.drop(),))
    assert created is not None and table.get("abce/16") is created and len(table) == 2
    assert table.replace("abcd/16", []) is None and table.get("abcd/16") is None
    assert table.replace("abcf/16", []) is None  # nothing there, nothing to do
    assert len(table) == 1 and table.rule_count == 1
    with pytest.raises(TypeError):
        table.replace("abce/16", [Rule.drop(), "drop"])  # type: ignore[list-item]
    assert table.get("abce/16") is created and created.rules == (Rule.drop(),)
    table._check()


def test_clear() -> None:
    table = ServiceTable()
    for i in range(300):
        table.add(prefix(i << 200, 56), Rule.drop())
    assert table.stride > 8
    table.clear()
    assert len(table) == 0 and table.rule_count == 0 and list(table) == []
    assert table.stride == 8 and table.match(ServiceID(0)) is None
    table.add("/0", Rule.drop())
    assert table.match(ServiceID(123)) is not None


def test_max_entries() -> None:
    table = ServiceTable(max_entries=2)
    assert table.max_entries == 2
    table.add("abcd/16", Rule.drop())
    table.add("abce/16", Rule.drop())
    table.add("abce/16", Rule.delay())  # more rules on an existing entry are fine
    with pytest.raises(ServiceTableFull, match="max_entries=2") as info:
        table.add("abcf/16", Rule.drop())
    assert "abcf" in str(info.value) and isinstance(info.value, ServiceTableError)
    with pytest.raises(ServiceTableFull):
        table.replace("abcf/16", [Rule.drop()])
    assert len(table) == 2 and table.rule_count == 3 and table.get("abcf/16") is None
    table.remove("abcd/16")
    table.add("abcf/16", Rule.drop())
    assert len(table) == 2
    table._check()


@pytest.mark.parametrize("bad", [0, -1, True, 2.0])
def test_max_entries_must_be_positive_int(bad: object) -> None:
    with pytest.raises(ValueError, match="max_entries"):
        ServiceTable(max_entries=bad)  # type: ignore[arg-type]


# -- resolution precedence -----------------------------------------------------------------


def test_longest_prefix_wins_whatever_the_priorities() -> None:
    table = ServiceTable()
    table.add("/0", Rule.drop(priority=100))
    table.add("ab/8", Rule.forward(A, priority=50))
    table.add("abcd/16", Rule.forward(B))
    table.add("abcdef/24", Rule.delay(priority=-5))
    cases = {
        "abcdef": Action.DELAY,
        "abcdee": Action.FORWARD,
        "abce": Action.FORWARD,
        "ac": Action.DROP,
        "ff": Action.DROP,
    }
    for head, action in cases.items():
        res = table.lookup(sid(head))
        assert res is not None and res.action is action, head
    res = table.lookup(sid("abcdee"))
    assert res is not None and res.target == Target(B)
    res = table.lookup(sid("abce"))
    assert res is not None and res.target == Target(A)


def test_only_the_highest_priority_counts() -> None:
    table = ServiceTable(rng=random.Random(3))
    table.add("abcd/16", Rule.forward(A, priority=1))
    table.add("abcd/16", Rule.forward(B, priority=0))
    table.add("abcd/16", Rule.demux(Listener("low"), priority=0))
    for _ in range(50):
        res = table.lookup(sid("abcd"))
        assert res is not None and res.action is Action.FORWARD and res.target == Target(A)
    table.remove("abcd/16", Rule.forward(A, priority=1))
    res = table.lookup(sid("abcd"))
    assert res is not None and res.action is Action.DEMUX  # the next priority takes over


def test_demux_beats_forward_and_first_demux_wins() -> None:
    table = ServiceTable()
    first, second = Listener("first"), Listener("second")
    table.add("abcd/16", Rule.forward(A))
    table.add("abcd/16", Rule.demux(first))
    table.add("abcd/16", Rule.demux(second))
    table.add("abcd/16", Rule.drop())
    res = table.lookup(sid("abcd"))
    assert res is not None
    assert res.action is Action.DEMUX and res.listener is first and res.target is None
    table.remove("abcd/16", Rule.demux(first))
    res = table.lookup(sid("abcd"))
    assert res is not None and res.listener is second


def test_forward_then_delay_then_drop() -> None:
    table = ServiceTable()
    table.add("abcd/16", Rule.drop())
    table.add("abcd/16", Rule.delay())
    table.add("abcd/16", Rule.forward(A))
    entry = table.get("abcd/16")
    assert entry is not None
    res = table.lookup(sid("abcd"))
    assert res is not None and res.action is Action.FORWARD and entry.action is Action.FORWARD
    table.remove("abcd/16", Rule.forward(A))
    res = table.lookup(sid("abcd"))
    assert res is not None and res.action is Action.DELAY and res.target is None
    table.remove("abcd/16", Rule.delay())
    res = table.lookup(sid("abcd"))
    assert res is not None and res.action is Action.DROP
    assert res.target is None and res.listener is None


def test_default_rule_is_the_zero_length_prefix() -> None:
    table = ServiceTable()
    assert table.lookup(ServiceID(5)) is None and table.match(ServiceID(5)) is None
    default = table.add(ServicePrefix.default(), Rule.forward(C))
    assert default.prefix == ServicePrefix(ServiceID(0), 0) and table.get("/0") is default
    table.add("ab/8", Rule.drop())
    rng = random.Random(0)
    for _ in range(200):
        value = rng.getrandbits(BITS)
        entry = table.match(ServiceID(value))
        assert entry is not None
        assert entry.prefix.length == (8 if value >> 248 == 0xAB else 0)
    table.remove("/0")
    assert table.match(sid("ac")) is None and table.match(sid("ab")) is not None


def test_resolution_is_an_immutable_shared_answer() -> None:
    table = ServiceTable()
    entry = table.add("abcd/16", Rule.forward(A))
    res = table.lookup(sid("abcd"))
    assert isinstance(res, Resolution) and res.entry is entry
    assert table.lookup(sid("abcd")) is res  # precomputed, not rebuilt per lookup
    with pytest.raises(AttributeError):
        res.action = Action.DROP  # type: ignore[misc]  # the point: a read-only property
    assert "FORWARD" in repr(res) and "10.0.0.1" in repr(res)
    assert entry.resolve(random.Random(1)) is res
    assert "abcd" in repr(entry)


def test_lookup_forms_agree_and_count_hits() -> None:
    table = ServiceTable()
    entry = table.add("abcd/16", Rule.forward(A))
    target = sid("abcd12")
    assert table.match(target) is entry and entry.hits == 0  # match counts nothing
    assert table.lookup(target) is table.lookup_int(target.value)
    assert table.lookup(target.hex) is table.lookup(target.value)
    assert entry.hits == 4
    assert table.lookup(sid("abce")) is None
    assert entry.hits == 4
    entry.hits = 0
    table.lookup_int(target.value)
    assert entry.hits == 1
    other = table.add("abcd12/24", Rule.drop())
    table.lookup(target)
    assert other.hits == 1 and entry.hits == 1


def test_hits_survive_rule_changes() -> None:
    table = ServiceTable()
    entry = table.add("abcd/16", Rule.forward(A))
    table.lookup(sid("abcd"))
    table.add("abcd/16", Rule.forward(B))
    table.lookup(sid("abcd"))
    assert entry.hits == 2


# -- iteration -----------------------------------------------------------------------------


def test_iteration_is_in_prefix_value_then_length_order() -> None:
    table = ServiceTable()
    rng = random.Random(7)
    want = set()
    for _ in range(600):  # enough to make the stride grow past some of the lengths
        length = rng.choice([0, 1, 4, 8, 9, 10, 12, 16, 24, 64, 255, 256])
        base = rng.choice([0, ALL, 0xAB << 248, rng.getrandbits(BITS)])
        p = prefix(base ^ rng.getrandbits(12) << (BITS - 12), length)
        want.add((p.value, p.length))
        table.add(p, Rule.drop())
    got = [(e.prefix.value, e.prefix.length) for e in table]
    assert got == sorted(want)
    # A snapshot: removing while iterating is fine.
    for entry in table:
        table.remove(entry.prefix)
    assert len(table) == 0 and list(table) == []


# -- weighted choice -----------------------------------------------------------------------


def _spread(table: ServiceTable, service: ServiceID, n: int) -> Counter[tuple[str, int]]:
    seen: Counter[tuple[str, int]] = Counter()
    for _ in range(n):
        res = table.lookup(service)
        assert res is not None and res.action is Action.FORWARD and res.target is not None
        seen[res.target.address] += 1
    return seen


def test_weighted_choice_follows_the_weights() -> None:
    table = ServiceTable(rng=random.Random(12345))
    table.add("abcd/16", Rule.forward(Target(A, 1), Target(B, 3)))
    table.add("abcd/16", Rule.forward(Target(C, 6)))  # same priority: pooled
    table.add("abcd/16", Rule.forward(("10.9.9.9", 1), priority=-1))  # lower: never used
    n = 40_000
    seen = _spread(table, sid("abcd"), n)
    assert set(seen) == {A, B, C}
    chi2 = 0.0
    for address, weight in ((A, 1), (B, 3), (C, 6)):
        p = weight / 10
        mean, sd = n * p, math.sqrt(n * p * (1 - p))
        assert abs(seen[address] - mean) < 5 * sd, (address, seen)
        chi2 += (seen[address] - mean) ** 2 / mean
    assert chi2 < 18.4  # chi-square, 2 degrees of freedom, p = 1e-4


def test_weighted_choice_is_repeatable_with_a_seed() -> None:
    def run(seed: int) -> list[tuple[str, int]]:
        table = ServiceTable(rng=random.Random(seed))
        table.add("abcd/16", Rule.forward(A, B, C))
        out = []
        for _ in range(100):
            res = table.lookup(sid("abcd"))
            assert res is not None and res.target is not None
            out.append(res.target.address)
        return out

    assert run(1) == run(1) and run(1) != run(2)


def test_a_single_target_needs_no_draw() -> None:
    class NoRandom(random.Random):
        def random(self) -> float:
            raise AssertionError("no draw expected")

    table = ServiceTable(rng=NoRandom())
    table.add("abcd/16", Rule.forward(Target(A, 5)))
    table.add("ab/8", Rule.demux(Listener("x")))
    assert table.lookup(sid("abcd")) is not None and table.lookup(sid("ab")) is not None


# -- structure: brute-force reference ------------------------------------------------------


def _reference_match(stored: dict[tuple[int, int], object], value: int) -> tuple[int, int] | None:
    best: tuple[int, int] | None = None
    for key_value, length in stored:
        if (value ^ key_value) >> (BITS - length) == 0 and (best is None or length > best[1]):
            best = (key_value, length)
    return best


def _probe_ids(stored: dict[tuple[int, int], object], rng: random.Random) -> list[int]:
    """Random IDs plus IDs inside, at the edges of and just outside the stored prefixes."""
    out = [rng.getrandbits(BITS) for _ in range(20)] + [0, ALL]
    for value, length in list(stored)[:60]:
        free = BITS - length
        out.append(value | rng.getrandbits(free) if free else value)
        out.append(value)  # lowest ID inside
        out.append(value | ((1 << free) - 1))  # highest ID inside
        if length:
            out.append(value ^ (1 << free))  # last prefix bit flipped: just outside
        out.append((value - 1) & ALL)
        out.append((value + (1 << free)) & ALL)
    return out


def _check_against_reference(
    table: ServiceTable, stored: dict[tuple[int, int], object], rng: random.Random
) -> None:
    table._check()
    assert len(table) == len(stored)
    assert [(e.prefix.value, e.prefix.length) for e in table] == sorted(stored)
    for value in _probe_ids(stored, rng):
        want = _reference_match(stored, value)
        got = table.match(ServiceID(value))
        assert (None if got is None else (got.prefix.value, got.prefix.length)) == want, hex(value)
        res = table.lookup_int(value)
        assert (res is None) == (want is None)
        assert res is None or res.entry is got


# Prefixes cluster around a few roots with bits flipped near the end, so they nest and
# share long runs of bits (the hard cases for a path-compressed trie).
ROOTS = [0, ALL, 0xABCD << 240, 0x8000 << 240, 0x5A5A5A5A << 224]
# Lengths at and around the strides the table uses (8 to 22) and at the word edges.
INTERESTING_LENGTHS = sorted(
    {0, 1, 2, *range(7, 25), 31, 32, 33, 63, 64, 65, 127, 128, 129, 200, 254, 255, 256}
)


@st.composite
def clustered_prefixes(draw: st.DrawFn) -> tuple[int, int]:
    root = draw(st.sampled_from(ROOTS) | st.integers(0, ALL))
    length = draw(st.sampled_from(INTERESTING_LENGTHS) | st.integers(0, BITS))
    value = root
    for back in draw(st.lists(st.integers(0, 10), max_size=3)):
        position = length - 1 - back
        if position >= 0:
            value ^= 1 << (BITS - 1 - position)
    p = prefix(value, length)
    return p.value, p.length


RULES = [Rule.drop(), Rule.delay(), Rule.forward(A), Rule.forward(B, priority=1)]
operations = st.lists(
    st.tuples(
        st.sampled_from(["add", "add", "add", "remove", "remove_rule", "replace"]),
        clustered_prefixes(),
        st.integers(0, len(RULES) - 1),
        st.integers(0, 10**6),
    ),
    max_size=80,
)


@settings(max_examples=120)
@given(operations, st.integers(0, 2**32))
def test_match_agrees_with_brute_force(
    ops: list[tuple[str, tuple[int, int], int, int]], seed: int
) -> None:
    table = ServiceTable(rng=random.Random(seed))
    stored: dict[tuple[int, int], list[Rule]] = {}
    for op, key, rule_index, pick in ops:
        rule = RULES[rule_index]
        if op in ("remove", "remove_rule") and stored and pick % 3:
            key = sorted(stored)[pick % len(stored)]  # mostly remove something that is there
        p = ServicePrefix(ServiceID(key[0]), key[1])
        if op == "add":
            table.add(p, rule)
            rules = stored.setdefault(key, [])
            if rule not in rules:
                rules.append(rule)
        elif op == "remove":
            if key in stored:
                table.remove(p)
                del stored[key]
            else:
                with pytest.raises(NoSuchEntry):
                    table.remove(p)
        elif op == "remove_rule":
            if key in stored and rule in stored[key]:
                table.remove(p, rule)
                stored[key].remove(rule)
                if not stored[key]:
                    del stored[key]
            else:
                with pytest.raises(NoSuchEntry):
                    table.remove(p, rule)
        else:
            new_rules = RULES[rule_index:] if pick % 2 else []
            table.replace(p, new_rules)
            if new_rules:
                stored[key] = list(new_rules)
            else:
                stored.pop(key, None)
        entry = table.get(p)
        assert (entry is None) == (key not in stored)
    assert table.rule_count == sum(len(r) for r in stored.values())
    for key, rules in stored.items():
        entry = table.get(ServicePrefix(ServiceID(key[0]), key[1]))
        assert entry is not None
        assert sorted(entry.rules, key=repr) == sorted(rules, key=repr)
    _check_against_reference(table, dict.fromkeys(stored), random.Random(seed))


def test_large_clustered_table_with_growth_and_removals() -> None:
    """Thousands of nested prefixes: the stride grows several times; then half go away."""
    rng = random.Random(2024)
    table = ServiceTable(rng=rng)
    stored: dict[tuple[int, int], object] = {}
    roots = [rng.getrandbits(BITS) for _ in range(40)] + ROOTS
    while len(stored) < 6000:
        root = rng.choice(roots)
        length = rng.choice(INTERESTING_LENGTHS + [rng.randint(0, BITS)] * 4)
        value = root ^ (rng.getrandbits(14) << max(0, BITS - length))
        p = prefix(value, length)
        stored[(p.value, p.length)] = None
        table.add(p, Rule.drop())
    assert table.stride >= 14
    _check_against_reference(table, stored, rng)
    for key in rng.sample(sorted(stored), len(stored) // 2):
        table.remove(ServicePrefix(ServiceID(key[0]), key[1]))
        del stored[key]
    _check_against_reference(table, stored, rng)
    for key in list(stored):
        table.remove(ServicePrefix(ServiceID(key[0]), key[1]))
    assert len(table) == 0 and all(root is None for root in table._roots)
    assert all(slot is None for slot in table._short)


# -- shared rule sets (memory) ---------------------------------------------------------------


def test_entries_with_equal_rules_share_one_copy() -> None:
    table = ServiceTable()
    first = table.add("aa/8", Rule.forward(A))
    second = table.add("bb/8", Rule.forward(A))  # an equal rule, another object
    third = table.add("cc/8", Rule.forward(B))
    assert first.rules is second.rules and first.rules[0] is second.rules[0]
    assert third.rules is not first.rules
    table.add("bb/8", Rule.drop(priority=-1))  # second's rules change: no longer shared
    assert second.rules != first.rules and first.rules == (Rule.forward(A),)
    table._check()


def test_rule_sets_no_entry_uses_are_forgotten() -> None:
    table = ServiceTable(rng=random.Random(3))
    for i in range(200):
        table.add(prefix(i << 200, 56), Rule.forward(Target(A, 1 + i), Target(B, 2)))
    assert len(table._states) == 200
    table._check()
    for i in range(200):
        table.remove(prefix(i << 200, 56))
    assert len(table) == 0 and table._states == {}
    table._check()


def test_weighted_resolution_names_its_entry_and_follows_rule_changes() -> None:
    table = ServiceTable(rng=random.Random(4))
    entry = table.add("abcd/16", Rule.forward(A))
    assert table.lookup(sid("abcd")) is entry and entry.target == Target(A)
    table.add("abcd/16", Rule.forward(B))  # two FORWARD rules: a draw per lookup
    picks = {table.lookup(sid("abcd")) for _ in range(50)}
    resolutions = [r for r in picks if isinstance(r, Resolution)]
    assert len(resolutions) == len(picks) and all(r.entry is entry for r in resolutions)
    assert all(r.action is Action.FORWARD and r.listener is None for r in resolutions)
    assert {r.target.address for r in resolutions if r.target is not None} == {A, B}
    assert entry.hits == 51 and "FORWARD" in repr(next(iter(picks)))
    table.remove("abcd/16", Rule.forward(A))
    assert table.lookup(sid("abcd")) is entry and entry.target == Target(B)
    table._check()


def test_unhashable_listener_still_works() -> None:
    class Unhashable:
        __hash__ = None  # type: ignore[assignment]

    table = ServiceTable()
    listener = Unhashable()
    entry = table.add("abcd/16", Rule.demux(listener))
    res = table.lookup(sid("abcd"))
    assert res is entry and res.listener is listener and res.action is Action.DEMUX
    table.remove("abcd/16")
    assert len(table) == 0
    table._check()

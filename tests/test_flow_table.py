"""The flow table: random allocation, bounds, lookups."""

from __future__ import annotations

import random

import pytest

from pyserval.sal import FlowTable, FlowTableFull


def test_add_get_remove() -> None:
    table: FlowTable[str] = FlowTable(rng=random.Random(1))
    a = table.add("a")
    b = table.add("b")
    assert a != b and 0 < a <= 0xFFFFFFFF
    assert table.get(a) == "a" and table[b] == "b" and a in table and len(table) == 2
    assert table.remove(a) == "a" and table.get(a) is None and table.remove(a) is None
    with pytest.raises(KeyError, match="no flow"):
        table[a]
    assert sorted(table) == [b] and list(table.items()) == [(b, "b")]


def test_bounded_with_clear_error() -> None:
    table: FlowTable[int] = FlowTable(max_flows=3)
    for i in range(3):
        table.add(i)
    with pytest.raises(FlowTableFull, match="max_flows=3"):
        table.add(4)
    with pytest.raises(FlowTableFull):
        table.insert(77, 4)


def test_insert_refuses_duplicates_and_zero() -> None:
    table: FlowTable[str] = FlowTable()
    table.insert(7, "x")
    with pytest.raises(KeyError, match="already in use"):
        table.insert(7, "y")
    with pytest.raises(ValueError):
        table.insert(0, "zero")


def test_allocation_is_random_and_unique() -> None:
    table: FlowTable[int] = FlowTable(max_flows=10_000, rng=random.Random(9))
    ids = [table.add(i) for i in range(5000)]
    assert len(set(ids)) == 5000
    assert ids != sorted(ids)

"""The sender's scoreboard as a sorted map that is cheap where a sender uses it.

A subflow's scoreboard (``Recovery.segments``: start offset -> ``SentSegment``) changes
at its two ends: every new segment is added after the last one, a cumulative ACK removes
from the front, and the rest of the segment an ACK cuts in two goes back at the front. A
general sorted container (``sortedcontainers.SortedDict``) pays a bisection and an insort
for each of these, about 2 us per segment sent and acknowledged in CPython; here both are a
list append or an index step, with the keys in one list (``_keys[_head:]``, ascending) and
the segments in a dict. Keys in the middle (never needed by the sender, supported for
completeness) are inserted or removed by bisection, in O(n).

:class:`SackedRuns` is the other structure loss recovery keeps beside it: the maximal runs
of adjacent SACKed segments as disjoint ranges, so that a SACK block is processed by
jumping over what earlier blocks already covered instead of visiting each of its segments
again on every ACK.

What it does not do: decide anything about loss (``recovery.py`` does), or keep more than
one value per key.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Iterator
from typing import Final, Generic, TypeVar

__all__ = ["SackedRuns", "Scoreboard"]

V = TypeVar("V")

# The front of the key list is cut off (one list copy) once this many removed keys
# are skipped there and they are at least half the list: O(1) amortised per key.
_COMPACT_AFTER: Final = 64


class Scoreboard(Generic[V]):
    """A map from int keys to values, iterated in key order (the subset of
    ``SortedDict``'s interface that :mod:`.recovery` uses, plus :meth:`pop_through`)."""

    __slots__ = ("_keys", "_head", "_map")

    def __init__(self) -> None:
        self._keys: list[int] = []  # ascending; live from _head on
        self._head = 0
        self._map: dict[int, V] = {}

    def __len__(self) -> int:
        return len(self._map)

    def __bool__(self) -> bool:
        return bool(self._map)

    def __contains__(self, key: object) -> bool:
        return key in self._map

    def __getitem__(self, key: int) -> V:
        return self._map[key]

    def get(self, key: int) -> V | None:
        """The value under ``key``, None when absent."""
        return self._map.get(key)

    def __setitem__(self, key: int, value: V) -> None:
        m = self._map
        if key in m:
            m[key] = value
            return
        keys = self._keys
        head = self._head
        if head == len(keys) or key > keys[-1]:
            keys.append(key)  # a new segment: the common case
        elif key < keys[head]:
            if head:
                head -= 1
                keys[head] = key  # the rest of a partly acknowledged segment
                self._head = head
            else:
                keys.insert(0, key)
        else:
            keys.insert(bisect_left(keys, key, head), key)
        m[key] = value

    def extend(self, keys: range, values: list[V]) -> None:
        """Add ``values`` under the ascending ``keys`` (segments sent as one train)."""
        mine = self._keys
        if keys and len(mine) > self._head and keys[0] <= mine[-1]:
            for k, v in zip(keys, values, strict=True):
                self[k] = v  # not after the last key: one by one
            return
        mine.extend(keys)
        self._map.update(zip(keys, values, strict=True))

    def __delitem__(self, key: int) -> None:
        del self._map[key]  # KeyError when absent, as for a dict
        keys = self._keys
        head = self._head
        if keys[head] == key:
            self._advance(head + 1)
        else:
            del keys[bisect_left(keys, key, head)]

    def _advance(self, head: int) -> None:
        keys = self._keys
        if head == len(keys):
            keys.clear()
            head = 0
        elif head >= _COMPACT_AFTER and head * 2 >= len(keys):
            del keys[:head]
            head = 0
        self._head = head

    def __iter__(self) -> Iterator[int]:
        return iter(self._keys[self._head :])

    def __reversed__(self) -> Iterator[int]:
        return reversed(self._keys[self._head :])

    def keys(self) -> list[int]:
        """The keys in ascending order (a copy)."""
        return self._keys[self._head :]

    def values(self) -> list[V]:
        """The values in key order."""
        m = self._map
        return [m[k] for k in self._keys[self._head :]]

    def items(self) -> list[tuple[int, V]]:
        """(key, value) pairs in key order (a copy: the map may change meanwhile)."""
        m = self._map
        return [(k, m[k]) for k in self._keys[self._head :]]

    def peekitem(self, index: int = 0) -> tuple[int, V]:
        """The first (``index`` 0) or last (-1) pair; IndexError when empty."""
        if not self._map:
            raise IndexError("peekitem on an empty scoreboard")
        if index == 0:
            key = self._keys[self._head]
        elif index == -1:
            key = self._keys[-1]
        else:
            key = self._keys[self._head :][index]
        return key, self._map[key]

    def irange(self, low: int, high: int) -> list[int]:
        """The keys in [low, high), ascending."""
        keys = self._keys
        head = self._head
        return keys[bisect_left(keys, low, head) : bisect_left(keys, high, head)]

    def pop_through(self, bound: int) -> list[V]:
        """Remove every entry whose key is below ``bound`` and return their values in key
        order (the caller checked that each one ends at or below ``bound``)."""
        keys = self._keys
        head = self._head
        i = bisect_left(keys, bound, head)
        if i == head:
            return []
        # (map, not a comprehension: in CPython 3.11 a comprehension is a call of its own,
        # and this runs for every ACK that moves the left edge.)
        out = list(map(self._map.pop, keys[head:i]))
        self._advance(i)
        return out

    def first_key_from(self, low: int) -> int | None:
        """The first key at or above ``low`` (None when no key is)."""
        keys = self._keys
        i = bisect_left(keys, low, self._head)
        return keys[i] if i < len(keys) else None

    def items_from(self, low: int) -> Iterator[tuple[int, V]]:
        """(key, value) pairs from the first key at or above ``low`` on, in key order, without
        copying the keys (so the caller must not add or remove keys while it iterates; a
        copy of the tail would cost what walking the whole window costs)."""
        keys = self._keys
        m = self._map
        i = bisect_left(keys, low, self._head)
        n = len(keys)
        while i < n:
            k = keys[i]
            yield k, m[k]
            i += 1

    def last_key_below(self, bound: int) -> int | None:
        """The last key below ``bound`` (None when no key is)."""
        keys = self._keys
        i = bisect_left(keys, bound, self._head)
        return keys[i - 1] if i > self._head else None

    def clear(self) -> None:
        """Remove everything."""
        self._keys.clear()
        self._head = 0
        self._map.clear()

    def __repr__(self) -> str:
        return f"Scoreboard({dict(self.items())!r})"


class SackedRuns:
    """Disjoint half-open ranges [start, end) of the sequence space, each one a maximal run
    of adjacent SACKed segments (the caller adds a segment's range when it SACKs it).

    Two sorted lists, starts and ends; adding a range merges it with the run that ends
    where it starts and the one that starts where it ends. A sender has a handful of runs
    (one per hole it is waiting to fill), so the lists stay short and a bisection finds
    the run around an offset.
    """

    __slots__ = ("_starts", "_ends")

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []

    def __len__(self) -> int:
        return len(self._starts)

    def __bool__(self) -> bool:
        return bool(self._starts)

    def ranges(self) -> list[tuple[int, int]]:
        """The runs in ascending order (a copy)."""
        return list(zip(self._starts, self._ends, strict=True))

    def skip(self, offset: int) -> int:
        """The end of the run that holds ``offset``; ``offset`` itself when none does."""
        i = bisect_right(self._starts, offset) - 1
        if i >= 0:
            end = self._ends[i]
            if end > offset:
                return end
        return offset

    def add(self, start: int, end: int) -> None:
        """Add [start, end), which overlaps no run."""
        starts = self._starts
        ends = self._ends
        i = bisect_right(starts, start)
        joins_next = i < len(starts) and starts[i] == end
        if i and ends[i - 1] == start:
            if joins_next:  # fills the gap between two runs: one run
                ends[i - 1] = ends[i]
                del starts[i]
                del ends[i]
            else:
                ends[i - 1] = end
        elif joins_next:
            starts[i] = start
        else:
            starts.insert(i, start)
            ends.insert(i, end)

    def cut_below(self, bound: int) -> None:
        """Forget everything below ``bound`` (a cumulative ACK): runs that end at or below
        it go, one that spans it starts there."""
        starts = self._starts
        ends = self._ends
        i = bisect_right(ends, bound)
        if i:
            del starts[:i]
            del ends[:i]
        if starts and starts[0] < bound:
            starts[0] = bound

    def clear(self) -> None:
        """Forget every run."""
        self._starts.clear()
        self._ends.clear()

    def __repr__(self) -> str:
        return f"SackedRuns({self.ranges()!r})"

"""The service table: serviceID prefix -> rules, longest-prefix match.

Every Serval host and router keeps one. Each entry is a prefix of the 256-bit serviceID
space (compared most significant bit first) holding one or more :class:`Rule` objects.
The ``/0`` entry (prefix of length 0) is the default rule: it matches every serviceID.

Resolution (:meth:`ServiceTable.lookup`) takes the entry with the **longest prefix that
matches** the serviceID, then looks only at that entry's rules of the **highest priority**.
Among those rules the result is, in order of precedence:

1. ``DEMUX`` if any rule is DEMUX: a local listener beats forwarding. With several DEMUX
   rules, the first added wins.
2. ``FORWARD`` if any rule is FORWARD: one target is picked at random, weighted by
   :attr:`Target.weight`, over *all* targets of *all* the FORWARD rules at that priority.
3. ``DELAY`` if any rule is DELAY (hold the packet until a rule appears).
4. ``DROP`` otherwise.

Lower-priority rules, and shorter prefixes, are never consulted while a longer prefix has
any rule: they are there for when the better rules are removed.

Data structure: a path-compressed binary trie over the ID bits, MSB first, under a
direct-indexed first level (the shape of an LC-trie's root):

* The top ``k`` bits of an ID index two flat lists. ``k`` grows with the table, 1 bit at a
  time from 8 to 22, keeping four slots or more per entry (up to 1M entries); growing
  re-places every entry once, like a hash table resize (amortised O(1) per add). Only
  :meth:`clear` shrinks it.
* Prefixes of at most ``k`` bits live in that first level by controlled prefix expansion:
  each slot of the second list points at the longest of them covering it.
* Longer prefixes live in one path-compressed trie per slot (Patricia style). Every node
  is a prefix: either an entry, or a pure branch node where two prefixes part, which always
  has two children (removing an entry re-compresses the trie around it). A node branches on
  the bit just past its prefix. The descent only tests bits; an entry node is checked with
  one xor and one comparison, and a failed check ends the walk, since nothing below it can
  match either. With the first level sized as above a lookup visits about one node.
* Per-packet cost in a big table is mostly memory latency, so: entries are their own trie
  nodes and, unless a weighted draw is needed, their own :class:`Resolution` (a lookup
  touches the slot, the node and its key, nothing else), the answer (and the cumulative
  weights of a weighted pick) is computed when rules change, not per lookup, and the
  per-packet path allocates only short-lived ints (and, for a weighted pick, the small
  resolution it returns). A weighted pick among two to four targets reads the weights and
  targets from the shared state's own slots (one object, where a tuple of weights and one
  of targets were two more misses: a weighted lookup cost two to three times a plain one).
* Memory: a million rules with a few hundred next hops hold few distinct rule sets, so the
  rules, their Rule and Target objects and the precomputed answer live in a shared
  ``_State`` per distinct set (interned, counted, forgotten when no entry uses it); an
  entry is six slots (an 80-byte block) plus its key int. At 1M entries that is under 300
  bytes per rule all in, index included (``benchmarks/service_table.py``).

No I/O, no clock. Not thread safe (the asyncio stack uses it from one thread).
"""

from __future__ import annotations

import contextlib
import enum
import random
from bisect import bisect_right
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import accumulate
from typing import Any, Final

from ..naming.service_id import (
    SERVICE_ID_BITS,
    PrefixLike,
    ServiceID,
    ServiceLike,
    ServicePrefix,
    as_service_id,
    as_service_prefix,
)
from .inet import Address

__all__ = [
    "Action",
    "Entry",
    "NoSuchEntry",
    "NoSuchRule",
    "Resolution",
    "Rule",
    "ServiceTable",
    "ServiceTableError",
    "ServiceTableFull",
    "Target",
]

_BITS: Final = SERVICE_ID_BITS
_ALL: Final = (1 << _BITS) - 1
# Tables of shared big ints, so that nodes do not each hold their own copies.
# _BIT[n]: the mask of bit n (0 = MSB), the bit a node of length n branches on (there is no
# bit past a /256: its entry, 0, is never used).
_BIT: Final[tuple[int, ...]] = (*(1 << (_BITS - 1 - n) for n in range(_BITS)), 0)
# _LIM[n]: 2**(256-n); an ID is inside the /n prefix with value `key` iff (id ^ key) < _LIM[n]
# (a comparison, which unlike a shift allocates nothing). Also _BIT[n] == _LIM[n] >> 1.
_LIM: Final[tuple[int, ...]] = tuple(1 << (_BITS - n) for n in range(_BITS + 1))
# An entry keeps its prefix value with bit 400 set as well (_HIGH), and every node its limit
# as _LIM[n] | _HIGH (_LIM_H): in (id ^ key) >= lim the two high bits cancel out, and an id
# (under 2**256) never reaches them, so the lookup code is the same. What it buys: a 401-bit
# int takes an 80-byte pymalloc block, the size of an Entry, so the key is carved from the
# same pool as its entry, right after it (the entry is allocated first), where a 256-bit
# int would take a 64-byte block in another pool, on another page. A lookup in a big table
# pays for memory latency, and the entry and its key then share a page (one TLB miss, not
# two) and mostly adjacent cache lines. It costs 16 bytes per entry.
_HIGH: Final = 1 << 400
_LIM_H: Final[tuple[int, ...]] = tuple(lim | _HIGH for lim in _LIM)
# _MASK[n]: the first n bits set.
_MASK: Final[tuple[int, ...]] = tuple(_ALL ^ ((1 << (_BITS - n)) - 1) for n in range(_BITS + 1))
# Stride (bits indexed directly): grows by 1 bit (2x the slots) once there are more entries
# than a quarter of the slots, up to 22 bits: two lists of 4M slots, 64 MiB, from 512Ki
# entries on. (Four slots or more per entry: a lookup visits about 1.2 trie nodes at 1M
# entries; with two, 1.4 and a slower lookup for 32 B less per entry.)
_STRIDES: Final = tuple(range(8, 23))


# -- errors ---------------------------------------------------------------------------------


class ServiceTableError(Exception):
    """Base class of the service table's own errors."""


class NoSuchEntry(ServiceTableError, KeyError):
    """There is no entry (or no such rule) at the prefix named in the message."""

    def __str__(self) -> str:
        # KeyError would show the repr of the message, quotes and all.
        return str(self.args[0]) if self.args else "no such entry"


class NoSuchRule(NoSuchEntry):
    """The entry exists but does not hold the rule that was to be removed."""


class ServiceTableFull(ServiceTableError, RuntimeError):
    """Adding the entry would exceed the table's ``max_entries``."""


# -- rules ----------------------------------------------------------------------------------


class Action(enum.Enum):
    """What a rule does with a packet for a matching serviceID."""

    FORWARD = "forward"  # send to one of the rule's targets (next hop)
    DEMUX = "demux"  # deliver to a local listening socket
    DELAY = "delay"  # hold the packet (e.g. until a controller installs a rule)
    DROP = "drop"  # discard


@dataclass(frozen=True, slots=True)
class Target:
    """A next hop for FORWARD: ``address`` is ``(ip_text, udp_port)``, ``weight`` > 0."""

    address: Address
    weight: int = 1

    def __post_init__(self) -> None:
        address: object = self.address
        if isinstance(address, list):
            address = tuple(address)
            object.__setattr__(self, "address", address)
        if not (
            isinstance(address, tuple)
            and len(address) == 2
            and isinstance(address[0], str)
            and isinstance(address[1], int)
            and not isinstance(address[1], bool)
        ):
            raise ValueError(f"target address must be an (ip, port) tuple: {address!r}")
        host, port = address
        if not host:
            raise ValueError(f"target address has an empty host: {address!r}")
        if not 0 <= port <= 0xFFFF:
            raise ValueError(f"target port must be 0..65535: {address!r}")
        weight: object = self.weight
        if isinstance(weight, bool) or not isinstance(weight, int):
            raise ValueError(f"target weight must be an int: {weight!r}")
        if weight <= 0:
            raise ValueError(f"target weight must be > 0, got {weight} for {address!r}")


@dataclass(frozen=True, slots=True)
class Rule:
    """One rule of an entry.

    FORWARD needs at least one target and no listener; DEMUX needs a listener (the local
    listening socket, opaque to the table) and no targets; DELAY and DROP take neither.
    Higher ``priority`` wins; equal rules are the same rule (adding one twice is a no-op).
    """

    action: Action
    priority: int = 0
    targets: tuple[Target, ...] = ()
    listener: object | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.action, Action):
            raise ValueError(f"rule action must be an Action: {self.action!r}")
        priority: object = self.priority
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise ValueError(f"rule priority must be an int: {priority!r}")
        targets: object = self.targets
        if isinstance(targets, list):
            targets = tuple(targets)
            object.__setattr__(self, "targets", targets)
        if not isinstance(targets, tuple) or not all(isinstance(t, Target) for t in targets):
            raise ValueError(f"rule targets must be a tuple of Target: {targets!r}")
        action = self.action
        if action is Action.FORWARD:
            if not targets:
                raise ValueError("a FORWARD rule needs at least one target")
            if self.listener is not None:
                raise ValueError("a FORWARD rule takes no listener")
        else:
            if targets:
                raise ValueError(f"a {action.name} rule takes no targets: {targets!r}")
            if action is Action.DEMUX:
                if self.listener is None:
                    raise ValueError("a DEMUX rule needs a listener")
            elif self.listener is not None:
                raise ValueError(f"a {action.name} rule takes no listener")

    @classmethod
    def forward(cls, *destinations: Target | Address, priority: int = 0) -> Rule:
        """FORWARD to these targets; a bare ``(ip, port)`` is a target of weight 1."""
        targets = tuple(d if isinstance(d, Target) else Target(d) for d in destinations)
        return cls(Action.FORWARD, priority, targets)

    @classmethod
    def demux(cls, listener: object, priority: int = 0) -> Rule:
        """DEMUX to a local listener."""
        return cls(Action.DEMUX, priority, (), listener)

    @classmethod
    def delay(cls, priority: int = 0) -> Rule:
        """DELAY packets for matching serviceIDs."""
        return cls(Action.DELAY, priority)

    @classmethod
    def drop(cls, priority: int = 0) -> Rule:
        """DROP packets for matching serviceIDs."""
        return cls(Action.DROP, priority)


def _neg_priority(rule: Rule) -> int:
    return -rule.priority


# -- entries and resolutions ---------------------------------------------------------------


class Resolution:
    """The outcome of a lookup: the ``entry`` that matched and what to do.

    ``target`` is the chosen :class:`Target` for FORWARD (else None); ``listener`` is the
    local listener for DEMUX (else None). Read only.

    An entry whose answer needs no draw is its own resolution (the same object on every
    lookup, nothing stored besides the entry); a weighted FORWARD pick returns a small
    resolution made for that lookup (one object, not one per target kept per entry).
    """

    __slots__ = ()

    @property
    def entry(self) -> Entry:
        """The entry that answered the lookup."""
        raise NotImplementedError

    @property
    def action(self) -> Action:
        """What to do with the packet."""
        raise NotImplementedError

    @property
    def target(self) -> Target | None:
        """The chosen next hop (FORWARD), else None."""
        raise NotImplementedError

    @property
    def listener(self) -> object | None:
        """The local listener (DEMUX), else None."""
        raise NotImplementedError

    def _describe(self) -> str:
        extra = ""
        if self.target is not None:
            extra = f", target={self.target!r}"
        elif self.listener is not None:
            extra = f", listener={self.listener!r}"
        return f"Resolution({self.action.name}, prefix={self.entry.prefix}{extra})"


class _Pick(Resolution):
    """A weighted FORWARD choice: the entry and the target drawn for one lookup."""

    __slots__ = ("_entry", "_target")
    _entry: Entry
    _target: Target

    def __init__(self, entry: Entry, target: Target) -> None:
        self._entry = entry
        self._target = target

    @property
    def entry(self) -> Entry:
        """The entry that answered the lookup."""
        return self._entry

    @property
    def action(self) -> Action:
        """Always FORWARD."""
        return Action.FORWARD

    @property
    def target(self) -> Target | None:
        """The target drawn for this lookup."""
        return self._target

    @property
    def listener(self) -> object | None:
        """Always None."""
        return None

    def __repr__(self) -> str:
        return self._describe()


class _State:
    """What an entry's rules resolve to, shared by every entry with equal rules.

    A table of a million rules has few distinct rule sets (a few hundred next hops), so the
    rules, their Rule and Target objects and the precomputed answer are held once per
    distinct set (interned by the table, with a count of the entries using it) rather than
    once per entry.
    """

    __slots__ = (
        "action",
        "c0",
        "c1",
        "c2",
        "hi",
        "listener",
        "pick",
        "rules",
        "t0",
        "t1",
        "t2",
        "t3",
        "target",
        "total",
        "users",
    )
    rules: tuple[Rule, ...]
    action: Action
    target: Target | None  # the one target (FORWARD with one target), else None
    listener: object | None  # DEMUX
    # How a lookup draws a target (x = random() * total, the target is the first whose
    # cumulative weight exceeds x, as random.choices picks): None, no draw (the entry is
    # its own answer); True, two to four targets, drawn from the slots below, so that a
    # weighted lookup reads the state and nothing else; or, for more targets, one tuple of
    # the cumulative weights then the targets, for bisect_right (Any: ints, then Targets).
    pick: tuple[Any, ...] | bool | None
    total: int  # the sum of the weights
    hi: int  # the number of targets less one: the last weight's index
    # Inline draw (pick is True): c0..c2 the first three cumulative weights, t0..t3 the
    # targets; padded (weights with the total, targets with the last) when fewer than four,
    # so the first cumulative weight above x is always found in c0..c2 or falls to t3.
    c0: int
    c1: int
    c2: int
    t0: Target
    t1: Target
    t2: Target
    t3: Target
    users: int

    def __init__(self, rules: tuple[Rule, ...]) -> None:
        self.rules = rules
        self.users = 0
        self.target = self.listener = self.pick = None
        self.total = self.hi = 0
        top = rules[0].priority
        demux: Rule | None = None
        targets: list[Target] = []
        delay = False
        for rule in rules:
            if rule.priority != top:
                break
            action = rule.action
            if action is Action.DEMUX:
                if demux is None:
                    demux = rule
            elif action is Action.FORWARD:
                targets.extend(rule.targets)
            elif action is Action.DELAY:
                delay = True
        if demux is not None:
            self.action = Action.DEMUX
            self.listener = demux.listener
        elif targets:
            self.action = Action.FORWARD
            if len(targets) == 1:
                self.target = targets[0]
            else:
                # Several targets: lookups draw from cumulative weights with bisect, the way
                # random.choices does, so each pick is O(log n) with nothing rebuilt.
                cum = tuple(accumulate(t.weight for t in targets))
                self.total = total = cum[-1]
                self.hi = hi = len(targets) - 1
                if hi < 4:
                    self.pick = True
                    self.c0, self.c1, self.c2 = (*cum[:hi], total, total)[:3]
                    self.t0, self.t1, self.t2, self.t3 = (*targets, *[targets[-1]] * 3)[:4]
                else:
                    self.pick = (*cum, *targets)
        else:
            self.action = Action.DELAY if delay else Action.DROP

    def choose(self, x: float) -> Target:
        """The target of a draw ``x`` in [0, total) (``pick`` is not None)."""
        pick = self.pick
        if pick is True:
            if x < self.c0:
                return self.t0
            if x < self.c1:
                return self.t1
            return self.t2 if x < self.c2 else self.t3
        assert isinstance(pick, tuple)
        hi = self.hi
        target: Target = pick[hi + 1 + bisect_right(pick, x, 0, hi)]
        return target


class Entry(Resolution):
    """The rules held at one prefix, highest priority first, and a hit counter.

    Entries are made and changed by the :class:`ServiceTable`; ``hits`` counts the
    lookups this entry answered (callers may reset it). An entry whose answer needs no
    weighted draw is the :class:`Resolution` its lookups return (``entry`` is itself).

    An entry is also its own node in the table's trie: a lookup that ends here touches one
    object, not a node and then an entry (memory latency, not bytecodes, is what a lookup
    in a big table mostly pays for). Pure branch nodes are instances too, made by
    :func:`_branch` with only the node fields set; they are never handed out.
    """

    # Six slots: with the object and GC headers an instance takes an 80-byte pymalloc
    # block (seven or eight would take 96). All six are what a lookup reads; the rules, the
    # answer and the precomputed draw live in a shared _State, and the prefix length is
    # _lim's (see _x_key and _x_length).
    __slots__ = ("_hits", "_key", "_left", "_lim", "_right", "_state")
    # Trie node fields.
    _key: int | None  # the prefix value (bits past its length are 0) | _HIGH; None: branch
    _lim: int  # _LIM_H[length] (shared): the id is in the prefix iff (id ^ key) < lim, and
    # (id << 1) & lim is the id's bit just past the prefix, which picks the child
    _left: Entry | None  # child whose next bit is 0
    _right: Entry | None  # child whose next bit is 1
    # Entry fields.
    _state: _State  # shared with every entry of equal rules (set by the table)
    _hits: int  # lookups answered; a branch node (never an answer) keeps its key here

    def __init__(self, value: int, length: int, state: _State) -> None:
        # A private copy of the value, as an 80-byte int: it lands in the same pymalloc
        # pool as the entry itself, mostly in the very next block (see _HIGH).
        self._key = value | _HIGH
        self._left = self._right = None
        self._lim = _LIM_H[length]
        self._hits = 0
        self._state = state

    @property
    def _x_key(self) -> int:
        # The prefix value, for branch nodes too (a sixth slot would cost a larger block).
        key = self._key
        return key ^ _HIGH if key is not None else self._hits

    @property
    def _x_length(self) -> int:
        # Not stored (an eighth slot would cost a larger memory block): _lim is 2**(256-n).
        return _BITS + 1 - (self._lim ^ _HIGH).bit_length()

    @property
    def prefix(self) -> ServicePrefix:
        """The prefix this entry matches."""
        # Made on demand: the table itself needs only the key and the length.
        return ServicePrefix._of(self._x_key, self._x_length)

    @property
    def hits(self) -> int:
        """How many lookups this entry answered (assignable, e.g. to reset it)."""
        return self._hits

    @hits.setter
    def hits(self, value: int) -> None:
        self._hits = value

    @property
    def rules(self) -> tuple[Rule, ...]:
        """The rules, highest priority first (ties in the order they were added)."""
        return self._state.rules

    @property
    def entry(self) -> Entry:
        """The entry itself (an entry is the resolution of its lookups)."""
        return self

    @property
    def action(self) -> Action:
        """The action a lookup resolving to this entry takes."""
        return self._state.action

    @property
    def target(self) -> Target | None:
        """The one FORWARD target when no draw is needed, else None (see :meth:`resolve`)."""
        return self._state.target

    @property
    def listener(self) -> object | None:
        """The DEMUX listener, else None."""
        return self._state.listener

    def resolve(self, rng: random.Random) -> Resolution:
        """The resolution of a lookup answered by this entry (weighted pick with ``rng``)."""
        state = self._state
        if state.pick is None:
            return self
        return _Pick(self, state.choose(rng.random() * state.total))

    def __repr__(self) -> str:
        return f"Entry({self.prefix}, rules={list(self._state.rules)!r}, hits={self._hits})"


def _branch(key: int, length: int) -> Entry:
    """A pure branch node: only the trie fields are set."""
    node = Entry.__new__(Entry)
    node._key = None
    node._hits = key  # see Entry._x_key
    node._left = node._right = None
    node._lim = _LIM_H[length]
    return node


_object_new: Final = object.__new__


# -- the table ------------------------------------------------------------------------------


class ServiceTable:
    """Longest-prefix-match table from serviceID prefixes to rules.

    ``rng`` draws the weighted FORWARD choices (pass a seeded ``random.Random`` for
    repeatable runs); ``max_entries`` bounds the number of entries (None: unbounded).
    """

    __slots__ = (
        "_count",
        "_max_entries",
        "_random",
        "_rng",
        "_roots",
        "_rule_count",
        "_short",
        "_short_entries",
        "_slot_shift",
        "_states",
        "_stride",
    )

    def __init__(self, rng: random.Random | None = None, max_entries: int | None = None) -> None:
        if max_entries is not None and (
            isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1
        ):
            raise ValueError(f"max_entries must be a positive int or None: {max_entries!r}")
        self._rng = rng if rng is not None else random.Random()
        self._random = self._rng.random  # bound once: saves an attribute lookup per pick
        self._max_entries = max_entries
        self._count = 0
        self._rule_count = 0
        # The distinct rule sets, each held once however many entries use it.
        self._states: dict[tuple[Rule, ...], _State] = {}
        self._reset(_STRIDES[0])

    def _reset(self, stride: int) -> None:
        self._stride = stride
        self._slot_shift = _BITS - stride
        # Per slot: root of the trie of the prefixes longer than the stride...
        self._roots: list[Entry | None] = [None] * (1 << stride)
        # ...and the longest prefix of at most `stride` bits covering the slot.
        self._short: list[Entry | None] = [None] * (1 << stride)
        # Those short prefixes, keyed by value | length (unique: a short prefix's low bits
        # are zero, and a length fits in them).
        self._short_entries: dict[int, Entry] = {}

    # -- sizes -------------------------------------------------------------------------------
    @property
    def max_entries(self) -> int | None:
        """The bound on the number of entries (None: unbounded)."""
        return self._max_entries

    @property
    def rule_count(self) -> int:
        """The number of rules over all entries."""
        return self._rule_count

    @property
    def stride(self) -> int:
        """How many leading bits the first level indexes directly (grows with the table)."""
        return self._stride

    def __len__(self) -> int:
        return self._count

    def __bool__(self) -> bool:
        return self._count > 0

    def __repr__(self) -> str:
        return f"<ServiceTable entries={self._count} rules={self._rule_count}>"

    # -- the per-packet path -----------------------------------------------------------------
    def lookup_int(self, value: int) -> Resolution | None:
        """:meth:`lookup` on a serviceID given as an int (the per-packet path).

        ``value`` must be in 0 .. 2**256-1; that is not checked here (the wire decoder
        only produces such values).
        """
        slot = value >> self._slot_shift
        node = self._roots[slot]
        best = None
        while node is not None:
            key = node._key
            lim = node._lim
            if key is not None:
                if (value ^ key) >= lim:
                    break  # not in this prefix, so not in any prefix below it either
                best = node
            left = node._left
            right = node._right
            if left is right:
                break  # a leaf (a branch node has two children): most lookups end here
            node = right if (value << 1) & lim else left
        if best is None:
            # Only now the short prefixes: any trie match is longer than all of them.
            best = self._short[slot]
            if best is None:
                return None
        best._hits += 1
        state = best._state
        pick = state.pick
        if pick is None:
            return best  # the entry is its own answer
        # A weighted draw (as _State.choose, inlined), and its resolution made without a
        # call to _Pick's __init__: a weighted lookup is a tenth of those in the benchmark.
        x = self._random() * state.total
        res = _object_new(_Pick)
        res._entry = best
        if pick is True:
            if x < state.c0:
                res._target = state.t0
            elif x < state.c1:
                res._target = state.t1
            else:
                res._target = state.t2 if x < state.c2 else state.t3
        else:
            res._target = state.choose(x)
        return res

    def lookup(self, service_id: ServiceLike) -> Resolution | None:
        """Resolve a serviceID: longest match, precedence, weighted pick; counts a hit.

        None when no entry matches (there is no default rule).
        """
        if type(service_id) is ServiceID:
            return self.lookup_int(service_id._value)  # skip the property on the hot path
        return self.lookup_int(as_service_id(service_id).value)

    def _match_int(self, value: int) -> Entry | None:
        slot = value >> self._slot_shift
        node = self._roots[slot]
        best = None
        while node is not None:  # as in lookup_int
            key = node._key
            lim = node._lim
            if key is not None:
                if (value ^ key) >= lim:
                    break
                best = node
            left = node._left
            right = node._right
            if left is right:
                break
            node = right if (value << 1) & lim else left
        return best if best is not None else self._short[slot]

    def match(self, service_id: ServiceLike) -> Entry | None:
        """The entry with the longest prefix containing ``service_id`` (no hit counted)."""
        if type(service_id) is ServiceID:
            return self._match_int(service_id._value)
        return self._match_int(as_service_id(service_id).value)

    # -- exact access ------------------------------------------------------------------------
    def get(self, prefix: PrefixLike) -> Entry | None:
        """The entry at exactly this prefix, or None."""
        p = as_service_prefix(prefix)
        return self._get(p.value, p.length)

    def __contains__(self, prefix: object) -> bool:
        if not isinstance(prefix, (ServicePrefix, ServiceID, str)):
            return False
        return self.get(prefix) is not None

    def _get(self, value: int, length: int) -> Entry | None:
        if length <= self._stride:
            return self._short_entries.get(value | length)
        path = self._trie_path(value, length)
        return path[-1] if path else None

    def _trie_path(self, value: int, length: int) -> list[Entry]:
        """Nodes from the slot's root down to the entry at exactly (value, length)."""
        node = self._roots[value >> self._slot_shift]
        path: list[Entry] = []
        while node is not None:
            node_len = node._x_length
            if node_len > length or (value ^ node._x_key) & _MASK[node_len]:
                return []
            path.append(node)
            if node_len == length:
                return path if node._key is not None else []
            node = node._right if value & _BIT[node_len] else node._left
        return []

    # -- changes -----------------------------------------------------------------------------
    def add(self, prefix: PrefixLike, rule: Rule) -> Entry:
        """Add ``rule`` at ``prefix``, creating the entry; returns the entry.

        Adding a rule equal to one the entry holds changes nothing.
        """
        if not isinstance(rule, Rule):
            raise TypeError(f"expected a Rule, got {type(rule).__name__}: {rule!r}")
        p = as_service_prefix(prefix)
        entry = self._get(p.value, p.length)
        if entry is None:
            return self._insert(p, (rule,))
        if rule not in entry._state.rules:
            self._set_rules(entry, tuple(sorted((*entry._state.rules, rule), key=_neg_priority)))
            self._rule_count += 1
        return entry

    def replace(self, prefix: PrefixLike, rules: Iterable[Rule]) -> Entry | None:
        """Set the rules at ``prefix`` (creating the entry if needed); returns the entry.

        Duplicates are dropped; equal priorities keep the given order. No rules at all
        removes the entry (if there is one) and returns None.
        """
        p = as_service_prefix(prefix)
        unique: list[Rule] = []
        for rule in rules:
            if not isinstance(rule, Rule):
                raise TypeError(f"expected a Rule, got {type(rule).__name__}: {rule!r}")
            if rule not in unique:
                unique.append(rule)
        new_rules = tuple(sorted(unique, key=_neg_priority))
        entry = self._get(p.value, p.length)
        if not new_rules:
            if entry is not None:
                self._delete(entry)
            return None
        if entry is None:
            return self._insert(p, new_rules)
        self._rule_count += len(new_rules) - len(entry._state.rules)
        self._set_rules(entry, new_rules)
        return entry

    def remove(self, prefix: PrefixLike, rule: Rule | None = None) -> None:
        """Remove one rule from the entry at ``prefix``, or (no rule) the whole entry.

        An entry left without rules is removed. Raises :class:`NoSuchEntry` if there is
        no entry at exactly ``prefix``, :class:`NoSuchRule` if it lacks ``rule``.
        """
        p = as_service_prefix(prefix)
        entry = self._get(p.value, p.length)
        if entry is None:
            raise NoSuchEntry(f"no service table entry at {p}")
        if rule is None:
            self._delete(entry)
            return
        if rule not in entry._state.rules:
            raise NoSuchRule(f"the entry at {p} has no rule {rule!r}")
        rest = list(entry._state.rules)
        rest.remove(rule)
        if not rest:
            self._delete(entry)
            return
        self._set_rules(entry, tuple(rest))
        self._rule_count -= 1

    def clear(self) -> None:
        """Remove every entry (the stride shrinks back to its initial size)."""
        self._count = 0
        self._rule_count = 0
        self._states = {}
        self._reset(_STRIDES[0])

    # -- iteration ---------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Entry]:
        """Entries in (prefix value, prefix length) order; a snapshot, safe to modify."""
        return iter(self._entries())

    def _entries(self) -> list[Entry]:
        out: list[Entry] = []
        shorts = sorted(self._short_entries.values(), key=lambda e: (e._x_key, e._x_length))
        n_short = len(shorts)
        i = 0
        slot_shift = self._slot_shift
        for slot, root in enumerate(self._roots):
            if root is None:
                continue
            # A short prefix starting at or before this slot sorts before its trie.
            while i < n_short and shorts[i]._x_key >> slot_shift <= slot:
                out.append(shorts[i])
                i += 1
            # Pre-order, left first, is (value, length) order: a node's key is the
            # smallest in its subtree, and left keys are below right keys.
            stack = [root]
            while stack:
                node = stack.pop()
                if node._key is not None:
                    out.append(node)
                if node._right is not None:
                    stack.append(node._right)
                if node._left is not None:
                    stack.append(node._left)
        out.extend(shorts[i:])
        return out

    # -- internals ---------------------------------------------------------------------------
    def _insert(self, prefix: ServicePrefix, rules: tuple[Rule, ...]) -> Entry:
        """Create the entry for a prefix that has none."""
        if self._max_entries is not None and self._count >= self._max_entries:
            raise ServiceTableFull(
                f"service table full: {self._count} entries (max_entries={self._max_entries}),"
                f" cannot add {prefix}"
            )
        entry = Entry(prefix.value, prefix.length, self._state_of(rules))
        self._count += 1
        self._rule_count += len(rules)
        if self._count > (1 << self._stride) >> 2 and self._stride < _STRIDES[-1]:
            self._regrow()
        self._place(entry)
        return entry

    def _state_of(self, rules: tuple[Rule, ...]) -> _State:
        """The shared state for ``rules`` (non-empty, sorted), counting one more user."""
        try:
            state = self._states.get(rules)
        except TypeError:  # an unhashable listener: these rules are not shared
            state = _State(rules)
        else:
            if state is None:
                state = self._states[rules] = _State(rules)
        state.users += 1
        return state

    def _release(self, state: _State) -> None:
        """One user fewer; a state no entry uses is forgotten."""
        state.users -= 1
        if not state.users:
            with contextlib.suppress(TypeError):
                if self._states.get(state.rules) is state:
                    del self._states[state.rules]

    def _set_rules(self, entry: Entry, rules: tuple[Rule, ...]) -> None:
        old = entry._state
        entry._state = self._state_of(rules)
        self._release(old)

    def _regrow(self) -> None:
        """Take the next stride: re-place every entry (amortised like a hash resize)."""
        entries = self._entries()
        stride = self._stride
        for s in _STRIDES:
            if s > stride and (self._count <= (1 << s) >> 2 or s == _STRIDES[-1]):
                stride = s
                break
        self._reset(stride)
        for entry in entries:
            entry._left = entry._right = None
            self._place(entry)

    def _place(self, entry: Entry) -> None:
        """Link a new entry (no children yet) into the short level or its slot's trie."""
        value = entry._x_key
        length = entry._x_length
        if length <= self._stride:
            self._place_short(entry, value, length)
            return
        slot = value >> self._slot_shift
        node = self._roots[slot]
        parent: Entry | None = None
        while node is not None:
            node_len = node._x_length
            common = min(length, _BITS - (value ^ node._x_key).bit_length())
            if common >= node_len:
                if node_len == length:
                    # A pure branch node at exactly this prefix: the entry takes its place.
                    entry._left, entry._right = node._left, node._right
                    self._relink(slot, parent, node, entry)
                    return
                parent = node
                node = node._right if value & _BIT[node_len] else node._left
                continue
            top: Entry
            if common == length:
                # The new prefix contains the node: it goes above it.
                if node._x_key & _BIT[length]:
                    entry._right = node
                else:
                    entry._left = node
                top = entry
            else:
                # They part at bit `common`: a pure branch node takes both.
                top = _branch(value & _MASK[common], common)
                if value & _BIT[common]:
                    top._left, top._right = node, entry
                else:
                    top._left, top._right = entry, node
            self._relink(slot, parent, node, top)
            return
        if parent is None:
            self._roots[slot] = entry
        elif value & _BIT[parent._x_length]:
            parent._right = entry
        else:
            parent._left = entry

    def _place_short(self, entry: Entry, value: int, length: int) -> None:
        self._short_entries[value | length] = entry
        start = value >> self._slot_shift
        end = start + (1 << (self._stride - length))
        # One slice assignment: a short prefix can cover millions of slots (a /0 covers them
        # all), and a comprehension is several times faster than an indexed loop.
        self._short[start:end] = [
            entry if current is None or current._x_length < length else current
            for current in self._short[start:end]
        ]

    def _delete(self, entry: Entry) -> None:
        value = entry._x_key
        length = entry._x_length
        self._count -= 1
        self._rule_count -= len(entry._state.rules)
        self._release(entry._state)
        if length <= self._stride:
            del self._short_entries[value | length]
            # Slots this entry was best for fall back to the longest short prefix above it
            # (the same one for all of them, since it covers the whole range).
            parent: Entry | None = None
            for shorter in range(length - 1, -1, -1):
                parent = self._short_entries.get((value & _MASK[shorter]) | shorter)
                if parent is not None:
                    break
            start = value >> self._slot_shift
            end = start + (1 << (self._stride - length))
            self._short[start:end] = [
                parent if current is entry else current for current in self._short[start:end]
            ]
            return
        slot = value >> self._slot_shift
        path = self._trie_path(value, length)
        above = path[-2] if len(path) > 1 else None
        left, right = entry._left, entry._right
        entry._left = entry._right = None  # a removed entry keeps nothing of the trie alive
        if left is not None and right is not None:
            # Still needed to branch: a pure branch node takes the entry's place.
            node = _branch(value, length)
            node._left, node._right = left, right
            self._relink(slot, above, entry, node)
            return
        if left is not None or right is not None:
            self._relink(slot, above, entry, left if left is not None else right)
            return
        # A leaf: unhook it; a pure branch parent is left with one child, splice it out.
        if above is None:
            self._roots[slot] = None
            return
        if above._left is entry:
            above._left = None
            other = above._right
        else:
            above._right = None
            other = above._left
        if above._key is None:
            self._relink(slot, path[-3] if len(path) > 2 else None, above, other)

    def _relink(self, slot: int, parent: Entry | None, old: Entry, new: Entry | None) -> None:
        """Put ``new`` where ``old`` hangs (under ``parent``, or at the slot's root)."""
        if parent is None:
            self._roots[slot] = new
        elif parent._left is old:
            parent._left = new
        else:
            parent._right = new

    # -- checking (tests and debugging) ------------------------------------------------------
    def _nodes_visited(self, value: int) -> int:
        """How many trie nodes :meth:`lookup_int` visits for ``value`` (diagnostic)."""
        visited = 0
        node = self._roots[value >> self._slot_shift]
        while node is not None:
            visited += 1
            key = node._key
            if key is not None and (value ^ key) >= node._lim:
                break
            node = node._right if (value << 1) & node._lim else node._left
        return visited

    def _check(self) -> None:
        """Assert the structure's invariants (slow; for tests)."""
        seen = 0
        stride = self._stride
        for slot, root in enumerate(self._roots):
            stack: list[tuple[Entry, int]] = [(root, -1)] if root is not None else []
            while stack:
                node, parent_len = stack.pop()
                length = node._x_length
                assert node._lim == _LIM_H[length]
                assert length > parent_len and length >= stride
                assert node._x_key & ~_MASK[length] == 0
                assert node._x_key >> self._slot_shift == slot
                kids = [k for k in (node._left, node._right) if k is not None]
                if node._key is None:
                    assert len(kids) == 2, "a pure branch node must have two children"
                else:
                    seen += 1
                    assert node._key == node._x_key | _HIGH and length > stride
                for bit, kid in ((0, node._left), (1, node._right)):
                    if kid is None:
                        continue
                    assert (kid._x_key ^ node._x_key) & _MASK[length] == 0
                    assert bool(kid._x_key & _BIT[length]) == bool(bit)
                    stack.append((kid, length))
        for key, entry in self._short_entries.items():
            assert key == entry._x_key | entry._x_length and entry._x_length <= stride
            assert entry._left is None and entry._right is None
        want: list[Entry | None] = [None] * len(self._short)
        for entry in sorted(self._short_entries.values(), key=lambda e: e._x_length):
            start = entry._x_key >> self._slot_shift
            width = 1 << (stride - entry._x_length)
            want[start : start + width] = [entry] * width
        assert all(a is b for a, b in zip(self._short, want, strict=True)), "short slots"
        assert seen + len(self._short_entries) == self._count
        entries = self._entries()
        assert sum(len(e.rules) for e in entries) == self._rule_count
        users: dict[int, int] = {}
        for e in entries:
            users[id(e._state)] = users.get(id(e._state), 0) + 1
        for e in entries:
            assert e._state.users == users[id(e._state)], "state user counts"
            assert e._state.rules and e._state.rules == tuple(
                sorted(e._state.rules, key=_neg_priority)
            )
        for rules, state in self._states.items():
            assert state.rules is rules and state.users > 0 and id(state) in users

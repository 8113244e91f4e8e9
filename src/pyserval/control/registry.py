"""The router's registry of service instances (sans-I/O).

Each accepted REGISTER adds or refreshes one instance (prefix, address) with its weight,
priority and expiry; the registry keeps the router's service table in step: one FORWARD
rule per (prefix, priority) holding that group's instances as weighted targets, so a lookup
picks an instance of the highest priority in proportion to weight. An instance leaves on
UNREGISTER, when its registration expires without a refresh, or when the network reports
its address unreachable. Rules the registry did not make (static routes, DELAY, DEMUX) are
never touched.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
from collections import Counter, defaultdict
from dataclasses import dataclass

from ..naming.service_id import ServicePrefix
from ..sal.inet import Address
from ..sal.service_table import NoSuchEntry, Rule, ServiceTable, Target
from .messages import (
    AckMessage,
    MessageKind,
    RegisterMessage,
    RegistrationResult,
    UnregisterMessage,
)
from .security import RegistrationGuard, RegistrationRefused

__all__ = ["Instance", "Registry"]


@dataclass(slots=True)
class Instance:
    """One registered instance of a service prefix."""

    address: Address
    weight: int
    priority: int
    expires: float


class Registry:
    """Registered instances and the FORWARD rules they make (see the module docstring).

    ``now`` is the router's monotonic clock (expiry); ``wall`` is unix time (the guard's
    timestamp and replay checks).
    """

    def __init__(
        self,
        table: ServiceTable,
        guard: RegistrationGuard | None = None,
        *,
        min_ttl: float = 0.1,
        max_ttl: float = 3600.0,
        max_instances: int = 1_000_000,
        max_instances_per_source: int = 10_000,
    ) -> None:
        self.table = table
        self.guard = guard or RegistrationGuard()
        self.min_ttl = min_ttl
        self.max_ttl = max_ttl
        self.max_instances = max_instances
        # One source's (IP and port: one host's) share of the table: a flood of
        # registrations from one address fills its own quota, never the table others need.
        self.max_instances_per_source = max_instances_per_source
        self._per_source: Counter[Address] = Counter()
        self.instances: dict[ServicePrefix, dict[Address, Instance]] = {}
        self.stats: Counter[str] = Counter()
        self._count = 0
        self._rules: dict[ServicePrefix, list[Rule]] = {}
        self._expiries: list[tuple[float, int, ServicePrefix, Address]] = []
        self._tiebreak = itertools.count()
        self.changes = 0  # bumped on every change of the table (for waiters)

    def __len__(self) -> int:
        return self._count

    # -- messages -----------------------------------------------------------------------
    def handle(
        self,
        msg: RegisterMessage | UnregisterMessage,
        observed: Address,
        now: float,
        wall: float,
    ) -> AckMessage:
        """Apply a REGISTER or UNREGISTER from ``observed``; the ACK to send back."""
        results: list[RegistrationResult] = []
        touched: set[ServicePrefix] = set()
        for reg in msg.registrations:
            try:
                address = self.guard.check(reg, msg.kind, observed, wall)
            except RegistrationRefused as exc:
                self.stats[f"refused_{exc.reason}"] += 1
                results.append(RegistrationResult(ok=False, reason=exc.reason))
                continue
            prefix = reg.prefix
            if msg.kind is MessageKind.REGISTER:
                ttl = min(max(reg.ttl, self.min_ttl), self.max_ttl)
                added = self._add(prefix, address, reg.weight, reg.priority, now + ttl, touched)
                if added is not None:
                    results.append(RegistrationResult(ok=False, reason=added))
                    continue
            else:
                self._remove(prefix, address, touched)
            results.append(RegistrationResult(ok=True))
        for prefix in touched:
            self._sync(prefix)
        return AckMessage(seq=msg.seq, results=results)

    def _add(
        self,
        prefix: ServicePrefix,
        address: Address,
        weight: int,
        priority: int,
        expires: float,
        touched: set[ServicePrefix],
    ) -> str | None:
        """Add or refresh an instance; None, or why it was refused ("full", "quota")."""
        group = self.instances.setdefault(prefix, {})
        inst = group.get(address)
        if inst is None:
            refused = None
            if self._count >= self.max_instances:
                refused = "full"
            elif self._per_source[address] >= self.max_instances_per_source:
                refused = "quota"
            if refused is not None:
                self.stats[f"refused_{refused}"] += 1
                if not group:
                    del self.instances[prefix]
                return refused
            group[address] = Instance(address, weight, priority, expires)
            self._count += 1
            self._per_source[address] += 1
            self.stats["registered"] += 1
            touched.add(prefix)
            # One heap entry per instance: a refresh only moves ``expires`` later, and
            # expire() puts the entry back at the new time when it comes up early.
            heapq.heappush(self._expiries, (expires, next(self._tiebreak), prefix, address))
        else:
            if (inst.weight, inst.priority) != (weight, priority):
                inst.weight, inst.priority = weight, priority
                touched.add(prefix)
            inst.expires = max(inst.expires, expires)
            self.stats["refreshed"] += 1
        return None

    def _remove(self, prefix: ServicePrefix, address: Address, touched: set[ServicePrefix]) -> bool:
        group = self.instances.get(prefix)
        if group is None or group.pop(address, None) is None:
            return False
        self._count -= 1
        left = self._per_source[address] - 1
        if left:
            self._per_source[address] = left
        else:
            del self._per_source[address]
        if not group:
            del self.instances[prefix]
        touched.add(prefix)
        return True

    # -- liveness -----------------------------------------------------------------------
    def expire(self, now: float) -> list[tuple[ServicePrefix, Address]]:
        """Remove every instance whose registration ran out by ``now``; returns them."""
        gone: list[tuple[ServicePrefix, Address]] = []
        touched: set[ServicePrefix] = set()
        heap = self._expiries
        while heap and heap[0][0] <= now:
            _, tie, prefix, address = heapq.heappop(heap)
            inst = self.instances.get(prefix, {}).get(address)
            if inst is None:
                continue  # removed since
            if inst.expires > now:
                heapq.heappush(heap, (inst.expires, tie, prefix, address))  # refreshed
                continue
            self._remove(prefix, address, touched)
            self.stats["expired"] += 1
            gone.append((prefix, address))
        for prefix in touched:
            self._sync(prefix)
        return gone

    def remove_address(self, address: Address) -> int:
        """Forget every instance at ``address`` (it was reported unreachable)."""
        touched: set[ServicePrefix] = set()
        for prefix in [p for p, group in self.instances.items() if address in group]:
            self._remove(prefix, address, touched)
        for prefix in touched:
            self._sync(prefix)
        self.stats["unreachable_removed"] += len(touched)
        return len(touched)

    def next_deadline(self) -> float | None:
        """When :meth:`expire` must run next."""
        heap = self._expiries
        while heap:
            expires, tie, prefix, address = heap[0]
            inst = self.instances.get(prefix, {}).get(address)
            if inst is None:
                heapq.heappop(heap)  # removed since
            elif inst.expires != expires:
                heapq.heapreplace(heap, (inst.expires, tie, prefix, address))  # refreshed
            else:
                return expires
        return None

    # -- the service table ----------------------------------------------------------------
    def _sync(self, prefix: ServicePrefix) -> None:
        """Make the table's registry rules at ``prefix`` match its instances."""
        groups: defaultdict[int, list[Target]] = defaultdict(list)
        for inst in self.instances.get(prefix, {}).values():
            groups[inst.priority].append(Target(inst.address, inst.weight))
        rules = [Rule.forward(*targets, priority=p) for p, targets in sorted(groups.items())]
        # New rules first, then the old ones go: the entry (and its hit count) stays.
        for rule in rules:
            self.table.add(prefix, rule)
        for rule in self._rules.pop(prefix, []):
            if rule not in rules:
                with contextlib.suppress(NoSuchEntry):  # removed by hand meanwhile
                    self.table.remove(prefix, rule)
        if rules:
            self._rules[prefix] = rules
        self.changes += 1

"""Router clusters: several service routers sharing one registry in etcd.

Each router of a cluster keeps its own registrations as before (checks, 1 s liveness
refreshed by the hosts) and *publishes membership* in etcd: one key per instance it
accepted, attached to the router's lease, written when the instance appears or changes and
deleted when it leaves (unregistration, liveness expiry, ICMP). Every router watches the
cluster's prefix and merges the other routers' instances into its service table, so any
router forwards a SYN to an instance registered at any other. etcd sees one write per
change, never the refreshes.

* :class:`ClusterRegistry` (sans-I/O) is the router's :class:`Registry` plus the remote
  instances and an outbox of writes; it never does I/O.
* :class:`ClusterSync` (asyncio) holds the lease (keepalive every third of its TTL),
  flushes the outbox in transactions, watches the prefix, and when etcd is unreachable keeps
  the last table, retries, and on return resynchronises: a full read at the current
  revision (stale keys of its own are deleted, missing ones written again), then a watch
  from the next revision.

The key layout and value encoding are in ``docs/cluster.md``. What this does not do:
share nonces (a registration that omits its address can be replayed at *another* router
within the clock-skew window; hosts that sign should claim their address), or share the
``certified_prefixes`` configuration (every router of a cluster is started with the same).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import socket
import string
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..naming.service_id import SERVICE_ID_BITS, ServicePrefix
from ..sal.inet import Address
from ..sal.service_table import NoSuchEntry, NoSuchRule, Rule, ServiceTable, Target
from .etcd import EtcdClient, EtcdError, WatchEvent
from .inspection import TableService
from .messages import (
    AckMessage,
    RegisterMessage,
    UnregisterMessage,
    format_instance_address,
    parse_instance_address,
)
from .registry import Registry
from .security import RegistrationGuard

if TYPE_CHECKING:
    from .router import Router

__all__ = [
    "CLUSTER_VERSION",
    "ClusterRegistry",
    "ClusterSync",
    "ClusterTableService",
    "InstanceRecord",
    "RouterRecord",
    "cluster_root",
]

log = logging.getLogger("pyserval.cluster")

CLUSTER_VERSION: Final = 1
_NAME_CHARS: Final = frozenset(string.ascii_letters + string.digits + "._-")
_APPLY_CHUNK: Final = 1000  # keys of a full read applied between two passes of the loop
_HOLD_DOWN: Final = 2.0  # seconds a remote instance reported unreachable stays out


def cluster_root(name: str) -> bytes:
    """The etcd prefix of cluster ``name`` (``/pyserval/v1/<name>/``)."""
    if not 1 <= len(name) <= 64 or not _NAME_CHARS.issuperset(name):
        raise ValueError(f"a cluster name is 1..64 of [A-Za-z0-9._-], got {name!r}")
    return f"/pyserval/v{CLUSTER_VERSION}/{name}/".encode("ascii")


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class InstanceRecord(_Record):
    """The value of an instance key: one instance a router accepted (JSON)."""

    v: Literal[1] = 1
    service: str = Field(min_length=2, max_length=80)
    address: str = Field(min_length=3, max_length=64)
    weight: int = Field(ge=1, le=0xFFFF)
    priority: int = Field(ge=-1000, le=1000)
    router: str = Field(min_length=1, max_length=64)
    # The key a signed registration carried: other routers pin it (trust on first use
    # holds across the cluster, so a forged registration is refused everywhere).
    public_key: str | None = Field(default=None, min_length=64, max_length=64)

    @field_validator("service")
    @classmethod
    def _check_service(cls, value: str) -> str:
        return str(ServicePrefix.parse(value))

    @field_validator("address")
    @classmethod
    def _check_address(cls, value: str) -> str:
        return _canonical_address(value)


class RouterRecord(_Record):
    """The value of a router key: a member of the cluster and its lease (JSON)."""

    v: Literal[1] = 1
    address: str = Field(min_length=3, max_length=64)
    lease: int = Field(ge=0, lt=1 << 63)
    ttl: int = Field(ge=0, le=86400)


@dataclass(frozen=True, slots=True)
class _Remote:
    weight: int
    priority: int


def _canonical_address(text: str) -> str:
    """``text`` as the control protocol writes an instance address (ValueError if not one).

    Canonical IPv4 (nearly every value read) is recognised with ``inet_pton``, some ten
    times faster than :mod:`ipaddress`: a 100,000-key read parses 100,000 of them.
    """
    host, sep, port = text.rpartition(":")
    if (
        sep
        and port.isascii()
        and port.isdigit()
        and port[0] != "0"
        and int(port) <= 0xFFFF
        and host[:1].isdigit()
    ):
        with contextlib.suppress(OSError):
            if socket.inet_ntop(socket.AF_INET, socket.inet_pton(socket.AF_INET, host)) == host:
                return text
    return format_instance_address(parse_instance_address(text))


def _split(canonical: str) -> Address:
    """``(ip, port)`` of an address :func:`_canonical_address` accepted."""
    host, _, port = canonical.rpartition(":")
    return (host[1:-1] if host.startswith("[") else host), int(port)


def _encode(record: _Record) -> bytes:
    return record.model_dump_json(exclude_none=True).encode("utf-8")


class ClusterRegistry(Registry):
    """A router's registry that also holds the cluster's other instances (sans-I/O).

    Local instances behave exactly as in :class:`Registry`; every change to them is put in
    :attr:`outbox` (key -> value, or None to delete), coalesced per key. Remote instances
    (:meth:`apply`) come from the watch and never expire here: their router owns them.
    """

    def __init__(
        self,
        table: ServiceTable,
        guard: RegistrationGuard | None = None,
        *,
        root: bytes,
        router_id: str,
        address: str,
        max_ttl: float = 3600.0,
    ) -> None:
        super().__init__(table, guard, max_ttl=max_ttl)
        self.root = root
        self.router_id = router_id
        self.address = address
        self.instance_prefix = root + b"instances/"
        self.router_prefix = root + b"routers/"
        self.own_prefix = self.instance_prefix + router_id.encode("ascii") + b"/"
        # key -> (prefix, address, weight, priority) of every remote instance key
        # key -> (prefix, address, weight/priority, mod revision) of every remote instance
        self.remote_keys: dict[bytes, tuple[ServicePrefix, Address, _Remote, int]] = {}
        # prefix -> (address, router id) -> weight/priority (several routers may hold one
        # instance while its host moves); flat, as most prefixes have one or two.
        self.remote: dict[ServicePrefix, dict[tuple[Address, str], _Remote]] = {}
        self.routers: dict[str, RouterRecord] = {}
        self.published: dict[bytes, bytes] = {}  # what etcd should hold for our instances
        self.outbox: dict[bytes, bytes | None] = {}
        self.hidden: set[tuple[ServicePrefix, Address]] = set()
        self.on_outbox: Callable[[], None] | None = None
        self.cluster_stats: Counter[str] = Counter()
        self._keys: dict[ServicePrefix, str] = {}
        self._interned: dict[tuple[int, int], _Remote] = {}
        # address -> prefix -> how many remote keys: ICMP for an address finds its
        # instances without a walk over every prefix
        self._at: dict[Address, dict[ServicePrefix, int]] = {}

    # -- local changes go to the outbox ------------------------------------------------
    def instance_key(self, prefix: ServicePrefix, address: Address) -> bytes:
        """The etcd key of our instance of ``prefix`` at ``address``."""
        return self.own_prefix + f"{format_instance_address(address)}/{prefix}".encode("ascii")

    def handle(
        self,
        msg: RegisterMessage | UnregisterMessage,
        observed: Address,
        now: float,
        wall: float,
    ) -> AckMessage:
        """As :meth:`Registry.handle`; accepted changes are queued for etcd."""
        self._keys = {r.prefix: r.public_key for r in msg.registrations if r.public_key}
        try:
            return super().handle(msg, observed, now, wall)
        finally:
            self._keys = {}

    def _add(
        self,
        prefix: ServicePrefix,
        address: Address,
        weight: int,
        priority: int,
        expires: float,
        touched: set[ServicePrefix],
    ) -> str | None:
        before = self.instances.get(prefix, {}).get(address)
        old = None if before is None else (before.weight, before.priority)
        refused = super()._add(prefix, address, weight, priority, expires, touched)
        if refused is not None:
            return refused
        if old != (weight, priority):
            record = InstanceRecord(
                service=str(prefix),
                address=format_instance_address(address),
                weight=weight,
                priority=priority,
                router=self.router_id,
                public_key=self._keys.get(prefix),
            )
            self._queue(self.instance_key(prefix, address), _encode(record))
        return None

    def _remove(self, prefix: ServicePrefix, address: Address, touched: set[ServicePrefix]) -> bool:
        if not super()._remove(prefix, address, touched):
            return False
        self._queue(self.instance_key(prefix, address), None)
        return True

    def _queue(self, key: bytes, value: bytes | None) -> None:
        if value is None:
            self.published.pop(key, None)
        else:
            self.published[key] = value
        self.outbox[key] = value
        if self.on_outbox is not None:
            self.on_outbox()

    def republish(self, held: dict[bytes, bytes]) -> None:
        """Queue what etcd lacks or holds wrongly of ours (``held``: our keys there now)."""
        for key, value in self.published.items():
            if held.get(key) != value:
                self.outbox[key] = value
        for key in held:
            if key not in self.published:
                self.outbox[key] = None  # a stale key of ours (lost before it was deleted)
        if self.outbox and self.on_outbox is not None:
            self.on_outbox()

    def take_outbox(self) -> list[tuple[bytes, bytes | None]]:
        """The queued writes (the outbox is emptied: put back what fails)."""
        ops = list(self.outbox.items())
        self.outbox.clear()
        return ops

    # -- remote changes from the watch --------------------------------------------------
    def apply(self, events: Sequence[WatchEvent]) -> bool:
        """Take watch events (or a snapshot's puts); whether the table changed."""
        touched: set[ServicePrefix] = set()
        for ev in events:
            key = ev.key
            if key.startswith(self.router_prefix):
                self._apply_router(key, ev.value)
            elif key.startswith(self.instance_prefix) and not key.startswith(self.own_prefix):
                self._apply_instance(key, ev.value, ev.revision, touched)
        for prefix in touched:
            self._sync(prefix)
        return bool(touched)

    def replace_remote(self, snapshot: dict[bytes, tuple[bytes, int]]) -> bool:
        """Make the remote view exactly ``snapshot`` (a full read: key -> value and mod
        revision); whether it changed. See :meth:`snapshot_events`."""
        return self.apply(self.snapshot_events(snapshot))

    def snapshot_events(self, snapshot: dict[bytes, tuple[bytes, int]]) -> list[WatchEvent]:
        """The events that turn the remote view into ``snapshot``: deletes of what it lacks,
        puts of what is new or modified since (a key at the revision held is skipped, so a
        resync after a short outage costs little)."""
        held = self.remote_keys
        events = [WatchEvent(k, None, 0) for k in held if k not in snapshot]
        events += [WatchEvent(k, None, 0) for k in self.routers_keys() if k not in snapshot]
        for key, (value, revision) in snapshot.items():
            old = held.get(key)
            if old is None or old[3] != revision or not revision:
                events.append(WatchEvent(key, value, revision))
        return events

    def routers_keys(self) -> list[bytes]:
        """The keys of the routers now known."""
        return [self.router_prefix + rid.encode("ascii") for rid in self.routers]

    def _apply_router(self, key: bytes, value: bytes | None) -> None:
        rid = key[len(self.router_prefix) :].decode("ascii", "replace")
        if value is None:
            self.routers.pop(rid, None)
            return
        try:
            self.routers[rid] = RouterRecord.model_validate_json(value)
        except ValidationError:
            self.cluster_stats["bad_value"] += 1

    def _apply_instance(
        self, key: bytes, value: bytes | None, revision: int, touched: set[ServicePrefix]
    ) -> None:
        old = self.remote_keys.pop(key, None)
        rid = self._rid(key)
        if old is not None:
            prefix, address, _, _ = old
            group = self.remote.get(prefix)
            if group is not None and group.pop((address, rid), None) is not None:
                if not group:
                    del self.remote[prefix]
                at = self._at[address]
                at[prefix] -= 1
                if not at[prefix]:
                    del at[prefix]
                    if not at:
                        del self._at[address]
            touched.add(prefix)
        if value is None:
            return
        try:
            rec = InstanceRecord.model_validate_json(value)
        except ValidationError:
            self.cluster_stats["bad_value"] += 1
            return
        if rec.router != rid:
            self.cluster_stats["bad_value"] += 1
            return
        prefix = ServicePrefix.parse(rec.service)
        address = _split(rec.address)
        remote = self._interned.setdefault(
            (rec.weight, rec.priority), _Remote(rec.weight, rec.priority)
        )
        self.remote_keys[key] = (prefix, address, remote, revision)
        self.remote.setdefault(prefix, {})[(address, rid)] = remote
        at = self._at.setdefault(address, {})
        at[prefix] = at.get(prefix, 0) + 1
        touched.add(prefix)
        if rec.public_key is not None and prefix.length == SERVICE_ID_BITS:
            self._pin(prefix, rec.public_key)

    def _rid(self, key: bytes) -> str:
        return key[len(self.instance_prefix) :].split(b"/", 1)[0].decode("ascii", "replace")

    def _pin(self, prefix: ServicePrefix, public_key: str) -> None:
        guard = self.guard
        if guard.certified_block(prefix) is not None:
            return  # a certified block needs the certifying key anyway
        raw = bytes.fromhex(public_key)
        pinned = guard.pinned_key(prefix)
        if pinned is not None and pinned != raw:
            self.cluster_stats["pin_conflict"] += 1
            return
        guard.pin_key(prefix, raw)

    # -- unreachable remote instances ---------------------------------------------------
    def remove_address(self, address: Address) -> int:
        """Forget local instances at ``address`` (deleted from etcd) and hide remote ones
        there until :meth:`unhide` (their router decides whether they are gone)."""
        count = super().remove_address(address)
        for prefix in self._at.get(address, {}):
            if (prefix, address) not in self.hidden:
                self.hidden.add((prefix, address))
                self._sync(prefix)
                count += 1
        return count

    def unhide(self, address: Address | None = None) -> None:
        """Let remote instances at ``address`` (None: every address) be chosen again."""
        for item in [h for h in self.hidden if address is None or h[1] == address]:
            self.hidden.discard(item)
            self._sync(item[0])

    # -- the service table --------------------------------------------------------------
    def _sync(self, prefix: ServicePrefix) -> None:
        """Local instances and (visible) remote ones, one FORWARD rule per priority."""
        merged: dict[Address, tuple[int, int]] = {}
        hidden = self.hidden
        for (address, _), r in self.remote.get(prefix, {}).items():
            if not hidden or (prefix, address) not in hidden:
                merged[address] = (r.weight, r.priority)
        for inst in self.instances.get(prefix, {}).values():
            merged[inst.address] = (inst.weight, inst.priority)  # ours is the freshest
        groups: dict[int, list[Target]] = {}
        for address, (weight, priority) in merged.items():
            groups.setdefault(priority, []).append(Target(address, weight))
        rules = [Rule.forward(*targets, priority=p) for p, targets in sorted(groups.items())]
        for rule in rules:
            self.table.add(prefix, rule)
        for rule in self._rules.pop(prefix, []):
            if rule not in rules:
                with contextlib.suppress(NoSuchEntry, NoSuchRule):
                    self.table.remove(prefix, rule)
        if rules:
            self._rules[prefix] = rules
        self.changes += 1

    @property
    def remote_count(self) -> int:
        """How many remote instance keys are held."""
        return len(self.remote_keys)


class ClusterTableService(TableService):
    """The router's table service, with the cluster's state among the counters.

    Counters (integers) name the cluster and each router in brackets:
    ``cluster[NAME]_revision``, ``cluster[NAME]_connected`` (1 or 0),
    ``cluster[NAME]_remote_instances``, ``router[ID@IP:PORT]_lease`` and ``..._ttl``.
    """

    def __init__(self, router: Router, sync: ClusterSync) -> None:
        super().__init__(router.host, router.registry)
        self.sync = sync

    def counters(self) -> dict[str, int]:
        """The usual counters plus the cluster's."""
        return {**self.sync.counters(), **super().counters()}


class ClusterSync:
    """Keeps a router's :class:`ClusterRegistry` and etcd in step (see the module docstring)."""

    def __init__(
        self,
        router: Router,
        registry: ClusterRegistry,
        endpoints: Sequence[str],
        name: str,
        *,
        lease_ttl: int = 3,
        timeout: float = 1.0,
    ) -> None:
        if not (isinstance(lease_ttl, int) and 2 <= lease_ttl <= 3600):
            raise ValueError(f"lease_ttl is whole seconds in 2..3600, got {lease_ttl!r}")
        self.router = router
        self.registry = registry
        self.name = name
        self.lease_ttl = lease_ttl
        self.client = EtcdClient(endpoints, timeout=timeout)
        self.lease = 0
        self.revision = 0
        self.connected = False
        self.synced = asyncio.Event()  # set after each full read
        self.stats: Counter[str] = Counter()
        self.last_error = ""
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        registry.on_outbox = self._wake.set

    @property
    def router_id(self) -> str:
        """This router's id in the cluster."""
        return self.registry.router_id

    async def start(self, wait: float = 3.0) -> None:
        """Start syncing; waits up to ``wait`` s for the first full read (not an error if
        etcd is unreachable: the router serves its own registrations meanwhile)."""
        self._task = asyncio.ensure_future(self._run())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                await self.synced.wait()

    async def close(self) -> None:
        """Stop, and revoke the lease so that the others drop our instances at once."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.lease and self.connected:
            with contextlib.suppress(EtcdError):
                await self.client.revoke(self.lease)
        await self.client.aclose()

    def counters(self) -> dict[str, int]:
        """The cluster's state as integer counters (see :class:`ClusterTableService`)."""
        reg = self.registry
        c = f"cluster[{self.name}]"
        out = {
            f"{c}_revision": self.revision,
            f"{c}_connected": int(self.connected),
            f"{c}_remote_instances": reg.remote_count,
            f"{c}_routers": len(reg.routers),
            f"{c}_pending_writes": len(reg.outbox),
        }
        for rid, rec in sorted(reg.routers.items()):
            tag = f"router[{rid}@{rec.address}]"[:58]
            out[f"{tag}_lease"] = rec.lease
            out[f"{tag}_ttl"] = rec.ttl
        out.update({f"cluster_{k}": v for k, v in (self.stats + reg.cluster_stats).items()})
        return out

    # -- the loop -------------------------------------------------------------------------
    async def _run(self) -> None:
        backoff = 0.1
        while True:
            try:
                await self._session()
            except Exception as exc:
                # EtcdError and OSError mostly; anything else (an answer that is not what
                # the gateway documents) is logged and retried the same way, never fatal.
                if not isinstance(exc, EtcdError | OSError):
                    log.exception("cluster %s: unexpected error", self.name)
                if self.connected:
                    log.warning(
                        "cluster %s: etcd unreachable (%s); forwarding with the last table",
                        self.name,
                        exc,
                    )
                self.last_error = str(exc)
                self.connected = False
                self.stats["disconnects"] += 1
                await asyncio.sleep(backoff)
                backoff = min(1.0, backoff * 2)
                continue
            backoff = 0.1

    async def _session(self) -> None:
        """One connected period: lease, full read, then keepalive + writes + watch."""
        client = self.client
        reg = self.registry
        if self.lease:
            ttl = await client.keepalive(self.lease)
            if ttl <= 0:
                log.warning("cluster %s: lease %x expired; taking a new one", self.name, self.lease)
                self.lease = 0
                self.stats["lease_lost"] += 1
        if not self.lease:
            self.lease, granted = await client.grant(self.lease_ttl)
            self.lease_ttl = granted or self.lease_ttl
        member = RouterRecord(address=reg.address, lease=self.lease, ttl=self.lease_ttl)
        member_key = reg.router_prefix + self.router_id.encode("ascii")
        await client.txn([(member_key, _encode(member))], self.lease)
        loop = asyncio.get_running_loop()
        started = loop.time()
        revision, kvs = await client.range_prefix(reg.root)
        read = loop.time()
        ours = {kv.key: kv.value for kv in kvs if kv.key.startswith(reg.own_prefix)}
        others = {
            kv.key: (kv.value, kv.mod_revision)
            for kv in kvs
            if not kv.key.startswith(reg.own_prefix)
        }
        del kvs
        events = reg.snapshot_events(others)
        changed = False
        for i in range(0, len(events), _APPLY_CHUNK):
            # In chunks, yielding between them: a 100,000-key read must not stop forwarding.
            changed |= reg.apply(events[i : i + _APPLY_CHUNK])
            await asyncio.sleep(0)
        self.stats["last_read_ms"] = round((read - started) * 1000)
        self.stats["last_apply_ms"] = round((loop.time() - read) * 1000)
        self.stats["last_applied_keys"] = len(events)
        if reg.hidden:
            reg.unhide()  # the full read is the truth now; ICMP will hide them again if dead
            changed = True
        if changed:
            self.router._after_change()
        reg.republish(ours)
        self.revision = revision
        was = self.connected
        self.connected = True
        self.stats["syncs"] += 1
        self.synced.set()
        if not was and self.stats["syncs"] > 1:
            log.warning("cluster %s: etcd back; resynchronised at revision %d", self.name, revision)
        tasks = [
            asyncio.ensure_future(self._keepalive()),
            asyncio.ensure_future(self._writer()),
            asyncio.ensure_future(self._watch(revision + 1)),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for task in done:
            exc = task.exception()
            if exc is not None:
                raise exc
        raise EtcdError("the cluster session ended")  # none of them ends by itself

    async def _keepalive(self) -> None:
        while True:
            await asyncio.sleep(self.lease_ttl / 3)
            ttl = await self.client.keepalive(self.lease)
            if ttl <= 0:
                raise EtcdError(f"lease {self.lease:x} is gone")

    async def _writer(self) -> None:
        reg = self.registry
        while True:
            await self._wake.wait()
            self._wake.clear()
            ops = reg.take_outbox()
            if not ops:
                continue
            try:
                rev = await self.client.txn(ops, self.lease)
            except BaseException:
                for key, value in ops:  # put back unless changed meanwhile
                    reg.outbox.setdefault(key, value)
                raise
            self.stats["writes"] += len(ops)
            self.stats["transactions"] += 1
            self.revision = max(self.revision, rev)

    async def _watch(self, start: int) -> None:
        reg = self.registry
        async for events in self.client.watch(reg.root, start):
            self.stats["events"] += len(events)
            self.revision = max(self.revision, max(e.revision for e in events))
            if reg.apply(events):
                self.router._after_change()

    def hide_unreachable(self, address: Address) -> None:
        """After ICMP for ``address``: remote instances there come back after a hold-down
        unless their router deleted them meanwhile (while etcd is unreachable they stay
        hidden: only their router, through etcd, can say they are back)."""
        loop = asyncio.get_running_loop()
        loop.call_later(_HOLD_DOWN, self._unhide, address)

    def _unhide(self, address: Address) -> None:
        if not self.connected:
            asyncio.get_running_loop().call_later(_HOLD_DOWN, self._unhide, address)
            return
        self.registry.unhide(address)
        self.router._after_change()


def new_router_id() -> str:
    """A random id for a router incarnation (12 hex digits)."""
    return secrets.token_hex(6)


def check_lease_ttl(value: float) -> int:
    """A lease TTL as whole seconds (etcd's unit), at least 2."""
    if not math.isfinite(value) or value < 2:
        raise ValueError(f"a cluster lease TTL is at least 2 seconds, got {value!r}")
    return math.ceil(value)

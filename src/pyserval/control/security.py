"""The router's checks on registrations (sans-I/O: every method takes ``now``).

:class:`RegistrationGuard` decides whether a router accepts one :class:`Registration` of a
REGISTER or UNREGISTER message, and at which instance address. It keeps two bounded
memories:

* **nonces** seen within the clock-skew window, against replays. A nonce is remembered
  until ``timestamp + max_skew``; after that the registration is refused as stale anyway.
  Expired nonces are purged from a heap ordered by expiry (amortised O(log n) each). Each
  source (the observed IP and port: one host's socket) may hold at most
  ``max_nonces_per_source`` of them: past that *its*
  registrations are refused ("quota"), nobody else's. When ``max_nonces`` are remembered in
  all, the oldest is forgotten (evicted by age) to make room: a flood from many addresses
  can at worst reopen the replay window of the oldest registrations, never make a router
  refuse every host (which used to let one address make every live service expire).
* **pinned keys** (trust on first use) for serviceIDs outside the certified prefixes: once
  an ID was registered with a valid key, later registrations and unregistrations for it must
  carry that key. The map holds at most ``max_pinned`` IDs and forgets the least recently
  used one beyond that, so whoever can register ``max_pinned`` fresh keyed IDs can evict a
  pin: IDs that matter belong under ``certified_prefixes``, where a key is always required.

Retransmissions: a sender repeats a message until it is acknowledged, and an ack can be
lost, so the same registration (same nonce, same signed content, same op) arriving again
from the **same observed address** within the window is accepted again, not called a
replay. The same nonce with any other content, op or source is a replay. Requiring the same
source means a captured registration that omits its address cannot be replayed from the
capturer's address to add it as an instance.

A nonce is recorded only once a registration passed every check, so a refused message never
uses up the nonce of an honest one.
"""

from __future__ import annotations

import hashlib
import heapq
import ipaddress
import math
from collections import Counter, OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from ..naming.keys import ServicePublicKey
from ..naming.service_id import SERVICE_ID_BITS, PrefixLike, ServicePrefix, as_service_prefix
from ..sal.inet import Address
from .messages import MessageKind, Registration

__all__ = ["REFUSAL_REASONS", "RegistrationGuard", "RegistrationRefused"]

REFUSAL_REASONS: Final = (
    "stale",
    "replay",
    "busy",
    "quota",
    "address_mismatch",
    "not_certified",
    "bad_signature",
    "key_required",
    "key_mismatch",
)
"""Every ``reason`` :class:`RegistrationRefused` can carry."""


class RegistrationRefused(Exception):
    """The router refuses a registration; ``reason`` is one of :data:`REFUSAL_REASONS`."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class _Seen:
    expiry: float
    digest: bytes  # of the signed bytes (content and op), signature excluded
    observed: Address


def _same_address(claimed: Address, observed: Address) -> bool:
    if claimed[1] != observed[1]:
        return False
    try:
        return ipaddress.ip_address(claimed[0]) == ipaddress.ip_address(observed[0])
    except ValueError:
        return claimed[0] == observed[0]


class RegistrationGuard:
    """Checks registrations for a router: freshness, replay, address, keys.

    ``certified_prefixes``: blocks of self-certifying IDs; a registration for an ID in one
    (or a prefix overlapping one) must be a /256 ID signed by the key that certifies it.
    ``max_skew``: how far (seconds) a registration's timestamp may be from ``now``.
    """

    def __init__(
        self,
        certified_prefixes: Iterable[PrefixLike] = (),
        max_skew: float = 30.0,
        max_nonces: int = 100_000,
        max_pinned: int = 100_000,
        max_nonces_per_source: int | None = None,
    ) -> None:
        if not (math.isfinite(max_skew) and max_skew > 0):
            raise ValueError(f"max_skew must be a positive number of seconds, got {max_skew!r}")
        if max_nonces < 1:
            raise ValueError(f"max_nonces must be at least 1, got {max_nonces}")
        if max_pinned < 0:
            raise ValueError(f"max_pinned must be at least 0 (0: no pinning), got {max_pinned}")
        self._certified: tuple[ServicePrefix, ...] = tuple(
            as_service_prefix(p) for p in certified_prefixes
        )
        self.max_skew = float(max_skew)
        self.max_nonces = max_nonces
        self.max_pinned = max_pinned
        # One source's share: a host refreshing 80 services 4 times a second within the
        # 30 s window fits the default (100,000 / 10).
        self.max_nonces_per_source = (
            max(1, max_nonces // 10) if max_nonces_per_source is None else max_nonces_per_source
        )
        self._per_source: Counter[Address] = Counter()  # source -> nonces it holds
        self._seen: dict[str, _Seen] = {}
        self._expiries: list[tuple[float, str]] = []  # heap, one item per _seen entry
        self._pinned: OrderedDict[int, bytes] = OrderedDict()  # ID value -> raw key, LRU last
        self.stats: Counter[str] = Counter()

    @property
    def certified_prefixes(self) -> tuple[ServicePrefix, ...]:
        """The blocks where a registration must be signed by a certifying key."""
        return self._certified

    @property
    def nonce_count(self) -> int:
        """How many nonces are remembered (expired ones may linger until the next check)."""
        return len(self._seen)

    @property
    def pinned_count(self) -> int:
        """How many serviceIDs have a pinned key."""
        return len(self._pinned)

    def pinned_key(self, prefix: PrefixLike) -> bytes | None:
        """The raw key pinned for a /256 serviceID, if any (does not refresh the LRU)."""
        p = as_service_prefix(prefix)
        return self._pinned.get(p.value) if p.length == SERVICE_ID_BITS else None

    def pin_key(self, prefix: PrefixLike, raw: bytes) -> None:
        """Pin ``raw`` as the key of a /256 serviceID (a router cluster shares its pins)."""
        p = as_service_prefix(prefix)
        if p.length == SERVICE_ID_BITS and self.max_pinned > 0:
            self._pin(p.value, raw)

    def certified_block(self, prefix: ServicePrefix) -> ServicePrefix | None:
        """The longest certified prefix overlapping ``prefix`` (holding it, or inside it)."""
        best: ServicePrefix | None = None
        for block in self._certified:
            if (block.contains(prefix) or prefix.contains(block)) and (
                best is None or block.length > best.length
            ):
                best = block
        return best

    def purge(self, now: float) -> None:
        """Forget the nonces whose window has passed (done by :meth:`check` too)."""
        heap = self._expiries
        # Strictly past: at now == timestamp + max_skew the registration is not stale yet.
        while heap and heap[0][0] < now:
            self._forget_oldest()

    def _forget_oldest(self) -> None:
        _, nonce = heapq.heappop(self._expiries)
        seen = self._seen.pop(nonce)
        source = seen.observed
        left = self._per_source[source] - 1
        if left:
            self._per_source[source] = left
        else:
            del self._per_source[source]

    def check(self, reg: Registration, op: MessageKind, observed: Address, now: float) -> Address:
        """Accept ``reg`` for ``op`` arriving from ``observed`` at ``now`` (unix seconds).

        Returns the instance address to use (always ``observed``); raises
        :class:`RegistrationRefused` otherwise, counting the reason in :attr:`stats`.
        """
        try:
            return self._check(reg, op, observed, now)
        except RegistrationRefused as exc:
            self.stats[exc.reason] += 1
            raise

    def _check(self, reg: Registration, op: MessageKind, observed: Address, now: float) -> Address:
        if op not in (MessageKind.REGISTER, MessageKind.UNREGISTER):
            raise ValueError(f"registrations are checked for REGISTER or UNREGISTER, not {op!r}")
        if not math.isfinite(now):
            raise ValueError(f"now must be a finite unix time, got {now!r}")
        service = reg.service
        # 1. freshness
        skew = reg.timestamp - now
        if abs(skew) > self.max_skew:
            raise RegistrationRefused(
                "stale",
                f"registration for {service} is timestamped {skew:+.1f} s from the router's "
                f"clock (at most {self.max_skew:g} s allowed)",
            )
        # 2. replay (an identical retransmission from the same source is not one)
        self.purge(now)
        signed = reg.signed_bytes(op)
        digest = hashlib.sha256(signed).digest()
        seen = self._seen.get(reg.nonce)
        if seen is not None and (seen.digest != digest or seen.observed != observed):
            raise RegistrationRefused(
                "replay", f"nonce {reg.nonce} was already used (registration for {service})"
            )
        # 3. address
        claimed = reg.instance_address
        if claimed is not None and not _same_address(claimed, observed):
            raise RegistrationRefused(
                "address_mismatch",
                f"registration for {service} claims address {reg.address} but came from "
                f"{observed[0]}:{observed[1]}",
            )
        # 4. key and signature
        prefix = reg.prefix
        key: ServicePublicKey | None = None
        if reg.public_key is not None:
            if prefix.length != SERVICE_ID_BITS:
                raise RegistrationRefused(
                    "not_certified",
                    f"a key certifies only a full /256 serviceID, not the prefix {service}",
                )
            try:
                key = ServicePublicKey(bytes.fromhex(reg.public_key))
            except ValueError:
                raise RegistrationRefused(
                    "bad_signature", f"public key {reg.public_key} is not a usable Ed25519 key"
                ) from None
            if not key.certifies(prefix.service_id):
                raise RegistrationRefused(
                    "not_certified",
                    f"serviceID {prefix.service_id.hex} is not certified by key {reg.public_key}",
                )
            if reg.signature is None:
                raise RegistrationRefused(
                    "bad_signature", f"registration for {service} carries a key but no signature"
                )
            if not key.verify_signature(signed, bytes.fromhex(reg.signature)):
                raise RegistrationRefused(
                    "bad_signature",
                    f"bad signature on the {op.name} of {service} by key {reg.public_key}",
                )
        # 5. certified blocks need a key
        block = self.certified_block(prefix)
        if block is not None and key is None:
            raise RegistrationRefused(
                "key_required",
                f"{service} overlaps the certified block {block}: only a /256 serviceID signed "
                "by its certifying key may be registered there",
            )
        # 6. key pinning (trust on first use) outside the certified blocks
        pinnable = block is None and prefix.length == SERVICE_ID_BITS and self.max_pinned > 0
        if pinnable:
            pinned = self._pinned.get(prefix.value)
            if pinned is not None and (key is None or key.raw != pinned):
                offered = "no key" if key is None else f"key {reg.public_key}"
                raise RegistrationRefused(
                    "key_mismatch",
                    f"serviceID {prefix.service_id.hex} was registered with key {pinned.hex()}; "
                    f"this {op.name} has {offered}",
                )
        # All checks passed: remember the nonce, then the key.
        if seen is None:
            if self._per_source[observed] >= self.max_nonces_per_source:
                raise RegistrationRefused(
                    "quota",
                    f"{observed[0]}:{observed[1]} sent {self._per_source[observed]} "
                    f"registrations within "
                    f"{self.max_skew:g} s (its limit): try again in a few seconds",
                )
            while len(self._seen) >= self.max_nonces:
                self._forget_oldest()  # by age, not by refusing everyone
                self.stats["nonce_evicted"] += 1
            expiry = reg.timestamp + self.max_skew
            self._seen[reg.nonce] = _Seen(expiry, digest, observed)
            self._per_source[observed] += 1
            heapq.heappush(self._expiries, (expiry, reg.nonce))
        # Only a registration pins a key; an unregistration refreshes an existing pin.
        if (
            pinnable
            and key is not None
            and (op is MessageKind.REGISTER or prefix.value in self._pinned)
        ):
            self._pin(prefix.value, key.raw)
        return observed

    def _pin(self, sid: int, raw: bytes) -> None:
        pinned = self._pinned
        if sid in pinned:
            pinned.move_to_end(sid)
            return
        pinned[sid] = raw
        while len(pinned) > self.max_pinned:
            pinned.popitem(last=False)

"""Delegations: a service key vouches for an instance key, until an expiry.

A replica of a self-certifying service should not need the service's private key. Instead
the service key signs a :class:`Delegation` naming the instance's public key and a validity
window; the instance proves its own key (in TLS, see :mod:`pyserval.runtime.secure`) and
shows the delegation, and a client checks the chain up to the serviceID: the delegating key
certifies the ID (the hash check of :class:`~pyserval.naming.keys.ServicePublicKey`), the
signature is good, the instance key is the one that was proved, and the window holds now.

Encoding (149 bytes, all integers big-endian)::

    magic "SVDL" | version 1 | service public key (32) | instance public key (32)
    | not_before (u64, Unix seconds) | not_after (u64) | Ed25519 signature (64)

The signature covers a domain-separation string followed by every byte before it, so a
delegation cannot be confused with a signed registration or any other message.

What this module does not do: read a clock (every check takes ``now``; only
:meth:`ServiceKey.delegate <pyserval.naming.keys.ServiceKey.delegate>` defaults it, when an
operator issues one), or revoke: a delegation ends only by expiring, so keep ``valid_for``
short and re-issue.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from .public_key import PUBLIC_KEY_BYTES, SIGNATURE_BYTES, ServicePublicKey
from .service_id import ServiceID

if TYPE_CHECKING:
    from .keys import ServiceKey

__all__ = [
    "DELEGATION_BYTES",
    "MAX_CLOCK_SKEW",
    "Delegation",
    "DelegationProblem",
    "InvalidDelegation",
]

_MAGIC: Final = b"SVDL"
_VERSION: Final = 1
_DOMAIN: Final = b"pyserval/delegation/v1\x00"
_TIMES: Final = struct.Struct(">QQ")
_BODY_BYTES: Final = len(_MAGIC) + 1 + 2 * PUBLIC_KEY_BYTES + _TIMES.size  # 85
DELEGATION_BYTES: Final = _BODY_BYTES + SIGNATURE_BYTES  # 149
# A delegation issued on a host whose clock runs ahead is still accepted for this long
# before its start. Expiry gets no such grace: it is the only way to revoke.
MAX_CLOCK_SKEW: Final = 60


class DelegationProblem(enum.Enum):
    """Why a delegation was refused."""

    MALFORMED = "malformed"
    WRONG_SERVICE = "wrong_service"  # the delegating key does not certify the serviceID
    BAD_SIGNATURE = "bad_signature"  # forged or altered
    WRONG_INSTANCE = "wrong_instance"  # it names another instance key than the one proved
    NOT_YET_VALID = "not_yet_valid"
    EXPIRED = "expired"


class InvalidDelegation(ValueError):
    """A delegation does not hold; ``problem`` says why."""

    def __init__(self, problem: DelegationProblem, message: str) -> None:
        super().__init__(message)
        self.problem = problem


@dataclass(frozen=True)
class Delegation:
    """The service key's signed statement that ``instance_key`` may act for every serviceID
    it certifies, from ``not_before`` until ``not_after`` (Unix seconds)."""

    service_key: ServicePublicKey
    instance_key: ServicePublicKey
    not_before: int
    not_after: int
    signature: bytes

    @staticmethod
    def _body(
        service_key: ServicePublicKey,
        instance_key: ServicePublicKey,
        not_before: int,
        not_after: int,
    ) -> bytes:
        return (
            _MAGIC
            + bytes([_VERSION])
            + service_key.raw
            + instance_key.raw
            + _TIMES.pack(not_before, not_after)
        )

    @classmethod
    def issue(
        cls,
        service_key: ServiceKey,
        instance_key: ServicePublicKey,
        not_before: int,
        not_after: int,
    ) -> Delegation:
        """Sign a delegation with ``service_key`` (times as Unix seconds)."""
        if not 0 <= not_before < not_after < 2**64:
            raise ValueError(f"expected 0 <= not_before < not_after: {not_before}, {not_after}")
        body = cls._body(service_key.public_key, instance_key, not_before, not_after)
        return cls(
            service_key.public_key,
            instance_key,
            not_before,
            not_after,
            service_key.sign(_DOMAIN + body),
        )

    def encode(self) -> bytes:
        """The 149-byte encoding (see the module docstring)."""
        body = self._body(self.service_key, self.instance_key, self.not_before, self.not_after)
        return body + self.signature

    @classmethod
    def decode(cls, data: bytes) -> Delegation:
        """Parse an encoding; :class:`InvalidDelegation` (MALFORMED) if it is not one. The
        signature is not checked here: :meth:`check` does."""
        data = bytes(data)
        if len(data) != DELEGATION_BYTES:
            raise InvalidDelegation(
                DelegationProblem.MALFORMED,
                f"a delegation is {DELEGATION_BYTES} bytes, got {len(data)}",
            )
        if data[:4] != _MAGIC or data[4] != _VERSION:
            raise InvalidDelegation(
                DelegationProblem.MALFORMED,
                f"not a version {_VERSION} delegation (starts {data[:5].hex()})",
            )
        offset = 5
        service_raw = data[offset : offset + PUBLIC_KEY_BYTES]
        offset += PUBLIC_KEY_BYTES
        instance_raw = data[offset : offset + PUBLIC_KEY_BYTES]
        offset += PUBLIC_KEY_BYTES
        not_before, not_after = _TIMES.unpack_from(data, offset)
        try:
            service_key = ServicePublicKey(service_raw)
            instance_key = ServicePublicKey(instance_raw)
        except ValueError as exc:  # not a point on the curve
            raise InvalidDelegation(DelegationProblem.MALFORMED, f"bad key: {exc}") from None
        return cls(service_key, instance_key, not_before, not_after, data[_BODY_BYTES:])

    def check(self, service_id: ServiceID, instance_key: ServicePublicKey, now: float) -> None:
        """Raise :class:`InvalidDelegation` unless this delegation lets ``instance_key`` act
        for ``service_id`` at Unix time ``now``. Checked in the order a forger would have
        to get past: the service, the signature, the instance, the window."""
        if not self.service_key.certifies(service_id):
            raise InvalidDelegation(
                DelegationProblem.WRONG_SERVICE,
                f"the delegation is by key {self.service_key.raw.hex()}, which does not "
                f"certify serviceID {service_id.hex}",
            )
        body = self._body(self.service_key, self.instance_key, self.not_before, self.not_after)
        if not self.service_key.verify_signature(_DOMAIN + body, self.signature):
            raise InvalidDelegation(
                DelegationProblem.BAD_SIGNATURE,
                f"the delegation's signature is not by service key {self.service_key.raw.hex()}",
            )
        if instance_key != self.instance_key:
            raise InvalidDelegation(
                DelegationProblem.WRONG_INSTANCE,
                f"the delegation names instance key {self.instance_key.raw.hex()}, "
                f"the peer proved {instance_key.raw.hex()}",
            )
        if now + MAX_CLOCK_SKEW < self.not_before:
            raise InvalidDelegation(
                DelegationProblem.NOT_YET_VALID,
                f"the delegation starts at {self.not_before}, now is {now:.0f}",
            )
        if now >= self.not_after:
            raise InvalidDelegation(
                DelegationProblem.EXPIRED,
                f"the delegation expired at {self.not_after}, now is {now:.0f}",
            )

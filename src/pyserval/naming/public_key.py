"""The public half of a self-certifying key: the hash that certifies serviceIDs, and
signature checks.

What :mod:`~pyserval.naming.keys` (the key pair) and :mod:`~pyserval.naming.delegation`
(delegations between keys) both build on; it signs nothing and holds no private key.
"""

from __future__ import annotations

import hashlib
from typing import Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from .service_id import SERVICE_ID_BITS, ServiceID

__all__ = [
    "CERTIFIED_BITS",
    "MAX_CERTIFIED_PREFIX",
    "PUBLIC_KEY_BYTES",
    "SIGNATURE_BYTES",
    "NotCertified",
    "ServicePublicKey",
    "key_hash",
]

CERTIFIED_BITS: Final = 160
MAX_CERTIFIED_PREFIX: Final = SERVICE_ID_BITS - CERTIFIED_BITS  # 96
_HASH_MASK: Final = (1 << CERTIFIED_BITS) - 1
_HASH_DOMAIN: Final = b"pyserval/self-certifying/v1\x00"
PUBLIC_KEY_BYTES: Final = 32
SIGNATURE_BYTES: Final = 64


class NotCertified(ValueError):
    """A serviceID is not certified by the key it was presented with."""


def key_hash(public_key: bytes) -> int:
    """The 160-bit hash of a raw 32-byte Ed25519 public key that certifies IDs."""
    digest = hashlib.sha256(_HASH_DOMAIN + public_key).digest()
    return int.from_bytes(digest[:20], "big")


class ServicePublicKey:
    """The public half: checks that it certifies an ID and verifies signatures."""

    __slots__ = ("_raw", "_key", "_hash")

    def __init__(self, raw: bytes) -> None:
        raw = bytes(raw)
        if len(raw) != PUBLIC_KEY_BYTES:
            raise ValueError(f"an Ed25519 public key is 32 bytes, got {len(raw)}")
        self._raw = raw
        self._key = Ed25519PublicKey.from_public_bytes(raw)
        self._hash = key_hash(raw)

    @property
    def raw(self) -> bytes:
        """The 32-byte raw public key."""
        return self._raw

    def certifies(self, service_id: ServiceID) -> bool:
        """Whether the low 160 bits of ``service_id`` are this key's hash."""
        return (service_id.value & _HASH_MASK) == self._hash

    def check_certifies(self, service_id: ServiceID) -> None:
        """Raise :class:`NotCertified` unless this key certifies ``service_id``."""
        if not self.certifies(service_id):
            raise NotCertified(
                f"serviceID {service_id.hex} is not certified by public key {self._raw.hex()}: "
                f"its low 160 bits are {service_id.value & _HASH_MASK:040x}, "
                f"the key's hash is {self._hash:040x}"
            )

    def verify_signature(self, data: bytes, signature: bytes) -> bool:
        """Whether ``signature`` is this key's signature of ``data``."""
        if len(signature) != SIGNATURE_BYTES:
            return False
        try:
            self._key.verify(bytes(signature), bytes(data))
        except InvalidSignature:
            return False
        return True

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ServicePublicKey):
            return self._raw == other._raw
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._raw)

    def __repr__(self) -> str:
        return f"ServicePublicKey('{self._raw.hex()}')"

"""Self-certifying serviceIDs from Ed25519 keys.

A self-certifying serviceID carries, in its low 160 bits, a hash of its owner's public key;
its high bits are a prefix of the owner's choosing (at most 96 bits, so a block can still be
routed by prefix). Whoever holds the private key can sign control-plane messages (service
registrations) and anyone can check both that the key certifies the ID and that the
signature is good, without any certificate authority.
"""

from __future__ import annotations

import math
import time

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .delegation import Delegation
from .public_key import (  # re-exported: their home before public_key
    CERTIFIED_BITS,
    MAX_CERTIFIED_PREFIX,
    PUBLIC_KEY_BYTES,
    SIGNATURE_BYTES,
    NotCertified,
    ServicePublicKey,
    key_hash,
)
from .service_id import PrefixLike, ServiceID, ServicePrefix, as_service_prefix

__all__ = [
    "CERTIFIED_BITS",
    "MAX_CERTIFIED_PREFIX",
    "PUBLIC_KEY_BYTES",
    "SIGNATURE_BYTES",
    "NotCertified",
    "ServiceKey",
    "ServicePublicKey",
    "key_hash",
]


class ServiceKey:
    """An Ed25519 key pair that makes and proves self-certifying serviceIDs."""

    __slots__ = ("_private", "_public")

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._private = private_key
        raw = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self._public = ServicePublicKey(raw)

    @classmethod
    def generate(cls) -> ServiceKey:
        """A new random key."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, data: bytes) -> ServiceKey:
        """Load a key from its 32-byte raw private form."""
        if len(data) != 32:
            raise ValueError(f"an Ed25519 private key is 32 bytes, got {len(data)}")
        return cls(Ed25519PrivateKey.from_private_bytes(bytes(data)))

    def private_bytes(self) -> bytes:
        """The 32-byte raw private key (keep it secret)."""
        return self._private.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )

    @property
    def public_key(self) -> ServicePublicKey:
        """The public half."""
        return self._public

    def service_id(self, prefix: PrefixLike | None = None) -> ServiceID:
        """The self-certifying ID of this key under ``prefix`` (at most 96 bits, default /0)."""
        p = ServicePrefix.default() if prefix is None else as_service_prefix(prefix)
        if p.length > MAX_CERTIFIED_PREFIX:
            raise ValueError(
                f"a self-certifying prefix has at most {MAX_CERTIFIED_PREFIX} bits, got {p.length}"
            )
        return ServiceID._of(p.value | self._public._hash)

    def verify(self, service_id: ServiceID) -> bool:
        """Whether this key certifies ``service_id``."""
        return self._public.certifies(service_id)

    def sign(self, data: bytes) -> bytes:
        """Sign ``data`` (64-byte Ed25519 signature)."""
        return self._private.sign(bytes(data))

    def sign_for(self, service_id: ServiceID, data: bytes) -> bytes:
        """Sign ``data`` on behalf of ``service_id``; refuse an ID this key does not certify."""
        self._public.check_certifies(service_id)
        return self.sign(data)

    def delegate(
        self,
        instance_key: ServiceKey | ServicePublicKey,
        *,
        valid_for: float,
        now: float | None = None,
    ) -> Delegation:
        """Let ``instance_key`` act for every serviceID this key certifies, for
        ``valid_for`` seconds from ``now`` (Unix time; default: the wall clock, read here
        because issuing is an operator's act, not part of any protocol path).

        Only the instance's public half is needed: a replica can keep its private key and
        send the public key to whoever holds this one.
        """
        if not valid_for > 0:
            raise ValueError(f"valid_for must be positive seconds, got {valid_for}")
        start = math.floor(time.time() if now is None else now)
        public = instance_key.public_key if isinstance(instance_key, ServiceKey) else instance_key
        return Delegation.issue(self, public, start, start + math.ceil(valid_for))

    def __repr__(self) -> str:
        return f"ServiceKey(public={self._public.raw.hex()})"

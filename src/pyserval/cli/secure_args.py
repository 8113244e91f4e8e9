"""The ``--secure`` options shared by ``pyserval echo`` and ``pyserval translate``.

Key files hold a 32-byte Ed25519 private key as 64 hex digits; delegation files hold a
delegation's 149-byte encoding in hex (``pyserval key`` writes both).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..naming.delegation import Delegation
from ..naming.keys import ServiceKey

__all__ = ["add_secure_arguments", "load_delegation", "load_key", "secure_settings"]


def add_secure_arguments(parser: argparse.ArgumentParser, *, serving: str) -> None:
    """``--secure``, ``--key-file``, ``--delegation-file`` (``serving``: when a key is needed)."""
    parser.add_argument(
        "--secure",
        action="store_true",
        help="TLS 1.3 that proves the serviceID (a self-certifying ID in hex)",
    )
    parser.add_argument(
        "--key-file",
        help=f"{serving}: the service key, or an instance key with --delegation-file "
        "(64 hex digits; `pyserval key new` writes one)",
    )
    parser.add_argument(
        "--delegation-file", help=f"{serving}: the service key's delegation of --key-file (hex)"
    )


def load_key(path: str) -> ServiceKey:
    """A private key from a key file (``ValueError`` naming the file if it is not one)."""
    try:
        return ServiceKey.from_private_bytes(bytes.fromhex(Path(path).read_text().strip()))
    except ValueError as exc:
        raise ValueError(f"{path}: not a key file (64 hex digits): {exc}") from None


def load_delegation(path: str) -> Delegation:
    """A delegation from a delegation file."""
    try:
        return Delegation.decode(bytes.fromhex(Path(path).read_text().strip()))
    except ValueError as exc:
        raise ValueError(f"{path}: not a delegation file: {exc}") from None


def secure_settings(args: argparse.Namespace) -> tuple[ServiceKey | None, Delegation | None]:
    """The key and delegation the options name (either may be None)."""
    key = load_key(args.key_file) if args.key_file else None
    delegation = load_delegation(args.delegation_file) if args.delegation_file else None
    if delegation is not None and key is None:
        raise ValueError("--delegation-file needs --key-file (the instance key it delegates to)")
    return key, delegation

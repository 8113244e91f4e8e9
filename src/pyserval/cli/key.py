"""``pyserval key``: make service keys and delegations for ``--secure``.

    pyserval key new service.key --prefix 0a0b/16     # prints the self-certifying serviceID
    pyserval key id service.key --prefix 0a0b/16
    pyserval key delegate --service-key service.key --instance-key replica.key \\
        --valid-for 86400 --out replica.delegation
"""

from __future__ import annotations

import argparse
import os
import sys

from ..naming.keys import ServiceKey
from .secure_args import load_key

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``pyserval key``."""
    sub = parser.add_subparsers(dest="action", required=True)
    new = sub.add_parser("new", help="write a new private key (hex) and print its serviceID")
    new.add_argument("file")
    new.add_argument("--prefix", default=None, help="serviceID prefix (at most 96 bits)")
    ident = sub.add_parser("id", help="print the serviceID a key certifies under a prefix")
    ident.add_argument("file")
    ident.add_argument("--prefix", default=None)
    dele = sub.add_parser("delegate", help="let an instance key act for the service")
    dele.add_argument("--service-key", required=True)
    dele.add_argument("--instance-key", required=True)
    dele.add_argument("--valid-for", type=float, required=True, help="seconds")
    dele.add_argument("--out", required=True, help="delegation file to write (hex)")


def _write_private(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")


def run(args: argparse.Namespace) -> int:
    """Do the action; errors are one line on standard error, exit status 2."""
    try:
        if args.action == "new":
            key = ServiceKey.generate()
            sid = key.service_id(args.prefix)  # a bad prefix fails before the file exists
            _write_private(args.file, key.private_bytes().hex())
            print(sid.hex)
        elif args.action == "id":
            print(load_key(args.file).service_id(args.prefix).hex)
        else:
            service = load_key(args.service_key)
            instance = load_key(args.instance_key)
            delegation = service.delegate(instance.public_key, valid_for=args.valid_for)
            with open(args.out, "w") as f:
                f.write(delegation.encode().hex() + "\n")
            print(f"valid until {delegation.not_after} (Unix time)")
    except (OSError, ValueError) as exc:
        print(f"pyserval key: {exc}", file=sys.stderr)
        return 2
    return 0

"""Unguessable numbers for flowIDs, nonces, initial sequence numbers and tokens.

Every value an off-path host must not guess (flowIDs, SAL nonces, control numbers, TCP
initial sequence numbers, address-challenge tokens, multipath keys, SYN-cookie secrets) is
drawn from the operating system's CSPRNG. :class:`SecureRandom` keeps the
:class:`random.Random` interface the sans-I/O core is written against (``getrandbits``,
``random``, ``randint`` ...) so the simulated network can still pass a seeded generator for
determinism, but by default a host gets this one: it reads ``os.urandom`` in 4 KiB batches
(one system call per about 100 connections instead of five per connection) and hands the
bytes out once each; a draw of up to 64 bits takes a 64-bit word of its own batch.

What it deliberately does not do: it has no state to save or seed (``seed`` is ignored and
``getstate`` raises, as :class:`random.SystemRandom` does), and one instance is not meant to
be shared between threads (each host has its own). A forked child throws away the batch it
inherited, so parent and child never hand out the same bytes.
"""

from __future__ import annotations

import array
import os
import random
from typing import Any, NoReturn

__all__ = ["SecureRandom"]

_BATCH = 4096
_fork_generation = 0


def _after_fork_in_child() -> None:
    global _fork_generation
    _fork_generation += 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class SecureRandom(random.Random):
    """A :class:`random.Random` whose every bit comes from ``os.urandom`` (batched)."""

    def __init__(self, batch: int = _BATCH) -> None:
        self._batch = max(64, batch)
        self._buf = b""
        self._pos = 0
        # Draws of up to 64 bits (flowIDs, nonces, ISNs: four per connection) come from
        # 64-bit words of their own batch, taken from the end: one list pop, not a slice
        # and a conversion (0.7 us a draw).
        self._words: list[int] = []
        self._generation = _fork_generation
        super().__init__()

    def seed(self, a: Any = None, version: int = 2) -> None:
        """Ignored: there is no state to seed (the bytes come from the kernel)."""

    def getstate(self) -> NoReturn:
        """Not available: nothing here may be replayed."""
        raise NotImplementedError("SecureRandom has no state to save")

    def setstate(self, state: Any) -> NoReturn:
        """Not available: nothing here may be replayed."""
        raise NotImplementedError("SecureRandom has no state to restore")

    def _forked(self) -> None:
        """In a forked child: throw away every batch inherited from the parent."""
        self._generation = _fork_generation
        self._buf = b""
        self._pos = 0
        self._words = []

    def _take(self, n: int) -> bytes:
        if self._generation != _fork_generation:
            self._forked()
        pos = self._pos
        if pos + n > len(self._buf):
            self._buf = os.urandom(max(self._batch, n))
            pos = 0
        self._pos = pos + n
        return self._buf[pos : pos + n]

    def getrandbits(self, k: int) -> int:
        """``k`` random bits as a non-negative int."""
        if 0 < k <= 64:
            if self._generation != _fork_generation:
                self._forked()
            words = self._words
            if not words:
                words = self._words = array.array("Q", os.urandom(self._batch // 8 * 8)).tolist()
            return words.pop() >> (64 - k)
        if k < 0:
            raise ValueError("number of bits must be non-negative")
        if k == 0:
            return 0
        n = (k + 7) // 8
        return int.from_bytes(self._take(n), "big") >> (n * 8 - k)

    def random(self) -> float:
        """A float in [0, 1) with 53 random bits."""
        return self.getrandbits(53) * (1.0 / (1 << 53))

    def randbytes(self, n: int) -> bytes:
        """``n`` random bytes."""
        return self._take(n)

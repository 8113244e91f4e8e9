"""An asyncio event loop that polls briefly before it sleeps (opt-in, off by default).

Why: a loop that has nothing to do blocks in ``epoll_wait``, and the datagram that ends
the wait must wake it. On a virtual machine whose idle vCPUs halt at once (Firecracker,
and KVM guests without halt polling) that wake-up goes through the hypervisor: the sender's
``sendto`` pays for it (``sock_def_readable``, about 7% of both processes' CPU in a
connect loop here) and the receiver starts tens of microseconds later. A request/response
exchange on a short path sleeps and wakes at nearly every datagram. Linux offers the same
trade for sockets as ``SO_BUSY_POLL``, off by default for the same reason as here: it
spends CPU to save latency.

What it does: :class:`BusyPollSelector` is the platform's default selector whose
:meth:`~BusyPollSelector.select`, when the loop would block, first polls without blocking
for up to ``spin`` seconds; an event in that time returns at once and no one sleeps. It is
adaptive, as glibc's adaptive mutexes are: it keeps a few credits, a spin that catches an
event earns one (up to :data:`MAX_CREDIT`), a spin that does not loses one, and with none
left it sleeps at once until a sleep that ended within ``spin`` (a spin would have caught
it) gives one back. So a loop whose events come slower than ``spin`` stops spinning after
:data:`MAX_CREDIT` misses at most, and spends at most ``spin`` per wake-up after that
only when events come that quickly again.

Use it for a whole program with ``asyncio.Runner(loop_factory=busy_poll_loop(100e-6))``
(Python 3.11's public way to pick the loop). It changes no protocol behaviour: the same
callbacks run in the same order; only the moment the loop notices an event moves.
"""

from __future__ import annotations

import asyncio
import math
import selectors
import time
from collections.abc import Callable
from typing import Any

__all__ = ["MAX_CREDIT", "BusyPollSelector", "busy_poll_loop"]

MAX_CREDIT = 8
"""Spins that may miss in a row before the selector stops spinning."""

_DefaultSelector: type[selectors.BaseSelector] = selectors.DefaultSelector


class BusyPollSelector(_DefaultSelector):  # type: ignore[misc,valid-type]
    """The default selector, polling up to ``spin`` seconds before it blocks."""

    def __init__(self, spin: float = 100e-6) -> None:
        """``spin``: how long to poll before sleeping, in seconds (0: never)."""
        if not 0 <= spin < math.inf:  # (NaN fails too; an endless spin would never sleep)
            raise ValueError(f"spin must be a non-negative number of seconds, got {spin!r}")
        super().__init__()
        self.spin = spin
        self.credit = MAX_CREDIT
        # For inspection and tests: spins that caught an event, spins that did not, and
        # sleeps taken without spinning (no credit left).
        self.spins_won = 0
        self.spins_lost = 0
        self.sleeps_unspun = 0

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        """Ready keys, as the default selector's; a blocking call polls ``spin`` first."""
        spin = self.spin
        poll: Callable[[float | None], list[tuple[selectors.SelectorKey, int]]] = super().select
        if (timeout is not None and timeout <= spin) or not spin:
            return poll(timeout)  # (not asked to wait longer than a spin: nothing to save)
        clock = time.perf_counter
        if self.credit > 0:
            start = clock()
            end = start + spin
            while True:
                ready = poll(0)
                if ready:
                    self.spins_won += 1
                    if self.credit < MAX_CREDIT:
                        self.credit += 1
                    return ready
                if clock() >= end:
                    break
            self.spins_lost += 1
            self.credit -= 1
            if timeout is not None:
                timeout = max(0.0, timeout - (clock() - start))
            return poll(timeout)
        self.sleeps_unspun += 1
        start = clock()
        ready = poll(timeout)
        if ready and clock() - start <= spin:
            self.credit = 1  # events come this quickly again: try a spin next time
        return ready


def busy_poll_loop(spin: float = 100e-6) -> Callable[[], asyncio.AbstractEventLoop]:
    """A loop factory (for ``asyncio.Runner(loop_factory=...)``) whose loops use a
    :class:`BusyPollSelector` that polls ``spin`` seconds before sleeping."""
    BusyPollSelector(spin).close()  # (a bad spin fails here, not in the Runner)

    def new_loop() -> asyncio.AbstractEventLoop:
        selector: Any = BusyPollSelector(spin)
        return asyncio.SelectorEventLoop(selector)

    return new_loop

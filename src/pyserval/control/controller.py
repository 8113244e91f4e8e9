"""The service controller of a host: keeps the host's services registered with its router.

:class:`ControllerCore` is sans-I/O. It takes the host's service events and the router's
answers, and says which control messages to send and when it must run next:

* Every registered service is sent in one REGISTER (64 registrations a message) at once
  when it appears, then again every ``ttl * refresh`` seconds. A registration lives at the
  router for ``ttl`` seconds, so the refresh is also the retransmission (a lost REGISTER is
  repaired by the next one), and an instance that dies stops being chosen within ``ttl``.
* An UNREGISTER (on close) is retransmitted with a doubling timeout until acknowledged, or
  given up after ``max_tries`` (the registration then just expires).
* Each message is built afresh (new timestamp and nonce; signed with the service's key when
  it has one), so a message captured on the path is useless once the router has seen it.

:class:`HostServiceController` is the asyncio adapter a :class:`~pyserval.Host` with a
``router`` gets: a datagram socket of its own, one timer, and the host's service events.
A host given several routers (the routers of one cluster) uses the first until it stops
answering -- the network reports it unreachable, or no ACK came for ``ttl`` seconds while
registrations were outstanding -- then moves to the next: its registrations are sent there
at once, and its unresolved SYNs go there from then on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from ..core.host import DatagramEndpoint
from ..naming.service_id import ServiceID, ServicePrefix
from ..runtime.host import Host
from ..runtime.service_events import ServiceEvent, ServiceEventKind
from ..sal.inet import Address
from ..sal.service_table import NoSuchEntry, NoSuchRule, Rule
from ..transport.events import DatagramReceived, Event
from .messages import (
    CONTROL_SERVICE,
    MAX_REGISTRATIONS,
    AckMessage,
    BadControlMessage,
    MessageKind,
    RegisterMessage,
    Registration,
    UnregisterMessage,
    decode_message,
    encode_message,
)

__all__ = ["ControllerCore", "HostServiceController"]

LOGGER = logging.getLogger("pyserval.controller")
log = LOGGER

_DEFAULT_PREFIX: Final = "0" * 64 + "/0"
_MAX_PENDING: Final = 256  # messages awaiting an answer we still match acks against


@dataclass(slots=True)
class _Leaving:
    """A service being unregistered: retransmitted until acknowledged."""

    event: ServiceEvent
    due: float
    tries: int = 0


class ControllerCore:
    """Registrations of one host with one router (sans-I/O; see the module docstring).

    ``now`` is the host's monotonic clock (timers); ``wall`` is unix time (registration
    timestamps, which the router checks against its own clock).
    """

    def __init__(
        self,
        *,
        ttl: float = 1.0,
        refresh: float = 0.25,
        initial_rto: float = 0.2,
        max_tries: int = 8,
        address: str | None = None,
    ) -> None:
        if ttl <= 0 or not 0 < refresh < 1:
            raise ValueError(f"ttl must be > 0 and refresh in (0, 1): {ttl}, {refresh}")
        self.ttl = ttl
        self.interval = ttl * refresh
        self.initial_rto = initial_rto
        self.max_tries = max_tries
        self.address = address  # None: the router takes the address it sees us at
        self.services: dict[ServicePrefix, ServiceEvent] = {}
        self.accepted: set[ServicePrefix] = set()  # the router's last answer was yes
        self.refused: dict[ServicePrefix, str] = {}  # ... or no, and why
        self.leaving: dict[ServicePrefix, _Leaving] = {}
        self.stats: Counter[str] = Counter()
        self._refresh_at: float | None = None
        # When the oldest REGISTER still without any ACK since was sent (router liveness).
        self.unanswered_since: float | None = None
        self._seq = int.from_bytes(os.urandom(4), "big")
        # seq -> (kind, prefixes in message order): what an ACK answers.
        self._pending: dict[int, tuple[MessageKind, list[ServicePrefix]]] = {}

    # -- input --------------------------------------------------------------------------
    def on_service_event(self, event: ServiceEvent, now: float) -> None:
        """A service of the host appeared, went away, or the host's address changed."""
        prefix = event.prefix
        if event.kind is ServiceEventKind.REGISTER and prefix is not None:
            self.services[prefix] = event
            self.leaving.pop(prefix, None)
            self._refresh_at = now  # tell the router at once
        elif event.kind is ServiceEventKind.UNREGISTER and prefix is not None:
            if self.services.pop(prefix, None) is not None:
                self.accepted.discard(prefix)
                self.refused.pop(prefix, None)
                self.leaving[prefix] = _Leaving(event, now)
        elif event.kind is ServiceEventKind.ADDRESS_CHANGED:
            self._refresh_at = now

    def on_datagram(self, data: bytes) -> None:
        """A control message from the router (only ACKs are expected)."""
        try:
            msg = decode_message(data)
        except BadControlMessage as exc:
            self.stats[f"bad_message_{exc.reason}"] += 1
            return
        if not isinstance(msg, AckMessage):
            self.stats["unexpected_message"] += 1
            return
        sent = self._pending.pop(msg.seq, None)
        if sent is None:
            self.stats["stale_ack"] += 1
            return
        self.unanswered_since = None
        kind, prefixes = sent
        for prefix, result in zip(prefixes, msg.results, strict=False):
            if kind is MessageKind.UNREGISTER:
                self.leaving.pop(prefix, None)
            elif prefix in self.services:
                if result.ok:
                    self.accepted.add(prefix)
                    self.refused.pop(prefix, None)
                else:
                    self.accepted.discard(prefix)
                    self.refused[prefix] = result.reason
                    self.stats["refused"] += 1

    # -- output -------------------------------------------------------------------------
    def poll(self, now: float, wall: float) -> list[bytes]:
        """The control messages due at ``now``."""
        out: list[bytes] = []
        if self.services and self._refresh_at is not None and now >= self._refresh_at:
            self._refresh_at = now + self.interval
            out += self._messages(MessageKind.REGISTER, list(self.services.values()), wall)
            if self.unanswered_since is None:
                self.unanswered_since = now
        elif not self.services:
            self._refresh_at = None
        due = [leave for leave in self.leaving.values() if leave.due <= now]
        for leave in due:
            leave.tries += 1
            if leave.tries > self.max_tries:
                assert leave.event.prefix is not None
                del self.leaving[leave.event.prefix]
                self.stats["unregister_gave_up"] += 1
            else:
                leave.due = now + self.initial_rto * (1 << (leave.tries - 1))
        sending = [leave.event for leave in due if leave.tries <= self.max_tries]
        if sending:
            out += self._messages(MessageKind.UNREGISTER, sending, wall)
        return out

    def _messages(self, kind: MessageKind, events: list[ServiceEvent], wall: float) -> list[bytes]:
        out: list[bytes] = []
        for i in range(0, len(events), MAX_REGISTRATIONS):
            chunk = events[i : i + MAX_REGISTRATIONS]
            regs = [
                Registration.make(
                    e.prefix,
                    address=self.address,
                    weight=e.weight,
                    priority=e.priority,
                    ttl=self.ttl,
                    now=wall,
                    nonce=os.urandom(16),
                    key=e.key if e.prefix is not None and e.prefix.length == 256 else None,
                    op=kind,
                )
                for e in chunk
                if e.prefix is not None
            ]
            self._seq = (self._seq + 1) % (1 << 63)
            msg = (RegisterMessage if kind is MessageKind.REGISTER else UnregisterMessage)(
                seq=self._seq, registrations=regs
            )
            self._pending[self._seq] = (kind, [r.prefix for r in regs])
            while len(self._pending) > _MAX_PENDING:
                del self._pending[next(iter(self._pending))]  # the oldest: its ack is lost
            out.append(encode_message(msg))
            self.stats[f"sent_{kind.name.lower()}"] += 1
        return out

    def router_silent(self, now: float) -> bool:
        """Whether the router left our registrations unanswered for ``ttl`` seconds."""
        since = self.unanswered_since
        return since is not None and now - since >= self.ttl

    def switch_router(self, now: float) -> None:
        """We talk to another router now: forget what the old one said, register at once."""
        self._pending.clear()
        self.accepted.clear()
        self.refused.clear()
        self.unanswered_since = None
        self._refresh_at = now
        for leave in self.leaving.values():
            leave.due, leave.tries = now, 0
        self.stats["router_switches"] += 1

    def next_deadline(self) -> float | None:
        """When :meth:`poll` must run next."""
        times = [leave.due for leave in self.leaving.values()]
        if self.services and self._refresh_at is not None:
            times.append(self._refresh_at)
        return min(times) if times else None


class HostServiceController:
    """A host's controller on asyncio: registers the host's services with ``router``."""

    def __init__(self, host: Host, router: Address) -> None:
        self.host = host
        self.router = router
        self.routers = host.config.routers or [router]
        if router not in self.routers:
            self.routers.insert(0, router)
        self.core = ControllerCore(ttl=host.config.registration_ttl)
        self._endpoint: DatagramEndpoint | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._closed = False

    def _now(self) -> float:
        return self.host.loop.time()

    async def start(self) -> None:
        """Bind the control socket and register whatever the host serves already."""
        host = self.host
        # The controller's own socket: a random name, not a service, never registered.
        self._endpoint = host.bind_datagram(
            ServiceID(int.from_bytes(os.urandom(32), "big")), register=False
        )
        host.watch(self._endpoint.flowid, self._on_event)
        self._unsubscribe = host.subscribe(self._on_service_event)
        if len(self.routers) > 1:
            host.add_unreachable_hook(self._on_unreachable)
        self.pump()

    def _on_unreachable(self, address: Address) -> None:
        if address == self.router and not self._closed:
            self.switch_router("unreachable")
            self.pump()

    def switch_router(self, why: str) -> None:
        """Move to the next router of the list (its registrations are sent there at once)."""
        old = self.router
        new = self.routers[(self.routers.index(old) + 1) % len(self.routers)]
        if new == old:
            return
        table = self.host.service_table
        table.add(_DEFAULT_PREFIX, Rule.forward(new, priority=-1))
        with contextlib.suppress(NoSuchEntry, NoSuchRule):
            table.remove(_DEFAULT_PREFIX, Rule.forward(old, priority=-1))
        self.router = new
        self.core.switch_router(self._now())
        log.warning("router %s:%d %s: moving to %s:%d", *old, why, *new)

    def _on_service_event(self, event: ServiceEvent) -> None:
        self.core.on_service_event(event, self._now())
        self.pump()

    def _on_event(self, event: Event) -> None:
        if (
            isinstance(event, DatagramReceived)
            and event.address == self.router
            and event.via is None
        ):
            refused = dict(self.core.refused)
            self.core.on_datagram(event.data)
            for prefix, reason in self.core.refused.items():
                if refused.get(prefix) != reason:
                    LOGGER.warning("router %s:%d refused %s: %s", *self.router, prefix, reason)
            self.pump()

    def pump(self) -> None:
        """Send what is due and re-arm the one timer."""
        if self._closed or self._endpoint is None:
            return
        host = self.host
        if host.core is None or host.closed:
            return
        if len(self.routers) > 1 and self.core.router_silent(self._now()):
            self.switch_router("stopped answering")
        for data in self.core.poll(self._now(), time.time()):
            host.send_datagram(self._endpoint, CONTROL_SERVICE, data, to=self.router)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        deadline = self.core.next_deadline()
        if deadline is not None:
            self._timer = host.loop.call_at(deadline, self.pump)

    async def close(self, timeout: float = 0.5) -> None:
        """Wait (bounded) until the router acknowledged every UNREGISTER, then stop."""
        if self._unsubscribe is not None:
            self._unsubscribe()
        deadline = self._now() + timeout
        while self.core.leaving and self._now() < deadline:
            await asyncio.sleep(0.005)
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        if self._endpoint is not None:
            self.host.unwatch(self._endpoint.flowid)
            self.host.unbind_datagram(self._endpoint)

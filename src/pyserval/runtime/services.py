"""A host's services: registrations, service events and DELAY verdicts.

Binding a datagram socket or listening on a serviceID registers it (a REGISTER service
event); closing unregisters it (UNREGISTER). Subscribers (the controller, applications)
hear every event; a new subscriber first hears a REGISTER for each service already there.
SYNs a DELAY rule holds are released by the ``delay_handler``'s verdict (a coroutine, given
``delay_timeout`` seconds), or dropped when there is none.

What it does not do: talk to a router (the control plane subscribes and does), or route.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from ..core.host import DatagramEndpoint
from ..naming.keys import ServiceKey
from ..naming.service_id import ServiceID, ServiceLike, as_service_prefix
from .driver import Address, Driver
from .service_events import ServiceEvent, ServiceEventKind, ServiceEventListener

__all__ = ["DelayHandler", "Services"]

DelayHandler = Callable[[ServiceID], Awaitable[Address | None]]
"""The controller's verdict for SYNs held by a DELAY rule: where to forward them, or None."""


class Services:
    """The services of one host, on its ``driver``."""

    def __init__(self, driver: Driver, delay_timeout: float) -> None:
        self._driver = driver
        self._delay_timeout = delay_timeout
        self._listeners: list[ServiceEventListener] = []
        self._registered: dict[object, ServiceEvent] = {}  # listener/endpoint -> REGISTER
        self._verdicts: set[asyncio.Task[None]] = set()
        self.delay_handler: DelayHandler | None = None
        driver.on_delay = self._ask_delay

    # -- service events -------------------------------------------------------------------
    def subscribe(self, listener: ServiceEventListener) -> Callable[[], None]:
        """Call ``listener`` with every service event; returns a function that unsubscribes.
        A new subscriber first hears a REGISTER for each service already registered."""
        self._listeners.append(listener)
        for event in list(self._registered.values()):
            listener(event)

        def unsubscribe() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return unsubscribe

    @property
    def registered(self) -> list[ServiceEvent]:
        """The REGISTER events of the services bound or listened on now."""
        return list(self._registered.values())

    def owners(self) -> list[object]:
        """What holds a registration now (listeners and datagram endpoints)."""
        return list(self._registered)

    def announce(self, event: ServiceEvent) -> None:
        """Tell every subscriber about ``event``."""
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception as exc:  # application code must not break bind/close
                self._driver.loop.call_exception_handler(
                    {
                        "message": f"pyserval service event listener failed on {event!r}",
                        "exception": exc,
                    }
                )

    def register(
        self, owner: object, sid: ServiceID, weight: int, priority: int, key: ServiceKey | None
    ) -> None:
        """``owner`` serves ``sid``: check the key and weight, raise REGISTER."""
        if key is not None and not key.verify(sid):
            raise ValueError(f"key {key.public_key.raw.hex()} does not certify {sid.hex}")
        if not 1 <= weight <= 65535:
            raise ValueError(f"weight must be 1..65535, got {weight}")
        event = ServiceEvent(
            ServiceEventKind.REGISTER, as_service_prefix(sid), weight, priority, key
        )
        self._registered[owner] = event
        self.announce(event)

    def unregister(self, owner: object) -> None:
        """``owner`` stopped serving: raise UNREGISTER (once)."""
        event = self._registered.pop(owner, None)
        if event is not None:
            self.announce(
                ServiceEvent(
                    ServiceEventKind.UNREGISTER,
                    event.prefix,
                    event.weight,
                    event.priority,
                    event.key,
                )
            )

    # -- datagram sockets -----------------------------------------------------------------
    def bind_datagram(
        self,
        service: ServiceLike,
        *,
        weight: int,
        priority: int,
        key: ServiceKey | None,
        register: bool,
    ) -> DatagramEndpoint:
        """Bind a datagram socket to ``service`` (registered unless ``register`` is False)."""
        core = self._driver.require_core()
        ep = core.bind_datagram(service)
        if register:
            try:
                self.register(ep, ep.service_id, weight, priority, key)
            except ValueError:
                core.unbind_datagram(ep)
                raise
        return ep

    def unbind_datagram(self, ep: DatagramEndpoint) -> None:
        """Close a datagram socket (raises UNREGISTER)."""
        if self._driver.core is not None:
            self._driver.core.unbind_datagram(ep)
        self.unregister(ep)

    # -- DELAY verdicts -------------------------------------------------------------------
    def _ask_delay(self, sid: ServiceID) -> None:
        """SYNs for ``sid`` are held by a DELAY rule: ask the delay handler for a verdict."""
        handler = self.delay_handler
        if handler is None:
            self._release(sid, None)  # nobody to ask: drop them
            return

        async def verdict() -> None:
            hop: Address | None = None
            try:
                async with asyncio.timeout(self._delay_timeout):
                    hop = await handler(sid)
            except TimeoutError:
                hop = None
            except Exception as exc:  # the handler is application code
                self._driver.loop.call_exception_handler(
                    {"message": f"pyserval delay handler failed for {sid.hex}", "exception": exc}
                )
            self._release(sid, hop)

        task = asyncio.ensure_future(verdict())
        self._verdicts.add(task)
        task.add_done_callback(self._verdicts.discard)

    def _release(self, sid: ServiceID, hop: Address | None) -> None:
        driver = self._driver
        if driver.core is not None and not driver.closed:
            driver.core.release_delayed(sid, hop, driver.now())
            driver.schedule_flush()

    def cancel_verdicts(self) -> None:
        """Stop waiting for verdicts (the host is closing)."""
        for task in list(self._verdicts):
            task.cancel()

"""Service events: what the host's sockets tell the service controller.

``bind``/``listen`` on a serviceID raise REGISTER, ``close`` raises UNREGISTER, and a change
of the host's addresses raises ADDRESS_CHANGED (every registration is then renewed from the
new address). The controller (``pyserval.control``) turns them into registrations with the
service router; applications can subscribe too (``Host.subscribe``).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from ..naming.keys import ServiceKey
from ..naming.service_id import ServicePrefix

__all__ = [
    "HostController",
    "ServiceEvent",
    "ServiceEventKind",
    "ServiceEventListener",
]


class ServiceEventKind(enum.Enum):
    """What happened to a local service."""

    REGISTER = "register"
    UNREGISTER = "unregister"
    ADDRESS_CHANGED = "address_changed"


@dataclass(frozen=True, slots=True)
class ServiceEvent:
    """One service event. ``weight`` and ``priority`` are what the router is asked to use for
    this instance; ``key`` signs the registration of a self-certifying serviceID."""

    kind: ServiceEventKind
    prefix: ServicePrefix | None
    weight: int = 1
    priority: int = 0
    key: ServiceKey | None = None


ServiceEventListener = Callable[[ServiceEvent], None]


class HostController(Protocol):
    """The control plane attached to a host that has a service router (see
    ``pyserval.control.HostServiceController``)."""

    async def start(self) -> None:
        """Start registering the host's services."""

    async def close(self) -> None:
        """Unregister everything (bounded wait for the router's acknowledgement) and stop."""

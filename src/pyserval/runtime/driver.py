"""The runtime driver: a :class:`~pyserval.core.HostCore` on real UDP sockets and asyncio.

A thin adapter and nothing more. Datagrams read in batches from each interface go to the
core, and what the core wants to send goes out once per batch (and once per loop pass after
application calls, coalesced: :meth:`Driver.schedule_flush`). One ``loop.call_at`` timer
serves the whole host, re-armed only when the core's next deadline changes; it also ends
the waits that have a time limit (:meth:`Driver.wait_until`, a connect's), which are kept in
one heap rather than as a timer object each. Core events wake the tasks waiting on the
connection they name, and go to the watchers and hooks.

What it does not do: choose addresses or migrate (``runtime.interfaces``), talk to the
control plane or register services (``runtime.services``), or offer streams (``Host``).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import os
import time
from collections.abc import Callable

from ..core.host import DatagramEndpoint, HostCore, Listener
from ..errors import HostClosed
from ..naming.service_id import ServiceID, ServiceLike
from ..sal.inet import Address
from ..sal.train import SuperDatagram
from ..tools.pcap import PcapWriter
from ..transport.connection import Connection
from ..transport.events import Event, IncomingConnection
from .udp import UdpEndpoint

__all__ = ["Address", "Driver", "HostClosed"]

Batch = list[tuple[bytes, Address]]


def _no_clock() -> float:
    raise RuntimeError("the host is not running")


class _Waiters:
    """The tasks waiting on each connection, each on a future of its own: every core event
    that names the connection wakes them all and forgets the entry (a waiter whose
    condition still does not hold waits again), so the table holds only connections
    someone is waiting on. Lighter than an asyncio.Event per connection (no set flag to
    clear, no lock machinery), and a cancelled waiter takes only its own future along."""

    def __init__(self) -> None:
        self.events: dict[int, list[asyncio.Future[None]]] = {}

    def wake(self, conn_id: int) -> None:
        waiting = self.events.pop(conn_id, None)
        if waiting is not None:
            for fut in waiting:
                if not fut.done():
                    fut.set_result(None)

    def wake_all(self) -> None:
        for conn_id in list(self.events):
            self.wake(conn_id)

    async def wait_for(self, conn_id: int, ready: Callable[[], bool]) -> None:
        events = self.events
        while not ready():
            fut = asyncio.get_running_loop().create_future()
            waiting = events.get(conn_id)
            if waiting is None:
                events[conn_id] = [fut]
            else:
                waiting.append(fut)
            try:
                await fut
            except BaseException:
                waiting = events.get(conn_id)
                if waiting is not None and fut in waiting:
                    waiting.remove(fut)
                    if not waiting:
                        del events[conn_id]
                raise


class Driver:
    """Runs one :class:`HostCore`: its interfaces' sockets, its timer, its waiters.

    ``start`` takes the core and the running loop; until then (and after ``close``) every
    call that needs the core raises. ``on_delay`` is called with the serviceIDs whose SYNs a
    DELAY rule holds (the services part asks for a verdict).
    """

    def __init__(self) -> None:
        self.core: HostCore | None = None
        self.endpoints: list[UdpEndpoint] = []
        self.by_address: dict[Address, UdpEndpoint] = {}
        self.pcap: PcapWriter | None = None
        self.closed = False
        self.on_delay: Callable[[ServiceID], None] = lambda sid: None
        # Where the sockets' batches go; the Host points it at its own ``_on_batch`` so
        # that a test may tap the receive path there.
        self.on_batch: Callable[[UdpEndpoint, Batch], None] = self.receive_batch
        self.waiters = _Waiters()
        self._listener_waiters: dict[int, asyncio.Event] = {}
        self._event_hooks: list[Callable[[Event], None]] = []
        self._conn_hooks: dict[int, Callable[[Event], None]] = {}
        self._unreachable_hooks: list[Callable[[Address], None]] = []
        self._flush_pending = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        # Waits with a time limit: a heap of (deadline, tiebreak, conn_id), and the deadline
        # of each wait still running (conn_id -> deadline). An entry whose wait ended is
        # stale and dropped when it reaches the top, so the timer is never armed for it.
        self._limits: list[tuple[float, int, int]] = []
        self._limit_live: dict[int, float] = {}
        self._limit_order = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._clock: Callable[[], float] = _no_clock

    # -- state ----------------------------------------------------------------------------
    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop the driver runs on."""
        if self._loop is None:
            raise RuntimeError("the host is not running")
        return self._loop

    def bind_loop(self) -> None:
        """Take the running event loop (before the first interface opens)."""
        loop = self._loop = asyncio.get_running_loop()
        # asyncio's own loops read time.monotonic in a Python method: read it directly,
        # without that frame (some twenty reads per connection). Another loop's clock
        # (uvloop, a subclass's or a test's virtual time) is read through its own time().
        # (Tested through the bound method: reading the loop's __dict__ would build it,
        # and every attribute read in the loop's own methods would lose its fast path.)
        if getattr(loop.time, "__func__", None) is asyncio.BaseEventLoop.time:
            self._clock = time.monotonic
        else:
            self._clock = loop.time

    @property
    def addresses(self) -> list[Address]:
        """The bound addresses of the interfaces."""
        return [ep.address for ep in self.endpoints]

    def now(self) -> float:
        """The loop's clock: the ``now`` every core call takes."""
        return self._clock()

    def require_core(self) -> HostCore:
        """The running core; :class:`HostClosed` or RuntimeError when there is none."""
        if self.closed:
            raise HostClosed("the host is closed (a closed host cannot be restarted)")
        if self.core is None:
            raise RuntimeError("the host is not running: use 'async with host' or start()")
        return self.core

    # -- interfaces' sockets ----------------------------------------------------------------
    def open_endpoint(self, local: Address) -> UdpEndpoint:
        """Bind a UDP socket at ``local`` whose batches go to the core."""
        holder: list[UdpEndpoint] = []

        def on_datagrams(batch: Batch) -> None:
            self.on_batch(holder[0], batch)

        # UdpEndpoint.open does no waiting: driving its coroutine once binds and registers
        # the socket on the running loop, so interfaces can be added from plain calls.
        coro = UdpEndpoint.open(local, on_datagrams, on_icmp_error=self._on_icmp)
        try:
            coro.send(None)
        except StopIteration as done:
            ep: UdpEndpoint = done.value
        else:  # pragma: no cover - open() never suspends
            coro.close()
            raise RuntimeError("UdpEndpoint.open suspended")
        holder.append(ep)
        self.endpoints.append(ep)
        self.by_address[ep.address] = ep
        return ep

    def close_endpoint(self, local: Address) -> None:
        """Close the socket bound at ``local`` (if any)."""
        ep = self.by_address.pop(local, None)
        if ep is not None:
            self.endpoints.remove(ep)
            ep.close()

    def receive_batch(self, ep: UdpEndpoint, batch: Batch) -> None:
        """A batch of datagrams read on one interface: all to the core, then one flush."""
        core = self.core
        if core is None:
            return
        local = ep.address
        pcap = self.pcap
        if pcap is not None:
            for data, src in batch:
                pcap.write(data, src, local)
        now = self._clock()  # one reading for the batch and its flush
        core.receive_datagrams(batch, local, now)
        self.flush(now)

    def _on_icmp(self, remote: Address, errno_: int) -> None:
        """ICMP error for a datagram we sent: tell the core, send what follows."""
        if self.core is not None:
            self.core.on_unreachable(remote, self.now(), os.strerror(errno_).lower())
            for hook in list(self._unreachable_hooks):
                hook(remote)
            self.flush()

    # -- sending --------------------------------------------------------------------------
    def send_datagram(
        self, ep: DatagramEndpoint, service: ServiceLike, data: bytes, to: Address | None
    ) -> None:
        """One unconnected datagram from ``ep`` (sent at the end of this loop pass)."""
        self.require_core().send_datagram(ep, service, data, to=to)
        self.schedule_flush()

    def schedule_flush(self) -> None:
        """Send what the core has, once, at the end of this loop pass."""
        if not self._flush_pending and self._loop is not None:
            self._flush_pending = True
            self._loop.call_soon(self.flush)

    def send_now(self) -> None:
        """Send what the core has at once: for an application call that puts a SYN, FIN or
        RST on the wire (connect, close, abort). The peer starts on it while this loop pass
        goes on, where the end-of-pass flush made it wait for the pass to end (sequential
        connections: 1,175 us median per cycle against 1,534 on loopback). Writes keep
        :meth:`schedule_flush`, which coalesces a pass's writes into one train."""
        self.flush()

    def flush(self, now: float | None = None) -> None:
        """Send what the core has now, hand out its events, re-arm the timer; ``now``: the
        clock as this wake-up read it (None: read it here)."""
        self._flush_pending = False
        core = self.core
        if core is None:
            return
        if now is None:
            now = self._clock()
        out = core.wire_to_send(now)
        if out:
            endpoints = self.endpoints
            if self.pcap is None and len(endpoints) == 1:
                # One interface takes everything (as _send_by_interface would): no grouping.
                ep = endpoints[0]
                if not ep.closed:
                    data, _, remote = out[0]
                    if len(out) == 1 and type(data) is bytes:
                        ep.send(data, remote)  # (most passes: one small datagram)
                    else:
                        ep.send_many([(data, remote) for data, _, remote in out])
            else:
                self._send_by_interface(out)
        if self.pcap is not None:
            self.pcap.flush()  # once per batch: a killed process loses at most this batch
        for event in core.events():
            self._dispatch(event)
        if core.delay_requests:
            for sid in core.take_delay_requests():
                self.on_delay(sid)
        deadline = core.next_deadline()
        if self._limits:
            limit = self._next_limit()
            if limit is not None and (deadline is None or limit < deadline):
                deadline = limit
        self._arm_timer(deadline, now)

    def _send_by_interface(self, out: list[tuple[bytes | SuperDatagram, Address, Address]]) -> None:
        """Each datagram from the interface of its local address (the first one for an
        address no interface has), and into the capture file."""
        by_ep: dict[Address, list[tuple[bytes | SuperDatagram, Address]]] = {}
        pcap = self.pcap
        for data, local, remote in out:
            by_ep.setdefault(local, []).append((data, remote))
            if pcap is not None:
                if isinstance(data, SuperDatagram):
                    for one in data.split():
                        pcap.write(one, local, remote)
                else:
                    pcap.write(data, local, remote)
        for local, items in by_ep.items():
            ep = self.by_address.get(local) or self.endpoints[0]
            if not ep.closed:
                ep.send_many(items)

    # -- the timer ----------------------------------------------------------------------
    def _arm_timer(self, deadline: float | None, now: float) -> None:
        if deadline == self._timer_at:
            return
        at = self._timer_at
        if self._timer is not None and at is not None and (deadline is None or deadline > at):
            # An earlier timer is armed: let it fire (the core re-arms from its deadline
            # then) rather than cancel and re-create one at every flush of a busy host.
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = deadline
        if deadline is not None and self._loop is not None and not self.closed:
            # Never a sub-millisecond busy timer: round up to the next millisecond.
            self._timer = self._loop.call_at(max(deadline, now + 0.001), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        core = self.core
        if core is None:
            return
        now = self._clock()
        core.handle_timer(now)
        limits = self._limits
        while limits and limits[0][0] <= now:
            deadline, _, conn_id = heapq.heappop(limits)
            if self._limit_live.get(conn_id) == deadline:
                self.waiters.wake(conn_id)  # its time is up: the waiter sees it and returns
        self.flush(now)

    def _next_limit(self) -> float | None:
        """The earliest deadline of a wait still running (stale entries are dropped)."""
        limits = self._limits
        live = self._limit_live
        while limits:
            deadline, _, conn_id = limits[0]
            if live.get(conn_id) == deadline:
                return deadline
            heapq.heappop(limits)
        return None

    # -- events and waiters -------------------------------------------------------------
    def _dispatch(self, event: Event) -> None:
        conn_id = event.conn_id
        if isinstance(event, IncomingConnection):
            ev = self._listener_waiters.get(event.listener_id)
            if ev is not None:
                ev.set()
        self.waiters.wake(conn_id)
        conn_hook = self._conn_hooks.get(conn_id)
        if conn_hook is None:
            if not self._event_hooks:
                return  # (the common case: nobody watches; no list to build)
            hooks = list(self._event_hooks)
        else:
            hooks = [conn_hook, *self._event_hooks]
        for hook in hooks:
            try:
                hook(event)
            except Exception as exc:  # application code must not break the receive path
                self.loop.call_exception_handler(
                    {"message": f"pyserval event hook failed on {event!r}", "exception": exc}
                )

    async def wait(self, conn: Connection, ready: Callable[[], bool]) -> None:
        """Wait until ``ready()`` holds for ``conn`` (re-checked at each of its events)."""
        await self.waiters.wait_for(conn.conn_id, ready)

    async def wait_until(
        self, conn: Connection, ready: Callable[[], bool], deadline: float
    ) -> bool:
        """:meth:`wait`, until the loop time ``deadline`` at the latest: False when it came
        first. The host's one timer ends it (no timer object per wait); one such wait per
        connection at a time."""
        if ready():
            return True
        now = self._clock()
        if now >= deadline:
            return False
        conn_id = conn.conn_id
        live = self._limit_live
        live[conn_id] = deadline
        limits = self._limits
        heapq.heappush(limits, (deadline, next(self._limit_order), conn_id))
        if len(limits) > 2 * len(live) + 64:
            # Waits that ended early leave their entries behind until their deadline
            # comes: rebuilt from the live ones, the heap stays within twice their number.
            limits[:] = [e for e in limits if live.get(e[2]) == e[0]]
            heapq.heapify(limits)
        at = self._timer_at
        if self._timer is None or at is None or deadline < at:
            self._arm_timer(deadline, now)  # (the next flush re-arms from both heaps)
        try:
            await self.waiters.wait_for(conn_id, lambda: ready() or self._clock() >= deadline)
        finally:
            if self._limit_live.get(conn_id) == deadline:
                del self._limit_live[conn_id]
        return ready()

    def add_listener(self, listener: Listener) -> None:
        """Give ``listener`` a waiter that its incoming connections set."""
        self._listener_waiters[listener.listener_id] = asyncio.Event()

    def wake_listener(self, listener: Listener) -> None:
        """Wake whoever waits on ``listener`` (it was closed)."""
        ev = self._listener_waiters.get(listener.listener_id)
        if ev is not None:
            ev.set()

    async def wait_incoming(self, listener: Listener) -> Connection | None:
        """The next established connection of ``listener`` (None once closed)."""
        ev = self._listener_waiters[listener.listener_id]
        while True:
            conn = listener.accept()
            if conn is not None:
                return conn
            if listener.closed or self.closed:
                return None
            ev.clear()
            await ev.wait()

    def watch(self, conn_id: int, callback: Callable[[Event], None]) -> None:
        """Call ``callback`` with every event naming ``conn_id`` (one watcher each)."""
        self._conn_hooks[conn_id] = callback

    def unwatch(self, conn_id: int) -> None:
        """Stop calling the watcher of ``conn_id``."""
        self._conn_hooks.pop(conn_id, None)

    def add_event_hook(self, hook: Callable[[Event], None]) -> None:
        """Call ``hook`` with every core event."""
        self._event_hooks.append(hook)

    def add_unreachable_hook(self, hook: Callable[[Address], None]) -> None:
        """Call ``hook(address)`` when the network reports ``address`` unreachable."""
        self._unreachable_hooks.append(hook)

    # -- the end ----------------------------------------------------------------------------
    def shut_down(self) -> None:
        """Abort every flow (the peers hear a RST), close the sockets, wake every waiter."""
        self.closed = True
        core = self.core
        if core is not None:
            for conn in list(core.connections.values()):
                conn.abort()
            core.end_time_waits()
            self.flush()
        if self._timer is not None:
            self._timer.cancel()
        for udp in self.endpoints:
            udp.close()
        if self.pcap is not None:
            self.pcap.close()
        self.waiters.wake_all()
        for ev in self._listener_waiters.values():
            ev.set()

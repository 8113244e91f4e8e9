"""The byte pump between one TCP connection and one Serval stream.

:class:`TcpPipe` is a small asyncio protocol for the TCP side: reads hand over whole chunks
as the kernel delivered them (no copy when one is waiting), reading pauses once ``limit``
bytes wait unread, and writes wait while the transport holds more than ``limit`` unsent. So
each direction holds at most a few ``limit``-sized chunks on the TCP side, and the Serval side
is bounded by its stream buffers (``StreamConfig.send_buffer`` / ``receive_buffer``).

:class:`Relay` runs two pumps, TCP -> Serval and Serval -> TCP:

* the end of one direction is carried across on its own (a TCP FIN becomes
  ``send_eof()``, a Serval end of stream becomes a TCP FIN), and the other direction keeps
  flowing until it ends too (half-close);
* a reset on either side is carried across at once: a TCP RST (or any TCP error) aborts the
  Serval stream, a Serval reset (or time-out) closes the TCP socket with ``SO_LINGER`` 0, so
  the TCP peer gets a RST rather than a FIN that would pass a truncated stream off as
  complete. Either is noticed even while both pumps wait on the other side: the relay
  watches the Serval connection's events, and a TCP socket whose reading is paused (its
  reader stalled) has its state looked at every ``PAUSED_CHECK_INTERVAL`` seconds (Linux
  ``TCP_INFO``), as the event loop no longer polls it then.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import struct
from collections import deque
from collections.abc import Callable
from typing import Any

import anyio

from ..errors import ConnectionStateError
from ..runtime.host import Host
from ..runtime.secure import SecureStream
from ..runtime.streams import ServalStream
from ..sal.inet import Address
from ..transport.events import ConnectionFailed, ConnectionReset, ConnectionTimedOut, Event

__all__ = ["DEFAULT_CHUNK", "PAUSED_CHECK_INTERVAL", "Relay", "TcpPipe"]

DEFAULT_CHUNK = 256 * 1024
# Seconds between looks at a TCP socket whose reading is paused (see TcpPipe._arm_check).
PAUSED_CHECK_INTERVAL = 0.2
_TCP_INFO: int | None = getattr(socket, "TCP_INFO", None)  # Linux only
_CLOSE = 7  # TCP_CLOSE in Linux's tcp_states.h: the first byte of struct tcp_info

# The Serval stream's own errors besides anyio's: writing to a connection that closed between
# the checks ``ServalStream.send`` makes and the write itself.
_SERVAL_BROKEN = (anyio.BrokenResourceError, anyio.ClosedResourceError, ConnectionStateError)
_SERVAL_FINAL = (ConnectionReset, ConnectionTimedOut, ConnectionFailed)


class TcpPipe(asyncio.Protocol):
    """One TCP connection as awaitable ``read``/``write`` with bounded buffering.

    ``on_open`` (if given) is called from ``connection_made``: the translator's TCP server
    uses it to start handling an accepted connection.
    """

    def __init__(
        self, limit: int = DEFAULT_CHUNK, on_open: Callable[[TcpPipe], None] | None = None
    ):
        if limit < 1:
            raise ValueError(f"limit must be positive: {limit}")
        self.limit = limit
        self._on_open = on_open
        self.transport: asyncio.Transport | None = None
        self.peer: Address = ("?", 0)
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._eof = False
        self._lost = False
        self._error: BaseException | None = None
        self._reading_paused = False
        self._writing_paused = False
        # One waiter per direction: the two pumps wait on the same pipe at the same time
        # (one to read, one for the write buffer to drain).
        self._read_waiter: asyncio.Future[None] | None = None
        self._write_waiter: asyncio.Future[None] | None = None
        self._check: asyncio.TimerHandle | None = None
        loop = asyncio.get_running_loop()
        self._closed: asyncio.Future[None] = loop.create_future()
        # Set when the socket fails (a RST, an error), whoever is or is not reading.
        self.broken: asyncio.Future[BaseException] = loop.create_future()

    # -- asyncio.Protocol --------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Remember the transport and bound its write buffer."""
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        # drain() semantics: a writer waits while more than ``limit`` bytes are unsent.
        transport.set_write_buffer_limits(high=self.limit, low=self.limit // 2)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self.peer = (str(peer[0]), int(peer[1]))
        if self._on_open is not None:
            self._on_open(self)

    def data_received(self, data: bytes) -> None:
        """Queue what arrived; stop reading from the socket once ``limit`` bytes wait."""
        self._chunks.append(data)
        self._size += len(data)
        if self._size >= self.limit and not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()
            self._arm_check()
        self._wake()

    def _arm_check(self) -> None:
        # While reading is paused the event loop no longer polls the socket, so a RST would
        # go unnoticed for as long as the other side stays stalled: look now and then.
        if _TCP_INFO is not None and self._check is None:
            loop = asyncio.get_running_loop()
            self._check = loop.call_later(PAUSED_CHECK_INTERVAL, self._check_paused)

    def _check_paused(self) -> None:
        self._check = None
        transport = self.transport
        if not (self._reading_paused or self._eof) or self._lost or transport is None:
            return
        sock = transport.get_extra_info("socket")
        try:
            # Linux: a reset (or timed-out) connection is in TCP_CLOSE at once, even with
            # unread data queued, and SO_ERROR says why (reading it clears it: it is
            # reported here instead).
            state = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 1)[0]
            code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) if state == _CLOSE else 0
        except (OSError, AttributeError):
            return
        if state != _CLOSE:
            self._arm_check()
            return
        if code == 0:
            return  # closed cleanly by both sides: what is queued is still to be read
        error = ConnectionResetError if code == errno.ECONNRESET else OSError
        self._fail(error(code, os.strerror(code)))

    def _fail(self, exc: BaseException) -> None:
        """The socket failed while nobody was reading it: as if the transport had seen it."""
        if self._lost:
            return
        self._error = exc
        if not self.broken.done():
            self.broken.set_result(exc)
        self._wake(read=True, write=True)
        if self.transport is not None:
            self.transport.abort()

    def eof_received(self) -> bool:
        """The peer's FIN: reads end after what is queued; keep the write side open."""
        self._eof = True
        self._wake()
        # After a FIN asyncio stops polling the socket for reading, so a RST that follows
        # (the client gives up) would go unseen: look now and then, as while paused.
        self._arm_check()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        """The socket is gone (``exc``: a reset or another error, None: we closed it)."""
        self._lost = True
        self._error = self._error or exc  # keep a failure found while paused
        if self._check is not None:
            self._check.cancel()
            self._check = None
        self._wake(read=True, write=True)
        if not self._closed.done():
            self._closed.set_result(None)
        if exc is not None and not self.broken.done():
            self.broken.set_result(exc)

    def pause_writing(self) -> None:
        """The transport's write buffer passed ``limit``: writers wait."""
        self._writing_paused = True

    def resume_writing(self) -> None:
        """The write buffer drained below ``limit // 2``: writers continue."""
        self._writing_paused = False
        self._wake(read=False, write=True)

    def _wake(self, read: bool = True, write: bool = False) -> None:
        for waiter in (self._read_waiter if read else None, self._write_waiter if write else None):
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    # -- the pump's side ----------------------------------------------------------------
    @property
    def buffered(self) -> int:
        """Bytes held for this connection: received and unread, plus written and unsent."""
        unsent = self.transport.get_write_buffer_size() if self.transport is not None else 0
        return self._size + unsent

    @property
    def lost(self) -> bool:
        """Whether the socket is closed (by either side)."""
        return self._lost

    @property
    def error(self) -> BaseException | None:
        """Why the socket failed (None: it did not)."""
        return self._error

    async def read(self) -> bytes:
        """The next bytes (at most about ``limit``), b"" at the peer's FIN.

        Raises the socket's error (``ConnectionResetError`` for a RST) if it failed.
        """
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._eof or self._lost:
                return b""
            self._read_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._read_waiter
            finally:
                self._read_waiter = None
        if self._error is not None:
            # The peer reset: what it sent before the RST can no longer be delivered whole.
            raise self._error
        chunks = self._chunks
        data = chunks.popleft()
        if chunks and len(data) < self.limit:
            parts = [data]
            size = len(data)
            while chunks and size + len(chunks[0]) <= self.limit:
                part = chunks.popleft()
                parts.append(part)
                size += len(part)
            data = b"".join(parts)
        self._size -= len(data)
        if self._reading_paused and self._size < self.limit and self.transport is not None:
            self._reading_paused = False
            if self._check is not None:
                self._check.cancel()
                self._check = None
            self.transport.resume_reading()
        return data

    async def write(self, data: bytes) -> None:
        """Send ``data``; waits while more than ``limit`` bytes are unsent (backpressure)."""
        if self._lost or self.transport is None:
            raise self._error or ConnectionResetError("the TCP connection is closed")
        self.transport.write(data)
        while self._writing_paused and not self._lost:
            self._write_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._write_waiter
            finally:
                self._write_waiter = None
        if self._error is not None:
            raise self._error

    def write_eof(self) -> None:
        """Half-close: our FIN goes out after what is still unsent."""
        if self.transport is not None and not self._lost and self.transport.can_write_eof():
            self.transport.write_eof()

    def reset(self) -> None:
        """Close at once with a RST (``SO_LINGER`` 0), dropping anything unsent."""
        transport = self.transport
        if transport is None or self._lost:
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # Best effort: the socket may already be failing, and abort() closes it anyway.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()

    def close(self) -> None:
        """Close gracefully: the transport sends what is unsent, then FIN, then closes."""
        if self.transport is not None and not self._lost:
            self.transport.close()

    async def wait_closed(self, timeout: float) -> bool:
        """Wait (bounded) until the socket is closed; False if it is not by then."""
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(self._closed)
        except TimeoutError:
            return False
        return True


class _Ended(Exception):
    """One side failed: how the connection ended, and which side broke."""

    def __init__(self, reason: str, side: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.side = side  # "tcp" or "serval"


def _tcp_reason(exc: BaseException) -> str:
    if isinstance(exc, ConnectionResetError):
        return "tcp reset by peer"
    return f"tcp error: {exc}"


def _serval_reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return f"serval {text}"


class Relay:
    """Bytes both ways between ``tcp`` and ``stream`` until both directions end or either
    side resets (see the module docstring). ``run()`` returns how it ended.

    ``host`` is the stream's host: the relay watches the connection's events there
    (``host.watch``, one watcher per connection) to notice a Serval reset at once, even
    while both pumps wait on the TCP side; a TCP failure is noticed likewise while both
    wait on the Serval side.

    ``tcp_to_serval`` and ``serval_to_tcp`` count the bytes read from one side to be passed
    to the other: after a clean end, exactly what crossed; after a reset, the last chunk
    may not have reached the other side in full.
    """

    def __init__(
        self,
        tcp: TcpPipe,
        stream: ServalStream | SecureStream,
        host: Host,
        *,
        chunk: int = DEFAULT_CHUNK,
    ) -> None:
        self.tcp = tcp
        self.stream = stream
        self.host = host
        self.chunk = chunk
        self.tcp_to_serval = 0
        self.serval_to_tcp = 0
        self.ended: str | None = None
        self._serval_broken: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    @property
    def buffered(self) -> int:
        """Bytes this relay holds now: the TCP side's buffers plus the Serval stream's
        unacknowledged sent bytes and received-but-unread bytes."""
        conn = self.stream.connection
        return self.tcp.buffered + len(conn.send) + conn.readable

    def _on_serval_event(self, event: Event) -> None:
        if isinstance(event, _SERVAL_FINAL) and not self._serval_broken.done():
            self._serval_broken.set_result(event.reason)

    async def _watch(self) -> None:
        """Raise as soon as either side fails, whatever the pumps are waiting for."""
        tcp_broken = self.tcp.broken
        either: list[asyncio.Future[Any]] = [tcp_broken, self._serval_broken]
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        if tcp_broken.done():
            raise _Ended(_tcp_reason(tcp_broken.result()), "tcp")
        raise _Ended(f"serval connection lost: {self._serval_broken.result()}", "serval")

    async def _tcp_to_serval(self) -> None:
        tcp, stream = self.tcp, self.stream
        while True:
            try:
                data = await tcp.read()
            except OSError as exc:
                raise _Ended(_tcp_reason(exc), "tcp") from None
            if not data:
                break
            self.tcp_to_serval += len(data)
            try:
                await stream.send(data)
            except _SERVAL_BROKEN as exc:
                raise _Ended(_serval_reason(exc), "serval") from None
        try:
            await stream.send_eof()  # the TCP peer's FIN, carried across
        except _SERVAL_BROKEN as exc:
            raise _Ended(_serval_reason(exc), "serval") from None

    async def _serval_to_tcp(self) -> None:
        tcp, stream, chunk = self.tcp, self.stream, self.chunk
        while True:
            try:
                data = await stream.receive(chunk)
            except anyio.EndOfStream:
                break
            except _SERVAL_BROKEN as exc:
                raise _Ended(_serval_reason(exc), "serval") from None
            self.serval_to_tcp += len(data)
            try:
                await tcp.write(data)
            except OSError as exc:
                raise _Ended(_tcp_reason(exc), "tcp") from None
        try:
            tcp.write_eof()  # the Serval peer's end of stream, carried across
        except OSError as exc:  # the socket failed in the meantime (ENOTCONN after a RST)
            raise _Ended(_tcp_reason(exc), "tcp") from None

    async def run(self) -> str:
        """Pump until done; returns how the connection ended (also kept in ``ended``).

        If the task running this is cancelled, both sides are reset (a cut connection
        must not look complete to either peer) and the cancellation propagates.
        """
        conn = self.stream.connection
        if conn.closed and conn.error and not self._serval_broken.done():
            self._serval_broken.set_result(conn.error)  # reset before the relay started
        self.host.watch(conn, self._on_serval_event)
        up = asyncio.ensure_future(self._tcp_to_serval())
        down = asyncio.ensure_future(self._serval_to_tcp())
        watch = asyncio.ensure_future(self._watch())
        tasks = (up, down, watch)
        try:
            while not (up.done() and down.done()):
                running = [t for t in tasks if not t.done()]
                await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for task in tasks:
                    failure = task.exception() if task.done() and not task.cancelled() else None
                    if failure is not None:
                        raise failure
            if self.tcp.error is not None:  # a write failed as the last bytes went out
                raise _Ended(_tcp_reason(self.tcp.error), "tcp")
        except _Ended as failure:
            self.ended = failure.reason
            await self._stop(tasks)
            return failure.reason
        except asyncio.CancelledError:
            self.ended = "cut: the translator is closing"
            await self._stop(tasks)
            raise
        except BaseException as exc:  # a bug: still leave neither peer hanging
            self.ended = f"internal error: {exc!r}"
            await self._stop(tasks)
            raise
        watch.cancel()
        self.host.unwatch(conn)
        self.ended = "closed by both sides"
        self.tcp.close()
        await self.stream.aclose()
        return self.ended

    async def _stop(self, tasks: tuple[asyncio.Future[None], ...]) -> None:
        """Reset both sides and end the pumps."""
        self.host.unwatch(self.stream.connection)
        self.tcp.reset()
        # abort() never suspends, so it completes even from a task being cancelled.
        await self.stream.abort()
        for task in tasks:
            task.cancel()
        # Only the pumps' own ends are awaited here, not anything outside.
        await asyncio.gather(*tasks, return_exceptions=True)

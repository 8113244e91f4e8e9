"""An ``asyncio.Transport`` on any ``anyio.abc.ByteStream``: ``StreamReader``/``StreamWriter``
over a :class:`~pyserval.runtime.secure.SecureStream` (``open_connection(..., secure=True)``).

Two tasks move the bytes: one reads the stream into the protocol (stopped by
``pause_reading``), one writes what the protocol wrote (``pause_writing`` past the high-water
mark, so ``writer.drain()`` waits for the stream's own backpressure). ``write_eof`` is the
stream's ``send_eof`` (a TLS 1.3 half-close); ``close`` sends what is left, then closes.

It does not replace :class:`~pyserval.runtime.stdio.ServalTransport` for plain streams,
which works on the connection directly without tasks.
"""

from __future__ import annotations

import asyncio
from typing import Any

import anyio
import anyio.abc

__all__ = ["ByteStreamTransport"]

_BROKEN = (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError)


class ByteStreamTransport(asyncio.Transport):
    """An asyncio transport moving bytes to and from ``stream`` (see the module docstring).
    ``extra`` answers ``get_extra_info``."""

    def __init__(
        self,
        stream: anyio.abc.ByteStream,
        protocol: asyncio.Protocol,
        extra: dict[str, Any] | None = None,
        *,
        chunk: int = 256 * 1024,
    ) -> None:
        super().__init__(extra)
        self._stream = stream
        self._protocol = protocol
        self._chunk = chunk
        self._pending = bytearray()
        self._high = 64 * 1024
        self._low = 16 * 1024
        self._write_paused = False
        self._eof_wanted = False
        self._closing = False
        self._lost = False
        self._reading = asyncio.Event()
        self._reading.set()
        self._writable = asyncio.Event()
        loop = asyncio.get_running_loop()
        self._loop = loop
        protocol.connection_made(self)
        self._reader = loop.create_task(self._read_loop())
        self._writer = loop.create_task(self._write_loop())

    # -- the two pumps -------------------------------------------------------------------
    async def _read_loop(self) -> None:
        try:
            while not self._lost:
                await self._reading.wait()
                try:
                    data = await self._stream.receive(self._chunk)
                except anyio.EndOfStream:
                    if not self._protocol.eof_received():
                        self.close()
                    return
                self._protocol.data_received(data)
        except _BROKEN as exc:
            self._connection_lost(ConnectionResetError(f"stream broken: {exc}"))

    async def _write_loop(self) -> None:
        try:
            while True:
                while not self._pending and not self._eof_wanted:
                    self._writable.clear()
                    await self._writable.wait()
                if self._pending:
                    data = bytes(self._pending)
                    self._pending.clear()
                    await self._stream.send(data)
                    if self._write_paused and len(self._pending) <= self._low:
                        self._write_paused = False
                        self._protocol.resume_writing()
                    continue
                if not self._closing:
                    # write_eof(): half-close, then stay until close() (or a loss).
                    await self._stream.send_eof()
                    while not self._closing:
                        self._writable.clear()
                        await self._writable.wait()
                await self._stream.aclose()
                self._reader.cancel()
                self._connection_lost(None)
                return
        except _BROKEN as exc:
            self._connection_lost(ConnectionResetError(f"stream broken: {exc}"))

    def _connection_lost(self, exc: Exception | None) -> None:
        if self._lost:
            return
        self._lost = True
        current = asyncio.current_task()
        for task in (self._reader, self._writer):
            if task is not current:
                task.cancel()
        self._protocol.connection_lost(exc)

    # -- asyncio.WriteTransport ---------------------------------------------------------
    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._eof_wanted:
            raise RuntimeError("cannot write after write_eof() or close()")
        if self._lost:
            return  # like asyncio's transports: writes after loss are dropped
        self._pending += data
        self._writable.set()
        if not self._write_paused and len(self._pending) > self._high:
            self._write_paused = True
            self._protocol.pause_writing()

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self._eof_wanted = True
        self._writable.set()

    def get_write_buffer_size(self) -> int:
        return len(self._pending)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low, self._high

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._high = 64 * 1024 if high is None else high
        self._low = self._high // 4 if low is None else low

    def abort(self) -> None:
        self._closing = True
        abort = getattr(self._stream, "abort", None)
        if abort is not None:
            task = self._loop.create_task(abort())
        else:
            task = self._loop.create_task(anyio.aclose_forcefully(self._stream))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        self._connection_lost(None)

    # -- asyncio.ReadTransport ----------------------------------------------------------
    def pause_reading(self) -> None:
        self._reading.clear()

    def resume_reading(self) -> None:
        self._reading.set()

    def is_reading(self) -> bool:
        return self._reading.is_set()

    # -- asyncio.BaseTransport ----------------------------------------------------------
    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._eof_wanted = True
        self._writable.set()

    def is_closing(self) -> bool:
        return self._closing or self._lost

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        assert isinstance(protocol, asyncio.Protocol)
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

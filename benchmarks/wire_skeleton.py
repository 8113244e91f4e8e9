"""pyserval's connect-and-close cycle on the wire with no protocol behind it: the floor
under any faster per-packet path (``connect_slices.py --pair skeleton,tcp``).

Issue 14's sequential-connections row asks whether pyserval's cycle (connect, the server
accepts and closes, the client reads end of stream and closes) can run at 0.6 of asyncio
TCP's. Two costs make up ours: the Python of the protocol (the sans-I/O core and the
runtime around it) and the wire's choreography (eight UDP datagrams a cycle, each read by a
process that may have been asleep). A compiled per-packet path could only remove the
first. These two sides keep the second exactly and drop the first: the same eight
datagrams, of the sizes the real cycle's have, answered in the same flushes, with the same
system calls as pyserval's runtime (one ``sendto`` per datagram, ``recvmsg`` until
``EAGAIN`` on each wake-up, the socket watched by the event loop) and the same tasks (the
client's cycle a coroutine waiting on futures, the server's accept-and-close a callback
after the read's), but a datagram's only content is its kind and the connection's number.
Its rate over asyncio TCP's is what the row could reach if the protocol cost nothing.

The real cycle, as pyserval's hosts send it (seen on ``UdpEndpoint`` on this main; a
connection's close overlaps the next connection's handshake):

    client SYN (116 bytes)                  -> server answers SYN-ACK (64)
    client's FIN of the previous connection -> server answers SAL FIN with its ACK (52)
    client on the SYN-ACK: third ACK (88)   -> server accepts; its application closes: FIN (32)
    client on the SAL FIN: SAL FIN-ACK (32) -> server answers SAL ACK (32)
    client on the FIN: end of stream; its application closes: FIN (32), then the next SYN

``tests/test_wire_skeleton.py`` checks these kinds, sizes and counts against a real cycle.
"""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

from baselines import HOST, Control, Params, Result

# Datagram kinds (the first byte) and the sizes of the real cycle's datagrams.
SYN, SYN_ACK, THIRD_ACK, CLIENT_FIN, SERVER_SAL_FIN, CLIENT_SAL_FIN, SAL_ACK, SERVER_FIN = range(
    1, 9
)
SIZES: dict[int, int] = {
    SYN: 116,
    SYN_ACK: 64,
    THIRD_ACK: 88,
    CLIENT_FIN: 32,
    SERVER_SAL_FIN: 52,
    CLIENT_SAL_FIN: 32,
    SAL_ACK: 32,
    SERVER_FIN: 32,
}
# What the server answers in the flush of the read, by kind (the third ACK is answered by
# its application's close, in a later callback, as pyserval's is).
SERVER_ANSWERS: dict[int, int] = {
    SYN: SYN_ACK,
    CLIENT_FIN: SERVER_SAL_FIN,
    CLIENT_SAL_FIN: SAL_ACK,
}
_RECV_SIZE = 65535  # pyserval's runtime reads with this buffer and room for a GRO cmsg
_CMSG_SPACE = socket.CMSG_SPACE(4)
STALL = 2.0  # seconds without a finished connection before a client gives up


def datagram(kind: int, number: int) -> bytes:
    """A datagram of ``kind`` for connection ``number``, as long as the real one."""
    return bytes((kind,)) + number.to_bytes(4, "big") + bytes(SIZES[kind] - 5)


def _read_all(sock: socket.socket) -> list[tuple[bytes, Any]]:
    """Every datagram waiting, read as pyserval's runtime reads (until EAGAIN)."""
    batch: list[tuple[bytes, Any]] = []
    recvmsg = sock.recvmsg
    while True:
        try:
            data, _ancdata, _flags, addr = recvmsg(_RECV_SIZE, _CMSG_SPACE)
        except BlockingIOError:
            return batch
        batch.append((data, addr))


def _socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sock.bind((HOST, 0))
    return sock


class _Server:
    """Answers each datagram of the cycle; accepts on the third ACK and closes at once."""

    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop) -> None:
        self.sock = sock
        self.loop = loop
        self.accepted = 0

    def readable(self) -> None:
        sendto = self.sock.sendto
        answers: list[tuple[bytes, Any]] = []
        for data, addr in _read_all(self.sock):
            kind = data[0]
            number = int.from_bytes(data[1:5], "big")
            answer = SERVER_ANSWERS.get(kind)
            if answer is not None:
                answers.append((datagram(answer, number), addr))
            elif kind == THIRD_ACK:
                self.loop.call_soon(self.accept_and_close, number, addr)
        for data, addr in answers:
            sendto(data, addr)

    def accept_and_close(self, number: int, addr: Any) -> None:
        self.accepted += 1
        self.sock.sendto(datagram(SERVER_FIN, number), addr)


async def skeleton_server(ctl: Control, params: Params) -> Result:
    """The server's side until stopped; how many connections it accepted."""
    loop = asyncio.get_running_loop()
    sock = _socket()
    server = _Server(sock, loop)
    loop.add_reader(sock.fileno(), server.readable)
    ctl.announce(sock.getsockname()[:2])
    try:
        await ctl.stopped()
    finally:
        loop.remove_reader(sock.fileno())
        sock.close()
    return {"accepted": server.accepted}


class _Client:
    """The client's answers in the read's flush, and the futures its cycle waits on."""

    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop) -> None:
        self.sock = sock
        self.loop = loop
        self.number = 0
        self.connected: asyncio.Future[None] | None = None
        self.ended: asyncio.Future[None] | None = None

    def readable(self) -> None:
        answers: list[tuple[bytes, Any]] = []
        for data, addr in _read_all(self.sock):
            kind = data[0]
            number = int.from_bytes(data[1:5], "big")
            if kind == SYN_ACK and number == self.number:
                answers.append((datagram(THIRD_ACK, number), addr))
                if self.connected is not None and not self.connected.done():
                    self.connected.set_result(None)
            elif kind == SERVER_SAL_FIN:
                answers.append((datagram(CLIENT_SAL_FIN, number), addr))
            elif (
                kind == SERVER_FIN
                and number == self.number
                and self.ended is not None
                and not self.ended.done()
            ):
                self.ended.set_result(None)
            # (SAL_ACK: nothing to answer)
        for data, addr in answers:
            self.sock.sendto(data, addr)

    async def cycle(self, address: tuple[str, int]) -> None:
        """connect (SYN, wait for the SYN-ACK), wait for end of stream, close (FIN)."""
        self.number += 1
        loop = self.loop
        self.connected = loop.create_future()
        self.ended = loop.create_future()
        self.sock.sendto(datagram(SYN, self.number), address)
        await self.connected
        await self.ended
        self.sock.sendto(datagram(CLIENT_FIN, self.number), address)

    def stall(self, exc: BaseException) -> None:
        """Fail the wait the cycle is in (only that one: the other would go unread)."""
        for fut in (self.connected, self.ended):
            if fut is not None and not fut.done():
                fut.set_exception(exc)
                return


async def skeleton_client(ctl: Control, params: Params) -> Result:
    """The client's cycle, one connection at a time, for ``params["seconds"]``."""
    loop = asyncio.get_running_loop()
    host, port = params["address"]
    address = (host, port)
    sock = _socket()
    client = _Client(sock, loop)
    loop.add_reader(sock.fileno(), client.readable)
    durations: list[float] = []

    def watchdog(done: int) -> None:
        # One timer a second for the whole run rather than one per wait: a lost datagram
        # (none is resent) fails the run instead of hanging it.
        if len(durations) == done:
            client.stall(RuntimeError(f"wire skeleton: no connection finished in {STALL} s"))
        else:
            handle[0] = loop.call_later(STALL, watchdog, len(durations))

    handle = [loop.call_later(STALL, watchdog, 0)]
    start = time.perf_counter()
    end = start + params["seconds"]
    now = start
    try:
        while now < end:
            await client.cycle(address)
            t = time.perf_counter()
            durations.append(t - now)
            now = t
    finally:
        handle[0].cancel()
        loop.remove_reader(sock.fileno())
        sock.close()
    return {"durations": durations, "seconds": now - start}

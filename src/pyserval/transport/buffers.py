"""Bounded send and receive buffers of a stream, in absolute stream offsets.

Offsets are unbounded Python ints counted from the first data byte, so the code above never
handles 32-bit sequence wrap-around; only the wire codec maps offsets to sequence numbers.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import deque

from sortedcontainers import SortedDict

__all__ = ["ReceiveBuffer", "SendBuffer"]


class SendBuffer:
    """Bytes the application wrote and the peer has not acknowledged yet (bounded).

    Kept as a list of chunks rather than one ``bytearray``: appending to a bytearray whose
    head was cut off (acknowledged) moves everything it holds, up to the whole buffer, on
    every write. A large write becomes its own chunk (not copied when it is ``bytes``);
    small writes go into an open ``bytearray`` chunk of up to :attr:`CHUNK` bytes, so a
    stream of one-byte writes costs no more than a few large ones. Reads copy the range.
    """

    __slots__ = ("_chunks", "_starts", "_first", "_base", "end", "capacity")

    CHUNK = 65536
    """Small writes are gathered into chunks of about this size."""
    SMALL = 16384
    """Writes below this size are gathered; larger ones are a chunk of their own."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"send buffer capacity must be positive: {capacity}")
        self._chunks: list[bytes | bytearray] = []  # live from _first on
        self._starts: list[int] = []  # the absolute offset of each chunk's first byte
        self._first = 0
        self._base = 0  # absolute offset of the oldest byte held
        # Offset one past the newest byte written. A plain attribute (read it, never set
        # it): the send path and every ACK read it, and a property costs a call per read.
        self.end = 0
        self.capacity = capacity

    @property
    def start(self) -> int:
        """Offset of the oldest byte still held."""
        return self._base

    @property
    def free(self) -> int:
        """How many more bytes :meth:`write` accepts now."""
        return self.capacity - (self.end - self._base)

    def __len__(self) -> int:
        return self.end - self._base

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Append as much of ``data`` as fits; returns how many bytes were taken."""
        n = min(len(data), self.free)
        if n <= 0:
            return 0
        chunks = self._chunks
        if n < self.SMALL:
            last = chunks[-1] if len(chunks) > self._first else None
            if type(last) is bytearray and len(last) + n <= self.CHUNK:
                last += data[:n]
            else:
                chunks.append(bytearray(data[:n]))
                self._starts.append(self.end)
        else:
            if type(data) is bytes and n == len(data):
                chunks.append(data)  # immutable: kept as it is
            else:
                chunks.append(bytes(data[:n]))
            self._starts.append(self.end)
        self.end += n
        return n

    def read(self, start: int, end: int) -> bytes:
        """A copy of bytes [start, end) (they must still be held)."""
        if start < self._base or end > self.end:
            raise IndexError(f"bytes [{start}, {end}) are not in the send buffer")
        if end <= start:
            return b""
        starts = self._starts
        chunks = self._chunks
        i = bisect_right(starts, start, self._first) - 1
        lo = start - starts[i]
        chunk = chunks[i]
        if end - starts[i] <= len(chunk):
            piece = chunk[lo : end - starts[i]]
            return piece if type(piece) is bytes else bytes(piece)
        pieces = [memoryview(chunk)[lo:]]
        at = starts[i] + len(chunk)
        while at < end:
            i += 1
            chunk = chunks[i]
            pieces.append(memoryview(chunk)[: end - at])
            at += len(chunk)
        return b"".join(pieces)

    def release(self, upto: int) -> int:
        """Drop bytes before ``upto`` (acknowledged); returns how many were dropped."""
        upto = min(upto, self.end)
        n = upto - self._base
        if n <= 0:
            return 0
        self._base = upto
        chunks = self._chunks
        starts = self._starts
        first = self._first
        last = len(chunks) - 1
        # Whole chunks below the new start go (the last one stays open for writes).
        while first < last and starts[first + 1] <= upto:
            chunks[first] = b""
            first += 1
        if first == last and upto == self.end:
            chunks.clear()
            starts.clear()
            first = 0
        elif first >= 64 and first * 2 >= len(chunks):
            del chunks[:first]
            del starts[:first]
            first = 0
        self._first = first
        return n


class ReceiveBuffer:
    """In-order bytes not yet read by the application, plus out-of-order segments.

    Memory is bounded by ``capacity``: the advertised window is ``capacity`` minus the unread
    bytes, and out-of-order data is kept only inside that window, so a peer cannot make it
    grow. Out-of-order ranges are kept merged, so they are the SACK blocks.

    The in-order bytes are a queue of pieces, copied once, when the application reads
    them. A piece of at least :attr:`KEEP` bytes that is (a view of) an immutable ``bytes``
    it covers at least half of, such as a received segment's payload, is kept as it is;
    anything else is copied into a ``bytearray`` piece. So the memory held stays within
    about twice the bytes counted, and many small segments cost no more than one large.
    """

    __slots__ = (
        "_pieces",
        "_readable",
        "_ooo",
        "out_of_order_bytes",
        "rcv_nxt",
        "capacity",
        "_recent",
        "max_blocks",
        "dropped_segments",
    )

    KEEP = 1024
    """Pieces from this size on are kept by reference rather than copied."""

    def __init__(self, capacity: int, start: int = 0, max_blocks: int = 1024) -> None:
        if capacity < 1:
            raise ValueError(f"receive buffer capacity must be positive: {capacity}")
        self._pieces: deque[bytes | bytearray | memoryview] = deque()
        self._readable = 0
        # start offset -> bytearray, non-overlapping; made by the first out-of-order segment
        # (most connections never see one, and a SortedDict costs ~4 us to build).
        self._ooo: SortedDict | None = None
        # Bytes held out of order. A plain attribute (read it, never set it): the receive
        # path reads it per segment, and a property costs a call per read.
        self.out_of_order_bytes = 0
        self.rcv_nxt = start  # next in-order offset expected
        self.capacity = capacity
        self._recent: int | None = None  # start of the block most recently added to
        self.max_blocks = max_blocks  # bound on out-of-order holes (dict entries)
        self.dropped_segments = 0

    @property
    def readable(self) -> int:
        """Bytes the application can read now."""
        return self._readable

    @property
    def window(self) -> int:
        """Space the peer may still fill beyond ``rcv_nxt``."""
        free = self.capacity - self._readable
        return free if free > 0 else 0  # (not max(): read for every segment sent)

    def _push(self, data: bytes | bytearray | memoryview) -> None:
        """Queue in-order bytes for reading (see the class docstring for what is copied)."""
        n = len(data)
        if not n:
            return
        kind = type(data)
        if n >= self.KEEP and (
            kind is bytes
            or (
                kind is memoryview
                and type(data.obj) is bytes  # type: ignore[union-attr]
                and n * 2 >= len(data.obj)  # type: ignore[union-attr]
            )
        ):
            self._pieces.append(data)
        else:
            pieces = self._pieces
            tail = pieces[-1] if pieces else None
            if type(tail) is bytearray and len(tail) < self.KEEP * 16:
                tail += data
            else:
                pieces.append(bytearray(data))
        self._readable += n

    def append_in_order(self, data: bytes | bytearray | memoryview) -> None:
        """Take bytes at ``rcv_nxt`` that the caller checked: nothing is held out of order
        and they fit the window (:meth:`offer`'s common case, without its checks)."""
        self._push(data)
        self.rcv_nxt += len(data)

    def append_payloads(self, datagrams: list[bytes], offset: int) -> None:
        """:meth:`append_in_order` for the payloads of consecutive segments: each
        datagram's bytes from ``offset`` on (a run the caller checked). ``offset`` is a
        header's length, far below :attr:`KEEP`, so a payload kept as a view of its
        datagram covers most of it."""
        pieces = self._pieces
        keep = self.KEEP
        total = 0
        for data in datagrams:
            n = len(data) - offset
            if n >= keep and type(data) is bytes:
                pieces.append(memoryview(data)[offset:])
                self._readable += n
            else:
                self._push(memoryview(data)[offset:])
            total += n
        self.rcv_nxt += total

    def offer(self, start: int, data: bytes | bytearray | memoryview) -> int:
        """Take a segment at ``start``; returns how many bytes became readable."""
        if not data:
            return 0  # (nothing to keep: every block held out of order has bytes)
        right = self.rcv_nxt + self.window
        end = start + len(data)
        if end <= self.rcv_nxt or start >= right:
            return 0
        if start < self.rcv_nxt:
            data = data[self.rcv_nxt - start :]
            start = self.rcv_nxt
        if end > right:
            data = data[: right - start]
            end = right
        if start == self.rcv_nxt:
            before = self._readable
            self._push(data)
            self.rcv_nxt = end
            self._drain_ooo()
            return self._readable - before
        self._insert_ooo(start, data)
        return 0

    def _drain_ooo(self) -> None:
        ooo = self._ooo
        while ooo:
            first = ooo.peekitem(0)
            s, chunk = first[0], first[1]
            if s > self.rcv_nxt:
                break
            del ooo[s]
            self.out_of_order_bytes -= len(chunk)
            tail = s + len(chunk)
            if tail > self.rcv_nxt:
                if s == self.rcv_nxt:
                    # The whole block is new: it becomes a piece as it is (ours alone).
                    self._pieces.append(chunk)
                    self._readable += len(chunk)
                else:
                    self._push(memoryview(chunk)[self.rcv_nxt - s :])
                self.rcv_nxt = tail
            if self._recent == s:
                self._recent = None

    def _insert_ooo(self, start: int, data: bytes | bytearray | memoryview) -> None:
        ooo = self._ooo
        if ooo is None:
            ooo = self._ooo = SortedDict()
        end = start + len(data)
        # Merge with an overlapping or adjacent block on the left, extending it in place:
        # after a loss every later segment lands here, and copying the block each time
        # would cost the square of the window.
        block: bytearray | None = None
        i = ooo.bisect_right(start) - 1
        if i >= 0:
            s = ooo.keys()[i]
            chunk = ooo[s]
            right = s + len(chunk)
            if right >= start:
                if right >= end:
                    self._recent = s
                    return  # entirely inside a block we hold
                chunk += data[right - start :]
                self.out_of_order_bytes += end - right
                start, block = s, chunk
        if block is None:
            if len(ooo) >= self.max_blocks:
                # Each hole costs a dict entry, so their number is bounded too: a segment
                # that would open a new one past the bound is dropped (the sender sends it
                # again).
                j = ooo.bisect_left(start)
                if j >= len(ooo) or ooo.keys()[j] > end:
                    self.dropped_segments += 1
                    return
            block = bytearray(data)
            ooo[start] = block
            self.out_of_order_bytes += len(block)
        # Absorb blocks that start inside (or right after) this one.
        while True:
            j = ooo.bisect_right(start)
            if j >= len(ooo):
                break
            s = ooo.keys()[j]
            right = start + len(block)
            if s > right:
                break
            chunk = ooo.pop(s)
            self.out_of_order_bytes -= len(chunk)
            if s + len(chunk) > right:
                rest = memoryview(chunk)[right - s :]
                block += rest
                self.out_of_order_bytes += len(rest)
        self._recent = start

    def sack_blocks(self, limit: int = 4) -> list[tuple[int, int]]:
        """Out-of-order ranges as (start, end), the most recently changed first (RFC 2018).

        Costs O(limit), not O(blocks): this runs for every ACK sent.
        """
        ooo = self._ooo
        if not ooo:
            return []
        blocks: list[tuple[int, int]] = []
        recent = self._recent
        if recent is not None and recent in ooo:
            blocks.append((recent, recent + len(ooo[recent])))
        for start in ooo.islice(0, limit + 1):
            if len(blocks) >= limit:
                break
            if start != recent:
                blocks.append((start, start + len(ooo[start])))
        return blocks

    def read(self, max_bytes: int = -1) -> bytes:
        """Take up to ``max_bytes`` readable bytes (all with -1)."""
        have = self._readable
        n = have if max_bytes < 0 else min(max_bytes, have)
        if n <= 0:
            return b""
        pieces = self._pieces
        self._readable = have - n
        if n == have:
            out = b"".join(pieces)
            pieces.clear()
            return out
        taken: list[bytes | bytearray | memoryview] = []
        need = n
        while need:
            piece = pieces[0]
            size = len(piece)
            if size <= need:
                taken.append(pieces.popleft())
                need -= size
            elif type(piece) is bytearray:
                taken.append(piece[:need])
                del piece[:need]  # a bytearray drops its head without moving the rest
                need = 0
            else:
                view = memoryview(piece)
                taken.append(view[:need])
                pieces[0] = view[need:]
                need = 0
        return b"".join(taken)

"""Send and receive buffers: reassembly against a model, bounds, SACK blocks."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sortedcontainers import SortedDict

from pyserval.transport.buffers import ReceiveBuffer, SendBuffer

STREAM = bytes((i * 7 + 3) % 256 for i in range(4000))


@settings(max_examples=200)
@given(
    capacity=st.integers(8, 400),
    max_blocks=st.sampled_from([1, 3, 1024]),
    ops=st.lists(
        st.tuples(st.integers(-30, 400), st.integers(0, 40), st.integers(0, 60)), max_size=120
    ),
)
def test_reassembly_is_exact_and_bounded(
    capacity: int, max_blocks: int, ops: list[tuple[int, int, int]]
) -> None:
    rb = ReceiveBuffer(capacity, max_blocks=max_blocks)
    got = bytearray()
    for offset, length, read in ops:
        start = max(0, rb.rcv_nxt + offset)
        rb.offer(start, STREAM[start : start + length])
        got += rb.read(read)
        ooo = rb._ooo if rb._ooo is not None else SortedDict()  # (made on first use)
        starts = list(ooo.keys())
        for a, b in itertools.pairwise(starts):
            assert a + len(ooo[a]) < b  # merged: no overlap, no adjacency
        for s in starts:
            assert s > rb.rcv_nxt and ooo[s] == STREAM[s : s + len(ooo[s])]
        assert rb.readable + rb.out_of_order_bytes <= capacity  # memory within the window
        assert len(starts) <= max_blocks
        assert len(rb.sack_blocks(3)) == min(3, len(starts))
    got += rb.read()
    assert bytes(got) == STREAM[: rb.rcv_nxt]


def test_sack_blocks_put_the_most_recent_first() -> None:
    rb = ReceiveBuffer(1000)
    rb.offer(100, b"x" * 10)
    rb.offer(300, b"y" * 10)
    rb.offer(200, b"z" * 10)
    assert rb.sack_blocks(3) == [(200, 210), (100, 110), (300, 310)]


def test_an_empty_segment_above_the_next_byte_leaves_no_sack_block() -> None:
    # RFC 2018 3: a SACK block reports bytes received and held; an empty segment brings
    # none, so [10, 10) must not be reported (nor counted as held out of order).
    r = ReceiveBuffer(1000)
    assert r.offer(10, b"") == 0
    assert (r.sack_blocks(4), r.out_of_order_bytes) == ([], 0)


def test_send_buffer_bounds_and_release() -> None:
    sb = SendBuffer(10)
    assert sb.write(b"0123456789abc") == 10 and sb.free == 0
    assert sb.read(2, 5) == b"234"
    assert sb.release(4) == 4 and sb.start == 4 and sb.free == 4
    assert sb.write(b"abcdef") == 4 and sb.end == 14
    assert sb.read(10, 14) == b"abcd"


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["write", "write_view", "read", "release"]),
            st.integers(0, 70_000),
            st.integers(0, 70_000),
        ),
        max_size=60,
    )
)
def test_the_send_buffer_holds_what_a_plain_bytearray_holds(
    ops: list[tuple[str, int, int]],
) -> None:
    """Chunked storage against the obvious model: one bytearray and its start offset."""
    sb = SendBuffer(200_000)
    model = bytearray()
    base = 0
    written = 0
    for op, a, b in ops:
        if op.startswith("write"):
            data = bytes((written + i) % 251 for i in range(a))
            taken = sb.write(memoryview(data) if op == "write_view" else data)
            assert taken == min(a, 200_000 - len(model))
            model += data[:taken]
            written += taken
        elif op == "read":
            lo = base + (a % (len(model) + 1))
            hi = lo + (b % (base + len(model) - lo + 1))
            assert sb.read(lo, hi) == bytes(model[lo - base : hi - base])
        else:
            upto = base + a % (len(model) + 1)
            assert sb.release(upto) == upto - base
            del model[: upto - base]
            base = upto
        assert (sb.start, sb.end, len(sb), sb.free) == (
            base,
            base + len(model),
            len(model),
            200_000 - len(model),
        )
    with pytest.raises(IndexError):
        sb.read(base - 1, base + 1) if base else sb.read(0, sb.end + 1)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["bytes", "datagram_view", "small_view", "bytearray_view", "read"]),
            st.integers(0, 5000),
        ),
        max_size=60,
    )
)
def test_in_order_bytes_read_back_as_a_plain_bytearray_holds_them(
    ops: list[tuple[str, int]],
) -> None:
    """The queue of pieces against the obvious model, whatever the pieces are: bytes kept
    by reference, views of received datagrams (32 header bytes before the payload), views
    covering a small part of a large object, and views of a bytearray that its owner
    changes right after handing it over (it must have been copied)."""
    rb = ReceiveBuffer(1 << 30)
    model = bytearray()
    got = bytearray()
    stream = itertools.count()
    for kind, n in ops:
        if kind == "read":
            out = rb.read(n if n % 3 else -1)
            assert isinstance(out, bytes)
            got += out
            continue
        payload = bytes(next(stream) % 251 for _ in range(n))
        model += payload
        if kind == "bytes":
            rb.append_in_order(payload)
        elif kind == "datagram_view":
            rb.append_payloads([b"H" * 32 + payload], 32)
        elif kind == "small_view":
            rb.append_in_order(memoryview(b"Z" * (4 * n + 10) + payload)[4 * n + 10 :])
        else:
            owner = bytearray(payload)
            rb.append_in_order(memoryview(owner))
            owner[:] = b"\xee" * len(owner)  # the adapter reuses its buffer
        assert rb.readable == len(model) - len(got)
        assert rb.rcv_nxt == len(model)
    got += rb.read()
    assert bytes(got) == bytes(model)


def test_one_byte_segments_are_gathered_not_kept_one_object_each() -> None:
    rb = ReceiveBuffer(1 << 20)
    for i in range(100_000):
        rb.offer(i, b"x")
    # 100,000 bytes in pieces of 16 KiB: a handful of objects, not 100,000 (each would
    # cost a hundred bytes or more of bookkeeping for one byte of data).
    assert len(rb._pieces) <= 100_000 // (16 * ReceiveBuffer.KEEP) + 1
    assert rb.read() == b"x" * 100_000


def test_an_out_of_order_block_grows_in_place_as_segments_follow_it() -> None:
    """After a hole, each later segment extends the block above it: the block must grow
    where it is, not be copied whole each time (that would cost the square of the window:
    about 4,000 copies of up to 5.6 MB for an 8 MiB window at 1,408 bytes a segment)."""
    rb = ReceiveBuffer(1 << 24)
    seg = 1408
    stream = bytes(range(256)) * (seg * 200 // 256 + 1)
    rb.offer(seg, stream[seg : 2 * seg])  # the first segment is lost: a hole at 0
    block = rb._ooo[seg] if rb._ooo is not None else None
    for k in range(2, 200):
        rb.offer(k * seg, stream[k * seg : (k + 1) * seg])
        assert rb._ooo is not None and rb._ooo[seg] is block  # the same object, longer
    assert rb.out_of_order_bytes == 199 * seg
    rb.offer(0, stream[:seg])  # the retransmission fills the hole
    assert rb.read() == stream[: 200 * seg] and rb.out_of_order_bytes == 0

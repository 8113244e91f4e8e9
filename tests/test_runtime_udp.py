"""UdpEndpoint on real loopback sockets: batching, GSO/GRO, the send queue, errors, lifetime.

Each test runs its own event loop with ``asyncio.run``. Loopback never pushes back on a
sender (the kernel frees a datagram's send-buffer charge as soon as it is handed to the
receiver), so the send-queue tests use a socket whose ``sendto``/``sendmsg`` report a full
buffer on demand.
"""

from __future__ import annotations

import asyncio
import errno
import random
import socket
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import pytest

from pyserval.runtime.udp import Address, UdpEndpoint
from pyserval.sal.train import SuperDatagram

pytestmark = pytest.mark.timeout(30)

LOCAL: Address = ("127.0.0.1", 0)
_S = TypeVar("_S", bound=socket.socket)


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 10))


class Sink:
    """An ``on_datagrams`` callback that keeps every batch."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[bytes, Address]]] = []
        self.event = asyncio.Event()
        self.count = 0

    def __call__(self, batch: list[tuple[bytes, Address]]) -> None:
        self.batches.append(batch)
        self.count += len(batch)
        self.event.set()

    @property
    def datagrams(self) -> list[tuple[bytes, Address]]:
        return [item for batch in self.batches for item in batch]

    async def wait_for(self, n: int, timeout: float = 5.0) -> None:
        """Wait until ``n`` datagrams arrived (fails the test on timeout)."""
        deadline = time.monotonic() + timeout
        while self.count < n:
            left = deadline - time.monotonic()
            assert left > 0, f"only {self.count} of {n} datagrams arrived"
            self.event.clear()
            try:
                await asyncio.wait_for(self.event.wait(), left)
            except TimeoutError:
                continue


async def settle(condition: Callable[[], bool], timeout: float = 2.0) -> None:
    """Let the loop run until ``condition()`` holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition never held"
        await asyncio.sleep(0.005)


def payloads(n: int, seed: int, sizes: tuple[int, int] = (1, 1400)) -> list[bytes]:
    rng = random.Random(seed)
    return [i.to_bytes(4, "big") + rng.randbytes(rng.randint(*sizes) - 1) for i in range(n)]


@pytest.mark.parametrize("gro", [False, True])
def test_batched_delivery(gro: bool) -> None:
    async def main() -> None:
        sink = Sink()
        async with (
            await UdpEndpoint.open(LOCAL, sink, gro=gro) as rx,
            await UdpEndpoint.open(LOCAL, Sink()) as tx,
        ):
            data = payloads(1000, seed=1, sizes=(5, 1400))
            for d in data:
                tx.send(d, rx.address)
            await sink.wait_for(1000)
            # Everything was sent before the loop ran the reader: 256 per wake-up.
            assert len(sink.batches) <= 8
            assert [d for d, _ in sink.datagrams] == data
            assert {addr for _, addr in sink.datagrams} == {tx.address}
            assert rx.stats.datagrams_received == 1000
            assert rx.stats.bytes_received == sum(map(len, data))
            assert rx.stats.batches == len(sink.batches)
            assert tx.stats.datagrams_sent == 1000
            assert tx.queued == 0
            assert not tx.errors and not rx.errors

    run(main())


def mixed_batch(a: Address, b: Address) -> list[tuple[bytes, Address]]:
    """Datagrams that exercise every GSO grouping rule (see test_gso_groups_follow_the_rules)."""
    rng = random.Random(7)

    def run_of(n: int, size: int, remote: Address) -> list[tuple[bytes, Address]]:
        return [(rng.randbytes(size), remote) for _ in range(n)]

    return [
        *run_of(10, 1200, a),  # equal sizes to one remote: one call
        *run_of(1, 800, b),  # alternating remotes: three single sends
        *run_of(1, 800, a),
        *run_of(1, 800, b),
        *run_of(150, 1000, b),  # more than 64 segments: 64 + 64 + 22
        *run_of(5, 1200, a),  # a shorter last segment joins and ends the group
        *run_of(1, 300, a),
        *run_of(20, 8000, a),  # 65,000 bytes per call: 8 + 8 + 4
        *run_of(1, 500, b),  # a longer one cannot follow: 500 alone ...
        *run_of(1, 900, b),  # ... 900 + 100 together
        *run_of(1, 100, b),
        (b"", b),  # an empty datagram goes alone
        *run_of(1, 100, b),
        *run_of(1, 1, a),
    ]


async def each_receives_its_own(
    sent: list[tuple[bytes, Address]], *receivers: tuple[UdpEndpoint, Sink]
) -> None:
    """Every receiver gets exactly the datagrams sent to its address, in order."""
    for rx, sink in receivers:
        want = [d for d, r in sent if r == rx.address]
        await sink.wait_for(len(want))
        assert [d for d, _ in sink.datagrams] == want


@pytest.mark.parametrize("gro", [False, True])
@pytest.mark.parametrize("gso", [False, True])
def test_gso_and_plain_deliver_identical_datagrams(gso: bool, gro: bool) -> None:
    async def main() -> None:
        sink_a, sink_b = Sink(), Sink()
        async with (
            await UdpEndpoint.open(LOCAL, sink_a, gro=gro) as rx_a,
            await UdpEndpoint.open(LOCAL, sink_b, gro=gro) as rx_b,
            await UdpEndpoint.open(LOCAL, Sink(), gso=gso) as tx,
        ):
            assert tx.gso is gso  # this kernel has GSO; gso=False forces the fallback
            items = mixed_batch(rx_a.address, rx_b.address)
            tx.send_many(items)
            await each_receives_its_own(items, (rx_a, sink_a), (rx_b, sink_b))
            assert tx.stats.datagrams_sent == len(items)
            assert tx.stats.bytes_sent == sum(len(d) for d, _ in items)
            if gso:
                assert tx.stats.gso_calls > 0
                assert tx.stats.gso_datagrams > len(items) // 2
            else:
                assert tx.stats.gso_calls == 0
            if gso and gro:
                # Loopback hands GSO super-datagrams to a GRO socket whole; they were split.
                assert rx_a.stats.gro_reads + rx_b.stats.gro_reads > 0
            assert not tx.errors and not rx_a.errors and not rx_b.errors

    run(main())


def test_gso_groups_follow_the_rules() -> None:
    async def main() -> None:
        async with (
            await UdpEndpoint.open(LOCAL, Sink()) as rx_a,
            await UdpEndpoint.open(LOCAL, Sink()) as rx_b,
            await UdpEndpoint.open(LOCAL, Sink()) as tx,
        ):
            items = mixed_batch(rx_a.address, rx_b.address)
            tx.send_many(items)
            assert len(items) == 195
            assert tx.stats.gso_calls == 1 + 3 + 1 + 3 + 1
            assert tx.stats.gso_datagrams == 10 + 150 + 6 + 20 + 2

    run(main())


class FullBufferSocket(socket.socket):
    """A UDP socket whose sends fail with EAGAIN while ``full`` is set."""

    full = False
    attempts = 0

    def sendto(self, data: Any, *args: Any) -> int:
        self.attempts += 1
        if self.full:
            raise BlockingIOError(errno.EAGAIN, "simulated full send buffer")
        return super().sendto(data, *args)

    def sendmsg(self, *args: Any) -> int:
        self.attempts += 1
        if self.full:
            raise BlockingIOError(errno.EAGAIN, "simulated full send buffer")
        return super().sendmsg(*args)


async def full_buffer_endpoint(send_queue: int) -> tuple[UdpEndpoint, FullBufferSocket]:
    sock = bound(FullBufferSocket, sndbuf=4096)
    return endpoint_over(sock, send_queue), sock


def bound(kind: type[_S], sndbuf: int | None = None) -> _S:
    """A non-blocking socket of test class ``kind`` bound on loopback."""
    sock = kind(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    if sndbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    sock.bind(LOCAL)
    return sock


def endpoint_over(
    sock: socket.socket,
    send_queue: int,
    *,
    options: tuple[bool, int, int] = (False, 0, 4096),
    gro: bool = True,
    on_icmp_error: Callable[[Address, int], None] | None = None,
) -> UdpEndpoint:
    """An endpoint over a bound test socket (GSO on, as the probe would find it)."""
    return UdpEndpoint(
        sock,
        asyncio.get_running_loop(),
        Sink(),
        options=options,
        gso=True,
        gro=gro,
        max_batch=256,
        send_queue=send_queue,
        on_icmp_error=on_icmp_error,
    )


def test_send_queue_is_bounded_and_drains_in_order() -> None:
    async def main() -> None:
        sink = Sink()
        async with await UdpEndpoint.open(LOCAL, sink) as rx:
            tx, sock = await full_buffer_endpoint(send_queue=100)
            async with tx:
                data = [i.to_bytes(4, "big") * 100 for i in range(160)]
                sock.full = True
                tx.send(data[0], rx.address)
                tx.send_many([(d, rx.address) for d in data[1:120]])
                assert tx.queued == 100
                sock.full = False
                # The queue is not empty, so this one must wait behind it (and is dropped).
                tx.send(data[120], rx.address)
                assert tx.errors["send_queue_full"] == 21
                assert tx.stats.datagrams_sent == 0
                await settle(lambda: tx.queued == 0)
                await sink.wait_for(100)
                assert [d for d, _ in sink.datagrams] == data[:100]
                assert tx.stats.queued_total == 100
                assert tx.stats.datagrams_sent == 100
                # Drained: the writer is gone and sends go straight out again.
                before = sock.attempts
                tx.send_many([(d, rx.address) for d in data[121:]])
                assert tx.queued == 0 and sock.attempts == before + 1  # one GSO call
                await sink.wait_for(139)
                assert [d for d, _ in sink.datagrams][100:] == data[121:]

    run(main())


def test_send_queue_drains_under_sustained_pressure() -> None:
    async def main() -> None:
        sink = Sink()
        async with await UdpEndpoint.open(LOCAL, sink) as rx:
            tx, sock = await full_buffer_endpoint(send_queue=4096)
            loop = asyncio.get_running_loop()
            async with tx:
                data = payloads(3000, seed=3, sizes=(20, 1000))
                sent = 0
                # The "kernel" refuses sends two times in three ticks, as a congested device
                # would, while the program keeps producing.
                for tick in range(30):
                    sock.full = tick % 3 != 0
                    tx.send_many([(d, rx.address) for d in data[sent : sent + 100]])
                    sent += 100
                    await asyncio.sleep(0.001)
                loop.call_later(0.02, setattr, sock, "full", False)
                await settle(lambda: tx.queued == 0)
                await sink.wait_for(3000)
                assert [d for d, _ in sink.datagrams] == data
                assert tx.stats.queued_total > 0
                assert not tx.errors

    run(main())


def closed_port() -> Address:
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(LOCAL)
    address: Address = probe.getsockname()
    probe.close()
    return address


def test_icmp_errors_are_counted_and_reported_not_raised() -> None:
    async def main() -> None:
        reports: list[tuple[Address, int]] = []
        sink, peer_sink = Sink(), Sink()
        dead = closed_port()
        async with (
            await UdpEndpoint.open(
                LOCAL, sink, on_icmp_error=lambda a, e: reports.append((a, e))
            ) as ep,
            await UdpEndpoint.open(LOCAL, peer_sink) as peer,
        ):
            ep.send(b"hello?", dead)
            await settle(lambda: len(reports) == 1)
            assert reports == [(dead, errno.ECONNREFUSED)]
            assert ep.errors["icmp:ECONNREFUSED"] == 1
            assert ep.errors["recv:ECONNREFUSED"] == 1
            # The reader survived: datagrams still arrive.
            peer.send(b"still there", ep.address)
            await sink.wait_for(1)
            assert sink.datagrams == [(b"still there", peer.address)]

            # An ICMP error pending when another send happens is reported by that send;
            # the datagram to the live peer still goes out.
            ep.send(b"hello?", dead)
            time.sleep(0.05)  # the ICMP arrives while the loop cannot read it
            ep.send(b"to the peer", peer.address)
            assert ep.errors["send:ECONNREFUSED"] == 1
            ep.send_many([(b"x" * 100, peer.address)] * 3)
            await peer_sink.wait_for(4)
            assert [d for d, _ in peer_sink.datagrams] == [b"to the peer"] + [b"x" * 100] * 3
            await settle(lambda: len(reports) == 2)
            await asyncio.sleep(0.02)
            # Nothing left in the error queue to spin on.
            assert ep.errors["icmp:ECONNREFUSED"] == 2

    run(main())


class RefusedThenFullSocket(FullBufferSocket):
    """Reports a pending ICMP error on the first ``sendto``, then a full buffer."""

    def sendto(self, data: Any, *args: Any) -> int:
        self.attempts += 1
        if self.attempts == 1:
            raise ConnectionRefusedError(errno.ECONNREFUSED, "simulated pending ICMP error")
        return super().sendto(data, *args)


def test_send_queues_when_the_retry_after_an_icmp_error_finds_the_buffer_full() -> None:
    # The module's promise: network conditions are never raised out of send(). The retry
    # that a pending ICMP error triggers may meet a full buffer: the datagram then waits in
    # the queue, as it does when the first try meets one.
    async def main() -> None:
        sink = Sink()
        async with await UdpEndpoint.open(LOCAL, sink) as rx:
            sock = bound(RefusedThenFullSocket)
            sock.full = True
            tx = endpoint_over(
                sock, 16, options=(False, 0, 0), on_icmp_error=lambda address, err: None
            )
            async with tx:
                tx.send(b"after the error", rx.address)
                assert tx.errors["send:ECONNREFUSED"] == 1
                assert tx.queued == 1
                sock.full = False
                await sink.wait_for(1)
                assert sink.datagrams == [(b"after the error", tx.address)]

    run(main())


def test_unreachable_port_without_icmp_reporting_is_harmless() -> None:
    async def main() -> None:
        sink = Sink()
        async with (
            await UdpEndpoint.open(LOCAL, sink) as ep,
            await UdpEndpoint.open(LOCAL, Sink()) as peer,
        ):
            for _ in range(10):
                ep.send(b"nobody", closed_port())
            await asyncio.sleep(0.05)
            peer.send(b"ok", ep.address)
            await sink.wait_for(1)
            assert ep.stats.datagrams_sent == 10
            assert not ep.errors

    run(main())


def test_close_is_idempotent() -> None:
    async def main() -> None:
        sink = Sink()
        ep = await UdpEndpoint.open(LOCAL, sink)
        address = ep.address
        assert not ep.closed and ep.fileno() >= 0
        ep.close()
        ep.close()
        assert ep.closed and ep.fileno() == -1
        assert "closed" in repr(ep)
        with pytest.raises(OSError):
            ep.send(b"x", address)
        async with await UdpEndpoint.open(LOCAL, Sink()) as other:
            other.send(b"x", address)
            await asyncio.sleep(0.02)  # the loop must not call into the closed endpoint
        assert other.closed
        other.close()
        assert sink.count == 0

        # Closing with datagrams queued and the writer registered.
        tx, sock = await full_buffer_endpoint(send_queue=10)
        sock.full = True
        tx.send(b"x", address)
        assert tx.queued == 1
        tx.close()
        tx.close()
        assert tx.queued == 0
        await asyncio.sleep(0.01)

    run(main())


def test_rebind_moves_to_a_new_address() -> None:
    async def main() -> None:
        sink = Sink()
        async with (
            await UdpEndpoint.open(LOCAL, sink) as ep,
            await UdpEndpoint.open(LOCAL, Sink()) as peer,
        ):
            old = ep.address
            ep.rebind(("127.0.0.1", 0))
            assert ep.address != old
            peer.send(b"new", ep.address)
            await sink.wait_for(1)
            assert sink.datagrams == [(b"new", peer.address)]
            ep.send(b"from new", peer.address)
            with pytest.raises(OSError):
                ep.rebind(("192.0.2.254", 1))  # not ours: the old socket stays
            assert ep.address != old and not ep.closed
            peer.send(b"again", ep.address)
            await sink.wait_for(2)

    run(main())


def test_open_options() -> None:
    async def main() -> None:
        async with await UdpEndpoint.open(LOCAL, Sink(), rcvbuf=1 << 20, sndbuf=1 << 20) as ep:
            assert ep.rcvbuf >= 1 << 20 and ep.sndbuf >= 1 << 20  # Linux reports double
        first = await UdpEndpoint.open(LOCAL, Sink(), reuse_port=True)
        async with first:
            second = await UdpEndpoint.open(first.address, Sink(), reuse_port=True)
            second.close()
        with pytest.raises(ValueError):
            await UdpEndpoint.open(LOCAL, Sink(), max_batch=0)

    run(main())


# -- super-datagrams (a segment train's datagrams, back to back) ------------------------


def super_of(datagrams: list[bytes]) -> SuperDatagram:
    """The datagrams (equal sizes, the last maybe shorter) in one buffer."""
    return SuperDatagram(b"".join(datagrams), len(datagrams[0]))


def trains_and_singles(a: Address, b: Address) -> tuple[list[Any], list[tuple[bytes, Address]]]:
    """Items mixing super-datagrams and plain datagrams to two remotes, and the datagrams
    they stand for, in order (what must arrive)."""
    rng = random.Random(11)
    items: list[Any] = []
    flat: list[tuple[bytes, Address]] = []
    for n, size, last, remote in [
        (40, 1452, 700, a),  # a train of MSS 1,408 segments with a short last one
        (1, 60, 60, b),  # an ACK to another peer between trains
        (5, 1452, 1452, a),
        (3, 8000, 10, b),  # large segments, a tiny last one
        (1, 60, 60, a),
        (44, 1452, 1452, a),  # the most a 65,000-byte call takes at this size
    ]:
        datagrams = [rng.randbytes(size) for _ in range(n - 1)] + [rng.randbytes(last)]
        flat += [(d, remote) for d in datagrams]
        items.append((super_of(datagrams) if n > 1 else datagrams[0], remote))
    return items, flat


@pytest.mark.parametrize("gro", [False, True])
@pytest.mark.parametrize("gso", [False, True])
def test_super_datagrams_arrive_as_their_datagrams_in_order(gso: bool, gro: bool) -> None:
    async def main() -> None:
        sink_a, sink_b = Sink(), Sink()
        async with (
            await UdpEndpoint.open(LOCAL, sink_a, gro=gro) as rx_a,
            await UdpEndpoint.open(LOCAL, sink_b, gro=gro) as rx_b,
            await UdpEndpoint.open(LOCAL, Sink(), gso=gso) as tx,
        ):
            items, flat = trains_and_singles(rx_a.address, rx_b.address)
            tx.send_many(items)
            await each_receives_its_own(flat, (rx_a, sink_a), (rx_b, sink_b))
            assert tx.stats.datagrams_sent == len(flat)
            assert tx.stats.bytes_sent == sum(len(d) for d, _ in flat)
            # One GSO call per super-datagram (four of them), none without GSO.
            assert tx.stats.gso_calls == (4 if gso else 0)
            assert not tx.errors and not rx_a.errors and not rx_b.errors

    run(main())


def test_super_datagrams_wait_as_their_datagrams_when_the_buffer_is_full() -> None:
    async def main() -> None:
        sink = Sink()
        async with await UdpEndpoint.open(LOCAL, sink) as rx:
            tx, sock = await full_buffer_endpoint(send_queue=1000)
            async with tx:
                items, flat = trains_and_singles(rx.address, rx.address)
                sock.full = True
                tx.send_many(items[:3])
                # Queued datagram by datagram (the bound counts datagrams).
                assert tx.queued == 40 + 1 + 5
                sock.full = False
                tx.send_many(items[3:])  # behind the queue, in order
                await settle(lambda: tx.queued == 0)
                await sink.wait_for(len(flat))
                assert [d for d, _ in sink.datagrams] == [d for d, _ in flat]
                assert tx.stats.datagrams_sent == len(flat)

    run(main())


class NoGsoSocket(FullBufferSocket):
    """A UDP socket whose GSO sends fail as a device without UDP segmentation makes
    them fail (EIO), and whose plain sends stop after ``budget`` datagrams."""

    budget = 10**9

    def sendmsg(self, *args: Any) -> int:
        raise OSError(errno.EIO, "simulated: no segmentation offload")

    def sendto(self, data: Any, *args: Any) -> int:
        if self.budget <= 0:
            raise BlockingIOError(errno.EAGAIN, "simulated full send buffer")
        self.budget -= 1
        return super().sendto(data, *args)


@pytest.mark.parametrize("budget", [10**9, 25])
def test_a_refused_gso_call_sends_the_super_datagram_plainly_and_keeps_the_order(
    budget: int,
) -> None:
    """GSO refused: the datagrams go one by one; when the buffer fills half way through a
    super-datagram, its rest and everything after it wait, in order."""

    async def main() -> None:
        sink = Sink()
        async with await UdpEndpoint.open(LOCAL, sink) as rx:
            sock = bound(NoGsoSocket)
            sock.budget = budget
            tx = endpoint_over(sock, 1000, gro=False)
            tx._gso = True  # as if the probe had found GSO (the device refuses it later)
            async with tx:
                items, flat = trains_and_singles(rx.address, rx.address)
                tx.send_many(items)
                assert tx.errors["gso_fallback:EIO"] == 1 and not tx.gso
                if budget < len(flat):
                    assert tx.queued == len(flat) - budget
                    sock.budget = 10**9
                await settle(lambda: tx.queued == 0)
                await sink.wait_for(len(flat))
                assert [d for d, _ in sink.datagrams] == [d for d, _ in flat]
                assert tx.stats.datagrams_sent == len(flat)

    run(main())

"""``pyserval.BusyPollSelector`` and ``busy_poll_loop``: poll before sleeping, opt-in.

Checked on real sockets: an event already waiting or arriving within the spin returns at
once and counts as a spin won; with nothing arriving the caller's timeout still holds (the
spin is part of it, not added to it); after ``MAX_CREDIT`` misses in a row it stops
spinning, and a sleep that ends within the spin brings it back; a wait no longer than the
spin, or a spin of 0, is the plain selector's. And pyserval's connect cycle runs on a loop
made by ``busy_poll_loop``, with spins catching its datagrams.
"""

from __future__ import annotations

import asyncio
import selectors
import socket
import threading
import time
from collections.abc import Iterator

import anyio
import pytest

import pyserval
from pyserval import BusyPollSelector, busy_poll_loop
from pyserval.runtime.busy_poll import MAX_CREDIT


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A receiving UDP socket (non-blocking) and a sender connected to it."""
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.setblocking(False)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.connect(rx.getsockname())
    yield rx, tx
    rx.close()
    tx.close()


def _selector(rx: socket.socket, spin: float) -> BusyPollSelector:
    sel = BusyPollSelector(spin)
    sel.register(rx, selectors.EVENT_READ)
    return sel


def _drain(rx: socket.socket) -> None:
    while True:
        try:
            rx.recv(2048)
        except BlockingIOError:
            return


def test_an_event_already_waiting_is_caught_by_the_spin(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    rx, tx = pair
    sel = _selector(rx, 0.05)
    tx.send(b"x")
    time.sleep(0.01)  # (on loopback the datagram is queued by now)
    start = time.monotonic()
    ready = sel.select(5.0)
    assert [key.fileobj for key, _ in ready] == [rx]
    assert time.monotonic() - start < 1.0
    assert (sel.spins_won, sel.spins_lost, sel.sleeps_unspun) == (1, 0, 0)


def test_an_event_arriving_during_the_spin_returns_without_sleeping(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    rx, tx = pair
    sel = _selector(rx, 2.0)  # a spin far longer than the sender's delay, even under load
    sender = threading.Timer(0.02, lambda: tx.send(b"x"))
    sender.start()
    try:
        ready = sel.select(10.0)
    finally:
        sender.join()
    assert [key.fileobj for key, _ in ready] == [rx]
    assert sel.spins_won == 1 and sel.spins_lost == 0


def test_with_nothing_arriving_the_timeout_holds_and_the_spin_is_part_of_it(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    rx, _tx = pair
    sel = _selector(rx, 0.2)
    start = time.monotonic()
    assert sel.select(0.3) == []
    took = time.monotonic() - start
    # Not early (the 200 ms spin, then the rest of the 300 ms asleep), and not 500 ms: the
    # spin came out of the timeout, not on top of it.
    assert 0.3 <= took < 0.45, took
    assert (sel.spins_won, sel.spins_lost) == (0, 1)
    assert sel.credit == MAX_CREDIT - 1


def test_misses_stop_the_spinning_and_a_quick_event_restarts_it(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    rx, tx = pair
    sel = _selector(rx, 0.02)  # (a quick event must come within 20 ms: also under load)
    for _ in range(MAX_CREDIT + 3):
        assert sel.select(0.04) == []
    # MAX_CREDIT spins missed; the three waits after them slept at once.
    assert (sel.spins_lost, sel.sleeps_unspun, sel.credit) == (MAX_CREDIT, 3, 0)
    # A datagram waiting when the loop goes to sleep: the sleep ends within the spin, so
    # the next wait spins again (and catches the next datagram).
    tx.send(b"x")
    time.sleep(0.01)
    assert len(sel.select(1.0)) == 1
    assert sel.sleeps_unspun == 4 and sel.credit == 1
    _drain(rx)
    tx.send(b"y")
    time.sleep(0.01)
    assert len(sel.select(1.0)) == 1
    assert sel.spins_won == 1 and sel.credit == 2


@pytest.mark.parametrize("timeout", [0.0, 0.001])
def test_a_wait_no_longer_than_the_spin_is_the_plain_selectors(
    pair: tuple[socket.socket, socket.socket], timeout: float
) -> None:
    rx, _tx = pair
    sel = _selector(rx, 0.001)
    assert sel.select(timeout) == []
    assert (sel.spins_won, sel.spins_lost, sel.sleeps_unspun) == (0, 0, 0)


def test_a_spin_of_zero_never_spins(pair: tuple[socket.socket, socket.socket]) -> None:
    rx, tx = pair
    sel = _selector(rx, 0.0)
    assert sel.select(0.01) == []
    tx.send(b"x")
    time.sleep(0.01)
    assert len(sel.select(1.0)) == 1
    assert (sel.spins_won, sel.spins_lost, sel.sleeps_unspun) == (0, 0, 0)


@pytest.mark.parametrize("spin", [-1e-6, float("nan"), float("inf")])
def test_a_spin_that_is_not_a_duration_is_refused(spin: float) -> None:
    with pytest.raises(ValueError, match="spin must be a non-negative number"):
        BusyPollSelector(spin)
    with pytest.raises(ValueError, match="spin must be a non-negative number"):
        busy_poll_loop(spin)  # at once, not when the Runner makes its loop


def test_pyservals_connect_cycle_runs_on_a_busy_poll_loop() -> None:
    """Connect, the server accepts and closes, the client reads end of stream and closes,
    ten times: every cycle completes, and the loop's spins caught datagrams."""

    async def main() -> BusyPollSelector:
        loop = asyncio.get_running_loop()
        selector = loop._selector  # type: ignore[attr-defined]
        assert isinstance(selector, BusyPollSelector)
        accepted = 0

        async def serve(listener: pyserval.ServalListener) -> None:
            nonlocal accepted
            async for stream in listener:
                accepted += 1
                await stream.aclose()

        async with (
            pyserval.Host(["127.0.0.1:0"]) as server,
            pyserval.Host(["127.0.0.1:0"]) as client,
        ):
            listener = await server.listen("busy")
            task = asyncio.ensure_future(serve(listener))
            client.add_route("busy", "{}:{}".format(*server.addresses[0]))
            for _ in range(10):
                stream = await client.connect("busy")
                with pytest.raises(anyio.EndOfStream):
                    await stream.receive()
                await stream.aclose()
            task.cancel()
        assert accepted == 10
        return selector

    # A 5 ms spin: long enough for the other host's answer even on a loaded machine.
    with asyncio.Runner(loop_factory=busy_poll_loop(0.005)) as runner:
        selector = runner.run(main())
    assert selector.spins_won > 0

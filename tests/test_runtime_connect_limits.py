"""Connect time limits on the driver's one timer (runtime.driver ``wait_until``).

A connect's time limit is a deadline in the driver's heap, ended by the host's one loop
timer, not an ``asyncio.timeout`` (a timer handle per connect). Checked here against the
event loop itself: the limit still holds (a silent service times out after the limit, not
before), finished connects leave no live deadline and no timer handle behind, and a
cancelled connect forgets its deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Callable, Coroutine
from typing import Any

import anyio
import pytest

from pyserval import Host, errors


def _run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(main())


def test_a_silent_service_times_out_at_the_limit_and_not_before() -> None:
    async def main() -> None:
        async with Host(["127.0.0.1:0"]) as client:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as hole:
                hole.bind(("127.0.0.1", 0))  # bound, never read: no answer, no ICMP
                client.add_route("silent", "{}:{}".format(*hole.getsockname()))
                start = time.monotonic()
                with pytest.raises(errors.ServalConnectTimeout, match=r"after 0\.4 s"):
                    await client.connect("silent", timeout=0.4)
                took = time.monotonic() - start
                assert 0.4 <= took < 2.0, took
                # The connection was aborted: no more SYNs, nothing left to wait for.
                assert client._driver._limit_live == {}
                core = client.core
                assert core is not None
                assert all(c.closed for c in core.connections.values())

    _run(main)


def test_connects_leave_no_deadline_and_no_timer_handle_behind() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with Host(["127.0.0.1:0"]) as server, Host(["127.0.0.1:0"]) as client:
            listener = await server.listen("limits", backlog=64)

            async def serve() -> None:
                async for stream in listener:
                    await stream.aclose()

            task = asyncio.ensure_future(serve())
            client.add_route("limits", "{}:{}".format(*server.addresses[0]))
            timers = 0
            call_at = loop.call_at

            def counting_call_at(*args: Any, **kwargs: Any) -> asyncio.TimerHandle:
                nonlocal timers
                timers += 1
                return call_at(*args, **kwargs)

            loop.call_at = counting_call_at  # type: ignore[method-assign,assignment]
            for _ in range(40):
                stream = await client.connect("limits", timeout=30)
                with contextlib.suppress(anyio.EndOfStream):
                    await stream.receive()
                await stream.aclose()
            driver = client._driver
            assert driver._limit_live == {}
            # Entries of finished connects are dropped as they reach the top: the heap
            # does not grow with the number of connects.
            assert len(driver._limits) <= 1
            # Timer handles made meanwhile: the hosts' one timer each, re-armed when their
            # deadlines move earlier; an asyncio.timeout per connect would be 40 more.
            loop.call_at = call_at  # type: ignore[method-assign]
            assert timers < 20, timers
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    _run(main)


def test_a_cancelled_connect_forgets_its_deadline() -> None:
    async def main() -> None:
        async with Host(["127.0.0.1:0"]) as client:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as hole:
                hole.bind(("127.0.0.1", 0))
                client.add_route("silent", "{}:{}".format(*hole.getsockname()))
                task = asyncio.ensure_future(client.connect("silent", timeout=30))
                await asyncio.sleep(0.05)
                assert len(client._driver._limit_live) == 1  # the connect is waiting
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                assert client._driver._limit_live == {}
                core = client.core
                assert core is not None
                assert all(c.closed for c in core.connections.values())

    _run(main)


def test_the_deadline_heap_stays_bounded_under_a_wait_that_does_not_end() -> None:
    """A connect waiting on a silent service holds the top of the heap; the entries of the
    many connects that finish meanwhile (later deadlines, beneath it) must not pile up."""

    async def main() -> None:
        async with Host(["127.0.0.1:0"]) as server, Host(["127.0.0.1:0"]) as client:
            listener = await server.listen("limits", backlog=64)

            async def serve() -> None:
                async for stream in listener:
                    await stream.aclose()

            task = asyncio.ensure_future(serve())
            client.add_route("limits", "{}:{}".format(*server.addresses[0]))
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as hole:
                hole.bind(("127.0.0.1", 0))
                client.add_route("silent", "{}:{}".format(*hole.getsockname()))
                silent = asyncio.ensure_future(client.connect("silent", timeout=30))
                await asyncio.sleep(0.05)
                driver = client._driver
                for _ in range(150):
                    stream = await client.connect("limits", timeout=60)
                    with contextlib.suppress(anyio.EndOfStream):
                        await stream.receive()
                    await stream.aclose()
                assert len(driver._limit_live) == 1  # the silent connect, still waiting
                assert len(driver._limits) <= 2 * len(driver._limit_live) + 65
                silent.cancel()
                await asyncio.gather(silent, return_exceptions=True)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    _run(main)

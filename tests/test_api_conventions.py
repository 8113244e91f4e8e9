"""The API conventions users of networking libraries expect (issue 16), on loopback UDP.

``ServalListener`` is an ``anyio.abc.Listener``; ``pyserval.listen`` registers with the
same ``weight``/``priority``/``key`` as ``Host.listen``; a connect timeout is a
``TimeoutError``; a closed host says so; the first SYN retry comes after 1 s (RFC 6298).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import anyio
import anyio.abc
import pytest

import pyserval
from pyserval.control import Router
from pyserval.naming.keys import ServiceKey
from pyserval.naming.service_id import as_service_prefix
from pyserval.runtime.host import Host, HostClosed
from pyserval.runtime.streams import (
    ServalConnectError,
    ServalConnectTimeout,
    ServalListener,
    ServalStream,
)
from pyserval.sal.control import ControlTimers


async def _wait_until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.01)


async def _echo_once(stream: ServalStream) -> None:
    await stream.send(await stream.receive())


def test_listener_is_an_anyio_listener_served_in_a_given_task_group() -> None:
    async def main() -> None:
        async with Host(["127.0.0.1:0"]) as server, Host(["127.0.0.1:0"]) as client:
            client.add_route("conv-echo", "{}:{}".format(*server.addresses[0]))
            listener: ServalListener = await server.listen("conv-echo")
            assert isinstance(listener, anyio.abc.Listener)
            async with anyio.create_task_group() as tg, listener:
                tg.start_soon(listener.serve, _echo_once, tg)
                for i in range(3):
                    stream = await client.connect("conv-echo", timeout=5)
                    await stream.send(b"n%d" % i)
                    assert await stream.receive() == b"n%d" % i
                    await stream.aclose()
                await listener.aclose()  # serve() returns; the task group can end
            with pytest.raises(anyio.ClosedResourceError):
                await listener.accept()

    asyncio.run(main())


def test_pyserval_listen_registers_weight_priority_and_key() -> None:
    async def main() -> None:
        async with (
            Router("127.0.0.1:0") as router,
            Host(["127.0.0.1:0"], router=router.address_text) as host,
        ):
            key = ServiceKey.generate()
            sid = key.service_id("0a0b/16")
            signed = await pyserval.listen(sid, host=host, weight=7, priority=2, key=key)
            plain = await pyserval.listen("conv-weighted", host=host, weight=5, priority=1)
            await _wait_until(lambda: len(router.registry) == 2)
            table = await pyserval.fetch_table(router.address_text)
            rows = {e.prefix: e.targets for e in table.entries}
            (signed_row,) = rows[str(as_service_prefix(sid))]
            (plain_row,) = rows[str(as_service_prefix("conv-weighted"))]
            assert (signed_row.weight, signed_row.priority) == (7, 2)
            assert (plain_row.weight, plain_row.priority) == (5, 1)
            await signed.aclose()
            await plain.aclose()

    asyncio.run(main())


def test_connect_timeout_is_a_timeout_error_and_still_a_connect_error() -> None:
    assert issubclass(ServalConnectTimeout, TimeoutError)
    assert issubclass(ServalConnectTimeout, ServalConnectError)

    async def main() -> None:
        async with Host(["127.0.0.1:0"]) as client:
            # A router address that swallows SYNs: a bound UDP socket that never answers.
            loop = asyncio.get_running_loop()
            sink, _ = await loop.create_datagram_endpoint(
                asyncio.DatagramProtocol, local_addr=("127.0.0.1", 0)
            )
            try:
                client.add_route("conv-silent", "{}:{}".format(*sink.get_extra_info("sockname")))
                start = loop.time()
                with pytest.raises(TimeoutError):
                    await pyserval.connect("conv-silent", host=client, timeout=0.3)
                assert loop.time() - start < 2.0
            finally:
                sink.close()

    asyncio.run(main())


def test_a_closed_host_says_it_cannot_restart() -> None:
    async def main() -> None:
        host = Host(["127.0.0.1:0"])
        await host.start()
        await host.close()
        assert host.closed
        with pytest.raises(HostClosed, match="cannot be restarted"):
            await host.start()
        with pytest.raises(HostClosed):
            await host.connect("anything", timeout=0.1)
        with pytest.raises(HostClosed):
            await host.listen("anything")
        # The process-wide default host is replaced when it was closed.
        first = await pyserval.default_host()
        await first.close()
        second = await pyserval.default_host()
        assert second is not first and not second.closed
        await second.close()

    asyncio.run(main())


def test_first_syn_retransmission_after_one_second() -> None:
    # RFC 6298 (2.1): the initial RTO is 1 second.
    assert ControlTimers().initial_rto == 1.0
    assert pyserval.StreamConfig().control.initial_rto == 1.0

    async def main() -> None:
        async with Host(["127.0.0.1:0"]) as client:
            loop = asyncio.get_running_loop()
            arrivals: list[float] = []

            class Sink(asyncio.DatagramProtocol):
                def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                    arrivals.append(loop.time())

            sink, _ = await loop.create_datagram_endpoint(Sink, local_addr=("127.0.0.1", 0))
            try:
                client.add_route("conv-syn", "{}:{}".format(*sink.get_extra_info("sockname")))
                with pytest.raises(ServalConnectTimeout):
                    await client.connect("conv-syn", timeout=2.5)
            finally:
                sink.close()
            # The SYN, one retry after 1 s, and none after that within 2.5 s (the next is
            # due 2 s after the first retry). Generous bounds: the machine may be loaded.
            assert len(arrivals) == 2, arrivals
            assert 0.9 <= arrivals[1] - arrivals[0] < 2.0

    asyncio.run(main())

"""Unconnected datagrams that can answer (issue 16), on real loopback UDP sockets.

``sendto(reply, source)`` with the ``source`` that ``recvfrom`` returned goes back to the
sender's address, whether its socket is bound or not and whether the request came through
a router or not; a refusal is reported apart (``recv_error``), never by a later
``recvfrom``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

import pyserval  # noqa: F401  (installs the control plane used by Host(router=...))
from pyserval.control import Router
from pyserval.core.host import NoRoute
from pyserval.naming.service_id import ServiceID
from pyserval.runtime.host import Host
from pyserval.runtime.socket import DatagramError, ServalSocket


async def _wait_until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.01)


async def _answer_one(server: ServalSocket) -> None:
    data, source = await server.recvfrom()
    await server.sendto(b"re:" + data, source)


@pytest.mark.parametrize("bound", [False, True])
def test_reply_to_recvfrom_source_without_a_router(bound: bool) -> None:
    async def main() -> None:
        async with Host(["127.0.0.1:0"]) as server_host, Host(["127.0.0.1:0"]) as client_host:
            client_host.add_route("dg-echo", "{}:{}".format(*server_host.addresses[0]))
            server = server_host.socket("datagram")
            server.bind("dg-echo")
            answering = asyncio.ensure_future(_answer_one(server))
            await asyncio.sleep(0)
            client = client_host.socket("datagram")
            if bound:
                client.bind("dg-client")  # a name the server has no route for either
            await client.sendto(b"ping", "dg-echo")
            async with asyncio.timeout(5):
                data, (service, address) = await client.recvfrom()
            await answering
            assert data == b"re:ping"
            assert service == ServiceID.parse("dg-echo")
            assert address == server_host.addresses[0]
            # The server's host has no route at all: the reply went by address.
            assert server_host.service_table.lookup(client.local_service or 0) is None
            await client.close()
            await server.close()

    asyncio.run(main())


def test_reply_through_a_router_goes_straight_back() -> None:
    async def main() -> None:
        async with Router("127.0.0.1:0") as router:
            r = router.address_text
            async with Host(["127.0.0.1:0"], router=r) as server_host:
                server = server_host.socket("datagram")
                server.bind("dg-routed")
                # recvfrom binds and registers the socket with the router.
                answering = asyncio.ensure_future(_answer_one(server))
                await _wait_until(lambda: len(router.registry) >= 1)
                async with Host(["127.0.0.1:0"], router=r) as client_host:
                    client = client_host.socket("datagram")  # unbound: a random serviceID
                    await client.sendto(b"hello", "dg-routed")
                    async with asyncio.timeout(5):
                        data, (service, address) = await client.recvfrom()
                    await answering
                    assert data == b"re:hello"
                    assert service == ServiceID.parse("dg-routed")
                    assert address == server_host.addresses[0]
                    # The request went through the router (the reply goes to the client's
                    # address; a NAT-aware core may relay it through the router as well).
                    assert router.counters().get("packets_forwarded_datagram", 0) >= 1
                    await client.close()
                await server.close()

    asyncio.run(main())


def test_a_refusal_is_its_own_event_and_not_raised_by_recvfrom() -> None:
    async def main() -> None:
        async with Host(["127.0.0.1:0"]) as a, Host(["127.0.0.1:0"]) as b:
            b_addr = b.addresses[0]
            a.add_route("nobody-here", "{}:{}".format(*b_addr))
            a.add_route("dg-ok", "{}:{}".format(*b_addr))
            server = b.socket("datagram")
            server.bind("dg-ok")
            answering = asyncio.ensure_future(_answer_one(server))
            await asyncio.sleep(0)
            client = a.socket("datagram")
            await client.sendto(b"lost", "nobody-here")  # b answers with a RST
            async with asyncio.timeout(5):
                error = await client.recv_error()
            assert error == DatagramError("datagram refused: no such service", b_addr)
            # The next request/reply pair is not disturbed by that refusal.
            await client.sendto(b"second", "dg-ok")
            async with asyncio.timeout(5):
                data, _ = await client.recvfrom()
            assert data == b"re:second"
            await answering
            assert client.datagram_errors == []
            await client.close()
            await server.close()

    asyncio.run(main())


def test_errors_known_at_once_are_raised_by_sendto() -> None:
    async def main() -> None:
        async with Host(["127.0.0.1:0"]) as a:
            client = a.socket("datagram")
            with pytest.raises(NoRoute):
                await client.sendto(b"x", "no-route-anywhere")
            with pytest.raises(ValueError):
                await client.sendto(b"x", ("svc", "not an address"))
            await client.close()

    asyncio.run(main())

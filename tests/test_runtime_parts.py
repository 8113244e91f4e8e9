"""The host's parts wired explicitly (issue 13): the controller a host is given, the
control plane's default, and ``Host.send_datagram``, on loopback UDP."""

from __future__ import annotations

import asyncio

import pyserval
import pyserval.runtime.host as runtime_host
from pyserval.control import HostServiceController, Router
from pyserval.runtime.host import Host
from pyserval.transport.events import DatagramReceived, Event


class _RecordingController:
    """A controller that only records what the host asked of it."""

    def __init__(self, host: Host, router: tuple[str, int]) -> None:
        self.host = host
        self.router = router
        self.calls: list[str] = []

    async def start(self) -> None:
        self.calls.append("start")

    async def close(self) -> None:
        self.calls.append("close")


def test_a_host_with_a_router_runs_the_controller_it_is_given() -> None:
    made: list[_RecordingController] = []

    def factory(host: Host, router: tuple[str, int]) -> _RecordingController:
        made.append(_RecordingController(host, router))
        return made[-1]

    async def main() -> None:
        host = Host(["127.0.0.1:0"], router="127.0.0.1:9,127.0.0.1:10", controller=factory)
        async with host:
            assert len(made) == 1 and made[0].host is host
            assert made[0].router == ("127.0.0.1", 9)  # the first of the routers
            assert host.controller is made[0]
            assert made[0].calls == ["start"]
        assert made[0].calls == ["start", "close"]

    asyncio.run(main())


def test_a_host_without_a_router_makes_no_controller() -> None:
    made: list[_RecordingController] = []

    def factory(host: Host, router: tuple[str, int]) -> _RecordingController:
        made.append(_RecordingController(host, router))
        return made[-1]

    async def main() -> None:
        async with Host(["127.0.0.1:0"], controller=factory) as host:
            assert host.controller is None
        assert made == []

    asyncio.run(main())


def test_by_default_a_host_with_a_router_runs_the_control_planes_controller() -> None:
    async def main() -> None:
        async with (
            Router("127.0.0.1:0") as router,
            Host(["127.0.0.1:0"], router=router.address_text) as host,
        ):
            assert isinstance(host.controller, HostServiceController)
            listener = await host.listen("parts-default")
            for _ in range(200):  # the registration reaches the router
                if router.registry.instances:
                    break
                await asyncio.sleep(0.01)
            assert [a for g in router.registry.instances.values() for a in g] == host.addresses
            await listener.aclose()

    asyncio.run(main())


def test_no_controller_is_installed_at_import_time() -> None:
    assert not hasattr(runtime_host, "install_controller_factory")
    assert not hasattr(pyserval, "install_controller_factory")
    assert runtime_host.default_controller() is HostServiceController


def test_send_datagram_delivers_one_datagram_to_a_bound_socket() -> None:
    async def main() -> None:
        async with Host(["127.0.0.1:0"]) as server, Host(["127.0.0.1:0"]) as client:
            client.add_route("parts-dgram", "{}:{}".format(*server.addresses[0]))
            got: asyncio.Queue[DatagramReceived] = asyncio.Queue()

            def on_event(event: Event) -> None:
                if isinstance(event, DatagramReceived):
                    got.put_nowait(event)

            ep = server.bind_datagram("parts-dgram")
            server.watch(ep.flowid, on_event)
            mine = client.bind_datagram("parts-sender", register=False)
            client.send_datagram(mine, "parts-dgram", b"one datagram")
            event = await asyncio.wait_for(got.get(), 5)
            assert event.data == b"one datagram"
            assert event.address == client.addresses[0]
            # A reply straight to where it came from (``to``), not through the table.
            back: asyncio.Queue[bytes] = asyncio.Queue()
            client.watch(
                mine.flowid,
                lambda e: back.put_nowait(e.data) if isinstance(e, DatagramReceived) else None,
            )
            assert event.source_service is not None
            server.send_datagram(ep, event.source_service, b"reply", to=event.address)
            assert await asyncio.wait_for(back.get(), 5) == b"reply"

    asyncio.run(main())

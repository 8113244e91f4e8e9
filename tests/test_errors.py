"""Every error path raises the class ``pyserval.errors`` documents for it.

Each test provokes one failure on real loopback hosts (or on the sans-I/O layer, where
that is where it happens) and checks the exact class with ``pytest.raises`` and
``type(...) is``, and that it is also each base the hierarchy promises (so code written for
``ConnectionError``/``TimeoutError``/anyio streams keeps catching it).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Coroutine
from typing import cast

import anyio
import pytest

import pyserval
from pyserval import errors
from pyserval.core.host import HostCore
from pyserval.runtime.host import Host
from pyserval.runtime.streams import ServalStream
from pyserval.sal import ControlExt, ControlFlags, Rule, SalPacket, decode_packet
from pyserval.sal.flow_table import FlowTable
from pyserval.sal.inet import Address
from pyserval.transport.reasons import CloseReason, MigrationReason, close_reason

# The hierarchy as errors.py's docstring draws it: class -> the bases it must have.
DOCUMENTED: dict[type[BaseException], tuple[type[BaseException], ...]] = {
    errors.ServalError: (Exception,),
    errors.ServalConnectError: (errors.ServalError, ConnectionError),
    errors.ServalConnectUnreachable: (errors.ServalConnectError, ConnectionError),
    errors.ServalConnectRefused: (errors.ServalConnectError, ConnectionRefusedError),
    errors.ServalConnectTimeout: (errors.ServalConnectError, TimeoutError),
    errors.ServalMigrationError: (errors.ServalError,),
    errors.ConnectionStateError: (errors.ServalError,),
    errors.NoRoute: (errors.ServalError,),
    errors.DatagramTooLarge: (errors.ServalError, ValueError),
    errors.FlowTableFull: (errors.ServalError, RuntimeError),
    errors.HostClosed: (errors.ServalError, RuntimeError),
    errors.SocketClosed: (errors.ServalError, OSError),
    pyserval.ServalSecurityError: (errors.ServalConnectError,),
}


def _exactly(info: pytest.ExceptionInfo[BaseException], cls: type[BaseException]) -> None:
    assert type(info.value) is cls, f"{type(info.value).__name__} raised, not {cls.__name__}"
    for base in DOCUMENTED[cls]:
        assert isinstance(info.value, base), (cls, base)


def _run(main: Callable[[], Coroutine[object, object, None]]) -> None:
    asyncio.run(main())


def test_hierarchy_is_exported_and_old_names_still_import() -> None:
    for cls, bases in DOCUMENTED.items():
        assert getattr(pyserval, cls.__name__) is cls
        for base in bases:
            assert issubclass(cls, base)
    # The old homes re-export the same classes (not copies that an except would miss).
    from pyserval.core.host import NoRoute
    from pyserval.runtime.host import HostClosed
    from pyserval.runtime.socket import SocketClosed
    from pyserval.runtime.streams import (
        ServalConnectError,
        ServalConnectTimeout,
        ServalMigrationError,
    )
    from pyserval.sal.flow_table import FlowTableFull
    from pyserval.transport.connection import ConnectionError_
    from pyserval.transport.datagram_flow import DatagramTooLarge

    assert (NoRoute, HostClosed, SocketClosed, FlowTableFull, DatagramTooLarge) == (
        errors.NoRoute,
        errors.HostClosed,
        errors.SocketClosed,
        errors.FlowTableFull,
        errors.DatagramTooLarge,
    )
    assert (ServalConnectError, ServalConnectTimeout, ServalMigrationError) == (
        errors.ServalConnectError,
        errors.ServalConnectTimeout,
        errors.ServalMigrationError,
    )
    assert ConnectionError_ is errors.ConnectionStateError


def test_reason_enums_keep_the_old_strings() -> None:
    # Log lines and metrics labels spelled these before the enums: they must not change.
    assert [r.value for r in MigrationReason] == ["migrated", "peer_moved", "rebinding"]
    assert close_reason("reset by peer") is CloseReason.RESET_BY_PEER
    assert close_reason("timed out: idle") is CloseReason.TIMED_OUT
    assert close_reason("protocol violation: bad ack") is CloseReason.PROTOCOL_VIOLATION
    assert close_reason("service unreachable: port from 127.0.0.1:9") is (
        CloseReason.SERVICE_UNREACHABLE
    )
    assert close_reason(None) is None and close_reason("something new") is None


def test_connect_without_route_is_unreachable() -> None:
    async def main() -> None:
        async with Host(["127.0.0.1:0"]) as client:
            with pytest.raises(errors.ServalConnectUnreachable, match="no route") as info:
                await client.connect("nobody")
            _exactly(info, errors.ServalConnectUnreachable)

    _run(main)


def test_connect_to_a_dead_port_is_unreachable() -> None:
    async def main() -> None:
        async with Host(["127.0.0.1:0"]) as client:
            probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            probe.bind(("127.0.0.1", 0))
            dead = probe.getsockname()
            probe.close()  # the kernel answers port unreachable
            client.add_route("gone", "{}:{}".format(*dead))
            with pytest.raises(errors.ServalConnectUnreachable) as info:
                await client.connect("gone", timeout=10)
            _exactly(info, errors.ServalConnectUnreachable)

    _run(main)


def test_connect_without_answer_times_out() -> None:
    async def main() -> None:
        async with Host(["127.0.0.1:0"]) as client:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as hole:
                hole.bind(("127.0.0.1", 0))  # bound, never read: no answer, no ICMP
                client.add_route("silent", "{}:{}".format(*hole.getsockname()))
                with pytest.raises(errors.ServalConnectTimeout) as info:
                    await client.connect("silent", timeout=0.3)
                _exactly(info, errors.ServalConnectTimeout)

    _run(main)


class _Refuser(asyncio.DatagramProtocol):
    """A peer that answers every SYN with a RST echoing its nonce and version number, as
    a host without the flow answers (the SAL spec's stateless RST)."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)  # asyncio's own type

    def datagram_received(self, data: bytes, addr: Address) -> None:
        pkt = decode_packet(data)
        ctl = pkt.control
        if ctl is None or not ctl.flags & ControlFlags.SYN or self.transport is None:
            return
        rst = ControlExt(ControlFlags.RST, ctl.verno, 0, ctl.nonce)
        answer = SalPacket(0, pkt.src_flowid, pkt.protocol, [rst])
        self.transport.sendto(answer.encode("127.0.0.1", addr[0]), addr)


def test_connect_reset_by_the_peer_is_refused() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(_Refuser, local_addr=("127.0.0.1", 0))
        try:
            async with Host(["127.0.0.1:0"]) as client:
                client.add_route("refusing", "{}:{}".format(*transport.get_extra_info("sockname")))
                with pytest.raises(errors.ServalConnectRefused, match="reset by peer") as info:
                    await client.connect("refusing", timeout=5)
                _exactly(info, errors.ServalConnectRefused)
        finally:
            transport.close()

    _run(main)


async def _pair(
    server: Host, client: Host, service: str
) -> tuple[ServalStream, ServalStream, asyncio.Task[None]]:
    listener = await server.listen(service)
    accepted: asyncio.Queue[ServalStream] = asyncio.Queue()

    async def accept() -> None:
        accepted.put_nowait(await listener.accept())

    task = asyncio.ensure_future(accept())
    client.add_route(service, "{}:{}".format(*server.addresses[0]))
    stream = await client.connect(service)
    return stream, await asyncio.wait_for(accepted.get(), 5), task


def test_stream_errors_follow_anyio() -> None:
    async def main() -> None:
        async with Host(["127.0.0.1:0"]) as server, Host(["127.0.0.1:0"]) as client:
            stream, peer, _ = await _pair(server, client, "anyio-errors")
            await stream.send(b"one")
            await stream.send_eof()
            # After our own send_eof: closed (it leaked ConnectionError_ before).
            with pytest.raises(anyio.ClosedResourceError) as closed:
                await stream.send(b"two")
            assert type(closed.value) is anyio.ClosedResourceError
            await stream.send_eof()  # again: nothing to do, no error
            assert await peer.receive() == b"one"
            with pytest.raises(anyio.EndOfStream) as end:
                await peer.receive()
            assert type(end.value) is anyio.EndOfStream
            # The peer resets: the connection is lost, so our stream is broken.
            await peer.abort()
            with pytest.raises(anyio.BrokenResourceError) as broken:
                await asyncio.wait_for(stream.receive(), 5)
            assert type(broken.value) is anyio.BrokenResourceError
            with pytest.raises(anyio.BrokenResourceError):
                await stream.send(b"three")
            # After our own close: closed, whatever the connection did.
            await stream.aclose()
            with pytest.raises(anyio.ClosedResourceError):
                await stream.send(b"four")
            with pytest.raises(anyio.ClosedResourceError):
                await stream.receive()

    _run(main)


def test_datagram_stream_send_after_send_eof_is_closed() -> None:
    async def main() -> None:
        async with Host(["127.0.0.1:0"]) as server, Host(["127.0.0.1:0"]) as client:
            listener = await server.listen("dg-errors", kind="datagram")
            client.add_route("dg-errors", "{}:{}".format(*server.addresses[0]))
            flow = await client.connect("dg-errors", kind="datagram")
            await flow.send_eof()
            with pytest.raises(anyio.ClosedResourceError) as closed:
                await flow.send(b"late")
            assert type(closed.value) is anyio.ClosedResourceError
            await flow.aclose()
            with pytest.raises(anyio.ClosedResourceError):
                await flow.send(b"later")
            await listener.aclose()

    _run(main)


def test_datagram_errors_no_route_and_too_large() -> None:
    async def main() -> None:
        async with Host(["127.0.0.1:0"]) as host:
            sock = host.socket("datagram")
            with pytest.raises(errors.NoRoute) as no_route:
                await sock.sendto(b"x", "nowhere")
            _exactly(no_route, errors.NoRoute)
            host.add_route("somewhere", "127.0.0.1:9")
            with pytest.raises(errors.DatagramTooLarge) as large:
                await sock.sendto(bytes(70000), "somewhere")
            _exactly(large, errors.DatagramTooLarge)
            await sock.close()
            with pytest.raises(errors.SocketClosed) as closed:
                await sock.sendto(b"x", "somewhere")
            _exactly(closed, errors.SocketClosed)

    _run(main)


def test_closed_host_cannot_start_again() -> None:
    async def main() -> None:
        host = await Host(["127.0.0.1:0"]).start()
        await host.close()
        with pytest.raises(errors.HostClosed) as info:
            await host.start()
        _exactly(info, errors.HostClosed)

    _run(main)


def test_migration_to_an_unknown_interface_fails() -> None:
    async def main() -> None:
        async with Host(["127.0.0.1:0"]) as server, Host(["127.0.0.1:0"]) as client:
            stream, _, _ = await _pair(server, client, "migrate-errors")
            with pytest.raises(errors.ServalMigrationError) as info:
                await stream.migrate("127.0.0.1:1", timeout=1)
            _exactly(info, errors.ServalMigrationError)

    _run(main)


def test_flow_table_full() -> None:
    table: FlowTable[object] = FlowTable(max_flows=1)
    table.add(object())
    with pytest.raises(errors.FlowTableFull) as info:
        table.allocate()
    _exactly(info, errors.FlowTableFull)


def test_connect_past_max_flows_is_flow_table_full() -> None:
    core = HostCore([("10.0.0.1", 54324)], max_flows=1)
    core.service_table.add("full", Rule.forward(("10.0.0.2", 54325)))
    core.connect("full", 0.0)  # takes the one flowID
    with pytest.raises(errors.FlowTableFull) as info:
        core.connect("full", 0.0)
    _exactly(info, errors.FlowTableFull)


def test_connection_used_after_shutdown_is_a_state_error() -> None:
    async def main() -> None:
        async with Host(["127.0.0.1:0"]) as server, Host(["127.0.0.1:0"]) as client:
            stream, _, _ = await _pair(server, client, "state-errors")
            conn = stream.connection  # the sans-I/O layer underneath, used directly
            conn.shutdown()
            with pytest.raises(errors.ConnectionStateError) as info:
                conn.write(b"x")
            _exactly(info, errors.ConnectionStateError)

    _run(main)

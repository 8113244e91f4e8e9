"""The sans-I/O control plane: the host's controller and the router's registry."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from typing import Any

from pyserval.control import (
    AckMessage,
    ControllerCore,
    MessageKind,
    RegisterMessage,
    Registration,
    RegistrationGuard,
    Registry,
    UnregisterMessage,
    decode_message,
    encode_message,
)
from pyserval.naming import ServiceID, ServiceKey, ServicePrefix
from pyserval.runtime.service_events import ServiceEvent, ServiceEventKind
from pyserval.sal import Action, ServiceTable

WALL = 1_800_000_000.0
A = ("10.0.0.1", 54325)
B = ("10.0.0.2", 54325)
C = ("10.0.0.3", 54325)


def _reg(service: str, **kw: object) -> Registration:
    return Registration.make(service, now=WALL, nonce=os.urandom(16), **kw)  # type: ignore[arg-type]


def _register(
    registry: Registry, src: tuple[str, int], *regs: Registration, now: float = 0.0
) -> AckMessage:
    return registry.handle(RegisterMessage(seq=1, registrations=list(regs)), src, now, WALL)


def test_weighted_instances_become_one_forward_rule_per_priority() -> None:
    table = ServiceTable()
    registry = Registry(table)
    for addr, weight in ((A, 1), (B, 3)):
        assert _register(registry, addr, _reg("echo", weight=weight)).results[0].ok
    _register(registry, C, _reg("echo", priority=5))
    entry = table.match(ServiceID.from_name("echo"))
    assert entry is not None and len(entry.rules) == 2
    # The higher priority group wins: C alone until it leaves.
    assert {table.lookup("echo").target.address for _ in range(50)} == {C}  # type: ignore[union-attr]
    un = Registration.make("echo", now=WALL, nonce=os.urandom(16), op=MessageKind.UNREGISTER)
    assert registry.handle(UnregisterMessage(seq=2, registrations=[un]), C, 0.0, WALL).results[0].ok
    picks = Counter(table.lookup("echo").target.address for _ in range(4000))  # type: ignore[union-attr]
    assert set(picks) == {A, B} and 2.4 < picks[B] / picks[A] < 3.8
    assert len(registry) == 2


def test_expiry_refresh_and_unreachable() -> None:
    table = ServiceTable()
    registry = Registry(table)
    _register(registry, A, _reg("echo", ttl=1.0), now=0.0)
    _register(registry, B, _reg("echo", ttl=1.0), now=0.0)
    assert registry.next_deadline() == 1.0
    _register(registry, A, _reg("echo", ttl=1.0), now=0.8)  # A refreshes, B does not
    assert registry.expire(0.9) == []
    assert registry.expire(1.0) == [(ServicePrefix.parse(str(_reg("echo").prefix)), B)]
    assert registry.next_deadline() == 1.8
    assert registry.remove_address(A) == 1
    assert table.match(ServiceID.from_name("echo")) is None and len(registry) == 0
    assert registry.next_deadline() is None


def test_refused_registrations_change_nothing() -> None:
    key = ServiceKey.generate()
    sid = key.service_id("ab00/16")
    table = ServiceTable()
    registry = Registry(table, RegistrationGuard(certified_prefixes=["ab00/16"]))
    forged = _reg(sid.hex)  # no key
    ack = _register(registry, A, forged)
    assert not ack.results[0].ok and ack.results[0].reason == "key_required"
    thief = ServiceKey.generate()
    bad = Registration.make(thief.service_id("ab00/16"), now=WALL, nonce=os.urandom(16), key=thief)
    ack = _register(
        registry, A, bad.model_copy(update={"service": str(ServicePrefix.parse(sid.hex + "/256"))})
    )
    assert not ack.results[0].ok
    claim = _reg("echo", address="10.9.9.9:54325")
    assert _register(registry, A, claim).results[0].reason == "address_mismatch"
    assert len(table) == 0 and len(registry) == 0
    good = Registration.make(sid, now=WALL, nonce=os.urandom(16), key=key)
    assert _register(registry, A, good).results[0].ok
    assert table.lookup(sid).action is Action.FORWARD  # type: ignore[union-attr]


def test_controller_registers_refreshes_and_unregisters_until_acked() -> None:
    ctl = ControllerCore(ttl=1.0)
    registry = Registry(ServiceTable())
    echo = ServicePrefix.parse(ServiceID.from_name("echo").hex + "/256")
    ctl.on_service_event(ServiceEvent(ServiceEventKind.REGISTER, echo, weight=2), now=0.0)
    (msg,) = ctl.poll(0.0, WALL)
    reg = decode_message(msg)
    assert isinstance(reg, RegisterMessage) and reg.registrations[0].weight == 2
    assert ctl.poll(0.1, WALL) == [] and ctl.next_deadline() == 0.25
    ack = registry.handle(reg, A, 0.0, WALL)
    ctl.on_datagram(encode_message(ack))
    assert echo in ctl.accepted
    assert len(ctl.poll(0.25, WALL)) == 1  # the refresh
    ctl.on_service_event(ServiceEvent(ServiceEventKind.UNREGISTER, echo), now=0.3)
    (first,) = ctl.poll(0.3, WALL)
    assert isinstance(decode_message(first), UnregisterMessage)
    assert ctl.poll(0.4, WALL) == [] and ctl.next_deadline() is not None
    (again,) = ctl.poll(0.5, WALL)  # not acknowledged: sent again after 0.2 s
    unreg = decode_message(again)
    assert isinstance(unreg, UnregisterMessage)
    ctl.on_datagram(encode_message(registry.handle(unreg, A, 0.5, WALL)))
    assert not ctl.leaving and ctl.next_deadline() is None and len(registry) == 0


def test_controller_gives_up_on_a_silent_router() -> None:
    ctl = ControllerCore(ttl=1.0, max_tries=3)
    echo = ServicePrefix.parse(ServiceID.from_name("echo").hex + "/256")
    ctl.on_service_event(ServiceEvent(ServiceEventKind.REGISTER, echo), now=0.0)
    ctl.poll(0.0, WALL)
    ctl.on_service_event(ServiceEvent(ServiceEventKind.UNREGISTER, echo), now=0.0)
    sent = 0
    now = 0.0
    while ctl.next_deadline() is not None and now < 10:
        now = ctl.next_deadline() or now
        sent += len(ctl.poll(now, WALL))
    assert sent == 3 and ctl.stats["unregister_gave_up"] == 1


def test_a_hosts_own_table_can_be_inspected() -> None:
    import asyncio

    from pyserval import Host, fetch_table
    from pyserval.control import enable_inspection

    async def main() -> None:
        async with Host(["127.0.0.1:0"]) as host:
            host.add_route("db", "127.0.0.1:9")
            enable_inspection(host)
            await host.listen("echo")
            dump = await fetch_table(host.addresses[0])
            actions = {e.prefix: e.action for e in dump.entries}
            echo = str(ServicePrefix.parse(ServiceID.from_name("echo").hex + "/256"))
            db = str(ServicePrefix.parse(ServiceID.from_name("db").hex + "/256"))
            assert actions[echo] == "demux" and actions[db] == "forward"
            assert "packets_received" in dump.counters

    asyncio.run(main())


def _read_while_changing(change: Callable[[Any], None]) -> tuple[list[str], set[str], int]:
    """Read a host's table of 2 pages and 10 entries with ``fetch_table`` while
    ``change(host)`` runs once, just after the first page was answered; return the
    prefixes read, those present for the whole read, and how many pages were asked."""
    import asyncio

    from pyserval import Host, fetch_table
    from pyserval.control import enable_inspection
    from pyserval.control.messages import TABLE_PAGE

    async def main() -> tuple[list[str], set[str], int]:
        async with Host(["127.0.0.1:0"]) as host:
            for i in range(2 * TABLE_PAGE + 10):
                host.add_route(f"svc-{i}", "127.0.0.1:9")
            service = enable_inspection(host)
            entries = service.entries
            before = {str(e.prefix) for e in host.service_table}
            calls = 0

            def changing() -> list[Any]:
                nonlocal calls
                calls += 1
                if calls == 2:
                    change(host)
                return entries()

            service.entries = changing  # type: ignore[method-assign]
            dump = await fetch_table(host.addresses[0])
            throughout = before & {str(e.prefix) for e in host.service_table}
            return [e.prefix for e in dump.entries], throughout, calls

    return asyncio.run(main())


def test_a_table_that_shrinks_between_pages_is_read_again_without_a_skip() -> None:
    def shrink(host: Any) -> None:
        # The first ten entries go (they expired): everything behind them moves ten
        # places towards the start, across a page boundary.
        for entry in list(host.service_table)[:10]:
            host.service_table.remove(entry.prefix)

    got, throughout, calls = _read_while_changing(shrink)
    assert len(got) == len(set(got)) == len(throughout) and set(got) == throughout
    assert calls > 3  # read again from the start


def test_a_table_that_keeps_its_size_but_shifts_between_pages_is_read_without_a_skip() -> None:
    from pyserval.control.messages import TABLE_PAGE

    def shift(host: Any) -> None:
        # One entry before the page boundary expires and one is registered after it: the
        # size is the same, but every entry between them moved one place towards the
        # start, across the boundary.
        table = list(host.service_table)
        host.service_table.remove(table[3].prefix)
        host.add_route(ServiceID(table[TABLE_PAGE + 50].prefix.value + 1), "127.0.0.1:9")

    got, throughout, calls = _read_while_changing(shift)
    assert len(got) == len(set(got))  # none twice
    assert throughout <= set(got)  # every entry present all along
    assert calls > 3  # read again from the start

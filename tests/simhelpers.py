"""Helpers that drive sans-I/O hosts over the simulated network in tests."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from pyserval.core.host import HostCore, Listener
from pyserval.sal import Rule
from pyserval.testing import LinkConfig, SimNetwork
from pyserval.transport.config import StreamConfig
from pyserval.transport.connection import Connection, State

A = ("10.0.0.1", 54324)
B = ("10.0.0.2", 54325)


@dataclass
class Pair:
    """A client host ``a`` and a server host ``b`` on one simulated network."""

    net: SimNetwork
    a: HostCore
    b: HostCore
    listener: Listener
    client: Connection | None = None
    server: Connection | None = None
    extra: dict[str, object] = field(default_factory=dict)

    def connect(self, timeout: float = 600.0) -> None:
        """Connect a -> b ("echo") and wait for both ends."""
        self.client = self.a.connect("echo", self.net.now)
        self.net.kick(self.a)

        def ready() -> bool:
            if self.server is None:
                self.server = self.listener.accept()
            return (
                self.server is not None
                and self.client is not None
                and (self.client.state is State.ESTABLISHED)
            )

        assert self.net.run_until(ready, timeout), "handshake did not complete"


def make_pair(
    seed: int = 1,
    link: LinkConfig | None = None,
    config: StreamConfig | None = None,
    server_config: StreamConfig | None = None,
    **net_options: Any,
) -> Pair:
    """Two hosts with a static route a -> b for the service "echo" (``net_options``: for
    the :class:`SimNetwork`, such as ``trace``, ``gso`` and ``gro``)."""
    net = SimNetwork(seed=seed, default_link=link or LinkConfig(delay=0.005), **net_options)
    a = HostCore([A], rng=random.Random(seed), config=config)
    b = HostCore([B], rng=random.Random(seed + 1000), config=server_config or config)
    net.attach(a, A)
    net.attach(b, B)
    a.service_table.add("echo", Rule.forward(B))
    return Pair(net, a, b, b.listen("echo"))


# Both ends asking for the compact close (StreamConfig.compact_close, opt-in).
COMPACT = StreamConfig(compact_close=True)


def make_compact_pair(
    seed: int = 1,
    link: LinkConfig | None = None,
    config: StreamConfig | None = None,
    server_config: StreamConfig | None = None,
    **net_options: Any,
) -> Pair:
    """:func:`make_pair` with both ends asking for the compact close, unless a config is
    given (then as that config says: one given without it leaves it off)."""
    config = config or COMPACT
    return make_pair(seed, link, config, server_config or config, **net_options)


class Flow:
    """Pumps one direction: writes ``data`` into ``src`` and collects it from ``dst``."""

    def __init__(self, src: Connection, dst: Connection, data: bytes, chunk: int = 65536) -> None:
        self.src, self.dst, self.data, self.chunk = src, dst, data, chunk
        self.sent = 0
        self.got = bytearray()

    def step(self) -> None:
        while self.sent < len(self.data):
            n = self.src.write(self.data[self.sent : self.sent + self.chunk])
            self.sent += n
            if n == 0:
                break
        if self.sent == len(self.data) and self.src.fin_offset is None:
            self.src.shutdown()
        self.got += self.dst.read()

    @property
    def done(self) -> bool:
        return self.dst.at_eof and len(self.got) == len(self.data)


def exchange(pair: Pair, up: bytes, down: bytes, timeout: float = 3600.0, dt: float = 0.05) -> None:
    """Send ``up`` client->server and ``down`` server->client at once, then close both."""
    assert pair.client is not None and pair.server is not None
    flows = [Flow(pair.client, pair.server, up), Flow(pair.server, pair.client, down)]
    net = pair.net
    deadline = net.now + timeout
    while net.now < deadline:
        for f in flows:
            f.step()
        net.kick(pair.a, pair.b)
        if all(f.done for f in flows):
            break
        net.run_for(dt)
    for f in flows:
        assert f.done, f"transfer incomplete: {len(f.got)} of {len(f.data)} bytes"
        assert bytes(f.got) == f.data, "data corrupted"

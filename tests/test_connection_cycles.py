"""A finished connection is freed by reference counting, and stays readable while held.

The host's forgetting a connection (closed, or replaced by a TIME_WAIT record) makes its
parts' back references weak (``Connection.unlink_parts``): nothing of it is left for the
cyclic garbage collector. Checked with the collector switched off, so that only
reference counting can free anything.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from pyserval.transport.config import StreamConfig
from pyserval.transport.connection import Connection, State

from .simhelpers import Pair, make_pair


@pytest.fixture
def no_collector() -> Iterator[None]:
    was = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _close_both(time_wait: float) -> tuple[Connection, Connection, Pair]:
    """A connection opened and closed both ways (the server first: it gets TIME_WAIT)."""
    pair = make_pair(config=StreamConfig(time_wait=time_wait))
    pair.connect()
    client, server = pair.client, pair.server
    assert client is not None and server is not None
    server.shutdown()
    pair.net.kick(pair.b)
    assert pair.net.run_until(lambda: client.at_eof, 60)
    client.shutdown()
    pair.net.kick(pair.a)
    assert pair.net.run_until(lambda: client.closed and server.state is not State.ESTABLISHED, 60)
    return client, server, pair


def test_closed_connections_need_no_collector(no_collector: None) -> None:
    client, server, pair = _close_both(time_wait=0.5)
    assert client.closed
    assert server.state is State.TIME_WAIT  # a record stands for it in the host
    objects = [client, server, client.primary, server.primary]
    refs = [weakref.ref(o) for o in objects]
    pair.client = pair.server = None
    del objects, client, server
    # Nothing holds them now but the test's weak references: with the collector off they
    # are gone only if no reference cycle is left.
    assert [r() for r in refs] == [None] * len(refs)
    del pair


def test_forgotten_connection_stays_readable(no_collector: None) -> None:
    client, server, pair = _close_both(time_wait=0.5)
    for conn in (client, server):
        sf = conn.primary
        # The parts still reach their connection while the application holds it.
        assert sf.conn.conn_id == conn.conn_id
        assert sf.conn.state is conn.state
        assert conn.flows.conn.conn_id == conn.conn_id
        assert conn.flows.paths == [(sf.local_addr, sf.remote_addr)]
        assert sf.wire_ack() == (sf.irs + 1 + conn.recv.rcv_nxt + 1) & 0xFFFFFFFF
    with pytest.raises(Exception, match="closed"):
        client.write(b"late")
    # The TIME_WAIT record ends and tells the held server object it is CLOSED.
    pair.net.run_for(1.0)
    assert server.closed


def test_live_connection_keeps_strong_parts() -> None:
    # Before the end nothing is weak: a subflow's connection is the object itself.
    pair = make_pair()
    pair.connect()
    assert pair.client is not None
    assert pair.client.primary.conn is pair.client
    assert pair.client.flows.conn is pair.client

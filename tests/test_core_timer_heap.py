"""The host's one timer heap stays the size of its live connections.

A stale entry (its connection re-armed or went away) is dropped lazily, when it comes to
the top. A short connection leaves one behind at its keepalive deadline, 15 s ahead; when
an earlier entry stays on top (a connection that lives on, or the next one already
opening, as on a busy host), such entries pile up under it, and every push and pop of the
heap goes a level deeper per doubling.
"""

from __future__ import annotations

from pyserval.transport.config import StreamConfig

from .simhelpers import exchange, make_pair


def test_short_connections_beside_a_long_one_leave_no_growing_timer_heap() -> None:
    pair = make_pair(config=StreamConfig(time_wait=0.01))
    pair.connect()  # lives on, idle: its keepalive entry stays first
    long_lived = (pair.client, pair.server)
    largest = 0
    for _ in range(300):
        pair.client = pair.server = None
        pair.connect()
        exchange(pair, b"", b"", dt=0.005)  # both close at once
        largest = max(largest, len(pair.a._timers), len(pair.b._timers))
    assert pair.net.now < 15.0  # no keepalive deadline came due
    assert all(c is not None and not c.closed for c in long_lived)
    # 300 connections, at most two open at a time: not an entry (or two) per connection.
    assert largest < 100, largest

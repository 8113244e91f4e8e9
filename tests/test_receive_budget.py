"""A host's receive budget (transport/receive_budget.py): what all its connections'
windows promise at once stays within one socket buffer, the window's right edge never
moves back (RFC 9293 3.8.6.2.2), and idle connections cost the busy ones nothing."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

import pytest

import pyserval
from pyserval.core.host import HostCore
from pyserval.sal import Rule, decode_packet
from pyserval.sal.transport_headers import TcpFlags
from pyserval.testing import LinkConfig, SimNetwork
from pyserval.transport.config import StreamConfig
from pyserval.transport.connection import Connection, State
from pyserval.transport.receive_budget import ReceiveBudget, budget_for

from .simhelpers import A, B

MSS = 1408


@dataclass
class Counted:
    budget_epoch: int = 0


# -- the arithmetic -----------------------------------------------------------------------


def test_the_share_is_the_total_over_the_receiving_connections() -> None:
    budget = ReceiveBudget(1_000_000)
    budget.tick(0.0)
    conns = [Counted() for _ in range(4)]
    assert budget.share == 1_000_000
    for n, conn in enumerate(conns, 1):
        budget.count(conn)
        budget.count(conn)  # once per epoch, however often it advertises
        assert budget.receiving == n and budget.share == 1_000_000 // n


def test_an_epoch_keeps_the_last_ones_count_until_it_is_passed() -> None:
    budget = ReceiveBudget(1_000_000, interval=0.1)
    budget.tick(0.0)
    busy = [Counted() for _ in range(4)]
    for conn in busy:
        budget.count(conn)
    budget.tick(0.05)  # within the epoch: nothing changes
    assert budget.epoch == 1 and budget.share == 250_000
    budget.tick(0.1)
    # A new epoch: still a quarter each (last epoch had four) while they come back.
    assert budget.epoch == 2 and budget.receiving == 0 and budget.share == 250_000
    budget.count(busy[0])
    assert budget.share == 250_000
    # Only one came back in that epoch: the next one gives it everything.
    budget.tick(0.2)
    assert budget.share == 1_000_000


def test_an_idle_epoch_gives_the_whole_budget() -> None:
    budget = ReceiveBudget(500, interval=1.0)
    budget.tick(0.0)
    budget.count(Counted())
    budget.count(Counted())
    budget.tick(1.0)
    budget.tick(2.0)
    assert budget.share == 500


@pytest.mark.parametrize(("total", "interval"), [(0, 0.1), (100, 0.0), (100, -1.0)])
def test_a_budget_must_be_positive(total: int, interval: float) -> None:
    with pytest.raises(ValueError):
        ReceiveBudget(total, interval)


def test_the_budget_for_a_socket_is_five_eighths_of_what_linux_reports() -> None:
    # Linux reports 8 MiB for the 4 MiB the runtime asks for.
    assert budget_for(8 << 20) == 5 << 20
    assert budget_for(1) == 1


# -- over the simulated network -----------------------------------------------------------


def _hosts(total: int | None, uploads: int, seed: int = 3) -> tuple[SimNetwork, HostCore, HostCore]:
    cfg = StreamConfig(send_buffer=1 << 20, receive_buffer=1 << 20)
    net = SimNetwork(seed=seed, default_link=LinkConfig(delay=0.002), trace=True)
    client = HostCore([A], rng=random.Random(seed), config=cfg)
    server = HostCore([B], rng=random.Random(seed + 1), config=cfg)
    if total is not None:
        server.receive_budget = ReceiveBudget(total)
    net.attach(client, A)
    net.attach(server, B)
    client.service_table.add("up", Rule.forward(B))
    return net, client, server


def _open(
    net: SimNetwork, client: HostCore, server: HostCore, n: int
) -> list[tuple[Connection, Connection]]:
    listener = server.listen("up", backlog=n)
    conns = [client.connect("up", net.now) for _ in range(n)]
    net.kick(client)
    accepted: list[Connection] = []

    def ready() -> bool:
        while (conn := listener.accept()) is not None:
            accepted.append(conn)
        return len(accepted) == n and all(c.state is State.ESTABLISHED for c in conns)

    assert net.run_until(ready, 30)
    by_peer = {c.primary.remote_flowid: c for c in accepted}
    return [(c, by_peer[c.primary.local_flowid]) for c in conns]


def _promised(server_conns: list[Connection]) -> int:
    """Bytes the server's windows let its peers send now: the right edges it advertised
    beyond what arrived (kept only under a budget)."""
    return sum(max(0, c.primary.adv_edge - c.recv.rcv_nxt) for c in server_conns)


def _upload(
    total: int | None, n: int, size: int
) -> tuple[int, SimNetwork, HostCore, list[Connection]]:
    """``n`` uploads of ``size`` bytes at once, checked; the most the server's windows
    offered at once once every upload had taken 64 KiB (its first window, advertised
    while the others were still being counted): with a budget what they promised, else
    the sum of the windows last advertised (sampled at every event)."""
    net, client, server = _hosts(total, n)
    pairs = _open(net, client, server, n)
    data = [random.Random(i).randbytes(size) for i in range(n)]
    sent = [0] * n
    got = [bytearray() for _ in range(n)]
    downs = [d for _, d in pairs]
    most = 0
    while any(len(g) < size for g in got):
        for i, (up, down) in enumerate(pairs):
            if sent[i] < size:
                sent[i] += up.write(data[i][sent[i] : sent[i] + 65536])
            got[i] += down.read()
        net.kick(client, server)
        for _ in range(50):
            # Event by event, but not into the far future while the uploads wait on this
            # loop to write and read (a GRO batch takes many datagrams in one step).
            at = net.next_event_time()
            if at is None or at > net.now + 0.05:
                net.run_for(0.01)  # nothing soon: time passes while they wait on us
                break
            net.step()
            if min(d.recv.rcv_nxt for d in downs) < 65536:
                continue
            if total is None:
                most = max(most, sum(d.primary.last_adv_window for d in downs))
            else:
                most = max(most, _promised(downs))
        assert net.now < 120, "uploads did not finish"
    assert [bytes(g) for g in got] == data
    return most, net, server, downs


def test_the_windows_of_many_uploads_together_stay_within_the_budget() -> None:
    total = 256 * 1024
    n = 8
    most, *_ = _upload(total, n, 1 << 20)
    # Each advertises at most its share (the total over eight), or two segments if that
    # is more: together at most the budget, or n times two segments.
    assert 0 < most <= max(total, n * 2 * MSS)
    # Without a budget the same uploads are offered up to their whole buffers (1 MiB).
    unbounded, *_ = _upload(None, n, 1 << 20)
    assert unbounded > 4 * total


def test_the_right_edge_of_the_window_never_moves_back() -> None:
    _, net, _, conns = _upload(64 * 1024, 6, 256 * 1024)
    # From every ACK the server sent, the SYN-ACK first: ack + window << scale (never
    # scaled in a SYN), per flow, in order. The SYN-ACKs went out while the share was
    # still shrinking (each connection counts from its own), the later ACKs at the
    # smallest share: what they promised first must be kept.
    scale = {c.primary.local_flowid: c.primary.rcv_wscale for c in conns}
    edges: dict[int, int] = {}
    checked = 0
    for ev in net.trace:
        if ev.fate != "sent" or ev.src != B:
            continue
        pkt = decode_packet(ev.data)
        tcp = pkt.tcp
        if tcp is None or pkt.src_flowid not in scale:
            continue
        shift = 0 if tcp.flags & TcpFlags.SYN else scale[pkt.src_flowid]
        edge = tcp.ack + (tcp.window << shift)
        last = edges.get(pkt.src_flowid)
        if last is not None:
            # 32-bit sequence arithmetic: the new edge is not before the last one.
            assert (edge - last) & 0xFFFFFFFF < 0x80000000, (last, edge)
            checked += 1
        edges[pkt.src_flowid] = edge
    assert checked > 100


def test_idle_connections_do_not_shrink_a_busy_ones_window() -> None:
    total = 512 * 1024
    net, client, server = _hosts(total, 1)
    pairs = _open(net, client, server, 30)  # 30 counted at their SYN-ACKs
    up, down = pairs[0]
    data = random.Random(1).randbytes(4 << 20)
    sent = 0
    while net.now < 1.0 or sent < len(data):  # several epochs of one busy upload
        if sent < len(data):
            sent += up.write(data[sent : sent + 65536])
        down.read()
        net.kick(client, server)
        net.run_for(0.01)
    # The idle 29 stopped counting: the busy one is offered the whole budget again.
    assert down.primary.last_adv_window >= total - 2 * MSS


# -- the runtime ----------------------------------------------------------------------------


def test_a_running_host_budgets_its_sockets_receive_buffer() -> None:
    async def main() -> None:
        async with pyserval.Host(["127.0.0.1:0"]) as host:
            core = host.core
            assert core is not None and core.receive_budget is not None
            rcvbuf = host._driver.endpoints[0].rcvbuf
            # Within what the kernel reports (twice the request), and more than half of it.
            assert rcvbuf // 2 < core.receive_budget.total < rcvbuf
            async with await host.listen("budgeted") as listener:
                ip, port = host.addresses[0]
                host.add_route("budgeted", f"{ip}:{port}")
                client = await host.connect("budgeted")
                server = await listener.accept()
                # A connection made there shares it.
                assert server._conn.budget is core.receive_budget
                await client.aclose()
                await server.aclose()

    asyncio.run(asyncio.wait_for(main(), 10))

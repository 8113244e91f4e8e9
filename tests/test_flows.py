"""The flow manager (transport/flows/): subflows, scheduling, reinjection, migration and
address checks, through its own interface.

Expectations come from the design the modules document (RFC 8684's data-level
retransmission, the RSYN and address-check exchanges of ``shared/spec/sal-wire.md``) and
are written out here as numbers, not recomputed with the code under test.
"""

from __future__ import annotations

import random

from pyserval.naming import ServiceID
from pyserval.sal import ControlExt, ControlFlags, Rule, SalPacket
from pyserval.testing import LinkConfig, SimNetwork
from pyserval.transport.config import StreamConfig
from pyserval.transport.connection import Connection, Role, State, Subflow
from pyserval.transport.events import Event, FlowMigrated, PathAdded, PathFailed
from pyserval.transport.flows import FlowManager, Lia
from pyserval.transport.flows.migration import CHALLENGE, CHALLENGE_TRIES
from pyserval.transport.migration import MigrationState
from pyserval.transport.multipath import SeqTracker
from pyserval.transport.reasons import MigrationReason

from .simhelpers import A, B, make_pair

A2 = ("10.0.0.3", 54324)
B2 = ("10.0.0.4", 54325)
NAT = ("192.0.2.9", 40000)


# -- without a network: a connection built by hand -----------------------------------------


def _mp_conn(n: int = 1) -> tuple[Connection, list[Subflow], list[Event]]:
    """A multipath client connection with ``n`` subflows (keys agreed by hand)."""
    events: list[Event] = []
    cfg = StreamConfig(multipath=True, send_buffer=1 << 20)
    conn = Connection(1, Role.CLIENT, ServiceID.from_name("x"), cfg, events.append)
    rng = random.Random(4)
    subflows = [
        Subflow(conn, 10 + i, (f"10.0.{i}.1", 1000), (f"10.0.{i}.2", 2000), rng) for i in range(n)
    ]
    conn.subflows.append(subflows[0])
    conn.flows.enable_multipath(1111, 2222)
    mp = conn.flows.mp
    assert mp is not None
    for sf in subflows[1:]:  # joined already: what add_subflow and the JOIN handshake leave
        sf.rcv_track = SeqTracker()
        sf.cc = Lia(sf.mss, mp.group)
        conn.subflows.append(sf)
    return conn, subflows, events


def test_the_manager_is_the_connections_and_the_views_agree() -> None:
    conn, (sf0, sf1), _ = _mp_conn(2)
    assert isinstance(conn.flows, FlowManager) and conn.subflows is conn.flows.subflows
    assert conn.flows.paths == [
        (("10.0.0.1", 1000), ("10.0.0.2", 2000)),
        (sf1.local_addr, sf1.remote_addr),
    ]
    sf1.join_state = "syn_sent"  # still joining: carries no data yet
    assert conn.flows.live_subflows() == [sf0]
    assert conn.flows.paths[1] == (("10.0.1.1", 1000), ("10.0.1.2", 2000))


def test_take_resends_reinjected_data_first_and_skips_what_was_delivered() -> None:
    conn, (sf,), _ = _mp_conn(1)
    mp = conn.flows.mp
    assert mp is not None
    assert conn.write(bytes(1000)) == 1000
    mp.snd_nxt = 400  # [0, 400) was given to subflows already
    mp.reinject.append((100, 400))  # ... and [100, 400) was on one given up since
    mp.data_ack = 150  # the peer has everything below 150 meanwhile
    assert conn.flows.take(sf, 200, 10_000) == (150, 200)
    assert conn.flows.take(sf, 200, 10_000) == (350, 50)
    assert not mp.reinject
    # Then new data, from where the scheduler stands, within the peer's window.
    assert conn.flows.take(sf, 200, 10_000) == (400, 200)
    assert conn.flows.take(sf, 200, 650) == (600, 50)
    assert conn.flows.take(sf, 200, 650) is None  # the window is full
    mp.reinject.append((700, 900))
    assert conn.flows.take(sf, 500, 750) == (700, 50)  # reinjection respects it too
    assert conn.flows.take(sf, 500, 750) is None
    assert list(mp.reinject) == [(750, 900)]


def test_a_failed_subflow_hands_its_unacknowledged_ranges_to_the_others() -> None:
    conn, (sf0, sf1), events = _mp_conn(2)
    mp = conn.flows.mp
    assert mp is not None and isinstance(sf1.cc, Lia) and sf1.cc in mp.group.members
    from pyserval.transport.recovery import SentSegment

    # sf1's sequence space: [0, 1000) carried DSN 5000.., [1000, 1500) DSN 9000.., then
    # its DATA_FIN (never reinjected: the FIN goes again on the primary).
    sf1.segments[0] = SentSegment(1000, 0.0, False, 5000)
    sf1.segments[1000] = SentSegment(1500, 0.0, False, 9000)
    sf1.segments[1500] = SentSegment(1501, 0.0, True, 9500)
    assert conn.flows.subflow_failed(sf1) is False  # not the primary
    assert list(mp.reinject) == [(5000, 6000), (9000, 9500)]
    assert conn.subflows == [sf0] and conn.flows.dead_subflows == [sf1]
    assert not sf1.segments and sf1.rto_deadline is None
    assert sf1.cc not in mp.group.members  # no longer coupled
    assert mp.failed == 1
    assert events == [PathFailed(1, ("10.0.1.1", 1000), ("10.0.1.2", 2000))]
    assert conn.flows.subflow_failed(sf0) is None  # the last one is never given up
    assert conn.subflows == [sf0]


def test_data_acks_move_the_right_edge_and_only_new_ones_free_data() -> None:
    conn, _, _ = _mp_conn(1)
    mp = conn.flows.mp
    assert mp is not None
    conn.write(bytes(5000))
    assert conn.flows.on_data_ack(1000, 3000, conn.send.end) is True
    assert (mp.data_ack, mp.snd_right) == (1000, 4000)
    assert conn.flows.on_data_ack(1000, 5000, conn.send.end) is False  # old: no release
    assert mp.snd_right == 6000  # ... but a window update all the same
    assert conn.flows.on_data_ack(900, 9000, conn.send.end) is False  # older: nothing
    assert mp.snd_right == 6000
    assert conn.flows.on_data_ack(6000, 0, conn.send.end) is False  # beyond what we sent


# -- established flows on the simulated network ------------------------------------------


def _pair() -> tuple[Connection, Connection, SimNetwork]:
    p = make_pair()
    p.connect()
    p.net.run_for(0.5)
    assert p.client is not None and p.server is not None
    return p.client, p.server, p.net


def test_a_move_is_refused_while_another_control_exchange_is_open() -> None:
    client, _, net = _pair()
    sf = client.primary
    sf.control.send_reliable(ControlFlags.FIN, net.now)  # e.g. our SAL FIN
    assert client.flows.start_migration(sf, net.now, A2) is False
    assert sf.mig is None and sf.local_addr == A


def test_a_second_move_before_the_answer_sends_no_second_rsyn() -> None:
    client, _, net = _pair()
    sf = client.primary
    verno = sf.control.snd_verno
    assert client.flows.start_migration(sf, net.now, A2)
    assert sf.control.outstanding == ControlFlags.RSYN and sf.control.snd_verno == verno + 1
    assert client.flows.start_migration(sf, net.now, ("10.0.0.5", 54324))  # a change of mind
    assert sf.control.snd_verno == verno + 1  # the same RSYN, sent again from there
    assert sf.local_addr == ("10.0.0.5", 54324)
    assert sf.mig is not None and sf.mig.own_rsyn and sf.frozen


def test_the_peers_rsyn_moves_the_address_and_owes_an_answer() -> None:
    _, server, net = _pair()
    sf = server.primary
    flows = server.flows
    cc = sf.control
    stale = ControlExt(ControlFlags.RSYN, (cc.rcv_ackno + 5) & 0xFFFFFFFF, 0, bytes(8))
    flows.on_rsyn_control(sf, stale, A2, net.now)
    assert cc.ignored == 1 and sf.mig is None and sf.remote_addr == A  # neither next nor last
    rto = sf.rtt.rto
    rsyn = ControlExt(ControlFlags.RSYN, cc.rcv_ackno, 0, bytes(8))
    flows.on_rsyn_control(sf, rsyn, A2, net.now)
    assert sf.remote_addr == A2 and sf.prev_remote == A
    assert sf.prev_remote_until == net.now + 2 * rto  # late packets from A still taken
    assert sf.mig is not None and sf.mig.awaiting_ack and sf.mig.reason == "peer_moved"
    assert flows.rsynack_pending and sf.frozen  # output waits for the mover's ACK
    out: list[SalPacket] = []
    flows.output_control(sf, out)
    (pkt,) = out
    assert pkt.control is not None
    assert pkt.control.flags == ControlFlags.RSYN | ControlFlags.ACK
    assert not flows.rsynack_pending
    flows.on_move_ack(sf, A2, net.now)  # the mover's ACK: the move is done
    assert sf.mig is None and not sf.frozen
    assert server.ack_now  # the transport resumes with an ACK on the new path


def test_an_unanswered_rsynack_is_sent_again_with_doubling_waits_then_given_up() -> None:
    _, server, _ = _pair()
    sf = server.primary
    timers = sf.control.timers
    sf.mig = MigrationState(awaiting_ack=True, reason=MigrationReason.PEER_MOVED)
    sf.mig.rsynack_rto = 0.25
    sf.mig.rsynack_deadline = now = 100.0
    waits = []
    for _ in range(timers.max_retries):
        assert server.flows.migration_timers(sf, now)
        assert server.flows.rsynack_pending
        server.flows.rsynack_pending = False
        assert sf.mig.rsynack_deadline is not None
        waits.append(sf.mig.rsynack_deadline - now)
        now = sf.mig.rsynack_deadline
    expected = [min(0.25 * 2**i, timers.max_rto) for i in range(1, timers.max_retries + 1)]
    assert waits == expected
    assert server.flows.migration_timers(sf, now) is False  # the caller times out


def test_an_address_check_moves_the_flow_only_on_the_right_answer_from_the_candidate() -> None:
    _, server, net = _pair()
    sf = server.primary
    flows = server.flows
    events: list[Event] = []
    server._emit = events.append
    flows.check_address(sf, NAT, 0x0123456789ABCDEF, net.now)
    assert flows.challenge_pending and sf.challenge is not None
    probe = flows.challenge_packet(sf)
    assert probe.control is not None
    # The wire: RSYN+CHALLENGE, the token in the number fields, a zero nonce.
    assert probe.control.flags == ControlFlags.RSYN | CHALLENGE
    assert (probe.control.verno, probe.control.ackno) == (0x01234567, 0x89ABCDEF)
    assert probe.control.nonce == bytes(8)
    answer = ControlExt(
        ControlFlags.RSYN | ControlFlags.ACK | CHALLENGE, 0x01234567, 0x89ABCDEF, bytes(8)
    )
    wrong = ControlExt(answer.flags, 0x01234567, 0x89ABCDEE, bytes(8))
    flows.on_rsyn_control(sf, answer, ("10.6.6.6", 666), net.now)  # right token, elsewhere
    flows.on_rsyn_control(sf, wrong, NAT, net.now)  # the candidate, wrong token
    assert sf.control.ignored == 2 and sf.remote_addr == A and not events
    flows.on_rsyn_control(sf, answer, NAT, net.now)
    assert sf.remote_addr == NAT and sf.prev_remote == A and sf.challenge is None
    assert events == [FlowMigrated(server.conn_id, B, NAT, "rebinding")]


def test_an_unanswered_address_check_gives_up_and_keeps_the_path() -> None:
    _, server, net = _pair()
    sf = server.primary
    flows = server.flows
    flows.check_address(sf, NAT, 7, net.now)
    sent = 1
    now = net.now
    while sf.challenge is not None:
        flows.challenge_pending = False
        now = sf.challenge.deadline
        assert flows.migration_timers(sf, now)
        sent += flows.challenge_pending
    assert sent == CHALLENGE_TRIES  # then the candidate is forgotten
    assert sf.remote_addr == A and server.state is State.ESTABLISHED


def test_the_peer_checks_where_we_are_and_we_answer_only_its_verified_address() -> None:
    client, _, net = _pair()
    sf = client.primary
    flows = client.flows
    check = ControlExt(ControlFlags.RSYN | CHALLENGE, 0xAAAA, 0xBBBB, bytes(8))
    flows.on_rsyn_control(sf, check, ("10.6.6.6", 666), net.now)
    assert flows.challenge_echo is None  # not from the peer's verified address
    flows.on_rsyn_control(sf, check, B, net.now)
    out: list[SalPacket] = []
    flows.output_control(sf, out)
    (pkt,) = out
    assert pkt.control is not None
    assert pkt.control.flags == ControlFlags.RSYN | ControlFlags.ACK | CHALLENGE
    assert (pkt.control.verno, pkt.control.ackno) == (0xAAAA, 0xBBBB)
    assert pkt.control.nonce == sf.control.local_nonce  # under our nonce


def test_join_and_move_through_the_manager_on_the_simulated_network() -> None:
    from pyserval.core.host import HostCore

    net = SimNetwork(seed=2, default_link=LinkConfig(delay=0.005))
    cfg = StreamConfig(multipath=True)
    a = HostCore([A, A2], rng=random.Random(2), config=cfg)
    b = HostCore([B, B2], rng=random.Random(3), config=cfg)
    net.attach(a, A, A2)
    net.attach(b, B, B2)
    a.service_table.add("echo", Rule.forward(B))
    listener = b.listen("echo")
    client = a.connect("echo", net.now)
    net.kick(a)
    got: list[Connection] = []

    def ready() -> bool:
        c = listener.accept()
        if c is not None:
            got.append(c)
        return bool(got) and client.state is State.ESTABLISHED

    assert net.run_until(ready, 10)
    server = got[0]
    assert client.flows.paths == [(A, B)] and server.flows.paths == [(B, A)]
    a.add_path(client, A2, B2, net.now)
    net.kick(a)
    net.run_for(1.0)
    assert client.flows.paths == [(A, B), (A2, B2)]
    assert server.flows.paths == [(B, A), (B2, A2)]
    groups = {id(sf.cc.group) for sf in client.subflows if isinstance(sf.cc, Lia)}
    assert len(groups) == 1 and len(client.flows.live_subflows()) == 2  # coupled
    assert PathAdded(client.conn_id, A2, B2) in a.events()
    # Data still arrives whole over both.
    data = random.Random(9).randbytes(300_000)
    sent, recv = 0, bytearray()
    while len(recv) < len(data) and net.now < 60:
        sent += client.write(data[sent : sent + 65536])
        net.kick(a)
        net.run_for(0.02)
        recv += server.read()
    assert bytes(recv) == data

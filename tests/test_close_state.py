"""The close sequence's state machine (transport/close_state.py), alone and in a connection.

The expectations are written here from the close sequence the wire spec describes (TCP FIN
each way, then the SAL FIN exchange once a side's FIN is acknowledged) and from RFC 9293's
state diagram (section 3.3.2), not read from the module's tables.
"""

from __future__ import annotations

import itertools

import pytest

from pyserval.sal import ControlFlags, decode_packet
from pyserval.transport.close_state import CloseEvent, CloseState, CloseStateError, Side, Stage
from pyserval.transport.connection import State
from pyserval.transport.events import ConnectionReset

from .simhelpers import A, make_pair

E = CloseEvent
S = Stage

# Every legal move, written out from the spec: (side, from, event) -> to.
EXPECTED: dict[tuple[Side, Stage, CloseEvent], Stage] = {
    # Our direction: the application closes, the peer ACKs our FIN, we send the SAL FIN,
    # the peer ACKs it.
    (Side.LOCAL, S.OPEN, E.SHUTDOWN): S.FIN_SENT,
    (Side.LOCAL, S.FIN_SENT, E.FIN_ACKED): S.FIN_ACKED,
    (Side.LOCAL, S.FIN_ACKED, E.SAL_FIN_SENT): S.SAL_FIN_SENT,
    (Side.LOCAL, S.SAL_FIN_SENT, E.SAL_FIN_ACKED): S.DONE,
    # Multipath: the subflow that carried (or was to carry) the SAL FIN died: it is due
    # again; an ACK of the first copy may still come and closes the direction.
    (Side.LOCAL, S.SAL_FIN_SENT, E.SAL_FIN_RESTART): S.FIN_ACKED,
    (Side.LOCAL, S.FIN_ACKED, E.SAL_FIN_RESTART): S.FIN_ACKED,
    (Side.LOCAL, S.FIN_ACKED, E.SAL_FIN_ACKED): S.DONE,
    # The compact close (both ends pyserval, agreed in the handshake): the SAL FIN leaves
    # in the same packet as the TCP FIN, and their two ACKs may come in either order;
    # the SAL FIN's ACK first ends the direction (the peer takes a SAL FIN only after the
    # TCP FIN and every byte before it, so that ACK says the stream arrived whole).
    (Side.LOCAL, S.FIN_SENT, E.SAL_FIN_SENT): S.FINS_SENT,
    (Side.LOCAL, S.FINS_SENT, E.FIN_ACKED): S.SAL_FIN_SENT,
    (Side.LOCAL, S.FINS_SENT, E.SAL_FIN_ACKED): S.DONE,
    # The peer's direction: its FIN (after all its data), then its SAL FIN; the SAL FIN
    # again (our ACK was lost) changes nothing.
    (Side.REMOTE, S.OPEN, E.FIN): S.FIN_RECEIVED,
    (Side.REMOTE, S.FIN_RECEIVED, E.SAL_FIN): S.DONE,
    (Side.REMOTE, S.DONE, E.SAL_FIN): S.DONE,
}

LOCAL_STAGES = [
    S.OPEN,
    S.FIN_SENT,
    S.FIN_ACKED,
    S.SAL_FIN_SENT,
    S.FINS_SENT,
    S.DONE,
]
REMOTE_STAGES = [S.OPEN, S.FIN_RECEIVED, S.DONE]


def _at(side: Side, stage: Stage) -> CloseState:
    """A machine with ``side`` at ``stage`` (the other side open)."""
    cs = CloseState()
    if side is Side.LOCAL:
        cs.local = stage
    else:
        cs.remote = stage
    return cs


@pytest.mark.parametrize(
    ("side", "stage", "event"),
    [
        *itertools.product([Side.LOCAL], LOCAL_STAGES, list(CloseEvent)),
        *itertools.product([Side.REMOTE], REMOTE_STAGES, list(CloseEvent)),
    ],
)
def test_every_event_in_every_stage_moves_as_the_spec_says_or_is_refused(
    side: Side, stage: Stage, event: CloseEvent
) -> None:
    cs = _at(side, stage)
    other_before = cs.remote if side is Side.LOCAL else cs.local
    expected = EXPECTED.get((side, stage, event))
    if expected is None:
        with pytest.raises(CloseStateError) as info:
            cs.process(side, event)
        err = info.value
        assert (err.side, err.stage, err.event) == (side, stage, event)
        assert side.value in str(err) and stage.value in str(err) and event.value in str(err)
        assert (cs.local if side is Side.LOCAL else cs.remote) is stage  # nothing changed
    else:
        assert cs.process(side, event) is expected
        assert (cs.local if side is Side.LOCAL else cs.remote) is expected
    assert (cs.remote if side is Side.LOCAL else cs.local) is other_before


def test_the_table_has_no_move_the_spec_does_not_name() -> None:
    legal = 0
    for side, stages in ((Side.LOCAL, LOCAL_STAGES), (Side.REMOTE, REMOTE_STAGES)):
        for stage, event in itertools.product(stages, CloseEvent):
            try:
                _at(side, stage).process(side, event)
                legal += 1
            except CloseStateError:
                pass
    assert legal == len(EXPECTED)


# RFC 9293 3.3.2's diagram, as (event, TCP state after it) walks from ESTABLISHED. "ACK of
# FIN" is our FIN_ACKED; "rcv FIN" is the peer's FIN.
RFC9293_WALKS = {
    "active close": [
        ((Side.LOCAL, E.SHUTDOWN), "FIN-WAIT-1"),
        ((Side.LOCAL, E.FIN_ACKED), "FIN-WAIT-2"),
        ((Side.REMOTE, E.FIN), "TIME-WAIT"),
    ],
    "simultaneous close": [
        ((Side.LOCAL, E.SHUTDOWN), "FIN-WAIT-1"),
        ((Side.REMOTE, E.FIN), "CLOSING"),
        ((Side.LOCAL, E.FIN_ACKED), "TIME-WAIT"),
    ],
    "passive close": [
        ((Side.REMOTE, E.FIN), "CLOSE-WAIT"),
        ((Side.LOCAL, E.SHUTDOWN), "LAST-ACK"),
        ((Side.LOCAL, E.FIN_ACKED), "CLOSED"),
    ],
}


@pytest.mark.parametrize("walk", sorted(RFC9293_WALKS))
def test_tcp_level_states_follow_rfc_9293s_diagram(walk: str) -> None:
    cs = CloseState()
    assert cs.tcp_state == "ESTABLISHED"
    for (side, event), name in RFC9293_WALKS[walk]:
        cs.process(side, event)
        assert cs.tcp_state == name, (walk, side, event)
    # The SAL FIN stages after the TCP close do not change the TCP-level name.
    for side, event in [(Side.LOCAL, E.SAL_FIN_SENT), (Side.REMOTE, E.SAL_FIN)]:
        cs.process(side, event)
        assert cs.tcp_state == RFC9293_WALKS[walk][-1][1]


@pytest.mark.parametrize("sal_ack_first", [False, True])
def test_a_compact_close_keeps_rfc_9293s_names_until_the_fin_is_known_to_have_arrived(
    sal_ack_first: bool,
) -> None:
    # The SAL FIN travelling with the TCP FIN does not change what TCP's own close is at:
    # FIN-WAIT-1 until the TCP FIN's ACK, or until the SAL FIN's ACK, which the peer sends
    # only once it has the TCP FIN (and every byte before it).
    cs = CloseState()
    cs.process(Side.LOCAL, E.SHUTDOWN)
    cs.process(Side.LOCAL, E.SAL_FIN_SENT)
    assert (cs.local, cs.tcp_state) == (S.FINS_SENT, "FIN-WAIT-1")
    if sal_ack_first:
        cs.process(Side.LOCAL, E.SAL_FIN_ACKED)
    else:
        cs.process(Side.LOCAL, E.FIN_ACKED)
        assert (cs.local, cs.tcp_state) == (S.SAL_FIN_SENT, "FIN-WAIT-2")
        cs.process(Side.LOCAL, E.SAL_FIN_ACKED)
    assert (cs.local, cs.tcp_state, cs.finished) == (S.DONE, "FIN-WAIT-2", False)
    cs.process(Side.REMOTE, E.FIN)
    cs.process(Side.REMOTE, E.SAL_FIN)
    assert (cs.tcp_state, cs.finished) == ("TIME-WAIT", True)


@pytest.mark.parametrize(("local", "remote"), list(itertools.product(LOCAL_STAGES, REMOTE_STAGES)))
def test_the_connection_ends_only_when_both_directions_are_done(
    local: Stage, remote: Stage
) -> None:
    cs = CloseState()
    cs.local, cs.remote = local, remote
    assert cs.finished is (local is S.DONE and remote is S.DONE)


def test_who_closed_first_is_taken_at_shutdown() -> None:
    first = CloseState()
    first.process(Side.LOCAL, E.SHUTDOWN)
    assert first.active_close  # the peer's direction was open: we wait in TIME_WAIT
    second = CloseState()
    second.process(Side.REMOTE, E.FIN)
    second.process(Side.LOCAL, E.SHUTDOWN)
    assert not second.active_close


# -- in a connection, on the simulated network --------------------------------------------


def test_a_close_walks_both_ends_through_the_rfc_9293_states_then_time_wait() -> None:
    p = make_pair()
    p.connect()
    c, s = p.client, p.server
    assert c is not None and s is not None
    c.shutdown()
    p.net.kick(p.a)
    p.net.run_for(1.0)
    # The client closed first; the server has not: half-closed both ways.
    assert (c.close.tcp_state, s.close.tcp_state) == ("FIN-WAIT-2", "CLOSE-WAIT")
    assert (c.state, c.at_eof, s.at_eof) == (State.ESTABLISHED, False, True)
    s.shutdown()
    p.net.kick(p.b)
    p.net.run_for(1.0)
    assert (c.close.local, c.close.remote) == (S.DONE, S.DONE)
    assert (s.close.local, s.close.remote) == (S.DONE, S.DONE)
    assert (c.state, s.state) == (State.TIME_WAIT, State.CLOSED)  # the active closer waits
    assert c.error is None and s.error is None


def test_a_refused_close_event_resets_the_peer_as_a_protocol_violation() -> None:
    p = make_pair()
    p.connect()
    c, s = p.client, p.server
    assert c is not None and s is not None
    s.shutdown()
    p.net.kick(p.b)
    p.net.run_for(1.0)
    # The peer's direction is closed at both levels (its FIN, then its SAL FIN); ours open.
    assert (c.close.local, c.close.remote) == (S.OPEN, S.DONE)
    states = [c.state]
    # A second "peer FIN" (a receive path that failed to check): the table refuses it.
    c.peer_fin_received = True
    states.append(c.state)
    assert states == [State.ESTABLISHED, State.CLOSED]
    assert c.error is not None and c.error.startswith("protocol violation: close sequence")
    assert c.close.remote is S.DONE  # unchanged
    assert any(isinstance(e, ConnectionReset) for e in p.a.events())
    sent: list[bytes] = []

    def tap(t: float, data: bytes, src: tuple[str, int], dst: tuple[str, int], fate: str) -> None:
        if fate == "sent" and src == A:
            sent.append(data)

    p.net.tap = tap
    c.wake(c)  # as the host does after handing a connection a packet
    p.net.kick(p.a)
    p.net.run_for(0.5)
    controls = [decode_packet(d).control for d in sent]
    assert any(ctl is not None and ctl.flags & ControlFlags.RST for ctl in controls)
    assert s.state is State.CLOSED and s.error == "reset by peer"

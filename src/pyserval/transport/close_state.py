"""The close sequence of a Serval connection: one state machine per direction, as tables.

Everything that decides how a connection's close advances lives in this module: the
transition tables and the one joint rule. ``Connection`` reports events and reads states;
it keeps no close flags of its own. The tables are in the shape of h11's ``_state.py``:
``TRANSITIONS[side][state][event] -> state``; an event that is not in the table for the
current state is a :class:`CloseStateError` raised at one place, naming side, state and
event (the connection turns it into a protocol violation: the peer gets a RST).

A Serval stream closes at two levels (``shared/spec/sal-wire.md``): first TCP's FIN in
each direction, after the data; then the SAL FIN exchange on the control channel, which
each side starts once its TCP FIN is acknowledged. So each direction runs

* ``LOCAL`` (what we send): ``OPEN`` -shutdown-> ``FIN_SENT`` -our FIN acknowledged->
  ``FIN_ACKED`` (the SAL FIN is due: it waits there while another control exchange, an
  RSYN, is outstanding) -SAL FIN sent-> ``SAL_FIN_SENT`` -its ACK-> ``DONE``. A multipath
  connection whose SAL FIN was on a subflow that died starts it again
  (``SAL_FIN_SENT``/``FIN_ACKED`` -restart-> ``FIN_ACKED``); an ACK of the first copy
  may still arrive in ``FIN_ACKED``, and closes the direction as well.

  The *compact close* (``StreamConfig.compact_close``, off by default; agreed in the
  handshake when both ends are pyserval and ask for it) sends the SAL FIN in the same
  packet as the TCP FIN:
  ``FIN_SENT`` -SAL FIN sent-> ``FINS_SENT``, from where the two ACKs may come in either
  order: -our FIN acknowledged-> ``SAL_FIN_SENT`` -its ACK-> ``DONE``, or -the SAL FIN's
  ACK-> ``DONE`` at once. The receiver takes a packet's TCP segment before its SAL FIN,
  and a SAL FIN only once the TCP FIN is in (after every byte before it), so the SAL FIN
  still follows the TCP FIN at every receiver, as the spec's rule has it; what changes is
  only that the two travel together. So the SAL FIN's ACK also says that our FIN and all
  our data arrived: waiting on for the TCP ACK (which a peer in TIME_WAIT answering only
  SAL FINs may never send again) would add nothing but retransmissions and, once the
  peer forgot the flow, a RST. A connect-and-close cycle is 6 packets instead of 8.
* ``REMOTE`` (what the peer sends): ``OPEN`` -its FIN, after all its data->
  ``FIN_RECEIVED`` -its SAL FIN-> ``DONE``; a SAL FIN again in ``DONE`` is a
  retransmission (our ACK was lost) and changes nothing.

The joint rule: when both directions are ``DONE`` the connection ends, in TIME_WAIT if we
closed first (the *active close*: we shut down while the peer's direction was still open,
RFC 9293 3.6) and closed otherwise, except when our SAL FIN left (a copy of it) before the
peer's arrived (``linger``): our ACK of the peer's SAL FIN then travelled on a packet of
its own, and nothing the peer acknowledges proves it arrived, so we wait as well, to
answer the peer's SAL FIN if it comes again. (TCP's passive closer never has that doubt:
its FIN carries the ACK of the peer's.) :attr:`CloseState.tcp_state` names the TCP-level joint
state as RFC 9293's diagram does (FIN-WAIT-1, CLOSING, LAST-ACK, ...), for inspection.

The two directions follow their own tables because the events differ (we see our FIN
acknowledged but the peer's only arrive); the rules do not depend on the role (client or
server) at all. A datagram flow (``transport.datagram_flow``) has no transport FIN: it
reports its FIN as acknowledged at once and runs the same machine.

What this module does not do: the handshake states (``Connection.state``'s SYN_SENT and
SYN_RECEIVED), aborts (a RST or a timeout ends the connection whatever these states are),
timers (TIME_WAIT's length, retransmission) and packets.
"""

from __future__ import annotations

import enum
from typing import Final

__all__ = [
    "JOINT_TCP_STATES",
    "TRANSITIONS",
    "CloseEvent",
    "CloseState",
    "CloseStateError",
    "Side",
    "Stage",
]


class Side(enum.StrEnum):
    """Which direction of the stream: what we send, or what the peer sends."""

    LOCAL = "local"
    REMOTE = "remote"


class Stage(enum.StrEnum):
    """Where one direction is in its close (see the module docstring)."""

    OPEN = "open"
    FIN_SENT = "fin_sent"  # LOCAL: our FIN is queued or in flight
    FIN_ACKED = "fin_acked"  # LOCAL: our FIN is acknowledged; the SAL FIN is due
    FINS_SENT = "fins_sent"  # LOCAL, compact close: our FIN and SAL FIN are in flight
    SAL_FIN_SENT = "sal_fin_sent"  # LOCAL: our SAL FIN awaits its ACK
    FIN_RECEIVED = "fin_received"  # REMOTE: the peer's FIN arrived after all its data
    DONE = "done"  # both levels closed in this direction


class CloseEvent(enum.StrEnum):
    """What moves a direction along."""

    SHUTDOWN = "shutdown"  # the application closed its writing side
    FIN_ACKED = "fin_acked"  # the peer acknowledged our FIN (and all data before it)
    SAL_FIN_SENT = "sal_fin_sent"  # our SAL FIN went on the control channel
    SAL_FIN_ACKED = "sal_fin_acked"  # the peer acknowledged our SAL FIN
    SAL_FIN_RESTART = "sal_fin_restart"  # the subflow carrying our SAL FIN was given up
    FIN = "fin"  # the peer's FIN arrived, every byte before it too
    SAL_FIN = "sal_fin"  # the peer's SAL FIN arrived (after its FIN)


_L = Stage
_E = CloseEvent

TRANSITIONS: Final[dict[Side, dict[Stage, dict[CloseEvent, Stage]]]] = {
    Side.LOCAL: {
        _L.OPEN: {_E.SHUTDOWN: _L.FIN_SENT},
        _L.FIN_SENT: {_E.FIN_ACKED: _L.FIN_ACKED, _E.SAL_FIN_SENT: _L.FINS_SENT},
        # Compact: the SAL FIN's ACK says the FIN arrived too (see the module docstring).
        _L.FINS_SENT: {_E.FIN_ACKED: _L.SAL_FIN_SENT, _E.SAL_FIN_ACKED: _L.DONE},
        _L.FIN_ACKED: {
            _E.SAL_FIN_SENT: _L.SAL_FIN_SENT,
            _E.SAL_FIN_RESTART: _L.FIN_ACKED,
            # The ACK of a SAL FIN sent on a subflow given up since, arriving before the
            # new primary could send it again: the peer has it all the same.
            _E.SAL_FIN_ACKED: _L.DONE,
        },
        _L.SAL_FIN_SENT: {_E.SAL_FIN_ACKED: _L.DONE, _E.SAL_FIN_RESTART: _L.FIN_ACKED},
        _L.DONE: {},
    },
    Side.REMOTE: {
        _L.OPEN: {_E.FIN: _L.FIN_RECEIVED},
        _L.FIN_RECEIVED: {_E.SAL_FIN: _L.DONE},
        _L.DONE: {_E.SAL_FIN: _L.DONE},
    },
}

# The TCP-level joint state by RFC 9293's names: (local past its FIN's ACK?, local FIN
# sent?, remote FIN received?, we closed first?) -> name. Both SAL FIN stages count as
# "FIN acknowledged" here: TCP is done with a direction once its FIN is acknowledged.
JOINT_TCP_STATES: Final[dict[tuple[bool, bool, bool, bool], str]] = {
    (False, False, False, False): "ESTABLISHED",
    (False, True, False, True): "FIN-WAIT-1",
    (True, True, False, True): "FIN-WAIT-2",
    (False, False, True, False): "CLOSE-WAIT",
    (False, True, True, True): "CLOSING",
    (False, True, True, False): "LAST-ACK",
    (True, True, True, True): "TIME-WAIT",
    (True, True, True, False): "CLOSED",
}

_ACKED_OR_LATER: Final = frozenset({_L.FIN_ACKED, _L.SAL_FIN_SENT, _L.DONE})
# Bound once: an Enum class attribute is a slow lookup, and process() runs several times
# per connection. (The enums are StrEnums for the same reason: a str hashes in C, an
# Enum member through a Python __hash__, and the tables are dicts keyed by them.)
_LOCAL: Final = Side.LOCAL
_OPEN: Final = Stage.OPEN
_DONE: Final = Stage.DONE
_SHUTDOWN: Final = CloseEvent.SHUTDOWN
_TABLES: Final = (TRANSITIONS[Side.LOCAL], TRANSITIONS[Side.REMOTE])


class CloseStateError(Exception):
    """An event the close tables do not allow in the current state."""

    def __init__(self, side: Side, stage: Stage, event: CloseEvent) -> None:
        super().__init__(
            f"close sequence: {event.value} not allowed for {side.value} in {stage.value}"
        )
        self.side = side
        self.stage = stage
        self.event = event


class CloseState:
    """Both directions' close stages and the one fact outside the tables (who closed
    first). Change it only through :meth:`process` (or :meth:`advance`)."""

    __slots__ = ("local", "remote", "active_close", "linger")

    def __init__(self) -> None:
        self.local = _OPEN
        self.remote = _OPEN
        # Set by SHUTDOWN: we closed while the peer's direction was still open, so we are
        # the side that waits in TIME_WAIT (RFC 9293 3.6).
        self.active_close = False
        # Set by the connection when a copy of our SAL FIN leaves without acknowledging
        # the peer's (not in yet): we wait in TIME_WAIT even if we closed second (the
        # joint rule in the module docstring).
        self.linger = False

    def process(self, side: Side, event: CloseEvent) -> Stage:
        """Apply ``event`` to ``side``; returns the new stage. Raises
        :class:`CloseStateError` (and changes nothing) if the table has no such move."""
        new = self.advance(side, event)
        if new is None:
            raise self.refusal(side, event)
        return new

    def refusal(self, side: Side, event: CloseEvent) -> CloseStateError:
        """The error for ``event``, which ``side``'s table has no move for where it is."""
        return CloseStateError(side, self.local if side is _LOCAL else self.remote, event)

    def advance(self, side: Side, event: CloseEvent) -> Stage | None:
        """:meth:`process` without the exception: the new stage, or None (and nothing
        changed) when the table has no such move. For the connection's own steps, one
        call each (a caller that catches the exception needs a second)."""
        if side is _LOCAL:
            new = _TABLES[0][self.local].get(event)
            if new is not None:
                if event is _SHUTDOWN:
                    self.active_close = self.remote is _OPEN
                self.local = new
        else:
            new = _TABLES[1][self.remote].get(event)
            if new is not None:
                self.remote = new
        return new

    @property
    def finished(self) -> bool:
        """Both directions closed at both levels: the connection ends (the joint rule)."""
        return self.local is _DONE and self.remote is _DONE

    @property
    def tcp_state(self) -> str:
        """The TCP-level joint state as RFC 9293's diagram names it."""
        local = self.local
        key = (
            local in _ACKED_OR_LATER,
            local is not _OPEN,
            self.remote is not _OPEN,
            self.active_close,
        )
        return JOINT_TCP_STATES[key]

    def __repr__(self) -> str:
        return f"CloseState(local={self.local.value}, remote={self.remote.value})"

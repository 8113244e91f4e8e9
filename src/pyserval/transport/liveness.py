"""Whether an established connection's peer is still there: idle timeout, keepalive
probes and the user timeout (``StreamConfig.idle_timeout``, ``keepalive``,
``keepalive_interval``, ``keepalive_probes``, ``user_timeout``).

Two functions over a ``Connection``: :func:`deadline` (when :func:`check` must run next,
or one of the connection's other timers if earlier) and :func:`check` (time out, or send
a probe). The connection calls them while it is established; they read its
``last_heard``, ``keepalives_sent`` and its subflows' control and retransmission state.

What this module does not do: retransmission and persist timers (each subflow's),
control-packet retransmission, delayed ACKs or TIME_WAIT (the connection's), or I/O.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..sal.packet import SalPacket
from ..sal.transport_headers import PROTO_TCP, TcpFlags

if TYPE_CHECKING:
    from .connection import Connection

__all__ = ["check", "deadline"]


def _subflow_waits(conn: Connection) -> tuple[bool, float | None]:
    """In one pass over the subflows (this runs after every flush): whether a control
    packet (SAL FIN, RSYN, JOIN) awaits its answer, whose own retransmissions keep the
    path busy and decide when to give up, so keepalives wait; and since when our data has
    waited for an ACK (the latest of the subflows'), for the user timeout."""
    outstanding = False
    waiting = None
    for sf in conn.subflows:
        if sf.control.deadline is not None:
            outstanding = True
        w = sf.waiting_since
        if w is not None and (waiting is None or w > waiting):
            waiting = w
    return outstanding, waiting


def deadline(conn: Connection, best: float | None) -> float | None:
    """The earliest of ``best`` (the connection's other timers, None for none), the idle
    timeout, the next keepalive probe (or the end of the probes) and the user timeout."""
    cfg = conn.config
    heard = conn.last_heard
    idle = cfg.idle_timeout
    if idle is not None and (best is None or heard + idle < best):
        best = heard + idle
    keepalive = cfg.keepalive
    user = cfg.user_timeout
    if keepalive is None and user is None:
        return best
    outstanding, waiting = _subflow_waits(conn)
    if keepalive is not None and not outstanding:
        # The next probe, or (all sent) the end of the wait for an answer.
        d = heard + keepalive + conn.keepalives_sent * cfg.keepalive_interval
        if best is None or d < best:
            best = d
    if user is not None and waiting is not None and (best is None or waiting + user < best):
        best = waiting + user
    return best


def check(conn: Connection, now: float, out: list[SalPacket]) -> bool:
    """Idle timeout, keepalive probes and user timeout; True if the connection ended."""
    cfg = conn.config
    heard = conn.last_heard
    if cfg.idle_timeout is not None and now >= heard + cfg.idle_timeout:
        conn.time_out("idle")
        return True
    outstanding, waiting = _subflow_waits(conn)
    user = cfg.user_timeout
    if user is not None and waiting is not None and now >= waiting + user:
        conn.time_out(f"user timeout: data unacknowledged for {now - waiting:.1f} s")
        return True
    ka = cfg.keepalive
    if ka is None or outstanding:
        return False
    probes = cfg.keepalive_probes
    interval = cfg.keepalive_interval
    if now >= heard + ka + probes * interval:
        conn.time_out(f"peer silent for {now - heard:.1f} s: {probes} keepalives unanswered")
        return True
    if now >= heard + ka + conn.keepalives_sent * interval:
        # Count the intervals that passed (a late timer sends one probe, not several).
        passed = 1 + int((now - heard - ka) // interval)
        conn.keepalives_sent = min(max(passed, conn.keepalives_sent + 1), probes)
        sf = conn.primary
        # An already-acknowledged sequence number: the peer answers with an ACK, and both
        # ends' NAT mappings see a packet go out.
        out.append(
            SalPacket(
                sf.local_flowid,
                sf.remote_flowid,
                PROTO_TCP,
                [],
                sf.ack_header(TcpFlags.ACK, sf.snd_una - 1),
            )
        )
    return False

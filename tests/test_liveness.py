"""Liveness against real processes: a peer SIGKILLed or SIGSTOPped is noticed in bounded
time by an idle reader (keepalive) and by a sender (user timeout), as
``anyio.BrokenResourceError`` from the stream. Short intervals are configured here; the
defaults (a first probe after 15 s, then 9 probes 5 s apart, a 60 s user timeout) are
checked in the simulator (tests/test_core_nat.py)."""

from __future__ import annotations

import signal
import time

import pytest

from .helpers.processes import PEER, Peer


def _server(mode: str) -> Peer:
    return Peer.server([str(PEER), "serve", "--listen", "127.0.0.1:0", "--mode", mode])


def _client(server: Peer, *args: str) -> Peer:
    return Peer([str(PEER), "until-error", "--route", server.route, "--deadline", "30", *args])


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP])
def test_an_idle_reader_learns_of_a_dead_or_stopped_peer_by_keepalive(sig: signal.Signals) -> None:
    with _server("hold") as server:
        limits = ["--keepalive", "0.5", "--keepalive-probes", "2", "--user-timeout", "0"]
        limits += ["--keepalive-interval", "0.5"]
        with _client(server, "--direction", "idle", *limits) as c:
            c.wait_for("^TRANSFERRING$", 20)
            time.sleep(0.2)
            server.proc.send_signal(sig)
            hit_at = time.time()
            try:
                res = c.result(20)
                assert c.finish(10) == 0, res
            finally:
                if sig is signal.SIGSTOP:
                    server.proc.send_signal(signal.SIGCONT)
    assert res["error"] == "BrokenResourceError", res
    # A killed process's port answers ICMP unreachable: a soft error now, so it is the
    # keepalive (3 intervals of silence: 1.5 s) that ends it, not the ICMP.
    assert "keepalives unanswered" in res["conn_error"], res
    assert res["at"] - hit_at < 1.5 + 3.0, res  # slack for a loaded machine


def test_a_sender_facing_a_stopped_peer_gives_up_at_the_user_timeout() -> None:
    with _server("digest") as server:
        limits = ["--keepalive", "0", "--user-timeout", "2", "--max-retransmissions", "100"]
        with _client(server, "--direction", "up", *limits) as c:
            c.wait_for("^TRANSFERRING$", 20)
            server.proc.send_signal(signal.SIGSTOP)
            stopped_at = time.time()
            try:
                res = c.result(20)
                assert c.finish(10) == 0, res
            finally:
                server.proc.send_signal(signal.SIGCONT)
    assert res["error"] == "BrokenResourceError", res
    assert "user timeout" in res["conn_error"], res
    assert 1.5 < res["at"] - stopped_at < 2.0 + 3.0, res  # slack for a loaded machine

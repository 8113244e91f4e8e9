"""The tail loss probe (RFC 8985 section 7) over the simulated network: a lost tail of a
flight, which no later segment can report, is repaired by the ACK/SACK recovery a probe
sets off, not by the retransmission timeout; nothing is probed when nothing is lost; the
peer's window bounds the probe; with the switch off nothing changes.

Timing expectations come from the link (one-way delay ``DELAY``, so a round trip ``RTT``),
the receiver's delayed-ACK time and RFC 8985's schedule, never from the probe timeout the
code computes; the old behaviour is a trace digest captured from the code before the probe
existed."""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from dataclasses import dataclass, field

import pytest

from pyserval.sal import decode_packet
from pyserval.testing import LinkConfig
from pyserval.transport.config import StreamConfig
from pyserval.transport.connection import Connection
from pyserval.transport.recovery import Recovery
from pyserval.transport.rtt import RttEstimator
from pyserval.transport.subflow import Subflow

from .simhelpers import A, B, Pair, make_pair

MSS = 1408  # StreamConfig's default segment size
DELAY = 0.005
RTT = 2 * DELAY
DELACK = StreamConfig().delayed_ack  # the receiver's delayed-ACK time (40 ms)
MIN_RTO = StreamConfig().min_rto  # RFC 6298's floor on the retransmission timeout (200 ms)


@dataclass
class Run:
    """What one transfer did (times in virtual seconds from the write)."""

    seconds: float = 0.0
    timeouts: int = 0  # retransmission timeouts the sender took
    probes: int = 0  # tail loss probes it sent
    armed: int = 0  # times the sender's probe timer was (re)started
    sends: Counter[int] = field(default_factory=Counter)  # data offset -> times sent
    trace: str = ""  # SHA-256 over every datagram event of the run
    batches: bool = False  # the network ran with GSO trains and GRO batches


def _config(tlp: bool | None, sack: bool) -> StreamConfig:
    if tlp is None:  # the settings as they were before the switch existed
        return StreamConfig(sack=sack)
    return StreamConfig(sack=sack, tail_loss_probe=tlp)


def _pair(
    tlp: bool | None,
    sack: bool,
    delay: float,
    seed: int = 1,
    server_config: StreamConfig | None = None,
) -> Pair:
    link = LinkConfig(delay=delay)
    return make_pair(seed=seed, link=link, config=_config(tlp, sack), server_config=server_config)


def _watch(pair: Pair, sender: Connection, run: Run, drop: set[int], tlp: bool | None) -> None:
    """Count the sender's data segments by stream offset and drop the first sending of
    those in ``drop``; count the sender's timeouts and probes; digest every datagram."""
    sf: Subflow = sender.primary
    src = A if sender is pair.client else B
    trace = hashlib.sha256()

    def loss_filter(data: bytes, s: tuple[str, int], d: tuple[str, int]) -> bool:
        trace.update(f"{pair.net.now!r}|{s}|{d}|".encode() + data)
        run.trace = trace.hexdigest()
        if s != src:
            return False
        pkt = decode_packet(data)
        if pkt.tcp is None or not pkt.payload:
            return False
        offset = (pkt.tcp.seq - sf.iss - 1) & 0xFFFFFFFF
        run.sends[offset] += 1
        return run.sends[offset] == 1 and offset in drop

    pair.net.loss_filter = loss_filter
    on_rto = sf._on_rto

    def counting_rto(now: float) -> None:
        run.timeouts += 1
        on_rto(now)

    sf._on_rto = counting_rto  # type: ignore[method-assign]
    if tlp:
        arm = sf._arm_pto

        def counting_arm(now: float) -> None:
            arm(now)
            if sf.pto_deadline is not None:
                run.armed += 1

        sf._arm_pto = counting_arm  # type: ignore[method-assign]


def bulk(
    segments: int,
    lost: set[int],
    *,
    sack: bool = True,
    tlp: bool | None = True,
    delay: float = DELAY,
    size: int | None = None,
    seed: int = 1,
) -> Run:
    """Send ``segments`` full segments (or ``size`` bytes) client -> server, losing the
    first sending of the segments numbered in ``lost`` (0-based), and check what arrives."""
    pair = _pair(tlp, sack, delay, seed)
    pair.connect()
    client, server = pair.client, pair.server
    assert client is not None and server is not None
    run = Run(batches=pair.net.gso)
    _watch(pair, client, run, {i * MSS for i in lost}, tlp)
    total = segments * MSS if size is None else size
    data = random.Random(seed).randbytes(total)
    start = pair.net.now
    assert client.write(data) == total
    pair.net.kick(pair.a)
    got = bytearray()

    def done() -> bool:
        got.extend(server.read())
        return len(got) >= total

    assert pair.net.run_until(done, 60.0), f"only {len(got)} of {total} bytes arrived"
    run.seconds = pair.net.now - start
    assert bytes(got) == data, "data corrupted"
    # Let the last ACKs (delayed ones too) come back before anything is counted.
    pair.net.run_for(1.0)
    run.probes = client.primary.probes if tlp else 0
    assert pair.a.internal_errors == [] and pair.b.internal_errors == []
    return run


# -- the scoreboard's part, without a network ---------------------------------------------
def test_probe_timeout_is_twice_srtt_plus_the_delayed_ack_time_for_one_segment() -> None:
    rec = Recovery(RttEstimator(1.0, 0.2, 60.0), 1000, True)
    assert rec.probe_timeout(False, 0.04) == pytest.approx(1.0)  # no sample: the initial RTO
    rec.on_sent(0, 1000, False, 0.0)
    rec.on_ack(1000, 0.03)  # SRTT 30 ms (RFC 6298 2.2)
    assert rec.probe_timeout(False, 0.04) == pytest.approx(0.06)  # RFC 8985 7.2: 2 SRTT
    assert rec.probe_timeout(True, 0.04) == pytest.approx(0.10)  # + the delayed-ACK time
    rec.on_sent(1000, 2000, False, 1.0)
    rec.on_ack(2000, 1.001)  # SRTT 7/8 * 30 + 1/8 * 1 = 26.375 ms
    assert rec.probe_timeout(False, 0.04) == pytest.approx(2 * 0.026375)
    fast = Recovery(RttEstimator(1.0, 0.2, 60.0), 1000, True)
    fast.on_sent(0, 1000, False, 0.0)
    fast.on_ack(1000, 0.001)  # 2 SRTT = 2 ms: held at the 10 ms floor
    assert fast.probe_timeout(False, 0.04) == pytest.approx(0.01)


def test_a_sacked_probe_marks_every_unsacked_segment_below_it_lost() -> None:
    rec = Recovery(RttEstimator(1.0, 0.2, 60.0), 1000, True)
    for i in range(6):
        rec.on_sent(i * 1000, (i + 1) * 1000, False, 0.0)
    rec.on_sack([(1000, 2000)], 0, 6000, 0.01)  # segment 1 arrived; 0 and 2..5 did not
    assert rec.take_probe_resend(0.1) == 5000  # the highest unSACKed segment
    rec.start_probe(5000, 6000, True, 0.1)
    assert not rec.probe_answered()
    rec.on_sack([(1000, 2000), (5000, 6000)], 0, 6000, 0.11)
    assert rec.probe_answered()
    rec.enter_recovery_after_probe(6000)
    assert list(rec.lost) == [0, 2000, 3000, 4000]  # not 1 (SACKed) nor the probe
    assert rec.in_recovery and rec.probe_end is None
    rec._check(0, 6000)


# -- a lost tail --------------------------------------------------------------------------
@pytest.mark.parametrize("sack", [True, False], ids=["sack", "no-sack"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_a_lost_tail_is_repaired_by_the_probe_well_before_the_rto(k: int, sack: bool) -> None:
    # The last k of 20 segments are lost: nothing after them can cause a duplicate ACK.
    lost = set(range(20 - k, 20))
    r = bulk(20, lost, sack=sack)
    assert r.timeouts == 0
    assert r.probes == 1
    # Each lost segment went exactly twice (the probe is one of them: it resends the last
    # one); nothing that arrived went again.
    assert {o // MSS: n for o, n in r.sends.items() if n > 1} == dict.fromkeys(lost, 2)
    # The schedule RFC 8985 gives, from the link: slow start from ten segments delivers the
    # last of the twenty 1.5 RTT after the write; the probe goes two RTTs after the last
    # ACK (plus the delayed-ACK allowance when one segment is out); its answer comes an RTT
    # later and starts the recovery; the repair arrives half an RTT after that with SACK,
    # and without it one more RTT per further hole (NewReno's partial ACKs).
    holes = 1 if sack else k
    assert r.seconds <= (1.5 + 2 + 1 + 0.5 + (holes - 1)) * RTT + RTT + DELACK
    # ... while the timeout can fire no sooner than its 200 ms floor after the last ACK.
    assert r.seconds < MIN_RTO


@pytest.mark.parametrize("sack", [True, False], ids=["sack", "no-sack"])
def test_a_lost_tail_waits_for_the_rto_with_the_switch_off(sack: bool) -> None:
    r = bulk(20, {18, 19}, sack=sack, tlp=False)
    assert r.timeouts == 1
    assert r.seconds > MIN_RTO


def test_a_lost_response_to_a_one_segment_request_is_probed() -> None:
    # Request/response: one segment each way; the response is lost. The server's probe
    # timeout (one segment out: two RTTs plus the delayed-ACK allowance) sends it again.
    pair = _pair(True, True, DELAY)
    pair.connect()
    client, server = pair.client, pair.server
    assert client is not None and server is not None
    run = Run()
    _watch(pair, server, run, {0}, True)
    start = pair.net.now
    client.write(b"GET /" + b"x" * 95)
    pair.net.kick(pair.a)
    got = bytearray()
    answered = False

    def done() -> bool:
        nonlocal answered
        if not answered and len(server.read()) > 0:
            server.write(b"200 " + b"y" * 96)
            pair.net.kick(pair.b)
            answered = True
        got.extend(client.read())
        return len(got) >= 100

    assert pair.net.run_until(done, 60.0)
    assert bytes(got) == b"200 " + b"y" * 96
    assert run.sends[0] == 2 and run.timeouts == 0
    assert server.primary.probes == 1
    # The request's half RTT, the probe timeout (two RTTs, plus the allowance for the
    # client's delayed ACK of a lone segment), the probe's half RTT; an RTT of slack.
    assert pair.net.now - start <= 0.5 * RTT + 2 * RTT + DELACK + 0.5 * RTT + RTT
    assert pair.net.now - start < MIN_RTO


# -- nothing lost, nothing probed ------------------------------------------------------
@pytest.mark.parametrize("size", [100, MSS, 3 * MSS, 21 * MSS, 1 << 20])
@pytest.mark.parametrize("delay", [0.001, DELAY])
def test_no_probe_and_no_retransmission_when_nothing_is_lost(size: int, delay: float) -> None:
    # Odd segment counts end with a delayed ACK (the receiver ACKs every second segment):
    # with a 1 ms link two smoothed RTTs are far shorter than the delayed-ACK time, so the
    # probe timeout must allow for it when one segment is out.
    r = bulk(0, set(), size=size, delay=delay)
    assert r.armed > 0  # the probe timer ran (so a spurious probe was possible) ...
    assert r.probes == 0 and r.timeouts == 0  # ... and never fired
    assert max(r.sends.values()) == 1


def test_no_probe_at_the_end_of_a_transfer_whose_last_ack_is_delayed() -> None:
    # One segment, no reply: its ACK waits the full delayed-ACK time at the receiver.
    pair = _pair(True, True, 0.001)
    pair.connect()
    client, server = pair.client, pair.server
    assert client is not None and server is not None
    run = Run()
    _watch(pair, client, run, set(), True)
    client.write(b"z" * 100)
    pair.net.kick(pair.a)
    assert pair.net.run_until(lambda: server.readable >= 100, 5.0)
    pair.net.run_for(1.0)
    assert client.primary.snd_una == client.primary.snd_max  # acknowledged ...
    assert run.armed == 1  # ... with the probe timer running ...
    assert run.sends[0] == 1 and client.primary.probes == 0  # ... and sent once


# -- the window --------------------------------------------------------------------------
def test_the_probe_sends_no_new_data_the_peers_window_does_not_take() -> None:
    # The server takes 10 segments and its application reads nothing: the client's ten
    # fill the window and the last is lost. More data waits at the client, but the window
    # (ten segments from the left edge) has no room for it: the probe resends segment 9.
    small = StreamConfig(receive_buffer=10 * MSS, tail_loss_probe=True)
    pair = _pair(True, True, DELAY, server_config=small)
    pair.connect()
    client, server = pair.client, pair.server
    assert client is not None and server is not None
    assert server.recv.capacity == 10 * MSS
    run = Run()
    _watch(pair, client, run, {9 * MSS}, True)
    data = random.Random(3).randbytes(30 * MSS)
    client.write(data)
    pair.net.kick(pair.a)
    pair.net.run_for(2 * MIN_RTO)
    assert run.sends[9 * MSS] == 2 and run.timeouts == 0 and client.primary.probes == 1
    assert max(run.sends) == 9 * MSS  # nothing beyond the window went
    assert server.readable == 10 * MSS
    got = bytearray(server.read())

    def done() -> bool:
        got.extend(server.read())
        return len(got) >= len(data)

    assert pair.net.run_until(done, 60)
    assert bytes(got) == data


# -- the switch --------------------------------------------------------------------------
# Trace digests of these runs captured from the code before the probe existed (commit
# 2a402c0), datagram by datagram and with GSO/GRO batches (PYSERVAL_SIM_BATCHES=1): every
# datagram, its time and addresses the same. (The tail's runs are the same with and without
# SACK: no segment arrives out of order, so no ACK carries a block.)
_OLD_TRACES = {
    ("tail", True, False): "da86401d977cfa8670390ed0b11cf46f51debc54e3b6d6b84d5a0643b3417e22",
    ("tail", False, False): "da86401d977cfa8670390ed0b11cf46f51debc54e3b6d6b84d5a0643b3417e22",
    ("scattered", True, False): "cab3b8a16ff2d0ebd672a36d4569914f6d59eeacf31be7bf96a9831cdb899445",
    ("scattered", False, False): "8c619ddd85a8503836a5311b0ccbbd1bbd9acc6e82aee7b4580426f2bda87dd9",
    ("tail", True, True): "a4bf8bc7af91501496e905d944224cdc0fa786c381a1fcd22f117bdb17f1adc5",
    ("tail", False, True): "a4bf8bc7af91501496e905d944224cdc0fa786c381a1fcd22f117bdb17f1adc5",
    ("scattered", True, True): "9853be2592cd0740cb6d118b56d9e59fdb36b058ff486aa4973dd91918600bed",
    ("scattered", False, True): "f10824803b1d8f847ae9b7decd16ca6d1be19912bdb079d2f4b9fc6506115259",
}


@pytest.mark.parametrize("sack", [True, False], ids=["sack", "no-sack"])
@pytest.mark.parametrize("scenario", ["tail", "scattered"])
def test_with_the_switch_off_every_packet_is_as_before(scenario: str, sack: bool) -> None:
    if scenario == "tail":
        r = bulk(20, {17, 18, 19}, sack=sack, tlp=False)
    else:
        r = bulk(60, {5, 6, 30, 59}, sack=sack, tlp=False)
    assert r.trace == _OLD_TRACES[(scenario, sack, r.batches)]

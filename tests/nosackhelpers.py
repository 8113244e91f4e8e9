"""Bulk transfers over the simulated network with a scripted or random loss, for the loss
recovery tests: who sent which data segment how often, and how many retransmission
timeouts the sender took."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from pyserval.sal import decode_packet
from pyserval.testing import LinkConfig
from pyserval.transport.config import StreamConfig
from pyserval.transport.connection import Subflow

from .simhelpers import A, make_pair

MSS = 1408  # StreamConfig's default segment size


@dataclass
class Transfer:
    """What one client -> server transfer did."""

    seconds: float  # virtual time from the write to the last byte read by the server
    timeouts: int  # retransmission timeouts the client's subflow took
    sends: Counter[int] = field(default_factory=Counter)  # data offset -> times sent
    dropped: list[int] = field(default_factory=list)  # data offsets the filter dropped


def transfer(
    size: int,
    *,
    seed: int = 1,
    loss: float = 0.0,
    client_sack: bool = True,
    server_sack: bool = False,
    congestion: str = "cubic",
    drop: Callable[[int, int], bool] | None = None,
    delay: float = 0.01,
    timeout: float = 600.0,
) -> Transfer:
    """Send ``size`` random bytes client -> server and check they arrive intact.

    ``drop(offset, nth)`` decides, for the ``nth`` sending (1 = the first) of the client's
    data segment at stream ``offset``, whether the network loses it; ``loss`` is random loss
    on every link on top of that.
    """
    link = LinkConfig(delay=delay, loss=loss)
    buffers = max(size, MSS)
    client_cfg = StreamConfig(
        sack=client_sack, congestion=congestion, send_buffer=buffers, receive_buffer=buffers
    )
    server_cfg = StreamConfig(
        sack=server_sack, congestion=congestion, send_buffer=buffers, receive_buffer=buffers
    )
    pair = make_pair(seed=seed, link=link, config=client_cfg, server_config=server_cfg)
    pair.connect()
    client, server = pair.client, pair.server
    assert client is not None and server is not None
    sf: Subflow = client.primary
    result = Transfer(0.0, 0)

    def loss_filter(data: bytes, src: tuple[str, int], dst: tuple[str, int]) -> bool:
        if src != A:
            return False
        pkt = decode_packet(data)
        if pkt.tcp is None or not pkt.payload:
            return False
        offset = (pkt.tcp.seq - sf.iss - 1) & 0xFFFFFFFF
        result.sends[offset] += 1
        if drop is not None and drop(offset, result.sends[offset]):
            result.dropped.append(offset)
            return True
        return False

    pair.net.loss_filter = loss_filter
    on_rto = sf._on_rto

    def counting_rto(now: float) -> None:
        result.timeouts += 1
        on_rto(now)

    sf._on_rto = counting_rto  # type: ignore[method-assign]
    data = random.Random(seed).randbytes(size)
    start = pair.net.now
    assert client.write(data) == size
    pair.net.kick(pair.a)
    got = bytearray()

    def done() -> bool:
        got.extend(server.read())
        return len(got) >= size

    assert pair.net.run_until(done, timeout), f"only {len(got)} of {size} bytes arrived"
    result.seconds = pair.net.now - start
    assert bytes(got) == data, "data corrupted"
    assert pair.a.internal_errors == [] and pair.b.internal_errors == []
    return result

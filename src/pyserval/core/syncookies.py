"""SYN cookies: answer a SYN without keeping state, and rebuild the flow from its third ACK.

When a listener's half-open table is full (a SYN flood), the host still answers every SYN,
but with a SYN-ACK whose numbers *are* the state: our flowID, our control verno, our TCP ISS
and our nonce are derived from a keyed MAC (BLAKE2b with a 128-bit secret) over the client's
address, the client's flowID and a 10-bit summary of its SYN options. The third ACK echoes
three of them (its destination flowID, its CONTROL ackno and its TCP ack), so it can be
checked and the connection built then, without anything kept in between.

Layout of the summary, in the low 10 bits of our TCP ISS (so it comes back in the ACK):

    bit 9      parity of the secret's period (which of the two live secrets made it)
    bits 6-8   index into :data:`MSS_TABLE` (the largest entry not above the client's MSS)
    bit 5      the client offered SACK
    bits 0-4   the client's window scale + 1, or 0 when it offered none

The summary is covered by the MAC, so it cannot be edited. A forger has to match 32 bits of
flowID, 32 of control verno and 22 of ISS at once (86 bits) without seeing any cookie made
for the address it claims; a client that can see its own cookies can only complete
connections from its own address, which it could do anyway.

Connected datagram flows (protocol 17) have no TCP numbers: their cookie is our flowID and
our control verno alone, whose low bit carries the period's parity, over a summary that
marks the datagram kind (so a stream cookie never opens a datagram flow, nor the reverse).
Their third ACK echoes both (63 bits of MAC to match).

Secrets rotate every :data:`PERIOD` seconds and the previous one stays valid, so a cookie
lives between one and two periods (at most a minute). What it deliberately does not carry:
a multipath offer (the MP_CAPABLE key is not echoed: cookie connections are single-path) and
the client's exact MSS (rounded down to the table). Sans-I/O: ``now`` is passed in.
"""

from __future__ import annotations

import hashlib
import random
import struct
from dataclasses import dataclass
from typing import Final

from ..sal.inet import Address

__all__ = ["MSS_TABLE", "PERIOD", "Cookie", "SynCookies"]

PERIOD: Final = 30.0
MSS_TABLE: Final = (256, 536, 1220, 1408, 1460, 8192, 16384, 32768)
_META_BITS: Final = 10
_META_MASK: Final = (1 << _META_BITS) - 1
_PACK = struct.Struct("!HIH")
_DATAGRAM: Final = 0x8000  # the summary of a datagram cookie (stream summaries are 10 bits)


@dataclass(frozen=True, slots=True)
class Cookie:
    """Our side of a stateless SYN-ACK, and what the client's SYN offered."""

    flowid: int
    verno: int
    iss: int
    nonce: bytes
    mss: int
    window_scale: int | None
    sack: bool


class SynCookies:
    """Makes and checks SYN cookies with two rotating secrets (see the module docstring)."""

    __slots__ = ("_rng", "_secrets", "made", "checked", "failed")

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._secrets: dict[int, bytes] = {}  # period index -> secret (the last two)
        self.made = 0
        self.checked = 0
        self.failed = 0

    def _secret(self, index: int, create: bool) -> bytes | None:
        key = self._secrets.get(index)
        if key is None and create:
            key = self._rng.getrandbits(128).to_bytes(16, "big")
            self._secrets[index] = key
            for old in [i for i in self._secrets if i < index - 1]:
                del self._secrets[old]
        return key

    @staticmethod
    def _derive(key: bytes, ip: str, port: int, peer_flowid: int, meta: int) -> Cookie:
        digest = hashlib.blake2b(
            ip.encode() + _PACK.pack(port, peer_flowid, meta), key=key, digest_size=20
        ).digest()
        flowid = int.from_bytes(digest[0:4], "big") or 1  # a flowID is never 0
        verno = int.from_bytes(digest[4:8], "big")
        iss = ((int.from_bytes(digest[8:11], "big") >> 2) << _META_BITS) | meta
        ws_field = meta & 0x1F
        return Cookie(
            flowid,
            verno,
            iss,
            digest[12:20],
            MSS_TABLE[(meta >> 6) & 7],
            ws_field - 1 if ws_field else None,
            bool(meta & 0x20),
        )

    def make_datagram(self, now: float, addr: tuple[str, int], peer_flowid: int) -> Cookie:
        """The cookie for a connected-datagram SYN from ``addr`` with flowID ``peer_flowid``
        (its ``iss``, ``mss``, ``window_scale`` and ``sack`` mean nothing)."""
        index = int(now // PERIOD)
        key = self._secret(index, create=True)
        assert key is not None
        self.made += 1
        return self._datagram_cookie(key, addr, peer_flowid, index & 1)

    def _datagram_cookie(
        self, key: bytes, addr: tuple[str, int], peer_flowid: int, parity: int
    ) -> Cookie:
        cookie = self._derive(key, addr[0], addr[1], peer_flowid, _DATAGRAM | parity)
        verno = (cookie.verno & ~1) | parity
        return Cookie(cookie.flowid, verno, 0, cookie.nonce, 0, None, False)

    def check_datagram(
        self, now: float, addr: tuple[str, int], peer_flowid: int, local_flowid: int, verno: int
    ) -> Cookie | None:
        """The datagram cookie a third ACK echoes (our ``local_flowid``, ``verno`` = its
        CONTROL ackno - 1), or None if forged or expired."""
        self.checked += 1
        parity = verno & 1
        index = int(now // PERIOD)
        if (index & 1) != parity:
            index -= 1
        key = self._secret(index, create=False)
        if key is not None:
            cookie = self._datagram_cookie(key, addr, peer_flowid, parity)
            if cookie.flowid == local_flowid and cookie.verno == verno:
                return cookie
        self.failed += 1
        return None

    def match_datagram_flowid(
        self, now: float, addr: tuple[str, int], peer_flowid: int, local_flowid: int
    ) -> Cookie | None:
        """The live datagram cookie whose flowID is ``local_flowid`` (32 bits only: enough
        to answer with a reminder SYN-ACK, never to build a flow), or None."""
        index = int(now // PERIOD)
        for i in (index, index - 1):
            key = self._secret(i, create=False)
            if key is not None:
                cookie = self._datagram_cookie(key, addr, peer_flowid, i & 1)
                if cookie.flowid == local_flowid:
                    return cookie
        return None

    def make(
        self,
        now: float,
        addr: Address,
        peer_flowid: int,
        mss: int | None,
        window_scale: int | None,
        sack: bool,
    ) -> Cookie:
        """The cookie for a SYN from ``addr`` with flowID ``peer_flowid`` and these options."""
        index = int(now // PERIOD)
        key = self._secret(index, create=True)
        assert key is not None
        want = mss if mss is not None else 536
        mss_index = 0
        for i, value in enumerate(MSS_TABLE):
            if value <= want:
                mss_index = i
        ws_field = 0 if window_scale is None else min(window_scale, 14) + 1
        meta = ((index & 1) << 9) | (mss_index << 6) | (0x20 if sack else 0) | ws_field
        self.made += 1
        return self._derive(key, addr[0], addr[1], peer_flowid, meta)

    def check(
        self,
        now: float,
        addr: Address,
        peer_flowid: int,
        local_flowid: int,
        iss: int,
        verno: int | None,
    ) -> Cookie | None:
        """The cookie an ACK echoes (our ``local_flowid``, ``iss`` = its TCP ack - 1 and
        ``verno`` = its CONTROL ackno - 1, None when it has no CONTROL), or None if forged
        or expired."""
        self.checked += 1
        meta = iss & _META_MASK
        index = int(now // PERIOD)
        if (index & 1) != (meta >> 9):
            index -= 1  # made in the previous period
        key = self._secret(index, create=False)
        if key is not None:
            cookie = self._derive(key, addr[0], addr[1], peer_flowid, meta)
            if (
                cookie.flowid == local_flowid
                and cookie.iss == iss
                and (verno is None or cookie.verno == verno)
            ):
                return cookie
        self.failed += 1
        return None

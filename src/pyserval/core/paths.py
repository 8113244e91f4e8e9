"""Where the host's flows run: its addresses changing, migration, added subflows, ICMP.

An address that goes away moves its flows to another of the same family (an RSYN each);
``migrate`` moves one flow on request; ``add_path`` opens a multipath subflow; an ICMP
unreachable is a soft error for established flows. Functions of a ``HostCore`` (passed in).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..sal.extensions import (
    ControlFlags,
)
from ..sal.packet import SalPacket
from ..transport.connection import Connection, State, Subflow
from ..transport.events import (
    ConnectionFailed,
)
from ..transport.migration import CHALLENGE
from ..transport.multipath import MAX_SUBFLOWS
from .records import (
    Address,
)

if TYPE_CHECKING:
    from .host import HostCore


def send_challenging(host: HostCore, sf: Subflow, pkts: list[SalPacket], remote: Address) -> None:
    """While a candidate peer address is checked, the challenge goes there (within the
    anti-amplification budget) and everything else on the verified path."""
    ch = sf.challenge
    assert ch is not None
    for p in pkts:
        ctl = p.control
        if ctl is not None and ctl.flags & CHALLENGE and not ctl.flags & ControlFlags.ACK:
            data = p.encode(sf.local_addr[0], ch.candidate[0])
            if ch.may_send(len(data)):
                host._out.append((data, sf.local_addr, ch.candidate))
            else:
                host.drops["amplification_limit"] += 1
        else:
            host._send(p, sf.local_addr, remote)


def migrate(
    host: HostCore, conn: Connection, local: Address, now: float, remote: Address | None = None
) -> bool:
    """``HostCore.migrate`` (documented there)."""
    if local not in host.addresses:
        raise ValueError(f"{local[0]}:{local[1]} is not one of this host's addresses")
    if not conn.subflows or conn.state is not State.ESTABLISHED:
        raise ValueError(f"connection {conn.conn_id:#x} is not established")
    sf = conn.primary
    if remote is None:
        remote = peer_address_for(host, conn, local)
        if remote is None:
            raise ValueError(
                f"no address of the peer is known in the family of {local[0]}: name one"
            )
    if sf.local_addr == local and sf.remote_addr == remote and sf.mig is None:
        return True  # already there
    retarget(sf, remote, now)
    started = conn.start_migration(sf, now, local)
    host._wake(conn)
    return started


def add_address(host: HostCore, address: Address) -> None:
    """``HostCore.add_address`` (documented there)."""
    if address not in host.addresses:
        host.addresses.append(address)


def remove_address(host: HostCore, address: Address, now: float) -> list[Connection]:
    """``HostCore.remove_address`` (documented there)."""
    if address in host.addresses:
        host.addresses.remove(address)
    if not host.addresses:
        return []
    # Stay in the family where there is a choice (the peer's address then still fits).
    same = [a for a in host.addresses if (":" in a[0]) == (":" in address[0])]
    return move_flows(host, address, (same or host.addresses)[0], now)


def set_address(host: HostCore, old: Address, new: Address, now: float) -> list[Connection]:
    """``HostCore.set_address`` (documented there)."""
    if old in host.addresses:
        host.addresses[host.addresses.index(old)] = new
    elif new not in host.addresses:
        host.addresses.append(new)
    return move_flows(host, old, new, now)


def peer_address_for(host: HostCore, conn: Connection, local: Address) -> Address | None:
    """Where the peer of ``conn`` is reached from ``local``: its current address when
    of the same family, else the first it advertised (ADD_ADDR) of that family."""
    remote = conn.primary.remote_addr
    v6 = ":" in local[0]
    if remote is not None and (":" in remote[0]) == v6:
        return remote
    mp = conn.mp
    for a in mp.peer_addresses if mp is not None else ():
        if (":" in a[0]) == v6:
            return a
    return None


def move_flows(host: HostCore, old: Address, new: Address, now: float) -> list[Connection]:
    moved = []
    for conn in list(host.connections.values()):
        for sf in list(conn.subflows):
            if sf.local_addr != old:
                continue
            others = [x for x in conn.live_subflows() if x.local_addr != old]
            remote = peer_address_for(host, conn, new) if conn.subflows else None
            if conn.mp is not None and others:
                conn.subflow_failed(sf, now)  # multipath: the other paths carry on
            elif (
                sf is conn.primary
                and conn.state is State.ESTABLISHED
                and remote is not None
                and retarget(sf, remote, now)
                and conn.start_migration(sf, now, new)
            ):
                moved.append(conn)
            else:
                sf.local_addr = new  # closing, a handshake or TIME_WAIT: send from there
        host._wake(conn)
    return moved


def retarget(sf: Subflow, remote: Address, now: float) -> bool:
    """Point ``sf`` at the peer's ``remote`` before a move (a change of IP family);
    late packets from its old address are taken for a while, as after the peer's move.
    Returns True (so it can sit in a condition)."""
    if remote != sf.remote_addr:
        sf.prev_remote, sf.remote_addr = sf.remote_addr, remote
        sf.prev_remote_until = now + 2 * sf.rtt.rto
    return True


def on_unreachable(
    host: HostCore, remote: Address, now: float, reason: str = "unreachable"
) -> None:
    """``HostCore.on_unreachable`` (documented there)."""
    host.stats["icmp_unreachable"] += 1
    for conn in list(host.connections.values()):
        if not conn.subflows or conn.primary.remote_addr != remote:
            continue
        if conn.primary.mig is not None:
            continue  # the path is changing: errors from the old one are expected
        if conn.state is State.SYN_SENT:
            conn.state = State.CLOSED
            conn.error = f"service unreachable: {reason} from {remote[0]}:{remote[1]}"
            conn.emit(ConnectionFailed(conn.conn_id, conn.error))
        elif conn.state is State.ESTABLISHED:
            conn.unreachable_count += 1
            host.stats["icmp_soft_error"] += 1
        host._wake(conn)


def add_path(
    host: HostCore, conn: Connection, local: Address, remote: Address, now: float
) -> Subflow:
    """``HostCore.add_path`` (documented there)."""
    if local not in host.addresses:
        raise ValueError(f"{local[0]}:{local[1]} is not one of this host's addresses")
    for sf in conn.subflows:
        if sf.local_addr == local and sf.remote_addr == remote:
            raise ValueError(f"there is already a path {local} -> {remote}")
    if len(conn.subflows) >= MAX_SUBFLOWS:
        raise ValueError(f"a connection has at most {MAX_SUBFLOWS} subflows")
    host.flow_room()
    flowid = host.flows.allocate()
    sf = Subflow(conn, flowid, local, remote, host.rng)
    conn.add_subflow(sf, now)  # raises if the connection is not multipath
    host.flows.insert(flowid, sf)
    host._wake(conn)
    return sf

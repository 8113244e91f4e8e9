"""Control-plane peers for the multi-process router tests: one per process.

Run as a script (``PYTHONPATH`` must reach ``src``)::

    python tests/helpers/control_peers.py certified --router IP:PORT --prefix 5e7a/16

``certified`` makes a fresh Ed25519 :class:`~pyserval.ServiceKey`, derives its
self-certifying serviceID under ``--prefix`` and listens on it (an echo service) with
``key=key``, so its host registers it with the router signed by the certifying key. It
records what it sends to the router on the wire (the control payloads of its SAL datagrams)
and which messages the router acknowledged. Once the router accepted the registration it
prints one line::

    CERTIFIED {"service": <hex>, "address": "IP:PORT", "captured": <hex>}

``captured`` is the control payload of a REGISTER the router acknowledged as accepted: what
an eavesdropper on the path would have seen, for a test to replay from elsewhere. The peer
then serves echo until SIGTERM or SIGINT (unregistering on the way out), and exits 2 if the
router refused the registration or did not answer within ``--timeout`` seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys

import anyio

import pyserval
from pyserval.control import (
    AckMessage,
    BadControlMessage,
    HostServiceController,
    RegisterMessage,
    decode_message,
)
from pyserval.runtime.host import parse_address
from pyserval.sal import MalformedPacket, decode_packet
from pyserval.sal.inet import Address
from pyserval.sal.train import SuperDatagram


async def echo(stream: pyserval.ServalStream) -> None:
    with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
        while True:
            await stream.send(await stream.receive())


async def certified(args: argparse.Namespace) -> int:
    router = parse_address(args.router)
    key = pyserval.ServiceKey.generate()
    sid = key.service_id(args.prefix)
    host = pyserval.Host([args.listen], router=args.router)
    async with host:
        ctl = host.controller
        assert isinstance(ctl, HostServiceController)

        # The tap: every REGISTER this host puts on the wire to the router, by seq (the
        # datagrams the core hands to the UDP socket; a UdpEndpoint cannot be patched).
        core = host.core
        assert core is not None
        sent: dict[int, bytes] = {}
        wire_to_send = core.wire_to_send

        def tap(now: float) -> list[tuple[bytes | SuperDatagram, Address, Address]]:
            out = wire_to_send(now)
            for data, _local, remote in out:
                if remote != router or isinstance(data, SuperDatagram):
                    continue  # (a super-datagram is stream data, never a REGISTER)
                with contextlib.suppress(MalformedPacket, BadControlMessage):
                    payload = bytes(decode_packet(data).payload)
                    msg = decode_message(payload)
                    if isinstance(msg, RegisterMessage):
                        sent.setdefault(msg.seq, payload)
            return out

        core.wire_to_send = tap  # type: ignore[method-assign]

        # ... and the router's answers: the seqs of REGISTERs it accepted in full.
        accepted: list[int] = []
        on_datagram = ctl.core.on_datagram

        def on_ack(data: bytes) -> None:
            with contextlib.suppress(BadControlMessage):
                msg = decode_message(data)
                if isinstance(msg, AckMessage) and msg.results and all(r.ok for r in msg.results):
                    accepted.append(msg.seq)
            on_datagram(data)

        ctl.core.on_datagram = on_ack  # type: ignore[method-assign]

        listener = await host.listen(sid, key=key)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + args.timeout
        while not any(seq in sent for seq in accepted):
            if ctl.core.refused or loop.time() > deadline:
                print(f"NOT ACCEPTED refused={ctl.core.refused}", flush=True)
                return 2
            await asyncio.sleep(0.005)
        captured = next(sent[seq] for seq in accepted if seq in sent)
        core.wire_to_send = wire_to_send  # type: ignore[method-assign]
        ip, port = host.addresses[0]
        line = {"service": sid.hex, "address": f"{ip}:{port}", "captured": captured.hex()}
        print("CERTIFIED " + json.dumps(line), flush=True)
        await listener.serve(echo)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="control-plane peers for the router tests")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("certified", help="serve a self-certifying serviceID, signed")
    c.add_argument("--router", required=True, help="IP:PORT of the service router")
    c.add_argument("--prefix", required=True, help="prefix of the ID, <hex>/<len> (<= 96 bits)")
    c.add_argument("--listen", default="127.0.0.1:0")
    c.add_argument("--timeout", type=float, default=10.0)
    args = parser.parse_args(argv)

    async def run() -> int:
        task = asyncio.ensure_future(certified(args))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        try:
            return await task
        except asyncio.CancelledError:
            return 0

    return asyncio.run(run())


if __name__ == "__main__":
    sys.exit(main())
